"""One-kernel recurrences: the Elman cell's sequential loops as one kernel each, on NVIDIA
GPUs (Pallas kernels, here) and on CPUs (C++ kernels, :mod:`jax_rnn._native`), and the
LSTM's and GRU's on CPUs (C++ kernels: :func:`lstm_forward`, :func:`lstm_backward`,
:func:`gru_forward`, :func:`gru_backward`).

On a GPU, XLA runs a ``lax.scan`` as a while loop that launches a few kernels per step;
at the sizes RNNs are trained at, that launch latency (microseconds per step), not the
arithmetic, sets the time. cuDNN's RNN kernels avoid it by running the whole loop inside
one kernel. The kernels here do the same for the two sequential loops of the fused path
(:mod:`jax_rnn._fused`) of an Elman cell:

- ``forward``: ``pre_t = gx_t + h_{t-1} @ w``, ``h_t = act(pre_t)`` for every step, from
  the projected inputs ``gx`` (the input product for all steps, done before by XLA);
- ``backward``: ``d pre_t = act'(h_t) (d h_t + d state_t) + d pre_t`` and ``d h_{t-1} =
  d pre_t @ w.T`` in the backward order; the weight gradients are one contraction each
  afterwards, as in the fused path (on CPUs, where the inputs are not differentiated,
  ``backward_grads``: the loop and the weight gradients in one C++ kernel).

Each kernel instance (``pallas_call`` program, a thread block) runs the loop over time
for one batch row, which is independent of the others, holding ``w`` in registers: a
step is a vector-matrix product (a broadcast multiply and a sum, float32 throughout),
the activation, and the stores of that step's results. This is for small hidden sizes
(at most :data:`MAX_HIDDEN`), where XLA's loop is latency-bound; on an H200 it made the
Elman cell's forward+backward 4-8x faster than XLA's loop, and 0.90-1.57x as fast as
cuDNN's (docs/performance.md). The hidden size is padded with zeros to a power of two
(Triton's arrays): a padded unit stays 0 (``tanh(0) = relu(0) = 0``) and its rows of
``w`` are 0, so it never reaches a real unit.

On CPUs the same two loops run as C++ kernels (XLA FFI custom calls, compiled on first
use: :mod:`jax_rnn._native`), for any hidden size: XLA's CPU loop runs each step's small
product on one core and pays per operation of the loop body; the kernels share each
large enough step with a second thread and fuse the activation into the product (about
2x faster loops at T=1000, B=32, H=128 on 2 cores; docs/performance.md). The LSTM's
two loops run as C++ kernels too: the forward kernel computes all four gates of 16
hidden units in one panel of the product and the cell's pointwise part on its
registers, and keeps a tape (the sigmoid gates and each step's input cell state) for
the backward kernel. The GRU's forward kernel does the same with its three gates
(``gx_n`` and ``gh_n`` in accumulators of their own) and keeps the gates XLA's loops
keep.

The kernels are pure functions of arrays; :func:`forward`, :func:`backward`,
:func:`backward_grads` and the LSTM's and GRU's two wrap each in a :func:`jax.custom_jvp`
whose tangent is the same recurrence's written with ``lax.scan``, so that
reverse-over-reverse differentiation and ``jax.vmap`` go through them. With
``JAX_RNN_KERNELS=interpret`` (the tests, on a CPU) the Pallas kernels run in Pallas's
interpreter. The activation and its derivative are the fused path's own
(``_fused._BACK_FROM_OUTPUT``), passed in as a pair of functions.
"""

from __future__ import annotations

import functools
import os
from collections.abc import Callable
from typing import Any

import jax
import jax.numpy as jnp
from jax import Array

from . import _native
from ._gru import gru_pointwise


def _read_mode(environ: Any) -> str:
    """The setting of the environment variable ``JAX_RNN_KERNELS`` (default ``"auto"``);
    anything else than ``auto``, ``off`` or ``interpret`` is a clear error."""
    return _native.read_choice(environ, "JAX_RNN_KERNELS", ("auto", "off", "interpret"))


MODE = _read_mode(os.environ)
"""``"auto"`` (default): the kernels run where JAX's default backend is one NVIDIA GPU
(a computation placed on another device there runs a plain scan instead: each call
chooses by the platform it is compiled for) or a CPU with one device (where the C++
kernels compile: :mod:`jax_rnn._native`), not where the backend has several devices;
``"off"``: never (XLA's loops everywhere); ``"interpret"``:
the Pallas kernels everywhere, in Pallas's interpreter (for tests on a CPU). Read from
the environment variable ``JAX_RNN_KERNELS`` at import."""


def mode() -> str:
    """``"gpu"``, ``"cpu"``, ``"interpret"`` or ``"off"``: whether, and which, kernels run
    now."""
    if MODE != "auto":
        return MODE
    if jax.device_count() > 1:
        # jit's automatic partitioning cannot split a kernel call (it would gather a
        # sharded batch onto every device around it), and jax_rnn cannot tell at trace
        # time whether a call is partitioned: with several devices, XLA's loops.
        return "off"
    if jax.default_backend() == "cpu":
        return "cpu" if _native.available() else "off"
    if jax.default_backend() != "gpu" or not _triton_available():
        return "off"
    version = str(getattr(jax.devices()[0].client, "platform_version", "")).lower()
    return "gpu" if "cuda" in version else "off"


