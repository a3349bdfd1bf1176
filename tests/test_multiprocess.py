"""Multi-process training for real: two processes on this machine joined by `jax.distributed`
(CPU collectives over loopback, 4 devices each) run the training CLI with `--distributed`, stop
after a checkpoint, restart, and end where one process with 8 devices ends.

What it proves: rows sampled on one process's devices reach the other's verifier and metrics
(`sharding.host_array`), the checkpoint (params, optimizer state, the replicated PRNG key, the
data pipeline's state) is written by both processes and resumed by both, only process 0 writes
run files (config.json, metrics.jsonl, the exported Hugging Face folder), and the global program
is the same program as on one process.
"""

from __future__ import annotations

import json
import os
import pathlib
import socket
import subprocess

import numpy as np
import pytest
from safetensors.numpy import load_file

from tests import tiny_run

pytestmark = pytest.mark.slow

STEPS = {"train.checkpoint_every": 2, "train.export_final": True, "mesh.fsdp": -1}


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("localhost", 0))
        return s.getsockname()[1]


def _env(devices: int) -> dict[str, str]:
    env = tiny_run.cli_env()
    env["XLA_FLAGS"] = f"--xla_force_host_platform_device_count={devices}"
    return env


def _args(root: pathlib.Path, workdir: pathlib.Path, num_steps: int) -> list[str]:
    flags = {**STEPS, "train.num_steps": num_steps}
    # cli_args pins mesh.fsdp=1; the later flag wins, so the mesh spans all 8 devices.
    return tiny_run.cli_args(root, workdir, *(f"--config.{k}={v}" for k, v in flags.items()))


def _run_two(root, workdir, num_steps, timeout=240) -> list[str]:
    """Both processes of a 2-process run; returns their outputs (fails on a non-zero exit)."""
    port = _free_port()
    procs = [
        subprocess.Popen(
            [
                *_args(root, workdir, num_steps),
                "--distributed",
                f"--coordinator_address=localhost:{port}",
                "--num_processes=2",
                f"--process_id={i}",
            ],
            cwd=tiny_run.REPO,
            env=_env(4),
            stdout=subprocess.PIPE,
            stderr=subprocess.STDOUT,
            text=True,
        )
        for i in range(2)
    ]
    outs = []
    try:
        for p in procs:
            outs.append(p.communicate(timeout=timeout)[0])
    finally:
        for p in procs:
            p.kill()
    for i, (p, out) in enumerate(zip(procs, outs, strict=True)):
        assert p.returncode == 0, f"process {i} exited with {p.returncode}:\n{out[-4000:]}"
    return outs


def _train_rows(workdir: pathlib.Path) -> dict[int, dict]:
    rows = [json.loads(line) for line in (workdir / "metrics.jsonl").read_text().splitlines()]
    return {r["step"]: r for r in rows if r["split"] == "train"}


def test_two_processes_resume_and_match_one_process(tmp_path):
    root = tiny_run.build_assets(tmp_path / "assets")
    one, two = tmp_path / "one", tmp_path / "two"
    subprocess.run(
        _args(root, one, 5), cwd=tiny_run.REPO, env=_env(8), check=True, capture_output=True
    )

    _run_two(root, two, 3)  # checkpoints at steps 2 and 3, then exits
    assert sorted(os.listdir(two / "checkpoints")) == ["2", "3"]
    outs = _run_two(root, two, 5)  # both processes resume from step 3
    assert all("Traceback" not in out for out in outs), outs[0][-3000:]

    # The same training: per-step metrics and the exported weights agree to float32 rounding
    # (the collectives' summation order differs between one and two processes).
    rows_one, rows_two = _train_rows(one), _train_rows(two)
    assert sorted(rows_two) == sorted(rows_one) == [1, 2, 3, 4, 5]
    for step in rows_one:
        for key in ("loss", "grad_norm", "kl_per_token", "advantage_abs_mean"):
            np.testing.assert_allclose(
                rows_two[step][key], rows_one[step][key], rtol=2e-4, atol=1e-6, err_msg=key
            )
    w_one = load_file(one / "export" / "model.safetensors")
    w_two = load_file(two / "export" / "model.safetensors")
    assert sorted(w_one) == sorted(w_two)
    for name in w_one:
        np.testing.assert_allclose(w_two[name], w_one[name], rtol=1e-4, atol=1e-6, err_msg=name)

    # Run files come from process 0 only: no temporaries left by a second writer, and one
    # config per launch (the restart's longer run keeps the first one as config.1.json).
    leftovers = [p.name for p in two.rglob("*") if p.name.endswith(".tmp")]
    assert not leftovers, leftovers
    steps = lambda name: json.loads((two / name).read_text())["train"]["num_steps"]
    assert sorted(p.name for p in two.glob("config*.json")) == ["config.1.json", "config.json"]
    assert (steps("config.1.json"), steps("config.json")) == (3, 5)
