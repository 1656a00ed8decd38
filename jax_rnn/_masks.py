"""Per-step masks over batch axes, shared by the scan, fused and parallel paths."""

from __future__ import annotations

from typing import Any

import jax
import jax.numpy as jnp
from jax import Array


def bcast(mask: Array, like: Array) -> Array:
    """``mask`` (*batch) with trailing unit axes so that it broadcasts against ``like``."""
    return mask.reshape(mask.shape + (1,) * (like.ndim - mask.ndim))


def select(mask: Array | None, new: Any, old: Any) -> Any:
    """``new`` where ``mask`` holds, else ``old``, leaf by leaf (``new`` if no mask)."""
    if mask is None:
        return new
    return jax.tree.map(lambda n, o: jnp.where(bcast(mask, n), n, o), new, old)


def zero_where_invalid(mask: Array | None, tree: Any) -> Any:
    """``tree`` where ``mask`` holds, zeros elsewhere (``tree`` if no mask)."""
    if mask is None:
        return tree
    return jax.tree.map(lambda a: jnp.where(bcast(mask, a), a, jnp.zeros((), a.dtype)), tree)
