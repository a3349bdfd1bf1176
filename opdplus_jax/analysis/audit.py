"""Bias audit of a training config: the exact bias, variance and direction of the estimator it
configures, next to the alternatives, on a tabular problem.

    opdplus-audit --config=configs/default.py:cpu [--vocab 3 --horizon 3 --distance 1.0] [--json]
    python -m opdplus_jax.analysis.audit --config=configs/default.py:qwen3_exopd --json

The config's estimator (divergence and its parameters, correction, level, discount, the first
teacher's reward scale, log-ratio clip, baseline, loss aggregation) is evaluated exactly
(`analysis.exact`: every batch of sequences enumerated) on a random tabular policy over
`--vocab` tokens and `--horizon` steps, with a teacher at `--distance` from the student. Each
row reports, against the gradient of the objective that row's level and discount aim at (the
`target`, scaled by the aggregation's constant):

- relative_bias |E[g] - target| / |target|, variance (trace of one draw's covariance) and the
  cosine between E[g] and the target;
- the alternatives: OPD+, stop-gradient in the registered gauge and in the sublinear gauge (the
  generator shifted by c (1 - u) with c = lim f(u)/u, so that f(u)/u -> 0 as for reverse KL's
  -log u; none exists when f grows faster than u, as forward KL's u log u), the other discounts
  and level, other aggregations, a leave-one-out baseline, a log-ratio clip, teacher top-k
  support; and peer defaults as named presets.

Groups (baselines) are enumerated with `--group` samples per prompt (default 2): the exact
expectation sums over |sequences|^group batches.
"""

from __future__ import annotations

import dataclasses
import json
import math
import sys
import time
from typing import Any

import jax
import jax.numpy as jnp
from absl import flags
from ml_collections import config_flags

from opdplus_jax import divergences, losses
from opdplus_jax.analysis.exact import Estimator, Problem, evaluate

GROUP = 2  # samples per prompt when a row has a group baseline (enumeration cost: |Y|^GROUP)


def target_name(level: str, discount: float, discount_objective: bool = False) -> str:
    """The objective an estimator of this level and discount is unbiased for (when corrected)."""
    if level == "sequence":
        return "grad D_f(pi ‖ nu) over whole sequences"
    if discount == 0.0:
        return "myopic gradient (token level, gamma=0): sum_t E[d_t D_t]"
    if discount_objective:
        return f"grad E[sum_t {discount:g}^t D_t]"
    if discount == 1.0:
        return "grad E[sum_t D_t] (token level, gamma=1)"
    return f"G_gamma (token level, reward-to-go discounted by gamma={discount:g})"


@dataclasses.dataclass(frozen=True)
class Row:
    name: str
    estimator: Any  # exact.Estimator
    gauge: float | None = None  # the shift c added to the registered generator (None: none)
    configured: bool = False


def configured_estimator(config, vocab: int | None = None) -> Any:
    """The `exact.Estimator` of a training config (first teacher's reward scale). A top-k
    support keeps min(top_k, `vocab`) tokens of the tabular problem's vocabulary."""
    est = config.estimator
    teacher = next(iter(config.teachers.values()))
    baseline = est.baseline
    support = {}
    if est.support != "sampled":
        top_k = est.top_k if vocab is None or est.top_k is None else min(est.top_k, vocab)
        support = {"full_vocab": True, "support": est.support, "top_k": top_k,
                   "tail": est.tail or "renormalize"}  # fmt: skip
    return Estimator(
        **support,
        divergence=divergences.in_gauge(
            divergences.get(est.divergence, **dict(est.divergence_params)), est.gauge
        ),
        correction=est.correction,
        level=est.level,
        discount=float(est.discount),
        reward_scale=float(teacher.reward_scale),
        log_ratio_clip=est.log_ratio_clip,
        aggregation=config.loss.aggregation,
        batch_size=GROUP if baseline is not None else 1,
        baseline=baseline,
    )


