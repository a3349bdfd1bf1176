"""What every estimator is unbiased for, proven by exact enumeration in float64.

The estimators are the library's code path (estimators.advantages -> losses.pg_loss); the
targets are autodiff gradients of the closed-form objectives (analysis.closed_forms). Identities
refer to docs/math.md; tolerance rtol 1e-9 as §8.1 prescribes.
"""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from opdplus_jax import analysis
from opdplus_jax import divergences as dv
from opdplus_jax.analysis import closed_forms
from tests.test_divergences import CASES, IDS

pytestmark = pytest.mark.usefixtures("x64")

RTOL = 1e-9


@pytest.fixture
def problem(x64):
    return analysis.Problem.random(0, vocab_size=3, horizon=3)


def _div(name, params):
    return dv.get(name, **params)


def _assert_close(got, want, rtol=RTOL, atol=1e-12):
    err = float(jnp.linalg.norm(got - want))
    assert err <= rtol * float(jnp.linalg.norm(want)) + atol, (err, float(jnp.linalg.norm(want)))


def _rel(a, b):
    return float(jnp.linalg.norm(a - b) / jnp.linalg.norm(b))


def _scores(problem):
    """S[n, t] = grad_theta log pi(y_t | c_t) for every sequence and step: [N, T, P, V]."""
    space = problem.space
    return jax.jacrev(lambda th: analysis.token_logprobs(space, th))(problem.student)


def _token_log_u(problem, reward_scale=1.0):
    space = problem.space
    ls = analysis.token_logprobs(space, problem.student)
    lt = analysis.token_logprobs(space, problem.teacher)
    lr = analysis.token_logprobs(space, problem.reference)
    return (reward_scale * lt + (1 - reward_scale) * lr - ls) * space.mask


def _probs(problem):
    return jnp.exp(analysis.sequence_logprobs(problem.space, problem.student))


def _myopic_gradient(problem, d, reward_scale=1.0):
    """sum_n sg(p_n) sum_t grad D(pi(.|c_nt) || nu(.|c_nt)): the context distribution frozen."""
    space = problem.space
    p = _probs(problem)
    lq = analysis.full_logprobs(space, problem.teacher)
    lr = analysis.full_logprobs(space, problem.reference)
    nu = jnp.exp(reward_scale * lq + (1 - reward_scale) * lr)

    def frozen(theta):
        per_ctx = closed_forms.value(d, jnp.exp(analysis.full_logprobs(space, theta)), nu)
        return jnp.sum(p[:, None] * jnp.where(space.mask, per_ctx, 0.0))

    return jax.grad(frozen)(problem.student)


# ------------------------------------------------------------------ OPD+ is unbiased (math §1-§2)


@pytest.mark.parametrize(("name", "params"), CASES, ids=IDS)
def test_opd_plus_sequence_level_is_unbiased_for_the_sequence_divergence(problem, name, params):
    d = _div(name, params)
    mean = analysis.moments(problem, analysis.Estimator(d, level="sequence")).mean
    grad = jax.grad(lambda th: analysis.sequence_objective(problem, d, student=th))(problem.student)
    _assert_close(mean, grad)


@pytest.mark.parametrize(("name", "params"), CASES, ids=IDS)
def test_opd_plus_token_level_discount1_is_unbiased_for_sum_of_token_divergences(
    problem, name, params
):
    d = _div(name, params)
    mean = analysis.moments(problem, analysis.Estimator(d, level="token", discount=1.0)).mean
    j_tok = lambda th: analysis.token_objectives(problem, d, student=th).sum()
    _assert_close(mean, jax.grad(j_tok)(problem.student))


@pytest.mark.parametrize(("name", "params"), CASES, ids=IDS)
def test_opd_plus_token_level_discount0_is_unbiased_for_the_myopic_gradient(problem, name, params):
    d = _div(name, params)
    mean = analysis.moments(problem, analysis.Estimator(d, level="token", discount=0.0)).mean
    _assert_close(mean, _myopic_gradient(problem, d))


