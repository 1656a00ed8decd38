"""Unrolling a cell (or a stack / bidirectional model) over time with :func:`jax.lax.scan`."""

from __future__ import annotations

import functools
import math
from collections.abc import Callable
from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
import numpy as np
from jax import Array

from . import _checks
from ._compose import (
    Bidirectional,
    BidirectionalParams,
    BidirectionalState,
    Stack,
    concat_outputs,
    output_size_of,
)
from ._elman import readout
from ._fused import fused_cell_of, fused_unroll
from ._masks import bcast as _bcast
from ._masks import select as _where
from ._masks import zero_where_invalid as _zero_invalid
from ._types import Cell, StepOutput

# --------------------------------------------------------------------------------------
# Checks (Python, on shapes, before tracing)


def _check_cell(where: str, cell: Any) -> None:
    if isinstance(cell, Cell | Stack | Bidirectional):
        return
    if all(callable(getattr(cell, f, None)) for f in ("init", "step", "initial_state")):
        return
    raise TypeError(
        f"`{where}`: `cell` must be a jax_rnn.Cell (init, step, initial_state), a Stack or a "
        f"Bidirectional, got {type(cell).__name__}; use e.g. `jax_rnn.elman` or build "
        "`jax_rnn.Cell(init, step, initial_state)`."
    )


class Prepared(NamedTuple):
    """Checked inputs: arrays, their time-major batch shape and the float dtype."""

    xs: Any
    state0: Any
    dtype: np.dtype | None
    batch_shape: tuple
    length: int


def _time_major_struct(where: str, xs: Any, time_major: bool) -> tuple[Any, int]:
    """The time-major shape of ``xs`` (as a ShapeDtypeStruct) and its length."""
    shape, dtype = _checks.shape_dtype(where, "xs", xs)
    if not time_major:
        if len(shape) < 2:
            raise ValueError(
                f"`{where}`: `xs` has shape {shape}; with time_major=False it must be shaped "
                "(*batch, time, features)."
            )
        shape = (shape[-2], *shape[:-2], shape[-1])
    if len(shape) == 0:
        raise ValueError(f"`{where}`: `xs` is a scalar; pass inputs shaped (time, ..., features).")
    return jax.ShapeDtypeStruct(shape, dtype), shape[0]


def _check_model(
    where: str,
    model: Any,
    params: Any,
    x: Any,
    state0: Any,
    batch: tuple,
    dtypes: list,
    x_name: str = "xs",
    time_axis: bool = True,
) -> Any:
    """Checks one model level; returns the struct of what it emits (or None if unknown).

    ``x`` always has a time axis; ``time_axis=False`` leaves it out of the error messages
    (one step's input, :func:`generate`'s ``first_input``)."""
    if isinstance(model, Stack):
        if not isinstance(params, tuple | list) or len(params) != len(model.layers):
            raise TypeError(
                f"`{where}`: a Stack of {len(model.layers)} layers takes a tuple of "
                f"{len(model.layers)} params, got {type(params).__name__}"
                + (f" of length {len(params)}" if isinstance(params, tuple | list) else "")
                + "; build them with `model.init(key, ...)`."
            )
        if state0 is not None and (
            not isinstance(state0, tuple | list) or len(state0) != len(model.layers)
        ):
            raise TypeError(
                f"`{where}`: `state0` for a Stack of {len(model.layers)} layers must be a tuple "
                "with one carry (or None) per layer."
            )
        states = state0 if state0 is not None else (None,) * len(model.layers)
        for layer, p, s in zip(model.layers, params, states, strict=True):
            x = _check_model(where, layer, p, x, s, batch, dtypes, x_name, time_axis)
            x_name = "the previous layer's output"
        return x
    if isinstance(model, Bidirectional):
        if not isinstance(params, BidirectionalParams):
            raise TypeError(
                f"`{where}`: a Bidirectional layer takes BidirectionalParams(forward, backward), "
                f"got {type(params).__name__}; build them with `model.init(key, ...)`."
            )
        if state0 is not None and not (isinstance(state0, tuple) and len(state0) == 2):
            raise TypeError(
                f"`{where}`: `state0` for a Bidirectional layer must be "
                "BidirectionalState(forward, backward) or None."
            )
        s_fw, s_bw = (None, None) if state0 is None else state0
        a = _check_model(where, model.forward, params.forward, x, s_fw, batch, dtypes, x_name,
                         time_axis)
        b = _check_model(where, model.backward, params.backward, x, s_bw, batch, dtypes,
                         x_name, time_axis)
        if a is None or b is None:
            return None
        return jax.ShapeDtypeStruct((*a.shape[:-1], a.shape[-1] + b.shape[-1]), a.dtype)
    _check_cell(where, model)
    expected = _checks.params_type_of(model)
    if expected is not None and type(params) is not expected:
        raise TypeError(
            f"`{where}`: this cell takes {expected.__name__} but `params` is "
            f"{type(params).__name__}; pass the params made by the same cell's `init`."
        )
    spec = _checks.spec_of(params)
    if spec is None:  # a user cell: nothing more is known about its shapes
        return None
    input_size, _, params_dtype = spec.shapes(where, params)
    dtypes.append(params_dtype)
    if x is not None:
        step_x = x if time_axis else jax.ShapeDtypeStruct(x.shape[1:], x.dtype)
        _, x_dtype = _checks.check_inputs(where, step_x, input_size, time_axis=time_axis,
                                          name=x_name)
        dtypes.append(x_dtype)
    if state0 is not None:
        spec.check_carry(where, params, state0, batch)
        dtypes.extend(_checks.carry_dtypes(where, state0))
    length = x.shape[0] if x is not None else 0
    return jax.ShapeDtypeStruct((length, *batch, output_size_of(model, params)), params_dtype)


