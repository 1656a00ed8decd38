"""Gradients of the outputs with respect to the weights, through time."""

from __future__ import annotations

import functools
from typing import Any

import jax
import numpy as np
from jax import Array

from ._types import Cell, StepOutput
from ._unroll import cast_floats, initial_carry, prepare, scan


def outputs_of(ys: Any) -> Any:
    """The ``output`` field of stacked :class:`StepOutput`, or ``ys`` for other cells."""
    return ys.output if isinstance(ys, StepOutput) else ys


@functools.partial(jax.jit, static_argnames=("cell", "dtype", "batch_shape"))
def _output_jacobian_jit(
    cell: Any, params: Any, xs: Any, state0: Any, *, dtype: np.dtype | None, batch_shape: tuple
) -> Any:
    xs, state0 = cast_floats((xs, state0), dtype)

    def outputs(params: Any) -> Any:
        cast = cast_floats(params, dtype)
        carry = initial_carry(cell, cast, state0, batch_shape)
        _, ys = scan(functools.partial(cell.step, cast), carry, xs)
        return outputs_of(ys)

    return jax.jacrev(outputs)(params)


def output_jacobian(cell: Cell, params: Any, xs: Array, state0: Any = None) -> Any:
    r"""The Jacobian of every output with respect to every weight, through time.

    For outputs :math:`y_t` of shape ``(*batch, O)`` this returns, for each params leaf
    :math:`W`, the array :math:`\partial y_t / \partial W` shaped
    ``(T, *batch, O, *W.shape)``: entry ``[t, b, k, i, j]`` is
    :math:`\partial y_{t,b,k} / \partial W_{ij}`, the full backpropagation-through-time
    sensitivity of output ``t`` (it sums over every earlier step that ``W`` touched).
    ``None`` fields (no readout, no bias) stay ``None``.

    It is reverse-mode over the outputs (:func:`jax.jacrev`), jit-compiled and cached like
    :func:`unroll`. For a scalar loss, ``jax.grad`` of a function of ``unroll`` is cheaper:
    see the tutorial.

    Args:
        cell: a :class:`Cell`.
        params: the cell's params.
        xs: inputs shaped ``(T, *batch, I)``.
        state0: the initial state, as for :func:`unroll`.

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
    prep = prepare("jax_rnn.output_jacobian", cell, params, xs, state0)
    return _output_jacobian_jit(
        cell, params, prep.xs, prep.state0, dtype=prep.dtype, batch_shape=prep.batch_shape
    )
