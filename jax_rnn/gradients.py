r"""Gradient flow through time: state Jacobians, their norms and singular values, and
each time step's share of a weight gradient.

A recurrent model is a map :math:`s_t = F(s_{t-1}, x_t)` on its *state* :math:`s_t`, the
carry that one step hands to the next. Backpropagation through time multiplies the
step Jacobians :math:`\partial s_t / \partial s_{t-1}`, so how a gradient grows or fades
over a distance :math:`T - t` is the size of

.. math::

    \frac{\partial s_T}{\partial s_t} = \prod_{k=T}^{t+1}
    \frac{\partial s_k}{\partial s_{k-1}}.

For an Elman cell, :math:`\partial s_k / \partial s_{k-1} = \mathrm{diag}(f'(a_k))\,
W_{cs}^\top`, which gives Pascanu, Mikolov & Bengio's (ICML 2013) bound
:math:`\lVert \partial s_T / \partial s_t \rVert_2 \le (\sigma_{\max}(W_{cs})\,
\max|f'|)^{T-t}`.

**What the state is.** The state is the whole carry, flattened: the leaves of the carry
pytree concatenated on their last axis, in pytree order (:func:`flatten_state`). For the
Elman cells and the GRU it is :math:`h_t` (size ``H``); for the LSTM it is the full carry
``[h_t, c_t]`` (size ``2H``), since :math:`h_{t-1}` alone does not determine the next
step; for a :func:`jax_rnn.stack` it is every layer's carry, first layer first. Index
``t`` runs over ``0 .. T``: :math:`s_0` is the initial state ``state0`` and :math:`s_t`
the carry after reading ``xs[t - 1]``; so entry ``t`` of a result is at distance
``T - t`` from the end, and ``result[::-1][k]`` is at distance ``k``.

**Cost.** Every function here runs one forward :func:`jax.lax.scan` over the cell's step
(jit-compiled, with leading batch axes) and keeps the ``T + 1`` states, ``O(T D)`` memory
for a state of size ``D``. The Jacobians then come from a reverse scan that carries the
``D x D`` product :math:`\partial s_T / \partial s_t` and multiplies it by one step
Jacobian at a time, as ``D`` vector-Jacobian products of the step (one backward step for
each of ``D`` cotangents): ``O(T D)`` backward steps in all, and nothing of size ``T D^2``
unless you ask for the matrices. :func:`jacobian_norms` and
:func:`jacobian_singular_values` reduce each product inside the scan (an SVD of a
``D x D`` matrix per step and example for the spectral norm), so their memory stays
``O(T D + D^2)`` per example however long the sequence; :func:`state_jacobians` returns
all ``(T + 1) D^2`` entries. :func:`state_gradients` and :func:`step_contributions` are one
ordinary backward pass each (``O(T)`` residuals, as ``jax.grad`` of ``unroll``);
:func:`step_contributions` returns ``T`` copies of the params' gradient.

The options of :func:`jax_rnn.unroll` (``seq_lengths``, ``resets``, ``truncate``, ...)
are not taken here: pass each sequence's valid prefix. Bidirectional layers have no
single forward state and are refused.

Example:
    >>> from jax_rnn import gradients
    >>> params = jax_rnn.ElmanParams(w_cell_state=jnp.diag(jnp.array([0.5, 0.9])),
    ...                              w_cell_input=jnp.ones((1, 2)), b_cell=None)
    >>> linear = jax_rnn.make_elman(lambda a: a)
    >>> norms = gradients.jacobian_norms(linear, params, jnp.zeros((4, 1)))
    >>> print(norms.round(4))  # 0.9 ** (T - t)
    [0.6561 0.729  0.81   0.9    1.    ]
"""

from __future__ import annotations

import functools
import math
from collections.abc import Callable
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
from jax import Array

from ._checks import check_flags, is_float
from ._compose import Bidirectional, Stack
from ._fresh import check_arity, compile_fresh
from ._unroll import cast_floats, cast_inputs, initial_carry, prepare, scan

__all__ = [
    "flatten_state",
    "state_jacobians",
    "jacobian_norms",
    "jacobian_singular_values",
    "state_gradients",
    "step_contributions",
]

_LN2 = math.log(2.0)


# --------------------------------------------------------------------------------------
# The flattened state


