"""jax_rnn's sequential unroll against DEER and quasi-DEER, and PyTorch's ``nn.RNN``.

    python benchmarks/parallel.py --out DIR [--quick] [--repeats 5] [--dtype float32]
        [--precision highest] [--grad-h 16]

For an Elman tanh cell with PyTorch's initialisation (contractive: spectral radius about
1/sqrt(3)), one sequence (batch of one), input size 4, on a grid of lengths T and hidden
sizes H, it measures the median wall time of the jitted forward pass of
``jax_rnn.unroll(elman, params, xs, method=...)`` for ``method="sequential"`` (the
default path, the backend's default scan unroll factor), ``"deer"`` and ``"quasi_deer"``
(after a warm-up call that compiles, ``--repeats`` timed calls), the Newton iterations to
converge, the largest difference from the sequential states, and PyTorch's
``nn.RNN(tanh)`` with the same weights where torch is importable: on the GPU (cuDNN) when
JAX runs on one, else on the CPU. With ``--grad-h`` it also times the gradient of
``sum(states)`` with respect to the params (forward + backward) at those hidden sizes.
Writes ``DIR/parallel.json`` and ``DIR/parallel.md`` (a markdown table and, per H, the
crossover: the smallest T of the grid at which a parallel method beats the sequential).

Combinations whose Jacobians would not fit comfortably are skipped and reported: DEER
stores T x H x H Jacobians (several copies during the associative scan), quasi-DEER
T x H diagonals but evaluates the step at every time step once per iteration. The limits
are larger on an accelerator than on a CPU.
"""

from __future__ import annotations

import argparse
import contextlib
import datetime
import functools
import json
import os
import platform
import statistics
import time
from pathlib import Path
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

import jax_rnn
from jax_rnn import _bench_peers as bp

FULL_T = (100, 1_000, 10_000, 100_000)
FULL_H = (4, 16, 64, 256)
QUICK_T = (100, 1_000, 10_000)
QUICK_H = (4, 16, 64)
INPUT_SIZE = 4
METHODS = ("sequential", "deer", "quasi_deer")
# Skip limits in T * H^2 (Jacobian entries, or multiply-adds of one step evaluation over
# all T), per backend: chosen so that the full grid runs in minutes on 2 CPU cores, and
# in about a minute on one large GPU.
LIMITS = {
    "cpu": {"deer": 5_000_000, "quasi_deer": 70_000_000, "sequential": 1_000_000_000,
            "torch": 1_000_000_000},
    "accelerator": {"deer": 1_000_000_000, "quasi_deer": 10_000_000_000,
                    "sequential": 10_000_000_000, "torch": 10_000_000_000},
}


def _limits() -> dict[str, int]:
    return LIMITS["cpu" if jax.default_backend() == "cpu" else "accelerator"]


def _median_time(fn: Any, repeats: int) -> float:
    jax.block_until_ready(fn())  # compile + warm-up
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        jax.block_until_ready(fn())
        times.append(time.perf_counter() - start)
    return statistics.median(times)


@functools.cache
def _solver(method: str, grad: bool) -> Any:
    def run(params, xs):
        _, ys, info = jax_rnn.unroll(jax_rnn.elman, params, xs, method=method,
                                     return_info=True)
        if info is None:  # method="sequential" reports nothing
            return ys.state, jnp.int32(0), jnp.bool_(False)
        return ys.state, info.iterations, info.fell_back

    if not grad:
        return jax.jit(run)

    def loss(params, xs):
        states, iterations, fell_back = run(params, xs)
        return states.sum(), (iterations, fell_back)

    return jax.jit(jax.grad(loss, has_aux=True))


def _torch_version() -> str | None:
    try:
        import torch
    except ImportError:
        return None
    return torch.__version__


def _skip_reason(method: str, t: int, h: int) -> str | None:
    load, limit = t * h * h, _limits()[method]
    if load > limit:
        return f"T*H^2 = {load:.1e} > {limit:.0e}"
    return None


