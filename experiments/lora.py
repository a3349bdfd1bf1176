"""(f) LoRA students: rank-8 adapters vs full fine-tuning in the demo's distillation.

    python -m experiments.lora [--quick] [--seeds 5] [--out DIR] [--cache_dir DIR]

The cpu preset's OPD+ JSD (token level, γ = 0, λ = 1) on the demo's base and teacher, training
every weight or only LoRA adapters of rank 8 (alpha 16) on every attention and MLP projection
(`lora.rank=8`, through qwix), at the preset's learning rate 1e-3 and at 3e-3. Reported per run:
held-out accuracy, KL to the teacher, and the mean wall time of the update (`time/update`,
scoring and the optimizer step) over the last 5 steps; the trainable parameter counts are
printed. Differences are paired by seed against full fine-tuning, with 95% t intervals.
Writes experiments/results/lora/.
"""

from __future__ import annotations

from experiments import common, outputs
from opdplus_jax import demo, lora, models

NAME = "lora"
FULL = {"train.num_steps": 30, "train.eval_every": 5, "data.batch_size": 32}
VARIANTS = (
    common.Variant("full fine-tuning", {}, {"lora_rank": 0, "learning_rate": 1e-3}),
    common.Variant("LoRA r=8", {"lora.rank": 8}, {"lora_rank": 8, "learning_rate": 1e-3}),
    common.Variant("LoRA r=8, lr 3e-3", {"lora.rank": 8, "optimizer.learning_rate": 3e-3},
                   {"lora_rank": 8, "learning_rate": 3e-3}),
)  # fmt: skip
QUICK_LABELS = ("full fine-tuning", "LoRA r=8")
PAIRED_METRICS = (
    ("accuracy", "Δ held-out acc.", 3),
    ("kl_per_token", "Δ KL(student‖teacher)/tok", 4),
    ("train_time/update", "Δ update seconds", 3),
)


def trainable_counts(cache_dir: str) -> dict[str, int]:
    """Trainable parameters of the demo's base: every weight, and rank-8 adapters."""
    config = demo.distill_config("cpu", cache_dir, {})
    base = models.from_pretrained(config.student.path)
    adapted = lora.apply(base, lora.LoraSpec(rank=8, alpha=16.0), rng=0)
    return {"full": base.config.num_params(), "lora_r8": lora.num_adapter_params(adapted)}


def main(argv=None) -> dict:
    args = common.parse_args(NAME, __doc__.splitlines()[0], argv)
    variants = [v for v in VARIANTS if not args.quick or v.label in QUICK_LABELS]
    desc = __doc__.split("\n\n")[2]
    res = common.demo_experiment(args, variants, FULL, ["lora_rank", "learning_rate"], desc)
    counts = trainable_counts(common.build_dir(args, 0))
    res["meta"]["trainable_parameters"] = counts
    time_summary = outputs.summary_table(
        res["summary"], ["label"], [("train_time/update", "update seconds (last 5 steps)", 3)]
    )
    counts_table = outputs.markdown_table(
        ["student", "trainable parameters"],
        [["full fine-tuning", f"{counts['full']:,}"], ["LoRA r=8", f"{counts['lora_r8']:,}"]],
    )
    tables = {
        "Final held-out metrics (mean ± std over seeds)": res["table"],
        "Update time per step (mean ± std over seeds)": time_summary,
        "Trainable parameters": counts_table,
        "Minus full fine-tuning of the same seed (mean [95% t interval])": outputs.write_paired(
            args.out, res["runs"], "full fine-tuning", PAIRED_METRICS
        ),
    }
    outputs.write_results(args, tables, res["meta"])
    return res


if __name__ == "__main__":
    main()
