"""`unroll` options: lengths, reverse, remat, truncation, batch-major, resets; generate;
stack and bidirectional against manual composition."""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

import jax_rnn
from jax_rnn import reference

from ._strategies import tol

CELLS = {
    "elman": (jax_rnn.elman, reference.numpy_unroll),
    "gru": (jax_rnn.gru, reference.numpy_gru_unroll),
    "lstm": (jax_rnn.lstm, reference.numpy_lstm_unroll),
}


@st.composite
def padded_problems(draw, dtypes=(np.float32, np.float64)):
    """(cell name, params, xs (T, B, I), lengths (B,), dtype) with lengths 0..T."""
    name = draw(st.sampled_from(sorted(CELLS)))
    t = draw(st.integers(0, 12))
    b = draw(st.integers(1, 4))
    i, h = draw(st.integers(1, 5)), draw(st.integers(1, 5))
    o = draw(st.sampled_from([None, 2]))
    dtype = draw(st.sampled_from(dtypes))
    scale = draw(st.floats(0.1, 3.0))
    seed = draw(st.integers(0, 2**31 - 1))
    cell = CELLS[name][0]
    params = cell.init(jax.random.key(seed % 1000), i, h, o, dtype=dtype)
    params = jax.tree.map(lambda a: a * scale, params)
    rng = np.random.default_rng(seed)
    xs = rng.normal(size=(t, b, i)).astype(dtype)
    lengths = np.asarray(draw(st.lists(st.integers(0, t), min_size=b, max_size=b)), np.int32)
    return name, params, xs, lengths, dtype


def _garbage_past_lengths(xs, lengths, seed):
    rng = np.random.default_rng(seed)
    out = xs.copy()
    for b, n in enumerate(lengths):
        out[n:, b] = rng.normal(size=out[n:, b].shape) * 1e3
    return out


@settings(max_examples=8)
@given(padded_problems(), st.booleans())
def test_seq_lengths_match_reference(problem, reverse):
    name, params, xs, lengths, dtype = problem
    cell, ref_unroll = CELLS[name]
    final, ys = jax_rnn.unroll(cell, params, xs, seq_lengths=lengths, reverse=reverse)
    ref_final, ref = ref_unroll(params, np.float64(xs), reverse=reverse, seq_lengths=lengths)
    for field in ("pre_activation", "state", "output"):
        np.testing.assert_allclose(getattr(ys, field), getattr(ref, field), **tol(dtype))
    for a, b in zip(jax.tree.leaves(final), jax.tree.leaves(ref_final), strict=True):
        np.testing.assert_allclose(a, b, **tol(dtype))


@settings(max_examples=10)
@given(padded_problems(), st.booleans(), st.integers(0, 2**31 - 1))
def test_resets_with_seq_lengths_match_reference(problem, reverse, seed):
    """Resets anywhere, also at steps past a sequence's end (padding, which leaves the
    carry as it was, reset or not), on every path: the numpy loop's values, and the
    gradients of ``impl="scan"``."""
    name, params, xs, lengths, dtype = problem
    cell, ref_unroll = CELLS[name]
    rng = np.random.default_rng(seed)
    resets = rng.random(xs.shape[:2]) < 0.3
    resets[lengths[lengths < len(xs)], np.flatnonzero(lengths < len(xs))] = True  # padding
    state0 = jax.tree.map(lambda a: rng.normal(size=a.shape).astype(dtype),
                          cell.initial_state(params, xs.shape[1:2]))
    ref_final, ref = ref_unroll(params, np.float64(xs), *jax.tree.map(np.float64, (state0,)),
                                reverse=reverse, seq_lengths=lengths, resets=resets)
    kw = dict(seq_lengths=lengths, reverse=reverse, resets=resets)
    for opts in (dict(impl="fused"), dict(impl="scan"), dict(impl="scan", method="deer")):
        final, ys = jax_rnn.unroll(cell, params, xs, state0, **kw, **opts)
        for field in ("pre_activation", "state", "output"):
            np.testing.assert_allclose(getattr(ys, field), getattr(ref, field), **tol(dtype))
        for a, b in zip(jax.tree.leaves(final), jax.tree.leaves(ref_final), strict=True):
            np.testing.assert_allclose(a, b, **tol(dtype))

    def loss(p, impl):
        final, ys = jax_rnn.unroll(cell, p, xs, state0, impl=impl, **kw)
        return jnp.sum(ys.output**2) + sum(jnp.sum(jnp.sin(f)) for f in jax.tree.leaves(final))

    grads = [jax.grad(loss)(params, impl) for impl in ("fused", "scan")]
    for a, b in zip(*map(jax.tree.leaves, grads), strict=True):
        np.testing.assert_allclose(a, b, **tol(dtype))


