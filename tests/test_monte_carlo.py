"""Monte Carlo checks (docs/math.md §8.3): sampled estimates against their exact means.

Sequences are drawn by ancestral sampling (`analysis.sample`), each draw's gradient comes from
the library's estimator, and z-scores use the exact per-coordinate standard deviation. A test
accepts iff max_k |z_k| < z* = Phi^-1(1 - alpha / 2K) with alpha = 1e-3 and K the number of
coordinates with nonzero variance (Bonferroni); about 4.2 here. Seeds are fixed.
"""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from scipy import stats

from opdplus_jax import analysis

pytestmark = pytest.mark.usefixtures("x64")

ALPHA = 1e-3
NUM_DRAWS = 20_000


@pytest.fixture
def problem(x64):
    return analysis.Problem.random(0, vocab_size=3, horizon=3)


def _z_scores(problem, estimator, rows, reference_mean):
    exact = analysis.moments(problem, estimator)
    draws = analysis.per_batch_gradients(problem, estimator, np.asarray(rows)[:, None])
    mean = draws.mean(0)
    sd = jnp.sqrt(jnp.maximum(exact.variance, 0.0))
    live = sd > 1e-12
    # Coordinates with zero variance must match exactly.
    np.testing.assert_allclose(mean[~live], reference_mean[~live], atol=1e-12)
    z = (mean - reference_mean)[live] / (sd[live] / np.sqrt(len(rows)))
    z_star = stats.norm.ppf(1 - ALPHA / (2 * int(live.sum())))
    return float(jnp.abs(z).max()), float(z_star)


@pytest.fixture
def rows(problem):
    draws = analysis.sample(problem.space, problem.student, jax.random.key(1), NUM_DRAWS)
    return problem.space.rows_of(draws)


def test_sampler_matches_the_policy(problem):
    """Chi-square goodness of fit of 2e5 sequences against the enumerated probabilities."""
    draws = analysis.sample(problem.space, problem.student, jax.random.key(2), 200_000)
    counts = np.bincount(np.asarray(problem.space.rows_of(draws)), minlength=27)
    p = np.asarray(jnp.exp(analysis.sequence_logprobs(problem.space, problem.student)))
    chi2, pvalue = stats.chisquare(counts, p * counts.sum())
    assert pvalue > ALPHA, (chi2, pvalue)


@pytest.mark.parametrize(
    "estimator",
    [
        analysis.Estimator("jsd", level="sequence"),
        analysis.Estimator("jsd", level="token", discount=1.0),
        analysis.Estimator("hellinger", level="token", discount=0.0),
        analysis.Estimator("reverse_kl", "stop_grad", "token", 0.0, reward_scale=1.25),
    ],
    ids=["jsd-seq", "jsd-tok-g1", "hellinger-tok-g0", "exopd-rkl"],
)
def test_sampled_estimates_agree_with_the_exact_gradient(problem, rows, estimator):
    target = analysis.target_gradient(problem, estimator)
    max_z, z_star = _z_scores(problem, estimator, rows, target)
    assert max_z < z_star, (max_z, z_star)


def test_negative_control_detects_the_stop_grad_bias(problem, rows):
    """The same test has the power to reject the biased stop-gradient JSD estimator, while it
    accepts that estimator against its own exact mean (sampler vs estimator bias separated)."""
    estimator = analysis.Estimator("jsd", "stop_grad", "sequence")
    target = analysis.target_gradient(problem, estimator)
    max_z, z_star = _z_scores(problem, estimator, rows, target)
    assert max_z > z_star + 3, (max_z, z_star)
    own_mean = analysis.moments(problem, estimator).mean
    max_z, z_star = _z_scores(problem, estimator, rows, own_mean)
    assert max_z < z_star, (max_z, z_star)