def flatten_state(carry: Any) -> Array:
    """A carry as one array: its leaves concatenated on the last axis, in pytree order.

    This is the state every function in :mod:`jax_rnn.gradients` differentiates: ``h`` for
    the Elman cells and the GRU, ``[h, c]`` for an :class:`~jax_rnn.LSTMState`, and the
    layers' carries one after another for a :func:`~jax_rnn.stack`.

    Args:
        carry: a carry pytree whose leaves are shaped ``(*batch, size)``.

    Returns:
        an array shaped ``(*batch, D)`` with ``D`` the sum of the leaves' sizes.

    Example:
        >>> from jax_rnn import gradients
        >>> carry = jax_rnn.LSTMState(h=jnp.array([1.0, 2.0]), c=jnp.array([3.0, 4.0]))
        >>> print(gradients.flatten_state(carry))
        [1. 2. 3. 4.]
    """
    leaves = jax.tree.leaves(carry)
    if not leaves:
        raise ValueError("`jax_rnn.gradients.flatten_state`: the carry has no arrays.")
    shapes = [jnp.shape(leaf) for leaf in leaves]
    if any(len(s) == 0 for s in shapes) or len({s[:-1] for s in shapes}) > 1:
        raise ValueError(
            "`jax_rnn.gradients.flatten_state`: every leaf of the carry must be shaped "
            f"(*batch, size) with the same batch axes, got shapes {shapes}; a cell of your "
            "own that carries a scalar (a counter, say) can carry it shaped (*batch, 1)."
        )
    if len(leaves) == 1:
        return jnp.asarray(leaves[0])
    return jnp.concatenate([jnp.asarray(leaf) for leaf in leaves], axis=-1)


def _unflatten_like(template: Any, flat: Array) -> Any:
    """Splits ``flat`` (*batch, D) back into a carry shaped like ``template``."""
    leaves, treedef = jax.tree.flatten(template)
    sizes = [leaf.shape[-1] for leaf in leaves]
    cuts = np.cumsum(sizes)[:-1].tolist()
    parts = jnp.split(flat, cuts, axis=-1) if cuts else [flat]
    return jax.tree.unflatten(treedef, parts)


def _add_to_carry(carry: Any, delta: Array) -> Any:
    return jax.tree.map(jnp.add, carry, _unflatten_like(carry, delta))


# --------------------------------------------------------------------------------------
# Checks


def _has_bidirectional(model: Any) -> bool:
    if isinstance(model, Bidirectional):
        return True
    if isinstance(model, Stack):
        return any(_has_bidirectional(layer) for layer in model.layers)
    return False


def _prepare(where: str, cell: Any, params: Any, xs: Any, state0: Any) -> Any:
    if _has_bidirectional(cell):
        raise TypeError(
            f"`{where}`: bidirectional layers have no single forward state (their backward "
            "direction reads time reversed); pass a cell or a stack of unidirectional "
            "layers, or study each direction as its own cell."
        )
    return prepare(where, cell, params, xs, state0)


def _check_loss(where: str, loss: Any) -> None:
    if not callable(loss):
        raise TypeError(
            f"`{where}`: `loss` must be a function `loss(final_state, ys) -> scalar` (what "
            f"`jax_rnn.unroll` returns, to a scalar), got {type(loss).__name__}."
        )
    check_arity(where, "loss", loss, 2, "`loss(final_state, ys)`")


def _scalar_loss(where: str, value: Any) -> Array:
    if jnp.shape(value) != ():
        raise TypeError(
            f"`{where}`: `loss(final_state, ys)` must return a scalar, got shape "
            f"{jnp.shape(value)}; reduce it, e.g. with `.mean()` or `.sum()`."
        )
    if not is_float(jnp.result_type(value)):
        raise TypeError(
            f"`{where}`: `loss(final_state, ys)` must return a real floating-point scalar "
            f"(it is differentiated), got dtype {jnp.result_type(value)}; e.g. take "
            "`.real` or `abs(...)` of a complex one, or compute it from the float outputs."
        )
    return value


# --------------------------------------------------------------------------------------
# Forward pass and the reverse product of step Jacobians


def _setup(cell: Any, params: Any, xs: Any, state0: Any, dtype: Any, batch_shape: tuple):
    params = cast_floats(params, dtype)
    xs, state0 = cast_inputs((xs, state0), dtype)
    carry0 = initial_carry(cell, params, state0, batch_shape)
    return params, xs, carry0


