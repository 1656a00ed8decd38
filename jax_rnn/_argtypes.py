"""Argument types of the command line's number options (``argparse`` ``type=``): a bad
value is a usage error that names what was expected, before anything runs."""

from __future__ import annotations

import argparse
import math
from pathlib import Path


def _int_at_least(text: str, low: int, what: str) -> int:
    try:
        value = int(text)
    except ValueError:
        value = low - 1
    if value < low:
        raise argparse.ArgumentTypeError(f"expected {what}, got {text!r}")
    return value


def positive(text: str) -> int:
    """An int >= 1."""
    return _int_at_least(text, 1, "a positive integer")


def non_negative(text: str) -> int:
    """An int >= 0 (a seed: numpy's generators take no negative seeds)."""
    return _int_at_least(text, 0, "an integer >= 0")


def positive_float(text: str) -> float:
    """A finite number > 0 (``inf`` and ``nan`` are refused: they would end up in the
    JSON a command writes, which strict parsers reject)."""
    try:
        value = float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected a number, got {text!r}") from None
    if not (value > 0 and math.isfinite(value)):
        raise argparse.ArgumentTypeError(f"expected a positive number, got {text!r}")
    return value


def output_folder(out: Path, command: str) -> Path:
    """Creates ``out`` (and its parents) before a command computes anything, so that a
    bad path fails at once, not after minutes of work."""
    try:
        out.mkdir(parents=True, exist_ok=True)
    except OSError as err:
        raise SystemExit(f"jax-rnn {command}: cannot use --out {str(out)!r}: {err}") from None
    return out
