"""Fault injection on the training command line (slow): nothing is lost, nothing is silently wrong.

* SIGKILL at 24 moments (16 chosen phase points through `opdplus_jax.faults` — after a rollout,
  after an update, while a checkpoint is written, after a metrics row, after an evaluation,
  between the export's weights and tokenizer files — and 8 at random times), restarting after
  each: the final export is bit-identical to an uninterrupted run, every step is logged once and
  every logged loss equals the uninterrupted run's.
* An evaluator running `opdplus-eval` over and over beside a training process never disturbs it.
* A disk that fills up during a save: the run stops with an error that says so, and the
  previous checkpoint still restores.

Run with `make test-all` or `pytest -m slow tests/test_reliability.py` (about 10 minutes).
"""

from __future__ import annotations

import random
import shutil
import subprocess
import time

import jax
import numpy as np
import pytest

from opdplus_jax import checkpoint, faults, metrics
from tests import tiny_run

pytestmark = pytest.mark.slow

STEPS = 24
EVAL_EVERY = 8
FLAGS = (
    f"--config.train.num_steps={STEPS}",
    "--config.train.checkpoint_every=1",
    f"--config.train.eval_every={EVAL_EVERY}",
    "--config.train.export_final=True",
)
# Every killed process also stops at its 2nd update at the latest, so each makes at most one
# step of progress and the 24 kills all land before the run can finish.
FALLBACK = "update:2"
TIMEOUT = 600


def _run(assets, workdir, *flags, kill_at=None, mode="train", **kw):
    env = tiny_run.cli_env()
    env.pop(faults.ENV, None)
    if kill_at:
        env[faults.ENV] = kill_at
    args = tiny_run.cli_args(assets, workdir, *FLAGS, *flags, mode=mode)
    return subprocess.Popen(args, cwd=tiny_run.REPO, env=env, text=True, **kw)


def _finish(proc) -> tuple[int, str]:
    out, err = proc.communicate(timeout=TIMEOUT)
    return proc.returncode, (out or "") + (err or "")


def _export(workdir) -> bytes:
    return (workdir / "export" / "model.safetensors").read_bytes()


def _steps(workdir, split):
    return [r["step"] for r in metrics.read_jsonl(workdir / "metrics.jsonl", split=split)]


@pytest.fixture(scope="module")
def assets(tmp_path_factory):
    return tiny_run.build_assets(tmp_path_factory.mktemp("assets"))


@pytest.fixture(scope="module")
def reference(assets, tmp_path_factory):
    """An uninterrupted run: (workdir, seconds)."""
    workdir = tmp_path_factory.mktemp("reference")
    start = time.perf_counter()
    rc, log = _finish(_run(assets, workdir, stdout=subprocess.PIPE, stderr=subprocess.PIPE))
    assert rc == 0, log[-3000:]
    assert _steps(workdir, "train") == list(range(1, STEPS + 1))
    assert _steps(workdir, "eval") == list(range(0, STEPS + 1, EVAL_EVERY))
    return workdir, time.perf_counter() - start


def _kill_plan(seed: int = 0) -> list[str | float]:
    """23 kills in a shuffled order, then one during the export: phase points
    (`OPDPLUS_KILL_AT` specs) and random delays in seconds (startup and compilation included)."""
    rng = random.Random(seed)
    points = [f"{phase}:1,{FALLBACK}" for phase in ("rollout", "save", "metrics") for _ in range(4)]
    points += ["update:1", "update:2", "eval:1," + FALLBACK]
    delays = [rng.uniform(2.0, 14.0) for _ in range(8)]
    plan = [*points, *delays]
    rng.shuffle(plan)
    return [*plan, "export:1"]


