r"""Parallel-in-time evaluation of a recurrence: DEER and quasi-DEER.

A recurrence :math:`h_t = f(h_{t-1}, x_t)` is a system of ``T`` equations in the
unknown trajectory :math:`h_{1..T}`. Newton's method on the whole system (DEER, Lim et
al., ICLR 2024) linearises every step around the current guess :math:`h^{(k)}`,

.. math::

    h_t \approx f(h^{(k)}_{t-1}, x_t) + J_t\,(h_{t-1} - h^{(k)}_{t-1}), \qquad
    J_t = \partial f / \partial h \,(h^{(k)}_{t-1}, x_t),

and solves the resulting *linear* recurrence for all ``t`` at once with
:func:`jax.lax.associative_scan` (depth :math:`O(\log T)`). Quasi-DEER (Gonzalez et al.,
NeurIPS 2024) keeps only the diagonal of :math:`J_t`, so the scan is elementwise.

The public entry point is :func:`parallel_solve`; :func:`jax_rnn.unroll` calls it for
``method="deer"`` and ``method="quasi_deer"``.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
import numpy as np
from jax import Array

from ._checks import is_traced
from ._elman import ElmanParams, elman_relu, elman_step
from ._gru import GRUParams, gru_step
from ._lstm import LSTMParams, LSTMState, lstm_step

_WHERE = "jax_rnn.parallel_solve"
METHODS = ("deer", "quasi_deer")
ON_FAILURE = ("fallback", "raise", "ignore")
DEFAULT_MAX_ITER = 100
_HIGHEST = jax.lax.Precision.HIGHEST

SOLVER_PRECISION = "highest"
"""The matrix-product precision of the parallel solver's own evaluations: the step at
every Newton iterate, the residual, the Jacobians, their products and the adjoint (the
step, a caller's one too, and the Jacobian functions are traced under
:func:`jax.default_matmul_precision` with it). Its default tolerance is ten float32
epsilons, which a step evaluated with TF32 products (JAX's default for float32 on
NVIDIA GPUs since Ampere; bfloat16 passes on TPUs) cannot reach: an emulation of TF32
operands (the sixteenth session's review) left DEER at a residual of 3e-4 after 100
iterations at T=1000, H=16, where full float32 took 3, and the solve fell back to the
sequential scan. The outputs and final carry are then evaluated once more from the
solved states at the caller's precision, as the sequential path evaluates them."""


class ParallelInfo(NamedTuple):
    """How a :func:`parallel_solve` went; every field is an array (traceable).

    Attributes:
        iterations: int32 scalar, the Newton updates made (0 when the guess already
            solved the recurrence).
        residual: the last iterate's relative residual
            :math:`\\max_t |f(h_{t-1}, x_t) - h_t| / \\max(1, \\max_t |f(h_{t-1}, x_t)|)`,
            in the carry's dtype; ``inf`` when the iterates became NaN or Inf.
        converged: bool scalar, ``residual <= tol``: the Newton iterate solves the
            recurrence.
        fell_back: bool scalar, Newton did not converge and the states come from the
            sequential :func:`jax.lax.scan` instead (only with ``on_failure="fallback"``).
        carries: the carry after every step, time-major (each carry leaf with a leading
            ``T`` axis), in the caller's time order: the solution, ready to pass as
            ``guess`` to the next call (a training loop's warm start; for an LSTM it holds
            both ``h`` and ``c``). Gradients do not flow through it.

    Example:
        Warm-starting a second solve from the first one's ``carries``: it is already
        solved, so Newton makes no update.

        >>> params = jax_rnn.gru.init(jax.random.key(0), 2, 3)
        >>> xs = jax.random.normal(jax.random.key(1), (40, 2))
        >>> _, ys, info = jax_rnn.unroll(jax_rnn.gru, params, xs, method="deer",
        ...                              return_info=True)
        >>> bool(info.converged), bool(info.fell_back), info.carries.shape
        (True, False, (40, 3))
        >>> _, _, again = jax_rnn.unroll(jax_rnn.gru, params, xs, method="deer",
        ...                              guess=info.carries, return_info=True)
        >>> int(again.iterations)
        0
    """

    iterations: Array
    residual: Array
    converged: Array
    fell_back: Array
    carries: Any = None


# --------------------------------------------------------------------------------------
# Diagonals of the step Jacobian, for quasi-DEER without forming the full matrix

_DIAGONALS: dict[Any, Callable[[Any, Any, Any], Any]] = {}


def register_jacobian_diagonal(step: Any, diagonal: Callable[[Any, Any, Any], Any]) -> None:
    """Registers ``diagonal(params, carry, x)``: the diagonal of ``step``'s carry Jacobian.

    ``diagonal`` returns a pytree shaped like the carry whose entry ``i`` is
    :math:`\\partial\\,\\mathrm{carry}'_i / \\partial\\,\\mathrm{carry}_i` (carry leaves in
    pytree order, each flattened). ``method="quasi_deer"`` (:func:`parallel_solve`, and
    :func:`unroll` for a :class:`Cell` whose ``step`` is ``step``) then uses it instead of
    forming the full Jacobian and taking its diagonal: memory and work per iteration
    become linear in the carry size. The Elman (tanh and ReLU), GRU and LSTM steps are
    registered. A wrong diagonal slows convergence but cannot make the answer wrong: the
    residual is checked with the step itself, and the adjoint with its exact VJP.

    Args:
        step: the step function, ``step(params, carry, x) -> (carry, y)``; the registry
            is keyed by the function object, so register the one you pass or put in the
            ``Cell``.
        diagonal: ``diagonal(params, carry, x)``, shaped like the carry.

    Example:
        >>> import jax
        >>> import jax.numpy as jnp
        >>> import numpy as np
        >>> import jax_rnn
        >>> def leaky(params, h, x):  # h' = h/2 + tanh(x u + h w)/2
        ...     h = 0.5 * h + 0.5 * jnp.tanh(x @ params["u"] + h @ params["w"])
        ...     return h, h
        >>> def leaky_diagonal(params, h, x):  # d h'_i / d h_i
        ...     slope = 1 - jnp.tanh(x @ params["u"] + h @ params["w"]) ** 2
        ...     return 0.5 + 0.5 * slope * jnp.diagonal(params["w"])
        >>> jax_rnn.register_jacobian_diagonal(leaky, leaky_diagonal)
        >>> rng = np.random.default_rng(0)
        >>> params = {"u": rng.normal(size=(2, 3)), "w": 0.3 * rng.normal(size=(3, 3))}
        >>> xs, h0 = rng.normal(size=(50, 2)), np.zeros(3)
        >>> _, ys, info = jax_rnn.parallel_solve(leaky, params, h0, xs, method="quasi_deer")
        >>> _, ref = jax.lax.scan(lambda h, x: leaky(params, h, x), h0, xs)
        >>> print(bool(info.converged), bool(jnp.allclose(ys, ref, atol=1e-5)))
        True True
    """
    _DIAGONALS[step] = diagonal


def _hashable(step: Any) -> bool:
    try:
        hash(step)
    except TypeError:
        return False
    return True


def jacobian_of(step: Any) -> Callable[[Any, Any, Any], Array] | None:
    """The written-out full Jacobian of a built-in step (the Elman steps), or ``None``."""
    return _FULL_JACOBIANS.get(step) if _hashable(step) else None


def jacobian_diagonal_of(step: Any) -> Callable[[Any, Any, Any], Any] | None:
    """The diagonal registered for ``step`` (see :func:`register_jacobian_diagonal`)."""
    return _DIAGONALS.get(step) if _hashable(step) else None


def _float_input(x: Any, like: Array) -> Array:
    x = jnp.asarray(x)
    return x if jnp.issubdtype(x.dtype, jnp.floating) else x.astype(like.dtype)


def _elman_pre(params: ElmanParams, h: Array, x: Any) -> Array:
    pre = h @ params.w_cell_state + _float_input(x, params.w_cell_input) @ params.w_cell_input
    for bias in (params.b_cell, params.b_cell_state):
        if bias is not None:
            pre = pre + bias
    return pre


# The Elman steps: h' = act(pre), pre = h W + x W_in + b, so dh'_i/dh_j = act'(pre_i) W_ji.
# ``slope(params, h, x)`` is act'(pre); the diagonal and the full Jacobian follow from it.


def _tanh_slope(params: ElmanParams, h: Array, x: Any) -> Array:
    return 1 - jnp.tanh(_elman_pre(params, h, x)) ** 2


def _relu_slope(params: ElmanParams, h: Array, x: Any) -> Array:
    pre = _elman_pre(params, h, x)
    return (pre > 0).astype(pre.dtype)


def _elman_diagonal(slope: Callable[..., Array]) -> Callable[[ElmanParams, Array, Any], Array]:
    def diagonal(params: ElmanParams, h: Array, x: Any) -> Array:
        return slope(params, h, x) * jnp.diagonal(params.w_cell_state)

    return diagonal


def _elman_jacobian(slope: Callable[..., Array]) -> Callable[[ElmanParams, Array, Any], Array]:
    """``(*batch, H, H)`` from one product, where the generic path pushes H basis vectors
    through the step's linearisation and transposes the result (more memory traffic per
    Newton iteration)."""

    def jacobian(params: ElmanParams, h: Array, x: Any) -> Array:
        return slope(params, h, x)[..., :, None] * params.w_cell_state.T

    return jacobian


def _gates(params: Any, h: Array, x: Any, parts: int) -> tuple[list[Array], list[Array]]:
    gi = _float_input(x, params.w_cell_input) @ params.w_cell_input
    gh = h @ params.w_cell_state
    if params.b_cell_input is not None:
        gi = gi + params.b_cell_input
    if params.b_cell_state is not None:
        gh = gh + params.b_cell_state
    return jnp.split(gi, parts, axis=-1), jnp.split(gh, parts, axis=-1)


def _gru_diagonal(params: GRUParams, h: Array, x: Any) -> Array:
    (gi_r, gi_z, gi_n), (gh_r, gh_z, gh_n) = _gates(params, h, x, 3)
    w_r, w_z, w_n = (jnp.diagonal(w) for w in jnp.split(params.w_cell_state, 3, axis=-1))
    r = jax.nn.sigmoid(gi_r + gh_r)
    z = jax.nn.sigmoid(gi_z + gh_z)
    n = jnp.tanh(gi_n + r * gh_n)
    d_r = r * (1 - r) * w_r
    d_z = z * (1 - z) * w_z
    d_n = (1 - n**2) * (d_r * gh_n + r * w_n)
    # h' = (1 - z) n + z h
    return z + d_z * (h - n) + (1 - z) * d_n


def _lstm_diagonal(params: LSTMParams, carry: Any, x: Any) -> Any:
    h, c = carry
    gi, gh = _gates(params, h, x, 4)
    pre_i, pre_f, pre_g, pre_o = (a + b for a, b in zip(gi, gh, strict=True))
    w_i, w_f, w_g, w_o = (jnp.diagonal(w) for w in jnp.split(params.w_cell_state, 4, axis=-1))
    i, f, o = jax.nn.sigmoid(pre_i), jax.nn.sigmoid(pre_f), jax.nn.sigmoid(pre_o)
    g = jnp.tanh(pre_g)
    new_c = f * c + i * g
    tanh_c = jnp.tanh(new_c)
    # dc'_j/dh_j through the gates i, f, g; dc'_j/dc_j = f_j; h' = o tanh(c')
    dc_dh = c * f * (1 - f) * w_f + g * i * (1 - i) * w_i + i * (1 - g**2) * w_g
    dh_dh = o * (1 - o) * w_o * tanh_c + o * (1 - tanh_c**2) * dc_dh
    return LSTMState(dh_dh, f) if isinstance(carry, LSTMState) else (dh_dh, f)


_FULL_JACOBIANS: dict[Any, Callable[[Any, Any, Any], Array]] = {
    elman_step: _elman_jacobian(_tanh_slope),
    elman_relu.step: _elman_jacobian(_relu_slope),
}

register_jacobian_diagonal(elman_step, _elman_diagonal(_tanh_slope))
register_jacobian_diagonal(elman_relu.step, _elman_diagonal(_relu_slope))
register_jacobian_diagonal(gru_step, _gru_diagonal)
register_jacobian_diagonal(lstm_step, _lstm_diagonal)


# --------------------------------------------------------------------------------------
# The carry as one vector per example


class _Layout(NamedTuple):
    """How a carry pytree maps to ``(*lead, B, D)``: one vector of size D per example."""

    treedef: Any
    feature_shapes: tuple[tuple[int, ...], ...]
    dtypes: tuple[np.dtype, ...]
    batch_shape: tuple[int, ...]
    dtype: np.dtype

    @property
    def sizes(self) -> tuple[int, ...]:
        return tuple(math.prod(s) for s in self.feature_shapes)

    @property
    def batch(self) -> int:
        return math.prod(self.batch_shape)

    def flatten(self, carry: Any, lead: tuple[int, ...] = ()) -> Array:
        leaves = self.treedef.flatten_up_to(carry)
        return jnp.concatenate(
            [
                jnp.reshape(a, (*lead, self.batch, n)).astype(self.dtype)
                for a, n in zip(leaves, self.sizes, strict=True)
            ],
            axis=-1,
        )

    def unflatten(self, flat: Array) -> Any:
        lead = flat.shape[:-2]
        parts = jnp.split(flat, np.cumsum(self.sizes)[:-1].tolist(), axis=-1)
        leaves = [
            p.reshape(*lead, *self.batch_shape, *shape).astype(dtype)
            for p, shape, dtype in zip(parts, self.feature_shapes, self.dtypes, strict=True)
        ]
        return self.treedef.unflatten(leaves)


def _layout_of(carry0: Any, batch_ndim: int | None) -> _Layout:
    leaves, treedef = jax.tree.flatten(carry0)
    if not leaves:
        raise ValueError(f"`{_WHERE}`: `carry0` has no arrays; pass the initial carry.")
    shapes = [tuple(np.shape(a)) for a in leaves]
    dtypes = [np.dtype(jnp.result_type(a)) for a in leaves]
    for shape, dtype in zip(shapes, dtypes, strict=True):
        if not jnp.issubdtype(dtype, jnp.floating):
            raise TypeError(
                f"`{_WHERE}`: every leaf of `carry0` must be floating point (Newton's method "
                f"needs derivatives), got a leaf of dtype {dtype} shaped {shape}."
            )
    if batch_ndim is None:
        batch_ndim = max(len(shapes[0]) - 1, 0)
    if isinstance(batch_ndim, bool) or not isinstance(batch_ndim, int | np.integer):
        raise TypeError(f"`{_WHERE}`: `batch_ndim` must be None or an int, got {batch_ndim!r}.")
    batch_shape = shapes[0][:batch_ndim]
    if batch_ndim < 0 or any(len(s) < batch_ndim or s[:batch_ndim] != batch_shape for s in shapes):
        raise ValueError(
            f"`{_WHERE}`: the leaves of `carry0` are shaped {shapes}; with batch_ndim="
            f"{batch_ndim} they must share {batch_ndim} leading batch axes. Pass batch_ndim "
            "(the number of leading axes that index independent examples)."
        )
    features = tuple(s[batch_ndim:] for s in shapes)
    if sum(math.prod(f) for f in features) == 0:
        raise ValueError(f"`{_WHERE}`: `carry0` has no state entries (feature size 0).")
    return _Layout(
        treedef, features, tuple(dtypes), batch_shape, np.dtype(jnp.result_type(*dtypes))
    )


# --------------------------------------------------------------------------------------
# The solver on flat states ``(T, B, D)``


class _Problem(NamedTuple):
    """The static half of a solve: functions, layout and options."""

    step: Callable[[Any, Any, Any], tuple[Any, Any]]
    diagonal: Callable[[Any, Any, Any], Any] | None
    layout: _Layout
    method: str
    tol: float
    max_iter: int
    damping: float
    jacobian: Callable[[Any, Any, Any], Array] | None = None


def _f(pb: _Problem, params: Any, h: Array, x: Any) -> Array:
    """One step on flat states: ``(B, D) -> (B, D)``."""
    new, _ = pb.step(params, pb.layout.unflatten(h), x)
    return pb.layout.flatten(new)


def _f_time(pb: _Problem, params: Any, prev: Array, xs: Any) -> Array:
    """Every step at once: ``prev[t]`` is the carry before step ``t``, ``(T, B, D)``."""
    return jax.vmap(lambda h, x: _f(pb, params, h, x))(prev, xs)


def _previous(h0: Array, states: Array) -> Array:
    return jnp.concatenate([h0[None], states[:-1]], axis=0)


def _jacobians(pb: _Problem, params: Any, prev: Array, xs: Any) -> Array:
    """Per-example Jacobians ``(T, B, D, D)``, ``J[..., i, j] = d out_i / d in_j``.

    One JVP per basis vector ``e_j``, applied to every example at once: this assumes
    that the step treats examples independently (every built-in cell does).
    """
    d = prev.shape[-1]
    if pb.jacobian is not None:  # written out (the Elman steps, or the caller's)
        jac, layout = pb.jacobian, pb.layout

        def one(h: Array, x: Any) -> Array:
            return jac(params, layout.unflatten(h), x).reshape(h.shape[0], d, d)

        return jax.vmap(one)(prev, xs).astype(prev.dtype)
    _, linear = jax.linearize(lambda h: _f_time(pb, params, h, xs), prev)
    basis = jnp.broadcast_to(jnp.eye(d, dtype=prev.dtype)[:, None, None, :], (d, *prev.shape))
    return jnp.moveaxis(jax.vmap(linear)(basis), 0, -1)


def _diagonals(pb: _Problem, params: Any, prev: Array, xs: Any) -> Array:
    """Diagonals of the per-example Jacobians, ``(T, B, D)``."""
    diagonal = pb.diagonal
    if diagonal is None:  # generic: the full matrices, then their diagonal
        return jnp.diagonal(_jacobians(pb, params, prev, xs), axis1=-2, axis2=-1)
    layout = pb.layout

    def one(h: Array, x: Any) -> Array:
        return layout.flatten(diagonal(params, layout.unflatten(h), x))

    return jax.vmap(one)(prev, xs)


def _combine_full(e1: tuple[Array, Array], e2: tuple[Array, Array]) -> tuple[Array, Array]:
    (a1, b1), (a2, b2) = e1, e2
    return (
        jnp.einsum("...ij,...jk->...ik", a2, a1, precision=_HIGHEST),
        jnp.einsum("...ij,...j->...i", a2, b1, precision=_HIGHEST) + b2,
    )


def _combine_diagonal(e1: tuple[Array, Array], e2: tuple[Array, Array]) -> tuple[Array, Array]:
    (a1, b1), (a2, b2) = e1, e2
    return a2 * a1, a2 * b1 + b2


def _linear_solve(a: Array, b: Array, *, reverse: bool = False) -> Array:
    """Solves ``x_t = a_t x_{t-1} + b_t`` (``x_{t+1}`` with ``reverse``) from zero.

    ``a`` is ``(T, B, D, D)`` (matrices) or ``(T, B, D)`` (diagonals).
    """
    combine = _combine_full if a.ndim == b.ndim + 1 else _combine_diagonal
    return jax.lax.associative_scan(combine, (a, b), reverse=reverse)[1]


def _residual(pb: _Problem, params: Any, h0: Array, xs: Any, states: Array):
    """``f(h_{t-1}, x_t) - h_t`` and its relative max norm (``inf`` if not finite)."""
    out = _f_time(pb, params, _previous(h0, states), xs)
    r = out - states
    norm = jnp.max(jnp.abs(r)) / jnp.maximum(1, jnp.max(jnp.abs(out)))
    finite = jnp.isfinite(out).all() & jnp.isfinite(r).all()
    return r, jnp.where(finite, norm, jnp.inf).astype(r.dtype)


def _newton(
    pb: _Problem, params: Any, h0: Array, xs: Any, guess: Array
) -> tuple[Array, Array, Array]:
    """Newton (or diagonal quasi-Newton) iterations; returns states, iterations, residual."""
    scale = 1.0 / (1.0 + pb.damping)

    def cond(state: tuple) -> Array:
        k, _, _, norm = state
        return (norm > pb.tol) & (k < pb.max_iter) & jnp.isfinite(norm)

    def body(state: tuple) -> tuple:
        k, states, r, _ = state
        prev = _previous(h0, states)
        if pb.method == "deer":
            a = _jacobians(pb, params, prev, xs)
        else:
            a = _diagonals(pb, params, prev, xs)
        if pb.damping:
            a = a * jnp.asarray(scale, a.dtype)
        # Newton step in delta form: d_t = r_t + A_t d_{t-1}, d_0 = 0.
        states = states + _linear_solve(a, r)
        r, norm = _residual(pb, params, h0, xs, states)
        return k + 1, states, r, norm

    r0, norm0 = _residual(pb, params, h0, xs, guess)
    k, states, _, norm = jax.lax.while_loop(cond, body, (jnp.int32(0), guess, r0, norm0))
    return states, k, norm


def _sequential(pb: _Problem, params: Any, h0: Array, xs: Any) -> Array:
    def body(h: Array, x: Any) -> tuple[Array, Array]:
        h = _f(pb, params, h, x)
        return h, h

    return jax.lax.scan(body, h0, xs)[1]


def _forward(
    pb: _Problem, on_failure: str, params: Any, h0: Array, xs: Any, guess: Array
) -> tuple[Array, ParallelInfo]:
    states, k, norm = _newton(pb, params, h0, xs, guess)
    converged = norm <= pb.tol
    fell_back = jnp.zeros((), bool)
    if on_failure == "fallback":
        states = jax.lax.cond(
            converged,
            lambda p, h, x, s: s,
            lambda p, h, x, s: _sequential(pb, p, h, x),
            params,
            h0,
            xs,
            states,
        )
        fell_back = ~converged
    return states, ParallelInfo(k, norm, converged, fell_back)


# --------------------------------------------------------------------------------------
# Gradients: the adjoint recurrence, solved in parallel too


def _adjoint(
    pb: _Problem, params: Any, prev: Array, xs: Any, vjp: Callable[[Array], Any], g: Array
) -> Array:
    """``lam_t = g_t + J_{t+1}^T lam_{t+1}`` (``lam_T = g_T``), falling back to a scan.

    ``vjp`` is the VJP of every step at once, at ``(params, prev, xs)``. Either method's
    answer must satisfy that equation to ``tol`` with ``J^T`` applied by the exact
    ``vjp``, or the sequential scan of VJPs replaces it: a Jacobian that is not exact (a
    caller's ``jacobian``) costs that fallback, never a wrong gradient.
    """

    def apply_next(lam: Array) -> Array:  # t -> J_{t+1}^T lam_{t+1}, zero at T
        prev_bar = vjp(lam)[1]
        return jnp.concatenate([prev_bar[1:], jnp.zeros_like(prev_bar[:1])])

    def residual(lam: Array) -> tuple[Array, Array]:
        rho = g + apply_next(lam) - lam
        norm = jnp.max(jnp.abs(rho)) / jnp.maximum(1, jnp.max(jnp.abs(lam)))
        return rho, jnp.where(jnp.isfinite(norm), norm, jnp.inf).astype(rho.dtype)

    if pb.method == "deer":  # one linear solve with the transposed full Jacobians
        jac = _jacobians(pb, params, prev, xs)
        a = jnp.concatenate([jnp.swapaxes(jac[1:], -1, -2), jnp.zeros_like(jac[:1])])
        lam = _linear_solve(a, g, reverse=True)
        ok = residual(lam)[1] <= pb.tol
    else:  # quasi-Newton on the linear adjoint system, preconditioned by the diagonals
        diag = _diagonals(pb, params, prev, xs)
        c = jnp.concatenate([diag[1:], jnp.zeros_like(diag[:1])])
        if pb.damping:
            c = c * jnp.asarray(1.0 / (1.0 + pb.damping), c.dtype)

        def cond(state: tuple) -> Array:
            k, _, _, norm = state
            return (norm > pb.tol) & (k < pb.max_iter) & jnp.isfinite(norm)

        def body(state: tuple) -> tuple:
            k, lam, rho, _ = state
            lam = lam + _linear_solve(c, rho, reverse=True)
            rho, norm = residual(lam)
            return k + 1, lam, rho, norm

        lam0 = _linear_solve(c, g, reverse=True)
        rho0, norm0 = residual(lam0)
        _, lam, _, norm = jax.lax.while_loop(cond, body, (jnp.int32(0), lam0, rho0, norm0))
        ok = norm <= pb.tol

    def sequential(lam: Array) -> Array:
        def body(carry: Array, inputs: tuple) -> tuple[Array, Array]:
            g_t, prev_t, x_t = inputs
            lam_t = g_t + carry
            _, vjp_t = jax.vjp(lambda h: _f(pb, params, h, x_t), prev_t)
            return vjp_t(lam_t)[0], lam_t

        return jax.lax.scan(body, jnp.zeros_like(g[0]), (g, prev, xs), reverse=True)[1]

    return jax.lax.cond(ok, lambda lam: lam, sequential, lam)


def _solver(pb: _Problem, on_failure: str) -> Callable[..., tuple[Array, ParallelInfo]]:
    """``solve(params, h0, xs, guess) -> (states, info)`` with the adjoint as its VJP."""

    @jax.custom_vjp
    def solve(params: Any, h0: Array, xs: Any, guess: Array) -> tuple[Array, ParallelInfo]:
        return _forward(pb, on_failure, params, h0, xs, guess)

    def fwd(params: Any, h0: Array, xs: Any, guess: Array) -> tuple[Any, Any]:
        states, info = _forward(pb, on_failure, params, h0, xs, guess)
        return (states, info), (params, h0, xs, states)

    def bwd(res: Any, cotangents: Any) -> tuple[Any, ...]:
        params, h0, xs, states = res
        prev = _previous(h0, states)
        _, vjp = jax.vjp(lambda p, h, x: _f_time(pb, p, h, x), params, prev, xs)
        lam = _adjoint(pb, params, prev, xs, vjp, cotangents[0])
        params_bar, prev_bar, xs_bar = vjp(lam)
        return params_bar, prev_bar[0], xs_bar, jnp.zeros_like(states)

    solve.defvjp(fwd, bwd)
    return solve


# --------------------------------------------------------------------------------------
# Checks and the public function


def _check_options(
    method: Any, on_failure: Any, tol: Any, max_iter: Any, damping: Any, where: str = _WHERE
) -> None:
    if method not in METHODS:
        raise ValueError(
            f"`{where}`: `method` must be one of {METHODS}, got {method!r}: 'deer' uses "
            "full Jacobians (H x H per step), 'quasi_deer' only their diagonals."
        )
    if on_failure not in ON_FAILURE:
        raise ValueError(
            f"`{where}`: `on_failure` must be one of {ON_FAILURE}, got {on_failure!r}."
        )
    if tol is not None and (
        isinstance(tol, bool) or not isinstance(tol, int | float | np.floating) or not tol > 0
    ):
        raise ValueError(f"`{where}`: `tol` must be None or a positive float, got {tol!r}.")
    if max_iter is not None and (
        isinstance(max_iter, bool) or not isinstance(max_iter, int | np.integer) or max_iter < 0
    ):
        raise ValueError(f"`{where}`: `max_iter` must be None or an int >= 0, got {max_iter!r}.")
    if damping is not None and (
        isinstance(damping, bool)
        or not isinstance(damping, int | float | np.floating)
        or not (damping >= 0 and math.isfinite(damping))
    ):
        raise ValueError(
            f"`{where}`: `damping` must be None or a finite float >= 0 (the Jacobians are "
            f"divided by 1 + damping), got {damping!r}."
        )


def default_tol(dtype: Any) -> float:
    """The default ``tol`` for carries of ``dtype``: ``max(1e-12, 10 * eps)``.

    That is 1e-12 for float64 and about 1.2e-6 for float32: above the rounding noise of
    one step, so that a converged Newton iterate is recognised as such.
    """
    return max(1e-12, 10.0 * float(jnp.finfo(dtype).eps))


def _check_structure(step: Any, params: Any, carry0: Any, x0: Any) -> None:
    try:
        new, _ = jax.eval_shape(step, params, carry0, x0)
    except (TypeError, ValueError) as e:
        raise type(e)(f"`{_WHERE}`: calling `step(params, carry0, xs[0])` failed: {e}") from e
    expected = jax.tree.map(lambda a: jax.ShapeDtypeStruct(np.shape(a), jnp.result_type(a)), carry0)
    got = jax.tree.map(lambda a: jax.ShapeDtypeStruct(a.shape, a.dtype), new)
    if jax.tree.structure(got) != jax.tree.structure(expected) or jax.tree.leaves(
        got
    ) != jax.tree.leaves(expected):
        raise TypeError(
            f"`{_WHERE}`: `step` must return a carry with the structure, shapes and dtypes "
            f"of `carry0` (as jax.lax.scan requires); carry0 is {expected} but step "
            f"returned {got}."
        )


def _flat_guess(layout: _Layout, guess: Any, length: int) -> Array:
    try:
        leaves = layout.treedef.flatten_up_to(guess)
    except (TypeError, ValueError) as err:
        hint = (" For an LSTM the carry is LSTMState(h, c), and the outputs' `state` holds h "
                "only: pass LSTMState(h=..., c=...) with both trajectories (a solve's "
                "ParallelInfo.carries is one), or no guess."
                if "LSTMState" in str(layout.treedef) else "")
        raise ValueError(
            f"`{_WHERE}`: `guess` must hold the carries stacked over time, structured like "
            f"the carry ({layout.treedef}); got {jax.tree.structure(guess)}.{hint}"
        ) from err
    for leaf, shape in zip(leaves, layout.feature_shapes, strict=True):
        want = (length, *layout.batch_shape, *shape)
        if tuple(np.shape(leaf)) != want:
            raise ValueError(
                f"`{_WHERE}`: `guess` must hold the carries stacked over time, each leaf "
                f"shaped (T, *batch, ...) = {want}; got a leaf shaped {np.shape(leaf)}."
            )
    return jax.lax.stop_gradient(layout.flatten(guess, (length,)))


def raise_if_unconverged(where: str, info: Any, method: str, tol: float | None,
                         max_iter: int | None, length: int, dtype: Any) -> None:
    """Raises ``ValueError`` if any concrete :class:`ParallelInfo` in ``info`` (a pytree,
    e.g. one per layer) did not converge; traced infos are skipped."""
    infos = [leaf for leaf in jax.tree.leaves(info, is_leaf=lambda x: isinstance(
        x, ParallelInfo)) if isinstance(leaf, ParallelInfo)]
    for one in infos:
        if is_traced(one) or bool(np.all(one.converged)):
            continue
        tol = default_tol(jnp.dtype(dtype)) if tol is None else float(tol)
        max_iter = min(length, DEFAULT_MAX_ITER) if max_iter is None else int(max_iter)
        message = _failure_message(method, one.iterations, one.residual, tol, max_iter, length)
        raise ValueError(message.replace(_WHERE, where, 1))


def _failure_message(
    method: str, iterations: Any, residual: Any, tol: float, max_iter: int, length: int
) -> str:
    residual = float(np.max(residual))
    why = (
        "the iterates became NaN or Inf (the linearised dynamics are unstable, e.g. "
        "Jacobians with spectral radius > 1 over many steps)"
        if not math.isfinite(residual)
        else f"the relative residual is {residual:.3g} > tol={tol:.3g}"
    )
    return (
        f"`{_WHERE}`: method={method!r} did not converge after {int(np.max(iterations))} "
        f"iterations (max_iter={max_iter}): {why}. Raise max_iter (T={length} iterations "
        "always suffice), pass damping=..., loosen tol, or use on_failure='fallback' to "
        "fall back to the sequential scan."
    )


def _with_consts(fn: Callable[..., Any], index: int) -> Callable[[Any, Any, Any], Any]:
    """``fn(params, carry, x, *consts)`` as ``f(params_ext, carry, x)``, its closed-over
    arrays taken from ``params_ext[index]`` (see :func:`jax.closure_convert`)."""

    def ext(p: Any, carry: Any, x: Any) -> Any:
        return fn(p[0], carry, x, *p[index])

    return ext


def parallel_solve(
    step: Callable[[Any, Any, Any], tuple[Any, Any]],
    params: Any,
    carry0: Any,
    xs: Any,
    *,
    method: str = "deer",
    tol: float | None = None,
    max_iter: int | None = None,
    guess: Any = None,
    damping: float | None = None,
    on_failure: str = "fallback",
    jacobian_diagonal: Callable[[Any, Any, Any], Any] | None = None,
    batch_ndim: int | None = None,
    jacobian: Callable[[Any, Any, Any], Array] | None = None,
) -> tuple[Any, Any, ParallelInfo]:
    r"""Runs ``step`` over the time axis of ``xs`` by Newton's method over the sequence.

    Computes what ``jax.lax.scan(functools.partial(step, params), carry0, xs)`` computes,
    but instead of ``T`` dependent steps it iterates on the whole trajectory: from a guess
    :math:`h^{(k)}_{1..T}`, every step is linearised,
    :math:`J_t = \partial f/\partial h\,(h^{(k)}_{t-1}, x_t)`, and the update
    :math:`d = h^{(k+1)} - h^{(k)}` solves the linear recurrence

    .. math::

        d_t = \bigl(f(h^{(k)}_{t-1}, x_t) - h^{(k)}_t\bigr) + A_t\, d_{t-1}, \qquad
        d_0 = 0,

    for all ``t`` with :func:`jax.lax.associative_scan`, combining
    :math:`(A_1, b_1), (A_2, b_2) \mapsto (A_2 A_1, A_2 b_1 + b_2)` (depth
    :math:`O(\log T)`). ``method="deer"`` uses :math:`A_t = J_t` (Newton, quadratic
    convergence; ``(B, D, D)`` matrices per step), ``method="quasi_deer"`` only
    :math:`\mathrm{diag}(J_t)` (elementwise, linear convergence). Any :math:`A_t` fixes at
    least one more step per iteration, so at most ``T`` iterations are ever needed.

    Gradients do not differentiate through the iterations: a :func:`jax.custom_vjp`
    solves the adjoint recurrence
    :math:`\lambda_t = \bar h_t + J_{t+1}^\top \lambda_{t+1}` backwards in time, with the
    full Jacobians in one associative scan (``deer``) or by the same diagonal
    quasi-Newton iteration (``quasi_deer``), and checks the residual of that equation with
    the step's exact VJP, falling back to a sequential scan of VJPs if it exceeds ``tol``;
    then one VJP of ``step`` vectorised over time gives the
    gradients with respect to ``params``, ``xs`` and ``carry0``. Reverse mode only (no
    ``jax.jvp``).

    Args:
        step: ``step(params, carry, x) -> (carry, y)``, pure and differentiable, with
            the carry keeping its structure, shapes and dtypes. Arrays it closes over are
            differentiated too (:func:`jax.closure_convert`).
        params: any pytree, passed to ``step`` unchanged.
        carry0: the initial carry: a pytree of floating arrays that share
            ``batch_ndim`` leading batch axes, e.g. ``(B, H)`` or ``LSTMState(h, c)``.
        xs: a pytree of inputs whose leaves share the leading time axis ``T`` (``T`` may
            be 0).
        method: ``"deer"`` or ``"quasi_deer"``.
        tol: convergence threshold on the relative residual
            :math:`\max_t |f(h_{t-1}, x_t) - h_t| / \max(1, \max_t |f(h_{t-1}, x_t)|)`;
            ``None`` means :func:`default_tol` of the carry's dtype (1e-12 for float64,
            about 1.2e-6 for float32). The gradients' adjoint iteration uses it too.
        max_iter: most Newton updates; ``None`` means ``min(T, 100)``.
        guess: the initial trajectory, shaped like the stacked carries
            (``(T, *batch, ...)`` per leaf), e.g. a previous solution; ``None`` means
            every step evaluated at ``carry0`` (one parallel Jacobi step from the
            constant trajectory). It receives no gradient.
        damping: ``None`` (0) or ``lambda >= 0``: :math:`A_t` is divided by
            ``1 + lambda``. This keeps the scan's products of Jacobians bounded when
            the dynamics are expansive; ``lambda -> inf`` is the Picard (Jacobi)
            iteration, which advances exactly one step per iteration. It is a simple
            stand-in for ELK's trust region, not ELK's Kalman smoother.
        on_failure: what to do when ``tol`` is not met within ``max_iter`` iterations
            (or the iterates become NaN/Inf): ``"fallback"`` recomputes the states with
            a sequential :func:`jax.lax.scan` (inside :func:`jax.lax.cond`, so only a
            failing call pays; under :func:`jax.vmap` both branches run);
            ``"raise"`` raises ``ValueError`` when the inputs are concrete; under
            ``jit`` it raises from a ``jax.debug.callback`` at run time (surfacing as
            ``JaxRuntimeError`` with the same message where the JAX version propagates
            callback errors; newer versions and GPUs may only log it) and returns NaN
            states and outputs, so a failed solve is never mistaken for a result;
            ``"ignore"`` returns the last Newton iterate, with ``info.converged`` false.
        jacobian_diagonal: for ``quasi_deer``: ``diagonal(params, carry, x)``, a
            carry-shaped pytree of :math:`\partial\,\mathrm{carry}'_i /
            \partial\,\mathrm{carry}_i`. ``None`` looks ``step`` up in the registry
            (:func:`register_jacobian_diagonal`: Elman, GRU and LSTM steps), and
            otherwise forms the full Jacobian and takes its diagonal.
        jacobian: ``jacobian(params, carry, x) -> (*batch, D, D)``, the per-example
            Jacobian :math:`\partial\,\mathrm{carry}'_i / \partial\,\mathrm{carry}_j`
            of the carry flattened per example (leaves in pytree order), used by
            ``deer``, and by ``quasi_deer`` when there is no ``jacobian_diagonal`` (given
            or registered). ``None`` means the written-out Jacobians of the Elman steps
            (tanh and ReLU) for ``deer``, and otherwise ``D`` basis vectors pushed
            through :func:`jax.linearize` of ``step`` (more memory traffic per
            iteration). An inexact one slows Newton's convergence and, for ``deer``,
            sends the gradient to the sequential fallback, but does not change the
            results: residuals are always computed with ``step`` itself.
        batch_ndim: how many leading axes of the carry index independent examples;
            ``None`` means all but the last axis of the first carry leaf. Jacobians are
            per example, ``(B, D, D)`` with ``D`` the carry's size per example, so
            ``step`` must not mix examples (the built-in cells do not).

    Returns:
        ``(final_carry, ys, info)``: the carry after the last step, the outputs
        ``step`` emits stacked over time (computed at the end by ``step`` vectorised
        over time at the solved states), and a :class:`ParallelInfo`. With ``T == 0``
        the final carry is ``carry0`` and ``info`` reports 0 iterations.

    Raises:
        ValueError: a bad option, mismatched shapes, or (``on_failure="raise"``, concrete
            inputs) no convergence.
        TypeError: a carry that is not floating point or that ``step`` changes.

    Example:
        >>> from jax_rnn import parallel_solve
        >>> params, xs, state0 = jax_rnn.seed_example()
        >>> final, ys, info = parallel_solve(
        ...     jax_rnn.elman_step, params, state0, xs, method="deer")
        >>> _, ref = jax.lax.scan(lambda h, x: jax_rnn.elman_step(params, h, x), state0, xs)
        >>> print(ys.output[:, 0].round(4), bool(info.converged), int(info.iterations))
        [1.5613 2.7271 3.0143 3.0738 3.0913] True 3
        >>> print(float(jnp.abs(ys.output - ref.output).max()) < 1e-12)
        True
    """
    _check_options(method, on_failure, tol, max_iter, damping)
    leaves = jax.tree.leaves(xs)
    if not leaves:
        raise ValueError(f"`{_WHERE}`: `xs` has no arrays; pass inputs shaped (T, ...).")
    lengths = {np.shape(a)[0] for a in leaves if np.ndim(a)}
    if len(lengths) != 1 or any(np.ndim(a) == 0 for a in leaves):
        raise ValueError(
            f"`{_WHERE}`: every leaf of `xs` needs the same leading time axis, got shapes "
            f"{[np.shape(a) for a in leaves]}."
        )
    length = int(next(iter(lengths)))
    xs = jax.tree.map(jnp.asarray, xs)
    carry0 = jax.tree.map(jnp.asarray, carry0)
    layout = _layout_of(carry0, batch_ndim)
    if length == 0:
        one = jax.tree.map(lambda a: jax.ShapeDtypeStruct(a.shape[1:], a.dtype), xs)
        _, y = jax.eval_shape(step, params, carry0, one)
        ys = jax.tree.map(lambda s: jnp.zeros((0, *s.shape), s.dtype), y)
        return carry0, ys, empty_info(carry0, layout.dtype)
    x0 = jax.tree.map(lambda a: a[0], xs)
    _check_structure(step, params, carry0, x0)
    tol = default_tol(layout.dtype) if tol is None else float(tol)
    max_iter = min(length, DEFAULT_MAX_ITER) if max_iter is None else int(max_iter)
    if method != "quasi_deer":
        jacobian_diagonal = None
    elif jacobian_diagonal is None:
        jacobian_diagonal = jacobian_diagonal_of(step)
    if jacobian is None and method == "deer" and layout.feature_shapes == (
            (layout.sizes[0],),):  # the Elman Jacobians are (*batch, H, H): one axis of H
        jacobian = jacobian_of(step)
    # Arrays that `step`, the diagonal or the Jacobian close over become explicit,
    # differentiable arguments of the custom VJP: params_ext = (params, consts of each).
    # Traced here, once: their products keep the solver's precision wherever they run.
    with jax.default_matmul_precision(SOLVER_PRECISION):
        step_c, step_consts = jax.closure_convert(step, params, carry0, x0)
        extra = [None if fn is None else jax.closure_convert(fn, params, carry0, x0)
                 for fn in (jacobian_diagonal, jacobian)]
    consts = [list(step_consts), *([] if c is None else list(c[1]) for c in extra)]
    step_ext = _with_consts(step_c, 1)
    diag_ext, jac_ext = (None if c is None else _with_consts(c[0], i + 2)
                         for i, c in enumerate(extra))
    pb = _Problem(step_ext, diag_ext, layout, method, tol, max_iter, float(damping or 0.0),
                  jac_ext)
    traced = is_traced((params, carry0, xs, guess, consts))
    params_ext = (params, *consts)
    h0 = layout.flatten(carry0)
    if guess is None:
        # One Jacobi step from the constant trajectory carry0: every step evaluated at
        # carry0, all at once. The first step is then exact and, for contractive
        # dynamics, the rest far closer than carry0 (Elman tanh, B=1: DEER needed 3 Newton
        # iterations instead of 4 at T >= 10,000 for H = 4 and 16).
        flat_guess = jax.lax.stop_gradient(
            _f_time(pb, params_ext, jnp.broadcast_to(h0, (length, *h0.shape)), xs))
    else:
        flat_guess = _flat_guess(layout, guess, length)
    states, info = _solver(pb, on_failure)(params_ext, h0, xs, flat_guess)

    if on_failure == "raise":
        if not traced and not is_traced(info):
            raise_if_unconverged(_WHERE, info, method, tol, max_iter, length, layout.dtype)
        else:
            # Traced: the callback raises at run time, but some JAX versions and backends
            # only log a callback's exception, so a failed solve also returns NaN states:
            # a wrong trajectory never passes for a right one.

            def check(converged: Any, iterations: Any, residual: Any) -> None:
                if not bool(np.all(converged)):
                    raise ValueError(
                        _failure_message(method, iterations, residual, tol, max_iter, length)
                    )

            jax.debug.callback(check, info.converged, info.iterations, info.residual)
            states = jnp.where(jnp.all(info.converged), states,
                               jnp.full_like(states, jnp.nan))

    prev = layout.unflatten(_previous(h0, states))
    # At the caller's precision, as the sequential path evaluates them.
    new, ys = jax.vmap(step, in_axes=(None, 0, 0))(params, prev, xs)
    final = jax.tree.map(lambda a: a[-1], new)
    info = info._replace(carries=jax.lax.stop_gradient(layout.unflatten(states)))
    return final, ys, info


def empty_info(carry0: Any, dtype: Any) -> ParallelInfo:
    """The info of a length-0 solve: nothing to iterate, converged, and ``carries`` with
    a time axis of 0 on every carry leaf (``dtype``: the residual's)."""
    carries = jax.tree.map(lambda a: jnp.zeros((0, *jnp.shape(a)), jnp.result_type(a)), carry0)
    return ParallelInfo(jnp.int32(0), jnp.zeros((), dtype), jnp.ones((), bool),
                        jnp.zeros((), bool), carries)
