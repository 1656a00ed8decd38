"""Weights from and to PyTorch's ``nn.RNN``/``nn.GRU``/``nn.LSTM`` and Keras's recurrent layers.

jax_rnn's built-in cells compute exactly what PyTorch's recurrent modules compute, with
the same gate order; only the weights are stored transposed (``x @ w_cell_input``
rather than ``weight_ih @ x``). This module converts between the two, so that a trained
PyTorch model runs under jax_rnn and back:

| PyTorch (layer `k`; `_reverse` for the backward direction) | jax_rnn |
|---|---|
| `weight_ih_l{k}`, `(G*H, I)` | `w_cell_input = weight_ih.T`, `(I, G*H)` |
| `weight_hh_l{k}`, `(G*H, H)` | `w_cell_state = weight_hh.T`, `(H, G*H)` |
| `bias_ih_l{k}`, `(G*H,)` | `b_cell_input` (`b_cell` for `nn.RNN`) |
| `bias_hh_l{k}`, `(G*H,)` | `b_cell_state` |
| `bidirectional=True` | `bidirectional(cell)`, `BidirectionalParams(forward, backward)` |
| `num_layers > 1`, `dropout` | `stack([...], dropout=dropout)`, a tuple of per-layer params |
| `h_0`/`h_n` (and `c_0`/`c_n`), `(L*D, B, H)` | the carry: `from_torch_state`, `to_torch_state` |
| `batch_first=True` | `unroll(..., time_major=False)` |
| a `PackedSequence` of lengths `lengths` | `unroll(..., seq_lengths=lengths)` |

``G`` is 1 for ``nn.RNN``, 3 for ``nn.GRU`` (gates ``r, z, n``) and 4 for ``nn.LSTM``
(gates ``i, f, g, o``). The converted params hold numpy arrays (copies, so later changes
to the PyTorch module do not reach them); every jax function takes them as they are.

Neither torch nor keras is imported here: modules and tensors are used through their
methods (``state_dict()``, ``.detach().cpu().numpy()``) and Keras weights are the plain
arrays of ``layer.get_weights()``.

Example:
    A state dict as ``nn.GRU(2, 3).state_dict()`` would return it (numpy arrays work
    as well as tensors):

    >>> from jax_rnn import interop
    >>> rng = np.random.default_rng(0)
    >>> sd = {"weight_ih_l0": rng.normal(size=(9, 2)), "weight_hh_l0": rng.normal(size=(9, 3)),
    ...       "bias_ih_l0": rng.normal(size=9), "bias_hh_l0": rng.normal(size=9)}
    >>> model, params = interop.from_torch(sd)
    >>> model is jax_rnn.gru, params.w_cell_input.shape
    (True, (2, 9))
    >>> back = interop.to_torch_state_dict(params)
    >>> all(np.array_equal(back[k], sd[k]) for k in sd)
    True
"""

from __future__ import annotations

import re
from collections.abc import Mapping, Sequence
from typing import Any

import jax.numpy as jnp
import numpy as np

from . import _checks
from ._compose import (
    BidirectionalParams,
    BidirectionalState,
    bidirectional,
    stack,
)
from ._elman import ElmanParams, elman, elman_relu
from ._gru import GRUParams, gru
from ._lstm import LSTMParams, LSTMState, lstm
from ._types import Cell

__all__ = [
    "from_keras",
    "from_torch",
    "from_torch_state",
    "to_torch_state",
    "to_torch_state_dict",
]

_GATES = {1: "RNN", 3: "GRU", 4: "LSTM"}
_KEY = re.compile(r"^(weight_ih|weight_hh|bias_ih|bias_hh|weight_hr)_l(\d+)(_reverse)?$")
# nn.RNNCell / nn.GRUCell / nn.LSTMCell: one layer's keys without the `_l0` suffix.
_CELL_KEYS = ("weight_ih", "weight_hh", "bias_ih", "bias_hh")
_CELL_PARAMS = (ElmanParams, GRUParams, LSTMParams)
_RNN_CELLS = {"tanh": elman, "relu": elman_relu}


# --------------------------------------------------------------------------- PyTorch ->


def _to_numpy(where: str, name: str, value: Any) -> Any:
    """A fresh numpy copy of a torch tensor (duck-typed), jax array or array-like.

    Typed ``Any``: the params NamedTuples annotate their fields as ``jax.Array``, and
    these numpy arrays stand in for them.
    """
    if value is None:
        raise TypeError(f"`{where}`: `{name}` is None, expected an array of floats.")
    out = np.array(_detached(where, name, value), copy=True)
    if not _checks.is_float(out.dtype):
        raise TypeError(
            f"`{where}`: `{name}` has dtype {out.dtype}, expected a floating-point array "
            "(float16, bfloat16, float32 or float64)."
        )
    return out


def _detached(where: str, name: str, value: Any) -> Any:
    """A torch tensor (duck-typed: ``detach`` and ``cpu``) as numpy, anything else as it
    is; also one that requires grad or lives on a GPU."""
    if hasattr(value, "detach") and hasattr(value, "cpu"):
        try:
            return value.detach().cpu().numpy()
        except TypeError as err:  # e.g. bfloat16, which numpy lacks
            raise TypeError(
                f"`{where}`: `{name}` could not be converted to numpy ({err}); cast it "
                "first, e.g. `module.float()` or `tensor.float()`."
            ) from None
    return value


