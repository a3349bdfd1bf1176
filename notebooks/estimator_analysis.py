# ---
# jupyter:
#   jupytext:
#     formats: py:percent
#     text_representation:
#       extension: .py
#       format_name: percent
#   kernelspec:
#     display_name: Python 3
#     language: python
#     name: python3
# ---

# %% [markdown]
# # Exact bias and variance of every OPD estimator
#
# On-policy distillation trains a student π on its own samples y ~ π with a per-token advantage
# built from the student's and the teacher's log-probabilities, u_t = q(y_t|c_t) / π(y_t|c_t).
# This notebook measures, **exactly**, what each estimator configuration of `opdplus_jax`
# estimates: its expectation, its bias against the gradient it is meant to follow, and the
# variance of one draw.
#
# Everything runs on a tabular autoregressive policy (one logits row per prefix, vocabulary V,
# horizon T; docs/math.md §8.1). With all V^T sequences enumerated, an estimator's expectation
# is a finite sum over sequences of P(y) · ∇(surrogate loss), computed through the library's own
# code path (`estimators.advantages` → `losses.pg_loss`, or `fullvocab` for the analytic
# estimator). The targets are autodiff gradients of the divergences written directly in π and q
# (`analysis.closed_forms`), so the two sides share no code. All numbers are float64.
#
# Notation (docs/math.md §0, §2): s_t = ∇ log π(y_t|c_t); J_seq = D(π(y) ‖ q(y)) over whole
# sequences; J_tok = E_π[Σ_t D(π(·|c_t) ‖ q(·|c_t))]; G_γ = Σ_s Σ_{t≥s} γ^{t-s} ∂_s J_t, so
# G_1 = ∇J_tok and G_0 is the "myopic" gradient with the context distribution held fixed.
#
# * relative bias = ‖E[ĝ] − ∇J‖ / ‖∇J‖;
# * variance = trace of the covariance of one draw (batch of one sequence).
#
# Set `OPDPLUS_NOTEBOOK_SMALL=1` to shrink every sweep (the test suite runs the notebook that
# way, in about half a minute). Full mode takes a few minutes on two CPU cores and also writes
# the figures to `notebooks/figures/`, whether it runs in Jupyter or as a plain script
# (`python notebooks/estimator_analysis.py`).

# %%
import os
from pathlib import Path

import jax

jax.config.update("jax_enable_x64", True)

import jax.numpy as jnp
import matplotlib.pyplot as plt
import numpy as np

from opdplus_jax import analysis, divergences
from opdplus_jax.analysis import report

SMALL = os.environ.get("OPDPLUS_NOTEBOOK_SMALL", "0") not in ("", "0")
SEED = 0
ALL = divergences.names()
HERE = Path(__file__).resolve().parent if "__file__" in globals() else Path.cwd()
FIGURES = HERE / "figures"
print(f"{'small' if SMALL else 'full'} mode; divergences: {', '.join(ALL)}")


def show(header, rows):
    """Print pre-formatted rows as a markdown table."""
    print("| " + " | ".join(header) + " |")
    print("|" + "---|" * len(header))
    for row in rows:
        print("| " + " | ".join(row) + " |")
    print()


def save(fig, name):
    """Write a figure under notebooks/figures/ in full mode only."""
    if not SMALL:
        FIGURES.mkdir(exist_ok=True)
        fig.savefig(FIGURES / name, dpi=80, bbox_inches="tight")


def norm(x):
    return float(jnp.linalg.norm(x))


