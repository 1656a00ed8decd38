"""The gated recurrent unit (GRU), with PyTorch's equations and gate order."""

from __future__ import annotations

from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
import numpy as np
from jax import Array

from . import _checks
from ._elman import gated_init, readout, state_zeros
from ._types import Cell, StepOutput


class GRUParams(NamedTuple):
    """Parameters of a GRU cell with an optional linear readout.

    The three gates are stacked along the last axis in PyTorch's order: reset ``r``,
    update ``z``, candidate ``n``. The weights are PyTorch's transposed:
    ``w_cell_input = gru.weight_ih_l0.T`` and ``w_cell_state = gru.weight_hh_l0.T``.

    Attributes:
        w_cell_input: input weights, ``(I, 3H)``; ``x @ w_cell_input``.
        w_cell_state: recurrent weights, ``(H, 3H)``; ``state @ w_cell_state``.
        b_cell_input: input bias, ``(3H,)`` (PyTorch's ``bias_ih``); ``None`` for none.
        b_cell_state: recurrent bias, ``(3H,)`` (PyTorch's ``bias_hh``); ``None`` for
            none. Its candidate third sits inside the reset gate's product.
        w_output: readout weights, ``(H, O)``; ``None`` for a cell without readout,
            whose output is then the state itself.
        b_output: readout bias, ``(O,)``; ``None`` for no readout bias.

    Example:
        With zero weights and a recurrent bias that opens the update gate wide, the
        state barely moves:

        >>> hidden = 2
        >>> bias = jnp.concatenate([jnp.zeros(hidden), jnp.full(hidden, 20.0),
        ...                         jnp.zeros(hidden)])  # r, z, n
        >>> params = jax_rnn.GRUParams(
        ...     w_cell_input=jnp.zeros((1, 3 * hidden)),
        ...     w_cell_state=jnp.zeros((hidden, 3 * hidden)),
        ...     b_cell_input=jnp.zeros(3 * hidden), b_cell_state=bias)
        >>> params.input_size, params.hidden_size, params.output_size
        (1, 2, 2)
        >>> h, _ = jax_rnn.gru_step(params, jnp.array([0.3, -0.4]), jnp.ones(1))
        >>> bool(jnp.allclose(h, jnp.array([0.3, -0.4]), atol=1e-8))  # z = sigmoid(20)
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
    "w_cell_state": ("H", "3*H"),
    "w_cell_input": ("I", "3*H"),
    "b_cell_input": ("3*H",),
    "b_cell_state": ("3*H",),
    "w_output": ("H", "O"),
    "b_output": ("O",),
}
_OPTIONAL = ("b_cell_input", "b_cell_state", "w_output", "b_output")


def _shapes(where: str, params: Any) -> tuple[int, int, np.dtype]:
    return _checks.check_cell_params(where, params, GRUParams, "gru", _FIELDS, _OPTIONAL)


def _reject_tuple(where: str, name: str, state: Any) -> None:
    # A tuple would read as an array with a leading axis of its length: (h, c) could pass
    # for a state batched over 2.
    if isinstance(state, tuple | list):
        raise TypeError(
            f"`{where}`: `{name}` of a GRU is one array shaped (*batch, H), got a "
            f"{type(state).__name__} of {len(state)}; pairs (h, c) belong to `jax_rnn.lstm`. "
            f"Pass `jnp.asarray(...)` if the {type(state).__name__} holds numbers."
        )


def _check_carry(where: str, params: Any, carry: Any, batch_shape: tuple[int, ...]) -> None:
    _reject_tuple(where, "state0", carry)
    _checks.check_state_like(where, "state0", carry, params.hidden_size, batch_shape)


_checks.register(GRUParams, _checks.ParamsSpec(_shapes, _check_carry))


def _check_step(where: str, params: Any, state: Any, x: Any) -> None:
    input_size, hidden_size, _ = _shapes(where, params)
    _checks.check_inputs(where, x, input_size, time_axis=False, name="x")
    _reject_tuple(where, "state", state)
    _checks.shape_dtype(where, "state", state)
    if jnp.shape(state)[-1:] != (hidden_size,):
        raise ValueError(
            f"`{where}`: `state` has shape {jnp.shape(state)}, but `params.w_cell_state` "
            f"is ({hidden_size}, {3 * hidden_size}); state must be shaped (..., {hidden_size})."
        )
    _checks.check_batches(where, x=x, state=state)


def gru_step(params: GRUParams, state: Array, x: Array) -> tuple[Array, StepOutput]:
    r"""One step of the GRU cell (PyTorch's ``nn.GRU``), shaped for :func:`jax.lax.scan`.

    With :math:`g^x = x_t W_{ci} + b_{ci}` and :math:`g^h = h_{t-1} W_{cs} + b_{cs}`, each
    split into reset, update and candidate thirds ``(r, z, n)``:

    .. math::

        r_t = \sigma(g^x_r + g^h_r), \qquad z_t = \sigma(g^x_z + g^h_z), \qquad
        a_t = g^x_n + r_t \odot g^h_n,

        n_t = \tanh(a_t), \qquad h_t = (1 - z_t) \odot n_t + z_t \odot h_{t-1},
        \qquad y_t = h_t W_o + b_o

    Args:
        params: a :class:`GRUParams`.
        state: the previous state ``h_{t-1}``, shaped ``(H,)`` or ``(..., H)``.
        x: the input ``x_t``, shaped ``(I,)`` or ``(..., I)``; leading axes broadcast
            against the state's.

    Returns:
        ``(h_t, StepOutput(a_t, h_t, y_t))``: the pre-activation is the candidate's.

    Raises:
        ValueError: shapes that do not match the params.
        TypeError: params that are not :class:`GRUParams`, or non-numeric input.

    Example:
        >>> params = jax_rnn.GRUParams(  # H = 1: columns r, z, n
        ...     w_cell_input=jnp.array([[0.5, -1.0, 2.0]]),
        ...     w_cell_state=jnp.zeros((1, 3)), b_cell_input=None, b_cell_state=None)
        >>> state, out = jax_rnn.gru_step(params, jnp.zeros(1), jnp.ones(1))
        >>> # a = 2, z = sigmoid(-1), h = (1 - z) * tanh(2); no readout: y = h
        >>> print(out.pre_activation, out.state.round(4), out.output.round(4))
        [2.] [0.7048] [0.7048]
    """
    where = "jax_rnn.gru_step"
    _check_step(where, params, state, x)
    x = jnp.asarray(x)
    if not jnp.issubdtype(x.dtype, jnp.floating):
        x = x.astype(params.w_cell_input.dtype)
    gi = x @ params.w_cell_input
    gh = state @ params.w_cell_state
    if params.b_cell_input is not None:
        gi = gi + params.b_cell_input
    if params.b_cell_state is not None:
        gh = gh + params.b_cell_state
    new_state, pre, _ = gru_pointwise(gi, gh, state)
    return new_state, StepOutput(pre, new_state, readout(params, new_state))


def gru_pointwise(gi: Array, gh: Array, state: Array,
                  ) -> tuple[Array, Array, tuple[Array, Array, Array, Array]]:
    """A GRU step after its two products ``gi = x_t @ w_in + b_in`` and ``gh = state @ w +
    b``: ``(h_t, pre, (r, z, n, gh_n))`` (also the fused path's and the C++ kernels'
    reference)."""
    gi_r, gi_z, gi_n = jnp.split(gi, 3, axis=-1)
    gh_r, gh_z, gh_n = jnp.split(gh, 3, axis=-1)
    r = jax.nn.sigmoid(gi_r + gh_r)
    z = jax.nn.sigmoid(gi_z + gh_z)
    pre = gi_n + r * gh_n
    n = jnp.tanh(pre)
    return (1.0 - z) * n + z * state, pre, (r, z, n, gh_n)


def gru_init(
    key: Array,
    input_size: int,
    hidden_size: int,
    output_size: int | None = None,
    *,
    dtype: Any = None,
) -> GRUParams:
    r"""Draws GRU parameters the way PyTorch's ``nn.GRU`` and ``nn.Linear`` do.

    Every weight and bias is drawn independently from
    :math:`\mathcal U(-1/\sqrt{H}, 1/\sqrt{H})` (the readout has fan-in ``H`` too).

    Args:
        key: a :func:`jax.random.key`; nothing falls back to a hidden seed.
        input_size: ``I``, features per step.
        hidden_size: ``H``, the state size.
        output_size: ``O``, the readout size; ``None`` (the default) for no readout
            (the output is the state).
        dtype: float dtype; defaults to JAX's default float (float64 when x64 is on).

    Returns:
        :class:`GRUParams`.

    Example:
        >>> params = jax_rnn.gru.init(jax.random.key(0), 3, 8, 1)
        >>> params.w_cell_input.shape, params.w_cell_state.shape, params.b_cell_state.shape
        ((3, 24), (8, 24), (24,))
        >>> params.w_output.shape, jax_rnn.gru.init(jax.random.key(0), 3, 8).w_output
        ((8, 1), None)
    """
    return gated_init("jax_rnn.gru.init", GRUParams, 3, key, input_size, hidden_size,
                      output_size, dtype)


def gru_initial_state(params: GRUParams, batch_shape: tuple[int, ...] = ()) -> Array:
    """The GRU cell's initial state: zeros shaped ``(*batch_shape, H)``.

    Example:
        >>> params = jax_rnn.gru.init(jax.random.key(0), 1, 4)
        >>> jax_rnn.gru.initial_state(params, (2,)).shape
        (2, 4)
    """
    return state_zeros(params, batch_shape)


gru = Cell(init=gru_init, step=gru_step, initial_state=gru_initial_state)
"""The GRU cell of PyTorch's ``nn.GRU``: ``Cell(gru_init, gru_step, gru_initial_state)``."""
_checks.register_cell(gru_step, GRUParams)
