"""The Elman (simple tanh) recurrent cell of the seed notebook."""

from __future__ import annotations

import functools
from collections.abc import Callable
from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
import numpy as np
from jax import Array

from . import _checks
from ._types import Cell, StepOutput


class ElmanParams(NamedTuple):
    """Parameters of an Elman cell with a linear readout, named as in the seed notebook.

    Attributes:
        w_cell_state: recurrent weights, ``(H, H)``; ``state @ w_cell_state``.
        w_cell_input: input weights, ``(I, H)``; ``x @ w_cell_input``.
        b_cell: bias of the pre-activation, ``(H,)``; ``None`` for no bias.
        w_output: readout weights, ``(H, O)``; ``None`` for a cell without readout,
            whose output is then the state itself.
        b_output: readout bias, ``(O,)``; ``None`` for no readout bias.
        b_cell_state: an optional second pre-activation bias, ``(H,)``. PyTorch's
            ``nn.RNN`` keeps two (``bias_ih`` and ``bias_hh``); keeping both lets weights
            go to PyTorch and back unchanged. ``None`` (the default) in the notebook model.

    Example:
        >>> params = jax_rnn.ElmanParams(
        ...     w_cell_state=jnp.eye(2), w_cell_input=jnp.ones((1, 2)), b_cell=jnp.zeros(2),
        ...     w_output=jnp.ones((2, 1)), b_output=jnp.zeros(1))
        >>> params.input_size, params.hidden_size, params.output_size
        (1, 2, 1)
        >>> state, out = jax_rnn.elman_step(params, jnp.zeros(2), jnp.array([0.5]))
        >>> bool(jnp.allclose(out.state, jnp.tanh(0.5)))  # pre = 0 @ I + 0.5 * [1, 1]
        True
    """

    w_cell_state: Array
    w_cell_input: Array
    b_cell: Array | None
    w_output: Array | None = None
    b_output: Array | None = None
    b_cell_state: Array | None = None

    @property
    def input_size(self) -> int:
        return int(self.w_cell_input.shape[0])

    @property
    def hidden_size(self) -> int:
        return int(self.w_cell_state.shape[0])

    @property
    def output_size(self) -> int:
        w_output = self.w_cell_state if self.w_output is None else self.w_output
        return int(w_output.shape[-1])


_FIELDS = {
    "w_cell_state": ("H", "H"),
    "w_cell_input": ("I", "H"),
    "b_cell": ("H",),
    "w_output": ("H", "O"),
    "b_output": ("O",),
    "b_cell_state": ("H",),
}
_OPTIONAL = ("b_cell", "w_output", "b_output", "b_cell_state")


def _shapes(where: str, params: Any) -> tuple[int, int, np.dtype]:
    return _checks.check_cell_params(where, params, ElmanParams, "elman", _FIELDS, _OPTIONAL)


def _check_carry(where: str, params: Any, carry: Any, batch_shape: tuple[int, ...]) -> None:
    _checks.check_state_like(where, "state0", carry, params.hidden_size, batch_shape)


_checks.register(ElmanParams, _checks.ParamsSpec(_shapes, _check_carry))


def _check_step(where: str, params: Any, state: Any, x: Any) -> None:
    input_size, hidden_size, _ = _shapes(where, params)
    _checks.check_inputs(where, x, input_size, time_axis=False, name="x")
    _checks.shape_dtype(where, "state", state)
    if jnp.shape(state)[-1:] != (hidden_size,):
        raise ValueError(
            f"`{where}`: `state` has shape {jnp.shape(state)}, but `params.w_cell_state` "
            f"is {hidden_size}x{hidden_size}; state must be shaped (..., {hidden_size})."
        )
    _checks.check_batches(where, x=x, state=state)


def readout(params: Any, state: Array) -> Array:
    """``state @ w_output + b_output``, or ``state`` when the params have no readout."""
    out = state if params.w_output is None else state @ params.w_output
    return out if params.b_output is None else out + params.b_output


def _elman_pre(params: ElmanParams, state: Array, x: Array) -> Array:
    pre = state @ params.w_cell_state + x @ params.w_cell_input
    for bias in (params.b_cell, params.b_cell_state):
        if bias is not None:
            pre = pre + bias
    return pre


