"""The OPD train step: score a rollout with every model, build advantages, update the student.

Models are pure functions: each jitted function takes the student's params and the frozen
teachers' and references' params as arguments, with their graphdefs static. One compilation
therefore serves any weights (and the sampler shares the student's params). The batch is a
`rollout.Rollout` (B = prompts x samples rows, prompt-major); the step reads its prompts and
completions and the behaviour log-probs (truncated IS). Every log-prob comes from
`scoring.completion_logprobs`, the package's one scoring path, traced into the step.

Routed teachers: the rows come in contiguous teacher blocks of static sizes
(`StepConfig.teacher_rows`: teacher 0's rows first, then teacher 1's, ...; the trainer's data
pipeline draws a fixed number of prompts per teacher for every batch). Each teacher, and each
reference, scores only the rows of its block(s), so K teachers cost about one teacher's FLOPs;
each row's advantages use its teacher's log-probs, reward scale lambda and reference. Frozen
models never get a gradient (their params are not differentiated) nor optimizer state.

Memory: the rollout is split into microbatches of `StepConfig.microbatch_rows` rows, a
`lax.scan` that accumulates the gradient in float32, so only one microbatch's activations are
live. Microbatch m holds rows [m b/M, (m+1) b/M) of every teacher block of b rows (M
microbatches), so every microbatch has the same static teacher blocks, and whole groups of a
prompt's samples (the group baselines need them). The loss's per-token weights and every metric's
token count are the whole batch's (computed before the scan), so the loss, the gradient and the
metrics equal those of the unsplit step to float rounding, for every aggregation and baseline.
`StepConfig.logits_chunk` bounds the output layer's logits within a microbatch
(`completion_logprobs(chunk_size=)`).

`train_step` (the default, one update per rollout) fuses scoring and the update in one jitted,
donated call; the old log-probs are then the current ones (ratio 1). With several minibatch
updates per rollout, `score_rollout` fixes the old log-probs and advantages first and
`update_step` runs per minibatch (PPO clipping and truncated IS apply there); both split into
microbatches the same way.
"""

from __future__ import annotations

import dataclasses
import functools
from collections.abc import Callable
from typing import Any, NamedTuple

import flax.struct
import jax
import jax.numpy as jnp
import optax
from flax import nnx
from jax.sharding import Mesh

from opdplus_jax import divergences, estimators, fullvocab, losses, scoring, sharding
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


def _off_or_at_least_one(value: Any, field: str) -> None:
    if value is not None and (isinstance(value, bool) or not isinstance(value, int) or value < 1):
        raise ValueError(f"StepConfig.{field} must be None or an int >= 1; got {value!r}")