# %% [markdown]
# ## 1. All divergences × {stop-grad, OPD+} × {sequence, token γ=0, token γ=1}
#
# One random problem: V = 3, T = 3 (27 sequences); the teacher's logits are the student's plus
# N(0, 1) noise. For each divergence and level we evaluate both corrections
# (`analysis.report.LEVELS` are the same three levels as `python -m opdplus_jax.analysis.report`,
# which prints the OPD+ columns of this table for any V, T and seed):
#
# * **stop-grad** ascends the advantage −f(u). Its expectation misses the pathwise term of the
#   θ-dependent reward, −E[φ'(ℓ) s] (docs/math.md §1.1-§1.3 and the table of §7). That term
#   vanishes only for reverse KL (φ' ≡ 1 and E[s] = 0).
# * **OPD+** ascends w_f(u) = u f'(u) − f(u), which puts the pathwise term back. It is unbiased
#   for ∇J_seq at sequence level and for G_γ at token level (docs/math.md §2.3).
#
# The "stop-grad cos" column is the cosine between E[ĝ_sg] and the target. For α-divergences
# in this gauge, stop-grad estimates exactly (1/α) ∇D_α (docs/math.md §1.4): α = ½ gives relative
# bias 1 with cosine 1, i.e. the right direction at twice the scale. A negative cosine means
# that a small stop-grad step *increases* the divergence: stop-grad follows ∇D_G (math §1.5),
# and D_G is not the divergence (for standardized generators it is unbounded below, and its
# descent collapses π).

# %%
problem = analysis.Problem.random(SEED, vocab_size=3, horizon=3, teacher_distance=1.0)
TABLE_DIVERGENCES = ("reverse_kl", "jsd") if SMALL else ALL
reports = {
    (name, level, gamma, correction): analysis.evaluate(
        problem, analysis.Estimator(name, correction, level, gamma)
    )
    for name in TABLE_DIVERGENCES
    for level, gamma in report.LEVELS
    for correction in ("stop_grad", "opd_plus")
}
rows = []
for name in TABLE_DIVERGENCES:
    for level, gamma in report.LEVELS:
        sg = reports[name, level, gamma, "stop_grad"]
        plus = reports[name, level, gamma, "opd_plus"]
        cos = float(jnp.vdot(sg.expectation, sg.target)) / (norm(sg.expectation) * norm(sg.target))
        rows.append(
            [
                name,
                level if level == "sequence" else f"token, γ={gamma:g}",
                f"{sg.relative_bias:.3g}",
                f"{cos:.3f}",
                f"{plus.relative_bias:.1e}",
                f"{sg.variance:.3g}",
                f"{plus.variance:.3g}",
            ]
        )
show(
    [
        "divergence",
        "level",
        "stop-grad rel. bias",
        "stop-grad cos",
        "OPD+ rel. bias",
        "stop-grad variance",
        "OPD+ variance",
    ],
    rows,
)
worst_plus = max(r.relative_bias for k, r in reports.items() if k[3] == "opd_plus")
print(f"largest OPD+ relative bias: {worst_plus:.1e}")
assert worst_plus < 1e-9

# %% [markdown]
# Reading the table:
#
# * OPD+ is unbiased to float64 round-off at every level, for every divergence.
# * Stop-grad is exact only for reverse KL. Elsewhere its relative bias is O(1): the estimator
#   follows a different objective, ∇D_G with G(u) = ∫ f(s)/s ds (docs/math.md §1.5).
# * On this problem, stop-grad points away from the descent direction (negative cosine) for
#   forward KL, skew forward KL, JSD, TV, Hellinger and Neyman χ², at every level. Skew reverse
#   KL (α = 0.1, close to reverse KL) keeps the direction with a 13–17% bias.
# * OPD+ does not always cost variance. For reverse KL its advantage is log u − 1, and the −1 is
#   a zero-mean constant that only adds variance (0.51 → 0.99 at token level, γ = 0), so there a
#   baseline (or plain stop-grad, which is unbiased for reverse KL) is the better choice. For
#   forward KL, skew forward KL, JSD, TV and Hellinger, OPD+ is both unbiased and lower-variance
#   than stop-grad. The χ² family has heavy-tailed weights at either correction (docs/math.md §1.3,
#   rule N3).

# %% [markdown]
# ### 1b. Stop-grad in two gauges
#
# f and f + c (1 − u) define the same divergence (E_π[u − 1] = 0), so OPD+ is the same estimator
# in every gauge, but stop-grad's advantage −f(u) is not (docs/math.md §1.4). Above, JSD, TV and
# Hellinger use their registered, standardised generators (f'(1) = 0). In the *sublinear* gauge
# (`estimator.gauge = "sublinear"`: c = lim f(u)/u, so that f + c (1 − u) grows more slowly than
# u, as reverse KL's −log u does) stop-grad's surrogate stays bounded where the student puts
# little mass, and its expectation turns towards the gradient. Forward KL (u log u) has no such
# gauge. Same problem and levels; cosine to the target.