@pytest.mark.parametrize("name", ["jsd", "tv", "pearson_chi2", "forward_kl"])
def test_opd_plus_intermediate_discount_is_unbiased_for_G_gamma(problem, name):
    report = analysis.evaluate(problem, analysis.Estimator(name, discount=0.5))
    assert report.relative_bias < RTOL
    # G_gamma is strictly between the myopic and the full gradient here: not a trivial target.
    full = analysis.target_gradient(problem, analysis.Estimator(name, discount=1.0))
    myopic = analysis.target_gradient(problem, analysis.Estimator(name, discount=0.0))
    assert _rel(report.target, full) > 1e-3 and _rel(report.target, myopic) > 1e-3


def test_G_gamma_endpoints_match_independent_gradients(problem):
    d = dv.get("jsd")
    j_tok = lambda th: analysis.token_objectives(problem, d, student=th).sum()
    g1 = analysis.token_gradient(problem, d, discount=1.0)
    _assert_close(g1, jax.grad(j_tok)(problem.student))
    _assert_close(analysis.token_gradient(problem, d, discount=0.0), _myopic_gradient(problem, d))


@pytest.mark.parametrize("name", ["jsd", "hellinger", "reverse_kl"])
def test_discount_objective_is_unbiased_for_the_discounted_objective(problem, name):
    est = analysis.Estimator(name, discount=0.5, discount_objective=True)
    mean = analysis.moments(problem, est).mean
    discounted = lambda th: jnp.sum(
        0.5 ** jnp.arange(3) * analysis.token_objectives(problem, name, student=th)
    )
    _assert_close(mean, jax.grad(discounted)(problem.student))


def test_larger_space_with_eos(x64):
    problem = analysis.Problem.random(1, vocab_size=4, horizon=4, eos_id=0)
    for est in (
        analysis.Estimator("jsd", level="sequence"),
        analysis.Estimator("alpha", level="token", discount=1.0),
        analysis.Estimator("neyman_chi2", level="token", discount=0.0),
    ):
        assert analysis.evaluate(problem, est).relative_bias < RTOL, est


# ------------------------------------------------------------ stop-gradient bias (math §1.1-§1.3)


@pytest.mark.parametrize(("name", "params"), CASES, ids=IDS)
@pytest.mark.parametrize(("level", "discount"), [("sequence", 0.0), ("token", 0.0), ("token", 1.0)])
def test_stop_grad_bias_is_the_dropped_pathwise_term(problem, name, params, level, discount):
    """E[stop-grad] - grad J = E_pi[u f'(u) grad log pi], summed as the level prescribes."""
    d = _div(name, params)
    est = analysis.Estimator(d, correction="stop_grad", level=level, discount=discount)
    report = analysis.evaluate(problem, est)
    log_u, scores, p = _token_log_u(problem), _scores(problem), _probs(problem)
    if level == "sequence":
        weight = d.u_f_prime(log_u.sum(-1))[:, None] * problem.space.mask  # u f'(U) on every token
    else:
        weight = d.u_f_prime(log_u) * problem.space.mask
    closed_form = jnp.einsum("n,nt,ntpv->pv", p, weight, scores)
    _assert_close(report.bias, closed_form, atol=1e-11)
    if name == "reverse_kl":
        assert report.relative_bias < 1e-12
    else:
        assert report.relative_bias > 1e-3, f"stop-grad {d} should be biased"


@pytest.mark.parametrize("alpha", [-1.0, -0.5, 0.3, 0.5, 2.0, 3.0])
def test_stop_grad_alpha_estimates_grad_over_alpha(problem, alpha):
    """In the registered gauge, stop-gradient is exactly (1/alpha) grad D_alpha (math §1.4)."""
    d = dv.get("alpha", alpha=alpha)
    mean = analysis.moments(problem, analysis.Estimator(d, "stop_grad", "sequence")).mean
    grad = jax.grad(lambda th: analysis.sequence_objective(problem, d, student=th))(problem.student)
    _assert_close(mean, grad / alpha)


@pytest.mark.parametrize("c", [-0.5, 0.8])
def test_gauge_shift_moves_stop_grad_by_c_grad_forward_kl(problem, c):
    d = dv.get("jsd")
    base = analysis.moments(problem, analysis.Estimator(d, "stop_grad", "sequence")).mean
    gauged = dv.with_gauge(d, c)
    shifted = analysis.moments(problem, analysis.Estimator(gauged, "stop_grad", "sequence")).mean
    fkl = jax.grad(lambda th: analysis.sequence_objective(problem, "forward_kl", student=th))
    _assert_close(shifted - base, c * fkl(problem.student))
    # ... while OPD+ is gauge-invariant in expectation.
    plus = analysis.moments(problem, analysis.Estimator(gauged, level="sequence")).mean
    _assert_close(plus, analysis.moments(problem, analysis.Estimator(d, level="sequence")).mean)


