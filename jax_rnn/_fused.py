"""The fast path for the built-in cells: hoisted input projection, fused backward pass.

Plain autodiff through :func:`jax.lax.scan` does two things cuDNN avoids: it multiplies
each step's input by ``w_cell_input`` inside the loop although that product does not
depend on the state, and its backward loop accumulates the weight gradients step by step.
Here, as in cuDNN,

1. on accelerators, the input projection ``gx = xs @ w_cell_input + b`` of every step is
   one matrix product before the differentiated loop; on CPUs, and in any call that is
   not differentiated, each step projects its own inputs instead, which never writes
   ``(T, *batch, G*H)`` projected inputs to memory (the backward pass does not need
   them). The projection's gradients are one product after the backward loop;
2. only the recurrence ``gh_t = h_{t-1} @ w_cell_state`` and the cell's elementwise
   gates run sequentially;
3. a :func:`jax.custom_vjp` backward whose sequential loop carries only the state
   gradients; ``d w_cell_state = sum_t h_{t-1}^T d gh_t`` is one contraction afterwards.
   On CPUs, where the steps' tape is large, the backward pass runs over chunks of
   consecutive steps instead, each a loop followed by its own contractions, so that the
   chunk's gate gradients are still in the cache when the contractions read them
   (``_by_chunks``). The ``custom_vjp`` takes symbolic zeros: where a loss does not read
   the pre-activations or the states (most losses leave one of them out), their
   cotangents stay ``None`` rather than ``(T, *batch, H)`` arrays of zeros, and XLA's
   backward loops and the C++ kernels add nothing for them (the compact LSTM path and
   the GPU kernels, which read every step's cotangents, take zeros).

Each cell is split into its recurrent matrix product and a ``pointwise`` part
``(gx_t, gh_t, carry) -> (carry, pre_activation, gates)``. The differentiated forward
loop keeps the activated ``gates`` (sigmoids and tanhs) of every step, and each cell's
hand-written ``step_back`` turns them into the step's gradients with multiplications and
additions (the LSTM's evaluates ``tanh(g)`` and ``tanh(c')`` again rather than keeping two
more arrays per step): no :func:`jax.vjp` is traced per step. The derivatives of tanh,
sigmoid and relu follow from their outputs (``1 - h^2``, ``h (1 - h)``, ``h > 0``), so an
Elman cell with one of these keeps nothing beyond its outputs; any other Elman activation
(``make_elman``) is differentiated with :func:`jax.vjp` at each step, which is right
whether or not it acts elementwise. Without masked steps, each step's input state is the
previous step's output, rebuilt by the backward pass instead of kept per step. The
backward loop multiplies by ``w_cell_state.T`` transposed once outside it (XLA's CPU
backend is slower with a transposed operand), and computes the elementwise part inside
it: reading the saved gates costs less memory traffic than a precomputed array of
derivatives would.

One LSTM (GRU) sequence of hidden size at most 64 (32) on a CPU (no masked, reset or
cut steps, where the C++ kernels below do not run: e.g. in float64) takes a compact path
instead, because there XLA's per-operation cost is most of
each step: its loops run at most 8 operations each (the most that XLA's CPU runtime
executes one after another without dataflow scheduling). The LSTM's path keeps the gates and
cell states in the forward loop and precomputes every derivative coefficient for the
backward loop; the GRU's forward loop does one product per step and keeps one array of
gates, and its backward loop is the general one (see the comment above ``_compact``).

An Elman cell's two loops (tanh or relu, float32, one batch axis or none, no masked,
reset or cut steps) run as one kernel each instead of XLA's while loops
(:mod:`jax_rnn._kernels`): on an NVIDIA GPU Pallas kernels (at most 128 hidden units;
the forward kernel after the hoisted projection), on a CPU C++ kernels
(:mod:`jax_rnn._native`; the forward kernel projects each step's input itself). On a
CPU a GRU's and an LSTM's loops do too, under the same conditions (:class:`Loops`; the
LSTM's differentiated calls up to ``_LSTM_KERNEL_MAX_HIDDEN`` hidden units, its forward
loop alone at any size); they take precedence over the compact paths. The contractions
after the backward loop are XLA's, as for the other cells, except for an Elman cell on a
CPU whose inputs are not differentiated (``custom_vjp``'s symbolic zeros tell): there one
C++ kernel runs the backward loop and the weight gradients (``Loops.grads``), chunk by
chunk, and writes no ``(T, *batch, H)`` array.

Forward-mode autodiff (``jax.jvp``, ``jax.jacfwd``) cannot pass a ``custom_vjp``: use
``unroll(..., impl="scan")`` for it (reverse-over-reverse works on both).
"""

from __future__ import annotations

import functools
import math
from collections.abc import Callable
from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
import numpy as np
from jax import Array

from . import _kernels, _native
from ._elman import ElmanParams
from ._gru import GRUParams, gru_pointwise, gru_step
from ._kernels import plus as _plus
from ._kernels import project as _project
from ._lstm import LSTMParams, LSTMState, lstm_step
from ._masks import bcast as _bcast
from ._masks import select as _select
from ._masks import zero_where_invalid as _zero_where_invalid


class Tape(NamedTuple):
    """What the differentiated forward pass keeps for the backward pass, stacked over time.

    Attributes:
        h_in: each step's input hidden state (after any reset), or ``None`` where no
            step is masked: the backward pass then rebuilds it from ``state``.
        pre: the public pre-activations (zero at masked steps); ``None`` in the
            residuals of a forward pass that ran as a kernel (:class:`Loops`), whose
            backward pass does not read them (how the backward pass tells).
        state: the public states (zero at masked steps).
        gates: the cell's activations, the third result of its ``pointwise``; after a
            kernel, what its backward kernel reads (the LSTM's: ``_kernels.LstmTape``;
            the GRU's: ``_kernels.GruTape``, as its XLA loop's; the Elman cell's: ``()``).
    """

    h_in: Array | None
    pre: Array | None
    state: Array
    gates: Any


class Loops(NamedTuple):
    """A cell's forward and backward loops as one kernel each (:mod:`jax_rnn._kernels`).

    Attributes:
        forward: ``(residuals, reverse, w_in, b_in, w, b, xs, carry0) -> (final, tape)``,
            the forward loop; ``residuals``: the tape holds what ``backward`` reads.
        backward: ``(reverse, w, tape, d_carry, d_pre, d_state) -> (d_carry0, d_out)``
            (``d_pre``, ``d_state``: ``None`` where zero),
            the backward loop over the tape's steps, ``d_out`` for ``gate_grads``.
        gpu: whether the loops have GPU kernels too (else they run on CPUs only).
        gh_first: the weight gradients from ``d_out`` are computed transposed (see
            ``_param_grads``).
        max_hidden: the widest hidden size the kernels run in a differentiated call
            (``None``: any; on GPUs ``_kernels.fits`` decides too); a call that is not
            differentiated runs the forward kernel at any size.
        grads: ``(reverse, w, tape, h0, xs, d_carry, d_pre, d_state, unfused) ->
            (d_carry0, (d_w_in, d_b_in, d_w))``, the backward loop and the weight gradients
            in one kernel on CPUs, for inputs ``xs`` that are not differentiated
            (``unfused``: the same by other means, for :func:`jax.vmap`); or ``None``.
    """

    forward: Callable[..., tuple[Any, Tape]]
    backward: Callable[..., tuple[Any, Array]]
    gpu: bool
    gh_first: bool
    max_hidden: int | None = None
    grads: Callable[..., tuple[Any, tuple[Array, Array, Array]]] | None = None