def _forward(cell: Any, params: Any, xs: Any, carry0: Any) -> tuple[Any, Any]:
    """The carries *entering* each step, ``s_0 .. s_{T-1}``, and the final carry."""
    step = functools.partial(cell.step, params)

    def body(carry: Any, x: Any) -> tuple[Any, Any]:
        new, _ = step(carry, x)
        return new, carry

    final, before = scan(body, carry0, xs)
    return final, before


def _wide(dtype: Any) -> Any:
    """``dtype``, or float32 for a narrower float (XLA's SVD and QR take neither)."""
    return jnp.promote_types(dtype, jnp.float32)


def _reduce(kind: str, log: bool, g: Array, exponent: Array) -> Array:
    """Reduces ``g * 2**exponent`` (``g``: (*batch, D, D), ``exponent``: (*batch,))."""
    if kind == "matrix":
        return g
    if kind == "fro":
        values = jnp.sqrt(jnp.sum(g * g, axis=(-2, -1)))
        scale = exponent
    else:  # XLA's SVD takes float32 and wider: half-precision states go through float32
        values = jnp.linalg.svd(g.astype(_wide(g.dtype)), compute_uv=False).astype(g.dtype)
        if kind == "spectral":
            values = values[..., 0]
            scale = exponent
        else:
            scale = exponent[..., None]
    if log:
        return jnp.log(values) + scale.astype(values.dtype) * _LN2
    return jnp.ldexp(values, scale.astype(jnp.int32))


@functools.partial(
    jax.jit, static_argnames=("cell", "kind", "log", "dtype", "batch_shape")
)
def _jacobians_jit(
    cell: Any,
    params: Any,
    xs: Any,
    state0: Any,
    *,
    kind: str,
    log: bool,
    dtype: Any,
    batch_shape: tuple,
) -> Array:
    params, xs, carry0 = _setup(cell, params, xs, state0, dtype, batch_shape)
    final, before = _forward(cell, params, xs, carry0)
    step = functools.partial(cell.step, params)
    size = flatten_state(final).shape[-1]
    nb = len(batch_shape)
    eye = jnp.broadcast_to(jnp.eye(size, dtype=flatten_state(final).dtype),
                           (*batch_shape, size, size))
    exponent0 = jnp.zeros(batch_shape, jnp.int32)
    last = _reduce(kind, log, eye, exponent0)
    if xs.shape[0] == 0:
        return last[None]
    rescale = kind != "matrix"

    def times_jacobian(rows: Array, carry: Any, x: Any) -> Array:
        """``rows @ J``, ``J`` the Jacobian of the step from ``carry`` on ``x``."""

        def step_state(s: Array) -> Array:
            return flatten_state(step(_unflatten_like(carry, s), x)[0])

        _, vjp = jax.vjp(step_state, flatten_state(carry))
        return jax.vmap(lambda row: vjp(row)[0], in_axes=nb, out_axes=nb)(rows)

    def near_one(m: Array, exponent: Array) -> tuple[Array, Array]:
        """``m`` scaled by a power of two to a largest entry in [1, 2), the power added
        to ``exponent``: exact, and the product never overflows."""
        peak = jnp.max(jnp.abs(m), axis=(-2, -1))
        ok = jnp.isfinite(peak) & (peak > 0)
        shift = jnp.where(ok, jnp.floor(jnp.log2(jnp.where(ok, peak, 1))), 0).astype(jnp.int32)
        return jnp.ldexp(m, -shift[..., None, None]), exponent + shift

    def back(acc: tuple[Array, Array], inputs: Any) -> tuple[tuple[Array, Array], Array]:
        # acc = (d s_T / d s_t) * 2**-exponent; one step moves it to d s_T / d s_{t-1}.
        g, exponent = acc
        g = times_jacobian(g, *inputs)
        if rescale:
            g, exponent = near_one(g, exponent)
        return (g, exponent), _reduce(kind, log, g, exponent)

    def back_qr(acc: tuple[Array, Array, Array], inputs: Any,
                ) -> tuple[tuple[Array, Array, Array], Array]:
        # d s_T / d s_t = (R Q^T) * 2**exponent, R upper triangular, Q orthogonal (the
        # product kept as QR factors, as for Lyapunov exponents: a plain product loses
        # every singular value below the largest times the dtype's epsilon). One step:
        # R Q^T J = R (Q^T J) = R (Q' R')^T ... written with M^T = Q' R' for M = Q^T J.
        q, r, exponent = acc  # float32 for half-precision states (_wide)
        m = times_jacobian(jnp.swapaxes(q, -1, -2).astype(eye.dtype), *inputs)  # Q^T J
        q, r_step = jnp.linalg.qr(jnp.swapaxes(m, -1, -2).astype(q.dtype))
        r = jnp.swapaxes(r_step @ jnp.swapaxes(r, -1, -2), -1, -2)  # the new R, transposed
        r, exponent = near_one(r, exponent)
        return (q, r, exponent), _reduce(kind, log, r, exponent)

    if kind == "singular":
        wide = eye.astype(_wide(eye.dtype))
        _, out = jax.lax.scan(back_qr, (wide, wide, exponent0), (before, xs), reverse=True)
        out = out.astype(eye.dtype)
    else:
        _, out = jax.lax.scan(back, (eye, exponent0), (before, xs), reverse=True)
    return jnp.concatenate([out, last[None]], axis=0)


