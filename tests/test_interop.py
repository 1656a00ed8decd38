"""jax_rnn.interop against PyTorch (golden fixtures and live modules) and Keras's equations.

* Golden fixtures: ``tests/data/torch_*.npz``, written by
  ``scripts/make_torch_fixtures.py`` from float64 ``nn.RNN``/``nn.GRU``/``nn.LSTM``
  modules (1 and 2 layers, uni- and bidirectional), hold the inputs, PyTorch's outputs,
  final states and the gradients of a fixed loss. They need no torch to check.
* Live modules: the same comparison on freshly drawn modules, when torch is importable
  (only those tests are skipped without it).
* Keras: ``from_keras`` against a numpy loop written from Keras's documented equations,
  in Keras's own gate order, so a wrong reordering cannot pass; against Keras's own
  numbers in golden fixtures, ``tests/data/keras_*.npz``, written by
  ``scripts/make_keras_fixtures.py`` (Keras 3, JAX backend, float32: ``SimpleRNN`` tanh
  and relu, ``GRU``, ``LSTM``, with and without bias, ``go_backwards`` False and True);
  and against live Keras layers when keras is importable.
"""

from __future__ import annotations

import functools
import os
import pathlib
import re
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

import jax_rnn
from jax_rnn import interop

DATA = pathlib.Path(__file__).resolve().parent / "data"
FIXTURES = sorted(DATA.glob("torch_*.npz"))
KINDS = ("rnn_tanh", "rnn_relu", "gru", "lstm")
KERAS_FIXTURES = sorted(DATA.glob("keras_*.npz"))
KERAS_TAGS = ("simple_rnn_tanh", "simple_rnn_relu", "gru", "lstm")
KERAS_RUNS = ("forward", "forward_state0", "go_backwards", "go_backwards_state0")
# Keras 3.15's variables meet numpy 2's __array__ protocol (not our concern).
_KERAS_WARNING = "ignore:__array__ implementation doesn't accept a copy keyword:DeprecationWarning"


def _load(path: pathlib.Path) -> dict[str, np.ndarray]:
    with np.load(path) as f:
        return {k: f[k] for k in f.files}


