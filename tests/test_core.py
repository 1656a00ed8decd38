"""The Elman cell and `unroll` against the seed notebook and the numpy reference loop."""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

import jax_rnn
from jax_rnn import reference

from ._strategies import as64, elman_problems, tol

# The seed notebook's printed numbers (../shared/seed/000_6d6f89973dee8539.txt).
NOTEBOOK_PRE = [
    [0.6, 0.5],
    [1.2923401, 1.39225678],
    [1.95107374, 2.2254142],
    [2.4891197, 2.88285312],
    [2.99675815, 3.49476565],
]
NOTEBOOK_STATE = [
    [0.53704957, 0.46211716],
    [0.85973818, 0.88366641],
    [0.96040283, 0.97693139],
    [0.98632184, 0.99375321],
    [0.99502267, 0.99815874],
]
NOTEBOOK_OUTPUT = [[1.56128388], [2.72707101], [3.01426561], [3.07382826], [3.09134015]]
NOTEBOOK_PRINTED = {
    "pre_activation": [
        "[0.6 0.5]",
        "[1.2923401  1.39225678]",
        "[1.95107374 2.2254142 ]",
        "[2.4891197  2.88285312]",
        "[2.99675815 3.49476565]",
    ],
    "state": [
        "[0.53704957 0.46211716]",
        "[0.85973818 0.88366641]",
        "[0.96040283 0.97693139]",
        "[0.98632184 0.99375321]",
        "[0.99502267 0.99815874]",
    ],
    "output": ["[1.56128388]", "[2.72707101]", "[3.01426561]", "[3.07382826]", "[3.09134015]"],
}


def test_seed_example_reproduces_the_notebook_digits():
    params, xs, state0 = jax_rnn.seed_example(np.float64)
    assert xs.shape == (5, 1) and params.w_cell_input.shape == (1, 2)
    final, ys = jax_rnn.unroll(jax_rnn.elman, params, xs, state0)
    for field, printed in NOTEBOOK_PRINTED.items():
        got = [str(np.asarray(row)) for row in getattr(ys, field)]
        assert got == printed, field
    np.testing.assert_allclose(ys.pre_activation, NOTEBOOK_PRE, atol=5e-9)
    np.testing.assert_allclose(ys.state, NOTEBOOK_STATE, atol=5e-9)
    np.testing.assert_allclose(ys.output, NOTEBOOK_OUTPUT, atol=5e-9)
    np.testing.assert_array_equal(final, ys.state[-1])


def test_seed_example_matches_the_notebook_loop_exactly():
    # The notebook's own loop, verbatim apart from names.
    state = [0.0, 0.0]
    w_cell_state = np.asarray([[0.1, 0.2], [0.3, 0.4]])
    w_cell_input = np.asarray([0.5, 0.6])
    b_cell = np.asarray([0.1, -0.1])
    w_output = np.asarray([[1.0], [2.0]])
    outs = []
    for x in [1, 2, 3, 4, 5]:
        pre = np.dot(state, w_cell_state) + x * w_cell_input + b_cell
        state = np.tanh(pre)
        outs.append((pre, state, np.dot(state, w_output) + 0.1))
    params, xs, state0 = jax_rnn.seed_example(np.float64)
    _, ys = jax_rnn.unroll(jax_rnn.elman, params, xs, state0)
    for t, (pre, st_, out) in enumerate(outs):
        np.testing.assert_allclose(ys.pre_activation[t], pre, rtol=1e-15, atol=1e-15)
        np.testing.assert_allclose(ys.state[t], st_, rtol=1e-15, atol=1e-15)
        np.testing.assert_allclose(ys.output[t], out, rtol=1e-15, atol=1e-15)


def test_seed_example_follows_default_dtype():
    with jax.enable_x64(False):
        params, xs, state0 = jax_rnn.seed_example()
        assert params.w_cell_state.dtype == jnp.float32 and xs.dtype == jnp.float32
    params, xs, _ = jax_rnn.seed_example()
    assert params.w_cell_state.dtype == jnp.float64


@given(elman_problems())
def test_unroll_matches_numpy_loop(problem):
    params, xs, state0, dtype = problem
    final, ys = jax_rnn.unroll(jax_rnn.elman, params, xs, state0)
    ref_final, ref = reference.numpy_unroll(as64(params), np.float64(xs), state0)
    assert ys.state.dtype == dtype and final.dtype == dtype
    for field in ("pre_activation", "state", "output"):
        np.testing.assert_allclose(getattr(ys, field), getattr(ref, field), **tol(dtype))
    np.testing.assert_allclose(final, ref_final, **tol(dtype))
    if xs.shape[0] == 0:  # length 0: the state passes through
        expect = np.zeros_like(ref_final) if state0 is None else np.broadcast_to(state0,
                                                                                 final.shape)
        np.testing.assert_array_equal(final, expect)
        assert ys.output.shape == (0, *xs.shape[1:-1], params.w_output.shape[1])