def prepare(
    where: str, cell: Any, params: Any, xs: Any, state0: Any, *, time_major: bool = True
) -> Prepared:
    """Checks ``(cell, params, xs, state0)`` before tracing; see :func:`unroll`."""
    _check_cell(where, cell)
    if not jax.tree.leaves(xs):
        raise ValueError(f"`{where}`: `xs` has no arrays; pass inputs shaped (time, ...).")
    if isinstance(xs, dict | tuple | list) and not _is_numeric_nested(xs):
        # A pytree of inputs, for user cells: only the shared time axis can be checked.
        xs = jax.tree.map(_checks.as_array, xs)
        leaves = jax.tree.leaves(xs)
        lengths = {np.shape(leaf)[0] if np.ndim(leaf) else None for leaf in leaves}
        if None in lengths or len(lengths) != 1:
            raise ValueError(
                f"`{where}`: every leaf of `xs` needs the same leading time axis, got shapes "
                f"{[np.shape(leaf) for leaf in leaves]}."
            )
        if not time_major:
            raise ValueError(f"`{where}`: time_major=False needs `xs` to be one array.")
        batch = tuple(np.shape(leaves[0])[1:-1])
        _check_model(where, cell, params, None, state0, batch, [])
        (length,) = lengths
        return Prepared(xs, state0, None, batch, int(length or 0))
    x, length = _time_major_struct(where, xs, time_major)
    batch = tuple(x.shape[1:-1])
    dtypes: list = []
    _check_model(where, cell, params, x, state0, batch, dtypes)
    if not dtypes:  # user cells only: keep the caller's dtypes
        dtype = None
    else:
        dtype = _checks.float_dtype(*dtypes, x.dtype)
    state0 = None if state0 is None else jax.tree.map(_checks.as_array, state0)
    return Prepared(_checks.as_array(xs), state0, dtype, batch, int(length))


def _is_numeric_nested(xs: Any) -> bool:
    """True for a nested list of numbers (one array), False for a pytree of arrays."""
    if isinstance(xs, dict):
        return False
    return all(not isinstance(leaf, Array | np.ndarray) for leaf in jax.tree.leaves(xs))


def _check_seq_lengths(where: str, seq_lengths: Any, batch: tuple, length: int) -> Any:
    shape, dtype = _checks.shape_dtype(where, "seq_lengths", seq_lengths)
    if dtype.kind not in "iu":
        raise TypeError(
            f"`{where}`: `seq_lengths` has dtype {dtype}, expected integers; pass e.g. "
            "`jnp.asarray(lengths, dtype=jnp.int32)`."
        )
    if shape != batch:
        raise ValueError(
            f"`{where}`: `seq_lengths` has shape {shape}, expected the batch shape {batch} "
            "(one length per sequence)."
        )
    seq_lengths = _checks.as_array(seq_lengths)
    # Range check on concrete values only; an array spread over several hosts cannot be
    # read here (it is checked on the host that built it, or not at all under jit).
    concrete = not _checks.is_traced(seq_lengths)
    if concrete and getattr(seq_lengths, "is_fully_addressable", True):
        values = np.asarray(seq_lengths)
        if values.size and (values.min() < 0 or values.max() > length):
            raise ValueError(
                f"`{where}`: `seq_lengths` must lie in [0, {length}] (the time axis of `xs`), got "
                f"values from {values.min()} to {values.max()}."
            )
    return seq_lengths


def _check_resets(where: str, resets: Any, batch: tuple, length: int, time_major: bool) -> Any:
    shape, dtype = _checks.shape_dtype(where, "resets", resets)
    expected = (length, *batch) if time_major else (*batch, length)
    if shape != expected:
        raise ValueError(
            f"`{where}`: `resets` has shape {shape}, expected {expected}: one flag per step "
            "and sequence, laid out like `xs` without its feature axis."
        )
    if dtype.kind not in "biu":
        raise TypeError(f"`{where}`: `resets` must be booleans, got dtype {dtype}.")
    return _checks.as_array(resets)


IMPLS = ("fused", "scan")

# Loop steps per iteration of lax.scan, per backend. CPU: 1 — factors 2 to 16 were no
# faster for Elman/GRU/LSTM at (T=1000, B=32, I=64, H=128) and (T=1000, B=1, I=16, H=32)
# on a 2-core VM (benchmarks/unroll_factor.py). GPU: 8 — on an NVIDIA H200 it was
# 1.67-8.6x faster than 1 for Elman/GRU/LSTM forward+backward at those sizes, and within
# 11% of the best factor tried (16 was at most 1.13x faster than 8, and slower in two of
# six cases); see docs/performance.md. TPU: not measured; 8 as on GPU.
UNROLL_DEFAULTS = {"cpu": 1, "gpu": 8, "cuda": 8, "rocm": 8, "tpu": 8}


