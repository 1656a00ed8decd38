"""Input checks that run in Python, on shapes and dtypes, before anything is traced.

Each built-in params type registers a :class:`ParamsSpec` here; :func:`prepare` looks
it up so that ``unroll``, ``output_jacobian`` and the cell steps report bad input
with the caller's name, what it got, what it expected and how to fix it.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
from jax.core import Tracer

# Shape/dtype of a value as seen before tracing: jax arrays and tracers carry both.
_ArrayLike = Any


def is_traced(tree: Any) -> bool:
    """Whether any leaf of ``tree`` is a tracer (under jit, grad, vmap, ...)."""
    return any(isinstance(leaf, Tracer) for leaf in jax.tree.leaves(tree))


def is_vmapped(tree: Any) -> bool:
    """Whether any leaf of ``tree`` is batched by a :func:`jax.vmap` around this call.

    Looks through the tracers of the transformations applied inside the vmap (grad's
    primal, vmap's value) for one that carries a batch dimension. A vmap outside a
    transformation that traces this call into a jaxpr (:func:`jax.jit`,
    :func:`jax.checkpoint`, a scan's body) is invisible here: the function is traced once
    per example there. Used only to choose between equivalent code paths.
    """
    for leaf in jax.tree.leaves(tree):
        value = leaf
        while isinstance(value, Tracer):
            if hasattr(value, "batch_dim"):
                return True
            value = getattr(value, "primal", getattr(value, "val", None))
    return False


def is_float(dtype: Any) -> bool:
    """Whether ``dtype`` is a real floating type: numpy's, and bfloat16 and the other
    ``ml_dtypes`` floats JAX adds (numpy's ``kind`` calls those ``"V"``)."""
    return bool(jnp.issubdtype(dtype, jnp.floating))


def check_flags(where: str, **flags: Any) -> None:
    """Checks that each of ``flags`` is a bool (read before tracing: not an array)."""
    for name, flag in flags.items():
        if not isinstance(flag, bool | np.bool_):
            raise TypeError(
                f"`{where}`: `{name}` must be True or False, got {flag!r} "
                f"({type(flag).__name__}); it is read before tracing, so it cannot be an array."
            )


def batch_tuple(where: str, batch_shape: Any) -> tuple[int, ...]:
    """``batch_shape`` as a tuple of ints: an int ``B`` is ``(B,)``."""
    if isinstance(batch_shape, int | np.integer) and not isinstance(batch_shape, bool):
        batch_shape = (batch_shape,)
    if not isinstance(batch_shape, tuple | list) or any(
            isinstance(b, bool) or not isinstance(b, int | np.integer) or b < 0
            for b in batch_shape):
        raise TypeError(
            f"`{where}`: `batch_shape` must be a tuple of sizes >= 0 (or one int), got "
            f"{batch_shape!r}; e.g. `(32,)` for a batch of 32, `()` for one sequence."
        )
    return tuple(int(b) for b in batch_shape)


def check_batches(where: str, **arrays: Any) -> None:
    """Checks that the leading (batch) axes of one step's arrays broadcast together."""
    shapes = {name: tuple(np.shape(a))[:-1] for name, a in arrays.items()}
    try:
        np.broadcast_shapes(*shapes.values())
    except ValueError:
        listed = ", ".join(f"`{name}` {shape}" for name, shape in shapes.items())
        raise ValueError(
            f"`{where}`: the batch axes (all but the last) do not broadcast: {listed}; give "
            "them one batch shape, e.g. a carry from `cell.initial_state(params, "
            "x.shape[:-1])`."
        ) from None


def shape_dtype(where: str, name: str, value: _ArrayLike) -> tuple[tuple[int, ...], np.dtype]:
    """Returns ``(shape, dtype)`` of an array-like, or raises a TypeError naming ``where``."""
    if isinstance(value, jax.Array | np.ndarray | np.generic | jax.ShapeDtypeStruct) or hasattr(
        value, "aval"
    ):
        shape, dtype = tuple(value.shape), np.dtype(value.dtype)
    elif isinstance(value, bool | int | float | list | tuple):
        try:
            arr = np.asarray(value)
        except (ValueError, TypeError) as err:
            raise TypeError(
                f"`{where}`: `{name}` could not be read as an array ({err}); pass a "
                "numpy or jax array of numbers."
            ) from None
        shape, dtype = arr.shape, arr.dtype
    else:
        raise TypeError(
            f"`{where}`: `{name}` must be an array of numbers, got {type(value).__name__}; "
            "pass a numpy or jax array."
        )
    if dtype.kind not in "biu" and not is_float(dtype):
        raise TypeError(
            f"`{where}`: `{name}` has dtype {dtype}, expected real numbers (bool, int or "
            f"float); convert it, e.g. `jnp.asarray({name}, dtype=jnp.float32)`."
        )
    return shape, dtype


def as_array(value: _ArrayLike) -> jax.Array | np.ndarray:
    """Leaves jax arrays and tracers alone; turns lists and scalars into numpy arrays."""
    if isinstance(value, jax.Array | np.ndarray) or hasattr(value, "aval"):
        return value
    return np.asarray(value)


def float_dtype(*dtypes: np.dtype) -> np.dtype:
    """The float dtype a computation runs in, promoting the way numpy does.

    Integer and bool arguments count as the default float type (numpy turns
    ``int @ float32`` into float32 when the int is small; we never compute in ints).
    """
    floats = [d for d in dtypes if is_float(d)]
    if not floats:
        return np.dtype(jnp.zeros(()).dtype)
    out = floats[0]
    for d in floats[1:]:
        out = jnp.promote_types(out, d)
    return np.dtype(jax.dtypes.canonicalize_dtype(out))


@dataclass(frozen=True)
class ParamsSpec:
    """How to check one built-in params type.

    Attributes:
        shapes: ``shapes(params) -> (input_size, hidden_size)`` after checking every
            field's rank, shape and dtype; raises with ``where`` in the message.
        check_carry: ``check_carry(where, params, carry, batch_shape)`` checks an initial
            carry against the params and the inputs' batch shape.
    """

    shapes: Callable[[str, Any], tuple[int, int, np.dtype]]
    check_carry: Callable[[str, Any, Any, tuple[int, ...]], None]


_SPECS: dict[type, ParamsSpec] = {}


def register(params_type: type, spec: ParamsSpec) -> None:
    """Registers the checks of a built-in params type."""
    _SPECS[params_type] = spec


def spec_of(params: Any) -> ParamsSpec | None:
    return _SPECS.get(type(params))


_CELL_PARAMS: dict[Any, type] = {}


def register_cell(step: Any, params_type: type) -> None:
    """Records which params type a built-in cell's step takes (for clear errors)."""
    _CELL_PARAMS[step] = params_type


def params_type_of(cell: Any) -> type | None:
    step = getattr(cell, "step", None)
    try:
        return _CELL_PARAMS.get(step)
    except TypeError:  # an unhashable step
        return None


def check_fields(
    where: str,
    params: Any,
    expected: dict[str, tuple[int | str, ...]],
    optional: tuple[str, ...] = (),
) -> tuple[dict[str, int], np.dtype]:
    """Checks the fields of a NamedTuple params object against symbolic shapes.

    Args:
        where: the public name of the caller, for messages.
        params: the params NamedTuple.
        expected: field name -> tuple of dims, each an int, a size letter shared between
            fields (``"H"``) or a multiple of one (``"3*H"``).
        optional: fields that may be ``None``.

    Returns:
        the sizes the letters resolved to, and the params' common float dtype.
    """
    sizes: dict[str, int] = {}
    origin: dict[str, str] = {}
    dtypes: dict[str, np.dtype] = {}
    tname = type(params).__name__
    for field, dims in expected.items():
        value = getattr(params, field)
        if value is None:
            if field in optional:
                continue
            raise TypeError(
                f"`{where}`: `params.{field}` is None, but {tname} needs it; give it an "
                f"array shaped {_fmt(dims)}."
            )
        shape, dtype = shape_dtype(where, f"params.{field}", value)
        if not is_float(dtype):
            raise TypeError(
                f"`{where}`: `params.{field}` has dtype {dtype}, expected a float dtype; "
                f"cast it with `.astype(jnp.float32)` (or float64)."
            )
        dtypes[field] = dtype
        if len(shape) != len(dims):
            raise ValueError(
                f"`{where}`: `params.{field}` has shape {shape}, expected rank {len(dims)} "
                f"shaped {_fmt(dims)}; build params with the cell's `init` or fix the array."
            )
        for axis, (got, want) in enumerate(zip(shape, dims, strict=True)):
            if isinstance(want, int):
                ok = got == want
                expect = want
            else:
                letter, mult = _letter(want)
                if letter not in sizes:
                    if got % mult:
                        raise ValueError(
                            f"`{where}`: `params.{field}` has shape {shape}; axis {axis} "
                            f"must be a multiple of {mult} ({want})."
                        )
                    sizes[letter] = got // mult
                    origin[letter] = f"params.{field}.shape[{axis}]"
                    continue
                expect = sizes[letter] * mult
                ok = got == expect
            if not ok:
                raise ValueError(
                    f"`{where}`: `params.{field}` has shape {shape}, but {_fmt(dims)} with "
                    f"{_sizes_text(sizes, origin)} means {_fmt(dims, sizes)}; the params' "
                    "shapes are inconsistent, make them agree (or rebuild with the cell's "
                    "`init`)."
                )
    if len(set(dtypes.values())) > 1:
        listed = ", ".join(f"{k}: {v}" for k, v in dtypes.items())
        raise TypeError(
            f"`{where}`: the params mix dtypes ({listed}); cast all fields to one float dtype, "
            "e.g. `jax.tree.map(lambda a: a.astype(jnp.float32), params)`."
        )
    return sizes, next(iter(dtypes.values()))


def check_cell_params(
    where: str,
    params: Any,
    params_type: type,
    cell_name: str,
    fields: dict[str, tuple[int | str, ...]],
    optional: tuple[str, ...],
) -> tuple[int, int, np.dtype]:
    """Checks a built-in cell's params: type, readout pairing and field shapes.

    Returns:
        ``(input_size, hidden_size, dtype)``.
    """
    if not isinstance(params, params_type):
        raise TypeError(
            f"`{where}`: `params` must be {params_type.__name__}, got {type(params).__name__}; "
            f"build them with `jax_rnn.{cell_name}.init(key, input_size, hidden_size, "
            "output_size)`."
        )
    if params.b_output is not None and params.w_output is None:
        raise ValueError(
            f"`{where}`: `params.b_output` is set but `params.w_output` is None; a readout "
            "bias needs readout weights (or set b_output=None)."
        )
    sizes, dtype = check_fields(where, params, fields, optional)
    return sizes["I"], sizes["H"], dtype


def _letter(sym: str) -> tuple[str, int]:
    if "*" in sym:
        mult, letter = sym.split("*")
        return letter, int(mult)
    return sym, 1


def _fmt(dims: tuple[int | str, ...], sizes: dict[str, int] | None = None) -> str:
    def one(d: int | str) -> str:
        if isinstance(d, int) or sizes is None:
            return str(d)
        letter, mult = _letter(d)
        return str(sizes[letter] * mult) if letter in sizes else d

    inner = ", ".join(one(d) for d in dims)
    return f"({inner},)" if len(dims) == 1 else f"({inner})"


def _sizes_text(sizes: dict[str, int], origin: dict[str, str]) -> str:
    return ", ".join(f"{k}={v} (from {origin[k]})" for k, v in sizes.items())


def check_state_like(
    where: str,
    name: str,
    value: Any,
    hidden_size: int,
    batch_shape: tuple[int, ...],
) -> None:
    """Checks one ``(*batch, H)`` state array: last axis H, batch axes broadcastable."""
    if isinstance(value, tuple | list) and any(hasattr(v, "shape") for v in value):
        raise TypeError(
            f"`{where}`: `{name}` is a {type(value).__name__} of arrays, but this cell's state "
            f"is one array shaped (*batch, {hidden_size}); a tuple state (h, c) belongs to "
            "an LSTM."
        )
    shape, _ = shape_dtype(where, name, value)
    if len(shape) == 0 or shape[-1] != hidden_size:
        raise ValueError(
            f"`{where}`: `{name}` has shape {shape}, but the params have hidden size "
            f"{hidden_size}; {name} must be shaped (*batch, {hidden_size}) with batch "
            f"{batch_shape} (or broadcastable to it)."
        )
    try:
        out = np.broadcast_shapes(shape[:-1], batch_shape)
    except ValueError:
        out = None
    if out != batch_shape:
        raise ValueError(
            f"`{where}`: `{name}` has batch shape {shape[:-1]}, which does not broadcast to "
            f"the inputs' batch shape {batch_shape}; shape it (*{batch_shape}, {hidden_size}) "
            "or drop the batch axes."
        )


def carry_dtypes(where: str, carry: Any) -> list[np.dtype]:
    return [shape_dtype(where, "state0", leaf)[1] for leaf in jax.tree.leaves(carry)]


def check_inputs(
    where: str, xs: Any, input_size: int | None, *, time_axis: bool, name: str = "xs"
) -> tuple[tuple[int, ...], np.dtype]:
    """Checks inputs shaped ``(T, *batch, I)`` (``time_axis``) or ``(*batch, I)``."""
    shape, dtype = shape_dtype(where, name, xs)
    lead = "(time, *batch, " if time_axis else "(*batch, "
    if len(shape) < (2 if time_axis else 1):
        need = "(time, features) or (time, *batch, features)" if time_axis else "(..., features)"
        fix = (
            f"; for a scalar input per step use `{name}[:, None]`"
            if time_axis and len(shape) == 1
            else ""
        )
        raise ValueError(
            f"`{where}`: `{name}` has shape {shape}, expected at least {need}{fix}."
        )
    if input_size is not None and shape[-1] != input_size:
        raise ValueError(
            f"`{where}`: `{name}` has feature size {shape[-1]} but `params.w_cell_input` "
            f"expects {input_size}; {name} must be shaped {lead}{input_size})."
        )
    return shape, dtype