def _elman_step_with(
    activation: Callable[[Array], Array], where: str, params: ElmanParams, state: Array, x: Array
) -> tuple[Array, StepOutput]:
    _check_step(where, params, state, x)
    x = jnp.asarray(x)
    if not jnp.issubdtype(x.dtype, jnp.floating):
        x = x.astype(params.w_cell_input.dtype)
    pre = _elman_pre(params, state, x)
    new_state = activation(pre)
    return new_state, StepOutput(pre, new_state, readout(params, new_state))


def elman_step(params: ElmanParams, state: Array, x: Array) -> tuple[Array, StepOutput]:
    r"""One step of the Elman cell, shaped for :func:`jax.lax.scan`.

    .. math::

        a_t = h_{t-1} W_{cs} + x_t W_{ci} + b_c, \qquad h_t = \tanh(a_t), \qquad
        y_t = h_t W_o + b_o

    Args:
        params: an :class:`ElmanParams`.
        state: the previous state ``h_{t-1}``, shaped ``(H,)`` or ``(..., H)``.
        x: the input ``x_t``, shaped ``(I,)`` or ``(..., I)``; leading axes broadcast
            against the state's.

    Returns:
        ``(h_t, StepOutput(a_t, h_t, y_t))``.

    Raises:
        ValueError: shapes that do not match the params.
        TypeError: params that are not :class:`ElmanParams`, or non-numeric input.

    Example:
        >>> import jax.numpy as jnp
        >>> import jax_rnn
        >>> params, xs, state0 = jax_rnn.seed_example()
        >>> state, out = jax_rnn.elman_step(params, state0, xs[0])
        >>> print(out.pre_activation, out.state.round(4))
        [0.6 0.5] [0.537  0.4621]
    """
    return _elman_step_with(jnp.tanh, "jax_rnn.elman_step", params, state, x)


def elman_init(
    key: Array,
    input_size: int,
    hidden_size: int,
    output_size: int | None = None,
    *,
    dtype: Any = None,
) -> ElmanParams:
    r"""Draws Elman parameters the way PyTorch's ``nn.RNN`` and ``nn.Linear`` do.

    Every weight and bias is drawn independently from
    :math:`\mathcal U(-1/\sqrt{H}, 1/\sqrt{H})` (the readout has fan-in ``H`` too),
    so a freshly initialised jax_rnn cell has the same distribution as PyTorch's.

    Args:
        key: a :func:`jax.random.key`; nothing falls back to a hidden seed.
        input_size: ``I``, features per step.
        hidden_size: ``H``, the state size.
        output_size: ``O``, the readout size; ``None`` (the default) for no readout (the
            output is the state).
        dtype: float dtype; defaults to JAX's default float (float64 when x64 is on).

    Returns:
        :class:`ElmanParams`.

    Example:
        >>> import jax
        >>> params = jax_rnn.elman.init(jax.random.key(0), 3, 8, 1)
        >>> params.w_cell_state.shape, params.w_cell_input.shape, params.w_output.shape
        ((8, 8), (3, 8), (8, 1))
    """
    where = "jax_rnn.elman.init"
    _check_sizes(where, input_size=input_size, hidden_size=hidden_size)
    if output_size is not None:
        _check_sizes(where, output_size=output_size)
    dtype = _float_dtype(where, dtype)
    bound = 1.0 / np.sqrt(hidden_size)
    k = jax.random.split(key, 5)

    def uniform(key: Array, shape: tuple[int, ...]) -> Array:
        return jax.random.uniform(key, shape, dtype, -bound, bound)

    w_output = b_output = None
    if output_size is not None:
        w_output = uniform(k[3], (hidden_size, output_size))
        b_output = uniform(k[4], (output_size,))
    return ElmanParams(
        w_cell_state=uniform(k[0], (hidden_size, hidden_size)),
        w_cell_input=uniform(k[1], (input_size, hidden_size)),
        b_cell=uniform(k[2], (hidden_size,)),
        w_output=w_output,
        b_output=b_output,
    )