@settings(max_examples=6)
@given(elman_problems(max_t=16, max_size=6))
def test_jit_and_eager_agree(problem):
    params, xs, state0, dtype = problem
    jitted = jax.jit(lambda p, x, s: jax_rnn.unroll(jax_rnn.elman, p, x, s))
    a = jitted(params, xs, state0)
    with jax.disable_jit():
        b = jax_rnn.unroll(jax_rnn.elman, params, xs, state0)
    for x, y in zip(jax.tree.leaves(a), jax.tree.leaves(b), strict=True):
        np.testing.assert_allclose(x, y, **tol(dtype))


@given(elman_problems(max_t=16, max_size=6), st.integers(1, 4))
def test_vmap_equals_batched_call(problem, batch):
    params, xs, _, dtype = problem
    xs = np.stack([xs * (k + 1) / batch for k in range(batch)], axis=1)  # (T, B, ...)
    final_b, ys_b = jax_rnn.unroll(jax_rnn.elman, params, xs)
    vmapped = jax.vmap(lambda x: jax_rnn.unroll(jax_rnn.elman, params, x), in_axes=1,
                       out_axes=(0, 1))
    final_v, ys_v = vmapped(xs)
    np.testing.assert_allclose(final_v, final_b, **tol(dtype))
    np.testing.assert_allclose(ys_v.output, ys_b.output, **tol(dtype))


@given(elman_problems(max_t=16, max_size=6))
def test_reverse_equals_unrolling_the_flipped_sequence(problem):
    params, xs, state0, dtype = problem
    final_r, ys_r = jax_rnn.unroll(jax_rnn.elman, params, xs, state0, reverse=True)
    final_f, ys_f = jax_rnn.unroll(jax_rnn.elman, params, xs[::-1], state0)
    np.testing.assert_allclose(final_r, final_f, **tol(dtype))
    np.testing.assert_allclose(ys_r.state, ys_f.state[::-1], **tol(dtype))
    _, ref = reference.numpy_unroll(as64(params), np.float64(xs), state0, reverse=True)
    np.testing.assert_allclose(ys_r.output, ref.output, **tol(dtype))


@pytest.mark.parametrize("factor", [2, 3, True])
def test_unroll_factor_does_not_change_values(factor):
    params = jax_rnn.elman.init(jax.random.key(1), 3, 5, 2, dtype=np.float64)
    xs = np.random.default_rng(0).normal(size=(7, 2, 3))
    a = jax_rnn.unroll(jax_rnn.elman, params, xs)
    b = jax_rnn.unroll(jax_rnn.elman, params, xs, unroll=factor)
    np.testing.assert_allclose(a[1].output, b[1].output, rtol=1e-14)


def test_unroll_compiles_once_per_shape():
    traces = []

    def step(params, state, x):
        traces.append(1)
        return jax_rnn.elman_step(params, state, x)

    cell = jax_rnn.Cell(jax_rnn.elman.init, step, jax_rnn.elman.initial_state)
    params = jax_rnn.elman.init(jax.random.key(0), 2, 3, 1, dtype=np.float64)
    xs = np.ones((4, 2))
    for k in range(3):
        jax_rnn.unroll(cell, params, xs * k)
    assert len(traces) == 1
    jax_rnn.unroll(cell, params, np.ones((6, 2)))  # a new shape compiles again
    assert len(traces) == 2


def test_integer_inputs_are_promoted():
    params, _, state0 = jax_rnn.seed_example(np.float64)
    xs_int = np.arange(1, 6, dtype=np.int32)[:, None]
    _, ys = jax_rnn.unroll(jax_rnn.elman, params, xs_int, state0)
    assert ys.state.dtype == np.float64
    np.testing.assert_allclose(ys.state, NOTEBOOK_STATE, atol=5e-9)
    _, ys_list = jax_rnn.unroll(jax_rnn.elman, params, [[1], [2], [3], [4], [5]])
    np.testing.assert_allclose(ys_list.state, NOTEBOOK_STATE, atol=5e-9)


def test_mixed_float_inputs_promote_like_numpy():
    params, xs, state0 = jax_rnn.seed_example(np.float32)
    _, ys = jax_rnn.unroll(jax_rnn.elman, params, np.asarray(xs, np.float64), state0)
    assert ys.state.dtype == np.result_type(np.float32, np.float64)