def default_unroll(backend: str | None = None) -> int:
    """The ``unroll`` factor :func:`unroll` uses on ``backend`` (default: JAX's backend).

    Example:
        >>> jax_rnn.default_unroll("cpu"), jax_rnn.default_unroll("gpu")
        (1, 8)
    """
    backend = jax.default_backend() if backend is None else backend
    return UNROLL_DEFAULTS.get(backend, 1)


def _check_options(where: str, unroll: Any, remat: Any, truncate: Any, impl: Any) -> None:
    if unroll is None:
        return _check_options(where, 1, remat, truncate, impl)
    if impl not in IMPLS:
        raise ValueError(
            f"`{where}`: `impl` must be one of {IMPLS}, got {impl!r}: \"fused\" is the fast "
            "path of the built-in cells, \"scan\" plain autodiff through lax.scan."
        )
    if not isinstance(unroll, bool) and (not isinstance(unroll, int | np.integer) or unroll < 1):
        raise ValueError(
            f"`{where}`: `unroll` must be a positive int (steps per loop iteration) or a "
            f"bool, got {unroll!r}."
        )
    if not isinstance(remat, bool) and (not isinstance(remat, int | np.integer) or remat < 1):
        raise ValueError(
            f"`{where}`: `remat` must be a bool or a positive int (steps per checkpointed "
            f"chunk), got {remat!r}."
        )
    if truncate is not None and (
        isinstance(truncate, bool) or not isinstance(truncate, int | np.integer) or truncate < 1
    ):
        raise ValueError(
            f"`{where}`: `truncate` must be None or a positive int (steps that gradients "
            f"flow back through), got {truncate!r}."
        )


def check_finite_inputs(where: str, **trees: Any) -> None:
    """Raises ValueError if a concrete input holds NaN or Inf (a checkify check if traced)."""
    for name, tree in trees.items():
        for leaf in jax.tree.leaves(tree):
            if _checks.is_traced(leaf):
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


# --------------------------------------------------------------------------------------
# The traced implementation


class Options(NamedTuple):
    """Static options of one unroll (hashable: part of the jit cache key)."""

    reverse: bool = False
    unroll: int | bool = 1
    remat: int | bool = False
    truncate: int | None = None
    impl: str = "fused"
    method: str = "sequential"
    tol: float | None = None
    max_iter: int | None = None
    damping: float | None = None
    on_failure: str = "fallback"
    vmapped: bool = False  # batched by a vmap around unroll: no one-sequence fast paths
    keep_carries: bool = False  # return_info: keep ParallelInfo.carries (else dropped)


def cast_floats(tree: Any, dtype: np.dtype | None) -> Any:
    """Casts the float leaves to ``dtype`` (``None``: leave as is).

    Integer and bool leaves of params are left alone (a user cell may keep indices
    there); inputs and states are promoted separately by :func:`cast_inputs`.
    """
    if dtype is None:
        return tree

    def one(a: Any) -> Any:
        a = jnp.asarray(a)
        return a.astype(dtype) if jnp.issubdtype(a.dtype, jnp.floating) else a

    return jax.tree.map(one, tree)


def cast_inputs(tree: Any, dtype: np.dtype | None) -> Any:
    """Casts every numeric leaf (ints and bools too: numpy's promotion) to ``dtype``."""
    if dtype is None:
        return tree
    return jax.tree.map(lambda a: jnp.asarray(a).astype(dtype), tree)


def initial_carry(cell: Any, params: Any, state0: Any, batch_shape: tuple) -> Any:
    """``state0`` broadcast over the batch, or the cell's zeros when ``state0`` is None."""
    if state0 is None:
        return cell.initial_state(params, batch_shape)
    if _checks.spec_of(params) is None:
        return state0
    template = cell.initial_state(params, batch_shape)
    # A plain tuple (h, c) takes the structure of the cell's own carry (e.g. LSTMState).
    leaves = [
        jnp.broadcast_to(jnp.asarray(a, t.dtype), t.shape)
        for a, t in zip(jax.tree.leaves(state0), jax.tree.leaves(template), strict=True)
    ]
    return jax.tree.unflatten(jax.tree.structure(template), leaves)


def scan(step: Any, carry: Any, xs: Any, **kwargs: Any) -> tuple[Any, Any]:
    """:func:`jax.lax.scan`, also for zero-length ``xs`` under ``jax.disable_jit()``."""
    length = jax.tree.leaves(xs)[0].shape[0]
    if length == 0:
        one = jax.tree.map(lambda a: jax.ShapeDtypeStruct(a.shape[1:], a.dtype), xs)
        _, ys = jax.eval_shape(step, carry, one)
        return carry, jax.tree.map(lambda s: jnp.zeros((0, *s.shape), s.dtype), ys)
    return jax.lax.scan(step, carry, xs, **kwargs)


def prefix_reverse_index(lengths: Array, length: int) -> Array:
    """Index ``(T, *batch)`` reversing each sequence's valid prefix in place.

    ``idx[t, b] = lengths[b] - 1 - t`` for ``t < lengths[b]``, else ``t``: applying it
    twice is the identity, so the same index maps outputs back.
    """
    t = jnp.arange(length).reshape((length,) + (1,) * lengths.ndim)
    return jnp.where(t < lengths, lengths - 1 - t, t)


def _take_time(tree: Any, idx: Array) -> Any:
    return jax.tree.map(lambda a: jnp.take_along_axis(a, _bcast(idx, a), axis=0), tree)


