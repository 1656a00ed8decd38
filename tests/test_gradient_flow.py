"""jax_rnn.gradients: state Jacobians, their norms and singular values, loss gradients with
respect to the states and per-step contributions, against jax.jacrev, jax.grad and numpy.

Everything runs in float64 on the CPU, where products are exact float64 products, so the
comparisons are tight. The models are small and reused, so that each jitted function
compiles a handful of times.
"""

from __future__ import annotations

import functools
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from hypothesis import example, given, settings

import jax_rnn
from jax_rnn import gradients
from jax_rnn.reference import numpy_unroll

from ._strategies import elman_problems

LINEAR = jax_rnn.make_elman(lambda a: a)
F64: dict[str, Any] = dict(rtol=1e-10, atol=1e-12)

MODELS = {
    "elman": jax_rnn.elman,
    "elman_relu": jax_rnn.elman_relu,
    "gru": jax_rnn.gru,
    "lstm": jax_rnn.lstm,
    "stack": jax_rnn.stack([jax_rnn.lstm, jax_rnn.elman]),
}
T, B, I, H = 4, 2, 3, 3  # noqa: E741


@functools.cache
def problem(name: str):
    """(model, params, xs, state0): outputs of size 2 and a random initial carry.

    The params are filled from numpy (shapes from ``init`` under ``jax.eval_shape``, which
    compiles nothing) so that the tests spend their time on what they test.
    """
    model = MODELS[name]
    rng = np.random.default_rng(sorted(MODELS).index(name))
    shapes = jax.eval_shape(lambda: model.init(jax.random.key(0), I, H, 2, dtype=jnp.float64))
    params = jax.tree.map(lambda s: rng.uniform(-0.8, 0.8, s.shape), shapes)
    if name == "elman_relu":  # keep the relu units alive: positive drive
        params = params._replace(b_cell=np.abs(params.b_cell) + 0.5)
    xs = rng.normal(size=(T, B, I))
    state0 = jax.tree.map(lambda a: 0.5 * rng.normal(size=a.shape),
                          model.initial_state(params, (B,)))
    return model, params, xs, state0


def unflatten(template, flat):
    """The test's own inverse of flatten_state: split the last axis by the leaves' sizes."""
    leaves, treedef = jax.tree.flatten(template)
    parts, start = [], 0
    for leaf in leaves:
        parts.append(flat[..., start:start + leaf.shape[-1]])
        start += leaf.shape[-1]
    assert start == flat.shape[-1]
    return jax.tree.unflatten(treedef, parts)


def loss_fn(final, ys):
    """A loss that reads every output and the final carry."""
    weights = jnp.arange(1, ys.output.shape[0] + 1)[:, None, None]
    return jnp.sum(jnp.sin(ys.output) * weights) + 0.5 * jnp.sum(
        gradients.flatten_state(final) ** 2
    )


def final_only(final, ys):
    return jnp.sum(jnp.cos(gradients.flatten_state(final)))


