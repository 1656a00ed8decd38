"""Plain numpy references, written from the equations and independent of JAX.

These are the loops the test suite compares jax_rnn against: the seed notebook's
Python loop, generalised to batches, the same loop for PyTorch's GRU and LSTM equations,
and a hand-written backpropagation through time.
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

__all__ = ["numpy_unroll", "numpy_gru_unroll", "numpy_lstm_unroll", "numpy_output_jacobian"]


def _np(value: Any, dtype: Any = None) -> np.ndarray | None:
    return None if value is None else np.asarray(value, dtype=dtype)


def _elman_arrays(params: Any, dtype: Any) -> dict[str, Any]:
    names = ("w_cell_state", "w_cell_input", "b_cell", "w_output", "b_output", "b_cell_state")
    return {n: _np(getattr(params, n, None), dtype) for n in names}


def _gated_arrays(params: Any, dtype: Any) -> dict[str, Any]:
    names = ("w_cell_input", "w_cell_state", "b_cell_input", "b_cell_state", "w_output", "b_output")
    return {n: _np(getattr(params, n), dtype) for n in names}


def _dtype_of(params: Any, xs: Any, *more: Any) -> np.dtype:
    """The float dtype to compute in: the promotion of the float arguments, at least float32.

    Integer and bool arrays do not take part (``jax_rnn.unroll`` casts them to the float
    dtype of the rest).
    """
    arrays = (params.w_cell_state, xs, *(m for m in more if m is not None))
    floats = [np.asarray(a).dtype for a in arrays]
    return np.result_type(*(d for d in floats if d.kind == "f"), np.float32)


def _sigmoid(x: np.ndarray) -> np.ndarray:
    """The logistic function, without overflow for large ``|x|``."""
    e = np.exp(-np.abs(x))
    return np.where(x >= 0, 1.0 / (1.0 + e), e / (1.0 + e)).astype(x.dtype)


def _readout(p: dict[str, Any], state: np.ndarray) -> np.ndarray:
    output = state if p["w_output"] is None else np.matmul(state, p["w_output"])
    if p["b_output"] is not None:
        output = output + p["b_output"]
    return output


def _lengths(seq_lengths: Any, batch: tuple[int, ...], steps: int) -> np.ndarray:
    """Per-example lengths shaped like the batch; every length ``steps`` when ``None``."""
    if seq_lengths is None:
        return np.full(batch, steps, dtype=int)
    lengths = np.asarray(seq_lengths)
    if lengths.dtype.kind not in "iu":
        raise TypeError(f"seq_lengths must hold integers, got dtype {lengths.dtype}.")
    try:
        lengths = np.broadcast_to(lengths, batch)
    except ValueError:
        raise ValueError(
            f"seq_lengths has shape {lengths.shape}, expected the batch shape {batch}."
        ) from None
    if lengths.size and (lengths.min() < 0 or lengths.max() > steps):
        raise ValueError(f"seq_lengths must lie in 0..{steps} (the time steps), got {lengths}.")
    return lengths


def _run(
    step: Callable[[tuple[np.ndarray, ...], np.ndarray], tuple[tuple[np.ndarray, ...], tuple]],
    carry0: tuple[np.ndarray, ...],
    xs: np.ndarray,
    out_sizes: tuple[int, int, int],
    reverse: bool,
    seq_lengths: Any,
    resets: Any = None,
) -> tuple[tuple[np.ndarray, ...], StepOutput]:
    """Runs ``step`` on each batch element separately, over its own valid steps.

    ``carry0`` holds arrays shaped ``(*batch, H)``; ``step(carry, x)`` works on one
    example and returns ``(carry, (pre_activation, state, output))``. Element ``b`` walks
    ``t = 0 .. len_b - 1`` (``len_b - 1 .. 0`` with ``reverse``), its carry set back to
    its ``carry0`` where an episode starts (``resets[t, b]``): before step ``t``, or with
    ``reverse`` before step ``t - 1``; its outputs at the other steps stay zero and its
    final carry is the carry after its last step.
    """
    steps, batch = xs.shape[0], xs.shape[1:-1]
    lengths = _lengths(seq_lengths, batch, steps)
    if resets is not None:
        resets = np.asarray(resets, bool)
        if resets.shape != (steps, *batch):
            raise ValueError(f"resets has shape {resets.shape}, expected {(steps, *batch)}.")
    outs: list[Any] = [np.zeros((steps, *batch, size), xs.dtype) for size in out_sizes]
    finals = [np.array(c, copy=True) for c in carry0]
    for b in np.ndindex(*batch):
        carry = tuple(c[b].copy() for c in carry0)
        valid = range(int(lengths[b]))
        for t in reversed(valid) if reverse else valid:
            # an episode starts at each reset: forwards, restart before it; backwards,
            # before the last step of the episode before it
            start = t + 1 if reverse else t
            if resets is not None and start in valid and resets[(start, *b)]:
                carry = tuple(c[b].copy() for c in carry0)
            carry, ys = step(carry, xs[(t, *b)])
            for out, y in zip(outs, ys, strict=True):
                out[(t, *b)] = y
        for final, c in zip(finals, carry, strict=True):
            final[b] = c
    return tuple(finals), StepOutput(*outs)


def _state(value: Any, batch: tuple[int, ...], hidden: int, dtype: Any) -> np.ndarray:
    """``value`` (zeros when ``None``) broadcast to ``(*batch, hidden)``."""
    state = np.zeros(hidden, dtype) if value is None else np.asarray(value, dtype)
    return np.broadcast_to(state, (*batch, hidden)).copy()


def numpy_unroll(
    params: Any,
    xs: Any,
    state0: Any = None,
    *,
    activation: Callable[[np.ndarray], np.ndarray] = np.tanh,
    reverse: bool = False,
    seq_lengths: Any = None,
    resets: Any = None,
) -> tuple[np.ndarray, StepOutput]:
    """The seed notebook's loop for an Elman cell, generalised to batches.

    For each batch element, for ``t = 0 .. T-1`` (``T-1 .. 0`` with ``reverse``)::

        pre = state @ w_cell_state + x_t @ w_cell_input + b_cell
        state = activation(pre)
        output = state @ w_output + b_output

    Args:
        params: anything with the :class:`jax_rnn.ElmanParams` attributes.
        xs: ``(T, *batch, I)``.
        state0: ``(*batch, H)`` or broadcastable; zeros when ``None``.
        activation: elementwise numpy function.
        reverse: walk time backwards (outputs keep their time index).
        seq_lengths: ``None``, or integers in ``0..T`` shaped like the batch. Element
            ``b`` then runs only its first ``len_b`` steps (in reverse order with
            ``reverse``, still ending at ``t = 0``): its outputs at ``t >= len_b`` are zero
            and its final state is the state after its last valid step (``state0`` when
            ``len_b == 0``), as with PyTorch's packed sequences.
        resets: ``None``, or booleans ``(T, *batch)``: ``resets[t, b]`` starts an
            episode at step ``t`` of element ``b``, whose state is set back to its
            ``state0`` at the boundary: before step ``t``, or with ``reverse`` before
            step ``t - 1``; steps past ``len_b`` are not run, so their resets do
            nothing.

    Returns:
        ``(final_state, StepOutput)`` of numpy arrays stacked over time.

    Example:
        The seed notebook's numbers, and the same from :func:`jax_rnn.unroll`:

        >>> params, xs, state0 = jax_rnn.seed_example()
        >>> final, ys = jax_rnn.reference.numpy_unroll(params, xs, state0)
        >>> _, ours = jax_rnn.unroll(jax_rnn.elman, params, xs, state0)
        >>> bool(np.allclose(ours.output, ys.output, rtol=1e-12, atol=0))
        True
    """
    dtype = _dtype_of(params, xs, state0)
    p = _elman_arrays(params, dtype)
    xs = np.asarray(xs, dtype)
    hidden = p["w_cell_state"].shape[0]
    out_size = hidden if p["w_output"] is None else p["w_output"].shape[1]

    def step(carry: tuple[np.ndarray, ...], x: np.ndarray) -> tuple[tuple[np.ndarray], tuple]:
        (state,) = carry
        pre = np.matmul(state, p["w_cell_state"]) + np.matmul(x, p["w_cell_input"])
        for bias in (p["b_cell"], p["b_cell_state"]):
            if bias is not None:
                pre = pre + bias
        state = activation(pre)
        return (state,), (pre, state, _readout(p, state))

    state = _state(state0, xs.shape[1:-1], hidden, dtype)
    (final,), ys = _run(step, (state,), xs, (hidden, hidden, out_size), reverse, seq_lengths,
                    resets)
    return final, ys


def numpy_gru_unroll(
    params: Any,
    xs: Any,
    state0: Any = None,
    *,
    reverse: bool = False,
    seq_lengths: Any = None,
    resets: Any = None,
) -> tuple[np.ndarray, StepOutput]:
    """PyTorch's ``nn.GRU`` equations as a plain loop, with an optional readout.

    For each batch element, for ``t = 0 .. T-1`` (``T-1 .. 0`` with ``reverse``), with
    the gate columns ordered ``r, z, n`` (thirds of ``3H``)::

        gi = x_t @ w_cell_input + b_cell_input;  gh = h @ w_cell_state + b_cell_state
        r = sigmoid(gi_r + gh_r);  z = sigmoid(gi_z + gh_z)
        pre = gi_n + r * gh_n;  n = tanh(pre)
        h = (1 - z) * n + z * h;  output = h @ w_output + b_output

    Args:
        params: anything with the :class:`jax_rnn.GRUParams` attributes.
        xs: ``(T, *batch, I)``.
        state0: ``(*batch, H)`` or broadcastable; zeros when ``None``.
        reverse: walk time backwards (outputs keep their time index).
        seq_lengths: ``None`` or per-example lengths, as in :func:`numpy_unroll`.
        resets: ``None`` or per-step restarts, as in :func:`numpy_unroll`.

    Returns:
        ``(final_state, StepOutput(pre, h, output))`` of numpy arrays stacked over time.

    Example:
        >>> params = jax_rnn.gru.init(jax.random.key(0), 3, 4, 2)
        >>> xs = np.random.default_rng(0).normal(size=(6, 2, 3))
        >>> lengths = np.array([6, 2])
        >>> final, ys = jax_rnn.reference.numpy_gru_unroll(params, xs, seq_lengths=lengths)
        >>> ours_final, ours = jax_rnn.unroll(jax_rnn.gru, params, xs, seq_lengths=lengths)
        >>> bool(np.allclose(ours.output, ys.output, atol=1e-12))
        True
        >>> bool(np.allclose(final[1], ys.state[1, 1], atol=1e-12))  # after its 2nd step
        True
    """
    dtype = _dtype_of(params, xs, state0)
    p = _gated_arrays(params, dtype)
    xs = np.asarray(xs, dtype)
    hidden = p["w_cell_state"].shape[0]
    out_size = hidden if p["w_output"] is None else p["w_output"].shape[1]

    def step(carry: tuple[np.ndarray, ...], x: np.ndarray) -> tuple[tuple[np.ndarray], tuple]:
        (h,) = carry
        gi = np.matmul(x, p["w_cell_input"])
        gh = np.matmul(h, p["w_cell_state"])
        if p["b_cell_input"] is not None:
            gi = gi + p["b_cell_input"]
        if p["b_cell_state"] is not None:
            gh = gh + p["b_cell_state"]
        r_cols, z_cols, n_cols = (slice(k * hidden, (k + 1) * hidden) for k in range(3))
        r = _sigmoid(gi[r_cols] + gh[r_cols])
        z = _sigmoid(gi[z_cols] + gh[z_cols])
        pre = gi[n_cols] + r * gh[n_cols]
        h = (1 - z) * np.tanh(pre) + z * h
        return (h,), (pre, h, _readout(p, h))

    state = _state(state0, xs.shape[1:-1], hidden, dtype)
    (final,), ys = _run(step, (state,), xs, (hidden, hidden, out_size), reverse, seq_lengths,
                    resets)
    return final, ys


def numpy_lstm_unroll(
    params: Any,
    xs: Any,
    state0: Any = None,
    *,
    reverse: bool = False,
    seq_lengths: Any = None,
    resets: Any = None,
) -> tuple[tuple[np.ndarray, np.ndarray], StepOutput]:
    """PyTorch's ``nn.LSTM`` equations as a plain loop, with an optional readout.

    For each batch element, for ``t = 0 .. T-1`` (``T-1 .. 0`` with ``reverse``), with
    the gate columns ordered ``i, f, g, o`` (quarters of ``4H``)::

        a = x_t @ w_cell_input + b_cell_input + h @ w_cell_state + b_cell_state
        i = sigmoid(a_i);  f = sigmoid(a_f);  o = sigmoid(a_o)
        c = f * c + i * tanh(a_g);  h = o * tanh(c);  output = h @ w_output + b_output

    Args:
        params: anything with the :class:`jax_rnn.LSTMParams` attributes.
        xs: ``(T, *batch, I)``.
        state0: ``None`` (zeros) or a pair ``(h, c)`` (e.g. a
            :class:`jax_rnn.LSTMState`), each ``(*batch, H)`` or broadcastable.
        reverse: walk time backwards (outputs keep their time index).
        seq_lengths: ``None`` or per-example lengths, as in :func:`numpy_unroll`.
        resets: ``None`` or per-step restarts, as in :func:`numpy_unroll`.

    Returns:
        ``((h, c), StepOutput(a_g, h, output))``: the final carry as a plain tuple and
        the step outputs stacked over time, all numpy arrays.

    Example:
        >>> params = jax_rnn.lstm.init(jax.random.key(0), 3, 4)
        >>> xs = np.random.default_rng(0).normal(size=(6, 2, 3))
        >>> (h, c), ys = jax_rnn.reference.numpy_lstm_unroll(params, xs, reverse=True)
        >>> final, ours = jax_rnn.unroll(jax_rnn.lstm, params, xs, reverse=True)
        >>> bool(np.allclose(final.c, c, atol=1e-12))
        True
        >>> bool(np.allclose(ours.state[0], h, atol=1e-12))  # reverse ends at t = 0
        True
    """
    h0, c0 = (None, None) if state0 is None else state0
    dtype = _dtype_of(params, xs, h0, c0)
    p = _gated_arrays(params, dtype)
    xs = np.asarray(xs, dtype)
    hidden = p["w_cell_state"].shape[0]
    out_size = hidden if p["w_output"] is None else p["w_output"].shape[1]

    def step(carry: tuple[np.ndarray, ...], x: np.ndarray) -> tuple[tuple[np.ndarray, ...], tuple]:
        h, c = carry
        a = np.matmul(x, p["w_cell_input"]) + np.matmul(h, p["w_cell_state"])
        for bias in (p["b_cell_input"], p["b_cell_state"]):
            if bias is not None:
                a = a + bias
        i, f, g, o = (a[k * hidden : (k + 1) * hidden] for k in range(4))
        c = _sigmoid(f) * c + _sigmoid(i) * np.tanh(g)
        h = _sigmoid(o) * np.tanh(c)
        return (h, c), (g, h, _readout(p, h))

    batch = xs.shape[1:-1]
    carry0 = (_state(h0, batch, hidden, dtype), _state(c0, batch, hidden, dtype))
    (h, c), ys = _run(step, carry0, xs, (hidden, hidden, out_size), reverse, seq_lengths,
                    resets)
    return (h, c), ys


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

    Example:
        Against JAX's autodiff of the seed notebook's last output:

        >>> params, xs, state0 = jax_rnn.seed_example()
        >>> jac = jax_rnn.reference.numpy_output_jacobian(params, xs, state0)
        >>> def last_output(p):
        ...     return jax_rnn.unroll(jax_rnn.elman, p, xs, state0)[1].output[-1, 0]
        >>> grads = jax.grad(last_output)(params)
        >>> bool(np.allclose(jac["w_cell_state"][-1, 0], grads.w_cell_state, atol=1e-12))
        True
    """
    def tanh_grad(pre: np.ndarray, post: np.ndarray) -> np.ndarray:
        return 1.0 - post**2

    grad_of = tanh_grad if activation_grad is None else activation_grad

    dtype = _dtype_of(params, xs, state0)
    p = _elman_arrays(params, dtype)
    xs = np.asarray(xs, dtype)
    _, ys = numpy_unroll(params, xs, state0, activation=activation)
    pre_acts, states = np.asarray(ys.pre_activation), np.asarray(ys.state)
    steps, batch = xs.shape[0], xs.shape[1:-1]
    hidden, inputs = p["w_cell_state"].shape[0], xs.shape[-1]
    h0 = np.zeros((*batch, hidden), dtype) if state0 is None else np.asarray(state0, dtype)
    h0 = np.broadcast_to(h0, (*batch, hidden))
    has_readout = p["w_output"] is not None
    out_size = p["w_output"].shape[1] if has_readout else hidden
    # d y / d h at the output step: (O, H) = w_output^T, or the identity without readout.
    dy_dh = p["w_output"].T if has_readout else np.eye(hidden, dtype=dtype)

    lead = (steps, *batch, out_size)
    jac: dict[str, Any] = {
        "w_cell_state": np.zeros((*lead, hidden, hidden), dtype),
        "w_cell_input": np.zeros((*lead, inputs, hidden), dtype),
        "b_cell": np.zeros((*lead, hidden), dtype),
        "w_output": np.zeros((*lead, hidden, out_size), dtype) if has_readout else None,
        "b_output": np.zeros((*lead, out_size), dtype),
    }
    for t in range(steps):
        g = np.broadcast_to(dy_dh, (*batch, out_size, hidden)).copy()
        for s in range(t, -1, -1):
            d_pre = g * grad_of(pre_acts[s], states[s])[..., None, :]
            h_prev = h0 if s == 0 else states[s - 1]
            jac["w_cell_state"][t] += h_prev[..., None, :, None] * d_pre[..., :, None, :]
            jac["w_cell_input"][t] += xs[s][..., None, :, None] * d_pre[..., :, None, :]
            jac["b_cell"][t] += d_pre
            g = np.matmul(d_pre, p["w_cell_state"].T)
        if has_readout:
            eye = np.eye(out_size, dtype=dtype)  # d y_k / d W_o[i, j] = h_i * delta_jk
            jac["w_output"][t] = states[t][..., None, :, None] * eye[:, None, :]
        jac["b_output"][t] = np.eye(out_size, dtype=dtype)
    jac["b_cell_state"] = jac["b_cell"].copy() if p["b_cell_state"] is not None else None
    for name in ("b_cell", "b_output"):
        if p[name] is None:
            jac[name] = None
    return jac
