"""The OPD train step: score a rollout with every model, build advantages, update the student.

Models are pure functions: each jitted function takes the student's params and the frozen
teachers' and references' params as arguments, with their graphdefs static. One compilation
therefore serves any weights (and the sampler shares the student's params). The batch is a
`rollout.Rollout` (B = prompts x samples rows, prompt-major); the step reads its prompts and
completions, the behaviour log-probs (truncated IS) and each row's teacher index. Every log-prob
comes from `scoring.completion_logprobs`, the package's one scoring path, traced into the step.

Multi-teacher routing: every teacher scores the batch and each row keeps its own teacher's
log-probs, reward scale lambda and reference, so advantages are built per row from its teacher.
Frozen models never get a gradient (their params are not differentiated) nor optimizer state.

`train_step` (the default, one update per rollout) fuses scoring and the update in one jitted,
donated call; the old log-probs are then the current ones (ratio 1). With several minibatch
updates per rollout, `score_rollout` fixes the old log-probs and advantages first and
`update_step` runs per minibatch (PPO clipping and truncated IS apply there).
"""

from __future__ import annotations

import dataclasses
import functools
from typing import Any, NamedTuple

import flax.struct
import jax
import jax.numpy as jnp
import optax
from flax import nnx

from opdplus_jax import divergences, estimators, losses, scoring
from opdplus_jax.rollout import Rollout


@flax.struct.dataclass
class TrainState:
    step: jax.Array  # int32 scalar: optimizer updates applied (skipped ones excluded)
    params: Any  # the student's nnx.State of nnx.Param
    opt_state: optax.OptState


class Frozen(NamedTuple):
    """Params of the frozen models: one per teacher, one per distinct reference."""

    teachers: tuple[Any, ...]
    references: tuple[Any, ...]


@dataclasses.dataclass(frozen=True)
class StepConfig:
    """Everything static about a step (hashable: part of the compilation key)."""

    student: nnx.GraphDef
    teachers: tuple[nnx.GraphDef, ...]
    references: tuple[nnx.GraphDef, ...]
    reward_scales: tuple[float, ...]  # lambda per teacher
    reference_of: tuple[int | None, ...]  # per teacher: index into `references`, or None
    vocab_size: int  # logits are sliced to the shared tokenizer vocabulary
    divergence: divergences.Divergence
    correction: str = "opd_plus"
    level: str = "token"
    discount: float = 0.0
    log_ratio_clip: float | None = None
    baseline: str | None = None
    group_size: int = 1
    aggregation: str = "seq_mean_token_sum_norm"
    ppo_clip: float | None = None
    tis_cap: float | None = None


def _completion_logprobs(graphdef, params, rollout, vocab_size: int) -> jax.Array:
    """log pi(y_t | c_t) [B, T] of a rollout's completion tokens under a model (float32)."""
    return scoring.completion_logprobs(
        nnx.merge(graphdef, params),
        rollout.prompt_tokens,
        rollout.prompt_mask,
        rollout.tokens,
        rollout.mask,
        vocab_size,
    )


def _route(per_teacher: list[jax.Array], teacher_B: jax.Array) -> jax.Array:
    """Row b of the result is row b of per_teacher[teacher_B[b]]."""
    if len(per_teacher) == 1:
        return per_teacher[0]
    stacked = jnp.stack(per_teacher)  # [K, B, T]
    return jnp.take_along_axis(stacked, teacher_B[None, :, None], axis=0)[0]


def _advantages(cfg: StepConfig, frozen: Frozen, batch: Rollout, student_logp):
    """Per-row advantages from each row's teacher (and reference), plus diagnostics."""
    logp_sg = jax.lax.stop_gradient(student_logp)
    teacher_logps = [
        _completion_logprobs(g, p, batch, cfg.vocab_size)
        for g, p in zip(cfg.teachers, frozen.teachers, strict=True)
    ]
    ref_logps = [
        _completion_logprobs(g, p, batch, cfg.vocab_size)
        for g, p in zip(cfg.references, frozen.references, strict=True)
    ]
    advs, log_us, clips = [], [], []
    for k, lt in enumerate(teacher_logps):
        ref = cfg.reference_of[k]
        est = estimators.estimate(
            logp_sg,
            lt,
            batch.mask,
            divergence=cfg.divergence,
            correction=cfg.correction,
            level=cfg.level,
            discount=cfg.discount,
            reward_scale=cfg.reward_scales[k],
            ref_logp=None if ref is None else ref_logps[ref],
            log_ratio_clip=cfg.log_ratio_clip,
        )
        advs.append(est.advantages)
        log_us.append(est.log_ratio)
        clips.append(est.clip_fraction)
    adv = _route(advs, batch.teacher)
    if cfg.baseline is not None:
        adv = estimators.group_baseline(adv, batch.mask, cfg.group_size, kind=cfg.baseline)
    teacher_logp = _route(teacher_logps, batch.teacher)
    log_u = _route(log_us, batch.teacher)
    fm = (batch.mask > 0).astype(jnp.float32)
    count = jnp.maximum(fm.sum(), 1.0)
    big = jnp.finfo(jnp.float32).max
    stats = {
        "advantage_mean": (adv * fm).sum() / count,
        "advantage_abs_mean": (jnp.abs(adv) * fm).sum() / count,
        # k1 estimate of KL(student || teacher) per token on the student's own samples.
        "kl_per_token": ((logp_sg - teacher_logp) * fm).sum() / count,
        "log_ratio_min": jnp.min(jnp.where(fm > 0, log_u, big)),
        "log_ratio_max": jnp.max(jnp.where(fm > 0, log_u, -big)),
        "log_ratio_clip_fraction": jnp.mean(jnp.stack(clips)),
        "response_length": fm.sum(-1).mean(),
    }
    return adv, stats