# %%
GAUGE_DIVERGENCES = tuple(
    n for n in TABLE_DIVERGENCES if divergences.sublinear_gauge(n) not in (None, 0.0)
)
rows = []
for name in GAUGE_DIVERGENCES:
    gauged = divergences.in_gauge(name, "sublinear")
    for level, gamma in report.LEVELS:
        cells = [name, level if level == "sequence" else f"token, γ={gamma:g}"]
        for d in (name, gauged):
            r = analysis.evaluate(problem, analysis.Estimator(d, "stop_grad", level, gamma))
            cos = float(jnp.vdot(r.expectation, r.target)) / (norm(r.expectation) * norm(r.target))
            cells += [f"{r.relative_bias:.3g}", f"{cos:+.3f}"]
        rows.append(cells)
show(
    ["divergence", "level", "registered: rel. bias", "registered: cos",
     "sublinear: rel. bias", "sublinear: cos"],
    rows,
)  # fmt: skip

# %% [markdown]
# In the sublinear gauge stop-grad points along the target at every level (cosine close to 1)
# but stays biased in scale and direction; OPD+ is unbiased in either gauge. The trainer's
# divergences experiment runs both stop-grad gauges (experiments/README.md, (b)).

# %% [markdown]
# ## 2. Teacher–student distance
#
# The teacher is the student plus `teacher_distance` × N(0, 1) logit noise; we sweep the
# distance at the token level with γ = 0 (the common per-token practice). OPD+ stays at
# round-off for every distance (math §2.3). Stop-grad does not become unbiased as the teacher
# approaches the student.
#
# **The limit d → 0.** Near u = 1, f(u) ≈ f'(1)(u − 1) + ½ f''(1)(u − 1)², and E_π[u − 1] = 0.
# So J ≈ ½ f''(1) E_π[(u − 1)²], and its gradient is first order in q − π:
# ∇J ≈ f''(1) ∇KL(q‖π). The stop-grad expectation E[f(u) s] is also first order, but it comes
# from the *linear* term: f'(1) E_π[(u − 1) s] = −f'(1) ∇KL(q‖π), the gauge shift of math §1.4.
# Hence E[ĝ_sg] → −(f'(1)/f''(1)) ∇J, and the relative bias tends to |1 + f'(1)/f''(1)|:
#
# * 0 for reverse KL (f = −log u);
# * 1 for every standardized generator (f'(1) = 0: JSD, Hellinger, both χ²), where stop-grad
#   loses the signal;
# * 1 for α = ½ at every distance (exactly 2∇D_α);
# * 2 for forward KL, whose stop-grad expectation tends to −∇J (an ascent direction);
# * 0.11 and 2.11 for the skew reverse and skew forward KL (α = 0.1).
#
# The column "limit d→0" evaluates this formula with autodiff of each generator f(log u). TV is
# not twice differentiable at u = 1, so the formula does not apply to it.

# %%
DISTANCES = (0.5,) if SMALL else (0.25, 0.5, 1.0, 1.5, 2.0)
SWEEP_DIVERGENCES = ("reverse_kl", "jsd") if SMALL else ALL
distance_bias = {}
for distance in DISTANCES:
    p = analysis.Problem.random(SEED, vocab_size=3, horizon=3, teacher_distance=distance)
    for name in SWEEP_DIVERGENCES:
        for correction in ("stop_grad", "opd_plus"):
            est = analysis.Estimator(name, correction, "token", 0.0)
            distance_bias[name, correction, distance] = analysis.evaluate(p, est).relative_bias
limit = {}
for name in SWEEP_DIVERGENCES:
    f = divergences.get(name).f  # the generator as a function of log u
    df, d2f = float(jax.grad(f)(0.0)), float(jax.grad(jax.grad(f))(0.0))
    f1, f2 = df, d2f - df  # f'(1) and f''(1) from the derivatives in log u
    limit[name] = abs(1.0 + f1 / f2) if f2 > 0 else float("nan")

