"""`unroll(method="deer" | "quasi_deer")` against `method="sequential"`, through every
option, stacks and bidirectional layers; values and all gradients."""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

import jax_rnn

CELLS = [jax_rnn.elman, jax_rnn.gru, jax_rnn.lstm]
OPTIONS = {
    "plain": {},
    "lengths": {"seq_lengths": np.array([9, 4, 0])},
    "lengths_reverse": {"seq_lengths": np.array([9, 4, 0]), "reverse": True},
    "reverse": {"reverse": True},
    "truncate": {"truncate": 3},
    "resets": {"resets": np.eye(9, 3, -4, dtype=bool)},
}


def _loss(model, params, xs, state0, method, **kw):
    final, ys = jax_rnn.unroll(model, params, xs, state0, method=method, **kw)
    return (jnp.sum(jnp.sin(ys.output)) + jnp.sum(ys.state)
            + sum(jnp.sum(f**2) for f in jax.tree.leaves(final)))


@settings(max_examples=5)
@given(cell_index=st.integers(0, 2), method=st.sampled_from(["deer", "quasi_deer"]),
       option=st.sampled_from(sorted(OPTIONS)), scale=st.sampled_from([0.5, 3.0]),
       seed=st.integers(0, 100))
def test_parallel_methods_equal_sequential(cell_index, method, option, scale, seed):
    """Values and gradients (params, inputs, initial state) in float64 to 1e-10, for
    contractive weights and for weights scaled up to spectral radius > 1."""
    cell = CELLS[cell_index]
    params = jax.tree.map(lambda a: a * scale,
                          cell.init(jax.random.key(seed), 2, 3, 2, dtype=np.float64))
    rng = np.random.default_rng(seed)
    xs = rng.normal(size=(9, 3, 2))
    state0 = jax.tree.map(lambda a: a + 0.1, cell.initial_state(params, (3,)))
    grad = jax.value_and_grad(_loss, argnums=(1, 2, 3))
    a = grad(cell, params, xs, state0, method, **OPTIONS[option])
    b = grad(cell, params, xs, state0, "sequential", **OPTIONS[option])
    for x, y in zip(jax.tree.leaves(a), jax.tree.leaves(b), strict=True):
        np.testing.assert_allclose(x, y, rtol=1e-10, atol=1e-10)


def test_float32_and_stacked_bidirectional_with_info():
    model = jax_rnn.stack([jax_rnn.bidirectional(jax_rnn.gru), jax_rnn.lstm])
    params = model.init(jax.random.key(0), 2, 4, 1, dtype=np.float32)
    xs = np.random.default_rng(0).normal(size=(30, 2, 2)).astype(np.float32)
    lengths = np.array([30, 17])
    final, ys, info = jax_rnn.unroll(model, params, xs, seq_lengths=lengths,
                                     method="quasi_deer", return_info=True)
    final_s, ys_s = jax_rnn.unroll(model, params, xs, seq_lengths=lengths)
    np.testing.assert_allclose(ys.output, ys_s.output, rtol=1e-5, atol=1e-5)
    for x, y in zip(jax.tree.leaves(final), jax.tree.leaves(final_s), strict=True):
        np.testing.assert_allclose(x, y, rtol=1e-5, atol=1e-5)
    assert isinstance(info[0], jax_rnn.BidirectionalState)
    for layer_info in (info[0].forward, info[0].backward, info[1]):
        assert bool(layer_info.converged) and not bool(layer_info.fell_back)
        assert 0 < int(layer_info.iterations) <= 30
    _, _, info_seq = jax_rnn.unroll(model, params, xs, return_info=True)
    assert info_seq == (jax_rnn.BidirectionalState(None, None), None)
    # float32 gradients through the stack (every layer's adjoint solve): 1e-5 of each
    # leaf's largest entry, the bar's float32 tolerance.
    def loss(method, p):
        final, ys = jax_rnn.unroll(model, p, xs, seq_lengths=lengths, method=method)
        return jnp.sum(jnp.sin(ys.output)) + sum(jnp.sum(f**2) for f in jax.tree.leaves(final))

    got = jax.grad(functools.partial(loss, "quasi_deer"))(params)
    want = jax.grad(functools.partial(loss, "sequential"))(params)
    for g, w in zip(jax.tree.leaves(got), jax.tree.leaves(want), strict=True):
        assert g.dtype == np.float32
        scale = max(1.0, float(np.abs(w).max()))
        np.testing.assert_allclose(g, w, rtol=0, atol=1e-5 * scale)


