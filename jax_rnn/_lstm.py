"""The long short-term memory (LSTM) cell, with PyTorch's equations and gate order."""

from __future__ import annotations

from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
import numpy as np
from jax import Array

from . import _checks
from ._elman import gated_init, readout, state_zeros
from ._types import Cell, StepOutput


class LSTMState(NamedTuple):
    """The carry of an LSTM cell.

    Attributes:
        h: the hidden state, ``(*batch, H)``; what the readout sees.
        c: the cell (memory) state, ``(*batch, H)``.

    Example:
        >>> params = jax_rnn.lstm.init(jax.random.key(0), 3, 4)
        >>> carry = jax_rnn.LSTMState(h=jnp.zeros((2, 4)), c=jnp.ones((2, 4)))
        >>> final, ys = jax_rnn.unroll(jax_rnn.lstm, params, jnp.ones((5, 2, 3)), carry)
        >>> final.h.shape, final.c.shape, bool(jnp.allclose(final.h, ys.state[-1]))
        ((2, 4), (2, 4), True)
    """

    h: Array
    c: Array


class LSTMParams(NamedTuple):
    """Parameters of an LSTM cell with an optional linear readout.

    The four gates are stacked along the last axis in PyTorch's order: input ``i``,
    forget ``f``, candidate ``g``, output ``o``. The weights are PyTorch's transposed:
    ``w_cell_input = lstm.weight_ih_l0.T`` and ``w_cell_state = lstm.weight_hh_l0.T``.

    Attributes:
        w_cell_input: input weights, ``(I, 4H)``; ``x @ w_cell_input``.
        w_cell_state: recurrent weights, ``(H, 4H)``; ``h @ w_cell_state``.
        b_cell_input: input bias, ``(4H,)`` (PyTorch's ``bias_ih``); ``None`` for none.
        b_cell_state: recurrent bias, ``(4H,)`` (PyTorch's ``bias_hh``); ``None`` for
            none. Only the sum of the two biases matters.
        w_output: readout weights, ``(H, O)``; ``None`` for a cell without readout,
            whose output is then ``h`` itself.
        b_output: readout bias, ``(O,)``; ``None`` for no readout bias.

    Example:
        An input gate shut and a forget gate open (biases of -20 and +20) keep the
        memory ``c`` as it was, and ``h = sigmoid(0) * tanh(c)``:

        >>> hidden = 2
        >>> bias = jnp.concatenate([jnp.full(hidden, -20.0), jnp.full(hidden, 20.0),
        ...                         jnp.zeros(2 * hidden)])  # i, f, g, o
        >>> params = jax_rnn.LSTMParams(
        ...     w_cell_input=jnp.zeros((1, 4 * hidden)),
        ...     w_cell_state=jnp.zeros((hidden, 4 * hidden)),
        ...     b_cell_input=bias, b_cell_state=None)
        >>> carry0 = jax_rnn.LSTMState(h=jnp.zeros(hidden), c=jnp.array([1.0, -2.0]))
        >>> carry, _ = jax_rnn.lstm_step(params, carry0, jnp.ones(1))
        >>> bool(jnp.allclose(carry.c, carry0.c, atol=1e-8))
        True
        >>> bool(jnp.allclose(carry.h, 0.5 * jnp.tanh(carry0.c)))
        True
    """

    w_cell_input: Array
    w_cell_state: Array
    b_cell_input: Array | None
    b_cell_state: Array | None
    w_output: Array | None = None
    b_output: Array | None = None

    @property
    def input_size(self) -> int:
        return int(self.w_cell_input.shape[0])

    @property
    def hidden_size(self) -> int:
        return int(self.w_cell_state.shape[0])

    @property
    def output_size(self) -> int:
        if self.w_output is None:
            return self.hidden_size
        return int(self.w_output.shape[-1])


_FIELDS = {
    "w_cell_state": ("H", "4*H"),
    "w_cell_input": ("I", "4*H"),
    "b_cell_input": ("4*H",),
    "b_cell_state": ("4*H",),
    "w_output": ("H", "O"),
    "b_output": ("O",),
}
_OPTIONAL = ("b_cell_input", "b_cell_state", "w_output", "b_output")


