"""The one-kernel loops (jax_rnn._kernels) against XLA's loop and PyTorch.

    python benchmarks/kernels.py --out DIR [--repeats 7] [--sizes t1000_b32 ...]
        [--cell elman|elman_relu|gru|lstm]

On an NVIDIA GPU (the Pallas kernels, Elman only) or a CPU (the C++ kernels), for each
size, in one process: ``jax_rnn.unroll(cell, ...)`` (default ``elman``) forward and
forward+backward (loss = sum of the states, gradient with respect to every parameter)
with the kernels (``"kernel"``: the default; on a GPU also ``"kernel_8warps"`` and
``"kernel_hoist_flipped"``: the same with 8 warps instead of 4, or with ``w`` kept in
registers or not; on a CPU ``"kernel_huge_pages"``: asking for huge pages,
``_native.HUGE_PAGES``, ``"kernel_no_pretouch"``: without touching the results' pages
first, ``_native.PRETOUCH``, and ``"kernel_unfused_grads"``: the Elman cell's backward
kernel and XLA's contractions instead of one kernel for both, ``_native.FUSED_GRADS``),
with them off (``"xla"``: the fused path's XLA while loops,
``JAX_RNN_KERNELS=off``), and PyTorch's ``nn.RNN`` (``nn.GRU``, ``nn.LSTM``) on the same
weights (``"cudnn"`` on a GPU, ``"torch"`` on a CPU). ``--max-hidden`` lets the GPU
kernels run at hidden sizes over ``jax_rnn._kernels.MAX_HIDDEN``, to measure them there.
float32 with full-precision products everywhere (JAX "highest", PyTorch's TF32 off).
Every variant is compiled first; then the variants are timed in turn, in an order that
changes from round to round, and each figure is the median over the rounds (a sample
averages back-to-back calls when one call is short): ``jax-rnn bench``'s sampler. The states
and gradients of every JAX variant are compared with the ``"xla"`` variant's (largest
difference over the largest entry). The figures in
``benchmarks/results/h200-2026-11-28-kernels/`` were taken with this script's first
version (then ``benchmarks/gpu_kernels.py``), which sampled in the same order every
round.
Writes ``DIR/kernels.json`` and prints a table.
"""

from __future__ import annotations

import argparse
import json
import statistics
import time
from pathlib import Path
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

import jax_rnn
from jax_rnn import _bench, _kernels, _native
from jax_rnn import _bench_peers as bp

SIZES = {  # T, B, I, H: three of the issue #4 bench sizes, and one at H = 64 with B = 32
    "t1000_b1": (1000, 1, 16, 32),
    "t10000_b8": (10000, 8, 32, 64),
    "t1000_b32_h64": (1000, 32, 64, 64),
    "t1000_b32": (1000, 32, 64, 128),
    "t200_b64": (200, 64, 256, 512),  # CPUs only (over the GPU kernels' MAX_HIDDEN)
    "tiny": (20, 3, 2, 8),  # a smoke test
}
VARIANTS = {  # name: (JAX_RNN_KERNELS, {knob of jax_rnn._kernels (or _native.X): value})
    "xla": ("off", {}),
    "kernel": ("auto", {}),
    "kernel_huge_pages": ("auto", {"_native.HUGE_PAGES": True}),
    "kernel_no_pretouch": ("auto", {"_native.PRETOUCH": False}),
    "kernel_unfused_grads": ("auto", {"_native.FUSED_GRADS": False}),
    "kernel_8warps": ("auto", {"_NUM_WARPS": 8}),
    "kernel_hoist_flipped": ("auto", {"_HOIST_MAX": "flip"}),
}


def _compile(variant: str, cell: Any, hidden: int, params: Any,
             xs: Any) -> tuple[Any, Any, float]:
    """AOT-compiled forward and forward+backward of one variant, and the compile time."""
    mode, knobs = VARIANTS[variant]

    def where(knob: str) -> tuple[Any, str]:
        return ((_native, knob.removeprefix("_native.")) if knob.startswith("_native.")
                else (_kernels, knob))

    saved = {k: getattr(*where(k)) for k in ("MODE", *knobs)}
    _kernels.MODE = mode
    for knob, value in knobs.items():
        if value == "flip":  # the other side of the default's choice for this hidden size
            value = 0 if hidden <= saved[knob] else 1 << 20
        setattr(*where(knob), value)
    jax.clear_caches()  # unroll's traces hold the kernel choice
    try:
        def forward(p, x):
            return jax_rnn.unroll(cell, p, x)[1].state

        def loss(p, x):
            return jnp.sum(forward(p, x))

        start = time.perf_counter()
        fwd = jax.jit(forward).lower(params, xs).compile()
        grad = jax.jit(jax.grad(loss)).lower(params, xs).compile()
        jax.block_until_ready((fwd(params, xs), grad(params, xs)))
        uses = tuple(any(k in str(jax.make_jaxpr(f)(params, xs))
                             for k in ("pallas_call", "target_name=jax_rnn_"))
                     for f in (forward, jax.grad(loss)))  # (forward, forward+backward)
        return (fwd, grad), uses, time.perf_counter() - start
    finally:
        for knob, value in saved.items():
            setattr(*where(knob), value)
        jax.clear_caches()


