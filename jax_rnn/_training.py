"""Trains Elman, GRU and LSTM models on the adding problem (Hochreiter & Schmidhuber 1997)
with optax's Adam, with and without gradient clipping (optax.clip_by_global_norm). Each
step of a sequence is a pair (value, marker): values are uniform in [0, 1), two steps are
marked (one in each half), and the target at the last step is the sum of the two marked
values. Predicting the mean, 1, gives a mean squared error of 1/6. Writes
train_loss.png and train.json to --out. Runs in float32."""

from __future__ import annotations

import argparse
import json
import math
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

import numpy as np

from ._argtypes import non_negative, output_folder, positive, positive_float

CELLS = ("elman", "gru", "lstm")
BASELINE_LOSS = 1.0 / 6.0  # Var(u1 + u2) for u1, u2 ~ U(0, 1): always predicting 1
EVAL_BATCH = 1024


def _cells(text: str) -> list[str]:
    names = [n.strip() for n in text.split(",") if n.strip()]
    unknown = [n for n in names if n not in CELLS]
    if not names or unknown:
        raise argparse.ArgumentTypeError(
            f"expected cells among {', '.join(CELLS)} separated by commas, got {text!r}"
        )
    return names


def add_arguments(parser: argparse.ArgumentParser) -> None:
    """The options of ``jax-rnn train``."""
    parser.add_argument("--cells", type=_cells, default=list(CELLS),
                        help="cells to train, comma-separated (default: elman,gru,lstm)")
    parser.add_argument("--steps", type=positive, default=400,
                        help="optimiser steps per run (default: 400)")
    parser.add_argument("--length", type=int, default=30,
                        help="sequence length T, at least 2 (default: 30)")
    parser.add_argument("--batch", type=positive, default=64,
                        help="sequences per step (default: 64)")
    parser.add_argument("--hidden", type=positive, default=32,
                        help="hidden size H (default: 32)")
    parser.add_argument("--lr", type=positive_float, default=0.03,
                        help="Adam learning rate (default: 0.03)")
    parser.add_argument("--clip", type=positive_float, default=1.0,
                        help="max global gradient norm of the clipped runs (default: 1.0)")
    parser.add_argument("--seed", type=non_negative, default=0,
                        help="random seed (default: 0)")
    parser.add_argument("--out", type=Path, default=Path("jax-rnn-out") / "train",
                        help="output folder (default: ./jax-rnn-out/train)")
    parser.add_argument("--no-progress", action="store_true",
                        help="do not show the progress bar")


def adding_problem(
    rng: np.random.Generator, batch_size: int, length: int
) -> tuple[np.ndarray, np.ndarray]:
    """A batch of the adding problem, float32 numpy arrays.

    Returns:
        ``(xs, targets)``: ``xs`` shaped ``(length, batch_size, 2)`` holds
        ``(value, marker)`` pairs with values uniform in ``[0, 1)`` and exactly two markers
        per sequence, one among the first ``length // 2`` steps and one among the rest;
        ``targets`` shaped ``(batch_size,)`` is the sum of the two marked values.
    """
    if length < 2:
        raise ValueError(f"`adding_problem`: `length` must be at least 2, got {length}.")
    values = rng.uniform(0.0, 1.0, (length, batch_size)).astype(np.float32)
    half = length // 2
    first = rng.integers(0, half, batch_size)
    second = rng.integers(half, length, batch_size)
    steps = np.arange(length)[:, None]
    markers = ((steps == first) | (steps == second)).astype(np.float32)
    targets = np.asarray(np.sum(values * markers, axis=0, dtype=np.float32))
    return np.stack([values, markers], axis=-1), targets


def data_streams(seed: int) -> tuple[np.random.Generator, np.random.Generator]:
    """``(train, eval)`` generators of a seed: every run of one seed draws the same
    training batches, in the same order, and is evaluated on the same held-out batch."""
    return np.random.default_rng([seed, 1]), np.random.default_rng([seed, 2])


def _cell(name: str) -> Any:
    from ._elman import elman
    from ._gru import gru
    from ._lstm import lstm

    return {"elman": elman, "gru": gru, "lstm": lstm}[name]


def init_params(name: str, seed: int, hidden_size: int) -> Any:
    """The initial float32 params of cell ``name`` (2 inputs, 1 output) for ``seed``."""
    import jax
    import jax.numpy as jnp

    k_cell = jax.random.fold_in(jax.random.key(seed), CELLS.index(name))
    return _cell(name).init(k_cell, 2, hidden_size, 1, dtype=jnp.float32)


def mse(cell: Any, params: Any, xs: Any, targets: Any) -> Any:
    """Mean squared error of the last step's output against the targets."""
    from ._unroll import unroll

    _, ys = unroll(cell, params, xs)
    return ((ys.output[-1, :, 0] - targets) ** 2).mean()


