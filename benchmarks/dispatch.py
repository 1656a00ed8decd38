"""What a tiny jitted call costs besides its arithmetic, on the current backend.

    python benchmarks/dispatch.py [--repeats 15] [--out DIR]

Three measurements, each by ``jax-rnn bench``'s sampler in one process (medians of
interleaved rounds):

* ``arguments``: a compiled call whose ``n`` float32 ``(8,)`` array arguments are all used
  (their sum), for ``n`` = 1 to 8. The slope is JAX's dispatch cost per array argument:
  at the notebook's size (T=5, B=1, I=1, H=2; about 10 us a call) a cell whose parameters
  are four arrays (PyTorch's layout, jax_rnn's ``LSTMParams``) pays for two more than one
  whose parameters are two (Haiku's LSTM).
* ``outputs``: the same with one argument and ``n`` results (forward+backward returns
  one gradient array per parameter array).
* ``lengths``: jax_rnn's default path and ``impl="scan"``, forward+backward at B=1, I=1,
  H=2 over sequence lengths 5 to 400. XLA's CPU runtime runs a computation's operations
  one after another only where every buffer is at most 512 bytes (or there are at most 8
  operations); otherwise it hands them to its thread pool, which costs a fixed amount
  per call. Where that happens shows as a step in the times.

Writes ``dispatch.json`` to ``--out`` (default: print only).
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np

import jax_rnn
from jax_rnn import _bench
from jax_rnn._bench_peers import _Compiled

LENGTHS = (5, 10, 15, 20, 50, 100, 200, 400)


def _rounds(calls: dict, repeats: int) -> dict[str, float]:
    """Median seconds per call of each of ``calls``, by ``jax-rnn bench``'s sampler: group
    sizes from warm calls, then the calls in turn, in a changing order, round after round."""
    timed = [(call, _bench._warm_up(call, compiles=True)[1]) for call in calls.values()]
    samples = _bench._sample_interleaved(timed, repeats, float("inf"))
    return {key: statistics.median(t) for key, t in zip(calls, samples, strict=True)}


def arguments(repeats: int) -> dict[str, float]:
    calls = {}
    for n in range(1, 9):
        args = [jnp.full((8,), float(k), jnp.float32) for k in range(n)]
        calls[str(n)] = _Compiled(lambda *a: sum(a), tuple(args))
    return _rounds(calls, repeats)


def outputs(repeats: int) -> dict[str, float]:
    calls = {}
    x = jnp.ones((8,), jnp.float32)
    for n in range(1, 9):
        calls[str(n)] = _Compiled(lambda a, n=n: tuple(a + k for k in range(n)), (x,))
    return _rounds(calls, repeats)


def lengths(repeats: int, cell_name: str) -> dict[str, float]:
    cell = getattr(jax_rnn, cell_name)
    params = cell.init(jax.random.key(0), 1, 2, None, dtype=jnp.float32)
    calls = {}
    for t in LENGTHS:
        xs = jnp.asarray(np.random.default_rng(0).normal(size=(t, 1, 1)), jnp.float32)
        for impl in ("fused", "scan"):
            def loss(p, x, impl=impl):  # noqa: ANN001, ANN202
                return jax_rnn.unroll(cell, p, x, impl=impl)[1].output.sum()

            calls[f"{impl} T={t}"] = _Compiled(jax.value_and_grad(loss), (params, xs))
    return _rounds(calls, repeats)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--repeats", type=int, default=15)
    parser.add_argument("--cell", default="gru", choices=("elman", "gru", "lstm"))
    parser.add_argument("--out", default=None)
    args = parser.parse_args()
    machine = {"backend": jax.default_backend(), "device": str(jax.devices()[0]),
               "cores": os.cpu_count(), "load_average": os.getloadavg()}
    print(f"{machine}")
    per_n = arguments(args.repeats)
    print("compiled call with n array arguments (median us):")
    print("  " + "  ".join(f"n={n}: {s * 1e6:.2f}" for n, s in per_n.items()))
    slope = np.polyfit([int(n) for n in per_n], list(per_n.values()), 1)[0]
    print(f"  least-squares slope: {slope * 1e6:.2f} us per array argument")
    per_out = outputs(args.repeats)
    print("compiled call with n array results (median us):")
    print("  " + "  ".join(f"n={n}: {s * 1e6:.2f}" for n, s in per_out.items()))
    slope_out = np.polyfit([int(n) for n in per_out], list(per_out.values()), 1)[0]
    print(f"  least-squares slope: {slope_out * 1e6:.2f} us per array result")
    per_t = lengths(args.repeats, args.cell)
    print(f"{args.cell} forward+backward at B=1, I=1, H=2 (median us):")
    for t in LENGTHS:
        fused, scan = per_t[f"fused T={t}"], per_t[f"scan T={t}"]
        print(f"  T={t:4d}  default {fused * 1e6:7.1f}  impl='scan' {scan * 1e6:7.1f}")
    if args.out:
        out = Path(args.out)
        out.mkdir(parents=True, exist_ok=True)
        doc = {"machine": machine, "arguments_s": per_n, "slope_s_per_argument": slope,
               "results_s": per_out, "slope_s_per_result": slope_out, "cell": args.cell,
               "lengths_s": per_t}
        (out / "dispatch.json").write_text(json.dumps(doc, indent=1))
        print(f"wrote {out / 'dispatch.json'}")


if __name__ == "__main__":
    main()
