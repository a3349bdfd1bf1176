"""The train step's wiring, exactly: the expectation of its gradient over every completion.

A one-layer transformer with V = 4 (token 3 = EOS) and T = 3 new tokens after a fixed prompt has
40 distinct completions (27 without EOS, and 1 + 3 + 9 ending at EOS, masked after it). For each
one, `train_step.train_step` runs on a one-row `Rollout` holding it, with an optimizer that
returns the gradient as its state and applies no update; the probability-weighted sum of those
gradients is compared with the autodiff gradient of the objective the configuration is unbiased
for (README, "What each estimator is unbiased for"), computed from the enumerated distributions
by the defining formulas of `analysis.closed_forms`. This checks end to end what the tabular
tests of `tests/test_exact.py` cannot: the alignment of the model's log-probs with the sampled
tokens, the masks after EOS, each row's teacher and reference, the loss's sign and normaliser.

Everything runs in float32 (the scoring path is float32 by design). Every per-sequence gradient
and the target are sums of O(100) float32 terms of size <= 1, so both carry rounding errors of a
few 1e-7 of the gradient's scale (observed: 1e-7 to 4e-7); the tolerance, 1e-5 of the largest
coordinate, is well above that and far below any wiring error (a wrong sign, mask, position
shift, teacher, reference or normaliser changes the result at order 1; see the last test).
"""

import itertools

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from flax import nnx

from opdplus_jax import divergences, models, scoring, train_step
from opdplus_jax.analysis import closed_forms
from opdplus_jax.rollout import Rollout

V, T, EOS = 4, 3, 3
PROMPT = np.array([[1, 2]], np.int32)


def _model(seed: int, scale: float):
    cfg = models.qwen3_config(
        vocab_size=V, hidden_size=8, num_layers=1, num_heads=2, num_kv_heads=1, eos_token_id=EOS
    )
    model = models.CausalLM(cfg, rngs=nnx.Rngs(seed))
    model.embed_tokens.set_value(model.embed_tokens[...] * scale)  # less uniform outputs
    return nnx.split(model, nnx.Param)


STUDENT, TEACHER, REFERENCE = _model(0, 10.0), _model(1, 15.0), _model(2, 10.0)


def _completions() -> tuple[np.ndarray, np.ndarray]:
    """Every distinct completion (tokens padded with 0 after EOS) and its mask (1 through EOS)."""
    seen = {}
    for ys in itertools.product(range(V), repeat=T):
        ys = list(ys)
        mask = [1] * T
        if EOS in ys:
            end = ys.index(EOS)
            ys = ys[: end + 1] + [0] * (T - end - 1)
            mask = [1] * (end + 1) + [0] * (T - end - 1)
        seen[tuple(ys)] = mask
    return np.array(list(seen), np.int32), np.array(list(seen.values()), np.int32)


TOKENS, MASK = _completions()
N = len(TOKENS)  # 40
# Every raw sequence, to read the next-token distribution at each context: the log-prob of token
# v after the prefix y_<t is position t of the sequence y_<t + v + zeros.
RAW = np.array(list(itertools.product(range(V), repeat=T)), np.int32)


def _raw_index(prefix, v) -> int:
    y = [*prefix, v] + [0] * (T - len(prefix) - 1)
    return int(np.ravel_multi_index(y, (V,) * T))


def _logprobs(graphdef, params, tokens, mask) -> jax.Array:
    """[B, T] log-probs of completions of PROMPT under a model (the package's scoring path)."""
    b = len(tokens)
    prompt = jnp.asarray(np.repeat(PROMPT, b, 0))
    return scoring.completion_logprobs(
        nnx.merge(graphdef, params), prompt, (prompt > 0).astype(jnp.int32), tokens, mask, V
    )


def _sequence_logp(model, params=None):
    graphdef, default = model
    return (_logprobs(graphdef, default if params is None else params, TOKENS, MASK)).sum(-1)