def train_adding(
    cells: Sequence[str] = CELLS,
    *,
    steps: int = 400,
    length: int = 30,
    batch_size: int = 64,
    hidden_size: int = 32,
    learning_rate: float = 0.03,
    clip: float = 1.0,
    seed: int = 0,
    on_step: Callable[[int, int, float], None] | None = None,
) -> dict[str, Any]:
    """Trains each cell with Adam, without and with ``clip_by_global_norm(clip)``.

    Args:
        cells: names among ``elman``, ``gru``, ``lstm``.
        steps, length, batch_size, hidden_size, learning_rate, clip, seed: the settings.
        on_step: called as ``on_step(run_index, step, loss)`` after every step (the
            progress bar).

    Returns:
        every number ``jax-rnn train`` writes to ``train.json``: per run the loss and the
        global gradient norm (before clipping) at every step, ``final_loss`` (mean of the
        last tenth of the steps) and ``eval_loss`` on a held-out batch of 1024.
    """
    import jax
    import jax.numpy as jnp
    import optax

    if length < 2:
        raise ValueError(f"`jax-rnn train`: `--length` must be at least 2, got {length}.")
    if not clip > 0:
        raise ValueError(f"`jax-rnn train`: `--clip` must be positive, got {clip}.")
    eval_xs, eval_targets = adding_problem(data_streams(seed)[1], EVAL_BATCH, length)
    # One optimiser for both runs of a cell: the clipping threshold is a hyperparameter in
    # the optimiser state (inf: no clipping), so both runs train side by side under one
    # `vmap` and one compilation, on the same batches.
    optimiser = optax.chain(
        optax.inject_hyperparams(optax.clip_by_global_norm)(max_norm=math.inf),
        optax.adam(learning_rate),
    )
    thresholds = jnp.asarray([math.inf, clip], jnp.float32)
    runs = []
    for name in cells:
        cell = _cell(name)

        def loss_fn(params: Any, xs: Any, targets: Any, cell: Any = cell) -> Any:
            return mse(cell, params, xs, targets)

        def one_update(params: Any, opt_state: Any, xs: Any, targets: Any,
                       loss_fn: Any = loss_fn) -> tuple[Any, Any, Any, Any]:
            loss, grads = jax.value_and_grad(loss_fn)(params, xs, targets)
            updates, opt_state = optimiser.update(grads, opt_state, params)
            norm = jnp.sqrt(sum(jnp.sum(g**2) for g in jax.tree.leaves(grads)))
            return optax.apply_updates(params, updates), opt_state, loss, norm

        @jax.jit
        def update(params: Any, opt_state: Any, xs: Any, targets: Any,
                   one_update: Any = one_update) -> tuple[Any, Any, Any, Any]:
            return jax.vmap(one_update, in_axes=(0, 0, None, None))(params, opt_state, xs,
                                                                     targets)

        params = init_params(name, seed, hidden_size)
        opt_state: Any = optimiser.init(params)
        opt_state[0].hyperparams["max_norm"] = jnp.asarray(math.inf, jnp.float32)
        params, opt_state = jax.tree.map(lambda a: jnp.stack([a, a]), (params, opt_state))
        opt_state[0].hyperparams["max_norm"] = thresholds
        train_rng = data_streams(seed)[0]
        losses, norms = np.zeros((steps, 2)), np.zeros((steps, 2))
        for i in range(steps):
            xs, targets = adding_problem(train_rng, batch_size, length)
            params, opt_state, loss, norm = update(params, opt_state, xs, targets)
            losses[i], norms[i] = np.asarray(loss), np.asarray(norm)
            if on_step is not None:
                for variant in range(2):
                    on_step(len(runs) + variant, i, float(losses[i, variant]))
        eval_losses = jax.vmap(loss_fn, in_axes=(0, None, None))(params, eval_xs, eval_targets)
        tail = max(1, steps // 10)
        for variant, clipped in enumerate((False, True)):
            runs.append({
                "cell": name,
                "clip": clip if clipped else None,
                "losses": losses[:, variant].tolist(),
                "grad_norms": norms[:, variant].tolist(),
                "final_loss": float(np.mean(losses[-tail:, variant])),
                "eval_loss": float(eval_losses[variant]),
                "max_grad_norm": float(np.max(norms[:, variant])),
            })
    return {
        "command": "train",
        "config": {
            "cells": list(cells),
            "steps": steps,
            "length": length,
            "batch_size": batch_size,
            "hidden_size": hidden_size,
            "learning_rate": learning_rate,
            "clip": clip,
            "seed": seed,
            "optimizer": "adam",
            "dtype": "float32",
        },
        "baseline_loss": BASELINE_LOSS,
        "runs": runs,
    }


def _smooth(values: Sequence[float], width: int) -> np.ndarray:
    """Running mean over ``width`` steps (shorter at the start)."""
    array = np.asarray(values, float)
    if width <= 1 or len(array) < width:
        return array
    kernel = np.ones(width) / width
    head = np.cumsum(array[: width - 1]) / np.arange(1, width)
    return np.concatenate([head, np.convolve(array, kernel, mode="valid")])


def plot(doc: dict[str, Any], out: Path) -> Path:
    """Draws ``train_loss.png``: loss and gradient norm per step, for every run."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    cfg = doc["config"]
    width = max(1, cfg["steps"] // 40)
    colours = {"elman": "C0", "gru": "C1", "lstm": "C2"}
    fig, (ax_loss, ax_norm) = plt.subplots(1, 2, figsize=(11, 4.2))
    for run in doc["runs"]:
        style = "-" if run["clip"] is not None else "--"
        label = f"{run['cell']}, " + ("clip " + f"{run['clip']:g}" if run["clip"] is not None
                                      else "no clip")
        steps = np.arange(1, len(run["losses"]) + 1)
        colour = colours.get(run["cell"], "C3")
        ax_loss.plot(steps, _smooth(run["losses"], width), style, color=colour, label=label)
        ax_norm.plot(steps, run["grad_norms"], style, color=colour, linewidth=0.7,
                     label=label)
    ax_loss.axhline(doc["baseline_loss"], color="gray", linestyle=":",
                    label="predict 1 (MSE 1/6)")
    ax_loss.set_yscale("log")
    ax_loss.set_xlabel("step")
    ax_loss.set_ylabel(f"training MSE (running mean of {width})")
    ax_loss.set_title(f"adding problem, T = {cfg['length']}, H = {cfg['hidden_size']}, "
                      f"Adam lr {cfg['learning_rate']:g}")
    ax_loss.legend(fontsize=7)
    ax_norm.set_yscale("log")
    ax_norm.set_xlabel("step")
    ax_norm.set_ylabel("global gradient norm (before clipping)")
    if cfg["clip"] is not None:
        ax_norm.axhline(cfg["clip"], color="gray", linestyle=":", label="clip threshold")
    ax_norm.set_title("gradient norm")
    for ax in (ax_loss, ax_norm):
        ax.grid(alpha=0.3, which="both")
    fig.tight_layout()
    path = out / "train_loss.png"
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path


def run(args: argparse.Namespace) -> int:
    """``jax-rnn train``: runs :func:`train_adding` with a progress bar, writes the plot and
    the JSON."""
    from rich.console import Console
    from rich.progress import (
        BarColumn,
        MofNCompleteColumn,
        Progress,
        TextColumn,
        TimeElapsedColumn,
    )

    if args.length < 2:
        raise SystemExit(f"jax-rnn train: --length must be at least 2, got {args.length}")
    out = output_folder(Path(args.out), "train")
    console = Console(stderr=True)
    progress = Progress(
        TextColumn("{task.description:<16}"), BarColumn(), MofNCompleteColumn(),
        TextColumn("loss {task.fields[loss]:.4f}"), TimeElapsedColumn(),
        console=console, disable=args.no_progress,
    )
    tasks = [
        progress.add_task(f"{name} {'clip ' + format(args.clip, 'g') if clipped else 'no clip'}",
                          total=args.steps, loss=math.nan, start=False)
        for name in args.cells for clipped in (False, True)
    ]

    def on_step(run_index: int, step: int, loss: float) -> None:
        if step == 0:
            progress.start_task(tasks[run_index])
        progress.update(tasks[run_index], advance=1, loss=loss)

    with progress:
        doc = train_adding(args.cells, steps=args.steps, length=args.length,
                           batch_size=args.batch, hidden_size=args.hidden,
                           learning_rate=args.lr, clip=args.clip, seed=args.seed,
                           on_step=on_step)
    png = plot(doc, out)
    json_path = out / "train.json"
    json_path.write_text(json.dumps(doc, indent=1), encoding="utf-8")
    print(f"jax-rnn train: adding problem, T = {args.length}, {args.steps} steps of batch "
          f"{args.batch}; baseline MSE {BASELINE_LOSS:.4f}")
    print(f"  {'cell':<6} {'clip':>7} {'final loss':>11} {'eval loss':>10} {'max |g|':>9}")
    for r in doc["runs"]:
        clip = "none" if r["clip"] is None else f"{r['clip']:g}"
        print(f"  {r['cell']:<6} {clip:>7} {r['final_loss']:11.4f} {r['eval_loss']:10.4f} "
              f"{r['max_grad_norm']:9.3g}")
    for path in (png, json_path):
        print(f"wrote {path}")
    return 0