def test_chain_rule_holds_for_kl_only(problem):
    seq = analysis.sequence_objective(problem, "reverse_kl")
    tok = analysis.token_objectives(problem, "reverse_kl").sum()
    assert float(seq) == pytest.approx(float(tok), rel=1e-12)
    seq = analysis.sequence_objective(problem, "jsd")
    tok = analysis.token_objectives(problem, "jsd").sum()
    assert abs(float(seq) - float(tok)) > 1e-3


# ------------------------------------------------------------------------ G-OPD / ExOPD (math §3)


@pytest.mark.parametrize("lam", [0.0, 0.5, 1.25, 2.0])
@pytest.mark.parametrize("name", ["reverse_kl", "jsd", "hellinger", "alpha", "forward_kl", "tv"])
def test_gopd_opd_plus_is_unbiased_for_the_unnormalised_target(problem, name, lam):
    for level, discount in (("sequence", 0.0), ("token", 1.0), ("token", 0.0)):
        est = analysis.Estimator(name, level=level, discount=discount, reward_scale=lam)
        assert analysis.evaluate(problem, est).relative_bias < RTOL, (level, discount)


def _soft_bellman_optimum(problem, lam):
    """Logits of pi* = nu / Z with nu = q^lam r^(1-lam) over whole sequences (docs/math.md §3.1)."""
    space = problem.space
    v, horizon = space.vocab_size, space.horizon
    log_nu = lam * jax.nn.log_softmax(problem.teacher) + (1 - lam) * jax.nn.log_softmax(
        problem.reference
    )
    offsets = np.cumsum([0] + [v**k for k in range(horizon)])
    logits = np.array(log_nu)
    for t in range(horizon - 2, -1, -1):  # add log W_{t+1}(c v) = logsumexp(logits of c v)
        for code in range(v**t):
            children = offsets[t + 1] + code * v + np.arange(v)
            logits[offsets[t] + code] += np.asarray(jax.nn.logsumexp(logits[children], axis=-1))
    return jnp.asarray(logits)


@pytest.mark.parametrize("lam", [0.5, 1.25, 2.0])
def test_gopd_fixed_points(problem, lam):
    """Sequence level (any strictly convex f) and KL with discount 1 reach pi* = nu / Z; discount 0
    stops at the locally normalised softmax(lam log q + (1-lam) log r) instead (math §3.3)."""
    star = problem.with_student(_soft_bellman_optimum(problem, lam))
    z = jnp.exp(analysis.sequence_logprobs(star.space, star.student))
    assert float(z.sum()) == pytest.approx(1.0, rel=1e-12)
    norm = lambda est, prob: float(jnp.linalg.norm(analysis.moments(prob, est).mean))
    for est in (
        analysis.Estimator("jsd", level="sequence", reward_scale=lam),
        analysis.Estimator("hellinger", level="sequence", reward_scale=lam),
        analysis.Estimator("reverse_kl", "stop_grad", "token", 1.0, reward_scale=lam),
    ):
        assert norm(est, star) < 1e-10, est
    myopic = analysis.Estimator("reverse_kl", "stop_grad", "token", 0.0, reward_scale=lam)
    assert norm(myopic, star) > 1e-3
    local = lam * jax.nn.log_softmax(problem.teacher) + (1 - lam) * jax.nn.log_softmax(
        problem.reference
    )
    assert norm(myopic, problem.with_student(local)) < 1e-10


# ------------------------------------------------ options that are biased, exactly (math §4-§5)


@pytest.mark.parametrize("name", ["reverse_kl", "jsd", "tv"])
def test_discount0_bias_against_the_full_token_gradient(problem, name):
    """E[gamma=0] - grad J_tok = -E[sum_t (sum_{t'>t} f(u_t')) grad log pi_t]; 17% for KL here."""
    d = dv.get(name)
    mean0 = analysis.moments(problem, analysis.Estimator(d, discount=0.0)).mean
    full = analysis.target_gradient(problem, analysis.Estimator(d, discount=1.0))
    f = d.f(_token_log_u(problem)) * problem.space.mask
    future = jnp.flip(jnp.cumsum(jnp.flip(f, -1), -1), -1) - f  # sum over t' > t
    closed_form = -jnp.einsum("n,nt,ntpv->pv", _probs(problem), future, _scores(problem))
    _assert_close(mean0 - full, closed_form)
    assert _rel(mean0, full) > 0.05