def _shapes(where: str, params: Any) -> tuple[int, int, np.dtype]:
    return _checks.check_cell_params(where, params, LSTMParams, "lstm", _FIELDS, _OPTIONAL)


def _split_carry(where: str, name: str, carry: Any) -> tuple[Any, Any]:
    """``(h, c)`` of an :class:`LSTMState` or a plain pair, else a TypeError."""
    if isinstance(carry, tuple) and len(carry) == 2:
        return carry[0], carry[1]
    got = f"a tuple of length {len(carry)}" if isinstance(carry, tuple) else type(carry).__name__
    shape = getattr(carry, "shape", None)
    if shape is not None:
        got += f" shaped {tuple(shape)}"
    raise TypeError(
        f"`{where}`: `{name}` of an LSTM must be an LSTMState(h, c) (or a pair (h, c)), "
        f"got {got}; build it with `jax_rnn.LSTMState(h, c)`, each shaped (*batch, H), "
        f"or use `jax_rnn.lstm.initial_state(params, batch_shape)`."
    )


def _check_carry(where: str, params: Any, carry: Any, batch_shape: tuple[int, ...]) -> None:
    h, c = _split_carry(where, "state0", carry)
    hidden = params.hidden_size
    _checks.check_state_like(where, "state0.h", h, hidden, batch_shape)
    _checks.check_state_like(where, "state0.c", c, hidden, batch_shape)


_checks.register(LSTMParams, _checks.ParamsSpec(_shapes, _check_carry))


def _check_step(where: str, params: Any, carry: Any, x: Any) -> tuple[Any, Any]:
    input_size, hidden_size, _ = _shapes(where, params)
    _checks.check_inputs(where, x, input_size, time_axis=False, name="x")
    h, c = _split_carry(where, "carry", carry)
    for name, value in (("carry.h", h), ("carry.c", c)):
        _checks.shape_dtype(where, name, value)
        if jnp.shape(value)[-1:] != (hidden_size,):
            raise ValueError(
                f"`{where}`: `{name}` has shape {jnp.shape(value)}, but `params.w_cell_state` "
                f"is ({hidden_size}, {4 * hidden_size}); {name} must be shaped "
                f"(..., {hidden_size})."
            )
    _checks.check_batches(where, x=x, **{"carry.h": h, "carry.c": c})
    return h, c


