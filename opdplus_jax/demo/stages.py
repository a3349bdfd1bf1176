"""The demo's cached stages: data (tokenizer, clean and sloppy addition), SFT-built models.

Each stage writes its outputs into its own folder and, last, a `demo_stage.json` recording the
settings it was built with (its key, which includes its parent stage's key). A stage is reused
when that file exists with the same key, and rebuilt otherwise, so a changed setting rebuilds
exactly the stages that depend on it. The cache is three public functions, so that other
pipelines (the experiments) cache their own stages the same way:

    record = lookup_stage(folder, key)
    if record is None:
        start_stage(folder)  # an empty folder: no stale outputs of an older build
        ...  # write the stage's outputs into folder
        record = finish_stage(folder, key, seconds=...)
"""

from __future__ import annotations

import dataclasses
import json
import os
import random
import re
import shutil
import time
from typing import Any

import jax.numpy as jnp
from flax import nnx
from ml_collections import config_dict

from opdplus_jax import models, sft, tasks
from opdplus_jax.demo.report import evaluate_model
from opdplus_jax.tasks import tokenizer as task_tokenizer
from opdplus_jax.tokenizer import Tokenizer

STAGE_FILE = "demo_stage.json"  # written last into a finished stage's folder
# Part of every data stage's key: bumped when the same settings generate other data, so that a
# cache built by an older version is rebuilt, never reused. 2: splits hash `Task.split_key`.
DATA_VERSION = 2
MODEL_NAMES = ("tokenizer", "base", "teacher", "small_base")


@dataclasses.dataclass(frozen=True)
class Settings:
    """Everything the demo builds before distilling (the distillation itself is the config)."""

    min_digits: int = 2
    max_digits: int = 2
    num_train: int = 5000
    num_test: int = 200
    sloppy_fraction: float = 0.6  # share of the base's SFT solutions that forget every carry
    # Base and teacher architecture (Qwen3-shaped; the tokenizer has 104 ids).
    hidden_size: int = 64
    num_layers: int = 2
    num_heads: int = 4
    num_kv_heads: int = 2
    # The strong_to_weak preset's smaller student.
    small_hidden_size: int = 32
    small_num_layers: int = 2
    # SFT (warm-up + cosine AdamW).
    seq_len: int = 48
    sft_batch_size: int = 64
    sft_learning_rate: float = 3e-3
    base_steps: int = 300
    teacher_steps: int = 150  # on top of the base's, clean solutions only
    small_base_steps: int = 600
    seed: int = 0  # the data (problems, sloppy mix) and, with model_seed, the models
    # Another build of the same models on the same data: initial weights and SFT batch order
    # (seed + stage offset + 1000 * model_seed). 0 is the demo's own build.
    model_seed: int = 0


def _log(msg: str) -> None:
    print(msg, flush=True)


# ------------------------------------------------------------------------------------ caching


def _json(obj: Any) -> Any:
    """`obj` as it reads back from JSON (tuples become lists), so that keys compare equal."""
    return json.loads(json.dumps(obj, sort_keys=True))


def lookup_stage(folder: str, key: dict[str, Any]) -> dict[str, Any] | None:
    """The record of the finished stage in `folder` if it was built with `key`, else None.

    Args:
      folder: the stage's output folder.
      key: JSON-serialisable settings the outputs depend on (include the parent stage's key, so
        that rebuilding a parent invalidates its children).

    Returns:
      The dict `finish_stage` wrote (`key` plus its record), or None when the folder holds no
      finished stage or one built with another key: the stage must be (re)built.
    """
    path = os.path.join(folder, STAGE_FILE)
    if not os.path.isfile(path):
        return None
    with open(path, encoding="utf-8") as f:
        info = json.load(f)
    return info if info.get("key") == _json(key) else None


def start_stage(folder: str) -> str:
    """Empties `folder` (creating it if needed) before a stage writes into it; returns it.

    Outputs of an older build never survive next to the new ones, and a stage interrupted after
    this call has no `STAGE_FILE`, so `lookup_stage` rebuilds it.
    """
    if os.path.isdir(folder):
        shutil.rmtree(folder)
    os.makedirs(folder)
    return folder


def finish_stage(folder: str, key: dict[str, Any], **record: Any) -> dict[str, Any]:
    """Marks the stage in `folder` finished: writes `STAGE_FILE` atomically, last.

    Args:
      folder: the stage's output folder, complete.
      key: the settings it was built with (as given to `lookup_stage`).
      **record: JSON-serialisable facts to keep with it (build time, evaluation, examples).

    Returns:
      `{"key": key, **record}` as `lookup_stage` will return it later.
    """
    info = _json({"key": key, **record})
    tmp = os.path.join(folder, STAGE_FILE + ".tmp")
    with open(tmp, "w", encoding="utf-8") as f:
        json.dump(info, f, indent=2, sort_keys=True)
    os.replace(tmp, os.path.join(folder, STAGE_FILE))
    return info


# --------------------------------------------------------------------------------------- data


def forgetful_solution(a: int, b: int) -> tuple[str, str]:
    """Worked solution and answer of a + b that forgets every carry (``78+54`` -> ``22``)."""
    da, db = str(a)[::-1], str(b)[::-1]
    lines, digits = [], []
    for i in range(max(len(da), len(db))):
        x = int(da[i]) if i < len(da) else 0
        y = int(db[i]) if i < len(db) else 0
        lines.append(f"{x}+{y}+0={x + y}")
        digits.append(str((x + y) % 10))
    answer = "".join(reversed(digits)).lstrip("0") or "0"
    return "\n".join([*lines, f"#### {answer}"]), answer


