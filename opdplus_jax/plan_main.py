r"""Command line of the ahead-of-time planner (`opdplus_jax.plan`): a thin wrapper.

    opdplus-plan --config=configs/default.py:qwen3_exopd --topology=v5p:4x4x4
    opdplus-plan --config=configs/default.py:qwen3_exopd --topology=v5p:2x2x2,v6e:2x4 --fit
    opdplus-plan --config=configs/default.py:cpu --topology=cpu:8 --json
    opdplus-plan --config=configs/default.py:qwen3_exopd --topology=v5p:2x2x2 \
        --programs=train_step --student_layers=4 --frozen_layers=4     # compile time vs depth

or `python -m opdplus_jax.plan_main ...`. Compiles the train step, the sampler's prefill and its
decode loop for every target (nothing runs, no weights are allocated) and prints per chip the
peak memory against the HBM, arguments, temporaries, FLOPs (the models' and XLA's), a roofline
step time and the compile seconds; `--json` prints one JSON object per program and target
instead. A program that does not fit is reported in plain words with the knobs that help, the
others still compile, and the exit status is 1. `--fit` also searches the largest
`memory.microbatch_rows` (the sampler: rows per device per call) and `rollout.max_new_tokens`
that fit each program. Config overrides are `--config.<field>=<value>` as for opdplus-train.

The environment is set before JAX starts: `cpu:N` targets get N fake CPU devices
(`XLA_FLAGS=--xla_force_host_platform_device_count=N`), JAX runs on the CPU (`JAX_PLATFORMS=cpu`:
TPU targets are compile-only devices, so the planner never takes a machine's accelerators), and
libtpu may be loaded beside another process (`ALLOW_MULTIPLE_LIBTPU_LOAD=1`); each is left alone
if already set. libtpu prints a few harmless TPU_* warnings on a host that is not a TPU VM.
"""

from __future__ import annotations

import json
import os
import re
import sys

from absl import app, flags
from ml_collections import config_flags

from opdplus_jax import configs  # JAX-free: safe before prepare_environment

_CONFIG = config_flags.DEFINE_config_file("config", None, "Experiment config file[:preset].")
_TOPOLOGY = flags.DEFINE_list(
    "topology",
    None,
    "Targets, comma-separated: TPU slices (v5p:4x4x4, v5p:2x2x2, v6e:2x4, v5e:2x4), or cpu:N / "
    "h100:N / h200:N / a100:N for an XLA:CPU estimate on N fake devices judged by a GPU's "
    "published figures.",
)
_CHIP = flags.DEFINE_enum(
    "chip", None, ["h100", "h200", "a100"], "The GPU a cpu:N estimate is judged by (default h100)."
)
_PROGRAMS = flags.DEFINE_list(
    "programs", ["train_step", "prefill", "decode"], "Programs to compile."
)
_SHAPES = flags.DEFINE_list(
    "shapes",
    [],
    "ROLE:NAME overrides of model shapes, e.g. student:Qwen3-1.7B,teacher/default:Qwen3-8B "
    "(roles: student, teacher/<name>, reference/<teacher name>; NAME: a published architecture "
    "or a folder with a config.json).",
)
_STUDENT_LAYERS = flags.DEFINE_integer(
    "student_layers", None, "Cut the student to this many layers (compile time vs depth)."
)
_FROZEN_LAYERS = flags.DEFINE_integer(
    "frozen_layers", None, "Cut every teacher and reference to this many layers."
)
_FIT = flags.DEFINE_bool(
    "fit", False, "Search the largest microbatch rows and max_new_tokens that fit each program."
)
_FIT_KNOBS = flags.DEFINE_list(
    "fit_knobs",
    ["rows", "max_new_tokens"],
    "--fit: the knobs to search (each value tried is one compile): rows (memory.microbatch_rows; "
    "the sampler's rows per device per call) and/or max_new_tokens.",
)
_HBM_FRACTION = flags.DEFINE_float(
    "hbm_fraction", 0.9, "A program fits when its peak is at most this fraction of the HBM."
)
_TOKEN_STEP = flags.DEFINE_integer("token_step", 256, "--fit: max_new_tokens granularity.")
_JSON = flags.DEFINE_bool(
    "json", False, "Print one JSON object per line per compiled program (and fit), no table."
)

_CPU_TARGET = re.compile(r"^(cpu|h100|h200|a100):(\d+)$", re.I)


def cpu_device_count(argv: list[str]) -> int:
    """The most fake CPU devices any `--topology` target of `argv` asks for (0 if none)."""
    values, take_next = [], False
    for arg in argv:
        if take_next:
            values.append(arg)
            take_next = False
        elif arg in ("--topology", "-topology"):
            take_next = True
        elif arg.startswith(("--topology=", "-topology=")):
            values.append(arg.split("=", 1)[1])
    counts = [
        int(m.group(2))
        for value in values
        for name in value.split(",")
        if (m := _CPU_TARGET.match(name.strip()))
    ]
    return max(counts, default=0)


