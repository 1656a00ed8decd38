"""Gradient flow through time in an Elman RNN: how fast does d h_T / d h_t vanish or
explode? Sweeps the spectral radius of `w_cell_state` and the sequence length, for a tanh
RNN and a linear one, and compares the decay of ||d h_T / d h_t|| with the bound of
Pascanu, Mikolov & Bengio (2013), ||d h_T / d h_t|| <= (sigma_max(W) max|tanh'|)^(T-t),
and with the exact powers of W for the linear RNN. Writes grad_norms.png,
decay_rates.png and grad.json to --out. Runs in float64."""

from __future__ import annotations

import argparse
import json
import math
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np

from ._argtypes import non_negative, output_folder, positive, positive_float

DEFAULT_RADII = (0.5, 0.6, 0.7, 0.8, 0.9, 1.0, 1.1, 1.2, 1.3, 1.4, 1.5)
DEFAULT_LENGTHS = (25, 50, 100)


def _floats(text: str) -> list[float]:
    try:
        values = [float(v) for v in text.split(",") if v.strip()]
    except ValueError:
        raise argparse.ArgumentTypeError(
            f"expected numbers separated by commas, got {text!r}"
        ) from None
    if not values or any(not math.isfinite(v) or v <= 0 for v in values):
        raise argparse.ArgumentTypeError(f"expected positive numbers, got {text!r}")
    return values


def _ints(text: str) -> list[int]:
    try:
        values = [int(v) for v in text.split(",") if v.strip()]
    except ValueError:
        raise argparse.ArgumentTypeError(
            f"expected integers separated by commas, got {text!r}"
        ) from None
    if not values or any(v < 1 for v in values):
        raise argparse.ArgumentTypeError(f"expected positive integers, got {text!r}")
    return values


def add_arguments(parser: argparse.ArgumentParser) -> None:
    """The options of ``jax-rnn grad``."""
    parser.add_argument("--radii", type=_floats, default=list(DEFAULT_RADII),
                        help="spectral radii of w_cell_state, comma-separated "
                        "(default: 0.5,0.6,...,1.5)")
    parser.add_argument("--lengths", type=_ints, default=list(DEFAULT_LENGTHS),
                        help="sequence lengths T, comma-separated (default: 25,50,100)")
    parser.add_argument("--hidden", type=positive, default=32,
                        help="hidden size H (default: 32)")
    parser.add_argument("--batch", type=positive, default=8,
                        help="sequences per setting; norms are averaged in log space "
                        "(default: 8)")
    parser.add_argument("--input-scale", type=positive_float, default=0.1,
                        help="standard deviation of the random inputs; larger inputs "
                        "saturate tanh (default: 0.1)")
    parser.add_argument("--seed", type=non_negative, default=0,
                        help="random seed (default: 0)")
    parser.add_argument("--out", type=Path, default=Path("jax-rnn-out") / "grad",
                        help="output folder (default: ./jax-rnn-out/grad)")


def sweep_problem(
    seed: int, hidden_size: int, batch_size: int, length: int, input_scale: float
) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """The random model and inputs of the sweep, all float64.

    Returns:
        ``(w_unit, w_cell_input, xs)``: ``w_unit`` is an ``(H, H)`` Gaussian matrix
        scaled to spectral radius exactly 1 (``radius * w_unit`` is the recurrent matrix
        of each setting), ``w_cell_input`` is ``(4, H)`` and ``xs`` is ``(length, B, 4)``
        (shorter sequences use its first steps).
    """
    import jax

    k_w, k_in, k_x = jax.random.split(jax.random.key(seed), 3)
    w = np.asarray(jax.random.normal(k_w, (hidden_size, hidden_size), "float64"))
    w = w / np.max(np.abs(np.linalg.eigvals(w)))
    w_in = np.asarray(jax.random.normal(k_in, (4, hidden_size), "float64")) / 2.0
    xs = input_scale * np.asarray(jax.random.normal(k_x, (length, batch_size, 4), "float64"))
    return w, w_in, xs


def _identity(a: Any) -> Any:
    return a


def _fit_rate(log10_norms: np.ndarray) -> float:
    """Per-step factor ``10**slope`` of a least-squares line through log10 norm vs distance."""
    distance = np.arange(len(log10_norms))
    finite = np.isfinite(log10_norms)
    if finite.sum() < 2:
        return float("nan")
    slope = np.polyfit(distance[finite], log10_norms[finite], 1)[0]
    return float(10.0**slope)