class FusedCell(NamedTuple):
    """How one built-in cell splits into projection, recurrence and pointwise parts, and
    its hand-written backward pass.

    Attributes:
        input_bias: the bias added to ``x @ w_cell_input``.
        recurrent_bias: the bias added to ``h @ w_cell_state``.
        pointwise: ``(gx, gh, c) -> (c', pre, gates)``, the elementwise part of a step;
            ``gates`` are the activations that the backward pass reuses.
        hidden: the ``h`` part of a carry.
        prepare: ``(tape, d_pre, d_state) -> backward-loop inputs``, for the steps of
            one backward loop (all, or a chunk) at once.
        step_back: ``(w.T, inputs_t, d_c') -> (d_out_t, d_c)``, one step of the backward
            loop: elementwise products and the one matrix product ``d gh @ w.T``.
        gate_grads: ``(d_out, tape) -> (d_gx, d_gh)`` for the same steps, after the loop.
        additive: ``pointwise`` uses ``gx`` and ``gh`` only through ``gx + gh`` (Elman,
            LSTM), so a step that projects its own input can compute both with one
            matrix product, ``[x, h] @ [w_cell_input; w_cell_state]``.
        compact_forward: ``(reverse, unroll, w_in, b_in, w, b, xs, carry0) -> (final,
            pre, tape)``, the differentiated forward pass for one sequence of a small
            hidden size on a CPU (see ``_compact``), or ``None``.
        compact_max_hidden: the widest hidden size ``compact_forward`` is used for.
        kernel: the cell's loops as one kernel each (:class:`Loops`,
            :mod:`jax_rnn._kernels`), or ``None``.
    """

    input_bias: Callable[[Any], Array | None]
    recurrent_bias: Callable[[Any], Array | None]
    pointwise: Callable[[Array, Array, Any], tuple[Any, Array, Any]]
    hidden: Callable[[Any], Array]
    prepare: Callable[[Tape, Array | None, Array | None], Any]
    step_back: Callable[[Array, Any, Any], tuple[Any, Any]]
    gate_grads: Callable[[Any, Tape], tuple[Array, Array]]
    additive: bool = False
    compact_forward: Callable[..., tuple[Any, Array, Any]] | None = None
    compact_max_hidden: int = 0
    kernel: Loops | None = None


def _sum_biases(*biases: Array | None) -> Array | None:
    present = [b for b in biases if b is not None]
    return None if not present else functools.reduce(jnp.add, present)


def _ident(carry: Any) -> Any:
    return carry


def _same(d_g: Array, tape: Tape) -> tuple[Array, Array]:
    """Gate gradients of a cell that adds ``gx`` and ``gh`` before any nonlinearity."""
    return d_g, d_g


# Elman: pre = gx + gh, h' = act(pre). d pre = (d h' + d state) * act'(pre) + d pre (the
# cotangent of the public pre-activation), d gx = d gh = d pre, d h = d pre @ w.T.


def _tanh_back(h: Array, d_h: Array) -> Array:
    # (1 - h)(1 + h), not 1 - h*h: near saturation 1 - h is exact and h*h rounds, which
    # added its own error to that of h's rounding (a review found 1 - h*h 1.6% off the
    # true derivative at |pre| = 16 in float64; h's own rounding leaves about 0.5%).
    return d_h * ((1.0 - h) * (1.0 + h))


def _relu_back(h: Array, d_h: Array) -> Array:
    return jnp.where(h > 0, d_h, jnp.zeros((), d_h.dtype))  # h > 0 exactly where pre > 0


def _sigmoid_back(h: Array, d_h: Array) -> Array:
    return d_h * h * (1.0 - h)


_BACK_FROM_OUTPUT = ((jnp.tanh, _tanh_back), (jax.nn.relu, _relu_back),
                     (jax.nn.sigmoid, _sigmoid_back))
"""Activations whose derivative follows from their output: no re-evaluation, and the
pre-activations need not be kept."""


def _vjp_back(activation: Callable[[Array], Array]) -> Callable[[Array, Array], Array]:
    """The derivative of any activation (elementwise or not) from its input: its vjp."""
    return lambda pre, d_h: jax.vjp(activation, pre)[1](d_h)[0]


def _elman_prepare(saved: str) -> Callable[[Tape, Array | None, Array | None], Any]:
    """Backward-loop inputs: the tape's ``saved`` field (what ``back`` reads) and the
    cotangents of the public pre-activations and states (``None`` where zero)."""
    return lambda tape, d_pre, d_state: (getattr(tape, saved), d_pre, d_state)


def _elman_step_back(back: Callable[[Array, Array], Array]) -> Callable[..., Any]:
    def step_back(w_t: Array, inputs: Any, d_new: Array) -> tuple[Array, Array]:
        saved, d_pre, d_state = inputs
        d_g = _plus(back(saved, _plus(d_new, d_state)), d_pre)
        return d_g, d_g @ w_t

    return step_back


@functools.cache
def _elman_fused(activation: Callable[[Array], Array]) -> FusedCell:
    def pointwise(gx: Array, gh: Array, h: Array) -> tuple[Array, Array, tuple[()]]:
        pre = gx + gh
        return activation(pre), pre, ()

    from_output = next((b for f, b in _BACK_FROM_OUTPUT if f is activation), None)
    back = _vjp_back(activation) if from_output is None else from_output
    return FusedCell(
        input_bias=lambda p: _sum_biases(p.b_cell, p.b_cell_state),
        recurrent_bias=lambda p: None,
        pointwise=pointwise,
        hidden=_ident,
        prepare=_elman_prepare("pre" if from_output is None else "state"),
        step_back=_elman_step_back(back),
        gate_grads=_same,
        additive=True,
        kernel=_elman_loops((activation, back)) if activation in _kernels.ACTIVATIONS
        else None,
    )


def _elman_loops(pair: _kernels.Kernel) -> Loops:
    """An Elman cell's loops (``pair``: its activation and derivative) as kernels."""
    def forward(residuals: bool, reverse: bool, w_in: Array, b_in: Array | None, w: Array,
                b: None, xs: Array, carry0: Array) -> tuple[Array, Tape]:
        pre, state = _kernels.forward(pair, reverse, xs, w_in, b_in, w, carry0)
        return state[0 if reverse else -1], Tape(None, pre, state, ())

    def backward(reverse: bool, w: Array, tape: Tape, d_carry: Array, d_pre: Array | None,
                 d_state: Array | None) -> tuple[Array, Array]:
        d_out, d_carry = _kernels.backward(pair, reverse, tape.state, d_state, d_pre, w.T,
                                           d_carry)
        return d_carry, d_out

    def grads(reverse: bool, w: Array, tape: Tape, h0: Array, xs: Array, d_carry: Array,
              d_pre: Array | None, d_state: Array | None,
              unfused: Callable[..., tuple[Array, ...]]) -> tuple[Array, Any]:
        d_w_in, d_b, d_w, d_carry = _kernels.backward_grads(
            pair, reverse, unfused, tape.state, d_state, d_pre, w.T, d_carry, xs, h0)
        return d_carry, (d_w_in, d_b, d_w)

    return Loops(forward, backward, gpu=True, gh_first=True, grads=grads)


