"""Gradients of the outputs with respect to the weights, through time."""

from __future__ import annotations

import functools
from typing import Any

import jax
import numpy as np
from jax import Array

from ._types import Cell, StepOutput
from ._unroll import Options, _unroll_jit, checked_call


def outputs_of(ys: Any) -> Any:
    """The ``output`` field of stacked :class:`StepOutput`, or ``ys`` for other cells."""
    return ys.output if isinstance(ys, StepOutput) else ys


@functools.partial(
    jax.jit, static_argnames=("model", "opts", "dtype", "batch_shape", "time_major")
)
def _output_jacobian_jit(
    model: Any,
    params: Any,
    xs: Any,
    state0: Any,
    lengths: Any,
    resets: Any,
    dropout_key: Any,
    guess: Any,
    *,
    opts: Options,
    dtype: np.dtype | None,
    batch_shape: tuple,
    time_major: bool,
) -> Any:
    def outputs(params: Any) -> Any:
        _, ys, _ = _unroll_jit(model, params, xs, state0, lengths, resets, dropout_key, guess,
                               opts=opts, dtype=dtype, batch_shape=batch_shape,
                               time_major=time_major)
        return outputs_of(ys)

    return jax.jacrev(outputs)(params)


def output_jacobian(
    cell: Cell,
    params: Any,
    xs: Array,
    state0: Any = None,
    *,
    seq_lengths: Any = None,
    reverse: bool = False,
    time_major: bool = True,
    resets: Any = None,
    remat: int | bool = False,
    truncate: int | None = None,
    dropout_key: Array | None = None,
    impl: str = "fused",
    method: str = "sequential",
    unroll: int | bool | None = None,
) -> Any:
    r"""The Jacobian of every output with respect to every weight, through time.

    For outputs :math:`y_t` of shape ``(*batch, O)`` this returns, for each params leaf
    :math:`W`, the array :math:`\partial y_t / \partial W` shaped
    ``(T, *batch, O, *W.shape)``: entry ``[t, b, k, i, j]`` is
    :math:`\partial y_{t,b,k} / \partial W_{ij}`, the full backpropagation-through-time
    sensitivity of output ``t`` (it sums over every earlier step that ``W`` touched).
    ``None`` fields (no readout, no bias) stay ``None``.

    It is reverse-mode over the outputs (:func:`jax.jacrev`), jit-compiled and cached like
    :func:`unroll`, and takes the same keyword options. For a scalar loss,
    ``jax.grad`` of a function of ``unroll`` is cheaper: see the gradients guide.

    Args:
        cell: a :class:`Cell`, :class:`Stack` or :class:`Bidirectional`.
        params: the model's params.
        xs: inputs shaped ``(T, *batch, I)``.
        state0: the initial state, as for :func:`unroll`.
        seq_lengths: as for :func:`unroll`.
        reverse: as for :func:`unroll`.
        time_major: as for :func:`unroll`; with ``False`` the leading axes are
            ``(*batch, T, O)``.
        resets: as for :func:`unroll`.
        remat: as for :func:`unroll`.
        truncate: as for :func:`unroll` (the Jacobian is then the truncated one).
        dropout_key: as for :func:`unroll`.
        impl: as for :func:`unroll`.
        method: as for :func:`unroll` (with the parallel methods' default options).
        unroll: as for :func:`unroll`.

    Returns:
        a pytree shaped like ``params``.

    Example:
        >>> params, xs, state0 = jax_rnn.seed_example()
        >>> jac = jax_rnn.output_jacobian(jax_rnn.elman, params, xs, state0)
        >>> jac.w_cell_state.shape  # (T, O, H, H)
        (5, 1, 2, 2)
        >>> print(jac.b_output[:, 0, 0])  # d y_t / d b_output = 1 at every step
        [1. 1. 1. 1. 1.]
    """
    return checked_call("jax_rnn.output_jacobian", _output_jacobian_jit, cell, params, xs,
                        state0, seq_lengths=seq_lengths, reverse=reverse,
                        time_major=time_major, resets=resets, remat=remat, truncate=truncate,
                        dropout_key=dropout_key, impl=impl, method=method, unroll=unroll,
                        check_finite=False)
