"""Shared machinery of the experiment scripts: CLI, one distillation run, aggregation, writers.

Every experiment is a list of `Variant`s (a label, dotted config overrides, descriptive columns)
run for several seeds through `trainer.train_and_evaluate`, all in one process so that JAX
compilations are reused across runs. Each run starts from the demo's cached base model and is
distilled from the demo's cached teacher (`demo.build_data` / `demo.build_model` in
`--cache_dir`); a seed changes the prompt order and every rollout, never the initial weights.

Per run (one row of `runs.csv`): greedy held-out accuracy and KL(student || teacher) per token on
the student's own temperature-1 samples (`demo.evaluate_model`), the means of the last
`TRAIN_TAIL` training steps' metrics (`train_*`), and the wall time. The accuracy curve of every
run goes to `curves.csv`; `summary.csv` and `results.md` hold mean ± std over seeds (sample std,
ddof = 1). Rows already in `runs.csv` with the same run key are reused, so an interrupted
experiment resumes where it stopped.
"""

from __future__ import annotations

import argparse
import dataclasses
import hashlib
import json
import logging
import math
import os
import shutil
import time
from collections.abc import Callable, Sequence
from typing import Any

import jax
import numpy as np

from experiments.outputs import (
    aggregate,
    plot_bars,
    plot_curves,
    read_csv,
    summary_table,
    write_csv,
)
from opdplus_jax import demo, metrics, models, sharding, trainer
from opdplus_jax.tokenizer import Tokenizer

TRAIN_TAIL = 5  # final train metrics: mean over this many last steps
TRAIN_KEYS = ("loss", "kl_per_token", "accuracy", "advantage_abs_mean", "grad_norm",
              "time/update")  # fmt: skip
RUN_METRICS = ("accuracy", "kl_per_token", *(f"train_{k}" for k in TRAIN_KEYS), "seconds")

# --quick: tiny settings, also those of tests/test_demo.py (seconds per run, numbers
# meaningless). small_hidden_size = hidden_size: the small base shares the base's compilations.
QUICK_SETTINGS = demo.Settings(
    num_train=48, num_test=6, hidden_size=32, num_layers=1, num_heads=2, num_kv_heads=1,
    small_hidden_size=32, small_num_layers=1, sft_batch_size=8, base_steps=2, teacher_steps=3,
)  # fmt: skip
QUICK_OVERRIDES = {
    "train.num_steps": 2,
    "train.eval_every": 1,
    "data.batch_size": 2,
    "rollout.num_samples": 2,
    "rollout.max_new_tokens": 8,
    "eval.num_prompts": 6,
    "eval.batch_size": 8,
    "eval.max_new_tokens": 8,
}
QUICK_SEEDS = 2
# The settings every experiment's runs were made with, pinned here so that later changes to the
# cpu preset do not silently change what an experiment measures (estimator and divergence are
# each experiment's own overrides).
PINNED = {
    "optimizer.learning_rate": 1e-3,
    "optimizer.schedule": "constant",
    "optimizer.warmup_steps": 5,
    "rollout.num_samples": 4,
    "rollout.temperature": 1.0,
    "estimator.baseline": None,
    "loss.aggregation": "seq_mean_token_sum_norm",
}


def _log(msg: str) -> None:
    print(msg, flush=True)


@dataclasses.dataclass(frozen=True)
class Variant:
    """One configuration of an experiment: a row label, config overrides, table columns."""

    label: str
    overrides: dict[str, Any]
    columns: dict[str, Any] = dataclasses.field(default_factory=dict)


# ---------------------------------------------------------------------------------------- CLI