def _measure(method: str, params: Any, xs: Any, repeats: int, grad: bool,
             reference: Any) -> dict[str, Any]:
    if method == "torch":  # jax-rnn bench's own nn.RNN(tanh) runner, on a batch of one
        runner = bp.torch_runners("elman", jax.tree.map(np.asarray, params),
                                  np.asarray(xs)[:, None, :])[0]
        call = runner.fwd_bwd if grad else runner.forward
        seconds = _median_time(call, repeats)
        record: dict[str, Any] = dict(seconds=seconds, device=bp.torch_device())
        if not grad and reference is not None:
            diff = np.abs(bp.to_numpy(call())[:, 0] - np.asarray(reference)).max()
            record["max_abs_diff_vs_sequential"] = float(diff)
        return record
    fn = _solver(method, grad)
    seconds = _median_time(lambda: fn(params, xs), repeats)
    result, (iterations, fell_back) = (fn(params, xs) if grad else
                                       (lambda r: (r[0], r[1:]))(fn(params, xs)))
    record = dict(seconds=seconds, iterations=int(iterations) if method != "sequential"
                  else None, fell_back=bool(fell_back))
    if grad:
        record["value"] = result
    else:
        record["states"] = result
    if reference is not None:
        pairs = list(zip(jax.tree.leaves(result), jax.tree.leaves(reference), strict=True))
        diff = max(float(jnp.abs(a - b).max()) for a, b in pairs)
        scale = max(float(jnp.abs(b).max()) for _, b in pairs)
        record["max_abs_diff_vs_sequential"] = diff
        # the same difference over the largest entry of the sequential result: gradients
        # of sum(states) over 10^5 steps reach 10^5, where float32 rounding alone is ~0.01
        record["max_rel_diff_vs_sequential"] = diff / scale if scale else diff
    return record


def _run_one(t: int, h: int, params: Any, xs: Any, repeats: int, grad: bool,
             torch: bool) -> list[dict]:
    records: list[dict] = []
    reference = None
    methods = METHODS + (("torch",) if torch else ())
    for method in methods:
        record: dict[str, Any] = dict(T=t, H=h, method=method,
                                      mode="fwd_bwd" if grad else "forward")
        reason = _skip_reason(method, t, h)
        tag = f"H={h:4d} T={t:7d} {record['mode']:8s} {method:10s}"
        if reason is not None:
            record["skipped"] = reason
            records.append(record)
            print(f"{tag} skipped: {reason}", flush=True)
            continue
        try:
            record.update(_measure(method, params, xs, repeats, grad, reference))
        except Exception as err:  # noqa: BLE001 - e.g. out of memory: report, go on
            record["skipped"] = f"{type(err).__name__}: {str(err)[:200]}"
            records.append(record)
            print(f"{tag} failed: {record['skipped']}", flush=True)
            continue
        if method == "sequential":
            reference = record.get("value", record.get("states"))
        record.pop("value", None)
        record.pop("states", None)
        records.append(record)
        extra = ""
        if record.get("iterations") is not None:
            extra += f"  iterations={record['iterations']:3d}  fell_back={record['fell_back']}"
        if "max_abs_diff_vs_sequential" in record:
            extra += f"  max|diff|={record['max_abs_diff_vs_sequential']:.2e}"
        if "max_rel_diff_vs_sequential" in record:
            extra += f" (relative {record['max_rel_diff_vs_sequential']:.1e})"
        print(f"{tag} {record['seconds'] * 1e3:10.3f} ms{extra}", flush=True)
    return records