@functools.cache
def _triton_available() -> bool:
    """Whether this JAX has Pallas's Triton backend (deprecated in JAX 0.11: a JAX
    without it runs XLA's loops instead)."""
    try:
        from jax.experimental.pallas import triton  # noqa: F401
    except ImportError:
        return False
    return True


MAX_HIDDEN = 128
"""The widest hidden size the GPU kernels are used for (measured up to 128 on an H200;
the CPU kernels take any); wider ones stay with XLA's loop: a 256 x 256 float32 ``w``
alone would take 512 registers per thread of a 4-warp block (at most 255 exist), and no
other layout was measured."""

_MIN_HIDDEN = 16
"""The narrowest padded hidden size."""

_HOIST_MAX = 128
"""Padded hidden sizes up to this keep ``w`` in registers for the whole loop (wider ones
would read it from the caches at every step)."""

_NUM_WARPS = 4
"""Warps per kernel instance: 4 measured faster than 8 at 32 and 64 hidden units."""


def fits(length: int, batch: int, hidden: int) -> bool:
    """Whether a sequence of this shape is for the kernels: any on CPUs; on GPUs at most
    :data:`MAX_HIDDEN` hidden units, and arrays of fewer than 2^31 elements (Triton's
    offsets are 32-bit)."""
    if mode() == "cpu":
        return True
    return hidden <= MAX_HIDDEN and length * batch * _padded(hidden) < 2**31


def _padded(hidden: int) -> int:
    """The hidden size padded to a power of two (Triton's arrays), at least 16."""
    return max(_MIN_HIDDEN, 1 << max(hidden - 1, 0).bit_length())


ACTIVATIONS = (jnp.tanh, jax.nn.relu)
"""The Elman activations the kernels are used for (the measured and tested ones), in the
order of the C++ kernels' activation codes. The zero padding of hidden units relies on
``activation(0) = 0``."""

Kernel = tuple[Callable[[Array], Array], Callable[[Array, Array], Array]]
"""``(activation, back)``: one of :data:`ACTIVATIONS` and its derivative from its output,
``back(h, d_h) = act'(pre) d_h``."""


def _pad(a: Array, cols: int, rows: int | None = None) -> Array:
    """``a`` zero-padded to ``cols`` columns (and ``rows`` rows of a matrix)."""
    pad = [(0, 0)] * (a.ndim - 1) + [(0, cols - a.shape[-1])]
    if rows is not None:
        pad[-2] = (0, rows - a.shape[-2])
    return a if all(p == (0, 0) for p in pad) else jnp.pad(a, pad)


def _call(kernel: Callable[..., None], args: tuple[tuple[Array, str], ...],
          outs: tuple[tuple[tuple[int, ...], str], ...], dtype: jnp.dtype) -> tuple[Array, ...]:
    """Runs ``kernel`` once per batch row. Each argument and result comes with its kind:
    ``"steps"`` (``(T, B, Hp)``) and ``"rows"`` (``(B, Hp)``) are split by rows (the
    kernel sees ``(T, Hp)`` and ``(Hp,)``), ``"whole"`` (``(Hp, Hp)``) is read by every
    instance."""
    from jax.experimental import pallas as pl

    def spec(shape: tuple[int, ...], kind: str) -> object:
        if kind == "steps":
            return pl.BlockSpec((shape[0], None, shape[2]), lambda i: (0, i, 0))
        if kind == "rows":
            return pl.BlockSpec((None, shape[1]), lambda i: (i, 0))
        return pl.BlockSpec(shape, lambda i: (0, 0))

    interpret = MODE == "interpret"
    params = None
    if not interpret:
        from jax.experimental.pallas import triton as plt

        params = plt.CompilerParams(num_warps=_NUM_WARPS, num_stages=1)
    run = pl.pallas_call(
        kernel,
        out_shape=tuple(jax.ShapeDtypeStruct(s, dtype) for s, _ in outs),
        grid=(args[0][0].shape[1],),
        in_specs=[spec(a.shape, kind) for a, kind in args],
        out_specs=tuple(spec(s, kind) for s, kind in outs),
        compiler_params=params,
        interpret=interpret,
        name="jax_rnn_elman",
    )

    return _empty_safe(run)(*(a for a, _ in args))


def _empty_safe(run: Callable[..., Any]) -> Callable[..., tuple[Array, ...]]:
    """``run`` (a Pallas call) with its empty results, and no call, under a
    :func:`jax.vmap` over zero elements: Pallas adds a vmapped axis to its grid, and a
    grid of none fails (interpreted, its slices do). Each vmap of it is wrapped the same
    way, so a vmap of size zero around other vmaps is caught too."""

    @jax.custom_batching.custom_vmap
    def call(*arrays: Array) -> tuple[Array, ...]:
        return tuple(run(*arrays))

    @call.def_vmap
    def rule(size: int, batched: list[bool], *arrays: Array) -> tuple[Any, tuple[bool, ...]]:
        in_axes = tuple(0 if b else None for b in batched)
        if size == 0:
            element = [jax.ShapeDtypeStruct(a.shape[1:] if b else a.shape, a.dtype)
                       for a, b in zip(arrays, batched, strict=True)]
            empty = tuple(jnp.zeros((0, *r.shape), r.dtype)
                          for r in jax.eval_shape(run, *element))
            return empty, (True,) * len(empty)
        results = _empty_safe(jax.vmap(run, in_axes))(*arrays)
        return results, (True,) * len(results)

    return call