def _state_dict_of(where: str, obj: Any) -> tuple[dict[str, np.ndarray], Any]:
    """``(numpy state dict, module or None)`` from a module or a mapping. A module
    wrapped by ``torch.compile`` (``_orig_mod``) or ``nn.DataParallel`` /
    ``DistributedDataParallel`` (``module``) is unwrapped; the keys of an ``nn.RNNCell``,
    ``nn.GRUCell`` or ``nn.LSTMCell`` get the ``_l0`` suffix of a one-layer module."""
    if isinstance(obj, type):
        raise TypeError(
            f"`{where}`: got the class {obj.__name__}, expected a module (an instance, "
            f"e.g. `{obj.__name__}(input_size, hidden_size)`) or its state dict."
        )
    while True:
        if hasattr(obj, "_orig_mod"):  # torch.compile's OptimizedModule
            obj = obj._orig_mod
        elif type(obj).__name__ in ("DataParallel", "DistributedDataParallel") and hasattr(
                obj, "module"):
            obj = obj.module
        else:
            break
    module = None
    if callable(getattr(obj, "state_dict", None)):
        module, obj = obj, obj.state_dict()
    if not isinstance(obj, Mapping):
        raise TypeError(
            f"`{where}`: expected an nn.RNN/nn.GRU/nn.LSTM module or its state dict (a "
            f"mapping from names to tensors or arrays), got {type(obj).__name__}."
        )
    sd = {str(k): _to_numpy(where, str(k), v) for k, v in obj.items()}
    if sd and set(sd) <= set(_CELL_KEYS) and {"weight_ih", "weight_hh"} <= set(sd):
        sd = {f"{k}_l0": v for k, v in sd.items()}
    return sd, module


def _expected_keys(num_layers: int, directions: int, bias: bool) -> list[str]:
    names = ["weight_ih", "weight_hh"] + (["bias_ih", "bias_hh"] if bias else [])
    suffixes = ["", "_reverse"][:directions]
    return [f"{n}_l{k}{s}" for k in range(num_layers) for s in suffixes for n in names]


def _prefix_hint(keys: Sequence[str], module: bool) -> str:
    """How to pick one recurrent module's keys out of a bigger state dict, if ``keys``
    hold any (a whole model's state dict, or a model passed as the module)."""
    prefixes = sorted({t[0] + "." for t in (k.rsplit(".", 1) for k in keys if "." in k)
                       if _KEY.match(t[1])})
    if not prefixes:
        return ""
    if module:
        paths = " or ".join(f"`from_torch(model.{p[:-1]})`" for p in prefixes)
        return f"; this is a bigger model: pass its recurrent module, {paths}"
    p = prefixes[0]
    which = f" (one of {prefixes})" if len(prefixes) > 1 else ""
    return (
        f"; the recurrent module's keys carry a prefix{which}: pick them out, "
        f"`{{k[len({p!r}):]: v for k, v in sd.items() if k.startswith({p!r})}}`"
    )


def _structure(where: str, sd: dict[str, np.ndarray],
               module: bool = False) -> tuple[str, int, int, bool, int, int]:
    """``(kind, num_layers, directions, bias, input_size, hidden_size)`` of a state dict
    (``module``: it came from a module, for the messages)."""
    keys = list(sd)
    if any(m and m.group(1) == "weight_hr" for m in map(_KEY.match, keys)):
        raise ValueError(
            f"`{where}`: the state dict has `weight_hr_l*` keys: an nn.LSTM with "
            "proj_size > 0 (a projected LSTM), whose state h has a different size than c. "
            "jax_rnn's LSTM has no projection; rebuild the module with proj_size=0."
        )
    absent = [k for k in ("weight_ih_l0", "weight_hh_l0") if k not in sd]
    if absent:
        raise ValueError(
            f"`{where}`: the state dict has no {' and no '.join(f'`{k}`' for k in absent)}; "
            f"found keys {keys}; expected those of nn.RNN/nn.GRU/nn.LSTM: weight_ih_l{{k}}, "
            f"weight_hh_l{{k}}, bias_ih_l{{k}}, bias_hh_l{{k}} (and `_reverse` "
            f"versions for a bidirectional module), or of nn.RNNCell/nn.GRUCell/nn.LSTMCell"
            f"{_prefix_hint(keys, module)}."
        )
    for name in ("weight_ih_l0", "weight_hh_l0"):
        if sd[name].ndim != 2:
            raise ValueError(
                f"`{where}`: `{name}` has shape {sd[name].shape}; expected a matrix, "
                "(G*H, I) for weight_ih_l0 and (G*H, H) for weight_hh_l0."
            )
    w_hh = sd["weight_hh_l0"]
    rows, cols = w_hh.shape if w_hh.ndim == 2 else (0, 0)
    if cols == 0 or rows % cols or rows // cols not in _GATES:
        raise ValueError(
            f"`{where}`: `weight_hh_l0` has shape {w_hh.shape}; expected (G*H, H) with G = 1 "
            "(nn.RNN), 3 (nn.GRU) or 4 (nn.LSTM)."
        )
    hidden = w_hh.shape[1]
    gates = w_hh.shape[0] // hidden
    matches = [_KEY.match(k) for k in keys]
    layers = [int(m.group(2)) for m in matches if m]
    num_layers = max(layers) + 1
    directions = 2 if any(m and m.group(3) for m in matches) else 1
    bias = any(m and m.group(1).startswith("bias") for m in matches)
    expected = _expected_keys(num_layers, directions, bias)
    missing = [k for k in expected if k not in sd]
    unexpected = [k for k in keys if k not in expected]
    if missing or unexpected:
        what = "bidirectional " if directions == 2 else ""
        what += f"{_GATES[gates]} with {num_layers} layer(s) and bias={bias}"
        parts = []
        if missing:
            parts.append(f"missing keys {missing}")
        if unexpected:
            parts.append(f"unexpected keys {unexpected}")
        raise ValueError(
            f"`{where}`: the state dict looks like a {what} (from its keys), but has "
            f"{' and '.join(parts)}; expected exactly {expected}"
            f"{_prefix_hint(unexpected, module)}."
        )
    input_size = sd["weight_ih_l0"].shape[-1]
    for name in expected:
        k, layer_input = int(_KEY.match(name).group(2)), input_size  # type: ignore[union-attr]
        if k > 0:
            layer_input = directions * hidden
        want = {
            "weight_ih": (gates * hidden, layer_input),
            "weight_hh": (gates * hidden, hidden),
        }.get(name.split("_l")[0], (gates * hidden,))
        if sd[name].shape != want:
            reads = (f"input size {input_size} (from weight_ih_l0)" if k == 0 else
                     f"layer {k} reading layer {k - 1}'s {layer_input} features "
                     f"({directions} direction(s) x hidden size {hidden})")
            raise ValueError(
                f"`{where}`: `{name}` has shape {sd[name].shape}, expected {want} for a "
                f"{_GATES[gates]} with hidden size {hidden} (from weight_hh_l0) and "
                f"{reads}."
            )
    return _GATES[gates], num_layers, directions, bias, input_size, hidden