def run_grid(ts: tuple, hs: tuple, repeats: int, dtype: Any, grad_hs: tuple = (),
             save: Any = None) -> list[dict]:
    """Every (H, T) of the grid, forward; and forward+backward for H in ``grad_hs``.

    ``save(records)``, if given, is called after each hidden size, so that a run cut off
    keeps what it measured.
    """
    records: list[dict] = []
    torch = _torch_version() is not None
    for h in hs:
        params = jax_rnn.elman.init(jax.random.key(h), INPUT_SIZE, h, None, dtype=dtype)
        for t in ts:
            xs = jax.random.normal(jax.random.key(t), (t, INPUT_SIZE), dtype)
            records += _run_one(t, h, params, xs, repeats, False, torch)
            if h in grad_hs:
                records += _run_one(t, h, params, xs, repeats, True, torch)
        if save is not None:
            save(records)
    return records


def crossover(records: list[dict], method: str, h: int, mode: str = "forward") -> str:
    """The smallest T at which ``method`` beats the sequential unroll at hidden size ``h``."""
    by_t: dict[int, dict[str, dict]] = {}
    for r in records:
        if r["H"] == h and r.get("mode", "forward") == mode and "seconds" in r:
            by_t.setdefault(r["T"], {})[r["method"]] = r
    measured = [t for t in sorted(by_t) if method in by_t[t] and "sequential" in by_t[t]]
    if not measured:
        return "not measured"
    for t in measured:
        if by_t[t][method]["seconds"] < by_t[t]["sequential"]["seconds"]:
            return f"T = {t}"
    return f"none up to T = {measured[-1]}"


def _table(records: list[dict], mode: str) -> list[str]:
    lines = [
        "| H | T | sequential (ms) | DEER (ms) | DEER iters | quasi-DEER (ms) | quasi iters "
        "| torch nn.RNN (ms) | sequential / DEER | sequential / quasi | torch / best "
        "parallel |",
        "|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|",
    ]
    table: dict[tuple[int, int], dict[str, dict]] = {}
    for r in records:
        if r.get("mode", "forward") == mode:
            table.setdefault((r["H"], r["T"]), {})[r["method"]] = r

    def ms(r: dict | None) -> str:
        if r is None:
            return "–"
        if "seconds" not in r:
            return "skipped"
        return f"{r['seconds'] * 1e3:.3g}" + (" (fell back)" if r.get("fell_back") else "")

    def iters(r: dict | None) -> str:
        return "–" if r is None or r.get("iterations") is None else str(r["iterations"])

    def speedup(slow: dict | None, fast: dict | None) -> str:
        if slow is None or fast is None or "seconds" not in slow or "seconds" not in fast:
            return "–"
        return f"{slow['seconds'] / fast['seconds']:.3g}x"

    for (h, t), row in sorted(table.items()):
        seq, deer, quasi = row.get("sequential"), row.get("deer"), row.get("quasi_deer")
        timed = [r for r in (deer, quasi) if r is not None and "seconds" in r]
        best = min(timed, key=lambda r: r["seconds"], default=None)
        lines.append(
            f"| {h} | {t} | {ms(seq)} | {ms(deer)} | {iters(deer)} | {ms(quasi)} "
            f"| {iters(quasi)} | {ms(row.get('torch'))} | {speedup(seq, deer)} "
            f"| {speedup(seq, quasi)} | {speedup(row.get('torch'), best)} |"
        )
    return lines


