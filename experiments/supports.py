"""(e) Support of the OPD term, and verifier rewards mixed in: sampled vs full vs teacher top-k.

    python -m experiments.supports [--quick] [--seeds 5] [--out DIR] [--cache_dir DIR]

The cpu preset's OPD+ JSD (token level, γ = 0, λ = 1) on the demo's base and teacher, with the
OPD term over the sampled token (`estimator.support=sampled`), the whole vocabulary (`full`:
the exact per-context divergence, unbiased for the same myopic gradient with less variance) or
the teacher's top 4 tokens (`teacher_topk`, renormalised or with a tail bucket: biased); then the
sampled term with the verifier's 0/1 reward mixed in (`reward.task_weight=1`, group-normalised
over a prompt's 4 samples), and the task reward alone (`reward.opd_weight=0`). Differences are
paired by seed (same prompts and rollout keys) against the sampled run, with 95% t intervals.
Writes experiments/results/supports/.
"""

from __future__ import annotations

from experiments import common, outputs

NAME = "supports"
FULL = {"train.num_steps": 30, "train.eval_every": 5, "data.batch_size": 32}
TOPK = {"estimator.support": "teacher_topk", "estimator.top_k": 4}
VARIANTS = (
    common.Variant("sampled", {}, {"support": "sampled", "task_weight": 0.0}),
    common.Variant("full", {"estimator.support": "full"}, {"support": "full", "task_weight": 0.0}),
    common.Variant("teacher top-4, renormalize", {**TOPK, "estimator.tail": "renormalize"},
                   {"support": "teacher_topk", "task_weight": 0.0}),
    common.Variant("teacher top-4, bucket", {**TOPK, "estimator.tail": "bucket"},
                   {"support": "teacher_topk", "task_weight": 0.0}),
    common.Variant("sampled + task reward", {"reward.task_weight": 1.0},
                   {"support": "sampled", "task_weight": 1.0}),
    common.Variant("task reward only", {"reward.task_weight": 1.0, "reward.opd_weight": 0.0},
                   {"support": "sampled", "task_weight": 1.0}),
)  # fmt: skip
QUICK_LABELS = ("sampled", "full")  # --quick: one compilation per variant, so fewer
PAIRED_METRICS = (
    ("accuracy", "Δ held-out acc.", 3),
    ("kl_per_token", "Δ KL(student‖teacher)/tok", 4),
)


def main(argv=None) -> dict:
    args = common.parse_args(NAME, __doc__.splitlines()[0], argv)
    variants = [v for v in VARIANTS if not args.quick or v.label in QUICK_LABELS]
    desc = __doc__.split("\n\n")[2]
    res = common.demo_experiment(args, variants, FULL, ["support", "task_weight"], desc)
    tables = {
        "Final held-out metrics (mean ± std over seeds)": res["table"],
        "Minus the sampled run of the same seed (mean [95% t interval])": outputs.write_paired(
            args.out, res["runs"], "sampled", PAIRED_METRICS
        ),
    }
    outputs.write_results(args, tables, res["meta"])
    return res


if __name__ == "__main__":
    main()
