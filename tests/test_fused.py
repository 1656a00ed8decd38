"""The fused fast path (default for built-in cells) against plain autodiff through scan.

Every other test file exercises the default path against the numpy references; here the
fast path is compared with `impl="scan"` on values and on every gradient (params, inputs,
initial state), for every cell and option, in float64 (1e-12) and float32 (float32
rounding).
"""

from __future__ import annotations

import jax
import jax.flatten_util
import jax.numpy as jnp
import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

import jax_rnn
from jax_rnn import _kernels

# The compact paths and the backward pass in chunks are CPU-only by design (docs/
# performance.md); on a GPU (benchmarks/gpu_session.sh runs this file there) the general
# fused path runs instead, with the same values.
ON_CPU = jax.default_backend() == "cpu"

CELLS = [jax_rnn.elman, jax_rnn.elman_relu, jax_rnn.gru, jax_rnn.lstm]


def _loss(cell, params, xs, state0, impl, **kw):
    final, ys = jax_rnn.unroll(cell, params, xs, state0, impl=impl, **kw)
    return (jnp.sum(jnp.sin(ys.output)) + jnp.sum(ys.pre_activation**2) + jnp.sum(ys.state)
            + sum(jnp.sum(f**2) for f in jax.tree.leaves(final)))


@settings(max_examples=6)
@given(
    cell_index=st.integers(0, len(CELLS) - 1),
    t=st.integers(1, 9),
    batch=st.integers(1, 3),
    readout=st.booleans(),
    options=st.sampled_from(["plain", "lengths", "lengths_reverse", "reverse", "truncate",
                             "resets"]),
    dtype=st.sampled_from([np.float32, np.float64]),
    seed=st.integers(0, 1000),
)
def test_fused_equals_scan_values_and_gradients(cell_index, t, batch, readout, options, dtype,
                                                 seed):
    cell = CELLS[cell_index]
    params = cell.init(jax.random.key(seed), 3, 4, 2 if readout else None, dtype=dtype)
    rng = np.random.default_rng(seed)
    xs = rng.normal(size=(t, batch, 3)).astype(dtype)
    state0 = jax.tree.map(lambda a: a + dtype(0.2), cell.initial_state(params, (batch,)))
    kw = {
        "plain": {},
        "lengths": {"seq_lengths": rng.integers(0, t + 1, batch)},
        "lengths_reverse": {"seq_lengths": rng.integers(0, t + 1, batch), "reverse": True},
        "reverse": {"reverse": True},
        "truncate": {"truncate": 2},
        "resets": {"resets": rng.random((t, batch)) < 0.3},
    }[options]
    grad = jax.value_and_grad(_loss, argnums=(1, 2, 3))
    fused = grad(cell, params, xs, state0, "fused", **kw)
    scan = grad(cell, params, xs, state0, "scan", **kw)
    tol = {np.float64: dict(rtol=1e-12, atol=1e-12), np.float32: dict(rtol=2e-5, atol=2e-5)}
    for a, b in zip(jax.tree.leaves(fused), jax.tree.leaves(scan), strict=True):
        assert a.dtype == b.dtype == dtype
        np.testing.assert_allclose(a, b, **tol[dtype])


BACKWARD_CELLS = {  # each of the hand-written backward passes
    "elman": jax_rnn.elman,  # tanh', from the saved state
    "elman_relu": jax_rnn.elman_relu,  # relu', from the saved state
    "elman_sigmoid": jax_rnn.make_elman(jax.nn.sigmoid),  # sigmoid', from the saved state
    "elman_user": jax_rnn.make_elman(lambda a: jnp.sin(a) + 0.1 * a),  # vjp per step
    "elman_softmax": jax_rnn.make_elman(jax.nn.softmax),  # not elementwise: vjp per step
    "gru": jax_rnn.gru,
    "lstm": jax_rnn.lstm,
}


