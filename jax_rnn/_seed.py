"""The seed notebook's example: a 2-unit tanh RNN over X = [1, 2, 3, 4, 5]."""

from __future__ import annotations

from typing import Any

import jax.numpy as jnp
from jax import Array

from ._elman import ElmanParams, _float_dtype


def seed_example(dtype: Any = None) -> tuple[ElmanParams, Array, Array]:
    """The numbers of the seed notebook, exactly.

    ``w_cell_state = [[0.1, 0.2], [0.3, 0.4]]``, ``w_cell_input = [[0.5, 0.6]]``,
    ``b_cell = [0.1, -0.1]``, ``w_output = [[1.0], [2.0]]``, ``b_output = [0.1]``, inputs
    ``X = [1, 2, 3, 4, 5]`` as a ``(5, 1)`` array and a zero initial state.

    Args:
        dtype: float dtype; defaults to JAX's default float. Use float64 (with x64 on) to
            reproduce the notebook's printed digits.

    Returns:
        ``(params, xs, state0)``.

    Example:
        >>> params, xs, state0 = jax_rnn.seed_example()
        >>> xs.shape, params.w_cell_input.shape, state0.shape
        ((5, 1), (1, 2), (2,))
    """
    dtype = _float_dtype("jax_rnn.seed_example", dtype)
    params = ElmanParams(
        w_cell_state=jnp.asarray([[0.1, 0.2], [0.3, 0.4]], dtype),
        w_cell_input=jnp.asarray([[0.5, 0.6]], dtype),
        b_cell=jnp.asarray([0.1, -0.1], dtype),
        w_output=jnp.asarray([[1.0], [2.0]], dtype),
        b_output=jnp.asarray([0.1], dtype),
    )
    xs = jnp.asarray([[1.0], [2.0], [3.0], [4.0], [5.0]], dtype)
    return params, xs, jnp.zeros(2, dtype)