def _state_dict(fx: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
    return {k[3:]: v for k, v in fx.items() if k.startswith("sd/")}


def _nonlinearity(fx: dict[str, np.ndarray]) -> str | None:
    return str(fx["meta/nonlinearity"]) or None


def test_every_fixture_is_there():
    names = {p.name for p in FIXTURES}
    want = {f"torch_{k}_l{n}_{d}.npz" for k in KINDS for n in (1, 2) for d in ("uni", "bi")}
    assert names == want, "regenerate with `python scripts/make_torch_fixtures.py`"
    assert sum(p.stat().st_size for p in FIXTURES) < 300_000


def _assert_tree_equal(a, b):
    """Same pytree structure (None fields included), same dtypes, bitwise-equal arrays."""
    assert jax.tree.structure(a) == jax.tree.structure(b)
    for x, y in zip(jax.tree.leaves(a), jax.tree.leaves(b), strict=True):
        assert np.asarray(x).dtype == np.asarray(y).dtype
        np.testing.assert_array_equal(np.asarray(x), np.asarray(y))


def _assert_sd_equal(got: dict, want: dict):
    assert list(got) == list(want)
    for k in want:
        assert got[k].dtype == want[k].dtype, k
        assert got[k].shape == want[k].shape, k
        np.testing.assert_array_equal(got[k], want[k], err_msg=k)


# --------------------------------------------------------------------------- the model


_CELLS = {"elman": (1, "ElmanParams"), "gru": (3, "GRUParams"), "lstm": (4, "LSTMParams")}


def _cell_params(kind, i, h, *, seed=0, dtype=np.float64, readout=None, biases=(True, True)):
    """Cell params drawn with numpy (no jax compilation), PyTorch-style: both biases."""
    rng = np.random.default_rng(seed)
    gates, name = _CELLS[kind]

    def u(*shape) -> Any:  # the params annotate jax.Array; numpy arrays stand in
        return rng.uniform(-1, 1, shape).astype(dtype)

    b_in, b_state = (u(gates * h) if on else None for on in biases)
    w_output = None if readout is None else u(h, readout)
    b_output = None if readout is None else u(readout)
    if kind == "elman":
        return jax_rnn.ElmanParams(u(h, h), u(i, h), b_in, w_output, b_output, b_state)
    return getattr(jax_rnn, name)(
        u(i, gates * h), u(h, gates * h), b_in, b_state, w_output, b_output
    )


def _model_params(kind, i, h, *, layers=1, bi=False, stacked=None, **kw):
    """Params of ``layers`` layers (a tuple when stacked), bidirectional or not."""
    out, seed = [], 0
    for k in range(layers):
        size_in = i if k == 0 else h * (2 if bi else 1)
        cells = []
        for _ in range(2 if bi else 1):
            cells.append(_cell_params(kind, size_in, h, seed=seed, **kw))
            seed += 1
        out.append(jax_rnn.BidirectionalParams(*cells) if bi else cells[0])
    return tuple(out) if (stacked if stacked is not None else layers > 1) else out[0]


def _model_and_params(sd, nonlinearity, dtype):
    model, params = interop.from_torch(sd, nonlinearity=nonlinearity)
    return model, jax.tree.map(lambda a: np.asarray(a, dtype), params)


def _run(model, params, xs, lengths, hidden0, weights, *, time_major=True, grads=True):
    """Outputs, PyTorch-layout final states and gradients of the fixtures' loss.

    ``loss = sum(output * w_output) + sum(h_n * w_h_n) [+ sum(c_n * w_c_n)]``, with
    the initial state given (and differentiated) in PyTorch's layout ``(L*D, B, H)``.
    """
    is_lstm = "w_c_n" in weights

    def loss(params, xs, hidden0):
        state0 = None if hidden0 is None else interop.from_torch_state(params, hidden0)
        final, ys = jax_rnn.unroll(
            model, params, xs, state0, seq_lengths=lengths, time_major=time_major
        )
        hidden = interop.to_torch_state(params, final)
        h_n, c_n = hidden if is_lstm else (hidden, None)
        total = jnp.sum(ys.output * weights["w_output"]) + jnp.sum(h_n * weights["w_h_n"])
        if is_lstm:
            total = total + jnp.sum(c_n * weights["w_c_n"])
        return total, (ys.output, h_n, c_n)

    if not grads:
        return (*loss(params, xs, hidden0)[1], None)
    (_, (output, h_n, c_n)), grads_ = jax.value_and_grad(loss, argnums=(0, 1, 2), has_aux=True)(
        params, xs, hidden0
    )
    return output, h_n, c_n, grads_


def _close(got, want, tol, what):
    np.testing.assert_allclose(np.asarray(got), want, rtol=tol, atol=tol, err_msg=what)


# --------------------------------------------------------------------------- golden fixtures


def _weights(fx, run):
    return {k: fx[f"{run}/{k}"] for k in ("w_output", "w_h_n", "w_c_n") if f"{run}/{k}" in fx}


@functools.cache
def _golden(path: pathlib.Path) -> dict:
    """Both runs of one fixture, in float64 with gradients and in float32.

    Compiling dominates the time, so both runs go through one compiled function:
    ``packed`` with the fixture's lengths ([5, 3, 1]) from a zero initial state (PyTorch's
    default), and ``full`` with every length T (an unpacked batch) from PyTorch's random
    ``h0``/``c0``.
    """
    fx = _load(path)
    model, params = _model_and_params(_state_dict(fx), _nonlinearity(fx), np.float64)

    @jax.jit
    def run(params, xs, lengths, hidden0, weights):
        params32 = jax.tree.map(lambda a: a.astype(np.float32), params)
        xs32, hidden32 = jax.tree.map(lambda a: a.astype(np.float32), (xs, hidden0))
        return {
            "float64": _run(model, params, xs, lengths, hidden0, weights),
            "float32": _run(model, params32, xs32, lengths, hidden32, weights, grads=False),
        }

    out = {}
    for name, lengths in (("packed", fx["lengths"]), ("full", np.full_like(fx["lengths"], 5))):
        h0 = fx["full/h0"] if name == "full" else np.zeros_like(fx["full/h0"])
        hidden0 = (h0, fx["full/c0"] if name == "full" else h0) if "full/c0" in fx else h0
        out[name] = jax.tree.map(
            np.asarray, run(params, fx["xs"], lengths, hidden0, _weights(fx, name))
        )
    return out


@pytest.mark.parametrize("run", ["packed", "full"])
@pytest.mark.parametrize("path", FIXTURES, ids=lambda p: p.stem)
def test_golden_float64(path, run):
    """Outputs, h_n/c_n and every gradient match PyTorch's to 1e-10 in float64.

    ``packed``: a PackedSequence of lengths [5, 3, 1] (``unroll(seq_lengths=...)``);
    ``full``: full-length sequences from a random initial state, whose gradient is
    checked too.
    """
    fx = _load(path)
    output, h_n, c_n, (g_params, g_xs, g_hidden0) = _golden(path)[run]["float64"]
    tol = 1e-10
    _close(output, fx[f"{run}/output"], tol, "output")
    _close(h_n, fx[f"{run}/h_n"], tol, "h_n")
    if "packed/c_n" in fx:
        _close(c_n, fx[f"{run}/c_n"], tol, "c_n")
    g_sd = interop.to_torch_state_dict(g_params)
    prefix = f"{run}/grad/"
    assert list(g_sd) == [k[len(prefix) :] for k in fx if k.startswith(prefix)]
    for name, g in g_sd.items():
        _close(g, fx[prefix + name], tol, f"d loss / d {name}")
    _close(g_xs, fx[f"{run}/grad_xs"], tol, "d loss / d xs")
    if run == "full":
        if "full/c0" in fx:
            _close(g_hidden0[0], fx["full/grad_h0"], tol, "d loss / d h0")
            _close(g_hidden0[1], fx["full/grad_c0"], tol, "d loss / d c0")
        else:
            _close(g_hidden0, fx["full/grad_h0"], tol, "d loss / d h0")


@pytest.mark.parametrize("run", ["packed", "full"])
@pytest.mark.parametrize("path", FIXTURES, ids=lambda p: p.stem)
def test_golden_float32(path, run):
    """The same with params, inputs and states cast to float32: outputs and states to 1e-5."""
    fx = _load(path)
    output, h_n, c_n, _ = _golden(path)[run]["float32"]
    assert output.dtype == np.float32 and h_n.dtype == np.float32
    _close(output, fx[f"{run}/output"], 1e-5, "output")
    _close(h_n, fx[f"{run}/h_n"], 1e-5, "h_n")
    if "packed/c_n" in fx:
        _close(c_n, fx[f"{run}/c_n"], 1e-5, "c_n")


@pytest.mark.parametrize("path", FIXTURES, ids=lambda p: p.stem)
def test_golden_structure(path):
    """The model from_torch builds: cell kind, layers, directions."""
    fx = _load(path)
    model, params = interop.from_torch(_state_dict(fx), nonlinearity=_nonlinearity(fx))
    mode, layers = str(fx["meta/mode"]), int(fx["meta/num_layers"])
    cell = {"RNN": jax_rnn.elman, "GRU": jax_rnn.gru, "LSTM": jax_rnn.lstm}[mode]
    if _nonlinearity(fx) == "relu":
        cell = jax_rnn.elman_relu
    layer = jax_rnn.bidirectional(cell) if fx["meta/bidirectional"] else cell
    if layers == 1:
        assert model == layer
        layer_params = [params]
    else:
        assert model == jax_rnn.stack([layer] * layers, dropout=0.0)
        assert type(params) is tuple and len(params) == layers
        layer_params = list(params)
    params_type = {
        "RNN": jax_rnn.ElmanParams,
        "GRU": jax_rnn.GRUParams,
        "LSTM": jax_rnn.LSTMParams,
    }[mode]
    for p in layer_params:
        cells = [p.forward, p.backward] if fx["meta/bidirectional"] else [p]
        for c in cells:
            assert type(c) is params_type and c.w_output is None and c.b_output is None


def test_golden_fixtures_pad_with_noise():
    """Past each length the inputs are noise, not zeros, and PyTorch's packed outputs are
    zeros: matching them proves the padding reaches neither direction."""
    for path in FIXTURES:
        fx = _load(path)
        valid = np.arange(fx["xs"].shape[0])[:, None] < fx["lengths"][None, :]
        assert not valid.all() and np.all(fx["xs"][~valid] != 0), path.name
        assert np.all(fx["packed/output"][~valid] == 0), path.name
        assert np.all(fx["packed/output"][valid].any(axis=-1)), path.name


# --------------------------------------------------------------------------- round trips


@pytest.mark.parametrize("path", FIXTURES, ids=lambda p: p.stem)
@pytest.mark.parametrize("bias", [True, False])
def test_round_trip_state_dict(path, bias):
    fx = _load(path)
    sd = _state_dict(fx)
    if not bias:  # what nn.RNN(..., bias=False).state_dict() holds
        sd = {k: v for k, v in sd.items() if not k.startswith("bias")}
    model, params = interop.from_torch(sd, nonlinearity=_nonlinearity(fx))
    _assert_sd_equal(interop.to_torch_state_dict(params), sd)
    _assert_tree_equal(interop.from_torch(interop.to_torch_state_dict(params))[1], params)
    for leaf in jax.tree.leaves(params):  # copies, not views of the caller's arrays
        assert isinstance(leaf, np.ndarray)
        assert not any(np.shares_memory(leaf, v) for v in sd.values())
    if not bias:
        cells = jax.tree.leaves(params, is_leaf=lambda x: hasattr(x, "w_cell_state"))
        assert all(c[2] is None and c.b_cell_state is None for c in cells)


@pytest.mark.parametrize("kind", ["elman", "gru", "lstm"])
@pytest.mark.parametrize("layers, bi", [(1, False), (1, True), (3, False), (2, True)])
@pytest.mark.parametrize("bias", [True, False])
def test_round_trip_params(kind, layers, bi, bias):
    """from_torch(to_torch_state_dict(p)) == p for params with both biases or none."""
    params = _model_params(kind, 2, 3, layers=layers, bi=bi, dtype=np.float32, biases=(bias, bias))
    sd = interop.to_torch_state_dict(params)
    assert all(v.dtype == np.float32 for v in sd.values())
    got_model, got = interop.from_torch(sd)
    cell = {"elman": jax_rnn.elman, "gru": jax_rnn.gru, "lstm": jax_rnn.lstm}[kind]
    layer = jax_rnn.bidirectional(cell) if bi else cell
    assert got_model == (jax_rnn.stack([layer] * layers) if layers > 1 else layer)
    _assert_tree_equal(got, params)


def test_round_trip_accepts_jax_arrays_and_gradients():
    params = jax.tree.map(jnp.asarray, _model_params("gru", 2, 3, layers=2))
    sd = interop.to_torch_state_dict(params)
    assert all(type(v) is np.ndarray and v.flags.writeable for v in sd.values())
    _assert_tree_equal(interop.from_torch(sd)[1], jax.tree.map(np.asarray, params))


def test_one_missing_bias_exports_zeros():
    """PyTorch's bias flag is module-wide: one missing bias becomes zeros."""
    params = _model_params("lstm", 2, 3, biases=(True, False))  # a Keras-style LSTM
    sd = interop.to_torch_state_dict(params)
    np.testing.assert_array_equal(sd["bias_hh_l0"], np.zeros(12))
    params = _model_params("gru", 2, 3, layers=2, biases=(False, False))
    params = (params[0]._replace(b_cell_state=np.ones(9)), params[1])
    sd = interop.to_torch_state_dict(params)
    assert list(sd) == [
        f"{n}_l{k}" for k in (0, 1) for n in ("weight_ih", "weight_hh", "bias_ih", "bias_hh")
    ]
    np.testing.assert_array_equal(sd["bias_hh_l0"], np.ones(9))
    for name in ("bias_ih_l0", "bias_ih_l1", "bias_hh_l1"):
        np.testing.assert_array_equal(sd[name], np.zeros(9))


def test_elman_without_state_bias_exports_zeros():
    params = _cell_params("elman", 2, 3, biases=(True, False))
    assert params.b_cell_state is None
    sd = interop.to_torch_state_dict(params)
    np.testing.assert_array_equal(sd["bias_hh_l0"], np.zeros(3))
    np.testing.assert_array_equal(sd["bias_ih_l0"], params.b_cell)
    back = interop.from_torch(sd)[1]
    _assert_tree_equal(back, params._replace(b_cell_state=np.zeros(3)))
    no_bias = interop.to_torch_state_dict(params._replace(b_cell=None))
    assert list(no_bias) == ["weight_ih_l0", "weight_hh_l0"]


def test_lstm_state_round_trip():
    params = _model_params("lstm", 2, 3, layers=2, bi=True)
    h0 = np.arange(4 * 5 * 3.0).reshape(4, 5, 3)
    c0 = -h0
    carry = interop.from_torch_state(params, (h0, c0))
    assert isinstance(carry, tuple) and isinstance(carry[1], jax_rnn.BidirectionalState)
    assert isinstance(carry[1].backward, jax_rnn.LSTMState)
    np.testing.assert_array_equal(carry[1].backward.h, h0[3])  # layer 1, backward: 1*2+1
    np.testing.assert_array_equal(carry[0].forward.c, c0[0])
    h_n, c_n = interop.to_torch_state(params, carry)
    np.testing.assert_array_equal(h_n, h0)
    np.testing.assert_array_equal(c_n, c0)


class _FakeModule:
    """Duck-typed stand-in for an nn.RNN module: from_torch must not need torch."""

    def __init__(self, sd, **attrs):
        self._sd = sd
        self.__dict__.update(attrs)

    def state_dict(self):
        return self._sd


def test_from_module_attributes():
    fx = _load(DATA / "torch_rnn_relu_l2_bi.npz")
    sd = _state_dict(fx)
    module = _FakeModule(
        sd, mode="RNN_RELU", nonlinearity="relu", num_layers=2, bidirectional=True, dropout=0.25
    )
    model, params = interop.from_torch(module)
    assert model == jax_rnn.stack([jax_rnn.bidirectional(jax_rnn.elman_relu)] * 2, dropout=0.25)
    _assert_tree_equal(params, interop.from_torch(sd, nonlinearity="relu")[1])
    # From a state dict alone, the nonlinearity defaults to tanh and dropout to 0.
    model, _ = interop.from_torch(sd)
    assert model == jax_rnn.stack([jax_rnn.bidirectional(jax_rnn.elman)] * 2)


# --------------------------------------------------------------------------- errors


def _sd(name="torch_lstm_l2_bi.npz"):
    return _state_dict(_load(DATA / name))


def test_error_projected_lstm():
    sd = dict(_sd("torch_lstm_l1_uni.npz"), weight_hr_l0=np.zeros((2, 3)))
    with pytest.raises(ValueError, match=r"weight_hr_l\*.*proj_size > 0.*proj_size=0"):
        interop.from_torch(sd)
    module = _FakeModule(_sd("torch_lstm_l1_uni.npz"), mode="LSTM", proj_size=2)
    with pytest.raises(ValueError, match="proj_size=2"):
        interop.from_torch(module)


def test_error_missing_and_unknown_keys():
    sd = _sd()
    del sd["bias_hh_l1_reverse"]
    with pytest.raises(
        ValueError,
        match=r"bidirectional LSTM with 2 layer.*missing keys "
        r"\['bias_hh_l1_reverse'\]",
    ):
        interop.from_torch(sd)
    with pytest.raises(ValueError, match=r"unexpected keys \['extra'\]; expected exactly"):
        interop.from_torch(dict(_sd(), extra=np.zeros(1)))
    with pytest.raises(ValueError, match=r"no `weight_ih_l0` and no `weight_hh_l0`; found keys"):
        interop.from_torch({"weight": np.zeros((3, 3))})
    with pytest.raises(ValueError, match=r"has no `weight_hh_l0`; found"):
        interop.from_torch({k: v for k, v in _sd().items() if k != "weight_hh_l0"})


def test_error_names_the_prefix_of_a_bigger_models_keys():
    """A whole model's state dict (an embedding, the RNN, a head): the message says how
    to pick the RNN's keys out, and what it says works; with two RNNs it names both."""
    rnn = _sd("torch_gru_l2_uni.npz")
    model = {"encoder.embed.weight": np.ones((10, 3)), "encoder.fc.bias": np.ones(2)}
    model.update({f"encoder.rnn.{k}": v for k, v in rnn.items()})
    with pytest.raises(ValueError, match=r"prefix: pick them out") as err:
        interop.from_torch(model)
    picked = eval(re.search(r"`(\{k\[len.*?\})`", str(err.value)).group(1),  # noqa: S307
                  {"sd": model})
    _, params = interop.from_torch(picked)
    np.testing.assert_array_equal(params[1].w_cell_state, rnn["weight_hh_l1"].T)
    model.update({f"decoder.rnn.{k}": v for k, v in rnn.items()})
    with pytest.raises(ValueError, match=r"one of \['decoder\.rnn\.', 'encoder\.rnn\.'\]"):
        interop.from_torch(model)
    with pytest.raises(ValueError, match=r"pass its recurrent module, "
                                         r"`from_torch\(model\.decoder\.rnn\)` or "
                                         r"`from_torch\(model\.encoder\.rnn\)`"):
        interop.from_torch(_FakeModule(model))


def test_cell_keys_convert_as_one_layer():
    """nn.LSTMCell's keys (no `_l0` suffix) give the params of a one-layer nn.LSTM."""
    sd = _sd("torch_lstm_l1_uni.npz")
    cell, params = interop.from_torch({k.removesuffix("_l0"): v for k, v in sd.items()})
    same_cell, same = interop.from_torch(sd)
    assert cell is same_cell is jax_rnn.lstm
    for a, b in zip(params, same, strict=True):
        np.testing.assert_array_equal(a, b)


def test_error_shapes_and_kinds():
    sd = _sd("torch_gru_l2_uni.npz")
    with pytest.raises(ValueError, match=r"`weight_ih_l1` has shape \(9, 4\), expected \(9, 3\)"):
        interop.from_torch(dict(sd, weight_ih_l1=np.zeros((9, 4))))
    with pytest.raises(ValueError, match=r"`weight_hh_l0` has shape \(6, 3\); expected \(G\*H"):
        interop.from_torch(dict(sd, weight_hh_l0=np.zeros((6, 3))))
    with pytest.raises(ValueError, match="nonlinearity` applies to nn.RNN only"):
        interop.from_torch(sd, nonlinearity="relu")
    with pytest.raises(ValueError, match="'tanh' or 'relu'.*'sigmoid'"):
        interop.from_torch(_sd("torch_rnn_tanh_l1_uni.npz"), nonlinearity="sigmoid")
    with pytest.raises(ValueError, match="mode is 'LSTM' but its weights are those of a GRU"):
        interop.from_torch(_FakeModule(sd, mode="LSTM"))
    with pytest.raises(ValueError, match="num_layers=3, but its weights say 2"):
        interop.from_torch(_FakeModule(sd, mode="GRU", num_layers=3))
    with pytest.raises(ValueError, match="contradicts the module's 'relu'"):
        interop.from_torch(
            _FakeModule(_sd("torch_rnn_relu_l1_uni.npz"), mode="RNN_RELU"), nonlinearity="tanh"
        )
    with pytest.raises(TypeError, match="module or its state dict"):
        interop.from_torch([np.zeros(3)])
    with pytest.raises(TypeError, match="`weight_ih_l0` has dtype int64, expected a floating"):
        interop.from_torch(dict(sd, weight_ih_l0=np.zeros((9, 4), np.int64)))
    with pytest.raises(TypeError, match="`bias_hh_l1` is None, expected an array"):
        interop.from_torch(dict(sd, bias_hh_l1=None))
    with pytest.raises(TypeError, match=r"got the class GRU, expected a module \(an instance"):
        interop.from_torch(type("GRU", (), {"state_dict": lambda self: {}}))
    with pytest.raises(ValueError, match=r"`weight_ih_l0` has shape \(9,\); expected a matrix"):
        interop.from_torch(dict(sd, weight_ih_l0=np.zeros(9)))
    bi = _sd("torch_gru_l2_bi.npz")
    with pytest.raises(ValueError, match=r"expected \(9, 6\) .* layer 1 reading layer 0's 6 "
                                         r"features \(2 direction\(s\) x hidden size 3\)"):
        interop.from_torch(dict(bi, weight_ih_l1=np.zeros((9, 3))))


def test_bfloat16_state_dicts():
    """bfloat16 arrays (JAX's, ml_dtypes) convert as they are, as float16 ones do."""
    sd = _sd("torch_gru_l1_uni.npz")
    _, params = interop.from_torch({k: jnp.asarray(v, jnp.bfloat16) for k, v in sd.items()})
    assert params.w_cell_state.dtype == jnp.bfloat16
    np.testing.assert_array_equal(np.asarray(params.w_cell_state, np.float32),
                                  np.asarray(jnp.asarray(sd["weight_hh_l0"].T, jnp.bfloat16),
                                             np.float32))


def test_from_torch_state_checks_h0_against_c0():
    params = _cell_params("lstm", 2, 3)
    with pytest.raises(ValueError, match=r"`h_0` has shape \(1, 4, 3\) but `c_0` \(1, 1, 3\)"):
        interop.from_torch_state(params, (np.zeros((1, 4, 3)), np.zeros((1, 1, 3))))


def test_error_readout_in_to_torch():
    params = _cell_params("gru", 2, 3, readout=4)
    with pytest.raises(
        ValueError,
        match=r"layer 0 has a readout.*nn.Linear with weight = "
        r"w_output.T and bias = b_output",
    ):
        interop.to_torch_state_dict(params)
    stacked = _model_params("elman", 2, 3, layers=2, bi=True)
    stacked = (stacked[0], stacked[1]._replace(forward=_cell_params("elman", 6, 3, readout=1)))
    with pytest.raises(ValueError, match="layer 1, direction 0 has a readout"):
        interop.to_torch_state_dict(stacked)


def test_error_params_that_are_no_torch_module():
    elman = _cell_params("elman", 2, 3)
    gru = _cell_params("gru", 3, 3)
    with pytest.raises(ValueError, match=r"the layers mix \['ElmanParams', 'GRUParams'\]"):
        interop.to_torch_state_dict((elman, gru))
    with pytest.raises(ValueError, match="some layers are bidirectional and some are not"):
        interop.to_torch_state_dict((jax_rnn.BidirectionalParams(elman, elman), elman))
    with pytest.raises(ValueError, match="layer 1 takes inputs of size 2, but"):
        interop.to_torch_state_dict((elman, elman))
    with pytest.raises(TypeError, match="got dict"):
        interop.to_torch_state_dict({"w": np.zeros(2)})
    with pytest.raises(ValueError, match=r"`h_0` has shape \(2, 5, 3\), expected \(1, \*b"):
        interop.from_torch_state(elman, np.zeros((2, 5, 3)))
    with pytest.raises(ValueError, match=r"an LSTM needs `hidden=\(h_0, c_0\)`"):
        interop.from_torch_state(_cell_params("lstm", 2, 3), np.zeros((1, 3)))


# --------------------------------------------------------------------------- Keras


def _sigmoid(a):
    return 1.0 / (1.0 + np.exp(-a))


def _keras_reference(kind, weights, xs, activation="tanh"):
    """Keras's recurrent layers, batch-major ``xs (B, T, I)``, from Keras's docs.

    Gate blocks are in Keras's order: GRU ``z, r, h``; LSTM ``i, f, c, o``.
    Returns the sequence of states ``(B, T, H)``.
    """
    kernel, recurrent = weights[0], weights[1]
    units = recurrent.shape[0]
    bias = weights[2] if len(weights) == 3 else None
    b, t = xs.shape[:2]
    h = np.zeros((b, units))
    c = np.zeros((b, units))
    act = np.tanh if activation == "tanh" else (lambda a: np.maximum(a, 0.0))
    out = []
    for step in range(t):
        x = xs[:, step]
        if kind == "SimpleRNN":
            h = act(x @ kernel + h @ recurrent + (0.0 if bias is None else bias))
        elif kind == "GRU":  # reset_after=True
            b_in, b_rec = np.zeros((2, 3 * units)) if bias is None else bias
            k_z, k_r, k_h = np.split(kernel, 3, axis=1)
            u_z, u_r, u_h = np.split(recurrent, 3, axis=1)
            bi_z, bi_r, bi_h = np.split(b_in, 3)
            br_z, br_r, br_h = np.split(b_rec, 3)
            z = _sigmoid(x @ k_z + bi_z + h @ u_z + br_z)
            r = _sigmoid(x @ k_r + bi_r + h @ u_r + br_r)
            hh = np.tanh(x @ k_h + bi_h + r * (h @ u_h + br_h))
            h = z * h + (1.0 - z) * hh
        else:  # LSTM
            k_i, k_f, k_c, k_o = np.split(kernel, 4, axis=1)
            u_i, u_f, u_c, u_o = np.split(recurrent, 4, axis=1)
            b_i, b_f, b_c, b_o = np.split(np.zeros(4 * units) if bias is None else bias, 4)
            i = _sigmoid(x @ k_i + h @ u_i + b_i)
            f = _sigmoid(x @ k_f + h @ u_f + b_f)
            c = f * c + i * np.tanh(x @ k_c + h @ u_c + b_c)
            o = _sigmoid(x @ k_o + h @ u_o + b_o)
            h = o * np.tanh(c)
        out.append(h)
    return np.stack(out, axis=1)


@settings(max_examples=6)
@given(
    kind=st.sampled_from(["SimpleRNN", "GRU", "LSTM"]),
    use_bias=st.booleans(),
    relu=st.booleans(),
    sizes=st.tuples(st.integers(1, 3), st.integers(1, 6), st.integers(1, 4), st.integers(1, 4)),
    seed=st.integers(0, 2**31 - 1),
)
def test_from_keras_matches_keras_equations(kind, use_bias, relu, sizes, seed):
    b, t, i, h = sizes
    rng = np.random.default_rng(seed)
    gates = {"SimpleRNN": 1, "GRU": 3, "LSTM": 4}[kind]
    weights = [rng.normal(size=(i, gates * h)), rng.normal(size=(h, gates * h)) / np.sqrt(h)]
    if use_bias:
        weights.append(rng.normal(size=(2, 3 * h) if kind == "GRU" else (gates * h,)))
    activation = "relu" if relu and kind == "SimpleRNN" else "tanh"
    xs = rng.normal(size=(b, t, i))
    cell, params = interop.from_keras(kind, weights, activation=activation)
    assert (
        cell
        is {
            "SimpleRNN": jax_rnn.elman_relu if activation == "relu" else jax_rnn.elman,
            "GRU": jax_rnn.gru,
            "LSTM": jax_rnn.lstm,
        }[kind]
    )
    _, ys = jax_rnn.unroll(cell, params, xs, time_major=False)
    np.testing.assert_allclose(
        ys.state, _keras_reference(kind, weights, xs, activation), rtol=1e-12, atol=1e-12
    )


def test_from_keras_gru_gate_order():
    """The z and r blocks swap; the candidate block stays last."""
    kernel = np.array([[1.0, 2.0, 3.0, 4.0, 5.0, 6.0]])  # H = 2: z z r r h h
    _, params = interop.from_keras("GRU", [kernel, np.zeros((2, 6)), np.ones((2, 6))])
    np.testing.assert_array_equal(params.w_cell_input, [[3.0, 4.0, 1.0, 2.0, 5.0, 6.0]])
    _, params = interop.from_keras("LSTM", [kernel[:, :4], np.zeros((1, 4))])
    np.testing.assert_array_equal(params.w_cell_input, kernel[:, :4])
    assert params.b_cell_input is None and params.b_cell_state is None


def test_from_keras_errors():
    gru = [np.zeros((2, 9)), np.zeros((3, 9)), np.zeros((2, 9))]
    with pytest.raises(ValueError, match="reset_after=False.*cannot express"):
        interop.from_keras("GRU", gru, reset_after=False)
    with pytest.raises(
        ValueError,
        match=r"bias has shape \(9,\), that of a layer with "
        "reset_after=False",
    ):
        interop.from_keras("GRU", [gru[0], gru[1], np.zeros(9)])
    with pytest.raises(ValueError, match="'SimpleRNN', 'GRU' or 'LSTM', got 'ConvLSTM2D'"):
        interop.from_keras("ConvLSTM2D", gru)
    with pytest.raises(ValueError, match=r"recurrent kernel \(weights\[1\]\) has shape \(3, 9\)"):
        interop.from_keras("LSTM", gru)
    with pytest.raises(ValueError, match="got 1 entries"):
        interop.from_keras("SimpleRNN", [np.zeros((2, 3))])
    with pytest.raises(ValueError, match="make_elman"):
        interop.from_keras("SimpleRNN", [np.zeros((2, 3)), np.zeros((3, 3))], activation="elu")
    with pytest.raises(ValueError, match="activation='relu' has no jax_rnn equivalent"):
        interop.from_keras("GRU", gru, activation="relu")


# --------------------------------------------------------------------------- Keras fixtures


def _keras_fixture_weights(fx: dict[str, np.ndarray]) -> list[np.ndarray]:
    """The list ``layer.get_weights()`` returned, in its order."""
    return [fx[f"weights/{i}"] for i in range(sum(k.startswith("weights/") for k in fx))]


def _keras_cell(kind: str, activation: str):
    if kind == "SimpleRNN":
        return jax_rnn.elman_relu if activation == "relu" else jax_rnn.elman
    return {"GRU": jax_rnn.gru, "LSTM": jax_rnn.lstm}[kind]


def _keras_unroll(kind, weights, xs, state0, *, activation, go_backwards, dtype):
    """What a Keras layer returns with ``return_sequences=True, return_state=True``.

    ``from_keras`` then ``unroll(time_major=False)``: Keras is batch-major. Keras's
    ``go_backwards=True`` reads the sequence from its last step to its first, as
    ``unroll(reverse=True)`` does, but returns the outputs in processing order (reversed
    in time) where ``unroll`` keeps each at its time index: they are flipped back here.
    ``state0`` is Keras's ``initial_state`` (``[h0]``, or ``[h0, c0]`` for an LSTM) or
    ``None``. Returns ``[output (B, T, H), h (B, H)]`` and, for an LSTM, ``c``.
    """
    cell, params = interop.from_keras(kind, weights, activation=activation)
    assert cell is _keras_cell(kind, activation)
    params = jax.tree.map(lambda a: np.asarray(a, dtype), params)
    if state0 is not None:
        state0 = [np.asarray(s, dtype) for s in state0]
        state0 = jax_rnn.LSTMState(*state0) if kind == "LSTM" else state0[0]
    final, ys = jax_rnn.unroll(
        cell, params, np.asarray(xs, dtype), state0, time_major=False, reverse=go_backwards
    )
    output = np.asarray(ys.output)
    out = [output[:, ::-1] if go_backwards else output]
    out += [np.asarray(s) for s in ((final.h, final.c) if kind == "LSTM" else (final,))]
    assert all(a.dtype == dtype for a in out)
    return out


def test_keras_every_fixture_is_there():
    names = {p.name for p in KERAS_FIXTURES}
    want = {f"keras_{k}_{b}.npz" for k in KERAS_TAGS for b in ("bias", "nobias")}
    assert names == want, "regenerate with `python scripts/make_keras_fixtures.py`"
    assert sum(p.stat().st_size for p in KERAS_FIXTURES) < 100_000


@pytest.mark.parametrize("path", KERAS_FIXTURES, ids=lambda p: p.stem)
def test_keras_fixtures_are_what_they_say(path):
    """Keras 3 on the JAX backend in float32; biases far from zero (the two GRU rows
    apart); a final state that is the last output Keras returned, also with
    ``go_backwards`` (whose outputs come in processing order, unlike unroll's); runs
    that differ, so that swapping them cannot pass."""
    fx = _load(path)
    assert str(fx["meta/keras_version"]).startswith("3.") and str(fx["meta/backend"]) == "jax"
    assert str(fx["meta/dtype"]) == "float32"
    kind = str(fx["meta/kind"])
    weights = _keras_fixture_weights(fx)
    gates = {"SimpleRNN": 1, "GRU": 3, "LSTM": 4}[kind]
    shapes = [(3, gates * 5), (5, gates * 5)]
    if fx["meta/use_bias"]:
        shapes.append((2, 15) if kind == "GRU" else (gates * 5,))
        bias = weights[2]
        assert np.abs(bias).min() > 1e-3 and np.abs(bias).mean() > 0.2
        if kind == "GRU":
            assert np.abs(bias[0] - bias[1]).min() > 1e-3
    assert [w.shape for w in weights] == shapes
    for key, value in fx.items():
        if not key.startswith("meta/"):
            assert value.dtype == np.float32, key
    for run in KERAS_RUNS:
        np.testing.assert_array_equal(fx[f"{run}/h"], fx[f"{run}/output"][:, -1])
    for a, b in (("forward", "go_backwards"), ("forward", "forward_state0")):
        assert np.abs(fx[f"{a}/output"] - fx[f"{b}/output"]).max() > 0.1, (a, b)


@pytest.mark.parametrize("dtype", [np.float32, np.float64])
@pytest.mark.parametrize("path", KERAS_FIXTURES, ids=lambda p: p.stem)
def test_keras_golden(path, dtype):
    """Keras's outputs and final states (h, and c for the LSTM) to 1e-5, for all runs:
    ``go_backwards`` False and True, from zeros and from ``initial_state``.

    The fixtures are float32 (Keras's JAX backend cannot run these layers in float64),
    so 1e-5 (about 100 float32 ulps of values of order 1) bounds Keras's rounding,
    whether jax_rnn runs in float32 as Keras did or in float64 on the same weights.
    """
    fx = _load(path)
    kind, activation = str(fx["meta/kind"]), str(fx["meta/activation"])
    state0 = [fx["h0"], fx["c0"]] if kind == "LSTM" else [fx["h0"]]
    for run in KERAS_RUNS:
        got = _keras_unroll(
            kind,
            _keras_fixture_weights(fx),
            fx["xs"],
            state0 if run.endswith("_state0") else None,
            activation=activation,
            go_backwards=run.startswith("go_backwards"),
            dtype=dtype,
        )
        for name, value in zip(("output", "h", "c"), got, strict=False):
            _close(value, fx[f"{run}/{name}"], 1e-5, f"{run}/{name}")


# --------------------------------------------------------------------------- live PyTorch


def _torch():
    """torch, or a skip of the live tests only (the golden fixtures still run)."""
    return pytest.importorskip("torch")


@pytest.mark.filterwarnings("ignore:`torch.jit.script_method` is deprecated:DeprecationWarning")
def test_live_torch_cells_wrappers_and_learned_states():
    """nn.RNNCell/GRUCell/LSTMCell stepped over a sequence equal the converted cell's
    unroll; torch.compile and nn.DataParallel wrappers are unwrapped; an h_0 that
    requires grad (a learned initial state) converts."""
    torch = _torch()
    torch.manual_seed(0)
    xs = torch.randn(4, 2, 3, dtype=torch.float64)
    cases = ((torch.nn.RNNCell, {}, jax_rnn.elman),
             (torch.nn.RNNCell, {"nonlinearity": "relu"}, jax_rnn.elman_relu),
             (torch.nn.GRUCell, {}, jax_rnn.gru), (torch.nn.LSTMCell, {}, jax_rnn.lstm))
    for make, extra, expected_cell in cases:
        cell_module = make(3, 5, **extra).double()
        h0 = torch.randn(2, 5, dtype=torch.float64, requires_grad=True)
        c0 = torch.randn(2, 5, dtype=torch.float64)
        is_lstm = make is torch.nn.LSTMCell
        state, outs = ((h0, c0) if is_lstm else h0), []
        with torch.no_grad():
            for x in xs:
                state = cell_module(x, state)
                outs.append((state[0] if is_lstm else state).numpy())
        cell, params = interop.from_torch(cell_module)
        assert cell is expected_cell
        state0 = interop.from_torch_state(params, (h0[None], c0[None]) if is_lstm else h0[None])
        _, ys = jax_rnn.unroll(cell, params, xs.numpy(), state0)
        np.testing.assert_allclose(ys.output, np.stack(outs), rtol=1e-12, atol=1e-12)
    gru = torch.nn.GRU(3, 5, num_layers=2).double()
    for wrapped in (torch.compile(gru), torch.nn.DataParallel(gru)):
        _, params = interop.from_torch(wrapped)
        np.testing.assert_array_equal(params[1].w_cell_state, gru.weight_hh_l1.detach().numpy().T)


@st.composite
def _torch_configs(draw):
    kind = draw(st.sampled_from(KINDS))
    t = draw(st.integers(1, 6))
    b = draw(st.integers(1, 4))
    return dict(
        kind=kind,
        num_layers=draw(st.integers(1, 2)),
        bidirectional=draw(st.booleans()),
        bias=draw(st.booleans()),
        input_size=draw(st.integers(1, 4)),
        hidden_size=draw(st.integers(1, 4)),
        batch_first=draw(st.booleans()),
        lengths=draw(st.lists(st.integers(1, t), min_size=b, max_size=b)),
        t=t,
        seed=draw(st.integers(0, 2**31 - 1)),
    )


@settings(max_examples=4)
@given(cfg=_torch_configs())
def test_live_torch_modules(cfg):
    """Fresh float64 modules of drawn sizes, packed sequences, batch_first, bias=False."""
    torch = _torch()
    torch.manual_seed(cfg["seed"] % 2**31)
    mode = {"rnn_tanh": "RNN", "rnn_relu": "RNN", "gru": "GRU", "lstm": "LSTM"}[cfg["kind"]]
    extra = {"nonlinearity": cfg["kind"][4:]} if mode == "RNN" else {}
    module = (
        getattr(torch.nn, mode)(
            cfg["input_size"],
            cfg["hidden_size"],
            num_layers=cfg["num_layers"],
            bias=cfg["bias"],
            bidirectional=cfg["bidirectional"],
            batch_first=cfg["batch_first"],
            dropout=0.5 if cfg["num_layers"] > 1 else 0.0,
            **extra,
        )
        .double()
        .eval()
    )
    b, t = len(cfg["lengths"]), cfg["t"]
    shape = (b, t, cfg["input_size"]) if cfg["batch_first"] else (t, b, cfg["input_size"])
    gen = torch.Generator().manual_seed(cfg["seed"] % 2**31)
    xs = torch.randn(shape, generator=gen, dtype=torch.float64, requires_grad=True)
    packed = torch.nn.utils.rnn.pack_padded_sequence(
        xs, torch.tensor(cfg["lengths"]), batch_first=cfg["batch_first"], enforce_sorted=False
    )
    out_packed, hidden = module(packed)
    output, _ = torch.nn.utils.rnn.pad_packed_sequence(
        out_packed, batch_first=cfg["batch_first"], total_length=t
    )
    is_lstm = mode == "LSTM"
    h_n, c_n = hidden if is_lstm else (hidden, hidden)
    weights = {
        "w_output": torch.randn(output.shape, generator=gen, dtype=torch.float64),
        "w_h_n": torch.randn(h_n.shape, generator=gen, dtype=torch.float64),
    }
    loss = (output * weights["w_output"]).sum() + (h_n * weights["w_h_n"]).sum()
    if is_lstm:
        weights["w_c_n"] = torch.randn(c_n.shape, generator=gen, dtype=torch.float64)
        loss = loss + (c_n * weights["w_c_n"]).sum()
    loss.backward()

    model, params = interop.from_torch(module)
    if cfg["num_layers"] > 1:
        assert model.dropout == 0.5
    np_weights = {k: v.numpy() for k, v in weights.items()}
    run = jax.jit(functools.partial(_run, model, time_major=not cfg["batch_first"]))
    got_out, got_h, got_c, (g_params, g_xs, _) = run(
        params, xs.detach().numpy(), np.array(cfg["lengths"]), None, np_weights
    )
    tol = 1e-10
    _close(got_out, output.detach().numpy(), tol, "output")
    _close(got_h, h_n.detach().numpy(), tol, "h_n")
    if is_lstm:
        _close(got_c, c_n.detach().numpy(), tol, "c_n")
    _close(g_xs, xs.grad.numpy(), tol, "d loss / d xs")
    grads = interop.to_torch_state_dict(g_params)
    torch_grads = {n: p.grad.numpy() for n, p in module.named_parameters()}
    assert list(grads) == list(torch_grads)
    for name, g in grads.items():
        _close(g, torch_grads[name], tol, f"d loss / d {name}")
    sd = {k: v.numpy() for k, v in module.state_dict().items()}
    _assert_sd_equal(interop.to_torch_state_dict(params), sd)


def test_live_torch_load_back():
    """to_torch_state_dict loads into a fresh module that then computes what jax_rnn does."""
    torch = _torch()
    params = _model_params("gru", 2, 3, layers=2, bi=True)
    module = torch.nn.GRU(2, 3, num_layers=2, bidirectional=True, batch_first=True).double()
    sd = interop.to_torch_state_dict(params)
    module.load_state_dict({k: torch.from_numpy(v) for k, v in sd.items()})
    xs = np.random.default_rng(0).normal(size=(4, 5, 2))  # batch-major
    with torch.no_grad():
        out, h_n = module(torch.from_numpy(xs))
    final, ys = jax_rnn.unroll(
        jax_rnn.stack([jax_rnn.bidirectional(jax_rnn.gru)] * 2), params, xs, time_major=False
    )
    _close(ys.output, out.numpy(), 1e-10, "output")
    _close(interop.to_torch_state(params, final), h_n.numpy(), 1e-10, "h_n")


def test_live_torch_tensors_and_modules():
    """Tensors in a state dict and modules go through duck typing, copied."""
    torch = _torch()
    torch.manual_seed(0)
    module = torch.nn.RNN(2, 3, nonlinearity="relu").double()
    model, params = interop.from_torch(module)
    assert model == jax_rnn.elman_relu
    with torch.no_grad():
        module.weight_hh_l0.add_(1.0)  # later changes to the module do not leak in
    np.testing.assert_array_equal(params.w_cell_state, module.weight_hh_l0.detach().numpy().T - 1)
    model, params = interop.from_torch(module.state_dict())
    assert model == jax_rnn.elman  # a state dict does not record the nonlinearity
    lstm = torch.nn.LSTM(2, 4, proj_size=3)
    with pytest.raises(ValueError, match="proj_size"):
        interop.from_torch(lstm)


# --------------------------------------------------------------------------- live Keras


def _keras():
    """keras (on the JAX backend unless ``KERAS_BACKEND`` names another), or a skip of
    the live tests only (the golden fixtures still run)."""
    os.environ.setdefault("KERAS_BACKEND", "jax")  # read when keras is first imported
    return pytest.importorskip("keras")


def _draw_keras_weights(kind, i, h, use_bias, rng):
    """float32 weights shaped as ``layer.get_weights()`` returns them, random biases."""
    width = {"SimpleRNN": 1, "GRU": 3, "LSTM": 4}[kind] * h
    weights = [rng.normal(size=(i, width)), rng.normal(size=(h, width)) / np.sqrt(h)]
    if use_bias:
        weights.append(rng.normal(size=(2, width) if kind == "GRU" else (width,)))
    return [w.astype(np.float32) for w in weights]


@st.composite
def _keras_configs(draw):
    return dict(
        tag=draw(st.sampled_from(KERAS_TAGS)),
        use_bias=draw(st.booleans()),
        go_backwards=draw(st.booleans()),
        from_state0=draw(st.booleans()),
        sizes=draw(
            st.tuples(st.integers(1, 3), st.integers(1, 6), st.integers(1, 4), st.integers(1, 4))
        ),
        seed=draw(st.integers(0, 2**31 - 1)),
    )


@pytest.mark.filterwarnings(_KERAS_WARNING)
@settings(max_examples=4)
@given(cfg=_keras_configs())
def test_live_keras_layers(cfg):
    """Fresh float32 Keras layers of drawn sizes: outputs and final states to 1e-5."""
    keras = _keras()
    kind = {"gru": "GRU", "lstm": "LSTM"}.get(cfg["tag"], "SimpleRNN")
    activation = "relu" if cfg["tag"] == "simple_rnn_relu" else "tanh"
    b, t, i, h = cfg["sizes"]
    rng = np.random.default_rng(cfg["seed"])
    extra = {"activation": activation} if kind == "SimpleRNN" else {}
    layer = getattr(keras.layers, kind)(
        h,
        use_bias=cfg["use_bias"],
        go_backwards=cfg["go_backwards"],
        return_sequences=True,
        return_state=True,
        dtype="float32",
        **extra,
    )
    layer.build((b, t, i))
    layer.set_weights(_draw_keras_weights(kind, i, h, cfg["use_bias"], rng))
    xs = rng.normal(size=(b, t, i)).astype(np.float32)
    state0 = None
    if cfg["from_state0"]:
        state0 = [rng.normal(size=(b, h)).astype(np.float32) for _ in range(1 + (kind == "LSTM"))]
    want = layer(xs) if state0 is None else layer(xs, initial_state=state0)
    got = _keras_unroll(
        kind,
        layer.get_weights(),
        xs,
        state0,
        activation=activation,
        go_backwards=cfg["go_backwards"],
        dtype=np.float32,
    )
    assert len(got) == len(want)
    for name, g, w in zip(("output", "h", "c"), got, want, strict=False):
        _close(g, keras.ops.convert_to_numpy(w), 1e-5, name)


@pytest.mark.filterwarnings(_KERAS_WARNING)
def test_live_keras_bidirectional():
    """A Keras ``Bidirectional`` LSTM (``merge_mode="concat"``) is ``bidirectional(lstm)``
    with ``BidirectionalParams(forward, backward)``: its backward layer runs with
    ``go_backwards=True`` and Keras turns its outputs back into time order."""
    keras = _keras()
    rng = np.random.default_rng(0)
    layer = keras.layers.Bidirectional(
        keras.layers.LSTM(4, return_sequences=True, return_state=True, dtype="float32")
    )
    layer.build((2, 5, 3))
    weights = _draw_keras_weights("LSTM", 3, 4, True, rng)
    weights += _draw_keras_weights("LSTM", 3, 4, True, rng)
    layer.set_weights(weights)
    assert layer.backward_layer.go_backwards and not layer.forward_layer.go_backwards
    xs = rng.normal(size=(2, 5, 3)).astype(np.float32)
    output, h_fw, c_fw, h_bw, c_bw = map(keras.ops.convert_to_numpy, layer(xs))
    cell, forward = interop.from_keras("LSTM", layer.forward_layer.get_weights())
    _, backward = interop.from_keras("LSTM", layer.backward_layer.get_weights())
    final, ys = jax_rnn.unroll(
        jax_rnn.bidirectional(cell),
        jax_rnn.BidirectionalParams(forward, backward),
        xs,
        time_major=False,
    )
    _close(ys.output, output, 1e-5, "output")
    _close(final.forward.h, h_fw, 1e-5, "forward h")
    _close(final.forward.c, c_fw, 1e-5, "forward c")
    _close(final.backward.h, h_bw, 1e-5, "backward h")
    _close(final.backward.c, c_bw, 1e-5, "backward c")


@pytest.mark.filterwarnings(_KERAS_WARNING)
@pytest.mark.parametrize("go_backwards", [False, True])
def test_live_keras_mask_is_seq_lengths(go_backwards):
    """A Keras mask of valid prefixes is ``seq_lengths``: the final states agree; the
    outputs agree at valid steps, and at masked steps Keras repeats the previous output
    (the last valid one going forward; the initial state's zeros before the first valid
    step going backwards) where ``unroll`` gives zeros, as docs/interop.md says."""
    keras = _keras()
    rng = np.random.default_rng(1)
    layer = keras.layers.GRU(4, return_sequences=True, return_state=True,
                             go_backwards=go_backwards, dtype="float32")
    layer.build((3, 6, 2))
    layer.set_weights(_draw_keras_weights("GRU", 2, 4, True, rng))
    xs = rng.normal(size=(3, 6, 2)).astype(np.float32)
    lengths = np.array([6, 2, 0])
    mask = np.arange(6)[None, :] < lengths[:, None]
    output, h = map(keras.ops.convert_to_numpy, layer(xs, mask=mask))
    cell, params = interop.from_keras("GRU", layer.get_weights())
    final, ys = jax_rnn.unroll(cell, params, xs, time_major=False, seq_lengths=lengths,
                               reverse=go_backwards)
    _close(final, h, 1e-5, "h")
    ours = np.asarray(ys.output)[:, ::-1] if go_backwards else np.asarray(ys.output)
    if not go_backwards:  # Keras carries the last valid output over the masked steps
        last = np.take_along_axis(ours, np.maximum(lengths - 1, 0)[:, None, None], axis=1)
        ours = np.where(mask[..., None], ours, np.where(lengths[:, None, None] > 0, last, 0))
    _close(ours, output, 1e-5, "output")
