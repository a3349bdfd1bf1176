"""Policy-gradient surrogate losses for on-policy distillation.

The surrogate of a batch is built from per-token terms l_t = -sg(A_t) log pi(y_t | c_t) on
response tokens; its gradient is the score-function estimator of the objective the advantages
were built for. How the terms are summed matters for bias with variable-length responses
(docs/math.md §5.1). With B rows, T = the padded length (or `max_len`) and |y_b| the response
length of row b:

| aggregation               | loss                               | unbiased for           |
|---------------------------|------------------------------------|------------------------|
| `seq_mean_token_sum_norm` | sum_b sum_t l / (B * T)  (default) | grad J / T             |
| `seq_mean_token_sum`      | sum_b sum_t l / B                  | grad J                 |
| `token_mean`              | sum_b sum_t l / sum_b |y_b|        | biased (ratio, O(1/B)) |
| `seq_mean_token_mean`     | mean_b (sum_t l / |y_b|)           | biased (|y| is random)  |

With fixed-length responses all four are exact rescalings of each other. Each is a function in
the `AGGREGATIONS` registry; registering another makes it usable by name (`aggregation=`). An
aggregation must be linear in the terms (its normaliser depends on the mask and shape only): the
train step splits a batch into microbatches and sums their losses with the whole batch's per-token
weights (`aggregation_weights`), which is exact only for a linear aggregation.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import NamedTuple

import jax
import jax.numpy as jnp

from opdplus_jax.registry import Registry

__all__ = [
    "AGGREGATIONS",
    "LossStats",
    "aggregate",
    "aggregation_weights",
    "pg_loss",
    "pg_loss_and_stats",
]

# A registered `AGGREGATIONS` name.
Aggregation = str
# agg(terms_BT, fm_BT, max_len): the scalar loss of masked per-token terms (zero off the mask).
AggregationFn = Callable[[jax.Array, jax.Array, int | None], jax.Array]

AGGREGATIONS: Registry[AggregationFn] = Registry("aggregation")


@AGGREGATIONS.register("seq_mean_token_sum_norm")
def seq_mean_token_sum_norm(terms: jax.Array, fm: jax.Array, max_len: int | None) -> jax.Array:
    """Normaliser B * T (T = `max_len`, else the padded length): unbiased for grad J / T."""
    b, t = terms.shape
    return terms.sum() / (b * (t if max_len is None else max_len))


@AGGREGATIONS.register("seq_mean_token_sum")
def seq_mean_token_sum(terms: jax.Array, fm: jax.Array, max_len: int | None) -> jax.Array:
    """Normaliser B: unbiased for grad J."""
    return terms.sum() / terms.shape[0]


@AGGREGATIONS.register("token_mean")
def token_mean(terms: jax.Array, fm: jax.Array, max_len: int | None) -> jax.Array:
    """Normaliser sum_b |y_b|, the number of response tokens: biased (a ratio, O(1/B))."""
    return terms.sum() / jnp.maximum(fm.sum(), 1.0)


@AGGREGATIONS.register("seq_mean_token_mean")
def seq_mean_token_mean(terms: jax.Array, fm: jax.Array, max_len: int | None) -> jax.Array:
    """Normaliser |y_b| per row, then the mean over rows: biased (|y| is random)."""
    return (terms.sum(axis=-1) / jnp.maximum(fm.sum(axis=-1), 1.0)).mean()


def aggregate(
    per_token_BT: jax.Array,
    mask: jax.Array,
    aggregation: Aggregation = "seq_mean_token_sum_norm",
    *,
    max_len: int | None = None,
) -> jax.Array:
    """Reduces per-token loss terms [B, T] to a scalar with the `AGGREGATIONS` entry named."""
    reduce = AGGREGATIONS.get(aggregation)
    fm = (jnp.asarray(mask) > 0).astype(per_token_BT.dtype)
    return reduce(per_token_BT * fm, fm, max_len)


def aggregation_weights(
    mask: jax.Array,
    aggregation: Aggregation = "seq_mean_token_sum_norm",
    *,
    max_len: int | None = None,
) -> jax.Array:
    """Per-token weights w [B, T] (float32) with aggregate(terms, mask) == sum(terms * w).

    Every registered aggregation is linear in its terms, so w is its gradient with respect to
    them (0 off the mask). Computed on a whole batch and sliced like the rows, the weights let
    microbatches of that batch each contribute sum(terms * w) to exactly the whole batch's loss
    (`pg_loss_and_stats(..., token_weights=)`).
    """
    fm = (jnp.asarray(mask) > 0).astype(jnp.float32)
    reduce = lambda terms: aggregate(terms, fm, aggregation, max_len=max_len)
    return jax.grad(reduce)(jnp.zeros_like(fm))


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
    token_weights: jax.Array | None = None,
    num_tokens: jax.Array | None = None,
) -> tuple[jax.Array, LossStats]:
    """Policy-gradient surrogate with optional truncated IS and PPO clipping, and diagnostics.

    Per response token, with r = pi_theta / pi_old (pi_old = `old_logp`, the learner's log-probs
    when the rollout was scored; defaults to sg(logp), so r = 1 with gradient grad log pi):

        l_t = -w_t * min(r A_t, clip(r, 1 - eps, 1 + eps) A_t)     (PPO, eps = `ppo_clip`)
        l_t = -w_t * r A_t                                          (ppo_clip=None)

    w_t = min(pi_old / mu, C) is the truncated importance weight (TIS) between the learner and
    the behaviour policy mu that sampled the tokens (`behaviour_logp`, e.g. the sampler's
    `sampling_logprobs`; C = `tis_cap`, None = no truncation), and 1 without `behaviour_logp`.
    At r = 1 the PPO gradient equals the unclipped one (docs/math.md §5.4); TIS is biased iff
    some weight exceeds C (5.3). Advantages and weights are constants (stop-gradient).

    Part of a larger batch (a microbatch): `token_weights` [B, T] (the larger batch's
    `aggregation_weights`, sliced to these rows) replaces the aggregation, loss = sum(terms * w),
    and `num_tokens` (the larger batch's response-token count) normalises the stats. The parts'
    losses and stats then sum to those of the whole batch. Defaults: this batch alone.
    """
    if ppo_clip is not None and not ppo_clip > 0:
        raise ValueError(f"ppo_clip must be None (off) or a positive float, got {ppo_clip!r}")
    fm = (jnp.asarray(mask) > 0).astype(jnp.float32)
    count = jnp.maximum(fm.sum(), 1.0) if num_tokens is None else num_tokens
    adv = jax.lax.stop_gradient(advantages)
    old = jax.lax.stop_gradient(logp if old_logp is None else old_logp)
    log_ratio = jnp.where(fm > 0, logp - old, 0.0)
    ratio = jnp.exp(log_ratio)
    if ppo_clip is not None:
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
    if token_weights is None:
        loss = aggregate(-weight * surrogate, mask, aggregation, max_len=max_len)
    else:
        loss = jnp.sum(-weight * surrogate * fm * jax.lax.stop_gradient(token_weights))
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
