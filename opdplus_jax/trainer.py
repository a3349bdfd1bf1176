"""On-policy distillation loop: rollout -> score -> advantages -> update, with checkpoints.

`Trainer` holds everything loaded for a run (mesh, tokenizer, student, frozen teachers and
references, the static step config, the rollout engines, the optimizer) and exposes each part of
a step as a public method: `rollout` (the student samples `num_samples` responses per prompt
through its `rollout.RolloutEngine`), `update` (one jitted, donated `train_step`, or PPO-style
minibatch updates), `evaluate`, `save`/`restore` (orbax: params, optimizer state, step, RNG,
data-iterator state) and `export` (a Hugging Face folder). `Trainer.train(workdir)` is the whole
job, and `train_and_evaluate(config, workdir)` (what the CLI in `opdplus_jax.main` runs) is
`Trainer.setup(config).train(workdir)`. Benchmarks, the demo and the experiments use the same
methods.

Restarting with the same workdir resumes from the latest complete checkpoint, bit-for-bit on the
same machine: the step's RNG is fold_in(seed key, step) and the data iterator resumes where it
stopped. A feature that is off is None in the config (`estimator.baseline`, `log_ratio_clip`,
`teachers.<name>.reference`, `loss.ppo_clip`, `loss.tis_cap`, `optimizer.grad_clip`).
"""

from __future__ import annotations

import contextlib
import dataclasses
import errno
import logging
import math
import os
import time
from collections.abc import Sequence
from functools import partial
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
import optax
from flax import nnx
from ml_collections import config_dict

from opdplus_jax import (
    checkpoint,
    configs,
    crosstok,
    data,
    divergences,
    estimators,
    evaluation,
    faults,
    lora,
    losses,
    metrics,
    models,
    optim,
    scoring,
    sharding,
    train_step,
    verifiers,
)
from opdplus_jax.rollout import (
    Rollout,
    RolloutEngine,
    SamplingParams,
    check_engine,
    make_engine,
)
from opdplus_jax.tokenizer import (
    Tokenizer,
    check_compatible,
    generation_eos_ids,
    pad_sequences,
)

logger = logging.getLogger(__name__)


class CheckpointSaveError(RuntimeError):
    """A checkpoint could not be written (e.g. the disk is full); earlier steps are intact."""


def _chain(e: BaseException | None) -> list[BaseException]:
    out = []
    while e is not None and e not in out:
        out.append(e)
        e = e.__cause__ or e.__context__
    return out


def _says_disk_full(e: BaseException) -> bool:
    text = str(e)
    return getattr(e, "errno", None) == errno.ENOSPC or "No space left on device" in text


@contextlib.contextmanager
def _reporting_save_failures(manager: checkpoint.CheckpointManager):
    """Turns a failed (possibly background) checkpoint write into a CheckpointSaveError that
    names the folder, the cause and the step a restart resumes from."""
    try:
        yield
    except NonFiniteError:
        raise
    except Exception as e:
        cause = f"{type(e).__name__}: {e}".splitlines()[0][:400]
        try:
            latest = manager.latest_step()
        except Exception:
            latest = None
        with contextlib.suppress(Exception):
            manager.close()  # stop the background writer before reporting
        resume = f"step {latest}" if latest is not None else "the start (no complete step)"
        hint = " The disk is full." if any(map(_says_disk_full, _chain(e))) else ""
        raise CheckpointSaveError(
            f"writing a checkpoint in {manager.directory} failed ({cause}).{hint} Completed "
            f"steps are intact: free space (or use another --workdir) and restart, which resumes "
            f"from {resume}."
        ) from None


class NonFiniteError(RuntimeError):
    """Raised after `max_consecutive_skips` non-finite updates in a row."""


def _dtype(name: Any, field: str):
    try:
        dtype = jnp.dtype(name) if isinstance(name, str) else None
    except TypeError:
        dtype = None
    if dtype is None or not jnp.issubdtype(dtype, jnp.floating):
        raise ValueError(f"{field} must be a float dtype (float32, bfloat16, ...); got {name!r}")
    return dtype


def _require_dir(path: str, what: str) -> str:
    if not path:
        raise ValueError(f"{what} is not set in the config")
    if not os.path.isdir(path):
        raise FileNotFoundError(f"{what}: checkpoint folder {path!r} does not exist")
    return path


def _off_or_positive(value: Any, field: str) -> float | None:
    """None (off) or a finite number > 0; the old spellings 0 / "none" get an error naming None."""
    if value is None:
        return None
    if isinstance(value, str) or not np.isfinite(float(value)) or float(value) <= 0:
        raise ValueError(f"{field} must be None (off) or a finite number > 0; got {value!r}")
    return float(value)


def _off_or_at_least_one(value: Any, field: str) -> int | None:
    """None (off) or an int >= 1; 0 gets an error naming None."""
    if value is None:
        return None
    if isinstance(value, bool) or not isinstance(value, int) or value < 1:
        raise ValueError(f"{field} must be None (off) or an int >= 1; got {value!r}")
    return value


# (field, minimum) of every integer setting; a value below the minimum is refused up front
# instead of failing after a full step (a division by zero) or evaluating nothing.
INT_FIELDS = (
    ("data.batch_size", 1),
    ("rollout.num_samples", 1),
    ("rollout.max_prompt_len", 1),
    ("rollout.slots", 1),
    ("rollout.prefill_chunk", 0),
    ("loss.num_minibatches", 1),
    ("train.num_steps", 1),
    ("train.log_every", 1),
    ("train.eval_every", 0),
    ("train.checkpoint_every", 1),
    ("train.keep_checkpoints", 1),
    ("train.max_consecutive_skips", 1),
    ("eval.num_prompts", 1),
    ("eval.num_samples", 1),
    ("eval.batch_size", 1),
)


# Settings that must be finite numbers (their ranges are checked where they are used).
NUMBER_FIELDS = (
    "estimator.discount",
    "rollout.temperature",
    "rollout.top_p",
    "eval.temperature",
    "optimizer.learning_rate",
    "optimizer.weight_decay",
    "optimizer.b1",
    "optimizer.b2",
)


def _check_number(value: Any, dotted: str) -> None:
    if isinstance(value, bool) or not isinstance(value, int | float) or not np.isfinite(value):
        raise ValueError(f"{dotted} must be a finite number; got {value!r}")


def _check_mesh(mesh: Any) -> None:
    sizes = {a: mesh[a] for a in sharding.MESH_AXES if a in mesh}
    for axis, size in sizes.items():
        if isinstance(size, bool) or not isinstance(size, int) or not (size >= 1 or size == -1):
            raise ValueError(f"mesh.{axis} must be an int >= 1 or -1 (the rest); got {size!r}")
    if list(sizes.values()).count(-1) > 1:
        raise ValueError(f"at most one mesh axis may be -1; got {sizes}")


