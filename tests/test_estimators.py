"""estimators.advantages against a plain loop, masks, jit, G-OPD, baselines and bad input."""

import chex
import jax.numpy as jnp
import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from opdplus_jax import divergences as dv
from opdplus_jax import estimators


def _batch(seed=0, b=4, t=7, dtype=np.float32):
    rng = np.random.default_rng(seed)
    ls = np.log(rng.uniform(0.05, 1.0, (b, t))).astype(dtype)
    lt = np.log(rng.uniform(0.05, 1.0, (b, t))).astype(dtype)
    lr = np.log(rng.uniform(0.05, 1.0, (b, t))).astype(dtype)
    lengths = rng.integers(1, t + 1, b)
    lengths[0] = t
    mask = (np.arange(t)[None] < lengths[:, None]).astype(dtype)
    return ls, lt, lr, mask


def _loop_advantages(ls, lt, lr, mask, d, correction, level, discount, lam):
    """The definition, one token at a time in float64."""
    ls, lt, lr, mask = (np.asarray(a, np.float64) for a in (ls, lt, lr, mask))
    x = (lam * lt + (1 - lam) * lr - ls) * mask
    f = np.asarray(d.f(x)) * mask
    a = d.opd_plus_advantage if correction == "opd_plus" else d.stop_grad_advantage
    out = np.zeros_like(x)
    for b in range(x.shape[0]):
        if level == "sequence":
            out[b] = float(a(x[b].sum())) * mask[b]
            continue
        for t in range(x.shape[1]):
            future = sum(discount ** (s - t) * f[b, s] for s in range(t + 1, x.shape[1]))
            out[b, t] = (float(a(x[b, t])) - future) * mask[b, t]
    return out


@pytest.mark.usefixtures("x64")
@pytest.mark.parametrize("name", sorted(dv.names()))
@pytest.mark.parametrize(
    ("correction", "level", "discount", "lam"),
    [
        ("opd_plus", "token", 0.0, 1.0),
        ("opd_plus", "token", 1.0, 1.0),
        ("stop_grad", "token", 0.7, 1.25),
        ("opd_plus", "token", 0.5, 0.5),
        ("opd_plus", "sequence", 0.0, 1.0),
        ("stop_grad", "sequence", 0.0, 1.25),
    ],
)
def test_matches_the_definition_token_by_token(name, correction, level, discount, lam):
    ls, lt, lr, mask = _batch(dtype=np.float64)
    d = dv.get(name)
    got = estimators.advantages(
        ls,
        lt,
        mask,
        divergence=name,
        correction=correction,
        level=level,
        discount=discount,
        reward_scale=lam,
        ref_logp=lr,
    )
    want = _loop_advantages(ls, lt, lr, mask, d, correction, level, discount, lam)
    np.testing.assert_allclose(got, want, rtol=1e-12, atol=1e-12)


@pytest.mark.usefixtures("x64")
@pytest.mark.parametrize(("length", "discount"), [(200, 0.9), (129, 1.0), (64, 0.5), (1, 0.7)])
def test_reward_to_go_across_many_chunks(length, discount):
    """The chunked reverse scan (64-token chunks) equals the token-by-token definition."""
    ls, lt, lr, mask = _batch(seed=11, b=3, t=length, dtype=np.float64)
    got = estimators.advantages(ls, lt, mask, divergence="jsd", discount=discount)
    want = _loop_advantages(ls, lt, lr, mask, dv.get("jsd"), "opd_plus", "token", discount, 1.0)
    np.testing.assert_allclose(got, want, rtol=1e-11, atol=1e-11)


@pytest.mark.parametrize("lam", [0.0, 0.5, 1.0, 1.25, 2.0])
def test_gopd_reverse_kl_stop_grad_discount0_is_the_paper_advantage(lam):
    ls, lt, lr, mask = _batch(seed=3)
    got = estimators.advantages(
        ls, lt, mask, divergence="reverse_kl", correction="stop_grad", reward_scale=lam, ref_logp=lr
    )
    want = (lam * lt + (1 - lam) * lr - ls) * mask
    np.testing.assert_allclose(got, want, rtol=1e-6, atol=1e-6)


