"""Package metadata for opdplus_jax (on-policy distillation estimators in JAX/Flax)."""

import pathlib

from setuptools import find_packages, setup

# Pinned ranges: lower bounds are the versions the project is tested with, upper bounds stop a
# minor release with breaking API changes (flax NNX, orbax, grain move fast) from landing silently.
INSTALL_REQUIRES = [
    "jax>=0.11,<0.13",
    "flax>=0.12,<0.13",
    "optax>=0.2.5,<0.3",
    "orbax-checkpoint>=0.11.20,<0.13",
    "grain>=0.2.12,<0.3",
    "transformers>=5.0,<6",
    "tokenizers>=0.22,<0.24",
    "safetensors>=0.6,<0.9",
    "jinja2>=3.1,<4",
    "ml-collections>=1.0,<2",
    "chex>=0.1.90,<0.2",
    "numpy>=2.0,<3",
    "absl-py>=2.1,<3",
    "tqdm>=4.66,<5",
    "math-verify>=0.9,<0.10",
    "qwix>=0.1.8,<0.2",
]

EXTRAS = {
    # libtpu for TPU runs, and for `opdplus-plan` to compile for TPU slices on any host.
    "tpu": ["jax[tpu]>=0.11,<0.13"],
    # CUDA 12 wheels for NVIDIA GPUs (scripts/accelerator_check.sh installs them against the lock).
    "cuda": ["jax[cuda12]>=0.11,<0.13"],
    "data": ["pyarrow>=15,<28"],
    "tensorboard": ["tensorboardX>=2.6,<3"],
    "notebooks": ["jupytext>=1.16,<2", "matplotlib>=3.8,<4", "jupyterlab>=4,<5"],
    "test": [
        "pyarrow>=15,<28",
        "matplotlib>=3.8,<4",
        "jupytext>=1.16,<2",
        "pytest>=8.3,<10",
        "pytest-xdist>=3.6,<4",
        "hypothesis>=6.100,<7",
        "scipy>=1.13,<2",
        "ruff>=0.15,<0.18",
        "setuptools>=70",  # tests/test_packaging.py builds the wheel without downloading it
    ],
}

setup(
    name="opdplus_jax",
    version="0.1.0",
    description="On-policy distillation (OPD, OPD+, G-OPD/ExOPD) estimators and trainer in JAX",
    long_description=pathlib.Path(__file__).with_name("README.md").read_text(encoding="utf-8"),
    long_description_content_type="text/markdown",
    python_requires=">=3.12",
    packages=find_packages(include=["opdplus_jax", "opdplus_jax.*"]),
    install_requires=INSTALL_REQUIRES,
    extras_require=EXTRAS,
    entry_points={
        "console_scripts": [
            "opdplus-train=opdplus_jax.main:train",
            "opdplus-eval=opdplus_jax.main:evaluate",
            "opdplus-export=opdplus_jax.main:export",
            "opdplus-plan=opdplus_jax.plan_main:main",
            "opdplus-audit=opdplus_jax.analysis.audit:main",
        ],
    },
    license="Apache-2.0",
)
