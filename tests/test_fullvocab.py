"""Full-vocabulary estimator C_gamma: exact unbiasedness, variance, top-k bias, memory, errors."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from opdplus_jax import analysis, fullvocab
from opdplus_jax import divergences as dv
from tests.test_divergences import CASES, IDS

RTOL = 1e-9


@pytest.fixture
def problem(x64):
    return analysis.Problem.random(0, vocab_size=3, horizon=3)


@pytest.mark.parametrize(("name", "params"), CASES, ids=IDS)
def test_full_vocab_discount0_is_unbiased_and_rao_blackwellises_the_sampled_estimator(
    problem, name, params
):
    """E[C_0] = G_0 exactly, and Var(C_0) <= Var(B_0) coordinate by coordinate (tabular,
    step-specific parameters; docs/math.md §2.5)."""
    d = dv.get(name, **params)
    full = analysis.moments(problem, analysis.Estimator(d, full_vocab=True))
    target = analysis.target_gradient(problem, analysis.Estimator(d, discount=0.0))
    assert float(jnp.linalg.norm(full.mean - target)) < RTOL * float(jnp.linalg.norm(target))
    sampled = analysis.moments(problem, analysis.Estimator(d)).variance
    assert np.all(np.asarray(full.variance) <= np.asarray(sampled) + 1e-12)
    assert float(full.variance.sum()) < float(sampled.sum())


@pytest.mark.parametrize(
    ("name", "discount", "lam"),
    [
        ("jsd", 1.0, 1.0),
        ("forward_kl", 1.0, 1.0),
        ("tv", 0.5, 1.0),
        ("jsd", 0.0, 1.25),
        ("hellinger", 1.0, 0.5),
    ],
)
def test_full_vocab_is_unbiased_for_G_gamma_and_gopd(problem, name, discount, lam):
    est = analysis.Estimator(name, discount=discount, full_vocab=True, reward_scale=lam)
    assert analysis.evaluate(problem, est).relative_bias < RTOL


@pytest.mark.slow
@pytest.mark.parametrize(("name", "params"), CASES, ids=IDS)
@pytest.mark.parametrize(("discount", "lam"), [(1.0, 1.0), (0.5, 1.25)])
def test_full_vocab_is_unbiased_for_every_divergence(problem, name, params, discount, lam):
    est = analysis.Estimator(
        dv.get(name, **params), discount=discount, full_vocab=True, reward_scale=lam
    )
    assert analysis.evaluate(problem, est).relative_bias < RTOL


@pytest.mark.usefixtures("x64")
@pytest.mark.parametrize("name", sorted(dv.names()))
def test_logit_gradient_formula(name):
    """dD/dz_v = -pi_v (w(u_v) - sum_w pi_w w(u_w)) at one context (docs/math.md §2.5)."""
    d = dv.get(name)
    z = jnp.array([0.3, -1.2, 0.8, 0.1, -0.4])
    lq = jax.nn.log_softmax(jnp.array([-0.5, 0.9, 0.2, -1.0, 0.6]))
    grad = jax.grad(lambda z: fullvocab.context_divergence(d, jax.nn.log_softmax(z), lq))(z)
    pi = jax.nn.softmax(z)
    w = d.opd_plus_advantage(lq - jnp.log(pi))
    np.testing.assert_allclose(grad, -pi * (w - jnp.sum(pi * w)), rtol=1e-10, atol=1e-12)


@pytest.mark.usefixtures("x64")
def test_top_k_supports_are_exact_only_when_they_cover_the_vocabulary():
    problem = analysis.Problem.random(0, vocab_size=4, horizon=3)
    rel = {}
    for k, tail in [(4, "renormalize"), (4, "bucket"), (3, "bucket"), (2, "renormalize")]:
        est = analysis.Estimator("jsd", full_vocab=True, support="teacher_topk", top_k=k, tail=tail)
        rel[k, tail] = analysis.evaluate(problem, est).relative_bias
    assert rel[4, "renormalize"] < RTOL and rel[4, "bucket"] < RTOL
    assert rel[3, "bucket"] < RTOL  # top-3 plus one tail outcome is the whole of V = 4
    assert rel[2, "renormalize"] > 0.1
    student_top = analysis.Estimator("jsd", full_vocab=True, support="student_topk", top_k=2)
    assert analysis.evaluate(problem, student_top).relative_bias > 0.1


def _heads(seed=0, b=2, t=37, d=8, v=50):
    k = jax.random.split(jax.random.key(seed), 5)
    student = fullvocab.Head(jax.random.normal(k[0], (b, t, d)), jax.random.normal(k[1], (d, v)))
    teacher = fullvocab.Head(jax.random.normal(k[2], (b, t, d)), jax.random.normal(k[3], (d, v)))
    mask = (jnp.arange(t)[None] < jnp.array([t, t - 11])[:, None]).astype(jnp.float32)
    return student, teacher, mask


def test_chunking_and_vocab_padding_do_not_change_the_result():
    student, teacher, mask = _heads()
    kw = {"divergence": "jsd"}
    whole = fullvocab.token_divergences(student, teacher, mask, chunk_size=1000, **kw)
    for chunk in (1, 8, 10):
        got = fullvocab.token_divergences(student, teacher, mask, chunk_size=chunk, **kw)
        np.testing.assert_allclose(got, whole, rtol=1e-5, atol=1e-6)
    assert np.all(np.asarray(whole)[mask == 0] == 0)
    pad = lambda h: fullvocab.Head(h.hidden_BTD, jnp.pad(h.unembed_DV, ((0, 0), (0, 14))))
    padded = fullvocab.token_divergences(pad(student), pad(teacher), mask, vocab_size=50, **kw)
    np.testing.assert_allclose(padded, whole, rtol=1e-5, atol=1e-6)


def test_float32_extreme_logits_stay_finite():
    student, teacher, mask = _heads(t=9)
    hidden = student.hidden_BTD * 60.0  # near one-hot student distributions

    @jax.jit
    def values_and_grads(unembed):
        def loss(unembed, name):
            head = fullvocab.Head(hidden, unembed)
            return fullvocab.token_divergences(head, teacher, mask, divergence=name).sum()

        return {n: jax.value_and_grad(loss)(unembed, n) for n in dv.names()}

    for name, (value, grad) in values_and_grads(student.unembed_DV).items():
        assert np.isfinite(value) and np.all(np.isfinite(grad)), name


def test_analytic_loss_gradient_flows_to_student_only():
    student, teacher, mask = _heads(t=12)
    logp = jnp.zeros(mask.shape)

    def loss(s_unembed, t_unembed):
        d = fullvocab.token_divergences(
            fullvocab.Head(student.hidden_BTD, s_unembed),
            fullvocab.Head(teacher.hidden_BTD, t_unembed),
            mask,
            divergence="reverse_kl",
        )
        return fullvocab.analytic_loss(d, logp, mask, discount=0.5)

    g_student, g_teacher = jax.grad(loss, argnums=(0, 1))(student.unembed_DV, teacher.unembed_DV)
    assert float(jnp.abs(g_student).sum()) > 0
    assert float(jnp.abs(g_teacher).sum()) == 0


def test_memory_does_not_grow_with_the_full_logits():
    """Compiled temporaries of value and gradient: chunked, they stay flat as T grows 4x;
    unchunked they grow with B x T x V. So B x T x V logits are never materialised."""
    v, d = 4096, 32

    def temp_bytes(t, chunk):
        student, teacher, mask = _heads(b=2, t=t, d=d, v=v)

        def loss(unembed, hidden):
            head = fullvocab.Head(hidden, unembed)
            return fullvocab.token_divergences(
                head, teacher, mask, divergence="jsd", chunk_size=chunk
            ).sum()

        grad = jax.jit(jax.grad(loss, argnums=(0, 1)))
        compiled = grad.lower(student.unembed_DV, student.hidden_BTD).compile()
        return compiled.memory_analysis().temp_size_in_bytes

    full_logits = lambda t: 2 * t * v * 4
    chunked_small, chunked_big = temp_bytes(256, 32), temp_bytes(1024, 32)
    assert chunked_big < 1.5 * chunked_small
    assert chunked_big < 0.25 * full_logits(1024)
    assert temp_bytes(1024, 1024) > full_logits(1024)  # the unchunked control


@pytest.mark.parametrize(
    ("kwargs", "match"),
    [
        ({"support": "topk"}, "support must be one of"),
        ({"tail": "drop"}, "tail must be one of"),
        ({"support": "teacher_topk"}, "positive integer top_k"),
        ({"reward_scale": 1.25}, "needs the reference"),
    ],
)
def test_bad_arguments_raise_clear_errors(kwargs, match):
    student, teacher, mask = _heads(t=4)
    with pytest.raises(ValueError, match=match):
        fullvocab.token_divergences(student, teacher, mask, **kwargs)
    with pytest.raises(ValueError, match="do not match the mask"):
        fullvocab.token_divergences(student, teacher, mask[:, :2])
