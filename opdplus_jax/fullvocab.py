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

from collections.abc import Callable
from typing import Any, Literal, NamedTuple

import jax
import jax.numpy as jnp

from opdplus_jax import divergences, estimators, losses

__all__ = [
    "Head",
    "Scorer",
    "Terms",
    "analytic_loss",
    "check_support",
    "context_divergence",
    "divergence_terms",
    "token_divergences",
]

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


LogitsFn = Callable[[jax.Array], jax.Array]


class Scorer(NamedTuple):
    """A model at the completion positions: final hidden states [B, T, D] and its output layer
    (hidden [B, K, D] -> float32 logits [B, K, V]), e.g. `CausalLM.logits`."""

    hidden_BTD: jax.Array
    logits: LogitsFn


class Terms(NamedTuple):
    """Per-position outputs of `divergence_terms`, each [B, T] float32 (0 where mask is 0)."""

    divergence: jax.Array  # D_t, differentiable in the student's output layer and hidden states
    student_logp: jax.Array  # log pi(y_t | c_t) of the given tokens (differentiable)
    teacher_logp: jax.Array  # log q(y_t | c_t) of the given tokens (a constant)


def check_support(support: str, top_k: Any, tail: Any) -> None:
    """Raises ValueError unless (support, top_k, tail) is one of the supported combinations."""
    if support not in SUPPORTS:
        raise ValueError(f"support must be one of {SUPPORTS}, got {support!r}")
    if support != "full" and (isinstance(top_k, bool) or not isinstance(top_k, int) or top_k < 1):
        raise ValueError(f"support={support!r} needs a positive integer top_k, got {top_k!r}")
    if tail not in TAILS:
        raise ValueError(f"tail must be one of {TAILS}, got {tail!r}")


def divergence_terms(
    student: Scorer,
    teacher: Scorer,
    tokens_BT: jax.Array,
    mask_BT: jax.Array,
    *,
    divergence: str | divergences.Divergence = "reverse_kl",
    reward_scale: float = 1.0,
    reference: Scorer | None = None,
    vocab_size: int | None = None,
    chunk_size: int = 128,
    support: Support = "full",
    top_k: int | None = None,
    tail: Tail = "renormalize",
) -> Terms:
    """Full-vocabulary divergences D_t and the tokens' log-probs, chunk by chunk over T.

    The output layers run on `chunk_size` positions at a time inside `jax.checkpoint` (a
    `lax.map` over chunks), so at most [B, chunk_size, V] logits per model are live, in the
    forward and in the backward (which recomputes them). `vocab_size` slices padded
    vocabularies (e.g. 151936 rows of which 151669 are real tokens). The teacher and reference
    are constants (stop-gradient); the student is differentiated through its `logits` function
    and hidden states. `tokens_BT` are the completion tokens whose log-probs are gathered.
    """
    check_support(support, top_k, tail)
    if reward_scale != 1.0 and reference is None:
        raise ValueError(f"reward_scale={reward_scale} needs the reference model's Head")
    if not (isinstance(chunk_size, int) and chunk_size >= 1):
        raise ValueError(f"chunk_size must be an int >= 1, got {chunk_size!r}")
    d = divergences.get(divergence)
    b, t = mask_BT.shape
    k = min(chunk_size, t)
    num_chunks = -(-t // k)
    models = {"student": student, "teacher": teacher}
    if reward_scale != 1.0:
        models["reference"] = reference
    for name, m in models.items():
        if m.hidden_BTD.shape[:2] != (b, t):
            raise ValueError(
                f"{name} hidden states {m.hidden_BTD.shape} do not match the mask {(b, t)}"
            )
    if tokens_BT.shape != (b, t):
        raise ValueError(f"tokens {tokens_BT.shape} do not match the mask {(b, t)}")

    def chunks(x_BT_):  # [B, T, ...] -> [C, B, K, ...], zero-padded on T
        x = jnp.pad(x_BT_, ((0, 0), (0, num_chunks * k - t)) + ((0, 0),) * (x_BT_.ndim - 2))
        return x.reshape(b, num_chunks, k, *x_BT_.shape[2:]).swapaxes(0, 1)

    def log_probs(model, hidden_BKD, frozen):
        logits = model.logits(hidden_BKD)[..., :vocab_size]
        logits = jnp.asarray(logits, jnp.promote_types(logits.dtype, jnp.float32))
        logp = jax.nn.log_softmax(logits, axis=-1)  # never below float32
        return jax.lax.stop_gradient(logp) if frozen else logp

    def one_chunk(xs):
        lp = log_probs(student, xs["student"], frozen=False)
        lq = log_probs(teacher, xs["teacher"], frozen=True)
        if support != "full" and top_k > lp.shape[-1]:
            raise ValueError(f"top_k={top_k} exceeds the vocabulary ({lp.shape[-1]} tokens)")
        target = lq
        if reward_scale != 1.0:
            lr = log_probs(reference, xs["reference"], frozen=True)
            target = reward_scale * lq + (1.0 - reward_scale) * lr
        div = context_divergence(d, lp, target, support=support, top_k=top_k, tail=tail)
        token = xs["tokens"][..., None]
        pick = lambda logp: jnp.take_along_axis(logp, token, axis=-1)[..., 0]
        return div, pick(lp), pick(lq)

    xs = {name: chunks(m.hidden_BTD) for name, m in models.items()}
    xs["tokens"] = chunks(jnp.asarray(tokens_BT, jnp.int32))
    per_chunk = jax.lax.map(jax.checkpoint(one_chunk, prevent_cse=False), xs)  # [C, B, K] each
    live = mask_BT > 0
    unchunk = lambda x_CBK: jnp.where(live, x_CBK.swapaxes(0, 1).reshape(b, -1)[:, :t], 0.0)
    return Terms(*(unchunk(x) for x in per_chunk))


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
    """Per-position full-vocabulary divergences D_t [B, T] (0 where mask is 0) of `Head`s.

    `divergence_terms` with each head's output layer `hidden @ unembed` (float32 logits):
    differentiable in the student's hidden states and unembedding, the teacher and reference
    heads constants.
    """

    def scorer(head: Head | None) -> Scorer | None:
        if head is None:
            return None
        dtype = jnp.promote_types(head.unembed_DV.dtype, jnp.float32)
        unembed = lambda x: jnp.einsum(
            "bkd,dv->bkv", x, head.unembed_DV, preferred_element_type=dtype
        )
        return Scorer(head.hidden_BTD, unembed)

    tokens = jnp.zeros(mask_BT.shape, jnp.int32)  # only the divergences are used
    return divergence_terms(
        scorer(student),
        scorer(teacher),
        tokens,
        mask_BT,
        divergence=divergence,
        reward_scale=reward_scale,
        reference=scorer(reference),
        vocab_size=vocab_size,
        chunk_size=chunk_size,
        support=support,
        top_k=top_k,
        tail=tail,
    ).divergence


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
