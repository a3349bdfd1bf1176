"""Exact mean, variance and bias of any estimator configuration on a tabular problem.

The estimator under test is the library's own code path: `estimators.advantages` (plus an
optional `estimators.group_baseline`) feeding `losses.pg_loss`, evaluated on batches of
enumerated sequences. Its exact expectation is sum_batch P(batch) grad loss(batch), with every
batch of `batch_size` i.i.d. sequences enumerated. The targets are gradients (by autodiff) of the
objectives written with `closed_forms`, so they share no code with the estimators:

- level "sequence": grad D(pi(.|x) || nu(.|x)) over whole sequences;
- level "token": G_gamma = sum_s sum_{t>=s} gamma^(t-s) d_s J_t with J_t = E_pi[D_t(c_t)] and
  d_s the derivative in the parameters of step s only (docs/math.md §2.2): gamma = 1 is
  grad E[sum_t D_t], gamma = 0 the myopic gradient; with `discount_objective` the target is
  grad E[sum_t gamma^t D_t].

nu = q^lambda r^(1-lambda) is the (unnormalised) G-OPD target, q for lambda = 1. Gradients are
taken with respect to the student's logits table, and returned with its shape [P, V].
"""

from __future__ import annotations

import dataclasses
import itertools
import math
from typing import NamedTuple

import jax
import jax.numpy as jnp
import numpy as np

from opdplus_jax import divergences, estimators, fullvocab, losses
from opdplus_jax.analysis import closed_forms
from opdplus_jax.analysis.tabular import (
    Space,
    full_logprobs,
    random_logits,
    sequence_logprobs,
    token_logprobs,
)


@dataclasses.dataclass(frozen=True, eq=False)
class Problem:
    """Student, teacher and (optional) reference logits tables over one `Space`."""

    space: Space
    student: jax.Array  # [P, V]
    teacher: jax.Array  # [P, V]
    reference: jax.Array | None = None  # [P, V]
    behaviour: jax.Array | None = None  # [P, V] the policy that samples, for off-policy analysis

    @classmethod
    def random(
        cls,
        seed: int = 0,
        *,
        vocab_size: int = 3,
        horizon: int = 3,
        eos_id: int | None = None,
        scale: float = 1.0,
        teacher_distance: float = 1.0,
        with_reference: bool = True,
        behaviour_distance: float | None = None,
    ) -> Problem:
        """Random tables; the teacher is the student plus `teacher_distance` times N(0, 1) noise,
        and (with `behaviour_distance`) the behaviour policy likewise."""
        space = Space(vocab_size, horizon, eos_id)
        ks, kt, kr, kb = jax.random.split(jax.random.key(seed), 4)
        student = random_logits(ks, space, scale)
        teacher = student + random_logits(kt, space, teacher_distance)
        reference = random_logits(kr, space, scale) if with_reference else None
        behaviour = None
        if behaviour_distance is not None:
            behaviour = student + random_logits(kb, space, behaviour_distance)
        return cls(space, student, teacher, reference, behaviour)

    def with_student(self, student: jax.Array) -> Problem:
        return dataclasses.replace(self, student=student)


@dataclasses.dataclass(frozen=True)
class Estimator:
    """One estimator configuration: the arguments of `estimators.advantages` and the loss."""

    divergence: str | divergences.Divergence = "reverse_kl"
    correction: str = "opd_plus"
    level: str = "token"
    discount: float = 0.0
    reward_scale: float = 1.0
    log_ratio_clip: float | None = None
    discount_objective: bool = False
    aggregation: str = "seq_mean_token_sum"
    batch_size: int = 1
    baseline: str | None = None  # an `estimators.group_baseline` kind over the batch
    # Full-vocabulary estimator C_gamma (`opdplus_jax.fullvocab`) instead of the sampled token's.
    full_vocab: bool = False
    support: str = "full"
    top_k: int | None = None
    tail: str = "renormalize"
    # Off-policy: sequences come from `Problem.behaviour`; each token is weighted by the
    # truncated importance ratio min(pi / mu, tis_cap) (token-only IS; None = no truncation).
    off_policy: bool = False
    importance_weights: bool = True  # False: off-policy samples used as if on-policy
    tis_cap: float | None = None

    def __post_init__(self):
        if self.full_vocab and (self.level != "token" or self.correction != "opd_plus"):
            raise ValueError("full_vocab estimators are token-level and exact (opd_plus)")

    def advantages(self, ls, lt, lr, mask):
        return estimators.advantages(
            jax.lax.stop_gradient(ls),
            lt,
            mask,
            divergence=self.divergence,
            correction=self.correction,
            level=self.level,
            discount=self.discount,
            reward_scale=self.reward_scale,
            ref_logp=lr if self.reward_scale != 1.0 else None,
            log_ratio_clip=self.log_ratio_clip,
            discount_objective=self.discount_objective,
        )

    def loss(self, ls, lt, lr, mask, behaviour_logp=None):
        """The surrogate loss of one batch [G, T] of sampled-token log-probs."""
        adv = self.advantages(ls, lt, lr, mask)
        if self.baseline is not None:
            adv = estimators.group_baseline(adv, mask, self.batch_size, kind=self.baseline)
        return losses.pg_loss(
            ls,
            adv,
            mask,
            aggregation=self.aggregation,
            behaviour_logp=behaviour_logp,
            tis_cap=self.tis_cap,
        )