def sloppy_example(example: tasks.Example) -> tasks.Example:
    """An addition example with `forgetful_solution`'s worked solution and answer.

    The base model's SFT data mixes these with clean examples, so that it learns the format
    and how to carry, but often does not carry.
    """
    a, b = map(int, re.fullmatch(r"What is (\d+) \+ (\d+)\?", example.prompt).groups())
    solution, answer = forgetful_solution(a, b)
    return dataclasses.replace(example, solution=solution, answer=answer)


def build_data(cache_dir: str, s: Settings) -> dict[str, Any]:
    """Tokenizer folder; clean train/test JSONL; the base's SFT mix with sloppy solutions."""
    folder = os.path.join(cache_dir, "data")
    tok_dir = os.path.join(cache_dir, "models", "tokenizer")
    key = {
        k: getattr(s, k)
        for k in ("min_digits", "max_digits", "num_train", "num_test", "sloppy_fraction", "seed")
    }
    key["data_version"] = DATA_VERSION
    info = lookup_stage(folder, key)
    if info is not None and os.path.isfile(os.path.join(tok_dir, "tokenizer.json")):
        return {**info, "cached": True}
    start = time.perf_counter()
    start_stage(folder)
    task_tokenizer.save_tokenizer(tok_dir)
    task = tasks.get("addition", min_digits=s.min_digits, max_digits=s.max_digits)
    train = task.generate("train", s.num_train, seed=s.seed)
    rng = random.Random(s.seed)
    mix = [sloppy_example(ex) if rng.random() < s.sloppy_fraction else ex for ex in train]
    tasks.write_jsonl(train, os.path.join(folder, "train.jsonl"))
    tasks.write_jsonl(mix, os.path.join(folder, "base_sft.jsonl"))
    tasks.write_jsonl(task.generate("test", s.num_test, seed=s.seed), f"{folder}/test.jsonl")
    example = next(ex for ex in train if sloppy_example(ex).answer != ex.answer)
    info = finish_stage(
        folder,
        key,
        seconds=time.perf_counter() - start,
        example={"prompt": example.prompt, "clean": example.solution},
        sloppy=sloppy_example(example).solution,
    )
    return {**info, "cached": False}


# ------------------------------------------------------------------------------------- models


def model_config(s: Settings, small: bool = False) -> models.ModelConfig:
    return models.qwen3_config(
        vocab_size=len(task_tokenizer.vocab()),
        hidden_size=s.small_hidden_size if small else s.hidden_size,
        num_layers=s.small_num_layers if small else s.num_layers,
        num_heads=s.num_heads,
        num_kv_heads=s.num_kv_heads,
        bos_token_id=2,
        eos_token_id=3,
        pad_token_id=0,
        max_position_embeddings=256,
    )


@dataclasses.dataclass(frozen=True)
class ModelStage:
    name: str
    data_file: str  # under <cache>/data
    steps: int
    init: str | None = None  # a model stage's name, or None for random weights
    small: bool = False
    seed_offset: int = 0


def build_model(
    stage: ModelStage,
    cache_dir: str,
    s: Settings,
    config: config_dict.ConfigDict,
    parent_key: dict[str, Any],
) -> dict[str, Any]:
    """One SFT stage into `<cache>/models/<name>`, evaluated greedily on the held-out problems."""
    folder = os.path.join(cache_dir, "models", stage.name)
    key = {
        "parent": parent_key,
        "stage": dataclasses.asdict(stage),
        "arch": dataclasses.asdict(model_config(s, stage.small)),
        "sft": [s.sft_batch_size, s.seq_len, s.sft_learning_rate, s.seed, s.model_seed],
        "eval": [
            config.eval.num_prompts,
            config.eval.max_new_tokens,
            config.rollout.max_prompt_len,
        ],
    }
    info = lookup_stage(folder, key)
    if info is not None:
        _log(f"[{stage.name}] cached: accuracy {info['eval']['accuracy']:.3f} ({folder})")
        return {**info, "cached": True}
    init = os.path.join(cache_dir, "models", stage.init) if stage.init else None
    _log(
        f"[{stage.name}] SFT {stage.steps} steps on {stage.data_file} from "
        f"{init or 'random weights'}"
    )
    start = time.perf_counter()
    seed = s.seed + stage.seed_offset + 1000 * s.model_seed
    tok = Tokenizer.from_pretrained(os.path.join(cache_dir, "models", "tokenizer"))
    if init is None:
        cfg = model_config(s, stage.small)
        rngs = nnx.Rngs(seed)
        model = models.CausalLM(cfg, dtype=jnp.float32, param_dtype=jnp.float32, rngs=rngs)
    else:
        model = models.from_pretrained(init, dtype=jnp.float32)
    model = sft.train_sft(
        model,
        tok,
        os.path.join(cache_dir, "data", stage.data_file),
        steps=stage.steps,
        batch_size=s.sft_batch_size,
        seq_len=s.seq_len,
        learning_rate=s.sft_learning_rate,
        seed=seed,
        log_every=max(stage.steps // 4, 1),
    )
    sft.save(model, tok, start_stage(folder))
    seconds = time.perf_counter() - start
    result = evaluate_model(model, tok, config)
    _log(f"[{stage.name}] held-out accuracy {result['accuracy']:.3f} ({seconds:.0f} s of SFT)")
    return {**finish_stage(folder, key, seconds=seconds, eval=result), "cached": False}
