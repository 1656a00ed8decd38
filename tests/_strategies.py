"""Shared hypothesis strategies and helpers for the test suite."""

from __future__ import annotations

import numpy as np
from hypothesis import strategies as st

import jax_rnn

BATCH_SHAPES = [(), (1,), (3,), (2, 3)]

# Tolerances for jax_rnn against the float64 numpy references.
TOL = {np.float64: dict(rtol=1e-12, atol=1e-12), np.float32: dict(rtol=1e-5, atol=1e-5)}


def tol(dtype) -> dict:
    return TOL[np.dtype(dtype).type]


@st.composite
def elman_problems(draw, max_t=64, max_size=16, dtypes=(np.float32, np.float64), readout=True):
    """Draws (params, xs, state0, dtype) for an Elman cell, as numpy arrays.

    Weights are uniform in [-scale, scale] / sqrt(fan_in) with scale in 0.1..5, so the
    large scales saturate tanh.
    """
    t = draw(st.integers(0, max_t))
    batch = draw(st.sampled_from(BATCH_SHAPES))
    i, h = draw(st.integers(1, max_size)), draw(st.integers(1, max_size))
    o = draw(st.integers(1, max_size)) if readout else None
    scale = draw(st.floats(0.1, 5.0))
    dtype = draw(st.sampled_from(dtypes))
    seed = draw(st.integers(0, 2**31 - 1))
    rng = np.random.default_rng(seed)

    def u(*shape, fan_in=1):
        return (rng.uniform(-1, 1, shape) * scale / np.sqrt(fan_in)).astype(dtype)

    params = jax_rnn.ElmanParams(
        w_cell_state=u(h, h, fan_in=h),
        w_cell_input=u(i, h, fan_in=i),
        b_cell=u(h),
        w_output=None if o is None else u(h, o, fan_in=h),
        b_output=None if o is None else u(o),
    )
    xs = rng.normal(size=(t, *batch, i)).astype(dtype)
    state0 = None if draw(st.booleans()) else rng.uniform(-1, 1, (*batch, h)).astype(dtype)
    return params, xs, state0, dtype


def as64(tree):
    """Every array leaf of a NamedTuple (or None) as float64 numpy."""
    if tree is None:
        return None
    return type(tree)(*(None if a is None else np.asarray(a, np.float64) for a in tree))
