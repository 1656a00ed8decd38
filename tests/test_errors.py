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


def test_unroll_flags_must_be_bools(seed):
    """`reverse`, `time_major`, `check_finite` and `return_info` are read before tracing:
    a string or None is an error, not a truthiness test (time_major=None used to run
    batch-major, reverse="no" reversed)."""
    params, xs, _ = seed
    for name, value in (("time_major", None), ("time_major", "False"), ("reverse", "no"),
                        ("return_info", 1), ("check_finite", np.ones(1))):
        with pytest.raises(TypeError, match=rf"`jax_rnn.unroll`: `{name}` must be True or "
                           "False, got"):
            jax_rnn.unroll(jax_rnn.elman, params, xs, **{name: value})
    final, _ = jax_rnn.unroll(jax_rnn.elman, params, xs, reverse=np.bool_(False))
    np.testing.assert_array_equal(final, jax_rnn.unroll(jax_rnn.elman, params, xs)[0])


def test_parallel_only_options_with_the_sequential_method(seed):
    params, xs, _ = seed
    for kw, named in ((dict(tol=1e-6), "`tol` is"), (dict(max_iter=5), "`max_iter` is"),
                      (dict(damping=0.5, on_failure="raise"), "`damping`, `on_failure` are")):
        with pytest.raises(ValueError, match=f"{named} for method=\"deer\" or \"quasi_deer\" "
                           "only; the sequential method"):
            jax_rnn.unroll(jax_rnn.elman, params, xs, **kw)


def test_step_batch_axes_must_broadcast():
    for cell, carry in ((jax_rnn.elman, np.zeros((4, 3))), (jax_rnn.gru, np.zeros((4, 3))),
                        (jax_rnn.lstm, jax_rnn.LSTMState(np.zeros((5, 3)), np.zeros((4, 3))))):
        params = cell.init(jax.random.key(0), 2, 3, dtype=np.float64)
        with pytest.raises(ValueError, match=r"_step`: the batch axes \(all but the last\) do "
                           r"not broadcast: `x` \(5,\)"):
            cell.step(params, carry, np.zeros((5, 2)))
    params = jax_rnn.gru.init(jax.random.key(0), 2, 3, dtype=np.float64)  # (1,) broadcasts
    new, _ = jax_rnn.gru.step(params, np.zeros((1, 3)), np.ones((5, 2)))
    assert new.shape == (5, 3)


def test_initial_state_batch_shape():
    """An int batch shape is one batch axis; anything else that is not a tuple of sizes
    is a clear error."""
    for cell in (jax_rnn.elman, jax_rnn.gru, jax_rnn.lstm):
        params = cell.init(jax.random.key(0), 2, 3)
        for a, b in zip(jax.tree.leaves(cell.initial_state(params, 4)),
                        jax.tree.leaves(cell.initial_state(params, (4,))), strict=True):
            assert a.shape == b.shape == (4, 3)
        with pytest.raises(TypeError, match=r"`batch_shape` must be a tuple of sizes >= 0 "
                           r"\(or one int\), got 'B'"):
            cell.initial_state(params, "B")


def test_generate_checks_the_feedback():
    params = jax_rnn.elman.init(jax.random.key(0), 2, 4, 3)  # output size 3 != input 2
    first = np.ones((3, 2), np.float32)
    with pytest.raises(ValueError, match=r"`jax_rnn.generate`: `feedback` returned shape "
                       r"\(3, 3\), expected the input's shape \(3, 2\).*The default feedback"):
        jax_rnn.generate(jax_rnn.elman, params, None, first, 4)
    square = jax_rnn.elman.init(jax.random.key(0), 2, 4, 2)
    with pytest.raises(ValueError, match=r"`feedback` returned shape \(2, 3\), expected the "
                       r"input's shape \(3, 2\)"):  # a transpose was silently reshaped before
        jax_rnn.generate(jax_rnn.elman, square, None, first, 4, lambda y: y.output.T)
    with pytest.raises(TypeError, match=r"`jax_rnn.generate`: `feedback` must be a function"):
        jax_rnn.generate(jax_rnn.elman, square, None, first, 4, 3)
    with pytest.raises(ValueError, match=r"`first_input` has feature size 5 .* must be shaped "
                       r"\(\*batch, 2\)"):  # no time axis in the fix
        jax_rnn.generate(jax_rnn.elman, square, None, np.ones((3, 5)), 4)


def test_to_torch_state_checks_the_carry():
    from jax_rnn import interop

    gru = jax_rnn.gru.init(jax.random.key(0), 2, 3)
    h = np.zeros((4, 3), np.float32)
    with pytest.raises(TypeError, match=r"to_torch_state`: the carry of layer 0 must be one "
                       r"array shaped \(\*batch, 3\).*got tuple"):
        interop.to_torch_state(gru, (h, h))
    lstm = jax_rnn.lstm.init(jax.random.key(0), 2, 3)
    with pytest.raises(TypeError, match=r"must be an LSTMState\(h, c\) shaped \(\*batch, 3\)"):
        interop.to_torch_state(lstm, h)
    with pytest.raises(TypeError, match=r"of shapes \[\(4, 3\), \(4, 5\)\]"):
        interop.to_torch_state(lstm, jax_rnn.LSTMState(h, np.zeros((4, 5))))
    h_n, c_n = interop.to_torch_state(lstm, jax_rnn.LSTMState(h + 1, h + 2))
    np.testing.assert_array_equal(np.asarray(h_n), (h + 1)[None])
    np.testing.assert_array_equal(np.asarray(c_n), (h + 2)[None])


def test_pad_batch_checks_seq_lengths():
    from jax_rnn import distributed

    xs = np.ones((5, 3, 2), np.float32)
    with pytest.raises(TypeError, match=r"pad_batch`: `seq_lengths` has dtype float64, "
                       "expected integers"):
        distributed.pad_batch(xs, np.array([5.0, 2.0, 4.0]), 4)
    with pytest.raises(ValueError, match=r"`seq_lengths` must lie in \[0, 5\] \(the time axis "
                       r"of `xs`\), got values from -1 to 6"):
        distributed.pad_batch(xs, np.array([6, -1, 4]), 4)