@pytest.mark.parametrize(("name", "case", "per_step"), [
    (name, case, per_step) for name in BACKWARD_CELLS
    for case, per_step in (("lengths_resets_truncate_reverse", True),
                           ("resets_truncate_2d", True), ("resets_truncate_2d", False))
    # relu' and sigmoid' differ from tanh' only in the derivative: the masked case has it
    if case.startswith("lengths") or name not in ("elman_relu", "elman_sigmoid")
])
def test_every_backward_path_equals_scan(name, case, per_step, monkeypatch):
    """Each cell's backward pass, with masks, resets, truncation and reverse together (the
    states kept per step, or rebuilt from the outputs when no step is masked), and the
    forward pass with the input projection per step (CPUs) or hoisted (accelerators)."""
    monkeypatch.setattr(jax_rnn._fused, "_project_per_step", lambda: per_step)
    cell = BACKWARD_CELLS[name]
    batch = (2,) if case.startswith("lengths") else (2, 3)
    t = 7 if per_step else 6  # another length: unroll's jit cache holds the other trace
    params = cell.init(jax.random.key(3), 3, 4, 2, dtype=np.float64)
    rng = np.random.default_rng(3)
    xs = rng.normal(size=(t, *batch, 3))
    state0 = jax.tree.map(lambda a: a + 0.2, cell.initial_state(params, batch))
    kw = {"resets": rng.random((t, *batch)) < 0.3, "truncate": 3, "reverse": True}
    if case.startswith("lengths"):
        kw["seq_lengths"] = np.array([t - 2, 0])
    grad = jax.value_and_grad(_loss, argnums=(1, 2, 3))
    fused = grad(cell, params, xs, state0, "fused", **kw)
    scan = grad(cell, params, xs, state0, "scan", **kw)
    for a, b in zip(jax.tree.leaves(fused), jax.tree.leaves(scan), strict=True):
        np.testing.assert_allclose(a, b, rtol=1e-12, atol=1e-12)


_READS = {  # a loss of one of unroll's results: the others' cotangents are symbolic zeros
    "final carry": lambda final, ys: sum(jnp.sum(jnp.sin(f)) for f in jax.tree.leaves(final)),
    "states": lambda final, ys: jnp.sum(jnp.sin(ys.state)),
    "pre-activations": lambda final, ys: jnp.sum(jnp.sin(ys.pre_activation)),
    "outputs": lambda final, ys: jnp.sum(jnp.sin(ys.output)),
}
_PATHS = {  # dtype, batch, steps, steps per chunk of the backward pass
    "general": (np.float64, (2,), 7, None),
    "chunks": (np.float64, (2,), 8, 3),
    "compact": (np.float64, (1,), 7, None),  # the LSTM's and GRU's compact paths (CPUs)
    "kernels": (np.float32, (3,), 7, None),  # the C++ kernels of every built-in cell (CPUs)
}


@pytest.mark.parametrize(("path", "name", "reads"), [
    ("general", "elman_user", "final carry"),
    ("general", "gru", "pre-activations"),
    ("chunks", "lstm", "states"),
    ("chunks", "elman", "final carry"),
    ("compact", "lstm", "outputs"),
    ("compact", "gru", "final carry"),
    ("kernels", "elman_relu", "pre-activations"),
    ("kernels", "gru", "final carry"),
    ("kernels", "lstm", "states"),
    ("kernels", "elman", "outputs"),
])
def test_losses_of_one_result_equal_scan(path, name, reads):
    """A loss that reads one of unroll's results only (the final carry, the states, the
    pre-activations or the outputs): the others' cotangents reach the backward pass as
    symbolic zeros, which each backward path adds as nothing (or as zeros). Gradients
    against plain autodiff through scan; the chunked and the kernels' paths are taken."""
    dtype, batch, steps, chunk = _PATHS[path]
    cell = BACKWARD_CELLS[name]
    params = cell.init(jax.random.key(steps), 3, 5, 2, dtype=dtype)
    rng = np.random.default_rng(steps)
    xs = rng.normal(size=(steps, *batch, 3)).astype(dtype)
    state0 = jax.tree.map(lambda a: (a + rng.normal(size=a.shape)).astype(dtype),
                          cell.initial_state(params, batch))

    def loss(params, xs, state0, impl="fused"):
        return _READS[reads](*jax_rnn.unroll(cell, params, xs, state0, impl=impl))

    grad = jax.grad(loss, argnums=(0, 1, 2))
    runs: list[int] = []
    by_chunks = jax_rnn._fused._by_chunks
    with pytest.MonkeyPatch.context() as patch:
        if chunk is not None:
            # 8 steps: no other case here traces unroll with these shapes (its jit cache
            # would hold a trace made without chunks), and the spy sees this one's trace.
            patch.setattr(jax_rnn._fused, "_chunk_length", lambda *a: chunk)
            patch.setattr(jax_rnn._fused, "_by_chunks",
                          lambda *a: runs.append(a[3]) or by_chunks(*a))
        fused = grad(params, xs, state0)
    assert runs == ([] if chunk is None else [chunk])
    if path == "kernels" and ON_CPU and _kernels.mode() == "cpu":
        assert "target_name=jax_rnn_" in str(jax.make_jaxpr(grad)(params, xs, state0))
    scan = grad(params, xs, state0, "scan")
    tol = {np.float64: dict(rtol=1e-12, atol=1e-12), np.float32: dict(rtol=2e-5, atol=2e-5)}
    for a, b in zip(jax.tree.leaves(fused), jax.tree.leaves(scan), strict=True):
        assert a.dtype == b.dtype == dtype
        np.testing.assert_allclose(a, b, **tol[dtype])