@functools.cache
def references(name: str):
    """What jax_rnn.gradients should return, from jax.jacrev and jax.grad of jax_rnn.unroll.

    To differentiate with respect to the state s_t in the middle of the sequence, the
    whole sequence is unrolled with ``resets`` set at step t and ``state0 = s_t``: the
    carry restarts from s_t before step t, so the final state depends on s_t only through
    steps t+1..T (one compiled program for every t). For the loss, the outputs of the
    steps before t are replaced by the true ones, held fixed.
    """
    model, params, xs, state0 = problem(name)

    @jax.jit
    def compute(params, xs, state0):
        def body(carry, x):
            new, _ = model.step(params, carry, x)
            return new, carry

        final, before = jax.lax.scan(body, state0, xs)  # before[t] = s_t, t < T
        flat_before = gradients.flatten_state(before)
        _, ys_true = jax_rnn.unroll(model, params, xs, state0)
        time = jnp.arange(T)

        def restarted(t, flat):
            resets = jnp.broadcast_to((time == t)[:, None], (T, B))
            final, ys = jax_rnn.unroll(model, params, xs, unflatten(state0, flat),
                                       resets=resets)
            keep = time < t
            ys = jax.tree.map(lambda a, b: jnp.where(keep.reshape(-1, 1, 1), a, b),
                              ys_true, ys)
            return final, ys

        def jacobian(t, flat):
            full = jax.jacrev(lambda f: gradients.flatten_state(restarted(t, f)[0]))(flat)
            return jnp.einsum("bibj->bij", full)  # examples are independent: b = b'

        def state_gradient(t, flat):
            return jax.grad(lambda f: loss_fn(*restarted(t, f)))(flat)

        jac = jax.vmap(jacobian)(time, flat_before)
        delta = jax.vmap(state_gradient)(time, flat_before)
        flat_final = gradients.flatten_state(final)
        delta_final = jax.grad(lambda f: loss_fn(unflatten(final, f), ys_true))(flat_final)
        total = jax.grad(lambda p: loss_fn(*jax_rnn.unroll(model, p, xs, state0)))(params)
        return dict(jac=jac, delta=jnp.concatenate([delta, delta_final[None]]), total=total,
                    final=flat_final)

    return compute(params, xs, state0)


def test_flatten_state_orders_leaves():
    h, c = jnp.arange(6.0).reshape(2, 3), 10 + jnp.arange(6.0).reshape(2, 3)
    flat = gradients.flatten_state((jax_rnn.LSTMState(h, c), h))
    np.testing.assert_array_equal(flat, np.concatenate([h, c, h], axis=-1))


@pytest.mark.parametrize("name", list(MODELS))
def test_state_jacobians_match_jacrev_of_unroll(name):
    model, params, xs, state0 = problem(name)
    ref = references(name)
    jac = gradients.state_jacobians(model, params, xs, state0)
    size = ref["final"].shape[-1]
    assert jac.shape == (T + 1, B, size, size)
    np.testing.assert_allclose(jac[:T], ref["jac"], **F64)
    np.testing.assert_array_equal(jac[T], np.broadcast_to(np.eye(size), (B, size, size)))
    # the derivative with respect to s_t is not the same for every t
    assert not np.allclose(jac[0], jac[T - 1])


@pytest.mark.parametrize("name", list(MODELS))
def test_state_gradients_match_grad_of_unroll(name):
    """delta_t: the loss's gradient when steps t+1..T are rerun from s_t, the outputs of
    steps 1..t held fixed (for t = 0, the gradient with respect to state0)."""
    model, params, xs, state0 = problem(name)
    ref = references(name)
    delta = gradients.state_gradients(model, params, xs, loss_fn, state0)
    np.testing.assert_allclose(delta, ref["delta"], **F64)


@pytest.mark.parametrize("name", list(MODELS))
def test_step_contributions_sum_to_the_gradient(name):
    model, params, xs, state0 = problem(name)
    total = references(name)["total"]
    parts = gradients.step_contributions(model, params, xs, loss_fn, state0)
    assert jax.tree.structure(parts) == jax.tree.structure(total)
    for part, whole in zip(jax.tree.leaves(parts), jax.tree.leaves(total), strict=True):
        assert part.shape == (T, *whole.shape)
        np.testing.assert_allclose(part.sum(axis=0), whole, **F64)
    # not a trivial split: several steps contribute to the first weight
    first = np.abs(jax.tree.leaves(parts)[0]).reshape(T, -1).max(axis=1)
    assert np.count_nonzero(first > 1e-8) > 1


@pytest.mark.parametrize("name", ["lstm"])
def test_state_gradients_of_a_final_state_loss_are_rows_of_the_jacobians(name):
    model, params, xs, state0 = problem(name)
    delta = gradients.state_gradients(model, params, xs, final_only, state0)
    jac = gradients.state_jacobians(model, params, xs, state0)
    final = references(name)["final"]
    np.testing.assert_allclose(delta, np.einsum("bi,tbij->tbj", -np.sin(final), jac), **F64)


