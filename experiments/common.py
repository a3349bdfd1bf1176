"""Shared machinery of the experiment scripts: CLI, one distillation run, aggregation, writers.

Every experiment is a list of `Variant`s (a label, dotted config overrides, descriptive columns)
run for several seeds through `trainer.train_and_evaluate`, all in one process so that JAX
compilations are reused across runs. Each run starts from the demo's cached base model and is
distilled from the demo's cached teacher (`demo.build_data` / `demo.build_model` in
`--cache_dir`). Seed k distils build k of the base and teacher (`demo.Settings.model_seed` = k:
other initial weights and SFT batch order, the same data, in `<cache_dir>/build<k>`) with its
own prompt order and rollouts; `--one_build` keeps every seed on build 0, so that only the prompt
order and rollouts vary. Runs of different variants with the same seed share a build, so paired
differences compare like with like.

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
    mean_references,
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
    p.add_argument("--seeds", type=int, default=None, help="number of seeds (5; quick: 2)")
    p.add_argument("--out", default=None, help="results folder (default experiments/results/"
                   f"{name}; quick: runs/experiments/quick/{name})")  # fmt: skip
    p.add_argument("--cache_dir", default=None, help="cached data and models (shared; default "
                   "runs/experiments/cache, quick: runs/experiments/quick/cache)")  # fmt: skip
    p.add_argument("--workdir", default=None, help="run folders (default: <cache_dir>/../work)")
    p.add_argument("--steps", type=int, default=None, help="override train.num_steps")
    p.add_argument("--one_build", action="store_true", help="every seed distils build 0 of the "
                   "base and teacher (default: seed k distils build k)")  # fmt: skip
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
    args.seeds = args.seeds if args.seeds is not None else (QUICK_SEEDS if args.quick else 5)
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


def build_of(args, seed: int) -> int:
    """The base/teacher build that seed `seed` distils: `seed`, or 0 with --one_build."""
    return 0 if args.one_build else seed


def build_dir(args, build: int) -> str:
    """The cache folder of one build of the demo's data and models."""
    return os.path.join(args.cache_dir, f"build{build}")


def demo_models(
    cache_dir: str,
    settings: demo.Settings,
    overrides: dict[str, Any],
    extra: Sequence[demo.ModelStage] = (),
) -> dict:
    """The demo's data, base and teacher in `cache_dir` (built once, then cached), then each
    stage of `extra` in order (its `init`, if any, must be built before it)."""
    config = demo.distill_config("cpu", cache_dir, overrides)
    data_info = demo.build_data(cache_dir, settings)
    base = demo.ModelStage("base", "base_sft.jsonl", settings.base_steps)
    teacher = demo.ModelStage("teacher", "train.jsonl", settings.teacher_steps, init="base",
                              seed_offset=1)  # fmt: skip
    built = {"base": demo.build_model(base, cache_dir, settings, config, data_info["key"])}
    for stage in (teacher, *extra):
        parent = built[stage.init]["key"] if stage.init else data_info["key"]
        built[stage.name] = demo.build_model(stage, cache_dir, settings, config, parent)
    return built


def reference_rows(config, teacher_path: str, policies: dict[str, str], **columns) -> list[dict]:
    """Accuracy on `config`'s eval set and KL to the teacher of fixed checkpoints {label: path}
    (e.g. base and teacher), as `run_one` measures the students; `columns` (e.g. the build) are
    added to every row."""
    tok = Tokenizer.from_pretrained(config.tokenizer_path)
    teacher = models.from_pretrained(teacher_path)
    rows = []
    for label, path in policies.items():
        out = demo.evaluate_model(models.from_pretrained(path), tok, config, teacher)
        rows.append({"label": label, **columns, "accuracy": out["accuracy"], "kl_per_token":
                     out["kl_per_token"]})  # fmt: skip
    return rows


# ---------------------------------------------------------------------------------------- runs


def _stage_record(path) -> Any:
    """The build record (`demo.STAGE_FILE`'s key) of a model folder, None if it has none."""
    file = os.path.join(path, demo.STAGE_FILE) if isinstance(path, str) else ""
    if not os.path.isfile(file):
        return None
    with open(file, encoding="utf-8") as f:
        return json.load(f).get("key")