def _module_kind(where: str, module: Any, kind: str) -> str | None:
    """Checks the module's attributes against the weights; returns its nonlinearity."""
    mode = getattr(module, "mode", None)
    if mode is not None:
        mode_kind = {"RNN_TANH": "RNN", "RNN_RELU": "RNN"}.get(mode, mode)
        if mode_kind != kind:
            raise ValueError(
                f"`{where}`: the module's mode is {mode!r} but its weights are those of a {kind}."
            )
    if getattr(module, "proj_size", 0):
        raise ValueError(
            f"`{where}`: the module has proj_size={module.proj_size}; jax_rnn's LSTM has "
            "no projection. Rebuild it with proj_size=0."
        )
    if kind == "RNN":
        if mode in ("RNN_TANH", "RNN_RELU"):
            return mode[4:].lower()
        return getattr(module, "nonlinearity", None)
    return None


def _cell_params(kind: str, sd: dict[str, Any], suffix: str, bias: bool) -> Any:
    def get(name: str) -> Any:
        return sd[name + suffix] if bias else None

    w_ih: Any = np.ascontiguousarray(sd["weight_ih" + suffix].T)
    w_hh: Any = np.ascontiguousarray(sd["weight_hh" + suffix].T)
    b_ih, b_hh = get("bias_ih"), get("bias_hh")
    if kind == "RNN":
        return ElmanParams(w_cell_state=w_hh, w_cell_input=w_ih, b_cell=b_ih, b_cell_state=b_hh)
    params_type = GRUParams if kind == "GRU" else LSTMParams
    return params_type(w_cell_input=w_ih, w_cell_state=w_hh, b_cell_input=b_ih, b_cell_state=b_hh)