# GRU: r = s(x_r + h_r), z = s(x_z + h_z), pre = x_n + r * h_n, n = tanh(pre),
# h' = (1 - z) * n + z * h, with s the sigmoid and [h_r, h_z, h_n] = h @ w + b.


def _gru_prepare(tape: Tape, d_pre: Array | None, d_state: Array | None) -> Any:
    return tape.gates, tape.h_in, d_pre, d_state


def _gru_step_back(w_t: Array, inputs: Any, d_new: Array) -> tuple[Array, Array]:
    (r, z, n, h_n), h, d_pre, d_state = inputs
    return _kernels.gru_step_back(w_t, r, z, n, h_n, h, d_pre, d_state, d_new)


def _gru_gate_grads(d_gx: Array, tape: Tape) -> tuple[Array, Array]:
    r = tape.gates[0]  # d h_n = d pre * r; the r and z gates see gx + gh
    d_rz, d_n = jnp.split(d_gx, [2 * r.shape[-1]], axis=-1)
    return d_gx, jnp.concatenate([d_rz, d_n * r], axis=-1)


# LSTM: [i, f, g, o] = gx + gh, c' = s(f) * c + s(i) * tanh(g), h' = s(o) * tanh(c').


def _lstm_gates(a: Array) -> tuple[Array, Array, Array, Array]:
    """``(s(i), s(f), tanh(g), s(o))`` of the pre-activations ``a = [i, f, g, o]``."""
    i, f, g, o = jnp.split(a, 4, axis=-1)
    return jax.nn.sigmoid(i), jax.nn.sigmoid(f), jnp.tanh(g), jax.nn.sigmoid(o)


def _lstm_pointwise(gx: Array, gh: Array, carry: LSTMState) -> tuple[LSTMState, Array, Any]:
    a = gx + gh
    i, f, tg, o = _lstm_gates(a)
    c = f * carry.c + i * tg
    return LSTMState(o * jnp.tanh(c), c), jnp.split(a, 4, axis=-1)[2], (i, f, o, carry.c)


def _lstm_prepare(tape: Tape, d_pre: Array | None, d_state: Array | None) -> Any:
    return tape.gates, tape.pre, d_pre, d_state


def _lstm_step_back(w_t: Array, inputs: Any, d_new: LSTMState) -> tuple[Array, LSTMState]:
    (i, f, o, c), g, d_pre, d_state = inputs
    d_a, d_carry = _kernels.lstm_step_back(w_t, g, i, f, o, c, d_pre, d_state, *d_new)
    return d_a, LSTMState(*d_carry)


# The compact paths for one sequence of a small hidden size. XLA's CPU runtime runs a
# loop body's operations one after another only while the body has at most 8 of them
# (``ThunkExecutor``'s ``execute_sequential_num_thunks_threshold``); past that it
# schedules them as a dataflow graph, which costs more per operation. With one row per
# step the matrix products are matrix-vector products and that overhead is most of the
# step: the general path's LSTM loops have 19 (forward) and 12 (backward) operations, its
# GRU forward loop 15. The compact LSTM forward loop keeps only the gates (one array) and
# the cell states (8 operations); the public outputs and every derivative coefficient are
# computed after it for all steps at once and packed into one array, so that the backward
# loop reads one slice and runs 8 operations. The compact GRU forward loop does one
# product per step and keeps one array of gates (7 operations); its backward loop is the
# general one (7). With more rows per step, or a hidden size above 64 (LSTM) or 32 (GRU),
# the extra memory traffic (and the GRU's product with a zero block) costs as much as or
# more than the operations saved (docs/performance.md), and the general path is used.


class CompactTape(NamedTuple):
    """The compact LSTM path's residuals.

    Attributes:
        carry0: the initial carry.
        gates: each step's ``[s(i), s(f), g, s(o)]``: the three sigmoid gates, and the
            cell input's pre-activation (the public ``pre``; its tanh is recomputed).
        c: each step's new cell state.
        state: each step's output ``h``.
    """

    carry0: LSTMState
    gates: Array
    c: Array
    state: Array


def _compact(fc: FusedCell, xs: Array, carry0: Any,
             masks: tuple[Any, ...]) -> Callable[..., tuple[Any, Array, Any]] | None:
    """``fc``'s compact forward pass where it applies (on a CPU, without masked, reset or
    cut steps, with one row per step and a hidden size of at most its
    ``compact_max_hidden``), else ``None``."""
    if (fc.compact_forward is None or any(m is not None for m in masks)
            or not _project_per_step()):
        return None
    h = fc.hidden(carry0)
    hidden = h.shape[-1]
    one_small_row = (h.shape[:-1] == xs.shape[1:-1] and h.size == hidden
                     and hidden <= fc.compact_max_hidden)
    return fc.compact_forward if one_small_row else None


def _lstm_compact_forward(reverse: bool, unroll: int | bool, w_in: Array, b_in: Array | None,
                          w: Array, b: None, xs: Array, carry0: LSTMState,
                          ) -> tuple[LSTMState, Array, CompactTape]:
    """The compact LSTM path's forward pass: ``(final, pre, tape)``. (``b`` is ``None``:
    the LSTM's recurrent bias is part of ``b_in``.)"""
    stacked = jnp.concatenate([w_in, w], axis=0)
    lane = jnp.arange(4)[:, None]  # the gates i, f, g, o of a (..., 4, H) view

    def body(carry: LSTMState, x: Array) -> tuple[LSTMState, tuple[Array, Array]]:
        a = _project(jnp.concatenate([x, carry.h], axis=-1), stacked, b_in)
        i, f, tg, o = _lstm_gates(a)
        c = f * carry.c + i * tg
        # One array of the sigmoids and g, by a select rather than a concatenate (an XLA
        # operation of its own): the backward pass then evaluates only tanh(g) again.
        a4 = a.reshape(a.shape[:-1] + (4, w.shape[0]))
        gates = jnp.where(lane == 2, a4, jax.nn.sigmoid(a4)).reshape(a.shape)
        return LSTMState(o * jnp.tanh(c), c), (gates, c)

    final, (gates, c) = jax.lax.scan(body, carry0, xs, reverse=reverse, unroll=unroll)
    state = jnp.split(gates, 4, axis=-1)[3] * jnp.tanh(c)
    return final, jnp.split(gates, 4, axis=-1)[2], CompactTape(carry0, gates, c, state)


