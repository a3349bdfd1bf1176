"""The experiment scripts end to end in --quick mode, and the results notebook on their output.

Each script runs in its own interpreter (as from the command line: one CPU device, the JAX
persistent compilation cache in the shared cache folder), all sharing one module-scoped cache
of tiny data and models, so later scripts reuse the earlier ones' models and compilations.
"""

import csv
import math
import os
import pathlib
import subprocess
import sys

import pytest

from experiments import common, outputs

ROOT = pathlib.Path(__file__).resolve().parents[1]
# script -> number of variants in --quick mode
SCRIPTS = {
    "lambda_sweep": 2,
    "divergences": 3,
    "levels": 2,
    "multi_teacher": 2,
    "supports": 2,
    "lora": 2,
    "exopd": 2,
}
SEEDS = 2
FILES = ("runs.csv", "curves.csv", "summary.csv", "references.csv", "results.md", "meta.json")

pytest.importorskip("matplotlib")


def _env() -> dict:
    return {
        **os.environ,
        "MPLBACKEND": "Agg",
        "JAX_PLATFORMS": "cpu",
        "PYTHONPATH": os.pathsep.join(filter(None, [str(ROOT), os.environ.get("PYTHONPATH")])),
    }


@pytest.fixture(scope="module")
def quick_results(tmp_path_factory):
    """Runs every script with --quick into <tmp>/results/<name>; returns (tmp, stdouts)."""
    tmp = tmp_path_factory.mktemp("experiments")
    logs = {}
    for name in SCRIPTS:
        cmd = [sys.executable, "-m", f"experiments.{name}", "--quick", "--seeds", str(SEEDS),
               "--out", str(tmp / "results" / name), "--cache_dir", str(tmp / "cache")]  # fmt: skip
        proc = subprocess.run(cmd, cwd=tmp, env=_env(), capture_output=True, text=True,
                              timeout=600, check=False)  # fmt: skip
        assert proc.returncode == 0, f"{name}\n{proc.stdout[-3000:]}\n{proc.stderr[-6000:]}"
        logs[name] = proc.stdout
    return tmp, logs


def _rows(path):
    with open(path, newline="", encoding="utf-8") as f:
        return list(csv.DictReader(f))


@pytest.mark.parametrize("name", list(SCRIPTS))
def test_quick_run_writes_every_output(quick_results, name):
    tmp, logs = quick_results
    out = tmp / "results" / name
    for f in FILES:
        assert (out / f).is_file(), f
    assert list(out.glob("*.png")), "no plots"
    runs = _rows(out / "runs.csv")
    assert len(runs) == SCRIPTS[name] * SEEDS
    assert len({r["run_key"] for r in runs}) == len(runs)
    acc_keys = [k for k in runs[0] if k.endswith("accuracy") and not k.startswith("train_")]
    kl_keys = [k for k in runs[0] if k.endswith("kl_per_token") and not k.startswith("train_")]
    assert acc_keys and kl_keys
    for r in runs:
        assert all(0.0 <= float(r[k]) <= 1.0 for k in acc_keys), r
        assert all(math.isfinite(float(r[k])) for k in kl_keys), r
    summary = _rows(out / "summary.csv")
    assert len(summary) == SCRIPTS[name]
    assert all(int(float(s["n"])) == SEEDS for s in summary)
    assert all(f"{k}_std" in summary[0] for k in acc_keys)
    curves = _rows(out / "curves.csv")
    assert {int(float(c["step"])) for c in curves} == {0, 1, 2}
    text = (out / "results.md").read_text()
    assert "± " in text and "| base |" in text
    assert "Final" in logs[name] or "Per-domain" in logs[name]


def test_divergences_pairs_corrections(quick_results):
    tmp, _ = quick_results
    paired = _rows(tmp / "results" / "divergences" / "paired_difference.csv")
    assert [(p["divergence"], p["label"], p["against"]) for p in paired] == [
        ("jsd", "jsd opd_plus", "jsd stop_grad"),
        ("jsd", "jsd opd_plus", "jsd stop_grad sublinear"),
    ]


def test_each_seed_distils_its_own_build(quick_results):
    tmp, _ = quick_results
    refs = _rows(tmp / "results" / "levels" / "references.csv")
    assert [(r["label"], r["build"]) for r in refs] == [
        ("base", "0"), ("teacher", "0"), ("base", "1"), ("teacher", "1")
    ]  # fmt: skip
    weights = [
        (tmp / "cache" / f"build{b}" / "models" / "base" / "model.safetensors").read_bytes()
        for b in (0, 1)
    ]
    assert weights[0] != weights[1]  # other initial weights and SFT order, same data
    data = [(tmp / "cache" / f"build{b}" / "data" / "train.jsonl").read_text() for b in (0, 1)]
    assert data[0] == data[1]
    config = common.demo.distill_config("cpu", str(tmp / "cache" / "build0"), {})
    key = common.run_key(config)
    record = tmp / "cache" / "build0" / "models" / "base" / common.demo.STAGE_FILE
    text = record.read_text()
    try:  # the same config over a rebuilt base is another run (never reused on resume)
        record.write_text(text.replace('"steps"', '"steps_"', 1))
        assert common.run_key(config) != key
    finally:
        record.write_text(text)


