"""Test configuration: 8 fake CPU devices, and a float64 fixture for exact identities.

The device count must be set before JAX runs any computation, so it lives here, at import time of
the test session (never in the library, which has no import-time side effects). float64 is not
switched on globally: model and sampler tests must run in the dtypes users run. Exact-enumeration
tests opt in with `pytestmark = pytest.mark.usefixtures("x64")`.

Every compiled XLA:CPU program holds its own memory mappings, and a test worker compiles
thousands of programs: left alone, one process passes Linux's default limit of 65530 mappings
(`vm.max_map_count`) and the compiler then crashes with a segmentation fault. JAX's compilation
caches are therefore cleared after every test module (`jax.clear_caches`), which frees the
programs no live object still holds.
"""

import jax
import pytest

jax.config.update("jax_num_cpu_devices", 8)


@pytest.fixture
def x64():
    with jax.enable_x64(True):
        yield


@pytest.fixture(autouse=True, scope="module")
def _free_compiled_programs():
    yield
    jax.clear_caches()
