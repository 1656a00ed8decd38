"""The Elman cell's one-kernel loops (jax_rnn._kernels) against the numpy reference and
plain autodiff through scan.

The GPU (Pallas) kernels: on a CPU they run in Pallas's interpreter
(``JAX_RNN_KERNELS=interpret`` for these tests, the ``kernels`` fixture); on an NVIDIA GPU
(benchmarks/gpu_session.sh runs this file there) they run as compiled kernels. The CPU
(C++) kernels (jax_rnn._native, the ``native`` fixture): compiled here, which needs a C++
compiler (CI has one; without one these tests fail, saying so). Forward values are
compared with ``jax_rnn.reference.numpy_unroll`` (a float64 numpy loop written from the
equations), gradients with ``impl="scan"`` (plain autodiff), both at float32 rounding:
the kernels are float32 only.
"""

from __future__ import annotations

import functools
import os
import resource
import subprocess
import sys
from pathlib import Path

import jax
import jax.flatten_util
import jax.numpy as jnp
import numpy as np
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

import jax_rnn
from jax_rnn import _fused, _kernels, _native
from jax_rnn.reference import numpy_gru_unroll, numpy_lstm_unroll, numpy_unroll

from ._strategies import as64

ON_GPU = _kernels.MODE == "auto" and jax.default_backend() == "gpu"


@pytest.fixture
def kernels(monkeypatch):
    """The kernels on (interpreted on a CPU), and unroll's jit cache cleared before and
    after: it may hold traces made with the kernels off, or on."""
    if not ON_GPU:
        monkeypatch.setattr(_kernels, "MODE", "interpret")
    jax.clear_caches()
    yield
    jax.clear_caches()


@pytest.fixture
def native(monkeypatch):
    """The CPU kernels on (``JAX_RNN_KERNELS=auto`` on a CPU), and unroll's jit cache
    cleared before and after."""
    if jax.default_backend() != "cpu":
        pytest.fail("the C++ kernel tests run where JAX's default backend is a CPU")
    monkeypatch.setattr(_kernels, "MODE", "auto")
    # At every size: also where XLA would compile the loop natively (its own test below).
    monkeypatch.setattr(_fused, "_XLA_NATIVE_LOOP_BYTES", -1)
    assert _native.available(), f"the CPU kernels did not compile: {_native.unavailable_reason()}"
    jax.clear_caches()
    yield
    jax.clear_caches()


def _kernel_calls(fn, *args) -> int:
    """How many kernels the traced ``fn`` runs (a forward loop 1, with its gradient 2):
    Pallas calls, or calls of the C++ kernels' FFI targets."""
    text = str(jax.make_jaxpr(fn)(*args))
    return text.count("pallas_call") + text.count("target_name=jax_rnn_")


def _uses_kernel(fn, *args) -> bool:
    return _kernel_calls(fn, *args) > 0


def _problem(cell, steps, batch, inputs, hidden, scale, seed, readout=True):
    """float32 ``(params, xs, state0)``; ``batch=None``: one unbatched sequence."""
    params = cell.init(jax.random.key(seed), inputs, hidden, 2 if readout else None,
                       dtype=np.float32)
    params = params._replace(w_cell_state=params.w_cell_state * scale,
                             b_cell=params.b_cell + 0.1)
    rng = np.random.default_rng(seed)
    rows = () if batch is None else (batch,)
    xs = rng.normal(size=(steps, *rows, inputs)).astype(np.float32)
    state0 = rng.uniform(-1, 1, (*rows, hidden)).astype(np.float32)
    return params, xs, state0


def _loss(cell, params, xs, state0, impl, **kw):
    final, ys = jax_rnn.unroll(cell, params, xs, state0, impl=impl, **kw)
    return (jnp.sum(jnp.sin(ys.output)) + jnp.sum(ys.pre_activation ** 2)
            + jnp.sum(ys.state) + jnp.sum(final ** 2))


def _check(relu, steps, batch, inputs, hidden, scale, reverse, seed, kernels_run=(1, 2)):
    """Values against the numpy reference, every gradient against impl="scan" (float32
    rounding, relative to the largest entry where relu grows), and that the forward call
    runs ``kernels_run[0]`` kernels and its gradient ``kernels_run[1]``."""
    cell = jax_rnn.elman_relu if relu else jax_rnn.elman
    params, xs, state0 = _problem(cell, steps, batch, inputs, hidden, scale, seed)
    run = jax.jit(lambda p, x, s: jax_rnn.unroll(cell, p, x, s, reverse=reverse))
    grad = jax.grad(_loss, argnums=(1, 2, 3))
    assert _kernel_calls(run, params, xs, state0) == kernels_run[0]
    assert _kernel_calls(lambda *a: grad(cell, *a, "fused", reverse=reverse), params, xs,
                         state0) == kernels_run[1]
    final, ys = run(params, xs, state0)
    activation = (lambda a: np.maximum(a, 0.0)) if relu else np.tanh
    ref_final, ref = numpy_unroll(as64(params), xs.astype(np.float64),
                                  state0.astype(np.float64), reverse=reverse,
                                  activation=activation)
    big = max(1.0, float(np.abs(ref.state).max()))  # relu at scale 4 grows: relative
    for got, want in ((ys.state, ref.state), (ys.pre_activation, ref.pre_activation),
                      (ys.output, ref.output), (final, ref_final)):
        np.testing.assert_allclose(got, want, rtol=2e-5, atol=2e-5 * big)
    # Gradients of everything, and of all but the inputs: on CPUs the latter's backward
    # loop and weight gradients are one kernel (jax_rnn_elman_grads).
    fixed_xs = jax.grad(_loss, argnums=(1, 3))
    if _kernels.mode() == "cpu":
        for fn, target in ((grad, "jax_rnn_elman_backward"), (fixed_xs, "jax_rnn_elman_grads")):
            text = str(jax.make_jaxpr(lambda *a, fn=fn: fn(cell, *a, "fused", reverse=reverse))(
                params, xs, state0))
            assert f"target_name={target}" in text
    for fn in (grad, fixed_xs):
        fused = fn(cell, params, xs, state0, "fused", reverse=reverse)
        scan = fn(cell, params, xs, state0, "scan", reverse=reverse)
        for a, b in zip(jax.tree.leaves(fused), jax.tree.leaves(scan), strict=True):
            scale_b = max(1.0, float(np.abs(b).max()))
            np.testing.assert_allclose(a, b, rtol=2e-5, atol=2e-5 * scale_b)