def _episode_ends(resets: Array, lengths: Array | None) -> Array:
    """Where a backward run restarts its carry: before step ``t - 1`` where
    ``resets[t]`` (an episode starts at ``t``, so one ends at ``t - 1``), never past a
    sequence's end."""
    r = resets.astype(bool)
    ends = jnp.concatenate([r[1:], jnp.zeros_like(r[:1])])
    if lengths is not None:
        t = jnp.arange(r.shape[0]).reshape((-1,) + (1,) * lengths.ndim)
        ends = ends & (t + 1 < lengths)
    return ends


def _run_cell(
    cell: Any,
    params: Any,
    xs: Any,
    state0: Any,
    lengths: Array | None,
    resets: Array | None,
    opts: Options,
    reverse: bool,
    batch_shape: tuple,
    guess: Any = None,
) -> tuple[Any, Any, Any]:
    length = jax.tree.leaves(xs)[0].shape[0]
    carry0 = initial_carry(cell, params, state0, batch_shape)
    step = functools.partial(cell.step, params)
    if length == 0:
        final, ys = scan(step, carry0, xs)
        return final, ys, _empty_info(opts, carry0)
    if lengths is not None:  # checked where concrete; under jit, out-of-range values clip
        lengths = jnp.clip(lengths, 0, length)
    if resets is not None and reverse:
        resets = _episode_ends(resets, lengths)
    perm = None
    if lengths is not None and reverse:
        perm = prefix_reverse_index(lengths, length)
        xs = _take_time(xs, perm)
        resets = None if resets is None else _take_time(resets, perm)
        guess = None if guess is None else _take_time(guess, perm)
        reverse = False
    t = jnp.arange(length)
    valid = None
    if lengths is not None:
        valid = t.reshape((length,) + (1,) * lengths.ndim) < lengths
        if resets is not None:  # past a sequence's end the carry stays, reset or not
            resets = jnp.logical_and(resets.astype(bool), valid)
    chunk = 0
    if opts.remat is not False:
        chunk = math.isqrt(length - 1) + 1 if opts.remat is True else int(opts.remat)
        chunk = min(chunk, length)
    padded = -length % chunk if chunk else 0
    if padded:  # pad to whole chunks; padded steps are masked out
        if valid is None:
            valid = jnp.broadcast_to(t.reshape((length,) + (1,) * len(batch_shape)) >= 0,
                                     (length, *batch_shape))
        xs, valid, resets = jax.tree.map(
            lambda a: jnp.concatenate([a, jnp.zeros((padded, *a.shape[1:]), a.dtype)]),
            (xs, valid, resets),
        )
        t = jnp.arange(length + padded)
    # Position in processing order, for truncation boundaries (padding never cuts).
    position = (length - 1 - t) if reverse else t
    cut = None
    if opts.truncate is not None:
        cut = (position % opts.truncate == 0) & (position > 0) & (t < length)
    resets = None if resets is None else resets.astype(bool)
    if opts.method != "sequential":
        final, ys, info = _run_parallel(cell, params, carry0, xs, valid, resets, cut, reverse,
                                        guess, opts, batch_shape)
        if perm is not None:  # back to the caller's time order (perm is its own inverse)
            ys, carries = _take_time((ys, info.carries), perm)
            info = info._replace(carries=carries)
        return final, ys, info
    fused = fused_cell_of(cell, params) if opts.impl == "fused" and not chunk else None
    if fused is not None:
        final, ys = fused_unroll(fused, params, xs, carry0, valid, resets, cut, reverse,
                                 opts.unroll, readout, one_sequence_ok=not opts.vmapped)
        return final, (ys if perm is None else _take_time(ys, perm)), None

    def body(carry: Any, inputs: Any) -> tuple[Any, Any]:
        x, valid_t, reset_t, cut_t = inputs
        if reset_t is not None:
            carry = _where(reset_t.astype(bool), carry0, carry)
        if cut_t is not None:
            carry = jax.tree.map(
                lambda c: jnp.where(cut_t, jax.lax.stop_gradient(c), c), carry
            )
        new, y = step(carry, x)
        return _where(valid_t, new, carry), _zero_invalid(valid_t, y)

    inputs = (xs, valid, resets, cut)
    if chunk:
        n = (length + padded) // chunk
        chunked = jax.tree.map(lambda a: a.reshape((n, chunk, *a.shape[1:])), inputs)

        @jax.checkpoint
        def chunk_body(carry: Any, chunk_inputs: Any) -> tuple[Any, Any]:
            return jax.lax.scan(body, carry, chunk_inputs, reverse=reverse, unroll=opts.unroll)

        final, ys = jax.lax.scan(chunk_body, carry0, chunked, reverse=reverse)
        ys = jax.tree.map(lambda a: a.reshape((n * chunk, *a.shape[2:]))[:length], ys)
    else:
        final, ys = jax.lax.scan(body, carry0, inputs, reverse=reverse, unroll=opts.unroll)
    if perm is not None:
        ys = _take_time(ys, perm)
    return final, ys, None


def _empty_info(opts: Options, carry0: Any) -> Any:
    if opts.method == "sequential":
        return None
    from ._parallel import empty_info

    return empty_info(carry0, jax.tree.leaves(carry0)[0].dtype)


def _prepared(c0: Any, carry: Any, reset_t: Any, cut_t: Any) -> Any:
    """A parallel step's input carry: ``c0`` after a reset, gradients stopped at a cut."""
    if reset_t is not None:
        carry = _where(reset_t, c0, carry)
    if cut_t is not None:
        carry = jax.tree.map(lambda c: jnp.where(cut_t, jax.lax.stop_gradient(c), c), carry)
    return carry