def test_opd_plus_reverse_kl_is_stop_grad_minus_one():
    ls, lt, _, mask = _batch(seed=4)
    sg = estimators.advantages(ls, lt, mask, correction="stop_grad", discount=1.0)
    plus = estimators.advantages(ls, lt, mask, correction="opd_plus", discount=1.0)
    np.testing.assert_allclose(plus, (sg - 1.0) * mask, atol=1e-6)


def test_discount_objective_scales_step_t_by_gamma_t():
    ls, lt, _, mask = _batch(seed=5)
    kw = {"divergence": "jsd", "discount": 0.6}
    plain = estimators.advantages(ls, lt, mask, **kw)
    scaled = estimators.advantages(ls, lt, mask, discount_objective=True, **kw)
    np.testing.assert_allclose(scaled, plain * 0.6 ** np.arange(ls.shape[1]), rtol=1e-6)
    zero = estimators.advantages(ls, lt, mask, divergence="jsd", discount_objective=True)
    assert np.all(np.asarray(zero)[:, 1:] == 0)


class TestMasking:
    @settings(max_examples=30, deadline=None)
    @given(
        name=st.sampled_from(sorted(dv.names())),
        level=st.sampled_from(["token", "sequence"]),
        discount=st.sampled_from([0.0, 0.5, 1.0]),
        seed=st.integers(0, 2**16),
        garbage=st.sampled_from([np.nan, -np.inf, np.inf, 1e30]),
    )
    def test_masked_positions_never_leak(self, name, level, discount, seed, garbage):
        ls, lt, _, mask = _batch(seed=seed)
        if level == "sequence":
            discount = 0.0
        kw = {"divergence": name, "level": level, "discount": discount}
        clean = np.asarray(estimators.advantages(ls, lt, mask, **kw))
        dirty_t = np.where(mask > 0, lt, garbage).astype(np.float32)
        dirty_s = np.where(mask > 0, ls, garbage).astype(np.float32)
        dirty = np.asarray(estimators.advantages(dirty_s, dirty_t, mask, **kw))
        np.testing.assert_array_equal(clean, dirty)
        assert np.all(dirty[mask == 0] == 0)
        assert np.all(np.isfinite(dirty))

    @settings(max_examples=40, deadline=None)
    @given(
        name=st.sampled_from(sorted(dv.names())),
        level=st.sampled_from(["token", "sequence"]),
        correction=st.sampled_from(["opd_plus", "stop_grad"]),
        log_u=st.lists(st.floats(-50, 50), min_size=8, max_size=8),
    )
    def test_extreme_log_ratios_give_finite_advantages(self, name, level, correction, log_u):
        lt = np.asarray(log_u, np.float32)[None].repeat(2, 0)
        ls = np.zeros_like(lt)
        mask = np.ones_like(lt)
        discount = 1.0 if level == "token" else 0.0
        adv = estimators.advantages(
            ls, lt, mask, divergence=name, level=level, correction=correction, discount=discount
        )
        assert adv.dtype == jnp.float32
        assert np.all(np.isfinite(np.asarray(adv)))


class TestJit(chex.TestCase):
    @chex.variants(with_jit=True, without_jit=True)
    def test_jit_equals_no_jit(self):
        ls, lt, lr, mask = _batch(seed=7)

        def fn(ls, lt, lr, mask):
            return estimators.advantages(
                ls,
                lt,
                mask,
                divergence="hellinger",
                discount=0.9,
                reward_scale=1.25,
                ref_logp=lr,
            )

        got = self.variant(fn)(ls, lt, lr, mask)
        want = _loop_advantages(
            ls, lt, lr, mask, dv.get("hellinger"), "opd_plus", "token", 0.9, 1.25
        )
        chex.assert_shape(got, ls.shape)
        chex.assert_type(got, jnp.float32)
        np.testing.assert_allclose(got, want, rtol=2e-5, atol=2e-5)


def test_bf16_logprobs_give_float32_advantages():
    ls, lt, _, mask = _batch(seed=8)
    adv = estimators.advantages(ls.astype(jnp.bfloat16), lt.astype(jnp.bfloat16), mask)
    assert adv.dtype == jnp.float32