def rows_for(config, vocab: int | None = None) -> list[Row]:
    """The configured estimator, its alternatives and the peer presets."""
    configured = configured_estimator(config, vocab)
    rep = dataclasses.replace
    registered = divergences.get(
        config.estimator.divergence, **dict(config.estimator.divergence_params)
    )
    shift = None if configured.divergence == registered else configured.divergence.c
    rows = [Row("configured", configured, gauge=shift, configured=True)]
    # The sampled-token alternatives (of the same divergence, level, discount, ...), registered
    # gauge.
    base = rep(configured, divergence=registered, full_vocab=False, support="full", top_k=None,
               tail="renormalize")  # fmt: skip
    if configured.full_vocab:
        rows.append(Row("support=sampled", base))
    rows.append(Row("opd_plus", rep(base, correction="opd_plus")))
    rows.append(Row("stop_grad, registered gauge", rep(base, correction="stop_grad")))
    c = divergences.sublinear_gauge(base.divergence)
    if c is not None and c != 0.0:
        gauged = divergences.with_gauge(base.divergence, c)
        rows.append(Row(f"stop_grad, sublinear gauge c={c:.4g}",
                        rep(base, divergence=gauged, correction="stop_grad"), gauge=c))  # fmt: skip
    other_level = "token" if base.level == "sequence" else "sequence"
    rows.append(Row(f"level={other_level}", rep(base, level=other_level, discount=0.0)))
    if base.level == "token":
        for gamma in (0.0, 1.0):
            if gamma != base.discount:
                rows.append(Row(f"discount={gamma:g}", rep(base, discount=gamma)))
    for agg in losses.AGGREGATIONS.names():
        if agg != base.aggregation:
            rows.append(Row(f"aggregation={agg}", rep(base, aggregation=agg)))
    if base.baseline is None:
        rows.append(Row("baseline=loo", rep(base, baseline="loo", batch_size=GROUP)))
    else:
        rows.append(Row("baseline=None", rep(base, baseline=None, batch_size=1)))
    if base.log_ratio_clip is None:
        rows.append(Row("log_ratio_clip=1", rep(base, log_ratio_clip=1.0)))
    if base.level == "token" and base.correction == "opd_plus":
        full = rep(base, full_vocab=True, log_ratio_clip=None, baseline=None, batch_size=1)
        if configured.support != "full" or not configured.full_vocab:
            rows.append(Row("support=full", full))
        if base.reward_scale == 1.0:
            topk = rep(full, support="teacher_topk", top_k=2, tail="renormalize")
            rows.append(Row("support=teacher top-2, renormalised", topk))
    # Peer defaults, whatever the config says.
    rkl = divergences.get("reverse_kl")
    token = {"level": "token", "reward_scale": 1.0, "log_ratio_clip": None, "baseline": None,
             "batch_size": 1, "aggregation": "token_mean"}  # fmt: skip
    rows += [
        Row("peer: per-token reverse KL, discount 1, token mean",
            Estimator(rkl, "stop_grad", discount=1.0, **token)),
        Row("peer: k3 penalty (u - 1 - log u), stop-grad, token mean",
            Estimator(divergences.with_gauge(rkl, -1.0), "stop_grad", discount=0.0, **token),
            gauge=-1.0),
        Row("peer: teacher top-2 renormalised, token mean",
            Estimator(rkl, "opd_plus", full_vocab=True, support="teacher_topk", top_k=2,
                      tail="renormalize", **token)),
        Row("peer: reverse KL, discount 0, token mean",
            Estimator(rkl, "stop_grad", discount=0.0, **token)),
    ]  # fmt: skip
    return rows