def numpy_bptt_jacobians(params, xs, state0):
    """d h_T / d h_t = prod_{s=T..t+1} diag(1 - h_s^2) W^T, written out in numpy."""
    _, ys = numpy_unroll(params, xs, state0)
    w = np.asarray(params.w_cell_state, np.float64)
    steps, batch, hidden = xs.shape[0], xs.shape[1:-1], w.shape[0]
    g = np.broadcast_to(np.eye(hidden), (*batch, hidden, hidden)).copy()
    out = [g.copy()]
    for s in range(steps, 0, -1):
        step_jac = (1.0 - ys.state[s - 1] ** 2)[..., :, None] * w.T
        g = g @ step_jac
        out.append(g.copy())
    return np.stack(out[::-1])


AWKWARD = (  # hidden size 1, one step, batch of 1, weights that saturate tanh
    jax_rnn.ElmanParams(w_cell_state=jnp.array([[4.0]]), w_cell_input=jnp.array([[-5.0]]),
                        b_cell=jnp.array([3.0])),
    np.array([[[0.7]]]),
    None,
    np.float64,
)


@settings(max_examples=4)
@example(AWKWARD)
@given(elman_problems(max_t=7, max_size=5, dtypes=(np.float64,), readout=False))
def test_elman_jacobians_and_singular_values_match_numpy(problem):
    params, xs, state0, _ = problem
    expected = numpy_bptt_jacobians(params, xs, state0)
    jac = gradients.state_jacobians(jax_rnn.elman, params, xs, state0)
    np.testing.assert_allclose(jac, expected, rtol=1e-10, atol=1e-13)
    got = gradients.jacobian_singular_values(jax_rnn.elman, params, xs, state0)
    np.testing.assert_allclose(got, np.linalg.svd(expected, compute_uv=False), rtol=1e-9,
                               atol=1e-13)


@pytest.mark.parametrize("name", ["elman", "lstm"])
def test_norms_and_singular_values_match_numpy(name):
    """numpy's SVD and norms of the Jacobians (themselves checked against jax.jacrev)."""
    model, params, xs, state0 = problem(name)
    jac = np.concatenate([references(name)["jac"], np.eye(jac_size(name))[None, None]
                          .repeat(B, axis=1)])
    svals = np.linalg.svd(jac, compute_uv=False)
    if name == "elman":  # every reduction once, on one model
        np.testing.assert_allclose(gradients.jacobian_norms(model, params, xs, state0),
                                   np.linalg.norm(jac, 2, axis=(-2, -1)), rtol=1e-9)
        fro = gradients.jacobian_norms(model, params, xs, state0, ord="fro", log=True)
        np.testing.assert_allclose(fro, np.log(np.linalg.norm(jac, "fro", axis=(-2, -1))),
                                   rtol=1e-9, atol=1e-12)
    log_sv = gradients.jacobian_singular_values(model, params, xs, state0, log=True)
    np.testing.assert_allclose(log_sv, np.log(svals), rtol=1e-9, atol=1e-9)


@pytest.mark.parametrize(("dtype", "steps"), [(np.float32, 20), (np.float64, 60)])
def test_small_singular_values_keep_their_precision(dtype, steps):
    """A symmetric W with eigenvalues 2 and 1/2: W^k has singular values 2^k and 2^-k
    exactly. Their ratio passes 1/eps (float32: 2^40 at k=20; float64: 2^120 at k=60),
    where a plain product of the Jacobians kept nothing of the smaller one (a review
    found -4.29 for -13.86 in float32). Far past the dtype's range the smaller one is 0
    (-inf as a logarithm), as documented; the largest stays exact."""
    c, s = np.cos(0.3), np.sin(0.3)
    rot = np.array([[c, -s], [s, c]])
    w = rot @ np.diag([2.0, 0.5]) @ rot.T
    params = jax_rnn.ElmanParams(w_cell_state=jnp.asarray(w, dtype),
                                 w_cell_input=jnp.zeros((1, 2), dtype), b_cell=None)
    k = np.arange(steps, -1, -1) * np.log(2.0)
    with jax.enable_x64(dtype == np.float64):
        got = gradients.jacobian_singular_values(LINEAR, params, np.zeros((steps, 1), dtype),
                                                 log=True)
        assert got.dtype == dtype
        np.testing.assert_allclose(got, np.stack([k, -k], -1), rtol=5 * np.finfo(dtype).eps,
                                   atol=50 * np.finfo(dtype).eps)
        far = 200 if dtype == np.float32 else 1200
        got = gradients.jacobian_singular_values(LINEAR, params, np.zeros((far, 1), dtype),
                                                 log=True)
    np.testing.assert_allclose(got[0, 0], far * np.log(2.0), rtol=1e-6)
    assert got[0, 1] == -np.inf