def _next_token_logp(model, params=None):
    """[N, T, V] log p(v | c_t) at every context of every completion (garbage after EOS)."""
    graphdef, default = model
    raw = _logprobs(graphdef, default if params is None else params, RAW, np.ones_like(RAW))
    index = np.zeros((N, T, V), np.int32)
    for n, y in enumerate(TOKENS):
        for t in range(T):
            index[n, t] = [_raw_index(list(y[:t]), v) for v in range(V)]
    return raw[index, np.arange(T)[None, :, None]]


def _recorder() -> optax.GradientTransformation:
    """An optimizer that applies no update and keeps the last gradient as its state."""
    return optax.GradientTransformation(
        lambda params: jax.tree.map(jnp.zeros_like, params),
        lambda grads, state, params=None: (jax.tree.map(jnp.zeros_like, grads), grads),
    )


RECORDER = _recorder()


def _expected_step_gradient(cfg: train_step.StepConfig, frozen: train_step.Frozen):
    """Σ_y π(y) × the gradient `train_step` computes on a rollout holding y alone."""
    params = STUDENT[1]
    prob = np.exp(np.asarray(_sequence_logp(STUDENT), np.float64))
    np.testing.assert_allclose(prob.sum(), 1.0, rtol=1e-5)  # the enumeration is complete
    total = None
    for n in range(N):
        row = lambda x, dtype=np.int32: jnp.asarray(np.asarray(x, dtype)[None])
        batch = Rollout(
            prompt_tokens=jnp.asarray(PROMPT),
            prompt_mask=jnp.asarray((PROMPT > 0).astype(np.int32)),
            tokens=row(TOKENS[n]),
            mask=row(MASK[n]),
            behaviour_logp=jnp.zeros((1, T), jnp.float32),
            policy_logp=jnp.zeros((1, T), jnp.float32),
            teacher=row(0),
            row_id=row(0),
            group_id=row(0),
        )
        state = train_step.TrainState(
            step=jnp.zeros((), jnp.int32),
            params=jax.tree.map(jnp.copy, params),
            opt_state=RECORDER.init(params),
        )
        state, out = train_step.train_step(cfg, RECORDER, state, frozen, batch)
        assert float(out["skipped"]) == 0.0
        grad = [np.asarray(g, np.float64) for g in jax.tree.leaves(state.opt_state)]
        total = [prob[n] * g for g in grad] if total is None else [
            a + prob[n] * g for a, g in zip(total, grad, strict=True)
        ]  # fmt: skip
    return total


def _gradient(objective):
    grads = jax.grad(objective)(STUDENT[1])
    return [np.asarray(g, np.float64) for g in jax.tree.leaves(grads)]


def _log_nu(reward_scale, with_reference, per_token):
    """log ν = λ log q + (1 - λ) log r of the sequences ([N]) or next tokens ([N, T, V])."""
    logp = _next_token_logp if per_token else _sequence_logp
    log_q = logp(TEACHER)
    if not with_reference:
        return log_q
    return reward_scale * log_q + (1.0 - reward_scale) * logp(REFERENCE)


def _sequence_target(name, reward_scale=1.0, with_reference=False):
    """∇ D_f(π(y) ‖ ν(y)) over the completions."""
    nu = jnp.exp(_log_nu(reward_scale, with_reference, per_token=False))
    return _gradient(lambda p: closed_forms.value(name, jnp.exp(_sequence_logp(STUDENT, p)), nu))


def _token_target(name, discount, reward_scale=1.0, with_reference=False):
    """γ = 1: ∇ E_π[Σ_t D_f(π(·|c_t) ‖ ν(·|c_t))]; γ = 0: the same with the context
    distribution frozen (the myopic gradient)."""
    nu = jnp.exp(_log_nu(reward_scale, with_reference, per_token=True))
    active = jnp.asarray(MASK, jnp.float32)  # context c_t is visited iff no EOS before t

    def objective(p):
        prob = jnp.exp(_sequence_logp(STUDENT, p))
        if discount == 0.0:
            prob = jax.lax.stop_gradient(prob)
        d = closed_forms.value(name, jnp.exp(_next_token_logp(STUDENT, p)), nu)  # [N, T]
        return jnp.sum(prob[:, None] * active * d)

    return _gradient(objective)