def _jacobians(where: str, cell: Any, params: Any, xs: Any, state0: Any, kind: str,
               log: bool) -> Array:
    check_flags(where, log=log)
    prep = _prepare(where, cell, params, xs, state0)
    return _jacobians_jit(cell, params, prep.xs, prep.state0, kind=kind, log=bool(log),
                          dtype=prep.dtype, batch_shape=prep.batch_shape)


def state_jacobians(cell: Any, params: Any, xs: Any, state0: Any = None) -> Array:
    r"""The Jacobian of the last state with respect to every state, :math:`\partial s_T /
    \partial s_t` for ``t = 0 .. T``.

    The states are flattened carries (see the module docs: ``[h, c]`` for the LSTM, every
    layer's carry for a stack). The products are accumulated backwards, one step's
    vector-Jacobian products at a time, so the cost is ``T`` backward steps for each of
    the ``D`` state components; the result itself holds ``(T + 1) D^2`` numbers per
    example: for long sequences ask :func:`jacobian_norms` or
    :func:`jacobian_singular_values`, which never hold more than one ``D x D`` product.
    For a loss instead of the last state, see :func:`state_gradients`.

    Args:
        cell: a :class:`~jax_rnn.Cell` (e.g. :data:`jax_rnn.lstm`) or a
            :func:`~jax_rnn.stack` of cells.
        params: the model's params.
        xs: inputs shaped ``(T, *batch, I)``; ``T`` may be 0.
        state0: the initial carry, as for :func:`jax_rnn.unroll` (zeros when ``None``).

    Returns:
        an array shaped ``(T + 1, *batch, D, D)``: entry ``[t, ..., i, j]`` is
        :math:`\partial s_{T,i} / \partial s_{t,j}`, with :math:`s_0` = ``state0`` and
        entry ``T`` the identity.

    Raises:
        ValueError: shapes that do not match the params.
        TypeError: a bidirectional layer, params of the wrong type, non-numeric input.

    Example:
        >>> from jax_rnn import gradients
        >>> params = jax_rnn.ElmanParams(w_cell_state=jnp.array([[0.5, 0.0], [1.0, 0.5]]),
        ...                              w_cell_input=jnp.zeros((1, 2)), b_cell=None)
        >>> jac = gradients.state_jacobians(jax_rnn.elman, params, jnp.zeros((2, 1)))
        >>> jac.shape  # (T + 1, D, D)
        (3, 2, 2)
        >>> print(jac[0])  # at the zero state tanh' = 1: (W^T)^2
        [[0.25 1.  ]
         [0.   0.25]]
    """
    return _jacobians("jax_rnn.gradients.state_jacobians", cell, params, xs, state0,
                      "matrix", False)