show(
    [
        "divergence",
        *(f"stop-grad rel. bias, d={d:g}" for d in DISTANCES),
        "limit d→0",
        "max OPD+ rel. bias",
    ],
    [
        [
            name,
            *(f"{distance_bias[name, 'stop_grad', d]:.3g}" for d in DISTANCES),
            f"{limit[name]:.3g}" if np.isfinite(limit[name]) else "—",
            f"{max(distance_bias[name, 'opd_plus', d] for d in DISTANCES):.1e}",
        ]
        for name in SWEEP_DIVERGENCES
    ],
)

fig, (ax1, ax2) = plt.subplots(1, 2, figsize=(11, 4.2))
for i, name in enumerate(SWEEP_DIVERGENCES):
    color = f"C{i}"
    sg = [distance_bias[name, "stop_grad", d] for d in DISTANCES]
    plus = [max(distance_bias[name, "opd_plus", d], 1e-17) for d in DISTANCES]
    ax2.plot(DISTANCES, plus, "x--", c=color, label=name)
    if name == "reverse_kl":
        ax2.plot(DISTANCES, sg, "o-", c=color, label="reverse_kl, stop-grad")
        continue
    ax1.plot(DISTANCES, sg, "o-", c=color, label=name)
    if np.isfinite(limit[name]):
        ax1.plot([0.0], [limit[name]], "<", c=color, ms=7)
ax1.set(
    xlabel="teacher distance (std of the logit noise)",
    ylabel="relative bias",
    xlim=(-0.05, None),
    title="Stop-grad, token level, γ=0 (◀: limit d→0)",
)
ax2.set(
    yscale="log",
    ylim=(1e-17, 1e-13),
    xlabel="teacher distance (std of the logit noise)",
    ylabel="relative bias",
    title="OPD+ (dashed) and reverse-KL stop-grad (solid)",
)
ax1.legend(fontsize=7, ncol=2)
ax2.legend(fontsize=6, ncol=2)
save(fig, "distance_bias.png")

# %% [markdown]
# ## 3. Horizon: sequence vs token level
#
# For T ∈ {1, 2, 3, 4} (V = 3, a fresh random problem per T) we compare the OPD+ estimators at
# sequence level (every token gets w_f(Π_t u_t); math §2.3) and at token level with γ = 1 and
# γ = 0 (§2.3). At T = 1 the three coincide. As T grows, the sequence-level weight depends on
# the whole log-ratio L = Σ_t ℓ_t, which grows like T (rule N4), while the token-level weights
# only see one token plus a sum of bounded per-token rewards. "rel. variance" divides the
# variance by ‖∇J‖², the squared norm of the estimator's own target, so estimators of different
# objectives are comparable.
#
# The last column is the bias of discount 0 against the full token-level gradient:
# ‖E[ĝ_{γ=0}] − ∇J_tok‖ / ‖∇J_tok‖ = ‖G_0 − G_1‖ / ‖G_1‖ (docs/math.md §2.3). It is 0 at T = 1 and
# grows with the number of later tokens whose context distribution discount 0 ignores.

# %%
HORIZONS = (3,) if SMALL else (1, 2, 3, 4)  # a new shape costs seconds of compilation
HORIZON_DIVERGENCES = ("jsd",) if SMALL else ("reverse_kl", "forward_kl", "jsd", "tv", "hellinger")
HORIZON_ESTIMATORS = {
    "sequence": ("sequence", 0.0),
    "token γ=1": ("token", 1.0),
    "token γ=0": ("token", 0.0),
}
horizon = {}
for T in HORIZONS:
    p = analysis.Problem.random(SEED, vocab_size=3, horizon=T)
    for name in HORIZON_DIVERGENCES:
        for label, (level, gamma) in HORIZON_ESTIMATORS.items():
            horizon[name, T, label] = analysis.evaluate(
                p, analysis.Estimator(name, "opd_plus", level, gamma)
            )