def prepare_environment(argv: list[str]) -> None:
    """Environment JAX reads when it starts (see the module docstring); call before importing
    jax."""
    count = cpu_device_count(argv)
    if count:
        flag = f"--xla_force_host_platform_device_count={count}"
        existing = os.environ.get("XLA_FLAGS", "")
        if "xla_force_host_platform_device_count" not in existing:
            os.environ["XLA_FLAGS"] = f"{existing} {flag}".strip()
    os.environ.setdefault("JAX_PLATFORMS", "cpu")
    os.environ.setdefault("ALLOW_MULTIPLE_LIBTPU_LOAD", "1")


def _parse_shapes(items: list[str]) -> dict[str, str]:
    out = {}
    for item in items:
        role, sep, name = item.partition(":")
        if not sep or not role or not name:
            raise app.UsageError(f"--shapes entry {item!r} is not ROLE:NAME (student:Qwen3-1.7B)")
        out[role.strip()] = name.strip()
    return out


def _run(argv: list[str]) -> None:
    import jax  # after prepare_environment

    from opdplus_jax import plan

    if len(argv) > 1:
        raise app.UsageError(f"unexpected arguments {argv[1:]}")
    config = _CONFIG.value
    if config is None:
        raise app.UsageError("--config is required, e.g. --config=configs/default.py:qwen3_exopd")
    if not _TOPOLOGY.value:
        raise app.UsageError("--topology is required, e.g. --topology=v5p:4x4x4 or cpu:8")
    if not 0 < _HBM_FRACTION.value <= 1:
        raise app.UsageError(f"--hbm_fraction must be in (0, 1]; got {_HBM_FRACTION.value}")
    try:
        configs.apply_overrides(config, dict.fromkeys(_NONE_OVERRIDES))
        shapes = plan.resolve_shapes(
            config,
            _parse_shapes(_SHAPES.value),
            student_layers=_STUDENT_LAYERS.value,
            frozen_layers=_FROZEN_LAYERS.value,
        )
        unknown = [p for p in _PROGRAMS.value if p not in plan.PROGRAMS]
        if unknown:
            raise ValueError(f"unknown program(s) {unknown}; valid: {', '.join(plan.PROGRAMS)}")
        unknown = [k for k in _FIT_KNOBS.value if k not in ("rows", "max_new_tokens")]
        if unknown:
            raise ValueError(f"unknown --fit_knobs {unknown}; valid: rows, max_new_tokens")
        targets = [plan.target(name, chip=_CHIP.value) for name in _TOPOLOGY.value]
        meshes = [plan.mesh_for(config, t) for t in targets]
    except ValueError as e:
        raise SystemExit(f"error: {e}") from None
    say = (lambda line: print(line, file=sys.stderr)) if _JSON.value else print
    emit = lambda obj: print(json.dumps(obj, sort_keys=True), flush=True)
    config_name = next((a.split("=", 1)[1] for a in sys.argv if a.startswith("--config=")), "")
    for line in shapes.describe():
        say(f"shape {line}")
    failed = False
    for target, mesh in zip(targets, meshes, strict=True):
        for line in plan.format_header(target, config_name, mesh.shape):
            say(line)

        def report(result):
            if _JSON.value:
                emit(result.to_json())
            else:
                print(plan.format_table([result])[-1], flush=True)
            if result.error:
                print(f"  {result.error}", file=sys.stderr, flush=True)

        if not _JSON.value:
            print(plan.format_table([])[0], flush=True)
        results = plan.plan(
            config,
            target,
            shapes,
            _PROGRAMS.value,
            hbm_fraction=_HBM_FRACTION.value,
            on_result=report,
        )
        failed |= not all(r.fits for r in results)
        if _FIT.value:
            for program in _PROGRAMS.value:
                # Rows first; then max_new_tokens at the configured rows, or fewer if only
                # fewer fit.
                rows = None
                for knob in _FIT_KNOBS.value:
                    found = plan.fit(
                        config,
                        target,
                        shapes,
                        program,
                        knob,
                        hbm_fraction=_HBM_FRACTION.value,
                        token_step=_TOKEN_STEP.value,
                        rows_per_device=rows,
                        on_try=lambda r: print(f"  {plan.format_try(r)}", file=sys.stderr),
                    )
                    if _JSON.value:
                        emit(found.to_json())
                    else:
                        say(plan.format_fit(found))
                    if knob == "rows" and found.largest:
                        rows = min(found.largest, found.configured)
        jax.clear_caches()
    if failed:
        raise SystemExit(1)


# `--config.<field>=None` overrides, applied to the loaded config.
_NONE_OVERRIDES: list[str] = []


def main() -> None:
    """The `opdplus-plan` console script."""
    prepare_environment(sys.argv)
    argv, _NONE_OVERRIDES[:] = configs.split_none_overrides(sys.argv)
    app.run(_run, argv=argv)


if __name__ == "__main__":
    main()