def _times(h: Array, w: Array) -> Array:
    """``h @ w`` for one row ``h`` (``(H,)``): a broadcast multiply and a sum, in the
    arrays' own precision (float32 products, unlike XLA's default TF32 on GPUs)."""
    return jnp.sum(h[:, None] * w, axis=0)


def _forward_kernel(activation: Callable[[Array], Array], reverse: bool, hoist: bool,
                    gx_ref: object, w_ref: object, h0_ref: object, pre_ref: object,
                    h_ref: object) -> None:
    length = gx_ref.shape[0]  # type: ignore[attr-defined]
    w_kept = w_ref[...] if hoist else None  # type: ignore[index]

    def body(k: Array, h: Array) -> Array:
        t = length - 1 - k if reverse else k
        w = w_ref[...] if w_kept is None else w_kept  # type: ignore[index]
        pre = gx_ref[t] + _times(h, w)  # type: ignore[index]
        h = activation(pre)
        pre_ref[t] = pre  # type: ignore[index]
        h_ref[t] = h  # type: ignore[index]
        return h

    jax.lax.fori_loop(0, length, body, h0_ref[...])  # type: ignore[index]


def _backward_kernel(back: Callable[[Array, Array], Array], reverse: bool, hoist: bool,
                     h_ref: object, d_state_ref: object, d_pre_ref: object, w_t_ref: object,
                     d_final_ref: object, d_g_ref: object, d_h0_ref: object) -> None:
    length = h_ref.shape[0]  # type: ignore[attr-defined]
    w_kept = w_t_ref[...] if hoist else None  # type: ignore[index]

    def body(k: Array, d_h: Array) -> Array:
        t = k if reverse else length - 1 - k
        d_g = back(h_ref[t], d_h + d_state_ref[t]) + d_pre_ref[t]  # type: ignore[index]
        d_g_ref[t] = d_g  # type: ignore[index]
        w_t = w_t_ref[...] if w_kept is None else w_kept  # type: ignore[index]
        return _times(d_g, w_t)

    d_h0_ref[...] = jax.lax.fori_loop(0, length, body, d_final_ref[...])  # type: ignore[index]


def plus(a: Array, b: Array | None) -> Array:
    """``a + b``, where ``b`` may be ``None``: a cotangent known to be zero (the public
    pre-activations or states of a loss that does not read them), added as nothing."""
    return a if b is None else a + b


def project(xs: Array, w_in: Array, b: Array | None) -> Array:
    """The input projection of every step, ``xs @ w_in + b`` (also the fused path's)."""
    gx = xs @ w_in
    return gx if b is None else gx + b


def _forward_scan(kernel: Kernel, reverse: bool, xs: Array, w_in: Array, b: Array | None,
                  w: Array, h0: Array) -> tuple[Array, Array]:
    """``forward`` written with ``lax.scan``: its tangents, and the reference."""
    def body(h: Array, gx_t: Array) -> tuple[Array, tuple[Array, Array]]:
        pre = gx_t + h @ w
        h = kernel[0](pre)
        return h, (pre, h)

    return jax.lax.scan(body, h0, project(xs, w_in, b), reverse=reverse)[1]


def _backward_scan(kernel: Kernel, reverse: bool, h: Array, d_state: Array | None,
                   d_pre: Array | None, w_t: Array, d_final: Array) -> tuple[Array, Array]:
    """``backward`` written with ``lax.scan``: its tangents, and the reference."""
    def body(d_h: Array, xs: tuple[Array, Any, Any]) -> tuple[Array, Array]:
        h_t, d_state_t, d_pre_t = xs
        d_g = plus(kernel[1](h_t, plus(d_h, d_state_t)), d_pre_t)
        return d_g @ w_t, d_g

    d_h0, d_g = jax.lax.scan(body, d_final, (h, d_state, d_pre), reverse=not reverse)
    return d_g, d_h0


def _dispatch(gpu: Callable[..., Any], cpu: Callable[..., Any], scan: Callable[..., Any],
              *args: Any) -> Any:
    """``gpu(*args)`` where the call is compiled for an NVIDIA GPU in a GPU process,
    ``cpu(*args)`` where it is compiled for a CPU in a CPU process, ``scan(*args)`` (the
    same recurrence with ``lax.scan``) for any other platform, e.g. a CPU device chosen
    with ``jax.default_device`` in a process whose default backend is a GPU; in the
    interpreter, the Pallas kernel everywhere. Each function takes one unbatched
    sequence (``(T, H)`` steps) or a batch (``(T, B, H)``)."""
    if MODE == "interpret":
        return gpu(*args)
    where = mode()
    branches = {"cuda": gpu} if where == "gpu" else {"cpu": cpu} if where == "cpu" else {}
    return jax.lax.platform_dependent(*args, **branches, default=scan)