def test_expansive_weights_fall_back_or_raise_never_wrong():
    params = jax_rnn.elman.init(jax.random.key(1), 1, 4, 1, dtype=np.float32)
    params = params._replace(w_cell_state=params.w_cell_state * 40.0)
    xs = np.random.default_rng(1).normal(size=(60, 1)).astype(np.float32)
    _, ys_seq = jax_rnn.unroll(jax_rnn.elman, params, xs)
    _, ys, info = jax_rnn.unroll(jax_rnn.elman, params, xs, method="deer", max_iter=2,
                                 return_info=True)
    np.testing.assert_allclose(ys.state, ys_seq.state, rtol=1e-6, atol=1e-6)
    assert bool(info.fell_back) and not bool(info.converged)
    with pytest.raises(ValueError, match=r"`jax_rnn.unroll`: method='deer' did not converge"):
        jax_rnn.unroll(jax_rnn.elman, params, xs, method="deer", max_iter=2,
                       on_failure="raise")


def test_raise_under_jit_fails_or_returns_nan_never_a_wrong_sequence():
    """Under the caller's jit, on_failure="raise" raises from a callback where JAX
    propagates callback errors (CPU, JAX 0.10) and otherwise returns NaN states (seen on
    an H200 with JAX 0.11, where the callback's error was only logged)."""
    params = jax_rnn.elman.init(jax.random.key(1), 1, 4, 1, dtype=np.float32)
    params = params._replace(w_cell_state=params.w_cell_state * 40.0)
    xs = np.random.default_rng(1).normal(size=(60, 1)).astype(np.float32)

    @functools.partial(jax.jit, static_argnames="max_iter")
    def run(p, x, max_iter=2):
        _, ys = jax_rnn.unroll(jax_rnn.elman, p, x, method="deer", max_iter=max_iter,
                               on_failure="raise")
        return ys

    try:
        ys = jax.block_until_ready(run(params, xs))
    except (ValueError, jax.errors.JaxRuntimeError) as err:
        assert "did not converge" in str(err)
    else:
        assert np.isnan(ys.state).all() and np.isnan(ys.output).all()
    # A solve that converges is untouched by the check.
    good = jax_rnn.elman.init(jax.random.key(1), 1, 4, 1, dtype=np.float32)
    _, ref = jax_rnn.unroll(jax_rnn.elman, good, xs)
    np.testing.assert_allclose(run(good, xs, max_iter=None).state, ref.state, rtol=1e-5,
                               atol=1e-5)


def test_guess_warm_start_and_errors():
    params = jax_rnn.gru.init(jax.random.key(2), 2, 3, dtype=np.float64)
    xs = np.random.default_rng(2).normal(size=(25, 2))
    final, ys, info = jax_rnn.unroll(jax_rnn.gru, params, xs, method="deer", return_info=True)
    _, ys2, info2 = jax_rnn.unroll(jax_rnn.gru, params, xs, method="deer", guess=ys.state,
                                   return_info=True)
    assert int(info2.iterations) == 0 and int(info.iterations) > 0
    np.testing.assert_allclose(ys2.state, ys.state, rtol=1e-12)
    with pytest.raises(ValueError, match=r"`remat` applies to method=\"sequential\" only"):
        jax_rnn.unroll(jax_rnn.gru, params, xs, method="deer", remat=True)
    with pytest.raises(ValueError, match=r"`guess` is for method=\"deer\""):
        jax_rnn.unroll(jax_rnn.gru, params, xs, guess=ys.state)
    with pytest.raises(ValueError, match=r"`method` must be one of"):
        jax_rnn.unroll(jax_rnn.gru, params, xs, method="elk")


