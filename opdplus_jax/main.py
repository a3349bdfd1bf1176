r"""Command line: train, evaluate or export. A thin wrapper over `opdplus_jax.trainer`.

    opdplus-train  --config=configs/default.py:cpu --workdir=runs/demo [--config.a.b=v ...]
    opdplus-eval   --config=configs/default.py:cpu --workdir=runs/demo   # latest checkpoint
    opdplus-export --config=configs/default.py:cpu --workdir=runs/demo --out=runs/demo/hf

or `python -m opdplus_jax.main {train,eval,export} --config=... --workdir=...`. Configs are
ml-collections files with `get_config(arg)`; overrides are `--config.<field>=<value>` and a
misspelt field is an error that names the closest valid one; `--config.<field>=None` switches
an optional feature off (e.g. `--config.loss.tis_cap=None`).
"""

from __future__ import annotations

import json
import logging
import sys

from absl import app, flags
from ml_collections import config_flags

from opdplus_jax import configs, trainer

_CONFIG = config_flags.DEFINE_config_file("config", None, "Experiment config file[:preset].")
_WORKDIR = flags.DEFINE_string("workdir", None, "Run directory (checkpoints, metrics, export).")
_OUT = flags.DEFINE_string("out", None, "export: output folder (default: <workdir>/export).")
_DISTRIBUTED = flags.DEFINE_bool(
    "distributed",
    False,
    "Call jax.distributed.initialize() first: one process per host on a TPU pod or multi-GPU "
    "cluster. Coordinator, process count and process id come from the cluster environment "
    "(TPU, SLURM, Kubernetes, ...) unless given by the three flags below.",
)
_COORDINATOR = flags.DEFINE_string(
    "coordinator_address", None, "--distributed: host:port of process 0's coordinator service."
)
_NUM_PROCESSES = flags.DEFINE_integer("num_processes", None, "--distributed: processes in all.")
_PROCESS_ID = flags.DEFINE_integer("process_id", None, "--distributed: this process's index.")
MODES = ("train", "eval", "export")

# `--config.<field>=None` overrides (`configs.split_none_overrides`), applied to the loaded config.
_NONE_OVERRIDES: list[str] = []


def _run(mode: str) -> None:
    # The run's own progress at INFO; libraries (orbax, absl) only when something is wrong.
    logging.getLogger().setLevel(logging.WARNING)
    logging.getLogger("opdplus_jax").setLevel(logging.INFO)
    if _DISTRIBUTED.value:
        import jax

        jax.distributed.initialize(
            coordinator_address=_COORDINATOR.value,
            num_processes=_NUM_PROCESSES.value,
            process_id=_PROCESS_ID.value,
        )
    elif any(f.present for f in (_COORDINATOR, _NUM_PROCESSES, _PROCESS_ID)):
        raise app.UsageError(
            "--coordinator_address/--num_processes/--process_id need --distributed"
        )
    config = _CONFIG.value
    if config is None:
        raise app.UsageError("--config is required, e.g. --config=configs/default.py:cpu")
    try:
        configs.apply_overrides(config, dict.fromkeys(_NONE_OVERRIDES))
    except ValueError as e:
        raise app.UsageError(str(e)) from None
    workdir = _WORKDIR.value
    if mode in ("train", "export") and not workdir:
        raise app.UsageError(f"{mode} needs --workdir")
    try:
        if mode == "train":
            result = trainer.train_and_evaluate(config, workdir)
        elif mode == "eval":
            result = trainer.evaluate_checkpoint(config, workdir)
        else:
            result = {"export": trainer.export(config, workdir, _OUT.value or f"{workdir}/export")}
    except (trainer.CheckpointSaveError, trainer.NonFiniteError) as e:
        # Expected failures of a run, fully explained by their message: no traceback.
        raise SystemExit(f"error: {e}") from None
    print(json.dumps(result, indent=2, sort_keys=True))


def _main(argv: list[str]) -> None:
    if len(argv) != 2 or argv[1] not in MODES:
        raise app.UsageError(
            f"usage: python -m opdplus_jax.main {{{','.join(MODES)}}} --config=..."
        )
    _run(argv[1])


def _app_run(main) -> None:
    argv, _NONE_OVERRIDES[:] = configs.split_none_overrides(sys.argv)
    app.run(main, argv=argv)


def _entry(mode: str):
    def run(argv):
        if len(argv) > 1:
            raise app.UsageError(f"unexpected arguments {argv[1:]}")
        _run(mode)

    return lambda: _app_run(run)


train = _entry("train")
evaluate = _entry("eval")
export = _entry("export")


if __name__ == "__main__":
    _app_run(_main)