def _update(cfg: StepConfig, opt, state: TrainState, loss_fn):
    """Gradient step that is skipped (params and optimizer state kept) if anything is non-finite:
    the loss, the gradient or the update itself (e.g. a NaN learning rate, or an optimizer state
    that overflowed), so a non-finite update never reaches the params or a checkpoint."""
    (loss, aux), grads = jax.value_and_grad(loss_fn, has_aux=True)(state.params)
    grad_norm = optax.tree.norm(grads)
    updates, new_opt_state = opt.update(grads, state.opt_state, state.params)
    new_params = optax.apply_updates(state.params, updates)
    finite = jnp.isfinite(loss) & jnp.isfinite(grad_norm) & jnp.isfinite(optax.tree.norm(updates))
    keep = lambda new, old: jax.tree.map(lambda n, o: jnp.where(finite, n, o), new, old)
    new_state = TrainState(
        step=state.step + finite.astype(jnp.int32),
        params=keep(new_params, state.params),
        opt_state=keep(new_opt_state, state.opt_state),
    )
    metrics = {"loss": loss, "grad_norm": grad_norm, "skipped": 1.0 - finite, **aux}
    return new_state, metrics


def _loss_stats(stats: losses.LossStats) -> dict[str, jax.Array]:
    return {
        "ratio_mean": stats.ratio_mean,
        "ppo_clip_fraction": stats.ppo_clip_fraction,
        "is_weight_mean": stats.is_weight_mean,
        "is_truncated_fraction": stats.is_truncated_fraction,
    }


@functools.partial(jax.jit, static_argnames=("cfg", "opt"), donate_argnames=("state",))
def train_step(cfg: StepConfig, opt, state: TrainState, frozen: Frozen, batch: Rollout):
    """One fused on-policy update: student/teacher/reference forwards, advantages, loss, step."""

    def loss_fn(params):
        logp = _completion_logprobs(cfg.student, params, batch, cfg.vocab_size)
        adv, stats = _advantages(cfg, frozen, batch, logp)
        loss, loss_stats = losses.pg_loss_and_stats(
            logp,
            adv,
            batch.mask,
            behaviour_logp=batch.behaviour_logp if cfg.tis_cap else None,
            tis_cap=cfg.tis_cap,
            aggregation=cfg.aggregation,
        )
        return loss, {**stats, **_loss_stats(loss_stats)}

    return _update(cfg, opt, state, loss_fn)


class Scored(NamedTuple):
    """A rollout's student log-probs and advantages, fixed for its minibatch updates ([B, T])."""

    old_logp: jax.Array
    advantages: jax.Array


@functools.partial(jax.jit, static_argnames=("cfg",))
def score_rollout(cfg: StepConfig, params, frozen: Frozen, batch: Rollout):
    """Old log-probs and advantages of a rollout, fixed for its minibatch updates."""
    logp = _completion_logprobs(cfg.student, params, batch, cfg.vocab_size)
    adv, stats = _advantages(cfg, frozen, batch, logp)
    return Scored(old_logp=logp, advantages=adv), stats


@functools.partial(jax.jit, static_argnames=("cfg", "opt"), donate_argnames=("state",))
def update_step(cfg: StepConfig, opt, state: TrainState, batch: Rollout, scored: Scored):
    """One minibatch update against fixed old log-probs and advantages (PPO clip, TIS)."""

    def loss_fn(params):
        logp = _completion_logprobs(cfg.student, params, batch, cfg.vocab_size)
        loss, loss_stats = losses.pg_loss_and_stats(
            logp,
            scored.advantages,
            batch.mask,
            old_logp=scored.old_logp,
            behaviour_logp=batch.behaviour_logp if cfg.tis_cap else None,
            tis_cap=cfg.tis_cap,
            ppo_clip=cfg.ppo_clip,
            aggregation=cfg.aggregation,
        )
        return loss, _loss_stats(loss_stats)

    return _update(cfg, opt, state, loss_fn)