def test_output_jacobian_through_deer():
    params = jax_rnn.elman.init(jax.random.key(3), 2, 3, 2, dtype=np.float64)
    xs = np.random.default_rng(3).normal(size=(6, 2))
    a = jax_rnn.output_jacobian(jax_rnn.elman, params, xs, method="deer")
    b = jax_rnn.output_jacobian(jax_rnn.elman, params, xs)
    for x, y in zip(jax.tree.leaves(a), jax.tree.leaves(b), strict=True):
        np.testing.assert_allclose(x, y, rtol=1e-10, atol=1e-12)


@pytest.mark.parametrize(("cell", "option"), [
    (jax_rnn.elman, "lengths_reverse"), (jax_rnn.elman, "resets"),
    (jax_rnn.elman_relu, "truncate"), (jax_rnn.elman_relu, "plain")])
def test_deer_with_written_out_elman_jacobians_equals_sequential(cell, option):
    """DEER on the Elman cells uses their written-out Jacobians, masked for padding,
    resets and truncation (each checked against autodiff of the masked step below):
    values and gradients equal the sequential unroll in float64."""
    from jax_rnn._parallel import jacobian_of

    assert jacobian_of(cell.step) is not None
    params = jax.tree.map(lambda a: a * 2.0,
                          cell.init(jax.random.key(5), 2, 3, 2, dtype=np.float64))
    xs = np.random.default_rng(5).normal(size=(9, 3, 2))
    state0 = cell.initial_state(params, (3,)) + 0.1
    grad = jax.value_and_grad(_loss, argnums=(1, 2, 3))
    a = grad(cell, params, xs, state0, "deer", **OPTIONS[option])
    b = grad(cell, params, xs, state0, "sequential", **OPTIONS[option])
    for x, y in zip(jax.tree.leaves(a), jax.tree.leaves(b), strict=True):
        np.testing.assert_allclose(x, y, rtol=1e-10, atol=1e-10)


@pytest.mark.parametrize("kind", ["elman", "elman_relu", "gru"])
@pytest.mark.parametrize("cut_shape", ["scalar", "per_example"])
def test_masked_jacobians_and_diagonals_are_those_of_the_masked_step(kind, cut_shape):
    """What DEER / quasi-DEER use inside ``unroll`` at a step with padding, a reset or a
    cut, in every combination, equals ``jax.jacfwd`` of the masked step itself (per
    example, float64): the identity where a padded step copies its carry, zero where a
    reset or a cut stops it."""
    from jax_rnn._parallel import jacobian_diagonal_of, jacobian_of
    from jax_rnn._unroll import _identity_matrices, _masked_derivative, _masked_step

    cell = getattr(jax_rnn, kind)
    params = jax.tree.map(lambda a: a * 2.0,
                          cell.init(jax.random.key(7), 2, 3, None, dtype=np.float64))
    rng = np.random.default_rng(7)
    combos = np.array([(v, r, c) for v in (0, 1) for r in (0, 1) for c in (0, 1)], bool)
    batch = len(combos)
    carry, c0 = rng.normal(size=(batch, 3)), rng.normal(size=(batch, 3))
    x = rng.normal(size=(batch, 2))
    valid, reset, cut = combos.T
    step = _masked_step(cell)
    cuts = [cut] if cut_shape == "per_example" else [np.bool_(False), np.bool_(True)]
    for cut_t in cuts:
        inp = (x, valid, reset, cut_t)
        want = np.stack([
            jax.jacfwd(lambda h, i=i, inp=inp: step(
                (params, c0[i]), h, tuple(m[i] if np.ndim(m) else m for m in inp))[0])(carry[i])
            for i in range(batch)])
        diagonal = _masked_derivative(jacobian_diagonal_of(cell.step),
                                      lambda d: jax.tree.map(jnp.ones_like, d))
        got_diag = diagonal((params, c0), carry, inp)
        np.testing.assert_allclose(got_diag, np.diagonal(want, axis1=-2, axis2=-1),
                                   rtol=1e-12, atol=1e-12)
        if kind != "gru":
            jacobian = _masked_derivative(jacobian_of(cell.step), _identity_matrices)
            np.testing.assert_allclose(jacobian((params, c0), carry, inp), want,
                                       rtol=1e-12, atol=1e-12)


