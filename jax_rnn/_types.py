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

    Example:
        The seed notebook's first step, whose three printed lines these are:

        >>> params, xs, state0 = jax_rnn.seed_example()
        >>> _, first = jax_rnn.elman_step(params, state0, xs[0])
        >>> bool(jnp.allclose(first.state, jnp.tanh(first.pre_activation)))
        True
        >>> bool(jnp.allclose(first.output, first.state @ params.w_output + params.b_output))
        True
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

    Example:
        A cell of one's own, a leaky integrator ``h_t = a * h_{t-1} + x_t``:

        >>> leaky = jax_rnn.Cell(
        ...     init=lambda key, i, h, o=None, *, dtype=None: jnp.full((), 0.5),
        ...     step=lambda a, h, x: (a * h + x, a * h + x),
        ...     initial_state=lambda a, batch_shape=(): jnp.zeros(batch_shape + (1,)))
        >>> a = leaky.init(jax.random.key(0), 1, 1)
        >>> final, ys = jax_rnn.unroll(leaky, a, jnp.ones((3, 1)))
        >>> ys[:, 0].tolist(), final.tolist()  # 1, 0.5 + 1, 0.75 + 1
        ([1.0, 1.5, 1.75], [1.75])
    """

    init: Callable[..., Any]
    step: Callable[[Any, Any, Any], tuple[Any, Any]]
    initial_state: Callable[..., Any]