def lstm_step(
    params: LSTMParams, carry: LSTMState | tuple[Array, Array], x: Array
) -> tuple[LSTMState | tuple[Array, Array], StepOutput]:
    r"""One step of the LSTM cell (PyTorch's ``nn.LSTM``), shaped for :func:`jax.lax.scan`.

    With :math:`g = x_t W_{ci} + b_{ci} + h_{t-1} W_{cs} + b_{cs}` split into quarters
    ``(i, f, g, o)``:

    .. math::

        i_t = \sigma(g_i), \quad f_t = \sigma(g_f), \quad a_t = g_g, \quad
        o_t = \sigma(g_o),

        c_t = f_t \odot c_{t-1} + i_t \odot \tanh(a_t), \qquad
        h_t = o_t \odot \tanh(c_t), \qquad y_t = h_t W_o + b_o

    Args:
        params: an :class:`LSTMParams`.
        carry: the previous :class:`LSTMState` ``(h_{t-1}, c_{t-1})``, each shaped
            ``(H,)`` or ``(..., H)``. A plain pair ``(h, c)`` works too, and the new
            carry is then a plain pair as well (so that :func:`jax.lax.scan` sees the
            same structure in and out).
        x: the input ``x_t``, shaped ``(I,)`` or ``(..., I)``; leading axes broadcast
            against the carry's.

    Returns:
        ``(LSTMState(h_t, c_t), StepOutput(a_t, h_t, y_t))``: the pre-activation is the
        candidate gate's.

    Raises:
        ValueError: shapes that do not match the params.
        TypeError: params that are not :class:`LSTMParams`, a carry that is not a pair,
            or non-numeric input.

    Example:
        >>> params = jax_rnn.LSTMParams(  # H = 1: columns i, f, g, o
        ...     w_cell_input=jnp.array([[0.0, 0.0, 1.0, 0.0]]),
        ...     w_cell_state=jnp.zeros((1, 4)), b_cell_input=None, b_cell_state=None)
        >>> carry = jax_rnn.LSTMState(h=jnp.zeros(1), c=jnp.ones(1))
        >>> carry, out = jax_rnn.lstm_step(params, carry, jnp.ones(1))
        >>> # i = f = o = 1/2: c = 1/2 + tanh(1)/2, h = tanh(c)/2
        >>> print(out.pre_activation, carry.c.round(4), carry.h.round(4))
        [1.] [0.8808] [0.3534]
    """
    where = "jax_rnn.lstm_step"
    h, c = _check_step(where, params, carry, x)
    x = jnp.asarray(x)
    if not jnp.issubdtype(x.dtype, jnp.floating):
        x = x.astype(params.w_cell_input.dtype)
    gates = x @ params.w_cell_input + h @ params.w_cell_state
    for bias in (params.b_cell_input, params.b_cell_state):
        if bias is not None:
            gates = gates + bias
    pre_i, pre_f, pre_g, pre_o = jnp.split(gates, 4, axis=-1)
    new_c = jax.nn.sigmoid(pre_f) * c + jax.nn.sigmoid(pre_i) * jnp.tanh(pre_g)
    new_h = jax.nn.sigmoid(pre_o) * jnp.tanh(new_c)
    new_carry = LSTMState(new_h, new_c) if isinstance(carry, LSTMState) else (new_h, new_c)
    return new_carry, StepOutput(pre_g, new_h, readout(params, new_h))


def lstm_init(
    key: Array,
    input_size: int,
    hidden_size: int,
    output_size: int | None = None,
    *,
    dtype: Any = None,
) -> LSTMParams:
    r"""Draws LSTM parameters the way PyTorch's ``nn.LSTM`` and ``nn.Linear`` do.

    Every weight and bias is drawn independently from
    :math:`\mathcal U(-1/\sqrt{H}, 1/\sqrt{H})` (the readout has fan-in ``H`` too).

    Args:
        key: a :func:`jax.random.key`; nothing falls back to a hidden seed.
        input_size: ``I``, features per step.
        hidden_size: ``H``, the state size.
        output_size: ``O``, the readout size; ``None`` (the default) for no readout
            (the output is ``h``).
        dtype: float dtype; defaults to JAX's default float (float64 when x64 is on).

    Returns:
        :class:`LSTMParams`.

    Example:
        >>> params = jax_rnn.lstm.init(jax.random.key(0), 3, 8, 1)
        >>> params.w_cell_input.shape, params.w_cell_state.shape, params.b_cell_state.shape
        ((3, 32), (8, 32), (32,))
    """
    return gated_init("jax_rnn.lstm.init", LSTMParams, 4, key, input_size, hidden_size,
                      output_size, dtype)


def lstm_initial_state(params: LSTMParams, batch_shape: tuple[int, ...] = ()) -> LSTMState:
    """The LSTM cell's initial carry: ``LSTMState`` of zeros, each ``(*batch_shape, H)``.

    Example:
        >>> params = jax_rnn.lstm.init(jax.random.key(0), 1, 4)
        >>> carry = jax_rnn.lstm.initial_state(params, (2,))
        >>> carry.h.shape, carry.c.shape
        ((2, 4), (2, 4))
    """
    zeros = state_zeros(params, batch_shape)
    return LSTMState(h=zeros, c=zeros)


lstm = Cell(init=lstm_init, step=lstm_step, initial_state=lstm_initial_state)
"""The LSTM cell of PyTorch's ``nn.LSTM``: ``Cell(lstm_init, lstm_step, lstm_initial_state)``."""
_checks.register_cell(lstm_step, LSTMParams)
