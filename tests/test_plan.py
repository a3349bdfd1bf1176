"""The ahead-of-time planner (`opdplus_jax.plan`, `opdplus-plan`) on tiny models.

A tiny student and teacher (config.json only: the planner never reads weights) in the papers'
setting (`qwen3_exopd`: a teacher, a reference, ExOPD, grad accumulation) are compiled for 8 fake
CPU devices in this process, and for a TPU v5p slice through the command line in a subprocess
(libtpu is initialised once per process, with `ALLOW_MULTIPLE_LIBTPU_LOAD` set before JAX starts,
which the command does and a test process that has already started JAX cannot). The published
architectures are checked against their published parameter counts.
"""

from __future__ import annotations

import importlib.util
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from opdplus_jax import configs, models, plan
from opdplus_jax.configs import default
from opdplus_jax.models import published

ROOT = Path(__file__).resolve().parents[1]
HAS_LIBTPU = importlib.util.find_spec("libtpu") is not None
REQUIRED_KEYS = {
    "program",
    "topology",
    "chips",
    "peak_bytes",
    "hbm_bytes",
    "argument_bytes",
    "output_bytes",
    "temp_bytes",
    "flops",
    "flops_analytic",
    "bytes_accessed",
    "roofline_seconds",
    "compile_seconds",
    "fits",
}
# Rollout shapes of the tiny config: 2 prompts x 8 samples, 16-token prompts and responses; the
# memory knobs off (the smallest programs, the fastest compiles).
TINY = {
    "rollout.max_new_tokens": 16,
    "rollout.max_prompt_len": 16,
    "data.batch_size": 2,
    "optimizer.grad_accum": 1,
    "memory.remat": None,
    "memory.microbatch_rows": None,
    "memory.logits_chunk": None,
}


@pytest.fixture(scope="module")
def tiny(tmp_path_factory) -> Path:
    """Folders holding only the config.json of a 1-layer student and a 2-layer teacher."""
    root = tmp_path_factory.mktemp("tiny_models")
    for name, (hidden, layers) in {"student": (32, 1), "teacher": (64, 2)}.items():
        cfg = models.qwen3_config(
            vocab_size=128, hidden_size=hidden, num_layers=layers, num_heads=4, num_kv_heads=2,
            eos_token_id=1,
        )  # fmt: skip
        (root / name).mkdir()
        (root / name / "config.json").write_text(json.dumps(cfg.hf_config_dict()))
    return root


def tiny_overrides(folder: Path) -> dict:
    return {
        "student.path": str(folder / "student"),
        "teachers.default.path": str(folder / "teacher"),
        "teachers.default.reference": str(folder / "teacher"),
        **TINY,
    }


def tiny_config(folder: Path):
    config = default.get_config("qwen3_exopd")
    configs.apply_overrides(config, tiny_overrides(folder))
    return config


def run_plan(*args: str) -> subprocess.CompletedProcess:
    env = {k: v for k, v in os.environ.items() if k not in ("JAX_PLATFORMS", "XLA_FLAGS")}
    return subprocess.run(
        [sys.executable, "-m", "opdplus_jax.plan_main", *args],
        cwd=ROOT,
        env=env,
        capture_output=True,
        text=True,
        timeout=600,
    )


def cli_overrides(folder: Path, **extra) -> list[str]:
    return [f"--config.{k}={v}" for k, v in {**tiny_overrides(folder), **extra}.items()]


# ------------------------------------------------------------------------------ shapes


def test_published_architectures_match_published_parameter_counts():
    def counts(name):
        c = published.get(name)
        embedding = c.vocab_size * c.hidden_size
        non_embedding = c.num_params() - embedding * (1 if c.tie_word_embeddings else 2)
        return c.num_params(), non_embedding, c.num_params() + embedding * c.tie_word_embeddings

    # (total with a tied embedding counted once, non-embedding): the Qwen3 and Qwen2.5
    # technical reports and Llama 3.1's model card; the hub's safetensors count of the tied
    # Qwen3-1.7B stores the output layer too (2.03B).
    expected = {
        "Qwen3-0.6B": (0.6e9, 0.44e9),
        "Qwen3-1.7B": (1.7e9, 1.4e9),
        "Qwen3-4B": (4.0e9, 3.6e9),
        "Qwen3-8B": (8.2e9, 6.95e9),
        "Qwen3-14B": (14.8e9, 13.2e9),
        "Qwen2.5-1.5B": (1.54e9, 1.31e9),
        "Qwen2.5-7B": (7.61e9, 6.53e9),
        "Llama-3.1-8B": (8.03e9, None),
    }
    assert set(expected) == set(published.names())
    for name, (total, non_embedding) in expected.items():
        got_total, got_non_embedding, _ = counts(name)
        assert got_total == pytest.approx(total, rel=0.02), name
        if non_embedding is not None:
            assert got_non_embedding == pytest.approx(non_embedding, rel=0.02), name
    assert counts("Qwen3-1.7B")[2] == pytest.approx(2.03e9, rel=0.005)
    assert counts("Qwen3-8B")[0] == pytest.approx(8.19e9, rel=0.005)
    assert published.get("Qwen3-0.6B").num_params() == 596_049_920  # the exact published count