@dataclasses.dataclass(frozen=True)
class StepConfig:
    """Everything static about a step (hashable: part of the compilation key).

    retokenized: per teacher, whether it has its own tokenizer: it is not run in the step;
      its rows carry its log-probs of their re-tokenised completions, per aligned group
      (`Rollout.teacher_group`, `teacher_group_logp`, `teacher_group_mask`; `opdplus_jax.
      crosstok`), and the estimator runs on groups, each group's advantage going to all its
      student tokens. Empty: no teacher is.
    trainable: an `nnx` filter of the student's params that the step differentiates and
      updates (e.g. `nnx.LoRAParam`: LoRA adapters, the base weights frozen); the optimizer
      state is over `trainable_params(cfg, params)`. None: every param.

    Layout and memory fields:
      teacher_rows: rows per teacher, in teacher order: the batch is teacher 0's block of rows,
        then teacher 1's, ... (each a whole number of prompt groups). Needed with several
        teachers; None with one (it scores every row).
      microbatch_rows: global rows per microbatch (None = the whole batch at once). The batch
        (or minibatch) splits into M = rows / microbatch_rows microbatches, each taking 1/M of
        every teacher block; every block must split into M parts of whole groups.
      logits_chunk: completion positions per output-layer chunk (None = all at once).
      mesh: the mesh the rows are split over (its batch axes); microbatches and teacher blocks
        are spread over it. None: no sharding constraints.
    """

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
    support: str = "sampled"
    top_k: int | None = None
    tail: str | None = None
    opd_weight: float = 1.0
    task_weight: float = 0.0
    task_advantage: str = "group_norm"
    trainable: Any = None
    retokenized: tuple[bool, ...] = ()
    teacher_rows: tuple[int, ...] | None = None
    microbatch_rows: int | None = None
    logits_chunk: int | None = None
    mesh: Mesh | None = None

    def __post_init__(self):
        k = len(self.teachers)
        if k < 1 or len(self.reward_scales) != k or len(self.reference_of) != k:
            raise ValueError(
                "StepConfig needs at least one teacher, and one reward scale and one reference_of "
                f"entry per teacher; got {k} teachers, {len(self.reward_scales)} reward scales, "
                f"{len(self.reference_of)} reference_of entries"
            )
        if self.teacher_rows is None and k > 1:
            raise ValueError(
                f"StepConfig with {k} teachers needs teacher_rows (rows per teacher: the batch "
                "is laid out in contiguous teacher blocks of those sizes)"
            )
        if self.teacher_rows is not None and (
            len(self.teacher_rows) != k
            or any(
                isinstance(r, bool) or not isinstance(r, int) or r < 1 for r in self.teacher_rows
            )
        ):
            raise ValueError(
                f"StepConfig.teacher_rows must hold one int >= 1 per teacher ({k}); got "
                f"{self.teacher_rows!r}"
            )
        _off_or_at_least_one(self.microbatch_rows, "microbatch_rows")
        _off_or_at_least_one(self.logits_chunk, "logits_chunk")
        g = self.group_size
        if isinstance(g, bool) or not isinstance(g, int) or g < 1:
            raise ValueError(f"StepConfig.group_size must be an int >= 1; got {g!r}")
        check_support(
            self.support,
            self.top_k,
            self.tail,
            level=self.level,
            correction=self.correction,
            log_ratio_clip=self.log_ratio_clip,
        )
        check_task_reward(self.opd_weight, self.task_weight, self.task_advantage, g)
        if self.retokenized and len(self.retokenized) != k:
            raise ValueError(
                f"StepConfig.retokenized needs one bool per teacher ({k}); got {self.retokenized}"
            )
        for i, re_tok in enumerate(self.retokenized_teachers):
            if re_tok and (self.full_vocabulary or self.reward_scales[i] != 1.0):
                raise ValueError(
                    f"teacher {i} has its own tokenizer: it needs support='sampled' and reward "
                    "scale 1 (its vocabulary differs from the student's and from a reference's); "
                    f"got support={self.support!r}, reward scale {self.reward_scales[i]}"
                )

    @property
    def retokenized_teachers(self) -> tuple[bool, ...]:
        """Per teacher, whether it has its own tokenizer (`retokenized`; all False if empty)."""
        return self.retokenized or (False,) * len(self.teachers)

    @property
    def full_vocabulary(self) -> bool:
        """Whether the OPD term sums over a support of the vocabulary (not the sampled token)."""
        return self.support != "sampled"


SUPPORTS = ("sampled", *fullvocab.SUPPORTS)


def check_support(
    support: str,
    top_k: Any,
    tail: Any,
    *,
    level: str,
    correction: str,
    log_ratio_clip: float | None,
) -> None:
    """Raises ValueError, naming the valid combinations, unless the OPD term can be estimated
    with this support of the vocabulary.

    "sampled" scores the sampled token (every estimator of `opdplus_jax.estimators`). "full",
    "teacher_topk" and "student_topk" differentiate the per-context divergence over the whole
    vocabulary or the top_k tokens (`opdplus_jax.fullvocab`, estimator C_gamma): token level,
    exact (no stop-gradient correction to choose: correction="opd_plus"), any divergence,
    discount, reward scale and reference; no log-ratio clip (there is no sampled ratio to clip).
    A top-k support needs top_k and tail ("renormalize" | "bucket"); the others take neither.
    """
    if support not in SUPPORTS:
        raise ValueError(f"support must be one of {', '.join(SUPPORTS)}; got {support!r}")
    if support in ("sampled", "full"):
        if top_k is not None or tail is not None:
            raise ValueError(
                f"support={support!r} takes no top_k or tail (got top_k={top_k!r}, "
                f"tail={tail!r}): they belong to support='teacher_topk' or 'student_topk'"
            )
        if support == "sampled":
            return
    else:
        fullvocab.check_support(support, top_k, tail)
    bad = {
        "level": (level, "token"),
        "correction": (correction, "opd_plus"),
        "log_ratio_clip": (log_ratio_clip, None),
    }
    for field, (value, valid) in bad.items():
        if value != valid:
            raise ValueError(
                f"support={support!r} differentiates the per-context divergence exactly: it needs "
                f"level='token', correction='opd_plus' and log_ratio_clip=None (got {field}="
                f"{value!r}). Use support='sampled' for sequence-level, stop-grad or clipped "
                "estimators"
            )


