"""Test configuration: float64 available everywhere, deterministic hypothesis profiles.

x64 is switched on for the whole session so that tests can ask for float64 explicitly;
every test names its dtype, and float32 cases pass float32 arrays. Tight comparisons run
in float64 on the CPU, where JAX's matmuls are exact float64 products.
"""

import os

# The suite is dominated by XLA compiles of small programs; skipping LLVM's expensive
# optimisations roughly halves them and changes no result beyond float rounding order
# (every comparison has a tolerance). Set before JAX initialises its CPU backend.
os.environ["XLA_FLAGS"] = (
    os.environ.get("XLA_FLAGS", "") + " --xla_backend_optimization_level=0"
).strip()

import jax  # noqa: E402
import pytest
from hypothesis import HealthCheck, settings

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
