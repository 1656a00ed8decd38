"""The CPU kernels: jax_rnn/_csrc/*.cc, compiled on first use and called as XLA FFI
custom calls.

XLA's CPU backend runs the small matrix product of each step of a recurrence on one core
and pays a fixed cost per operation of a loop body. The C++ kernels run an Elman, GRU or
LSTM cell's forward loop, or its backward (state-gradient) loop, as one custom call each
(the Elman cell's backward loop also with its weight gradients, :func:`grads`): every
step's product in vector registers, the cell's activations in the same pass, and
the product shared with other threads of XLA's own thread pool where a step is large
enough (see the sources; measured with 2 threads, this machine's pool).
:mod:`jax_rnn._kernels` decides where they are used.

The sources are compiled once per machine, jaxlib and compiler (each source in a
compiler process of its own, at once; processes starting together compile once, under a
lock file), against the installed jaxlib's own FFI headers (so the two always match),
with ``-march=native``, into a cache folder: ``$JAX_RNN_CACHE_DIR``, else
``$XDG_CACHE_HOME/jax_rnn``, else ``~/.cache/jax_rnn``. The compiler is ``$CXX``, else
``c++``, ``g++`` or ``clang++``. Where none compiles it (no compiler, no FFI headers in
an old jaxlib, a read-only cache), jax_rnn warns once and runs XLA's loops instead: same
results, slower.
"""

from __future__ import annotations

import contextlib
import ctypes
import functools
import hashlib
import os
import platform
import shutil
import subprocess
import tempfile
import warnings
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
from jax import Array


def read_choice(environ: Any, name: str, choices: tuple[str, ...]) -> str:
    """The setting of the environment variable ``name`` (any case, spaces ignored):
    one of ``choices``, the first the default; anything else is a clear error."""
    value = environ.get(name, choices[0]).strip().lower()
    if value not in choices:
        quoted = [f'"{c}"' for c in choices]
        listed = quoted[0] if len(quoted) == 1 else f"{', '.join(quoted[:-1])} or {quoted[-1]}"
        raise ValueError(f"jax_rnn: the environment variable {name} must be {listed}, got "
                         f"{environ[name]!r}: unset it for the default ({quoted[0]})")
    return value


HUGE_PAGES = read_choice(os.environ, "JAX_RNN_HUGE_PAGES", ("off", "on")) == "on"
"""Whether the kernels ask Linux for transparent huge pages (``madvise(MADV_HUGEPAGE)``)
for the 2 MiB-aligned part of each result before they write it: ``JAX_RNN_HUGE_PAGES=on``
at import, or this attribute before tracing (default ``False``). XLA maps the memory of a
computation's intermediate arrays anew for every call, and each first write to a 4 KiB
page is a page fault; with the advice it is one per 2 MiB page. Results are the same
either way; the advice stays on that memory until it is unmapped.

Measured on a 2-core VM without :data:`PRETOUCH` (docs/performance.md, "Huge pages,
opt-in"; not measured on top of it): with calls back to back, forward+backward at
T=1000, B=32 took 16–21% less time for the GRU, 7–11% for the LSTM, 9–13% for the Elman
cell. But that VM hands freed 2 MiB blocks back to its host (virtio-balloon free page
reporting), and where calls were seconds apart (a benchmark that interleaves libraries)
some calls took twice as long, hence off by default. Where Linux's transparent huge
pages are ``never`` (``/sys/kernel/mm/transparent_hugepage/enabled``), the advice changes
nothing. Read at trace time, like :data:`jax_rnn._kernels.MODE`."""