def _rel(a: Any, b: Any) -> float:
    pairs = list(zip(jax.tree.leaves(a), jax.tree.leaves(b), strict=True))
    diff = max(float(jnp.abs(x - y).max()) for x, y in pairs)
    scale = max(float(jnp.abs(y).max()) for _, y in pairs)
    return diff / scale if scale else diff


def run_size(name: str, repeats: int, variants: list[str], cell_name: str) -> list[dict]:
    t, b, i, h = SIZES[name]
    cell = getattr(jax_rnn, cell_name)
    params = cell.init(jax.random.key(0), i, h, dtype=jnp.float32)
    xs = jax.random.normal(jax.random.key(1), (t, b, i), jnp.float32)
    calls: dict[str, dict[str, Any]] = {}
    records = []
    for v in variants:
        (fwd, grad), uses, seconds = _compile(v, cell, h, params, xs)
        calls[v] = {"forward": lambda f=fwd: jax.block_until_ready(f(params, xs)),
                    "fwd+bwd": lambda g=grad: jax.block_until_ready(g(params, xs))}
        records.append(dict(size=name, T=t, B=b, I=i, H=h, impl=v, uses_kernel=uses,
                            compile_s=seconds))
    try:
        runner = bp.torch_runners(cell_name,
                                  jax.tree.map(np.asarray, params), np.asarray(xs))[0]
        peer = "cudnn" if bp.torch_device() == "cuda" else "torch"
        calls[peer] = {"forward": runner.forward, "fwd+bwd": runner.fwd_bwd}
        records.append(dict(size=name, T=t, B=b, I=i, H=h, impl=peer,
                            device=bp.torch_device()))
    except ImportError:
        pass
    ref = calls["xla"]["forward"](), calls["xla"]["fwd+bwd"]()
    for r in records:
        if r["impl"] not in ("xla", "cudnn", "torch"):
            r["rel_diff_states"] = _rel(calls[r["impl"]]["forward"](), ref[0])
            r["rel_diff_grads"] = _rel(calls[r["impl"]]["fwd+bwd"](), ref[1])
    # jax-rnn bench's sampler: calls in turn, in a changing order, round after round
    keys = [(v, mode) for v, modes in calls.items() for mode in modes]
    timed = [(calls[v][mode], _bench._warm_up(calls[v][mode], compiles=True)[1])
             for v, mode in keys]
    samples = dict(zip(keys, _bench._sample_interleaved(timed, repeats, float("inf")),
                       strict=True))
    for r in records:
        for mode in ("forward", "fwd+bwd"):
            r[f"{mode}_ms"] = 1e3 * statistics.median(samples[(r["impl"], mode)])
        print(json.dumps(r), flush=True)
    return records


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--out", default="gpu-kernels-out")
    parser.add_argument("--repeats", type=int, default=7)
    parser.add_argument("--sizes", nargs="+", default=list(SIZES), choices=list(SIZES))
    parser.add_argument("--variants", nargs="+", choices=list(VARIANTS),
                        help="default: on a GPU all but the CPU kernels' knobs; xla and "
                             "kernel on a CPU (kernel_8warps, kernel_hoist_flipped: knobs of "
                             "the GPU kernels; kernel_huge_pages, kernel_no_pretouch, "
                             "kernel_unfused_grads: of the CPU kernels, _native.HUGE_PAGES, "
                             "PRETOUCH and FUSED_GRADS)")
    parser.add_argument("--cell", default="elman",
                        choices=["elman", "elman_relu", "gru", "lstm"])
    parser.add_argument("--max-hidden", type=int, default=_kernels.MAX_HIDDEN)
    args = parser.parse_args()
    _kernels.MAX_HIDDEN = args.max_hidden
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    gpu_variants = [v for v, (_, knobs) in VARIANTS.items()
                    if not any(k.startswith("_native.") for k in knobs)]
    variants = args.variants or (gpu_variants if jax.default_backend() == "gpu"
                                 else ["xla", "kernel"])
    meta = dict(jax=jax.__version__, device=jax.devices()[0].device_kind,
                max_hidden=args.max_hidden, cell=args.cell,
                kernels_mode=_kernels.mode(), date=time.strftime("%Y-%m-%d %H:%M:%S"))
    print(json.dumps(meta), flush=True)
    records: list[dict] = []
    with bp.full_float32(torch_too=True):
        for name in args.sizes:
            records += run_size(name, args.repeats, variants, args.cell)
            (out / "kernels.json").write_text(json.dumps(dict(meta=meta, records=records),
                                                         indent=1))
    print("| size | impl | fwd ms | fwd+bwd ms | compile s | kernel | rel diff states/grads |")
    print("|---|---|---:|---:|---:|---|---|")
    for r in records:
        print(f"| {r['size']} | {r['impl']} | {r['forward_ms']:.3f} | {r['fwd+bwd_ms']:.3f} "
              f"| {r.get('compile_s', float('nan')):.1f} | {r.get('uses_kernel', '-')} "
              f"| {r.get('rel_diff_states', '-')} / {r.get('rel_diff_grads', '-')} |")


if __name__ == "__main__":
    main()
