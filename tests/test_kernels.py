"""The Elman cell's one-kernel loops (jax_rnn._kernels) against the numpy reference and
plain autodiff through scan.

On a CPU the kernels run in Pallas's interpreter (``JAX_RNN_KERNELS=interpret`` for these
tests); on an NVIDIA GPU (benchmarks/gpu_session.sh runs this file there) they run as
compiled kernels. Forward values are compared with ``jax_rnn.reference.numpy_unroll`` (a
float64 numpy loop written from the equations), gradients with ``impl="scan"`` (plain
autodiff), both at float32 rounding: the kernels are float32 only.
"""

from __future__ import annotations

import jax
import jax.flatten_util
import jax.numpy as jnp
import numpy as np
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

import jax_rnn
from jax_rnn import _kernels
from jax_rnn.reference import numpy_unroll

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


def _uses_kernel(fn, *args) -> bool:
    return "pallas_call" in str(jax.make_jaxpr(fn)(*args))


def _problem(cell, steps, batch, inputs, hidden, scale, seed, readout=True):
    params = cell.init(jax.random.key(seed), inputs, hidden, 2 if readout else None,
                       dtype=np.float32)
    params = params._replace(w_cell_state=params.w_cell_state * scale,
                             b_cell=params.b_cell + 0.1)
    rng = np.random.default_rng(seed)
    xs = rng.normal(size=(steps, batch, inputs)).astype(np.float32)
    state0 = rng.uniform(-1, 1, (batch, hidden)).astype(np.float32)
    return params, xs, state0


def _loss(cell, params, xs, state0, impl, **kw):
    final, ys = jax_rnn.unroll(cell, params, xs, state0, impl=impl, **kw)
    return (jnp.sum(jnp.sin(ys.output)) + jnp.sum(ys.pre_activation ** 2)
            + jnp.sum(ys.state) + jnp.sum(final ** 2))


# The fixture's state (kernels on) is the same for every example: nothing to reset.
@settings(max_examples=5, suppress_health_check=[HealthCheck.function_scoped_fixture])
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
    cell = jax_rnn.elman_relu if relu else jax_rnn.elman
    params, xs, state0 = _problem(cell, steps, batch, inputs, hidden, scale, seed)
    run = jax.jit(lambda p, x, s: jax_rnn.unroll(cell, p, x, s, reverse=reverse))
    assert _uses_kernel(run, params, xs, state0)
    final, ys = run(params, xs, state0)
    activation = (lambda a: np.maximum(a, 0.0)) if relu else np.tanh
    ref_final, ref = numpy_unroll(as64(params), xs.astype(np.float64),
                                  state0.astype(np.float64), reverse=reverse,
                                  activation=activation)
    big = max(1.0, float(np.abs(ref.state).max()))  # relu at scale 4 grows: relative
    np.testing.assert_allclose(ys.state, ref.state, rtol=2e-5, atol=2e-5 * big)
    np.testing.assert_allclose(ys.pre_activation, ref.pre_activation, rtol=2e-5,
                               atol=2e-5 * big)
    np.testing.assert_allclose(ys.output, ref.output, rtol=2e-5, atol=2e-5 * big)
    np.testing.assert_allclose(final, ref_final, rtol=2e-5,
                               atol=2e-5 * big)
    grad = jax.grad(_loss, argnums=(1, 2, 3))
    fused = grad(cell, params, xs, state0, "fused", reverse=reverse)
    scan = grad(cell, params, xs, state0, "scan", reverse=reverse)
    for a, b in zip(jax.tree.leaves(fused), jax.tree.leaves(scan), strict=True):
        scale_b = max(1.0, float(np.abs(b).max()))
        np.testing.assert_allclose(a, b, rtol=2e-5, atol=2e-5 * scale_b)


def test_kernel_through_stack_vmap_and_second_order(kernels):
    """Through a bidirectional stack (16 hidden units: no padding), under vmap, and
    reverse-over-reverse (the kernels' custom_jvp), against impl="scan"."""
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


@pytest.mark.parametrize(("what", "cell", "kw"), [
    ("eligible", jax_rnn.elman, {}),  # the same call without what each other case adds
    ("masked steps", jax_rnn.elman, {"seq_lengths": np.array([3, 1])}),
    ("resets", jax_rnn.elman, {"resets": np.eye(4, 2, dtype=bool)}),
    ("truncation", jax_rnn.elman, {"truncate": 2}),
    ("float64", jax_rnn.elman, {"dtype": np.float64}),
    ("hidden over MAX_HIDDEN", jax_rnn.elman, {"hidden": _kernels.MAX_HIDDEN + 1}),
    ("two batch axes", jax_rnn.elman, {"batch": (2, 2)}),
    ("another activation", jax_rnn.make_elman(jax.nn.sigmoid), {}),
    ("GRU", jax_rnn.gru, {}),
    ("impl=scan", jax_rnn.elman, {"impl": "scan"}),
])
def test_kernels_only_where_they_apply(kernels, what, cell, kw):
    """Everything the kernels do not cover runs XLA's loops, forward and backward (their
    values against impl="scan" and the numpy references: tests/test_fused.py and the
    other test files); the "eligible" case, the same call without any of it, runs the
    kernels."""
    kw = dict(kw)
    dtype, hidden = kw.pop("dtype", np.float32), kw.pop("hidden", 5)
    batch = kw.pop("batch", (2,))
    params = cell.init(jax.random.key(5), 3, hidden, dtype=dtype)
    xs = np.random.default_rng(5).normal(size=(4, *batch, 3)).astype(dtype)

    def loss(p):
        return jnp.sum(jnp.sin(jax_rnn.unroll(cell, p, xs, **kw)[1].state))

    assert _uses_kernel(jax.grad(loss), params) == (what == "eligible")


def test_kernels_mode_from_the_environment(monkeypatch):
    """JAX_RNN_KERNELS: "auto" runs the kernels on NVIDIA GPUs only, "off" nowhere; any
    other value is a clear error naming the variable and the choices."""
    monkeypatch.setattr(_kernels, "MODE", "auto")
    assert _kernels.mode() == ("gpu" if ON_GPU else "off")
    monkeypatch.setattr(_kernels, "MODE", "off")
    assert _kernels.mode() == "off"
    monkeypatch.setattr(_kernels, "MODE", "on")
    with pytest.raises(ValueError, match=r"JAX_RNN_KERNELS must be \"auto\", \"off\" or "
                                         r"\"interpret\", got 'on'"):
        _kernels.mode()