def _as_batch(fn: Callable[..., tuple[Array, ...]], kinds: str,
              outs: str) -> Callable[..., tuple[Array, ...]]:
    """``fn`` of batched arrays made to take one unbatched sequence too, as a batch of one
    row. ``kinds``/``outs``: each argument's/result's kind, ``s`` for steps, ``t`` for
    steps transposed to ``(H, T, B)``, ``r`` for rows (one state), ``m`` for a matrix
    (unchanged). ``None`` (a zero cotangent) passes through as it is."""
    def call(*args: Array | None) -> tuple[Array, ...]:
        if args[0] is not None and args[0].ndim == 3:
            return fn(*args)
        inner = {"s": lambda a: a[:, None], "r": lambda a: a[None], "m": lambda a: a}
        outer = {"s": lambda a: a[:, 0], "r": lambda a: a[0], "t": lambda a: a[..., 0],
                 "m": lambda a: a}
        results = fn(*(None if a is None else inner[k](a)
                       for a, k in zip(args, kinds, strict=True)))
        return tuple(outer[k](a) for a, k in zip(results, outs, strict=True))

    return call


@functools.partial(jax.custom_jvp, nondiff_argnums=(0, 1))
def forward(kernel: Kernel, reverse: bool, xs: Array, w_in: Array, b: Array | None, w: Array,
            h0: Array) -> tuple[Array, Array]:
    """``(pre, h)`` of an Elman recurrence ``h_t = act(x_t @ w_in + b + h_{t-1} @ w)`` over
    the inputs ``xs`` (``(T, B, I)`` or ``(T, I)``) from ``h0`` (``(B, H)`` or ``(H,)``),
    the loop in one kernel. On GPUs the input projection runs before it, as one product;
    on CPUs inside it, step by step, and ``pre`` is recomputed from the states afterwards
    with one product (XLA drops it where it is unused)."""
    code = ACTIVATIONS.index(kernel[0])
    gpu = _as_batch(functools.partial(_forward_rows, kernel[0], reverse), "smmmr", "ss")
    return _dispatch(gpu, functools.partial(_forward_native, code, reverse),
                     functools.partial(_forward_scan, kernel, reverse), xs, w_in, b, w, h0)


def _forward_native(code: int, reverse: bool, xs: Array, w_in: Array, b: Array | None,
                    w: Array, h0: Array) -> tuple[Array, Array]:
    """The C++ kernel's states, and the pre-activations from them."""
    bias = jnp.zeros(w.shape[-1:], w.dtype) if b is None else b
    (h,) = _as_batch(_native.forward(code, reverse), *_native.FORWARD_KINDS)(xs, w_in, bias,
                                                                             w, h0)
    return _pre_from_states(reverse, xs, h, h0, w_in, w, b), h


def _pre_from_states(reverse: bool, xs: Array, h: Array, h0: Array, w_in: Array, w: Array,
                     b: Array | None) -> Array:
    """The pre-activations ``[x_t, h_{t-1}] @ [w_in; w] + b`` of every step, from the
    states a kernel wrote (one XLA product, which XLA drops where they are unused)."""
    return project(jnp.concatenate([xs, _inputs_states(h, h0, reverse)], axis=-1),
                   jnp.concatenate([w_in, w]), b)


def _inputs_states(h: Array, h0: Array, reverse: bool) -> Array:
    """Each step's input state: the states ``h`` shifted by one step, ``h0`` first in the
    loop's order."""
    if h.shape[0] == 0:
        return h
    edge = jnp.expand_dims(h0, 0)
    return jnp.concatenate([h[1:], edge] if reverse else [edge, h[:-1]])


def _forward_rows(activation: Callable[[Array], Array], reverse: bool, xs: Array,
                  w_in: Array, b: Array | None, w: Array, h0: Array) -> tuple[Array, Array]:
    gx = project(xs, w_in, b)
    length, batch, hidden = gx.shape
    cols = _padded(hidden)
    kernel = functools.partial(_forward_kernel, activation, reverse, cols <= _HOIST_MAX)
    args = ((_pad(gx, cols), "steps"), (_pad(w, cols, cols), "whole"),
            (_pad(h0, cols), "rows"))
    pre, h = _call(kernel, args, (((length, batch, cols), "steps"),) * 2, gx.dtype)
    return pre[:, :batch, :hidden], h[:, :batch, :hidden]


@functools.partial(jax.custom_jvp, nondiff_argnums=(0, 1))
def backward(kernel: Kernel, reverse: bool, h: Array, d_state: Array | None,
             d_pre: Array | None, w_t: Array, d_final: Array) -> tuple[Array, Array]:
    """``(d_pre_activations, d_h0)``: the backward loop of ``forward``'s recurrence given
    the states ``h``, the cotangents of the public states and pre-activations (``None``:
    zero), ``w.T`` and the cotangent of the final state, in one kernel (batched or not, as
    ``forward``)."""
    code = ACTIVATIONS.index(kernel[0])
    return _dispatch(
        _as_batch(functools.partial(_backward_rows, kernel[1], reverse), "sssmr", "sr"),
        functools.partial(_backward_native, code, reverse),
        functools.partial(_backward_scan, kernel, reverse), h, d_state, d_pre, w_t, d_final)