def _masked_step(cell: Any) -> Callable[[Any, Any, Any], tuple[Any, Any]]:
    """``cell.step`` with resets, cuts and padding, as ``step((params, c0), carry, inp)``
    over ``inp = (x, valid, reset, cut)`` (each mask ``None`` or per example)."""

    def step(p: Any, carry: Any, inp: Any) -> tuple[Any, Any]:
        cell_params, c0 = p
        x, valid_t, reset_t, cut_t = inp
        c_in = _prepared(c0, carry, reset_t, cut_t)
        new, y = cell.step(cell_params, c_in, x)
        return _where(valid_t, new, c_in), _zero_invalid(valid_t, y)

    return step


def _identity_matrices(j: Array) -> Array:
    return jnp.broadcast_to(jnp.eye(j.shape[-1], dtype=j.dtype), j.shape)


def _masked_derivative(fn: Callable[[Any, Any, Any], Any],
                       identity: Callable[[Any], Any]) -> Callable[[Any, Any, Any], Any]:
    """A cell's Jacobian (or its diagonal) ``fn(params, carry, x)`` as that of
    :func:`_masked_step`: the identity at a padded step (it copies its input carry), then
    zero after a reset or at a cut (the carry does not flow through; at a cut its
    gradient is stopped, and autodiff of the masked step sees zero there too)."""

    def masked(p: Any, carry: Any, inp: Any) -> Any:
        cell_params, c0 = p
        x, valid_t, reset_t, cut_t = inp
        d = fn(cell_params, _prepared(c0, carry, reset_t, None), x)
        if valid_t is not None:
            d = _where(valid_t, d, identity(d))
        for mask in (reset_t, cut_t):
            if mask is not None:
                d = _where(mask, jax.tree.map(jnp.zeros_like, d), d)
        return d

    return masked


def _run_parallel(
    cell: Any,
    params: Any,
    carry0: Any,
    xs: Any,
    valid: Array | None,
    resets: Array | None,
    cut: Array | None,
    reverse: bool,
    guess: Any,
    opts: Options,
    batch_shape: tuple,
) -> tuple[Any, Any, Any]:
    """One cell's unroll by DEER / quasi-DEER (see ``_parallel.py``), forward in time."""
    from ._parallel import jacobian_diagonal_of, jacobian_of, parallel_solve

    inputs = (xs, valid, resets, cut)
    if reverse:  # solve forward over the flipped sequence
        inputs = jax.tree.map(lambda a: jnp.flip(a, axis=0), inputs)
        guess = None if guess is None else jax.tree.map(lambda a: jnp.flip(a, axis=0), guess)

    step = _masked_step(cell)
    diagonal: Callable[[Any, Any, Any], Any] | None = None
    cell_diagonal = jacobian_diagonal_of(getattr(cell, "step", None))
    if opts.method == "quasi_deer" and cell_diagonal is not None:
        diagonal = _masked_derivative(cell_diagonal, lambda d: jax.tree.map(jnp.ones_like, d))
    jacobian: Callable[[Any, Any, Any], Any] | None = None
    cell_jacobian = jacobian_of(getattr(cell, "step", None))
    if opts.method == "deer" and cell_jacobian is not None:  # an Elman cell: (*batch, H, H)
        jacobian = _masked_derivative(cell_jacobian, _identity_matrices)

    final, ys, info = parallel_solve(
        step, (params, carry0), carry0, inputs, method=opts.method, tol=opts.tol,
        max_iter=opts.max_iter, guess=guess, damping=opts.damping, on_failure=opts.on_failure,
        jacobian_diagonal=diagonal, batch_ndim=len(batch_shape), jacobian=jacobian,
    )
    if reverse:
        ys, carries = jax.tree.map(lambda a: jnp.flip(a, axis=0), (ys, info.carries))
        info = info._replace(carries=carries)
    return final, ys, info


def _dropout(key: Array, rate: float, tree: Any) -> Any:
    keep = 1.0 - rate

    def one(a: Array) -> Array:
        mask = jax.random.bernoulli(key, keep, a.shape)
        return jnp.where(mask, a / keep, jnp.zeros((), a.dtype))

    return jax.tree.map(one, tree)


def _run_model(
    model: Any,
    params: Any,
    xs: Any,
    state0: Any,
    lengths: Array | None,
    resets: Array | None,
    dropout_key: Array | None,
    opts: Options,
    reverse: bool,
    batch_shape: tuple,
    guess: Any = None,
) -> tuple[Any, Any, Any]:
    """Runs one model level; returns ``(final, ys, info)`` (info: parallel methods only)."""
    if isinstance(model, Stack):
        n = len(model.layers)
        states = state0 if state0 is not None else (None,) * n
        guesses = guess if guess is not None else (None,) * n
        finals, infos = [], []
        ys: Any = None
        for i, (layer, p, s, g) in enumerate(
            zip(model.layers, params, states, guesses, strict=True)
        ):
            if i > 0:
                xs = ys.output if isinstance(ys, StepOutput) else ys
                if dropout_key is not None and model.dropout > 0:
                    xs = _dropout(jax.random.fold_in(dropout_key, i), model.dropout, xs)
            final, ys, info = _run_model(
                layer, p, xs, s, lengths, resets, dropout_key, opts, reverse, batch_shape, g
            )
            finals.append(final)
            infos.append(info)
        return tuple(finals), ys, tuple(infos)
    if isinstance(model, Bidirectional):
        s_fw, s_bw = (None, None) if state0 is None else state0
        g_fw, g_bw = (None, None) if guess is None else guess
        f_fw, y_fw, i_fw = _run_model(
            model.forward, params.forward, xs, s_fw, lengths, resets, dropout_key, opts,
            reverse, batch_shape, g_fw,
        )
        f_bw, y_bw, i_bw = _run_model(
            model.backward, params.backward, xs, s_bw, lengths, resets, dropout_key, opts,
            not reverse, batch_shape, g_bw,
        )
        return (BidirectionalState(f_fw, f_bw), concat_outputs(y_fw, y_bw),
                BidirectionalState(i_fw, i_bw))
    return _run_cell(model, params, xs, state0, lengths, resets, opts, reverse, batch_shape,
                     guess)


