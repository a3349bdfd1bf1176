"""Accelerator check: the sampler, the fused OPD step and a short training on this machine's
accelerator (one GPU, or whatever JAX's default backend is), as one JSON report.

    bash scripts/accelerator_check.sh            # installs the CUDA extra, then runs this
    python scripts/accelerator_check.py --out runs/accelerator_check/report.json

Four measurements, each at shapes that fit in a few minutes on one modern GPU:
  opd_step   the `benchmarks/opd_step.py` models and step (a 23M student and an 87M teacher,
             Qwen3-shaped, vocabulary 32768, 16 prompts x exactly 128 new tokens, reverse KL,
             AdamW) in the chosen dtype: median wall time of rollout and fused update, the first
             step's compile seconds, and the achieved matmul TFLOP/s against the step's analytic
             FLOPs (`opd_step.step_flops`).
  sampler    the same student sampling 64 prompts x 512 new tokens: new tokens per second.
  rollouts   long-tailed lengths (64 prompts x 4 samples, stop chance ~1/128 per token): useful
             tokens per second of the static and the continuous engine, and their ratio.
  training   a tiny distillation (random models, the `reverse` task) through
             `trainer.train_and_evaluate` for a few steps: it must finish with finite losses.
The last line printed is the whole report as one JSON object (also written to --out).
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import os
import statistics
import sys
import tempfile
import time

import jax
import jax.numpy as jnp
import numpy as np

from opdplus_jax import configs, models, sharding, tasks, trainer
from opdplus_jax.configs import default
from opdplus_jax.rollout import ContinuousEngine, SamplingParams, StaticEngine
from opdplus_jax.tasks import tokenizer as task_tokenizer

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, os.path.join(REPO, "benchmarks"))
import opd_step  # noqa: E402  (benchmarks/opd_step.py: the benchmark's models and FLOP count)

IDS = {"bos_token_id": 2, "eos_token_id": 3, "pad_token_id": 0}


def _compile_seconds() -> list[float]:
    events: list[float] = []

    def listener(name: str, secs: float, **_) -> None:
        if "/compile/" in name:
            events.append(secs)

    jax.monitoring.register_event_duration_secs_listener(listener)
    return events


def _opd_config(paths: dict[str, str], tok_dir: str, args) -> object:
    c = default.get_config("cpu")
    configs.apply_overrides(
        c,
        {
            "student.path": paths["student"],
            "student.dtype": args.dtype,
            "tokenizer_path": tok_dir,
            "teachers.default.path": paths["teacher"],
            "estimator.divergence": "reverse_kl",
            "estimator.correction": "stop_grad",
            "rollout.num_samples": 1,
            "rollout.max_new_tokens": args.new_tokens,
            "rollout.max_prompt_len": args.prompt_len,
            "data.batch_size": args.batch,
            "optimizer.learning_rate": 3e-4,
            "optimizer.schedule": "constant",
            "optimizer.warmup_steps": 0,
        },
    )
    return c


def check_opd_step(tmp: str, args) -> dict:
    """The opd_step benchmark's step, ours only: rollout and fused update."""
    compile_events = _compile_seconds()
    tok_dir = opd_step.save_word_tokenizer(os.path.join(tmp, "words"), args.vocab)
    cfgs = {
        name: models.qwen3_config(vocab_size=args.vocab, **shape, **IDS)
        for name, shape in (("student", opd_step.STUDENT), ("teacher", opd_step.TEACHER))
    }
    paths = {
        name: models.random_checkpoint(os.path.join(tmp, name), cfg, seed=i)
        for i, (name, cfg) in enumerate(cfgs.items())
    }
    run = trainer.Trainer.setup(_opd_config(paths, tok_dir, args))
    no_stop = dataclasses.replace(run.engine.sampling, stop_token_ids=())
    run.engine = StaticEngine(run.step_cfg.student, no_stop, mesh=run.mesh)
    rng = np.random.default_rng(0)
    words = rng.integers(len(opd_step.SPECIAL), args.vocab, (args.batch, args.prompt_len))
    prompts = run.tokenizer.hf([" ".join(f"w{i}" for i in row) for row in words])["input_ids"]
    batch = {"prompt_tokens": prompts, "teacher": np.zeros(args.batch, np.int32)}
    state, key = run.init_state(), run.key(0)

    def step(i: int) -> dict[str, float]:
        nonlocal state
        t0 = time.perf_counter()
        rollout = run.rollout(state.params, batch, jax.random.fold_in(key, i))
        jax.block_until_ready(rollout.tokens)
        t1 = time.perf_counter()
        state, metrics = run.update(state, rollout)
        metrics = jax.device_get(metrics)
        t2 = time.perf_counter()
        if metrics["skipped"] or not np.isfinite(metrics["loss"]):
            raise RuntimeError(f"the OPD step produced a non-finite loss: {metrics}")
        return {"sample": t1 - t0, "update": t2 - t1, "total": t2 - t0}

    first = step(0)["total"]
    compile_s = sum(compile_events)
    runs = [step(i + 1) for i in range(args.repeats)]
    med = {k: statistics.median(r[k] for r in runs) for k in runs[0]}
    flops = opd_step.step_flops(
        cfgs["student"], cfgs["teacher"], args.batch, args.prompt_len, args.new_tokens
    )
    total_flops = sum(flops.values())
    return {
        "dtype": args.dtype,
        "batch": args.batch,
        "prompt_len": args.prompt_len,
        "new_tokens": args.new_tokens,
        "vocab": args.vocab,
        "sample_seconds": med["sample"],
        "update_seconds": med["update"],
        "step_seconds": med["total"],
        "first_step_seconds": first,
        "compile_seconds": compile_s,
        "step_tflops": total_flops / 1e12,
        "achieved_tflop_per_s": total_flops / med["total"] / 1e12,
        "tokens_per_second": args.batch * args.new_tokens / med["total"],
        "repeats": args.repeats,
    }


