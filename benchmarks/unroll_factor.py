"""Measures scan's `unroll` factor for jax_rnn.unroll on the current backend.

    python benchmarks/unroll_factor.py [--repeats 7]

Prints, per configuration and cell, the median forward+backward time for unroll factors
1, 2, 4, 8 and 16, and each as a ratio to factor 1 (measured in the same run).
"""

from __future__ import annotations

import argparse
import statistics
import time

import jax
import jax.numpy as jnp
import numpy as np

import jax_rnn

CONFIGS = {"T1000_B32_I64_H128": (1000, 32, 64, 128), "T1000_B1_I16_H32": (1000, 1, 16, 32)}
FACTORS = (1, 2, 4, 8, 16)


def _median_time(fn, args, repeats):
    jax.block_until_ready(fn(*args))
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        jax.block_until_ready(fn(*args))
        times.append(time.perf_counter() - start)
    return statistics.median(times)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--repeats", type=int, default=7)
    args = parser.parse_args()
    print(f"backend: {jax.default_backend()}, devices: {jax.devices()}")
    for name, (t, b, i, h) in CONFIGS.items():
        xs = jnp.asarray(np.random.default_rng(0).normal(size=(t, b, i)), jnp.float32)
        for cell_name in ("elman", "gru", "lstm"):
            cell = getattr(jax_rnn, cell_name)
            params = cell.init(jax.random.key(0), i, h, None, dtype=jnp.float32)
            times = {}
            for factor in FACTORS:
                @jax.jit
                def fwd_bwd(p, x, factor=factor, cell=cell):
                    return jax.grad(lambda p: jax_rnn.unroll(cell, p, x, unroll=factor)[1]
                                    .output.sum())(p)

                times[factor] = _median_time(fwd_bwd, (params, xs), args.repeats)
            row = "  ".join(f"u={f}: {times[f] * 1e3:7.2f} ms ({times[1] / times[f]:.2f}x)"
                            for f in FACTORS)
            print(f"{name:20s} {cell_name:5s} {row}")


if __name__ == "__main__":
    main()