def test_published_names_match_folders():
    assert published.match("/checkpoints/Qwen3-8B-RL") == "Qwen3-8B"
    assert published.match("/ckpt/qwen3-8b-base/") == "Qwen3-8B"
    assert published.match("Llama-3.1-8B") == "Llama-3.1-8B"
    assert published.match("/checkpoints/Qwen3-8B-SFT") is None
    with pytest.raises(KeyError, match=r"Qwen3-1\.7B"):
        published.get("Qwen4-1B")


def test_shapes_of_the_preset_come_from_the_published_table():
    shapes = plan.resolve_shapes(default.get_config("qwen3_exopd"))
    assert shapes.student.config == published.get("Qwen3-1.7B")
    assert [t.config for t in shapes.teachers] == [published.get("Qwen3-8B")]
    assert [r.role for r in shapes.references] == ["reference/default"]
    assert shapes.reference_of == (0,)
    assert shapes.vocab_size == 151669
    text = "\n".join(shapes.describe())
    assert "published Qwen3-8B config.json (/checkpoints/Qwen3-8B-RL not found here)" in text
    cut = plan.resolve_shapes(default.get_config("qwen3_exopd"), student_layers=4)
    assert cut.student.config.num_layers == 4 and "cut to 4 layers" in cut.student.origin


def test_unknown_model_shape_names_the_fix(tiny):
    config = tiny_config(tiny)
    configs.apply_overrides(config, {"student.path": "/nowhere/MyOwnModel-3B"})
    with pytest.raises(ValueError, match=r"--shapes=student:Qwen3-1.7B .*real checkpoint folder"):
        plan.resolve_shapes(config)
    shapes = plan.resolve_shapes(config, {"student": "Qwen3-0.6B"})
    assert shapes.student.config.hidden_size == 1024
    assert shapes.teachers[0].origin.startswith("config.json in")
    with pytest.raises(ValueError, match=r"this config's models are \['student'"):
        plan.resolve_shapes(config, {"teacher/other": "Qwen3-8B"})


# ------------------------------------------------------------------------------ targets


def test_unknown_topology_is_a_clear_error():
    with pytest.raises(ValueError, match=r"unknown topology .v9z:2x2.*v5p:4x4x4"):
        plan.target("v9z:2x2")
    with pytest.raises(ValueError, match="not GENERATION:SHAPE"):
        plan.target("v5p")
    with pytest.raises(ValueError, match="not a device count"):
        plan.target("cpu:eight")
    with pytest.raises(ValueError, match=r"needs 4096 CPU devices.*jax_num_cpu_devices"):
        plan.target("cpu:4096")


def test_out_of_memory_message_in_plain_words():
    xla = (
        "RESOURCE_EXHAUSTED: E1000: CompileTimeHbmOom: Ran out of memory on HBM, the total "
        "memory required for HLO temporaries (120.50G) exceeds available HBM (95.73G). HLO "
        "module: jit_train_step."
    )
    text = plan.out_of_memory_message("train_step", "v5p:2x2x2", xla)
    assert text.startswith("train_step does not fit on v5p:2x2x2: its temporaries need 120.50 GiB")
    assert "95.73 GiB of HBM" in text and "24.77 GiB too much" in text
    assert "memory.microbatch_rows" in text


def test_largest_fitting_brackets_then_bisects():
    calls = []

    def fits(v):
        calls.append(v)
        return v <= 37

    assert plan.largest_fitting(fits, range(1, 1001), 4)[0] == 37
    assert calls[:5] == [4, 8, 16, 32, 64]  # doubling, then bisection between 32 and 64
    assert plan.largest_fitting(lambda v: v <= 5, range(1, 65), 64)[0] == 5
    assert plan.largest_fitting(lambda v: False, range(1, 65), 8) == (
        0,
        {8: False, 4: False, 2: False, 1: False},
    )
    assert plan.largest_fitting(lambda v: True, range(1, 65), 8)[0] == 64
    assert plan.largest_fitting(lambda v: v <= 1000, range(256, 4097, 256), 512)[0] == 768
    assert plan.largest_fitting(lambda v: v <= 6, [1, 2, 4, 8, 16], 16)[0] == 4


# ------------------------------------------------------------------------------ compiles


