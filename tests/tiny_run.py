"""A tiny distillation run for the trainer and reliability tests: random Qwen3-shaped models,
the character tokenizer and a `reverse` task, with the config and command line that train them.

    root = tiny_run.build_assets(tmp_path)
    trainer.train_and_evaluate(tiny_run.config(root, **{"train.num_steps": 2}), workdir)
    subprocess.run(tiny_run.cli_args(root, workdir, "--config.train.num_steps=6"), ...)
"""

from __future__ import annotations

import os
import pathlib
import sys

from opdplus_jax import configs, models, tasks
from opdplus_jax.configs import default
from opdplus_jax.tasks import tokenizer as task_tokenizer

VOCAB = 112  # >= the task tokenizer's 104 ids (the rest is embedding padding)
REPO = pathlib.Path(__file__).resolve().parent.parent

# The run's settings, as dotted config fields (also passed as --config.<field>=<value> flags).
SETTINGS = {
    "data.batch_size": 4,
    "rollout.num_samples": 2,
    "rollout.max_new_tokens": 8,
    "rollout.max_prompt_len": 32,
    "optimizer.learning_rate": 1e-2,
    "optimizer.schedule": "constant",
    "train.num_steps": 4,
    "train.eval_every": 0,
    "train.checkpoint_every": 2,
    "train.export_final": False,
    "eval.num_prompts": 8,
    "eval.num_samples": 2,
    "eval.temperature": 1.0,  # KL(student || teacher) needs the student's own samples
    "eval.max_new_tokens": 8,
    "eval.batch_size": 16,
}


def model_config(**kw) -> models.ModelConfig:
    base = {"vocab_size": VOCAB, "hidden_size": 32, "num_layers": 2, "num_heads": 2}
    base.update({"num_kv_heads": 1, **kw})
    return models.qwen3_config(bos_token_id=2, eos_token_id=3, pad_token_id=0, **base)


def build_assets(root: pathlib.Path) -> pathlib.Path:
    """Tokenizer, student, teacher, teacher2 and train/test JSONL under `root`."""
    task_tokenizer.save_tokenizer(root / "tokenizer")
    # The teacher is the student's network with a 2x sharper output layer: a target the student
    # can reach, so a few steps must close most of the gap. teacher2 is an unrelated network.
    models.random_checkpoint(root / "student", model_config(), seed=0, output_scale=10.0)
    models.random_checkpoint(root / "teacher", model_config(), seed=0, output_scale=20.0)
    models.random_checkpoint(root / "teacher2", model_config(), seed=2, output_scale=20.0)
    task = tasks.get("reverse", max_len=4)
    tasks.write_jsonl(task.generate("train", 64, seed=0), root / "train.jsonl")
    tasks.write_jsonl(task.generate("test", 8, seed=0), root / "test.jsonl")
    return root


def paths(root: pathlib.Path) -> dict[str, str]:
    return {
        "student.path": str(root / "student"),
        "tokenizer_path": str(root / "tokenizer"),
        "teachers.default.path": str(root / "teacher"),
        "data.train_path": str(root / "train.jsonl"),
        "data.eval_path": str(root / "test.jsonl"),
    }


def config(root: pathlib.Path, **overrides):
    """The `cpu` preset pointed at the assets, with SETTINGS and `overrides` (dotted fields)."""
    c = default.get_config("cpu")
    configs.apply_overrides(c, {**paths(root), **SETTINGS, **overrides})
    return c


def cli_args(root: pathlib.Path, workdir: pathlib.Path, *flags: str, mode: str = "train"):
    """`python -m opdplus_jax.main <mode>` with the assets and SETTINGS, plus `flags`; run it
    with cwd=REPO."""
    settings = {**paths(root), **SETTINGS, "mesh.fsdp": 1}
    return [
        sys.executable,
        "-m",
        "opdplus_jax.main",
        mode,
        "--config=configs/default.py:cpu",
        f"--workdir={workdir}",
        *(f"--config.{k}={v}" for k, v in settings.items()),
        *flags,
    ]


def cli_env() -> dict[str, str]:
    return {**os.environ, "JAX_PLATFORMS": "cpu"}