def run_key(config) -> str:
    """Hash of the full config and of how its models were built: a rebuilt base or teacher in
    the same folder (other data, other seed) is another run."""
    cfg = json.loads(config.to_json_best_effort())
    folders = [config.student.path]
    for t in config.teachers.values():
        folders += [t.path, t.reference]
    builds = [_stage_record(p) for p in folders]
    text = json.dumps({"config": cfg, "builds": builds}, sort_keys=True)
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
    kl_teacher: dict[str, str] | Callable[[int], dict[str, str]],
    eval_sets: dict[str, str] | None = None,
    mesh=None,
) -> tuple[list[dict], list[dict]]:
    """Every variant × seed (seeds 0..args.seeds-1); returns (runs rows, curve rows).

    `make_config(overrides, seed)` -> locked trainer config; `kl_teacher`: eval-set name ->
    teacher folder (see `run_one`), or a function of the seed returning it (one build per
    seed). Results are appended to
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
            key = run_key(config)
            done = [r for r in old_runs if r.get("run_key") == key]
            if done:
                runs.append(done[0])
                curves += [c for c in old_curves if c.get("run_key") == key]
                _log(f"[{args.name}] {v.label} seed {seed}: reused from {runs_path}")
                continue
            n = i * args.seeds + seed + 1
            _log(f"[{args.name}] run {n}/{total}: {v.label} seed {seed}")
            workdir = os.path.join(args.workdir, v.label.replace(" ", "_"), f"seed{seed}")
            teachers = kl_teacher(seed) if callable(kl_teacher) else kl_teacher
            row, curve = run_one(config, workdir, mesh, teachers, eval_sets)
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


def in_build(overrides: dict[str, Any], folder: str) -> dict[str, Any]:
    """`overrides` with "{models}" in string values replaced by the build's model folder, e.g.
    {"teachers.default.path": "{models}/weak_teacher"}."""
    models_dir = os.path.join(folder, "models")
    return {k: v.replace("{models}", models_dir) if isinstance(v, str) else v
            for k, v in overrides.items()}  # fmt: skip


def demo_experiment(
    args,
    variants: Sequence[Variant],
    full_overrides: dict[str, Any],
    columns: Sequence[str],
    description: str,
    *,
    extra: Sequence[demo.ModelStage] = (),
    references: Sequence[str] = ("base", "teacher"),
    teacher: str = "teacher",
    metric_columns: Sequence[tuple[str, str, int]] = (),
) -> dict[str, Any]:
    """The single-teacher flow on the demo's models: build/reuse each seed's base and teacher
    (and the `extra` stages), evaluate the `references` models of every build, run every
    variant × seed, aggregate, write runs/curves/summary/references CSVs, results.md, the
    accuracy-curve and bar plots. Returns everything for experiment-specific plots.

    `teacher`: the model stage KL is measured to (and the config's teacher unless a variant
    overrides it; variant overrides may name "{models}", see `in_build`); `metric_columns`:
    (key, title, digits) shown after the standard ones."""
    setup(args)
    t0 = time.perf_counter()
    settings, base_overrides = scale(args, full_overrides)
    base_overrides = {"teachers.default.path": "{models}/" + teacher, **base_overrides}
    builds = sorted({build_of(args, seed) for seed in range(args.seeds)})
    built_info, refs = {}, []
    for b in builds:
        folder = build_dir(args, b)
        _log(f"[{args.name}] build {b} of the base and teacher in {folder}")
        built = demo_models(folder, dataclasses.replace(settings, model_seed=b),
                            in_build(base_overrides, folder), extra)  # fmt: skip
        built_info[f"build{b}"] = {k: {"cached": v["cached"], "accuracy": v["eval"]["accuracy"]}
                                   for k, v in built.items()}  # fmt: skip
        config = demo.distill_config("cpu", folder, in_build(base_overrides, folder))
        paths = {name: os.path.join(folder, "models", name) for name in references}
        refs += reference_rows(config, os.path.join(folder, "models", teacher), paths, build=b)

    def make(overrides, seed):
        folder = build_dir(args, build_of(args, seed))
        return demo.distill_config(
            "cpu", folder, in_build({**base_overrides, **overrides, "seed": seed}, folder)
        )

    kl_teacher = lambda seed: {"": os.path.join(build_dir(args, build_of(args, seed)), "models",
                                                teacher)}  # fmt: skip
    runs, curves = run_grid(args, variants, make, kl_teacher=kl_teacher)
    summary = aggregate(runs, ["label", *columns], RUN_METRICS)
    os.makedirs(args.out, exist_ok=True)
    write_csv(os.path.join(args.out, "summary.csv"), summary)
    write_csv(os.path.join(args.out, "references.csv"), refs)
    mean_refs = mean_references(refs)
    plot_curves(os.path.join(args.out, "accuracy_curves.png"), curves,
                refs={r["label"]: r["accuracy"] for r in mean_refs},
                title=f"{args.name}: held-out accuracy (mean ± std over seeds)")  # fmt: skip
    plot_bars(os.path.join(args.out, "final.png"), summary, lambda s: s["label"],
              [("accuracy", "held-out accuracy"), ("kl_per_token", "KL(student‖teacher)/token")],
              refs={r["label"]: r for r in mean_refs}, title=args.name)  # fmt: skip
    table = summary_table(summary, ["label", *columns], (*METRIC_COLUMNS, *metric_columns),
                          mean_refs)  # fmt: skip
    meta = run_meta(args, description, settings, base_overrides, t0, built_info)
    meta["builds"] = builds
    return {"runs": runs, "curves": curves, "summary": summary, "refs": refs,
            "mean_refs": mean_refs, "table": table, "meta": meta}  # fmt: skip