def _lstm_compact_backward(reverse: bool, unroll: int | bool, w: Array, tape: CompactTape,
                           d_final: LSTMState, d_pre: Array | None,
                           d_state: Array | None) -> tuple[Array, LSTMState, Array]:
    """``(d_a, d_carry0, h_in)``: the pre-activations' gradients of every step, the
    initial carry's gradient and each step's input state.

    Per step, with ``tc = tanh(c)``: ``d h = d h' + d state``, ``d c = d c' + d h o
    (1 - tc^2)``, ``d a = [d c tg i (1-i), d c c_in f (1-f), d c i (1-tg^2) + d pre,
    d h tc o (1-o)]``, and the carry's gradients ``(d a @ w.T, d c f)``. The coefficients
    of ``d h`` and ``d c`` in these are computed before the loop, for all steps at once.
    """
    hidden, carry0 = tape.c.shape[-1], tape.carry0
    # Zero cotangents (None) as zeros: one short row of steps, packed with the rest.
    d_state, d_pre = _kernels.zeros_for_none(tape.c, d_state, d_pre)
    i, f, g, o = jnp.split(tape.gates, 4, axis=-1)
    tg = jnp.tanh(g)
    c_in = _previous(tape.c, carry0.c, None, reverse)
    tc = jnp.tanh(tape.c)
    packed = jnp.concatenate([d_state, o * ((1.0 - tc) * (1.0 + tc)), f, d_pre,
                              tg * i * (1.0 - i), c_in * f * (1.0 - f),
                              i * ((1.0 - tg) * (1.0 + tg)), tc * o * (1.0 - o)],
                             axis=-1)
    # [d c, d c, d c, d h] * coefficients, built by broadcasting over the four gates rather
    # than by concatenating: XLA's CPU backend runs a concatenate as an operation of its own.
    lane = jnp.arange(4)[:, None]  # selects, not 0/1 factors: 0 * inf would be nan
    w_t = w.T

    def body(d_carry: LSTMState, row: Array) -> tuple[LSTMState, Array]:
        d_s, slope, f_t, d_p = (row[..., k * hidden:(k + 1) * hidden] for k in range(4))
        coef = row[..., 4 * hidden:].reshape(row.shape[:-1] + (4, hidden))
        d_h = d_carry.h + d_s
        d_c = d_carry.c + d_h * slope
        d_a = jnp.where(lane == 3, d_h[..., None, :], d_c[..., None, :]) * coef
        d_a = jnp.where(lane == 2, d_a + d_p[..., None, :], d_a)
        d_a = d_a.reshape(d_a.shape[:-2] + (4 * hidden,))
        return LSTMState(d_a @ w_t, d_c * f_t), d_a

    d_carry0, d_a = jax.lax.scan(body, d_final, packed, reverse=not reverse, unroll=unroll)
    return d_a, d_carry0, _previous(tape.state, carry0.h, None, reverse)


def _lstm_loops_forward(residuals: bool, reverse: bool, w_in: Array, b_in: Array | None,
                        w: Array, b: None, xs: Array, carry0: LSTMState,
                        ) -> tuple[LSTMState, Tape]:
    """The LSTM's forward loop as one kernel: ``(final, tape)``, the tape's gates the
    kernel's (``_kernels.LstmTape``)."""
    h, g, *kept, c = _kernels.lstm_forward(residuals, reverse, xs, w_in, b_in, w, carry0.h,
                                           carry0.c)
    final = LSTMState(h[0 if reverse else -1], c)
    return final, Tape(None, g, h, (g, *kept) if residuals else None)


def _lstm_loops_backward(reverse: bool, w: Array, tape: Tape, d_carry: LSTMState,
                         d_pre: Array | None, d_state: Array | None) -> tuple[LSTMState, Array]:
    d_a, d_h0, d_c0 = _kernels.lstm_backward(reverse, *tape.gates, d_state, d_pre, w.T,
                                             d_carry.h, d_carry.c)
    return LSTMState(d_h0, d_c0), d_a


_LSTM_KERNEL_MAX_HIDDEN = 128
"""The widest LSTM whose differentiated calls run the C++ kernels. Measured on 2 cores
against XLA's loops, in one process (docs/performance.md, "The LSTM's loops as C++
kernels"): forward+backward faster at 32, 64 and 128 hidden units (1.18-1.79x), slower
at 512 (1081 against 789 ms at T=200, B=64, medians, with a wide spread: 657-1411 ms, in
a build that still asked for huge pages; 1614 against 812 ms in two bench runs; the
backward kernel's product is the slow part); 256 was not measured. Wider LSTMs run
XLA's loops there (whose per-step products XLA shares between cores). The forward
kernel alone was as fast or faster at 512 (221 against 268 ms, 251 against 261 ms), so a
call that is not differentiated runs it at any size."""


_LSTM = FusedCell(
    input_bias=lambda p: _sum_biases(p.b_cell_input, p.b_cell_state),
    recurrent_bias=lambda p: None,
    pointwise=_lstm_pointwise,
    hidden=lambda c: c.h,
    prepare=_lstm_prepare,
    step_back=_lstm_step_back,
    gate_grads=_same,
    additive=True,
    compact_forward=_lstm_compact_forward,
    compact_max_hidden=64,
    kernel=Loops(_lstm_loops_forward, _lstm_loops_backward, gpu=False, gh_first=False,
                 max_hidden=_LSTM_KERNEL_MAX_HIDDEN),
)


def _gru_compact_forward(reverse: bool, unroll: int | bool, w_in: Array, b_in: Array | None,
                         w: Array, b: Array | None, xs: Array, carry0: Array,
                         ) -> tuple[Array, Array, Tape]:
    """The compact GRU path's forward pass: ``(final, pre, tape)``, the tape for the
    general backward.

    One product per step, ``[x, h] @ [[w_in, 0], [w_rz, 0, w_n]]``, gives ``[x_r + h_r,
    x_z + h_z, x_n, h_n]``; the loop keeps ``[s(.), s(.), x_n, h_n]`` of it and the
    outputs (7 operations; the general forward loop has 15), and the gates the backward
    pass reads are rebuilt after the loop for all steps at once.
    """
    hidden = w.shape[0]
    dtype = jnp.result_type(w_in, w)
    block = jnp.concatenate([
        jnp.concatenate([w_in, jnp.zeros((w_in.shape[0], hidden), w_in.dtype)], axis=1),
        jnp.concatenate([w[:, :2 * hidden], jnp.zeros((hidden, hidden), w.dtype),
                         w[:, 2 * hidden:]], axis=1),
    ], axis=0).astype(dtype)
    zeros = jnp.zeros((hidden,), dtype)
    bias = _sum_biases(
        None if b_in is None else jnp.concatenate([b_in, zeros]),
        None if b is None else jnp.concatenate([b[:2 * hidden], zeros, b[2 * hidden:]]))
    lane = jnp.arange(4)[:, None]  # r, z, x_n, h_n of a (..., 4, H) view

    def body(h: Array, x: Array) -> tuple[Array, tuple[Array, Array]]:
        a = _project(jnp.concatenate([x, h], axis=-1), block, bias)
        a4 = a.reshape(a.shape[:-1] + (4, hidden))
        r, z = jax.nn.sigmoid(a4[..., 0, :]), jax.nn.sigmoid(a4[..., 1, :])
        n = jnp.tanh(a4[..., 2, :] + r * a4[..., 3, :])
        new = (1.0 - z) * n + z * h
        # The sigmoids again rather than r, z taken from `kept`: XLA fuses them into the
        # store, and reusing them added an operation to the loop (8) for no gain.
        kept = jnp.where(lane < 2, jax.nn.sigmoid(a4), a4).reshape(a.shape)
        return new, (kept, new)

    final, (kept, state) = jax.lax.scan(body, carry0, xs, reverse=reverse, unroll=unroll)
    r, z, x_n, h_n = jnp.split(kept, 4, axis=-1)
    pre = x_n + r * h_n
    tape = Tape(_previous(state, carry0, None, reverse), pre, state, (r, z, jnp.tanh(pre), h_n))
    return final, pre, tape


