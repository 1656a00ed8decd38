"""Unrolling a cell over time with :func:`jax.lax.scan`."""

from __future__ import annotations

import functools
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
from jax import Array

from . import _checks
from ._types import Cell


def _check_cell(where: str, cell: Any) -> None:
    if not isinstance(cell, Cell):
        fields = ("init", "step", "initial_state")
        if all(callable(getattr(cell, f, None)) for f in fields):
            return
        raise TypeError(
            f"`{where}`: `cell` must be a jax_rnn.Cell (init, step, initial_state), got "
            f"{type(cell).__name__}; use e.g. `jax_rnn.elman` or build "
            "`jax_rnn.Cell(init, step, initial_state)`."
        )


class Prepared:
    """Checked inputs: arrays, their batch shape and the float dtype to compute in."""

    __slots__ = ("xs", "state0", "dtype", "batch_shape")

    def __init__(self, xs: Any, state0: Any, dtype: np.dtype | None, batch_shape: tuple) -> None:
        self.xs, self.state0, self.dtype, self.batch_shape = xs, state0, dtype, batch_shape


def prepare(where: str, cell: Any, params: Any, xs: Any, state0: Any) -> Prepared:
    """Checks ``(cell, params, xs, state0)`` before tracing; see :func:`unroll`."""
    _check_cell(where, cell)
    expected = _checks.params_type_of(cell)
    if expected is not None and type(params) is not expected:
        raise TypeError(
            f"`{where}`: this cell takes {expected.__name__} but `params` is "
            f"{type(params).__name__}; pass the params made by the same cell's `init`."
        )
    spec = _checks.spec_of(params)
    if spec is None:  # a user cell: only the time axis can be checked
        leaves = jax.tree.leaves(xs)
        if not leaves:
            raise ValueError(f"`{where}`: `xs` has no arrays; pass inputs shaped (time, ...).")
        xs = jax.tree.map(_checks.as_array, xs)
        lengths = {np.shape(leaf)[0] if np.ndim(leaf) else None for leaf in jax.tree.leaves(xs)}
        if None in lengths or len(lengths) != 1:
            raise ValueError(
                f"`{where}`: every leaf of `xs` needs the same leading time axis, got shapes "
                f"{[np.shape(leaf) for leaf in jax.tree.leaves(xs)]}."
            )
        batch = tuple(np.shape(leaves[0])[1:-1])
        return Prepared(xs, state0, None, batch)
    input_size, _, params_dtype = spec.shapes(where, params)
    shape, x_dtype = _checks.check_inputs(where, xs, input_size, time_axis=True)
    batch = shape[1:-1]
    dtypes = [params_dtype, x_dtype]
    if state0 is not None:
        spec.check_carry(where, params, state0, batch)
        dtypes += _checks.carry_dtypes(where, state0)
        state0 = jax.tree.map(_checks.as_array, state0)
    return Prepared(_checks.as_array(xs), state0, _checks.float_dtype(*dtypes), batch)


def cast_floats(tree: Any, dtype: np.dtype | None) -> Any:
    """Casts every leaf to ``dtype`` (``None``: leave as is)."""
    if dtype is None:
        return tree
    return jax.tree.map(lambda a: jnp.asarray(a).astype(dtype), tree)


def initial_carry(cell: Any, params: Any, state0: Any, batch_shape: tuple) -> Any:
    """``state0`` broadcast over the batch, or the cell's zeros when ``state0`` is None."""
    if state0 is None:
        return cell.initial_state(params, batch_shape)
    if _checks.spec_of(params) is None:
        return state0
    return jax.tree.map(lambda a: jnp.broadcast_to(a, (*batch_shape, a.shape[-1])), state0)


def check_finite_inputs(where: str, **trees: Any) -> None:
    """Raises ValueError if a concrete input holds NaN or Inf (a checkify check if traced)."""
    for name, tree in trees.items():
        for leaf in jax.tree.leaves(tree):
            if isinstance(leaf, jax.core.Tracer):
                from jax.experimental import checkify

                checkify.check(
                    jnp.isfinite(leaf).all(),
                    f"`{where}`: `{name}` contains NaN or Inf (check_finite=True).",
                )
            elif not np.isfinite(np.asarray(leaf)).all():
                raise ValueError(
                    f"`{where}`: `{name}` contains NaN or Inf; clean the input, or call with "
                    "check_finite=False to let non-finite values propagate."
                )