def _step_config(
    name, correction, level, discount, reward_scale=1.0, reference=False, support="sampled"
):
    cfg = train_step.StepConfig(
        support=support,
        student=STUDENT[0],
        teachers=(TEACHER[0],),
        references=(REFERENCE[0],) if reference else (),
        reward_scales=(reward_scale,),
        reference_of=(0 if reference else None,),
        vocab_size=V,
        divergence=divergences.get(name),
        correction=correction,
        level=level,
        discount=discount,
    )
    frozen = train_step.Frozen(
        teachers=(TEACHER[1],), references=(REFERENCE[1],) if reference else ()
    )
    return cfg, frozen


CASES = {
    "reverse_kl token γ=0 (myopic)": (
        ("reverse_kl", "opd_plus", "token", 0.0),
        lambda: _token_target("reverse_kl", 0.0),
    ),
    "jsd sequence": (
        ("jsd", "opd_plus", "sequence", 0.0),
        lambda: _sequence_target("jsd"),
    ),
    "jsd token γ=1": (
        ("jsd", "opd_plus", "token", 1.0),
        lambda: _token_target("jsd", 1.0),
    ),
    "reverse_kl token γ=1, λ=1.25 with a reference": (
        ("reverse_kl", "opd_plus", "token", 1.0, 1.25, True),
        lambda: _token_target("reverse_kl", 1.0, 1.25, True),
    ),
    "jsd sequence, λ=0.8 with a reference": (
        ("jsd", "opd_plus", "sequence", 0.0, 0.8, True),
        lambda: _sequence_target("jsd", 0.8, True),
    ),
    # The full-vocabulary estimator C_γ (support="full"): the same token-level targets.
    "full vocabulary jsd γ=0": (
        ("jsd", "opd_plus", "token", 0.0, 1.0, False, "full"),
        lambda: _token_target("jsd", 0.0),
    ),
    "full vocabulary hellinger γ=1, λ=1.25 with a reference": (
        ("hellinger", "opd_plus", "token", 1.0, 1.25, True, "full"),
        lambda: _token_target("hellinger", 1.0, 1.25, True),
    ),
    "reverse_kl stop_grad token γ=0 (= OPD+ for KL)": (
        ("reverse_kl", "stop_grad", "token", 0.0),
        lambda: _token_target("reverse_kl", 0.0),
    ),
}


@pytest.mark.parametrize("case", list(CASES))
def test_expected_train_step_gradient_is_the_objective_gradient(case):
    args, target_fn = CASES[case]
    cfg, frozen = _step_config(*args)
    got = _expected_step_gradient(cfg, frozen)
    # The default aggregation (seq_mean_token_sum_norm) divides by B·T: its gradient is ∇J / T.
    target = [g / T for g in target_fn()]
    scale = max(np.abs(g).max() for g in target)
    assert scale > 1e-3, scale  # a real signal, not a near-zero gradient
    for a, b in zip(got, target, strict=True):
        np.testing.assert_allclose(a, b, rtol=0, atol=1e-5 * scale)


def test_the_check_detects_a_wiring_error():
    # The same comparison against another objective (JSD instead of the reverse KL the step
    # estimates) fails by far more than the tolerance: the test has power.
    cfg, frozen = _step_config("reverse_kl", "opd_plus", "token", 0.0)
    got = _expected_step_gradient(cfg, frozen)
    target = [g / T for g in _token_target("reverse_kl", 0.0)]
    wrong = [g / T for g in _token_target("jsd", 0.0)]
    scale = max(np.abs(g).max() for g in target)
    err = lambda ref: max(np.abs(a - b).max() for a, b in zip(got, ref, strict=True)) / scale
    assert err(target) < 1e-5 and err(wrong) > 1e-2, (err(target), err(wrong))
