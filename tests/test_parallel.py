"""Parallel-in-time evaluation (DEER, quasi-DEER) against a plain ``jax.lax.scan``.

Every check compares :func:`parallel_solve` with the sequential scan of the same step:
states, outputs and the gradients with respect to ``params``, ``xs`` and ``carry0``
(float64 to 1e-10, float32 to 1e-5, relative to the largest entry), for contractive and
for expansive weights (spectral radius > 1), where Newton either still converges or the
sequential fallback must take over.

Each distinct shape, dtype and option compiles a while loop of associative scans and its
custom VJP (a few seconds on a busy 2-core machine), so the property tests draw weights,
seeds and scales freely but shapes from a short list, and the jitted functions are cached
per configuration: examples that share a configuration share one compilation.
"""

from __future__ import annotations

import functools
import math
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from jax.flatten_util import ravel_pytree

import jax_rnn
from jax_rnn import _parallel
from jax_rnn._parallel import (
    ParallelInfo,
    default_tol,
    jacobian_diagonal_of,
    parallel_solve,
)

METHODS = ("deer", "quasi_deer")
SOME = max(6, settings().max_examples // 2)
FEW = max(3, settings().max_examples // 5)


def tolerance(dtype: Any) -> float:
    return 1e-10 if np.dtype(dtype) == np.float64 else 1e-5


def assert_trees_close(got: Any, want: Any, dtype: Any, what: str) -> None:
    """Leaf by leaf, to ``tolerance(dtype)`` relative to the largest entry of each leaf."""
    tol = tolerance(dtype)
    got_leaves, want_leaves = jax.tree.leaves(got), jax.tree.leaves(want)
    assert len(got_leaves) == len(want_leaves), what
    for i, (g, w) in enumerate(zip(got_leaves, want_leaves, strict=True)):
        g, w = np.asarray(g, np.float64), np.asarray(w, np.float64)
        assert g.shape == w.shape, (what, i)
        scale = max(1.0, float(np.abs(w).max(initial=0.0)))
        np.testing.assert_allclose(g, w, rtol=0, atol=tol * scale, err_msg=f"{what}[{i}]")


def _loss(final: Any, ys: Any) -> jax.Array:
    """A scalar that every output and the final carry reach, nonlinearly."""
    return sum(jnp.sum(jnp.sin(leaf)) for leaf in jax.tree.leaves(ys)) + sum(
        jnp.sum(jnp.cos(leaf)) for leaf in jax.tree.leaves(final)
    )


@functools.cache
def sequential(step: Any) -> Any:
    """jit(value_and_grad) of the loss through ``jax.lax.scan``: the reference."""

    def run(params, xs, carry0):
        final, ys = jax.lax.scan(functools.partial(step, params), carry0, xs)
        return _loss(final, ys), (final, ys)

    return jax.jit(jax.value_and_grad(run, argnums=(0, 1, 2), has_aux=True))


@functools.cache
def parallel(step: Any, **options: Any) -> Any:
    """jit(value_and_grad) of the same loss through :func:`parallel_solve`."""

    def run(params, xs, carry0):
        final, ys, info = parallel_solve(step, params, carry0, xs, **options)
        return _loss(final, ys), (final, ys, info)

    return jax.jit(jax.value_and_grad(run, argnums=(0, 1, 2), has_aux=True))


@functools.cache
def forward(step: Any, **options: Any) -> Any:
    """jit of :func:`parallel_solve` alone (no gradients)."""
    return jax.jit(lambda params, xs, carry0: parallel_solve(step, params, carry0, xs, **options))


def check_against_scan(
    step: Any, params: Any, xs: Any, carry0: Any, dtype: Any, **options: Any
) -> ParallelInfo:
    """Values and gradients of parallel_solve equal the scan's; returns the info."""
    (_, (final, ys, info)), grads = parallel(step, **options)(params, xs, carry0)
    (_, (ref_final, ref_ys)), ref_grads = sequential(step)(params, xs, carry0)
    assert_trees_close(final, ref_final, dtype, "final carry")
    assert_trees_close(ys, ref_ys, dtype, "ys")
    for name, g, r in zip(("params", "xs", "carry0"), grads, ref_grads, strict=True):
        assert_trees_close(g, r, dtype, f"d loss / d {name}")
    # The answer came either from a converged Newton iterate or from the fallback.
    assert bool(info.converged) != bool(info.fell_back)
    return info


def uniform(rng: np.random.Generator, scale: float, *shape: int, fan_in: int = 1) -> np.ndarray:
    return rng.uniform(-1, 1, shape) * scale / math.sqrt(fan_in)


# --- Elman: both methods, both dtypes, contractive and expansive ------------------------


@settings(max_examples=SOME)
@given(
    method=st.sampled_from(METHODS),
    dtype=st.sampled_from([np.float64, np.float32]),
    scale=st.floats(0.2, 3.0),
    seed=st.integers(0, 2**31 - 1),
)
def test_elman_matches_scan(method, dtype, scale, seed):
    """scale 3 gives recurrent weights of spectral radius about sqrt(3) > 1. One shape
    only (each shape compiles anew): T = 1 and H = 1 have their own tests below."""
    steps, batch, inputs, hidden = 12, (2,), 2, 3
    rng = np.random.default_rng(seed)
    params = jax_rnn.ElmanParams(
        w_cell_state=uniform(rng, scale, hidden, hidden, fan_in=hidden).astype(dtype),
        w_cell_input=uniform(rng, scale, inputs, hidden, fan_in=inputs).astype(dtype),
        b_cell=uniform(rng, scale, hidden).astype(dtype),
        w_output=uniform(rng, 1.0, hidden, 2).astype(dtype),
        b_output=None,
    )
    xs = rng.normal(size=(steps, *batch, inputs)).astype(dtype)
    carry0 = rng.uniform(-1, 1, (*batch, hidden)).astype(dtype)
    info = check_against_scan(jax_rnn.elman_step, params, xs, carry0, dtype, method=method)
    assert int(info.iterations) <= steps  # exact after at most T iterations


# --- GRU and LSTM ---------------------------------------------------------------------

# Both cells with both methods and both dtypes would be 8 compilations; these two cover
# the GRU, the LSTM's pair carry and its registered diagonal.
GATED = [("gru", "deer", np.float32), ("lstm", "quasi_deer", np.float64)]


def gated_params(
    kind: str, rng: np.random.Generator, inputs: int, hidden: int, scale: float, dtype: Any
) -> Any:
    """PyTorch-style uniform GRU/LSTM params times ``scale``, with a readout of size 2
    (drawn with numpy: ``cell.init`` would compile a random kernel per shape)."""
    width = {"gru": 3, "lstm": 4}[kind] * hidden
    bound = scale / math.sqrt(hidden)

    def u(*shape: int) -> np.ndarray:
        return (bound * rng.uniform(-1, 1, shape)).astype(dtype)

    params_type = jax_rnn.GRUParams if kind == "gru" else jax_rnn.LSTMParams
    return params_type(u(inputs, width), u(hidden, width), u(width), u(width), u(hidden, 2), u(2))


@pytest.mark.parametrize(("kind", "method", "dtype"), GATED)
@settings(max_examples=FEW)
@given(scale=st.floats(0.5, 3.0), seed=st.integers(0, 2**31 - 1))
def test_gated_cells_match_scan(kind, method, dtype, scale, seed):
    steps, batch, inputs, hidden = 12, (2,), 2, 3
    rng = np.random.default_rng(seed)
    params = gated_params(kind, rng, inputs, hidden, scale, dtype)
    xs = rng.normal(size=(steps, *batch, inputs)).astype(dtype)
    h = rng.uniform(-1, 1, (*batch, hidden)).astype(dtype)
    carry0: Any = h
    if kind == "lstm":  # a plain pair (h, c) works as well as an LSTMState
        carry0 = (h, rng.uniform(-1, 1, (*batch, hidden)).astype(dtype))
    check_against_scan(getattr(jax_rnn, kind).step, params, xs, carry0, dtype, method=method)


# --- A user cell: pytree carry and inputs, a closed-over array --------------------------


def _user_step(gain: jax.Array) -> Any:
    def step(params, carry, x):
        u, v = x
        h = jnp.tanh(carry["h"] @ params["w"] + gain * u + carry["s"][..., None] * params["a"])
        s = 0.8 * carry["s"] * jnp.cos(v) + jnp.sum(h, axis=-1) * params["b"]
        return {"h": h, "s": s}, (h.sum(-1), s * v)

    return step


def test_user_cell_with_pytrees_and_a_closure():
    """quasi_deer without a registered diagonal: the generic path (full Jacobians)."""
    dtype, steps, batch = np.float64, 9, 2
    rng = np.random.default_rng(7)
    params = {"w": rng.normal(size=(2, 2)), "a": rng.normal(size=2), "b": np.float64(0.3)}
    xs = (rng.normal(size=(steps, batch, 2)), rng.normal(size=steps))  # v has no batch axis
    carry0 = {"h": rng.uniform(-1, 1, (batch, 2)), "s": rng.uniform(-1, 1, batch)}
    gain = jnp.asarray(rng.normal(size=2))

    def run(solver, params, xs, carry0, gain):
        step = _user_step(gain)  # closes over `gain`, which is differentiated
        if solver == "scan":
            final, ys = jax.lax.scan(functools.partial(step, params), carry0, xs)
        else:
            final, ys, _ = parallel_solve(step, params, carry0, xs, method="quasi_deer")
        return _loss(final, ys), (final, ys)

    def value_and_grad(solver):
        return jax.jit(
            jax.value_and_grad(functools.partial(run, solver), argnums=(0, 1, 2, 3), has_aux=True)
        )

    got = value_and_grad("parallel")(params, xs, carry0, gain)
    want = value_and_grad("scan")(params, xs, carry0, gain)
    assert_trees_close(got, want, dtype, "values and gradients")


# --- Lengths 0 and 1 ------------------------------------------------------------------


@pytest.mark.parametrize("method", METHODS)
def test_zero_length(method):
    params = jax_rnn.lstm.init(jax.random.key(0), 2, 3, 1)
    carry0 = jax_rnn.LSTMState(jnp.full((4, 3), 0.5), jnp.ones((4, 3)))
    xs = jnp.zeros((0, 4, 2))
    final, ys, info = parallel_solve(jax_rnn.lstm_step, params, carry0, xs, method=method)
    assert isinstance(final, jax_rnn.LSTMState)
    assert_trees_close(final, carry0, np.float64, "final")
    assert ys.output.shape == (0, 4, 1) and ys.state.shape == (0, 4, 3)
    assert (int(info.iterations), bool(info.converged), bool(info.fell_back)) == (0, True, False)
    grad = jax.grad(
        lambda c: parallel_solve(jax_rnn.lstm_step, params, c, xs, method=method)[0].c.sum()
    )(carry0)
    np.testing.assert_array_equal(grad.c, np.ones((4, 3)))


@pytest.mark.parametrize("method", METHODS)
def test_one_step_is_exact_from_the_default_guess_or_after_one_iteration(method):
    """T=1: the default guess (the step at carry0) is the answer, 0 Newton updates; from
    any other guess one update makes it exact."""
    params, xs, state0 = jax_rnn.seed_example()
    want, out = jax_rnn.elman_step(params, state0, xs[0])
    for guess, updates in ((None, 0), (jnp.full((1, *state0.shape), 5.0), 1)):
        final, ys, info = parallel_solve(jax_rnn.elman_step, params, state0, xs[:1],
                                         method=method, guess=guess)
        np.testing.assert_allclose(final, want, rtol=1e-14)
        np.testing.assert_allclose(ys.output[0], out.output, rtol=1e-14)
        assert int(info.iterations) == updates and bool(info.converged)


# --- Convergence ----------------------------------------------------------------------


def _contractive_elman(steps: int = 40, hidden: int = 6, seed: int = 0) -> tuple:
    params = jax_rnn.elman.init(jax.random.key(seed), 2, hidden, None)  # radius ~ 1/sqrt(3)
    xs = jax.random.normal(jax.random.key(seed + 1), (steps, 1, 2))
    return params, xs, jnp.zeros((1, hidden))


def test_deer_converges_in_far_fewer_than_t_iterations():
    params, xs, carry0 = _contractive_elman()
    final, ys, info = forward(jax_rnn.elman_step, method="deer")(params, xs, carry0)
    ref_final, _ = jax.lax.scan(functools.partial(jax_rnn.elman_step, params), carry0, xs)
    assert bool(info.converged) and not bool(info.fell_back)
    assert 1 <= int(info.iterations) <= 12  # T = 40: quadratic convergence
    assert float(info.residual) <= default_tol(np.float64)
    np.testing.assert_allclose(final, ref_final, rtol=0, atol=1e-12)
    # Started from the solution, nothing is left to do.
    states = ys.state
    again = jax.jit(
        lambda p, x, c, g: parallel_solve(jax_rnn.elman_step, p, c, x, method="deer", guess=g)
    )(params, xs, carry0, states)
    assert int(again[2].iterations) == 0
    np.testing.assert_allclose(again[0], final, rtol=0, atol=1e-12)


def test_quasi_deer_converges_and_uses_the_registered_diagonal():
    params, xs, carry0 = _contractive_elman()
    assert jacobian_diagonal_of(jax_rnn.elman_step) is not None
    _, _, info = forward(jax_rnn.elman_step, method="quasi_deer")(params, xs, carry0)
    assert bool(info.converged) and 1 <= int(info.iterations) <= 40


# --- Expansive dynamics: NaN detection, fallback, damping -------------------------------


def _saturating_scalar_rnn(dtype: Any) -> tuple:
    """h_t = tanh(30 h_{t-1} + 1e-3 x_t) from h_0 = 0: the true trajectory saturates
    (|J_t| small), but the Jacobians at the initial guess are ~30, whose products over
    40 steps overflow float32: undamped Newton produces Inf in its first iteration."""
    params = jax_rnn.ElmanParams(
        np.array([[30.0]], dtype), np.array([[1e-3]], dtype), None, np.array([[2.0]], dtype)
    )
    xs = np.random.default_rng(0).normal(size=(40, 1)).astype(dtype)
    return params, xs, np.zeros(1, dtype)


def test_non_finite_iterates_fall_back_to_the_scan():
    params, xs, carry0 = _saturating_scalar_rnn(np.float32)
    info = check_against_scan(jax_rnn.elman_step, params, xs, carry0, np.float32, method="deer")
    assert bool(info.fell_back) and not bool(info.converged)
    assert np.isinf(info.residual) and int(info.iterations) == 1


def test_damping_keeps_the_scan_finite():
    params, xs, carry0 = _saturating_scalar_rnn(np.float32)
    _, ys, info = forward(jax_rnn.elman_step, method="deer", damping=9.0)(params, xs, carry0)
    _, ref = jax.lax.scan(functools.partial(jax_rnn.elman_step, params), carry0, xs)
    assert bool(info.converged) and not bool(info.fell_back)
    assert int(info.iterations) <= 40
    assert_trees_close(ys, ref, np.float32, "ys")


def _products(jaxpr, in_loop=False, found=None):
    """``(precision, inside a while loop or cond branch)`` of every matrix product in a
    jaxpr and the jaxprs inside it."""
    found = [] if found is None else found
    for eqn in jaxpr.eqns:
        if eqn.primitive.name == "dot_general":
            found.append((eqn.params["precision"], in_loop))
        loop = in_loop or eqn.primitive.name in ("while", "cond")
        for value in eqn.params.values():
            for sub in value if isinstance(value, (tuple, list)) else (value,):
                inner = getattr(sub, "jaxpr", sub)
                if hasattr(inner, "eqns"):
                    _products(inner, loop, found)
    return found


@pytest.mark.parametrize("method", METHODS)
@pytest.mark.parametrize("cell", ["elman", "gru", "lstm", "closure"])
def test_solver_products_are_full_float32_whatever_the_default_precision(method, cell):
    """The solver's default tolerance (ten float32 epsilons) needs the step evaluated with
    full float32 products: with TF32 operands (JAX's default for float32 on NVIDIA GPUs)
    DEER stalled at a residual of 3e-4 and fell back to the scan (an emulation; a CPU
    computes every precision alike, so this checks the products the solver asks for).
    Under a caller's lower default precision, every product in the Newton iterations,
    the fallback and the adjoint is HIGHEST; the outputs are evaluated once more at the
    caller's precision, as the sequential path evaluates them."""
    xs = jnp.asarray(np.random.default_rng(0).normal(size=(20, 2)), jnp.float32)
    if cell == "closure":
        w = jnp.asarray(0.3 * np.eye(3), jnp.float32)
        u = jnp.ones((2, 3), jnp.float32)

        def step(params, h, x):  # closes over w, a differentiated argument below
            new = jnp.tanh(h @ w * params + x @ u)
            return new, new

        params, carry0 = jnp.float32(1.0), jnp.zeros(3, jnp.float32)
    else:
        model = getattr(jax_rnn, cell)
        params = model.init(jax.random.key(0), 2, 3, dtype=jnp.float32)
        step, carry0 = model.step, model.initial_state(params)

    def loss(p, x):
        return jnp.sum(jax.tree.leaves(parallel_solve(step, p, carry0, x, method=method)[1])[-1])

    with jax.default_matmul_precision("bfloat16"):
        products = _products(jax.make_jaxpr(jax.value_and_grad(loss, (0, 1)))(params, xs).jaxpr)
    highest = (jax.lax.Precision.HIGHEST,) * 2
    in_loops = [p for p, in_loop in products if in_loop]
    assert in_loops and all(p == highest for p in in_loops), in_loops
    assert any(p != highest for p, in_loop in products if not in_loop), products


def _chaotic_step(params, h, x):
    """A sine map with |J| up to ~3: chaotic, so Newton cannot converge (rounding errors
    grow like the Jacobians' products); the sequential fallback must answer."""
    new = jnp.sin(h @ params) + 0.1 * x
    return new, new


def test_chaotic_dynamics_fall_back_with_right_values_and_gradients():
    rng = np.random.default_rng(0)
    params = 3.0 * np.eye(2) + rng.normal(size=(2, 2))
    xs, carry0 = rng.normal(size=(12, 2)), np.array([0.3, -0.2])
    info = check_against_scan(
        _chaotic_step, params, xs, carry0, np.float64, method="deer", max_iter=4
    )
    assert bool(info.fell_back) and int(info.iterations) == 4


# --- on_failure -----------------------------------------------------------------------


def test_raise_when_max_iter_is_too_small():
    params, xs, carry0 = _contractive_elman(steps=12)
    with pytest.raises(ValueError, match=r"did not converge after 1 iterations \(max_iter=1\)"):
        parallel_solve(jax_rnn.elman_step, params, carry0, xs, max_iter=1, on_failure="raise")
    # Under jit the check runs on the device values and fails the computation.
    solve = forward(jax_rnn.elman_step, method="quasi_deer", max_iter=1, on_failure="raise")
    with pytest.raises(Exception, match="did not converge"):
        jax.block_until_ready(solve(params, xs, carry0))


def test_ignore_returns_the_last_iterate_and_says_so():
    params, xs, carry0 = _contractive_elman(steps=12)
    _, ys, info = parallel_solve(
        jax_rnn.elman_step,
        params,
        carry0,
        xs,
        method="quasi_deer",
        max_iter=1,
        on_failure="ignore",
    )
    assert not bool(info.converged) and not bool(info.fell_back)
    assert int(info.iterations) == 1 and float(info.residual) > default_tol(np.float64)
    _, ref = jax.lax.scan(functools.partial(jax_rnn.elman_step, params), carry0, xs)
    assert float(jnp.abs(ys.state - ref.state).max()) > 1e-6  # not the answer, as flagged


# --- The registered Jacobian diagonals ----------------------------------------------------


@functools.cache
def _diagonal_and_jacobian(kind: str) -> Any:
    step = getattr(jax_rnn, kind).step
    diagonal = jacobian_diagonal_of(step)
    assert diagonal is not None

    def run(params, carry, x):
        flat, unravel = ravel_pytree(carry)
        jac = jax.jacfwd(lambda v: ravel_pytree(step(params, unravel(v), x)[0])[0])(flat)
        return ravel_pytree(diagonal(params, carry, x))[0], jnp.diagonal(jac)

    return jax.jit(run)


@pytest.mark.parametrize("kind", ["elman", "elman_relu", "gru", "lstm"])
@settings(max_examples=FEW)
@given(seed=st.integers(0, 2**16), scale=st.floats(0.5, 4.0))
def test_registered_diagonal_is_the_jacobian_diagonal(kind, seed, scale):
    rng = np.random.default_rng(seed)
    inputs, hidden = 2, 4
    if kind in ("gru", "lstm"):
        params = gated_params(kind, rng, inputs, hidden, scale, np.float64)
    else:
        params = jax_rnn.ElmanParams(
            *(
                scale * rng.uniform(-1, 1, shape)
                for shape in [(hidden, hidden), (inputs, hidden), (hidden,)]
            )
        )
    h = rng.normal(size=hidden)
    carry = jax_rnn.LSTMState(h, rng.normal(size=hidden)) if kind == "lstm" else h
    got, want = _diagonal_and_jacobian(kind)(params, carry, rng.normal(size=inputs))
    np.testing.assert_allclose(got, want, rtol=1e-12, atol=1e-12)


@pytest.mark.parametrize("kind", ["elman", "elman_relu"])
@settings(max_examples=FEW)
@given(seed=st.integers(0, 2**16), scale=st.floats(0.5, 4.0))
def test_elman_full_jacobian_is_jacfwd_of_the_step(kind, seed, scale):
    """DEER's written-out Elman Jacobians against ``jax.jacfwd`` of the step, per example
    of a batch, in float64; and the solver's Jacobians are the written-out ones."""
    step = getattr(jax_rnn, kind).step
    jacobian = _parallel._FULL_JACOBIANS[step]
    rng = np.random.default_rng(seed)
    batch, inputs, hidden = 3, 2, 4
    params = jax_rnn.ElmanParams(
        *(scale * rng.uniform(-1, 1, shape) for shape in [(hidden, hidden), (inputs, hidden),
                                                          (hidden,)]))
    h, x = rng.normal(size=(batch, hidden)), rng.normal(size=(batch, inputs))
    got = np.asarray(jacobian(params, h, x))
    for b in range(batch):
        want = jax.jacfwd(lambda v, b=b: step(params, v, x[b])[0])(h[b])
        np.testing.assert_allclose(got[b], want, rtol=1e-12, atol=1e-12)
    layout = _parallel._layout_of(h, None)
    pb = _parallel._Problem(step, None, layout, "deer", 1e-12, 5, 0.0,
                            lambda p, c, x_: jacobian(p[0], c, x_))
    xs, prev = x[None], h[None]
    in_solver = _parallel._jacobians(pb, (params, [], []), prev, xs)
    generic = _parallel._jacobians(pb._replace(jacobian=None, step=lambda p, c, x_: step(
        p[0], c, x_)), (params, [], []), prev, xs)
    np.testing.assert_allclose(in_solver, got[None], rtol=1e-12, atol=1e-12)
    np.testing.assert_allclose(generic, got[None], rtol=1e-12, atol=1e-12)


@pytest.mark.parametrize("batch_ndim", [0, 1])
def test_deer_on_an_elman_step_with_fewer_batch_axes_than_the_carry(batch_ndim):
    """A (2, 4, H) carry with batch_ndim < 2 makes D = 4 H or 8 H per example: the Elman
    step's (*batch, H, H) Jacobian does not apply, and DEER must still solve it."""
    params = jax_rnn.elman.init(jax.random.key(3), 2, 3, 2)
    carry0 = jnp.full((2, 4, 3), 0.1)
    xs = jax.random.normal(jax.random.key(4), (5, 2, 4, 2))
    final, ys, info = parallel_solve(jax_rnn.elman_step, params, carry0, xs, method="deer",
                                     batch_ndim=batch_ndim)
    ref_final, ref = jax.lax.scan(functools.partial(jax_rnn.elman_step, params), carry0, xs)
    assert bool(info.converged) and not bool(info.fell_back)
    np.testing.assert_allclose(final, ref_final, rtol=0, atol=1e-12)
    np.testing.assert_allclose(ys.output, ref.output, rtol=0, atol=1e-12)


def test_a_callers_jacobian_with_closed_over_arrays_is_used_and_differentiated():
    """``parallel_solve(..., jacobian=fn)`` for a step that closes over an array (a gain
    ``g`` on the state): states and gradients (including d/dg, which reaches the solver
    through the closures of both the step and the Jacobian) equal a sequential scan in
    float64. A Jacobian that ignores ``g`` is wrong: Newton needs more iterations and the
    adjoint falls back to the sequential scan, but states and gradients stay right."""
    params, xs, carry0 = _contractive_elman(steps=20, hidden=5)

    def loss(g, method, right=True):
        def step(p, h, x):
            return jax_rnn.elman_step(p, g * h, x)

        def jac(p, h, x):  # d step / d h = J_elman(g h) * g
            return _parallel.jacobian_of(jax_rnn.elman_step)(p, g * h, x) * (g if right else 1.0)

        if method == "sequential":
            _, ys = jax.lax.scan(functools.partial(step, params), carry0, xs)
            info = None
        else:
            _, ys, info = parallel_solve(step, params, carry0, xs, method=method, jacobian=jac)
        return jnp.sum(jnp.sin(ys.state)), info

    g = jnp.asarray(0.8)
    value_and_grad = jax.jit(jax.value_and_grad(loss, has_aux=True), static_argnums=(1, 2))
    (value, info), grad = value_and_grad(g, "deer")
    (ref_value, _), ref_grad = value_and_grad(g, "sequential")
    assert bool(info.converged) and not bool(info.fell_back)
    np.testing.assert_allclose(value, ref_value, rtol=0, atol=1e-12)
    np.testing.assert_allclose(grad, ref_grad, rtol=1e-10, atol=1e-12)
    (wrong_value, wrong), wrong_grad = value_and_grad(g, "deer", False)
    assert int(wrong.iterations) > int(info.iterations)
    np.testing.assert_allclose(wrong_value, ref_value, rtol=0, atol=1e-12)
    np.testing.assert_allclose(wrong_grad, ref_grad, rtol=1e-10, atol=1e-12)


# --- Argument checks ------------------------------------------------------------------


@pytest.mark.parametrize(
    ("options", "match"),
    [
        (dict(method="newton"), "`method` must be one of"),
        (dict(on_failure="warn"), "`on_failure` must be one of"),
        (dict(tol=0.0), "`tol` must be None or a positive float"),
        (dict(max_iter=-1), "`max_iter` must be None or an int >= 0"),
        (dict(damping=-0.5), "`damping` must be None or a finite float >= 0"),
        (dict(guess=np.zeros((4, 2))), r"`guess` must hold the carries stacked over time"),
    ],
)
def test_bad_options(options, match):
    params, xs, state0 = jax_rnn.seed_example()
    with pytest.raises(ValueError, match=match):
        parallel_solve(jax_rnn.elman_step, params, state0, xs, **options)


def test_bad_carries_and_inputs():
    params, xs, state0 = jax_rnn.seed_example()
    with pytest.raises(TypeError, match="must be floating point"):
        parallel_solve(jax_rnn.elman_step, params, np.zeros(2, np.int32), xs)
    with pytest.raises(TypeError, match="must return a carry with the structure"):
        parallel_solve(lambda p, c, x: (c[:1], x), params, state0, xs)
    with pytest.raises(ValueError, match="same leading time axis"):
        parallel_solve(lambda p, c, x: (c, x), params, state0, (xs, xs[:2]))