def test_cpu_target_compiles_every_program(tiny):
    target = plan.target("cpu:8")
    assert target.estimate and target.chip.name.startswith("NVIDIA H100")
    results = plan.plan(tiny_config(tiny), target, plan.resolve_shapes(tiny_config(tiny)))
    assert [r.program for r in results] == list(plan.PROGRAMS)
    for r in results:
        assert r.error is None and r.fits, r
        assert r.peak_bytes > 0 and r.argument_bytes > 0 and r.temp_bytes >= 0
        assert r.flops_analytic > 0 and r.compile_seconds > 0 and r.roofline_seconds > 0
        assert (r.rows, r.rows_per_device, r.prompt_len, r.max_new_tokens) == (16, 2, 16, 16)
    assert set(REQUIRED_KEYS) <= set(results[0].to_json())


@pytest.mark.skipif(not HAS_LIBTPU, reason="libtpu is not installed (pip install -e '.[tpu]')")
def test_tpu_json_lines(tiny):
    # v5p:4x4x4 with the preset's data=8 x fsdp=8 mesh splits the slice's physical axes, which
    # jax.make_mesh refuses and sharding.make_mesh lays out with mesh_utils instead.
    done = run_plan(
        "--config=configs/default.py:qwen3_exopd", "--topology=v5p:2x2x2,v5p:4x4x4", "--json",
        *cli_overrides(tiny, **{"data.batch_size": 8}),  # 64 rows: one per v5p:4x4x4 chip
    )  # fmt: skip
    assert done.returncode == 0, done.stderr[-3000:]
    lines = [json.loads(line) for line in done.stdout.splitlines()]
    assert [(line["topology"], line["program"]) for line in lines] == [
        (topology, program) for topology in ("v5p:2x2x2", "v5p:4x4x4") for program in plan.PROGRAMS
    ]
    for line in lines:
        assert set(line) >= REQUIRED_KEYS, line
        assert line["chips"] == {"v5p:2x2x2": 8, "v5p:4x4x4": 64}[line["topology"]]
        assert line["fits"] and line["compiled_for"] == "TPU v5p"
        assert line["peak_bytes"] > 0 and line["argument_bytes"] > 0
        assert 90 * plan.GIB < line["hbm_bytes"] < 96 * plan.GIB  # as the compiler sees it
    assert "shape student: 1 layers" in done.stderr and "mesh data=8 fsdp=8" in done.stderr


@pytest.mark.skipif(not HAS_LIBTPU, reason="libtpu is not installed (pip install -e '.[tpu]')")
def test_a_config_that_cannot_fit_is_reported_in_plain_words(tiny):
    huge = {"data.batch_size": 4096, "rollout.max_new_tokens": 65536, "mesh.fsdp": 4}
    done = run_plan(
        "--config=configs/default.py:qwen3_exopd", "--topology=v5p:2x2x1",
        "--programs=prefill,decode", *cli_overrides(tiny, **huge),
    )  # fmt: skip
    assert done.returncode == 1
    assert "Traceback" not in done.stderr
    assert "prefill does not fit on v5p:2x2x1: its temporaries need" in done.stderr
    assert "Knobs that help: a smaller data.batch_size" in done.stderr
    assert "decode does not fit on v5p:2x2x1" in done.stderr
    assert "NO" in done.stdout


def test_command_line_errors_name_the_problem(tiny):
    done = run_plan("--config=configs/default.py:qwen3_exopd", "--topology=v9z:2x2")
    assert done.returncode != 0 and "Traceback" not in done.stderr
    assert "error: unknown topology 'v9z:2x2'" in done.stderr
    done = run_plan(
        "--config=configs/default.py:qwen3_exopd", "--topology=cpu:8",
        "--config.student.path=/nowhere/MyOwnModel-3B",
    )  # fmt: skip
    assert done.returncode != 0 and "Traceback" not in done.stderr
    assert "--shapes=student:Qwen3-1.7B" in done.stderr
    done = run_plan(
        "--config=configs/default.py:qwen3_exopd", "--topology=cpu:4", *cli_overrides(tiny)
    )
    assert done.returncode != 0 and "Traceback" not in done.stderr
    assert "error: cpu:4: 4 devices are not divisible" in done.stderr
    assert "set --config.mesh.data/fsdp/tensor to a shape of 4 chips" in done.stderr


def test_rows_that_do_not_split_over_the_mesh_are_refused_in_plain_words(tiny):
    config = tiny_config(tiny)
    configs.apply_overrides(config, {"data.batch_size": 1, "rollout.num_samples": 4})
    (result,) = plan.plan(config, plan.target("cpu:8"), plan.resolve_shapes(config), ["train_step"])
    assert not result.fits and result.compiled_for == "not compiled"
    assert result.error.startswith(
        "train_step cannot be built for cpu:8: data.batch_size x rollout.num_samples = 4 rows do "
        "not split over the 8 devices"
    )