def _leaky(params, h, x):  # h' = h/2 + tanh(x u + h w)/2: a user step
    h = 0.5 * h + 0.5 * jnp.tanh(x @ params["u"] + h @ params["w"])
    return h, h


def test_a_registered_diagonal_of_a_user_cell_is_used_by_unroll():
    """register_jacobian_diagonal (public) reaches unroll(method="quasi_deer") for a Cell
    with that step: the diagonal runs (the generic path would not call it), and values
    and gradients equal the sequential unroll's (float64, 1e-10)."""
    calls = []

    def diagonal(params, h, x):
        calls.append(1)
        slope = 1 - jnp.tanh(x @ params["u"] + h @ params["w"]) ** 2
        return 0.5 + 0.5 * slope * jnp.diagonal(params["w"])

    jax_rnn.register_jacobian_diagonal(_leaky, diagonal)
    cell = jax_rnn.Cell(None, _leaky, lambda p, batch=(): jnp.zeros((*batch, 3)))  # type: ignore[arg-type]
    rng = np.random.default_rng(4)
    params = {"u": rng.normal(size=(2, 3)), "w": 0.8 * rng.normal(size=(3, 3))}
    xs = rng.normal(size=(20, 2, 2))

    def loss(method, p, x):
        final, ys = jax_rnn.unroll(cell, p, x, method=method)
        return jnp.sum(jnp.sin(ys)) + jnp.sum(final**2)

    got = jax.value_and_grad(functools.partial(loss, "quasi_deer"), argnums=(0, 1))(params, xs)
    assert calls
    want = jax.value_and_grad(functools.partial(loss, "sequential"), argnums=(0, 1))(params, xs)
    for a, b in zip(jax.tree.leaves(got), jax.tree.leaves(want), strict=True):
        np.testing.assert_allclose(a, b, rtol=1e-10, atol=1e-10)


def test_a_guess_without_the_lstm_cell_state_is_a_clear_error():
    params = jax_rnn.lstm.init(jax.random.key(3), 2, 3, dtype=np.float64)
    xs = np.random.default_rng(3).normal(size=(8, 2))
    _, ys = jax_rnn.unroll(jax_rnn.lstm, params, xs)
    with pytest.raises(ValueError, match=r"^`jax_rnn.unroll`: `guess` must hold the carries "
                       r"stacked over time, structured like the carry .*LSTMState\(h=\.\.\., "
                       r"c=\.\.\.\)"):
        jax_rnn.unroll(jax_rnn.lstm, params, xs, method="deer", guess=ys.state)
    c = np.zeros_like(ys.state)  # both trajectories: accepted (c is a poor guess, still right)
    _, ys2 = jax_rnn.unroll(jax_rnn.lstm, params, xs, method="deer",
                            guess=jax_rnn.LSTMState(ys.state, c))
    np.testing.assert_allclose(ys2.state, ys.state, rtol=1e-10, atol=1e-10)


def test_float32_fallback_is_the_plain_scan_unroll_for_chaotic_dynamics():
    """Where Newton cannot converge (tanh weights of spectral radius 10: chaotic), the
    fallback returns exactly what unroll(impl="scan") returns. The default fused path
    rounds differently, and chaos amplifies that: the two sequential results differ far
    beyond 1e-5 here, which is why the float32 bar holds only where the problem is
    well conditioned (docs/parallel.md)."""
    params = jax_rnn.elman.init(jax.random.key(5), 3, 8, None, dtype=np.float32)
    w = np.asarray(params.w_cell_state, np.float64)
    params = params._replace(
        w_cell_state=(w * 10.0 / np.abs(np.linalg.eigvals(w)).max()).astype(np.float32))
    xs = np.random.default_rng(5).normal(size=(500, 4, 3)).astype(np.float32)
    _, ys, info = jax_rnn.unroll(jax_rnn.elman, params, xs, method="deer", return_info=True)
    # the fallback's scan takes one step per loop iteration (unroll=1, the CPU default)
    _, scan = jax_rnn.unroll(jax_rnn.elman, params, xs, impl="scan", unroll=1)
    assert bool(info.fell_back) and not bool(info.converged)
    np.testing.assert_array_equal(ys.state, scan.state)
    if jax.default_backend() == "cpu":  # measured here; other backends may round alike
        _, fused = jax_rnn.unroll(jax_rnn.elman, params, xs)
        assert np.abs(fused.state - scan.state).max() > 1e-3  # rounding, amplified by chaos