def jac_size(name):
    return references(name)["final"].shape[-1]


@pytest.mark.parametrize("radius", [0.5, 1.0, 1.5])
def test_linear_rnn_norms_are_the_norms_of_matrix_powers(radius):
    rng = np.random.default_rng(3)
    w = rng.normal(size=(6, 6))
    w *= radius / np.max(np.abs(np.linalg.eigvals(w)))
    params = jax_rnn.ElmanParams(w_cell_state=jnp.asarray(w),
                                 w_cell_input=jnp.asarray(rng.normal(size=(2, 6))),
                                 b_cell=jnp.asarray(rng.normal(size=6)))
    steps = 30
    xs = rng.normal(size=(steps, 2))
    norms = gradients.jacobian_norms(LINEAR, params, xs)
    expected = [np.linalg.norm(np.linalg.matrix_power(w, steps - t), 2)
                for t in range(steps + 1)]
    np.testing.assert_allclose(norms, expected, rtol=1e-10)
    jac = gradients.state_jacobians(LINEAR, params, xs[:5])
    for t in range(6):
        np.testing.assert_allclose(jac[t], np.linalg.matrix_power(w.T, 5 - t), **F64)


@pytest.mark.parametrize("dtype, steps", [(np.float64, 2000), (np.float32, 400)])
def test_log_norms_do_not_overflow(dtype, steps):
    """r^k overflows float64 at k = 2000 for r = 1.5 (1e352) and float32 at k = 400; the
    log-norms, accumulated with power-of-two rescaling, stay exact."""
    q, _ = np.linalg.qr(np.random.default_rng(0).normal(size=(4, 4)))
    xs = np.zeros((steps, 1), dtype)
    for radius in (1.5, 0.5):
        params = jax_rnn.ElmanParams(w_cell_state=jnp.asarray(radius * q, dtype),
                                     w_cell_input=jnp.ones((1, 4), dtype), b_cell=None)
        log_norms = gradients.jacobian_norms(LINEAR, params, xs, log=True)
        expected = (steps - np.arange(steps + 1)) * np.log(radius)
        assert log_norms.dtype == dtype
        tol = 1e-9 if dtype == np.float64 else 1e-3
        np.testing.assert_allclose(log_norms, expected, rtol=tol, atol=tol)
        plain = gradients.jacobian_norms(LINEAR, params, xs)
        assert (np.isinf(plain[0]) if radius > 1 else plain[0] == 0.0)


def test_elman_step_contributions_match_numpy_bptt():
    """Term t of dL/dW for L = y_T: outer(h_{t-1}, d_pre_t) and outer(x_t, d_pre_t), with
    d_pre walked back from the readout in numpy."""
    params, xs, state0 = jax_rnn.seed_example(np.float64)

    def last_output(final, ys):
        return ys.output[-1, 0]

    parts = gradients.step_contributions(jax_rnn.elman, params, xs, last_output, state0)
    _, ys = numpy_unroll(params, xs, state0)
    w = np.asarray(params.w_cell_state)
    steps = xs.shape[0]
    g = np.asarray(params.w_output)[:, 0]
    for t in range(steps - 1, -1, -1):
        d_pre = g * (1.0 - ys.state[t] ** 2)
        h_prev = np.asarray(state0) if t == 0 else ys.state[t - 1]
        np.testing.assert_allclose(parts.w_cell_state[t], np.outer(h_prev, d_pre), **F64)
        np.testing.assert_allclose(parts.w_cell_input[t], np.outer(xs[t], d_pre), **F64)
        np.testing.assert_allclose(parts.b_cell[t], d_pre, **F64)
        g = d_pre @ w.T
    expected_w_output = np.zeros((steps, 2, 1))
    expected_w_output[-1] = ys.state[-1][:, None]
    np.testing.assert_allclose(parts.w_output, expected_w_output, **F64)


