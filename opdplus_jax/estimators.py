"""Per-token advantages for on-policy distillation: OPD, OPD+ and G-OPD/ExOPD.

Inputs are per-token log-probs of the sampled response tokens, all [B, T]:
``student_logp`` (ls, the learner's log pi), ``teacher_logp`` (lt, log q) and optionally
``ref_logp`` (lr, log r), with ``mask`` [B, T] equal to 1 on response tokens (up to and including
EOS) and 0 on padding and after EOS. The per-token log-ratio is

    log u_t = lambda lt_t + (1 - lambda) lr_t - ls_t          (lambda = reward_scale)

so lambda = 1 is plain OPD, lambda > 1 is ExOPD, and the reward is -f(u_t). Advantages are
ascended: the loss surrogate is -sum_t sg(A_t) log pi(y_t | c_t) (see `opdplus_jax.losses`).

- ``level="token"``: A_t = a(u_t) - sum_{s>t} discount^(s-t) f(u_s), where a = w_f (OPD+, the
  default) or -f (stop-gradient). discount = 1 is unbiased for grad E[sum_t f(u_t)];
  discount = 0 for the myopic gradient (context distribution held fixed). The reward-to-go is a
  reverse `lax.scan` over T. With ``discount_objective=True`` step t (0-based) is further scaled
  by discount^t, which makes it unbiased for grad E[sum_t discount^t D_t].
- ``level="sequence"``: with log U = sum_t log u_t, every token gets w_f(U) or -f(U); unbiased
  for the sequence-level divergence.

Stop-gradient is unbiased only for reverse KL; the bias of every option is derived in
docs/math.md and computed exactly by `opdplus_jax.analysis`. Masked positions never
contribute: their log-ratios are zeroed before any arithmetic (a -inf or NaN teacher log-prob on
padding cannot leak), and their advantages are exactly 0.

Optional ``log_ratio_clip=c`` clamps each log u_t to [-c, c] (None, the default, is off; biased,
see docs/math.md §5.2 and §6.5); `estimate` reports the fraction of response tokens it changed.

Corrections (a = w_f or -f) and group baselines are looked up by name in the registries
`CORRECTIONS` and `BASELINES`; registering a new entry makes it usable by name everywhere.
"""

from __future__ import annotations

import functools
import math
from collections.abc import Callable
from typing import Any, Literal, NamedTuple

import jax
import jax.numpy as jnp
import numpy as np

from opdplus_jax import divergences
from opdplus_jax.registry import Registry

__all__ = [
    "BASELINES",
    "CORRECTIONS",
    "LEVELS",
    "TASK_ADVANTAGES",
    "Estimate",
    "advantages",
    "estimate",
    "group_baseline",
    "log_ratio",
    "reward_to_go",
    "task_advantages",
]

LEVELS = ("token", "sequence")
Level = Literal["token", "sequence"]

# a(divergence, log_u): the per-token advantage a correction assigns to a log-ratio (any shape).
CorrectionFn = Callable[[divergences.Divergence, jax.Array], jax.Array]
# b(adv_GNT, fm_GNT, eps): advantages minus a baseline, for G groups of N samples of T tokens.
BaselineFn = Callable[[jax.Array, jax.Array, float], jax.Array]

CORRECTIONS: Registry[CorrectionFn] = Registry("correction")
BASELINES: Registry[BaselineFn] = Registry("baseline")


@CORRECTIONS.register("opd_plus")
def opd_plus(divergence: divergences.Divergence, log_u: jax.Array) -> jax.Array:
    """w_f(u) = u f'(u) - f(u): the OPD+ advantage, unbiased for every f."""
    return divergence.opd_plus_advantage(log_u)


@CORRECTIONS.register("stop_grad")
def stop_grad(divergence: divergences.Divergence, log_u: jax.Array) -> jax.Array:
    """-f(u): the reward taken as a constant, unbiased only for reverse KL."""
    return divergence.stop_grad_advantage(log_u)


class Estimate(NamedTuple):
    """Advantages and what they were built from, all [B, T] except `clip_fraction` (scalar)."""

    advantages: jax.Array  # A_t, zero where mask == 0
    log_ratio: jax.Array  # log u_t after clipping, zero where mask == 0
    reward: jax.Array  # -f(u_t), the per-token reward, zero where mask == 0
    clip_fraction: jax.Array  # fraction of response tokens whose log-ratio was clipped


