"""Test configuration: 8 fake CPU devices, and a float64 fixture for exact identities.

The device count must be set before JAX runs any computation, so it lives here, at import time of
the test session (never in the library, which has no import-time side effects). float64 is not
switched on globally: model and sampler tests must run in the dtypes users run. Exact-enumeration
tests opt in with `pytestmark = pytest.mark.usefixtures("x64")`.
"""

import jax
import pytest

jax.config.update("jax_num_cpu_devices", 8)


@pytest.fixture
def x64():
    with jax.enable_x64(True):
        yield