@settings(max_examples=5)
@given(padded_problems(dtypes=(np.float64,)), st.booleans())
def test_padding_never_influences_values_or_gradients(problem, reverse):
    name, params, xs, lengths, _ = problem
    cell = CELLS[name][0]
    noisy = _garbage_past_lengths(xs, lengths, 1)

    def loss(p, x):
        final, ys = jax_rnn.unroll(cell, p, x, seq_lengths=lengths, reverse=reverse)
        return jnp.sum(ys.output**2) + sum(jnp.sum(f) for f in jax.tree.leaves(final))

    (v1, g1), (v2, g2) = (jax.value_and_grad(loss)(params, x) for x in (xs, noisy))
    np.testing.assert_array_equal(v1, v2)
    for a, b in zip(jax.tree.leaves(g1), jax.tree.leaves(g2), strict=True):
        np.testing.assert_array_equal(a, b)
    gx = jax.grad(loss, argnums=1)(params, noisy)
    for bi, n in enumerate(lengths):
        assert not np.asarray(gx)[n:, bi].any()  # no gradient reaches padding


def test_lengths_zero_and_full():
    params = jax_rnn.elman.init(jax.random.key(0), 2, 3, None, dtype=np.float64)
    xs = np.random.default_rng(0).normal(size=(4, 2, 2))
    state0 = np.random.default_rng(1).normal(size=(2, 3))
    final, ys = jax_rnn.unroll(jax_rnn.elman, params, xs, state0, seq_lengths=np.array([0, 4]))
    full_final, full = jax_rnn.unroll(jax_rnn.elman, params, xs, state0)
    np.testing.assert_array_equal(final[0], state0[0])  # length 0: state0 unchanged
    assert not np.asarray(ys.state[:, 0]).any()
    np.testing.assert_allclose(final[1], full_final[1], rtol=1e-15)
    np.testing.assert_allclose(ys.state[:, 1], full.state[:, 1], rtol=1e-15)


# True: chunks of isqrt(T - 1) + 1 = 4 steps and a remainder of 3; 1: every step; 50: one
# chunk longer than the sequence (the chunking does not depend on the cell: one cell).
@pytest.mark.parametrize(("remat", "name"), [
    *((remat, name) for remat in (True, 1) for name in sorted(CELLS)), (50, "elman")])
def test_remat_keeps_values_and_gradients(remat, name):
    cell = CELLS[name][0]
    params = cell.init(jax.random.key(1), 3, 4, 2, dtype=np.float64)
    rng = np.random.default_rng(2)
    xs, lengths = rng.normal(size=(11, 3, 3)), np.array([11, 7, 0])

    def loss(p, remat, reverse):
        final, ys = jax_rnn.unroll(cell, p, xs, seq_lengths=lengths, reverse=reverse,
                                   remat=remat)
        return jnp.sum(jnp.sin(ys.output)) + sum(jnp.sum(f**2) for f in jax.tree.leaves(final))

    for reverse in (False, True):
        v0, g0 = jax.value_and_grad(loss)(params, False, reverse)
        v1, g1 = jax.value_and_grad(loss)(params, remat, reverse)
        np.testing.assert_allclose(v1, v0, rtol=1e-14)
        for a, b in zip(jax.tree.leaves(g1), jax.tree.leaves(g0), strict=True):
            np.testing.assert_allclose(a, b, rtol=1e-12, atol=1e-14)


def test_remat_uses_checkpoints():
    params = jax_rnn.elman.init(jax.random.key(1), 2, 3, 1, dtype=np.float64)
    xs = np.ones((16, 2))

    def loss(p):
        return jax_rnn.unroll(jax_rnn.elman, p, xs, remat=4)[1].output.sum()

    assert "checkpoint" in str(jax.make_jaxpr(jax.grad(loss))(params)) or "remat" in str(
        jax.make_jaxpr(jax.grad(loss))(params)
    )


