"""The demo's driver: `run` (every stage, then distil and report) and the command line."""

from __future__ import annotations

import argparse
import dataclasses
import json
import logging
import os
import shutil
import time
from typing import Any

import jax
from ml_collections import config_dict

from opdplus_jax import configs, metrics, models, trainer
from opdplus_jax.configs import default
from opdplus_jax.demo.report import evaluate_model, format_table, write_plots
from opdplus_jax.demo.stages import (
    MODEL_NAMES,
    ModelStage,
    Settings,
    build_data,
    build_model,
)
from opdplus_jax.tokenizer import Tokenizer

RUN_OUTPUTS = ("checkpoints", "metrics.jsonl", "tensorboard", "export")
DEMO_MARKER = "demo_run.json"  # marks a workdir whose run outputs the demo wrote
PRESETS = ("cpu", "strong_to_weak")
# `run(until=...)`: the last stage to run; each includes the ones before it.
UNTIL = ("data", "models", "report")


def _log(msg: str) -> None:
    print(msg, flush=True)


# ------------------------------------------------------------------------------------ configs


def preset_config(preset: str) -> config_dict.ConfigDict:
    """The locked `preset` of `opdplus_jax.configs.default` (any preset, not only PRESETS)."""
    return default.get_config(preset)


def distill_config(
    preset: str, cache_dir: str, overrides: dict[str, Any] | None = None
) -> config_dict.ConfigDict:
    """The preset's config with every path pointed into `cache_dir`, plus dotted overrides."""
    if preset not in PRESETS:
        raise ValueError(f"unknown demo preset {preset!r}; valid: {', '.join(PRESETS)}")
    c = preset_config(preset).unlock()
    m = os.path.join(cache_dir, "models")
    c.student.path = os.path.join(m, "small_base" if preset == "strong_to_weak" else "base")
    c.tokenizer_path = os.path.join(m, "tokenizer")
    c.teachers.default.path = os.path.join(m, "teacher")
    c.data.train_path = os.path.join(cache_dir, "data", "train.jsonl")
    c.data.eval_path = os.path.join(cache_dir, "data", "test.jsonl")
    c.train.export_final = True
    c.lock()
    configs.apply_overrides(c, overrides or {})
    return c


# ---------------------------------------------------------------------------------------- run


def clear_run(workdir: str, *, overwrite: bool = False) -> None:
    """Removes the previous distillation's outputs (RUN_OUTPUTS) from `workdir`: the demo
    re-runs it from scratch every time. Outputs the demo did not write (no `DEMO_MARKER`, e.g.
    an `opdplus-train` run) are only removed with `overwrite`; otherwise FileExistsError.
    Writes the marker last, so the next demo run may replace this one."""
    found = [n for n in RUN_OUTPUTS if os.path.exists(os.path.join(workdir, n))]
    marker = os.path.join(workdir, DEMO_MARKER)
    if found and not os.path.isfile(marker) and not overwrite:
        raise FileExistsError(
            f"{workdir} holds a training run the demo did not write ({', '.join(found)}); "
            "pass another --workdir, or --overwrite to delete it"
        )
    for name in found:
        path = os.path.join(workdir, name)
        _log(f"[distill] removing the previous run's {path}")
        if os.path.isdir(path) and not os.path.islink(path):
            shutil.rmtree(path)
        else:
            os.remove(path)
    with open(marker, "w", encoding="utf-8") as f:
        json.dump({"written_by": "python -m opdplus_jax.demo"}, f)


