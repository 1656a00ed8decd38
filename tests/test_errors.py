"""Bad input raises a clear error, before XLA, naming the call, what it got and the fix."""

from __future__ import annotations

import jax
import numpy as np
import pytest

import jax_rnn


@pytest.fixture
def seed():
    return jax_rnn.seed_example(np.float64)


def test_feature_size_mismatch(seed):
    params, _, _ = seed
    with pytest.raises(ValueError, match=r"`jax_rnn.unroll`: `xs` has feature size 3 but "
                       r"`params.w_cell_input` expects 1; xs must be shaped \(time, \*batch, 1\)"):
        jax_rnn.unroll(jax_rnn.elman, params, np.ones((5, 3)))


def test_xs_rank_too_low(seed):
    params, _, _ = seed
    with pytest.raises(ValueError, match=r"`xs` has shape \(5,\).*use `xs\[:, None\]`"):
        jax_rnn.unroll(jax_rnn.elman, params, np.ones(5))


def test_state_size_mismatch(seed):
    params, xs, _ = seed
    with pytest.raises(ValueError, match=r"`state0` has shape \(3,\), but the params have "
                       r"hidden size 2"):
        jax_rnn.unroll(jax_rnn.elman, params, xs, np.zeros(3))


def test_state_batch_mismatch(seed):
    params, _, _ = seed
    with pytest.raises(ValueError, match=r"batch shape \(4,\), which does not broadcast to "
                       r"the inputs' batch shape \(3,\)"):
        jax_rnn.unroll(jax_rnn.elman, params, np.ones((5, 3, 1)), np.zeros((4, 2)))


def test_inconsistent_param_shapes(seed):
    params, xs, _ = seed
    bad = params._replace(b_cell=np.zeros(3))
    with pytest.raises(ValueError, match=r"`params.b_cell` has shape \(3,\).*inconsistent"):
        jax_rnn.unroll(jax_rnn.elman, bad, xs)
    bad = params._replace(w_cell_state=np.zeros((2, 3)))
    with pytest.raises(ValueError, match=r"params.w_cell_state"):
        jax_rnn.unroll(jax_rnn.elman, bad, xs)
    bad = params._replace(w_output=np.zeros(2))
    with pytest.raises(ValueError, match=r"`params.w_output` has shape \(2,\), expected rank 2"):
        jax_rnn.output_jacobian(jax_rnn.elman, bad, xs)


def test_mixed_param_dtypes(seed):
    params, xs, _ = seed
    bad = params._replace(b_cell=np.zeros(2, np.float32))
    with pytest.raises(TypeError, match=r"the params mix dtypes.*b_cell: float32"):
        jax_rnn.unroll(jax_rnn.elman, bad, xs)


def test_integer_params_rejected(seed):
    params, xs, _ = seed
    bad = params._replace(w_cell_state=np.zeros((2, 2), np.int32))
    with pytest.raises(TypeError, match=r"`params.w_cell_state` has dtype int32, expected a "
                       r"float dtype"):
        jax_rnn.unroll(jax_rnn.elman, bad, xs)


def test_non_numeric_inputs(seed):
    params, _, _ = seed
    with pytest.raises(TypeError, match=r"`xs` has dtype <U1, expected real numbers"):
        jax_rnn.unroll(jax_rnn.elman, params, np.array([["a"]]))
    with pytest.raises(TypeError, match=r"`xs` must be an array of numbers, got str"):
        jax_rnn.unroll(jax_rnn.elman, params, "abc")
    with pytest.raises(TypeError, match=r"`xs` could not be read as an array"):
        jax_rnn.unroll(jax_rnn.elman, params, [[1.0], [1.0, 2.0]])
    with pytest.raises(TypeError, match=r"expected real numbers"):
        jax_rnn.unroll(jax_rnn.elman, params, np.ones((2, 1), np.complex64))


def test_wrong_params_type(seed):
    _, xs, _ = seed
    with pytest.raises(TypeError, match=r"`params` must be ElmanParams, got dict"):
        jax_rnn.elman_step({"w": 1}, np.zeros(2), np.zeros(1))
    with pytest.raises(TypeError, match=r"this cell takes ElmanParams but `params` is tuple"):
        jax_rnn.unroll(jax_rnn.elman, (1, 2), xs)


def test_not_a_cell(seed):
    params, xs, _ = seed
    with pytest.raises(TypeError, match=r"`cell` must be a jax_rnn.Cell"):
        jax_rnn.unroll(jax_rnn.elman_step, params, xs)


def test_bad_unroll_factor(seed):
    params, xs, _ = seed
    with pytest.raises(ValueError, match=r"`unroll` must be a positive int"):
        jax_rnn.unroll(jax_rnn.elman, params, xs, unroll=0)


def test_step_errors(seed):
    params, _, _ = seed
    with pytest.raises(ValueError, match=r"`jax_rnn.elman_step`: `x` has feature size 2"):
        jax_rnn.elman_step(params, np.zeros(2), np.zeros(2))
    with pytest.raises(ValueError, match=r"`jax_rnn.elman_step`: `state` has shape \(3,\)"):
        jax_rnn.elman_step(params, np.zeros(3), np.zeros(1))


def test_init_errors():
    with pytest.raises(ValueError, match=r"`hidden_size` must be a positive int, got 0"):
        jax_rnn.elman.init(jax.random.key(0), 1, 0, 1)
    with pytest.raises(TypeError, match=r"`dtype` must be a float dtype, got int32"):
        jax_rnn.elman.init(jax.random.key(0), 1, 2, 1, dtype=np.int32)


def test_errors_are_raised_before_tracing(seed):
    """The check runs on shapes: inside jit the same message comes out at trace time."""
    params, _, _ = seed
    f = jax.jit(lambda x: jax_rnn.unroll(jax_rnn.elman, params, x))
    with pytest.raises(ValueError, match=r"feature size 3"):
        f(np.ones((5, 3)))