def from_torch(module_or_state_dict: Any, *, nonlinearity: str | None = None) -> tuple[Any, Any]:
    """Converts a PyTorch ``nn.RNN``, ``nn.GRU`` or ``nn.LSTM`` to a jax_rnn model.

    The structure comes from the state dict's keys and shapes: the kind from
    ``weight_hh_l0`` (``(H, H)``: ``nn.RNN``; ``(3H, H)``: ``nn.GRU``; ``(4H, H)``:
    ``nn.LSTM``), the number of layers from the ``_l{k}`` suffixes, bidirectionality
    from ``_reverse`` keys, and ``bias`` from the presence of ``bias_*`` keys. Every
    weight is transposed (``w_cell_input = weight_ih.T``, ``w_cell_state =
    weight_hh.T``); biases are kept as they are (``nn.RNN``: ``b_cell = bias_ih``,
    ``b_cell_state = bias_hh``). The cells get no readout (``w_output=None``): their
    output is the hidden state, as PyTorch's is.

    Run the result with :func:`jax_rnn.unroll`; a ``PackedSequence`` is
    ``seq_lengths=lengths.numpy()``, and :func:`from_torch_state`/:func:`to_torch_state`
    translate ``h_0``/``h_n``. **A module built with ``batch_first=True`` needs
    ``unroll(..., time_major=False)``**: the params do not record the layout, and a
    batch-major input read as time-major runs without an error, wrongly.

    Args:
        module_or_state_dict: the module (anything with ``state_dict()``; its ``mode``,
            ``nonlinearity``, ``num_layers``, ``bidirectional`` and ``dropout``
            attributes are used when present; one wrapped by ``torch.compile`` or
            ``nn.DataParallel`` is unwrapped), or its state dict, with tensors or numpy
            arrays as values. An ``nn.RNNCell``, ``nn.GRUCell`` or ``nn.LSTMCell`` (keys
            ``weight_ih``, ``weight_hh``, ``bias_ih``, ``bias_hh``) converts as a
            one-layer module.
        nonlinearity: ``"tanh"`` or ``"relu"``, for an ``nn.RNN`` given as a state dict
            (which does not record it); defaults to ``"tanh"``. A module's own setting
            is used when given a module.

    Returns:
        ``(model, params)``: for one unidirectional layer the cell
        (:data:`jax_rnn.elman`, :data:`jax_rnn.elman_relu`, :data:`jax_rnn.gru` or
        :data:`jax_rnn.lstm`) and its params; for one bidirectional layer
        ``jax_rnn.bidirectional(cell)`` and ``BidirectionalParams(forward, backward)``;
        for ``num_layers > 1`` ``jax_rnn.stack(layers, dropout=module.dropout)`` (0 for
        a state dict) and a tuple of the layers' params.

    Raises:
        ValueError: a projected LSTM (``proj_size > 0``, ``weight_hr_*`` keys), missing,
            unknown or misshapen keys, a nonlinearity other than tanh/relu, or module
            attributes that contradict the weights.
        TypeError: something that is neither a module nor a mapping, or non-float
            values.

    Example:
        >>> from jax_rnn import interop
        >>> rng = np.random.default_rng(0)
        >>> sd = {name: rng.normal(size=shape) for name, shape in [  # nn.RNN(2, 3, bias=False,
        ...     ("weight_ih_l0", (3, 2)), ("weight_hh_l0", (3, 3)),    #        num_layers=2)
        ...     ("weight_ih_l1", (3, 3)), ("weight_hh_l1", (3, 3))]}
        >>> model, params = interop.from_torch(sd, nonlinearity="relu")
        >>> len(params), params[1].b_cell
        (2, None)
        >>> np.array_equal(params[0].w_cell_input, sd["weight_ih_l0"].T)
        True
        >>> final, ys = jax_rnn.unroll(model, params, np.ones((4, 2)))  # (time, features)
        >>> ys.output.shape, final[1].shape
        ((4, 3), (3,))
    """
    where = "jax_rnn.interop.from_torch"
    sd, module = _state_dict_of(where, module_or_state_dict)
    kind, num_layers, directions, bias, _, _ = _structure(where, sd, module is not None)
    module_nonlinearity = None if module is None else _module_kind(where, module, kind)
    if module is not None:
        for attr, value in (("num_layers", num_layers), ("bidirectional", directions == 2)):
            got = getattr(module, attr, value)
            if got != value:
                raise ValueError(
                    f"`{where}`: the module has {attr}={got!r}, but its weights say {value!r}."
                )
    if kind != "RNN":
        if nonlinearity is not None:
            raise ValueError(
                f"`{where}`: `nonlinearity` applies to nn.RNN only, but the weights are "
                f"those of an nn.{kind}; drop the argument."
            )
        cell: Cell = gru if kind == "GRU" else lstm
    else:
        if module_nonlinearity is not None and nonlinearity not in (None, module_nonlinearity):
            raise ValueError(
                f"`{where}`: `nonlinearity={nonlinearity!r}` contradicts the module's "
                f"{module_nonlinearity!r}; drop the argument."
            )
        chosen = module_nonlinearity or nonlinearity or "tanh"
        if chosen not in _RNN_CELLS:
            raise ValueError(
                f"`{where}`: nonlinearity must be 'tanh' or 'relu' (as in nn.RNN), got {chosen!r}."
            )
        cell = _RNN_CELLS[chosen]
    suffixes = ["", "_reverse"][:directions]
    layers = [
        [_cell_params(kind, sd, f"_l{k}{s}", bias) for s in suffixes] for k in range(num_layers)
    ]
    if directions == 2:
        layer_model: Any = bidirectional(cell)
        layer_params: list[Any] = [BidirectionalParams(*pair) for pair in layers]
    else:
        layer_model, layer_params = cell, [pair[0] for pair in layers]
    if num_layers == 1:
        return layer_model, layer_params[0]
    dropout = float(getattr(module, "dropout", 0.0) or 0.0)
    return stack([layer_model] * num_layers, dropout=dropout), tuple(layer_params)


# --------------------------------------------------------------------------- -> PyTorch