def validate(config: config_dict.ConfigDict) -> None:
    """Fail fast, before any model loads, with the fix named, on a config the loop or the step
    would reject later (deep inside JAX, or after a full step)."""
    seed = config.seed
    if isinstance(seed, bool) or not isinstance(seed, int) or not 0 <= seed < 2**32:
        raise ValueError(f"seed must be an int in [0, 2**32); got {seed!r}")
    _dtype(config.student.dtype, "student.dtype")
    _dtype(config.student.param_dtype, "student.param_dtype")
    _check_mesh(config.mesh)
    for dotted in NUMBER_FIELDS:
        _check_number(configs.get_field(config, dotted), dotted)
    for name, t in config.teachers.items():
        _check_number(t.reward_scale, f"teachers.{name}.reward_scale")
    for dotted, minimum in INT_FIELDS:
        value = configs.get_field(config, dotted)
        if isinstance(value, bool) or not isinstance(value, int) or value < minimum:
            raise ValueError(f"{dotted} must be an int >= {minimum}; got {value!r}")
    r, e = config.rollout, config.eval
    sampled = {}
    for where, fields in (
        ("rollout", {"max_new_tokens": r.max_new_tokens, "temperature": r.temperature,
                     "top_p": r.top_p, "top_k": r.top_k, **engine_memory(config)}),
        ("eval", {"max_new_tokens": e.max_new_tokens, "temperature": e.temperature}),
    ):  # fmt: skip
        try:
            sampled[where] = SamplingParams(**fields)
        except ValueError as err:
            raise ValueError(f"{where}: {err}") from None
    check_engine(r.engine)
    optim.from_config(config.optimizer, config.train.num_steps)
    est = config.estimator
    try:
        divergences.in_gauge(divergences.get(est.divergence, **dict(est.divergence_params)),
                             est.gauge)  # fmt: skip
    except ValueError as e:
        raise ValueError(f"estimator.gauge: {e}") from None
    estimators.CORRECTIONS.get(est.correction)
    losses.AGGREGATIONS.get(config.loss.aggregation)
    if est.level not in estimators.LEVELS:
        raise ValueError(f"estimator.level must be one of {estimators.LEVELS}; got {est.level!r}")
    if not 0.0 <= float(est.discount) <= 1.0:
        raise ValueError(f"estimator.discount must be in [0, 1]; got {est.discount!r}")
    if est.baseline == "none":
        raise ValueError("estimator.baseline: no baseline is None, not 'none'")
    if est.baseline is not None:
        estimators.BASELINES.get(est.baseline)  # an unknown name lists the valid ones
    if est.baseline == "loo" and config.rollout.num_samples < 2:
        raise ValueError("estimator.baseline='loo' needs rollout.num_samples >= 2")
    _off_or_positive(config.train.verify_budget_seconds, "train.verify_budget_seconds")
    _off_or_positive(est.log_ratio_clip, "estimator.log_ratio_clip")
    _check_support_and_rewards(config)
    if config.lora.rank is not None:
        lora_spec(config)
    _off_or_positive(config.loss.ppo_clip, "loss.ppo_clip")
    _off_or_positive(config.loss.tis_cap, "loss.tis_cap")
    off_policy = [f"rollout.{n}={r[n]!r}" for n in sampled["rollout"].off_policy_fields()]
    if off_policy and config.loss.tis_cap is None:
        raise ValueError(
            f"{', '.join(off_policy)} samples the rollouts from another distribution than the "
            "student, and the estimators are unbiased only on the student's own samples: set "
            "loss.tis_cap, e.g. 2.0, to correct with truncated importance sampling, or sample at "
            "temperature 1 without truncation (rollout.temperature=1, rollout.top_p=1, "
            "rollout.top_k=0)"
        )
    if not config.teachers:
        raise ValueError("config.teachers is empty: add at least one teacher")
    for name, t in config.teachers.items():
        lam = float(t.reward_scale)
        if not np.isfinite(lam):
            raise ValueError(f"teachers.{name}.reward_scale must be finite, got {lam}")
        if t.reference == "none":
            raise ValueError(f"teachers.{name}.reference: no reference is None, not 'none'")
        if t.template is not None and t.template not in TEMPLATES:
            raise ValueError(
                f"teachers.{name}.template must be None (the student's prompt) or one of "
                f"{', '.join(TEMPLATES)}; got {t.template!r}"
            )
        if t.context_field is not None and t.context_field not in data.FIELDS:
            raise ValueError(
                f"teachers.{name}.context_field={t.context_field!r} is not a data field; valid: "
                f"{', '.join(data.FIELDS)}"
            )
        _off_or_at_least_one(t.max_prompt_len, f"teachers.{name}.max_prompt_len")
        if t.retokenize and (lam != 1.0 or config.estimator.support != "sampled"):
            raise ValueError(
                f"teachers.{name}.retokenize=True (its own vocabulary) needs reward_scale 1 and "
                f"estimator.support='sampled'; got reward_scale {lam}, support "
                f"{config.estimator.support!r}"
            )
        if lam != 1.0 and t.reference is None:
            raise ValueError(
                f"teachers.{name}.reward_scale={lam} needs a reference model: set "
                f"teachers.{name}.reference to 'student_init' or a checkpoint folder"
            )
    b = config.data.batch_size * config.rollout.num_samples
    if b % config.loss.num_minibatches:
        raise ValueError(
            f"data.batch_size * rollout.num_samples = {b} is not divisible by "
            f"loss.num_minibatches = {config.loss.num_minibatches}"
        )
    teacher_batch_sizes(config)
    _check_memory(config.memory)


def _check_support_and_rewards(config: config_dict.ConfigDict) -> None:
    est, reward = config.estimator, config.reward
    try:
        train_step.check_support(
            est.support,
            est.top_k,
            est.tail,
            level=est.level,
            correction=est.correction,
            log_ratio_clip=est.log_ratio_clip,
        )
    except ValueError as e:
        raise ValueError(f"estimator.{e}") from None
    if est.support != "sampled" and config.loss.num_minibatches != 1:
        raise ValueError(
            f"estimator.support={est.support!r} trains with one update per rollout: set "
            f"loss.num_minibatches=1 (got {config.loss.num_minibatches}) or support='sampled'"
        )
    try:
        train_step.check_task_reward(
            reward.opd_weight,
            reward.task_weight,
            reward.task_advantage,
            config.rollout.num_samples,
        )
    except ValueError as e:
        raise ValueError(f"reward.{e}") from None
    if reward.task_weight and not config.train.verify_rollouts:
        raise ValueError(
            f"reward.task_weight={reward.task_weight} trains on the verifiers' rewards, but "
            "train.verify_rollouts is False: set it True, or reward.task_weight=0"
        )


def _check_memory(memory: config_dict.ConfigDict) -> None:
    if memory.remat == "none":
        raise ValueError("memory.remat: no rematerialisation is None, not 'none'")
    if memory.remat is not None and memory.remat not in models.REMAT_POLICIES:
        raise ValueError(
            f"memory.remat must be None (off) or one of {', '.join(models.REMAT_POLICIES)}; got "
            f"{memory.remat!r}"
        )
    for field in ("microbatch_rows", "logits_chunk", "attention_chunk"):
        _off_or_at_least_one(memory[field], f"memory.{field}")


