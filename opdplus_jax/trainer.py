"""On-policy distillation loop: rollout -> score -> advantages -> update, with checkpoints.

`train_and_evaluate(config, workdir)` is the whole job (the CLI in `opdplus_jax.main` is a thin
wrapper). Per step: draw a batch of prompts (grain pipeline), sample `num_samples` responses per
prompt from the current student (`sampling.generate`), score them with every model and update
the student in one jitted, donated step (`train_step`), log metrics (JSONL, TensorBoard, progress
bar), and periodically evaluate on held-out prompts and checkpoint (orbax: params, optimizer
state, step, RNG, data-iterator state). Restarting with the same workdir resumes from the latest
complete checkpoint, bit-for-bit on the same machine: the step's RNG is fold_in(seed key, step)
and the data iterator resumes where it stopped.
"""

from __future__ import annotations

import dataclasses
import functools
import logging
import os
import time
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx
from ml_collections import config_dict

from opdplus_jax import (
    checkpoint,
    data,
    divergences,
    evaluation,
    metrics,
    models,
    sampling,
    sharding,
    train_step,
    verifiers,
)
from opdplus_jax.tokenizer import Tokenizer, check_compatible

logger = logging.getLogger(__name__)

REFERENCE_CHOICES = ("student_init", "none")
BASELINES = ("none", "loo", "mean", "mean_std")


class NonFiniteError(RuntimeError):
    """Raised after `max_consecutive_skips` non-finite updates in a row."""


def _dtype(name: str):
    try:
        return jnp.dtype(name)
    except TypeError as e:
        raise ValueError(f"unknown dtype {name!r}; use float32 or bfloat16") from e


def _require_dir(path: str, what: str) -> str:
    if not path:
        raise ValueError(f"{what} is not set in the config")
    if not os.path.isdir(path):
        raise FileNotFoundError(f"{what}: checkpoint folder {path!r} does not exist")
    return path


def validate(config: config_dict.ConfigDict) -> None:
    """Fail fast, with the fix named, on a config the step would reject deep inside JAX."""
    est = config.estimator
    divergences.get(est.divergence, **dict(est.divergence_params))
    if est.baseline not in BASELINES:
        raise ValueError(f"estimator.baseline must be one of {BASELINES}, got {est.baseline!r}")
    if est.baseline == "loo" and config.rollout.num_samples < 2:
        raise ValueError("estimator.baseline='loo' needs rollout.num_samples >= 2")
    if not config.teachers:
        raise ValueError("config.teachers is empty: add at least one teacher")
    for name, t in config.teachers.items():
        lam = float(t.reward_scale)
        if not np.isfinite(lam):
            raise ValueError(f"teachers.{name}.reward_scale must be finite, got {lam}")
        if lam != 1.0 and t.reference == "none":
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


@dataclasses.dataclass
class Setup:
    """Everything loaded for a run."""

    mesh: jax.sharding.Mesh
    tokenizer: Tokenizer
    student: nnx.Module
    step_cfg: train_step.StepConfig
    frozen: train_step.Frozen
    teacher_names: list[str]