class Moments(NamedTuple):
    mean: jax.Array  # [P, V] exact expectation of the estimator
    variance: jax.Array  # [P, V] exact per-coordinate variance


class Report(NamedTuple):
    expectation: jax.Array  # [P, V]
    target: jax.Array  # [P, V] the gradient the estimator is meant to estimate (scaled)
    bias: jax.Array  # expectation - target
    relative_bias: float  # |bias| / |target|
    variance: float  # trace of the covariance of one draw


def _teacher_tokens(problem: Problem):
    space = problem.space
    lt = token_logprobs(space, problem.teacher)
    ref = problem.reference if problem.reference is not None else problem.teacher
    return lt, token_logprobs(space, ref)


def _full_vocab_loss(problem: Problem, estimator: Estimator, theta, idx, mask):
    """C_gamma on the batch `idx`: the tabular policy as a model whose hidden state at each
    position is the one-hot prefix and whose unembedding is the logits table."""
    space = problem.space
    hidden = jax.nn.one_hot(jnp.asarray(space.prefix)[idx], space.num_prefixes, dtype=theta.dtype)
    ref = problem.reference if problem.reference is not None else problem.teacher
    d = fullvocab.token_divergences(
        fullvocab.Head(hidden, theta),
        fullvocab.Head(hidden, problem.teacher),
        mask,
        divergence=estimator.divergence,
        reward_scale=estimator.reward_scale,
        reference=fullvocab.Head(hidden, ref),
        chunk_size=space.horizon,
        support=estimator.support,
        top_k=estimator.top_k,
        tail=estimator.tail,
    )
    ls = token_logprobs(space, theta)[idx]
    return fullvocab.analytic_loss(
        d, ls, mask, discount=estimator.discount, aggregation=estimator.aggregation
    )


def _sampler(problem: Problem, estimator: Estimator) -> jax.Array:
    """Logits of the policy the estimator's sequences are drawn from."""
    if not estimator.off_policy:
        return problem.student
    if problem.behaviour is None:
        raise ValueError("off_policy estimators need Problem.behaviour (behaviour_distance=...)")
    return problem.behaviour


def per_batch_gradients(problem: Problem, estimator: Estimator, batches: np.ndarray) -> jax.Array:
    """The estimator's draw grad loss(batch) for each batch of sequence rows [M, G] -> [M, P, V]."""
    space = problem.space
    lt, lr = _teacher_tokens(problem)
    mask = jnp.asarray(space.mask, lt.dtype)
    weighted = estimator.off_policy and estimator.importance_weights
    lb = token_logprobs(space, _sampler(problem, estimator)) if weighted else None

    def grad_one(idx):
        def loss(theta):
            if estimator.full_vocab:
                return _full_vocab_loss(problem, estimator, theta, idx, mask[idx])
            ls = token_logprobs(space, theta)[idx]
            behaviour = None if lb is None else lb[idx]
            return estimator.loss(ls, lt[idx], lr[idx], mask[idx], behaviour)

        return jax.grad(loss)(problem.student)

    return jax.lax.map(grad_one, jnp.asarray(batches), batch_size=256)


def moments(problem: Problem, estimator: Estimator) -> Moments:
    """Exact mean and per-coordinate variance of the estimator, over all batches of sequences."""
    n = len(problem.space.sequences)
    g = estimator.batch_size
    if n**g > 100_000:
        raise ValueError(f"{n}^{g} batches to enumerate; use a smaller space or batch_size")
    batches = np.array(list(itertools.product(range(n), repeat=g)), dtype=np.int32)
    logp = sequence_logprobs(problem.space, _sampler(problem, estimator))
    weights = jnp.exp(logp[batches].sum(-1))
    grads = per_batch_gradients(problem, estimator, batches)
    mean = jnp.tensordot(weights, grads, axes=1)
    variance = jnp.tensordot(weights, jnp.square(grads), axes=1) - jnp.square(mean)
    return Moments(mean, variance)


