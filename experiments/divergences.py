"""(b) Divergence × correction: does the OPD+ estimator beat stop-grad for f ≠ reverse KL?

    python -m experiments.divergences [--quick] [--seeds 5] [--out DIR] [--cache_dir DIR]

divergence ∈ {reverse_kl, forward_kl, jsd, tv, hellinger} × correction ∈ {stop_grad, opd_plus};
token level, γ = 0, λ = 1 (plain OPD), the demo's base and teacher. For reverse KL both
corrections give the same expected gradient (OPD+ only adds the zero-mean constant -1); for every
other f the stop-grad advantage -f(u) is biased and OPD+'s u f'(u) - f(u) is not. Stop-grad
depends on how f is written (its gauge f + c (1 - u), the same divergence): it also runs in the
sublinear gauge (`estimator.gauge=sublinear`: c = lim f(u)/u, the convention reverse KL is
registered in; JSD, TV, Hellinger; forward KL has none). Paired differences (same seed) with 95%
t intervals. Writes experiments/results/divergences/.
"""

from __future__ import annotations

import os

from experiments import common, outputs

NAME = "divergences"
DIVERGENCES = ("reverse_kl", "forward_kl", "jsd", "tv", "hellinger")
CORRECTIONS = ("stop_grad", "opd_plus")
SUBLINEAR = ("jsd", "tv", "hellinger")  # a nonzero sublinear gauge (reverse KL's is 0)
QUICK_DIVERGENCES = ("jsd",)  # --quick: one compilation per variant, so fewer
FULL = {"train.num_steps": 30, "train.eval_every": 5, "data.batch_size": 32}
PAIRED_METRICS = (("accuracy", "Δ held-out acc.", 3), ("kl_per_token", "Δ KL/tok", 4))


def main(argv=None) -> dict:
    args = common.parse_args(NAME, __doc__.splitlines()[0], argv)
    divs = QUICK_DIVERGENCES if args.quick else DIVERGENCES
    variants = [
        common.Variant(
            f"{d} {c}",
            {"estimator.divergence": d, "estimator.correction": c},
            {"divergence": d, "correction": c, "gauge": "registered"},
        )
        for d in divs
        for c in CORRECTIONS
    ]
    variants += [
        common.Variant(
            f"{d} stop_grad sublinear",
            {
                "estimator.divergence": d,
                "estimator.correction": "stop_grad",
                "estimator.gauge": "sublinear",
            },
            {"divergence": d, "correction": "stop_grad", "gauge": "sublinear"},
        )
        for d in divs
        if d in SUBLINEAR
    ]
    desc = __doc__.split("\n\n")[2]
    res = common.demo_experiment(args, variants, FULL, ["divergence", "correction", "gauge"], desc)
    # Paired view (same seed: same data order and rollout keys): OPD+ minus each stop-grad arm.
    keys = [k for k, _, _ in PAIRED_METRICS]
    pairs = [(f"{d} opd_plus", arm) for d in divs
             for arm in (f"{d} stop_grad", f"{d} stop_grad sublinear")]  # fmt: skip
    paired = [{"divergence": row["label"].split()[0], **row}
              for row in outputs.paired_by_pair(res["runs"], pairs, keys)]  # fmt: skip
    outputs.write_csv(os.path.join(args.out, "paired_difference.csv"), paired)
    outputs.plot_bars(
        os.path.join(args.out, "paired_difference.png"),
        [{**p, **{f"{k}_mean": p[f"{k}_diff"] for k in keys},
          **{f"{k}_std": 0.0 for k in keys}} for p in paired],
        lambda p: f"{p['label']} − {p['against']}",
        [("accuracy", "Δ accuracy (OPD+ − stop-grad)"), ("kl_per_token", "Δ KL/token")],
        title="OPD+ minus stop-grad, paired by seed",
    )  # fmt: skip
    tables = {
        "Final held-out metrics (mean ± std over seeds)": res["table"],
        "OPD+ minus stop-grad, paired by seed (mean [95% t interval])": outputs.paired_table(
            paired, PAIRED_METRICS
        ),
    }
    outputs.write_results(args, tables, res["meta"])
    return res


if __name__ == "__main__":
    main()