def test_fused_is_used_and_hoists_the_input_projection():
    """The fused path runs one (T*B, I) x (I, H) product outside the loop."""
    params = jax_rnn.elman.init(jax.random.key(0), 3, 4, 1, dtype=np.float64)
    xs = np.ones((6, 2, 3))
    fused = str(jax.make_jaxpr(lambda p: jax_rnn.unroll(jax_rnn.elman, p, xs))(params))
    scan = str(jax.make_jaxpr(lambda p: jax_rnn.unroll(jax_rnn.elman, p, xs,
                                                       impl="scan"))(params))
    assert "custom_vjp" in fused and "custom_vjp" not in scan
    assert "f64[6,2,4]" in fused.split("scan")[0]  # gx for all steps before the loop


def test_fused_through_stack_bidirectional_vmap_and_output_jacobian():
    model = jax_rnn.stack([jax_rnn.bidirectional(jax_rnn.gru), jax_rnn.lstm])
    params = model.init(jax.random.key(1), 2, 3, 2, dtype=np.float64)
    xs = np.random.default_rng(1).normal(size=(5, 2, 2))
    lengths = np.array([5, 2])
    jac_f = jax_rnn.output_jacobian(model, params, xs, seq_lengths=lengths)
    jac_s = jax_rnn.output_jacobian(model, params, xs, seq_lengths=lengths, impl="scan")
    for a, b in zip(jax.tree.leaves(jac_f), jax.tree.leaves(jac_s), strict=True):
        np.testing.assert_allclose(a, b, rtol=1e-12, atol=1e-13)
    per_example = jax.vmap(
        jax.grad(lambda p, x: jax_rnn.unroll(jax_rnn.gru, p, x)[1].output.sum()),
        in_axes=(None, 1),
    )
    p1 = params[0].forward
    g_f = per_example(p1, xs)
    g_s = jax.vmap(jax.grad(lambda p, x: jax_rnn.unroll(jax_rnn.gru, p, x, impl="scan")[1]
                            .output.sum()), in_axes=(None, 1))(p1, xs)
    for a, b in zip(jax.tree.leaves(g_f), jax.tree.leaves(g_s), strict=True):
        np.testing.assert_allclose(a, b, rtol=1e-12, atol=1e-13)


def test_second_order_reverse_and_clear_forward_mode_error():
    params = jax_rnn.lstm.init(jax.random.key(2), 2, 3, 1, dtype=np.float64)
    xs = np.random.default_rng(2).normal(size=(4, 2))

    def f(p, impl):
        return jnp.sum(jax_rnn.unroll(jax_rnn.lstm, p, xs, impl=impl)[1].output ** 2)

    # Hessian-vector product by reverse-over-reverse agrees between the two paths.
    v = jax.tree.map(jnp.ones_like, params)

    def hvp(impl):
        return jax.grad(lambda p: jnp.vdot(
            jax.flatten_util.ravel_pytree(jax.grad(f)(p, impl))[0],
            jax.flatten_util.ravel_pytree(v)[0]))(params)

    for a, b in zip(jax.tree.leaves(hvp("fused")), jax.tree.leaves(hvp("scan")), strict=True):
        np.testing.assert_allclose(a, b, rtol=1e-10, atol=1e-12)
    with pytest.raises(TypeError, match=r"forward-mode autodiff .* impl=\"scan\""):
        jax.jacfwd(lambda p: f(p, "fused"))(params)
    jax.jacfwd(lambda p: f(p, "scan"))(params)  # forward mode through plain scan works