def jacobian_norms(
    cell: Any,
    params: Any,
    xs: Any,
    state0: Any = None,
    *,
    ord: int | str = 2,
    log: bool = False,
) -> Array:
    r"""The norms :math:`\lVert \partial s_T / \partial s_t \rVert` for ``t = 0 .. T``,
    without materialising the Jacobians.

    The reverse scan of :func:`state_jacobians` carries one ``D x D`` product per example
    and reduces it at each step, so memory is ``O(T D + D^2)`` per example. The product is
    rescaled by exact powers of two as it goes, so norms that over- or underflow the
    dtype (exploding or vanishing gradients over thousands of steps) still come out
    right with ``log=True``.

    Each step's Jacobian is the one backpropagation uses, with the activations'
    derivatives computed from their outputs (``1 - h**2`` for tanh, ``s (1 - s)`` for the
    sigmoid). Where an activation saturates in floating point its output rounds to
    ``±1`` (or 0, 1), and its derivative is exactly 0 although the true one is tiny but
    positive: tanh at ``|pre|`` above about 9 in float32 and 19 in float64. A norm
    through such a step comes back as 0 (``-inf`` with ``log``) where the exact value is
    about ``-2 |pre|`` per saturated step in log; a little below those points the
    derivative keeps only a few digits. The norms are what gradient descent sees, not
    the real-number model's.

    Args:
        cell: a :class:`~jax_rnn.Cell` or a :func:`~jax_rnn.stack` of cells.
        params: the model's params.
        xs: inputs shaped ``(T, *batch, I)``.
        state0: the initial carry (zeros when ``None``).
        ord: ``2`` for the spectral norm (the largest singular value), ``"fro"`` for the
            Frobenius norm.
        log: return natural logarithms of the norms.

    Returns:
        an array shaped ``(T + 1, *batch)``; entry ``t`` is at distance ``T - t`` (the
        last entry, the identity, has norm 1).

    Raises:
        ValueError: an unknown ``ord``, or shapes that do not match the params.
        TypeError: as for :func:`state_jacobians`.

    Example:
        >>> from jax_rnn import gradients
        >>> params = jax_rnn.gru.init(jax.random.key(0), 3, 8)
        >>> xs = jax.random.normal(jax.random.key(1), (50, 4, 3))  # T = 50, batch of 4
        >>> norms = gradients.jacobian_norms(jax_rnn.gru, params, xs)
        >>> norms.shape
        (51, 4)
        >>> bool((norms[0] < norms[-1]).all())  # the gradient from 50 steps back fades
        True
    """
    where = "jax_rnn.gradients.jacobian_norms"
    kinds = {2: "spectral", "fro": "fro"}
    if isinstance(ord, bool) or ord not in kinds:
        raise ValueError(
            f"`{where}`: `ord` must be 2 (spectral norm) or 'fro' (Frobenius), got {ord!r}."
        )
    return _jacobians(where, cell, params, xs, state0, kinds[ord], log)


def jacobian_singular_values(
    cell: Any, params: Any, xs: Any, state0: Any = None, *, log: bool = False
) -> Array:
    r"""The singular values of :math:`\partial s_T / \partial s_t` for ``t = 0 .. T``.

    Computed inside the reverse scan like :func:`jacobian_norms`, so the Jacobians are
    never all held: the product is kept as the factors of a QR decomposition, updated by
    one ``D x D`` QR per step and example (as Lyapunov exponents are computed), and the
    singular values are those of its triangular factor. Each singular value keeps its
    own relative precision however far it is below the largest (a plain product keeps
    only those within the dtype's epsilon of it), down to the dtype's smallest normal
    number times the largest (about ``1e-38`` in float32, ``1e-308`` in float64); smaller
    ones come back as 0 (``-inf`` with ``log``). That holds while each step's Jacobian
    is well conditioned: a step whose own singular values are less than about epsilon
    apart relative to its largest (a singular step: a rank-deficient recurrent matrix,
    ReLU units that are off) contributes rounding noise of about epsilon times its
    largest instead, so a singular value that is exactly 0 comes back as about
    ``eps**k`` after ``k`` such steps (a log slope near ``log(eps)`` per step, not
    ``-inf``). States of float16 or bfloat16 are factored in float32. For a linear RNN
    they are the singular values of the powers of the recurrent matrix; their logarithms
    divided by the distance tend to the Lyapunov exponents of the trajectory.

    Args:
        cell: a :class:`~jax_rnn.Cell` or a :func:`~jax_rnn.stack` of cells.
        params: the model's params.
        xs: inputs shaped ``(T, *batch, I)``.
        state0: the initial carry (zeros when ``None``).
        log: return natural logarithms (the largest never overflows, as for
            :func:`jacobian_norms`).

    Returns:
        an array shaped ``(T + 1, *batch, D)``, each row in descending order.

    Raises:
        ValueError: shapes that do not match the params.
        TypeError: as for :func:`state_jacobians`.

    Example:
        >>> from jax_rnn import gradients
        >>> params = jax_rnn.ElmanParams(w_cell_state=jnp.array([[0.0, 2.0], [0.5, 0.0]]),
        ...                              w_cell_input=jnp.zeros((1, 2)), b_cell=None)
        >>> linear = jax_rnn.make_elman(lambda a: a)
        >>> sv = gradients.jacobian_singular_values(linear, params, jnp.zeros((3, 1)))
        >>> print(sv)  # W^k for k = 3, 2, 1, 0: W^2 = I, so (2, 0.5) and (1, 1)
        [[2.  0.5]
         [1.  1. ]
         [2.  0.5]
         [1.  1. ]]
    """
    return _jacobians("jax_rnn.gradients.jacobian_singular_values", cell, params, xs,
                      state0, "singular", log)