rows = []
for name in HORIZON_DIVERGENCES:
    for T in HORIZONS:
        r = {label: horizon[name, T, label] for label in HORIZON_ESTIMATORS}
        g1 = r["token γ=1"].target
        gap = norm(r["token γ=0"].expectation - g1) / norm(g1)
        horizon[name, T, "gap"] = gap
        if T == 1:  # one token: sequence and token level are the same estimator
            assert abs(r["sequence"].variance - r["token γ=0"].variance) < 1e-10
        rows.append(
            [
                name,
                str(T),
                *(f"{r[label].variance:.3g}" for label in HORIZON_ESTIMATORS),
                *(f"{r[label].variance / norm(r[label].target) ** 2:.3g}" for label in r),
                f"{max(x.relative_bias for x in r.values()):.1e}",
                f"{gap:.3f}",
            ]
        )
show(
    [
        "divergence",
        "T",
        *(f"variance, {label}" for label in HORIZON_ESTIMATORS),
        *(f"rel. variance, {label}" for label in HORIZON_ESTIMATORS),
        "OPD+ rel. bias",
        "γ=0 bias vs ∇J_tok",
    ],
    rows,
)

fig, (ax1, ax2) = plt.subplots(1, 2, figsize=(11, 4.2))
for i, name in enumerate(HORIZON_DIVERGENCES):
    for label, style in zip(HORIZON_ESTIMATORS, ("o-", "s--", "^:"), strict=True):
        ax1.plot(
            HORIZONS,
            [
                horizon[name, T, label].variance / norm(horizon[name, T, label].target) ** 2
                for T in HORIZONS
            ],
            style,
            c=f"C{i}",
            label=name if label == "sequence" else None,
        )
    ax2.plot(HORIZONS, [horizon[name, T, "gap"] for T in HORIZONS], "o-", c=f"C{i}", label=name)
ax1.set(
    yscale="log",
    xlabel="horizon T",
    ylabel="variance / ‖∇J‖²",
    title="OPD+: sequence (solid), token γ=1 (dashed), γ=0 (dotted)",
)
ax1.legend(fontsize=7)
ax2.set(xlabel="horizon T", ylabel="‖G_0 − ∇J_tok‖ / ‖∇J_tok‖", title="Bias of discount 0")
ax2.legend(fontsize=7)
save(fig, "horizon.png")

# %% [markdown]
# ## 4. Discount γ (token level, OPD+)
#
# A_t = w_f(u_t) − Σ_{s>t} γ^{s−t} f(u_s): γ interpolates between the myopic gradient G_0 and
# ∇J_tok = G_1 (docs/math.md §2.2). The estimator is unbiased for G_γ at every γ (checked below).
#
# * The first panel shows the variance against γ. It is not monotone in general. The
#   reward-to-go terms add variance for reverse KL, skew reverse KL, α and Pearson χ². For JSD,
#   Hellinger and Neyman χ², the γ = 1 estimator has the smaller variance on this problem.
# * The second panel shows the distance of G_γ from ∇J_tok: the bias one accepts against J_tok
#   by discounting. It falls roughly linearly in 1 − γ.
#
# Note that for 0 < γ < 1, G_γ is neither ∇J_tok nor the gradient of the discounted objective
# E[Σ_t γ^t D_t] (docs/math.md §2.3).

# %%
GAMMAS = (0.0, 1.0) if SMALL else (0.0, 0.25, 0.5, 0.75, 1.0)
GAMMA_DIVERGENCES = ("jsd",) if SMALL else ALL
by_gamma = {}
for name in GAMMA_DIVERGENCES:
    g1 = analysis.token_gradient(problem, name, discount=1.0)
    for gamma in GAMMAS:
        r = analysis.evaluate(problem, analysis.Estimator(name, "opd_plus", "token", gamma))
        by_gamma[name, gamma] = (r.variance, norm(r.target - g1) / norm(g1), r.relative_bias)

show(
    [
        "divergence",
        *(f"variance, γ={g:g}" for g in GAMMAS),
        *(f"‖G_γ − ∇J_tok‖/‖∇J_tok‖, γ={g:g}" for g in GAMMAS),
        "OPD+ rel. bias",
    ],
    [
        [
            name,
            *(f"{by_gamma[name, g][0]:.3g}" for g in GAMMAS),
            *(f"{by_gamma[name, g][1]:.3f}" for g in GAMMAS),
            f"{max(by_gamma[name, g][2] for g in GAMMAS):.1e}",
        ]
        for name in GAMMA_DIVERGENCES
    ],
)

