"""Times jax_rnn against a numpy loop, plain lax.scan autodiff, Flax, Haiku, Equinox and
PyTorch in one process, side by side, on the same weights.

For every size and cell each implementation's forward outputs are first checked against
jax_rnn's (max abs difference in the JSON); then forward and forward+backward
(loss = sum of outputs, gradient with respect to every parameter) are timed: the median
of repeated calls after a warm-up, JAX functions jitted (compile time reported apart),
PyTorch eager. The run writes bench.json (every number, the machine), bench.md (tables)
and bench.png (a plot), and prints ratio = peer time / jax_rnn time (>1: jax_rnn faster).
Peers that cannot be imported are skipped, and the run says why.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import os
import platform
import statistics
import sys
import time
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

from ._argtypes import non_negative, positive, positive_float


@dataclasses.dataclass(frozen=True)
class Config:
    """One problem size: ``T`` steps, batch ``B``, ``I`` inputs, ``H`` hidden units."""

    name: str
    T: int
    B: int
    I: int  # noqa: E741 - the issue's name for the input size
    H: int
    repeats: int | None = None  # cap on the timed samples unless --repeats is given

    def describe(self) -> str:
        return f"T={self.T}, B={self.B}, I={self.I}, H={self.H}"


CONFIGS = {
    c.name: c
    for c in (
        Config("notebook", 5, 1, 1, 2),
        Config("t1000_b32", 1000, 32, 64, 128),
        Config("t1000_b1", 1000, 1, 16, 32),
        Config("t200_b64", 200, 64, 256, 512, repeats=3),
        Config("t10000_b8", 10000, 8, 32, 64, repeats=3),
        Config("quick", 6, 2, 3, 4),
    )
}
DEFAULT_CONFIGS = ("notebook", "t1000_b32", "t1000_b1", "t200_b64", "t10000_b8")
CELL_NAMES = ("elman", "elman_relu", "gru", "lstm")
CELL_LABELS = {"elman": "Elman tanh", "elman_relu": "Elman ReLU", "gru": "GRU", "lstm": "LSTM"}
PEER_NAMES = ("numpy", "scan", "sharded", "raveled", "flax", "haiku", "equinox", "torch")
MODES = ("forward", "fwd_bwd")
# The bars: (config, what, threshold); a value passes at or above its threshold,
# except "grads_vs_scan" (at most GRAD_RTOL of the run's dtype: threshold None here).
BARS = (
    ("t1000_b1", "fwd_bwd_vs_fastest_peer", 2.0),
    ("t1000_b32", "fwd_bwd_vs_fastest_peer", 1.3),
    ("t200_b64", "fwd_bwd_matmul_fraction", 0.85),
    ("*", "forward_vs_fastest_peer", 1.0),
    ("*", "grads_vs_scan", None),
)
# "Gradients equal plain autodiff to float32 rounding (float64: 1e-12)": the largest
# difference between jax_rnn's gradient and impl="scan"'s, per parameter, relative to
# that parameter's largest impl="scan" gradient (_rel_diff). Measured in float32 at the
# five default sizes (seed 0): 9e-8 to 4e-6, and 7e-5 for the ReLU cell at T=10000, B=8,
# where one pre-activation is 7e-8 from 0 in float64 and the two float32 forward passes
# put it on different sides of ReLU's kink. Each side's distance from a float64 numpy
# reference is recorded beside it (grad_rel_err_float64).
GRAD_RTOL = {"float32": 1e-4, "float64": 1e-12}
# jax_rnn's own rows reported beside the bars, each with its time and its ratio against
# the same fastest like peer, not counted in them: {peer name: (section title, what it is)}.
BESIDE = {
    "sharded": ("jax_rnn with the batch over {devices} devices",
                "The default path with the batch split over every device by "
                "`jax_rnn.distributed` (on a CPU: `--cpu-devices`)."),
    "raveled": ("jax_rnn with its parameters in one array",
                "The default path on the parameters raveled into one flat array "
                "(`jax.flatten_util.ravel_pytree`, unravelled inside `jit`): one array "
                "argument per call, where JAX's dispatch costs about as much per array as "
                "the loop's steps (docs/performance.md). Run only where a call's "
                "forward+backward work is at most 1 MFLOP (`RAVELED_MAX_FLOPS`)."),
}
# The "raveled" row runs at sizes whose forward+backward FLOPs are at most this: where a
# call's time is JAX's dispatch (the notebook's 720 FLOPs: about 10 us a call).
RAVELED_MAX_FLOPS = 1e6
# Rows that count as peers for the ratios: other libraries and the numpy loop, not
# jax_rnn's own alternative paths (impl="scan"; BESIDE's rows).
EXTERNAL = ("numpy", "flax", "flax.optimized", "haiku", "equinox", "torch")
# The bars compare "like with like": tanh Elman against Flax SimpleCell and
# PyTorch nn.RNN(tanh); ReLU Elman against Haiku VanillaRNN (here also Flax and PyTorch
# with ReLU, which compute the same thing: stricter than the issue); GRU and LSTM against
# Flax, Haiku, Equinox and PyTorch. The numpy loop is timed and reported beside them
# ("fastest row") but is not one of these peers.
LIKE_PEERS = {
    "elman": ("flax", "torch"),
    "elman_relu": ("haiku", "flax", "torch"),
    "gru": ("flax", "haiku", "equinox", "torch"),
    "lstm": ("flax", "flax.optimized", "haiku", "equinox", "torch"),
}


def _names(values: Sequence[str] | None, known: Sequence[str], what: str,
           everything: Sequence[str] | None = None) -> list[str] | None:
    """Names from ``--flag a b,c``; 'all' means ``everything`` (default: all known)."""
    if values is None:
        return None
    names = [n.strip() for v in values for n in v.split(",") if n.strip()]
    if "all" in names:
        return list(everything or known)
    unknown = [n for n in names if n not in known]
    if unknown:
        raise SystemExit(f"jax-rnn bench: unknown {what} {unknown}; choose from {list(known)}")
    return names


def add_arguments(parser: argparse.ArgumentParser) -> None:
    """The ``jax-rnn bench`` flags."""
    parser.add_argument(
        "--configs", nargs="+", metavar="NAME",
        help=f"sizes to run, or 'all' (default: {', '.join(DEFAULT_CONFIGS)}): "
        + "; ".join(f"{c.name} ({c.describe()})" for c in CONFIGS.values()))
    parser.add_argument(
        "--cells", nargs="+", metavar="CELL",
        help=f"cells to run, or 'all' (the default): {', '.join(CELL_NAMES)}")
    parser.add_argument(
        "--peers", nargs="+", metavar="PEER",
        help="what to time besides jax_rnn's default path, or 'all' (the default): "
        f"{', '.join(PEER_NAMES)} ('scan' is jax_rnn.unroll(impl='scan'), plain autodiff "
        "through lax.scan; 'sharded' is the default path with the batch split over every "
        "device, see --cpu-devices; 'raveled' is the default path on the parameters in one "
        "flat array, at sizes of at most 1 MFLOP forward+backward); a peer that cannot be "
        "imported is skipped")
    parser.add_argument(
        "--cpu-devices", type=int, default=None, metavar="N",
        help="start JAX's CPU backend with N devices (jax_num_cpu_devices) for the "
        "'sharded' row, which splits the batch over the default backend's devices: on a "
        "CPU each device runs its own loop on its own thread. Every other JAX row runs on "
        "one device as without it. Only where JAX has not started yet in this process "
        "(the command line); on a GPU machine the row uses the GPUs instead")
    parser.add_argument(
        "--repeats", type=int, default=None,
        help="timed samples per measurement, at most (default 7, 2 with --quick; without "
        "this flag the T=200 and T=10000 sizes take at most 3)")
    parser.add_argument(
        "--budget", type=positive_float, default=None,
        help="seconds per measurement after which sampling stops once 3 samples are in "
        "(default 2.0)")
    parser.add_argument("--quick", action="store_true",
                        help="tiny sizes and few repeats, for smoke tests")
    parser.add_argument("--out", default="jax-rnn-out/bench",
                        help="output folder (default ./jax-rnn-out/bench)")
    parser.add_argument("--dtype", default="float32", choices=("float32", "float64"))
    parser.add_argument("--seed", type=non_negative, default=0,
                        help="seed of the weights and inputs")
    parser.add_argument("--matmul-size", type=positive, default=None,
                        help="N of the N x N matmul that measures the machine's throughput "
                        "(default 2048, 256 with --quick)")
    parser.add_argument(
        "--precision", default="default", choices=("default", "highest"),
        help="matrix-product precision: 'default' leaves each library's own (on NVIDIA "
        "GPUs both JAX and cuDNN may then use TF32 for float32), 'highest' asks JAX for "
        "full float32 (jax_default_matmul_precision) and turns PyTorch's TF32 off")
    parser.add_argument("--no-plot", action="store_true", help="skip the PNG")


# --------------------------------------------------------------------------- timing


def _warm_up(call: Callable[[], Any], compiles: bool = False,
             target: float = 0.02) -> tuple[float, int, Any]:
    """First call (compiles, for JAX) and how many calls fill one ~``target`` s sample.

    Returns ``(first_call_s, calls_per_sample, first_result)``. Calls shorter than
    ``target`` are averaged in groups so that timer and loop overhead stay negligible.
    The group size comes from the fastest of up to three warm calls (fewer where they
    take over ``5 * target`` together), so that one stalled call does not decide it. A
    call that ``compiles`` on its first run is always timed warm: its first call's time
    is mostly compiling. (Before the fourteenth session a first call over 0.5 s meant no
    warm call at all, and JAX rows that compiled for that long, 3-7 ms calls among them,
    were sampled one cold call at a time.) Only a call that does not compile and took
    over 0.5 s is sampled singly without a warm call.
    """
    t0 = time.perf_counter()
    result = call()
    first = time.perf_counter() - t0
    inner = 1
    if compiles or first < 0.5:
        fastest, spent = float("inf"), 0.0
        for _ in range(3):
            t0 = time.perf_counter()
            call()
            took = time.perf_counter() - t0
            fastest, spent = min(fastest, took), spent + took
            if spent > 5 * target:
                break
        inner = max(1, min(10_000, int(target / max(fastest, 1e-7))))
    return first, inner, result


def _pause() -> None:
    """Lets spinning threads of a library's pool go idle (``COOL_DOWN_S``)."""
    time.sleep(COOL_DOWN_S)