def _with_options(cell, steps, batch, kw, key, seed):
    """float64 ``(params, xs, state0, kw)`` for ``steps`` steps of ``batch`` rows, 3 inputs,
    4 hidden units: ``kw``'s ``resets=True`` becomes random resets, ``seq_lengths`` an
    array."""
    params = cell.init(jax.random.key(key), 3, 4, 2, dtype=np.float64)
    rng = np.random.default_rng(seed)
    xs = rng.normal(size=(steps, *batch, 3))
    state0 = jax.tree.map(lambda a: a + rng.normal(size=a.shape),
                          cell.initial_state(params, batch))
    kw = dict(kw)
    if kw.pop("resets", False):
        kw["resets"] = rng.random((steps, *batch)) < 0.3
    if "seq_lengths" in kw:
        kw["seq_lengths"] = np.array(kw["seq_lengths"])
    return params, xs, state0, kw


# (An Elman case with resets and chunks was dropped for the suite's time: the LSTM case
# runs the same general fused path with resets, truncation and chunks.)
@pytest.mark.parametrize(("name", "kw", "chunk"), [
    ("gru", {"truncate": 2, "reverse": True}, None),
    ("lstm", {"truncate": 3, "resets": True, "seq_lengths": (7, 4)}, 2),
    ("elman_user", {"truncate": 3}, None),
])
def test_second_order_with_truncation_equals_scan(name, kw, chunk, monkeypatch, fresh_traces):
    """Reverse-over-reverse with truncated BPTT: as in plain autodiff, where the carry's
    gradient is stopped at a cut so are the higher derivatives through it (the forward
    loop and the input states rebuilt by the backward pass stop them too), with and
    without the backward pass in chunks."""
    if chunk is not None:
        monkeypatch.setattr(jax_rnn._fused, "_chunk_length", lambda *a: chunk)
    cell = BACKWARD_CELLS[name]
    params, xs, state0, kw = _with_options(cell, 7, (2,), kw, key=8, seed=8)

    def second(impl):
        def norm(p, x, s):
            g = jax.grad(_loss, argnums=(1, 2, 3))(cell, p, x, s, impl, **kw)
            return sum(jnp.sum(jnp.sin(leaf)) for leaf in jax.tree.leaves(g))
        return jax.grad(norm, argnums=(0, 1, 2))(params, xs, state0)

    fused, scan = second("fused"), second("scan")
    for a, b in zip(jax.tree.leaves(fused), jax.tree.leaves(scan), strict=True):
        np.testing.assert_allclose(a, b, rtol=1e-11, atol=1e-11)


def test_bad_impl():
    params = jax_rnn.elman.init(jax.random.key(0), 1, 2, 1)
    with pytest.raises(ValueError, match=r"`impl` must be one of \('fused', 'scan'\)"):
        jax_rnn.unroll(jax_rnn.elman, params, np.ones((3, 1)), impl="cudnn")


def _spy_compact(monkeypatch) -> list[str]:
    """Records which compact forward passes run."""
    taken: list[str] = []
    for step, (params_type, fc) in list(jax_rnn._fused._GATED.items()):
        def spy(*a, fn=fc.compact_forward):
            taken.append(fn.__name__)
            return fn(*a)

        monkeypatch.setitem(jax_rnn._fused._GATED, step,
                            (params_type, fc._replace(compact_forward=spy)))
    return taken


