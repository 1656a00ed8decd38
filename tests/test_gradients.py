"""Gradients through time: `output_jacobian`, `jax.grad` over `unroll`, finite differences."""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
from hypothesis import given, settings
from jax.test_util import check_grads

import jax_rnn
from jax_rnn import reference

from ._strategies import elman_problems


def _fields(tree):
    return {k: v for k, v in tree._asdict().items() if v is not None}


@settings(max_examples=8)
@given(elman_problems(max_t=12, max_size=5, dtypes=(np.float64,)))
def test_output_jacobian_matches_numpy_bptt(problem):
    params, xs, state0, _ = problem
    jac = jax_rnn.output_jacobian(jax_rnn.elman, params, xs, state0)
    ref = reference.numpy_output_jacobian(params, xs, state0)
    t, batch, o = xs.shape[0], xs.shape[1:-1], params.w_output.shape[1]
    for name, value in _fields(params).items():
        assert jac._asdict()[name].shape == (t, *batch, o, *value.shape), name
        np.testing.assert_allclose(jac._asdict()[name], ref[name], rtol=1e-10, atol=1e-12,
                                   err_msg=name)
    assert jac.b_cell_state is None


def _central_difference(f, params, eps=1e-6):
    """d f / d params by central differences, one coordinate at a time (float64)."""
    out = {}
    for name, value in _fields(params).items():
        value = np.asarray(value, np.float64)
        grads = []
        for idx in np.ndindex(value.shape):
            step = np.zeros_like(value)
            step[idx] = eps
            plus = f(params._replace(**{name: value + step}))
            minus = f(params._replace(**{name: value - step}))
            grads.append((np.asarray(plus) - np.asarray(minus)) / (2 * eps))
        fd = np.stack(grads, axis=-1)
        out[name] = fd.reshape(*fd.shape[:-1], *value.shape)
    return out


def test_output_jacobian_matches_finite_differences():
    rng = np.random.default_rng(7)
    params = jax_rnn.elman.init(jax.random.key(7), 2, 3, 2, dtype=np.float64)
    xs, state0 = rng.normal(size=(6, 2, 2)), rng.normal(size=(2, 3)) * 0.5
    jac = jax_rnn.output_jacobian(jax_rnn.elman, params, xs, state0)

    def outputs(p):
        return reference.numpy_unroll(p, xs, state0)[1].output

    fd = _central_difference(outputs, params)
    for name, value in fd.items():
        np.testing.assert_allclose(jac._asdict()[name], value, rtol=1e-6, atol=1e-8,
                                   err_msg=name)


def test_output_jacobian_of_seed_example_by_hand():
    params, xs, state0 = jax_rnn.seed_example(np.float64)
    jac = jax_rnn.output_jacobian(jax_rnn.elman, params, xs, state0)
    _, ref = reference.numpy_unroll(params, xs, state0)
    # y_t = h_t @ w_output + b: d y_t / d w_output[i, 0] = h_t[i], d y_t / d b_output = 1.
    np.testing.assert_allclose(jac.w_output[:, 0, :, 0], ref.state, rtol=1e-15)
    np.testing.assert_array_equal(jac.b_output[:, 0, 0], np.ones(5))
    # Step 1 from a zero state: d y_1 / d b_cell = w_output * (1 - h_1^2).
    np.testing.assert_allclose(
        jac.b_cell[0, 0], np.asarray(params.w_output)[:, 0] * (1 - ref.state[0] ** 2), rtol=1e-14
    )
    np.testing.assert_array_equal(jac.w_cell_state[0], 0.0)  # h_0 = 0: no recurrent term yet


def test_output_jacobian_length_zero():
    params = jax_rnn.elman.init(jax.random.key(0), 2, 3, 4, dtype=np.float64)
    jac = jax_rnn.output_jacobian(jax_rnn.elman, params, np.zeros((0, 2)))
    assert jac.w_cell_state.shape == (0, 4, 3, 3)


def test_grad_of_loss_over_unroll_matches_numpy_bptt():
    """jax.grad of a scalar loss = the BPTT jacobian contracted with dL/dy."""
    rng = np.random.default_rng(3)
    params = jax_rnn.elman.init(jax.random.key(3), 3, 4, 2, dtype=np.float64)
    xs, target = rng.normal(size=(9, 5, 3)), rng.normal(size=(9, 5, 2))

    def loss(p):
        _, ys = jax_rnn.unroll(jax_rnn.elman, p, xs)
        return 0.5 * jnp.sum((ys.output - target) ** 2)

    value, grads = jax.value_and_grad(loss)(params)
    _, ref = reference.numpy_unroll(params, xs)
    np.testing.assert_allclose(value, 0.5 * np.sum((ref.output - target) ** 2), rtol=1e-13)
    resid = ref.output - target  # dL/dy, (T, B, O)
    jac = reference.numpy_output_jacobian(params, xs)
    for name, g in _fields(grads).items():
        expect = np.tensordot(resid, jac[name], axes=([0, 1, 2], [0, 1, 2]))
        np.testing.assert_allclose(g, expect, rtol=1e-10, atol=1e-12, err_msg=name)


def test_check_grads_order_two():
    rng = np.random.default_rng(4)
    params = jax_rnn.elman.init(jax.random.key(4), 2, 3, 2, dtype=np.float64)
    xs, state0 = rng.normal(size=(5, 2, 2)), rng.normal(size=(2, 3))

    def f(p, x, s):
        final, ys = jax_rnn.unroll(jax_rnn.elman, p, x, s)
        return jnp.sum(ys.output**2) + jnp.sum(final)

    # The default (fused) path has a custom VJP: reverse mode to second order. Plain
    # autodiff through scan also supports forward mode.
    check_grads(f, (params, xs, state0), order=2, modes=["rev"], atol=1e-6, rtol=1e-6)

    def f_scan(p, x, s):
        final, ys = jax_rnn.unroll(jax_rnn.elman, p, x, s, impl="scan")
        return jnp.sum(ys.output**2) + jnp.sum(final)

    check_grads(f_scan, (params, xs, state0), order=2, modes=["fwd", "rev"], atol=1e-6,
                rtol=1e-6)


def test_grad_with_respect_to_inputs_and_state():
    rng = np.random.default_rng(5)
    params = jax_rnn.elman.init(jax.random.key(5), 2, 3, 1, dtype=np.float64)
    xs, state0 = rng.normal(size=(4, 2)), rng.normal(size=3)

    def f(x, s):
        return jax_rnn.unroll(jax_rnn.elman, params, x, s)[1].output.sum()

    gx, gs = jax.grad(f, argnums=(0, 1))(xs, state0)
    eps = 1e-6
    for idx in np.ndindex(xs.shape):
        d = np.zeros_like(xs)
        d[idx] = eps
        fd = (reference.numpy_unroll(params, xs + d, state0)[1].output.sum()
              - reference.numpy_unroll(params, xs - d, state0)[1].output.sum()) / (2 * eps)
        np.testing.assert_allclose(gx[idx], fd, rtol=1e-6, atol=1e-9)
    for i in range(3):
        d = np.zeros(3)
        d[i] = eps
        fd = (reference.numpy_unroll(params, xs, state0 + d)[1].output.sum()
              - reference.numpy_unroll(params, xs, state0 - d)[1].output.sum()) / (2 * eps)
        np.testing.assert_allclose(gs[i], fd, rtol=1e-6, atol=1e-9)
