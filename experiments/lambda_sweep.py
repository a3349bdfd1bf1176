"""(a) G-OPD reward scale: λ ∈ {0, 0.25, ..., 1.5} with reference = the student's initial weights.

    python -m experiments.lambda_sweep [--quick] [--seeds 5] [--out DIR] [--cache_dir DIR]

The target is log q_λ = λ log q + (1-λ) log r with r = the base (the student at step 0): λ = 0
distils the student towards itself (no signal), 0 < λ < 1 interpolates between base and teacher,
λ = 1 is plain OPD, λ > 1 extrapolates beyond the teacher (ExOPD, 1.25 in the paper). Estimator:
the cpu preset's OPD+ JSD, token level, γ = 0. Writes experiments/results/lambda_sweep/.
"""

from __future__ import annotations

import os

from experiments import common, outputs

NAME = "lambda_sweep"
LAMBDAS = (0.0, 0.25, 0.5, 0.75, 1.0, 1.25, 1.5)
QUICK_LAMBDAS = (1.0, 1.25)  # --quick: one compilation per λ, so fewer
PAIRED_METRICS = (("accuracy", "Δ held-out acc.", 3), ("kl_per_token", "Δ KL/tok", 4))
FULL = {"train.num_steps": 30, "train.eval_every": 5, "data.batch_size": 32}


def main(argv=None) -> dict:
    args = common.parse_args(NAME, __doc__.splitlines()[0], argv)
    variants = [
        common.Variant(
            f"λ={lam:g}",
            {"teachers.default.reward_scale": lam, "teachers.default.reference": "student_init"},
            {"lambda": lam},
        )
        for lam in (QUICK_LAMBDAS if args.quick else LAMBDAS)
    ]
    res = common.demo_experiment(args, variants, FULL, ["lambda"], __doc__.split("\n\n")[2])
    refs = {r["label"]: r for r in res["mean_refs"]}
    outputs.plot_vs_x(
        os.path.join(args.out, "vs_lambda.png"), res["summary"], "lambda",
        [("accuracy", "held-out accuracy"), ("kl_per_token", "KL(student‖teacher)/token")],
        refs=refs, title="G-OPD reward scale (reference = base)",
    )  # fmt: skip
    tables = {
        "Final held-out metrics (mean ± std over seeds)": res["table"],
        "Minus λ = 1 of the same seed (mean [95% t interval])": outputs.write_paired(
            args.out, res["runs"], "λ=1", PAIRED_METRICS
        ),
    }
    outputs.write_results(args, tables, res["meta"])
    return res


if __name__ == "__main__":
    main()