# --------------------------------------------------------------------------------------
# A loss: its gradient with respect to each state, and each step's share of dL/dW


def _state_gradients_impl(
    params: Any, xs: Any, state0: Any, *, cell: Any, loss: Any, dtype: Any, batch_shape: tuple
) -> Array:
    params, xs, carry0 = _setup(cell, params, xs, state0, dtype, batch_shape)
    step = functools.partial(cell.step, params)
    size = flatten_state(carry0).shape[-1]

    def perturbed(deltas: Array) -> Array:
        # s_t + delta_t enters step t + 1; the last delta is added to the final carry.
        def body(carry: Any, inputs: Any) -> tuple[Any, Any]:
            x, delta = inputs
            return step(_add_to_carry(carry, delta), x)

        final, ys = scan(body, carry0, (xs, deltas[:-1]))
        final = _add_to_carry(final, deltas[-1])
        return _scalar_loss("jax_rnn.gradients.state_gradients", loss(final, ys))

    zeros = jnp.zeros((xs.shape[0] + 1, *batch_shape, size), flatten_state(carry0).dtype)
    return jax.grad(perturbed)(zeros)


def state_gradients(
    cell: Any,
    params: Any,
    xs: Any,
    loss: Callable[[Any, Any], Array],
    state0: Any = None,
) -> Array:
    r"""The gradient of a loss with respect to every state, :math:`\delta_t = \partial L /
    \partial s_t` for ``t = 0 .. T``: the signal that backpropagation carries back
    through the recurrent connection.

    ``loss(final_state, ys)`` takes what :func:`jax_rnn.unroll` returns (the final carry
    and the step outputs stacked over time) and returns a scalar. :math:`\delta_t` is the
    derivative of the loss when the carry :math:`s_t` is perturbed as it is handed to
    step ``t + 1``: the outputs of steps ``1 .. t`` are already emitted and stay fixed,
    so :math:`\delta_t` is what reaches :math:`s_t` from the future, and BPTT's recursion
    holds: :math:`\delta_{t-1} = \delta_t\, \partial s_t / \partial s_{t-1} +
    \partial L / \partial y_t\, \partial y_t / \partial s_{t-1}`. :math:`\delta_0` is the
    gradient with respect to ``state0``, and :math:`\delta_T` the loss's gradient with
    respect to the final state alone. One backward pass, memory as ``jax.grad`` of
    ``unroll``.

    Args:
        cell: a :class:`~jax_rnn.Cell` or a :func:`~jax_rnn.stack` of cells.
        params: the model's params.
        xs: inputs shaped ``(T, *batch, I)``.
        loss: ``loss(final_state, ys) -> scalar``. The computation is compiled at every
            call, so a loss may read values from outside (a global, a closure's
            variables) and gets their current ones; to call this repeatedly at the same
            shapes, call it inside your own :func:`jax.jit`, where jit's usual rules
            apply (values read from outside are fixed when it traces).
        state0: the initial carry (zeros when ``None``).

    Returns:
        an array shaped ``(T + 1, *batch, D)``.

    Raises:
        TypeError: a loss that is not callable or does not return a scalar; as for
            :func:`state_jacobians`.

    Example:
        >>> from jax_rnn import gradients
        >>> params, xs, state0 = jax_rnn.seed_example()
        >>> def final_sum(final, ys):
        ...     return final.sum()
        >>> delta = gradients.state_gradients(jax_rnn.elman, params, xs, final_sum, state0)
        >>> print(delta.round(4))  # (T + 1, H): gone within two steps, tanh saturates
        [[0.     0.    ]
         [0.     0.    ]
         [0.     0.    ]
         [0.     0.    ]
         [0.0017 0.0045]
         [1.     1.    ]]
    """
    where = "jax_rnn.gradients.state_gradients"
    _check_loss(where, loss)
    prep = _prepare(where, cell, params, xs, state0)
    return compile_fresh(_state_gradients_impl, params, prep.xs, prep.state0, cell=cell,
                         loss=loss, dtype=prep.dtype, batch_shape=prep.batch_shape)