def test_zero_length_sequences():
    model, params, _, state0 = problem("lstm")
    xs = np.zeros((0, B, I))
    jac = gradients.state_jacobians(model, params, xs, state0)
    np.testing.assert_array_equal(jac, np.broadcast_to(np.eye(2 * H), (1, B, 2 * H, 2 * H)))
    np.testing.assert_array_equal(gradients.jacobian_norms(model, params, xs, state0), 1.0)
    parts = gradients.step_contributions(model, params, xs, final_only, state0)
    assert parts.w_cell_state.shape == (0, H, 4 * H)
    delta = gradients.state_gradients(model, params, xs, final_only, state0)
    flat = gradients.flatten_state(state0)
    np.testing.assert_allclose(delta, -np.sin(flat)[None], **F64)


def test_errors_say_what_to_do():
    model, params, xs, state0 = problem("elman")
    with pytest.raises(TypeError, match="bidirectional"):
        bi = jax_rnn.bidirectional(jax_rnn.elman)
        gradients.state_jacobians(bi, bi.init(jax.random.key(0), I, H), xs)
    with pytest.raises(ValueError, match="`ord` must be 2"):
        gradients.jacobian_norms(model, params, xs, ord=1)
    with pytest.raises(TypeError, match="must return a scalar"):
        gradients.state_gradients(model, params, xs, lambda final, ys: ys.output, state0)
    with pytest.raises(TypeError, match="`loss` must be a function"):
        gradients.step_contributions(model, params, xs, "mse", state0)  # pyright: ignore
    with pytest.raises(ValueError, match="feature size"):
        gradients.state_jacobians(model, params, xs[..., :2])
    with pytest.raises(TypeError, match=r"`loss` must take 2 positional argument"):
        gradients.state_gradients(model, params, xs, lambda final: final.sum())
    with pytest.raises(TypeError, match=r"real floating-point scalar .* got dtype int32"):
        gradients.state_gradients(model, params, xs, lambda final, ys: jnp.int32(1))
    with pytest.raises(TypeError, match=r"`log` must be True or False, got 'no'"):
        gradients.jacobian_norms(model, params, xs, log="no")  # pyright: ignore
    with pytest.raises(ValueError, match=r"every leaf of the carry .* shapes \[\(3,\), \(\)\]"):
        gradients.flatten_state((jnp.ones(3), jnp.ones(())))


_TARGET = np.zeros(2)  # read by _target_loss from outside; changed by the test below


def _target_loss(final, ys):
    return jnp.sum((ys.output - _TARGET) ** 2)


@pytest.mark.parametrize("what", ["state_gradients", "step_contributions"])
def test_a_loss_that_reads_a_changed_global_gets_its_new_value(what, monkeypatch):
    """The same loss function, called again after a global it reads changed: the
    gradients follow the new value, as jax.grad of unroll does (they were those of the
    first call's value, silently: the loss was a static argument of a cached jit)."""
    model, params, xs, state0 = problem("gru")
    fn = getattr(gradients, what)
    fn(model, params, xs, _target_loss, state0)
    monkeypatch.setattr(__import__(__name__, fromlist=["_"]), "_TARGET", np.full(2, 5.0))

    def direct(p, s0):
        return jnp.sum((jax_rnn.unroll(model, p, xs, s0)[1].output - 5.0) ** 2)

    got = fn(model, params, xs, _target_loss, state0)
    if what == "state_gradients":
        np.testing.assert_allclose(got[0], jax.grad(direct, 1)(params, state0), **F64)
    else:
        expected = jax.grad(direct)(params, state0)
        for a, b in zip(jax.tree.leaves(got), jax.tree.leaves(expected), strict=True):
            np.testing.assert_allclose(a.sum(0), b, **F64)