def _layers_of(where: str, params: Any) -> list[list[Any]]:
    """Per layer, per direction, the cell params; checks they make one torch module."""
    if isinstance(params, _CELL_PARAMS + (BidirectionalParams,)):
        items = [params]
    elif isinstance(params, tuple | list) and not hasattr(params, "_fields"):
        items = list(params)
        if not items:
            raise ValueError(f"`{where}`: `params` is an empty sequence; no layers to export.")
    else:
        raise TypeError(
            f"`{where}`: `params` must be ElmanParams, GRUParams, LSTMParams, "
            f"BidirectionalParams of those, or a tuple of layers of them (a stack); got "
            f"{type(params).__name__}."
        )
    layers = []
    for k, item in enumerate(items):
        if isinstance(item, BidirectionalParams):
            layers.append([item.forward, item.backward])
        elif isinstance(item, _CELL_PARAMS):
            layers.append([item])
        else:
            raise TypeError(
                f"`{where}`: layer {k} of `params` is {type(item).__name__}; each layer must "
                "be ElmanParams, GRUParams, LSTMParams or BidirectionalParams of those "
                "(nested stacks have no nn.RNN equivalent)."
            )
    cells = [c for layer in layers for c in layer]
    if len({len(layer) for layer in layers}) > 1:
        raise ValueError(
            f"`{where}`: some layers are bidirectional and some are not; a PyTorch module is "
            "one or the other throughout."
        )
    kinds = {type(c) for c in cells}
    if len(kinds) > 1:
        raise ValueError(
            f"`{where}`: the layers mix {sorted(t.__name__ for t in kinds)}; a PyTorch "
            "module has one kind of cell throughout."
        )
    for k, layer in enumerate(layers):
        for d, c in enumerate(layer):
            if c.w_output is not None or c.b_output is not None:
                place = f"layer {k}" + (f", direction {d}" if len(layer) == 2 else "")
                raise ValueError(
                    f"`{where}`: {place} has a readout (w_output/b_output), but "
                    "nn.RNN/nn.GRU/nn.LSTM have none: their output is the hidden state. "
                    "Drop it (`params._replace(w_output=None, b_output=None)`) and, to keep "
                    "it, export it as an nn.Linear with weight = w_output.T and bias = "
                    "b_output."
                )
    hidden = {int(np.shape(c.w_cell_state)[0]) for c in cells}
    if len(hidden) > 1:
        raise ValueError(
            f"`{where}`: the cells have different hidden sizes {sorted(hidden)}; a PyTorch "
            "module has one hidden_size."
        )
    (h,) = hidden
    for k, layer in enumerate(layers[1:], start=1):
        want = h * len(layer)
        for c in layer:
            got = int(np.shape(c.w_cell_input)[0])
            if got != want:
                raise ValueError(
                    f"`{where}`: layer {k} takes inputs of size {got}, but a PyTorch module "
                    f"feeds it the previous layer's {want} outputs."
                )
    return layers


def _biases(c: Any) -> tuple[Any, Any]:
    if isinstance(c, ElmanParams):
        return c.b_cell, c.b_cell_state
    return c.b_cell_input, c.b_cell_state


def _np_copy(value: Any) -> np.ndarray:
    return np.array(value, copy=True)


def to_torch_state_dict(params: Any) -> dict[str, np.ndarray]:
    """The state dict of the PyTorch module that computes what ``params`` compute.

    The inverse of :func:`from_torch`: ``to_torch_state_dict(from_torch(sd)[1])`` has
    the same keys, in the same order, and the same arrays as ``sd``. The structure comes
    from the params' types: :class:`~jax_rnn.ElmanParams` (``nn.RNN``),
    :class:`~jax_rnn.GRUParams` (``nn.GRU``), :class:`~jax_rnn.LSTMParams`
    (``nn.LSTM``); ``BidirectionalParams`` adds the ``_reverse`` keys; a tuple is one
    layer per entry.

    PyTorch keeps two biases per cell, all or none for the whole module: a missing bias
    (``None``, e.g. an Elman cell's ``b_cell_state``) is exported as zeros when any other
    bias is set, and with no bias anywhere the state dict has no ``bias_*`` keys (build
    the module with ``bias=False``). A nonlinearity is not part of the weights: an
    :data:`jax_rnn.elman_relu` model needs ``nn.RNN(..., nonlinearity="relu")``.

    Args:
        params: the params of a cell, of a bidirectional layer, or a tuple of layers'.
            Gradients of a loss with respect to such params convert as well.

    Returns:
        ``{name: numpy array}`` with PyTorch's names (``weight_ih_l{k}[_reverse]``,
        ``weight_hh_...``, ``bias_ih_...``, ``bias_hh_...``). Load it with
        ``module.load_state_dict({k: torch.from_numpy(v) for k, v in sd.items()})``.

    Raises:
        ValueError: a readout (``w_output``/``b_output``; PyTorch's recurrent modules
            have none: drop it, or export it as an ``nn.Linear`` with ``weight =
            w_output.T`` and ``bias = b_output``), layers that mix cell kinds, hidden
            sizes or directions, or inputs that do not chain.
        TypeError: params of another type.

    Example:
        >>> from jax_rnn import interop
        >>> params = jax_rnn.elman.init(jax.random.key(0), 2, 3, None)  # b_cell only
        >>> sd = interop.to_torch_state_dict(params)
        >>> for name, value in sd.items():
        ...     print(name, value.shape)
        weight_ih_l0 (3, 2)
        weight_hh_l0 (3, 3)
        bias_ih_l0 (3,)
        bias_hh_l0 (3,)
        >>> print(sd["bias_hh_l0"])
        [0. 0. 0.]
    """
    where = "jax_rnn.interop.to_torch_state_dict"
    layers = _layers_of(where, params)
    any_bias = any(b is not None for layer in layers for c in layer for b in _biases(c))
    out: dict[str, np.ndarray] = {}
    for k, layer in enumerate(layers):
        for d, c in enumerate(layer):
            suffix = f"_l{k}" + ("_reverse" if d else "")
            out["weight_ih" + suffix] = np.ascontiguousarray(_np_copy(c.w_cell_input).T)
            out["weight_hh" + suffix] = np.ascontiguousarray(_np_copy(c.w_cell_state).T)
            if any_bias:
                rows = out["weight_hh" + suffix].shape[0]
                dtype = out["weight_hh" + suffix].dtype
                for name, b in zip(("bias_ih", "bias_hh"), _biases(c), strict=True):
                    out[name + suffix] = np.zeros(rows, dtype) if b is None else _np_copy(b)
    return out