@pytest.mark.parametrize(("cell", "batch", "hidden", "t", "reverse", "readout", "dtype", "drop",
                          "compact"), [
    ("lstm", (), 4, 9, False, 2, np.float64, None, True),
    ("lstm", (1,), 4, 7, True, None, np.float64, "b_cell_state", True),
    ("lstm", (1,), 64, 3, False, None, np.float64, None, True),  # the widest it takes
    ("lstm", (), 3, 1, True, 2, np.float32, None, True),
    ("lstm", (1,), 5, 2, False, None, np.float32, None, True),
    ("lstm", (1,), 65, 3, False, None, np.float64, None, False),  # too wide: general path
    ("lstm", (2,), 4, 5, False, None, np.float64, None, False),  # more than one row a step
    ("gru", (), 4, 9, False, 2, np.float64, None, True),
    ("gru", (1,), 4, 7, True, None, np.float64, "b_cell_state", True),
    ("gru", (), 5, 4, False, None, np.float64, "b_cell_input", True),
    ("gru", (1,), 32, 3, True, None, np.float64, None, True),  # the widest it takes
    ("gru", (), 3, 1, False, 2, np.float32, None, True),
    ("gru", (1,), 33, 3, False, None, np.float64, None, False),
    ("gru", (2,), 4, 5, False, None, np.float64, None, False),
])
def test_compact_paths_equal_scan(cell, batch, hidden, t, reverse, readout, dtype, drop, compact,
                                  monkeypatch, fresh_traces):
    """The LSTM's and GRU's compact paths (one row per step, small hidden size, CPUs)
    against plain autodiff through scan: outputs, pre-activations, final carry and every
    gradient, with a loss that gives each of them a cotangent (and params without one of
    the biases); and each path is taken exactly where it should be. The C++ kernels, which
    take precedence over these paths in float32 (tests/test_kernels.py), are off."""
    monkeypatch.setattr(_kernels, "MODE", "off")
    taken = _spy_compact(monkeypatch)
    model = getattr(jax_rnn, cell)
    params = model.init(jax.random.key(hidden + t), 3, hidden, readout, dtype=dtype)
    if drop is not None:
        params = params._replace(**{drop: None})
    rng = np.random.default_rng(t)
    xs = rng.normal(size=(t, *batch, 3)).astype(dtype)
    state0 = jax.tree.map(lambda a: (a + rng.normal(size=a.shape)).astype(dtype),
                          model.initial_state(params, batch))
    grad = jax.jit(jax.value_and_grad(_loss, argnums=(1, 2, 3)), static_argnums=(0, 4),
                   static_argnames="reverse")
    fused = grad(model, params, xs, state0, "fused", reverse=reverse)
    assert taken == ([f"_{cell}_compact_forward"] if compact and ON_CPU else [])
    scan = grad(model, params, xs, state0, "scan", reverse=reverse)
    tol = {np.float64: dict(rtol=1e-12, atol=1e-12), np.float32: dict(rtol=2e-5, atol=2e-5)}
    for a, b in zip(jax.tree.leaves(fused), jax.tree.leaves(scan), strict=True):
        assert a.dtype == b.dtype == dtype
        np.testing.assert_allclose(a, b, **tol[dtype])


@pytest.mark.parametrize("cell", ["lstm", "gru"])
def test_compact_paths_are_not_taken_under_vmap(cell, monkeypatch):
    """Under a vmap around unroll every example looks like one sequence, but the batch
    runs as many rows, where a compact path is the slower one: the general fused path
    runs instead (per-example gradients still equal plain autodiff's)."""
    taken = _spy_compact(monkeypatch)
    model = getattr(jax_rnn, cell)
    params = model.init(jax.random.key(5), 3, 4, None, dtype=np.float64)
    xs = np.random.default_rng(5).normal(size=(6, 3, 3))  # 3 examples on axis 1

    def per_example(impl, p, x):
        return jax.grad(lambda p: jnp.sum(jnp.sin(
            jax_rnn.unroll(model, p, x, impl=impl)[1].output)))(p)

    fused = jax.vmap(lambda x: per_example("fused", params, x), in_axes=1)(xs)
    assert not taken
    scan = jax.vmap(lambda x: per_example("scan", params, x), in_axes=1)(xs)
    for a, b in zip(jax.tree.leaves(fused), jax.tree.leaves(scan), strict=True):
        np.testing.assert_allclose(a, b, rtol=1e-12, atol=1e-12)
    per_example("fused", params, xs[:, 0])  # one example outside vmap: compact (CPUs)
    assert bool(taken) == ON_CPU


def test_compact_lstm_path_keeps_an_infinite_cotangent_in_its_gate():
    """An infinite cotangent of one pre-activation reaches that gate's gradient only, as
    in plain autodiff: the compact backward selects gates rather than multiplying by 0/1
    (0 * inf would put nan into the other gates)."""
    params = jax_rnn.lstm.init(jax.random.key(6), 2, 3, None, dtype=np.float64)
    xs = np.random.default_rng(6).normal(size=(1, 2))  # one step, one sequence: compact

    def grads(impl):
        def pre(p):
            return jax_rnn.unroll(jax_rnn.lstm, p, xs, impl=impl)[1].pre_activation
        out, vjp = jax.vjp(pre, params)
        return vjp(jnp.zeros_like(out).at[0, 0].set(jnp.inf))[0]

    fused, scan = grads("fused"), grads("scan")
    np.testing.assert_array_equal(fused.b_cell_input, scan.b_cell_input)
    np.testing.assert_array_equal(fused.w_cell_input, scan.w_cell_input)
    assert np.isinf(fused.b_cell_input[6]) and np.isfinite(np.delete(fused.b_cell_input, 6)).all()


@pytest.fixture
def fresh_traces():
    """unroll's jit cache may hold traces made without (or with) chunks: cleared before
    and after the test, also when it fails."""
    jax.clear_caches()
    yield
    jax.clear_caches()