def _gru_loops_forward(residuals: bool, reverse: bool, w_in: Array, b_in: Array | None,
                       w: Array, b: Array | None, xs: Array, carry0: Array,
                       ) -> tuple[Array, Tape]:
    """The GRU's forward loop as one kernel: ``(final, tape)``, the tape's gates the
    kernel's (``_kernels.GruTape``), as XLA's loop keeps them."""
    h, pre, *gates = _kernels.gru_forward(residuals, reverse, xs, w_in, b_in, w, b, carry0)
    return h[0 if reverse else -1], Tape(None, pre, h, tuple(gates) if residuals else None)


def _gru_loops_backward(reverse: bool, w: Array, tape: Tape, d_carry: Array,
                        d_pre: Array | None, d_state: Array | None) -> tuple[Array, Array]:
    d_gx, d_h0 = _kernels.gru_backward(reverse, tape.h_in, *tape.gates, d_state, d_pre, w.T,
                                       d_carry)
    return d_h0, d_gx


_GRU = FusedCell(
    input_bias=lambda p: p.b_cell_input,
    recurrent_bias=lambda p: p.b_cell_state,
    pointwise=gru_pointwise,
    hidden=_ident,
    prepare=_gru_prepare,
    step_back=_gru_step_back,
    gate_grads=_gru_gate_grads,
    compact_forward=_gru_compact_forward,
    compact_max_hidden=32,
    # At any hidden size: unlike the LSTM's, the GRU's kernels were faster than XLA's loops
    # at 512 units too (forward+backward 609 against 662 ms and 611 against 670 ms at
    # T=200, B=64, I=256, in two runs of benchmarks/kernels.py; docs/performance.md).
    kernel=Loops(_gru_loops_forward, _gru_loops_backward, gpu=False, gh_first=False),
)

_GATED = {
    gru_step: (GRUParams, _GRU),
    lstm_step: (LSTMParams, _LSTM),
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
             cut: Array | None = None) -> tuple[Any, Tape]:
    """The forward loop: ``(final, tape)``. With ``residuals`` the tape also holds the
    gates for the backward pass, and each step's input state where steps are masked (else
    the backward pass rebuilds it); a forward-only call skips them (``None`` in the tape).
    At a ``cut`` the carry's gradient is stopped, as in plain autodiff, so that higher
    derivatives through the tape stop there too.

    With ``projection=(w_in, b_in)``, ``gx`` holds the raw inputs and each step projects
    its own: a forward-only call then never materialises ``(T, *batch, G*H)`` projected
    inputs, which on CPUs costs more memory traffic than it saves. On CPUs an additive
    cell (:class:`FusedCell`) then does one matrix product per step instead of two; at
    small sizes XLA's CPU loop pays per operation, and this halved the LSTM's forward
    time at T=1000, B=1, H=32.
    """
    stacked = None
    if projection is not None and fc.additive and b is None and _project_per_step():
        stacked = (jnp.concatenate([projection[0], w], axis=0), projection[1])

    def body(carry: Any, inputs: Any) -> tuple[Any, Any]:
        gx_t, valid_t, reset_t, cut_t = inputs
        c_in = carry if reset_t is None else _select(reset_t, carry0, carry)
        if cut_t is not None:  # as in plain autodiff: higher derivatives stop there too
            c_in = _select(cut_t, jax.lax.stop_gradient(c_in), c_in)
        h = fc.hidden(c_in)
        if stacked is not None and gx_t.shape[:-1] == h.shape[:-1]:
            gx_t = _project(jnp.concatenate([gx_t, h], axis=-1), *stacked)
            gh = jnp.zeros((), gx_t.dtype)
        else:
            if projection is not None:
                gx_t = _project(gx_t, *projection)
            gh = h @ w
            if b is not None:
                gh = gh + b
        new, pre, gates = fc.pointwise(gx_t, gh, c_in)
        state = fc.hidden(new)
        if valid_t is not None:
            new = _select(valid_t, new, c_in)
            pre, state = _zero_where_invalid(valid_t, (pre, state))
        if not residuals:
            return new, Tape(None, pre, state, None)
        # Each step's input state is the previous step's output, except after masked steps.
        return new, Tape(None if valid is None else h, pre, state, gates)

    # Without masked steps each step's input state is the previous step's output: the
    # backward pass rebuilds it (``_previous``), chunk by chunk where it runs in chunks.
    return jax.lax.scan(body, carry0, (gx, valid, resets, cut), reverse=reverse,
                        unroll=unroll)


def _previous(state: Array, h0: Array, resets: Array | None, reverse: bool,
              edge: Array | None = None, cut: Array | None = None) -> Array:
    """Each step's input state from the stacked outputs of an unmasked loop: ``h0`` after
    a reset, and ``edge`` (default ``h0``) before the first step in time order (the last
    for ``reverse``); with its gradient stopped at a ``cut``, as in the forward loop."""
    edge = jnp.broadcast_to(h0 if edge is None else edge, state.shape[1:])[None]
    h_in = (jnp.concatenate([state[1:], edge]) if reverse
            else jnp.concatenate([edge, state[:-1]]))
    if resets is not None:
        h_in = jnp.where(_bcast(resets, h_in), h0, h_in)
    return h_in if cut is None else _select(cut, jax.lax.stop_gradient(h_in), h_in)


@functools.partial(jax.custom_vjp, nondiff_argnums=(0, 1, 2, 3))
def fused_recurrence(fc: FusedCell, reverse: bool, unroll: int | bool, compact: bool,
                     w_in: Array, b_in: Array | None, w: Array, b: Array | None, xs: Array,
                     carry0: Any, valid: Array | None, resets: Array | None,
                     cut: Array | None) -> tuple[Any, Array, Array]:
    """Runs the cell over ``xs``: ``(final, pre_activations, states)``.

    ``compact`` lets the differentiated call take a compact path where ``_compact``
    allows it. ``w_in, b_in`` project the inputs, ``w, b`` the state. ``valid`` masks
    steps past each sequence's end, ``resets`` restarts carries from ``carry0`` and
    ``cut`` stops gradients through the carry (truncated BPTT); each is ``(T, *batch)``
    or ``None``.
    Evaluated without differentiation it is a plain loop; differentiated, the forward
    pass hoists the input projection and the backward pass is fused (module docstring).
    """
    kernel = _kernel(fc, xs, carry0, w, (valid, resets, cut), (w_in, b_in, b),
                     differentiated=False, one_sequence=compact)
    if kernel is not None:
        final, tape = kernel.forward(False, reverse, w_in, b_in, w, b, xs, carry0)
    else:
        final, tape = _forward(fc, reverse, unroll, w, b, xs, carry0, valid, resets,
                               residuals=False, projection=(w_in, b_in))
    assert tape.pre is not None  # only the residuals of a kernel's tape leave them out
    return final, tape.pre, tape.state


