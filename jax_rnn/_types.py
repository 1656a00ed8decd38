"""The pytrees every cell shares: :class:`Cell` and :class:`StepOutput`."""

from __future__ import annotations

from collections.abc import Callable
from typing import Any, NamedTuple

from jax import Array


class StepOutput(NamedTuple):
    """What one step of a readout cell emits: the three lines the seed notebook prints.

    Attributes:
        pre_activation: the cell's pre-activation, ``(..., H)`` (for gated cells, the
            candidate's pre-activation).
        state: the new hidden state ``h_t``, ``(..., H)``.
        output: the readout ``h_t @ w_output + b_output``, ``(..., O)``; ``h_t`` itself
            when the cell has no readout.
    """

    pre_activation: Array
    state: Array
    output: Array


class Cell(NamedTuple):
    """A recurrent cell as three pure functions.

    Attributes:
        init: ``init(key, input_size, hidden_size, output_size, *, dtype=None) -> params``.
        step: ``step(params, carry, x) -> (carry, y)``; with ``params`` bound it is exactly
            the function :func:`jax.lax.scan` takes.
        initial_state: ``initial_state(params, batch_shape=()) -> carry`` (zeros).

    Any triple of functions with these signatures works with :func:`jax_rnn.unroll`;
    the built-in cells also get their shapes and dtypes checked before tracing.
    """

    init: Callable[..., Any]
    step: Callable[[Any, Any, Any], tuple[Any, Any]]
    initial_state: Callable[..., Any]