def test_generate_follows_a_feedbacks_changed_closure():
    """generate with the same feedback function after the value it closes over changed
    (it kept the first value: the feedback was a static argument of a cached jit)."""
    model, params, _, _ = problem("elman")  # outputs of size 2, inputs of size 3
    scale = [1.0]

    def feedback(y):
        return scale[0] * jnp.concatenate([y.output, y.output[..., :1]], axis=-1)

    first = np.ones(I)
    _, _, xs_one = jax_rnn.generate(model, params, None, first, 3, feedback)
    scale[0] = 0.0
    _, ys, xs_zero = jax_rnn.generate(model, params, None, first, 3, feedback)
    assert float(np.abs(xs_one[1:]).max()) > 0.1
    np.testing.assert_array_equal(xs_zero[1:], 0.0)
    _, by_hand = jax_rnn.unroll(model, params, np.stack([first, first * 0, first * 0]))
    np.testing.assert_allclose(ys.output, by_hand.output, **F64)


def test_generate_checks_its_feedback_and_key():
    model, params, _, _ = problem("elman")
    with pytest.raises(TypeError, match=r"`feedback` must take 2 .* \(as `key` is given\)"):
        jax_rnn.generate(model, params, None, np.ones(I), 2, lambda y: y.output,
                         key=jax.random.key(0))
    with pytest.raises(TypeError, match=r"`feedback` must take 1 positional"):
        jax_rnn.generate(model, params, None, np.ones(I), 2, lambda y, k: y.output)
    with pytest.raises(TypeError, match=r"`key` must be a random key, .* got int 0"):
        jax_rnn.generate(model, params, None, np.ones(I), 2, lambda y, k: y.output, key=0)


def test_a_stack_inside_a_stack_steps_like_the_flat_stack():
    """generate and the gradients functions step a nested stack (they raised a
    'bidirectional layer' error); stack([stack([a]), b]) computes what stack([a, b]) does."""
    flat_model = jax_rnn.stack([jax_rnn.elman, jax_rnn.gru])
    nested = jax_rnn.stack([jax_rnn.stack([jax_rnn.elman]), jax_rnn.gru])
    flat = flat_model.init(jax.random.key(0), I, H, I, dtype=jnp.float64)
    params = ((flat[0],), flat[1])
    xs = np.random.default_rng(0).normal(size=(T, I))
    a = jax_rnn.generate(flat_model, flat, None, xs[0], 4)
    b = jax_rnn.generate(nested, params, ((jnp.zeros(H),), jnp.zeros(H)), xs[0], 4)
    np.testing.assert_allclose(a[1].output, b[1].output, **F64)
    np.testing.assert_allclose(gradients.jacobian_norms(nested, params, xs),
                               gradients.jacobian_norms(flat_model, flat, xs), **F64)


@pytest.mark.parametrize("dtype", [jnp.bfloat16, jnp.float16])
def test_half_precision_spectral_norms_and_singular_values(dtype):
    """XLA's SVD and QR take no half-precision floats (these raised an XLA error): they
    run in float32, and agree with the float64 values to the dtype's precision."""
    model, params, xs, state0 = problem("gru")

    def cast(tree, to):
        return jax.tree.map(lambda a: jnp.asarray(a, to), tree)

    for fn in (gradients.jacobian_singular_values,
               lambda *a, **k: gradients.jacobian_norms(*a, ord=2, **k)):
        low = fn(model, cast(params, dtype), cast(xs, dtype), cast(state0, dtype), log=True)
        assert low.dtype == dtype
        ref = fn(model, params, xs, state0, log=True)
        np.testing.assert_allclose(np.asarray(low, np.float64), ref, rtol=0, atol=0.1)