_XLA_NATIVE_LOOP_BYTES = 1024
"""A sequence of one batch row whose weights (``w_in`` and ``w``) take at most this many
bytes runs XLA's loop on CPUs, not a C++ kernel: XLA compiles such a loop into one native
kernel itself (its small-while-loop pass, ``xla_cpu_small_while_loop_byte_threshold``,
1 kB by default; the compiled loop is then a call marked ``xla_cpu_small_call``), and the
custom call costs more than it saves. Measured forward-only on 2 cores (docs/performance.md,
"The bars from issue #4"): at B=1, H=2 XLA's loop took 4-17% less time than the kernels
for T=5 to 80 (Elman ReLU and LSTM), at B=1, H=8 the ReLU cell's was level (288 bytes of
weights, compiled natively) and the LSTM's 1.5x slower (1152 bytes, not); with 8 rows
XLA compiled none of these loops natively and the kernels were 1.1-3.2x faster; at the
notebook's size forward+backward was no slower either (bench runs). The tests check XLA's
decision at the sizes on both sides. Under a :func:`jax.vmap` around ``unroll`` the loop
has a row per element, and the kernels run."""


def _xla_loop_is_native(xs: Array, w: Array, w_in: Array) -> bool:
    """Whether XLA's CPU compiler runs this sequence's loop as one native kernel (see
    ``_XLA_NATIVE_LOOP_BYTES``)."""
    rows = math.prod(xs.shape[1:-1])
    return rows == 1 and (w.size + w_in.size) * w.dtype.itemsize <= _XLA_NATIVE_LOOP_BYTES


def _kernel(fc: FusedCell, xs: Array, carry0: Any, w: Array, masks: tuple[Any, ...],
            others: tuple[Array | None, ...] = (), differentiated: bool = True,
            one_sequence: bool = True) -> Loops | None:
    """``fc.kernel`` (:mod:`jax_rnn._kernels`) where ``fc``'s loops run as one kernel
    each: an Elman cell with tanh or relu (CPUs and NVIDIA GPUs), a GRU, or an LSTM of at
    most ``Loops.max_hidden`` hidden units (CPUs), float32, one batch axis or none, a
    shape that ``_kernels.fits`` (on GPUs at most ``_kernels.MAX_HIDDEN`` hidden units),
    at least one step and one batch row, no masked, reset or cut steps, and on CPUs not
    a loop that XLA compiles natively (``_XLA_NATIVE_LOOP_BYTES``; ``one_sequence=False``:
    the call is batched by a :func:`jax.vmap` around it, so XLA's loop is not one row's);
    else ``None``. ``others`` (the input weights first, then the biases) must be float32
    too. A call that is not
    ``differentiated`` takes the forward kernel at any hidden size (``Loops.max_hidden``)."""
    if (fc.kernel is None or any(m is not None for m in masks) or xs.ndim not in (2, 3)
            or xs.shape[0] == 0 or math.prod(xs.shape[1:-1]) == 0):
        return None
    where = _kernels.mode()
    if where == "off" or (not fc.kernel.gpu and where != "cpu"):
        return None
    w_in = others[0] if others else None
    if (where == "cpu" and one_sequence and w_in is not None
            and _xla_loop_is_native(xs, w, w_in)):
        return None
    carry = jax.tree.leaves(carry0)
    batch = xs.shape[1:-1]  # () or (B,)
    hidden = fc.hidden(carry0).shape[-1]
    too_wide = (differentiated and fc.kernel.max_hidden is not None
                and hidden > fc.kernel.max_hidden)
    if hidden == 0 or too_wide:
        return None
    arrays = (xs, *carry, w, *(a for a in others if a is not None))
    ok = (all(c.shape == batch + (hidden,) for c in carry)
          and all(a.dtype == jnp.float32 for a in arrays)
          and _kernels.fits(xs.shape[0], math.prod(batch), hidden))
    return fc.kernel if ok else None


def _project_per_step() -> bool:
    """Whether the differentiated forward loop projects each step's inputs itself.

    Yes on CPUs, where the hoisted product's ``(T, *batch, G*H)`` result costs more memory
    traffic than one product saves (the backward pass does not keep it); no on
    accelerators, where the per-step product is one more kernel launch per step.
    """
    return jax.default_backend() == "cpu"


def _fused_fwd(fc, reverse, unroll, compact, *args):  # noqa: ANN001
    # symbolic_zeros (defvjp below): each array comes with whether it is perturbed.
    w_in, b_in, w, b, xs, carry0, valid, resets, cut = (
        jax.custom_derivatives.custom_vjp_primal_tree_values(args))
    # Whether the gradient of the inputs is wanted, as a residual: the length of an empty
    # or one-element array, 1 where it is not. Not as the residuals' tree structure (None
    # against ()): JAX caches this rule's trace per pattern of perturbed arguments but
    # unflattens a cached trace's residuals with the latest trace's structure, so a call
    # that wanted the inputs' gradient after one that did not got zeros for it (silently;
    # jax 0.10.2, cf. jax-ml/jax#16614). A leaf's shape travels with the cached trace.
    xs_fixed = jnp.zeros((0 if args[4].perturbed else 1,), jnp.bool_)
    kernel = _kernel(fc, xs, carry0, w, (valid, resets, cut), (w_in, b_in, b),
                     one_sequence=compact)
    compact_forward = (_compact(fc, xs, carry0, (valid, resets, cut))
                       if compact and kernel is None else None)
    if compact_forward is not None:
        final, pre, tape = compact_forward(reverse, unroll, w_in, b_in, w, b, xs, carry0)
        res = (w_in, b_in, w, b, xs, valid, resets, cut, tape, fc.hidden(carry0), None)
        return (final, pre, tape.state), res
    if kernel is not None:
        final, tape = kernel.forward(True, reverse, w_in, b_in, w, b, xs, carry0)
        # The kernels' backward loops do not read the pre-activations: leaving them out
        # of the residuals keeps them out of the chunks' size (and, for an Elman cell whose
        # pre-activations are unused, out of the computation).
        res = (w_in, b_in, w, b, xs, valid, resets, cut, tape._replace(pre=None),
               fc.hidden(carry0), xs_fixed)
        return (final, tape.pre, tape.state), res
    if _project_per_step():
        final, tape = _forward(fc, reverse, unroll, w, b, xs, carry0, valid, resets,
                               projection=(w_in, b_in), cut=cut)
    else:
        final, tape = _forward(fc, reverse, unroll, w, b, _project(xs, w_in, b_in), carry0,
                               valid, resets, cut=cut)
    res = (w_in, b_in, w, b, xs, valid, resets, cut, tape, fc.hidden(carry0), None)
    return (final, tape.pre, tape.state), res


def _carry_masks(resets: Array | None, cut: Array | None) -> tuple[Array | None, Array | None]:
    """``(keep, to_carry0)``: where a step's input-carry gradient flows on to the previous
    step, and where it flows to ``carry0`` instead (a reset not cut off); ``None`` for
    everywhere and nowhere. ``cut`` may be ``(T,)`` where ``resets`` is ``(T, *batch)``."""
    if resets is None:
        return (None if cut is None else ~cut), None
    if cut is None:
        return ~resets, resets
    cut = _bcast(cut, resets)
    return ~(cut | resets), resets & ~cut


def _nonzero(cotangent: Any) -> Array | None:
    """An output's cotangent, ``None`` where JAX knows it is zero (a symbolic zero: the
    loss does not read that output, as the public pre-activations in most losses)."""
    return None if isinstance(cotangent, jax.custom_derivatives.SymbolicZero) else cotangent


def _instantiated(cotangent: Any) -> Array:
    """An output's cotangent as an array (of zeros for a symbolic zero)."""
    if isinstance(cotangent, jax.custom_derivatives.SymbolicZero):
        aval = cotangent.aval
        return jnp.zeros(aval.shape, aval.dtype)  # type: ignore[attr-defined]
    return cotangent