# The fixture's state (kernels on) is the same for every example: nothing to reset.
@settings(max_examples=3, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(
    relu=st.booleans(),
    steps=st.integers(1, 12),
    batch=st.integers(1, 20),  # one kernel instance per row
    inputs=st.integers(1, 4),
    hidden=st.integers(1, 128),  # padded to 16, 32, 64 or 128 hidden units
    scale=st.sampled_from([0.5, 1.0, 4.0]),  # 4: tanh saturates, relu grows
    reverse=st.booleans(),
    seed=st.integers(0, 1000),
)
def test_kernel_values_and_gradients(kernels, relu, steps, batch, inputs, hidden, scale,
                                     reverse, seed):
    _check(relu, steps, batch, inputs, hidden, scale, reverse, seed)


@pytest.mark.parametrize(("relu", "steps", "batch", "hidden", "reverse"), [
    (False, 1, 1, 1, False),  # one step, one row, one unit (padded to 16)
    (True, 1, None, 1, True),  # unbatched: a batch of one row inside
    (False, 2, 3, 128, True),  # the widest hidden size the kernels take
])
def test_kernel_edge_cases(kernels, relu, steps, batch, hidden, reverse):
    _check(relu, steps, batch, 2, hidden, 4.0 if relu else 1.0, reverse, seed=7)


@pytest.mark.parametrize("setup", ["kernels", "native"])
@pytest.mark.parametrize("cell", [jax_rnn.elman, jax_rnn.elman_relu])
def test_kernels_with_no_batch_rows(setup, request, cell):
    """A batch of zero rows, and a jax.vmap over zero sequences (also around another
    vmap), give empty results and zero gradients (a Pallas grid of none crashed: a
    review of the GPU paths); a vmap over three sequences afterwards still runs the
    kernels and agrees with scan."""
    request.getfixturevalue(setup)
    params = cell.init(jax.random.key(0), 3, 8, 2, dtype=np.float32)

    def loss(p, x):
        return jnp.sum(jax_rnn.unroll(cell, p, x)[1].output)

    final, ys = jax_rnn.unroll(cell, params, jnp.zeros((5, 0, 3), jnp.float32))
    assert ys.output.shape == (5, 0, 2) and final.shape == (0, 8)
    grads = jax.grad(loss)(params, jnp.zeros((5, 0, 3), jnp.float32))
    assert all(not np.any(g) for g in jax.tree.leaves(grads))
    per_sequence = jax.vmap(jax.value_and_grad(loss, argnums=1), in_axes=(None, 0))
    values, d_xs = per_sequence(params, jnp.zeros((0, 5, 3), jnp.float32))
    assert values.shape == (0,) and d_xs.shape == (0, 5, 3)
    nested = jax.vmap(jax.vmap(lambda x: jax_rnn.unroll(cell, params, x)[1].output))
    for empty in ((0, 4, 5, 3), (4, 0, 5, 3)):  # the vmap of size zero outside, inside
        assert nested(jnp.zeros(empty, jnp.float32)).shape == (*empty[:3], 2)

    xs = np.random.default_rng(0).normal(size=(3, 5, 3)).astype(np.float32)
    assert _uses_kernel(lambda x: per_sequence(params, x), xs)
    values, d_xs = per_sequence(params, xs)
    for impl_values, ref in zip((values, d_xs), jax.vmap(jax.value_and_grad(
            lambda p, x: jnp.sum(jax_rnn.unroll(cell, p, x, impl="scan")[1].output),
            argnums=1), in_axes=(None, 0))(params, xs), strict=True):
        np.testing.assert_allclose(impl_values, ref, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("setup", ["kernels", "native"])
def test_kernel_backward_in_chunks(setup, request, monkeypatch):
    """On CPUs the backward pass runs in chunks of steps: the backward kernel then runs
    once per chunk (2 chunks of 3 steps and a remainder of 1 here)."""
    request.getfixturevalue(setup)
    monkeypatch.setattr(jax_rnn._fused, "_chunk_length", lambda *a: 3)
    _check(False, 7, 2, 2, 5, 1.0, False, seed=8, kernels_run=(1, 3))


def test_kernel_choice_follows_the_compiling_platform(monkeypatch):
    """With the kernels on for a GPU default backend, each call still chooses by the
    platform it is compiled for: here (a CPU) the plain scan, same values as impl="scan"
    (on a GPU, the kernels)."""
    monkeypatch.setattr(_kernels, "MODE", "auto")
    monkeypatch.setattr(_kernels, "mode", lambda: "gpu")
    jax.clear_caches()
    try:
        cell = jax_rnn.elman
        params, xs, state0 = _problem(cell, 5, 3, 2, 6, 1.0, seed=9)
        grad = jax.grad(_loss, argnums=(1, 2, 3))
        jaxpr = str(jax.make_jaxpr(lambda *a: grad(cell, *a, "fused"))(params, xs, state0))
        assert jaxpr.count("platform_index") == 2  # the forward loop and the backward loop
        for a, b in zip(jax.tree.leaves(grad(cell, params, xs, state0, "fused")),
                        jax.tree.leaves(grad(cell, params, xs, state0, "scan")), strict=True):
            np.testing.assert_allclose(a, b, rtol=2e-5, atol=2e-5)
    finally:
        jax.clear_caches()


@pytest.mark.parametrize("setup", ["kernels", "native"])
def test_kernel_through_stack_vmap_and_second_order(setup, request):
    """Through a bidirectional stack (16 hidden units: no padding), under vmap, and
    reverse-over-reverse (the kernels' custom_jvp), against impl="scan"."""
    request.getfixturevalue(setup)
    model = jax_rnn.stack([jax_rnn.bidirectional(jax_rnn.elman), jax_rnn.elman_relu])
    params = model.init(jax.random.key(4), 3, 16, dtype=np.float32)
    xs = np.random.default_rng(4).normal(size=(5, 2, 17, 3)).astype(np.float32)

    def loss(p, x, impl):
        return jnp.sum(jnp.tanh(jax_rnn.unroll(model, p, x, impl=impl)[1].output))

    per_row = jax.vmap(jax.grad(loss), in_axes=(None, 1, None))  # over the 2 of (5, 2, 17)
    assert _uses_kernel(lambda p: per_row(p, xs, "fused"), params)
    for a, b in zip(jax.tree.leaves(per_row(params, xs, "fused")),
                    jax.tree.leaves(per_row(params, xs, "scan")), strict=True):
        np.testing.assert_allclose(a, b, rtol=1e-4, atol=2e-5 * max(1.0, float(abs(b).max())))

    cell, p1 = jax_rnn.elman, params[0].forward
    v = jax.tree.map(jnp.ones_like, p1)

    def hvp(impl):
        def g(p):
            grads = jax.grad(lambda q: jnp.sum(
                jax_rnn.unroll(cell, q, xs[:, 0], impl=impl)[1].state ** 2))(p)
            return jnp.vdot(jax.flatten_util.ravel_pytree(grads)[0],
                            jax.flatten_util.ravel_pytree(v)[0])
        return jax.grad(g)(p1)

    for a, b in zip(jax.tree.leaves(hvp("fused")), jax.tree.leaves(hvp("scan")), strict=True):
        np.testing.assert_allclose(a, b, rtol=1e-3, atol=1e-4 * max(1.0, float(abs(b).max())))


_WHERE = [
    ("eligible", jax_rnn.elman, {}),  # the same call without what each other case adds
    ("masked steps", jax_rnn.elman, {"seq_lengths": np.array([3, 1])}),
    ("resets", jax_rnn.elman, {"resets": np.eye(4, 2, dtype=bool)}),
    ("truncation", jax_rnn.elman, {"truncate": 2}),
    ("float64", jax_rnn.elman, {"dtype": np.float64}),
    ("hidden over MAX_HIDDEN", jax_rnn.elman, {"hidden": _kernels.MAX_HIDDEN + 1}),
    ("two batch axes", jax_rnn.elman, {"batch": (2, 2)}),
    ("another activation", jax_rnn.make_elman(jax.nn.sigmoid), {}),
    ("GRU", jax_rnn.gru, {}),  # C++ kernels only
    ("LSTM", jax_rnn.lstm, {}),  # C++ kernels only
    ("LSTM over its max hidden", jax_rnn.lstm, {"hidden": 129}),
    ("impl=scan", jax_rnn.elman, {"impl": "scan"}),
]
# Both kinds of kernel share the choice (_fused._kernel) except the size limit
# (_kernels.fits) and the gated cells (CPUs only): the C++ kernels run the cases around
# those, and one mask and dtype.
_NATIVE_WHERE = ("eligible", "hidden over MAX_HIDDEN", "LSTM", "LSTM over its max hidden",
                 "masked steps", "float64", "GRU")


@pytest.mark.parametrize(("setup", "what", "cell", "kw"),
                         [("kernels", *case) for case in _WHERE]
                         + [("native", *case) for case in _WHERE if case[0] in _NATIVE_WHERE])
def test_kernels_only_where_they_apply(setup, request, what, cell, kw):
    """Everything the kernels do not cover runs XLA's loops, forward and backward (their
    values against impl="scan" and the numpy references: tests/test_fused.py and the
    other test files); the "eligible" case, the same call without any of it, runs the
    kernels, and so do a hidden size over MAX_HIDDEN, the GRU and the LSTM (up to 128
    hidden units; over it, the forward kernel alone) on a CPU."""
    request.getfixturevalue(setup)
    eligible = what == "eligible" or (setup == "native"
                                      and what in ("hidden over MAX_HIDDEN", "LSTM", "GRU"))
    kw = dict(kw)
    dtype, hidden = kw.pop("dtype", np.float32), kw.pop("hidden", 5)
    batch = kw.pop("batch", (2,))
    params = cell.init(jax.random.key(5), 3, hidden, dtype=dtype)
    xs = np.random.default_rng(5).normal(size=(4, *batch, 3)).astype(dtype)

    def loss(p):
        return jnp.sum(jnp.sin(jax_rnn.unroll(cell, p, xs, **kw)[1].state))

    assert _uses_kernel(jax.grad(loss), params) == eligible
    if what == "LSTM over its max hidden" and setup == "native":
        # ... where a call that is not differentiated runs the forward kernel
        assert _kernel_calls(loss, params) == 1


def test_kernels_mode_from_the_environment(monkeypatch):
    """JAX_RNN_KERNELS (read at import): "auto" runs the kernels on NVIDIA GPUs and CPUs
    (where the C++ kernels compile), "off" nowhere; any other value is a clear error
    naming the variable and the choices."""
    assert _kernels._read_mode({}) == "auto"
    assert _kernels._read_mode({"JAX_RNN_KERNELS": " OFF "}) == "off"
    with pytest.raises(ValueError, match=r"JAX_RNN_KERNELS must be \"auto\", \"off\" or "
                                         r"\"interpret\", got 'on'"):
        _kernels._read_mode({"JAX_RNN_KERNELS": "on"})
    monkeypatch.setattr(_kernels, "MODE", "auto")
    assert _kernels.mode() == ("gpu" if ON_GPU else "cpu")
    monkeypatch.setattr(_kernels, "MODE", "off")
    assert _kernels.mode() == "off"


@pytest.mark.parametrize(("batch", "hidden"), [(None, 1), (3, 17), (1, 128)])
def test_kernels_lower_to_triton_for_cuda(monkeypatch, batch, hidden):
    """The gradient of an unroll lowered for an NVIDIA GPU (lowering only, which runs on
    any machine: Pallas writes the Triton kernels in Python) holds both kernels as Triton
    calls: a kernel that Triton's lowering rejects (e.g. an array that is not a power of
    two) fails here, without a GPU."""
    monkeypatch.setattr(_kernels, "MODE", "auto")
    monkeypatch.setattr(_kernels, "mode", lambda: "gpu")
    jax.clear_caches()
    try:
        params, xs, state0 = _problem(jax_rnn.elman, 5, batch, 2, hidden, 1.0, seed=10)
        grad = jax.jit(jax.grad(lambda *a: _loss(jax_rnn.elman, *a, "fused", reverse=True),
                                argnums=(0, 1, 2)))
        text = grad.trace(params, xs, state0).lower(lowering_platforms=("cuda",)).as_text()
        assert text.count("xla.gpu.triton") == 2
    finally:
        jax.clear_caches()


# The C++ kernels: a step is split into panels of 16 columns and blocks of 8 rows, so
# sizes around those (and 1) cover the tails; steps of at least 2^15 multiply-adds
# (batch * (inputs + hidden) * hidden forward, batch * hidden^2 backward) are shared with
# a second thread.
@settings(max_examples=4)  # beside the explicit edge cases below
@given(
    relu=st.booleans(),
    steps=st.integers(1, 12),
    batch=st.one_of(st.none(), st.integers(1, 20)),
    inputs=st.integers(1, 4),
    hidden=st.integers(1, 40),
    scale=st.sampled_from([0.5, 1.0, 4.0]),  # 4: tanh saturates, relu grows
    reverse=st.booleans(),
    seed=st.integers(0, 1000),
)
def test_cpu_kernel_values_and_gradients(relu, steps, batch, inputs, hidden, scale, reverse,
                                         seed):
    assert jax.default_backend() == "cpu", "the C++ kernel tests run on a CPU backend"
    with pytest.MonkeyPatch.context() as mp:
        mp.setattr(_kernels, "MODE", "auto")
        mp.setattr(_fused, "_XLA_NATIVE_LOOP_BYTES", -1)  # the kernels at every size
        jax.clear_caches()
        try:
            _check(relu, steps, batch, inputs, hidden, scale, reverse, seed)
        finally:
            jax.clear_caches()


@pytest.mark.parametrize(("relu", "steps", "batch", "hidden", "reverse"), [
    (False, 1, 1, 1, False),  # one step, one row, one unit
    (True, 1, None, 1, True),  # unbatched
    (False, 3, 9, 17, True),  # a row block of 8 and 1, panels of 16 and 1
    (True, 2, 8, 16, False),  # exact blocks
    (False, 20, 32, 64, False),  # shared with a second thread (32 * 64^2 = 2^17)
    (False, 20, 3, 160, True),  # shared (3 * 160^2 > 2^16), over the GPU's MAX_HIDDEN
    (False, 200, 5, 100, True),  # shared, 200 steps, a 5-row block, a 4-column panel
])
def test_cpu_kernel_edge_cases(native, relu, steps, batch, hidden, reverse):
    """(ReLU at scale 4 over 20 steps is left out: its float32 gradients differ from
    float64's by about 2% on every path, XLA's loops and impl="scan" alike.)"""
    _check(relu, steps, batch, 2, hidden, 4.0 if relu else 1.0, reverse, seed=11)


def _numpy_grads(relu, reverse, h, d_state, d_pre, w_t, d_final, xs, h0):
    """``(d_w_in, d_b, d_w, d_h0)`` of an Elman cell's backward pass, a float64 loop over
    the steps from the equations: ``d_g_t = act'(h_t) (d_h_t + d_state_t) + d_pre_t``,
    ``d_h_{t-1} = d_g_t @ w_t``, and ``sum_t x_t^T d_g_t``, ``sum_t d_g_t``,
    ``sum_t h_{t-1}^T d_g_t`` (rows of a batch summed too; ``h_{-1} = h0``)."""
    f64 = [None if a is None else np.asarray(a, np.float64)
           for a in (h, d_state, d_pre, w_t, d_final, xs, h0)]
    h, d_state, d_pre, w_t, d_h, xs, h0 = f64
    d_w_in, d_b, d_w = (np.zeros((xs.shape[-1], h.shape[-1])), np.zeros(h.shape[-1]),
                        np.zeros(w_t.shape))
    steps = range(len(h)) if reverse else reversed(range(len(h)))
    for t in steps:
        d = d_h if d_state is None else d_h + d_state[t]
        d_g = d * (h[t] > 0) if relu else d * (1 - h[t] ** 2)
        d_g = d_g if d_pre is None else d_g + d_pre[t]
        h_in = h0 if (t == len(h) - 1 if reverse else t == 0) else h[t + 1 if reverse else t - 1]
        d_w_in += np.reshape(xs[t], (-1, xs.shape[-1])).T @ np.reshape(d_g, (-1, d_g.shape[-1]))
        d_w += np.reshape(h_in, (-1, h.shape[-1])).T @ np.reshape(d_g, (-1, d_g.shape[-1]))
        d_b += np.reshape(d_g, (-1, d_g.shape[-1])).sum(0)
        d_h = d_g @ w_t
    return d_w_in, d_b, d_w, d_h


@pytest.mark.parametrize(("steps", "batch", "inputs", "hidden"), [
    (0, 3, 2, 5),  # no steps: d_h0 = d_final, zero weight gradients
    (1, 1, 1, 1),  # one step, one row, one unit
    (5, None, 9, 17),  # unbatched; blocks of 8 input rows and 1; column vectors 16 + 1
    (7, 3, 17, 40),  # three blocks of input rows; a column pair of 16 + 16, then 8
    (40, 32, 20, 128),  # 16-step chunks (the last of 8), shared with a second thread
    (300, 2, 3, 33),  # one chunk of all 300 steps; a column pair of 32, then 1
    (3, 600, 5, 128),  # chunks of one step (a step of 600 x 128 is over 2^16 floats)
])
def test_cpu_grads_kernel_against_a_numpy_loop(native, steps, batch, inputs, hidden):
    """The backward loop with its weight gradients in one kernel (_native.grads, for
    inputs that are not differentiated), both activations, both directions, each of the
    states' and pre-activations' cotangents zero (None) or not: against a float64 numpy
    loop, at float32 rounding (relative to each result's largest entry)."""
    rng = np.random.default_rng(steps + hidden)
    rows = () if batch is None else (batch,)
    for relu, reverse, (with_state, with_pre) in zip(
            (False, True, False, True), (False, True, True, False),
            ((True, False), (False, True), (True, True), (False, False)), strict=True):
        h = rng.uniform(-1, 1, (steps, *rows, hidden)).astype(np.float32)
        h = np.maximum(h, 0) if relu else h
        d_state = rng.normal(size=h.shape).astype(np.float32) if with_state else None
        d_pre = rng.normal(size=h.shape).astype(np.float32) if with_pre else None
        w_t = (rng.normal(size=(hidden, hidden)) / np.sqrt(hidden)).astype(np.float32)
        d_final, h0 = (rng.normal(size=(*rows, hidden)).astype(np.float32) for _ in range(2))
        xs = rng.normal(size=(steps, *rows, inputs)).astype(np.float32)
        activation = _kernels.ACTIVATIONS[relu]
        kernel = activation, dict(_fused._BACK_FROM_OUTPUT)[activation]
        args = (h, d_state, d_pre, w_t, d_final, xs, h0)
        unfused = functools.partial(_kernels._grads_scan, kernel, reverse, None)  # vmap only
        fn = functools.partial(_kernels.backward_grads, kernel, reverse, unfused)
        assert "target_name=jax_rnn_elman_grads" in str(jax.make_jaxpr(fn)(*args))
        got = jax.jit(fn)(*args)
        want = _numpy_grads(relu, reverse, *args)
        for a, b in zip(got, want, strict=True):
            assert a.shape == b.shape and a.dtype == np.float32
            np.testing.assert_allclose(a, b, rtol=2e-5, atol=2e-5 * max(1.0, np.abs(b).max()))


@pytest.mark.parametrize("chunk", [None, 4])
def test_cpu_grads_kernel_under_vmap_and_second_order(native, monkeypatch, chunk):
    """Gradients of the weights alone (inputs not differentiated): per-example weights
    under vmap (each element's own weight gradients: the fused path's general backward
    pass, vmapped, in chunks where it takes them: here 2 of 4 steps and 1), and
    reverse-over-reverse (the tangents of the same written with scan), against
    impl="scan"."""
    if chunk is not None:
        monkeypatch.setattr(jax_rnn._fused, "_chunk_length", lambda *a: chunk)
    cell = jax_rnn.elman_relu
    params, xs, _ = _problem(cell, 9, 4, 3, 20, 1.0, seed=21, readout=False)
    per_example = jax.tree.map(lambda a: jnp.stack([a, 0.5 * a, -a]), params)

    def loss(p, impl):
        return jnp.sum(jnp.sin(jax_rnn.unroll(cell, p, xs, impl=impl)[1].state))

    per = jax.vmap(jax.grad(loss), in_axes=(0, None))
    one = str(jax.make_jaxpr(jax.grad(loss), static_argnums=1)(params, "fused"))
    vmapped = str(jax.make_jaxpr(per, static_argnums=1)(per_example, "fused"))
    assert "target_name=jax_rnn_elman_grads" in one
    assert "target_name=jax_rnn_elman_grads" not in vmapped
    assert vmapped.count("target_name=jax_rnn_elman_backward") == (1 if chunk is None else 2)
    v = jax.tree.map(jnp.ones_like, params)

    def hvp(p, impl):
        g = jax.grad(loss)(p, impl)
        return jnp.vdot(jax.flatten_util.ravel_pytree(g)[0], jax.flatten_util.ravel_pytree(v)[0])

    for fn, p, tol in ((per, per_example, 2e-5), (jax.grad(hvp), params, 1e-4)):
        for a, b in zip(jax.tree.leaves(fn(p, "fused")), jax.tree.leaves(fn(p, "scan")),
                        strict=True):
            np.testing.assert_allclose(a, b, rtol=tol, atol=tol * max(1.0, float(abs(b).max())))


@pytest.mark.parametrize(("name", "batch", "inputs", "hidden", "native_loop"), [
    ("elman_relu", None, 1, 2, True),  # the notebook's size: 24 bytes of weights
    ("lstm", 1, 1, 2, True),  # 96 bytes
    ("elman", 1, 1, 8, True),  # 288 bytes
    ("lstm", 1, 1, 8, False),  # 1152 bytes
    ("gru", 1, 4, 16, False),  # 3840 bytes
    ("elman", 8, 1, 2, False),  # 8 rows
])
def test_cpu_kernels_left_out_where_xla_compiles_the_loop(monkeypatch, name, batch, inputs,
                                                          hidden, native_loop):
    """One batch row and at most _XLA_NATIVE_LOOP_BYTES of weights: XLA compiles the loop
    into one native kernel itself (a call marked xla_cpu_small_call, with the kernels off),
    and jax_rnn leaves its C++ kernels out there (forward and gradient); elsewhere XLA runs
    the loop op by op and the kernels run. Values against impl="scan"."""
    monkeypatch.setattr(_kernels, "MODE", "off")
    jax.clear_caches()
    cell = getattr(jax_rnn, name)
    params = cell.init(jax.random.key(5), inputs, hidden, dtype=np.float32)
    rows = () if batch is None else (batch,)
    xs = np.random.default_rng(5).normal(size=(20, *rows, inputs)).astype(np.float32)

    def run(p, x):
        return jax_rnn.unroll(cell, p, x)[1].state

    xla = jax.jit(run).lower(params, xs).compile().as_text()
    assert ("xla_cpu_small_call" in xla) == native_loop
    monkeypatch.setattr(_kernels, "MODE", "auto")
    jax.clear_caches()
    try:
        grad = jax.grad(lambda p, impl: jnp.sum(jnp.sin(
            jax_rnn.unroll(cell, p, xs, impl=impl)[1].state)))
        assert _kernel_calls(run, params, xs) == (0 if native_loop else 1)
        assert _kernel_calls(lambda p: grad(p, "fused"), params) == (0 if native_loop else 2)
        # A vmap over 8 such sequences: XLA's loop has 8 rows, and the kernel runs, folded.
        many = np.stack([xs] * 8)
        assert _kernel_calls(jax.vmap(run, in_axes=(None, 0)), params, many) == 1
        np.testing.assert_allclose(run(params, xs),
                                   jax_rnn.unroll(cell, params, xs, impl="scan")[1].state,
                                   rtol=2e-5, atol=2e-5)
        for a, b in zip(jax.tree.leaves(grad(params, "fused")),
                        jax.tree.leaves(grad(params, "scan")), strict=True):
            np.testing.assert_allclose(a, b, rtol=2e-5, atol=2e-5 * max(1.0, np.abs(b).max()))
    finally:
        jax.clear_caches()


@pytest.mark.parametrize("name", ["elman", "elman_relu", "gru", "lstm"])
def test_inputs_gradient_after_a_call_that_did_not_want_it(native, name):
    """A review's sequence: d/dxs, then d/dparams only, then d/dxs of a loss that reads
    fewer outputs. The third gave zeros for the Elman cells (whose backward kernel skips
    the inputs' gradient when it is not wanted): JAX reuses the forward rule's trace of
    the first call with the residuals' tree structure of the second's, and that structure
    carried the flag. Compared with impl="scan"."""
    cell = getattr(jax_rnn, name)
    params = cell.init(jax.random.key(0), 2, 3, dtype=jnp.float32)  # the kernels' dtype
    xs = jax.random.normal(jax.random.key(1), (2, 4, 2), jnp.float32)

    def loss(p, x, final_only=False, impl="fused"):
        final, ys = jax_rnn.unroll(cell, p, x, impl=impl)
        return sum(jnp.sum(f) for f in jax.tree.leaves(final)) + (
            0.0 if final_only else jnp.sum(ys.state))

    for jit in (False, True):
        jax.clear_caches()
        grad = (jax.jit(jax.grad(loss, argnums=1), static_argnums=(2, 3)) if jit
                else jax.grad(loss, argnums=1))
        grad(params, xs)  # 1. the inputs' gradient
        (jax.jit(jax.grad(loss)) if jit else jax.grad(loss))(params, xs)  # 2. params only
        got = grad(params, xs, True)  # 3. the inputs' again, another loss
        want = jax.grad(loss, argnums=1)(params, xs, True, "scan")
        assert float(jnp.max(jnp.abs(want))) > 0.1
        np.testing.assert_allclose(got, want, rtol=2e-5, atol=2e-6)


def test_cpu_kernel_thread_count(native):
    """A loop is shared by one more thread per 2^15 multiply-adds of a step, at most one
    per panel and the pool's size (the edge cases above rely on it)."""
    assert _native.threads(8 * (32 + 64) * 64, 4, 2) == 2  # T=10000, B=8 forward
    assert _native.threads(8 * 64 * 64, 4, 2) == 2  # ... and backward: exactly 2^15
    assert _native.threads(4 * (16 + 64) * 64, 4, 2) == 1  # B=4, H=64: alone
    assert _native.threads(5 * (2 + 100) * 100, 7, 2) == 2  # the 200-step edge case
    assert _native.threads(2**20, 8, 16) == 8  # capped by the panels
    assert _native.threads(2**20, 64, 2) == 2  # ... and by the pool
    assert _native.threads(2**20, 64, 0) == 1  # a pool that reports no threads


def test_cpu_kernel_propagates_nan(native):
    """A NaN in the inputs reaches the same states as in XLA's loop (tanh(NaN) and
    relu(NaN) are NaN); the other rows are untouched."""
    for cell in (jax_rnn.elman, jax_rnn.elman_relu):
        params, xs, state0 = _problem(cell, 4, 3, 2, 5, 1.0, seed=12)
        xs[1, 0, 0] = np.nan
        got = jax_rnn.unroll(cell, params, xs, state0)[1].state
        want = jax_rnn.unroll(cell, params, xs, state0, impl="scan")[1].state
        np.testing.assert_array_equal(np.isnan(got), np.isnan(want))
        assert np.isnan(got[1:, 0]).all() and not np.isnan(got[:, 1:]).any()


def test_cpu_kernel_under_vmap(native):
    """A vmap over unbatched sequences with shared weights folds its axis into the
    kernel's batch (one call), and so does one over batches of sequences (reversed);
    one over per-example weights runs a call per example; nested vmaps fold both. Values
    and gradients against impl="scan"."""
    cell = jax_rnn.elman
    params, xs, _ = _problem(cell, 6, 4, 3, 7, 1.0, seed=13)  # xs (6, 4, 3)
    per_example = jax.tree.map(lambda a: jnp.stack([a, 0.5 * a, -a, 2 * a]), params)

    def loss(p, x, impl):
        return jnp.sum(jnp.sin(jax_rnn.unroll(cell, p, x, impl=impl)[1].state))

    def loss_reversed(p, x, impl):
        return jnp.sum(jnp.sin(jax_rnn.unroll(cell, p, x, impl=impl, reverse=True)[1].state))

    batched = np.stack([xs, 2 * xs])  # (2, 6, 4, 3): each element a batch of 4 sequences
    cases = [
        (jax.vmap(jax.value_and_grad(loss), in_axes=(None, 1, None)), params, xs),
        (jax.vmap(jax.value_and_grad(loss_reversed), in_axes=(None, 0, None)), params, batched),
        (jax.vmap(jax.value_and_grad(loss), in_axes=(0, 1, None)), per_example, xs),
        (jax.vmap(jax.vmap(jax.value_and_grad(loss), in_axes=(None, 0, None)),
                  in_axes=(None, 0, None)), params, np.moveaxis(xs, 1, 0).reshape(2, 2, 6, 3)),
    ]
    for fn, p, x in cases:
        assert _kernel_calls(lambda p, x, fn=fn: fn(p, x, "fused"), p, x) == 2
        for a, b in zip(jax.tree.leaves(fn(p, x, "fused")), jax.tree.leaves(fn(p, x, "scan")),
                        strict=True):
            np.testing.assert_allclose(a, b, rtol=2e-5, atol=2e-5 * max(1.0, float(abs(b).max())))


def test_cpu_kernels_fall_back_with_a_warning(monkeypatch, tmp_path):
    """Where the C++ source cannot be compiled (here a compiler that always fails), jax_rnn
    warns once with the reason and runs XLA's loops: the same values as impl="scan"."""
    monkeypatch.setattr(_kernels, "MODE", "auto")
    monkeypatch.setenv("CXX", "false")
    monkeypatch.setenv("JAX_RNN_CACHE_DIR", str(tmp_path))
    _native._load.cache_clear()
    _native._warn_once.cache_clear()
    jax.clear_caches()
    try:
        with pytest.warns(UserWarning, match=r"jax_rnn: the CPU kernels for the Elman, GRU "
                                             r"and LSTM cells are not available \(false "
                                             r"could not compile elman.cc, gru.cc, lstm.cc.*"
                                             r"JAX_RNN_KERNELS=off"):
            assert _kernels.mode() == "off"
        cell = jax_rnn.elman
        params, xs, state0 = _problem(cell, 5, 2, 3, 4, 1.0, seed=14)
        run = jax.jit(lambda p, x, s: jax_rnn.unroll(cell, p, x, s))
        assert _kernel_calls(run, params, xs, state0) == 0
        np.testing.assert_allclose(run(params, xs, state0)[1].state,
                                   jax_rnn.unroll(cell, params, xs, state0,
                                                  impl="scan")[1].state, rtol=1e-6, atol=1e-6)
        # no half-written library left behind (the lock file that serialises compiles is)
        assert [p.suffix for p in tmp_path.iterdir()] in ([], [".lock"])
    finally:
        monkeypatch.undo()
        _native._load.cache_clear()
        _native._warn_once.cache_clear()
        jax.clear_caches()


def test_cpu_kernel_tanh_and_relu_pointwise(native):
    """The kernels' own tanh and relu, through the forward kernel with one unit, w_in = 1,
    w = 0, one step and each value in its own row (so h = act(x)): within 2.5 float32 ulp
    of float64 tanh on a grid over [-20, 20] and at tiny values, exact at 0, +-inf and
    NaN."""
    grid = np.concatenate([np.linspace(-20, 20, 40001), [0.4, -0.4, 0.3999999, 1e-30, -1e-7,
                                                        3e-4, 9.0, 87.0, -0.0, np.inf,
                                                        -np.inf, np.nan]]).astype(np.float32)
    xs = grid[None, :, None]  # (T, B, I) = (1, values, 1)
    one, zero = np.ones((1, 1), np.float32), np.zeros((1, 1), np.float32)
    bias, h0 = np.zeros((1,), np.float32), np.zeros((grid.size, 1), np.float32)
    for code, want in ((0, np.tanh(grid.astype(np.float64))), (1, np.maximum(grid, 0))):
        (h,) = jax.jit(_native.forward(code, False))(xs, one, bias, zero, h0)
        got = np.asarray(h)[0, :, 0]
        finite = np.isfinite(want) & (want != 0)
        ulp = np.spacing(np.abs(want[finite]).astype(np.float32))
        assert (np.abs(got[finite] - want[finite]) <= 2.5 * ulp).all()
        np.testing.assert_array_equal(got[~finite], want[~finite].astype(np.float32))


def test_cpu_kernel_checks_its_shapes(native):
    """Called with inconsistent shapes (jax_rnn never does), a kernel fails with an error
    naming itself and the operand instead of reading out of bounds."""
    xs, h0 = np.zeros((3, 2, 4), np.float32), np.zeros((2, 5), np.float32)
    w, bias = np.zeros((5, 5), np.float32), np.zeros((5,), np.float32)
    with pytest.raises(Exception, match="jax_rnn_elman_forward: w_in has the wrong shape"):
        jax.block_until_ready(_native.forward(0, False)(xs, np.zeros((5, 5), np.float32),
                                                        bias, w, h0))
    with pytest.raises(Exception, match="jax_rnn_elman_backward: d_final has the wrong shape"):
        h = np.zeros((3, 2, 5), np.float32)
        jax.block_until_ready(_native.backward(0, False)(h, h, h, w, np.zeros((3, 5),
                                                                              np.float32)))


def test_cpu_kernel_without_bias(native):
    """A cell without biases runs the kernels (a zero bias inside) with the reference's
    values. (Parameters of mixed dtypes never reach them: unroll rejects them.)"""
    cell = jax_rnn.elman
    params, xs, state0 = _problem(cell, 6, 3, 2, 9, 1.0, seed=15)
    params = params._replace(b_cell=None, b_output=None)
    run = jax.jit(lambda p, x, s: jax_rnn.unroll(cell, p, x, s))
    assert _kernel_calls(run, params, xs, state0) == 1
    ref = numpy_unroll(as64(params), xs.astype(np.float64), state0.astype(np.float64))[1]
    np.testing.assert_allclose(run(params, xs, state0)[1].state, ref.state, rtol=2e-5,
                               atol=2e-5)


def test_kernels_off_with_several_devices(monkeypatch):
    """With several devices jit may partition a call, which it cannot do around a kernel:
    "auto" then runs XLA's loops."""
    monkeypatch.setattr(_kernels, "MODE", "auto")
    monkeypatch.setattr(jax, "device_count", lambda *a: 2)
    assert _kernels.mode() == "off"


# The LSTM's and GRU's C++ kernels (jax_rnn/_csrc/lstm.cc, gru.cc): the forward loop's
# panels are 16 hidden units (all gates) in blocks of 6 rows; the backward loop's are 16
# columns in blocks of 8 rows.


_GATED_REFERENCES = {"lstm": numpy_lstm_unroll, "gru": numpy_gru_unroll}


def _gated_problem(steps, batch, inputs, hidden, scale, seed, biases="both", cell="lstm"):
    """float32 ``(params, xs, state0)`` of an LSTM or GRU with a readout; ``batch=None``:
    one unbatched sequence; ``scale`` multiplies the recurrent weights and the inputs (4:
    gates saturate); ``biases``: "both", "none", or "input" or "state" (that one only)."""
    model = getattr(jax_rnn, cell)
    params = model.init(jax.random.key(seed), inputs, hidden, 2, dtype=np.float32)
    rng = np.random.default_rng(seed)
    params = params._replace(
        w_cell_state=params.w_cell_state * scale,
        b_cell_input=None if biases in ("none", "state") else
        (0.3 * rng.normal(size=params.b_cell_input.shape)).astype(np.float32),
        b_cell_state=None if biases in ("none", "input") else
        (0.3 * rng.normal(size=params.b_cell_state.shape)).astype(np.float32))
    rows = () if batch is None else (batch,)
    xs = (scale * rng.normal(size=(steps, *rows, inputs))).astype(np.float32)
    state0 = jax.tree.map(lambda a: rng.uniform(-1, 1, a.shape).astype(np.float32),
                          model.initial_state(params, rows))
    return params, xs, state0


def _gated_loss(params, xs, state0, impl, cell="lstm", **kw):
    final, ys = jax_rnn.unroll(getattr(jax_rnn, cell), params, xs, state0, impl=impl, **kw)
    return (jnp.sum(jnp.sin(ys.output)) + jnp.sum(ys.pre_activation ** 2)
            + jnp.sum(ys.state) + sum(jnp.sum(jnp.cos(f)) for f in jax.tree.leaves(final)))


def _check_gated(steps, batch, inputs, hidden, scale, reverse, seed, kernels_run=(1, 2),
                 biases="both", cell="lstm"):
    """An LSTM's or GRU's values against the numpy reference, every gradient against
    impl="scan" (float32 rounding), and the kernels each call runs."""
    params, xs, state0 = _gated_problem(steps, batch, inputs, hidden, scale, seed, biases,
                                        cell)
    model = getattr(jax_rnn, cell)
    run = jax.jit(lambda p, x, s: jax_rnn.unroll(model, p, x, s, reverse=reverse))
    grad = jax.grad(functools.partial(_gated_loss, cell=cell), argnums=(0, 1, 2))
    assert _kernel_calls(run, params, xs, state0) == kernels_run[0]
    assert _kernel_calls(lambda *a: grad(*a, "fused", reverse=reverse), params, xs,
                         state0) == kernels_run[1]
    final, ys = run(params, xs, state0)
    ref_final, ref = _GATED_REFERENCES[cell](
        as64(params), xs.astype(np.float64), jax.tree.map(lambda a: a.astype(np.float64),
                                                          state0), reverse=reverse)
    for got, want in ((ys.state, ref.state), (ys.pre_activation, ref.pre_activation),
                      (ys.output, ref.output),
                      *zip(jax.tree.leaves(final),
                           [ref_final] if cell == "gru" else list(ref_final), strict=True)):
        np.testing.assert_allclose(got, want, rtol=2e-5,
                                   atol=2e-5 * max(1.0, float(np.abs(want).max())))
    fused = grad(params, xs, state0, "fused", reverse=reverse)
    scan = grad(params, xs, state0, "scan", reverse=reverse)
    for a, b in zip(jax.tree.leaves(fused), jax.tree.leaves(scan), strict=True):
        np.testing.assert_allclose(a, b, rtol=2e-5, atol=2e-5 * max(1.0, float(abs(b).max())))


@settings(max_examples=4, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(
    cell=st.sampled_from(["lstm", "gru"]),
    steps=st.integers(1, 12),
    batch=st.one_of(st.none(), st.integers(1, 20)),
    inputs=st.integers(1, 4),
    hidden=st.integers(1, 40),
    scale=st.sampled_from([0.5, 1.0, 4.0]),  # 4: gates saturate
    reverse=st.booleans(),
    biases=st.sampled_from(["both", "none", "input", "state"]),
    seed=st.integers(0, 1000),
)
def test_cpu_gated_kernel_values_and_gradients(native, cell, steps, batch, inputs, hidden,
                                               scale, reverse, biases, seed):
    _check_gated(steps, batch, inputs, hidden, scale, reverse, seed, biases=biases, cell=cell)


@pytest.mark.parametrize("cell", ["lstm", "gru"])
@pytest.mark.parametrize(("steps", "batch", "hidden", "reverse", "biases"), [
    (1, 1, 1, False, "both"),  # one step, one row, one unit
    (2, None, 3, True, "none"),  # unbatched, no biases (a zero bias inside)
    (3, 13, 17, True, "input"),  # row blocks of 6, 6 and 1; panels of 16 and 1 units
    (4, 12, 32, False, "state"),  # exact blocks and panels
    (30, 32, 48, True, "both"),  # shared with a second thread (32 * 50 * 144 > 2^15, GRU)
])
def test_cpu_gated_kernel_edge_cases(native, cell, steps, batch, hidden, reverse, biases):
    _check_gated(steps, batch, 2, hidden, 1.0, reverse, seed=21, biases=biases, cell=cell)


@pytest.mark.parametrize("cell", ["lstm", "gru"])
def test_cpu_gated_kernels_when_wide(native, cell):
    """Over 128 hidden units (a tail panel of 2 units here) an LSTM's differentiated calls
    run XLA's loops and the rest the forward kernel; a GRU's run both kernels at any
    size. Values against the reference, gradients against impl="scan"."""
    kernels_run = (1, 0) if cell == "lstm" else (1, 2)
    _check_gated(3, 4, 2, 130, 1.0, True, seed=25, kernels_run=kernels_run, cell=cell)


@pytest.mark.parametrize("cell", ["lstm", "gru"])
def test_cpu_gated_kernel_backward_in_chunks(native, monkeypatch, cell):
    """The backward kernel once per chunk of the backward pass (its tape, sliced by
    chunks; the GRU's input states rebuilt per chunk): 2 chunks of 3 steps and 1 step."""
    monkeypatch.setattr(jax_rnn._fused, "_chunk_length", lambda *a: 3)
    _check_gated(7, 2, 2, 5, 1.0, False, seed=22, kernels_run=(1, 3), cell=cell)


@pytest.mark.parametrize("batch", [4, None])
def test_kernel_backward_with_zero_cotangents(kernels, batch):
    """The Pallas backward kernel (interpreted on a CPU) with a loss of the final state
    alone, batched or one sequence: the states' and pre-activations' cotangents are
    symbolic zeros, passed to it as zeros. Gradients against impl="scan"."""
    params, xs, state0 = _problem(jax_rnn.elman, 6, batch, 3, 5, 1.0, seed=32)

    def loss(params, impl="fused"):
        return jnp.sum(jnp.sin(jax_rnn.unroll(jax_rnn.elman, params, xs, state0,
                                              impl=impl)[0]))

    assert _kernel_calls(jax.grad(loss), params) == 2
    for a, b in zip(jax.tree.leaves(jax.grad(loss)(params)),
                    jax.tree.leaves(jax.grad(loss)(params, "scan")), strict=True):
        np.testing.assert_allclose(a, b, rtol=2e-5, atol=2e-6)


@pytest.mark.parametrize("name", ["elman", "lstm", "gru"])
def test_cpu_backward_kernels_read_no_zero_cotangents(native, name):
    """A loss of the final carry alone: the states' and pre-activations' cotangents are
    symbolic zeros, and the backward kernel gets them as arrays of no steps (read as
    zeros), not as (T, B, H) arrays of zeros. Gradients against impl="scan"."""
    cell = getattr(jax_rnn, name)
    params = cell.init(jax.random.key(31), 3, 5, dtype=np.float32)
    xs = np.random.default_rng(31).normal(size=(6, 4, 3)).astype(np.float32)
    state0 = cell.initial_state(params, (4,))

    def loss(params, impl="fused", every=False):
        final, ys = jax_rnn.unroll(cell, params, xs, state0, impl=impl)
        value = sum(jnp.sum(jnp.sin(f)) for f in jax.tree.leaves(final))
        return value + jnp.sum(ys.state) + jnp.sum(ys.pre_activation) if every else value

    assert _kernel_calls(jax.grad(loss), params) == 2
    no_steps = "f32[0,4,5]"  # d_state and d_pre as passed to the kernel
    assert no_steps in str(jax.make_jaxpr(jax.grad(loss))(params))
    assert no_steps not in str(jax.make_jaxpr(jax.grad(functools.partial(loss, every=True)))(
        params))
    for a, b in zip(jax.tree.leaves(jax.grad(loss)(params)),
                    jax.tree.leaves(jax.grad(loss)(params, "scan")), strict=True):
        np.testing.assert_allclose(a, b, rtol=2e-5, atol=2e-6)


def test_huge_pages_setting_from_the_environment():
    """JAX_RNN_HUGE_PAGES (read at import): off by default, "on" (any case) turns the
    advice on, anything else is a clear error naming the variable and the fix; and the
    module reads it at import (a fresh interpreter with it set)."""
    def read(environ):
        return _native.read_choice(environ, "JAX_RNN_HUGE_PAGES", ("off", "on"))

    assert read({}) == "off"
    assert read({"JAX_RNN_HUGE_PAGES": " On"}) == "on"
    assert read({"JAX_RNN_HUGE_PAGES": "OFF "}) == "off"
    with pytest.raises(ValueError, match=r"JAX_RNN_HUGE_PAGES must be \"off\" or \"on\", "
                                         r"got '0': unset it for the default \(\"off\"\)"):
        read({"JAX_RNN_HUGE_PAGES": "0"})
    if "JAX_RNN_HUGE_PAGES" not in os.environ:
        assert _native.HUGE_PAGES is False
    env = {**os.environ, "JAX_RNN_HUGE_PAGES": "on"}
    got = subprocess.run([sys.executable, "-c",
                          "from jax_rnn import _native; print(_native.HUGE_PAGES)"],
                         env=env, capture_output=True, text=True, check=True).stdout.strip()
    assert got == "True"


def _large_results_case(name):
    """A problem whose kernel results are over 4 MiB each (so that each holds a whole
    2 MiB page, which the kernels may advise, and over PreTouch's 1 MiB), and a loss of
    its states and final carry."""
    cell = getattr(jax_rnn, name)
    params = cell.init(jax.random.key(41), 3, 128, dtype=np.float32)
    xs = np.random.default_rng(41).normal(size=(2100, 4, 3)).astype(np.float32)

    def loss(params, impl="fused"):
        final, ys = jax_rnn.unroll(cell, params, xs, impl=impl)
        return jnp.sum(jnp.sin(ys.state)) + sum(jnp.sum(f ** 2) for f in jax.tree.leaves(final))

    return params, loss


@pytest.mark.parametrize("name", ["elman", "lstm", "gru"])
def test_cpu_kernels_memory_settings_change_no_number(native, monkeypatch, name):
    """Results over 1 MiB, where the kernels touch their pages first (the default) and may
    ask for huge pages: the gradients equal impl="scan"'s (float32 rounding), and so do
    the states of a reversed forward-only call; with each setting on and off the gradients
    are equal to the bit; the settings reach both kernels' calls as their attributes."""
    params, loss = _large_results_case(name)
    cell = getattr(jax_rnn, name)
    xs = np.random.default_rng(42).normal(size=(2100, 4, 3)).astype(np.float32)

    def states(impl):
        return jax.jit(lambda p: jax_rnn.unroll(cell, p, xs, reverse=True, impl=impl)[1].state)

    def close(got, want):
        for a, b in zip(jax.tree.leaves(got), jax.tree.leaves(want), strict=True):
            np.testing.assert_allclose(a, b, rtol=2e-5,
                                       atol=2e-5 * max(1.0, float(abs(b).max())))

    grads = {}
    for huge, touch in ((False, True), (True, True), (False, False)):
        monkeypatch.setattr(_native, "HUGE_PAGES", huge)
        monkeypatch.setattr(_native, "PRETOUCH", touch)
        jax.clear_caches()  # the traces hold the settings
        text = str(jax.make_jaxpr(jax.grad(loss))(params))
        assert text.count(f"('huge_pages', np.int32({int(huge)}))") == 2
        assert text.count(f"('pretouch', np.int32({int(touch)}))") == 2
        grads[huge, touch] = jax.grad(loss)(params)
        if touch and not huge:
            assert _kernel_calls(states("fused"), params) == 1
            close(states("fused")(params), states("scan")(params))
    close(grads[False, True], jax.grad(functools.partial(loss, impl="scan"))(params))
    for a, b, c in zip(*(jax.tree.leaves(g) for g in grads.values()), strict=True):
        np.testing.assert_array_equal(a, b)
        np.testing.assert_array_equal(a, c)


def _transparent_huge_pages() -> str:
    """Linux's transparent huge pages mode (always, madvise or never; never where there
    is no such setting)."""
    path = Path("/sys/kernel/mm/transparent_hugepage/enabled")
    text = path.read_text() if path.exists() else "[never]"
    return text[text.index("[") + 1:text.index("]")]


def test_cpu_kernels_ask_for_huge_pages(native, monkeypatch):
    """The forward kernel's states here are 34 MB: more than glibc serves from its heap,
    so a fresh mapping every call, with a page fault per 4 KiB page on its first write
    (the process's minor faults, every thread's). Where Linux gives transparent huge
    pages on request (``madvise``), the advice makes that one fault per 2 MiB page: fewer
    than a quarter of the faults without it. With huge pages ``never`` the advice changes
    nothing (both counts a fault per page); with ``always`` the advised call takes
    huge pages too."""
    xs = np.random.default_rng(43).normal(size=(4200, 16, 2)).astype(np.float32)
    params = jax_rnn.elman.init(jax.random.key(43), 2, 128, dtype=np.float32)
    faults = {}
    for on in (True, False):
        monkeypatch.setattr(_native, "HUGE_PAGES", on)
        monkeypatch.setattr(_native, "PRETOUCH", False)  # the loop itself faults
        jax.clear_caches()
        run = jax.jit(lambda p: jax_rnn.unroll(jax_rnn.elman, p, xs)[1].state)
        assert _kernel_calls(run, params) == 1
        jax.block_until_ready(run(params))
        counts = []
        for _ in range(5):
            before = resource.getrusage(resource.RUSAGE_SELF).ru_minflt
            states = jax.block_until_ready(run(params))
            counts.append(resource.getrusage(resource.RUSAGE_SELF).ru_minflt - before)
            del states
        faults[on] = sorted(counts)[2]
    pages = 4200 * 16 * 128 * 4 // 4096
    mode = _transparent_huge_pages()
    if mode == "madvise":
        assert faults[False] > 0.9 * pages, faults
        assert faults[True] < 0.25 * faults[False], faults
    elif mode == "never":
        assert min(faults.values()) > 0.9 * pages, faults
    else:
        assert faults[True] < 0.25 * pages, faults


@pytest.mark.parametrize("cell", ["lstm", "gru"])
def test_cpu_gated_kernel_under_vmap_and_second_order(native, cell):
    """A vmap over sequences with shared weights folds into one call of each kernel, one
    over per-example weights runs a call per example; reverse-over-reverse (a
    Hessian-vector product) goes through the kernels' custom_jvp. Against impl="scan"."""
    model = getattr(jax_rnn, cell)
    params, xs, state0 = _gated_problem(6, 4, 3, 7, 1.0, seed=23, cell=cell)
    per_example = jax.tree.map(lambda a: jnp.stack([a, 0.5 * a, -a, 2 * a]), params)

    def loss(p, x, impl):
        return jnp.sum(jnp.sin(jax_rnn.unroll(model, p, x, impl=impl)[1].state))

    cases = [(jax.vmap(jax.value_and_grad(loss), in_axes=(None, 1, None)), params),
             (jax.vmap(jax.value_and_grad(loss), in_axes=(0, 1, None)), per_example)]
    for fn, p in cases:
        assert _kernel_calls(lambda p, fn=fn: fn(p, xs, "fused"), p) == 2
        for a, b in zip(jax.tree.leaves(fn(p, xs, "fused")), jax.tree.leaves(fn(p, xs, "scan")),
                        strict=True):
            np.testing.assert_allclose(a, b, rtol=2e-5, atol=2e-5 * max(1.0, float(abs(b).max())))
    empty = cases[0][0](params, xs[:, :0], "fused")  # a vmap over no sequences at all
    assert [a.shape for a in jax.tree.leaves(empty)] == [
        (0, *a.shape) for a in [np.zeros(())] + jax.tree.leaves(params)]
    v = jax.tree.map(jnp.ones_like, params)

    def hvp(impl):
        def g(p):
            grads = jax.grad(lambda q: jnp.sum(
                jax_rnn.unroll(model, q, xs, state0, impl=impl)[1].state ** 2))(p)
            return jnp.vdot(jax.flatten_util.ravel_pytree(grads)[0],
                            jax.flatten_util.ravel_pytree(v)[0])
        return jax.grad(g)(params)

    assert _uses_kernel(lambda: hvp("fused"))
    for a, b in zip(jax.tree.leaves(hvp("fused")), jax.tree.leaves(hvp("scan")), strict=True):
        np.testing.assert_allclose(a, b, rtol=1e-3, atol=1e-4 * max(1.0, float(abs(b).max())))


def test_cpu_lstm_kernel_sigmoid_pointwise(native):
    """The kernels' own sigmoid, through the LSTM forward kernel's tape with one unit,
    w_in = 1, w = 0, one step and each value in its own row (so the tape's gates are
    ``s(x)`` and ``g = x``): within 3 float32 ulp of float64's on a grid over [-20, 20],
    below 1e-37 where the exact value is (-inf and x < -87), exact at 0, +inf and NaN."""
    grid = np.concatenate([np.linspace(-20, 20, 40001), [0.0, -0.0, 1e-30, 87.0, -87.0,
                                                        -100.0, np.inf, -np.inf,
                                                        np.nan]]).astype(np.float32)
    xs = grid[None, :, None]  # (T, B, I) = (1, values, 1)
    one, zero = np.ones((1, 4), np.float32), np.zeros((1, 4), np.float32)
    bias, h0 = np.zeros((4,), np.float32), np.zeros((grid.size, 1), np.float32)
    h, g, *sigmoids, c_in, c = jax.jit(_native.lstm_forward(True, False))(xs, one, bias, zero,
                                                                          h0, h0)
    with np.errstate(over="ignore"):
        want = 1.0 / (1.0 + np.exp(-grid.astype(np.float64)))
    for gate in sigmoids:
        got = np.asarray(gate)[0, :, 0]
        finite = np.isfinite(want) & (want > 1e-37)
        ulp = np.spacing(want[finite].astype(np.float32))
        assert (np.abs(got[finite] - want[finite]) <= 3 * ulp).all()
        assert (np.abs(got[want <= 1e-37]) <= 1e-37).all()
        np.testing.assert_array_equal(got[np.isnan(want)], np.float32(np.nan))
    np.testing.assert_array_equal(np.asarray(g)[0, :, 0], grid)
    np.testing.assert_array_equal(np.asarray(c_in)[0, :, 0], 0.0)  # c0


@pytest.mark.parametrize("cell", ["lstm", "gru"])
def test_cpu_gated_kernel_propagates_nan(native, cell):
    """A NaN input reaches the same states as in XLA's loop; the other rows stay clean."""
    model = getattr(jax_rnn, cell)
    params, xs, state0 = _gated_problem(4, 3, 2, 5, 1.0, seed=24, cell=cell)
    xs[1, 0, 0] = np.nan
    got = jax_rnn.unroll(model, params, xs, state0)[1].state
    want = jax_rnn.unroll(model, params, xs, state0, impl="scan")[1].state
    np.testing.assert_array_equal(np.isnan(got), np.isnan(want))
    assert np.isnan(got[1:, 0]).all() and not np.isnan(got[:, 1:]).any()


def test_cpu_lstm_kernel_checks_its_shapes(native):
    """Called with inconsistent shapes (jax_rnn never does), the LSTM kernels fail with an
    error naming themselves and the operand."""
    xs, h0 = np.zeros((3, 2, 4), np.float32), np.zeros((2, 5), np.float32)
    w_in, w = np.zeros((4, 20), np.float32), np.zeros((5, 20), np.float32)
    bias = np.zeros((20,), np.float32)
    with pytest.raises(Exception, match="jax_rnn_lstm_forward: c0 has the wrong shape"):
        jax.block_until_ready(_native.lstm_forward(True, False)(
            xs, w_in, bias, w, h0, np.zeros((2, 6), np.float32)))
    steps = np.zeros((3, 2, 5), np.float32)
    with pytest.raises(Exception, match="jax_rnn_lstm_backward: w_t has the wrong shape"):
        jax.block_until_ready(_native.lstm_backward(False)(*[steps] * 7, w, h0, h0))
    with pytest.raises(Exception, match="jax_rnn_lstm_backward: d_pre has the wrong shape"):
        jax.block_until_ready(_native.lstm_backward(False)(*[steps] * 6, steps[:2],
                                                           w.T, h0, h0))


def test_cpu_gru_kernel_checks_its_shapes(native):
    """As the LSTM's: the GRU kernels name themselves and the operand; a cotangent of no
    steps (zero) is accepted, one of another number of steps is not."""
    xs, h0 = np.zeros((3, 2, 4), np.float32), np.zeros((2, 5), np.float32)
    w_in, w = np.zeros((4, 15), np.float32), np.zeros((5, 15), np.float32)
    bias = np.zeros((15,), np.float32)
    with pytest.raises(Exception, match="jax_rnn_gru_forward: b has the wrong shape"):
        jax.block_until_ready(_native.gru_forward(True, False)(xs, w_in, bias, w, bias[:5], h0))
    steps, none = np.zeros((3, 2, 5), np.float32), np.zeros((0, 2, 5), np.float32)
    backward = _native.gru_backward(False)
    tape = [steps + k for k in (0.0, 0.2, 0.5, -0.3, 0.7)]  # h_in, r, z, n, gh_n
    got = backward(*tape, none, none, w.T + 0.1, h0 + 1)
    want = _kernels._gru_backward_scan(False, *tape, None, None, w.T + 0.1, h0 + 1)
    for a, b in zip(got, want, strict=True):
        np.testing.assert_allclose(a, b, rtol=1e-6, atol=1e-6)
    with pytest.raises(Exception, match="jax_rnn_gru_backward: d_state has the wrong shape"):
        jax.block_until_ready(backward(*[steps] * 5, steps[:2], none, w.T, h0))