def test_clipping_is_reported_and_off_by_default():
    ls, lt, _, mask = _batch(seed=9)
    lt = lt.copy()
    lt[0, 0] = ls[0, 0] + 10.0
    lt[1, 0] = ls[1, 0] - 10.0
    out = estimators.estimate(ls, lt, mask, divergence="forward_kl")
    assert float(out.clip_fraction) == 0.0 and float(out.log_ratio[0, 0]) == pytest.approx(10.0)
    out = estimators.estimate(ls, lt, mask, divergence="forward_kl", log_ratio_clip=5.0)
    assert float(out.log_ratio[0, 0]) == 5.0 and float(out.log_ratio[1, 0]) == -5.0
    assert float(out.clip_fraction) == pytest.approx(2 / mask.sum())


def test_estimate_reports_rewards():
    ls, lt, _, mask = _batch(seed=10)
    out = estimators.estimate(ls, lt, mask, divergence="tv")
    np.testing.assert_allclose(out.reward, -dv.get("tv").f(out.log_ratio) * mask, rtol=1e-6)


@pytest.mark.parametrize(
    ("kwargs", "match"),
    [
        ({"divergence": "klx"}, "unknown divergence"),
        ({"correction": "exact"}, "unknown correction 'exact'; valid names: opd_plus, stop_grad"),
        ({"level": "seq"}, "level must be one of"),
        ({"discount": 1.5}, r"discount must be a Python float in \[0, 1\]"),
        ({"level": "sequence", "discount": 0.5}, "no meaning at level='sequence'"),
        ({"reward_scale": 1.25}, "needs ref_logp"),
        ({"reward_scale": float("nan")}, "finite"),
        ({"log_ratio_clip": 0.0}, "positive"),
    ],
)
def test_bad_configuration_raises_a_clear_error(kwargs, match):
    ls, lt, _, mask = _batch()
    with pytest.raises(ValueError, match=match):
        estimators.advantages(ls, lt, mask, **kwargs)


def test_bad_shapes_and_dtypes_raise_a_clear_error():
    ls, lt, _, mask = _batch()
    with pytest.raises(ValueError, match="one shape"):
        estimators.advantages(ls, lt[:, :-1], mask)
    with pytest.raises(ValueError, match="one shape"):
        estimators.advantages(ls[0], lt[0], mask[0])
    with pytest.raises(ValueError, match="floating-point"):
        estimators.advantages(ls.astype(np.int32), lt, mask)


class TestGroupBaseline:
    def test_leave_one_out_by_hand(self):
        adv = np.array([[1.0, 2.0], [3.0, 4.0], [5.0, 0.0], [10.0, 20.0], [30.0, 40.0], [50, 60]])
        mask = np.array([[1, 1], [1, 1], [1, 0], [1, 1], [1, 1], [1, 1]], np.float32)
        out = np.asarray(estimators.group_baseline(adv, mask, 3))
        # group 0, position 0: others of row 0 are rows 1, 2 -> mean(3, 5) = 4.
        assert out[0, 0] == 1 - 4 and out[1, 0] == 3 - 3 and out[2, 0] == 5 - 2
        # position 1: row 2 is finished, so row 0's baseline is row 1 only, and row 2 stays 0.
        assert out[0, 1] == 2 - 4 and out[1, 1] == 4 - 2 and out[2, 1] == 0
        assert out[3, 0] == 10 - 40

    def test_mean_baseline_is_a_rescaled_leave_one_out(self):
        rng = np.random.default_rng(0)
        adv, mask = rng.normal(size=(8, 5)), np.ones((8, 5))
        loo = estimators.group_baseline(adv, mask, 4, kind="loo")
        mean = estimators.group_baseline(adv, mask, 4, kind="mean")
        np.testing.assert_allclose(mean, 0.75 * loo, rtol=1e-6)

    def test_errors(self):
        adv, mask = np.zeros((6, 3)), np.ones((6, 3))
        with pytest.raises(ValueError, match="not a multiple of group_size"):
            estimators.group_baseline(adv, mask, 4)
        with pytest.raises(ValueError, match="group_size >= 2"):
            estimators.group_baseline(adv, mask, 1)
        with pytest.raises(ValueError, match="unknown baseline 'std'; valid names: loo, mean"):
            estimators.group_baseline(adv, mask, 2, kind="std")
