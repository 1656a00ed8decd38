"""The fast path for the built-in cells: hoisted input projection, fused backward pass.

Plain autodiff through :func:`jax.lax.scan` does two things cuDNN avoids: it multiplies
each step's input by ``w_cell_input`` inside the loop although that product does not
depend on the state, and its backward loop accumulates the weight gradients step by step.
Here, as in cuDNN,

1. the input projection ``gx = xs @ w_cell_input + b`` of every step is one matrix
   product before the loop (and its gradients one product after it, by autodiff);
2. only the recurrence ``gh_t = h_{t-1} @ w_cell_state`` and the cell's elementwise
   gates run sequentially;
3. a :func:`jax.custom_vjp` backward whose sequential loop carries only the state
   gradients; ``d w_cell_state = sum_t h_{t-1}^T d gh_t`` is one contraction afterwards.

Each cell is split into its recurrent matrix product and a ``pointwise`` part
``(gx_t, gh_t, carry) -> (carry, pre_activation)``; the backward loop differentiates the
pointwise part with :func:`jax.vjp` (elementwise work only).

Forward-mode autodiff (``jax.jvp``, ``jax.jacfwd``) cannot pass a ``custom_vjp``: use
``unroll(..., impl="scan")`` for it (reverse-over-reverse works on both).
"""

from __future__ import annotations

import functools
from collections.abc import Callable
from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
from jax import Array

from ._elman import ElmanParams
from ._gru import GRUParams, gru_step
from ._lstm import LSTMParams, LSTMState, lstm_step
from ._masks import bcast as _bcast
from ._masks import select as _select


class FusedCell(NamedTuple):
    """How one built-in cell splits into projection, recurrence and pointwise parts."""

    input_bias: Callable[[Any], Array | None]  # bias added to x @ w_cell_input
    recurrent_bias: Callable[[Any], Array | None]  # bias added to h @ w_cell_state
    pointwise: Callable[[Array, Array, Any], tuple[Any, Array]]  # (gx, gh, c) -> (c', pre)
    hidden: Callable[[Any], Array]  # the h part of a carry


def _sum_biases(*biases: Array | None) -> Array | None:
    present = [b for b in biases if b is not None]
    return None if not present else functools.reduce(jnp.add, present)


def _project(xs: Array, w_in: Array, b_in: Array | None) -> Array:
    gx = xs @ w_in
    return gx if b_in is None else gx + b_in


def _ident(carry: Any) -> Any:
    return carry


@functools.cache
def _elman_fused(activation: Callable[[Array], Array]) -> FusedCell:
    def pointwise(gx: Array, gh: Array, h: Array) -> tuple[Array, Array]:
        pre = gx + gh
        return activation(pre), pre

    return FusedCell(
        input_bias=lambda p: _sum_biases(p.b_cell, p.b_cell_state),
        recurrent_bias=lambda p: None,
        pointwise=pointwise,
        hidden=_ident,
    )


def _gru_pointwise(gx: Array, gh: Array, h: Array) -> tuple[Array, Array]:
    x_r, x_z, x_n = jnp.split(gx, 3, axis=-1)
    h_r, h_z, h_n = jnp.split(gh, 3, axis=-1)
    r = jax.nn.sigmoid(x_r + h_r)
    z = jax.nn.sigmoid(x_z + h_z)
    pre = x_n + r * h_n
    n = jnp.tanh(pre)
    return (1.0 - z) * n + z * h, pre


def _lstm_pointwise(gx: Array, gh: Array, carry: LSTMState) -> tuple[LSTMState, Array]:
    i, f, g, o = jnp.split(gx + gh, 4, axis=-1)
    c = jax.nn.sigmoid(f) * carry.c + jax.nn.sigmoid(i) * jnp.tanh(g)
    h = jax.nn.sigmoid(o) * jnp.tanh(c)
    return LSTMState(h, c), g


_GATED = {
    gru_step: (GRUParams, FusedCell(
        input_bias=lambda p: p.b_cell_input,
        recurrent_bias=lambda p: p.b_cell_state,
        pointwise=_gru_pointwise,
        hidden=_ident,
    )),
    lstm_step: (LSTMParams, FusedCell(
        input_bias=lambda p: _sum_biases(p.b_cell_input, p.b_cell_state),
        recurrent_bias=lambda p: None,
        pointwise=_lstm_pointwise,
        hidden=lambda c: c.h,
    )),
}


