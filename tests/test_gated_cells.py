"""The GRU and LSTM cells against plain numpy loops, PyTorch, finite differences and
hand-computed steps; and the numpy references' ``seq_lengths`` against JAX run on each
truncated sequence.

Comparisons run on the CPU, where float64 matmuls are exact float64 products, so float64
agrees to ~1e-12; float32 to ~1e-5.
"""

from __future__ import annotations

import math
from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from jax.test_util import check_grads

import jax_rnn
from jax_rnn import (
    GRUParams,
    LSTMParams,
    LSTMState,
    gru,
    gru_step,
    lstm,
    lstm_step,
    reference,
)

CELLS = {"gru": gru, "lstm": lstm, "elman": jax_rnn.elman}
REFERENCES = {
    "gru": reference.numpy_gru_unroll,
    "lstm": reference.numpy_lstm_unroll,
    "elman": reference.numpy_unroll,
}
BATCHES = [(), (1,), (3,), (2, 3)]
# Each example compiles an unroll (a few tenths of a second), so the tests take a share of
# the profile's examples: 12/8/3 in "ci", more in "nightly".
MANY = max(10, settings().max_examples // 2)
SOME = max(5, settings().max_examples // 3)
FEW = max(3, settings().max_examples // 8)


class Config(NamedTuple):
    steps: int
    batch: tuple[int, ...]
    input_size: int
    hidden: int
    output: int | None
    scale: float
    dtype: Any
    biases: str
    state0: str
    reverse: bool
    seed: int


@st.composite
def configs(draw: Any, max_steps: int = 24, dtypes: tuple = (np.float32, np.float64)) -> Config:
    return Config(
        steps=draw(st.integers(0, max_steps)),
        batch=draw(st.sampled_from(BATCHES)),
        input_size=draw(st.integers(1, 8)),
        hidden=draw(st.integers(1, 8)),
        output=draw(st.none() | st.integers(1, 8)),
        scale=draw(st.floats(0.1, 5.0)),
        dtype=draw(st.sampled_from(dtypes)),
        biases=draw(st.sampled_from(["both", "input", "state", "none"])),
        state0=draw(st.sampled_from(["none", "full", "broadcast", "pair"])),
        reverse=draw(st.booleans()),
        seed=draw(st.integers(0, 2**16)),
    )


POOL = 4096  # more random numbers than the largest drawn problem needs


class Draws:
    """Random numpy arrays from one fixed-shape ``jax.random`` call per kind of number.

    Drawing each array with its own shape would compile a new random kernel for every
    shape hypothesis draws; slicing two fixed-size pools compiles them once per session.
    """

    def __init__(self, seed: int) -> None:
        ku, kn = jax.random.split(jax.random.key(seed))
        self._pools = {
            "uniform": np.asarray(jax.random.uniform(ku, (POOL,), jnp.float64, -1.0, 1.0)),
            "normal": np.asarray(jax.random.normal(kn, (POOL,), jnp.float64)),
        }
        self._used = dict.fromkeys(self._pools, 0)

    def take(self, kind: str, shape: tuple[int, ...], dtype: Any) -> np.ndarray:
        start, size = self._used[kind], math.prod(shape)
        assert start + size <= POOL, "enlarge POOL"
        self._used[kind] += size
        return self._pools[kind][start : start + size].reshape(shape).astype(dtype)


def normal(seed: int, shape: tuple[int, ...]) -> np.ndarray:
    """Standard normal float64 numbers shaped ``shape``, from ``jax.random.key(seed)``."""
    return Draws(seed).take("normal", shape, np.float64)


def make_params(kind: str, cfg: Config, draws: Draws) -> Any:
    """PyTorch-style uniform params, ``U(-s/sqrt(H), s/sqrt(H))`` with ``s = cfg.scale``;
    the biases that ``cfg.biases`` leaves out are None."""
    hidden, width = cfg.hidden, {"gru": 3, "lstm": 4, "elman": 1}[kind] * cfg.hidden
    bound = cfg.scale / math.sqrt(hidden)

    def uniform(*shape: int) -> np.ndarray:
        return (bound * draws.take("uniform", shape, np.float64)).astype(cfg.dtype)

    w_input, w_state = uniform(cfg.input_size, width), uniform(hidden, width)
    b_input = uniform(width) if cfg.biases in ("both", "input") else None
    b_state = uniform(width) if cfg.biases in ("both", "state") else None
    w_output = b_output = None
    if cfg.output is not None:
        w_output, b_output = uniform(hidden, cfg.output), uniform(cfg.output)
    if kind == "elman":
        return jax_rnn.ElmanParams(w_state, w_input, b_input, w_output, b_output, b_state)
    params_type = GRUParams if kind == "gru" else LSTMParams
    return params_type(w_input, w_state, b_input, b_state, w_output, b_output)


def make_state0(kind: str, cfg: Config, draws: Draws) -> Any:
    """None, a full ``(*batch, H)`` state, one broadcast from ``(H,)``, or (LSTM) a pair."""
    if cfg.state0 == "none":
        return None
    full = (*cfg.batch, cfg.hidden)
    h = draws.take("normal", full if cfg.state0 != "broadcast" else (cfg.hidden,), cfg.dtype)
    if kind != "lstm":
        return h
    c = draws.take("normal", full, cfg.dtype)
    return (h, c) if cfg.state0 == "pair" else LSTMState(h, c)


def make_problem(kind: str, cfg: Config) -> tuple[Any, np.ndarray, Any]:
    """``(params, xs, state0)`` as numpy arrays of ``cfg.dtype``, from ``key(cfg.seed)``."""
    draws = Draws(cfg.seed)
    xs = draws.take("normal", (cfg.steps, *cfg.batch, cfg.input_size), cfg.dtype)
    return make_params(kind, cfg, draws), xs, make_state0(kind, cfg, draws)


def tolerances(dtype: Any) -> tuple[float, float]:
    """``(rtol, atol)``: float64 agrees to rounding, float32 to ~1e-5."""
    return (1e-12, 1e-12) if np.dtype(dtype) == np.float64 else (1e-5, 1e-5)


def carry_leaves(carry: Any) -> list[np.ndarray]:
    """The arrays of a carry: ``[h]`` for a state array, ``[h, c]`` for an LSTM pair."""
    if isinstance(carry, tuple):
        return [np.asarray(leaf) for leaf in carry]
    return [np.asarray(carry)]


def assert_unroll_matches(actual: Any, expected: Any, dtype: Any) -> None:
    (final, ys), (ref_final, ref_ys) = actual, expected
    rtol, atol = tolerances(dtype)
    for name in ("pre_activation", "state", "output"):
        got, want = getattr(ys, name), getattr(ref_ys, name)
        assert got.dtype == np.dtype(dtype), name
        assert got.shape == want.shape, name
        np.testing.assert_allclose(np.asarray(got), want, err_msg=name, rtol=rtol, atol=atol)
    got_leaves, want_leaves = carry_leaves(final), carry_leaves(ref_final)
    assert len(got_leaves) == len(want_leaves)
    for got, want in zip(got_leaves, want_leaves, strict=True):
        assert got.dtype == np.dtype(dtype)
        np.testing.assert_allclose(got, want, err_msg="final carry", rtol=rtol, atol=atol)


# --- unroll against the numpy references ------------------------------------------------


@pytest.mark.parametrize("kind", ["gru", "lstm"])
@settings(max_examples=MANY)
@given(cfg=configs())
def test_unroll_matches_numpy_reference(kind: str, cfg: Config) -> None:
    params, xs, state0 = make_problem(kind, cfg)
    actual = jax_rnn.unroll(CELLS[kind], params, xs, state0, reverse=cfg.reverse)
    expected = REFERENCES[kind](params, xs, state0, reverse=cfg.reverse)
    assert_unroll_matches(actual, expected, cfg.dtype)
    if kind == "lstm":  # a plain pair (h, c) comes back as an LSTMState too
        assert isinstance(actual[0], LSTMState)


EDGE_CASES = {
    "T=0": dict(steps=0, batch=(3,), input_size=2, hidden=4, output=2, reverse=True),
    "T=1": dict(steps=1, batch=(), input_size=3, hidden=2, output=None, reverse=False),
    "H=1": dict(steps=7, batch=(2, 3), input_size=1, hidden=1, output=1, reverse=True),
    "saturated": dict(
        steps=24, batch=(1,), input_size=5, hidden=3, output=4, scale=40.0, reverse=False
    ),
}


@pytest.mark.parametrize("kind", ["gru", "lstm"])
@pytest.mark.parametrize("case", sorted(EDGE_CASES))
def test_unroll_edge_cases(kind: str, case: str) -> None:
    spec = {"scale": 1.0, **EDGE_CASES[case]}
    cfg = Config(**spec, dtype=np.float64, biases="both", state0="full", seed=7)
    params, xs, state0 = make_problem(kind, cfg)
    final, ys = jax_rnn.unroll(CELLS[kind], params, xs, state0, reverse=cfg.reverse)
    assert_unroll_matches(
        (final, ys), REFERENCES[kind](params, xs, state0, reverse=cfg.reverse), cfg.dtype
    )
    if cfg.steps == 0:
        assert ys.output.shape == (0, *cfg.batch, cfg.output)
        for got, want in zip(carry_leaves(final), carry_leaves(state0), strict=True):
            np.testing.assert_array_equal(got, want)
    if case == "saturated":  # tanh and the gates saturate: states pinned near +-1 or 0/1
        assert np.abs(np.asarray(ys.pre_activation)).max() > 10


def test_integer_inputs_are_promoted_to_the_params_dtype() -> None:
    cfg = Config(4, (), 2, 3, 1, 1.0, np.float32, "both", "none", False, seed=0)
    params = make_params("gru", cfg, Draws(0))
    xs = np.arange(8, dtype=np.int32).reshape(4, 2) - 3
    final, ys = jax_rnn.unroll(gru, params, xs)
    assert ys.output.dtype == np.float32
    np.testing.assert_allclose(
        ys.output, reference.numpy_gru_unroll(params, xs)[1].output, rtol=1e-5, atol=1e-6
    )


@pytest.mark.parametrize("kind", sorted(CELLS))
def test_bfloat16(kind: str) -> None:
    """bfloat16 params and inputs compute in bfloat16 (numpy calls the dtype kind "V";
    it used to be refused as "not real numbers"): within bfloat16's rounding (8 bits) of
    the numpy loop on the same, rounded, numbers in float64, and the default path's
    gradients within it of impl="scan"'s."""
    cell = CELLS[kind]
    params = cell.init(jax.random.key(1), 3, 4, 2, dtype=jnp.bfloat16)
    assert all(a.dtype == jnp.bfloat16 for a in jax.tree.leaves(params))
    xs = jnp.asarray(np.random.default_rng(1).normal(size=(6, 2, 3)), jnp.bfloat16)
    final, ys = jax_rnn.unroll(cell, params, xs)
    assert ys.output.dtype == jnp.bfloat16
    wide = jax.tree.map(lambda a: np.asarray(a, np.float64), params)
    _, ref = REFERENCES[kind](wide, np.asarray(xs, np.float64))
    np.testing.assert_allclose(np.asarray(ys.output, np.float64), ref.output, rtol=0.05,
                               atol=0.03)

    def loss(p: Any, impl: str) -> Any:
        return jnp.sum(jax_rnn.unroll(cell, p, xs, impl=impl)[1].output.astype(jnp.float32))

    fused, scan = (jax.grad(loss)(params, impl) for impl in ("fused", "scan"))
    for a, b in zip(jax.tree.leaves(fused), jax.tree.leaves(scan), strict=True):
        assert a.dtype == jnp.bfloat16
        scale = float(jnp.max(jnp.abs(b.astype(jnp.float32))))
        np.testing.assert_allclose(np.asarray(a, np.float32), np.asarray(b, np.float32),
                                   atol=0.05 * scale)


# --- single steps: hand-computed values, broadcasting, PyTorch ------------------------


def _sig(v: float) -> float:
    return 1.0 / (1.0 + math.exp(-v))


def test_gru_step_by_hand() -> None:
    # H = 1, I = 1: columns are r, z, n.
    wi, wh, bi, bh = [0.3, -0.7, 1.1], [0.5, 0.2, -0.9], [0.1, 0.2, -0.3], [-0.4, 0.6, 0.25]
    params = GRUParams(
        *(jnp.array(a, jnp.float64) for a in ([wi], [wh], bi, bh)),
        w_output=jnp.array([[2.0]]),
        b_output=jnp.array([-1.0]),
    )
    h, x = 0.8, -1.5
    r = _sig(x * wi[0] + bi[0] + h * wh[0] + bh[0])
    z = _sig(x * wi[1] + bi[1] + h * wh[1] + bh[1])
    a = x * wi[2] + bi[2] + r * (h * wh[2] + bh[2])
    h_new = (1 - z) * math.tanh(a) + z * h
    state, out = gru_step(params, jnp.array([h]), jnp.array([x]))
    np.testing.assert_allclose(out.pre_activation, [a], rtol=1e-14)
    np.testing.assert_allclose(state, [h_new], rtol=1e-14)
    np.testing.assert_allclose(out.output, [2 * h_new - 1], rtol=1e-14)


def test_lstm_step_by_hand() -> None:
    # H = 1, I = 1: columns are i, f, g, o.
    wi, wh = [0.3, -0.7, 1.1, 0.4], [0.5, 0.2, -0.9, -0.6]
    bi, bh = [0.1, 0.2, -0.3, 0.05], [-0.4, 0.6, 0.25, 0.3]
    params = LSTMParams(*(jnp.array(a, jnp.float64) for a in ([wi], [wh], bi, bh)))
    h, c, x = 0.8, -0.4, -1.5
    pre = [x * wi[k] + bi[k] + h * wh[k] + bh[k] for k in range(4)]
    c_new = _sig(pre[1]) * c + _sig(pre[0]) * math.tanh(pre[2])
    h_new = _sig(pre[3]) * math.tanh(c_new)
    carry, out = lstm_step(params, LSTMState(jnp.array([h]), jnp.array([c])), jnp.array([x]))
    assert isinstance(carry, LSTMState)
    np.testing.assert_allclose(out.pre_activation, [pre[2]], rtol=1e-14)
    np.testing.assert_allclose(carry.c, [c_new], rtol=1e-14)
    np.testing.assert_allclose(carry.h, [h_new], rtol=1e-14)
    np.testing.assert_array_equal(out.output, carry.h)  # no readout
    pair, _ = lstm_step(params, (jnp.array([h]), jnp.array([c])), jnp.array([x]))
    assert type(pair) is tuple
    np.testing.assert_array_equal(pair[0], carry.h)


@pytest.mark.parametrize("kind", ["gru", "lstm"])
def test_step_broadcasts_leading_axes(kind: str) -> None:
    step = jax.jit(CELLS[kind].step)
    params = CELLS[kind].init(jax.random.key(1), 2, 3, 4)
    xs = normal(2, (5, 2))
    state = np.linspace(-1.0, 1.0, 3)
    carry = state if kind == "gru" else LSTMState(state, state[::-1])
    new, out = step(params, carry, xs)  # x (5, I) against a carry (H,)
    assert out.output.shape == (5, 4)
    for b in range(5):
        one, one_out = step(params, carry, xs[b])
        for got, want in zip(carry_leaves(new), carry_leaves(one), strict=True):
            np.testing.assert_allclose(got[b], want, rtol=1e-14)
        np.testing.assert_allclose(out.output[b], one_out.output, rtol=1e-14)


@pytest.mark.parametrize("kind", ["gru", "lstm"])
def test_matches_pytorch(kind: str) -> None:
    torch = pytest.importorskip("torch")
    steps, batch, inputs, hidden = 6, 3, 2, 3
    params = CELLS[kind].init(jax.random.key(11), inputs, hidden, dtype=jnp.float64)
    xs = normal(12, (steps, batch, inputs))
    h0, c0 = normal(13, (2, batch, hidden))

    def tensor(value: Any) -> Any:
        return torch.tensor(np.array(value, np.float64))  # a writable float64 copy

    module = (torch.nn.GRU if kind == "gru" else torch.nn.LSTM)(inputs, hidden).double()
    with torch.no_grad():
        module.weight_ih_l0.copy_(tensor(params.w_cell_input).T)
        module.weight_hh_l0.copy_(tensor(params.w_cell_state).T)
        module.bias_ih_l0.copy_(tensor(params.b_cell_input))
        module.bias_hh_l0.copy_(tensor(params.b_cell_state))
        if kind == "gru":
            t_out, t_hn = module(tensor(xs), tensor(h0)[None])
            t_final = [t_hn[0].numpy()]
            final, ys = jax_rnn.unroll(gru, params, xs, h0)
        else:
            t_out, (t_hn, t_cn) = module(tensor(xs), (tensor(h0)[None], tensor(c0)[None]))
            t_final = [t_hn[0].numpy(), t_cn[0].numpy()]
            final, ys = jax_rnn.unroll(lstm, params, xs, LSTMState(h0, c0))
    np.testing.assert_allclose(ys.state, t_out.numpy(), rtol=1e-12, atol=1e-14)
    for got, want in zip(carry_leaves(final), t_final, strict=True):
        np.testing.assert_allclose(got, want, rtol=1e-12, atol=1e-14)


# --- init and initial_state -------------------------------------------------------------


@pytest.mark.parametrize(
    "kind, gates, dtype", [("gru", 3, None), ("gru", 3, jnp.float32), ("lstm", 4, None)]
)
def test_init(kind: str, gates: int, dtype: Any) -> None:
    inputs, hidden, output = 2, 4, 3
    init = CELLS[kind].init
    params = init(jax.random.key(5), inputs, hidden, output, dtype=dtype)
    assert type(params) is (GRUParams if kind == "gru" else LSTMParams)
    want_dtype = np.float64 if dtype is None else np.dtype(dtype)  # x64 is on in the tests
    shapes = {
        "w_cell_input": (inputs, gates * hidden),
        "w_cell_state": (hidden, gates * hidden),
        "b_cell_input": (gates * hidden,),
        "b_cell_state": (gates * hidden,),
        "w_output": (hidden, output),
        "b_output": (output,),
    }
    bound = 1 / math.sqrt(hidden)
    for name, shape in shapes.items():
        value = getattr(params, name)
        assert value.shape == shape and value.dtype == want_dtype, name
        assert float(jnp.abs(value).max()) <= bound, name
    leaves = np.concatenate([np.ravel(leaf) for leaf in jax.tree.leaves(params)])
    # U(-1/2, 1/2): spread over the whole interval, centred, and each field drawn apart.
    assert leaves.size > 100
    assert leaves.min() < -0.8 * bound and leaves.max() > 0.8 * bound
    assert abs(leaves.mean()) < 0.3 * bound
    assert not np.allclose(params.b_cell_input, params.b_cell_state)
    assert (params.input_size, params.hidden_size, params.output_size) == (2, 4, 3)

    # The same key gives the same cell weights, with or without a readout; another key
    # gives others. A float64 request matches the default under x64.
    bare = init(jax.random.key(5), inputs, hidden, dtype=dtype)
    assert bare.w_output is None and bare.b_output is None and bare.output_size == hidden
    for name in ("w_cell_input", "w_cell_state", "b_cell_input", "b_cell_state"):
        np.testing.assert_array_equal(getattr(bare, name), getattr(params, name))
    other = init(jax.random.key(6), inputs, hidden, dtype=dtype)
    assert not np.allclose(other.w_cell_state, params.w_cell_state)
    if dtype is None:
        explicit = init(jax.random.key(5), inputs, hidden, output, dtype=jnp.float64)
        np.testing.assert_array_equal(explicit.w_output, params.w_output)


@pytest.mark.parametrize("kind", ["gru", "lstm"])
@pytest.mark.parametrize("batch", [(), (4,), (2, 3)])
def test_initial_state(kind: str, batch: tuple[int, ...]) -> None:
    cfg = Config(1, batch, 2, 3, None, 1.0, np.float32, "both", "none", False, seed=0)
    params = make_params(kind, cfg, Draws(0))
    carry = CELLS[kind].initial_state(params, batch)
    if kind == "lstm":
        assert isinstance(carry, LSTMState)
    for leaf in carry_leaves(carry):
        assert leaf.shape == (*batch, 3) and leaf.dtype == np.float32
        assert not leaf.any()


@pytest.mark.parametrize("kind", ["gru", "lstm"])
def test_init_rejects_bad_arguments(kind: str) -> None:
    init = CELLS[kind].init
    with pytest.raises(ValueError, match=rf"jax_rnn\.{kind}\.init.*hidden_size.*positive"):
        init(jax.random.key(0), 2, 0)
    with pytest.raises(ValueError, match=rf"jax_rnn\.{kind}\.init.*output_size"):
        init(jax.random.key(0), 2, 3, -1)
    with pytest.raises(TypeError, match=r"`dtype` must be a float dtype"):
        init(jax.random.key(0), 2, 3, dtype=jnp.int32)


# --- errors ---------------------------------------------------------------------------


def _good(kind: str) -> tuple[Any, jax.Array]:
    params = CELLS[kind].init(jax.random.key(0), 2, 3, 4)
    return params, jnp.ones((5, 2, 2))  # T = 5, batch (2,), I = 2


@pytest.mark.parametrize("kind, gates", [("gru", 3), ("lstm", 4)])
def test_bad_param_shapes(kind: str, gates: int) -> None:
    params, xs = _good(kind)
    cell = CELLS[kind]
    cases = [
        (
            params._replace(w_cell_state=jnp.ones((3, 2 * 3))),
            ValueError,
            rf"params\.w_cell_state` has shape \(3, 6\).*means \(3, {gates * 3}\)",
        ),
        (
            params._replace(w_cell_input=jnp.ones((2, gates * 4))),
            ValueError,
            rf"params\.w_cell_input` has shape \(2, {gates * 4}\).*inconsistent",
        ),
        (
            params._replace(b_cell_state=jnp.ones(3)),
            ValueError,
            r"params\.b_cell_state` has shape \(3,\)",
        ),
        (
            params._replace(w_output=jnp.ones((4, 4))),
            ValueError,
            r"params\.w_output` has shape \(4, 4\)",
        ),
        (params._replace(w_output=None), ValueError, r"b_output` is set but"),
        (
            params._replace(w_cell_input=params.w_cell_input.astype(jnp.float32)),
            TypeError,
            r"mix dtypes",
        ),
        (
            params._replace(b_cell_input=jnp.ones(gates * 3, jnp.int32)),
            TypeError,
            r"b_cell_input` has dtype int32, expected a float",
        ),
        (params._replace(w_cell_state=None), TypeError, r"w_cell_state` is None"),
    ]
    for bad, error, message in cases:
        with pytest.raises(error, match=r"jax_rnn\.unroll.*" + message):
            jax_rnn.unroll(cell, bad, xs)
        with pytest.raises(error, match=rf"jax_rnn\.{kind}_step.*" + message):
            cell.step(bad, cell.initial_state(params), xs[0])


@pytest.mark.parametrize("kind", ["gru", "lstm"])
def test_bad_inputs(kind: str) -> None:
    params, xs = _good(kind)
    cell = CELLS[kind]
    with pytest.raises(ValueError, match=r"`xs` has feature size 3 but .* expects 2"):
        jax_rnn.unroll(cell, params, jnp.ones((5, 2, 3)))
    with pytest.raises(ValueError, match=r"`xs` has shape \(5,\).*xs\[:, None\]"):
        jax_rnn.unroll(cell, params, jnp.ones(5))
    with pytest.raises(TypeError, match=r"`xs` has dtype complex"):
        jax_rnn.unroll(cell, params, jnp.ones((5, 2, 2), jnp.complex64))
    with pytest.raises(ValueError, match=rf"jax_rnn\.{kind}_step`: `x` has feature size 3"):
        cell.step(params, cell.initial_state(params), jnp.ones(3))


def test_bad_gru_state() -> None:
    params, xs = _good("gru")
    with pytest.raises(ValueError, match=r"`state0` has shape \(2, 4\).*hidden size 3"):
        jax_rnn.unroll(gru, params, xs, jnp.zeros((2, 4)))
    with pytest.raises(ValueError, match=r"`state0` has batch shape \(5,\).*\(2,\)"):
        jax_rnn.unroll(gru, params, xs, jnp.zeros((5, 3)))
    with pytest.raises(ValueError, match=r"jax_rnn\.gru_step`: `state` has shape \(4,\)"):
        gru_step(params, jnp.zeros(4), xs[0])
    h = jnp.zeros((2, 3))  # (h, c) would otherwise read as a state batched over 2
    with pytest.raises(TypeError, match=r"`state0` of a GRU is one array.*got a tuple of 2"):
        jax_rnn.unroll(gru, params, xs, (h, h))
    with pytest.raises(TypeError, match=r"gru_step`: `state` of a GRU is one array.*list of 2"):
        gru_step(params, [h, h], xs[0])


def test_bad_lstm_state() -> None:
    params, xs = _good("lstm")
    h, c = jnp.zeros((2, 3)), jnp.zeros((2, 3))
    cases = [
        (h, TypeError, r"`state0` of an LSTM must be an LSTMState\(h, c\).*got ArrayImpl"),
        (jnp.stack([h, c]), TypeError, r"LSTMState.*got ArrayImpl shaped \(2, 2, 3\)"),
        ((h, c, c), TypeError, r"LSTMState.*got a tuple of length 3"),
        ([h, c], TypeError, r"LSTMState.*got list"),
        (LSTMState(h, jnp.zeros((2, 4))), ValueError, r"`state0\.c` has shape \(2, 4\)"),
        (LSTMState(jnp.zeros((3, 3)), c), ValueError, r"`state0\.h` has batch shape \(3,\)"),
        ((h, jnp.zeros(())), ValueError, r"`state0\.c` has shape \(\)"),
    ]
    for bad, error, message in cases:
        with pytest.raises(error, match=r"jax_rnn\.unroll.*" + message):
            jax_rnn.unroll(lstm, params, xs, bad)
    with pytest.raises(TypeError, match=r"jax_rnn\.lstm_step`: `carry` of an LSTM must be"):
        lstm_step(params, h, xs[0])
    with pytest.raises(ValueError, match=r"jax_rnn\.lstm_step`: `carry\.c` has shape \(2,\)"):
        lstm_step(params, LSTMState(h, jnp.zeros(2)), xs[0])


def test_mismatched_cell_and_params() -> None:
    gru_params, xs = _good("gru")
    lstm_params, _ = _good("lstm")
    elman_params = jax_rnn.elman.init(jax.random.key(0), 2, 3, 4)
    cases = [
        (gru, lstm_params, "GRUParams", "LSTMParams"),
        (lstm, gru_params, "LSTMParams", "GRUParams"),
        (gru, elman_params, "GRUParams", "ElmanParams"),
        (jax_rnn.elman, gru_params, "ElmanParams", "GRUParams"),
    ]
    for cell, params, takes, got in cases:
        with pytest.raises(TypeError, match=rf"this cell takes {takes} but `params` is {got}"):
            jax_rnn.unroll(cell, params, xs)
    with pytest.raises(TypeError, match=r"jax_rnn\.gru_step`: `params` must be GRUParams"):
        gru_step(lstm_params, jnp.zeros(3), xs[0])
    with pytest.raises(TypeError, match=r"jax_rnn\.lstm_step`: `params` must be LSTMParams"):
        lstm_step(gru_params, LSTMState(jnp.zeros(3), jnp.zeros(3)), xs[0])


# --- gradients ------------------------------------------------------------------------


def _small_problem(kind: str) -> tuple[Any, jax.Array, Any]:
    cfg = Config(
        steps=4,
        batch=(2,),
        input_size=2,
        hidden=3,
        output=2,
        scale=1.5,
        dtype=np.float64,
        biases="both",
        state0="full",
        reverse=False,
        seed=21,
    )
    return make_problem(kind, cfg)


@pytest.mark.parametrize("kind, reverse", [("gru", False), ("lstm", True)])
def test_check_grads(kind: str, reverse: bool) -> None:
    params, xs, state0 = jax.tree.map(jnp.asarray, _small_problem(kind))

    @jax.jit
    def loss(params: Any) -> jax.Array:
        final, ys = jax_rnn.unroll(CELLS[kind], params, xs, state0, reverse=reverse)
        leaves = jax.tree.leaves(final)
        return jnp.sum(jnp.sin(ys.output)) + sum(jnp.sum(leaf**2) for leaf in leaves)

    check_grads(loss, (params,), order=2, modes=["rev"])


def _numpy_loss(kind: str, params: Any, xs: Any, state0: Any, reverse: bool) -> float:
    final, ys = REFERENCES[kind](params, xs, state0, reverse=reverse)
    weights = np.cos(np.arange(ys.output.size)).reshape(ys.output.shape)
    return float(np.sum(weights * ys.output) + sum(np.sum(leaf**2) for leaf in carry_leaves(final)))


@pytest.mark.parametrize("kind", ["gru", "lstm"])
@settings(max_examples=FEW)
@given(cfg=configs(max_steps=6, dtypes=(np.float64,)))
def test_grad_matches_finite_differences_of_reference(kind: str, cfg: Config) -> None:
    cfg = cfg._replace(
        hidden=min(cfg.hidden, 3),
        input_size=min(cfg.input_size, 3),
        output=cfg.output and min(cfg.output, 3),
        batch=cfg.batch[:1],
        scale=min(cfg.scale, 2.0),
    )
    params, xs, state0 = make_problem(kind, cfg)

    def loss(params: Any) -> jax.Array:
        final, ys = jax_rnn.unroll(CELLS[kind], params, xs, state0, reverse=cfg.reverse)
        weights = jnp.cos(jnp.arange(ys.output.size)).reshape(ys.output.shape)
        leaves = jax.tree.leaves(final)
        return jnp.sum(weights * ys.output) + sum(jnp.sum(leaf**2) for leaf in leaves)

    grads = jax.grad(loss)(params)
    numpy_params = jax.tree.map(np.asarray, params)
    eps = 1e-6
    for name in type(params)._fields:
        value = getattr(numpy_params, name)
        if value is None:
            assert getattr(grads, name) is None
            continue
        fd = np.zeros_like(value)
        for idx in np.ndindex(*value.shape):
            diffs = []
            for sign in (1, -1):
                moved = value.copy()
                moved[idx] += sign * eps
                diffs.append(
                    _numpy_loss(
                        kind, numpy_params._replace(**{name: moved}), xs, state0, cfg.reverse
                    )
                )
            fd[idx] = (diffs[0] - diffs[1]) / (2 * eps)
        np.testing.assert_allclose(getattr(grads, name), fd, rtol=1e-6, atol=1e-7, err_msg=name)


def test_numpy_output_jacobian_still_matches_jax() -> None:
    cfg = Config(4, (2,), 2, 3, 2, 1.0, np.float64, "both", "none", False, seed=2)
    params = make_params("elman", cfg, Draws(2))
    assert params.b_cell is not None and params.b_cell_state is not None
    xs = normal(3, (4, 2, 2))
    state0 = normal(4, (2, 3))
    got = jax_rnn.output_jacobian(jax_rnn.elman, params, xs, state0)
    want = reference.numpy_output_jacobian(params, xs, state0)
    for name in type(params)._fields:
        np.testing.assert_allclose(
            getattr(got, name), want[name], rtol=1e-12, atol=1e-13, err_msg=name
        )


# --- the references' seq_lengths, against JAX on each truncated sequence ---------------


@pytest.mark.parametrize("kind", ["elman", "gru", "lstm"])
@settings(max_examples=SOME)
@given(cfg=configs(max_steps=10, dtypes=(np.float64,)), data=st.data())
def test_reference_seq_lengths(kind: str, cfg: Config, data: Any) -> None:
    params, xs, state0 = make_problem(kind, cfg)
    lengths = np.array(
        data.draw(
            st.lists(
                st.integers(0, cfg.steps),
                min_size=math.prod(cfg.batch),
                max_size=math.prod(cfg.batch),
            )
        ),
        dtype=np.int64,
    ).reshape(cfg.batch)
    ref_final, ref_ys = REFERENCES[kind](
        params, xs, state0, reverse=cfg.reverse, seq_lengths=lengths
    )
    step = jax.jit(CELLS[kind].step)
    initial = CELLS[kind].initial_state(params, cfg.batch) if state0 is None else state0
    full = (*cfg.batch, cfg.hidden)
    initial = jax.tree.map(lambda leaf: np.broadcast_to(leaf, full), initial)
    for b in np.ndindex(*cfg.batch):
        # Sequence b on its own, cut to its length, stepped by JAX.
        length = int(lengths[b])
        seq = xs[(slice(0, length), *b)]
        carry = jax.tree.map(lambda leaf, b=b: leaf[b], initial)
        for t in reversed(range(length)) if cfg.reverse else range(length):
            carry, y = step(params, carry, seq[t])
            for name in ("pre_activation", "state", "output"):
                np.testing.assert_allclose(
                    getattr(ref_ys, name)[(t, *b)],
                    getattr(y, name),
                    rtol=1e-12,
                    atol=1e-12,
                    err_msg=name,
                )
        for name in ("pre_activation", "state", "output"):
            assert not getattr(ref_ys, name)[(slice(length, None), *b)].any(), name
        for got, want in zip(carry_leaves(ref_final), carry_leaves(carry), strict=True):
            np.testing.assert_allclose(got[b], want, rtol=1e-12, atol=1e-12)


def test_reference_seq_lengths_by_hand() -> None:
    # H = I = 1 Elman cell h' = h + x (identity activation): the final state is a prefix sum.
    params = jax_rnn.ElmanParams(np.ones((1, 1)), np.ones((1, 1)), None)
    xs = np.array([1.0, 2.0, 4.0, 8.0])[:, None, None] * np.array([1.0, 10.0, 1.0])[:, None]
    lengths = np.array([4, 2, 0])
    ident = lambda a: a  # noqa: E731
    final, ys = reference.numpy_unroll(
        params, xs, np.zeros(1), activation=ident, seq_lengths=lengths
    )
    np.testing.assert_array_equal(final[:, 0], [15.0, 30.0, 0.0])
    np.testing.assert_array_equal(
        ys.state[:, :, 0].T, [[1, 3, 7, 15], [10, 30, 0, 0], [0, 0, 0, 0]]
    )
    final, ys = reference.numpy_unroll(
        params, xs, np.zeros(1), activation=ident, seq_lengths=lengths, reverse=True
    )
    np.testing.assert_array_equal(final[:, 0], [15.0, 30.0, 0.0])
    np.testing.assert_array_equal(
        ys.state[:, :, 0].T, [[15, 14, 12, 8], [30, 20, 0, 0], [0, 0, 0, 0]]
    )


def test_reference_rejects_bad_seq_lengths() -> None:
    params = gru.init(jax.random.key(0), 2, 3)
    xs = np.ones((4, 2, 2))
    with pytest.raises(ValueError, match=r"seq_lengths must lie in 0\.\.4"):
        reference.numpy_gru_unroll(params, xs, seq_lengths=np.array([1, 5]))
    with pytest.raises(ValueError, match=r"seq_lengths has shape \(3,\)"):
        reference.numpy_lstm_unroll(
            lstm.init(jax.random.key(0), 2, 3), xs, seq_lengths=np.array([1, 2, 3])
        )
    with pytest.raises(TypeError, match=r"seq_lengths must hold integers"):
        reference.numpy_unroll(
            jax_rnn.elman.init(jax.random.key(0), 2, 3, 1), xs, seq_lengths=np.array([1.0, 2.0])
        )