def _check_unroll_factor(where: str, unroll: Any) -> None:
    if isinstance(unroll, bool):
        return
    if not isinstance(unroll, int | np.integer) or unroll < 1:
        raise ValueError(
            f"`{where}`: `unroll` must be a positive int (steps per loop iteration) or a "
            f"bool, got {unroll!r}."
        )


@functools.partial(jax.jit, static_argnames=("cell", "reverse", "unroll", "dtype", "batch_shape"))
def _unroll_jit(
    cell: Any,
    params: Any,
    xs: Any,
    state0: Any,
    *,
    reverse: bool,
    unroll: int | bool,
    dtype: np.dtype | None,
    batch_shape: tuple,
) -> tuple[Any, Any]:
    params, xs, state0 = cast_floats((params, xs, state0), dtype)
    carry = initial_carry(cell, params, state0, batch_shape)
    return scan(functools.partial(cell.step, params), carry, xs, reverse=reverse, unroll=unroll)


def scan(step: Any, carry: Any, xs: Any, **kwargs: Any) -> tuple[Any, Any]:
    """:func:`jax.lax.scan`, also for zero-length ``xs`` under ``jax.disable_jit()``."""
    length = jax.tree.leaves(xs)[0].shape[0]
    if length == 0:
        one = jax.tree.map(lambda a: jax.ShapeDtypeStruct(a.shape[1:], a.dtype), xs)
        _, ys = jax.eval_shape(step, carry, one)
        return carry, jax.tree.map(lambda s: jnp.zeros((0, *s.shape), s.dtype), ys)
    return jax.lax.scan(step, carry, xs, **kwargs)


def unroll(
    cell: Cell,
    params: Any,
    xs: Array,
    state0: Any = None,
    *,
    reverse: bool = False,
    unroll: int | bool = 1,
    check_finite: bool = False,
) -> tuple[Any, Any]:
    """Runs ``cell`` over the leading (time) axis of ``xs`` with :func:`jax.lax.scan`.

    The scan is jit-compiled and cached per cell, option and input shape, so calling
    ``unroll`` again with same-shaped inputs does not retrace. It composes with
    :func:`jax.jit`, :func:`jax.grad` and :func:`jax.vmap`.

    Args:
        cell: a :class:`Cell`, e.g. :data:`jax_rnn.elman`.
        params: the cell's params (from ``cell.init``).
        xs: inputs shaped ``(T, *batch, I)``; ``T`` may be 0. Integer inputs are promoted
            to the params' float dtype; mixed float dtypes promote as numpy does.
        state0: the initial carry, ``(*batch, H)`` or broadcastable to it; ``None`` means
            ``cell.initial_state(params, batch)`` (zeros).
        reverse: run from the last step to the first; outputs stay at their time index.
        unroll: steps per loop iteration, passed to :func:`jax.lax.scan`.
        check_finite: raise ``ValueError`` if ``xs``, ``params`` or ``state0`` hold NaN or
            Inf. Off by default: non-finite values then propagate through the outputs as
            in numpy. Under ``jit`` the check is a ``checkify`` check, so wrap the call in
            :func:`jax.experimental.checkify.checkify`.

    Returns:
        ``(final_state, ys)``: the carry after the last step and the step outputs stacked
        over time (for the built-in cells a :class:`StepOutput` whose fields are
        ``(T, *batch, ...)``). With ``T == 0`` the final state is ``state0``.

    Raises:
        ValueError: shapes that do not match the params, or a bad option.
        TypeError: non-numeric inputs, params of the wrong type or mixed dtypes.

    Example:
        >>> params, xs, state0 = jax_rnn.seed_example()
        >>> final, ys = jax_rnn.unroll(jax_rnn.elman, params, xs, state0)
        >>> print(ys.output[:, 0].round(4))
        [1.5613 2.7271 3.0143 3.0738 3.0913]
    """
    where = "jax_rnn.unroll"
    _check_unroll_factor(where, unroll)
    prep = prepare(where, cell, params, xs, state0)
    if check_finite:
        check_finite_inputs(where, xs=prep.xs, params=params, state0=prep.state0)
    return _unroll_jit(
        cell,
        params,
        prep.xs,
        prep.state0,
        reverse=bool(reverse),
        unroll=unroll,
        dtype=prep.dtype,
        batch_shape=prep.batch_shape,
    )
