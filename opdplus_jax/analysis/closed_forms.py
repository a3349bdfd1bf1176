"""Divergences written directly in the two distributions, independently of the generators.

`value(divergence, p, q)` evaluates D(p||q) over the last axis from probability vectors, by the
formula that *defines* each divergence (e.g. 1/2 sum |p - q| for TV), not through
`Divergence.f`. Exact tests compare the estimators (which only ever see log u through f and w_f)
against gradients of these formulas, so the two code paths share nothing.

`q` may be unnormalised (the G-OPD target nu = q^lambda r^(1-lambda)); every formula below is
written so that it equals E_p[f(q/p)] for any positive q, never simplifying with sum q = 1.
"""

from __future__ import annotations

import jax.numpy as jnp

from opdplus_jax import divergences as dv


def _kl(a, b):
    return jnp.sum(a * (jnp.log(a) - jnp.log(b)), axis=-1)


def value(divergence: str | dv.Divergence, p, q):
    """D(p||q) summed over the last axis, by the defining formula of `divergence`."""
    d = dv.get(divergence)
    if isinstance(d, dv.Gauged):
        # f + c (1 - u) adds c (sum p - sum q): zero for normalised q.
        return value(d.base, p, q) + d.c * (jnp.sum(p, -1) - jnp.sum(q, -1))
    if isinstance(d, dv.ReverseKL):
        return _kl(p, q)
    if isinstance(d, dv.ForwardKL):
        return _kl(q, p)
    if isinstance(d, dv.JSD):
        m = d.beta * p + (1.0 - d.beta) * q
        return d.beta * _kl(p, m) + (1.0 - d.beta) * _kl(q, m)
    if isinstance(d, dv.TotalVariation):
        return 0.5 * jnp.sum(jnp.abs(p - q), axis=-1)
    if isinstance(d, dv.Hellinger):
        return jnp.sum(jnp.square(jnp.sqrt(p) - jnp.sqrt(q)), axis=-1)
    if isinstance(d, dv.PearsonChi2):
        return jnp.sum(jnp.square(p - q) / q, axis=-1)
    if isinstance(d, dv.NeymanChi2):
        return jnp.sum(jnp.square(q - p) / p, axis=-1)
    if isinstance(d, dv.Alpha):
        a = d.alpha
        return (jnp.sum(p**a * q ** (1.0 - a), axis=-1) - 1.0) / (a * (a - 1.0))
    if isinstance(d, dv.SkewReverseKL):
        return _kl(p, d.alpha * p + (1.0 - d.alpha) * q)
    if isinstance(d, dv.SkewForwardKL):
        return _kl(q, d.alpha * q + (1.0 - d.alpha) * p)
    raise NotImplementedError(f"no closed form for {d}; add one to analysis.closed_forms")
