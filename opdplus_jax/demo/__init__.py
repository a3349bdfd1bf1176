r"""The embedded default: a real on-policy distillation, end to end, on a laptop CPU.

    python -m opdplus_jax.demo --workdir runs/demo            # or: make demo

Stages (each cached under `--cache_dir`, by default the workdir, and skipped when its outputs
exist, are complete and were built with the same settings):

  data      the character tokenizer and 2-digit addition problems with column-wise worked
            solutions (`models/tokenizer`, `data/{train,test,base_sft}.jsonl`);
  base      a tiny Qwen3-shaped model trained by SFT from random weights on sloppy worked
            solutions: most of them forget every carry, so the base knows how to carry but
            usually does not, and greedy decoding fails on most problems with a carry;
  teacher   the base with more SFT on clean solutions: the same network, strong (G-OPD's
            same-size setting in miniature);
  distill   the student starts from the base and learns on its own samples from the teacher's
            per-token log-probs with the default estimator (OPD+ with JSD), through
            `trainer.train_and_evaluate` and the `cpu` preset of `opdplus_jax.configs.default`
            (re-run every time);
  report    greedy held-out accuracy of base, teacher and student, KL(model || teacher) per
            token on the model's own samples, wall time per stage; writes `summary.json`,
            `accuracy_vs_step.png`, `divergence_vs_step.png` and the student's Hugging Face
            export (`export/`) into the workdir.

`--preset strong_to_weak` distils the same teacher into a smaller student (`small_base`, trained
on the same sloppy solutions first). `--until data` (or `models`) stops after that stage. Once
the models exist, the distillation alone is
`opdplus-train --config=configs/default.py:cpu --workdir=runs/opd` from the repository.

The stage cache (`lookup_stage`, `start_stage`, `finish_stage`) is public, for other pipelines
that build cached data and models the same way (the experiments do).
"""

from opdplus_jax.demo.main import (
    DEMO_MARKER,
    PRESETS,
    RUN_OUTPUTS,
    UNTIL,
    clear_run,
    distill_config,
    main,
    parse_args,
    preset_config,
    run,
)
from opdplus_jax.demo.report import evaluate_model, format_table, write_plots
from opdplus_jax.demo.stages import (
    DATA_VERSION,
    MODEL_NAMES,
    STAGE_FILE,
    ModelStage,
    Settings,
    build_data,
    build_model,
    finish_stage,
    forgetful_solution,
    lookup_stage,
    model_config,
    sloppy_example,
    start_stage,
)

__all__ = [
    "DATA_VERSION",
    "DEMO_MARKER",
    "MODEL_NAMES",
    "PRESETS",
    "RUN_OUTPUTS",
    "STAGE_FILE",
    "UNTIL",
    "ModelStage",
    "Settings",
    "build_data",
    "build_model",
    "clear_run",
    "distill_config",
    "evaluate_model",
    "finish_stage",
    "forgetful_solution",
    "format_table",
    "lookup_stage",
    "main",
    "model_config",
    "parse_args",
    "preset_config",
    "run",
    "sloppy_example",
    "start_stage",
    "write_plots",
]