def fused_cell_of(cell: Any, params: Any) -> FusedCell | None:
    """The fused description of a built-in cell, or ``None`` for any other cell."""
    step = getattr(cell, "step", None)
    try:
        entry = _GATED.get(step)
    except TypeError:  # unhashable step
        return None
    if entry is not None:
        return entry[1] if isinstance(params, entry[0]) else None
    activation = getattr(step, "activation", None)
    if activation is not None and isinstance(params, ElmanParams):
        return _elman_fused(activation)
    return None


def _zeros_like(tree: Any) -> Any:
    return jax.tree.map(jnp.zeros_like, tree)


def _forward(fc: FusedCell, reverse: bool, unroll: int | bool, w: Array, b: Array | None,
             gx: Array, carry0: Any, valid: Array | None, resets: Array | None,
             residuals: bool = True, projection: tuple[Array, Array | None] | None = None,
             ) -> tuple[Any, tuple[Array, Array], Any]:
    """The forward loop; with ``residuals`` it also stacks what the backward pass needs
    (each step's input carry and recurrent product), which a forward-only call skips.

    With ``projection=(w_in, b_in)``, ``gx`` holds the raw inputs and each step projects
    its own: a forward-only call then never materialises ``(T, *batch, G*H)`` projected
    inputs, which on CPUs costs more memory traffic than it saves.
    """

    def body(carry: Any, inputs: Any) -> tuple[Any, Any]:
        gx_t, valid_t, reset_t = inputs
        if projection is not None:
            gx_t = _project(gx_t, *projection)
        c_in = carry if reset_t is None else _select(reset_t, carry0, carry)
        gh = fc.hidden(c_in) @ w
        if b is not None:
            gh = gh + b
        new, pre = fc.pointwise(gx_t, gh, c_in)
        state = fc.hidden(new)
        if valid_t is not None:
            new = _select(valid_t, new, c_in)
            pre, state = _select(valid_t, (pre, state), (jnp.zeros_like(pre),
                                                         jnp.zeros_like(state)))
        return new, ((pre, state, c_in, gh) if residuals else (pre, state))

    final, stacked = jax.lax.scan(
        body, carry0, (gx, valid, resets), reverse=reverse, unroll=unroll
    )
    return final, stacked[:2], (stacked[2:] if residuals else None)


@functools.partial(jax.custom_vjp, nondiff_argnums=(0, 1, 2))
def fused_recurrence(fc: FusedCell, reverse: bool, unroll: int | bool, w_in: Array,
                     b_in: Array | None, w: Array, b: Array | None, xs: Array, carry0: Any,
                     valid: Array | None, resets: Array | None,
                     cut: Array | None) -> tuple[Any, Array, Array]:
    """Runs the cell over ``xs``: ``(final, pre_activations, states)``.

    ``w_in, b_in`` project the inputs, ``w, b`` the state. ``valid`` masks steps past each
    sequence's end, ``resets`` restarts carries from ``carry0`` and ``cut`` stops
    gradients through the carry (truncated BPTT); each is ``(T, *batch)`` or ``None``.
    Evaluated without differentiation it is a plain loop; differentiated, the forward
    pass hoists the input projection and the backward pass is fused (module docstring).
    """
    final, (pre, state), _ = _forward(fc, reverse, unroll, w, b, xs, carry0, valid, resets,
                                      residuals=False, projection=(w_in, b_in))
    return final, pre, state


def _fused_fwd(fc, reverse, unroll, w_in, b_in, w, b, xs, carry0, valid, resets, cut):  # noqa: ANN001
    gx = _project(xs, w_in, b_in)
    final, (pre, state), (c_ins, ghs) = _forward(fc, reverse, unroll, w, b, gx, carry0, valid,
                                                 resets)
    res = (w_in, b_in, w, b, xs, gx, carry0, valid, resets, cut, c_ins, ghs)
    return (final, pre, state), res


