"""(g) ExOPD with an imperfect teacher, and reward correction with a separable reference.

    python -m experiments.exopd [--quick] [--seeds 5] [--out DIR] [--cache_dir DIR]

The teacher is imperfect: the base plus only `WEAK_STEPS` steps of clean SFT ("weak_teacher",
held-out accuracy well below 1), so that a student can end above it. Two students, OPD+ JSD at
token level, γ = 0, learning rate 1e-4 (the rate at which the students of (c) learn in 30
steps), KL measured to the weak teacher:

* the base, with λ ∈ {1, 1.25, 1.5} and reference = its initial weights, which are also the
  teacher's pre-SFT model: does ExOPD (λ > 1) surpass the teacher?
* a smaller model ("small_base": half the width, SFT on the same sloppy mix), whose
  initialisation is not the teacher's base, so the two references differ: λ = 1, and λ = 1.25
  with reference = its initial weights or = the teacher's base ("reward correction": the
  implicit reward log q - log r is the teacher's own improvement over its base).

Paired by seed: each ExOPD arm minus λ = 1 of the same student, and every student minus its
seed's teacher (seed k distils build k of the base and teacher). Writes experiments/results/exopd/.
"""

from __future__ import annotations

from experiments import common, outputs
from opdplus_jax import demo

NAME = "exopd"
WEAK_STEPS = 60  # clean SFT steps of the weak teacher (the demo's teacher gets 150)
QUICK_WEAK_STEPS = 2
# At the pinned 1e-3 every 30-step student of (c) ends below its base; at 1e-4 they learn.
FULL = {"train.num_steps": 30, "train.eval_every": 5, "data.batch_size": 32,
        "optimizer.learning_rate": 1e-4}  # fmt: skip
SMALL = {"student.path": "{models}/small_base"}
EXOPD = {"teachers.default.reward_scale": 1.25, "teachers.default.reference": "student_init"}
VARIANTS = (
    common.Variant("base λ=1", {}, {"student": "base", "lambda": 1.0, "reference": ""}),
    common.Variant("base λ=1.25", EXOPD,
                   {"student": "base", "lambda": 1.25, "reference": "student_init"}),
    common.Variant("base λ=1.5", {**EXOPD, "teachers.default.reward_scale": 1.5},
                   {"student": "base", "lambda": 1.5, "reference": "student_init"}),
    common.Variant("small λ=1", SMALL, {"student": "small_base", "lambda": 1.0, "reference": ""}),
    common.Variant("small λ=1.25, ref=student_init", {**SMALL, **EXOPD},
                   {"student": "small_base", "lambda": 1.25, "reference": "student_init"}),
    common.Variant("small λ=1.25, ref=teacher's base",
                   {**SMALL, **EXOPD, "teachers.default.reference": "{models}/base"},
                   {"student": "small_base", "lambda": 1.25, "reference": "teacher's base"}),
)  # fmt: skip
QUICK_LABELS = ("base λ=1", "small λ=1.25, ref=teacher's base")
AGAINST = {  # ExOPD arm -> the λ = 1 run of the same student
    "base λ=1.25": "base λ=1",
    "base λ=1.5": "base λ=1",
    "small λ=1.25, ref=student_init": "small λ=1",
    "small λ=1.25, ref=teacher's base": "small λ=1",
}
PAIRED_METRICS = (
    ("accuracy", "Δ held-out acc.", 3),
    ("kl_per_token", "Δ KL(student‖teacher)/tok", 4),
)


def main(argv=None) -> dict:
    args = common.parse_args(NAME, __doc__.splitlines()[0], argv)
    settings, _ = common.scale(args, FULL)
    steps = QUICK_WEAK_STEPS if args.quick else WEAK_STEPS
    extra = (
        demo.ModelStage("weak_teacher", "train.jsonl", steps, init="base", seed_offset=1),
        demo.ModelStage("small_base", "base_sft.jsonl", settings.small_base_steps, small=True,
                        seed_offset=2),
    )  # fmt: skip
    variants = [v for v in VARIANTS if not args.quick or v.label in QUICK_LABELS]
    desc = __doc__.split("\n\n")[2] + "\n\n" + __doc__.split("\n\n")[3]
    res = common.demo_experiment(
        args, variants, FULL, ["student", "lambda", "reference"], desc, extra=extra,
        references=("base", "small_base", "weak_teacher", "teacher"), teacher="weak_teacher",
    )  # fmt: skip
    keys = [k for k, _, _ in PAIRED_METRICS]
    paired = outputs.paired_by_pair(res["runs"], list(AGAINST.items()), keys)
    build_of = lambda seed: common.build_of(args, seed)
    teacher = outputs.reference_runs(
        res["refs"], "weak_teacher", range(args.seeds), build_of, label="teacher"
    )
    vs_teacher = outputs.paired_differences(res["runs"] + teacher, "teacher", ["accuracy"])
    outputs.write_csv(f"{args.out}/paired_difference.csv", paired)
    outputs.write_csv(f"{args.out}/minus_teacher.csv", vs_teacher)
    tables = {
        "Final held-out metrics (mean ± std over seeds)": res["table"],
        "ExOPD minus λ = 1 of the same student, paired by seed (mean [95% t interval])":
            outputs.paired_table(paired, PAIRED_METRICS),
        "Student minus its seed's weak teacher (mean [95% t interval])": outputs.paired_table(
            vs_teacher, [("accuracy", "Δ held-out acc.", 3)]
        ),
    }  # fmt: skip
    outputs.write_results(args, tables, res["meta"])
    return res


if __name__ == "__main__":
    main()