def load(config: config_dict.ConfigDict, mesh: jax.sharding.Mesh | None = None) -> Setup:
    """Loads the student, teachers, references and tokenizer onto the mesh; checks vocabularies."""
    validate(config)
    mesh = mesh if mesh is not None else sharding.make_mesh(dict(config.mesh))
    kw = {"dtype": _dtype(config.student.dtype), "param_dtype": _dtype(config.student.param_dtype)}
    student_path = _require_dir(config.student.path, "student.path")
    student = models.from_pretrained(student_path, mesh=mesh, **kw)
    tokenizer = Tokenizer.from_pretrained(config.tokenizer_path or student_path)
    names = list(config.teachers.keys())
    teachers, references, reference_of, ref_index = [], [], [], {}
    for name in names:
        t = config.teachers[name]
        path = _require_dir(t.path, f"teachers.{name}.path")
        teacher = models.from_pretrained(path, mesh=mesh, **kw)
        has_tokenizer = any(
            os.path.isfile(os.path.join(path, f))
            for f in ("tokenizer.json", "tokenizer_config.json")
        )
        teacher_tok = Tokenizer.from_pretrained(path) if has_tokenizer else tokenizer
        check_compatible(tokenizer, teacher_tok, student.config, teacher.config)
        teachers.append(teacher)
        if float(t.reward_scale) == 1.0 or t.reference == "none":
            reference_of.append(None)
            continue
        key = t.reference
        if key not in ref_index:
            if key == "student_init":
                ref = models.from_pretrained(student_path, mesh=mesh, **kw)  # a frozen copy
            else:
                ref = models.from_pretrained(
                    _require_dir(key, f"teachers.{name}.reference"), mesh=mesh, **kw
                )
                check_compatible(tokenizer, tokenizer, student.config, ref.config)
            ref_index[key] = len(references)
            references.append(ref)
        reference_of.append(ref_index[key])
    est = config.estimator
    step_cfg = train_step.StepConfig(
        student=nnx.split(student, nnx.Param)[0],
        teachers=tuple(nnx.split(m, nnx.Param)[0] for m in teachers),
        references=tuple(nnx.split(m, nnx.Param)[0] for m in references),
        reward_scales=tuple(float(config.teachers[n].reward_scale) for n in names),
        reference_of=tuple(reference_of),
        vocab_size=tokenizer.vocab_size,
        divergence=divergences.get(est.divergence, **dict(est.divergence_params)),
        correction=est.correction,
        level=est.level,
        discount=float(est.discount),
        log_ratio_clip=float(est.log_ratio_clip) or None,
        baseline=None if est.baseline == "none" else est.baseline,
        group_size=config.rollout.num_samples,
        aggregation=config.loss.aggregation,
        ppo_clip=float(config.loss.ppo_clip) or None,
        tis_cap=float(config.loss.tis_cap) or None,
    )
    frozen = train_step.Frozen(
        teachers=tuple(nnx.split(m, nnx.Param)[1] for m in teachers),
        references=tuple(nnx.split(m, nnx.Param)[1] for m in references),
    )
    return Setup(mesh, tokenizer, student, step_cfg, frozen, names)


