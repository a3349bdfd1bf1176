"""f-divergences as on-policy objectives, written in the log-ratio log u = log q - log pi.

Convention (docs/conventions.md): u = q/pi, and an f-divergence objective is
J(theta) = E_{y~pi}[f(u)] with f convex and f(1) = 0. Every divergence here is defined by its
formula in pi and q, and its generator f is written in exactly the gauge that formula gives
(adding c(1 - u) to f leaves the divergence unchanged but changes the stop-gradient estimator; see
`with_gauge`). Each object gives, as functions of log_u (any shape):

- ``f(log_u)``: the generator, so that ``-f`` is the per-token reward;
- ``stop_grad_advantage(log_u) = -f(u)``: the advantage when the reward is treated as a constant;
- ``opd_plus_advantage(log_u) = u f'(u) - f(u)``: the OPD+ advantage, which makes the
  score-function estimator unbiased for every f. Note ``u f'(u) = d f / d log u``.

Numerics (docs/math.md §6.1-§6.3). Everything is computed from log u in closed log-space
forms (``expm1``, ``logaddexp``, ``sigmoid``), never from a probability ratio. Generators that grow
exponentially in |log u| (forward KL, Pearson/Neyman chi^2, Hellinger, alpha, skew forward KL,
and every f as log u -> +inf when it grows like u) evaluate their exponentials through a guard that
caps the exponent at ``log(finfo(dtype).max) - 16`` (about 72.7 in float32, 693.8 in float64).
Below the cap the value is exact; above it the value saturates at a large finite number (about
3.8e31 in float32), so that a sum over 2^16 saturated tokens is still finite. No output is inf or
NaN for |log u| <= 1e6 (tested for every registered divergence); past that, far beyond any
log-ratio two language models produce, a product such as u log u can overflow float32. Inputs
in a dtype narrower than float32 (bf16) are upcast to float32.

Divergence classes are registered by name in `REGISTRY` (class decorator `register`); `get(name,
**params)` builds one, so a newly registered class is usable by name everywhere.
"""

from __future__ import annotations

import dataclasses
import inspect
import math
from typing import ClassVar

import jax
import jax.numpy as jnp

from opdplus_jax.registry import Registry

__all__ = [
    "REGISTRY",
    "Divergence",
    "get",
    "names",
    "register",
    "with_gauge",
]

# Headroom below the largest finite exponent: a saturated value times 2**16 still fits.
_EXP_HEADROOM = 16.0


def _as_float(log_u: jax.Array) -> jax.Array:
    x = jnp.asarray(log_u)
    if not jnp.issubdtype(x.dtype, jnp.floating) or jnp.finfo(x.dtype).bits < 32:
        x = x.astype(jnp.promote_types(x.dtype, jnp.float32))
    return x


def max_exponent(dtype) -> float:
    """Largest exponent the guarded exponentials evaluate exactly in `dtype`."""
    return math.log(float(jnp.finfo(dtype).max)) - _EXP_HEADROOM


def _exp(x: jax.Array) -> jax.Array:
    """exp with the exponent capped at `max_exponent(dtype)` (saturates, never inf)."""
    return jnp.exp(jnp.minimum(x, max_exponent(x.dtype)))


def _expm1(x: jax.Array) -> jax.Array:
    """expm1 with the exponent capped at `max_exponent(dtype)` (saturates, never inf)."""
    return jnp.expm1(jnp.minimum(x, max_exponent(x.dtype)))