# --------------------------------------------------------------------------- states


def _is_lstm(layers: list[list[Any]]) -> bool:
    return isinstance(layers[0][0], LSTMParams)


def from_torch_state(params: Any, hidden: Any) -> Any:
    """PyTorch's initial state ``h_0`` (or ``(h_0, c_0)``) as a jax_rnn ``state0``.

    PyTorch stacks the states of all layers and directions on a leading axis of size
    ``num_layers * num_directions``, layer-major (entry ``k * D + d`` is layer ``k``,
    direction ``d``). jax_rnn nests them instead: an array (``LSTMState(h, c)`` for an
    LSTM) per cell, ``BidirectionalState(forward, backward)`` per bidirectional layer
    and a tuple over the layers of a stack.

    Args:
        params: the params :func:`from_torch` returned (they give the structure).
        hidden: ``h_0`` shaped ``(L*D, *batch, H)``, or ``(h_0, c_0)`` for an LSTM; numpy,
            jax, torch tensors (also ones that require grad) or anything
            ``jnp.asarray`` takes. PyTorch keeps this layout with ``batch_first=True``
            too.

    Returns:
        the carry to pass as ``unroll(..., state0=...)``.

    Raises:
        ValueError: a leading axis other than ``L*D``, a missing/extra ``c_0``, or
            ``h_0`` and ``c_0`` of different shapes.

    Example:
        >>> from jax_rnn import interop
        >>> params = jax_rnn.GRUParams(np.zeros((2, 6)), np.zeros((2, 6)), None, None)
        >>> state0 = interop.from_torch_state(params, np.ones((1, 5, 2)))
        >>> state0.shape
        (5, 2)
    """
    where = "jax_rnn.interop.from_torch_state"
    layers = _layers_of(where, params)
    lstm_params = _is_lstm(layers)
    if lstm_params:
        if not (isinstance(hidden, tuple | list) and len(hidden) == 2):
            raise ValueError(f"`{where}`: an LSTM needs `hidden=(h_0, c_0)`, got one array.")
        arrays = [jnp.asarray(_detached(where, name, a))
                  for name, a in zip(("h_0", "c_0"), hidden, strict=True)]
    else:
        if isinstance(hidden, tuple | list):
            raise ValueError(f"`{where}`: only an LSTM has a cell state; pass `hidden=h_0` alone.")
        arrays = [jnp.asarray(_detached(where, "h_0", hidden))]
    n = sum(len(layer) for layer in layers)
    h = int(np.shape(layers[0][0].w_cell_state)[0])
    for name, a in zip(("h_0", "c_0"), arrays, strict=False):
        if a.ndim < 2 or a.shape[0] != n or a.shape[-1] != h:
            raise ValueError(
                f"`{where}`: `{name}` has shape {a.shape}, expected ({n}, *batch, {h}): "
                f"num_layers * num_directions = {n} states of size {h}."
            )
    if len(arrays) == 2 and arrays[0].shape != arrays[1].shape:
        raise ValueError(
            f"`{where}`: `h_0` has shape {arrays[0].shape} but `c_0` {arrays[1].shape}; "
            "an LSTM's two states have the same shape (as nn.LSTM requires)."
        )
    index = 0
    out = []
    for layer in layers:
        carries = []
        for _ in layer:
            if lstm_params:
                carries.append(LSTMState(arrays[0][index], arrays[1][index]))
            else:
                carries.append(arrays[0][index])
            index += 1
        out.append(BidirectionalState(*carries) if len(layer) == 2 else carries[0])
    if isinstance(params, tuple | list) and not hasattr(params, "_fields"):
        return tuple(out)
    return out[0]