def _rollout_rewards(setup: Setup, config, prompts_batch, result, stats) -> dict[str, float]:
    """Verifier accuracy of the training rollouts (logged, never used in the loss)."""
    n = config.rollout.num_samples
    texts = setup.tokenizer.batch_decode(np.asarray(result.tokens), np.asarray(result.mask))
    cols = {k: prompts_batch[k] for k in ("answer", "task", "domain") if k in prompts_batch}
    rows = [{k: v[i // n] for k, v in cols.items()} for i in range(len(texts))]
    scores, _ = verifiers.batch_verify(texts, rows, stats=stats)
    return {"accuracy": float(np.mean(scores))}


def _rollout(setup: Setup, config, params, prompts_batch, key) -> tuple[dict, Any]:
    """Samples n responses per prompt; returns the train batch (numpy) and the raw result."""
    n = config.rollout.num_samples
    prompts = [p for p in prompts_batch["prompt_tokens"] for _ in range(n)]
    result = sampling.generate(
        (setup.step_cfg.student, params),
        prompts,
        max_new_tokens=config.rollout.max_new_tokens,
        temperature=config.rollout.temperature,
        top_p=config.rollout.top_p,
        top_k=config.rollout.top_k,
        eos_token_id=list(setup.tokenizer.eos_ids),
        pad_token_id=setup.tokenizer.pad_id,
        rng=key,
        vocab_size=setup.step_cfg.vocab_size,
    )
    batch = {
        "prompt_tokens": result.prompt_tokens,
        "prompt_mask": result.prompt_mask,
        "tokens": result.tokens,
        "mask": result.mask,
        "behaviour_logp": result.sampling_logprobs,
        "teacher": jnp.asarray(np.repeat(prompts_batch["teacher"], n), jnp.int32),
    }
    return batch, result


def _update(setup: Setup, config, opt, state, batch):
    """One fused step, or PPO-style minibatch updates against fixed old log-probs."""
    cfg, k = setup.step_cfg, config.loss.num_minibatches
    batch = sharding.shard_batch(batch, setup.mesh)
    if k == 1:
        return train_step.train_step(cfg, opt, state, setup.frozen, batch)
    fixed, stats = train_step.score_rollout(cfg, state.params, setup.frozen, batch)
    full = {**batch, **fixed}
    size = full["tokens"].shape[0] // k
    out = {}
    for i in range(k):
        mb = jax.tree.map(lambda x, i=i: x[i * size : (i + 1) * size], full)
        state, out = train_step.update_step(cfg, opt, state, sharding.shard_batch(mb, setup.mesh))
    return state, {**stats, **out}


def eval_set(config, tokenizer) -> tuple[list[dict], list[list[int]]]:
    """The first `eval.num_prompts` held-out examples (answer, task, domain) and their prompt
    token ids, in file order; empty without `data.eval_path`."""
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
        system_prompt=config.data.system_prompt,
    )
    examples, prompts = [], []
    for batch in pipe:
        examples.append({k: batch[k][0] for k in ("answer", "task", "domain")})
        prompts.append(batch["prompt_tokens"][0])
        if len(examples) >= config.eval.num_prompts:
            break
    return examples, prompts


def evaluate(setup: Setup, config, params, examples, prompts, key) -> dict[str, float]:
    """Held-out accuracy / pass@k of the student and its per-token KL to the first teacher."""
    cfg = setup.step_cfg

    def teacher_logprobs(result):
        batch = {
            "prompt_tokens": result.prompt_tokens,
            "prompt_mask": result.prompt_mask,
            "tokens": result.tokens,
            "mask": result.mask,
        }
        return _score_teacher(cfg.teachers[0], setup.frozen.teachers[0], batch, cfg.vocab_size)

    with metrics.progress(len(examples), "eval", leave=False) as bar:
        return evaluation.evaluate_policy(
            (cfg.student, params),
            setup.tokenizer,
            examples,
            prompts,
            num_samples=config.eval.num_samples,
            temperature=config.eval.temperature,
            max_new_tokens=config.eval.max_new_tokens,
            batch_size=config.eval.batch_size,
            rng=key,
            teacher_logprobs=teacher_logprobs,
            progress=bar.update,
        )


@functools.partial(jax.jit, static_argnames=("graphdef", "vocab_size"))
def _score_teacher(graphdef, params, batch, vocab_size):
    return train_step.completion_logprobs(graphdef, params, batch, vocab_size)


def train_and_evaluate(
    config: config_dict.ConfigDict, workdir: str, *, mesh: jax.sharding.Mesh | None = None
) -> dict[str, float]:
    """Runs (or resumes) the distillation described by `config` in `workdir`.

    `mesh` overrides `config.mesh` (e.g. a sub-mesh). Returns the last evaluation metrics (also
    written to `workdir/metrics.jsonl`).
    """
    os.makedirs(workdir, exist_ok=True)
    setup = load(config, mesh)
    metrics.write_config(config, workdir)
    opt = train_step.make_optimizer(config.optimizer, config.train.num_steps)
    _, params = nnx.split(setup.student, nnx.Param)
    state = train_step.TrainState(
        step=jnp.zeros((), jnp.int32), params=params, opt_state=opt.init(params)
    )
    key = jax.random.key(config.seed)
    pipeline = data.PromptPipeline(
        config.data.train_path,
        setup.tokenizer,
        batch_size=config.data.batch_size,
        max_prompt_len=config.rollout.max_prompt_len,
        seed=config.seed,
        teachers=setup.teacher_names if len(setup.teacher_names) > 1 else None,
        system_prompt=config.data.system_prompt,
    )
    examples, eval_prompts = eval_set(config, setup.tokenizer)
    ckpt = checkpoint.CheckpointManager(
        os.path.join(workdir, "checkpoints"), keep=config.train.keep_checkpoints
    )
    start = 0
    restored = ckpt.restore_latest(params=state.params, opt_state=state.opt_state, rng=key)
    if restored is not None:
        start = restored.step
        state = train_step.TrainState(
            step=jnp.asarray(restored.metadata["updates"], jnp.int32),
            params=restored.params,
            opt_state=restored.opt_state,
        )
        pipeline.set_state(restored.data_state)
        logger.info("resumed from step %d", start)
    writer = metrics.MetricWriter(workdir)
    writer.truncate_after(start)
    timer, skips, last_eval = metrics.Timer(), 0, {}
    verifier_stats = verifiers.VerifierStats()
    bar = metrics.progress(config.train.num_steps, "train", initial=start)

    def save(step, force=False):
        ckpt.save(
            step,
            params=state.params,
            opt_state=state.opt_state,
            rng=key,
            data_state=pipeline.get_state(),
            metadata={"updates": int(state.step)},
            force=force,
        )

    def run_eval(step):
        if not examples:
            return {}
        with timer("eval"):
            out = evaluate(setup, config, state.params, examples, eval_prompts, key)
        writer.write(step, out, split="eval")
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
            batch, result = _rollout(setup, config, state.params, prompts_batch, step_key)
            jax.block_until_ready(batch["tokens"])
        with timer("reward"):
            rewards = _rollout_rewards(setup, config, prompts_batch, result, verifier_stats)
        with timer("update"):
            state, step_metrics = _update(setup, config, opt, state, batch)
            step_metrics = jax.device_get(step_metrics)
        tokens = float(np.asarray(batch["mask"]).sum())
        row = {
            **step_metrics,
            **rewards,
            **verifier_stats.metrics(),
            **timer.summary(),
            "tokens_per_second": tokens / timer.total(),
        }
        skips = skips + 1 if step_metrics["skipped"] else 0
        if step % config.train.log_every == 0 or skips:
            writer.write(step + 1, row)
        if skips >= config.train.max_consecutive_skips:
            writer.close()
            raise NonFiniteError(
                f"{skips} consecutive steps had a non-finite loss or gradient (last at step "
                f"{step + 1}); stopping. The last good checkpoint in {ckpt.directory} is intact: "
                "lower optimizer.learning_rate, set estimator.log_ratio_clip, or pick a "
                "bounded divergence (jsd, tv)."
            )
        bar.update(1)
        bar.set_postfix_str(metrics.format_line(step + 1, row, keys=("loss", "kl_per_token")))
        done = step + 1
        if config.train.eval_every and done % config.train.eval_every == 0:
            last_eval = run_eval(done)
        if done % config.train.checkpoint_every == 0 or done == config.train.num_steps:
            save(done, force=done == config.train.num_steps)
    bar.close()
    if config.train.eval_every == 0 or config.train.num_steps % config.train.eval_every:
        last_eval = run_eval(config.train.num_steps) or last_eval
    ckpt.wait()
    if config.train.export_final:
        nnx.update(setup.student, state.params)
        models.save_pretrained(setup.student, os.path.join(workdir, "export"))
        setup.tokenizer.hf.save_pretrained(os.path.join(workdir, "export"))
    writer.close()
    ckpt.close()
    return last_eval


def export(config: config_dict.ConfigDict, workdir: str, out_dir: str) -> str:
    """Writes the latest checkpoint's student as a Hugging Face folder (config + safetensors)."""
    setup = load(config)
    _, params = nnx.split(setup.student, nnx.Param)
    opt = train_step.make_optimizer(config.optimizer, config.train.num_steps)
    ckpt = checkpoint.CheckpointManager(os.path.join(workdir, "checkpoints"))
    restored = ckpt.restore_latest(params=params, opt_state=opt.init(params), rng=jax.random.key(0))
    if restored is None:
        raise FileNotFoundError(f"no complete checkpoint under {workdir}/checkpoints")
    nnx.update(setup.student, restored.params)
    models.save_pretrained(setup.student, out_dir)
    setup.tokenizer.hf.save_pretrained(out_dir)
    return out_dir


def evaluate_checkpoint(config: config_dict.ConfigDict, workdir: str | None) -> dict[str, float]:
    """Evaluates the latest checkpoint in `workdir` (or the initial student if None)."""
    setup = load(config)
    _, params = nnx.split(setup.student, nnx.Param)
    if workdir:
        opt = train_step.make_optimizer(config.optimizer, config.train.num_steps)
        ckpt = checkpoint.CheckpointManager(os.path.join(workdir, "checkpoints"))
        restored = ckpt.restore_latest(
            params=params, opt_state=opt.init(params), rng=jax.random.key(0)
        )
        if restored is None:
            raise FileNotFoundError(f"no complete checkpoint under {workdir}/checkpoints")
        params = restored.params
    examples, prompts = eval_set(config, setup.tokenizer)
    if not examples:
        raise ValueError("data.eval_path is not set: nothing to evaluate")
    start = time.perf_counter()
    out = evaluate(setup, config, params, examples, prompts, jax.random.key(config.seed))
    out["eval_seconds"] = time.perf_counter() - start
    return out
