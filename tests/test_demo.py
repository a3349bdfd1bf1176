"""The demo pipeline end to end with tiny settings: artefacts, summary, caching, presets, CLI."""

import dataclasses
import json
import os
import re

import jax
import numpy as np
import pytest

from experiments.common import QUICK_OVERRIDES, QUICK_SETTINGS
from opdplus_jax import demo, metrics, models, sharding, tasks

# The experiments' --quick settings (seconds per run), with a short strong_to_weak small base.
TINY = dataclasses.replace(QUICK_SETTINGS, small_base_steps=2)
OVERRIDES = {**QUICK_OVERRIDES, "train.checkpoint_every": 2}


def _mesh():
    return sharding.make_mesh({"fsdp": 1}, jax.devices()[:1])


@pytest.fixture(scope="module")
def first_run(tmp_path_factory):
    workdir = str(tmp_path_factory.mktemp("demo") / "run")
    summary = demo.run(workdir, settings=TINY, overrides=OVERRIDES, mesh=_mesh())
    return workdir, summary


def test_writes_every_artefact(first_run):
    workdir, summary = first_run
    for name in ("summary.json", "metrics.jsonl", "accuracy_vs_step.png", "divergence_vs_step.png"):
        assert os.path.isfile(os.path.join(workdir, name)), name
    for name in ("tokenizer", "base", "teacher"):
        assert os.path.isfile(os.path.join(workdir, "models", name, "tokenizer.json")), name
    for name in ("train.jsonl", "test.jsonl", "base_sft.jsonl"):
        assert os.path.isfile(os.path.join(workdir, "data", name))
    export = models.from_pretrained(os.path.join(workdir, "export"))
    assert export.config.hidden_size == TINY.hidden_size
    evals = metrics.read_jsonl(workdir, split="eval")
    assert [r["step"] for r in evals] == [0, 1, 2]
    assert summary["eval_curve"] == [[r["step"], r["accuracy"]] for r in evals]


def test_summary_has_the_three_accuracies_and_kl(first_run):
    workdir, summary = first_run
    with open(os.path.join(workdir, "summary.json")) as f:
        saved = json.load(f)
    assert saved["accuracy"] == summary["accuracy"]
    assert set(saved["accuracy"]) == {"base", "teacher", "student"}
    assert all(0.0 <= v <= 1.0 for v in saved["accuracy"].values())
    assert set(saved["kl_per_token"]) == {"base", "student"}
    assert all(np.isfinite(v) for v in saved["kl_per_token"].values())
    assert saved["preset"] == "cpu" and saved["num_eval_problems"] == 6
    assert saved["cached"] == []
    for stage in ("data", "base", "teacher", "distill", "report", "total"):
        assert saved["seconds"][stage] >= 0
    assert saved["config"]["student"]["path"] == os.path.join(workdir, "models", "base")


def test_second_run_reuses_the_cache_and_strong_to_weak(first_run, tmp_path):
    cache, _ = first_run
    teacher = os.path.join(cache, "models", "teacher", "model.safetensors")
    mtime = os.path.getmtime(teacher)
    workdir = str(tmp_path / "s2w")
    summary = demo.run(
        workdir, preset="strong_to_weak", cache_dir=cache, settings=TINY, overrides=OVERRIDES,
        mesh=_mesh(),
    )  # fmt: skip
    assert summary["cached"] == ["data", "base", "teacher"]
    assert os.path.getmtime(teacher) == mtime
    small = models.from_pretrained(os.path.join(workdir, "export"))
    assert small.config.hidden_size == TINY.small_hidden_size
    assert summary["config"]["student"]["path"] == os.path.join(cache, "models", "small_base")
    assert os.path.isfile(os.path.join(workdir, "summary.json"))


def test_changed_settings_rebuild_only_what_depends_on_them(first_run):
    cache, _ = first_run
    data_info = demo.build_data(cache, TINY)
    assert data_info["cached"]
    # The data's generator version is part of the key: an older cache is rebuilt, not reused.
    assert data_info["key"]["data_version"] == demo.DATA_VERSION
    config = demo.distill_config("cpu", cache, OVERRIDES)
    base = demo.ModelStage("base", "base_sft.jsonl", TINY.base_steps)
    assert demo.build_model(base, cache, TINY, config, data_info["key"])["cached"]
    other = demo.ModelStage("base_longer", "base_sft.jsonl", TINY.base_steps + 1)
    rebuilt = demo.build_model(other, cache, TINY, config, data_info["key"])
    assert not rebuilt["cached"] and rebuilt["key"]["stage"]["steps"] == TINY.base_steps + 1
    changed = dataclasses.replace(TINY, sloppy_fraction=0.5)
    assert not demo.build_data(cache + "_other", changed)["cached"]