def check_sampler(tmp: str, args) -> dict:
    """The student sampling `sampler_batch` prompts x `sampler_new_tokens` (no stop tokens)."""
    model = models.from_pretrained(os.path.join(tmp, "student"), dtype=jnp.dtype(args.dtype))
    sampling = SamplingParams(max_new_tokens=args.sampler_new_tokens, temperature=1.0)
    engine, params = StaticEngine.for_model(model, sampling)
    rng = np.random.default_rng(1)
    prompts = rng.integers(4, args.vocab, (args.sampler_batch, args.prompt_len)).tolist()
    times = []
    for i in range(args.repeats + 1):  # the first call compiles
        t = time.perf_counter()
        jax.block_until_ready(engine.generate(params, prompts, rng=jax.random.key(i)).tokens)
        times.append(time.perf_counter() - t)
    seconds = statistics.median(times[1:])
    new = args.sampler_batch * args.sampler_new_tokens
    return {
        "batch": args.sampler_batch,
        "new_tokens": args.sampler_new_tokens,
        "seconds": seconds,
        "first_call_seconds": times[0],
        "new_tokens_per_second": new / seconds,
    }


def check_rollouts(tmp: str, args) -> dict:
    """Long-tailed lengths: `sampler_batch` prompts x 4 samples, a row stopping at any of
    vocab/128 ids (about 1/128 per step on the near-uniform random student), at most
    `sampler_new_tokens`: useful tokens/s of the static and the continuous engine (64 slots)."""
    model = models.from_pretrained(os.path.join(tmp, "student"), dtype=jnp.dtype(args.dtype))
    stops = tuple(range(4, 4 + args.vocab // 128))
    sampling = SamplingParams(max_new_tokens=args.sampler_new_tokens, stop_token_ids=stops)
    static, params = StaticEngine.for_model(model, sampling)
    engines = {"static": static, "continuous": ContinuousEngine(static.graphdef, sampling)}
    rng = np.random.default_rng(2)
    prompts = rng.integers(4, args.vocab, (args.sampler_batch, args.prompt_len)).tolist()
    out: dict = {"prompts": args.sampler_batch, "samples": 4, "stop_ids": len(stops)}
    for name, engine in engines.items():
        times, useful = [], []
        for i in range(3):  # the first call compiles
            t = time.perf_counter()
            r = engine.generate(params, prompts, rng=jax.random.key(i), num_samples=4)
            useful.append(int(np.asarray(r.mask).sum()))
            times.append(time.perf_counter() - t)
        out[name] = {
            "seconds": statistics.median(times[1:]),
            "first_call_seconds": times[0],
            "useful_tokens_per_second": statistics.median(
                u / t for u, t in zip(useful[1:], times[1:], strict=True)
            ),
        }
    out["continuous_vs_static"] = (
        out["continuous"]["useful_tokens_per_second"] / out["static"]["useful_tokens_per_second"]
    )
    return out


def check_training(tmp: str, args) -> dict:
    """A tiny distillation through the trainer: random student and sharper teacher, `reverse`."""
    root = os.path.join(tmp, "tiny")
    task_tokenizer.save_tokenizer(os.path.join(root, "tokenizer"))
    shape = {"vocab_size": 112, "hidden_size": 64, "num_layers": 2, "num_heads": 4}
    cfg = models.qwen3_config(num_kv_heads=2, **shape, **IDS)
    for name, scale in (("student", 10.0), ("teacher", 20.0)):
        models.random_checkpoint(os.path.join(root, name), cfg, seed=0, output_scale=scale)
    task = tasks.get("reverse", max_len=4)
    tasks.write_jsonl(task.generate("train", 256, seed=0), os.path.join(root, "train.jsonl"))
    tasks.write_jsonl(task.generate("test", 32, seed=0), os.path.join(root, "test.jsonl"))
    c = default.get_config("cpu")
    configs.apply_overrides(
        c,
        {
            "student.path": os.path.join(root, "student"),
            "student.dtype": args.dtype,
            "tokenizer_path": os.path.join(root, "tokenizer"),
            "teachers.default.path": os.path.join(root, "teacher"),
            "data.train_path": os.path.join(root, "train.jsonl"),
            "data.eval_path": os.path.join(root, "test.jsonl"),
            "data.batch_size": 16,
            "rollout.num_samples": 2,
            "rollout.max_new_tokens": 8,
            "rollout.max_prompt_len": 32,
            "optimizer.learning_rate": 1e-2,
            "train.num_steps": args.train_steps,
            "train.eval_every": 0,
            "train.checkpoint_every": args.train_steps,
            "train.export_final": False,
            "eval.num_prompts": 32,
            "eval.batch_size": 32,
            "eval.temperature": 1.0,
            "eval.max_new_tokens": 8,
        },
    )
    workdir = os.path.join(root, "run")
    t = time.perf_counter()
    final = trainer.train_and_evaluate(c, workdir)
    seconds = time.perf_counter() - t
    with open(os.path.join(workdir, "metrics.jsonl"), encoding="utf-8") as f:
        rows = [json.loads(line) for line in f]
    train_rows = [r for r in rows if r["split"] == "train"]
    losses = [r["loss"] for r in train_rows]
    if len(losses) != args.train_steps or not np.all(np.isfinite(losses)):
        raise RuntimeError(f"training did not finish with finite losses: {losses}")
    return {
        "steps": args.train_steps,
        "seconds": seconds,
        "kl_per_token_first": train_rows[0]["kl_per_token"],
        "kl_per_token_last": train_rows[-1]["kl_per_token"],
        "eval_kl_per_token": final.get("kl_per_token"),
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--out", default="runs/accelerator_check/report.json")
    parser.add_argument("--dtype", default="bfloat16", choices=["float32", "bfloat16"])
    parser.add_argument("--batch", type=int, default=16)
    parser.add_argument("--prompt-len", type=int, default=32)
    parser.add_argument("--new-tokens", type=int, default=128)
    parser.add_argument("--vocab", type=int, default=32768)
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--sampler-batch", type=int, default=64)
    parser.add_argument("--sampler-new-tokens", type=int, default=512)
    parser.add_argument("--train-steps", type=int, default=20)
    args = parser.parse_args()
    device = jax.devices()[0]
    report: dict = {
        "platform": device.platform,
        "device_kind": device.device_kind,
        "devices": jax.device_count(),
        "jax": jax.__version__,
        "mesh_batch_axes": list(sharding.batch_axes(sharding.make_mesh({"fsdp": -1}))),
    }
    started = time.perf_counter()
    with tempfile.TemporaryDirectory() as tmp:
        for name, check in (
            ("opd_step", check_opd_step),
            ("sampler", check_sampler),
            ("rollouts", check_rollouts),
            ("training", check_training),
        ):
            t = time.perf_counter()
            try:
                report[name] = check(tmp, args)
            except Exception as e:  # the report names the failure; the other checks still run
                report[name] = {"error": f"{type(e).__name__}: {e}"}
            print(f"{name}: {time.perf_counter() - t:.1f} s", file=sys.stderr, flush=True)
    report["seconds"] = time.perf_counter() - started
    report["ok"] = not any("error" in v for v in report.values() if isinstance(v, dict))
    os.makedirs(os.path.dirname(os.path.abspath(args.out)), exist_ok=True)
    with open(args.out, "w", encoding="utf-8") as f:
        json.dump(report, f, indent=2)
    print(json.dumps(report))
    sys.exit(0 if report["ok"] else 1)


if __name__ == "__main__":
    main()
