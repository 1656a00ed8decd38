"""What the fixture scripts share: their command line and how a fixture is saved."""

from __future__ import annotations

import argparse
import pathlib

import numpy as np

DATA = pathlib.Path(__file__).resolve().parents[1] / "tests" / "data"


def output_folder(description: str) -> pathlib.Path:
    """The folder from ``--out`` (default ``tests/data``), created if missing."""
    parser = argparse.ArgumentParser(description=description)
    parser.add_argument("--out", type=pathlib.Path, default=DATA, help="output folder")
    out = parser.parse_args().out
    out.mkdir(parents=True, exist_ok=True)
    return out


def save(folder: pathlib.Path, name: str, arrays: dict[str, np.ndarray]) -> int:
    """Writes ``arrays`` to ``folder / name`` (compressed ``.npz``); returns its bytes."""
    path = folder / name
    np.savez_compressed(path, **arrays)
    return path.stat().st_size
