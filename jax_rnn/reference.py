"""Plain numpy references, written from the equations and independent of JAX.

These are the loops the test suite compares jax_rnn against: the seed notebook's
Python loop, generalised to batches, and a hand-written backpropagation through time.
They are slow on purpose: every step is spelled out.

Example:
    >>> from jax_rnn import reference
    >>> params, xs, state0 = jax_rnn.seed_example()
    >>> final, ys = reference.numpy_unroll(params, xs, state0)
    >>> print(ys.state[0].round(4))
    [0.537  0.4621]
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import numpy as np

from ._types import StepOutput

__all__ = ["numpy_unroll", "numpy_output_jacobian"]


def _np(value: Any, dtype: Any = None) -> np.ndarray | None:
    return None if value is None else np.asarray(value, dtype=dtype)


def _elman_arrays(params: Any, dtype: Any) -> dict[str, np.ndarray | None]:
    names = ("w_cell_state", "w_cell_input", "b_cell", "w_output", "b_output", "b_cell_state")
    return {n: _np(getattr(params, n, None), dtype) for n in names}


def _dtype_of(params: Any, xs: Any) -> np.dtype:
    return np.result_type(np.asarray(params.w_cell_state).dtype, np.asarray(xs).dtype, np.float32)


def numpy_unroll(
    params: Any,
    xs: Any,
    state0: Any = None,
    *,
    activation: Callable[[np.ndarray], np.ndarray] = np.tanh,
    reverse: bool = False,
) -> tuple[np.ndarray, StepOutput]:
    """The seed notebook's loop for an Elman cell, generalised to batches.

    For ``t = 0 .. T-1`` (``T-1 .. 0`` with ``reverse``)::

        pre = state @ w_cell_state + x_t @ w_cell_input + b_cell
        state = activation(pre)
        output = state @ w_output + b_output

    Args:
        params: anything with the :class:`jax_rnn.ElmanParams` attributes.
        xs: ``(T, *batch, I)``.
        state0: ``(*batch, H)`` or broadcastable; zeros when ``None``.
        activation: elementwise numpy function.
        reverse: walk time backwards (outputs keep their time index).

    Returns:
        ``(final_state, StepOutput)`` of numpy arrays stacked over time.
    """
    dtype = _dtype_of(params, xs)
    p = _elman_arrays(params, dtype)
    xs = np.asarray(xs, dtype)
    steps, batch = xs.shape[0], xs.shape[1:-1]
    hidden = p["w_cell_state"].shape[0]
    state = np.zeros((*batch, hidden), dtype) if state0 is None else np.asarray(state0, dtype)
    state = np.broadcast_to(state, (*batch, hidden)).copy()
    out_size = hidden if p["w_output"] is None else p["w_output"].shape[1]
    pres = np.zeros((steps, *batch, hidden), dtype)
    states = np.zeros((steps, *batch, hidden), dtype)
    outputs = np.zeros((steps, *batch, out_size), dtype)
    order = range(steps - 1, -1, -1) if reverse else range(steps)
    for t in order:
        pre = np.matmul(state, p["w_cell_state"]) + np.matmul(xs[t], p["w_cell_input"])
        for bias in (p["b_cell"], p["b_cell_state"]):
            if bias is not None:
                pre = pre + bias
        state = activation(pre)
        output = state if p["w_output"] is None else np.matmul(state, p["w_output"])
        if p["b_output"] is not None:
            output = output + p["b_output"]
        pres[t], states[t], outputs[t] = pre, state, output
    return state, StepOutput(pres, states, outputs)


def numpy_output_jacobian(
    params: Any,
    xs: Any,
    state0: Any = None,
    *,
    activation_grad: Callable[[np.ndarray, np.ndarray], np.ndarray] | None = None,
    activation: Callable[[np.ndarray], np.ndarray] = np.tanh,
) -> dict[str, np.ndarray | None]:
    """Hand-written backpropagation through time for every output of an Elman cell.

    For each output time ``t`` the sensitivity ``g = d y_t / d h_t = w_output^T`` is
    walked back through ``s = t, t-1, .., 0``::

        d_pre_s = g * activation'(pre_s)
        dW_cell_state += outer(h_{s-1}, d_pre_s);  dW_cell_input += outer(x_s, d_pre_s)
        db_cell += d_pre_s;  g = d_pre_s @ w_cell_state^T

    Args:
        params: anything with the :class:`jax_rnn.ElmanParams` attributes.
        xs: ``(T, *batch, I)``.
        state0: ``(*batch, H)``; zeros when ``None``.
        activation_grad: ``f'(pre)`` given ``(pre, f(pre))``; ``1 - f(pre)**2`` (tanh) by
            default.
        activation: the activation, as in :func:`numpy_unroll`.

    Returns:
        a dict field name -> array shaped ``(T, *batch, O, *field_shape)``; fields that are
        ``None`` in ``params`` map to ``None``.
    """
    if activation_grad is None:

        def activation_grad(pre: np.ndarray, post: np.ndarray) -> np.ndarray:
            return 1.0 - post**2

    dtype = _dtype_of(params, xs)
    p = _elman_arrays(params, dtype)
    xs = np.asarray(xs, dtype)
    _, ys = numpy_unroll(params, xs, state0, activation=activation)
    steps, batch = xs.shape[0], xs.shape[1:-1]
    hidden, inputs = p["w_cell_state"].shape[0], xs.shape[-1]
    h0 = np.zeros((*batch, hidden), dtype) if state0 is None else np.asarray(state0, dtype)
    h0 = np.broadcast_to(h0, (*batch, hidden))
    has_readout = p["w_output"] is not None
    out_size = p["w_output"].shape[1] if has_readout else hidden
    # d y / d h at the output step: (O, H) = w_output^T, or the identity without readout.
    dy_dh = p["w_output"].T if has_readout else np.eye(hidden, dtype=dtype)

    lead = (steps, *batch, out_size)
    jac: dict[str, np.ndarray | None] = {
        "w_cell_state": np.zeros((*lead, hidden, hidden), dtype),
        "w_cell_input": np.zeros((*lead, inputs, hidden), dtype),
        "b_cell": np.zeros((*lead, hidden), dtype),
        "w_output": np.zeros((*lead, hidden, out_size), dtype) if has_readout else None,
        "b_output": np.zeros((*lead, out_size), dtype),
    }
    for t in range(steps):
        g = np.broadcast_to(dy_dh, (*batch, out_size, hidden)).copy()
        for s in range(t, -1, -1):
            d_pre = g * activation_grad(ys.pre_activation[s], ys.state[s])[..., None, :]
            h_prev = h0 if s == 0 else ys.state[s - 1]
            jac["w_cell_state"][t] += h_prev[..., None, :, None] * d_pre[..., :, None, :]
            jac["w_cell_input"][t] += xs[s][..., None, :, None] * d_pre[..., :, None, :]
            jac["b_cell"][t] += d_pre
            g = np.matmul(d_pre, p["w_cell_state"].T)
        if has_readout:
            eye = np.eye(out_size, dtype=dtype)  # d y_k / d W_o[i, j] = h_i * delta_jk
            jac["w_output"][t] = ys.state[t][..., None, :, None] * eye[:, None, :]
        jac["b_output"][t] = np.eye(out_size, dtype=dtype)
    jac["b_cell_state"] = jac["b_cell"].copy() if p["b_cell_state"] is not None else None
    for name in ("b_cell", "b_output"):
        if p[name] is None:
            jac[name] = None
    return jac