def markdown(records: list[dict], meta: dict) -> str:
    lines = [
        f"Measured {meta['date']} on {meta['backend']} ({meta['device']}; "
        f"{meta['cpu_count']} CPU cores visible, load average {meta['load_average']}), "
        f"jax {meta['jax']}, torch {meta['torch']}, {meta['dtype']}, matmul precision "
        f"{meta['precision']}, Elman tanh cell, one sequence, input size {INPUT_SIZE}; "
        f"median of {meta['repeats']} calls after a warm-up. Speed-ups > 1: the parallel "
        "method is faster.",
        "",
        "Forward (states of every step):",
        "",
        *_table(records, "forward"),
    ]
    if any(r.get("mode") == "fwd_bwd" for r in records):
        lines += ["", "Forward + backward (gradient of sum(states) with respect to the "
                  "params):", "", *_table(records, "fwd_bwd")]
    lines += [
        "",
        "Crossover (smallest T of the grid at which the method beats the sequential "
        "unroll, forward):",
        "",
    ]
    for h in sorted({r["H"] for r in records}):
        lines.append(
            f"- H = {h}: DEER {crossover(records, 'deer', h)}; "
            f"quasi-DEER {crossover(records, 'quasi_deer', h)}"
        )
    if any("skipped" in r for r in records):
        limits = _limits()
        lines += [
            "",
            "Skipped as too big for this machine: where T*H^2 exceeds "
            + ", ".join(f"{k} {v:.0e}" for k, v in limits.items())
            + " (DEER: Jacobian entries; quasi-DEER: multiply-adds per iteration), or "
            "where the run failed (the JSON says why).",
        ]
    return "\n".join(lines) + "\n"


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--out", type=Path, required=True, help="directory for the results")
    parser.add_argument(
        "--quick",
        action="store_true",
        help=f"T in {QUICK_T}, H in {QUICK_H} instead of {FULL_T} x {FULL_H}",
    )
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--dtype", default="float32", choices=["float32", "float64"])
    parser.add_argument(
        "--precision", default="default", choices=["default", "highest"],
        help="'highest': full float32 matrix products in JAX (no TF32 on GPUs) and TF32 "
        "off in PyTorch")
    parser.add_argument("--grad-h", type=int, nargs="*", default=[],
                        help="hidden sizes at which forward+backward is timed too")
    parser.add_argument("--ts", type=int, nargs="*", help="lengths T (overrides the grid)")
    parser.add_argument("--hs", type=int, nargs="*", help="hidden sizes H (overrides)")
    args = parser.parse_args()
    if args.dtype == "float64":
        jax.config.update("jax_enable_x64", True)
    dtype = jnp.dtype(args.dtype)
    ts, hs = (QUICK_T, QUICK_H) if args.quick else (FULL_T, FULL_H)
    ts, hs = tuple(args.ts or ts), tuple(args.hs or hs)
    device = jax.devices()[0]
    meta = dict(
        date=datetime.date.today().isoformat(),
        backend=jax.default_backend(),
        device=getattr(device, "device_kind", str(device)),
        platform=platform.processor() or platform.machine(),
        cpu_count=os.cpu_count(),
        load_average=" ".join(f"{x:.1f}" for x in os.getloadavg()),
        jax=jax.__version__,
        torch=_torch_version() or "not installed",
        dtype=args.dtype,
        precision=args.precision,
        repeats=args.repeats,
        grid=dict(T=list(ts), H=list(hs), grad_H=list(args.grad_h)),
        limits=_limits(),
        default_unroll=jax_rnn.default_unroll(),
        cell="elman (tanh), PyTorch init, input size 4, one sequence, carry0 = 0",
    )
    print(
        f"backend: {meta['backend']} ({meta['device']}), load average {meta['load_average']}",
        flush=True,
    )
    args.out.mkdir(parents=True, exist_ok=True)

    def save(records: list[dict]) -> str:
        meta["load_average_after"] = " ".join(f"{x:.1f}" for x in os.getloadavg())
        (args.out / "parallel.json").write_text(
            json.dumps(dict(meta=meta, records=records), indent=2) + "\n"
        )
        table = markdown(records, meta)
        (args.out / "parallel.md").write_text(table)
        return table

    full = args.precision == "highest"  # full float32 in JAX, TF32 off in PyTorch
    with bp.full_float32(torch_too=True) if full else contextlib.nullcontext():
        records = run_grid(ts, hs, args.repeats, dtype, tuple(args.grad_h), save)
    print()
    print(save(records))


if __name__ == "__main__":
    np.set_printoptions(precision=4)
    main()