def test_sloppy_solutions_forget_every_carry():
    solution, answer = demo.forgetful_solution(78, 54)
    assert solution == "8+4+0=12\n7+5+0=12\n#### 22" and answer == "22"
    assert demo.forgetful_solution(5, 95) == ("5+5+0=10\n0+9+0=9\n#### 90", "90")
    assert demo.forgetful_solution(50, 50)[1] == "0"
    clean = tasks.Example("What is 78 + 54?", "132", "...", "addition", "arithmetic")
    sloppy = demo.sloppy_example(clean)
    assert (sloppy.answer, sloppy.solution) == ("22", solution)
    assert (sloppy.prompt, sloppy.task, sloppy.domain) == (clean.prompt, "addition", "arithmetic")


def test_stage_cache_reuses_only_finished_stages_with_the_same_key(tmp_path):
    folder = str(tmp_path / "stage")
    key = {"steps": 3, "parent": {"n": (1, 2)}}
    assert demo.lookup_stage(folder, key) is None
    assert demo.start_stage(folder) == folder
    (tmp_path / "stage" / "out.txt").write_text("partial")
    assert demo.lookup_stage(folder, key) is None  # started, never finished
    record = demo.finish_stage(folder, key, seconds=1.5)
    assert record == {"key": {"steps": 3, "parent": {"n": [1, 2]}}, "seconds": 1.5}
    assert demo.lookup_stage(folder, key) == record
    assert demo.lookup_stage(folder, {**key, "steps": 4}) is None
    demo.start_stage(folder)
    assert os.listdir(folder) == [] and demo.lookup_stage(folder, key) is None


def test_until_data_builds_only_the_data_stage(tmp_path):
    out = demo.run(str(tmp_path), settings=TINY, until="data")
    assert list(out["stages"]) == ["data"] and out["cached"] == []
    for name in ("train.jsonl", "test.jsonl", "base_sft.jsonl"):
        assert (tmp_path / "data" / name).is_file()
    assert (tmp_path / "models" / "tokenizer" / "tokenizer.json").is_file()
    assert not (tmp_path / "models" / "base").exists()
    assert not (tmp_path / "summary.json").exists()
    assert demo.run(str(tmp_path), settings=TINY, until="data")["cached"] == ["data"]
    with pytest.raises(ValueError, match="unknown stage"):
        demo.run(str(tmp_path), settings=TINY, until="distil")


def test_presets_spell_off_as_typed_none():
    for preset in ("cpu", "strong_to_weak", "multi_teacher"):
        c = demo.preset_config(preset)
        assert all(t.reference is None for t in c.teachers.values()), preset
        assert c.estimator.log_ratio_clip is None and c.estimator.baseline is None
        assert c.loss.ppo_clip is None and c.loss.tis_cap is None
        assert c.optimizer.grad_clip == 1.0
    on = {"estimator.baseline": "loo", "loss.ppo_clip": 0.2, "loss.tis_cap": 2,
          "teachers.default.reference": "student_init", "optimizer.grad_clip": None}  # fmt: skip
    c = demo.distill_config("cpu", "cache", on)
    assert (c.estimator.baseline, c.loss.ppo_clip, c.loss.tis_cap) == ("loo", 0.2, 2.0)
    assert c.teachers.default.reference == "student_init" and c.optimizer.grad_clip is None
    for field, bad in (("loss.ppo_clip", "off"), ("estimator.baseline", 1),
                       ("teachers.default.reference", 0.0)):  # fmt: skip
        with pytest.raises(ValueError, match=re.escape(field)):
            demo.distill_config("cpu", "cache", {field: bad})


def test_cli_flags():
    kw = demo.parse_args(
        ["--workdir", "w", "--preset", "strong_to_weak", "--base_steps", "7",
         "--set", "train.num_steps=5", "--set", "estimator.divergence=tv",
         "--set", "optimizer.learning_rate=1e-3"]
    )  # fmt: skip
    assert kw["cache_dir"] == "w" and kw["preset"] == "strong_to_weak" and not kw["fresh"]
    assert kw["until"] == "report" and demo.parse_args(["--until", "data"])["until"] == "data"
    assert kw["settings"].base_steps == 7
    assert kw["overrides"] == {
        "train.num_steps": 5,
        "estimator.divergence": "tv",
        "optimizer.learning_rate": 1e-3,
    }
    config = demo.distill_config("cpu", "cache", kw["overrides"])
    assert config.train.num_steps == 5 and config.estimator.divergence == "tv"
    assert config.teachers.default.path == os.path.join("cache", "models", "teacher")
    with pytest.raises(SystemExit):
        demo.parse_args(["--set", "no_equals_sign"])
    with pytest.raises(SystemExit):
        demo.parse_args(["--set", "train.num_stepz=5"])


def test_overrides_never_add_fields():
    with pytest.raises(ValueError, match='Did you mean "num_steps"'):
        demo.distill_config("cpu", "cache", {"train.num_stepz": 5})
    with pytest.raises(ValueError, match='Did you mean "train"'):
        demo.distill_config("cpu", "cache", {"trian.num_steps": 5})
    with pytest.raises(ValueError, match=re.escape("train.num_steps='abc'")):
        demo.distill_config("cpu", "cache", {"train.num_steps": "abc"})
    with pytest.raises(ValueError, match="unknown demo preset"):
        demo.distill_config("gpu", "cache")