def _contributions_impl(
    params: Any, xs: Any, state0: Any, *, cell: Any, loss: Any, dtype: Any, batch_shape: tuple
) -> Any:
    params, xs, carry0 = _setup(cell, params, xs, state0, dtype, batch_shape)
    length = xs.shape[0]

    def per_step(copies: Any) -> Array:
        def body(carry: Any, inputs: Any) -> tuple[Any, Any]:
            x, p = inputs
            return cell.step(p, carry, x)

        final, ys = scan(body, carry0, (xs, copies))
        return _scalar_loss("jax_rnn.gradients.step_contributions", loss(final, ys))

    copies = jax.tree.map(lambda p: jnp.broadcast_to(p, (length, *p.shape)), params)
    return jax.grad(per_step)(copies)


def step_contributions(
    cell: Any,
    params: Any,
    xs: Any,
    loss: Callable[[Any, Any], Array],
    state0: Any = None,
) -> Any:
    r"""How much of each weight's gradient :math:`\partial L / \partial W` comes from each
    time step.

    The model is unrolled with a separate copy :math:`W_t` of the params at every step,
    all equal to ``params``; the gradient with respect to copy :math:`W_t` is step
    ``t``'s term of the backpropagation-through-time sum, and the terms add up to the
    gradient ``jax.grad`` gives:

    .. math::

        \frac{\partial L}{\partial W} = \sum_{t=1}^{T} \frac{\partial L}{\partial W_t}.

    For an Elman cell, term ``t`` of :math:`W_{cs}` is :math:`s_{t-1}^\top \delta^a_t`
    with :math:`\delta^a_t` the gradient reaching the pre-activation of step ``t``; when
    gradients vanish, the early terms are tiny and the sum is dominated by the last few
    steps. One backward pass; the result holds ``T`` copies of the gradient.

    Args:
        cell: a :class:`~jax_rnn.Cell` or a :func:`~jax_rnn.stack` of cells.
        params: the model's params.
        xs: inputs shaped ``(T, *batch, I)``.
        loss: ``loss(final_state, ys) -> scalar``, as for :func:`state_gradients`.
        state0: the initial carry (zeros when ``None``).

    Returns:
        a pytree shaped like ``params`` whose leaves have a leading time axis ``T``:
        leaf ``[t]`` is the contribution of step ``t + 1`` (the step that reads
        ``xs[t]``). ``None`` fields stay ``None``.

    Raises:
        TypeError: as for :func:`state_gradients`.

    Example:
        >>> from jax_rnn import gradients
        >>> params, xs, state0 = jax_rnn.seed_example()
        >>> def last_output(final, ys):
        ...     return ys.output[-1, 0]
        >>> parts = gradients.step_contributions(jax_rnn.elman, params, xs, last_output,
        ...                                      state0)
        >>> print(parts.b_cell.round(4))  # the last step dominates
        [[0.     0.    ]
         [0.     0.    ]
         [0.     0.    ]
         [0.0001 0.0001]
         [0.0099 0.0074]]
        >>> total = jax.grad(lambda p: jax_rnn.unroll(jax_rnn.elman, p, xs, state0)[1]
        ...                  .output[-1, 0])(params)
        >>> bool(jnp.allclose(parts.b_cell.sum(0), total.b_cell))
        True
    """
    where = "jax_rnn.gradients.step_contributions"
    _check_loss(where, loss)
    prep = _prepare(where, cell, params, xs, state0)
    return compile_fresh(_contributions_impl, params, prep.xs, prep.state0, cell=cell,
                         loss=loss, dtype=prep.dtype, batch_shape=prep.batch_shape)