def run(
    workdir: str,
    *,
    preset: str = "cpu",
    cache_dir: str | None = None,
    settings: Settings | None = None,
    overrides: dict[str, Any] | None = None,
    mesh: jax.sharding.Mesh | None = None,
    until: str = "report",
    overwrite: bool = False,
) -> dict[str, Any]:
    """Runs the stages (see the package docstring) up to `until`.

    Args:
      workdir: the distillation's run folder (and the cache's, by default).
      preset: one of PRESETS.
      cache_dir: where the data and model stages are cached (default: `workdir`).
      settings: what the stages build (default: `Settings()`).
      overrides: dotted config fields, e.g. {"train.num_steps": 20}.
      mesh: the distillation's mesh (default: `config.mesh` over all devices).
      until: the last stage to run, one of UNTIL: "data" (tokenizer and JSONL files), "models"
        (also every SFT model of the preset) or "report" (also the distillation and report).
      overwrite: replace run outputs in `workdir` that the demo did not write (see `clear_run`).

    Returns:
      With until="report", the summary written to summary.json. Otherwise `{"preset",
      "stages": {name: stage record}, "seconds", "cached"}`; no distillation, no summary.
    """
    if until not in UNTIL:
        raise ValueError(f"unknown stage {until!r}; valid: {', '.join(UNTIL)}")
    t0 = time.perf_counter()
    cache_dir = cache_dir or workdir
    os.makedirs(workdir, exist_ok=True)
    config = distill_config(preset, cache_dir, overrides)
    s = settings or Settings()
    seconds, built, cached = {}, {}, []

    def timed(name, fn, *args):
        start = time.perf_counter()
        info = fn(*args)
        seconds[name] = time.perf_counter() - start
        built[name] = info["seconds"]
        if info["cached"]:
            cached.append(name)
        return info

    info = timed("data", build_data, cache_dir, s)
    ex = info["example"]
    _log(f"[data] 2-digit addition, e.g. {ex['prompt']!r}")
    _log(f"         clean: {ex['clean']!r}\n        sloppy: {info['sloppy']!r}")
    if until == "data":
        return {"preset": preset, "stages": {"data": info}, "seconds": seconds, "cached": cached}
    stages = [
        ModelStage("base", "base_sft.jsonl", s.base_steps),
        ModelStage("teacher", "train.jsonl", s.teacher_steps, init="base", seed_offset=1),
    ]
    if preset == "strong_to_weak":
        stages.append(ModelStage("small_base", "base_sft.jsonl", s.small_base_steps, small=True,
                                 seed_offset=2))  # fmt: skip
    keys, results = {"data": info["key"]}, {}
    for st in stages:
        parent = keys[st.init or "data"]
        results[st.name] = timed(st.name, build_model, st, cache_dir, s, config, parent)
        keys[st.name] = results[st.name]["key"]
    if until == "models":
        records = {"data": info, **results}
        return {"preset": preset, "stages": records, "seconds": seconds, "cached": cached}

    student_name = "small_base" if preset == "strong_to_weak" else "base"
    _log(
        f"[distill] preset {preset}: student {student_name}, {config.train.num_steps} OPD steps "
        f"({config.estimator.correction}, {config.estimator.divergence}) -> {workdir}"
    )
    clear_run(workdir, overwrite=overwrite)
    start = time.perf_counter()
    final = trainer.train_and_evaluate(config, workdir, mesh=mesh)
    seconds["distill"] = time.perf_counter() - start

    start = time.perf_counter()
    tok = Tokenizer.from_pretrained(config.tokenizer_path)
    teacher = models.from_pretrained(config.teachers.default.path)
    base_eval = evaluate_model(models.from_pretrained(config.student.path), tok, config, teacher)
    student = models.from_pretrained(os.path.join(workdir, "export"))
    student_eval = evaluate_model(student, tok, config, teacher)
    summary = {
        "preset": preset,
        "num_eval_problems": student_eval["num_problems"],
        "accuracy": {
            "base": base_eval["accuracy"],
            "teacher": results["teacher"]["eval"]["accuracy"],
            "student": student_eval["accuracy"],
        },
        "kl_per_token": {
            "base": base_eval["kl_per_token"],
            "student": student_eval["kl_per_token"],
        },
        "eval_curve": [
            [r["step"], r["accuracy"]] for r in metrics.read_jsonl(workdir, split="eval")
        ],
        "trainer_final_eval": final,
        "seconds": seconds,
        "built_seconds": built,
        "cached": cached,
        "settings": dataclasses.asdict(s),
        "config": json.loads(config.to_json_best_effort()),
    }
    label = f"{config.estimator.correction}, {config.estimator.divergence}"
    paths = write_plots(workdir, summary["accuracy"]["base"], summary["accuracy"]["teacher"], label)
    seconds["report"] = time.perf_counter() - start
    seconds["total"] = time.perf_counter() - t0
    summary["load_average"] = list(os.getloadavg()) if hasattr(os, "getloadavg") else None
    summary["artefacts"] = [os.path.join(workdir, p) for p in ("summary.json", "export")] + paths
    with open(os.path.join(workdir, "summary.json"), "w", encoding="utf-8") as f:
        json.dump(summary, f, indent=2, sort_keys=True)
    _log("\n" + format_table(summary) + "\n")
    _log("wrote " + ", ".join(summary["artefacts"]))
    return summary