@functools.partial(
    jax.jit, static_argnames=("model", "opts", "dtype", "batch_shape", "time_major")
)
def _unroll_jit(
    model: Any,
    params: Any,
    xs: Any,
    state0: Any,
    lengths: Any,
    resets: Any,
    dropout_key: Any,
    guess: Any = None,
    *,
    opts: Options,
    dtype: np.dtype | None,
    batch_shape: tuple,
    time_major: bool,
) -> tuple[Any, Any, Any]:
    params = cast_floats(params, dtype)
    xs, state0, guess = cast_inputs((xs, state0, guess), dtype)
    if not time_major:
        xs = jnp.moveaxis(xs, -2, 0)
        resets = None if resets is None else jnp.moveaxis(resets, -1, 0)
    final, ys, info = _run_model(
        model, params, xs, state0, lengths, resets, dropout_key, opts, opts.reverse, batch_shape,
        guess,
    )
    if not time_major:
        ys = jax.tree.map(lambda a: jnp.moveaxis(a, 0, len(batch_shape)), ys)
    if not opts.keep_carries:  # not asked for: no trajectory-sized output of an eager call
        info = _without_carries(info)
    return final, ys, info


def _without_carries(info: Any) -> Any:
    from ._parallel import ParallelInfo

    return jax.tree.map(lambda i: i._replace(carries=None) if isinstance(i, ParallelInfo)
                        else i, info, is_leaf=lambda x: isinstance(x, ParallelInfo))


def _has_dropout(model: Any) -> bool:
    if isinstance(model, Stack):
        return model.dropout > 0 or any(_has_dropout(layer) for layer in model.layers)
    if isinstance(model, Bidirectional):
        return _has_dropout(model.forward) or _has_dropout(model.backward)
    return False


