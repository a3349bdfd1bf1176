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

from typing import Literal

import jax
import jax.numpy as jnp

__all__ = ["AGGREGATIONS", "aggregate", "pg_loss"]

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


def pg_loss(
    logp: jax.Array,
    advantages: jax.Array,
    mask: jax.Array,
    *,
    aggregation: Aggregation = "seq_mean_token_sum_norm",
    max_len: int | None = None,
) -> jax.Array:
    """Score-function surrogate: aggregate(-sg(A) * log pi) over response tokens.

    Args:
      logp: [B, T] learner log-probs of the sampled tokens (differentiated).
      advantages: [B, T] advantages (treated as constants).
      mask: [B, T] response mask.
    """
    per_token = -jax.lax.stop_gradient(advantages) * logp
    return aggregate(per_token, mask, aggregation, max_len=max_len)
