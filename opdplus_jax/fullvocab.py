"""Full-vocabulary (analytic) OPD: the exact per-context divergence at every visited context.

Instead of scoring only the sampled token, estimator C_gamma of docs/math.md §2.5 computes
at each response position t the whole-vocabulary divergence

    D_t = D_f(pi(. | c_t) || nu(. | c_t)) = sum_v pi_v f(nu_v / pi_v),
    log nu = lambda log q + (1 - lambda) log r        (nu = q for lambda = 1)

and differentiates it directly through the student's softmax (no stop-gradient issue: the
pathwise derivative is exact). With a discount, later contexts' divergences enter as rewards:

    loss = aggregate_t( D_t(theta) - sg(A_t) log pi(y_t | c_t) ),   A_t = -sum_{s>t} g^(s-t) D_s,

which is unbiased for G_gamma (gamma = 0: the GKD-style per-token loss on student rollouts).

Memory: logits are produced chunk by chunk over T from the models' final hidden states and
unembedding matrices (`Head`), inside `jax.checkpoint`, so neither the forward nor the backward
pass ever holds B x T x V logits; peak extra memory is B x chunk_size x V per model.

Support. Serving stacks often return only the teacher's top-k log-probs. `support="teacher_topk"`
or `"student_topk"` restricts the sum to the top `top_k` tokens of that model at each context,
with `tail="renormalize"` (both distributions renormalised on the support) or `tail="bucket"`
(one extra outcome holding the remaining mass of each). Both are biased approximations of D_t;
`opdplus_jax.analysis` computes the bias exactly.
"""

from __future__ import annotations

from typing import Literal, NamedTuple

import jax
import jax.numpy as jnp

from opdplus_jax import divergences, estimators, losses

__all__ = ["Head", "analytic_loss", "context_divergence", "token_divergences"]

Support = Literal["full", "teacher_topk", "student_topk"]
Tail = Literal["renormalize", "bucket"]
SUPPORTS = ("full", "teacher_topk", "student_topk")
TAILS = ("renormalize", "bucket")


class Head(NamedTuple):
    """A model's final hidden states and unembedding: logits = hidden_BTD @ unembed_DV."""

    hidden_BTD: jax.Array
    unembed_DV: jax.Array


def _restrict(logp_NV, keep_NV, tail):
    """Log-probs on the support (renormalised), or on the support plus one tail outcome."""
    on = jnp.where(keep_NV, logp_NV, -jnp.inf)
    if tail == "renormalize":
        return on - jax.nn.logsumexp(on, axis=-1, keepdims=True)
    off = jax.nn.logsumexp(jnp.where(keep_NV, -jnp.inf, logp_NV), axis=-1, keepdims=True)
    return jnp.concatenate([on, off], axis=-1)


def context_divergence(
    divergence: divergences.Divergence,
    student_logp_NV: jax.Array,
    target_logp_NV: jax.Array,
    *,
    support: Support = "full",
    top_k: int | None = None,
    tail: Tail = "renormalize",
) -> jax.Array:
    """sum_v pi_v f(nu_v / pi_v) over the last axis, from log-probs [..., V] -> [...].

    `target_logp` may be unnormalised (G-OPD). Entries with -inf student log-prob (or outside
    the support) contribute exactly 0.
    """
    lp, lq = student_logp_NV, target_logp_NV
    if support != "full":
        ranked = lq if support == "teacher_topk" else lp
        kth = jax.lax.top_k(jax.lax.stop_gradient(ranked), top_k)[0][..., -1:]
        keep = ranked >= kth
        lp, lq = _restrict(lp, keep, tail), _restrict(lq, keep, tail)
    live = lp > -jnp.inf
    lp_safe = jnp.where(live, lp, 0.0)
    lq_safe = jnp.where(live, lq, 0.0)
    log_u = lq_safe - lp_safe
    # pi f(q/pi) = q f_dual(pi/q): use the primal form where u <= 1 and the dual form where
    # u > 1, so the generator is only ever evaluated at |log u| where its weight keeps the
    # product moderate (no saturation for tokens the student gives almost no mass).
    primal = jnp.exp(lp_safe) * divergence.f(jnp.minimum(log_u, 0.0))
    dual = jnp.exp(lq_safe) * divergence.dual().f(-jnp.maximum(log_u, 0.0))
    return jnp.sum(jnp.where(live, jnp.where(log_u > 0, dual, primal), 0.0), axis=-1)


