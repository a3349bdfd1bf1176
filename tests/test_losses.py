"""Policy-gradient surrogate: aggregation normalisers, PPO clipping and truncated IS."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from opdplus_jax import losses


def _batch():
    rng = np.random.default_rng(0)
    logp = jnp.asarray(np.log(rng.uniform(0.1, 1.0, (3, 5))), jnp.float32)
    adv = jnp.asarray(rng.normal(size=(3, 5)), jnp.float32)
    mask = jnp.asarray([[1, 1, 1, 1, 1], [1, 1, 0, 0, 0], [1, 0, 0, 0, 0]], jnp.float32)
    return logp, adv, mask


@pytest.mark.parametrize(
    ("aggregation", "normaliser"),
    [
        ("seq_mean_token_sum_norm", lambda m: 3 * 5),
        ("seq_mean_token_sum", lambda m: 3),
        ("token_mean", lambda m: m.sum()),
    ],
)
def test_aggregation_normalisers(aggregation, normaliser):
    logp, adv, mask = _batch()
    got = losses.pg_loss(logp, adv, mask, aggregation=aggregation)
    want = float(jnp.sum(-adv * mask)) / float(normaliser(mask))  # value of -A r at r = 1
    assert float(got) == pytest.approx(want, rel=1e-6)


def test_seq_mean_token_mean_by_hand():
    logp, adv, mask = _batch()
    got = losses.pg_loss(logp, adv, mask, aggregation="seq_mean_token_mean")
    per_row = jnp.sum(-adv * mask, -1) / mask.sum(-1)
    assert float(got) == pytest.approx(float(per_row.mean()), rel=1e-6)


def test_unknown_aggregation():
    logp, adv, mask = _batch()
    with pytest.raises(ValueError, match="unknown aggregation 'mean'; valid names: seq_mean_"):
        losses.pg_loss(logp, adv, mask, aggregation="mean")


@pytest.mark.parametrize("ppo_clip", [0.0, -0.2])
def test_ppo_clip_off_is_none_only(ppo_clip):
    logp, adv, mask = _batch()
    with pytest.raises(ValueError, match="ppo_clip must be None"):
        losses.pg_loss(logp, adv, mask, ppo_clip=ppo_clip)


def test_surrogate_gradient_is_minus_advantage_times_score():
    logp, adv, mask = _batch()
    grad = jax.grad(lambda lp: losses.pg_loss(lp, adv, mask, aggregation="seq_mean_token_sum"))
    np.testing.assert_allclose(grad(logp), -adv * mask / 3, rtol=1e-6)


def test_ppo_clip_at_ratio_one_equals_the_unclipped_gradient():
    logp, adv, mask = _batch()
    plain = jax.grad(lambda lp: losses.pg_loss(lp, adv, mask))(logp)
    clipped = jax.grad(lambda lp: losses.pg_loss(lp, adv, mask, ppo_clip=0.2, old_logp=logp))(logp)
    np.testing.assert_allclose(plain, clipped, rtol=1e-6)


def test_ppo_clip_zeroes_the_gradient_of_clipped_tokens():
    logp, _, mask = _batch()
    adv = jnp.ones_like(logp)
    old = logp - jnp.asarray([[0.5, 0.0, 0.0, 0.5, 0.0], [0.0] * 5, [0.0] * 5])  # r = e^0.5
    fn = lambda lp: losses.pg_loss_and_stats(lp, adv, mask, old_logp=old, ppo_clip=0.2)
    grad = jax.grad(lambda lp: fn(lp)[0])(logp)
    assert float(grad[0, 0]) == 0 and float(grad[0, 3]) == 0 and float(grad[0, 1]) != 0
    stats = fn(logp)[1]
    assert float(stats.ppo_clip_fraction) == pytest.approx(2 / 8)


def test_truncated_importance_weights():
    logp, adv, mask = _batch()
    behaviour = logp - jnp.log(jnp.asarray([[3.0, 1.0, 0.5, 1.0, 1.0]] * 3))  # rho = 3, 1, 0.5
    loss, stats = losses.pg_loss_and_stats(
        logp, adv, mask, behaviour_logp=behaviour, tis_cap=2.0, aggregation="seq_mean_token_sum"
    )
    weights = jnp.minimum(jnp.exp(logp - behaviour), 2.0)
    assert float(loss) == pytest.approx(float(jnp.sum(-weights * adv * mask)) / 3, rel=1e-5)
    assert float(stats.is_truncated_fraction) == pytest.approx(3 / 8)  # rho = 3 in all rows
    assert float(stats.ratio_mean) == pytest.approx(1.0)