def parse_args(name: str, description: str, argv: Sequence[str] | None = None):
    """--quick, --seeds, --out, --cache_dir, --workdir, --steps, --set; defaults depend on --quick.

    `--set KEY=VALUE` (repeatable) overrides a config field in every run, e.g.
    `--set estimator.baseline=loo`; the experiment's name (and so its default results and run
    folders) gets a suffix naming the overrides, e.g. `divergences_baseline-loo`, so that such a
    variant never mixes with (or resumes from) the plain experiment's runs."""
    p = argparse.ArgumentParser(description=description)
    p.add_argument("--quick", action="store_true", help="tiny settings (about a minute)")
    p.add_argument("--seeds", type=int, default=None, help="number of seeds (3; quick: 2)")
    p.add_argument("--out", default=None, help="results folder (default experiments/results/"
                   f"{name}; quick: runs/experiments/quick/{name})")  # fmt: skip
    p.add_argument("--cache_dir", default=None, help="cached data and models (shared; default "
                   "runs/experiments/cache, quick: runs/experiments/quick/cache)")  # fmt: skip
    p.add_argument("--workdir", default=None, help="run folders (default: <cache_dir>/../work)")
    p.add_argument("--steps", type=int, default=None, help="override train.num_steps")
    p.add_argument("--set", action="append", default=[], metavar="KEY=VALUE",
                   help="config override in every run, e.g. estimator.baseline=loo")  # fmt: skip
    args = p.parse_args(argv)
    root = os.path.join("runs", "experiments", "quick" if args.quick else "")
    args.overrides = {}
    for item in args.set:
        key, sep, value = item.partition("=")
        if not sep or not key:
            p.error(f"--set expects KEY=VALUE, got {item!r}")
        try:
            args.overrides[key] = json.loads(value)
        except ValueError:
            args.overrides[key] = value  # a bare string, e.g. estimator.baseline=loo
    try:
        demo.distill_config("cpu", "cache", args.overrides)  # misspelt or mistyped: fail now
    except ValueError as e:
        p.error(str(e))
    suffix = "".join(f"_{k.rsplit('.', 1)[-1]}-{v}" for k, v in args.overrides.items())
    name = name + suffix
    args.name = name
    args.seeds = args.seeds if args.seeds is not None else (QUICK_SEEDS if args.quick else 3)
    if args.seeds < 1:
        p.error(f"--seeds must be >= 1, got {args.seeds}")
    if args.steps is not None and args.steps < 1:
        p.error(f"--steps must be >= 1, got {args.steps}")
    args.out = args.out or (
        os.path.join(root, name) if args.quick else os.path.join("experiments", "results", name)
    )
    args.cache_dir = args.cache_dir or os.path.join(root, "cache")
    args.workdir = args.workdir or os.path.join(os.path.dirname(args.cache_dir.rstrip("/")),
                                                "work", name)  # fmt: skip
    return args