def audit(
    config,
    *,
    vocab: int = 3,
    horizon: int = 3,
    distance: float = 1.0,
    seed: int = 0,
    eos: bool = True,
):
    """One dict per row: name, divergence, correction, gauge, level, discount, aggregation,
    baseline, relative_bias, variance, cosine, target, configured. With `eos` the last token id
    ends a response (lengths 1..horizon, so that token means weigh responses unequally)."""
    out = []
    with jax.enable_x64(True):
        problem = Problem.random(seed, vocab_size=vocab, horizon=horizon,
                                 teacher_distance=distance,
                                 eos_id=vocab - 1 if eos else None)  # fmt: skip
        for row in rows_for(config, vocab):
            e = row.estimator
            report = evaluate(problem, e)
            mean, target = report.expectation.ravel(), report.target.ravel()
            norms = float(jnp.linalg.norm(mean) * jnp.linalg.norm(target))
            name = e.divergence if isinstance(e.divergence, str) else str(e.divergence)
            out.append({
                "name": row.name,
                "divergence": name,
                "correction": e.correction + (" (full vocabulary)" if e.full_vocab else ""),
                "gauge": row.gauge,
                "level": e.level,
                "discount": e.discount,
                "aggregation": e.aggregation,
                "baseline": e.baseline,
                "relative_bias": report.relative_bias,
                "variance": report.variance,
                "cosine": float(mean @ target) / norms if norms > 0 else math.nan,
                "target": target_name(e.level, e.discount, e.discount_objective),
                "configured": row.configured,
            })  # fmt: skip
    return out


def to_table(rows: list[dict]) -> str:
    lines = [
        "| estimator | correction | gauge | rel. bias | variance | cosine | unbiased target |",
        "|---|---|---:|---:|---:|---:|---|",
    ]
    for r in rows:
        gauge = "registered" if r["gauge"] is None else f"{r['gauge']:+.4g}(1-u)"
        mark = " **(configured)**" if r["configured"] else ""
        lines.append(
            f"| {r['name']}{mark} | {r['correction']} | {gauge} | {r['relative_bias']:.3g} | "
            f"{r['variance']:.3g} | {r['cosine']:+.3f} | {r['target']} |"
        )
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> None:
    flag_values = flags.FlagValues()
    config = config_flags.DEFINE_config_file(
        "config", None, "Training config file[:preset].", flag_values=flag_values
    )
    vocab = flags.DEFINE_integer("vocab", 3, "Tabular vocabulary size.", flag_values=flag_values)
    horizon = flags.DEFINE_integer("horizon", 3, "Response length.", flag_values=flag_values)
    distance = flags.DEFINE_float(
        "distance", 1.0, "Teacher-student distance (logit noise scale).", flag_values=flag_values
    )
    seed = flags.DEFINE_integer("seed", 0, "Problem seed.", flag_values=flag_values)
    eos = flags.DEFINE_bool(
        "eos", True, "The last token ends a response (variable lengths).", flag_values=flag_values
    )
    as_json = flags.DEFINE_bool("json", False, "One JSON object per row.", flag_values=flag_values)
    argv = sys.argv if argv is None else argv
    try:
        flag_values(argv)
    except flags.Error as e:
        sys.exit(f"opdplus-audit: {e}")
    if config.value is None:
        sys.exit("opdplus-audit: pass --config=configs/default.py:<preset>")
    start = time.perf_counter()
    try:
        rows = audit(config.value, vocab=vocab.value, horizon=horizon.value,
                     distance=distance.value, seed=seed.value, eos=eos.value)  # fmt: skip
    except (ValueError, KeyError) as e:
        sys.exit(f"opdplus-audit: {e}")
    if as_json.value:
        for r in rows:
            print(json.dumps(r))
        return
    lengths = f"EOS = token {vocab.value - 1}" if eos.value else "fixed length"
    print(f"Exact bias audit of {rows[0]['divergence']}: tabular policy V={vocab.value}, "
          f"T={horizon.value} ({lengths}), teacher distance {distance.value}, seed {seed.value}; "
          f"baselines over groups of {GROUP}\n")  # fmt: skip
    print(to_table(rows))
    print(f"\nrel. bias = |E[g] - target| / |target|; cosine of E[g] with the target; variance = "
          f"trace of one draw's covariance. ({time.perf_counter() - start:.0f} s)")  # fmt: skip


if __name__ == "__main__":
    main()