FUSED_GRADS = True
"""Whether a differentiated Elman call whose inputs are not differentiated (a first layer,
the usual training step) runs its backward loop and weight gradients as one kernel
(:func:`grads`, default ``True``) rather than the backward kernel followed by XLA's
contractions in chunks of steps. The kernel writes no ``(T, B, H)`` array of ``d_g``,
copies no chunk of the states or inputs, and keeps each chunk's ``d_g`` in the cache for
its contractions: at T=1000, B=32, I=64, H=128 XLA's temporary memory fell from 49 to
31 MiB, and forward+backward took half the time (docs/performance.md, "The Elman cell's
backward pass and weight gradients in one kernel"). Under :func:`jax.vmap`, where each
element has weight gradients of its own, the general path runs instead, vmapped (the
backward kernel and XLA's contractions, in chunks of steps). Read at trace time; there
for A/B runs (``benchmarks/kernels.py``'s ``kernel_unfused_grads``)."""

PRETOUCH = True
"""Whether the kernels write a zero into every 4 KiB page of their results (in chunks
shared with XLA's thread pool) before their loops write them, where the results hold at
least 1 MiB (default ``True``). XLA maps a computation's intermediate arrays anew for
every call; inside a loop, the threads that share a step faulted on the same fresh pages,
and a fault on one stalled the step for both. Results are the same either way; the
attribute (read at trace time) is there for A/B runs (``benchmarks/kernels.py``'s
``kernel_no_pretouch``). Forward+backward on a 2-core VM, in one process: GRU 7–23% and
LSTM 11–25% faster with it, the Elman cells 2–7% (docs/performance.md, "Touching fresh
pages first")."""

SOURCES = tuple(sorted(Path(__file__).with_name("_csrc").glob("*.cc")))
"""The kernels' C++ sources, shipped with the package (with their header, common.h)."""

_HEADER = Path(__file__).with_name("_csrc") / "common.h"

_TARGETS = {"jax_rnn_elman_forward": "JaxRnnElmanForward",
            "jax_rnn_elman_backward": "JaxRnnElmanBackward",
            "jax_rnn_elman_grads": "JaxRnnElmanGrads",
            "jax_rnn_lstm_forward": "JaxRnnLstmForward",
            "jax_rnn_lstm_backward": "JaxRnnLstmBackward",
            "jax_rnn_gru_forward": "JaxRnnGruForward",
            "jax_rnn_gru_backward": "JaxRnnGruBackward"}
"""FFI target name -> the handler's symbol in the compiled library."""


def cache_dir() -> Path:
    """Where compiled kernels are kept (module docstring)."""
    if os.environ.get("JAX_RNN_CACHE_DIR"):
        return Path(os.environ["JAX_RNN_CACHE_DIR"])
    base = os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache"
    return Path(base) / "jax_rnn"


def _compiler() -> str | None:
    if os.environ.get("CXX"):
        return os.environ["CXX"]
    return next((c for c in ("c++", "g++", "clang++") if shutil.which(c)), None)


def _cpu_signature() -> str:
    """What ``-march=native`` depends on: the CPU's model and feature flags, where the
    system says them (Linux), else the platform's description."""
    try:
        lines = Path("/proc/cpuinfo").read_text().splitlines()
        return "\n".join(sorted({ln for ln in lines if ln.startswith(("model name", "flags",
                                                                     "Features"))}))
    except OSError:
        return platform.processor() + platform.machine()