def scale(args, full_overrides: dict[str, Any]) -> tuple[demo.Settings, dict[str, Any]]:
    """(demo Settings, base config overrides) of this invocation: quick or full, plus --steps."""
    settings = QUICK_SETTINGS if args.quick else demo.Settings()
    overrides = {**PINNED, **(QUICK_OVERRIDES if args.quick else full_overrides), **args.overrides}
    if args.steps is not None:
        overrides["train.num_steps"] = args.steps
    n = overrides.get("train.num_steps", 60)
    overrides["train.checkpoint_every"] = n  # only the final checkpoint (no mid-run saves)
    overrides.setdefault("train.eval_every", max(n // 6, 1))
    return settings, overrides


def setup(args) -> None:
    """Process set-up of an experiment: quiet trainer logging, and JAX's persistent compilation
    cache in `<cache_dir>/jax_cache`, so that separate processes on the same cache (the scripts,
    reruns, the quick test) load identical computations from disk instead of recompiling."""
    jax.config.update("jax_compilation_cache_dir", os.path.join(args.cache_dir, "jax_cache"))
    setup_logging()


def setup_logging() -> None:
    """The trainer's eval lines on stderr, without its per-step progress chatter."""
    log = logging.getLogger("opdplus_jax.trainer")
    if not log.handlers:
        handler = logging.StreamHandler()
        handler.setFormatter(logging.Formatter("    %(message)s"))
        log.addHandler(handler)
    log.setLevel(logging.WARNING)
    log.propagate = False


def single_device_mesh() -> jax.sharding.Mesh:
    return sharding.make_mesh({"fsdp": 1}, jax.devices()[:1])


# ------------------------------------------------------------------------------ demo models


def demo_models(cache_dir: str, settings: demo.Settings, overrides: dict[str, Any]) -> dict:
    """The demo's data, base and teacher in `cache_dir` (built once, then cached)."""
    config = demo.distill_config("cpu", cache_dir, overrides)
    data_info = demo.build_data(cache_dir, settings)
    base = demo.ModelStage("base", "base_sft.jsonl", settings.base_steps)
    teacher = demo.ModelStage("teacher", "train.jsonl", settings.teacher_steps, init="base",
                              seed_offset=1)  # fmt: skip
    base_info = demo.build_model(base, cache_dir, settings, config, data_info["key"])
    teacher_info = demo.build_model(teacher, cache_dir, settings, config, base_info["key"])
    return {"base": base_info, "teacher": teacher_info}


def reference_rows(config, teacher_path: str, policies: dict[str, str]) -> list[dict]:
    """Accuracy on `config`'s eval set and KL to the teacher of fixed checkpoints {label: path}
    (e.g. base and teacher), as `run_one` measures the students."""
    tok = Tokenizer.from_pretrained(config.tokenizer_path)
    teacher = models.from_pretrained(teacher_path)
    rows = []
    for label, path in policies.items():
        out = demo.evaluate_model(models.from_pretrained(path), tok, config, teacher)
        rows.append({"label": label, "accuracy": out["accuracy"], "kl_per_token":
                     out["kl_per_token"]})  # fmt: skip
    return rows


# ---------------------------------------------------------------------------------------- runs


def _run_key(config) -> str:
    text = json.dumps(json.loads(config.to_json_best_effort()), sort_keys=True)
    return "k" + hashlib.sha256(text.encode()).hexdigest()[:16]  # "k": never parsed as a number


def train_tail(workdir: str) -> dict[str, float]:
    """Means of the last `TRAIN_TAIL` train steps' metrics (`train_<key>`)."""
    rows = metrics.read_jsonl(workdir, split="train")[-TRAIN_TAIL:]
    out = {}
    for k in TRAIN_KEYS:
        vals = [r[k] for r in rows if r.get(k) is not None]
        out[f"train_{k}"] = float(np.mean(vals)) if vals else math.nan
    return out


def run_one(config, workdir: str, mesh, kl_teacher: dict[str, str], eval_sets: dict[str, str]):
    """One distillation from scratch in `workdir`; returns (metrics row, accuracy curve).

    `kl_teacher`: eval-set name -> teacher folder for its KL; `eval_sets`: eval-set name ->
    held-out file ("" = the config's eval set, columns `accuracy`/`kl_per_token`; others get
    `<name>_accuracy`/`<name>_kl_per_token`)."""
    shutil.rmtree(workdir, ignore_errors=True)
    start = time.perf_counter()
    trainer.train_and_evaluate(config, workdir, mesh=mesh)
    seconds = time.perf_counter() - start
    tok = Tokenizer.from_pretrained(config.tokenizer_path)
    student = models.from_pretrained(os.path.join(workdir, "export"))
    row: dict[str, Any] = {}
    for name, path in eval_sets.items():
        cfg = config.copy_and_resolve_references()
        if path:
            cfg.data.eval_path = path
        teacher = models.from_pretrained(kl_teacher[name])
        out = demo.evaluate_model(student, tok, cfg, teacher)
        prefix = f"{name}_" if name else ""
        row[prefix + "accuracy"] = out["accuracy"]
        row[prefix + "kl_per_token"] = out["kl_per_token"]
    row.update(train_tail(workdir))
    row["seconds"] = seconds
    curve = [
        {"step": r["step"], **{k: v for k, v in r.items() if k == "accuracy" or "mean_score" in k}}
        for r in metrics.read_jsonl(workdir, split="eval")
    ]
    for sub in ("checkpoints", "export"):  # keep metrics.jsonl only
        shutil.rmtree(os.path.join(workdir, sub), ignore_errors=True)
    return row, curve


def run_grid(
    args,
    variants: Sequence[Variant],
    make_config: Callable[[dict[str, Any], int], Any],
    *,
    kl_teacher: dict[str, str],
    eval_sets: dict[str, str] | None = None,
    mesh=None,
) -> tuple[list[dict], list[dict]]:
    """Every variant × seed (seeds 0..args.seeds-1); returns (runs rows, curve rows).

    `make_config(overrides, seed)` -> locked trainer config. Results are appended to
    `<out>/runs.csv` and `<out>/curves.csv` after each run; rows with the same run key are
    reused (resume)."""
    labels = [v.label for v in variants]
    if len(set(labels)) != len(labels):
        raise ValueError(f"variant labels must be unique, got {labels}")
    eval_sets = eval_sets if eval_sets is not None else {"": ""}
    mesh = mesh or single_device_mesh()
    runs_path, curves_path = (os.path.join(args.out, f) for f in ("runs.csv", "curves.csv"))
    old_runs, old_curves = read_csv(runs_path), read_csv(curves_path)
    runs, curves = [], []
    total = len(variants) * args.seeds
    for i, v in enumerate(variants):
        for seed in range(args.seeds):
            config = make_config(v.overrides, seed)
            key = _run_key(config)
            done = [r for r in old_runs if r.get("run_key") == key]
            if done:
                runs.append(done[0])
                curves += [c for c in old_curves if c.get("run_key") == key]
                _log(f"[{args.name}] {v.label} seed {seed}: reused from {runs_path}")
                continue
            n = i * args.seeds + seed + 1
            _log(f"[{args.name}] run {n}/{total}: {v.label} seed {seed}")
            workdir = os.path.join(args.workdir, v.label.replace(" ", "_"), f"seed{seed}")
            row, curve = run_one(config, workdir, mesh, kl_teacher, eval_sets)
            ident = {"label": v.label, **v.columns, "seed": seed, "run_key": key}
            runs.append({**ident, **row})
            curves += [{**ident, **c} for c in curve]
            shown = [
                f"{k} {v:.4g}"
                for k, v in row.items()
                if k.endswith(("accuracy", "kl_per_token")) and not k.startswith("train_")
            ]
            _log(f"    {', '.join(shown)}, {row['seconds']:.0f} s")
            write_csv(runs_path, runs)
            write_csv(curves_path, curves)
        # A variant's programs are not reused by the next one: free them (each compiled program
        # holds memory mappings, and a long grid would otherwise pass the kernel's limit).
        jax.clear_caches()
    write_csv(runs_path, runs)
    write_csv(curves_path, curves)
    return runs, curves


# ------------------------------------------------------------------------- the standard flow

METRIC_COLUMNS = (
    ("accuracy", "held-out acc.", 3),
    ("kl_per_token", "KL(student‖teacher)/tok", 4),
    ("train_kl_per_token", "train KL/tok (last 5)", 4),
    ("train_accuracy", "train rollout acc. (last 5)", 3),
)


def run_meta(args, description: str, settings, overrides: dict, t0: float, built: dict) -> dict:
    """meta.json of an experiment: what ran (settings, overrides, seeds), wall time, machine load
    and how its models were obtained (`built`: per model stage, cached or not and a figure)."""
    return {
        "description": description,
        "settings": dataclasses.asdict(settings),
        "overrides": overrides,
        "seeds": args.seeds,
        "quick": args.quick,
        "wall_seconds": time.perf_counter() - t0,
        "load_average": list(os.getloadavg()),
        "built": built,
    }


def demo_experiment(
    args,
    variants: Sequence[Variant],
    full_overrides: dict[str, Any],
    columns: Sequence[str],
    description: str,
) -> dict[str, Any]:
    """The single-teacher flow on the demo's models: build/reuse base and teacher, evaluate
    them, run every variant × seed, aggregate, write runs/curves/summary CSVs, results.md, the
    accuracy-curve and bar plots. Returns everything for experiment-specific plots."""
    setup(args)
    t0 = time.perf_counter()
    settings, base_overrides = scale(args, full_overrides)
    built = demo_models(args.cache_dir, settings, base_overrides)
    make = lambda overrides, seed: demo.distill_config(
        "cpu", args.cache_dir, {**base_overrides, **overrides, "seed": seed}
    )
    config = make({}, 0)
    teacher_path = config.teachers.default.path
    refs = reference_rows(config, teacher_path,
                          {"base": config.student.path, "teacher": teacher_path})  # fmt: skip
    runs, curves = run_grid(args, variants, make, kl_teacher={"": teacher_path})
    summary = aggregate(runs, ["label", *columns], RUN_METRICS)
    os.makedirs(args.out, exist_ok=True)
    write_csv(os.path.join(args.out, "summary.csv"), summary)
    write_csv(os.path.join(args.out, "references.csv"), refs)
    ref_acc = {r["label"]: r["accuracy"] for r in refs}
    plot_curves(os.path.join(args.out, "accuracy_curves.png"), curves, refs=ref_acc,
                title=f"{args.name}: held-out accuracy (mean ± std over seeds)")  # fmt: skip
    plot_bars(os.path.join(args.out, "final.png"), summary, lambda s: s["label"],
              [("accuracy", "held-out accuracy"), ("kl_per_token", "KL(student‖teacher)/token")],
              refs={r["label"]: r for r in refs}, title=args.name)  # fmt: skip
    table = summary_table(summary, ["label", *columns], METRIC_COLUMNS, refs)
    built_info = {k: {"cached": v["cached"], "accuracy": v["eval"]["accuracy"]}
                  for k, v in built.items()}  # fmt: skip
    meta = run_meta(args, description, settings, base_overrides, t0, built_info)
    return {"runs": runs, "curves": curves, "summary": summary, "refs": refs, "table": table,
            "meta": meta}  # fmt: skip
