"""Where one jax_rnn call spends its time: XLA's own per-operation timings.

Runs one compiled call (forward, or forward+backward of ``sum(outputs)``) a few times
under :func:`jax.profiler.trace` and totals the trace's events by operation name: the
loops (``while``), the matrix products (``ynn_fusion``/``dot`` on CPUs), the
elementwise fusions, copies and broadcasts. It is how docs/performance.md's "Where the
time goes" accounts for a size; the profiler adds a little time to every operation, so
read the shares, not the absolute times, and compare sizes measured the same way.

Usage (from a checkout)::

    python benchmarks/profile_ops.py --cell lstm --sizes 1000 32 64 128
    python benchmarks/profile_ops.py --cell elman --sizes 200 64 256 512 --top 12
    JAX_NUM_CPU_DEVICES=2 python benchmarks/profile_ops.py --cell lstm --sharded

``--sharded`` splits the batch over every device (``jax_rnn.distributed``), as the
bench's ``jax_rnn.sharded`` row does.
"""

from __future__ import annotations

import argparse
import collections
import gzip
import json
import pathlib
import tempfile
import time

import jax
import jax.numpy as jnp
import numpy as np

import jax_rnn
from jax_rnn import distributed

CELLS = {"elman": jax_rnn.elman, "elman_relu": jax_rnn.elman_relu, "gru": jax_rnn.gru,
         "lstm": jax_rnn.lstm}
# Events of the runtime around the operations, not operations themselves.
RUNTIME = ("ThunkExecutor", "PjitFunction", "CommonPjRt", "Pjrt", "ParseArguments",
           "Handle input", "AllocateOutputBuffers", "PythonRefManager", "Wait for",
           "ThreadpoolListener", "Rendezvous", "Wait:")


def op_times(call, rounds: int) -> tuple[dict[str, list[float]], float]:
    """``({name: [calls, total µs] per call}, wall-clock µs per call)`` over ``rounds``
    calls (the wall clock of the calls as the profiler ran them)."""
    jax.block_until_ready(call())  # compiled and warm
    with tempfile.TemporaryDirectory() as folder:
        with jax.profiler.trace(folder):
            start = time.perf_counter()
            for _ in range(rounds):
                jax.block_until_ready(call())
            wall = (time.perf_counter() - start) * 1e6
        (trace,) = pathlib.Path(folder).glob("**/*.trace.json.gz")
        events = json.load(gzip.open(trace))["traceEvents"]
    totals: dict[str, list[float]] = collections.defaultdict(lambda: [0, 0.0])
    for e in events:
        if e.get("ph") != "X":
            continue
        name = e["name"]
        if name.startswith(("end:", "$")) or name.startswith(RUNTIME):
            continue
        totals[name][0] += 1
        totals[name][1] += e.get("dur", 0.0)
    return ({k: [n / rounds, d / rounds] for k, (n, d) in totals.items()},
            wall / rounds)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--cell", default="lstm", choices=list(CELLS))
    parser.add_argument("--sizes", nargs=4, type=int, default=[1000, 32, 64, 128],
                        metavar=("T", "B", "I", "H"))
    parser.add_argument("--mode", default="fwd_bwd", choices=("forward", "fwd_bwd"))
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--top", type=int, default=20, help="operations to list")
    parser.add_argument("--sharded", action="store_true",
                        help="split the batch over every device (jax_rnn.distributed)")
    args = parser.parse_args()

    steps, batch, inputs, hidden = args.sizes
    cell = CELLS[args.cell]
    params = cell.init(jax.random.key(0), inputs, hidden, None)
    xs = jnp.asarray(np.random.default_rng(0).standard_normal((steps, batch, inputs)),
                     jnp.float32)
    if args.sharded:
        mesh = distributed.make_mesh()
        params, xs = distributed.replicate(params, mesh), distributed.shard_batch(xs, mesh)

    def outputs(p, x):
        return jax_rnn.unroll(cell, p, x)[1].output

    fn = outputs if args.mode == "forward" else jax.value_and_grad(
        lambda p, x: jnp.sum(outputs(p, x)))
    compiled = jax.jit(fn).lower(params, xs).compile()
    totals, wall = op_times(lambda: compiled(params, xs), args.rounds)
    where = f" sharded over {jax.device_count()} devices" if args.sharded else ""
    print(f"{args.cell} T={steps} B={batch} I={inputs} H={hidden} {args.mode}{where}: "
          f"{wall / 1e3:.2f} ms per call under the profiler ({jax.devices()[0].device_kind})")
    # With several devices every device's operations are counted: a share is of the
    # devices' time together (wall clock x devices).
    devices = jax.device_count() if args.sharded else 1
    print(f"{'ms/call':>9} {'share':>6} {'calls':>7} {'us each':>9}  operation")
    for name, (count, total) in sorted(totals.items(), key=lambda kv: -kv[1][1])[:args.top]:
        share = total / (wall * devices) if wall else float("nan")
        print(f"{total / 1e3:9.2f} {share:6.1%} {count:7.0f} {total / max(count, 1):9.1f}  "
              f"{name[:70]}")
    print("(a loop's own row includes the operations inside it; with several devices "
          "each device's operations are counted, and a share is of wall clock x devices)")


if __name__ == "__main__":
    main()
