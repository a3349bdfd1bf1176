"""Policy-gradient surrogate losses for on-policy distillation.

The surrogate of a batch is built from per-token terms l_t = -sg(A_t) log pi(y_t | c_t) on
response tokens; its gradient is the score-function estimator of the objective the advantages
were built for. How the terms are summed matters for bias with variable-length responses
(shared/MATH.md 5.2). With B rows, T = the padded length (or `max_len`) and |y_b| the response
length of row b:

| aggregation               | loss                               | unbiased for           |
|---------------------------|------------------------------------|------------------------|
| `seq_mean_token_sum_norm` | sum_b sum_t l / (B * T)  (default) | grad J / T             |
| `seq_mean_token_sum`      | sum_b sum_t l / B                  | grad J                 |
| `token_mean`              | sum_b sum_t l / sum_b |y_b|        | biased (ratio, O(1/B)) |
| `seq_mean_token_mean`     | mean_b (sum_t l / |y_b|)           | biased (|y| is random)  |

With fixed-length responses all four are exact rescalings of each other.
"""

from __future__ import annotations

from typing import Literal, NamedTuple

import jax
import jax.numpy as jnp

__all__ = ["AGGREGATIONS", "LossStats", "aggregate", "pg_loss", "pg_loss_and_stats"]

AGGREGATIONS = (
    "seq_mean_token_sum_norm",
    "seq_mean_token_sum",
    "token_mean",
    "seq_mean_token_mean",
)
Aggregation = Literal[
    "seq_mean_token_sum_norm", "seq_mean_token_sum", "token_mean", "seq_mean_token_mean"
]


def aggregate(
    per_token_BT: jax.Array,
    mask: jax.Array,
    aggregation: Aggregation = "seq_mean_token_sum_norm",
    *,
    max_len: int | None = None,
) -> jax.Array:
    """Reduces per-token loss terms [B, T] to a scalar as `aggregation` prescribes (see module)."""
    if aggregation not in AGGREGATIONS:
        raise ValueError(f"aggregation must be one of {AGGREGATIONS}, got {aggregation!r}")
    fm = (jnp.asarray(mask) > 0).astype(per_token_BT.dtype)
    terms = per_token_BT * fm
    b, t = terms.shape
    if aggregation == "seq_mean_token_sum_norm":
        return terms.sum() / (b * (t if max_len is None else max_len))
    if aggregation == "seq_mean_token_sum":
        return terms.sum() / b
    if aggregation == "token_mean":
        return terms.sum() / jnp.maximum(fm.sum(), 1.0)
    return (terms.sum(axis=-1) / jnp.maximum(fm.sum(axis=-1), 1.0)).mean()


class LossStats(NamedTuple):
    """Diagnostics of `pg_loss_and_stats`, each a scalar averaged over response tokens."""

    ratio_mean: jax.Array  # mean pi_theta / pi_old (1 on the first update of a rollout)
    ppo_clip_fraction: jax.Array  # tokens whose clipped branch is active (0 without ppo_clip)
    is_weight_mean: jax.Array  # mean truncated importance weight (1 without behaviour_logp)
    is_truncated_fraction: jax.Array  # tokens whose importance weight hit `tis_cap`


def pg_loss_and_stats(
    logp: jax.Array,
    advantages: jax.Array,
    mask: jax.Array,
    *,
    old_logp: jax.Array | None = None,
    behaviour_logp: jax.Array | None = None,
    tis_cap: float | None = None,
    ppo_clip: float | None = None,
    aggregation: Aggregation = "seq_mean_token_sum_norm",
    max_len: int | None = None,
) -> tuple[jax.Array, LossStats]:
    """Policy-gradient surrogate with optional truncated IS and PPO clipping, and diagnostics.

    Per response token, with r = pi_theta / pi_old (pi_old = `old_logp`, the learner's log-probs
    when the rollout was scored; defaults to sg(logp), so r = 1 with gradient grad log pi):

        l_t = -w_t * min(r A_t, clip(r, 1 - eps, 1 + eps) A_t)     (PPO, eps = `ppo_clip`)
        l_t = -w_t * r A_t                                          (no clipping)

    w_t = min(pi_old / mu, C) is the truncated importance weight (TIS) between the learner and
    the behaviour policy mu that sampled the tokens (`behaviour_logp`, e.g. the sampler's
    `sampling_logprobs`; C = `tis_cap`, None = no truncation), and 1 without `behaviour_logp`.
    At r = 1 the PPO gradient equals the unclipped one (shared/MATH.md 5.2); TIS is biased iff
    some weight exceeds C (5.3). Advantages and weights are constants (stop-gradient).
    """
    fm = (jnp.asarray(mask) > 0).astype(jnp.float32)
    count = jnp.maximum(fm.sum(), 1.0)
    adv = jax.lax.stop_gradient(advantages)
    old = jax.lax.stop_gradient(logp if old_logp is None else old_logp)
    log_ratio = jnp.where(fm > 0, logp - old, 0.0)
    ratio = jnp.exp(log_ratio)
    if ppo_clip is not None and ppo_clip > 0:
        clipped = jnp.clip(ratio, 1.0 - ppo_clip, 1.0 + ppo_clip)
        surrogate = jnp.minimum(ratio * adv, clipped * adv)
        clip_active = (clipped * adv < ratio * adv) & (fm > 0)
    else:
        surrogate = ratio * adv
        clip_active = jnp.zeros_like(fm, dtype=bool)
    if behaviour_logp is None:
        weight = jnp.ones_like(fm)
        truncated = jnp.zeros_like(fm, dtype=bool)
    else:
        raw = jnp.exp(jnp.where(fm > 0, old - jax.lax.stop_gradient(behaviour_logp), 0.0))
        cap = jnp.inf if tis_cap is None else tis_cap
        weight = jnp.minimum(raw, cap)
        truncated = (raw > cap) & (fm > 0)
    loss = aggregate(-weight * surrogate, mask, aggregation, max_len=max_len)
    stats = LossStats(
        ratio_mean=(jax.lax.stop_gradient(ratio) * fm).sum() / count,
        ppo_clip_fraction=clip_active.sum() / count,
        is_weight_mean=(weight * fm).sum() / count,
        is_truncated_fraction=truncated.sum() / count,
    )
    return loss, stats


def pg_loss(
    logp: jax.Array,
    advantages: jax.Array,
    mask: jax.Array,
    *,
    aggregation: Aggregation = "seq_mean_token_sum_norm",
    max_len: int | None = None,
    **kwargs,
) -> jax.Array:
    """Score-function surrogate aggregate(-sg(A) * r), r = pi / sg(pi) unless `old_logp` is given.

    Args:
      logp: [B, T] learner log-probs of the sampled tokens (differentiated).
      advantages: [B, T] advantages (treated as constants).
      mask: [B, T] response mask.
      **kwargs: `old_logp`, `behaviour_logp`, `tis_cap`, `ppo_clip` of `pg_loss_and_stats`.
    """
    return pg_loss_and_stats(
        logp, advantages, mask, aggregation=aggregation, max_len=max_len, **kwargs
    )[0]
