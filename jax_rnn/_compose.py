"""Composite models: stacks of layers and bidirectional layers.

Both are static descriptions (hashable NamedTuples of cells) with the same
``init``/``initial_state`` methods as a :class:`~jax_rnn.Cell`; :func:`jax_rnn.unroll`
runs them layer by layer over the whole sequence, as PyTorch's ``num_layers`` and
``bidirectional`` do.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
from jax import Array

from ._types import Cell, StepOutput


class BidirectionalParams(NamedTuple):
    """Params of a :func:`bidirectional` layer: one set per direction.

    Example:
        >>> model = jax_rnn.bidirectional(jax_rnn.gru)
        >>> params = model.init(jax.random.key(0), 3, 4)
        >>> params.forward.w_cell_state.shape, params.backward.w_cell_state.shape
        ((4, 12), (4, 12))
    """

    forward: Any
    backward: Any


class BidirectionalState(NamedTuple):
    """Carry of a :func:`bidirectional` layer: one carry per direction.

    Example:
        The backward direction's final carry is its state after reading ``xs[0]``:

        >>> model = jax_rnn.bidirectional(jax_rnn.elman)
        >>> params = model.init(jax.random.key(0), 3, 4)
        >>> final, ys = jax_rnn.unroll(model, params, jnp.ones((6, 3)))
        >>> bool(jnp.allclose(final.forward, ys.state[-1, :4]))
        True
        >>> bool(jnp.allclose(final.backward, ys.state[0, 4:]))
        True
    """

    forward: Any
    backward: Any


def output_size_of(layer: Any, params: Any, input_size: int | None = None) -> int:
    """Feature size of what ``layer`` emits per step (the next layer's input size).

    The built-in cells' params know it (``params.output_size``); a cell of the user's is
    traced for one step on an input of ``input_size`` features (shapes only, nothing
    runs), and its output (a :class:`StepOutput`'s ``output``, or what the step returns)
    gives it.
    """
    if isinstance(layer, Bidirectional):
        return output_size_of(layer.forward, params.forward, input_size) + output_size_of(
            layer.backward, params.backward, input_size
        )
    if isinstance(layer, Stack):
        sizes = [input_size]
        for inner, p in zip(layer.layers[:-1], params[:-1], strict=True):
            sizes.append(None if sizes[-1] is None else output_size_of(inner, p, sizes[-1]))
        return output_size_of(layer.layers[-1], params[-1], sizes[-1])
    size = getattr(params, "output_size", None)
    if size is not None:
        return int(size)
    if input_size is None:
        raise TypeError(f"no output size known for params of type {type(params).__name__}")
    floats = [a.dtype for a in jax.tree.leaves(params)
              if hasattr(a, "dtype") and jnp.issubdtype(a.dtype, jnp.floating)]
    x = jax.ShapeDtypeStruct((input_size,), floats[0] if floats else jnp.float32)
    carry = jax.eval_shape(lambda p: layer.initial_state(p, ()), params)
    _, y = jax.eval_shape(layer.step, params, carry, x)
    out = y.output if isinstance(y, StepOutput) else y
    if not hasattr(out, "shape") or len(out.shape) == 0:
        raise TypeError(
            "`jax_rnn.Stack.init`: a layer's step must return an array of features, or a "
            f"StepOutput, as its output; got {type(out).__name__} {out}."
        )
    return int(out.shape[-1])


def concat_outputs(forward: Any, backward: Any) -> Any:
    """Concatenates two directions' step outputs on the last axis, field by field."""
    return jax.tree.map(lambda a, b: jnp.concatenate([a, b], axis=-1), forward, backward)


class Bidirectional(NamedTuple):
    """A layer that runs ``forward`` over time and ``backward`` over reversed time.

    Its step outputs are the two directions' outputs concatenated on the last axis
    (``[forward, backward]``, PyTorch's layout); its carry is a
    :class:`BidirectionalState`. Build it with :func:`bidirectional`.

    Example:
        The backward direction is the forward unroll of the reversed sequence:

        >>> model = jax_rnn.bidirectional(jax_rnn.lstm)
        >>> params = model.init(jax.random.key(0), 2, 3)
        >>> xs = jax.random.normal(jax.random.key(1), (5, 2))
        >>> _, ys = jax_rnn.unroll(model, params, xs)
        >>> _, back = jax_rnn.unroll(jax_rnn.lstm, params.backward, xs[::-1])
        >>> bool(jnp.allclose(ys.state[:, 3:], back.state[::-1], atol=1e-6))
        True
    """

    forward: Any
    backward: Any

    def init(
        self,
        key: Array,
        input_size: int,
        hidden_size: int,
        output_size: int | None = None,
        *,
        dtype: Any = None,
    ) -> BidirectionalParams:
        """Params for both directions, drawn with independent keys."""
        k_fw, k_bw = jax.random.split(key)
        return BidirectionalParams(
            self.forward.init(k_fw, input_size, hidden_size, output_size, dtype=dtype),
            self.backward.init(k_bw, input_size, hidden_size, output_size, dtype=dtype),
        )

    def initial_state(self, params: BidirectionalParams, batch_shape: tuple = ()) -> Any:
        """Zeros for both directions."""
        return BidirectionalState(
            self.forward.initial_state(params.forward, batch_shape),
            self.backward.initial_state(params.backward, batch_shape),
        )


class Stack(NamedTuple):
    """Layers applied one after another; layer ``l + 1`` reads layer ``l``'s outputs.

    Params are a tuple with one entry per layer and the carry a tuple of the layers'
    carries. ``dropout`` is applied to the outputs of every layer but the last when
    :func:`jax_rnn.unroll` is given a ``dropout_key`` (training), and never otherwise.
    Build it with :func:`stack`.

    Example:
        Two layers are the second unrolled over the first one's outputs:

        >>> model = jax_rnn.stack([jax_rnn.gru, jax_rnn.elman])
        >>> params = model.init(jax.random.key(0), 3, 4, 2)
        >>> xs = jax.random.normal(jax.random.key(1), (5, 3))
        >>> _, ys = jax_rnn.unroll(model, params, xs)
        >>> _, first = jax_rnn.unroll(jax_rnn.gru, params[0], xs)
        >>> _, second = jax_rnn.unroll(jax_rnn.elman, params[1], first.output)
        >>> bool(jnp.allclose(ys.output, second.output, atol=1e-6))
        True
    """

    layers: tuple
    dropout: float = 0.0

    def init(
        self,
        key: Array,
        input_size: int,
        hidden_size: int | Sequence[int],
        output_size: int | None = None,
        *,
        dtype: Any = None,
    ) -> tuple:
        """Params for every layer.

        Args:
            key: a :func:`jax.random.key`.
            input_size: features of the stack's input.
            hidden_size: one size for every layer, or one per layer.
            output_size: readout size of the last layer (``None``: no readout); the
                other layers have no readout and pass their states on.
            dtype: float dtype.
        """
        sizes = (
            [hidden_size] * len(self.layers)
            if isinstance(hidden_size, int)
            else list(hidden_size)
        )
        if len(sizes) != len(self.layers):
            raise ValueError(
                f"`jax_rnn.Stack.init`: got {len(sizes)} hidden sizes for "
                f"{len(self.layers)} layers; pass one int or one size per layer."
            )
        params = []
        keys = jax.random.split(key, len(self.layers))
        size_in = input_size
        for i, (layer, layer_key, size) in enumerate(zip(self.layers, keys, sizes, strict=True)):
            out = output_size if i == len(self.layers) - 1 else None
            # (a cell of the user's need not take `dtype` when none is asked for)
            extra = {} if dtype is None else {"dtype": dtype}
            layer_params = layer.init(layer_key, size_in, size, out, **extra)
            params.append(layer_params)
            size_in = output_size_of(layer, layer_params, size_in)
        return tuple(params)

    def initial_state(self, params: tuple, batch_shape: tuple = ()) -> tuple:
        """The tuple of every layer's initial carry."""
        return tuple(
            layer.initial_state(p, batch_shape) for layer, p in zip(self.layers, params,
                                                                    strict=True)
        )

    def step(self, params: tuple, carry: tuple, x: Array) -> tuple[tuple, Any]:
        """One time step through every layer (no dropout); for :func:`jax_rnn.generate`.

        Raises:
            TypeError: if a layer is bidirectional (it needs the whole sequence).
        """
        new_carry = []
        y: Any = None
        for layer, p, c in zip(self.layers, params, carry, strict=True):
            if isinstance(layer, Bidirectional):
                raise TypeError(
                    "`jax_rnn.Stack.step`: a bidirectional layer cannot run one step at a "
                    "time (its backward pass needs the whole sequence); use `jax_rnn.unroll`."
                )
            c, y = layer.step(p, c, x)
            new_carry.append(c)
            x = y.output if isinstance(y, StepOutput) else y
        return tuple(new_carry), y


def _check_layer(where: str, layer: Any) -> None:
    if isinstance(layer, Cell | Stack | Bidirectional):
        return
    if all(callable(getattr(layer, f, None)) for f in ("init", "step", "initial_state")):
        return
    raise TypeError(
        f"`{where}`: every layer must be a jax_rnn.Cell, a Stack or a Bidirectional, got "
        f"{type(layer).__name__}."
    )


def stack(layers: Sequence[Any], *, dropout: float = 0.0) -> Stack:
    """Stacks layers (cells or bidirectional layers) into one deep recurrent model.

    The result is what PyTorch's ``num_layers`` builds and Haiku's ``DeepRNN`` composes,
    with possibly different cells per layer. :func:`jax_rnn.unroll` runs it layer by layer
    with every option (lengths, reverse, remat, truncation) applied to each layer.

    Args:
        layers: the layers, first to last.
        dropout: probability of zeroing each output of every layer but the last while
            training (``unroll(..., dropout_key=key)``); survivors are scaled by
            ``1 / (1 - dropout)``, as in PyTorch.

    Returns:
        a :class:`Stack`.

    Example:
        >>> model = jax_rnn.stack([jax_rnn.elman, jax_rnn.elman_relu])
        >>> params = model.init(jax.random.key(0), 3, 8, 2)
        >>> final, ys = jax_rnn.unroll(model, params, jnp.ones((5, 3)))
        >>> ys.output.shape, len(final)
        ((5, 2), 2)
    """
    layers = tuple(layers)
    if not layers:
        raise ValueError("`jax_rnn.stack`: got no layers; pass at least one cell.")
    for layer in layers:
        _check_layer("jax_rnn.stack", layer)
    if not 0.0 <= float(dropout) < 1.0:
        raise ValueError(f"`jax_rnn.stack`: `dropout` must be in [0, 1), got {dropout!r}.")
    return Stack(layers, float(dropout))


def bidirectional(forward: Any, backward: Any = None) -> Bidirectional:
    """A bidirectional layer: ``forward`` over time, ``backward`` over reversed time.

    As in PyTorch's ``bidirectional=True`` and Flax's ``Bidirectional``: the outputs at
    each step are ``[forward_t, backward_t]`` concatenated on the last axis. With
    ``seq_lengths``, the backward direction reads each sequence's valid prefix reversed,
    so padding never reaches it.

    Args:
        forward: the forward cell.
        backward: the backward cell; the same kind of cell as ``forward`` when ``None``
            (with its own params).

    Returns:
        a :class:`Bidirectional`.

    Example:
        >>> model = jax_rnn.bidirectional(jax_rnn.elman)
        >>> params = model.init(jax.random.key(0), 3, 4)
        >>> final, ys = jax_rnn.unroll(model, params, jnp.ones((6, 2, 3)))
        >>> ys.state.shape, final.forward.shape
        ((6, 2, 8), (2, 4))
    """
    backward = forward if backward is None else backward
    for layer in (forward, backward):
        _check_layer("jax_rnn.bidirectional", layer)
    return Bidirectional(forward, backward)