@dataclasses.dataclass(frozen=True)
class Divergence:
    """Base class: subclasses implement `_f` and `_opd_plus` on a float array of log u.

    Instances are immutable and hashable, so they can be static arguments of `jax.jit`.
    """

    name: ClassVar[str] = ""
    formula: ClassVar[str] = ""

    def f(self, log_u: jax.Array) -> jax.Array:
        """Generator f(u) evaluated at u = exp(log_u); the objective is E_pi[f(u)]."""
        return self._f(_as_float(log_u))

    def stop_grad_advantage(self, log_u: jax.Array) -> jax.Array:
        """-f(u): the advantage of the usual stop-gradient estimator (biased unless reverse KL)."""
        return -self.f(log_u)

    def opd_plus_advantage(self, log_u: jax.Array) -> jax.Array:
        """u f'(u) - f(u): the OPD+ advantage (unbiased for every f)."""
        return self._opd_plus(_as_float(log_u))

    def u_f_prime(self, log_u: jax.Array) -> jax.Array:
        """u f'(u) = d f / d log u; the stop-gradient bias is E_pi[u f'(u) grad log pi]."""
        return self.opd_plus_advantage(log_u) + self.f(log_u)

    def dual(self) -> Divergence:
        """The divergence with its arguments swapped, D(q||pi) as a function of (pi, q).

        Exact, gauge included: dual().f(log u) == u f(1/u) for every u, so that
        pi f(q/pi) == q dual().f(pi/q) entry by entry (not only in expectation).
        """
        raise NotImplementedError(f"{self.name} has no registered dual")

    @property
    def params(self) -> dict[str, float]:
        return {f.name: getattr(self, f.name) for f in dataclasses.fields(self)}

    def __str__(self) -> str:
        args = ", ".join(f"{k}={v:g}" for k, v in self.params.items())
        return f"{self.name}({args})" if args else self.name

    def _f(self, x: jax.Array) -> jax.Array:
        raise NotImplementedError

    def _opd_plus(self, x: jax.Array) -> jax.Array:
        raise NotImplementedError


REGISTRY: Registry[type[Divergence]] = Registry("divergence")


def register(cls: type[Divergence]) -> type[Divergence]:
    """Class decorator adding a Divergence subclass to `REGISTRY` under `cls.name`."""
    if not cls.name:
        raise ValueError(f"{cls.__name__} must set a class attribute `name` to be registered")
    return REGISTRY.register(cls.name, cls)


def names() -> tuple[str, ...]:
    """Names of all registered divergences, sorted."""
    return REGISTRY.names()


def get(name: str | Divergence, **params: float) -> Divergence:
    """Returns the registered divergence `name` with its parameters (e.g. `get("jsd", beta=0.3)`).

    Raises ValueError naming the valid choices for an unknown name, an unknown parameter, or a
    parameter out of its range. A Divergence instance passes through unchanged (no params).
    """
    if isinstance(name, Divergence):
        if params:
            raise ValueError(f"parameters {sorted(params)} given with a Divergence instance {name}")
        return name
    cls = REGISTRY.get(name)
    valid = [f.name for f in dataclasses.fields(cls)]
    unknown = sorted(set(params) - set(valid))
    if unknown:
        hint = f"valid parameters: {', '.join(valid)}" if valid else "it takes no parameters"
        raise ValueError(f"divergence {name!r} got unknown parameter(s) {unknown}; {hint}")
    return cls(**{k: float(v) for k, v in params.items()})


def _check_open_unit(name: str, param: str, value: float) -> None:
    if not 0.0 < value < 1.0:
        raise ValueError(f"{name}: {param} must be in the open interval (0, 1), got {value}")


# ----------------------------------------------------------------------------------------------
# The registered divergences. Each docstring gives D(pi||q), its f(u) with u = q/pi, and w_f(u).
# ----------------------------------------------------------------------------------------------


@register
@dataclasses.dataclass(frozen=True)
class ReverseKL(Divergence):
    """KL(pi||q). f(u) = -log u; stop-grad -f = log u (unbiased); OPD+ w = log u - 1."""

    name: ClassVar[str] = "reverse_kl"
    formula: ClassVar[str] = "sum pi log(pi/q)"

    def _f(self, x):
        return -x

    def _opd_plus(self, x):
        return x - 1.0

    def dual(self):
        return ForwardKL()


@register
@dataclasses.dataclass(frozen=True)
class ForwardKL(Divergence):
    """KL(q||pi). f(u) = u log u; OPD+ w = u. Grows like u as log u -> +inf (guarded)."""

    name: ClassVar[str] = "forward_kl"
    formula: ClassVar[str] = "sum q log(q/pi)"

    def _f(self, x):
        return _exp(x) * x

    def _opd_plus(self, x):
        return _exp(x)

    def dual(self):
        return ReverseKL()