_ALL_OPTIONS = (7, 4, (2,), {"resets": True, "truncate": 3, "reverse": True,
                             "seq_lengths": (5, 0)})
_CHUNK_CASES = [
    (7, 2, (2,), {}),  # 3 chunks and a remainder of 1 step (reverse: in _ALL_OPTIONS)
    (6, 3, (2, 3), {"resets": True, "truncate": 2}),  # no remainder; 2 batch axes
    _ALL_OPTIONS,
    (5, 1, (2,), {"seq_lengths": (5, 2)}),
    (7, 3, (1,), {}),  # one row: the GRU's compact forward, then the chunked backward
]


# Each chunk case runs for at least one cell and each cell's tape for at least two cases:
# the chunking does not depend on the cell beyond the tape's structure.
_CELL_CHUNK_CASES = {"elman": (2, 3), "gru": (1, 4), "lstm": (0, 2, 4)}


@pytest.mark.parametrize(("name", "t", "chunk", "batch", "kw"), [
    *((name, *_CHUNK_CASES[k]) for name, cases in _CELL_CHUNK_CASES.items() for k in cases),
    # the other Elman tapes: the pre-activations kept (a user activation's per-step vjp)
    # instead of the states (tanh, relu and sigmoid alike: test_every_backward_path)
    ("elman_user", *_ALL_OPTIONS),
])
def test_backward_in_chunks_equals_scan(name, t, chunk, batch, kw, monkeypatch, fresh_traces):
    """The CPU backward pass over chunks of consecutive steps (each with its own loop and
    contractions; the first input state of each chunk taken from the step before it; a
    shorter remainder) against plain autodiff, with every option that changes the loop."""
    runs: list[int] = []
    by_chunks = jax_rnn._fused._by_chunks

    def spy(*a):
        runs.append(a[3])
        return by_chunks(*a)

    monkeypatch.setattr(jax_rnn._fused, "_by_chunks", spy)
    monkeypatch.setattr(jax_rnn._fused, "_chunk_length", lambda *a: chunk)
    cell = BACKWARD_CELLS[name]
    params, xs, state0, kw = _with_options(cell, t, batch, kw, key=t, seed=t + chunk)
    grad = jax.value_and_grad(_loss, argnums=(1, 2, 3))
    fused = grad(cell, params, xs, state0, "fused", **kw)
    compact = name == "lstm" and batch == (1,) and ON_CPU
    assert runs == ([] if compact else [chunk])  # compact: no chunks
    scan = grad(cell, params, xs, state0, "scan", **kw)
    for a, b in zip(jax.tree.leaves(fused), jax.tree.leaves(scan), strict=True):
        np.testing.assert_allclose(a, b, rtol=1e-12, atol=1e-12)


def test_chunk_length():
    """Chunks of about _CHUNK_BYTES of tape on CPUs, preferring a divisor of the length;
    none for one chunk's worth of steps, for deep products and on accelerators."""
    f = jax_rnn._fused
    per_step = 4 * 8 * 3 * 4  # three (T, 4, 8) float32 arrays: 384 bytes a step

    def length(t, depth=64, accelerator=False):
        tape = f.Tape(None, np.zeros((t, 4, 8), np.float32), np.zeros((t, 4, 8), np.float32),
                      (np.zeros((t, 4, 8), np.float32),))
        old = f._project_per_step
        f._project_per_step = lambda: not accelerator
        try:
            return f._chunk_length(tape, t, depth)
        finally:
            f._project_per_step = old

    target = f._CHUNK_BYTES // per_step
    assert length(1000 * target) == target  # a divisor
    assert length(1000 * target + 1) not in (None, target)  # the nearest divisor below
    prime = 2 * target + 1
    while any(prime % k == 0 for k in range(2, int(prime**0.5) + 1)):
        prime += 2
    assert length(prime) == target  # no divisor near: a remainder instead
    assert length(2 * target - 1) is None  # fewer than two chunks
    big = f._CHUNK_BYTES // (f._CHUNK_MIN_STEPS - 1) // 12 + 1  # floats per array and step
    wide = f.Tape(None, np.zeros((1000, big), np.float32), np.zeros((1000, big), np.float32),
                  (np.zeros((1000, big), np.float32),))
    assert f._chunk_length(wide, 1000, 64) is None  # a chunk of under 16 steps: one pass
    assert length(0) is None
    assert length(100 * target, depth=f._CHUNK_MAX_DEPTH + 1) is None
    assert length(100 * target, accelerator=True) is None