@functools.partial(jax.custom_jvp, nondiff_argnums=(0, 1, 2))
def backward_grads(kernel: Kernel, reverse: bool, unfused: Callable[..., tuple[Array, ...]],
                   h: Array,
                   d_state: Array | None, d_pre: Array | None, w_t: Array, d_final: Array,
                   xs: Array, h0: Array) -> tuple[Array, Array, Array, Array]:
    """``(d_w_in, d_b, d_w, d_h0)``: :func:`backward` and the weight gradients from its
    ``d_g``, ``d_w_in = sum x_t^T d_g_t``, ``d_b = sum d_g_t``, ``d_w = sum h_in_t^T d_g_t``
    (sums over steps and rows; ``h_in``: each step's input state) for the inputs ``xs``
    and the initial state ``h0``. On CPUs one C++ kernel that keeps each chunk of steps'
    ``d_g`` in the cache for the contractions and writes no ``(T, B, H)`` array
    (:func:`_native.grads`); elsewhere :func:`backward` and XLA's contractions. ``d_g``
    is not returned: for inputs that are not differentiated. ``unfused``: the same
    function of the same arguments (zero cotangents as arrays of no steps), vmapped in
    the kernel's place under :func:`jax.vmap` (the fused path's chunked backward pass)."""
    code = ACTIVATIONS.index(kernel[0])
    gpu = functools.partial(_grads_after, functools.partial(backward, kernel, reverse), reverse)
    return _dispatch(gpu, functools.partial(_grads_native, code, reverse, unfused),
                     functools.partial(_grads_scan, kernel, reverse, unfused), h, d_state,
                     d_pre, w_t, d_final, xs, h0)


def _grads_after(back: Callable[..., tuple[Array, Array]], reverse: bool, h: Array,
                 d_state: Array | None, d_pre: Array | None, w_t: Array, d_final: Array,
                 xs: Array, h0: Array) -> tuple[Array, Array, Array, Array]:
    """:func:`backward_grads` from ``back``, a backward loop returning ``(d_g, d_h0)``,
    and XLA's contractions."""
    d_g, d_h0 = back(h, d_state, d_pre, w_t, d_final)
    lead = tuple(range(h.ndim - 1))
    return (jnp.tensordot(xs, d_g, (lead, lead)), d_g.sum(lead),
            jnp.tensordot(_inputs_states(h, h0, reverse), d_g, (lead, lead)), d_h0)


def _grads_scan(kernel: Kernel, reverse: bool, unfused: Any, *args: Any) -> tuple[Array, ...]:
    """``backward_grads`` written with ``lax.scan``: its tangents, and the reference."""
    return _grads_after(functools.partial(_backward_scan, kernel, reverse), reverse, *args)


def _grads_native(code: int, reverse: bool, unfused: Callable[..., tuple[Array, ...]],
                  h: Array, d_state: Array | None, d_pre: Array | None,
                  *rest: Array) -> tuple[Array, ...]:
    """The C++ kernel; under :func:`jax.vmap`, ``unfused`` (each vmapped element has
    weight gradients of its own)."""
    return _as_batch(_native.grads(code, reverse, unfused), *_native.GRADS_KINDS)(
        h, *_no_steps(h, d_state, d_pre), *rest)


def _no_steps(like: Array, *cotangents: Array | None) -> tuple[Array, ...]:
    """Each cotangent, a zero one (``None``) as an array of no steps (shaped as ``like``
    but with a leading 0): the C++ kernels read nothing for it."""
    return tuple(jnp.zeros((0, *like.shape[1:]), like.dtype) if c is None else c
                 for c in cotangents)


def zeros_for_none(like: Array, *cotangents: Array | None) -> tuple[Array, ...]:
    """Each cotangent, a zero one (``None``) as zeros shaped as ``like`` (for the loops
    that read every step's: the Pallas kernels, the compact LSTM path)."""
    return tuple(jnp.zeros_like(like) if c is None else c for c in cotangents)


def _backward_native(code: int, reverse: bool, h: Array, d_state: Array | None,
                     d_pre: Array | None, *rest: Array) -> tuple[Array, Array]:
    """The C++ kernel, its ``d_g^T`` (``(H, T, B)``) transposed back to ``(T, B, H)``:
    XLA folds the transpose into the weight-gradient products that read it."""
    d_g_t, d_h0 = _as_batch(_native.backward(code, reverse), *_native.BACKWARD_KINDS)(
        h, *_no_steps(h, d_state, d_pre), *rest)
    return jnp.moveaxis(d_g_t, 0, -1), d_h0