def teacher_batch_sizes(config: config_dict.ConfigDict) -> tuple[int, ...]:
    """Prompts per batch from each teacher's records, in `config.teachers` order: every
    `teachers.<name>.prompts_per_batch` (summing to data.batch_size), or with none set
    data.batch_size split equally. ValueError naming the fix otherwise."""
    names, size = list(config.teachers.keys()), config.data.batch_size
    shares = [config.teachers[n].get("prompts_per_batch") for n in names]
    if all(x is None for x in shares):
        if size % len(names):
            raise ValueError(
                f"data.batch_size={size} prompts do not split equally between the "
                f"{len(names)} teachers ({', '.join(names)}): every batch takes a fixed number "
                "of prompts per teacher; make data.batch_size a multiple of the number of "
                "teachers, or set teachers.<name>.prompts_per_batch for every teacher"
            )
        return (size // len(names),) * len(names)
    if any(x is None for x in shares):
        unset = [n for n, x in zip(names, shares, strict=True) if x is None]
        raise ValueError(
            f"teachers.<name>.prompts_per_batch is set for some teachers but not for "
            f"{', '.join(unset)}: set it for every teacher (summing to data.batch_size) or for "
            "none (equal shares)"
        )
    for n, x in zip(names, shares, strict=True):
        _off_or_at_least_one(x, f"teachers.{n}.prompts_per_batch")
    if sum(shares) != size:
        raise ValueError(
            f"teachers.<name>.prompts_per_batch = {dict(zip(names, shares, strict=True))} sum "
            f"to {sum(shares)}, not data.batch_size={size}"
        )
    return tuple(shares)


def microbatch_rows(config: config_dict.ConfigDict, mesh: jax.sharding.Mesh | None) -> int | None:
    """Global rows per microbatch of the train step: `memory.microbatch_rows` (per device) times
    the devices of the mesh's batch axes (data x fsdp; 1 without a mesh); None for the whole
    batch at once.
    ValueError naming the fix unless every (mini)batch and every teacher's block of rows splits
    into whole microbatches of whole prompt groups."""
    per_device = _off_or_at_least_one(config.memory.microbatch_rows, "memory.microbatch_rows")
    if per_device is None:
        return None
    n = config.rollout.num_samples
    shards = math.prod(mesh.shape[a] for a in sharding.batch_axes(mesh))
    rows, batch = per_device * shards, config.data.batch_size * n
    what = (
        f"memory.microbatch_rows={per_device} rows per device x {shards} devices on the mesh's "
        f"batch axes = {rows} rows per microbatch"
    )
    if rows % n:
        raise ValueError(
            f"{what} is not a multiple of rollout.num_samples={n}: a microbatch must hold whole "
            "groups of a prompt's samples (the group baselines need them); change "
            "memory.microbatch_rows"
        )
    minibatch = batch // config.loss.num_minibatches
    if batch % rows or minibatch % rows:
        raise ValueError(
            f"{what} does not divide the {batch} rows of a batch (data.batch_size x "
            f"rollout.num_samples)"
            + (f" split into {config.loss.num_minibatches} minibatches of {minibatch}"
               if config.loss.num_minibatches > 1 else "")
            + ": change memory.microbatch_rows or data.batch_size, or set it to None"
        )  # fmt: skip
    m = batch // rows
    for name, prompts in zip(config.teachers, teacher_batch_sizes(config), strict=True):
        if prompts % m:
            raise ValueError(
                f"{what} splits a batch into {m} microbatches, each with an equal share of "
                f"every teacher's prompts, but teacher {name!r} has {prompts} prompts per batch: "
                f"make each teacher's prompts per batch a multiple of {m}, or change "
                "memory.microbatch_rows"
            )
    return rows


def eval_set(config, tokenizer: Tokenizer) -> tuple[list[dict], list[list[int]]]:
    """The first `eval.num_prompts` held-out examples (answer, task, domain, `teacher`: the
    index in config.teachers of the record's teacher, 0 when it names none, and `teacher_name`)
    and their prompt token ids, in file order; empty without `data.eval_path`. A record naming
    a teacher the config lacks is an error, as in training."""
    if not config.data.eval_path:
        return [], []
    pipe = data.PromptPipeline(
        config.data.eval_path,
        tokenizer,
        batch_size=1,
        max_prompt_len=config.rollout.max_prompt_len,
        shuffle=False,
        num_epochs=1,
        drop_remainder=False,
        teachers=list(config.teachers.keys()),
        system_prompt=config.data.system_prompt,
    )
    examples, prompts = [], []
    for batch in pipe:
        examples.append({k: batch[k][0] for k in ("answer", "task", "domain", "teacher_name")})
        examples[-1]["teacher"] = int(batch["teacher"][0])
        prompts.append(batch["prompt_tokens"][0])
        if len(examples) >= config.eval.num_prompts:
            break
    return examples, prompts


def _folder_tokenizer(path: str, default: Tokenizer) -> Tokenizer:
    """The tokenizer saved in a checkpoint folder, or `default` when the folder has none."""
    has_tokenizer = any(
        os.path.isfile(os.path.join(path, f)) for f in ("tokenizer.json", "tokenizer_config.json")
    )
    return Tokenizer.from_pretrained(path) if has_tokenizer else default


def _check_own_tokenizer(what: str, path: str, model_cfg) -> None:
    """A re-tokenising teacher's folder has a tokenizer with an EOS its embedding covers."""
    if _folder_tokenizer(path, None) is None:
        raise ValueError(
            f"{what} ({path}) has retokenize=True but no tokenizer files (tokenizer.json or "
            "tokenizer_config.json): a teacher with its own vocabulary needs its tokenizer"
        )
    tok = Tokenizer.from_pretrained(path)
    if tok.eos_id is None or model_cfg.vocab_size < tok.vocab_size:
        raise ValueError(
            f"{what} ({path}): its tokenizer needs an EOS token and at most the model's "
            f"{model_cfg.vocab_size} ids; it has {tok.vocab_size} ids, EOS {tok.eos_id}"
        )


def _check_scores_like_student(what: str, path: str, tokenizer, student_cfg, model_cfg) -> None:
    """`check_compatible` of the student and the model in `path` (its own tokenizer files if it
    has any), with the config field and folder named in the error."""
    try:
        check_compatible(tokenizer, _folder_tokenizer(path, tokenizer), student_cfg, model_cfg)
    except ValueError as e:
        raise ValueError(
            f"{what} ({path}) cannot score the student's tokens: {e}. Teachers and references "
            "must share the student's tokenizer"
        ) from None


TEMPLATES = ("own",)


def lora_spec(config: config_dict.ConfigDict) -> lora.LoraSpec:
    """The `config.lora` adapters (rank, alpha, target modules); ValueError naming the field."""
    try:
        spec = lora.LoraSpec(
            rank=config.lora.rank, alpha=config.lora.alpha, targets=tuple(config.lora.targets)
        )
        spec.modules()  # a target that matches no adaptable module is an error now
        return spec
    except ValueError as e:
        raise ValueError(f"lora: {e}") from None


def teacher_prompts(
    config: config_dict.ConfigDict, tokenizer: Tokenizer
) -> list[data.TeacherPrompt | None]:
    """Per teacher (config order): how its prompt is rendered, or None when it scores the
    completion after the student's prompt (no `template` and no `context_field`)."""
    out = []
    for name, t in config.teachers.items():
        if t.template is None and t.context_field is None and not t.retokenize:
            out.append(None)
            continue
        own = t.template == "own" or t.retokenize  # another vocabulary: its own template
        out.append(
            data.TeacherPrompt(
                tokenizer=_folder_tokenizer(t.path, tokenizer) if own else tokenizer,
                max_len=t.max_prompt_len or config.rollout.max_prompt_len,
                context_field=t.context_field,
                context_format=t.context_format,
                system_prompt=config.data.system_prompt,
                name=name,
            )
        )
    return out


def teacher_mismatches(config: config_dict.ConfigDict, tokenizer: Tokenizer) -> list[str]:
    """What may make a teacher score the student's completions wrongly, in words: a teacher
    whose end-of-sequence ids do not include the student's EOS (it scores the student's stop as
    an ordinary token), or whose own chat template differs from the student's while it scores
    the student's prompt (`teachers.<name>.template` None). [] when they agree."""
    out = []
    for name, t in config.teachers.items():
        if t.retokenize:  # its own vocabulary: crosstok maps the student's EOS to its EOS
            continue
        own_tokenizer = _folder_tokenizer(t.path, tokenizer)
        teacher_eos = set(own_tokenizer.eos_ids) | set(generation_eos_ids(t.path))
        eos = tokenizer.eos_id
        if eos is not None and eos not in teacher_eos:
            token = tokenizer.hf.convert_ids_to_tokens(eos)
            out.append(
                f"teachers.{name} ({t.path}) ends sequences with token ids {sorted(teacher_eos)}, "
                f"the student with {eos} ({token!r}): the teacher scores the student's stop as "
                "an ordinary token. Use a teacher with the student's EOS, or check its "
                "generation_config.json"
            )
        student_template = getattr(tokenizer.hf, "chat_template", None)
        teacher_template = getattr(own_tokenizer.hf, "chat_template", None)
        if t.template is None and teacher_template and teacher_template != student_template:
            out.append(
                f"teachers.{name} ({t.path}) has its own chat template, different from the "
                "student's, but scores completions after the student's prompt: set "
                f"teachers.{name}.template='own' to render its prompt with its own template"
            )
    return out


def step_config(
    config: config_dict.ConfigDict,
    *,
    student: nnx.GraphDef,
    teachers: Sequence[nnx.GraphDef],
    references: Sequence[nnx.GraphDef],
    reference_of: Sequence[int | None],
    vocab_size: int,
    mesh: jax.sharding.Mesh | None,
) -> train_step.StepConfig:
    """The train step's static config for `config`, from the models' graphdefs (no weights).

    `Trainer.setup` builds its step config here; an ahead-of-time planner calls it with abstract
    models' graphdefs. `teachers` follow `config.teachers`; `references` are the distinct
    references and `reference_of[k]` is teacher k's index into them (None: no reference).
    Teacher k's rows are one block of prompts_per_batch x num_samples rows (`teacher_rows`,
    with several teachers); `microbatch_rows` is `memory.microbatch_rows` per device on
    `mesh`'s batch axes (see `microbatch_rows`). Raises ValueError for a config it cannot run.
    """
    validate(config)
    est, n = config.estimator, config.rollout.num_samples
    teacher_rows = tuple(p * n for p in teacher_batch_sizes(config))
    return train_step.StepConfig(
        student=student,
        teachers=tuple(teachers),
        references=tuple(references),
        reward_scales=tuple(float(t.reward_scale) for t in config.teachers.values()),
        reference_of=tuple(reference_of),
        vocab_size=vocab_size,
        divergence=divergences.in_gauge(
            divergences.get(est.divergence, **dict(est.divergence_params)), est.gauge
        ),
        correction=est.correction,
        level=est.level,
        discount=float(est.discount),
        log_ratio_clip=_off_or_positive(est.log_ratio_clip, "estimator.log_ratio_clip"),
        baseline=est.baseline,
        support=est.support,
        top_k=est.top_k,
        tail=est.tail,
        opd_weight=float(config.reward.opd_weight),
        task_weight=float(config.reward.task_weight),
        task_advantage=config.reward.task_advantage,
        group_size=n,
        aggregation=config.loss.aggregation,
        ppo_clip=_off_or_positive(config.loss.ppo_clip, "loss.ppo_clip"),
        tis_cap=_off_or_positive(config.loss.tis_cap, "loss.tis_cap"),
        teacher_rows=teacher_rows if len(teacher_rows) > 1 else None,
        microbatch_rows=microbatch_rows(config, mesh),
        logits_chunk=config.memory.logits_chunk,
        trainable=lora.TRAINABLE if config.lora.rank is not None else None,
        retokenized=tuple(bool(t.retokenize) for t in config.teachers.values()),
        mesh=mesh,
    )


def engine_memory(config: config_dict.ConfigDict) -> dict[str, Any]:
    """The `SamplingParams` fields of `config.rollout` that set the sampler's memory (KV dtype,
    prefill chunk), shared by the training and evaluation engines."""
    return {"kv_dtype": config.rollout.kv_dtype, "prefill_chunk": config.rollout.prefill_chunk}


@dataclasses.dataclass
class Trainer:
    """A loaded run: build one with `Trainer.setup(config)`; `train(workdir)` runs it.

    Attributes:
      config: the run's (locked) config.
      mesh: the device mesh every model and batch is placed on.
      tokenizer: the student's tokenizer (teachers and references share its vocabulary).
      student: the student model at its initial weights (its graphdef is the step's).
      step_cfg: the static part of the train step (graphdefs, estimator, loss settings).
      frozen: the teachers' and references' params (no gradient, no optimizer state).
      teacher_names: config.teachers' names; a row's `teacher` index points into it.
      engine: samples the training rollouts (`config.rollout`; `rollout.engine` names its kind).
      eval_engine: samples the held-out evaluation (`config.eval`), with the same kind of engine.
      optimizer: the optax optimizer of `config.optimizer`.
    """

    config: config_dict.ConfigDict
    mesh: jax.sharding.Mesh
    tokenizer: Tokenizer
    student: nnx.Module
    step_cfg: train_step.StepConfig
    frozen: train_step.Frozen
    # Derived from the above (replace them on an instance to change how it samples or steps).
    teacher_names: list[str] = dataclasses.field(init=False)
    teacher_prompts: list[data.TeacherPrompt | None] = dataclasses.field(init=False)
    teacher_tokenizers: list[Tokenizer] = dataclasses.field(init=False)
    engine: RolloutEngine = dataclasses.field(init=False)
    eval_engine: RolloutEngine = dataclasses.field(init=False)
    optimizer: Any = dataclasses.field(init=False)

    def __post_init__(self):
        r, e = self.config.rollout, self.config.eval
        rollout = SamplingParams.for_tokenizer(
            self.tokenizer,
            max_new_tokens=r.max_new_tokens,
            temperature=r.temperature,
            top_p=r.top_p,
            top_k=r.top_k,
            **engine_memory(self.config),
        )
        held_out = SamplingParams.for_tokenizer(
            self.tokenizer,
            max_new_tokens=e.max_new_tokens,
            temperature=e.temperature,
            **engine_memory(self.config),
        )
        self.teacher_names = list(self.config.teachers.keys())
        self.teacher_prompts = teacher_prompts(self.config, self.tokenizer)
        # A re-tokenising teacher's prompt builder holds its folder's tokenizer.
        self.teacher_tokenizers = [
            builder.tokenizer if t.retokenize else self.tokenizer
            for t, builder in zip(self.config.teachers.values(), self.teacher_prompts, strict=True)
        ]
        engine = partial(make_engine, r.engine, self.step_cfg.student, slots=r.slots)
        self.engine = engine(rollout)
        self.eval_engine = engine(held_out)
        self.optimizer = optim.from_config(self.config.optimizer, self.config.train.num_steps)

    @classmethod
    def setup(cls, config: config_dict.ConfigDict, *, mesh: jax.sharding.Mesh | None = None):
        """Validates `config`, then loads the student, teachers, references and tokenizer onto
        the mesh (`mesh` overrides `config.mesh`, e.g. a sub-mesh) and checks vocabularies."""
        validate(config)
        mesh = mesh if mesh is not None else sharding.make_mesh(dict(config.mesh))
        microbatch_rows(config, mesh)  # the layout fits the mesh: checked before any model loads
        kw = {
            "dtype": _dtype(config.student.dtype, "student.dtype"),
            "param_dtype": _dtype(config.student.param_dtype, "student.param_dtype"),
            "mesh": mesh,
            "attention_chunk_size": config.memory.attention_chunk,
        }
        student_path = _require_dir(config.student.path, "student.path")
        # Only the student is differentiated: the remat policy is its alone.
        student = models.from_pretrained(student_path, **kw, remat=config.memory.remat)
        if config.lora.rank is not None:  # only the adapters train
            student = lora.apply(student, lora_spec(config), rng=config.seed)
            logger.info(
                "LoRA rank %d on %s: %d trainable parameters",
                config.lora.rank, ", ".join(config.lora.targets),
                lora.num_adapter_params(student),
            )  # fmt: skip
        tokenizer = Tokenizer.from_pretrained(config.tokenizer_path or student_path)
        teachers, references, reference_of, ref_index = [], [], [], {}
        for name, t in config.teachers.items():
            path = _require_dir(t.path, f"teachers.{name}.path")
            teacher = models.from_pretrained(path, **kw)
            what = f"teachers.{name}.path"
            if t.retokenize:
                _check_own_tokenizer(what, path, teacher.config)
            else:
                _check_scores_like_student(what, path, tokenizer, student.config, teacher.config)
            teachers.append(teacher)
            if float(t.reward_scale) == 1.0 or t.reference is None:
                reference_of.append(None)
                continue
            if t.reference not in ref_index:
                if t.reference == "student_init":
                    ref = models.from_pretrained(student_path, **kw)  # a frozen copy
                else:
                    where = _require_dir(t.reference, f"teachers.{name}.reference")
                    ref = models.from_pretrained(where, **kw)
                    what = f"teachers.{name}.reference"
                    _check_scores_like_student(what, where, tokenizer, student.config, ref.config)
                ref_index[t.reference] = len(references)
                references.append(ref)
            reference_of.append(ref_index[t.reference])
        graphdef = lambda m: nnx.split(m, nnx.Param)[0]
        step_cfg = step_config(
            config,
            student=graphdef(student),
            teachers=[graphdef(m) for m in teachers],
            references=[graphdef(m) for m in references],
            reference_of=reference_of,
            vocab_size=tokenizer.vocab_size,
            mesh=mesh,
        )
        frozen = train_step.Frozen(
            teachers=tuple(nnx.split(m, nnx.Param)[1] for m in teachers),
            references=tuple(nnx.split(m, nnx.Param)[1] for m in references),
        )
        for message in teacher_mismatches(config, tokenizer):
            logger.warning("%s", message)
        return cls(config, mesh, tokenizer, student, step_cfg, frozen)

    # ------------------------------------------------------------------------------ one step

    def init_state(self) -> train_step.TrainState:
        """Step 0: the student's initial params and a fresh optimizer state."""
        _, params = nnx.split(self.student, nnx.Param)
        # The optimizer state covers the trained params only (the adapters, with LoRA).
        trainable = train_step.trainable_params(self.step_cfg, params)
        # Every leaf is placed on the mesh: moments as their params, counters (and the step)
        # replicated, so that each is one global array on every process of a multi-host run.
        replicated = sharding.named_sharding(self.mesh)
        opt_shardings = optax.tree_map_params(
            self.optimizer,
            lambda _, param_sharding: param_sharding,
            jax.eval_shape(self.optimizer.init, trainable),
            jax.tree.map(lambda x: x.sharding, trainable),
            transform_non_params=lambda _: replicated,
        )
        opt_state = jax.jit(self.optimizer.init, out_shardings=opt_shardings)(trainable)
        step = jax.device_put(np.int32(0), replicated)
        return train_step.TrainState(step=step, params=params, opt_state=opt_state)

    def rollout(self, params, prompts_batch: dict[str, Any], key: jax.Array) -> Rollout:
        """`rollout.num_samples` responses per prompt of a data batch (`prompt_tokens`, and
        `teacher` indices) from the student with `params`."""
        n = self.config.rollout.num_samples
        rollout = self.engine.generate(
            params,
            prompts_batch["prompt_tokens"],
            rng=key,
            num_samples=n,
            teacher=prompts_batch["teacher"],
        )
        if "teacher_prompt_ids" not in prompts_batch:
            return rollout
        # Teacher-side context: every row's teacher prompt (rows are prompt-major).
        rows = lambda x: sharding.global_rows(self.mesh, np.repeat(np.asarray(x), n, axis=0))
        rollout = rollout.replace(
            teacher_prompt_tokens=rows(prompts_batch["teacher_prompt_ids"]),
            teacher_prompt_mask=rows(prompts_batch["teacher_prompt_mask"]),
        )
        if not any(self.step_cfg.retokenized_teachers):
            return rollout
        group, logp, mask = self.teacher_groups(rollout)
        place = lambda x: sharding.global_rows(self.mesh, x)
        return rollout.replace(
            teacher_group=place(group),
            teacher_group_logp=place(logp),
            teacher_group_mask=place(mask),
        )

    def retokenized_logprobs(self, rollout: Rollout, teacher: int, rows: np.ndarray):
        """Teacher `teacher` (one with its own tokenizer) on `rows` of the rollout: its per-token
        log-probs [R, T'] of the re-tokenised completions (after the rows' teacher prompts, or,
        without them, the student's prompt text re-tokenised) and the per-row alignments
        (`crosstok.retokenize`)."""
        tok = self.teacher_tokenizers[teacher]
        tokens, mask = (sharding.host_array(x)[rows] for x in (rollout.tokens, rollout.mask))
        ids, ids_mask, alignments = crosstok.retokenize(self.tokenizer, tok, tokens, mask)
        width = 1 << max(int(ids.shape[1]) - 1, 0).bit_length()  # power-of-two widths: few
        ids = np.pad(ids, ((0, 0), (0, width - ids.shape[1])), constant_values=tok.pad_id)
        ids_mask = np.pad(ids_mask, ((0, 0), (0, width - ids_mask.shape[1])))
        if rollout.teacher_prompt_tokens is not None:
            prompt = sharding.host_array(rollout.teacher_prompt_tokens)[rows]
            prompt_mask = sharding.host_array(rollout.teacher_prompt_mask)[rows]
        else:
            texts = [
                self.tokenizer.decode(p[m > 0].tolist(), skip_special_tokens=False)
                for p, m in zip(sharding.host_array(rollout.prompt_tokens)[rows],
                                sharding.host_array(rollout.prompt_mask)[rows], strict=True)
            ]  # fmt: skip
            prompt, prompt_mask = pad_sequences(tok.encode(texts), tok.pad_id, side="left")
        model = (self.step_cfg.teachers[teacher], self.frozen.teachers[teacher])
        logp = scoring.token_logprobs(
            model, prompt, prompt_mask, ids, ids_mask, vocab_size=tok.vocab_size,
            chunk_size=self.step_cfg.logits_chunk,
        )  # fmt: skip
        return np.asarray(logp), alignments

    def teacher_groups(self, rollout: Rollout) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        """`Rollout.teacher_group`, `teacher_group_logp` and `teacher_group_mask` ([B, T] each)
        for the rows of teachers with their own tokenizer (one group per token elsewhere)."""
        tokens, mask = (sharding.host_array(x) for x in (rollout.tokens, rollout.mask))
        routes = sharding.host_array(rollout.teacher)
        b, t = tokens.shape
        group = np.tile(np.arange(t, dtype=np.int32), (b, 1)) * (mask > 0)
        logp, group_mask = np.zeros((b, t), np.float32), (mask > 0).astype(np.int32)
        for k, retokenized in enumerate(self.step_cfg.retokenized_teachers):
            rows = np.flatnonzero(routes == k)
            if not retokenized or not len(rows):
                continue
            teacher_logp, alignments = self.retokenized_logprobs(rollout, k, rows)
            for i, (row, al) in enumerate(zip(rows, alignments, strict=True)):
                n = len(al.student_group)
                group[row] = 0
                group[row, :n] = al.student_group
                sums = np.bincount(al.teacher_group, teacher_logp[i, : len(al.teacher_group)],
                                   minlength=al.num_groups)  # fmt: skip
                logp[row] = 0.0
                logp[row, : al.num_groups] = sums
                group_mask[row] = np.arange(t) < al.num_groups
        return group, logp, group_mask

    def eos_logprobs(self, params, rollout: Rollout) -> dict[str, float]:
        """Mean log-prob of the student's end-of-sequence tokens (the rows that stopped) under
        the student (with `params`) and under each row's teacher: `eos_logprob/student`,
        `eos_logprob/<name>`; and per teacher the median over its rows of the student's minus
        the teacher's log-prob, `eos_gap/<name>`. A teacher whose median row is far below the
        student does not expect the student's stops at all (a template or EOS mismatch); a mean
        pulled down by a few rows is a disagreement on content (e.g. a wrong answer the teacher
        would have continued). `train` reports the former on its first step. {} when no row
        stopped."""
        mask = sharding.host_array(rollout.mask)
        tokens = sharding.host_array(rollout.tokens)
        lengths = mask.sum(axis=1)
        rows = np.nonzero(lengths > 0)[0]
        last = lengths[rows] - 1
        stopped = np.isin(tokens[rows, last], self.engine.sampling.stop_token_ids)
        rows, last = rows[stopped], last[stopped]
        if not len(rows):
            return {}
        student = scoring.rollout_logprobs(
            (self.step_cfg.student, params),
            rollout,
            vocab_size=self.step_cfg.vocab_size,
            chunk_size=self.step_cfg.logits_chunk,
        )
        student = np.asarray(student)[rows, last]
        out = {"eos_logprob/student": float(np.mean(student))}
        teacher = np.asarray(self.teacher_logprobs(rollout))[rows, last]
        routes = sharding.host_array(rollout.teacher)[rows]
        for k, name in enumerate(self.teacher_names):
            mine = routes == k
            if mine.any():
                out[f"eos_logprob/{name}"] = float(np.mean(teacher[mine]))
                out[f"eos_gap/{name}"] = float(np.median(student[mine] - teacher[mine]))
        return out

    def update(
        self, state: train_step.TrainState, rollout: Rollout, task_reward: np.ndarray | None = None
    ):
        """One fused step, or `loss.num_minibatches` PPO-style minibatch updates against the
        log-probs and advantages fixed before the first: (new state, metrics). `task_reward`
        [B] (the verifiers' scores of the rows) is needed iff `reward.task_weight` > 0.

        With several teachers the rows must come in the step's static teacher blocks
        (`step_cfg.teacher_rows`, as the run's data pipeline lays out its batches): checked here,
        since the step routes rows by position, not by `rollout.teacher`."""
        cfg, opt, k = self.step_cfg, self.optimizer, self.config.loss.num_minibatches
        if cfg.teacher_rows is not None:
            expect = np.repeat(np.arange(len(cfg.teacher_rows)), cfg.teacher_rows)
            got = sharding.host_array(rollout.teacher)
            if got.shape != expect.shape or not np.array_equal(got, expect):
                raise ValueError(
                    f"the rollout's rows must come in teacher blocks of {cfg.teacher_rows} rows "
                    f"(teacher 0's first), got teachers {got.tolist()}: draw the prompts with "
                    "data.PromptPipeline(teacher_batch_sizes=trainer.teacher_batch_sizes(config))"
                )
        if not cfg.task_weight:
            task_reward = None
        elif task_reward is None:
            raise ValueError(
                f"reward.task_weight={cfg.task_weight}: pass the rows' verifier scores "
                "(Trainer.verify_rollouts) as task_reward"
            )
        else:  # every process verified the whole batch: place its rows like the rollout's
            task_reward = sharding.global_rows(self.mesh, np.asarray(task_reward, np.float32))
        batch, task_reward = sharding.shard_batch((rollout, task_reward), self.mesh)
        if k == 1:
            return train_step.train_step(cfg, opt, state, self.frozen, batch, task_reward)
        scored, stats = train_step.score_rollout(cfg, state.params, self.frozen, batch, task_reward)
        size = rollout.num_rows // k
        out = {}
        for i in range(k):
            part = lambda x, i=i: x[i * size : (i + 1) * size]
            mb, mb_scored = sharding.shard_batch(
                (jax.tree.map(part, batch), jax.tree.map(part, scored)), self.mesh
            )
            state, out = train_step.update_step(cfg, opt, state, mb, mb_scored)
        return state, {**stats, **out}

    def verify_rollouts(
        self, prompts_batch: dict[str, Any], rollout: Rollout, stats: verifiers.VerifierStats
    ) -> np.ndarray | None:
        """Verifier scores [B] of the training rollouts; None with `train.verify_rollouts` off.

        Without task rewards (`reward.task_weight` = 0) they are only logged (as `accuracy`), so
        the whole batch gets at most `train.verify_budget_seconds` (answers left unverified score
        0 and count as skipped). With task rewards they are the rewards: every row is verified.
        """
        if not self.config.train.verify_rollouts:
            return None
        n = self.config.rollout.num_samples
        tokens, mask = sharding.host_array(rollout.tokens), sharding.host_array(rollout.mask)
        texts = self.tokenizer.batch_decode(tokens, mask)
        cols = {k: prompts_batch[k] for k in ("answer", "task", "domain") if k in prompts_batch}
        rows = [{k: v[i // n] for k, v in cols.items()} for i in range(len(texts))]
        budget = None if self.step_cfg.task_weight else self.config.train.verify_budget_seconds
        scores, _ = verifiers.batch_verify(texts, rows, stats=stats, time_budget_seconds=budget)
        return scores

    def teacher_logprobs(self, rollout: Rollout, teacher: int | None = None) -> jax.Array:
        """[B, T] log-probs of the rollout's completions under teacher `teacher`, or with None
        under each row's own teacher (`rollout.teacher`, as the train step routes them)."""
        if teacher is None:
            routes = sharding.host_array(rollout.teacher)
            out = None
            for k in np.unique(routes):
                logp = self.teacher_logprobs(rollout, int(k))
                out = logp if out is None else jnp.where((routes == k)[:, None], logp, out)
            return out
        cfg = self.step_cfg
        if cfg.retokenized_teachers[teacher]:  # group log-probs at each group's last student token
            rows = np.arange(rollout.num_rows)
            teacher_logp, alignments = self.retokenized_logprobs(rollout, teacher, rows)
            mask = sharding.host_array(rollout.mask)
            return jnp.asarray(crosstok.student_token_logprobs(teacher_logp, alignments, mask))
        model = (cfg.teachers[teacher], self.frozen.teachers[teacher])
        return scoring.rollout_logprobs(
            model, rollout.for_teacher(), vocab_size=cfg.vocab_size, chunk_size=cfg.logits_chunk
        )

    # ------------------------------------------------------------------------------ evaluation

    def eval_set(self) -> tuple[list[dict], list[list[int]]]:
        """The held-out examples and prompt ids (`eval_set(config, tokenizer)`)."""
        return eval_set(self.config, self.tokenizer)

    def evaluate(self, params, key: jax.Array, examples=None, prompts=None) -> dict[str, float]:
        """Held-out accuracy / pass@k of the student with `params` (sampled as `config.eval`
        says, e.g. greedy) on `examples`/`prompts` (default: `eval_set()`), and `kl_per_token`:
        the k1 estimate of KL(student || teacher) per token on temperature-1, untruncated samples
        of the student, each row scored by its own teacher (its example's `teacher`), overall and
        per teacher (`kl_per_token/<name>`). With eval.temperature=1 the evaluation's samples
        serve; otherwise a second, temperature-1 pass with the same keys is drawn for the KL."""
        if examples is None:
            examples, prompts = self.eval_set()
        with metrics.progress(len(examples), "eval", leave=False) as bar:
            return evaluation.evaluate_policy(
                self.eval_engine,
                params,
                self.tokenizer,
                examples,
                prompts,
                num_samples=self.config.eval.num_samples,
                batch_size=self.config.eval.batch_size,
                rng=key,
                teacher_logprobs=self.teacher_logprobs,
                teacher_names=self.teacher_names,
                progress=bar.update,
            )

    # ------------------------------------------------------------------------ checkpoints, export

    def checkpoints(self, workdir: str, *, read_only: bool = False) -> checkpoint.CheckpointManager:
        """The run's checkpoint manager (`workdir/checkpoints`); saves are written in the
        background while training goes on. `read_only` (evaluation, export, or any reader beside a
        running trainer) never writes, deletes, moves or creates anything, and the folder must
        exist."""
        folder = os.path.join(workdir, "checkpoints")
        if read_only and not os.path.isdir(folder):
            raise FileNotFoundError(
                f"no checkpoints folder under {workdir!r}: is --workdir the training run's folder?"
            )
        keep = self.config.train.keep_checkpoints
        return checkpoint.CheckpointManager(
            folder, keep=keep, read_only=read_only, async_save=not read_only
        )

    def save(
        self,
        manager: checkpoint.CheckpointManager,
        step: int,
        state: train_step.TrainState,
        *,
        rng: jax.Array,
        data_state: dict[str, Any] | None,
        force: bool = False,
    ) -> None:
        """Checkpoint `state` as `step` (`force` replaces an existing step). Non-finite params are
        never saved: NonFiniteError, and the previous checkpoints stay the latest."""
        finite = jax.tree.reduce(
            lambda ok, x: ok & jnp.isfinite(x).all(), state.params, jnp.asarray(True)
        )
        if not bool(finite):
            raise NonFiniteError(
                f"not saving step {step}: the student's params are not finite; the latest "
                f"checkpoint in {manager.directory} is the last good one"
            )
        manager.save(
            step,
            # The trained params only: with LoRA the adapters (the base reloads from its folder).
            params=train_step.trainable_params(self.step_cfg, state.params),
            opt_state=state.opt_state,
            rng=rng,
            data_state=data_state,
            metadata={"updates": int(state.step)},
            force=force,
        )
        faults.point("save")

    def restore(
        self, manager: checkpoint.CheckpointManager, rng: jax.Array
    ) -> tuple[int, train_step.TrainState, Any] | None:
        """(step, state, data state) of the latest complete checkpoint, or None if none."""
        template = self.init_state()
        restored = manager.restore_latest(
            params=train_step.trainable_params(self.step_cfg, template.params),
            opt_state=template.opt_state,
            rng=rng,
        )
        if restored is None:
            return None
        params = restored.params
        if self.step_cfg.trainable is not None:  # the restored adapters on the base weights
            params = nnx.merge_state(template.params, params)
        state = train_step.TrainState(
            step=jax.device_put(
                np.int32(restored.metadata["updates"]), sharding.named_sharding(self.mesh)
            ),
            params=params,
            opt_state=restored.opt_state,
        )
        return restored.step, state, restored.data_state

    def key(self, seed: int) -> jax.Array:
        """A typed PRNG key replicated over the mesh: the same value on every process, so that
        a checkpoint of it is one global array (orbax refuses process-local arrays)."""
        replicated = sharding.named_sharding(self.mesh)
        return jax.jit(lambda: jax.random.key(seed), out_shardings=replicated)()

    def restore_from(self, workdir: str) -> train_step.TrainState:
        """The latest complete checkpoint's state under `workdir` (FileNotFoundError if none)."""
        with self.checkpoints(workdir, read_only=True) as manager:
            found = self.restore(manager, self.key(0))
        if found is None:
            raise FileNotFoundError(f"no complete checkpoint under {workdir}/checkpoints")
        return found[1]

    def export(self, params, out_dir: str) -> str:
        """The student with `params` as a Hugging Face folder (config, safetensors, tokenizer);
        with LoRA, the adapters merged into the base weights (W + alpha / rank A B)."""
        nnx.update(self.student, params)
        plain = lora.merge(self.student) if lora.is_adapted(self.student) else self.student
        models.save_pretrained(plain, out_dir)
        faults.point("export")
        self.tokenizer.save_pretrained(out_dir)
        return out_dir

    # ------------------------------------------------------------------------------ the loop

    def train(self, workdir: str) -> dict[str, float]:
        """Runs (or resumes) the distillation in `workdir`; returns the last evaluation metrics
        (also written to `workdir/metrics.jsonl`)."""
        config = self.config
        os.makedirs(workdir, exist_ok=True)
        state, key = self.init_state(), self.key(config.seed)
        pipeline = data.PromptPipeline(
            config.data.train_path,
            self.tokenizer,
            batch_size=config.data.batch_size,
            max_prompt_len=config.rollout.max_prompt_len,
            seed=config.seed,
            teachers=self.teacher_names,  # a record naming another teacher is an error
            teacher_prompts=self.teacher_prompts,
            # Several teachers: every batch is a fixed block of prompts per teacher.
            teacher_batch_sizes=teacher_batch_sizes(config)
            if len(self.teacher_names) > 1
            else None,
            system_prompt=config.data.system_prompt,
        )
        examples, eval_prompts = self.eval_set()
        ckpt = self.checkpoints(workdir)
        start = 0
        found = self.restore(ckpt, key)
        if found is not None:
            start, state, data_state = found
            if start > config.train.num_steps:
                ckpt.close()
                raise ValueError(
                    f"{workdir} has a checkpoint at step {start}, past train.num_steps="
                    f"{config.train.num_steps}: raise train.num_steps to continue the run, or "
                    "use another workdir"
                )
            pipeline.set_state(data_state)
            logger.info("resumed from step %d", start)
        metrics.write_config(config, workdir)  # only once the run is known to start or resume
        writer = metrics.MetricWriter(workdir)
        # Rows after the checkpoint are redone; without one, everything is (the step-0 eval too).
        writer.truncate_after(start if found is not None else -1)
        timer, skips, last_eval = metrics.Timer(), 0, {}
        verifier_stats = verifiers.VerifierStats()
        bar = metrics.progress(config.train.num_steps, "train", initial=start)

        def run_eval(step):
            if not examples:
                return {}
            with timer("eval"):
                out = self.evaluate(state.params, key, examples, eval_prompts)
            writer.write(step, out, split="eval")
            faults.point("eval")
            logger.info("eval %s", metrics.format_line(step, out))
            return out

        if start == 0 and examples:
            last_eval = run_eval(0)
        for step in range(start, config.train.num_steps):
            step_key = jax.random.fold_in(key, step)
            timer.reset()
            with timer("data"):
                prompts_batch = next(pipeline)
            with timer("rollout"):
                rollout = self.rollout(state.params, prompts_batch, step_key)
                jax.block_until_ready(rollout.tokens)
            faults.point("rollout")
            checks = {}
            if step == start:  # does each teacher expect the student's stops?
                checks = self.eos_logprobs(state.params, rollout)
                _warn_unexpected_stops(checks)
            with timer("reward"):
                scores = self.verify_rollouts(prompts_batch, rollout, verifier_stats)
            with timer("update"):
                state, step_metrics = self.update(state, rollout, scores)
                step_metrics = jax.device_get(step_metrics)
            rewards = {} if scores is None else {"accuracy": float(np.mean(scores))}
            faults.point("update")
            tokens = float(sharding.host_array(rollout.mask).sum())
            row = {
                **step_metrics,
                **checks,
                **rewards,
                **verifier_stats.metrics(),
                **timer.summary(),
                "tokens_per_second": tokens / timer.total(),
            }
            skips = skips + 1 if step_metrics["skipped"] else 0
            if step % config.train.log_every == 0 or skips:
                writer.write(step + 1, row)
                faults.point("metrics")
            if skips >= config.train.max_consecutive_skips:
                writer.close()
                raise NonFiniteError(
                    f"{skips} consecutive steps had a non-finite loss or gradient (last at step "
                    f"{step + 1}); stopping. The last good checkpoint in {ckpt.directory} is "
                    "intact: lower optimizer.learning_rate, set estimator.log_ratio_clip, or "
                    "pick a bounded divergence (jsd, tv)."
                )
            bar.update(1)
            bar.set_postfix_str(metrics.format_line(step + 1, row, keys=("loss", "kl_per_token")))
            done = step + 1
            if config.train.eval_every and done % config.train.eval_every == 0:
                last_eval = run_eval(done)
            if done % config.train.checkpoint_every == 0 or done == config.train.num_steps:
                with _reporting_save_failures(ckpt):
                    self.save(
                        ckpt,
                        done,
                        state,
                        rng=key,
                        data_state=pipeline.get_state(),
                        force=done == config.train.num_steps,
                    )
        bar.close()
        if start == config.train.num_steps:  # already complete: report its last evaluation
            logger.info("%s: the run is already complete at step %d", workdir, start)
            rows = metrics.read_jsonl(workdir, split="eval")
            last_eval = {k: v for k, v in (rows[-1] if rows else {}).items() if k != "split"}
            last_eval.pop("step", None)
        elif config.train.eval_every == 0 or config.train.num_steps % config.train.eval_every:
            last_eval = run_eval(config.train.num_steps) or last_eval
        with _reporting_save_failures(ckpt):
            ckpt.wait()
        if config.train.export_final:
            self.export(state.params, os.path.join(workdir, "export"))
        writer.close()
        ckpt.close()
        return last_eval


# A teacher that gives the student's stop, on its median row, this many nats less log-prob
# than the student (e^-2, about 1/7 of the probability) is reported as a likely template or EOS
# mismatch. The median, not the mean: on the demo the mean gap is 2.5 nats because the teacher
# would continue a few wrong answers, while its median row agrees with the student.
EOS_GAP_NATS = 2.0


def _warn_unexpected_stops(eos: dict[str, float]) -> None:
    student = eos.get("eos_logprob/student")
    for key, gap in eos.items():
        if not key.startswith("eos_gap/") or gap <= EOS_GAP_NATS:
            continue
        name = key.split("/", 1)[1]
        logger.warning(
            "teachers.%s gives the student's end-of-sequence tokens %.2f nats less log-prob than "
            "the student on the median row (mean log-prob %.2f against %.2f): it does not expect "
            "the student to stop there. Check its chat template (teachers.%s.template) and EOS "
            "ids",
            name, gap, eos[f"eos_logprob/{name}"], student, name,
        )  # fmt: skip


def train_and_evaluate(
    config: config_dict.ConfigDict, workdir: str, *, mesh: jax.sharding.Mesh | None = None
) -> dict[str, float]:
    """Runs (or resumes) the distillation described by `config` in `workdir`.

    `mesh` overrides `config.mesh` (e.g. a sub-mesh). Returns the last evaluation metrics (also
    written to `workdir/metrics.jsonl`).
    """
    return Trainer.setup(config, mesh=mesh).train(workdir)


def export(config: config_dict.ConfigDict, workdir: str, out_dir: str) -> str:
    """Writes the latest checkpoint's student as a Hugging Face folder (config + safetensors)."""
    trainer = Trainer.setup(config)
    return trainer.export(trainer.restore_from(workdir).params, out_dir)


def evaluate_checkpoint(config: config_dict.ConfigDict, workdir: str | None) -> dict[str, float]:
    """Evaluates the latest checkpoint in `workdir` (or the initial student if None)."""
    trainer = Trainer.setup(config)
    params = trainer.restore_from(workdir).params if workdir else trainer.init_state().params
    examples, prompts = trainer.eval_set()
    if not examples:
        raise ValueError("data.eval_path is not set: nothing to evaluate")
    start = time.perf_counter()
    out = trainer.evaluate(params, jax.random.key(config.seed), examples, prompts)
    out["eval_seconds"] = time.perf_counter() - start
    return out
