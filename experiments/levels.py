"""(c) Token vs sequence level and the discount γ of the token-level reward-to-go.

    python -m experiments.levels [--quick] [--seeds 5] [--out DIR] [--cache_dir DIR]

The valid combinations (docs/math.md §2): token level with γ = 0 (myopic, common practice) or γ = 1
(unbiased for J_tok = E[Σ_t f(u_t)]), and sequence level (every token gets w_f(Π_t u_t); γ does
not enter). Each for reverse KL and JSD, with the OPD+ correction, λ = 1, the demo's base and
teacher; then the same at a 10× lower learning rate (1e-4), so that a collapse at 1e-3 is not
mistaken for the estimator's failure. Besides accuracy and KL, the table shows two saturation
diagnostics of the last 5 training steps: the mean |advantage| per token and the gradient norm
(a sequence-level JSD advantage is w_f(Π u_t), which is flat, ½ log 2 for JSD, once the
sequence ratio is far from 1: then |A| is constant and the gradient carries no signal). Writes
experiments/results/levels/.
"""

from __future__ import annotations

import os

from experiments import common, outputs

NAME = "levels"
DIVERGENCES = ("reverse_kl", "jsd")
LEVELS = (("token", 0.0), ("token", 1.0), ("sequence", 0.0))
QUICK_DIVERGENCES = ("jsd",)  # --quick: one compilation per variant, so fewer
QUICK_LEVELS = (("token", 0.0), ("sequence", 0.0))
LEARNING_RATES = (1e-3, 1e-4)  # PINNED's, and 10× lower
QUICK_LEARNING_RATES = (1e-3,)
DIAGNOSTICS = (
    ("train_advantage_abs_mean", "mean |A| (last 5)", 4),
    ("train_grad_norm", "grad norm (last 5)", 4),
)
PAIRED_METRICS = (("accuracy", "Δ held-out acc.", 3), ("kl_per_token", "Δ KL/tok", 4))
FULL = {"train.num_steps": 30, "train.eval_every": 5, "data.batch_size": 32}


def main(argv=None) -> dict:
    args = common.parse_args(NAME, __doc__.splitlines()[0], argv)
    variants = [
        common.Variant(
            f"{d} {level}" + (f" γ={g:g}" if level == "token" else "")
            + (f" lr {lr:g}" if lr != LEARNING_RATES[0] else ""),
            {"estimator.divergence": d, "estimator.level": level, "estimator.discount": g,
             "optimizer.learning_rate": lr},
            {"divergence": d, "level": level, "discount": g if level == "token" else "",
             "learning_rate": lr},
        )
        for lr in (QUICK_LEARNING_RATES if args.quick else LEARNING_RATES)
        for d in (QUICK_DIVERGENCES if args.quick else DIVERGENCES)
        for level, g in (QUICK_LEVELS if args.quick else LEVELS)
    ]  # fmt: skip
    desc = __doc__.split("\n\n")[2]
    columns = ["divergence", "level", "discount", "learning_rate"]
    res = common.demo_experiment(args, variants, FULL, columns, desc, metric_columns=DIAGNOSTICS)
    # Paired view: each level minus token level γ = 0 of the same divergence and learning rate.
    keys = [k for k, _, _ in PAIRED_METRICS]
    myopic = {(v.columns["divergence"], v.columns["learning_rate"]): v.label for v in variants
              if v.columns["level"] == "token" and v.columns["discount"] == 0.0}  # fmt: skip
    pairs = [(v.label, myopic[v.columns["divergence"], v.columns["learning_rate"]])
             for v in variants if v.label not in myopic.values()]  # fmt: skip
    paired = outputs.paired_by_pair(res["runs"], pairs, keys)
    outputs.write_csv(os.path.join(args.out, "paired_difference.csv"), paired)
    tables = {
        "Final held-out metrics (mean ± std over seeds)": res["table"],
        "Minus token level γ = 0 (same divergence, learning rate and seed; mean [95% t "
        "interval])": outputs.paired_table(paired, PAIRED_METRICS),
    }
    outputs.write_results(args, tables, res["meta"])
    return res


if __name__ == "__main__":
    main()