def _manual_truncated_loss(params, xs, k, reverse=False):
    """Truncated BPTT written by hand: stop_gradient on the carry every k steps."""
    h = jnp.zeros(params.w_cell_state.shape[0], xs.dtype)
    order = range(xs.shape[0] - 1, -1, -1) if reverse else range(xs.shape[0])
    total = 0.0
    for n, t in enumerate(order):
        if n > 0 and n % k == 0:
            h = jax.lax.stop_gradient(h)
        h = jnp.tanh(h @ params.w_cell_state + xs[t] @ params.w_cell_input + params.b_cell)
        total = total + jnp.sum(jnp.cos(h @ params.w_output + params.b_output))
    return total


@pytest.mark.parametrize("k", [1, 2, 3, 10])
@pytest.mark.parametrize("reverse", [False, True])
def test_truncate_equals_hand_written_stop_gradient(k, reverse):
    params = jax_rnn.elman.init(jax.random.key(3), 2, 4, 2, dtype=np.float64)
    xs = np.random.default_rng(3).normal(size=(9, 2))

    def loss(p):
        _, ys = jax_rnn.unroll(jax_rnn.elman, p, xs, truncate=k, reverse=reverse)
        return jnp.sum(jnp.cos(ys.output))

    v, g = jax.value_and_grad(loss)(params)
    v_ref, g_ref = jax.value_and_grad(_manual_truncated_loss)(params, xs, k, reverse)
    np.testing.assert_allclose(v, v_ref, rtol=1e-13)
    for a, b in zip(jax.tree.leaves(g), jax.tree.leaves(g_ref), strict=True):
        np.testing.assert_allclose(a, b, rtol=1e-11, atol=1e-14)
    full = jax.grad(lambda p: jnp.sum(jnp.cos(jax_rnn.unroll(jax_rnn.elman, p, xs)[1].output)))
    if k < 9:  # truncation really changes the recurrent gradient
        assert not np.allclose(g.w_cell_state, full(params).w_cell_state)


@settings(max_examples=6)
@given(padded_problems(dtypes=(np.float64,)))
def test_batch_major_equals_transposed(problem):
    name, params, xs, lengths, _ = problem
    cell = CELLS[name][0]
    f_t, ys_t = jax_rnn.unroll(cell, params, xs, seq_lengths=lengths)
    f_b, ys_b = jax_rnn.unroll(cell, params, np.swapaxes(xs, 0, 1), seq_lengths=lengths,
                               time_major=False)
    np.testing.assert_array_equal(np.swapaxes(ys_b.output, 0, 1), ys_t.output)
    for a, b in zip(jax.tree.leaves(f_t), jax.tree.leaves(f_b), strict=True):
        np.testing.assert_array_equal(a, b)


def test_resets_restart_from_state0():
    params = jax_rnn.elman.init(jax.random.key(4), 2, 3, 1, dtype=np.float64)
    rng = np.random.default_rng(4)
    xs, state0 = rng.normal(size=(8, 2, 2)), rng.normal(size=(2, 3))
    resets = np.zeros((8, 2), bool)
    resets[3, 0] = resets[5, 1] = resets[6, 1] = True
    _, ys = jax_rnn.unroll(jax_rnn.elman, params, xs, state0, resets=resets)
    for b in range(2):  # numpy loop: each episode from state0
        h = state0[b]
        for t in range(8):
            if resets[t, b]:
                h = state0[b]
            h = np.tanh(h @ np.asarray(params.w_cell_state) + xs[t, b] @ np.asarray(
                params.w_cell_input) + np.asarray(params.b_cell))
            np.testing.assert_allclose(ys.state[t, b], h, rtol=1e-14)
    # resets on batch-major input take the (batch, time) layout
    _, ys_b = jax_rnn.unroll(jax_rnn.elman, params, np.swapaxes(xs, 0, 1), state0,
                             resets=resets.T, time_major=False)
    np.testing.assert_allclose(np.swapaxes(ys_b.state, 0, 1), ys.state, rtol=1e-15)