def gradient_flow_sweep(
    radii: Sequence[float] = DEFAULT_RADII,
    lengths: Sequence[int] = DEFAULT_LENGTHS,
    *,
    hidden_size: int = 32,
    batch_size: int = 8,
    input_scale: float = 0.1,
    seed: int = 0,
) -> dict[str, Any]:
    """Runs the sweep and returns every number ``jax-rnn grad`` writes to ``grad.json``.

    For each length ``T``, radius ``r`` and activation (``tanh``, ``linear``), the
    Elman cell with ``w_cell_state = r * w_unit`` reads ``xs[:T]`` from a zero state and
    :func:`jax_rnn.gradients.jacobian_norms` gives ``log ||d h_T / d h_t||_2`` for each
    sequence; ``log10_norms[k]`` is their batch mean at distance ``k = T - t``. The decay
    rate is ``10**slope`` of a least-squares line through it. ``bound_rate`` is
    ``sigma_max(W) * gamma`` with ``gamma`` the largest ``tanh'(a)`` met on the
    trajectories (``<= 1``), so ``log10 ||d h_T / d h_t|| <= k log10(bound_rate)``.
    For the linear RNN, ``exact_log10_norms`` are ``log10 ||W^k||_2`` from numpy.
    """
    import jax

    from . import gradients
    from ._elman import ElmanParams, make_elman
    from ._unroll import unroll

    tanh_cell = make_elman(jax.numpy.tanh)
    linear_cell = make_elman(_identity)
    longest = max(lengths)
    w_unit, w_in, xs_all = sweep_problem(seed, hidden_size, batch_size, longest, input_scale)
    ln10 = math.log(10.0)
    runs = []
    for length in lengths:
        xs = xs_all[:length]
        for radius in radii:
            w = radius * w_unit
            params = ElmanParams(w_cell_state=jax.numpy.asarray(w),
                                 w_cell_input=jax.numpy.asarray(w_in), b_cell=None)
            sigma_max = float(np.linalg.norm(w, 2))
            # tanh: norms, bound and the largest tanh' on the trajectories
            log_norms = gradients.jacobian_norms(tanh_cell, params, xs, log=True)
            log10 = np.asarray(log_norms)[::-1].mean(axis=1) / ln10
            _, ys = unroll(tanh_cell, params, xs)
            gamma = float(np.max(1.0 - np.asarray(ys.state) ** 2))
            bound_log10 = np.arange(length + 1) * math.log10(sigma_max * gamma)
            worst = np.asarray(log_norms)[::-1] / ln10 - bound_log10[:, None]
            runs.append({
                "activation": "tanh",
                "length": length,
                "radius": radius,
                "sigma_max": sigma_max,
                "max_tanh_derivative": gamma,
                "bound_rate": sigma_max * gamma,
                "bound_holds": bool(np.all(worst <= 1e-9)),
                "decay_rate": _fit_rate(log10),
                "log10_norms": log10.tolist(),
            })
            # linear: norms against numpy's powers of W
            log_norms = gradients.jacobian_norms(linear_cell, params, xs, log=True)
            log10 = np.asarray(log_norms)[::-1].mean(axis=1) / ln10
            exact = np.array([
                math.log10(np.linalg.norm(np.linalg.matrix_power(w, k), 2))
                for k in range(length + 1)
            ])
            runs.append({
                "activation": "linear",
                "length": length,
                "radius": radius,
                "sigma_max": sigma_max,
                "decay_rate": _fit_rate(log10),
                "exact_decay_rate": _fit_rate(exact),
                "max_abs_error_log10": float(np.max(np.abs(log10 - exact))),
                "log10_norms": log10.tolist(),
                "exact_log10_norms": exact.tolist(),
            })
    return {
        "command": "grad",
        "config": {
            "radii": [float(r) for r in radii],
            "lengths": [int(n) for n in lengths],
            "hidden_size": hidden_size,
            "batch_size": batch_size,
            "input_size": 4,
            "input_scale": input_scale,
            "seed": seed,
            "dtype": "float64",
        },
        "sigma_max_unit": float(np.linalg.norm(w_unit, 2)),
        "runs": runs,
    }