def _check_arrays(student_logp, teacher_logp, mask, ref_logp):
    arrays = {"student_logp": student_logp, "teacher_logp": teacher_logp, "mask": mask}
    if ref_logp is not None:
        arrays["ref_logp"] = ref_logp
    shapes = {k: tuple(jnp.shape(v)) for k, v in arrays.items()}
    if len(set(shapes.values())) != 1 or len(shapes["mask"]) != 2:
        raise ValueError(f"expected arrays of one shape [B, T]; got shapes {shapes}")
    for k, v in arrays.items():
        if k != "mask" and not jnp.issubdtype(jnp.result_type(v), jnp.floating):
            raise ValueError(f"{k} must be a floating-point array of log-probs, got {v.dtype}")


def _check_config(correction, level, discount, reward_scale, ref_logp, log_ratio_clip):
    CORRECTIONS.get(correction)  # an unknown name raises, listing the valid ones
    if level not in LEVELS:
        raise ValueError(f"level must be one of {LEVELS}, got {level!r}")
    if not (isinstance(discount, int | float) and 0.0 <= discount <= 1.0):
        raise ValueError(f"discount must be a Python float in [0, 1], got {discount!r}")
    if level == "sequence" and discount not in (0.0, 1.0):
        raise ValueError(
            "discount has no meaning at level='sequence' (every token gets the sequence "
            f"advantage); leave it at its default, got {discount!r}"
        )
    if not (isinstance(reward_scale, int | float) and math.isfinite(reward_scale)):
        raise ValueError(f"reward_scale must be a finite Python float, got {reward_scale!r}")
    if reward_scale != 1.0 and ref_logp is None:
        raise ValueError(
            f"reward_scale={reward_scale} needs ref_logp (the reference model's log-probs of the "
            "sampled tokens): log u = lambda log q + (1 - lambda) log r - log pi"
        )
    if log_ratio_clip is not None and not (
        isinstance(log_ratio_clip, int | float) and log_ratio_clip > 0
    ):
        raise ValueError(f"log_ratio_clip must be None or a positive float, got {log_ratio_clip!r}")


def log_ratio(
    student_logp: jax.Array,
    teacher_logp: jax.Array,
    *,
    reward_scale: float = 1.0,
    ref_logp: jax.Array | None = None,
) -> jax.Array:
    """log u = lambda lt + (1 - lambda) lr - ls, in at least float32 (never bf16)."""
    dtype = jnp.promote_types(jnp.result_type(student_logp, teacher_logp), jnp.float32)
    ls = jnp.asarray(student_logp, dtype)
    lt = jnp.asarray(teacher_logp, dtype)
    if reward_scale == 1.0:
        return lt - ls
    lr = jnp.asarray(ref_logp, dtype)
    return reward_scale * lt + (1.0 - reward_scale) * lr - ls