@register
@dataclasses.dataclass(frozen=True)
class JSD(Divergence):
    """Generalised Jensen-Shannon, beta KL(pi||m) + (1-beta) KL(q||m), m = beta pi + (1-beta) q.

    With n = log(beta + (1-beta) u): f = (1-beta) u (log u - n) - beta n, and w = beta n.
    beta = 1/2 is the symmetric JSD (bounded by log 2). Note the TRL/GKD beta weights the teacher:
    beta_TRL = 1 - beta here.
    """

    beta: float = 0.5
    name: ClassVar[str] = "jsd"
    formula: ClassVar[str] = "beta KL(pi||m) + (1-beta) KL(q||m), m = beta pi + (1-beta) q"

    def __post_init__(self):
        _check_open_unit(self.name, "beta", self.beta)

    def _n(self, x):
        return jnp.logaddexp(jnp.log(self.beta), jnp.log1p(-self.beta) + x)

    def _f(self, x):
        # log u - n = -log(beta/u + 1 - beta), finite for every x.
        x_minus_n = -jnp.logaddexp(jnp.log(self.beta) - x, jnp.log1p(-self.beta))
        return (1.0 - self.beta) * _exp(x) * x_minus_n - self.beta * self._n(x)

    def _opd_plus(self, x):
        return self.beta * self._n(x)

    def dual(self):
        return JSD(beta=1.0 - self.beta)


@register
@dataclasses.dataclass(frozen=True)
class TotalVariation(Divergence):
    """TV = 1/2 sum |pi - q|. f(u) = |u - 1| / 2; w = sign(u - 1) / 2 (sign(0) = 0)."""

    name: ClassVar[str] = "tv"
    formula: ClassVar[str] = "1/2 sum |pi - q|"

    def _f(self, x):
        return 0.5 * jnp.abs(_expm1(x))

    def _opd_plus(self, x):
        return 0.5 * jnp.sign(x)

    def dual(self):
        return self


@register
@dataclasses.dataclass(frozen=True)
class Hellinger(Divergence):
    """Squared Hellinger sum (sqrt pi - sqrt q)^2. f(u) = (sqrt u - 1)^2; w = sqrt u - 1."""

    name: ClassVar[str] = "hellinger"
    formula: ClassVar[str] = "sum (sqrt(pi) - sqrt(q))^2"

    def _f(self, x):
        # Squared: cap the exponent at half the maximum so the square saturates, not overflows.
        return jnp.square(_expm1(jnp.minimum(0.5 * x, 0.5 * max_exponent(x.dtype))))

    def _opd_plus(self, x):
        return _expm1(0.5 * x)

    def dual(self):
        return self


@register
@dataclasses.dataclass(frozen=True)
class PearsonChi2(Divergence):
    """Pearson chi^2(pi||q) = sum (pi - q)^2 / q. f(u) = (1 - u)^2 / u = 4 sinh^2(log u / 2);
    w = 2 (1 - 1/u). Weights grow like 1/u as log u -> -inf, on tokens the student favours and
    the teacher does not: common under pi, so the advantages are heavy-tailed (guarded)."""

    name: ClassVar[str] = "pearson_chi2"
    formula: ClassVar[str] = "sum (pi - q)^2 / q"

    def _f(self, x):
        # (u - 1)(1 - 1/u): at most one factor is large, so the guarded product stays finite.
        return _expm1(x) * -_expm1(-x)

    def _opd_plus(self, x):
        return -2.0 * _expm1(-x)

    def dual(self):
        return NeymanChi2()