def to_torch_state(params: Any, carry: Any) -> Any:
    """A jax_rnn final carry in PyTorch's layout: ``h_n``, or ``(h_n, c_n)`` for an LSTM.

    The inverse of :func:`from_torch_state`; differentiable, so losses on PyTorch's
    ``h_n`` can be written the same way under :func:`jax.grad`.

    Args:
        params: the params the carry belongs to (they give the structure).
        carry: the final carry :func:`jax_rnn.unroll` returned.

    Returns:
        ``h_n`` shaped ``(L*D, *batch, H)`` (entry ``k * D + d`` is layer ``k``,
        direction ``d``), or ``(h_n, c_n)`` for an LSTM.

    Example:
        >>> from jax_rnn import interop
        >>> params = jax_rnn.elman.init(jax.random.key(0), 2, 3, None)
        >>> final, ys = jax_rnn.unroll(jax_rnn.elman, params, np.ones((4, 5, 2)))
        >>> interop.to_torch_state(params, final).shape
        (1, 5, 3)
    """
    where = "jax_rnn.interop.to_torch_state"
    layers = _layers_of(where, params)
    is_stack = isinstance(params, tuple | list) and not hasattr(params, "_fields")
    layer_carries = list(carry) if is_stack else [carry]
    if len(layer_carries) != len(layers):
        raise ValueError(
            f"`{where}`: `carry` has {len(layer_carries)} layers but `params` has {len(layers)}."
        )
    cells, sizes, owners = [], [], []
    for k, (layer, c) in enumerate(zip(layers, layer_carries, strict=True)):
        if len(layer) == 2 and not (isinstance(c, tuple) and len(c) == 2):
            raise TypeError(
                f"`{where}`: layer {k} is bidirectional; its carry must be "
                f"BidirectionalState(forward, backward), got {type(c).__name__}."
            )
        cells.extend([c[0], c[1]] if len(layer) == 2 else [c])
        sizes.extend(p.w_cell_state.shape[0] for p in layer)
        owners.extend([k] * len(layer))
    lstm = _is_lstm(layers)
    for c, hidden, k in zip(cells, sizes, owners, strict=True):
        if lstm:
            leaves = tuple(c) if isinstance(c, tuple) and len(c) == 2 else ()
        else:
            leaves = () if isinstance(c, tuple | list) else (c,)
        shapes = [getattr(a, "shape", None) for a in leaves]
        if not leaves or any(s is None or len(s) == 0 or s[-1] != hidden for s in shapes):
            what = "an LSTMState(h, c)" if lstm else "one array"
            raise TypeError(
                f"`{where}`: the carry of layer {k} must be {what} shaped (*batch, {hidden}), "
                f"as `jax_rnn.unroll` returns for these params; got {type(c).__name__}"
                + (f" of shapes {shapes}" if leaves else "") + "."
            )
    if lstm:
        return (jnp.stack([c[0] for c in cells]), jnp.stack([c[1] for c in cells]))
    return jnp.stack(cells)


# --------------------------------------------------------------------------- Keras ->


def _keras_arrays(where: str, kind: str, weights: Any, gates: int) -> list[Any]:
    if not isinstance(weights, Sequence) or len(weights) not in (2, 3):
        n = len(weights) if isinstance(weights, Sequence) else type(weights).__name__
        raise ValueError(
            f"`{where}`: `weights` for a {kind} must be the list `layer.get_weights()` "
            f"returns: [kernel, recurrent_kernel, bias] (or [kernel, recurrent_kernel] "
            f"with use_bias=False); got {n} entries."
        )
    arrays = [_to_numpy(where, f"weights[{i}]", w) for i, w in enumerate(weights)]
    kernel, recurrent = arrays[0], arrays[1]
    if recurrent.ndim != 2 or recurrent.shape[1] != gates * recurrent.shape[0]:
        raise ValueError(
            f"`{where}`: the recurrent kernel (weights[1]) has shape {recurrent.shape}; a "
            f"{kind} has one shaped (units, {gates} * units)."
        )
    if kernel.ndim != 2 or kernel.shape[1] != recurrent.shape[1]:
        raise ValueError(
            f"`{where}`: the kernel (weights[0]) has shape {kernel.shape}; expected "
            f"(input_dim, {recurrent.shape[1]}) to match the recurrent kernel."
        )
    return arrays


def _zrh_to_rzn(a: np.ndarray) -> Any:
    z, r, h = np.split(a, 3, axis=-1)
    return np.ascontiguousarray(np.concatenate([r, z, h], axis=-1))