def _backward_rows(back: Callable[[Array, Array], Array], reverse: bool, h: Array,
                   d_state: Array | None, d_pre: Array | None, w_t: Array,
                   d_final: Array) -> tuple[Array, Array]:
    d_state, d_pre = zeros_for_none(h, d_state, d_pre)
    length, batch, hidden = h.shape
    cols = _padded(hidden)
    kernel = functools.partial(_backward_kernel, back, reverse, cols <= _HOIST_MAX)
    args = (*((_pad(a, cols), "steps") for a in (h, d_state, d_pre)),
            (_pad(w_t, cols, cols), "whole"), (_pad(d_final, cols), "rows"))
    d_g, d_h0 = _call(kernel, args, (((length, batch, cols), "steps"), ((batch, cols), "rows")),
                      h.dtype)
    return d_g[:, :batch, :hidden], d_h0[:batch, :hidden]


# The LSTM's loops: C++ kernels on CPUs only (there is no GPU kernel for them).


LstmTape = tuple[Array, Array, Array, Array, Array]
"""``(g, s(i), s(f), s(o), c_in)`` of every step: what :func:`lstm_backward` reads."""


def _lstm_forward_scan(tape: bool, reverse: bool, xs: Array, w_in: Array, b: Array | None,
                       w: Array, h0: Array, c0: Array) -> tuple[Array, ...]:
    """``lstm_forward`` written with ``lax.scan``: its tangents, and the reference."""
    def body(carry: tuple[Array, Array], gx_t: Array) -> tuple[Any, Any]:
        h, c = carry
        i, f, g, o = jnp.split(gx_t + h @ w, 4, axis=-1)
        i, f, o = jax.nn.sigmoid(i), jax.nn.sigmoid(f), jax.nn.sigmoid(o)
        c_new = f * c + i * jnp.tanh(g)
        h_new = o * jnp.tanh(c_new)
        return (h_new, c_new), (h_new, g, i, f, o, c) if tape else (h_new, g)

    (_, c_final), ys = jax.lax.scan(body, (h0, c0), project(xs, w_in, b), reverse=reverse)
    kept = ys[2:] if tape else (jnp.zeros((0, *c0.shape), c0.dtype),) * 4
    return (*ys[:2], *kept, c_final)


@functools.partial(jax.custom_jvp, nondiff_argnums=(0, 1))
def lstm_forward(tape: bool, reverse: bool, xs: Array, w_in: Array, b: Array | None,
                 w: Array, h0: Array, c0: Array) -> tuple[Array, ...]:
    """``(h, g, s(i), s(f), s(o), c_in, c_final)`` of an LSTM (gates ``[i, f, g, o] = x_t
    @ w_in + b + h_{t-1} @ w``, ``c_t = s(f) c_{t-1} + s(i) tanh(g)``, ``h_t = s(o)
    tanh(c_t)``) over the inputs ``xs`` (``(T, B, I)`` or ``(T, I)``) from ``(h0, c0)``:
    the states, the cell input's pre-activations (the public ones), and with the ``tape``
    (for :func:`lstm_backward`) each step's sigmoid gates and input cell state (without,
    arrays of no steps), then the final cell state. The loop is one C++ kernel on CPUs
    (:func:`jax_rnn._native.lstm_forward`), ``lax.scan`` elsewhere."""
    return _dispatch(functools.partial(_lstm_forward_scan, tape, reverse),
                     functools.partial(_lstm_forward_native, tape, reverse),
                     functools.partial(_lstm_forward_scan, tape, reverse),
                     xs, w_in, b, w, h0, c0)


def _lstm_forward_native(tape: bool, reverse: bool, xs: Array, w_in: Array, b: Array | None,
                         w: Array, h0: Array, c0: Array) -> tuple[Array, ...]:
    bias = jnp.zeros(w.shape[-1:], w.dtype) if b is None else b
    h, g, *rest = _as_batch(_native.lstm_forward(tape, reverse), *_native.LSTM_FORWARD_KINDS)(
        xs, w_in, bias, w, h0, c0)
    if not tape:  # no g from the kernel: the gate's columns of the pre-activations
        cols = slice(2 * w.shape[0], 3 * w.shape[0])
        g = _pre_from_states(reverse, xs, h, h0, w_in[:, cols], w[:, cols], bias[cols])
    return (h, g, *rest)


def lstm_step_back(w_t: Array, g: Array, i: Array, f: Array, o: Array, c_prev: Array,
                   d_pre: Array | None, d_state: Array | None, d_h_next: Array,
                   d_c_next: Array) -> tuple[Array, tuple[Array, Array]]:
    """One step of an LSTM's backward loop (also the fused path's): ``(d_a, (d_h, d_c))``,
    the gates' pre-activation gradients and the step's input carry's, from its tape
    (``g``, the sigmoid gates, the input cell state), the cotangents of its public
    pre-activation and state (``None``: zero), and the output carry's. ``tanh(g)`` and
    ``tanh(c_t)`` are evaluated again rather than kept."""
    tg = jnp.tanh(g)
    tc = jnp.tanh(f * c_prev + i * tg)
    d_h = plus(d_h_next, d_state)
    d_c = d_c_next + d_h * o * ((1.0 - tc) * (1.0 + tc))
    d_a = jnp.concatenate([d_c * tg * i * (1.0 - i), d_c * c_prev * f * (1.0 - f),
                           plus(d_c * i * ((1.0 - tg) * (1.0 + tg)), d_pre),
                           d_h * tc * o * (1.0 - o)],
                          axis=-1)
    return d_a, (d_a @ w_t, d_c * f)