def _run_all(commands: list[list[str]]) -> str | None:
    """Runs ``commands`` at once (one compiler process each): ``None`` where all succeed,
    else the first failure's error line (``OSError`` and timeouts are raised)."""
    procs = [subprocess.Popen(c, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
             for c in commands]
    try:
        results = [(p.communicate(timeout=300)[1], p.returncode) for p in procs]
    finally:
        for p in procs:
            if p.poll() is None:
                p.kill()
                p.wait()
    for stderr, code in results:
        if code != 0:
            lines = stderr.strip().splitlines()
            return next((ln for ln in lines if "error" in ln.lower()),
                        lines[-1] if lines else f"exit code {code}")
    return None


def _compile(compiler: str, include: str, target: Path) -> str | None:
    """Compiles :data:`SOURCES` to ``target`` (written whole, then renamed into place, so
    that processes compiling at once never load half a file): ``None``, or why not. Each
    source compiles in a process of its own, at once (11.7 s for the three in one process
    on this project's 2-core machine), then they are linked."""
    base = [compiler, "-O3", "-std=c++17", "-fPIC", "-isystem", include]
    error = ""
    target.parent.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(dir=target.parent) as tmp:
        out = Path(tmp) / target.name
        objects = [str(Path(tmp) / f"{p.stem}.o") for p in SOURCES]
        for flags in (["-march=native"], []):  # a compiler without -march=native: generic
            try:
                error = (_run_all([[*base, *flags, "-c", str(p), "-o", o]
                                   for p, o in zip(SOURCES, objects, strict=True)])
                         or _run_all([[compiler, "-shared", *objects, "-o", str(out)]]))
            except (OSError, subprocess.TimeoutExpired) as e:
                return f"{compiler} failed to run: {e}"
            if error is None:
                os.replace(out, target)
                return None
    return f"{compiler} could not compile {', '.join(p.name for p in SOURCES)}: {error}"


@contextlib.contextmanager
def _lock(target: Path) -> Iterator[None]:
    """Holds an exclusive lock on ``target``'s lock file (POSIX; elsewhere none), so that
    processes starting at once (pytest-xdist's workers) compile the kernels once."""
    target.parent.mkdir(parents=True, exist_ok=True)
    try:
        import fcntl
    except ImportError:
        yield
        return
    with open(target.with_suffix(".lock"), "w") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(lock, fcntl.LOCK_UN)


@functools.cache
def _load() -> tuple[ctypes.CDLL | None, str]:
    """The compiled library (compiling it first if it is not in the cache) and its FFI
    targets registered with XLA, or ``None`` and why not (any failure on the way is a
    reason, not an exception: jax_rnn then runs XLA's loops)."""
    try:
        return _compile_and_register()
    except Exception as e:  # any failure: reported as the reason, with its type
        return None, f"{type(e).__name__}: {e}"


def _compile_and_register() -> tuple[ctypes.CDLL | None, str]:
    ffi = getattr(jax, "ffi", None)
    if ffi is None or not hasattr(ffi, "include_dir"):
        return None, f"this JAX ({jax.__version__}) has no jax.ffi with FFI headers"
    compiler = _compiler()
    if compiler is None:
        return None, "no C++ compiler found ($CXX, c++, g++ or clang++)"
    import jaxlib

    key = hashlib.sha256()
    sources = (p.read_bytes() for p in (*SOURCES, _HEADER))
    for part in (*sources, str(getattr(jaxlib, "__version__", "")).encode(),
                 compiler.encode(), _cpu_signature().encode()):
        key.update(part)
    target = cache_dir() / f"kernels-{key.hexdigest()[:16]}.so"
    if not target.exists():
        try:
            with _lock(target):  # one process compiles; the others wait and load it
                reason = (None if target.exists()
                          else _compile(compiler, ffi.include_dir(), target))
        except OSError as e:
            reason = f"cannot write to {target.parent}: {e}"
        if reason is not None:
            return None, reason
    try:
        library = ctypes.CDLL(str(target))
    except OSError as e:
        return None, f"cannot load {target}: {e}"
    for name, symbol in _TARGETS.items():
        ffi.register_ffi_target(name, ffi.pycapsule(getattr(library, symbol)), platform="cpu")
    return library, ""


def available() -> bool:
    """Whether the CPU kernels are compiled and registered (compiling them on first call,
    a few seconds once per machine); warns once, with the reason, where they cannot be."""
    library, reason = _load()
    if library is None:
        _warn_once(reason)
    return library is not None


def threads(step_work: int, panels: int, pool_threads: int) -> int:
    """How many threads the kernels run a loop on, for steps of ``step_work``
    multiply-adds in ``panels`` panels of 16 columns, with a thread pool of
    ``pool_threads`` (the C++ source's rule; for the tests)."""
    library, reason = _load()
    if library is None:
        raise RuntimeError(f"jax_rnn: the CPU kernels are not available: {reason}")
    fn = library.JaxRnnThreads
    fn.restype = ctypes.c_int64
    fn.argtypes = [ctypes.c_int64] * 3
    return int(fn(step_work, panels, pool_threads))


def unavailable_reason() -> str:
    """Why :func:`available` is false (``""`` where it is true)."""
    return _load()[1]


@functools.cache
def _warn_once(reason: str) -> None:
    warnings.warn(f"jax_rnn: the CPU kernels for the Elman, GRU and LSTM cells are not "
                  f"available ({reason}); XLA's loops run instead (same results, slower). Set "
                  f"JAX_RNN_KERNELS=off to choose XLA's loops without this warning.",
                  UserWarning, stacklevel=3)


# Each argument and result of a kernel has a kind, as in ``_kernels._as_batch`` (which
# takes these): "s" steps (T, B, .), "t" steps transposed (., T, B), "r" rows (B, .),
# "m" a matrix or vector (weights, the same for every batch row). A jax.vmap around a
# call folds its axis into the batch (B) of the steps and rows where no matrix is
# batched, and runs one call per element where one is (custom_vmap below).
FORWARD_KINDS = ("smmmr", "s")
BACKWARD_KINDS = ("sssmr", "tr")
GRADS_KINDS = ("sssmrsr", "mmmr")
LSTM_FORWARD_KINDS = ("smmmrr", "ssssssr")
LSTM_BACKWARD_KINDS = ("sssssssmrr", "srr")
GRU_FORWARD_KINDS = ("smmmmr", "ssssss")
GRU_BACKWARD_KINDS = ("sssssssmr", "sr")

Shapes = Callable[..., tuple[tuple[int, ...], ...]]
"""The shapes of a kernel's results from its arguments."""


def _call(name: str, kinds: str, outs: str, shapes: Shapes,
          vmap_with: Callable[..., tuple[Array, ...]] | None = None,
          **attrs: int) -> Callable[..., tuple[Array, ...]]:
    """The FFI target ``name`` as a function of arrays (float32, all of them), with its
    integer attributes ``attrs`` (and ``huge_pages`` and ``pretouch``:
    :data:`HUGE_PAGES` and :data:`PRETOUCH` at trace time). Under :func:`jax.vmap` the
    vmapped axis is folded into the batch axis (``kinds``, ``outs``: see ``_fold``), or,
    where ``vmap_with`` is given (results summed over the batch), ``vmap_with`` (the same
    function of the same arguments) is vmapped instead."""

    @jax.custom_batching.custom_vmap
    def call(*args: Array) -> tuple[Array, ...]:
        results = tuple(jax.ShapeDtypeStruct(s, jnp.float32) for s in shapes(*args))
        values = {**attrs, "huge_pages": HUGE_PAGES, "pretouch": PRETOUCH}
        return tuple(jax.ffi.ffi_call(name, results)(
            *args, **{k: np.int32(v) for k, v in values.items()}))

    @call.def_vmap
    def rule(size: int, batched: list[bool], *args: Array) -> tuple[Any, tuple[bool, ...]]:
        if vmap_with is not None:
            in_axes = tuple(0 if b else None for b in batched)
            return jax.vmap(vmap_with, in_axes)(*args), (True,) * len(outs)
        args = tuple(a if b else jnp.broadcast_to(a, (size, *a.shape))
                     for a, b in zip(args, batched, strict=True))
        if size == 0 or any(b for b, kind in zip(batched, kinds, strict=True) if kind == "m"):
            return tuple(jax.lax.map(lambda a: call(*a), args)), (True,) * len(outs)
        folded = call(*(_fold(a, kind) for a, kind in zip(args, kinds, strict=True)))
        return (tuple(_unfold(r, kind, size) for r, kind in zip(folded, outs, strict=True)),
                (True,) * len(outs))

    return call


def _fold(a: Array, kind: str) -> Array:
    """The leading (vmapped) axis of ``a`` merged into its batch axis."""
    if kind == "s":  # (V, T, B, .) -> (T, V * B, .)
        v, t, b, x = a.shape
        return jnp.moveaxis(a, 0, 1).reshape(t, v * b, x)
    if kind == "r":  # (V, B, .) -> (V * B, .)
        return a.reshape(a.shape[0] * a.shape[1], a.shape[2])
    return a[0]  # a matrix, the same for every element (broadcast by the rule)


def _unfold(a: Array, kind: str, size: int) -> Array:
    """The batch axis of a folded call's result split back into (vmapped axis, batch)."""
    if kind == "s":  # (T, V * B, .) -> (V, T, B, .)
        t, vb, x = a.shape
        return jnp.moveaxis(a.reshape(t, size, vb // size, x), 1, 0)
    if kind == "t":  # (., T, V * B) -> (V, ., T, B)
        x, t, vb = a.shape
        return jnp.moveaxis(a.reshape(x, t, size, vb // size), 2, 0)
    return a.reshape(size, a.shape[0] // size, a.shape[1])


@functools.cache
def forward(code: int, reverse: bool) -> Callable[..., tuple[Array, ...]]:
    """``(xs (T, B, I), w_in (I, H), b (H,), w (H, H), h0 (B, H)) -> (h,)``: the states of
    an Elman cell's forward loop with activation ``code`` (0: tanh, 1: relu), each step
    ``h_t = act([x_t, h_{t-1}] @ [w_in; w] + b)``."""
    def shapes(xs: Array, *weights: Array) -> tuple[tuple[int, ...], ...]:
        return (xs.shape[:2] + weights[-1].shape[-1:],)

    return _call("jax_rnn_elman_forward", *FORWARD_KINDS, shapes, activation=code,
                 reverse=reverse)


@functools.cache
def backward(code: int, reverse: bool) -> Callable[..., tuple[Array, ...]]:
    """``(h, d_state, d_pre, w_t, d_final) -> (d_g^T, d_h0)``: the backward loop, as in
    ``_kernels.backward``, with the pre-activations' gradients ``d_g`` transposed to
    ``(H, T, B)``. A zero ``d_state`` or ``d_pre`` may be passed as ``(0, B, H)``: no
    steps, nothing read."""
    def shapes(h: Array, *rest: Array) -> tuple[tuple[int, ...], ...]:
        length, batch, hidden = h.shape
        return (hidden, length, batch), (batch, hidden)

    return _call("jax_rnn_elman_backward", *BACKWARD_KINDS, shapes, activation=code,
                 reverse=reverse)


def grads(code: int, reverse: bool, vmap_with: Callable[..., tuple[Array, ...]],
          ) -> Callable[..., tuple[Array, ...]]:
    """``(h, d_state, d_pre, w_t, d_final, xs, h0) -> (d_w_in, d_b, d_w, d_h0)``: the
    backward loop of :func:`backward` followed by the weight gradients (``d_b``: of the
    summed bias), in one kernel that writes no ``d_g``; for inputs that are not
    differentiated. ``vmap_with``: the same function of the same arguments, vmapped in
    its place (each vmapped element has weight gradients of its own)."""
    def shapes(h: Array, *rest: Array) -> tuple[tuple[int, ...], ...]:
        hidden, inputs = h.shape[-1], rest[4].shape[-1]
        return (inputs, hidden), (hidden,), (hidden, hidden), h.shape[1:]

    return _call("jax_rnn_elman_grads", *GRADS_KINDS, shapes, vmap_with, activation=code,
                 reverse=reverse)


@functools.cache
def lstm_forward(tape: bool, reverse: bool) -> Callable[..., tuple[Array, ...]]:
    """``(xs (T, B, I), w_in (I, 4H), b (4H,), w (H, 4H), h0 (B, H), c0 (B, H)) -> (h, g,
    s(i), s(f), s(o), c_in, c_final)``: an LSTM's forward loop (gates ``[i, f, g, o]``):
    its states, and with the ``tape`` for the backward loop each step's cell input
    pre-activation ``g`` (the public one), three sigmoid gates and input cell state
    (``(T, B, H)`` each; without, ``(0, B, H)``), then the final cell state."""
    def shapes(xs: Array, *weights: Array) -> tuple[tuple[int, ...], ...]:
        (length, batch, _), hidden = xs.shape, weights[-1].shape[-1]
        kept = (length if tape else 0, batch, hidden)
        return ((length, batch, hidden),) + (kept,) * 5 + ((batch, hidden),)

    return _call("jax_rnn_lstm_forward", *LSTM_FORWARD_KINDS, shapes, reverse=reverse,
                 tape=tape)


@functools.cache
def lstm_backward(reverse: bool) -> Callable[..., tuple[Array, ...]]:
    """``(g, s(i), s(f), s(o), c_in, d_state, d_pre, w_t (4H, H), d_h (B, H), d_c (B, H))
    -> (d_a, d_h0, d_c0)``: the backward loop of ``lstm_forward``'s recurrence from its
    tape, with the gates' pre-activation gradients ``d_a`` (``(T, B, 4H)``). A zero
    ``d_state`` or ``d_pre`` may be passed as ``(0, B, H)``, as in :func:`backward`."""
    def shapes(g: Array, *rest: Array) -> tuple[tuple[int, ...], ...]:
        length, batch, hidden = g.shape
        return (length, batch, 4 * hidden), (batch, hidden), (batch, hidden)

    return _call("jax_rnn_lstm_backward", *LSTM_BACKWARD_KINDS, shapes, reverse=reverse)


@functools.cache
def gru_forward(tape: bool, reverse: bool) -> Callable[..., tuple[Array, ...]]:
    """``(xs (T, B, I), w_in (I, 3H), b_in (3H,), w (H, 3H), b (3H,), h0 (B, H)) -> (h, pre,
    r, z, n, gh_n)``: a GRU's forward loop (thirds ``[r, z, n]``): its states, the
    candidate's pre-activation (the public one), and with the ``tape`` for the backward
    loop each step's gates ``r``, ``z``, ``n`` and ``gh_n = h_{t-1} @ w_n + b_n``
    (``(T, B, H)`` each; without, ``(0, B, H)``)."""
    def shapes(xs: Array, *weights: Array) -> tuple[tuple[int, ...], ...]:
        (length, batch, _), hidden = xs.shape, weights[-1].shape[-1]
        kept = (length if tape else 0, batch, hidden)
        return ((length, batch, hidden),) * 2 + (kept,) * 4

    return _call("jax_rnn_gru_forward", *GRU_FORWARD_KINDS, shapes, reverse=reverse,
                 tape=tape)


@functools.cache
def gru_backward(reverse: bool) -> Callable[..., tuple[Array, ...]]:
    """``(h_in, r, z, n, gh_n, d_state, d_pre, w_t (3H, H), d_final (B, H)) -> (d_gx,
    d_h0)``: the backward loop of ``gru_forward``'s recurrence from its tape and each
    step's input state ``h_in``, with the gradients ``d_gx`` (``(T, B, 3H)``) of the
    input projection ``[r, z, n]``. A zero ``d_state`` or ``d_pre`` may be passed as
    ``(0, B, H)``, as in :func:`backward`."""
    def shapes(h_in: Array, *rest: Array) -> tuple[tuple[int, ...], ...]:
        length, batch, hidden = h_in.shape
        return (length, batch, 3 * hidden), (batch, hidden)

    return _call("jax_rnn_gru_backward", *GRU_BACKWARD_KINDS, shapes, reverse=reverse)