def token_divergences(
    student: Head,
    teacher: Head,
    mask_BT: jax.Array,
    *,
    divergence: str | divergences.Divergence = "reverse_kl",
    reward_scale: float = 1.0,
    reference: Head | None = None,
    vocab_size: int | None = None,
    chunk_size: int = 128,
    support: Support = "full",
    top_k: int | None = None,
    tail: Tail = "renormalize",
) -> jax.Array:
    """Per-position full-vocabulary divergences D_t [B, T] (0 where mask is 0).

    Differentiable in the student's hidden states and unembedding; the teacher and reference
    heads are treated as constants. `vocab_size` slices padded vocabularies (e.g. 151936 rows of
    which 151669 are real tokens). Logits are computed in float32 chunk by chunk (see module doc).
    """
    if support not in SUPPORTS:
        raise ValueError(f"support must be one of {SUPPORTS}, got {support!r}")
    if tail not in TAILS:
        raise ValueError(f"tail must be one of {TAILS}, got {tail!r}")
    if support != "full" and not (isinstance(top_k, int) and top_k >= 1):
        raise ValueError(f"support={support!r} needs a positive integer top_k, got {top_k!r}")
    if reward_scale != 1.0 and reference is None:
        raise ValueError(f"reward_scale={reward_scale} needs the reference model's Head")
    d = divergences.get(divergence)
    b, t = mask_BT.shape
    k = min(chunk_size, t)
    num_chunks = -(-t // k)
    heads = {"student": student, "teacher": teacher}
    if reward_scale != 1.0:
        heads["reference"] = reference
    for name, head in heads.items():
        if head.hidden_BTD.shape[:2] != (b, t):
            raise ValueError(
                f"{name} hidden states {head.hidden_BTD.shape} do not match the mask {(b, t)}"
            )

    def chunks(x_BTD):  # [B, T, D] -> [C, B, K, D], zero-padded on T
        x = jnp.pad(x_BTD, ((0, 0), (0, num_chunks * k - t), (0, 0)))
        return x.reshape(b, num_chunks, k, -1).swapaxes(0, 1)

    dtype = jnp.promote_types(student.unembed_DV.dtype, jnp.float32)  # never below float32

    def log_probs(hidden, unembed):
        logits = jnp.einsum("bkd,dv->bkv", hidden, unembed, preferred_element_type=dtype)
        if vocab_size is not None:
            logits = logits[..., :vocab_size]
        return jax.nn.log_softmax(logits.astype(dtype), axis=-1)

    frozen = {n: jax.lax.stop_gradient(h) for n, h in heads.items() if n != "student"}

    @jax.checkpoint
    def one_chunk(student_unembed, xs):
        lp = log_probs(xs["student"], student_unembed)
        target = log_probs(xs["teacher"], frozen["teacher"].unembed_DV)
        if reward_scale != 1.0:
            ref = log_probs(xs["reference"], frozen["reference"].unembed_DV)
            target = reward_scale * target + (1.0 - reward_scale) * ref
        return context_divergence(d, lp, target, support=support, top_k=top_k, tail=tail)

    xs = {"student": chunks(student.hidden_BTD)}
    xs |= {n: chunks(h.hidden_BTD) for n, h in frozen.items()}
    per_chunk = jax.lax.map(lambda x: one_chunk(student.unembed_DV, x), xs)  # [C, B, K]
    d_BT = per_chunk.swapaxes(0, 1).reshape(b, num_chunks * k)[:, :t]
    return jnp.where(mask_BT > 0, d_BT, 0.0)


def analytic_loss(
    divergence_BT: jax.Array,
    logp_BT: jax.Array,
    mask_BT: jax.Array,
    *,
    discount: float = 0.0,
    aggregation: losses.Aggregation = "seq_mean_token_sum_norm",
    max_len: int | None = None,
) -> jax.Array:
    """aggregate(D_t - sg(A_t) log pi_t) with A_t = -sum_{s>t} discount^(s-t) D_s (C_gamma).

    With discount = 0 this is the plain per-token full-vocabulary loss; `logp_BT` (the sampled
    tokens' log-probs) only matters for discount > 0.
    """
    if not 0.0 <= discount <= 1.0:
        raise ValueError(f"discount must be in [0, 1], got {discount!r}")
    fm = (mask_BT > 0).astype(divergence_BT.dtype)
    future = estimators.reward_to_go(-jax.lax.stop_gradient(divergence_BT) * fm, discount)
    per_token = divergence_BT - jax.lax.stop_gradient(future) * logp_BT
    return losses.aggregate(per_token, mask_BT, aggregation, max_len=max_len)