def _lstm_backward_scan(reverse: bool, g: Array, i: Array, f: Array, o: Array, c_in: Array,
                        d_state: Array | None, d_pre: Array | None, w_t: Array, d_h: Array,
                        d_c: Array) -> tuple[Array, Array, Array]:
    """``lstm_backward`` written with ``lax.scan``: its tangents, and the reference."""
    def body(carry: tuple[Array, Array], xs: tuple[Any, ...]) -> tuple[Any, Array]:
        g_t, i_t, f_t, o_t, c_prev, d_state_t, d_pre_t = xs
        d_a, carry = lstm_step_back(w_t, g_t, i_t, f_t, o_t, c_prev, d_pre_t, d_state_t,
                                    *carry)
        return carry, d_a

    (d_h0, d_c0), d_a = jax.lax.scan(body, (d_h, d_c), (g, i, f, o, c_in, d_state, d_pre),
                                     reverse=not reverse)
    return d_a, d_h0, d_c0


@functools.partial(jax.custom_jvp, nondiff_argnums=(0,))
def lstm_backward(reverse: bool, g: Array, i: Array, f: Array, o: Array, c_in: Array,
                  d_state: Array | None, d_pre: Array | None, w_t: Array, d_h: Array,
                  d_c: Array) -> tuple[Array, Array, Array]:
    """``(d_a, d_h0, d_c0)``: the backward loop of :func:`lstm_forward`'s recurrence from
    its tape (``g``, the sigmoid gates, ``c_in``), the cotangents of the public states and
    pre-activations (``None``: zero), ``w.T`` and the cotangents of the final carry: the gates'
    pre-activation gradients (``[i, f, g, o]``) and the initial carry's, in one C++ kernel
    on CPUs."""
    return _dispatch(functools.partial(_lstm_backward_scan, reverse),
                     functools.partial(_lstm_backward_native, reverse),
                     functools.partial(_lstm_backward_scan, reverse),
                     g, i, f, o, c_in, d_state, d_pre, w_t, d_h, d_c)


def _lstm_backward_native(reverse: bool, g: Array, i: Array, f: Array, o: Array, c_in: Array,
                          d_state: Array | None, d_pre: Array | None,
                          *rest: Array) -> tuple[Array, ...]:
    return _as_batch(_native.lstm_backward(reverse), *_native.LSTM_BACKWARD_KINDS)(
        g, i, f, o, c_in, *_no_steps(g, d_state, d_pre), *rest)


# The GRU's loops: C++ kernels on CPUs only, as the LSTM's.


GruTape = tuple[Array, Array, Array, Array]
"""``(r, z, n, gh_n)`` of every step: with each step's input state, what
:func:`gru_backward` reads (and the fused path's XLA loop, ``_fused._gru_step_back``)."""


def _gru_forward_scan(tape: bool, reverse: bool, xs: Array, w_in: Array, b_in: Array | None,
                      w: Array, b: Array | None, h0: Array) -> tuple[Array, ...]:
    """``gru_forward`` written with ``lax.scan``: its tangents, and the reference."""
    def body(h: Array, gx_t: Array) -> tuple[Array, Any]:
        new, pre, gates = gru_pointwise(gx_t, project(h, w, b), h)
        return new, (new, pre, *gates) if tape else (new, pre)

    ys = jax.lax.scan(body, h0, project(xs, w_in, b_in), reverse=reverse)[1]
    return ys if tape else (*ys, *(jnp.zeros((0, *h0.shape), h0.dtype),) * 4)


@functools.partial(jax.custom_jvp, nondiff_argnums=(0, 1))
def gru_forward(tape: bool, reverse: bool, xs: Array, w_in: Array, b_in: Array | None,
                w: Array, b: Array | None, h0: Array) -> tuple[Array, ...]:
    """``(h, pre, r, z, n, gh_n)`` of a GRU (thirds ``[r, z, n]`` of ``gx = x_t @ w_in +
    b_in`` and ``gh = h_{t-1} @ w + b``; ``r = s(gx_r + gh_r)``, ``z = s(gx_z + gh_z)``,
    ``pre = gx_n + r gh_n``, ``n = tanh(pre)``, ``h_t = (1 - z) n + z h_{t-1}``) over the
    inputs ``xs`` (``(T, B, I)`` or ``(T, I)``) from ``h0``: the states, the candidate's
    pre-activations (the public ones), and with the ``tape`` (:data:`GruTape`) each step's
    gates and ``gh_n`` (without, arrays of no steps). The loop is one C++ kernel on CPUs
    (:func:`jax_rnn._native.gru_forward`), ``lax.scan`` elsewhere."""
    return _dispatch(functools.partial(_gru_forward_scan, tape, reverse),
                     functools.partial(_gru_forward_native, tape, reverse),
                     functools.partial(_gru_forward_scan, tape, reverse),
                     xs, w_in, b_in, w, b, h0)