def test_generate_matches_python_loop():
    params = jax_rnn.gru.init(jax.random.key(5), 2, 4, 2, dtype=np.float64)
    x0 = np.array([0.5, -0.5])

    def feedback(y, key):
        return jnp.tanh(y.output) + 0.1 * jax.random.normal(key, y.output.shape)

    key = jax.random.key(9)
    final, ys, xs = jax_rnn.generate(jax_rnn.gru, params, None, x0, 6, feedback, key=key)
    keys = jax.random.split(key, 6)
    h, x = np.zeros(4), x0
    for t in range(6):
        np.testing.assert_allclose(xs[t], x, rtol=1e-14)
        _, ref = reference.numpy_gru_unroll(params, x[None], h)
        h = ref.state[0]
        np.testing.assert_allclose(ys.output[t], ref.output[0], rtol=1e-12)
        x = np.asarray(feedback(jax_rnn.StepOutput(*[jnp.asarray(f[0]) for f in ref]), keys[t]))
    np.testing.assert_allclose(final, h, rtol=1e-12)
    # generating zero steps returns the initial state
    final0, ys0, _ = jax_rnn.generate(jax_rnn.gru, params, None, x0, 0, feedback, key=key)
    assert ys0.output.shape == (0, 2) and not np.asarray(final0).any()


def test_generate_errors():
    params = jax_rnn.elman.init(jax.random.key(0), 1, 2, 1)
    with pytest.raises(ValueError, match=r"`jax_rnn.generate`: `steps` must be an int >= 0"):
        jax_rnn.generate(jax_rnn.elman, params, None, np.ones(1), -1)
    with pytest.raises(ValueError, match=r"`first_input` has feature size 3"):
        jax_rnn.generate(jax_rnn.elman, params, None, np.ones(3), 2)
    bi = jax_rnn.bidirectional(jax_rnn.elman)
    with pytest.raises(TypeError, match=r"bidirectional layer cannot generate"):
        jax_rnn.generate(bi, bi.init(jax.random.key(0), 1, 2), None, np.ones(1), 2)


def test_stack_equals_manual_composition_with_dropout_off_and_on():
    model = jax_rnn.stack([jax_rnn.lstm, jax_rnn.elman_relu, jax_rnn.gru], dropout=0.5)
    params = model.init(jax.random.key(6), 3, [4, 5, 2], 2, dtype=np.float64)
    rng = np.random.default_rng(6)
    xs, lengths = rng.normal(size=(7, 3, 3)), np.array([7, 2, 5])
    final, ys = jax_rnn.unroll(model, params, xs, seq_lengths=lengths)
    x, finals = xs, []
    for layer, p in zip(model.layers, params, strict=True):
        f, out = jax_rnn.unroll(layer, p, x, seq_lengths=lengths)
        finals.append(f)
        x = out.output
    np.testing.assert_allclose(ys.output, x, rtol=1e-14)
    for a, b in zip(jax.tree.leaves(final), jax.tree.leaves(tuple(finals)), strict=True):
        np.testing.assert_allclose(a, b, rtol=1e-14)
    # Training mode: dropout masks layer outputs with a fresh key per layer.
    key = jax.random.key(7)
    _, ys_drop = jax_rnn.unroll(model, params, xs, seq_lengths=lengths, dropout_key=key)
    x = xs
    for i, (layer, p) in enumerate(zip(model.layers, params, strict=True)):
        if i > 0:
            keep = jax.random.bernoulli(jax.random.fold_in(key, i), 0.5, x.shape)
            x = np.where(keep, x / 0.5, 0.0)
        x = jax_rnn.unroll(layer, p, x, seq_lengths=lengths)[1].output
    np.testing.assert_allclose(ys_drop.output, x, rtol=1e-14)
    assert not np.allclose(ys_drop.output, ys.output)


def test_stack_step_equals_layerwise_unroll():
    model = jax_rnn.stack([jax_rnn.gru, jax_rnn.lstm])
    params = model.init(jax.random.key(8), 2, 3, 1, dtype=np.float64)
    xs = np.random.default_rng(8).normal(size=(5, 2))
    _, ys = jax_rnn.unroll(model, params, xs)
    _, ys_step = jax.lax.scan(lambda c, x: model.step(params, c, x),
                              model.initial_state(params), jnp.asarray(xs))
    np.testing.assert_allclose(ys_step.output, ys.output, rtol=1e-13)