def from_keras(
    kind: str, weights: Sequence[Any], *, reset_after: bool = True, activation: str = "tanh"
) -> tuple[Cell, Any]:
    r"""Converts the weights of a Keras ``SimpleRNN``, ``GRU`` or ``LSTM`` layer.

    Keras stores its kernels the way jax_rnn does (``x @ kernel``), so only the gate
    order and the biases need converting:

    * ``SimpleRNN``: ``[kernel (I, H), recurrent_kernel (H, H), bias (H,)]`` become
      ``w_cell_input``, ``w_cell_state``, ``b_cell``.
    * ``GRU``: Keras orders the gates **z, r, h** (update, reset, candidate); jax_rnn
      (like PyTorch) orders them **r, z, n**, so the column blocks are swapped.
      ``kernel (I, 3H)`` and ``recurrent_kernel (H, 3H)`` become ``w_cell_input`` and
      ``w_cell_state``. With ``reset_after=True`` (the default since TensorFlow 2)
      ``bias`` is ``(2, 3H)``: row 0 the input bias (``b_cell_input``), row 1 the
      recurrent bias (``b_cell_state``), and the candidate is
      :math:`\tanh(x W_h + b^{in}_h + r \odot (h U_h + b^{rec}_h))` exactly as
      PyTorch's. With ``reset_after=False`` (Keras 1/2's default) the candidate is
      :math:`\tanh(x W_h + (r \odot h) U_h + b_h)`: the reset gate is applied before
      the recurrent matmul, an equation PyTorch's GRU, and so jax_rnn's, cannot
      express; such weights are refused.
    * ``LSTM``: Keras orders the gates **i, f, c, o**, the same as PyTorch's
      ``i, f, g, o``; ``kernel (I, 4H)``, ``recurrent_kernel (H, 4H)`` and the single
      ``bias (4H,)`` become ``w_cell_input``, ``w_cell_state`` and ``b_cell_input``
      (``b_cell_state=None``).

    Layers built with ``use_bias=False`` give two arrays instead of three. The gated
    cells use tanh and the logistic sigmoid: Keras's defaults (``activation="tanh"``,
    ``recurrent_activation="sigmoid"``; Keras 2 before TensorFlow 2 defaulted to
    ``"hard_sigmoid"``, which is not supported). ``Bidirectional`` wrappers and stacked
    layers convert one layer at a time; combine the results with
    :func:`jax_rnn.bidirectional` (Keras's ``merge_mode="concat"`` puts forward
    first, as jax_rnn does) and :func:`jax_rnn.stack`. Keras inputs are batch-major:
    unroll them with ``time_major=False``. A layer with ``go_backwards=True`` is
    ``unroll(..., reverse=True)``, except that Keras returns the outputs in processing
    order, reversed in time, where ``unroll`` keeps each at its time index: Keras's
    sequence is ``ys.output[..., ::-1, :]`` (the final states are the same).

    Args:
        kind: ``"SimpleRNN"``, ``"GRU"`` or ``"LSTM"``.
        weights: the list ``layer.get_weights()`` returns (numpy arrays).
        reset_after: the GRU layer's ``reset_after``; only ``True`` is supported.
        activation: the layer's ``activation``: ``"tanh"`` or, for ``SimpleRNN``,
            ``"relu"``.

    Returns:
        ``(cell, params)``: :data:`jax_rnn.elman` (or :data:`jax_rnn.elman_relu`),
        :data:`jax_rnn.gru` or :data:`jax_rnn.lstm`, and params without readout.

    Raises:
        ValueError: an unknown kind or activation, ``reset_after=False``, or arrays of
            the wrong number or shape.

    Example:
        >>> from jax_rnn import interop
        >>> kernel = np.array([[1.0, 2.0, 3.0]])       # GRU, I = H = 1; columns z, r, h
        >>> recurrent = np.array([[4.0, 5.0, 6.0]])
        >>> bias = np.array([[0.1, 0.2, 0.3], [0.4, 0.5, 0.6]])  # input row, recurrent row
        >>> cell, params = interop.from_keras("GRU", [kernel, recurrent, bias])
        >>> print(params.w_cell_input, params.b_cell_state)  # columns r, z, n
        [[2. 1. 3.]] [0.5 0.4 0.6]
    """
    where = "jax_rnn.interop.from_keras"
    if kind not in ("SimpleRNN", "GRU", "LSTM"):
        raise ValueError(f"`{where}`: `kind` must be 'SimpleRNN', 'GRU' or 'LSTM', got {kind!r}.")
    if kind == "SimpleRNN":
        if activation not in _RNN_CELLS:
            raise ValueError(
                f"`{where}`: a SimpleRNN's activation must be 'tanh' or 'relu', got "
                f"{activation!r}; for another, convert with activation='tanh' and run the "
                "params with `jax_rnn.make_elman(fn)` instead."
            )
    elif activation != "tanh":
        raise ValueError(
            f"`{where}`: jax_rnn's {kind} uses tanh; a Keras {kind} with "
            f"activation={activation!r} has no jax_rnn equivalent."
        )
    if kind == "GRU" and not reset_after:
        raise ValueError(
            f"`{where}`: a Keras GRU with reset_after=False applies the reset gate before "
            "the recurrent matmul (tanh(x W_h + (r * h) U_h + b_h)), an equation PyTorch's "
            "GRU, and so jax_rnn's, cannot express. Only reset_after=True (the TF2 default: "
            "tanh(x W_h + b_h + r * (h U_h + b'_h))) converts; retrain with it."
        )
    gates = {"SimpleRNN": 1, "GRU": 3, "LSTM": 4}[kind]
    arrays = _keras_arrays(where, kind, weights, gates)
    kernel, recurrent = arrays[0], arrays[1]
    bias = arrays[2] if len(arrays) == 3 else None
    width = recurrent.shape[1]
    if kind == "SimpleRNN":
        if bias is not None and bias.shape != (width,):
            raise ValueError(
                f"`{where}`: the bias (weights[2]) has shape {bias.shape}, expected ({width},)."
            )
        return _RNN_CELLS[activation], ElmanParams(
            w_cell_state=recurrent, w_cell_input=kernel, b_cell=bias
        )
    if kind == "LSTM":
        if bias is not None and bias.shape != (width,):
            raise ValueError(
                f"`{where}`: the bias (weights[2]) has shape {bias.shape}, expected ({width},)."
            )
        return lstm, LSTMParams(
            w_cell_input=kernel, w_cell_state=recurrent, b_cell_input=bias, b_cell_state=None
        )
    b_input = b_state = None
    if bias is not None:
        if bias.shape == (width,):
            raise ValueError(
                f"`{where}`: the GRU bias has shape {bias.shape}, that of a layer with "
                "reset_after=False, which PyTorch's GRU, and so jax_rnn's, cannot express "
                "(the reset gate applies before the recurrent matmul)."
            )
        if bias.shape != (2, width):
            raise ValueError(
                f"`{where}`: the GRU bias (weights[2]) has shape {bias.shape}, expected "
                f"(2, {width}) (input and recurrent biases, reset_after=True)."
            )
        b_input, b_state = _zrh_to_rzn(bias[0]), _zrh_to_rzn(bias[1])
    return gru, GRUParams(
        w_cell_input=_zrh_to_rzn(kernel),
        w_cell_state=_zrh_to_rzn(recurrent),
        b_cell_input=b_input,
        b_cell_state=b_state,
    )