def reward_to_go(reward_BT: jax.Array, discount: float, chunk: int = 64) -> jax.Array:
    """future_t = sum_{s>t} discount^(s-t) reward_s, by a reverse `lax.scan` over time chunks.

    T is split into chunks of K tokens. Within a chunk the discounted sums are one matmul with
    the K x K matrix M[j, i] = discount^(j-i) (j > i); across chunks a reverse scan carries
    Y_c = sum_{s >= start of chunk c} discount^(s - start) reward_s. This is the same recursion
    as a token-by-token reverse scan, with T/K sequential steps instead of T.
    """
    if discount == 0.0:
        return jnp.zeros_like(reward_BT)
    b, t = reward_BT.shape
    k = min(chunk, t)
    num_chunks = -(-t // k)
    r_BCK = jnp.pad(reward_BT, ((0, 0), (0, num_chunks * k - t))).reshape(b, num_chunks, k)
    lag = np.arange(k)[:, None] - np.arange(k)[None, :]  # [j, i] = j - i
    powers = np.where(lag > 0, float(discount) ** np.maximum(lag, 0), 0.0)  # strictly later
    within_BCK = jnp.einsum("bcj,ji->bci", r_BCK, jnp.asarray(powers, r_BCK.dtype))
    decay_K = jnp.asarray(float(discount) ** np.arange(k, 0, -1), r_BCK.dtype)  # g^(K-i)
    start_value_BC = jnp.einsum(
        "bcj,j->bc", r_BCK, jnp.asarray(float(discount) ** np.arange(k), r_BCK.dtype)
    )

    def step(later_value_B, start_value_B):
        # carry: Y_{c+1}; emit it, and fold chunk c in: Y_c = value_c + g^K Y_{c+1}.
        return start_value_B + float(discount) ** k * later_value_B, later_value_B

    _, later_CB = jax.lax.scan(step, jnp.zeros((b,), r_BCK.dtype), start_value_BC.T, reverse=True)
    future_BCK = within_BCK + decay_K * later_CB.T[..., None]
    return future_BCK.reshape(b, num_chunks * k)[:, :t]


@functools.partial(
    jax.jit,
    static_argnames=(
        "divergence",
        "correction",
        "level",
        "discount",
        "reward_scale",
        "log_ratio_clip",
        "discount_objective",
    ),
)
def _estimate(
    student_logp,
    teacher_logp,
    mask,
    ref_logp,
    *,
    divergence: divergences.Divergence,
    correction: str,
    level: str,
    discount: float,
    reward_scale: float,
    log_ratio_clip: float | None,
    discount_objective: bool,
) -> Estimate:
    valid = jnp.asarray(mask) > 0
    raw = log_ratio(student_logp, teacher_logp, reward_scale=reward_scale, ref_logp=ref_logp)
    raw = jnp.where(valid, raw, 0.0)
    if log_ratio_clip is None:
        log_u = raw
        clip_fraction = jnp.zeros((), raw.dtype)
    else:
        log_u = jnp.clip(raw, -log_ratio_clip, log_ratio_clip)
        num_valid = jnp.maximum(valid.sum(), 1)
        clip_fraction = ((log_u != raw) & valid).sum() / num_valid
    fm = valid.astype(log_u.dtype)
    advantage_fn = functools.partial(CORRECTIONS.get(correction), divergence)
    reward = -divergence.f(log_u) * fm

    if level == "sequence":
        log_u_seq = log_u.sum(axis=-1, keepdims=True)  # [B, 1]
        adv = advantage_fn(log_u_seq) * fm
    else:
        adv = (advantage_fn(log_u) + reward_to_go(reward, discount)) * fm
        if discount_objective:
            t = jnp.arange(adv.shape[-1], dtype=adv.dtype)
            adv = adv * (discount**t if discount > 0 else (t == 0).astype(adv.dtype))
    return Estimate(advantages=adv, log_ratio=log_u, reward=reward, clip_fraction=clip_fraction)


def estimate(
    student_logp: jax.Array,
    teacher_logp: jax.Array,
    mask: jax.Array,
    *,
    divergence: str | divergences.Divergence = "reverse_kl",
    correction: str = "opd_plus",
    level: Level = "token",
    discount: float = 0.0,
    reward_scale: float = 1.0,
    ref_logp: jax.Array | None = None,
    log_ratio_clip: float | None = None,
    discount_objective: bool = False,
) -> Estimate:
    """Like `advantages`, also returning the log-ratios, rewards and the clip fraction."""
    _check_arrays(student_logp, teacher_logp, mask, ref_logp)
    _check_config(correction, level, discount, reward_scale, ref_logp, log_ratio_clip)
    return _estimate(
        student_logp,
        teacher_logp,
        mask,
        ref_logp if reward_scale != 1.0 else None,
        divergence=divergences.get(divergence),
        correction=correction,
        level=level,
        discount=float(discount),
        reward_scale=float(reward_scale),
        log_ratio_clip=None if log_ratio_clip is None else float(log_ratio_clip),
        discount_objective=bool(discount_objective),
    )


def advantages(
    student_logp: jax.Array, teacher_logp: jax.Array, mask: jax.Array, **config: Any
) -> jax.Array:
    """Per-token OPD / OPD+ / G-OPD advantages [B, T] (zero where mask is 0); see module doc.

    Args:
      student_logp, teacher_logp: [B, T] log-probs of the sampled tokens under the learner and the
        teacher. Compute both with the learner-side forward, not the rollout engine
        (docs/math.md §5.5).
      mask: [B, T], 1 on response tokens (through EOS), 0 elsewhere.
      **config: the keyword arguments of `estimate`, with its defaults:
        divergence: a registered name (`opdplus_jax.divergences.names()`) or a Divergence object.
        correction: a `CORRECTIONS` name: "opd_plus" (w_f(u) = u f'(u) - f(u), unbiased) or
          "stop_grad" (-f(u)).
        level: "token" or "sequence".
        discount: gamma in [0, 1] for the reward-to-go of later tokens' rewards (token level).
        reward_scale: lambda of G-OPD; != 1 needs `ref_logp`. 1.25 is ExOPD.
        ref_logp: [B, T] reference log-probs (student init, or the teacher's pre-RL base).
        log_ratio_clip: clamp log u to [-c, c] (biased); None (the default) is off.
        discount_objective: scale step t by discount^t (unbiased for the discounted objective).

    Jit-able: config arguments are Python values; call under `jax.jit` with them bound.
    """
    return estimate(student_logp, teacher_logp, mask, **config).advantages


@BASELINES.register("loo")
def leave_one_out(adv: jax.Array, fm: jax.Array, eps: float) -> jax.Array:
    """b_{i,t} = mean of A_{j,t} over the other samples j != i of the group still active at t.

    It depends only on other, independent samples, so it is unbiased (docs/math.md §4.2).
    """
    del eps
    if adv.shape[1] < 2:
        raise ValueError("a leave-one-out baseline needs group_size >= 2")
    total, count = adv.sum(axis=1, keepdims=True), fm.sum(axis=1, keepdims=True)
    others = jnp.maximum(count - fm, 1.0)
    return adv - (total - adv) / others


@BASELINES.register("mean")
def group_mean(adv: jax.Array, fm: jax.Array, eps: float) -> jax.Array:
    """b = the group mean at t, the sample itself included: k_t/(k_t+1) times "loo" at each
    position, k_t = the other samples still active at t; (n-1)/n only with equal lengths."""
    del eps
    total, count = adv.sum(axis=1, keepdims=True), fm.sum(axis=1, keepdims=True)
    return adv - total / jnp.maximum(count, 1.0)


@BASELINES.register("mean_std")
def group_mean_std(adv: jax.Array, fm: jax.Array, eps: float) -> jax.Array:
    """The "mean" baseline divided by the group std + eps (GRPO-style); biased in direction."""
    centred = group_mean(adv, fm, eps)
    count = fm.sum(axis=1, keepdims=True)
    var = (jnp.square(centred) * fm).sum(axis=1, keepdims=True) / jnp.maximum(count, 1.0)
    return centred / (jnp.sqrt(var) + eps)


def group_baseline(
    advantages_BT: jax.Array,
    mask: jax.Array,
    group_size: int,
    *,
    kind: str = "loo",
    eps: float = 1e-6,
) -> jax.Array:
    """Subtracts a per-position group baseline from advantages of n samples per prompt.

    Rows are grouped consecutively: rows [g*n, (g+1)*n) are the n samples of prompt g. `kind`
    names a `BASELINES` entry; a run without a baseline does not call this function.

    - "loo": b_{i,t} = mean of A_{j,t} over the other samples j != i of the group that are still
      active at t (0 if none). It depends only on other, independent samples, so it is unbiased
      (docs/math.md §4.2).
    - "mean": b includes the sample itself; at position t this equals k_t/(k_t+1) times "loo"
      (k_t = the other samples still active at t). With equal lengths that is (n-1)/n, a pure
      rescale of the gradient; with unequal lengths the factor varies with t, so the direction
      is biased too (docs/math.md §4.2).
    - "mean_std": "mean", then divided by the group std (GRPO-style). BIASED: it changes the
      direction, not only the scale; offered for comparison.
    """
    baseline = BASELINES.get(kind)
    advantages_BT = jnp.asarray(advantages_BT)
    b, t = advantages_BT.shape
    if group_size < 1 or b % group_size:
        raise ValueError(f"batch size {b} is not a multiple of group_size={group_size}")
    fm = (jnp.asarray(mask) > 0).astype(advantages_BT.dtype).reshape(-1, group_size, t)
    adv = advantages_BT.reshape(-1, group_size, t) * fm
    return (baseline(adv, fm, eps) * fm).reshape(b, t)


TASK_ADVANTAGES = ("group_norm", "loo")


def task_advantages(
    reward_B: jax.Array, group_size: int, *, kind: str = "group_norm", eps: float = 1e-6
) -> jax.Array:
    """Per-row advantages [B] of a scalar task reward (e.g. a verifier's 0/1 score) per row.

    Rows are grouped consecutively as in `group_baseline` (n = `group_size` samples per prompt).

    - "group_norm": (r_i - mean_g r) / (std_g r + eps), the population std of the prompt's n
      rewards (GRPO's group-normalised reward); 0 for a group whose rewards are all equal.
      Biased in direction (the std depends on the sample itself), the usual choice.
    - "loo": r_i - mean_{j != i} r_j: unbiased for the gradient of E[r] (RLOO; needs n >= 2).
    """
    if kind not in TASK_ADVANTAGES:
        raise ValueError(f"kind must be one of {TASK_ADVANTAGES}, got {kind!r}")
    reward_B = jnp.asarray(reward_B, jnp.float32)
    (b,) = reward_B.shape
    if group_size < 2 or b % group_size:
        raise ValueError(
            "task advantages need group_size >= 2 dividing the batch; got group_size="
            f"{group_size} for {b} rows"
        )
    r = reward_B.reshape(-1, group_size)
    mean = r.mean(axis=1, keepdims=True)
    if kind == "loo":
        adv = (r - mean) * group_size / (group_size - 1)  # r_i - mean of the others
    else:
        adv = (r - mean) / (r.std(axis=1, keepdims=True) + eps)
    return adv.reshape(b)