def plot(doc: dict[str, Any], out: Path) -> list[Path]:
    """Draws ``grad_norms.png`` and ``decay_rates.png`` from the sweep's numbers."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    import matplotlib.ticker

    cfg = doc["config"]
    radii, lengths = cfg["radii"], cfg["lengths"]
    longest = max(lengths)
    cmap = plt.get_cmap("coolwarm")

    def colour(radius: float) -> Any:
        lo, hi = min(radii), max(radii)
        return cmap(0.5 if hi == lo else (radius - lo) / (hi - lo))

    def pick(activation: str, length: int, radius: float) -> dict[str, Any]:
        return next(r for r in doc["runs"] if r["activation"] == activation
                    and r["length"] == length and r["radius"] == radius)

    fig, axes = plt.subplots(1, 2, figsize=(11, 4.2), sharey=True)
    for ax, activation in zip(axes, ("tanh", "linear"), strict=True):
        lows = []
        for radius in radii:
            run = pick(activation, longest, radius)
            k = np.arange(len(run["log10_norms"]))
            ax.plot(k, run["log10_norms"], color=colour(radius), label=f"{radius:g}")
            lows.append(min(run["log10_norms"]))
            if activation == "tanh":
                ax.plot(k, k * math.log10(run["bound_rate"]), color=colour(radius),
                        linestyle=":", linewidth=0.8)
            else:
                ax.plot(k, run["exact_log10_norms"], color="black", linestyle="--",
                        linewidth=0.6)
        ax.set_xlabel("distance T - t (steps)")
        ax.grid(alpha=0.3)
    axes[0].set_ylabel(r"$\log_{10} \|\partial h_T / \partial h_t\|_2$ (batch mean)")
    axes[0].set_title(
        f"tanh RNN, T = {longest}  (dotted: bound $(\\sigma_{{max}}\\gamma)^{{T-t}}$)"
    )
    axes[1].set_title(f"linear RNN, T = {longest}  (dashed: numpy $\\|W^{{T-t}}\\|_2$)")
    top = max(max(pick(a, longest, r)["log10_norms"]) for a in ("tanh", "linear")
              for r in radii)
    bottom = min(min(pick(a, longest, r)["log10_norms"]) for a in ("tanh", "linear")
                 for r in radii)
    axes[0].set_ylim(bottom - 1, top + 1)
    axes[1].legend(title="spectral radius", fontsize=7, title_fontsize=8, ncol=2)
    fig.tight_layout()
    norms_png = out / "grad_norms.png"
    fig.savefig(norms_png, dpi=110)
    plt.close(fig)

    fig, ax = plt.subplots(figsize=(6.5, 4.5))
    markers = "os^vDP*X"
    for i, length in enumerate(lengths):
        rates = [pick("tanh", length, r)["decay_rate"] for r in radii]
        ax.plot(radii, rates, marker=markers[i % len(markers)], linestyle="-", color="C0",
                alpha=0.4 + 0.6 * (i + 1) / len(lengths), label=f"tanh, fitted, T = {length}")
    ax.plot(radii, [pick("linear", longest, r)["decay_rate"] for r in radii], marker="s",
            color="C2", label=f"linear, fitted, T = {longest}")
    ax.plot(radii, [pick("tanh", longest, r)["bound_rate"] for r in radii], color="C3",
            linestyle="--", label=r"bound $\sigma_{max}(W)\,\max|\tanh'|$, T = " f"{longest}")
    ax.plot(radii, [pick("tanh", longest, r)["sigma_max"] for r in radii], color="C3",
            linestyle=":", label=r"$\sigma_{max}(W)$")
    ax.plot(radii, radii, color="gray", linestyle="-.", label=r"spectral radius $\rho(W)$")
    ax.axhline(1.0, color="black", linewidth=0.6)
    ax.set_yscale("log")
    ax.yaxis.set_major_formatter(matplotlib.ticker.ScalarFormatter())
    ax.yaxis.set_minor_formatter(matplotlib.ticker.NullFormatter())
    low, high = ax.get_ylim()
    ax.set_yticks([v for v in (0.1, 0.2, 0.3, 0.5, 0.75, 1.0, 1.5, 2.0, 3.0, 5.0)
                   if low <= v <= high])
    ax.set_ylim(low, high)
    ax.set_xlabel(r"spectral radius of $W_{cs}$")
    ax.set_ylabel("per-step factor of $\\|\\partial h_T / \\partial h_t\\|$")
    ax.set_title("decay rate of the gradient norm vs spectral radius")
    ax.grid(alpha=0.3, which="both")
    ax.legend(fontsize=7)
    fig.tight_layout()
    rates_png = out / "decay_rates.png"
    fig.savefig(rates_png, dpi=110)
    plt.close(fig)
    return [norms_png, rates_png]


def run(args: argparse.Namespace) -> int:
    """``jax-rnn grad``: runs :func:`gradient_flow_sweep`, writes the plots and the JSON."""
    import jax

    jax.config.update("jax_enable_x64", True)
    out = output_folder(Path(args.out), "grad")
    doc = gradient_flow_sweep(args.radii, args.lengths, hidden_size=args.hidden,
                              batch_size=args.batch, input_scale=args.input_scale,
                              seed=args.seed)
    pngs = plot(doc, out)
    json_path = out / "grad.json"
    json_path.write_text(json.dumps(doc, indent=1), encoding="utf-8")
    longest = max(args.lengths)
    print(f"jax-rnn grad: H = {args.hidden}, batch {args.batch}, T = {longest} "
          "(per-step factor of ||d h_T / d h_t||)")
    print(f"  {'radius':>6}  {'tanh':>7}  {'bound':>7}  {'linear':>7}  {'sigma_max':>9}")
    for radius in args.radii:
        tanh, linear = (next(r for r in doc["runs"] if r["activation"] == a
                             and r["length"] == longest and r["radius"] == radius)
                        for a in ("tanh", "linear"))
        print(f"  {radius:6.2f}  {tanh['decay_rate']:7.3f}  {tanh['bound_rate']:7.3f}  "
              f"{linear['decay_rate']:7.3f}  {tanh['sigma_max']:9.3f}")
    for path in [*pngs, json_path]:
        print(f"wrote {path}")
    return 0