def check_task_reward(opd_weight: Any, task_weight: Any, task_advantage: str, group_size: int):
    """Raises ValueError unless the OPD and task-reward weights and the task advantage are valid."""
    for field, w in (("opd_weight", opd_weight), ("task_weight", task_weight)):
        if isinstance(w, bool) or not isinstance(w, int | float) or not w >= 0:
            raise ValueError(f"{field} must be a number >= 0; got {w!r}")
    if opd_weight == 0 and task_weight == 0:
        raise ValueError("opd_weight and task_weight are both 0: nothing would be trained")
    if task_advantage not in estimators.TASK_ADVANTAGES:
        raise ValueError(
            f"task_advantage must be one of {', '.join(estimators.TASK_ADVANTAGES)}; got "
            f"{task_advantage!r}"
        )
    if task_weight and group_size < 2:
        raise ValueError(
            f"task_weight={task_weight} needs at least 2 samples per prompt (the task advantage "
            f"{task_advantage!r} compares a prompt's samples); got {group_size}"
        )


# ------------------------------------------------------------------------------ row layout


class _Layout(NamedTuple):
    """Static row layout of one call: M microbatches; per block its rows in the whole batch."""

    blocks: tuple[int, ...]  # rows per teacher block in the batch (one block without teachers)
    num_microbatches: int

    @property
    def spans(self) -> tuple[tuple[int, int], ...]:
        """(start, size) of every block within one microbatch."""
        out, start = [], 0
        for b in self.blocks:
            out.append((start, b // self.num_microbatches))
            start += b // self.num_microbatches
        return tuple(out)


def _layout(cfg: StepConfig, num_rows: int, *, routed: bool) -> _Layout:
    """The layout of a batch of `num_rows` rows (teacher blocks if `routed`), or a clear error."""
    blocks = cfg.teacher_rows if routed and cfg.teacher_rows is not None else (num_rows,)
    if sum(blocks) != num_rows:
        raise ValueError(
            f"the batch has {num_rows} rows, but StepConfig.teacher_rows={blocks} sums to "
            f"{sum(blocks)}: lay the rows out in teacher blocks of those sizes"
        )
    rows = cfg.microbatch_rows or num_rows
    if num_rows % rows:
        raise ValueError(
            f"StepConfig.microbatch_rows={rows} does not divide the batch's {num_rows} rows"
        )
    m = num_rows // rows
    group = cfg.group_size if routed else 1  # only scoring needs whole groups (baselines)
    for k, b in enumerate(blocks):
        if b % m or (b // m) % group:
            what = f"teacher {k}'s block of {b} rows" if routed else f"the {b} rows"
            raise ValueError(
                f"{what} do not split into {m} microbatches (microbatch_rows={rows}) of whole "
                f"groups of group_size={group} rows: each part must hold a multiple of "
                "group_size rows; change microbatch_rows"
            )
    return _Layout(tuple(blocks), m)


def _constrain_rows(x: jax.Array, mesh: Mesh | None, axis: int = 0) -> jax.Array:
    """Spread dimension `axis` of x over the mesh's batch axes (those that divide it)."""
    if mesh is None:
        return x
    logical = [None] * x.ndim
    logical[axis] = "batch"
    return sharding.constrain(x, logical, mesh)


def _split(cfg: StepConfig, tree: Any, layout: _Layout) -> Any:
    """[B, ...] leaves -> [M, R, ...]: microbatch m holds rows [m b/M, (m+1) b/M) of each block."""
    m = layout.num_microbatches

    def one(x):
        parts, start = [], 0
        for b in layout.blocks:
            parts.append(x[start : start + b].reshape(m, b // m, *x.shape[1:]))
            start += b
        x_MR = parts[0] if len(parts) == 1 else jnp.concatenate(parts, axis=1)
        return _constrain_rows(x_MR, cfg.mesh, axis=1)

    return jax.tree.map(one, tree)


def _unsplit(tree: Any, layout: _Layout) -> Any:
    """The inverse of `_split`: [M, R, ...] leaves back to [B, ...] in the batch's row order."""

    def one(x_MR):
        parts = [
            x_MR[:, start : start + size].reshape(-1, *x_MR.shape[2:])
            for start, size in layout.spans
        ]
        return parts[0] if len(parts) == 1 else jnp.concatenate(parts, axis=0)

    return jax.tree.map(one, tree)


def _rows(tree: Any, span: tuple[int, int]) -> Any:
    start, size = span
    return jax.tree.map(lambda x: x[start : start + size], tree)


def _concat_rows(trees: list[Any]) -> Any:
    if len(trees) == 1:
        return trees[0]
    return jax.tree.map(lambda *xs: jnp.concatenate(xs, axis=0), *trees)


# ------------------------------------------------------------------------------ scoring


def _completion_logprobs(cfg: StepConfig, graphdef, params, rows: Rollout) -> jax.Array:
    """log pi(y_t | c_t) [R, T] (float32) of some rows' completion tokens under a model."""
    rows = jax.tree.map(lambda x: _constrain_rows(x, cfg.mesh), rows)
    return scoring.completion_logprobs(
        nnx.merge(graphdef, params),
        rows.prompt_tokens,
        rows.prompt_mask,
        rows.tokens,
        rows.mask,
        cfg.vocab_size,
        chunk_size=cfg.logits_chunk,
    )


# Metrics reduced over microbatches by min / max; every other one is a sum.
_MIN_METRICS = ("log_ratio_min",)
_MAX_METRICS = ("log_ratio_max",)


def _reduce_metrics(metrics_M: dict[str, jax.Array]) -> dict[str, jax.Array]:
    """Per-microbatch metric shares [M] -> the whole batch's metrics."""
    reduce = lambda k: jnp.min if k in _MIN_METRICS else jnp.max if k in _MAX_METRICS else jnp.sum
    return {k: reduce(k)(v, axis=0) for k, v in metrics_M.items()}


class _Totals(NamedTuple):
    """What a microbatch needs of the whole batch: its share of the loss and of every metric."""

    num_rows: int  # rows of the whole batch (static)
    num_tokens: jax.Array  # response tokens of the whole batch (at least 1)


def _advantages(
    cfg: StepConfig, frozen: Frozen, mb: Rollout, spans, student_logp, totals: _Totals, task_adv
):
    """Per-row advantages of a microbatch from each row's teacher (and reference), mixed with
    the task-reward advantages `task_adv` [R, T] (None without task rewards), and its share of
    the diagnostics (sums over its rows divided by the whole batch's counts; min / max)."""
    logp_sg = jax.lax.stop_gradient(student_logp)
    k_teachers = len(cfg.teachers)
    teacher_logps = [
        None
        if cfg.retokenized_teachers[k]
        else _completion_logprobs(cfg, g, p, _rows(mb, span).for_teacher())
        for k, (g, p, span) in enumerate(zip(cfg.teachers, frozen.teachers, spans, strict=True))
    ]
    ref_logps: list[jax.Array | None] = [None] * k_teachers
    for j, (g, p) in enumerate(zip(cfg.references, frozen.references, strict=True)):
        users = [k for k in range(k_teachers) if cfg.reference_of[k] == j]
        if not users:
            continue
        rows = _concat_rows([_rows(mb, spans[k]) for k in users]).for_teacher()
        logp = _completion_logprobs(cfg, g, p, rows)
        offset = 0
        for k in users:
            ref_logps[k] = logp[offset : offset + spans[k][1]]
            offset += spans[k][1]
    advs, log_us, live, clipped, kl = [], [], [], [], []
    for k, lt in enumerate(teacher_logps):
        rows = _rows(mb, spans[k])
        ls = _rows(logp_sg, spans[k])
        mask = rows.mask
        grouped = cfg.retokenized_teachers[k]
        if grouped:  # group level: the teacher's group log-probs came with the rows
            ls, lt, mask = _group_sums(ls, rows), rows.teacher_group_logp, rows.teacher_group_mask
        ref = cfg.reference_of[k]
        est = estimators.estimate(
            ls,
            lt,
            mask,
            divergence=cfg.divergence,
            correction=cfg.correction,
            level=cfg.level,
            discount=cfg.discount,
            reward_scale=cfg.reward_scales[k],
            ref_logp=None if ref is None else ref_logps[k],
            log_ratio_clip=cfg.log_ratio_clip,
        )
        adv = est.advantages
        if grouped:  # every student token of a group takes the group's advantage
            adv = jnp.take_along_axis(adv, rows.teacher_group, axis=1) * (rows.mask > 0)
        advs.append(adv)
        log_us.append(est.log_ratio)
        live.append(mask > 0)
        # clip_fraction is over this block's tokens (groups): back to a count.
        clipped.append(est.clip_fraction * jnp.maximum((mask > 0).sum(), 1))
        # k1 estimate of KL(student || teacher) on the student's own samples (a sum here).
        kl.append(((ls - lt) * (mask > 0)).sum())
    adv, stats = _mix(cfg, _concat_rows(advs), mb.mask, totals, task_adv)
    log_u, live = _concat_rows(log_us), _concat_rows(live)
    count = totals.num_tokens
    big = jnp.finfo(jnp.float32).max
    stats |= {
        "kl_per_token": sum(kl) / count,
        "log_ratio_min": jnp.min(jnp.where(live, log_u, big)),
        "log_ratio_max": jnp.max(jnp.where(live, log_u, -big)),
        "log_ratio_clip_fraction": sum(clipped) / count,
    }
    return adv, stats


def _group_sums(logp_RT: jax.Array, rows: Rollout) -> jax.Array:
    """[R, T] student log-probs of the aligned groups of a re-tokenised teacher's rows: column g
    is the sum over the student tokens of group g (`Rollout.teacher_group`), 0 past the last."""
    fm = (rows.mask > 0).astype(logp_RT.dtype)
    r = jnp.arange(logp_RT.shape[0])[:, None]
    return jnp.zeros_like(logp_RT).at[r, rows.teacher_group].add(logp_RT * fm)


def _mix(cfg: StepConfig, opd_adv, mask, totals: _Totals, task_adv):
    """opd_weight x (OPD advantages, group baseline applied) + task_weight x task advantages,
    and the microbatch's share of the advantage diagnostics (both parts with task rewards)."""
    if cfg.baseline is not None:
        opd_adv = estimators.group_baseline(opd_adv, mask, cfg.group_size, kind=cfg.baseline)
    adv = cfg.opd_weight * opd_adv
    if cfg.task_weight:
        adv = adv + cfg.task_weight * task_adv
    fm = (mask > 0).astype(jnp.float32)
    mean = lambda x: (x * fm).sum() / totals.num_tokens
    stats = {
        "advantage_mean": mean(adv),
        "advantage_abs_mean": mean(jnp.abs(adv)),
        "response_length": fm.sum() / totals.num_rows,
    }
    if cfg.task_weight:
        stats["opd_advantage_abs_mean"] = mean(jnp.abs(opd_adv))
        stats["task_advantage_abs_mean"] = mean(jnp.abs(task_adv))
    return adv, stats


def _hidden(cfg: StepConfig, model, rows: Rollout) -> jax.Array:
    rows = jax.tree.map(lambda x: _constrain_rows(x, cfg.mesh), rows)
    return scoring.completion_hidden(
        model, rows.prompt_tokens, rows.prompt_mask, rows.tokens, rows.mask
    )


def _support_terms(
    cfg: StepConfig, params, frozen: Frozen, mb: Rollout, spans, totals: _Totals, task_adv
):
    """The full-vocabulary (or top-k) OPD term of a microbatch (`fullvocab`, estimator C_gamma):
    (student log-probs, advantages of the score-function part, per-position divergences D_t,
    diagnostics). Each row's D_t is against its teacher (and reference); the output layers run
    `cfg.logits_chunk` positions at a time, so no [R, T, V] logits are held."""
    student = nnx.merge(cfg.student, params)
    x_student = _hidden(cfg, student, mb)
    chunk = cfg.logits_chunk or mb.tokens.shape[1]
    terms = []
    for k, (graphdef, teacher_params) in enumerate(zip(cfg.teachers, frozen.teachers, strict=True)):
        rows = _rows(mb, spans[k])
        teacher = nnx.merge(graphdef, teacher_params)
        teacher_rows = rows.for_teacher()
        scorer = lambda model, rows=teacher_rows: fullvocab.Scorer(
            _hidden(cfg, model, rows), model.logits
        )
        reference, lam = None, cfg.reward_scales[k]
        if lam != 1.0:
            j = cfg.reference_of[k]
            reference = scorer(nnx.merge(cfg.references[j], frozen.references[j]))
        terms.append(
            fullvocab.divergence_terms(
                fullvocab.Scorer(_rows(x_student, spans[k]), student.logits),
                scorer(teacher),
                rows.tokens,
                rows.mask,
                divergence=cfg.divergence,
                reward_scale=lam,
                reference=reference,
                vocab_size=cfg.vocab_size,
                chunk_size=chunk,
                support=cfg.support,
                top_k=cfg.top_k,
                tail=cfg.tail or "renormalize",
            )
        )
    d_BT, logp, teacher_logp = (_concat_rows(list(x)) for x in zip(*terms, strict=True))
    fm = (mb.mask > 0).astype(jnp.float32)
    # A_t = -sum_{s>t} discount^(s-t) D_s: later contexts' divergences as rewards (0 at gamma 0).
    future = estimators.reward_to_go(-jax.lax.stop_gradient(d_BT) * fm, cfg.discount)
    adv, stats = _mix(cfg, future, mb.mask, totals, task_adv)
    count = totals.num_tokens
    stats |= {
        "divergence_mean": (jax.lax.stop_gradient(d_BT) * fm).sum() / count,
        "kl_per_token": ((jax.lax.stop_gradient(logp) - teacher_logp) * fm).sum() / count,
    }
    return logp, adv, d_BT, stats


def _loss_stats(stats: losses.LossStats) -> dict[str, jax.Array]:
    return {
        "ratio_mean": stats.ratio_mean,
        "ppo_clip_fraction": stats.ppo_clip_fraction,
        "is_weight_mean": stats.is_weight_mean,
        "is_truncated_fraction": stats.is_truncated_fraction,
    }


def _totals_and_weights(cfg: StepConfig, batch: Rollout) -> tuple[_Totals, jax.Array]:
    """The whole batch's response-token count and per-token loss weights [B, T]."""
    fm = (batch.mask > 0).astype(jnp.float32)
    totals = _Totals(num_rows=batch.num_rows, num_tokens=jnp.maximum(fm.sum(), 1.0))
    return totals, losses.aggregation_weights(batch.mask, cfg.aggregation)


# ------------------------------------------------------------------------------ microbatches

# A microbatch's loss function: (params, microbatch inputs) -> (loss share, metric shares).
MicroLoss = Callable[[Any, Any], tuple[jax.Array, dict[str, jax.Array]]]


def trainable_params(cfg: StepConfig, params):
    """The part of the student's `params` the step trains (all of them without a filter)."""
    return params if cfg.trainable is None else nnx.filter_state(params, cfg.trainable)


def _with_trainable(cfg: StepConfig, params, trainable):
    """`params` with the trainable part replaced by `trainable`."""
    return trainable if cfg.trainable is None else nnx.merge_state(params, trainable)


def _gradient(cfg: StepConfig, full_params, loss_fn: MicroLoss, inputs, layout: _Layout):
    """(loss, grads, metrics) summed over the microbatches of `inputs` ([B, ...] leaves); grads
    of the trainable params only (`cfg.trainable`; the rest are constants).

    One microbatch: a plain value_and_grad. Several: a `lax.scan` over them, accumulating the
    gradient in float32 (cast back to the params' dtypes at the end).
    """
    params = trainable_params(cfg, full_params)
    loss_of_trainable = lambda t, inp: loss_fn(_with_trainable(cfg, full_params, t), inp)
    grad_fn = jax.value_and_grad(loss_of_trainable, has_aux=True)
    if layout.num_microbatches == 1:
        (loss, metrics), grads = grad_fn(params, inputs)
        return loss, grads, metrics
    zeros = jax.tree.map(lambda p: jnp.zeros(p.shape, jnp.float32), params)
    if cfg.mesh is not None:
        zeros = jax.lax.with_sharding_constraint(zeros, sharding.param_shardings(params, cfg.mesh))

    def body(carry, mb_inputs):
        loss_sum, grad_sum = carry
        (loss, metrics), grads = grad_fn(params, mb_inputs)
        grad_sum = jax.tree.map(lambda a, g: a + g.astype(jnp.float32), grad_sum, grads)
        return (loss_sum + loss, grad_sum), metrics

    init = (jnp.zeros((), jnp.float32), zeros)
    (loss, grads), metrics_M = jax.lax.scan(body, init, _split(cfg, inputs, layout))
    grads = jax.tree.map(lambda g, p: g.astype(p.dtype), grads, params)
    return loss, grads, _reduce_metrics(metrics_M)


def _apply(cfg: StepConfig, opt, state: TrainState, loss, grads, aux):
    """Gradient step that is skipped (params and optimizer state kept) if anything is non-finite:
    the loss, the gradient or the update itself (e.g. a NaN learning rate, or an optimizer state
    that overflowed), so a non-finite update never reaches the params or a checkpoint. Only the
    trainable params (`cfg.trainable`) change."""
    grad_norm = optax.tree.norm(grads)
    trainable = trainable_params(cfg, state.params)
    updates, new_opt_state = opt.update(grads, state.opt_state, trainable)
    new_params = _with_trainable(cfg, state.params, optax.apply_updates(trainable, updates))
    finite = jnp.isfinite(loss) & jnp.isfinite(grad_norm) & jnp.isfinite(optax.tree.norm(updates))
    keep = lambda new, old: jax.tree.map(lambda n, o: jnp.where(finite, n, o), new, old)
    new_state = TrainState(
        step=state.step + finite.astype(jnp.int32),
        params=keep(new_params, state.params),
        opt_state=keep(new_opt_state, state.opt_state),
    )
    metrics = {"loss": loss, "grad_norm": grad_norm, "skipped": 1.0 - finite, **aux}
    return new_state, metrics


# ------------------------------------------------------------------------------ the steps


@functools.partial(jax.jit, static_argnames=("cfg", "opt"), donate_argnames=("state",))
def train_step(
    cfg: StepConfig,
    opt,
    state: TrainState,
    frozen: Frozen,
    batch: Rollout,
    task_reward: jax.Array | None = None,
):
    """One fused on-policy update: student/teacher/reference forwards, advantages, loss, step.

    `batch` rows in `cfg.teacher_rows` blocks; split into `cfg.microbatch_rows` microbatches.
    `task_reward` [B] (e.g. verifier scores) is needed iff `cfg.task_weight` > 0: the advantages
    are then opd_weight x OPD's + task_weight x the task reward's (`cfg.task_advantage`).
    Returns (new state, metrics); the loss, gradient and metrics are those of the whole batch.
    """
    layout = _layout(cfg, batch.num_rows, routed=True)
    totals, weights_BT = _totals_and_weights(cfg, batch)
    task_adv_BT, task_stats = _task_advantages(cfg, batch, task_reward)

    def loss_fn(params, inputs):
        mb, weights, task_adv = inputs
        if cfg.full_vocabulary:
            logp, adv, d_BT, stats = _support_terms(
                cfg, params, frozen, mb, layout.spans, totals, task_adv
            )
            # The divergence itself is differentiated (the pathwise part of C_gamma).
            direct = cfg.opd_weight * jnp.sum(d_BT * jax.lax.stop_gradient(weights))
        else:
            logp = _completion_logprobs(cfg, cfg.student, params, mb)
            adv, stats = _advantages(cfg, frozen, mb, layout.spans, logp, totals, task_adv)
            direct = 0.0
        loss, loss_stats = losses.pg_loss_and_stats(
            logp,
            adv,
            mb.mask,
            behaviour_logp=mb.behaviour_logp if cfg.tis_cap else None,
            tis_cap=cfg.tis_cap,
            token_weights=weights,
            num_tokens=totals.num_tokens,
        )
        return direct + loss, {**stats, **_loss_stats(loss_stats)}

    inputs = (batch, weights_BT, task_adv_BT)
    loss, grads, metrics = _gradient(cfg, state.params, loss_fn, inputs, layout)
    return _apply(cfg, opt, state, loss, grads, {**metrics, **task_stats})


def _task_advantages(cfg: StepConfig, batch: Rollout, task_reward):
    """Task-reward advantages [B, T] of the whole batch (each row's, on its response tokens) and
    the batch's mean task reward; (None, {}) when the step does not mix task rewards in."""
    if not cfg.task_weight:
        return None, {}
    if task_reward is None or jnp.shape(task_reward) != (batch.num_rows,):
        raise ValueError(
            f"StepConfig.task_weight={cfg.task_weight} needs task_reward, one float per row "
            f"[{batch.num_rows}]; got {None if task_reward is None else jnp.shape(task_reward)}"
        )
    reward = jnp.asarray(task_reward, jnp.float32)
    adv_B = estimators.task_advantages(reward, cfg.group_size, kind=cfg.task_advantage)
    adv_BT = adv_B[:, None] * (batch.mask > 0).astype(jnp.float32)
    return adv_BT, {"task_reward_mean": reward.mean()}


def _fused_only(cfg: StepConfig) -> None:
    if cfg.full_vocabulary:
        raise ValueError(
            f"support={cfg.support!r} runs in the fused train_step only (one update per "
            "rollout): minibatch updates would need the teachers' distributions kept, so use "
            "loss.num_minibatches=1 or support='sampled'"
        )


class Scored(NamedTuple):
    """A rollout's student log-probs and advantages, fixed for its minibatch updates ([B, T])."""

    old_logp: jax.Array
    advantages: jax.Array


@functools.partial(jax.jit, static_argnames=("cfg",))
def score_rollout(
    cfg: StepConfig, params, frozen: Frozen, batch: Rollout, task_reward: jax.Array | None = None
):
    """Old log-probs and advantages of a rollout, fixed for its minibatch updates, and the
    advantage diagnostics. Rows in `cfg.teacher_rows` blocks; scored microbatch by microbatch.
    `task_reward` as in `train_step`. Sampled support only: a full-vocabulary term differentiates
    the teacher's whole distribution, which minibatch updates would have to keep."""
    _fused_only(cfg)
    layout = _layout(cfg, batch.num_rows, routed=True)
    totals, _ = _totals_and_weights(cfg, batch)
    task_adv_BT, task_stats = _task_advantages(cfg, batch, task_reward)

    def score(inputs):
        mb, task_adv = inputs
        logp = _completion_logprobs(cfg, cfg.student, params, mb)
        adv, stats = _advantages(cfg, frozen, mb, layout.spans, logp, totals, task_adv)
        return (logp, adv), stats

    if layout.num_microbatches == 1:
        (logp, adv), stats = score((batch, task_adv_BT))
        return Scored(old_logp=logp, advantages=adv), {**stats, **task_stats}
    (logp, adv), stats_M = jax.lax.map(score, _split(cfg, (batch, task_adv_BT), layout))
    logp, adv = _unsplit((logp, adv), layout)
    return Scored(old_logp=logp, advantages=adv), {**_reduce_metrics(stats_M), **task_stats}


@functools.partial(jax.jit, static_argnames=("cfg", "opt"), donate_argnames=("state",))
def update_step(cfg: StepConfig, opt, state: TrainState, batch: Rollout, scored: Scored):
    """One minibatch update against fixed old log-probs and advantages (PPO clip, TIS), split
    into `cfg.microbatch_rows` microbatches (any row order: the teachers are not run)."""
    _fused_only(cfg)
    layout = _layout(cfg, batch.num_rows, routed=False)
    totals, weights_BT = _totals_and_weights(cfg, batch)

    def loss_fn(params, inputs):
        mb, mb_scored, weights = inputs
        logp = _completion_logprobs(cfg, cfg.student, params, mb)
        loss, loss_stats = losses.pg_loss_and_stats(
            logp,
            mb_scored.advantages,
            mb.mask,
            old_logp=mb_scored.old_logp,
            behaviour_logp=mb.behaviour_logp if cfg.tis_cap else None,
            tis_cap=cfg.tis_cap,
            ppo_clip=cfg.ppo_clip,
            token_weights=weights,
            num_tokens=totals.num_tokens,
        )
        return loss, _loss_stats(loss_stats)

    inputs = (batch, scored, weights_BT)
    loss, grads, metrics = _gradient(cfg, state.params, loss_fn, inputs, layout)
    return _apply(cfg, opt, state, loss, grads, metrics)