fig, (ax1, ax2) = plt.subplots(1, 2, figsize=(11, 4.2))
for i, name in enumerate(GAMMA_DIVERGENCES):
    ax1.plot(GAMMAS, [by_gamma[name, g][0] for g in GAMMAS], "o-", c=f"C{i}", label=name)
    ax2.plot(GAMMAS, [by_gamma[name, g][1] for g in GAMMAS], "o-", c=f"C{i}", label=name)
ax1.set(yscale="log", xlabel="discount γ", ylabel="variance (trace)", title="OPD+ token level")
ax2.set(xlabel="discount γ", ylabel="‖G_γ − ∇J_tok‖ / ‖∇J_tok‖", title="Target vs ∇J_tok")
ax1.legend(fontsize=7, ncol=2)
save(fig, "discount.png")

# %% [markdown]
# ## 5. Sampled token (B) vs full vocabulary (C); top-k support
#
# **Rao–Blackwellisation.** Estimator C (`full_vocab=True`, `opdplus_jax.fullvocab`) replaces the
# sampled token's ψ(ℓ_t) s_t by its conditional expectation over the vocabulary,
# ∇_θ D(π(·|c_t) ‖ q(·|c_t)), computed exactly from both full distributions (docs/math.md §2.5). At
# γ = 0 it has the same expectation G_0, and with step-specific (tabular) parameters its variance
# is no larger in every coordinate. The cost is the teacher's full logits at every position.
#
# Below: OPD+ B and C at γ = 0 on the V = 3, T = 3 problem. "max Δ variance" is
# max_k (Var C − Var B)_k over all coordinates, which must be ≤ 0 up to round-off.

# %%
RB_DIVERGENCES = ("jsd",) if SMALL else ALL
rows = []
rb = {}
for name in RB_DIVERGENCES:
    est_b = analysis.Estimator(name, "opd_plus", "token", 0.0)
    est_c = analysis.Estimator(name, "opd_plus", "token", 0.0, full_vocab=True)
    mb, mc = analysis.moments(problem, est_b), analysis.moments(problem, est_c)
    target = analysis.target_gradient(problem, est_b)
    rb[name] = (float(mb.variance.sum()), float(mc.variance.sum()))
    bias_c = norm(mc.mean - target) / norm(target)
    worst = float(jnp.max(mc.variance - mb.variance))
    assert bias_c < 1e-9 and worst < 1e-12
    rows.append(
        [
            name,
            f"{rb[name][0]:.3g}",
            f"{rb[name][1]:.3g}",
            f"{rb[name][1] / rb[name][0]:.3f}",
            f"{worst:.1e}",
            f"{bias_c:.1e}",
        ]
    )
show(
    ["divergence", "variance B", "variance C", "C / B", "max Δ variance", "OPD+ rel. bias (C)"],
    rows,
)

fig, ax = plt.subplots(figsize=(8, 3.8))
x = np.arange(len(RB_DIVERGENCES))
ax.bar(x - 0.2, [rb[n][0] for n in RB_DIVERGENCES], 0.4, label="B: sampled token")
ax.bar(x + 0.2, [rb[n][1] for n in RB_DIVERGENCES], 0.4, label="C: full vocabulary")
ax.set_xticks(x, RB_DIVERGENCES, rotation=30, ha="right", fontsize=8)
ax.set(yscale="log", ylabel="variance (trace)", title="OPD+ token level, γ=0")
ax.legend(fontsize=8)
save(fig, "full_vocab.png")

# %% [markdown]
# **Top-k support.** Serving stacks often return only the teacher's top-k log-probabilities.
# `support="teacher_topk"` restricts each per-context divergence to the teacher's top k tokens:
# `tail="renormalize"` renormalises both distributions on the support, and `tail="bucket"`
# adds one outcome that holds the remaining mass. Either way the estimator follows a different
# objective. The table gives its relative bias against the full-vocabulary G_0 for V = 4, T = 3
# (V = 3 in small mode).
# k = V is exact. The bucket is also exact at k = V − 1, because a bucket of one token is that
# token. Renormalising at k = 1 leaves two point masses, so the divergence and its gradient are
# identically 0 (relative bias 1). Here renormalising is never better than dropping the term
# (relative bias ≥ 1 for every k < V). The tail bucket roughly halves the bias at k = 2.