def test_sigkill_at_24_moments_loses_nothing(assets, reference, tmp_path):
    ref_dir, _ = reference
    workdir = tmp_path / "run"
    outcomes = []
    for item in _kill_plan():
        pipe = {"stdout": subprocess.DEVNULL, "stderr": subprocess.PIPE}
        if isinstance(item, str):
            proc = _run(assets, workdir, kill_at=item, **pipe)
        else:
            proc = _run(assets, workdir, kill_at=FALLBACK, **pipe)
            try:
                proc.wait(timeout=item)
            except subprocess.TimeoutExpired:
                proc.kill()
        rc, log = _finish(proc)
        # Killed (-9), or finished before reaching the point (0): never an error.
        assert rc in (-9, 0), (item, log[-3000:])
        outcomes.append((item, rc))
    killed = sum(rc == -9 for _, rc in outcomes)
    print(f"\nsigkill: {killed} of {len(outcomes)} processes killed: {outcomes}")
    assert killed >= 20 and outcomes[-1] == ("export:1", -9), outcomes
    rc, log = _finish(_run(assets, workdir, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE))
    assert rc == 0, log[-3000:]
    assert _export(workdir) == _export(ref_dir)
    assert _steps(workdir, "train") == list(range(1, STEPS + 1))
    assert _steps(workdir, "eval") == list(range(0, STEPS + 1, EVAL_EVERY))
    ref_rows = metrics.read_jsonl(ref_dir / "metrics.jsonl", split="train")
    rows = metrics.read_jsonl(workdir / "metrics.jsonl", split="train")
    for a, b in zip(rows, ref_rows, strict=True):  # the same losses, not just the same steps
        assert a["loss"] == b["loss"] and a["kl_per_token"] == b["kl_per_token"]


def test_an_evaluator_beside_the_trainer_never_disturbs_it(assets, reference, tmp_path):
    ref_dir, _ = reference
    workdir = tmp_path / "run"
    train = _run(assets, workdir, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
    evals = []
    while train.poll() is None:
        if not (workdir / "checkpoints").is_dir():
            time.sleep(0.2)
            continue
        proc = _run(assets, workdir, mode="eval", stdout=subprocess.PIPE, stderr=subprocess.PIPE)
        evals.append(_finish(proc))
    rc, log = _finish(train)
    assert rc == 0, log[-3000:]
    assert evals, "the trainer finished before any evaluation could start"
    for erc, elog in evals:
        # Before the first checkpoint is finalised the evaluator may find none: said plainly.
        assert erc == 0 or "no complete checkpoint" in elog, elog[-3000:]
    assert any(erc == 0 for erc, _ in evals)
    ok = sum(erc == 0 for erc, _ in evals)
    print(f"\nevaluator: {len(evals)} evaluations beside the trainer, {ok} found a checkpoint")
    assert _export(workdir) == _export(ref_dir)
    assert _steps(workdir, "train") == list(range(1, STEPS + 1))
    assert not list((workdir / "checkpoints").glob("*orbax-checkpoint-tmp*"))


def test_a_full_disk_during_a_save_keeps_the_previous_step(assets, reference, tmp_path):
    ref_dir, _ = reference
    last = ref_dir / "checkpoints" / str(STEPS)
    step_bytes = sum(p.stat().st_size for p in last.rglob("*") if p.is_file())
    mount = tmp_path / "small"
    mount.mkdir()
    size_kib = int(4 * step_bytes / 1024) + 256  # room for a few steps, not for all six
    done = subprocess.run(["mount", "-t", "tmpfs", "-o", f"size={size_kib}k", "tmpfs", str(mount)],
                          capture_output=True, text=True)  # fmt: skip
    if done.returncode:
        pytest.skip(f"cannot mount a size-limited tmpfs here: {done.stderr.strip()}")
    try:
        workdir = mount / "run"
        flags = ("--config.train.keep_checkpoints=10", "--config.train.export_final=False")
        proc = _run(assets, workdir, *flags, stdout=subprocess.PIPE, stderr=subprocess.PIPE)
        rc, log = _finish(proc)
        assert rc != 0, "the run did not fill the disk"
        assert "error: writing a checkpoint in" in log and "The disk is full." in log, log[-3000:]
        assert "restart, which resumes from step" in log, log[-3000:]
        print("\nfull disk:", next(x for x in log.splitlines() if x.startswith("error: ")))
        manager = checkpoint.CheckpointManager(workdir / "checkpoints", read_only=True)
        latest = manager.latest_step()
        assert latest is not None and latest >= 1
        template = jax.tree.map(np.asarray, _params_template(assets))
        restored = manager.restore_latest(params=template)
        assert restored is not None and restored.step == latest
        manager.close()
        shutil.rmtree(workdir, ignore_errors=True)
    finally:
        subprocess.run(["umount", str(mount)], check=False)


def _params_template(assets):
    from flax import nnx

    from opdplus_jax import models

    return nnx.split(models.from_pretrained(assets / "student"), nnx.Param)[1]