@register
@dataclasses.dataclass(frozen=True)
class NeymanChi2(Divergence):
    """Neyman chi^2(q||pi) = sum (q - pi)^2 / pi. f(u) = (u - 1)^2; w = u^2 - 1.

    Both grow like u^2; the guard caps 2 log u at the maximal exponent, so in float32 the values
    saturate for log u above about 36.
    """

    name: ClassVar[str] = "neyman_chi2"
    formula: ClassVar[str] = "sum (q - pi)^2 / pi"

    def _f(self, x):
        return jnp.square(_expm1(jnp.minimum(x, 0.5 * max_exponent(x.dtype))))

    def _opd_plus(self, x):
        return _expm1(2.0 * x)

    def dual(self):
        return PearsonChi2()


@register
@dataclasses.dataclass(frozen=True)
class Alpha(Divergence):
    """Alpha divergence (sum pi^a q^(1-a) - 1) / (a (a - 1)), a not in {0, 1}.

    f(u) = (u^(1-a) - 1) / (a (a - 1)); w = (1 - a u^(1-a)) / (a (a - 1))
    = -1/a - expm1((1-a) log u) / (a - 1). a = 1/2 gives 2 H^2 (squared Hellinger), a = 2 gives
    Pearson chi^2 / 2 and a = -1 Neyman chi^2 / 2; the limits a -> 1 and a -> 0 are `reverse_kl`
    and `forward_kl` up to gauge, so use those names. The stop-gradient estimator of this
    generator is exactly (1/a) grad D_a (docs/math.md §1.4).
    """

    alpha: float = 0.5
    name: ClassVar[str] = "alpha"
    formula: ClassVar[str] = "(sum pi^a q^(1-a) - 1) / (a (a - 1))"

    def __post_init__(self):
        if self.alpha in (0.0, 1.0) or not math.isfinite(self.alpha):
            raise ValueError(
                f"alpha: alpha must be finite and not 0 or 1, got {self.alpha}; "
                "use 'reverse_kl' (the alpha -> 1 limit) or 'forward_kl' (alpha -> 0)"
            )

    def _f(self, x):
        a = self.alpha
        return _expm1((1.0 - a) * x) / (a * (a - 1.0))

    def _opd_plus(self, x):
        a = self.alpha
        return -1.0 / a - _expm1((1.0 - a) * x) / (a - 1.0)

    def dual(self):
        # u f(1/u) = (u^a - u) / (a (a - 1)): alpha(1 - a) in the gauge c = 1 / (a (a - 1)).
        a = self.alpha
        return Gauged(base=Alpha(alpha=1.0 - a), c=1.0 / (a * (a - 1.0)))


@register
@dataclasses.dataclass(frozen=True)
class SkewReverseKL(Divergence):
    """Skew reverse KL, KL(pi || a pi + (1-a) q), a in (0, 1).

    With n = log(a + (1-a) u): f = -n; w = n - sigmoid(log((1-a)/a) + log u).
    """

    alpha: float = 0.1
    name: ClassVar[str] = "skew_reverse_kl"
    formula: ClassVar[str] = "KL(pi || a pi + (1-a) q)"

    def __post_init__(self):
        _check_open_unit(self.name, "alpha", self.alpha)

    def _n(self, x):
        return jnp.logaddexp(jnp.log(self.alpha), jnp.log1p(-self.alpha) + x)

    def _f(self, x):
        return -self._n(x)

    def _opd_plus(self, x):
        a = self.alpha
        return self._n(x) - jax.nn.sigmoid(jnp.log1p(-a) - jnp.log(a) + x)

    def dual(self):
        return SkewForwardKL(alpha=self.alpha)


@register
@dataclasses.dataclass(frozen=True)
class SkewForwardKL(Divergence):
    """Skew forward KL, KL(q || a q + (1-a) pi), a in (0, 1).

    With n = log(a u + 1 - a): f = u (log u - n);
    w = (1-a) u / (a u + 1 - a) = (1-a) exp(log u - n), bounded by (1-a)/a.
    f grows like -u log a as log u -> +inf (guarded).
    """

    alpha: float = 0.1
    name: ClassVar[str] = "skew_forward_kl"
    formula: ClassVar[str] = "KL(q || a q + (1-a) pi)"

    def __post_init__(self):
        _check_open_unit(self.name, "alpha", self.alpha)

    def _x_minus_n(self, x):
        # log u - log(a u + 1 - a) = -log(a + (1-a)/u), finite for every x.
        return -jnp.logaddexp(jnp.log(self.alpha), jnp.log1p(-self.alpha) - x)

    def _f(self, x):
        return _exp(x) * self._x_minus_n(x)

    def _opd_plus(self, x):
        return (1.0 - self.alpha) * jnp.exp(self._x_minus_n(x))

    def dual(self):
        return SkewReverseKL(alpha=self.alpha)