def _fused_bwd(fc, reverse, unroll, compact, res, cotangents):  # noqa: ANN001
    w_in, b_in, w, b, xs, valid, resets, cut, tape, h0, xs_fixed = res
    d_final, d_pre, d_state = cotangents
    # Zero cotangents of the (T, *batch, H) outputs stay None, never arrays of zeros: the
    # loops add nothing for them. The final carry's (small) are made arrays.
    d_pre, d_state = _nonzero(d_pre), _nonzero(d_state)
    d_final = jax.tree.map(_instantiated, d_final)
    params = (w_in, b_in, w, b)
    if (xs_fixed is not None and xs_fixed.shape[-1] == 1 and fc.kernel is not None
            and fc.kernel.grads is not None
            and _kernels.mode() == "cpu" and _native.FUSED_GRADS):
        # The forward loop ran as a kernel (xs_fixed is set only then) and the inputs'
        # gradient is not wanted: one kernel for the loop and the weight gradients (under
        # vmap, the general path below, vmapped: _unfused_grads).
        unfused = functools.partial(_unfused_grads, fc, reverse, unroll)
        d_carry0, (d_w_in, d_b_in, d_w) = fc.kernel.grads(reverse, w, tape, h0, xs, d_final,
                                                           d_pre, d_state, unfused)
        d_params = (d_w_in, None if b_in is None else d_b_in, d_w, None)
        return *_cast(d_params, params), None, d_carry0, None, None, None
    if isinstance(tape, CompactTape):
        d_out, d_carry0, h_in = _lstm_compact_backward(reverse, unroll, w, tape, d_final,
                                                       d_pre, d_state)
        d_params, d_xs = _param_grads(fc, params, xs, tape, h_in, d_out)
        return *_cast(d_params, params), d_xs.astype(xs.dtype), d_carry0, None, None, None
    d_params, d_xs, d_carry0 = _loops_bwd(fc, reverse, unroll, params, xs, valid, resets, cut,
                                          tape, h0, d_final, d_pre, d_state)
    return *_cast(d_params, params), d_xs.astype(xs.dtype), d_carry0, None, None, None


def _loops_bwd(fc, reverse, unroll, params, xs, valid, resets, cut, tape, h0, d_final,  # noqa: ANN001
               d_pre, d_state):  # noqa: ANN001
    """``(d_params, d_xs, d_carry0)`` by the backward loop (XLA's or a kernel) and XLA's
    contractions, in chunks of steps where ``_chunk_length`` says so."""
    w_in, _, w, _ = params
    steps = (tape, d_pre, d_state, valid, resets, cut, xs)
    chunk = _chunk_length(tape, xs.shape[0], w_in.shape[0] + w.shape[0])
    d_carry0 = None if resets is None else _zeros_like(d_final)

    def back(carry: Any, steps_c: Any, edge: Array) -> tuple[Any, Any]:
        """The backward pass over consecutive steps, whose first input state in time order
        (last for ``reverse``) is ``edge``: the loop, then the contractions."""
        tape_c, d_pre_c, d_state_c, valid_c, resets_c, cut_c, xs_c = steps_c
        keep_c, to_carry0_c = _carry_masks(resets_c, cut_c)
        if tape_c.h_in is None:
            tape_c = tape_c._replace(h_in=_previous(tape_c.state, h0, resets_c, reverse, edge,
                                                    cut_c))
        # The forward loop ran as a kernel exactly where it left ``pre`` out of the tape.
        kernel = fc.kernel if tape_c.pre is None else None
        carry, d_out = _fused_loop_back(fc, kernel, reverse, unroll, w, valid_c, keep_c,
                                        to_carry0_c, tape_c, carry, d_pre_c, d_state_c)
        return carry, _param_grads(fc, params, xs_c, tape_c, tape_c.h_in, d_out,
                                   gh_first=kernel is not None and kernel.gh_first)

    if chunk is None:
        (d_c, d_carry0), (d_params, d_xs) = back((d_final, d_carry0), steps, h0)
    else:
        (d_c, d_carry0), d_params, d_xs = _by_chunks(back, (d_final, d_carry0), steps, chunk,
                                                     reverse, tape.state, h0)
    d_carry0 = d_c if d_carry0 is None else jax.tree.map(jnp.add, d_carry0, d_c)
    return d_params, d_xs, d_carry0


def _unfused_grads(fc: FusedCell, reverse: bool, unroll: int | bool, h: Array, d_state: Array,
                   d_pre: Array, w_t: Array, d_final: Array, xs: Array, h0: Array,
                   ) -> tuple[Array, Array, Array, Array]:
    """What ``fc.kernel.grads`` computes, ``(d_w_in, d_b, d_w, d_h0)`` from the states
    ``h`` (an unmasked kernel loop's), by the general path (``_loops_bwd``: the backward
    kernel and XLA's contractions, in chunks): the grads kernel's stand-in under
    :func:`jax.vmap`, where each element has weight gradients of its own. A zero
    cotangent comes as an array of no steps."""
    w = w_t.T
    hidden = w.shape[-1:]
    params = (jnp.zeros(xs.shape[-1:] + hidden, w.dtype), jnp.zeros(hidden, w.dtype), w, None)
    steps = [None if len(a) != len(h) or len(h) == 0 else a for a in (d_pre, d_state)]
    (d_w_in, d_b, d_w, _), _, d_h0 = _loops_bwd(fc, reverse, unroll, params, xs, None, None,
                                                None, Tape(None, None, h, ()), h0, d_final,
                                                *steps)
    return d_w_in, d_b, d_w, d_h0


def _cast(grads: tuple[Any, ...], params: tuple[Any, ...]) -> tuple[Any, ...]:
    return tuple(None if g is None else g.astype(p.dtype)
                 for g, p in zip(grads, params, strict=True))


def _param_grads(fc: FusedCell, params: tuple[Any, ...], xs: Array, tape: Any, h_in: Array,
                 d_out: Any, gh_first: bool = False) -> tuple[tuple[Any, ...], Array]:
    """``((d w_in, d b_in, d w, d b), d xs)`` from the steps' backward-loop outputs ``d_out``
    and input states ``h_in``, each one contraction over time and batch (in the
    contractions' dtype). ``gh_first``: ``d_out`` comes from an Elman cell's kernel
    (:mod:`_kernels`; on CPUs laid out ``(H, T, B)``), and the weight gradients are
    computed transposed, ``d_gh^T @ h_in``: both operands are then in the layout XLA's CPU
    products take without copies (``h_in^T @ d_gh`` copied both). XLA's own loops and the
    LSTM's kernel write ``d_gh`` by steps, and ``h_in^T @ d_gh`` copies only the narrower
    ``h_in``."""
    w_in, b_in, _, b = params
    d_gx, d_gh = fc.gate_grads(d_out, tape)
    # tensordot keeps the batch axis intact (no reshape merging it with time), so a batch
    # sharded across devices stays sharded and XLA reduces with an all-reduce (one per
    # chunk on CPUs) instead of gathering every state.
    lead = tuple(range(d_gh.ndim - 1))

    def contract(a: Array, d: Array) -> Array:
        if gh_first:
            return jnp.tensordot(d, a, axes=(lead, lead)).T
        return jnp.tensordot(a, d, axes=(lead, lead))

    d_w = contract(h_in, d_gh)
    d_b = None if b is None else d_gh.sum(axis=lead)
    d_w_in = contract(xs, d_gx)
    d_b_in = None if b_in is None else d_gx.sum(axis=lead)
    return (d_w_in, d_b_in, d_w, d_b), d_gx @ w_in.T


