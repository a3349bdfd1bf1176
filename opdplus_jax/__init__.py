"""opdplus_jax: on-policy distillation (OPD, OPD+, G-OPD/ExOPD) estimators and trainer in JAX."""

__version__ = "0.1.0"
