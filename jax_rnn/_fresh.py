"""Compiling a computation that calls a caller's function, once per call."""

from __future__ import annotations

import inspect
from collections.abc import Callable
from typing import Any

import jax


def compile_fresh(fn: Callable[..., Any], *args: Any, **static: Any) -> Any:
    """``fn(*args, **static)`` under :func:`jax.jit`, traced and compiled for this call.

    For computations that call a caller's function (a loss, a feedback): a compilation
    cached on that function object would freeze whatever it reads from outside (a
    global, a closure's variables) at its first call, and a later call with the same
    function would silently compute with the old values. Inside a caller's own
    ``jax.jit`` this adds nothing; the caller's jit caches as jit does.
    """
    return jax.jit(lambda *a: fn(*a, **static))(*args)


def check_arity(where: str, name: str, fn: Callable[..., Any], n: int, usage: str) -> None:
    """Raises a TypeError naming ``where`` if ``fn`` cannot take ``n`` positional
    arguments (functions whose signature Python cannot read are let through)."""
    try:
        signature = inspect.signature(fn)
    except (TypeError, ValueError):
        return
    try:
        signature.bind(*range(n))
    except TypeError as err:
        raise TypeError(
            f"`{where}`: `{name}` must take {n} positional argument(s), {usage}; its "
            f"signature {signature} does not ({err})."
        ) from None
