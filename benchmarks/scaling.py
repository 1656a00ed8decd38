"""Times a data-parallel training step on 1, 2 and 4 devices at a fixed global batch.

    python benchmarks/scaling.py [--devices 1 2 4] [--repeats 20] [--rounds 3] [--batch 64]

Each device count runs in a subprocess of its own: on a CPU-only machine the devices are
simulated with ``XLA_FLAGS=--xla_force_host_platform_device_count=N`` (they share the
machine's cores, so this measures overhead, not speed-up); on a machine with N or more
accelerators the subprocess uses the first N of them. For every device count and variant
it prints the median step time and its ratio to one device, measured in the same run
(with ``--rounds``, the median over rounds, each round running every device count once,
and the range of the rounds' medians), and the collectives of the compiled step.

Variants: ``jit`` (:func:`jax_rnn.distributed.data_parallel_step`, default unroll),
``jit-scan`` (the same with ``unroll(..., impl="scan")``) and ``shard_map``
(``method="shard_map"``, explicit ``pmean``).
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import re
import statistics
import subprocess
import sys
import time

VARIANTS = ("jit", "jit-scan", "shard_map")


def _machine() -> str:
    cpu = platform.processor() or "unknown CPU"
    try:
        with open("/proc/cpuinfo") as f:
            cpu = next(line.split(":", 1)[1].strip() for line in f if "model name" in line)
    except (OSError, StopIteration):
        pass
    load = os.getloadavg()[0] if hasattr(os, "getloadavg") else float("nan")
    return f"{cpu}, {os.cpu_count()} cores, load average {load:.1f}"


def child(args: argparse.Namespace) -> None:
    """Runs in a subprocess with ``args.child`` devices; prints one JSON line."""
    import jax
    import jax.numpy as jnp
    import numpy as np
    import optax

    import jax_rnn
    from jax_rnn import distributed

    n = args.child
    mesh = distributed.make_mesh(devices=jax.devices()[:n])
    t, b, i, h = args.length, args.batch, args.features, args.hidden
    rng = np.random.default_rng(0)
    data = {
        "xs": rng.normal(size=(t, b, i)).astype(np.float32),
        "ys": rng.normal(size=(t, b, 1)).astype(np.float32),
        "seq_lengths": rng.integers(t // 2, t + 1, size=b).astype(np.int32),
    }
    batch = distributed.shard_batch(data, mesh)
    optimizer = optax.adam(1e-3)
    params0 = jax_rnn.gru.init(jax.random.key(0), i, h, 1, dtype=jnp.float32)

    def make_loss(**unroll_kwargs):
        def loss_fn(model, params, batch):
            _, ys = jax_rnn.unroll(model, params, batch["xs"],
                                   seq_lengths=batch["seq_lengths"], **unroll_kwargs)
            mask = (jnp.arange(t)[:, None] < batch["seq_lengths"])[..., None]
            return jnp.where(mask, (ys.output - batch["ys"]) ** 2, 0.0).sum() / mask.sum()

        return loss_fn

    variants = {  # name -> (loss_fn, method)
        "jit": (make_loss(), "jit"),
        "jit-scan": (make_loss(impl="scan"), "jit"),
        "shard_map": (make_loss(), "shard_map"),
    }
    out = {"devices": n, "platform": jax.default_backend(), "results": {}}
    for name in args.variants:
        loss_fn, method = variants[name]
        step = distributed.data_parallel_step(
            jax_rnn.gru, loss_fn, optimizer, mesh=mesh, method=method
        )
        params = distributed.replicate(params0, mesh)
        opt_state = optimizer.init(params)
        start = time.perf_counter()
        hlo = step.lower(params, opt_state, batch).compile().as_text() or ""
        compile_s = time.perf_counter() - start
        params, opt_state, loss = step(params, opt_state, batch)  # warm-up
        jax.block_until_ready(loss)
        times = []
        for _ in range(args.repeats):
            start = time.perf_counter()
            params, opt_state, loss = step(params, opt_state, batch)
            jax.block_until_ready((params, loss))
            times.append(time.perf_counter() - start)
        out["results"][name] = {
            "median_ms": 1e3 * statistics.median(times),
            "compile_s": compile_s,
            "collectives": sorted(set(re.findall(
                r"\b(all-gather|all-reduce|all-to-all|collective-permute)\b", hlo))),
        }
    print(json.dumps(out))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--devices", type=int, nargs="+", default=[1, 2, 4])
    parser.add_argument("--variants", nargs="+", default=list(VARIANTS), choices=VARIANTS)
    parser.add_argument("--repeats", type=int, default=20)
    parser.add_argument("--rounds", type=int, default=1,
                        help="repeat the whole measurement; report the median over rounds")
    parser.add_argument("--batch", type=int, default=64, help="global batch (fixed)")
    parser.add_argument("--length", type=int, default=100)
    parser.add_argument("--features", type=int, default=32)
    parser.add_argument("--hidden", type=int, default=128)
    parser.add_argument("--child", type=int, default=0, help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.child:
        child(args)
        return

    print(f"machine: {_machine()}")
    print(f"GRU, T={args.length}, global batch {args.batch}, I={args.features}, "
          f"H={args.hidden}, float32, adam; median of {args.repeats} steps")
    rounds: list[dict] = []
    for _ in range(args.rounds):  # rounds interleave the device counts against drift
        rounds.append(_one_round(args))
    rows = dict(rounds[0])
    if not rows:
        return
    print(f"platform: {next(iter(rows.values()))['platform']}")
    base_n = min(rows)
    for name in args.variants:
        for n in rows:
            medians = [r[n]["results"][name]["median_ms"] for r in rounds if n in r]
            ratios = [r[base_n]["results"][name]["median_ms"] / r[n]["results"][name]["median_ms"]
                      for r in rounds if n in r and base_n in r]
            res = rows[n]["results"][name]
            spread = f" (rounds {min(medians):.1f}-{max(medians):.1f})" if len(medians) > 1 else ""
            print(f"{name:10s} {n} device(s): {statistics.median(medians):8.2f} ms/step{spread}  "
                  f"speed-up vs {base_n}: {statistics.median(ratios):5.2f}x  "
                  f"compile {res['compile_s']:5.1f} s  collectives {res['collectives'] or 'none'}")
    print(f"machine after the run: {_machine()}")


def _one_round(args: argparse.Namespace) -> dict:
    rows = {}
    for n in args.devices:
        env = dict(os.environ)
        env["XLA_FLAGS"] = (env.get("XLA_FLAGS", "")
                            + f" --xla_force_host_platform_device_count={n}")
        cmd = [sys.executable, __file__, "--child", str(n), "--repeats", str(args.repeats),
               "--batch", str(args.batch), "--length", str(args.length),
               "--features", str(args.features), "--hidden", str(args.hidden),
               "--variants", *args.variants]
        proc = subprocess.run(cmd, capture_output=True, text=True, env=env, check=False)
        if proc.returncode:
            print(f"{n} devices: failed\n{proc.stderr[-2000:]}")
            continue
        rows[n] = json.loads(proc.stdout.strip().splitlines()[-1])
    return rows


if __name__ == "__main__":
    main()