def gated_init(
    where: str,
    params_type: type,
    gates: int,
    key: Array,
    input_size: int,
    hidden_size: int,
    output_size: int | None,
    dtype: Any,
) -> Any:
    """GRU/LSTM params, every field from U(-1/sqrt(H), 1/sqrt(H)) as PyTorch draws them."""
    _check_sizes(where, input_size=input_size, hidden_size=hidden_size)
    if output_size is not None:
        _check_sizes(where, output_size=output_size)
    dtype = _float_dtype(where, dtype)
    bound = 1.0 / np.sqrt(hidden_size)
    k = jax.random.split(key, 6)

    def uniform(key: Array, shape: tuple[int, ...]) -> Array:
        return jax.random.uniform(key, shape, dtype, -bound, bound)

    w_output = b_output = None
    if output_size is not None:
        w_output = uniform(k[4], (hidden_size, output_size))
        b_output = uniform(k[5], (output_size,))
    return params_type(
        w_cell_input=uniform(k[0], (input_size, gates * hidden_size)),
        w_cell_state=uniform(k[1], (hidden_size, gates * hidden_size)),
        b_cell_input=uniform(k[2], (gates * hidden_size,)),
        b_cell_state=uniform(k[3], (gates * hidden_size,)),
        w_output=w_output,
        b_output=b_output,
    )


def _check_sizes(where: str, **sizes: Any) -> None:
    for name, value in sizes.items():
        if isinstance(value, bool) or not isinstance(value, int | np.integer) or value < 1:
            raise ValueError(f"`{where}`: `{name}` must be a positive int, got {value!r}.")


def _float_dtype(where: str, dtype: Any) -> np.dtype:
    out = np.dtype(jnp.zeros(()).dtype if dtype is None else dtype)
    if not _checks.is_float(out):
        raise TypeError(f"`{where}`: `dtype` must be a float dtype, got {out}.")
    return np.dtype(jax.dtypes.canonicalize_dtype(out))


def state_zeros(params: Any, batch_shape: tuple[int, ...] = ()) -> Array:
    """Zeros shaped ``(*batch_shape, H)`` in the params' dtype."""
    w = params.w_cell_state
    return jnp.zeros((*_checks.batch_tuple("initial_state", batch_shape), w.shape[0]),
                     w.dtype)


def elman_initial_state(params: ElmanParams, batch_shape: tuple[int, ...] = ()) -> Array:
    """The Elman cell's initial state: zeros shaped ``(*batch_shape, H)``.

    Example:
        >>> params = jax_rnn.elman.init(jax.random.key(0), 1, 4, 1)
        >>> jax_rnn.elman.initial_state(params, (2,)).shape
        (2, 4)
    """
    return state_zeros(params, batch_shape)


elman_step.activation = jnp.tanh  # type: ignore[attr-defined]  # read by the fast path
elman = Cell(init=elman_init, step=elman_step, initial_state=elman_initial_state)
"""The Elman cell of the seed notebook: ``Cell(elman_init, elman_step, elman_initial_state)``."""
_checks.register_cell(elman_step, ElmanParams)


@functools.cache
def make_elman(activation: Callable[[Array], Array]) -> Cell:
    """An Elman cell with any elementwise activation in place of tanh.

    ``make_elman(jnp.tanh)`` computes what :data:`elman` computes; the result is cached
    per activation so that ``unroll`` compiles once per cell.

    Args:
        activation: an elementwise function, e.g. :func:`jax.nn.relu`.

    Returns:
        a :class:`Cell` whose params are :class:`ElmanParams`.

    Example:
        >>> relu_cell = jax_rnn.make_elman(jax.nn.relu)
        >>> params = relu_cell.init(jax.random.key(0), 2, 3, None)
        >>> state, out = relu_cell.step(params, jnp.zeros(3), jnp.ones(2))
        >>> bool((state >= 0).all())
        True
    """
    name = getattr(activation, "__name__", "activation")
    where = f"jax_rnn.make_elman({name}).step"

    def step(params: ElmanParams, state: Array, x: Array) -> tuple[Array, StepOutput]:
        return _elman_step_with(activation, where, params, state, x)

    step.__name__ = f"elman_{name}_step"
    step.activation = activation  # type: ignore[attr-defined]  # read by the fast path
    step.__doc__ = f"One Elman step with `{name}` as the activation; see `elman_step`."
    _checks.register_cell(step, ElmanParams)
    return Cell(init=elman_init, step=step, initial_state=elman_initial_state)


elman_relu = make_elman(jax.nn.relu)
"""The Elman cell with ReLU (Haiku's ``VanillaRNN`` with ``relu``, PyTorch's
``nn.RNN(nonlinearity="relu")``)."""