# ---------------------------------------------------------------------------------------- CLI


def _short_eval_lines(record: logging.LogRecord) -> bool:
    """Keeps the trainer's eval lines to step, greedy accuracy and response length."""
    message = record.getMessage()
    if message.startswith("eval step"):
        keep = ("eval step", "accuracy", "response_length")
        record.msg = " | ".join(p for p in message.split(" | ") if p.startswith(keep))
        record.args = None
    return True


def parse_args(argv: list[str] | None = None) -> dict[str, Any]:
    """Command-line flags -> keyword arguments of `run` (plus `fresh`)."""
    p = argparse.ArgumentParser(
        prog="python -m opdplus_jax.demo",
        description="The embedded default: on-policy distillation end to end on a CPU.",
    )
    p.add_argument("--workdir", default="runs/demo", help="run directory (and default cache)")
    p.add_argument("--cache_dir", default=None, help="models/data cache (default: workdir)")
    p.add_argument("--preset", default="cpu", choices=PRESETS)
    p.add_argument("--fresh", action="store_true", help="rebuild the cached data and models")
    p.add_argument(
        "--overwrite",
        action="store_true",
        help="replace a training run in --workdir that the demo did not write",
    )
    p.add_argument("--until", default="report", choices=UNTIL,
                   help="last stage to run: data, models, or report (everything)")  # fmt: skip
    kinds = {"int": int, "float": float}
    fields = [f for f in dataclasses.fields(Settings) if f.type in kinds]
    for f in fields:
        p.add_argument(f"--{f.name}", type=kinds[f.type], default=f.default, help=f"{f.default}")
    p.add_argument(
        "--set", action="append", default=[], metavar="KEY=VALUE",
        help="config override, e.g. --set train.num_steps=40 --set estimator.divergence=tv",
    )  # fmt: skip
    args = p.parse_args(argv)
    overrides = {}
    for item in args.set:
        key, sep, value = item.partition("=")
        if not sep:
            p.error(f"--set expects KEY=VALUE, got {item!r}")
        try:
            overrides[key] = json.loads(value)
        except ValueError:
            overrides[key] = value  # a bare string, e.g. estimator.divergence=tv
    try:  # a misspelt or mistyped field fails here, before any work
        distill_config(args.preset, args.cache_dir or args.workdir, overrides)
    except ValueError as e:
        p.error(str(e))
    return {
        "workdir": args.workdir,
        "preset": args.preset,
        "cache_dir": args.cache_dir or args.workdir,
        "settings": Settings(**{f.name: getattr(args, f.name) for f in fields}),
        "overrides": overrides,
        "until": args.until,
        "overwrite": args.overwrite,
        "fresh": args.fresh,
    }


def main(argv: list[str] | None = None) -> dict[str, Any]:
    kwargs = parse_args(argv)
    # transformers is used for tokenizers and configs only: its "PyTorch was not found" notice
    # is noise here.
    os.environ.setdefault("TRANSFORMERS_VERBOSITY", "error")
    handler = logging.StreamHandler()
    handler.setFormatter(logging.Formatter("  %(message)s"))
    handler.addFilter(_short_eval_lines)
    log = logging.getLogger("opdplus_jax.trainer")
    log.addHandler(handler)
    log.setLevel(logging.INFO)
    log.propagate = False
    if kwargs.pop("fresh"):
        for sub in ("data", *(os.path.join("models", m) for m in MODEL_NAMES)):
            shutil.rmtree(os.path.join(kwargs["cache_dir"], sub), ignore_errors=True)
    return run(**kwargs)