def test_token_mean_aggregation_is_biased_with_variable_lengths(x64):
    problem = analysis.Problem.random(2, vocab_size=3, horizon=3, eos_id=0)
    lengths = problem.space.mask.sum(-1)
    assert len(set(lengths.tolist())) == 3  # lengths 1, 2 and 3 all occur
    sum_est = analysis.Estimator("reverse_kl", discount=1.0, aggregation="seq_mean_token_sum")
    assert analysis.evaluate(problem, sum_est).relative_bias < RTOL
    norm_est = analysis.Estimator("reverse_kl", discount=1.0, aggregation="seq_mean_token_sum_norm")
    assert analysis.evaluate(problem, norm_est).relative_bias < RTOL  # grad J / T: a constant

    rel = {}
    for b in (1, 2):
        est = analysis.Estimator("reverse_kl", discount=1.0, aggregation="token_mean", batch_size=b)
        rel[b] = analysis.evaluate(problem, est).relative_bias
    # B = 1: the per-sequence token mean, i.e. sum_n p_n g_n / |y_n|.
    rows = np.arange(len(lengths))[:, None]
    per_seq = analysis.per_batch_gradients(problem, sum_est, rows)
    p = _probs(problem)
    token_mean = analysis.Estimator("reverse_kl", discount=1.0, aggregation="token_mean")
    one = analysis.moments(problem, token_mean).mean
    _assert_close(one, jnp.einsum("n,npv->pv", p / lengths, per_seq))
    assert rel[1] > 0.05 and rel[2] > 0.01
    assert rel[2] < rel[1]  # a ratio estimator: the bias shrinks like 1/B
    seq_mean = analysis.Estimator("reverse_kl", discount=1.0, aggregation="seq_mean_token_mean")
    assert analysis.evaluate(problem, seq_mean).relative_bias > 0.05


@pytest.mark.parametrize("name", ["jsd", "forward_kl", "pearson_chi2"])
def test_log_ratio_clipping_bias_is_exact(problem, name):
    d = dv.get(name)
    log_u = _token_log_u(problem)
    unclipped = analysis.moments(problem, analysis.Estimator(d)).mean
    wide = float(jnp.abs(log_u).max()) + 1.0
    _assert_close(
        analysis.moments(problem, analysis.Estimator(d, log_ratio_clip=wide)).mean, unclipped
    )
    c = 0.5
    assert float(jnp.mean(jnp.abs(log_u[problem.space.mask]) > c)) > 0.1
    clipped = analysis.moments(problem, analysis.Estimator(d, log_ratio_clip=c)).mean
    dw = (
        d.opd_plus_advantage(jnp.clip(log_u, -c, c)) - d.opd_plus_advantage(log_u)
    ) * problem.space.mask
    closed_form = -jnp.einsum("n,nt,ntpv->pv", _probs(problem), dw, _scores(problem))
    _assert_close(clipped - unclipped, closed_form)
    assert _rel(clipped, unclipped) > 1e-2


def test_group_baselines(problem):
    """Batches of two samples: leave-one-out is unbiased, the mean baseline is a (G-1)/G rescale,
    and std normalisation changes the direction (docs/math.md §4.2)."""
    kw = {"divergence": "jsd", "level": "sequence", "batch_size": 2}
    target = analysis.target_gradient(problem, analysis.Estimator("jsd", level="sequence"))
    plain = analysis.evaluate(problem, analysis.Estimator(**kw))
    loo = analysis.evaluate(problem, analysis.Estimator(**kw, baseline="loo"))
    assert plain.relative_bias < RTOL and loo.relative_bias < RTOL
    assert loo.variance != pytest.approx(plain.variance)  # same mean, another estimator
    mean = analysis.moments(problem, analysis.Estimator(**kw, baseline="mean")).mean
    _assert_close(mean, 0.5 * target)
    std = analysis.moments(problem, analysis.Estimator(**kw, baseline="mean_std")).mean
    scale = jnp.vdot(std, target) / jnp.vdot(target, target)
    assert _rel(std, scale * target) > 0.1