@pytest.mark.parametrize("reverse", [False, True])
def test_bidirectional_equals_manual_with_lengths(reverse):
    model = jax_rnn.bidirectional(jax_rnn.gru, jax_rnn.elman)
    params = model.init(jax.random.key(9), 3, 4, dtype=np.float64)
    rng = np.random.default_rng(9)
    xs, lengths = rng.normal(size=(6, 3, 3)), np.array([6, 0, 3])
    final, ys = jax_rnn.unroll(model, params, xs, seq_lengths=lengths, reverse=reverse)
    f_fw, fw = reference.numpy_gru_unroll(params.forward, xs, seq_lengths=lengths,
                                          reverse=reverse)
    f_bw, bw = reference.numpy_unroll(params.backward, xs, seq_lengths=lengths,
                                      reverse=not reverse)
    np.testing.assert_allclose(ys.output, np.concatenate([fw.output, bw.output], -1),
                               rtol=1e-12, atol=1e-14)
    np.testing.assert_allclose(final.forward, f_fw, rtol=1e-12)
    np.testing.assert_allclose(final.backward, f_bw, rtol=1e-12)


def test_stacked_bidirectional_composes_with_jit_grad_vmap_and_jacobian():
    model = jax_rnn.stack([jax_rnn.bidirectional(jax_rnn.elman), jax_rnn.elman])
    params = model.init(jax.random.key(10), 2, 3, 1, dtype=np.float64)
    xs = np.random.default_rng(10).normal(size=(4, 2, 2))
    _, ys = jax.jit(lambda p, x: jax_rnn.unroll(model, p, x))(params, xs)
    _, ys_v = jax.vmap(lambda x: jax_rnn.unroll(model, params, x), in_axes=1,
                       out_axes=(0, 1))(xs)
    np.testing.assert_allclose(ys_v.output, ys.output, rtol=1e-13)
    jac = jax_rnn.output_jacobian(model, params, xs)
    brute = jax.jacrev(lambda p: jax_rnn.unroll(model, p, xs)[1].output)(params)
    for a, b in zip(jax.tree.leaves(jac), jax.tree.leaves(brute), strict=True):
        np.testing.assert_allclose(a, b, rtol=1e-13)
    g = jax.grad(lambda p: jax_rnn.unroll(model, p, xs)[1].output.sum())(params)
    summed = jax.tree.map(lambda j: j.sum(axis=(0, 1, 2)), jac)
    for a, b in zip(jax.tree.leaves(g), jax.tree.leaves(summed), strict=True):
        np.testing.assert_allclose(a, b, rtol=1e-12, atol=1e-14)


def test_option_errors():
    params = jax_rnn.elman.init(jax.random.key(0), 1, 2, 1, dtype=np.float64)
    xs = np.ones((4, 3, 1))
    with pytest.raises(ValueError, match=r"`seq_lengths` has shape \(2,\), expected the batch "
                       r"shape \(3,\)"):
        jax_rnn.unroll(jax_rnn.elman, params, xs, seq_lengths=np.array([1, 2]))
    with pytest.raises(ValueError, match=r"`seq_lengths` must lie in \[0, 4\]"):
        jax_rnn.unroll(jax_rnn.elman, params, xs, seq_lengths=np.array([1, 2, 5]))
    with pytest.raises(TypeError, match=r"`seq_lengths` has dtype float64, expected integers"):
        jax_rnn.unroll(jax_rnn.elman, params, xs, seq_lengths=np.array([1.0, 2.0, 3.0]))
    with pytest.raises(ValueError, match=r"`resets` has shape \(4,\), expected \(4, 3\)"):
        jax_rnn.unroll(jax_rnn.elman, params, xs, resets=np.zeros(4, bool))
    with pytest.raises(ValueError, match=r"`remat` must be a bool or a positive int"):
        jax_rnn.unroll(jax_rnn.elman, params, xs, remat=0)
    with pytest.raises(ValueError, match=r"`truncate` must be None or a positive int"):
        jax_rnn.unroll(jax_rnn.elman, params, xs, truncate=0)
    with pytest.raises(ValueError, match=r"`dropout_key` was given but the model has no "
                       r"dropout"):
        jax_rnn.unroll(jax_rnn.elman, params, xs, dropout_key=jax.random.key(0))
    model = jax_rnn.stack([jax_rnn.elman, jax_rnn.elman])
    with pytest.raises(TypeError, match=r"a Stack of 2 layers takes a tuple of 2 params"):
        jax_rnn.unroll(model, params, xs)
    p2 = model.init(jax.random.key(0), 3, 2, None, dtype=np.float64)
    with pytest.raises(ValueError, match=r"`xs` has feature size 1 but `params.w_cell_input` "
                       r"expects 3"):
        jax_rnn.unroll(model, p2, xs)
    bad = (p2[0], p2[1]._replace(w_cell_input=np.zeros((5, 2))))
    with pytest.raises(ValueError, match=r"feature size 2 but `params.w_cell_input` expects 5"):
        jax_rnn.unroll(model, bad, np.ones((4, 3, 3)))