# %%
problem_topk = problem if SMALL else analysis.Problem.random(SEED, vocab_size=4, horizon=3)
V = problem_topk.space.vocab_size
TOPK_DIVERGENCES = ("jsd",) if SMALL else ("reverse_kl", "forward_kl", "jsd", "tv", "hellinger")
TOPK = (2,) if SMALL else (1, 2, 3, 4)
TAILS = ("renormalize", "bucket")
topk = {}
for name in TOPK_DIVERGENCES:
    for tail in TAILS:
        for k in TOPK:
            est = analysis.Estimator(
                name, full_vocab=True, support="teacher_topk", top_k=k, tail=tail
            )
            topk[name, tail, k] = analysis.evaluate(problem_topk, est).relative_bias
    if V in TOPK:
        assert max(topk[name, tail, V] for tail in TAILS) < 1e-9

show(
    ["divergence", "tail", *(f"rel. bias, k={k}" for k in TOPK)],
    [
        [name, tail, *(f"{topk[name, tail, k]:.3g}" for k in TOPK)]
        for name in TOPK_DIVERGENCES
        for tail in TAILS
    ],
)

fig, ax = plt.subplots(figsize=(7, 4.2))
for i, name in enumerate(TOPK_DIVERGENCES):
    for tail, style in zip(TAILS, ("o-", "s--"), strict=True):
        ax.plot(
            TOPK,
            [topk[name, tail, k] for k in TOPK],
            style,
            c=f"C{i}",
            label=f"{name}, {tail}",
        )
ax.set(
    xlabel="k (teacher top-k support)",
    ylabel="relative bias vs full-vocabulary G_0",
    xticks=TOPK,
    title=f"Top-k support, V={V}: renormalize (solid) vs bucket (dashed)",
)
ax.legend(fontsize=7, ncol=2)
save(fig, "topk.png")

# %% [markdown]
# ## 6. G-OPD / ExOPD: reward scale λ
#
# With a reference r, the target becomes the unnormalised ν_λ = q^λ r^(1−λ), i.e.
# log u_t = λ log q + (1 − λ) log r − log π (math §3). λ = 1 is plain OPD, λ > 1 extrapolates
# (ExOPD uses 1.25). OPD+ needs no normalisation of ν. It is unbiased for ∇D(π ‖ ν_λ) at
# sequence level (docs/math.md §3.3) and for G_γ of the per-context D(π(·|c) ‖ ν_λ(·|c)) at token
# level (G2), for every λ. Reverse-KL stop-grad at γ = 0 is the G-OPD paper's own estimator.
# Its reward is a KL-type log-ratio, so it is unbiased too (docs/math.md §3.2).
#
# **Discount 0 vs discount 1.** At a generic student, G_0 ≠ G_1 for every λ (the last column,
# and the right panel; at λ = 1 this is the horizon effect of §3). What λ changes is the fixed
# point:
#
# * G_0 vanishes at the locally normalised q̃_tok(·|c) ∝ ν_λ(·|c) (docs/math.md §3.3).
# * G_1 = ∇J_tok vanishes there only if ν_λ is normalised per context. That holds for
#   λ ∈ {0, 1}, where ν is r or q.
# * For other λ, the per-context mass Z_λ(c) = Σ_v ν_λ(v|c) varies across contexts, and J_tok
#   depends on which contexts π visits (docs/math.md §3.3). So discount 0 converges to a different
#   policy than discount 1.
#
# The table puts the student at q̃_tok. There ‖G_0‖ is at round-off, and ‖G_1 − G_0‖ = ‖G_1‖
# measures the discrepancy.