# reverse=True runs the forward direction through the prefix-reversing index (with
# lengths) or the flip (without), and the backward direction plainly.
@pytest.mark.parametrize(("reverse", "lengths"), [(True, [11, 6]), (True, None)])
def test_info_carries_warm_start_a_stack_with_an_lstm(reverse, lengths):
    """return_info's ParallelInfo.carries is the solution in the caller's time order,
    structured like the carry (an LSTM's h and c): passed back as `guess`, every layer
    and direction of a stack starts solved (0 iterations) and gives the same result, with
    seq_lengths and reverse. The carries equal the sequential unroll's states (float64)."""
    model = jax_rnn.stack([jax_rnn.bidirectional(jax_rnn.elman), jax_rnn.lstm])
    params = model.init(jax.random.key(8), 2, 3, 1, dtype=np.float64)
    xs = np.random.default_rng(8).normal(size=(11, 2, 2))
    lengths = None if lengths is None else np.array(lengths)
    kw = dict(seq_lengths=lengths, reverse=reverse, method="deer", return_info=True)
    final, ys, info = jax_rnn.unroll(model, params, xs, **kw)
    is_info = lambda x: isinstance(x, jax_rnn.ParallelInfo)  # noqa: E731
    guess = jax.tree.map(lambda i: i.carries, info, is_leaf=is_info)
    assert isinstance(guess[1], jax_rnn.LSTMState)
    final2, ys2, info2 = jax_rnn.unroll(model, params, xs, guess=guess, **kw)
    for layer_info in jax.tree.leaves(info, is_leaf=is_info):
        assert int(layer_info.iterations) > 0
    for layer_info in jax.tree.leaves(info2, is_leaf=is_info):
        assert int(layer_info.iterations) == 0 and bool(layer_info.converged)
    for a, b in zip(jax.tree.leaves((final2, ys2)), jax.tree.leaves((final, ys)), strict=True):
        np.testing.assert_allclose(a, b, rtol=1e-12, atol=1e-12)
    # The top layer's carries against the sequential unroll of the same stack: its h are
    # the model's output states (valid steps; padded steps carry the final state through).
    _, ys_seq = jax_rnn.unroll(model, params, xs, seq_lengths=kw["seq_lengths"],
                               reverse=reverse)
    valid = 11 if lengths is None else 6
    np.testing.assert_allclose(guess[1].h[:valid, 1], ys_seq.state[:valid, 1], rtol=1e-10,
                               atol=1e-10)
    np.testing.assert_allclose(guess[1].h[:, 0], ys_seq.state[:, 0], rtol=1e-10, atol=1e-10)


def test_info_carries_of_an_empty_sequence():
    params = jax_rnn.lstm.init(jax.random.key(9), 2, 3, dtype=np.float32)
    _, _, info = jax_rnn.unroll(jax_rnn.lstm, params, np.zeros((0, 4, 2), np.float32),
                                method="deer", return_info=True)
    assert info.carries.h.shape == info.carries.c.shape == (0, 4, 3)


def test_carries_are_not_an_output_unless_info_is_asked_for(monkeypatch):
    """Without return_info the compiled call does not return the trajectory-sized
    carries (an eager call would otherwise hold a second copy of the states)."""
    seen = []
    jitted = jax_rnn._unroll._unroll_jit

    def spy(*args, **kwargs):
        result = jitted(*args, **kwargs)
        seen.append(result[2])
        return result

    monkeypatch.setattr(jax_rnn._unroll, "_unroll_jit", spy)
    params = jax_rnn.lstm.init(jax.random.key(10), 2, 3, dtype=np.float64)
    xs = np.random.default_rng(10).normal(size=(6, 2))
    jax_rnn.unroll(jax_rnn.lstm, params, xs, method="deer")
    jax_rnn.unroll(jax_rnn.lstm, params, xs, method="deer", return_info=True)
    assert seen[0].carries is None and seen[1].carries.c.shape == (6, 3)
