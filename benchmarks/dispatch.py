"""What a tiny jitted call costs besides its arithmetic, on the current backend.

    python benchmarks/dispatch.py [--repeats 15] [--out DIR]

Four measurements, each by ``jax-rnn bench``'s sampler in one process (medians of
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
* ``floors``: at the notebook's size, each cell's forward by jax_rnn's default path,
  the raveled row and every importable JAX peer of ``jax-rnn bench`` (Flax, Haiku,
  Equinox), each beside its *floor*: one compiled operation that takes the same
  arguments, reads every one (an argument a function does not read is pruned and costs
  nothing) and returns an array of the outputs' shape, with no loop at all. No
  implementation that takes a row's arguments can run faster than that row's floor, so
  where jax_rnn's floor is no faster than a peer's whole forward pass, the race at this
  size is decided by the arguments, not by the loop.

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
from jax_rnn import _bench_peers as bp
from jax_rnn._bench_peers import _Compiled

LENGTHS = (5, 10, 15, 20, 50, 100, 200, 400)
NOTEBOOK = (5, 1, 1, 2)  # T, B, I, H


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


def _floor(args: tuple, shape: tuple[int, ...], dtype: object) -> _Compiled:
    """One compiled operation on ``args`` (every array read once) returning ``shape``."""

    def floor(*a: object) -> jax.Array:
        first = [leaf.reshape(-1)[:1] for leaf in jax.tree.leaves(a)]
        return jnp.zeros(shape, dtype) + sum(first)

    return _Compiled(floor, args)


def floors(repeats: int) -> dict[str, dict[str, dict[str, float]]]:
    """Per cell and row: the forward pass's median seconds, its floor's, and how many
    arrays the call takes, all rows of all cells interleaved."""
    steps, batch, inputs, hidden = NOTEBOOK
    makers = {"flax": bp.flax_runners, "haiku": bp.haiku_runners,
              "equinox": bp.equinox_runners}
    calls, arrays = {}, {}
    for cell in bp.CELLS:
        params = bp.init_params(cell, 0, inputs, hidden, np.float32)
        xs = np.random.default_rng(0).normal(size=(steps, batch, inputs)).astype(np.float32)
        runners = [bp.jax_rnn_runner(cell, params, xs, None, True),
                   bp.jax_rnn_raveled_runner(cell, params, xs)]
        for peer, make in makers.items():
            try:
                runners += make(cell, params, xs)
            except ImportError:
                print(f"  {peer} not importable: skipped")
        for r in runners:
            if r.impl not in ("jax_rnn", "jax_rnn.raveled", *_bench.LIKE_PEERS[cell]):
                continue
            fwd = r.forward
            calls[f"{cell} {r.impl}"] = fwd
            calls[f"{cell} {r.impl} floor"] = _floor(fwd.args, (steps, batch, hidden),
                                                     jnp.float32)
            arrays[f"{cell} {r.impl}"] = len(jax.tree.leaves(fwd.args))
    times = _rounds(calls, repeats)
    out: dict[str, dict[str, dict[str, float]]] = {}
    for key, n in arrays.items():
        cell, impl = key.split(" ")
        out.setdefault(cell, {})[impl] = {"forward_s": times[key],
                                          "floor_s": times[f"{key} floor"], "arrays": n}
    return out


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--repeats", type=int, default=15)
    parser.add_argument("--cell", default="gru", choices=("elman", "gru", "lstm"))
    parser.add_argument("--out", default=None)
    parser.add_argument("--only", choices=("floors",), default=None,
                        help="run only this measurement")
    args = parser.parse_args()
    machine = {"backend": jax.default_backend(), "device": str(jax.devices()[0]),
               "cores": os.cpu_count(), "load_average": os.getloadavg()}
    print(f"{machine}")
    per_cell = floors(args.repeats)
    print(f"forward at T, B, I, H = {NOTEBOOK} (median us): row, its floor, arrays taken")
    for cell, rows in per_cell.items():
        for impl, r in rows.items():
            print(f"  {cell:10s} {impl:16s} {r['forward_s'] * 1e6:6.2f}  floor "
                  f"{r['floor_s'] * 1e6:6.2f}  {r['arrays']} arrays")
    if args.only == "floors":
        _write(args.out, {"machine": machine, "floors": per_cell})
        return
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
    _write(args.out, {"machine": machine, "floors": per_cell, "arguments_s": per_n,
                      "slope_s_per_argument": slope, "results_s": per_out,
                      "slope_s_per_result": slope_out, "cell": args.cell, "lengths_s": per_t})


def _write(folder: str | None, doc: dict) -> None:
    if folder:
        out = Path(folder)
        out.mkdir(parents=True, exist_ok=True)
        (out / "dispatch.json").write_text(json.dumps(doc, indent=1))
        print(f"wrote {out / 'dispatch.json'}")


if __name__ == "__main__":
    main()