def test_nan_propagates_and_check_finite_raises():
    params, xs, state0 = jax_rnn.seed_example(np.float64)
    bad = np.asarray(xs).copy()
    bad[2, 0] = np.nan
    _, ys = jax_rnn.unroll(jax_rnn.elman, params, bad, state0)
    assert np.isfinite(ys.state[:2]).all() and np.isnan(ys.state[2:]).all()
    with pytest.raises(ValueError, match=r"jax_rnn.unroll.*`xs` contains NaN or Inf"):
        jax_rnn.unroll(jax_rnn.elman, params, bad, state0, check_finite=True)
    from jax.experimental import checkify

    checked = checkify.checkify(
        jax.jit(lambda x: jax_rnn.unroll(jax_rnn.elman, params, x, check_finite=True))
    )
    err, _ = checked(bad)
    assert "contains NaN or Inf" in str(err.get())
    err, _ = checked(np.asarray(xs))
    assert err.get() is None


def test_elman_step_broadcasts_batch_axes():
    params = jax_rnn.elman.init(jax.random.key(2), 3, 4, 2, dtype=np.float64)
    rng = np.random.default_rng(1)
    state, x = rng.normal(size=(2, 1, 4)), rng.normal(size=(5, 3))
    new, out = jax_rnn.elman_step(params, state, x)
    assert new.shape == (2, 5, 4) and out.output.shape == (2, 5, 2)
    pre = state @ np.asarray(params.w_cell_state) + x @ np.asarray(params.w_cell_input)
    pre = pre + np.asarray(params.b_cell)
    np.testing.assert_allclose(out.pre_activation, pre, rtol=1e-14)
    np.testing.assert_allclose(new, np.tanh(pre), rtol=1e-14)


def test_init_scheme_and_dtype():
    params = jax_rnn.elman.init(jax.random.key(3), 5, 64, 7)
    bound = 1 / np.sqrt(64)
    for leaf in params:
        if leaf is not None:
            assert leaf.dtype == jnp.float64
            assert np.abs(leaf).max() <= bound
    # U(-b, b) has variance b^2/3: check the recurrent matrix's empirical variance.
    assert np.var(params.w_cell_state) == pytest.approx(bound**2 / 3, rel=0.1)
    with jax.enable_x64(False):
        assert jax_rnn.elman.init(jax.random.key(3), 1, 2, 1).w_cell_state.dtype == jnp.float32
    no_readout = jax_rnn.elman.init(jax.random.key(3), 1, 2, None)
    assert no_readout.w_output is None and no_readout.b_output is None
    _, ys = jax_rnn.unroll(jax_rnn.elman, no_readout, np.ones((3, 1)))
    np.testing.assert_array_equal(ys.output, ys.state)
    a = jax_rnn.elman.init(jax.random.key(3), 2, 3, 1)
    b = jax_rnn.elman.init(jax.random.key(4), 2, 3, 1)
    assert not np.allclose(a.w_cell_state, b.w_cell_state)


def test_initial_state_zeros():
    params = jax_rnn.elman.init(jax.random.key(0), 1, 4, 1, dtype=np.float32)
    s = jax_rnn.elman.initial_state(params, (2, 3))
    assert s.shape == (2, 3, 4) and s.dtype == np.float32 and not np.asarray(s).any()
    assert jax_rnn.elman.step is jax_rnn.elman_step


@given(elman_problems(max_t=10, max_size=5, dtypes=(np.float64,)))
def test_relu_cell_matches_numpy_loop(problem):
    params, xs, state0, dtype = problem
    _, ys = jax_rnn.unroll(jax_rnn.elman_relu, params, xs, state0)
    _, ref = reference.numpy_unroll(params, xs, state0, activation=lambda a: np.maximum(a, 0))
    np.testing.assert_allclose(ys.output, ref.output, **tol(dtype))


def test_two_biases_add():
    params = jax_rnn.elman.init(jax.random.key(5), 2, 3, 1, dtype=np.float64)
    extra = np.asarray([0.3, -0.2, 0.1])
    xs = np.random.default_rng(2).normal(size=(4, 2))
    two = params._replace(b_cell_state=extra)
    one = params._replace(b_cell=params.b_cell + extra)
    np.testing.assert_allclose(jax_rnn.unroll(jax_rnn.elman, two, xs)[1].output,
                               jax_rnn.unroll(jax_rnn.elman, one, xs)[1].output, rtol=1e-14)
    np.testing.assert_allclose(jax_rnn.unroll(jax_rnn.elman, two, xs)[1].output,
                               reference.numpy_unroll(two, xs)[1].output, rtol=1e-13)
