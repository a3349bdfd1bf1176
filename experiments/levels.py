"""(c) Token vs sequence level and the discount γ of the token-level reward-to-go.

    python -m experiments.levels [--quick] [--seeds 3] [--out DIR] [--cache_dir DIR]

The valid combinations (docs/math.md §2): token level with γ = 0 (myopic, common practice) or γ = 1
(unbiased for J_tok = E[Σ_t f(u_t)]), and sequence level (every token gets w_f(Π_t u_t); γ does
not enter). Each for reverse KL and JSD, with the OPD+ correction, λ = 1, the demo's base and
teacher. Writes experiments/results/levels/.
"""

from __future__ import annotations

from experiments import common, outputs

NAME = "levels"
DIVERGENCES = ("reverse_kl", "jsd")
LEVELS = (("token", 0.0), ("token", 1.0), ("sequence", 0.0))
QUICK_DIVERGENCES = ("jsd",)  # --quick: one compilation per variant, so fewer
QUICK_LEVELS = (("token", 0.0), ("sequence", 0.0))
FULL = {"train.num_steps": 30, "train.eval_every": 5, "data.batch_size": 32}


def main(argv=None) -> dict:
    args = common.parse_args(NAME, __doc__.splitlines()[0], argv)
    variants = [
        common.Variant(
            f"{d} {level}" + (f" γ={g:g}" if level == "token" else ""),
            {"estimator.divergence": d, "estimator.level": level, "estimator.discount": g},
            {"divergence": d, "level": level, "discount": g if level == "token" else ""},
        )
        for d in (QUICK_DIVERGENCES if args.quick else DIVERGENCES)
        for level, g in (QUICK_LEVELS if args.quick else LEVELS)
    ]
    desc = __doc__.split("\n\n")[2]
    res = common.demo_experiment(args, variants, FULL, ["divergence", "level", "discount"], desc)
    outputs.write_results(args, {"Final held-out metrics (mean ± std over seeds)": res["table"]},
                         res["meta"])  # fmt: skip
    return res


if __name__ == "__main__":
    main()