def test_exopd_pairs_against_lambda_one_and_the_teacher(quick_results):
    tmp, _ = quick_results
    out = tmp / "results" / "exopd"
    refs = _rows(out / "references.csv")
    assert {r["label"] for r in refs} == {"base", "small_base", "weak_teacher", "teacher"}
    vs_teacher = _rows(out / "minus_teacher.csv")
    assert [(p["label"], p["against"]) for p in vs_teacher] == [
        ("base λ=1", "teacher"), ("small λ=1.25, ref=teacher's base", "teacher")
    ]  # fmt: skip
    runs = {(r["label"], r["seed"]): float(r["accuracy"]) for r in _rows(out / "runs.csv")}
    teacher = {r["build"]: float(r["accuracy"]) for r in refs if r["label"] == "weak_teacher"}
    diffs = [runs["base λ=1", s] - teacher[s] for s in ("0", "1")]
    assert float(vs_teacher[0]["accuracy_diff"]) == pytest.approx(sum(diffs) / 2)


def test_multi_teacher_reports_both_domains(quick_results):
    tmp, _ = quick_results
    refs = _rows(tmp / "results" / "multi_teacher" / "references.csv")
    assert [r["label"] for r in refs] == ["base", "teacher (arithmetic)", "teacher (tool_use)"]
    assert {"arithmetic_accuracy", "tool_use_kl_per_token"} <= set(refs[0])


def test_results_notebook_runs_on_quick_outputs(quick_results, tmp_path):
    tmp, _ = quick_results
    env = {**_env(), "OPDPLUS_NOTEBOOK_SMALL": "1", "OPDPLUS_RESULTS_DIR": str(tmp / "results")}
    cmd = [sys.executable, str(ROOT / "notebooks" / "results.py")]
    proc = subprocess.run(
        cmd, cwd=tmp_path, env=env, capture_output=True, text=True, timeout=300, check=False
    )
    assert proc.returncode == 0, f"{proc.stdout[-3000:]}\n{proc.stderr[-6000:]}"
    for name in SCRIPTS:
        assert f"## {name}" in proc.stdout, name
    assert not any(tmp_path.iterdir()), "small mode must not write files"


def test_cli_defaults_and_errors():
    args = common.parse_args("x", "", ["--quick"])
    assert args.seeds == common.QUICK_SEEDS and args.out.endswith(os.path.join("quick", "x"))
    full = common.parse_args("x", "", ["--seeds", "4", "--steps", "7"])
    assert full.seeds == 4 and full.out == os.path.join("experiments", "results", "x")
    assert common.scale(full, {"train.num_steps": 30})[1]["train.num_steps"] == 7
    assert common.scale(full, {})[1]["estimator.baseline"] is None  # PINNED: no baseline
    loo = common.parse_args("x", "", ["--set", "estimator.baseline=loo"])
    assert loo.name == "x_baseline-loo" and loo.out.endswith(os.path.join("results", loo.name))
    assert loo.workdir.endswith(os.path.join("work", loo.name))  # never resumes the plain runs
    assert common.scale(loo, {})[1]["estimator.baseline"] == "loo"
    assert [common.build_of(full, s) for s in range(3)] == [0, 1, 2]
    one = common.parse_args("x", "", ["--one_build"])
    assert [common.build_of(one, s) for s in range(3)] == [0, 0, 0]
    for bad in (["--seeds", "0"], ["--steps", "-1"], ["--set", "estimator.baselin=loo"]):
        with pytest.raises(SystemExit):
            common.parse_args("x", "", bad)


def test_aggregate_mean_and_sample_std():
    rows = [{"g": "a", "v": 1.0}, {"g": "a", "v": 3.0}, {"g": "b", "v": 5.0}]
    a, b = outputs.aggregate(rows, ["g"], ["v"])
    assert (a["g"], a["n"], a["v_mean"], a["v_std"]) == ("a", 2, 2.0, math.sqrt(2.0))
    assert (b["v_mean"], b["v_std"]) == (5.0, 0.0)
    with pytest.raises(ValueError, match="unique"):
        common.run_grid(common.parse_args("x", "", ["--quick"]),
                        [common.Variant("same", {}), common.Variant("same", {})],
                        lambda o, s: None, kl_teacher={})  # fmt: skip


def test_supports_pairs_against_the_sampled_run(quick_results):
    tmp, _ = quick_results
    paired = _rows(tmp / "results" / "supports" / "paired_difference.csv")
    assert [(p["label"], p["against"]) for p in paired] == [("full", "sampled")]
    p = paired[0]
    low, mid, high = (float(p[f"accuracy_{k}"]) for k in ("ci_low", "diff", "ci_high"))
    assert low <= mid <= high


def test_paired_differences_use_a_t_interval():
    runs = [{"label": lab, "seed": s, "v": v}
            for lab, vals in (("a", (1.0, 2.0, 3.0)), ("b", (2.0, 2.0, 5.0)))
            for s, v in enumerate(vals)]  # fmt: skip
    (row,) = outputs.paired_differences(runs, "a", ["v"])
    d = [1.0, 0.0, 2.0]
    half = 4.302652729911275 * 1.0 / math.sqrt(3)  # t_{0.975, 2} x sample std / sqrt(n)
    assert (row["label"], row["against"], row["n"]) == ("b", "a", 3)
    assert row["v_diff"] == pytest.approx(sum(d) / 3)
    assert row["v_ci_low"] == pytest.approx(1.0 - half) and row["v_ci_high"] == pytest.approx(
        1.0 + half
    )
