"""Pointwise properties of every registered divergence (docs/math.md §8.2, identity 1)."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from opdplus_jax import divergences as dv
from opdplus_jax.analysis import closed_forms

REQUIRED = {
    "reverse_kl",
    "forward_kl",
    "jsd",
    "tv",
    "hellinger",
    "pearson_chi2",
    "neyman_chi2",
    "alpha",
    "skew_reverse_kl",
    "skew_forward_kl",
}

# Every registered divergence, with several parameter values where it has any.
CASES = [
    ("reverse_kl", {}),
    ("forward_kl", {}),
    ("jsd", {}),
    ("jsd", {"beta": 0.2}),
    ("jsd", {"beta": 0.9}),
    ("tv", {}),
    ("hellinger", {}),
    ("pearson_chi2", {}),
    ("neyman_chi2", {}),
    ("alpha", {}),
    ("alpha", {"alpha": -1.0}),
    ("alpha", {"alpha": 0.3}),
    ("alpha", {"alpha": 2.0}),
    ("alpha", {"alpha": 3.0}),
    ("skew_reverse_kl", {}),
    ("skew_reverse_kl", {"alpha": 0.5}),
    ("skew_forward_kl", {}),
    ("skew_forward_kl", {"alpha": 0.5}),
]
IDS = [f"{n}-{'-'.join(f'{k}{v}' for k, v in p.items())}" if p else n for n, p in CASES]

# The table of docs/math.md §1.6, in u-space, written naively (valid for moderate |log u|).
NAIVE_F = {
    "reverse_kl": lambda u, p: -np.log(u),
    "forward_kl": lambda u, p: u * np.log(u),
    "jsd": lambda u, p: (
        (1 - p.get("beta", 0.5)) * u * np.log(u)
        - (p.get("beta", 0.5) + (1 - p.get("beta", 0.5)) * u)
        * np.log(p.get("beta", 0.5) + (1 - p.get("beta", 0.5)) * u)
    ),
    "tv": lambda u, p: 0.5 * np.abs(u - 1),
    "hellinger": lambda u, p: (np.sqrt(u) - 1) ** 2,
    "pearson_chi2": lambda u, p: (1 - u) ** 2 / u,
    "neyman_chi2": lambda u, p: (u - 1) ** 2,
    "alpha": lambda u, p: (
        (u ** (1 - p.get("alpha", 0.5)) - 1) / (p.get("alpha", 0.5) * (p.get("alpha", 0.5) - 1))
    ),
    "skew_reverse_kl": lambda u, p: -np.log(p.get("alpha", 0.1) + (1 - p.get("alpha", 0.1)) * u),
    "skew_forward_kl": lambda u, p: (
        u * np.log(u) - u * np.log(p.get("alpha", 0.1) * u + 1 - p.get("alpha", 0.1))
    ),
}
NAIVE_W = {
    "reverse_kl": lambda u, p: np.log(u) - 1,
    "forward_kl": lambda u, p: u,
    "jsd": lambda u, p: (
        p.get("beta", 0.5) * np.log(p.get("beta", 0.5) + (1 - p.get("beta", 0.5)) * u)
    ),
    "tv": lambda u, p: 0.5 * np.sign(u - 1),
    "hellinger": lambda u, p: np.sqrt(u) - 1,
    "pearson_chi2": lambda u, p: 2 * (1 - 1 / u),
    "neyman_chi2": lambda u, p: u**2 - 1,
    "alpha": lambda u, p: (
        (1 - p.get("alpha", 0.5) * u ** (1 - p.get("alpha", 0.5)))
        / (p.get("alpha", 0.5) * (p.get("alpha", 0.5) - 1))
    ),
}

GRID = np.linspace(-6.0, 6.0, 48)  # even count: avoids log u = 0 exactly (TV's kink)

pytestmark = pytest.mark.usefixtures("x64")


def test_registry_has_every_required_divergence():
    assert set(dv.names()) >= REQUIRED
    assert {n for n, _ in CASES} == set(dv.names()), "CASES must cover every registered name"


def test_unknown_name_lists_valid_names():
    with pytest.raises(ValueError, match=r"valid names: .*reverse_kl"):
        dv.get("kl")


@pytest.mark.parametrize(
    ("name", "params", "match"),
    [
        ("jsd", {"bta": 0.3}, "unknown parameter.*valid parameters: beta"),
        ("reverse_kl", {"beta": 0.3}, "takes no parameters"),
        ("jsd", {"beta": 1.0}, r"beta must be in the open interval \(0, 1\)"),
        ("alpha", {"alpha": 1.0}, "not 0 or 1"),
        ("alpha", {"alpha": 0.0}, "not 0 or 1"),
        ("skew_reverse_kl", {"alpha": 0.0}, "open interval"),
        ("skew_forward_kl", {"alpha": 1.5}, "open interval"),
    ],
)
def test_invalid_parameters_name_the_valid_choices(name, params, match):
    with pytest.raises(ValueError, match=match):
        dv.get(name, **params)


def test_instances_pass_through_and_are_hashable():
    d = dv.get("jsd", beta=0.3)
    assert dv.get(d) is d
    assert hash(d) == hash(dv.get("jsd", beta=0.3))
    assert str(d) == "jsd(beta=0.3)"
    with pytest.raises(ValueError, match="parameters"):
        dv.get(d, beta=0.2)


@pytest.mark.parametrize(("name", "params"), CASES, ids=IDS)
def test_generator_matches_design_table(name, params):
    d = dv.get(name, **params)
    u = np.exp(GRID)
    np.testing.assert_allclose(d.f(GRID), NAIVE_F[name](u, params), rtol=1e-10, atol=1e-12)
    np.testing.assert_allclose(d.stop_grad_advantage(GRID), -d.f(GRID), rtol=0, atol=0)
    if name in NAIVE_W:
        w = NAIVE_W[name](u, params)
        np.testing.assert_allclose(d.opd_plus_advantage(GRID), w, rtol=1e-10, atol=1e-12)


@pytest.mark.parametrize(("name", "params"), CASES, ids=IDS)
def test_opd_plus_is_u_fprime_minus_f_by_autodiff(name, params):
    d = dv.get(name, **params)
    # u f'(u) = d f / d log u: autodiff of the generator in log space.
    u_fprime = jax.vmap(jax.grad(lambda x: d.f(x)))(jnp.asarray(GRID))
    np.testing.assert_allclose(
        d.opd_plus_advantage(GRID), u_fprime - d.f(GRID), rtol=1e-10, atol=1e-12
    )
    np.testing.assert_allclose(d.u_f_prime(GRID), u_fprime, rtol=1e-10, atol=1e-12)


@pytest.mark.parametrize(("name", "params"), CASES, ids=IDS)
def test_f_vanishes_at_one_and_is_convex_in_u(name, params):
    d = dv.get(name, **params)
    assert abs(float(d.f(0.0))) < 1e-15
    f_of_u = lambda u: d.f(jnp.log(u))
    second = jax.vmap(jax.grad(jax.grad(f_of_u)))(jnp.exp(jnp.asarray(GRID)))
    assert np.all(np.asarray(second) >= -1e-12), f"{d} is not convex in u"


@pytest.mark.parametrize(("name", "params"), CASES, ids=IDS)
def test_value_is_expectation_of_f_and_dual_swaps_arguments(name, params):
    """E_pi[f(q/pi)] equals the defining formula D(pi||q), also for unnormalised q (G-OPD)."""
    d = dv.get(name, **params)
    rng = np.random.default_rng(0)
    pi = rng.dirichlet(np.ones(6), size=4)
    for q in (rng.dirichlet(np.ones(6), size=4), rng.uniform(0.05, 2.0, size=(4, 6))):
        on_policy = np.sum(pi * np.asarray(d.f(np.log(q) - np.log(pi))), axis=-1)
        np.testing.assert_allclose(on_policy, closed_forms.value(d, pi, q), rtol=1e-11)
    q = rng.dirichlet(np.ones(6), size=4)
    dual = d.dual()
    np.testing.assert_allclose(
        np.sum(pi * np.asarray(dual.f(np.log(q) - np.log(pi))), axis=-1),
        closed_forms.value(d, q, pi),
        rtol=1e-11,
    )


@pytest.mark.parametrize(("name", "params"), CASES, ids=IDS)
def test_dual_generator_is_exact_entry_by_entry(name, params):
    """dual().f(log u) = u f(1/u) pointwise (gauge included), also for a gauged divergence."""
    for d in (dv.get(name, **params), dv.with_gauge(dv.get(name, **params), 0.3)):
        np.testing.assert_allclose(
            d.dual().f(GRID), np.exp(GRID) * np.asarray(d.f(-GRID)), rtol=1e-10, atol=1e-12
        )
        np.testing.assert_allclose(d.dual().dual().f(GRID), d.f(GRID), rtol=1e-10, atol=1e-12)


def test_dual_pairs():
    assert dv.get("reverse_kl").dual() == dv.get("forward_kl")
    assert dv.get("pearson_chi2").dual() == dv.get("neyman_chi2")
    assert dv.get("jsd", beta=0.3).dual() == dv.get("jsd", beta=0.7)
    assert dv.get("alpha", alpha=3.0).dual() == dv.with_gauge(dv.get("alpha", alpha=-2.0), 1 / 6)
    assert dv.get("skew_reverse_kl", alpha=0.2).dual() == dv.get("skew_forward_kl", alpha=0.2)
    assert dv.get("tv").dual() == dv.get("tv")


@pytest.mark.parametrize("c", [-0.7, 0.4])
@pytest.mark.parametrize("name", ["jsd", "hellinger", "forward_kl"])
def test_gauge_shifts_f_by_c_one_minus_u_and_w_by_minus_c(name, c):
    d, g = dv.get(name), dv.with_gauge(name, c)
    np.testing.assert_allclose(g.f(GRID), d.f(GRID) + c * (1 - np.exp(GRID)), rtol=1e-12)
    np.testing.assert_allclose(
        g.opd_plus_advantage(GRID), d.opd_plus_advantage(GRID) - c, rtol=1e-12, atol=1e-13
    )


def test_guard_is_exact_below_the_cap_and_saturates_above():
    fkl = dv.get("forward_kl")
    # float64: exp(50) is far below the cap, so the value is exact.
    assert float(fkl.f(jnp.float64(50.0))) == pytest.approx(np.exp(50.0) * 50.0, rel=1e-14)
    # float32: log u = 100 is above the cap; the value saturates at a large finite number.
    big = fkl.f(jnp.float32(100.0))
    assert big.dtype == jnp.float32 and np.isfinite(big) and big > 1e31
    cap = dv.max_exponent(jnp.float32)
    assert 72 < cap < 73


@pytest.mark.parametrize("name", sorted(dv.names()))
def test_bf16_inputs_are_upcast_to_float32(name):
    x = jnp.linspace(-3, 3, 7, dtype=jnp.bfloat16)
    d = dv.get(name)
    assert d.f(x).dtype == jnp.float32
    assert d.opd_plus_advantage(x).dtype == jnp.float32


@settings(max_examples=60, deadline=None)
@given(
    name_params=st.sampled_from(CASES),
    dtype=st.sampled_from([np.float32, np.float64]),
    xs=st.lists(st.floats(-1e6, 1e6, allow_nan=False), min_size=1, max_size=16),
)
def test_extreme_log_ratios_give_finite_values(name_params, dtype, xs):
    """Finite for |log u| <= 1e6, the range the docs promise."""
    name, params = name_params
    d = dv.get(name, **params)
    fixed = [-50.0, 50.0, -88.0, 88.0, 89.0, 200.0, -200.0, 1e4, -1e4, 1e6, -1e6, 0.0]
    x = jnp.asarray(np.array([*xs, *fixed], dtype=dtype))
    for out in (d.f(x), d.stop_grad_advantage(x), d.opd_plus_advantage(x)):
        assert out.dtype == dtype
        assert np.all(np.isfinite(np.asarray(out))), (d, xs)


def test_the_sublinear_gauge_by_name():
    jsd = dv.in_gauge("jsd", "sublinear")
    assert isinstance(jsd, dv.Gauged) and jsd.c == pytest.approx(0.5 * np.log(2), abs=1e-9)
    assert dv.in_gauge("reverse_kl", "sublinear") == dv.get("reverse_kl")  # already sublinear
    assert dv.in_gauge("tv", None) == dv.get("tv")
    # The gauge changes the generator, not the divergence: f + c (1 - u) sums to the same value.
    pi, q = jnp.array([0.2, 0.5, 0.3]), jnp.array([0.6, 0.1, 0.3])
    value = lambda d: float(jnp.sum(pi * d.f(jnp.log(q / pi))))
    assert value(jsd) == pytest.approx(value(dv.get("jsd")), abs=1e-6)
    with pytest.raises(ValueError, match="forward_kl has no sublinear gauge"):
        dv.in_gauge("forward_kl", "sublinear")
    with pytest.raises(ValueError, match="gauge must be None"):
        dv.in_gauge("jsd", "linear")