# ----------------------------------------------------------------------------------------------
# Objectives and their gradients, from the closed forms.
# ----------------------------------------------------------------------------------------------


def _log_nu_full(problem: Problem, reward_scale: float) -> jax.Array:
    """log nu(. | c_t) = lambda log q + (1 - lambda) log r at every position: [N, T, V]."""
    lq = full_logprobs(problem.space, problem.teacher)
    if reward_scale == 1.0:
        return lq
    lr = full_logprobs(problem.space, problem.reference)
    return reward_scale * lq + (1.0 - reward_scale) * lr


def sequence_objective(
    problem: Problem, divergence, reward_scale: float = 1.0, student: jax.Array | None = None
) -> jax.Array:
    """J_seq = D(pi(y) || nu(y)) over whole sequences."""
    theta = problem.student if student is None else student
    lt, lr = _teacher_tokens(problem)
    log_nu = reward_scale * lt + (1.0 - reward_scale) * lr
    p = jnp.exp(sequence_logprobs(problem.space, theta))
    return closed_forms.value(divergence, p, jnp.exp(log_nu.sum(-1)))


def token_objectives(
    problem: Problem, divergence, reward_scale: float = 1.0, student: jax.Array | None = None
) -> jax.Array:
    """J_t = E_pi[D(pi(.|c_t) || nu(.|c_t))] for each step t: [T]. J_tok = sum_t J_t."""
    space = problem.space
    theta = problem.student if student is None else student
    p = jnp.exp(sequence_logprobs(space, theta))
    per_context = closed_forms.value(
        divergence,
        jnp.exp(full_logprobs(space, theta)),
        jnp.exp(_log_nu_full(problem, reward_scale)),
    )  # [N, T]
    return jnp.einsum("n,nt->t", p, jnp.where(space.mask, per_context, 0.0))


def token_gradient(
    problem: Problem,
    divergence,
    *,
    discount: float,
    reward_scale: float = 1.0,
    discount_objective: bool = False,
) -> jax.Array:
    """G_gamma (or grad E[sum_t gamma^t D_t] with `discount_objective`): [P, V]."""
    horizon = problem.space.horizon
    jac = jax.jacrev(lambda th: token_objectives(problem, divergence, reward_scale, th))(
        problem.student
    )  # [T, P, V]
    t = np.arange(horizon)
    if discount_objective:
        return jnp.tensordot(jnp.asarray(discount ** t.astype(float)), jac, axes=1)
    # d_s J_t: the part of grad J_t in the parameters of step s (contexts of length s).
    step_mask = problem.space.step_of_prefix[None, :] == t[:, None]  # [S, P]
    lag = t[:, None] - t[None, :]  # [t, s]
    weights = np.where(lag >= 0, float(discount) ** np.maximum(lag, 0), 0.0)  # 0^0 = 1
    return jnp.einsum("ts,sp,tpv->pv", weights, step_mask.astype(float), jac)


def target_gradient(problem: Problem, estimator: Estimator) -> jax.Array:
    """Gradient of the objective `estimator` is meant for (before any aggregation scale)."""
    if estimator.level == "sequence":
        return jax.grad(
            lambda th: sequence_objective(problem, estimator.divergence, estimator.reward_scale, th)
        )(problem.student)
    return token_gradient(
        problem,
        estimator.divergence,
        discount=estimator.discount,
        reward_scale=estimator.reward_scale,
        discount_objective=estimator.discount_objective,
    )


def expected_length(problem: Problem) -> jax.Array:
    """E_pi |y|, the mean number of response tokens."""
    p = jnp.exp(sequence_logprobs(problem.space, problem.student))
    return p @ problem.space.mask.sum(-1)


def aggregation_scale(problem: Problem, estimator: Estimator) -> jax.Array:
    """The constant an aggregation divides the objective gradient by (see `losses`)."""
    agg = estimator.aggregation
    if agg == "seq_mean_token_sum":
        return jnp.ones(())
    if agg == "seq_mean_token_sum_norm":
        return jnp.asarray(1.0 / problem.space.horizon)
    return 1.0 / expected_length(problem)  # what token means are hoped to estimate


def evaluate(problem: Problem, estimator: Estimator) -> Report:
    """Exact expectation, target, bias and variance of `estimator` on `problem`."""
    m = moments(problem, estimator)
    target = aggregation_scale(problem, estimator) * target_gradient(problem, estimator)
    bias = m.mean - target
    norm = float(jnp.linalg.norm(target))
    rel = float(jnp.linalg.norm(bias)) / norm if norm > 0 else math.inf
    return Report(m.mean, target, bias, rel, float(m.variance.sum()))
