"""Exact analysis of OPD estimators on tabular autoregressive policies (for tests and notebooks).

    from opdplus_jax import analysis
    problem = analysis.Problem.random(0, vocab_size=3, horizon=3)
    estimator = analysis.Estimator(divergence="jsd", correction="stop_grad")
    report = analysis.evaluate(problem, estimator)
    report.relative_bias, report.variance

Run in float64 (`jax.config.update("jax_enable_x64", True)` or `with jax.enable_x64(True):`)
for identities to 1e-10.
"""

from opdplus_jax.analysis import closed_forms
from opdplus_jax.analysis.exact import (
    Estimator,
    Moments,
    Problem,
    Report,
    aggregation_scale,
    evaluate,
    expected_length,
    moments,
    per_batch_gradients,
    sequence_objective,
    target_gradient,
    token_gradient,
    token_objectives,
)
from opdplus_jax.analysis.tabular import (
    Space,
    full_logprobs,
    random_logits,
    sample,
    sequence_logprobs,
    token_logprobs,
)

__all__ = [
    "Estimator",
    "Moments",
    "Problem",
    "Report",
    "Space",
    "aggregation_scale",
    "closed_forms",
    "evaluate",
    "expected_length",
    "full_logprobs",
    "moments",
    "per_batch_gradients",
    "random_logits",
    "sample",
    "sequence_logprobs",
    "sequence_objective",
    "target_gradient",
    "token_gradient",
    "token_logprobs",
    "token_objectives",
]