def test_user_cell_in_a_stack_keeps_integer_params():
    """Only float leaves are cast to the computation dtype: a user cell may keep indices."""

    def step(p, carry, x):
        w, perm = p
        new = jnp.tanh(x @ w + carry[..., perm])
        return new, new

    def initial_state(p, batch_shape=()):
        return jnp.zeros((*batch_shape, p[0].shape[1]), p[0].dtype)

    user = jax_rnn.Cell(init=None, step=step, initial_state=initial_state)  # type: ignore[arg-type]
    model = jax_rnn.stack([jax_rnn.elman, user])
    first = jax_rnn.elman.init(jax.random.key(11), 2, 3, None, dtype=np.float64)
    rng = np.random.default_rng(11)
    second = (rng.normal(size=(3, 4)), np.array([3, 0, 2, 1]))
    xs = rng.normal(size=(5, 2))
    _, ys = jax_rnn.unroll(model, (first, second), xs)
    h1 = reference.numpy_unroll(first, xs)[1].state
    h2, expect = np.zeros(4), []
    for t in range(5):
        h2 = np.tanh(h1[t] @ second[0] + h2[second[1]])
        expect.append(h2)
    np.testing.assert_allclose(ys, np.stack(expect), rtol=1e-13)


def test_stack_init_with_a_user_cell():
    """``Stack.init`` learns a user cell's output size by tracing one step (shapes only),
    and calls an ``init`` without a ``dtype`` keyword when no dtype is asked for; the
    stack then computes the layers one after the other (numpy)."""

    def init(key, input_size, hidden_size, output_size=None):  # no dtype keyword
        w = jax.random.normal(key, (input_size + hidden_size, hidden_size), jnp.float64)
        return {"w": w / np.sqrt(input_size + hidden_size)}

    def step(p, carry, x):
        new = jnp.tanh(jnp.concatenate([x, carry], -1) @ p["w"])
        return new, jnp.concatenate([new, -new], -1)  # output: twice the hidden size

    def initial_state(p, batch_shape=()):
        return jnp.zeros((*batch_shape, p["w"].shape[1]), p["w"].dtype)

    user = jax_rnn.Cell(init=init, step=step, initial_state=initial_state)
    model = jax_rnn.stack([user, jax_rnn.gru])
    params = model.init(jax.random.key(3), 2, [3, 4])
    assert params[0]["w"].shape == (5, 3)
    assert params[1].w_cell_input.shape == (6, 12)  # the user layer emits 2 * 3 features
    xs = np.random.default_rng(3).normal(size=(6, 2, 2))
    _, ys = jax_rnn.unroll(model, params, xs)
    h, first = np.zeros((2, 3)), []
    for t in range(6):
        h = np.tanh(np.concatenate([xs[t], h], -1) @ np.asarray(params[0]["w"]))
        first.append(np.concatenate([h, -h], -1))
    _, ref = reference.numpy_gru_unroll(params[1], np.stack(first))
    np.testing.assert_allclose(ys.output, ref.output, rtol=1e-6, atol=1e-7)
    with pytest.raises(TypeError, match="dtype"):  # asked for a dtype: the init must take it
        model.init(jax.random.key(3), 2, [3, 4], dtype=np.float32)