def _sample(call: Callable[[], Any], inner: int) -> float:
    t0 = time.perf_counter()
    for _ in range(inner):
        call()
    return (time.perf_counter() - t0) / inner


def _round_orders(n: int) -> list[list[int]]:
    """Orders of ``n`` calls, one per round, in which every call directly follows every
    other equally often over a full cycle (a Williams design: ``n`` rounds for an even
    ``n``, ``2 n`` for an odd one), and each call comes first equally often."""
    if n <= 1:
        return [list(range(n))]
    base = [0]
    for k in range(1, n):  # 0, 1, n-1, 2, n-2, ...
        base.append((k + 1) // 2 if k % 2 else n - k // 2)
    orders = [[(b + r) % n for b in base] for r in range(n)]
    return orders if n % 2 == 0 else orders + [order[::-1] for order in orders]


COOL_DOWN_S = 0.1
"""Pause after a sample of a row whose library leaves threads spinning (the numpy loop's
OpenBLAS, PyTorch's OpenMP) and whose calls took at least ``COOL_DOWN_AFTER_S`` each, and
before the first round: their threads spin for 30-100 ms after a call and take cores
from the next row. Measured at T=200, B=64 (ReLU Elman, forward+backward, medians of 5):
jax_rnn took 228 ms right after the numpy loop, 227 and 229 after 10 and 30 ms pauses,
181 and 182 after 100 and 200 ms, 190 after itself; in the thirteenth session's runs the
round in which jax_rnn followed the numpy loop was its slow sample there every time."""

COOL_DOWN_AFTER_S = 1e-3
"""Calls shorter than this (the notebook's size; tiny products) are taken to leave no
threads spinning: OpenBLAS and PyTorch run such products on the calling thread."""

SPINNING = ("numpy", "torch")
"""The rows' libraries (``Runner.library``) whose thread pools spin after a call."""


def _sample_interleaved(calls: list[tuple[Callable[[], Any], int]], repeats: int,
                        budget: float, spinning: Sequence[bool] = ()) -> list[list[float]]:
    """Samples every call in turn, round after round, so that a change in the machine's
    load during the measurement reaches every implementation alike.

    The order changes from round to round (:func:`_round_orders`) so that no call always
    follows the same one: in a fixed order the jax_rnn row always came right after
    PyTorch's, whose OpenMP threads keep spinning for a while after a call. A sample of
    a call marked in ``spinning`` (its library's threads spin after it) is followed by
    ``COOL_DOWN_S`` of sleep where its calls took at least ``COOL_DOWN_AFTER_S``, and
    so is the start (after the warm-up calls). Pauses do not count against the budget.
    Stops after ``repeats`` rounds, or once 3 rounds are in and ``budget`` seconds per
    call have passed. A call whose first sample took over ``5 * budget`` seconds (an
    eager peer at 10,000 steps, say) is sampled only once: its median is that sample.
    """
    times: list[list[float]] = [[] for _ in calls]
    spins = list(spinning) or [False] * len(calls)
    orders = _round_orders(len(calls))
    _pause()
    start, paused = time.perf_counter(), 0.0
    for done in range(1, repeats + 1):
        for k in orders[(done - 1) % len(orders)]:
            (call, inner), samples = calls[k], times[k]
            if samples and samples[0] > 5 * budget:
                continue
            samples.append(_sample(call, inner))
            if spins[k] and samples[-1] >= COOL_DOWN_AFTER_S:
                _pause()
                paused += COOL_DOWN_S
        elapsed = time.perf_counter() - start - paused
        if done >= min(3, repeats) and elapsed > budget * len(calls):
            break
    return times


def _stats(first: float, inner: int, times: list[float], jit: bool) -> dict:
    median = statistics.median(times)
    return {
        "median_s": median,
        "min_s": min(times),
        "times_s": times,
        "calls_per_sample": inner,
        "first_call_s": first,
        "compile_s": max(first - median, 0.0) if jit else None,
    }


def _matmul_call(n: int, dtype: str) -> Callable[[], Any]:
    """One jitted N x N x N JAX matmul, waited for."""
    import jax
    import jax.numpy as jnp

    k1, k2 = jax.random.split(jax.random.key(1))
    a = jax.random.normal(k1, (n, n), dtype)
    b = jax.random.normal(k2, (n, n), dtype)
    f = jax.jit(jnp.matmul)
    return lambda: f(a, b).block_until_ready()


def _matmul_throughput(n: int, dtype: str, repeats: int) -> dict:
    """FLOP/s of a jitted N x N x N JAX matmul: the machine's ceiling for dense work."""
    call = _matmul_call(n, dtype)
    first, inner, _ = _warm_up(call, compiles=True)
    stats = _stats(first, inner, _sample_interleaved([(call, inner)], repeats, 2.0)[0], True)
    flops = 2.0 * n**3
    return {"n": n, "dtype": dtype, "flops": flops, "median_s": stats["median_s"],
            "flops_per_s": flops / stats["median_s"], "times_s": stats["times_s"]}


def _flops_fwd_bwd(c: Config, cell: str) -> float:
    from ._bench_peers import GATES

    return 6.0 * c.T * c.B * (c.I + c.H) * c.H * GATES[cell]


# -------------------------------------------------------------------------- machine


def _cpu_model() -> str:
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith("model name"):
                    return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or "unknown"


def _cores() -> int:
    try:
        return len(os.sched_getaffinity(0))
    except AttributeError:
        return os.cpu_count() or 1


def _versions() -> dict[str, str | None]:
    import importlib.metadata as md

    out: dict[str, str | None] = {}
    for dist in ("jax", "jaxlib", "numpy", "flax", "dm-haiku", "equinox", "torch", "jax_rnn"):
        try:
            out[dist] = md.version(dist)
        except md.PackageNotFoundError:
            out[dist] = None
    import jax_rnn

    out["jax_rnn"] = out["jax_rnn"] or jax_rnn.__version__
    return out


def _torch_cuda_name() -> str | None:
    """The GPU PyTorch would use when JAX runs on a GPU too, else ``None``."""
    from . import _bench_peers as bp

    try:
        import torch
    except ImportError:
        return None
    return torch.cuda.get_device_name() if bp.torch_device() == "cuda" else None


def _machine() -> dict:
    import jax

    load = os.getloadavg() if hasattr(os, "getloadavg") else None
    return {
        "platform": platform.platform(),
        "python": sys.version.split()[0],
        "cpu_model": _cpu_model(),
        "cores": _cores(),
        "jax_backend": jax.default_backend(),
        "jax_devices": [str(d) for d in jax.devices()],
        "jax_device_count": jax.device_count(),
        "device_kind": jax.devices()[0].device_kind,
        "torch_cuda": _torch_cuda_name(),
        "versions": _versions(),
        "load_average_start": load,
    }


# ------------------------------------------------------------------------------ run


def _available(peers: list[str]) -> tuple[list[str], dict[str, str]]:
    import importlib

    from ._bench_peers import IMPORTS

    ok, skipped = [], {}
    for peer in PEER_NAMES:
        if peer not in peers:
            skipped[peer] = "not selected (--peers)"
            continue
        if peer == "sharded" and _device_count() < 2:
            skipped[peer] = (f"one {_backend()} device: nothing to split the batch over (on "
                             "a CPU, start the run with --cpu-devices N for N devices)")
            continue
        module = IMPORTS.get(peer)
        if module is not None:
            try:
                importlib.import_module(module)
            except Exception as err:  # noqa: BLE001 - any import failure skips the peer
                skipped[peer] = f"cannot import {module}: {type(err).__name__}: {err}"
                continue
        ok.append(peer)
    return ok, skipped


def _device_count() -> int:
    import jax

    return jax.device_count()


def _backend() -> str:
    import jax

    return jax.default_backend()


def _start_cpu_devices(n: int | None) -> None:
    """Starts JAX's CPU backend with ``n`` devices; a clear error where JAX has started
    already with another number (then only the environment can set it)."""
    if n is None:
        return
    import jax

    if n < 1:
        raise SystemExit(f"jax-rnn bench: --cpu-devices must be at least 1, got {n}")
    try:
        jax.config.update("jax_num_cpu_devices", n)
    except RuntimeError:  # JAX's backends have started in this process
        pass
    try:
        have = len(jax.devices("cpu"))
    except RuntimeError as err:  # e.g. JAX_PLATFORMS without cpu
        raise SystemExit(f"jax-rnn bench: --cpu-devices {n}: JAX has no CPU backend here "
                         f"({err}); leave the flag out") from err
    if _backend() != "cpu":
        print(f"jax-rnn bench: --cpu-devices {n} sets JAX's CPU devices, but the default "
              f"backend is {_backend()}: the sharded row splits the batch over its devices")
    if have != n:
        raise SystemExit(
            f"jax-rnn bench: --cpu-devices {n}: JAX's CPU backend has already started with "
            f"{have} device(s) in this process, and the count is fixed when it starts. Run "
            f"the command line (jax-rnn bench ...) in a fresh process, or set "
            f"JAX_NUM_CPU_DEVICES={n} before JAX starts.")


def _has_impl() -> bool:
    import inspect

    import jax_rnn

    return "impl" in inspect.signature(jax_rnn.unroll).parameters


class _Progress:
    """A rich progress bar, or one line per step without rich."""

    def __init__(self) -> None:
        self.bar: Any = None
        self.total, self.done = 0, 0
        try:
            from rich.progress import (
                BarColumn,
                MofNCompleteColumn,
                Progress,
                TextColumn,
                TimeElapsedColumn,
            )
        except ImportError:
            return
        self.bar = Progress(TextColumn("{task.description:<46}"), BarColumn(),
                            MofNCompleteColumn(), TimeElapsedColumn(), transient=False)
        self.task = self.bar.add_task("bench", total=None)

    def __enter__(self) -> _Progress:
        if self.bar is not None:
            self.bar.__enter__()
        return self

    def __exit__(self, *exc: Any) -> None:
        if self.bar is not None:
            self.bar.__exit__(*exc)

    def add(self, steps: int) -> None:
        self.total += steps
        if self.bar is not None:
            self.bar.update(self.task, total=self.total)

    def step(self, text: str, advance: int = 1) -> None:
        if self.bar is not None:
            self.bar.update(self.task, description=text, advance=advance)
        elif advance:
            self.done += advance
            print(f"[{self.done}/{self.total}] {text}", flush=True)

    def log(self, text: str) -> None:
        if self.bar is not None:
            self.bar.console.print(text)
        else:
            print(text, flush=True)


def _runners_for(c: Config, cell: str, params: Any, xs: Any, peers: list[str],
                 has_impl: bool, notes: list[str]) -> list[Any]:
    from . import _bench_peers as bp

    runners = [bp.jax_rnn_runner(cell, params, xs, None, has_impl)]
    if "scan" in peers:
        runners.append(bp.jax_rnn_runner(cell, params, xs, "scan", has_impl))
    if "raveled" in peers:
        if _flops_fwd_bwd(c, cell) <= RAVELED_MAX_FLOPS:
            runners.append(bp.jax_rnn_raveled_runner(cell, params, xs))
        else:
            notes.append(f"raveled: not run at {c.name}, over RAVELED_MAX_FLOPS "
                         f"({RAVELED_MAX_FLOPS:.0e} FLOPs forward+backward)")
    if "sharded" in peers:
        devices = _device_count()
        if xs.shape[1] % devices:
            notes.append(f"sharded/{cell}: batch {xs.shape[1]} is not a multiple of the "
                         f"{devices} devices; not run at this size")
        else:
            runners.append(bp.jax_rnn_sharded_runner(cell, params, xs))
    for peer in ("numpy", "flax", "haiku", "equinox", "torch"):
        if peer not in peers:
            continue
        if (peer, cell) in bp.ABSENT:
            notes.append(f"{peer}/{cell}: {bp.ABSENT[peer, cell]}")
            continue
        try:
            runners.extend(bp.BUILDERS[peer](cell, params, xs))
        except Exception as err:  # noqa: BLE001 - a broken peer must not stop the run
            notes.append(f"{peer}/{cell}: could not build: {type(err).__name__}: {err}")
    return runners


def _max_abs(a: Any, b: Any) -> float:
    import numpy as np

    a, b = np.asarray(a, np.float64), np.asarray(b, np.float64)
    if a.shape != b.shape:
        return float("inf")
    return float(np.max(np.abs(a - b))) if a.size else 0.0


def _bench_cell(c: Config, cell: str, dtype: str, seed: int, peers: list[str], has_impl: bool,
                repeats: int, budget: float, matmul_n: int,
                progress: _Progress) -> tuple[list[dict], list[str], dict]:
    """Checks and times every implementation of one cell at one size.

    Returns the rows, notes, and the matmul throughput sampled in the same rounds as the
    forward+backward timings (so that the fraction of it compares like with like).
    """
    import numpy as np

    from . import _bench_peers as bp

    rng = np.random.default_rng(seed)
    xs = rng.standard_normal((c.T, c.B, c.I)).astype(dtype)
    params = bp.init_params(cell, seed, c.I, c.H, dtype)
    notes: list[str] = []
    runners = _runners_for(c, cell, params, xs, peers, has_impl, notes)
    progress.add((len(runners) + 1) * len(MODES))
    matmul_call = _matmul_call(matmul_n, dtype)
    _, matmul_inner, _ = _warm_up(matmul_call, compiles=True)
    matmul: dict = {}
    tol = (2e-4 if dtype == "float32" else 1e-9)
    rows: list[dict[str, Any]] = [
        {"config": c.name, "cell": cell, "impl": r.impl, "label": r.label,
         "library": r.library, "equivalent": r.equivalent, "note": r.note}
        for r in runners
    ]
    ref_out = None
    grads_of: dict[str, dict] = {}  # the gradients of jax_rnn's rows and the numpy loop's
    for mode in MODES:
        live = []  # (runner, row, first_call_s, calls_per_sample)
        for r, row in zip(runners, rows, strict=True):
            what = f"{c.name} {cell} {r.impl} {mode}"
            progress.step(what, advance=0)
            if "error" in row:
                progress.step(what)
                continue
            try:
                call = r.forward if mode == "forward" else r.fwd_bwd
                first, inner, result = _warm_up(call, compiles=r.jit)
                if mode == "forward":
                    out = bp.to_numpy(result)
                    ref_out = out if ref_out is None else ref_out
                    scale = max(1.0, float(np.max(np.abs(ref_out))) if ref_out.size else 1.0)
                    diff = _max_abs(out, ref_out)
                    row["check"] = {"max_abs_diff": diff, "tolerance": tol * scale,
                                    "agrees": bool(diff <= tol * scale)}
                    if not row["check"]["agrees"]:
                        verdict = "not equivalent" if not r.equivalent else "MISMATCH"
                        progress.log(f"[{c.name} {cell}] {r.label}: forward max|diff| "
                                     f"{diff:.3g} vs jax_rnn ({verdict})")
                elif r.impl in ("jax_rnn", "jax_rnn.scan", "numpy",
                                *(f"jax_rnn.{name}" for name in BESIDE)):
                    grads = bp.grads_as_dict(r.unravel(result[1]))
                    grads_of[r.impl] = grads
                    ref_grads = next(iter(grads_of.values()))  # the first row's
                    row["check"]["grad_max_abs_diff"] = max(
                        _max_abs(g, ref_grads[k]) for k, g in grads.items())
                del result
                live.append((r, row, first, inner))
            except Exception as err:  # noqa: BLE001 - report and go on with the next row
                row["error"] = f"{mode}: {type(err).__name__}: {err}"
                progress.log(f"[{c.name} {cell}] {r.label} failed: {row['error']}")
            progress.step(what)
        progress.step(f"{c.name} {cell} timing {mode}", advance=0)
        calls = [(r.forward if mode == "forward" else r.fwd_bwd, inner)
                 for r, _, _, inner in live]
        spinning = [r.library in SPINNING for r, _, _, _ in live]
        if mode == "fwd_bwd":
            calls.append((matmul_call, matmul_inner))
            spinning.append(False)
        times = _sample_interleaved(calls, repeats, budget, spinning)
        if mode == "fwd_bwd":
            samples = times.pop()
            median = statistics.median(samples)
            matmul = {"n": matmul_n, "dtype": dtype, "flops": 2.0 * matmul_n**3,
                      "median_s": median, "flops_per_s": 2.0 * matmul_n**3 / median,
                      "times_s": samples, "calls_per_sample": matmul_inner}
        for (r, row, first, inner), samples in zip(live, times, strict=True):
            row[mode] = _stats(first, inner, samples, r.jit)
            mem, kind = r.memory(mode)
            row[mode].update(memory_bytes=mem, memory_kind=kind)
        progress.step(f"{c.name} {cell} timing {mode}")
    _check_grads(rows, grads_of, cell, params, xs, GRAD_RTOL.get(dtype, GRAD_RTOL["float32"]))
    return rows, notes, matmul


def _rel_diff(grads: dict, ref: dict) -> float:
    """The largest ``|grads - ref|`` over the parameters of ``ref``, each relative to
    that parameter's largest ``|ref|`` (0 where both are zero; inf where a parameter is
    missing or has another shape)."""
    import numpy as np

    worst = 0.0
    for k, r in ref.items():
        if k not in grads:
            return float("inf")
        diff = _max_abs(grads[k], r)
        scale = float(np.max(np.abs(np.asarray(r, np.float64)))) if np.size(r) else 0.0
        if diff > 0:
            worst = max(worst, diff / scale if scale > 0 else float("inf"))
    return worst


def _check_grads(rows: list[dict], grads_of: dict[str, dict], cell: str, params: Any,
                 xs: Any, tolerance: float) -> None:
    """Adds to each row with gradients its relative difference from jax_rnn's
    (``grad_rel_diff``) and from a float64 numpy reference (``grad_rel_err_float64``),
    and to jax_rnn's row its difference from ``impl="scan"``'s, the bar's value
    (``grad_rel_diff_vs_scan``, ``grad_tolerance``); see :func:`_rel_diff`."""
    import numpy as np

    from . import _bench_peers as bp

    if not grads_of:
        return
    wide = type(params)(*(None if a is None else np.asarray(a, np.float64) for a in params))
    exact = bp.numpy_fwd_bwd(cell, wide, np.asarray(xs, np.float64))[1]
    ours = grads_of.get("jax_rnn")
    for row in rows:
        grads = grads_of.get(row["impl"])
        if grads is None:
            continue
        check = row["check"]
        if ours is not None:
            check["grad_rel_diff"] = _rel_diff(grads, ours)
        check["grad_rel_err_float64"] = _rel_diff(grads, exact)
        if row["impl"] == "jax_rnn" and "jax_rnn.scan" in grads_of:
            check["grad_rel_diff_vs_scan"] = _rel_diff(grads, grads_of["jax_rnn.scan"])
            check["grad_tolerance"] = tolerance


def _summarize(results: list[dict], configs: list[Config], cells: list[str],
               matmul: dict[tuple[str, str], dict]) -> list[dict]:
    """Per config and cell: jax_rnn's times, the fastest peer, ratios, achieved FLOP/s."""
    summary = []
    for c in configs:
        for cell in cells:
            rows = [r for r in results if r["config"] == c.name and r["cell"] == cell]
            ours = next((r for r in rows if r["impl"] == "jax_rnn" and "fwd_bwd" in r), None)
            if ours is None:
                continue
            entry: dict[str, Any] = {"config": c.name, "cell": cell, "sizes": c.describe()}
            for mode in MODES:
                t = ours[mode]["median_s"]
                timed = [r for r in rows if r["impl"] in EXTERNAL and mode in r
                         and r["equivalent"] and r.get("check", {}).get("agrees")]
                best = _fastest(mode, [r for r in timed if r["impl"] in LIKE_PEERS[cell]])
                best_row = _fastest(mode, timed)
                scan = next((r for r in rows if r["impl"] == "jax_rnn.scan" and mode in r), None)
                entry[mode] = {
                    "jax_rnn_s": t,
                    "fastest_peer": best["impl"] if best else None,
                    "fastest_peer_s": best[mode]["median_s"] if best else None,
                    "ratio_vs_fastest_peer": best[mode]["median_s"] / t if best else None,
                    "fastest_row": best_row["impl"] if best_row else None,
                    "ratio_vs_fastest_row": (best_row[mode]["median_s"] / t if best_row
                                             else None),
                    "ratio_vs_scan": scan[mode]["median_s"] / t if scan else None,
                    "ratios": {r["impl"]: r[mode]["median_s"] / t for r in rows if mode in r},
                }
                for name in BESIDE:  # each with its own time and ratio, "sharded_s", ...
                    row = next((r for r in rows if r["impl"] == f"jax_rnn.{name}"
                                and mode in r and r.get("check", {}).get("agrees")), None)
                    row_s = row[mode]["median_s"] if row else None
                    entry[mode][f"{name}_s"] = row_s
                    entry[mode][f"{name}_ratio_vs_fastest_peer"] = (
                        best[mode]["median_s"] / row_s if best and row_s else None)
            check = ours.get("check", {})
            scan_check = next((r.get("check", {}) for r in rows
                               if r["impl"] == "jax_rnn.scan"), {})
            entry["grads"] = {
                "rel_diff_vs_scan": check.get("grad_rel_diff_vs_scan"),
                "tolerance": check.get("grad_tolerance"),
                "jax_rnn_rel_err_float64": check.get("grad_rel_err_float64"),
                "scan_rel_err_float64": scan_check.get("grad_rel_err_float64"),
            }
            flops = _flops_fwd_bwd(c, cell)
            achieved = flops / ours["fwd_bwd"]["median_s"]
            entry["fwd_bwd_flops"] = flops
            entry["fwd_bwd_flops_per_s"] = achieved
            mm = matmul.get((c.name, cell)) or {}
            entry["matmul"] = mm
            entry["fwd_bwd_matmul_fraction"] = (
                achieved / mm["flops_per_s"] if mm.get("flops_per_s") else None)
            summary.append(entry)
    return summary


def _fastest(mode: str, rows: list[dict]) -> dict | None:
    return min(rows, key=lambda r: r[mode]["median_s"], default=None)


def _bars(summary: list[dict]) -> list[dict]:
    out = []
    for config, what, threshold in BARS:
        for s in summary:
            if config != "*" and s["config"] != config:
                continue
            row_value = None
            if what == "grads_vs_scan":
                grads = s.get("grads") or {}
                value, threshold = grads.get("rel_diff_vs_scan"), grads.get("tolerance")
                passes = None if value is None else bool(value <= threshold)
            else:
                if what == "fwd_bwd_matmul_fraction":
                    value = s["fwd_bwd_matmul_fraction"]
                else:
                    entry = s["forward" if what.startswith("forward") else "fwd_bwd"]
                    value = entry["ratio_vs_fastest_peer"]
                    row_value = entry["ratio_vs_fastest_row"]
                passes = None if value is None else bool(value >= threshold)
            out.append({"config": s["config"], "cell": s["cell"], "bar": what,
                        "threshold": threshold, "value": value, "passes": passes,
                        "at_most": what == "grads_vs_scan",
                        "value_vs_fastest_row": row_value})
    return out


# --------------------------------------------------------------------------- output


def _ms(s: float | None) -> str:
    if s is None:
        return "–"
    if s >= 1:
        return f"{s * 1e3:,.0f}"
    if s >= 1e-3:
        return f"{s * 1e3:.3g}"
    return f"{s * 1e3:.3f}"


def _mb(row: dict, mode: str) -> str:
    m = row.get(mode, {})
    if m.get("memory_bytes") is None:
        return "–"
    mark = {"xla_temp": "x", "tracemalloc_peak": "t", "rss_peak_growth": "r",
            "cuda_peak_growth": "c"}.get(m["memory_kind"], "?")
    return f"{m['memory_bytes'] / 2**20:.3g} {mark}"


def _pct(x: float | None) -> str:
    return "–" if x is None else f"{x:.1%}"


def _gflops(matmul: dict) -> str:
    return f"{matmul['flops_per_s'] / 1e9:.1f}" if matmul.get("flops_per_s") else "–"


def _time(stats: dict) -> str:
    """The median in ms, starred when fewer than 3 samples were taken."""
    return _ms(stats["median_s"]) + ("*" if len(stats["times_s"]) < 3 else "")


def _ratio(x: float | None) -> str:
    return "–" if x is None else f"{x:.2f}"


def _markdown(doc: dict) -> str:
    m, mm = doc["machine"], doc["matmul"]
    v = m["versions"]
    lines = [
        "# jax-rnn bench",
        "",
        f"Machine: {m['cpu_model']}, {m['cores']} cores, {m['platform']}; "
        f"JAX {v['jax']} ({m['jax_backend']}: {m.get('device_kind', '?')}), "
        f"PyTorch {v['torch']}, Flax {v['flax']}, "
        f"Haiku {v['dm-haiku']}, Equinox {v['equinox']}, numpy {v['numpy']}. "
        f"Load average at start {m['load_average_start']}, at end "
        f"{doc['load_average_end']}.",
        "",
        f"dtype {doc['settings']['dtype']}, matmul precision "
        f"{doc['settings'].get('precision', 'default')}; matmul throughput "
        f"({mm['n']}x{mm['n']} jitted "
        f"JAX matmul, median) at the start: {mm['flops_per_s'] / 1e9:.1f} GFLOP/s. The same "
        "matmul is timed again in the forward+backward rounds of every config and cell, "
        "interleaved with the implementations; 'of matmul' divides jax_rnn's achieved "
        "FLOP/s (6*T*B*(I+H)*H per gate group) by that measurement (column 'matmul').",
        "",
        "Times are medians in milliseconds; ratio = that row's time / jax_rnn's "
        "(> 1: jax_rnn is faster). Memory (MiB): x = XLA temp buffers of the compiled "
        "function, t = tracemalloc peak, r = growth of the resident set (approximate), "
        "c = growth of PyTorch's CUDA allocations. A starred time had fewer than 3 "
        "samples (slow calls are sampled once).",
        "",
        "## Summary",
        "",
        "'fastest peer' is the fastest like peer of the issue's bars (tanh Elman: Flax, "
        "PyTorch; ReLU Elman: Haiku, Flax, PyTorch; GRU and LSTM: Flax, Haiku, Equinox, "
        "PyTorch); 'all rows' is the fastest of every row including the numpy loop.",
        "",
        "| config | sizes | cell | jax_rnn fwd | fastest peer fwd | ratio | jax_rnn fwd+bwd "
        "| fastest peer fwd+bwd | ratio | vs all rows (fwd / fwd+bwd) "
        "| vs impl=scan (fwd+bwd) | GFLOP/s | matmul GFLOP/s | of matmul |",
        "|---|---|---|---:|---|---:|---:|---|---:|---|---:|---:|---:|---:|",
    ]
    for s in doc["summary"]:
        f, b = s["forward"], s["fwd_bwd"]
        lines.append(
            f"| {s['config']} | {s['sizes']} | {CELL_LABELS[s['cell']]} | {_ms(f['jax_rnn_s'])} "
            f"| {f['fastest_peer'] or '–'} {_ms(f['fastest_peer_s'])} "
            f"| {_ratio(f['ratio_vs_fastest_peer'])} | {_ms(b['jax_rnn_s'])} "
            f"| {b['fastest_peer'] or '–'} {_ms(b['fastest_peer_s'])} "
            f"| {_ratio(b['ratio_vs_fastest_peer'])} "
            f"| {_vs_row(f)} / {_vs_row(b)} | {_ratio(b['ratio_vs_scan'])} "
            f"| {s['fwd_bwd_flops_per_s'] / 1e9:.2f} | {_gflops(s['matmul'])} "
            f"| {_pct(s['fwd_bwd_matmul_fraction'])} |")
    for name, (title, what) in BESIDE.items():
        beside = [s for s in doc["summary"] if s["fwd_bwd"].get(f"{name}_s")
                  or s["forward"].get(f"{name}_s")]
        if not beside:
            continue
        title = title.format(devices=doc["machine"].get("jax_device_count", "?"))
        lines += ["", f"## {title} (row `jax_rnn.{name}`)", "",
                  f"{what} Ratio = the fastest like peer's time / this row's. Reported "
                  "beside the bars, not counted in them.", "",
                  "| config | cell | fwd | ratio | fwd+bwd | ratio |",
                  "|---|---|---:|---:|---:|---:|"]
        for s in beside:
            f, b = s["forward"], s["fwd_bwd"]
            lines.append(f"| {s['config']} | {CELL_LABELS[s['cell']]} | {_ms(f[f'{name}_s'])} "
                         f"| {_ratio(f[f'{name}_ratio_vs_fastest_peer'])} "
                         f"| {_ms(b[f'{name}_s'])} "
                         f"| {_ratio(b[f'{name}_ratio_vs_fastest_peer'])} |")
    if doc["bars"]:
        lines += ["", "## The issue's bars", "", "| config | cell | bar | threshold | value | "
                  "passes | vs all rows (incl. numpy) |", "|---|---|---|---:|---:|---|---:|"]
        for b in doc["bars"]:
            at_most = b.get("at_most", False)
            form = ".2g" if at_most else ".2f"
            value = "–" if b["value"] is None else format(b["value"], form)
            threshold = (f"≤ {b['threshold']:g}" if at_most and b["threshold"] is not None
                         else b["threshold"])
            passes = {None: "n/a", True: "yes", False: "**no**"}[b["passes"]]
            lines.append(f"| {b['config']} | {CELL_LABELS[b['cell']]} | {b['bar']} "
                         f"| {threshold} | {value} | {passes} "
                         f"| {_ratio(b.get('value_vs_fastest_row'))} |")
        lines += ["", "grads_vs_scan: the largest difference between jax_rnn's gradients and "
                  "impl=\"scan\"'s, per parameter, relative to that parameter's largest "
                  "impl=\"scan\" gradient; each one's distance from a float64 numpy "
                  "reference, measured the same way, is in the JSON (`summary[].grads`) "
                  "and in the tables below (grads: relative to jax_rnn's; vs float64)."]
    for c in doc["configs"]:
        lines += ["", f"## {c['name']} ({Config(**c).describe()})", "",
                  "| cell | implementation | fwd ms | fwd+bwd ms | fwd ratio | fwd+bwd ratio | "
                  "compile fwd / fwd+bwd s | mem fwd | mem fwd+bwd "
                  "| max abs diff (outputs; grads) |",
                  "|---|---|---:|---:|---:|---:|---|---:|---:|---|"]
        for s in (s for s in doc["summary"] if s["config"] == c["name"]):
            for r in (r for r in doc["results"] if r["config"] == c["name"]
                      and r["cell"] == s["cell"]):
                if "error" in r:
                    lines.append(f"| {CELL_LABELS[r['cell']]} | {r['label']} | failed: "
                                 f"{r['error'][:80]} |||||||| ")
                    continue
                comp = " / ".join("–" if r[m]["compile_s"] is None else
                                  f"{r[m]['compile_s']:.2f}" for m in MODES)
                check = r["check"]
                diff = f"{check['max_abs_diff']:.2g}"
                if not r["equivalent"]:
                    diff += " (not equivalent)"
                elif not check["agrees"]:
                    diff += " **MISMATCH**"
                if "grad_rel_err_float64" in check:
                    diff += (f"; grads {check.get('grad_rel_diff', float('nan')):.2g}, "
                             f"vs float64 {check['grad_rel_err_float64']:.2g}")
                lines.append(
                    f"| {CELL_LABELS[r['cell']]} | {r['label']} | "
                    f"{_time(r['forward'])} | {_time(r['fwd_bwd'])} | "
                    f"{_ratio(s['forward']['ratios'].get(r['impl']))} | "
                    f"{_ratio(s['fwd_bwd']['ratios'].get(r['impl']))} | {comp} | "
                    f"{_mb(r, 'forward')} | {_mb(r, 'fwd_bwd')} | {diff} |")
    if doc["notes"] or doc["skipped"]:
        lines += ["", "## Notes", ""]
        lines += [f"- skipped {k}: {v}" for k, v in doc["skipped"].items()]
        lines += [f"- {n}" for n in doc["notes"]]
    return "\n".join(lines) + "\n"


def _plot(doc: dict, path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    import numpy as np

    configs = [c["name"] for c in doc["configs"]]
    impls: list[str] = []
    for r in doc["results"]:
        if r["impl"] not in impls and "error" not in r:
            impls.append(r["impl"])
    colors = {impl: plt.get_cmap("tab10")(i % 10) for i, impl in enumerate(impls)}
    fig, axes = plt.subplots(len(configs), 2, figsize=(13, 2.9 * len(configs) + 0.8),
                             squeeze=False)
    width = 0.8 / max(len(impls), 1)
    for i, name in enumerate(configs):
        cfg = next(c for c in doc["configs"] if c["name"] == name)
        cells = [s["cell"] for s in doc["summary"] if s["config"] == name]
        for j, mode in enumerate(MODES):
            ax = axes[i][j]
            for k, impl in enumerate(impls):
                xs, ys = [], []
                for ci, cell in enumerate(cells):
                    row = next((r for r in doc["results"] if r["config"] == name
                                and r["cell"] == cell and r["impl"] == impl and mode in r), None)
                    if row is not None:
                        xs.append(ci + (k - (len(impls) - 1) / 2) * width)
                        ys.append(row[mode]["median_s"] * 1e3)
                ax.bar(xs, ys, width, color=colors[impl], label=impl)
            ax.set_xticks(np.arange(len(cells)), [CELL_LABELS[c] for c in cells])
            ax.set_yscale("log")
            ax.set_ylabel("ms (median)")
            title = "forward" if mode == "forward" else "forward + backward"
            ax.set_title(f"{name} ({Config(**cfg).describe()}): {title}", fontsize=9)
            ax.grid(axis="y", alpha=0.3, which="both")
    height = fig.get_figheight()
    # One patch per row, in its own colour: a size where a row has no bars (jax_rnn.sharded
    # at B=1) must not lend the legend an empty, default-coloured handle.
    from matplotlib.patches import Patch

    handles = [Patch(color=colors[impl], label=impl) for impl in impls]
    fig.legend(handles=handles, loc="lower center", ncol=min(len(impls), 8), fontsize=8)
    m = doc["machine"]
    where = (m["device_kind"] if m.get("jax_backend") == "gpu" and m.get("device_kind")
             else f"{m['cpu_model']} ({m['cores']} cores)")
    fig.suptitle(f"jax-rnn bench, {doc['settings']['dtype']}, {where}; median times, "
                 "lower is better",
                 fontsize=10)
    fig.tight_layout(rect=(0, 0.45 / height, 1, 1 - 0.35 / height))
    fig.savefig(path, dpi=110)
    plt.close(fig)


def _vs_row(entry: dict) -> str:
    """``"numpy 0.93"``: the fastest of all rows and jax_rnn's ratio against it."""
    if entry.get("fastest_row") is None:
        return "–"
    return f"{entry['fastest_row']} {_ratio(entry['ratio_vs_fastest_row'])}"


def _print_ratios(doc: dict, log: Callable[[str], None]) -> None:
    log("\nratio = peer time / jax_rnn time (> 1: jax_rnn is faster); medians of one run")
    for s in doc["summary"]:
        f, b = s["forward"], s["fwd_bwd"]
        log(f"  {s['config']:<10} {CELL_LABELS[s['cell']]:<10} "
            f"fwd {_ms(f['jax_rnn_s']):>8} ms vs {f['fastest_peer'] or '-'} "
            f"{_ratio(f['ratio_vs_fastest_peer'])}x | fwd+bwd {_ms(b['jax_rnn_s']):>8} ms vs "
            f"{b['fastest_peer'] or '-'} {_ratio(b['ratio_vs_fastest_peer'])}x, "
            f"impl=scan {_ratio(b['ratio_vs_scan'])}x | "
            f"{_pct(s['fwd_bwd_matmul_fraction'])} of matmul FLOP/s")
    for name, (title, _) in BESIDE.items():
        title = title.format(devices=doc["machine"].get("jax_device_count"))
        for s in doc["summary"]:
            f, b = s["forward"], s["fwd_bwd"]
            if f.get(f"{name}_s") or b.get(f"{name}_s"):
                log(f"  {s['config']:<10} {CELL_LABELS[s['cell']]:<10} {title}: fwd "
                    f"{_ms(f[f'{name}_s'])} ms "
                    f"({_ratio(f[f'{name}_ratio_vs_fastest_peer'])}x) | fwd+bwd "
                    f"{_ms(b[f'{name}_s'])} ms ({_ratio(b[f'{name}_ratio_vs_fastest_peer'])}x)")
    for b in doc["bars"]:
        if b["passes"] is False:
            log(f"  bar not met: {b['config']} {b['cell']} {b['bar']} = {b['value']:.3g} "
                f"{'>' if b.get('at_most') else '<'} {b['threshold']}")


def _command(args: argparse.Namespace) -> str:
    """The command line that reproduces ``args``."""
    parts = ["jax-rnn", "bench"]
    for flag in ("configs", "cells", "peers"):
        if getattr(args, flag):
            parts += [f"--{flag}", *getattr(args, flag)]
    for flag in ("repeats", "budget", "matmul_size"):
        if getattr(args, flag) is not None:
            parts += [f"--{flag.replace('_', '-')}", str(getattr(args, flag))]
    if args.quick:
        parts.append("--quick")
    if args.no_plot:
        parts.append("--no-plot")
    if getattr(args, "precision", "default") != "default":
        parts += ["--precision", args.precision]
    if getattr(args, "cpu_devices", None) is not None:
        parts += ["--cpu-devices", str(args.cpu_devices)]
    parts += ["--dtype", args.dtype, "--seed", str(args.seed), "--out", str(args.out)]
    return " ".join(parts)


def run(args: argparse.Namespace) -> int:
    """Runs the benchmark and writes bench.json, bench.md and bench.png under ``--out``.

    With ``--precision highest`` every matrix product runs in full float32 (JAX's
    ``"highest"`` precision, PyTorch's TF32 off) for the run only. ``--cpu-devices N``
    starts JAX's CPU backend with N devices first (before anything else touches JAX).
    """
    _start_cpu_devices(getattr(args, "cpu_devices", None))
    if getattr(args, "precision", "default") == "highest":
        from . import _bench_peers as bp

        peers = _names(args.peers, PEER_NAMES, "peer") or PEER_NAMES  # 'all', 'a,b' too
        with bp.full_float32(torch_too="torch" in peers):
            return _run(args, "highest")
    return _run(args, "default")


def _run(args: argparse.Namespace, precision: str) -> int:
    import jax

    if args.dtype == "float64":
        jax.config.update("jax_enable_x64", True)
    config_names = _names(args.configs, list(CONFIGS), "config", DEFAULT_CONFIGS) or (
        ["quick"] if args.quick else list(DEFAULT_CONFIGS))
    configs = [CONFIGS[n] for n in config_names]
    cells = _names(args.cells, CELL_NAMES, "cell") or list(CELL_NAMES)
    peers = _names(args.peers, PEER_NAMES, "peer") or list(PEER_NAMES)
    repeats = args.repeats if args.repeats is not None else (2 if args.quick else 7)
    budget = args.budget if args.budget is not None else (0.5 if args.quick else 2.0)
    if repeats < 1:
        raise SystemExit("jax-rnn bench: --repeats must be at least 1")
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)

    peers_ok, skipped = _available(peers)
    if "torch" in peers_ok:
        import torch

        torch.set_num_threads(_cores())
    has_impl = _has_impl()
    machine = _machine()
    for peer, why in skipped.items():
        print(f"jax-rnn bench: skipping {peer}: {why}")
    if not has_impl and "scan" in peers_ok:
        print("jax-rnn bench: jax_rnn.unroll has no `impl` keyword; the impl='scan' row "
              "runs the default path")

    matmul_n = args.matmul_size if args.matmul_size is not None else (256 if args.quick
                                                                       else 2048)
    matmul_repeats = 2 if args.quick else 5
    matmul = _matmul_throughput(matmul_n, args.dtype, matmul_repeats)
    matmul_by_cell: dict[tuple[str, str], dict] = {}
    print(f"jax-rnn bench: {matmul_n}x{matmul_n} matmul: "
          f"{matmul['flops_per_s'] / 1e9:.1f} GFLOP/s ({machine['device_kind']}; "
          f"{machine['cpu_model']}, "
          f"{machine['cores']} cores)")

    results: list[dict] = []
    notes: list[str] = []
    load_by_config: dict[str, Any] = {}
    t_start = time.perf_counter()

    def document(done: list[Config]) -> dict:
        """Everything measured so far (``done``: the configs finished)."""
        run_notes = list(notes)
        if "torch" in peers_ok and machine.get("torch_cuda"):
            run_notes.append(f"torch runs eager on {machine['torch_cuda']} (cuDNN RNN "
                             "kernels), waiting with torch.cuda.synchronize() after each "
                             "call; its forward runs under torch.inference_mode()")
        elif "torch" in peers_ok:
            run_notes.append(f"torch runs eager with torch.set_num_threads({_cores()}) (the "
                             "machine's cores); its forward runs under torch.inference_mode()")
        if "equinox" in peers_ok:
            run_notes.append("Equinox cells are unbatched: vmapped over the batch inside "
                             "lax.scan")
        summary = _summarize(results, done, cells, matmul_by_cell)
        return {
            "command": _command(args),
            "settings": {"dtype": args.dtype, "precision": precision, "repeats": repeats,
                         "budget_s": budget,
                         "seed": args.seed, "quick": args.quick, "peers": peers,
                         "jax_rnn_unroll_has_impl": has_impl,
                         "timing": "median of samples after a warm-up call; JAX functions "
                         "jitted (AOT-compiled on the first call), PyTorch eager; "
                         "compile_s = first call - median",
                         "flops_formula": "6*T*B*(I+H)*H*G, G = 1 (Elman), 3 (GRU), 4 (LSTM)",
                         "memory": {"xla_temp": "compiled.memory_analysis().temp_size_in_bytes",
                                    "tracemalloc_peak": "tracemalloc peak during the first "
                                    "call",
                                    "rss_peak_growth": "peak RSS above the level before the "
                                    "first call, sampled every 0.5 ms (approximate)",
                                    "cuda_peak_growth": "torch.cuda.max_memory_allocated "
                                    "above the level before the first call"}},
            "machine": machine,
            "matmul": matmul,
            "configs": [dataclasses.asdict(c) for c in done],
            "configs_asked": [c.name for c in configs],
            "complete": len(done) == len(configs),
            "skipped": {k: v for k, v in skipped.items()},
            "notes": run_notes,
            "results": results,
            "summary": summary,
            "bars": _bars(summary) if not args.quick else [],
            "wall_s": time.perf_counter() - t_start,
            "load_average_end": os.getloadavg() if hasattr(os, "getloadavg") else None,
            "load_average_at_config_start": load_by_config,
        }

    def write(doc: dict) -> None:
        (out / "bench.json").write_text(json.dumps(doc, indent=1, default=float))
        (out / "bench.md").write_text(_markdown(doc))

    with _Progress() as progress:
        for i, c in enumerate(configs):
            if hasattr(os, "getloadavg"):
                load_by_config[c.name] = os.getloadavg()
            for cell in cells:
                rows, cell_notes, matmul_by_cell[c.name, cell] = _bench_cell(
                    c, cell, args.dtype, args.seed, peers_ok, has_impl,
                    repeats if args.repeats is not None else min(repeats, c.repeats or repeats),
                    budget, matmul_n, progress)
                results.extend(rows)
                notes.extend(n for n in cell_notes if n not in notes)
            if i + 1 < len(configs):  # an interrupted run keeps what it measured
                write(document(configs[: i + 1]))
        progress.step("done", advance=0)
    doc = document(configs)
    write(doc)
    if not args.no_plot:
        try:
            _plot(doc, out / "bench.png")
        except ImportError as err:
            print(f"jax-rnn bench: no plot ({err}); install matplotlib")
    _print_ratios(doc, print)
    print(f"\njax-rnn bench: wrote {out / 'bench.json'}, {out / 'bench.md'}"
          + ("" if args.no_plot else f", {out / 'bench.png'}")
          + f" in {doc['wall_s']:.0f} s")
    return 0