def unroll(
    cell: Any,
    params: Any,
    xs: Any,
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
    tol: float | None = None,
    max_iter: int | None = None,
    guess: Any = None,
    damping: float | None = None,
    on_failure: str = "fallback",
    return_info: bool = False,
    unroll: int | bool | None = None,
    check_finite: bool = False,
) -> tuple[Any, ...]:
    """Runs ``cell`` over the time axis of ``xs`` with :func:`jax.lax.scan`.

    The scan is jit-compiled and cached per cell, option and input shape, so calling
    ``unroll`` again with same-shaped inputs does not retrace. It composes with
    :func:`jax.jit`, :func:`jax.grad` and :func:`jax.vmap`. ``cell`` may also be a
    :func:`stack` or a :func:`bidirectional` layer, which run layer by layer with every
    option applied to each layer.

    Args:
        cell: a :class:`Cell` (e.g. :data:`jax_rnn.elman`), a :class:`Stack` or a
            :class:`Bidirectional`.
        params: the model's params (from its ``init``).
        xs: inputs shaped ``(T, *batch, I)`` (``(*batch, T, I)`` with
            ``time_major=False``); ``T`` may be 0. Integer inputs are promoted to the
            params' float dtype; mixed float dtypes promote as numpy does.
        state0: the initial carry, ``(*batch, H)`` or broadcastable to it; ``None`` means
            ``cell.initial_state(params, batch)`` (zeros).
        seq_lengths: ints shaped ``batch`` with each sequence's length in ``[0, T]``.
            Steps at or past a sequence's length leave its carry unchanged and output
            zeros, so the final state is the state after its last valid step and padding
            never reaches the results or the gradients. With ``reverse=True`` each valid
            prefix is read backwards in place (PyTorch packed sequences, Flax
            ``seq_lengths``). Lengths outside ``[0, T]`` are an error where their values
            can be read; traced (under ``jit``) they are clipped to ``[0, T]``.
        reverse: run from the last step to the first; outputs stay at their time index.
        time_major: ``False`` for batch-major inputs ``(*batch, T, I)`` as Flax and Keras
            take them; outputs then come back batch-major too.
        resets: booleans shaped like ``xs`` without the feature axis: ``resets[t, b]``
            marks that step ``t`` of sequence ``b`` starts an episode (several packed in
            one sequence, as Haiku's ``ResetCore``), and the carry restarts from
            ``state0`` (zeros if ``None``) at each boundary: before step ``t``, or with
            ``reverse=True`` (and in a bidirectional layer's backward direction), which
            meets the boundary from the other side, before step ``t - 1``. No state
            crosses an episode boundary either way.
        remat: ``True`` or a chunk size ``k`` checkpoints the scan (:func:`jax.checkpoint`)
            in chunks of ``k`` steps (``ceil(sqrt(T))`` for ``True``): the backward pass
            stores one carry per chunk and recomputes each chunk, so its memory grows as
            ``O(T / k + k)`` instead of ``O(T)``. Values and gradients are unchanged.
        truncate: truncated backpropagation through time: the sequence is cut into
            chunks of ``truncate`` steps (counted in processing order) and no gradient
            flows through the carry across a chunk boundary, so the gradient of a loss at
            step ``t`` reaches back at most to the start of its chunk. Values are
            unchanged.
        dropout_key: a :func:`jax.random.key` to apply a :func:`stack`'s dropout
            (training); without it no dropout is applied (evaluation).
        impl: ``"fused"`` (default): for the built-in cells, the input projection of all
            steps is one matrix product before the loop and a hand-written backward pass
            (:func:`jax.custom_vjp`) carries only state gradients through time, computing
            the weight gradients afterwards as single contractions (cuDNN's scheme).
            ``"scan"``: plain autodiff through :func:`jax.lax.scan`, for comparison and
            for forward-mode autodiff (``jax.jvp``/``jax.jacfwd``), which a custom VJP
            does not support. User cells and ``remat`` always run ``"scan"``. Both give
            the same values and gradients up to float rounding. ``"fused"`` runs an
            Elman cell's (tanh or relu; float32, one batch axis or none, no
            ``seq_lengths``, ``resets`` or ``truncate``) forward and backward loops as
            one kernel each, as cuDNN does: on an NVIDIA GPU a Pallas kernel (at most
            128 hidden units), on a CPU a C++ kernel compiled on first use; on a CPU a
            GRU's and an LSTM's too, under the same conditions (the LSTM's differentiated
            calls: at most 128 hidden units). The environment variable
            ``JAX_RNN_KERNELS=off`` turns them off.
        method: ``"sequential"`` (default): one step after another with
            :func:`jax.lax.scan`. ``"deer"`` / ``"quasi_deer"``: parallel-in-time
            evaluation by Newton's method over the whole sequence, each iteration a linear
            recurrence solved by :func:`jax.lax.associative_scan` in ``O(log T)`` depth
            (full Jacobians / their diagonals; see the parallel-in-time guide). For long
            sequences on accelerators; slower on CPUs. Works for every cell, option and
            model except ``remat``; gradients solve the adjoint recurrence the same way.
        tol: ``deer``/``quasi_deer``: convergence threshold on the relative residual
            (``None``: 1e-12 in float64, about 1.2e-6 in float32).
        max_iter: ``deer``/``quasi_deer``: most Newton iterations (``None``:
            ``min(T, 100)``; ``T`` always suffices in exact arithmetic).
        guess: ``deer``/``quasi_deer``: an initial trajectory of carries, time-major
            ``(T, *batch, ...)`` per carry leaf and shaped like the model's final state
            (a tuple per stack layer), e.g. the previous solution in a training loop:
            the previous call's ``info`` with each ``ParallelInfo`` replaced by its
            ``carries`` (see ``return_info``).
        damping: ``deer``/``quasi_deer``: ``lambda >= 0`` divides the Jacobians by
            ``1 + lambda``, for expansive dynamics.
        on_failure: ``deer``/``quasi_deer``: when ``tol`` is not met within ``max_iter``
            iterations: ``"fallback"`` (default) returns the sequential result,
            ``"raise"`` raises, ``"ignore"`` returns the last iterate. Never silently
            wrong: ``return_info=True`` reports what happened.
        return_info: also return the parallel solver's ``ParallelInfo`` (iterations,
            residual, converged, fell_back) per layer and direction, shaped like the
            final state; ``None`` for sequential layers.
        unroll: steps per loop iteration, passed to :func:`jax.lax.scan`; ``None`` picks
            the backend's default (:func:`default_unroll`).
        check_finite: raise ``ValueError`` if ``xs``, ``params`` or ``state0`` hold NaN or
            Inf. Off by default: non-finite values then propagate through the outputs as
            in numpy. Under ``jit`` the check is a ``checkify`` check, so wrap the call in
            :func:`jax.experimental.checkify.checkify`.

    Returns:
        ``(final_state, ys)``: the carry after the last step and the step outputs stacked
        over time (for the built-in cells a :class:`StepOutput` whose fields are
        ``(T, *batch, ...)``). With ``T == 0`` the final state is ``state0``. With
        ``return_info=True``, ``(final_state, ys, info)``.

    Raises:
        ValueError: shapes that do not match the params, or a bad option.
        TypeError: non-numeric inputs, params of the wrong type or mixed dtypes.

    Example:
        >>> params, xs, state0 = jax_rnn.seed_example()
        >>> final, ys = jax_rnn.unroll(jax_rnn.elman, params, xs, state0)
        >>> print(ys.output[:, 0].round(4))
        [1.5613 2.7271 3.0143 3.0738 3.0913]
    """
    final, ys, info = checked_call("jax_rnn.unroll", _unroll_jit, cell, params, xs, state0,
                        seq_lengths=seq_lengths, reverse=reverse, time_major=time_major,
                        resets=resets, remat=remat, truncate=truncate, dropout_key=dropout_key,
                        impl=impl, method=method, tol=tol, max_iter=max_iter, guess=guess,
                        damping=damping, on_failure=on_failure, return_info=return_info,
                        unroll=unroll, check_finite=check_finite)
    return (final, ys, info) if return_info else (final, ys)


