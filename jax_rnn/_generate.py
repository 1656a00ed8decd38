"""Closed-loop generation: each step's output becomes the next step's input."""

from __future__ import annotations

import functools
from collections.abc import Callable
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
from jax import Array

from . import _checks
from ._compose import Bidirectional, Stack
from ._fresh import check_arity, compile_fresh
from ._jacobian import outputs_of
from ._unroll import _check_model, cast_floats, cast_inputs, initial_carry


def _identity_feedback(y: Any, key: Array | None = None) -> Any:
    return outputs_of(y)


def _generate_impl(
    params: Any,
    state0: Any,
    first_input: Array,
    key: Array | None,
    *,
    cell: Any,
    steps: int,
    feedback: Callable[..., Any],
    dtype: np.dtype | None,
    batch: tuple,
) -> tuple[Any, Any, Array]:
    params = cast_floats(params, dtype)
    state0, first_input = cast_inputs((state0, first_input), dtype)
    carry0 = initial_carry(cell, params, state0, batch)
    keys = None if key is None else jax.random.split(key, steps)

    def body(loop: tuple[Any, Array], key_t: Array | None) -> tuple[tuple[Any, Array], Any]:
        carry, x = loop
        carry, y = cell.step(params, carry, x)
        nxt = jnp.asarray(feedback(y) if key_t is None else feedback(y, key_t))
        if nxt.shape != x.shape:  # known while tracing: before anything runs
            default = feedback is _identity_feedback
            raise ValueError(
                f"`jax_rnn.generate`: `feedback` returned shape {nxt.shape}, expected the "
                f"input's shape {x.shape} (*batch, I): each step's feedback is the next "
                "step's input."
                + (" The default feedback is the step's output, which needs output size == "
                   "input size; pass `feedback=` that maps an output to an input."
                   if default else "")
            )
        return (carry, nxt.astype(x.dtype)), (y, x)

    (final, _), (ys, xs) = jax.lax.scan(body, (carry0, first_input), keys, length=steps)
    return final, ys, xs


# The default feedback reads nothing from outside, so its compilation is cached; a
# caller's is compiled at every call (`compile_fresh`).
_generate_cached = jax.jit(_generate_impl,
                           static_argnames=("cell", "steps", "feedback", "dtype", "batch"))


def _check_key(where: str, key: Any) -> None:
    """A typed key (:func:`jax.random.key`) or a raw one (:func:`jax.random.PRNGKey`)."""
    dtype = getattr(key, "dtype", None)
    if dtype is not None and jnp.issubdtype(dtype, jax.dtypes.prng_key):
        return
    if dtype == np.uint32 and np.ndim(key) >= 1 and np.shape(key)[-1] == 2:
        return
    raise TypeError(
        f"`{where}`: `key` must be a random key, e.g. `jax.random.key(0)`, got "
        f"{type(key).__name__} {key!r}."
    )


def generate(
    cell: Any,
    params: Any,
    state0: Any,
    first_input: Array,
    steps: int,
    feedback: Callable[..., Any] | None = None,
    *,
    key: Array | None = None,
) -> tuple[Any, Any, Array]:
    """Free-running generation: feeds each step's output back as the next input.

    Step ``t`` reads ``x_t``; ``x_0 = first_input`` and ``x_{t+1} = feedback(y_t)`` (or
    ``feedback(y_t, key_t)`` when ``key`` is given, with a fresh key per step split from
    ``key``, e.g. to sample). The loop is one :func:`jax.lax.scan` under ``jit``. The other
    mode, teacher forcing, is a plain :func:`unroll` over the true inputs.

    Args:
        cell: a :class:`Cell` or a :class:`Stack` of cells (bidirectional layers cannot
            generate: they need the future).
        params: the model's params.
        state0: the initial carry; ``None`` for zeros.
        first_input: the first input, ``(*batch, I)``.
        steps: how many steps to run (a Python int, >= 0).
        feedback: ``y_t -> x_{t+1}`` (``(y_t, key_t) -> x_{t+1}`` with ``key``); must return
            an array of the input's shape. Default: the step's ``output`` (needs O == I,
            also for ``steps=0``). A feedback of the caller's is compiled at every call,
            so it may read values from outside and gets their current ones; inside a
            caller's own :func:`jax.jit`, jit's usual rules apply.
        key: a :func:`jax.random.key`, split into one key per step for ``feedback``.

    Returns:
        ``(final_state, ys, xs)``: the last carry, the step outputs stacked over time and
        the inputs each step read, ``(steps, *batch, I)``.

    Example:
        >>> params = jax_rnn.elman.init(jax.random.key(0), 1, 8, 1)
        >>> final, ys, xs = jax_rnn.generate(jax_rnn.elman, params, None, jnp.ones(1), 4)
        >>> bool(jnp.allclose(xs[1:], ys.output[:-1]))  # each output is the next input
        True
    """
    where = "jax_rnn.generate"
    if isinstance(cell, Bidirectional) or (
        isinstance(cell, Stack) and any(isinstance(layer, Bidirectional) for layer in cell.layers)
    ):
        raise TypeError(
            f"`{where}`: a bidirectional layer cannot generate step by step (its backward "
            "direction needs the whole sequence); use a unidirectional cell or stack."
        )
    if isinstance(steps, bool) or not isinstance(steps, int | np.integer) or steps < 0:
        raise ValueError(f"`{where}`: `steps` must be an int >= 0, got {steps!r}.")
    shape, x_dtype = _checks.check_inputs(where, first_input, None, time_axis=False,
                                          name="first_input")
    batch = tuple(shape[:-1])
    dtypes: list = []
    struct = jax.ShapeDtypeStruct((1, *shape), x_dtype)
    _check_model(where, cell, params, struct, state0, batch, dtypes, "first_input",
                 time_axis=False)
    dtype = _checks.float_dtype(*dtypes, x_dtype) if dtypes else None
    if feedback is not None and not callable(feedback):
        raise TypeError(
            f"`{where}`: `feedback` must be a function of the step's output (and a key when "
            f"`key` is given) that returns the next input, got {type(feedback).__name__}."
        )
    if key is not None:
        _check_key(where, key)
    if feedback is not None:
        check_arity(where, "feedback", feedback, 1 if key is None else 2,
                    "the step's output" if key is None else
                    "the step's output and a key (as `key` is given)")
    first = _checks.as_array(first_input)
    state0 = None if state0 is None else jax.tree.map(_checks.as_array, state0)
    run = (_generate_cached if feedback is None
           else functools.partial(compile_fresh, _generate_impl))
    return run(params, state0, first, key, cell=cell, steps=int(steps),
               feedback=_identity_feedback if feedback is None else feedback, dtype=dtype,
               batch=batch)
