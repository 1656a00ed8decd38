"""Sequential ``lax.scan`` against DEER and quasi-DEER (``parallel_solve``), forward pass.

    python benchmarks/parallel.py --out DIR [--quick] [--repeats 5] [--dtype float32]

For an Elman tanh cell with PyTorch's initialisation (contractive: spectral radius about
1/sqrt(3)), one sequence (no batch), input size 4, on a grid of lengths T and hidden sizes
H, it measures the median wall time of the jitted forward pass (after a warm-up call that
compiles, ``--repeats`` timed calls), the Newton iterations to converge, and the largest
difference from the scan. Writes ``DIR/parallel.json`` and ``DIR/parallel.md`` (a markdown
table and, per H, the crossover: the smallest T of the grid at which a parallel method
beats the scan).

Combinations whose Jacobians would not fit comfortably in a shared CPU's memory and time
are skipped and reported as such: DEER stores T x H x H Jacobians (several copies during
the associative scan), quasi-DEER T x H diagonals but evaluates the step at every time
step once per iteration.
"""

from __future__ import annotations

import argparse
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
from jax_rnn._parallel import parallel_solve

FULL_T = (100, 1_000, 10_000, 100_000)
FULL_H = (4, 16, 64, 256)
QUICK_T = (100, 1_000, 10_000)
QUICK_H = (4, 16, 64)
INPUT_SIZE = 4
# Skip limits (entries), chosen so that the full grid runs in minutes on 2 CPU cores.
DEER_MAX_T_H2 = 5_000_000  # T * H^2 Jacobian entries
QUASI_MAX_T_H2 = 70_000_000  # T * H^2 multiply-adds per step evaluation over all T
SEQ_MAX_T_H2 = 1_000_000_000


def _median_time(fn: Any, args: tuple, repeats: int) -> float:
    jax.block_until_ready(fn(*args))  # compile + warm-up
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        jax.block_until_ready(fn(*args))
        times.append(time.perf_counter() - start)
    return statistics.median(times)


@functools.cache
def _solver(method: str) -> Any:
    if method == "scan":

        def run(params, xs, carry0):
            final, ys = jax.lax.scan(functools.partial(jax_rnn.elman_step, params), carry0, xs)
            return ys.state, jnp.int32(len(xs)), jnp.bool_(False)

    else:

        def run(params, xs, carry0):
            _, ys, info = parallel_solve(jax_rnn.elman_step, params, carry0, xs, method=method)
            return ys.state, info.iterations, info.fell_back

    return jax.jit(run)


def _skip_reason(method: str, t: int, h: int) -> str | None:
    load = t * h * h
    if method == "deer" and load > DEER_MAX_T_H2:
        return f"T*H^2 = {load:.1e} > {DEER_MAX_T_H2:.0e} Jacobian entries"
    if method == "quasi_deer" and load > QUASI_MAX_T_H2:
        return f"T*H^2 = {load:.1e} > {QUASI_MAX_T_H2:.0e} per iteration"
    if method == "scan" and load > SEQ_MAX_T_H2:
        return f"T*H^2 = {load:.1e} > {SEQ_MAX_T_H2:.0e}"
    return None


def run_grid(ts: tuple, hs: tuple, repeats: int, dtype: Any) -> list[dict]:
    records = []
    for h in hs:
        params = jax_rnn.elman.init(jax.random.key(h), INPUT_SIZE, h, None, dtype=dtype)
        for t in ts:
            xs = jax.random.normal(jax.random.key(t), (t, INPUT_SIZE), dtype)
            carry0 = jnp.zeros((h,), dtype)
            reference = None
            for method in ("scan", "deer", "quasi_deer"):
                record: dict[str, Any] = dict(T=t, H=h, method=method)
                reason = _skip_reason(method, t, h)
                if reason is not None:
                    record["skipped"] = reason
                    records.append(record)
                    print(f"H={h:4d} T={t:7d} {method:10s} skipped: {reason}", flush=True)
                    continue
                fn = _solver(method)
                seconds = _median_time(fn, (params, xs, carry0), repeats)
                states, iterations, fell_back = fn(params, xs, carry0)
                if method == "scan":
                    reference = states
                    error = 0.0
                else:
                    error = None if reference is None else float(jnp.abs(states - reference).max())
                record.update(
                    seconds=seconds,
                    iterations=int(iterations) if method != "scan" else None,
                    fell_back=bool(fell_back),
                    max_abs_diff_vs_scan=error,
                )
                records.append(record)
                print(
                    f"H={h:4d} T={t:7d} {method:10s} {seconds * 1e3:10.2f} ms"
                    + (
                        ""
                        if method == "scan"
                        else f"  iterations={int(iterations):3d}"
                        f"  fell_back={bool(fell_back)}  max|diff|={error}"
                    ),
                    flush=True,
                )
    return records


