"""Test configuration: float64 available everywhere, deterministic hypothesis profiles.

x64 is switched on for the whole session so that tests can ask for float64 explicitly;
every test names its dtype, and float32 cases pass float32 arrays. Tight comparisons run
in float64 on the CPU, where JAX's matmuls are exact float64 products.
"""

import os
import subprocess
import sys

import pytest
from hypothesis import HealthCheck, settings

# The suite is dominated by XLA compiles of small programs (over 80% of its time). Two
# flags cut them without changing what is tested (every comparison has a tolerance; the
# C++ kernels are compiled apart): --xla_backend_optimization_level=0 skips LLVM's
# expensive optimisations (roughly halves a compile), and --xla_cpu_use_fusion_emitters=false
# takes XLA's older elementwise emitters, cheaper to compile (the suite took 163 s
# against 375 s without it, 2 cores, load 3). An XLA that does not know a flag aborts
# the process, so the second is probed once in a subprocess; the result is passed to
# pytest-xdist's workers and the tests' own subprocesses in JAX_RNN_TEST_XLA_FLAGS. Set
# before JAX initialises its CPU backend.
FAST_COMPILE = "--xla_cpu_use_fusion_emitters=false"


def _test_xla_flags() -> str:
    flags = "--xla_backend_optimization_level=0"
    probe = [sys.executable, "-c", "import jax; jax.jit(lambda x: x + 1)(1.0)"]
    env = dict(os.environ, XLA_FLAGS=f"{flags} {FAST_COMPILE}", JAX_PLATFORMS="cpu")
    try:
        ok = subprocess.run(probe, env=env, capture_output=True, timeout=120).returncode == 0
    except (OSError, subprocess.TimeoutExpired):
        ok = False
    return f"{flags} {FAST_COMPILE}" if ok else flags


if "JAX_RNN_TEST_XLA_FLAGS" not in os.environ:
    os.environ["JAX_RNN_TEST_XLA_FLAGS"] = _test_xla_flags()
os.environ["XLA_FLAGS"] = (
    os.environ.get("XLA_FLAGS", "") + " " + os.environ["JAX_RNN_TEST_XLA_FLAGS"]
).strip()

import jax  # noqa: E402

jax.config.update("jax_enable_x64", True)

settings.register_profile(
    "ci",
    derandomize=True,
    database=None,
    deadline=None,
    max_examples=6,
    print_blob=True,
    suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large],
)
settings.register_profile(
    "nightly",
    derandomize=False,
    database=None,
    deadline=None,
    max_examples=500,
    print_blob=True,
    suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large],
)
settings.load_profile(os.environ.get("JAX_RNN_HYPOTHESIS_PROFILE", "ci"))


@pytest.fixture(autouse=True)
def _doctest_namespace(doctest_namespace):
    """Names every docstring and docs example may use without importing them."""
    import jax.numpy as jnp
    import numpy as np

    import jax_rnn

    doctest_namespace.update(jax=jax, jnp=jnp, np=np, jax_rnn=jax_rnn)