# %%
LAMBDAS = (1.0, 2.0) if SMALL else (0.0, 0.5, 1.0, 1.25, 1.5, 2.0)
GOPD_DIVERGENCES = ("reverse_kl",) if SMALL else ("reverse_kl", "jsd", "hellinger")
GOPD_LEVELS = (("token", 0.0), ("token", 1.0)) if SMALL else report.LEVELS
gopd = {}
rows = []
for lam in LAMBDAS:
    # The discount-0 fixed point: pi(.|c) = softmax(lam log q(.|c) + (1 - lam) log r(.|c)).
    log_q = jax.nn.log_softmax(problem.teacher, axis=-1)
    log_r = jax.nn.log_softmax(problem.reference, axis=-1)
    at_fixed_point = problem.with_student(lam * log_q + (1.0 - lam) * log_r)
    g_opd = analysis.evaluate(
        problem, analysis.Estimator("reverse_kl", "stop_grad", "token", 0.0, reward_scale=lam)
    ).relative_bias
    for name in GOPD_DIVERGENCES:
        plus = max(
            analysis.evaluate(
                problem, analysis.Estimator(name, "opd_plus", level, gamma, reward_scale=lam)
            ).relative_bias
            for level, gamma in GOPD_LEVELS
        )
        g0, g1 = (
            analysis.token_gradient(at_fixed_point, name, discount=gamma, reward_scale=lam)
            for gamma in (0.0, 1.0)
        )
        h0, h1 = (
            analysis.token_gradient(problem, name, discount=gamma, reward_scale=lam)
            for gamma in (0.0, 1.0)
        )
        gopd[name, lam] = (plus, norm(g0), max(norm(g1 - g0), 1e-20), norm(h1 - h0) / norm(h1))
        rows.append(
            [
                f"{lam:g}",
                name,
                f"{plus:.1e}",
                f"{g_opd:.1e}" if name == "reverse_kl" else "",
                f"{norm(g0):.1e}",
                f"{norm(g1 - g0):.3g}",
                f"{norm(h1 - h0) / norm(h1):.3g}",
            ]
        )
        assert plus < 1e-9 and norm(g0) < 1e-9
    assert g_opd < 1e-9
show(
    [
        "λ",
        "divergence",
        "OPD+ rel. bias",
        "G-OPD (RKL stop-grad, γ=0) rel. bias",
        "‖G_0‖ at q̃_tok",
        "‖G_1 − G_0‖ at q̃_tok",
        "‖G_1 − G_0‖/‖G_1‖ at π",
    ],
    rows,
)

fig, (ax1, ax2) = plt.subplots(1, 2, figsize=(11, 4.2))
for i, name in enumerate(GOPD_DIVERGENCES):
    ax1.plot(LAMBDAS, [gopd[name, lam][2] for lam in LAMBDAS], "o-", c=f"C{i}", label=name)
    ax2.plot(LAMBDAS, [gopd[name, lam][3] for lam in LAMBDAS], "o-", c=f"C{i}", label=name)
for ax in (ax1, ax2):
    ax.axvline(1.0, c="gray", lw=0.5)
    ax.legend(fontsize=8)
ax1.set(
    yscale="log",
    ylim=(1e-20, None),
    xlabel="reward scale λ",
    ylabel="‖G_1 − G_0‖ (floored at 1e-20)",
    title="At the discount-0 fixed point q̃_tok (G_0 = 0)",
)
ax2.set(
    xlabel="reward scale λ",
    ylabel="‖G_1 − G_0‖ / ‖G_1‖",
    title="At the random student",
)
save(fig, "gopd.png")

# %% [markdown]
# ## Summary
#
# * OPD+ is unbiased to float64 round-off for every divergence, level, discount, teacher
#   distance, horizon and G-OPD reward scale tested here. Stop-grad is unbiased only for reverse
#   KL (and reverse-KL G-OPD). For every other divergence its bias is O(1), and it does not
#   vanish as the teacher approaches the student: the relative bias tends to
#   |1 + f'(1)/f''(1)| (1 for standardized generators, 2 for forward KL).
# * Sequence-level estimators pay for the product Π_t u_t with a variance that grows with T.
#   The token level keeps it down, at the price of following J_tok instead of J_seq; the two
#   coincide only for KL.
# * Discount 0 is unbiased only for the myopic G_0. Its distance from ∇J_tok grows with T. For
#   G-OPD with λ ∉ {0, 1} it also changes the fixed point.
# * The full-vocabulary estimator C has the same expectation as B at γ = 0 and never more
#   variance per coordinate (3× to 100× less in total here). Top-k teacher supports bias it
#   unless k covers the vocabulary (or, with a tail bucket, all but one token).
