"""Test configuration: float64 available everywhere, deterministic hypothesis profiles.

x64 is switched on for the whole session so that tests can ask for float64 explicitly;
every test names its dtype, and float32 cases pass float32 arrays. Tight comparisons run
in float64 on the CPU, where JAX's matmuls are exact float64 products.
"""

import os

import jax
import pytest
from hypothesis import HealthCheck, settings

jax.config.update("jax_enable_x64", True)

settings.register_profile(
    "ci",
    derandomize=True,
    database=None,
    deadline=None,
    max_examples=15,
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