_CHUNK_BYTES = 1 << 22
"""On CPUs the backward pass runs over chunks of consecutive steps whose tape takes about
this much memory (4 MiB): each chunk's gate gradients then stay in the cache for its
contractions instead of going to a ``(T, *batch, G*H)`` array in fresh memory and back.
At T=1000, B=32, I=64, H=128 and T=10000, B=8, I=32, H=64 this made forward+backward
10-24% faster; 1 and 2 MiB were slower for the LSTM, 8 MiB no better
(docs/performance.md)."""

_CHUNK_MAX_DEPTH = 512
"""The backward pass runs in chunks only where the input plus hidden size is at most
this: at T=200, B=64, I=256, H=512 the contractions are bound by arithmetic, not by
memory, and chunks of any length measured no faster (the LSTM's slower)."""


_CHUNK_MIN_STEPS = 16
"""Fewer steps per chunk (a step's tape over 256 KiB: very large batches) keep one pass:
there each step's contractions are large products already, and chunks that short were
not measured."""


def _chunk_length(tape: Tape, length: int, depth: int) -> int | None:
    """Steps per chunk of the backward pass, or ``None`` for one pass over all steps (on
    accelerators, for deep products, and where all steps fit in one chunk)."""
    if not _project_per_step() or depth > _CHUNK_MAX_DEPTH:
        return None
    step_bytes = sum(math.prod(a.shape[1:]) * a.dtype.itemsize for a in jax.tree.leaves(tape))
    chunk = max(1, _CHUNK_BYTES // max(step_bytes, 1))
    if 2 * chunk > length or chunk < _CHUNK_MIN_STEPS:
        return None
    # A divisor of the length near the target needs no separate remainder.
    divisor = next((k for k in range(chunk, chunk // 2, -1) if length % k == 0), None)
    return chunk if divisor is None else divisor


def _by_chunks(back: Callable[[Any, Any, Array], tuple[Any, Any]], carry: Any, steps: Any,
               chunk: int, reverse: bool, state: Array, h0: Array) -> tuple[Any, Any, Array]:
    """``back`` over chunks of ``chunk`` consecutive steps in the backward pass's order:
    ``(carry, summed parameter gradients, d xs)``. The first ``length % chunk`` steps in
    time order (the last for ``reverse``) form a shorter chunk of their own, run last.
    Each chunk's ``edge`` is the output of the step before it in time order (after it for
    ``reverse``; ``h0`` at the sequence's start)."""
    length = state.shape[0]
    count, rest = divmod(length, chunk)
    start = 0 if reverse else rest
    main = slice(start, start + count * chunk)
    tail = slice(count * chunk, None) if reverse else slice(0, rest)
    # The step before each chunk in time order (after it for reverse); -1 and length: h0.
    before = start + chunk * np.arange(count) + (chunk if reverse else -1)
    inside = (before >= 0) & (before < length)
    h0 = jnp.broadcast_to(h0, state.shape[1:])
    edges = jnp.where(_bcast(jnp.asarray(inside), state),
                      state[np.clip(before, 0, length - 1)], h0)

    def grouped(a: Array) -> Array:
        return a[main].reshape((count, chunk) + a.shape[1:])

    def body(loop: Any, xs_c: Any) -> tuple[Any, Array]:
        carry, total = loop
        carry, (d_params, d_xs) = back(carry, *xs_c)
        return (carry, jax.tree.map(jnp.add, total, d_params)), d_xs

    grads = jax.eval_shape(back, carry, jax.tree.map(lambda a: a[:chunk], steps), h0)[1][0]
    total = jax.tree.map(lambda g: jnp.zeros(g.shape, g.dtype), grads)
    (carry, total), d_xs = jax.lax.scan(body, (carry, total),
                                        (jax.tree.map(grouped, steps), edges),
                                        reverse=not reverse)
    d_xs = d_xs.reshape((count * chunk,) + d_xs.shape[2:])
    if rest:
        carry, (d_params, d_rest) = back(carry, jax.tree.map(lambda a: a[tail], steps), h0)
        total = jax.tree.map(jnp.add, total, d_params)
        d_xs = jnp.concatenate([d_xs, d_rest] if reverse else [d_rest, d_xs])
    return carry, total, d_xs


def _fused_loop_back(fc, kernel, reverse, unroll, w, valid, keep, to_carry0, tape, carry,  # noqa: ANN001
                     d_pre, d_state):  # noqa: ANN001
    """The backward loop over ``tape``'s steps from ``carry = (d_carry, d_carry0)`` (the
    latter ``None`` without resets): ``(carry, d_out)``; one kernel where ``kernel`` (from
    ``_kernel``) is not ``None``."""
    d_carry, d_carry0 = carry
    if kernel is not None:
        d_carry, d_out = kernel.backward(reverse, w, tape, d_carry, d_pre, d_state)
        return (d_carry, d_carry0), d_out
    inputs = fc.prepare(tape, d_pre, d_state)
    w_t = w.T  # transposed once: XLA CPU multiplies by a transposed operand more slowly

    def body(loop: Any, xs_t: Any) -> tuple[Any, Any]:
        d_carry, d_carry0 = loop
        inputs_t, valid_t, keep_t, to_carry0_t = xs_t
        d_out, d_c = fc.step_back(w_t, inputs_t, d_carry)
        if valid_t is not None:  # a masked step passes its carry's gradient through
            d_out = _zero_where_invalid(valid_t, d_out)
            d_c = _select(valid_t, d_c, d_carry)
        if to_carry0_t is not None:  # c_in = carry0 where reset
            d_carry0 = jax.tree.map(jnp.add, d_carry0, _zero_where_invalid(to_carry0_t, d_c))
        if keep_t is not None:  # no gradient past a reset or truncation boundary
            d_c = _zero_where_invalid(keep_t, d_c)
        return (d_c, d_carry0), d_out

    return jax.lax.scan(body, carry, (inputs, valid, keep, to_carry0), reverse=not reverse,
                        unroll=unroll)


fused_recurrence.defvjp(_fused_fwd, _fused_bwd, symbolic_zeros=True)


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
    one_sequence_ok: bool = True,
) -> tuple[Any, Any]:
    """``(final, StepOutput)`` of a built-in cell over ``xs``, by the fused path.

    ``one_sequence_ok=False`` (the call is batched by a :func:`jax.vmap` around it) rules
    out the compact paths, which are slower than the general one for many rows.
    """
    from ._types import StepOutput

    result: Any = fused_recurrence(
        fc, reverse, unroll, one_sequence_ok, params.w_cell_input, fc.input_bias(params),
        params.w_cell_state, fc.recurrent_bias(params), xs, carry0, valid, resets, cut,
    )
    final, pre, state = result
    output = readout(params, state)
    if valid is not None and params.b_output is not None:  # padded steps output zeros
        output = jnp.where(_bcast(valid, output), output, jnp.zeros((), output.dtype))
    return final, StepOutput(pre, state, output)