def checked_call(
    where: str,
    jitted: Any,
    cell: Any,
    params: Any,
    xs: Any,
    state0: Any,
    *,
    seq_lengths: Any,
    reverse: bool,
    time_major: bool,
    resets: Any,
    remat: int | bool,
    truncate: int | None,
    dropout_key: Array | None,
    impl: str,
    unroll: int | bool | None,
    check_finite: bool,
    method: str = "sequential",
    tol: float | None = None,
    max_iter: int | None = None,
    guess: Any = None,
    damping: float | None = None,
    on_failure: str = "fallback",
    return_info: bool = False,
) -> Any:
    """Checks every argument of :func:`unroll`, then calls ``jitted`` with them."""
    _checks.check_flags(where, reverse=reverse, time_major=time_major,
                        check_finite=check_finite, return_info=return_info)
    _check_options(where, unroll, remat, truncate, impl)
    if method == "sequential":
        given = [name for name, value in (("tol", tol), ("max_iter", max_iter),
                                          ("guess", guess), ("damping", damping))
                 if value is not None]
        if on_failure != "fallback":
            given.append("on_failure")
        if given:
            raise ValueError(
                f"`{where}`: {', '.join(f'`{g}`' for g in given)} "
                f"{'is' if len(given) == 1 else 'are'} for method=\"deer\" or "
                "\"quasi_deer\" only; the sequential method (the default) takes none. Pass "
                "method=\"deer\" or drop them."
            )
    if method != "sequential":
        from ._parallel import _check_options as check_parallel

        check_parallel(method, on_failure, tol, max_iter, damping, where)
        if remat is not False:
            raise ValueError(
                f"`{where}`: `remat` applies to method=\"sequential\" only; the parallel "
                f"methods keep the whole trajectory. Drop remat or use the sequential method."
            )
    prep = prepare(where, cell, params, xs, state0, time_major=time_major)
    if seq_lengths is not None:
        seq_lengths = _check_seq_lengths(where, seq_lengths, prep.batch_shape, prep.length)
    if resets is not None:
        resets = _check_resets(where, resets, prep.batch_shape, prep.length, time_major)
    if dropout_key is not None and not _has_dropout(cell):
        raise ValueError(
            f"`{where}`: `dropout_key` was given but the model has no dropout; build it with "
            "`jax_rnn.stack(layers, dropout=p)` or drop the key."
        )
    if check_finite:
        check_finite_inputs(where, xs=prep.xs, params=params, state0=prep.state0)
    unroll = default_unroll() if unroll is None else unroll
    # Called with concrete arrays, on_failure="raise" is checked here, on the host, after
    # the compiled call (which runs as "ignore"): no callback, whatever the backend does
    # with callback errors.
    check_on_host = (method != "sequential" and on_failure == "raise"
                     and not _checks.is_traced((params, prep.xs, prep.state0, seq_lengths,
                                                 resets, dropout_key, guess)))
    opts = Options(bool(reverse), unroll, remat, None if truncate is None else int(truncate),
                   impl, method, tol, max_iter, damping,
                   "ignore" if check_on_host else on_failure,
                   _checks.is_vmapped((params, prep.xs, prep.state0, dropout_key)),
                   bool(return_info))
    result = _call(where, jitted, cell, params, prep, seq_lengths, resets, dropout_key, guess,
                   opts, time_major)
    if check_on_host:
        from ._parallel import raise_if_unconverged

        raise_if_unconverged(where, result[2], method, tol, max_iter, prep.length, prep.dtype)
    return result


def _call(where: str, jitted: Any, cell: Any, params: Any, prep: Any, seq_lengths: Any,
          resets: Any, dropout_key: Any, guess: Any, opts: Options, time_major: bool) -> Any:
    """``jitted(...)``, with its run-time failures turned into plain errors."""
    try:
        return jitted(
            cell,
            params,
            prep.xs,
            prep.state0,
            seq_lengths,
            resets,
            dropout_key,
            guess,
            opts=opts,
            dtype=prep.dtype,
            batch_shape=prep.batch_shape,
            time_major=bool(time_major),
        )
    except jax.errors.JaxRuntimeError as err:
        # on_failure="raise" fails inside the compiled call; called eagerly, say it plainly.
        text = str(err)
        if "did not converge" not in text:
            raise
        start = text.find("`jax_rnn.parallel_solve`")
        message = text[start:].splitlines()[0] if start >= 0 else text
        raise ValueError(message.replace("jax_rnn.parallel_solve", where, 1)) from err
    except ValueError as err:  # a bad guess: name the function the caller called
        if not str(err).startswith("`jax_rnn.parallel_solve`: `guess`"):
            raise
        raise ValueError(str(err).replace("jax_rnn.parallel_solve", where, 1)) from None
    except TypeError as err:
        if "forward-mode autodiff" not in str(err):
            raise
        raise TypeError(
            f"`{where}`: forward-mode autodiff (jax.jvp, jax.jacfwd, jax.hessian) cannot go "
            "through the fused fast path or the parallel methods, whose backward passes are "
            "custom VJPs; call with impl=\"scan\" (and method=\"sequential\") for forward "
            "mode. Reverse mode (jax.grad, jax.jacrev, output_jacobian) works with all."
        ) from err