def test_token_importance_sampling_and_its_truncation_bias(x64):
    """Off-policy rollouts from mu (math §5.3). Token-only IS gives the per-context gradients
    under mu's context distribution; truncating the ratio at C subtracts exactly
    E_mu[sum_t (rho_t - C)_+ W_t s_t]; no IS at all is further off."""
    problem = analysis.Problem.random(3, vocab_size=3, horizon=3, behaviour_distance=1.0)
    space = problem.space
    d = dv.get("jsd")
    token_is = analysis.moments(problem, analysis.Estimator(d, off_policy=True)).mean
    # Target: sum_n mu_n sum_t grad D(pi(.|c_nt) || q(.|c_nt)), contexts frozen under mu.
    mu = jnp.exp(analysis.sequence_logprobs(space, problem.behaviour))
    lq = analysis.full_logprobs(space, problem.teacher)

    def frozen(theta):
        per_ctx = closed_forms.value(d, jnp.exp(analysis.full_logprobs(space, theta)), jnp.exp(lq))
        return jnp.sum(mu[:, None] * jnp.where(space.mask, per_ctx, 0.0))

    _assert_close(token_is, jax.grad(frozen)(problem.student))
    # Truncation at C: the closed-form bias.
    c = 1.2
    tis = analysis.moments(problem, analysis.Estimator(d, off_policy=True, tis_cap=c)).mean
    rho = jnp.exp(
        analysis.token_logprobs(space, problem.student)
        - analysis.token_logprobs(space, problem.behaviour)
    )
    assert float(jnp.mean(rho[space.mask] > c)) > 0.1  # the cap binds on many tokens
    w = -d.opd_plus_advantage(_token_log_u(problem)) * space.mask  # W_t = -A_t
    excess = jnp.maximum(rho - c, 0.0) * space.mask
    closed_form = -jnp.einsum("n,nt,ntpv->pv", mu, excess * w, _scores(problem))
    _assert_close(tis - token_is, closed_form)
    # Without importance weights the off-policy samples estimate something else again.
    no_is = analysis.Estimator(d, off_policy=True, importance_weights=False)
    assert _rel(analysis.moments(problem, no_is).mean, token_is) > 1e-2


@pytest.mark.parametrize("level", ["sequence", "token"])
def test_mean_baseline_with_unequal_lengths_reweights_each_position(x64, level):
    """docs/math.md §4.2 with EOS and variable lengths, G = 2: E[ĝ_mean] = Σ_t κ_t g_t with
    κ_t = E[k_t / (k_t + 1)] = P(the companion is active at t) / 2 and g_t the contribution of
    position t to the plain estimator's expectation; not ½ × the target, while loo stays
    unbiased."""
    problem = analysis.Problem.random(0, vocab_size=3, horizon=3, eos_id=2)
    space = problem.space
    kw = {"divergence": "jsd", "level": level, "batch_size": 2}
    est = analysis.Estimator(**kw)
    plain = analysis.moments(problem, est).mean
    loo = analysis.evaluate(problem, analysis.Estimator(**kw, baseline="loo"))
    assert loo.relative_bias < RTOL
    ls = analysis.token_logprobs(space, problem.student)
    lt = analysis.token_logprobs(space, problem.teacher)
    mask = space.mask
    adv = est.advantages(ls, lt, None, mask) * mask  # [N, T]
    p = _probs(problem)
    g_t = -jnp.einsum("n,nt,ntpv->tpv", p, adv, _scores(problem))
    scale = jnp.vdot(plain, g_t.sum(0)) / jnp.vdot(g_t.sum(0), g_t.sum(0))  # the normaliser
    _assert_close(plain, scale * g_t.sum(0))  # the g_t decompose the plain expectation
    active = jnp.einsum("n,nt->t", p, mask.astype(p.dtype))  # P(a sample is active at t)
    assert float(active[-1]) < 0.9 < float(active[0]) + 1e-12  # lengths really vary
    kappa = active / 2.0
    mean = analysis.moments(problem, analysis.Estimator(**kw, baseline="mean")).mean
    _assert_close(mean, scale * jnp.einsum("t,tpv->pv", kappa, g_t))
    assert _rel(mean, 0.5 * plain) > 0.02  # not the (G-1)/G rescale of the loo expectation
