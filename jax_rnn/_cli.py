"""The ``jax-rnn`` command line: ``demo`` (default), ``bench``, ``grad`` and ``train``.

Each command but ``demo`` lives in its own module, imported only when it runs, so that
``jax-rnn demo`` and ``import jax_rnn`` load neither matplotlib nor the benchmark peers.
"""

from __future__ import annotations

import argparse
import json
import sys
from collections.abc import Sequence
from typing import Any

import numpy as np


def _demo(args: argparse.Namespace) -> int:
    import jax

    jax.config.update("jax_enable_x64", True)
    import jax_rnn

    params, xs, state0 = jax_rnn.seed_example(np.float64)
    _, ys = jax_rnn.unroll(jax_rnn.elman, params, xs, state0)

    def last_output(p: Any) -> Any:
        return jax_rnn.unroll(jax_rnn.elman, p, xs, state0)[1].output[-1, 0]

    grads = jax.grad(last_output)(params)
    grad_items = [(k, np.asarray(v)) for k, v in grads._asdict().items() if v is not None]
    steps = [
        {
            "step": t + 1,
            "input": float(xs[t, 0]),
            "pre_activation": np.asarray(ys.pre_activation[t]),
            "state": np.asarray(ys.state[t]),
            "output": np.asarray(ys.output[t]),
        }
        for t in range(xs.shape[0])
    ]
    if args.json:
        doc = {
            "model": "Elman tanh RNN of the seed notebook, float64",
            "steps": [{k: np.asarray(v).tolist() for k, v in s.items()} for s in steps],
            "grad_last_output": {k: v.tolist() for k, v in grad_items},
        }
        print(json.dumps(doc, indent=2))
        return 0
    print("jax_rnn demo: the seed notebook's tanh RNN (H=2, X = [1, 2, 3, 4, 5]), float64\n")
    for s in steps:
        print(f"step {s['step']} (x = {s['input']:g})")
        print("  pre-activation:", s["pre_activation"])
        print("  state:         ", s["state"])
        print("  output:        ", s["output"])
    print(f"\ngradient of the last output y_{len(steps)} with respect to each weight:")
    for name, value in grad_items:
        text = np.array2string(value, prefix=" " * 16)
        print(f"  {name:<13} {text}")
    return 0


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="jax-rnn", description="jax_rnn: functional recurrent networks in JAX."
    )
    sub = parser.add_subparsers(dest="command", metavar="COMMAND")
    demo = sub.add_parser(
        "demo",
        help="run the seed notebook's RNN and print every step and the weight gradients",
        description="Runs the seed notebook's 2-unit tanh RNN over X = [1..5] in float64 and "
        "prints each step's pre-activation, state and output, then the gradient of the "
        "last output with respect to each weight.",
    )
    demo.add_argument("--json", action="store_true", help="print the same as JSON")
    demo.set_defaults(func=_demo)
    for name, module, summary in _COMMANDS:
        _add_lazy_command(sub, name, module, summary)
    return parser


# (command, module, one-line help). Each module defines `add_arguments(parser)` and
# `run(args) -> int`.
_COMMANDS = [
    ("bench", "jax_rnn._bench", "time jax_rnn against numpy, Flax, Haiku, Equinox and PyTorch"),
    ("grad", "jax_rnn._experiments", "gradient flow through time: vanishing/exploding sweep"),
    ("train", "jax_rnn._training", "train Elman, GRU and LSTM on the adding problem with optax"),
]


def _add_lazy_command(sub: Any, name: str, module_name: str, summary: str) -> None:
    import importlib

    try:
        module = importlib.import_module(module_name)
    except ModuleNotFoundError as err:
        if err.name != module_name:
            raise
        return
    parser = sub.add_parser(name, help=summary, description=module.__doc__)
    module.add_arguments(parser)
    parser.set_defaults(func=module.run)


def main(argv: Sequence[str] | None = None) -> int:
    """Entry point of ``jax-rnn`` and ``python -m jax_rnn``; ``demo`` is the default."""
    parser = build_parser()
    args = parser.parse_args(sys.argv[1:] if argv is None else list(argv))
    if args.command is None:
        args = parser.parse_args(["demo", *(sys.argv[1:] if argv is None else list(argv))])
    try:
        return int(args.func(args))
    except BrokenPipeError:  # e.g. `jax-rnn demo --json | head`: the reader has gone
        # Python flushes stdout again at exit; point it at /dev/null so that it cannot fail.
        import os

        os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())
        return 0