def _fused_bwd(fc, reverse, unroll, res, cotangents):  # noqa: ANN001
    w_in, b_in, w, b, xs, gx, carry0, valid, resets, cut, c_ins, ghs = res
    d_final, d_pre, d_state = cotangents

    def pointwise_out(gx_t: Array, gh_t: Array, c_in: Any) -> tuple[Any, Array, Array]:
        new, pre = fc.pointwise(gx_t, gh_t, c_in)
        return new, pre, fc.hidden(new)

    def h_times_w(c_in: Any) -> Array:  # the recurrent product, differentiated in c only
        return fc.hidden(c_in) @ w

    def body(loop: Any, inputs: Any) -> tuple[Any, Any]:
        d_carry, d_carry0 = loop
        gx_t, gh_t, c_in, valid_t, reset_t, cut_t, d_pre_t, d_state_t = inputs
        _, vjp_pointwise = jax.vjp(pointwise_out, gx_t, gh_t, c_in)
        if valid_t is None:
            d_new, through = d_carry, _zeros_like(d_carry)
        else:
            zeros = _zeros_like(d_carry)
            d_new = _select(valid_t, d_carry, zeros)
            through = _select(valid_t, zeros, d_carry)
            d_pre_t, d_state_t = _select(valid_t, (d_pre_t, d_state_t),
                                         (jnp.zeros_like(d_pre_t), jnp.zeros_like(d_state_t)))
        d_gx, d_gh, d_c_in = vjp_pointwise((d_new, d_pre_t, d_state_t))
        (d_c_matmul,) = jax.vjp(h_times_w, c_in)[1](d_gh)
        d_c = jax.tree.map(lambda a, b_, c: a + b_ + c, d_c_in, d_c_matmul, through)
        if cut_t is not None:  # c_in = stop_gradient(c) at a truncation boundary
            d_c = _select(cut_t, _zeros_like(d_c), d_c)
        if reset_t is not None:  # c_in = carry0 where reset
            d_carry0 = jax.tree.map(jnp.add, d_carry0, _select(reset_t, d_c, _zeros_like(d_c)))
            d_c = _select(reset_t, _zeros_like(d_c), d_c)
        return (d_c, d_carry0), (d_gx, d_gh)

    inputs = (gx, ghs, c_ins, valid, resets, cut, d_pre, d_state)
    (d_c, d_carry0), (d_gx, d_gh) = jax.lax.scan(
        body, (d_final, _zeros_like(d_final)), inputs, reverse=not reverse, unroll=unroll
    )
    d_carry0 = jax.tree.map(jnp.add, d_carry0, d_c)
    # One contraction over time and batch. tensordot keeps the batch axis intact (no
    # reshape merging it with time), so a batch sharded across devices stays sharded and
    # XLA reduces with one all-reduce instead of gathering every state.
    h_in = fc.hidden(c_ins)
    lead = tuple(range(d_gh.ndim - 1))
    d_w = jnp.tensordot(h_in, d_gh, axes=(lead, lead)).astype(w.dtype)
    d_b = None if b is None else d_gh.sum(axis=lead).astype(b.dtype)
    # The input projection's gradients, as single contractions too.
    d_w_in = jnp.tensordot(xs, d_gx, axes=(lead, lead)).astype(w_in.dtype)
    d_b_in = None if b_in is None else d_gx.sum(axis=lead).astype(b_in.dtype)
    d_xs = (d_gx @ w_in.T).astype(xs.dtype)
    return d_w_in, d_b_in, d_w, d_b, d_xs, d_carry0, None, None, None


fused_recurrence.defvjp(_fused_fwd, _fused_bwd)


def fused_unroll(
    fc: FusedCell,
    params: Any,
    xs: Array,
    carry0: Any,
    valid: Array | None,
    resets: Array | None,
    cut: Array | None,
    reverse: bool,
    unroll: int | bool,
    readout: Callable[[Any, Array], Array],
) -> tuple[Any, Any]:
    """``(final, StepOutput)`` of a built-in cell over ``xs``, by the fused path."""
    from ._types import StepOutput

    final, pre, state = fused_recurrence(
        fc, reverse, unroll, params.w_cell_input, fc.input_bias(params), params.w_cell_state,
        fc.recurrent_bias(params), xs, carry0, valid, resets, cut,
    )
    output = readout(params, state)
    if valid is not None and params.b_output is not None:  # padded steps output zeros
        output = jnp.where(_bcast(valid, output), output, jnp.zeros((), output.dtype))
    return final, StepOutput(pre, state, output)