def crossover(records: list[dict], method: str, h: int) -> str:
    """The smallest T at which ``method`` beats the scan for hidden size ``h``."""
    by_t: dict[int, dict[str, dict]] = {}
    for r in records:
        if r["H"] == h and "seconds" in r:
            by_t.setdefault(r["T"], {})[r["method"]] = r
    measured = [t for t in sorted(by_t) if method in by_t[t] and "scan" in by_t[t]]
    if not measured:
        return "not measured"
    for t in measured:
        if by_t[t][method]["seconds"] < by_t[t]["scan"]["seconds"]:
            return f"T = {t}"
    return f"none up to T = {measured[-1]}"


def markdown(records: list[dict], meta: dict) -> str:
    lines = [
        f"Measured {meta['date']} on {meta['backend']} ({meta['device']}, "
        f"{meta['cpu_count']} cores visible, load average {meta['load_average']}), "
        f"jax {meta['jax']}, {meta['dtype']}, Elman tanh cell, one sequence, input size "
        f"{INPUT_SIZE}; median of {meta['repeats']} runs after a warm-up.",
        "",
        "| H | T | scan (ms) | DEER (ms) | DEER iters | quasi-DEER (ms) | quasi iters "
        "| DEER / scan | quasi / scan |",
        "|---:|---:|---:|---:|---:|---:|---:|---:|---:|",
    ]
    table: dict[tuple[int, int], dict[str, dict]] = {}
    for r in records:
        table.setdefault((r["H"], r["T"]), {})[r["method"]] = r

    def ms(r: dict | None) -> str:
        if r is None or "seconds" not in r:
            return "skipped"
        return f"{r['seconds'] * 1e3:.2f}" + (" (fell back)" if r.get("fell_back") else "")

    def iters(r: dict | None) -> str:
        return "–" if r is None or r.get("iterations") is None else str(r["iterations"])

    def ratio(r: dict | None, base: dict | None) -> str:
        if r is None or base is None or "seconds" not in r or "seconds" not in base:
            return "–"
        return f"{r['seconds'] / base['seconds']:.2f}x"

    for (h, t), row in sorted(table.items()):
        scan, deer, quasi = row.get("scan"), row.get("deer"), row.get("quasi_deer")
        lines.append(
            f"| {h} | {t} | {ms(scan)} | {ms(deer)} | {iters(deer)} | {ms(quasi)} "
            f"| {iters(quasi)} | {ratio(deer, scan)} | {ratio(quasi, scan)} |"
        )
    lines += [
        "",
        "Crossover (smallest T of the grid at which the method is faster than the scan):",
        "",
    ]
    for h in sorted({r["H"] for r in records}):
        lines.append(
            f"- H = {h}: DEER {crossover(records, 'deer', h)}; "
            f"quasi-DEER {crossover(records, 'quasi_deer', h)}"
        )
    if any("skipped" in r for r in records):
        lines += [
            "",
            f"Skipped as too big for this CPU: DEER where T*H^2 > {DEER_MAX_T_H2:.0e} "
            f"(its Jacobians), quasi-DEER where T*H^2 > {QUASI_MAX_T_H2:.0e}, the scan "
            f"where T*H^2 > {SEQ_MAX_T_H2:.0e}.",
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
    args = parser.parse_args()
    if args.dtype == "float64":
        jax.config.update("jax_enable_x64", True)
    dtype = jnp.dtype(args.dtype)
    ts, hs = (QUICK_T, QUICK_H) if args.quick else (FULL_T, FULL_H)
    device = jax.devices()[0]
    meta = dict(
        date=datetime.date.today().isoformat(),
        backend=jax.default_backend(),
        device=getattr(device, "device_kind", str(device)),
        platform=platform.processor() or platform.machine(),
        cpu_count=os.cpu_count(),
        load_average=" ".join(f"{x:.1f}" for x in os.getloadavg()),
        jax=jax.__version__,
        dtype=args.dtype,
        repeats=args.repeats,
        grid=dict(T=list(ts), H=list(hs)),
        cell="elman (tanh), PyTorch init, input size 4, no batch, carry0 = 0",
    )
    print(
        f"backend: {meta['backend']} ({meta['device']}), load average {meta['load_average']}",
        flush=True,
    )
    records = run_grid(ts, hs, args.repeats, dtype)
    meta["load_average_after"] = " ".join(f"{x:.1f}" for x in os.getloadavg())
    args.out.mkdir(parents=True, exist_ok=True)
    (args.out / "parallel.json").write_text(
        json.dumps(dict(meta=meta, records=records), indent=2) + "\n"
    )
    table = markdown(records, meta)
    (args.out / "parallel.md").write_text(table)
    print()
    print(table)


if __name__ == "__main__":
    np.set_printoptions(precision=4)
    main()