def _gru_forward_native(tape: bool, reverse: bool, xs: Array, w_in: Array, b_in: Array | None,
                        w: Array, b: Array | None, h0: Array) -> tuple[Array, ...]:
    zeros = jnp.zeros(w.shape[-1:], w.dtype)
    return _as_batch(_native.gru_forward(tape, reverse), *_native.GRU_FORWARD_KINDS)(
        xs, w_in, zeros if b_in is None else b_in, w, zeros if b is None else b, h0)


def gru_step_back(w_t: Array, r: Array, z: Array, n: Array, h_n: Array, h: Array,
                  d_pre: Array | None, d_state: Array | None,
                  d_new: Array) -> tuple[Array, Array]:
    """One step of a GRU's backward loop (also the fused path's): ``(d_gx, d_h)``, the
    input projection's gradients ``[d r, d z, d pre]`` and the step's input state's, from
    its gates, ``gh_n``, input state ``h``, the cotangents of its public pre-activation and
    state (``None``: zero), and the output state's."""
    d_h = plus(d_new, d_state)
    d_pre = plus(d_h * (1.0 - z) * ((1.0 - n) * (1.0 + n)), d_pre)
    d_r = d_pre * h_n * r * (1.0 - r)
    d_z = d_h * (h - n) * z * (1.0 - z)
    d_gh = jnp.concatenate([d_r, d_z, d_pre * r], axis=-1)
    return jnp.concatenate([d_r, d_z, d_pre], axis=-1), d_gh @ w_t + d_h * z


def _gru_backward_scan(reverse: bool, h_in: Array, r: Array, z: Array, n: Array, h_n: Array,
                       d_state: Array | None, d_pre: Array | None, w_t: Array,
                       d_final: Array) -> tuple[Array, Array]:
    """``gru_backward`` written with ``lax.scan``: its tangents, and the reference."""
    def body(d_h: Array, xs: tuple[Any, ...]) -> tuple[Array, Array]:
        h_t, r_t, z_t, n_t, h_n_t, d_state_t, d_pre_t = xs
        d_gx, d_h = gru_step_back(w_t, r_t, z_t, n_t, h_n_t, h_t, d_pre_t, d_state_t, d_h)
        return d_h, d_gx

    d_h0, d_gx = jax.lax.scan(body, d_final, (h_in, r, z, n, h_n, d_state, d_pre),
                              reverse=not reverse)
    return d_gx, d_h0


@functools.partial(jax.custom_jvp, nondiff_argnums=(0,))
def gru_backward(reverse: bool, h_in: Array, r: Array, z: Array, n: Array, h_n: Array,
                 d_state: Array | None, d_pre: Array | None, w_t: Array,
                 d_final: Array) -> tuple[Array, Array]:
    """``(d_gx, d_h0)``: the backward loop of :func:`gru_forward`'s recurrence from its tape
    and each step's input state ``h_in``, the cotangents of the public states and
    pre-activations (``None``: zero), ``w.T`` and the cotangent of the final state: the
    input projection's gradients (``[r, z, n]``) and the initial state's, in one C++
    kernel on CPUs."""
    return _dispatch(functools.partial(_gru_backward_scan, reverse),
                     functools.partial(_gru_backward_native, reverse),
                     functools.partial(_gru_backward_scan, reverse),
                     h_in, r, z, n, h_n, d_state, d_pre, w_t, d_final)


def _gru_backward_native(reverse: bool, h_in: Array, r: Array, z: Array, n: Array, h_n: Array,
                         d_state: Array | None, d_pre: Array | None,
                         *rest: Array) -> tuple[Array, ...]:
    return _as_batch(_native.gru_backward(reverse), *_native.GRU_BACKWARD_KINDS)(
        h_in, r, z, n, h_n, *_no_steps(h_in, d_state, d_pre), *rest)


def _scan_tangents(kernel: Any, scan: Callable[..., Any], static: int = 2) -> None:
    """Gives ``kernel`` (a ``custom_jvp`` whose first ``static`` arguments are not
    differentiated) the tangents of ``scan``, the same recurrence written with
    ``lax.scan``: the primal comes from the kernel, the tangent (and hence the transposes
    of higher-order reverse mode) from JAX's own rules."""
    def jvp(*args: Any) -> tuple[Any, Any]:
        statics, primals, tangents = args[:static], args[static], args[static + 1]
        out = kernel(*statics, *primals)
        return out, jax.jvp(functools.partial(scan, *statics), primals, tangents)[1]

    kernel.defjvp(jvp)


_scan_tangents(forward, _forward_scan)
_scan_tangents(backward, _backward_scan)
_scan_tangents(backward_grads, _grads_scan, static=3)
_scan_tangents(lstm_forward, _lstm_forward_scan)
_scan_tangents(lstm_backward, _lstm_backward_scan, static=1)
_scan_tangents(gru_forward, _gru_forward_scan)
_scan_tangents(gru_backward, _gru_backward_scan, static=1)