# ----------------------------------------------------------------------------------------------
# Gauge.
# ----------------------------------------------------------------------------------------------


@dataclasses.dataclass(frozen=True)
class Gauged(Divergence):
    """`base` with its generator shifted by c (1 - u): the same divergence on probability vectors.

    The OPD+ advantage moves by the constant -c (zero-mean against the score, so no change in
    expectation); the stop-gradient expectation moves by c grad KL(q||pi) (docs/math.md §1.4).
    """

    base: Divergence = dataclasses.field(default_factory=ReverseKL)
    c: float = 0.0

    @property
    def name(self) -> str:  # type: ignore[override]
        return f"{self.base.name}+gauge"

    @property
    def params(self) -> dict[str, float]:
        return {**self.base.params, "gauge": self.c}

    def _f(self, x):
        return self.base._f(x) - self.c * _expm1(x)

    def _opd_plus(self, x):
        return self.base._opd_plus(x) - self.c

    def dual(self):
        # u (f(1/u) + c (1 - 1/u)) = f_dual(u) - c (1 - u)
        return Gauged(base=self.base.dual(), c=-self.c)


def with_gauge(divergence: str | Divergence, c: float) -> Divergence:
    """Returns `divergence` with generator f(u) + c (1 - u) (same divergence, other estimator)."""
    return Gauged(base=get(divergence), c=float(c))


GAUGES = ("sublinear",)


def sublinear_gauge(divergence: str | Divergence) -> float | None:
    """c = lim_{u -> inf} f(u) / u of `divergence`'s generator (float64), so that f + c (1 - u)
    grows sublinearly, as reverse KL's -log u does (docs/math.md §1.4): 1/2 log 2 for JSD(1/2),
    1/2 for TV, 1 for Hellinger; 0.0 when f already grows sublinearly; None when the limit is
    infinite (forward KL: no such gauge)."""
    d = get(divergence)
    with jax.enable_x64(True):
        ratio = lambda log_u: float(d.f(jnp.float64(log_u)) / jnp.exp(log_u))
        a, b = ratio(40.0), ratio(60.0)
    if not (math.isfinite(a) and math.isfinite(b)) or abs(a - b) > 1e-6 * max(1.0, abs(b)):
        return None
    return 0.0 if abs(b) < 1e-9 else b


def in_gauge(divergence: str | Divergence, gauge: str | None) -> Divergence:
    """`divergence` in the named gauge: None keeps the registered generator; "sublinear" shifts
    it by `sublinear_gauge` (unchanged when that is 0). The divergence is the same; only the
    stop-gradient estimator changes. ValueError for a generator without that gauge."""
    d = get(divergence)
    if gauge is None:
        return d
    if gauge not in GAUGES:
        raise ValueError(f"gauge must be None (registered) or one of {GAUGES}; got {gauge!r}")
    c = sublinear_gauge(d)
    if c is None:
        raise ValueError(
            f"{d.name} has no sublinear gauge: f(u)/u grows without bound (forward KL's u log u), "
            "so no shift c (1 - u) makes it sublinear; use gauge=None"
        )
    return d if c == 0.0 else with_gauge(d, c)


def describe() -> list[tuple[str, str, dict]]:
    """(name, formula, default parameters) for every registered divergence; for docs and CLIs."""
    rows = []
    for n in names():
        cls = REGISTRY.get(n)
        defaults = {
            p.name: p.default
            for p in inspect.signature(cls).parameters.values()
            if p.default is not inspect.Parameter.empty
        }
        rows.append((n, cls.formula, defaults))
    return rows
