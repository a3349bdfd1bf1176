"""The train step's full-vocabulary / top-k OPD term and its task-reward mixing.

`StepConfig.support` "full", "teacher_topk" and "student_topk" replace the sampled token's
advantage by the per-context divergence over a support of the vocabulary (estimator C_gamma of
`opdplus_jax.fullvocab`), computed chunk by chunk. Here the step's gradient is compared with a
reference built from the models' whole [B, T, V] logits and `fullvocab.context_divergence` /
`fullvocab.analytic_loss` (its expectation is checked exactly in tests/test_train_step_exact.py),
its compiled temporaries at a 151936-token vocabulary with those of the unchunked step, and the
mixing of verifier rewards (`task_weight`, `opd_weight`) with pure OPD and pure task-reward
policy gradients.
"""

import chex
import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from flax import nnx

from opdplus_jax import divergences, estimators, fullvocab, losses, models, scoring, train_step
from opdplus_jax.rollout import Rollout

V, P, T = 48, 5, 10
N_SAMPLES, N_PROMPTS = 2, 4  # 8 rows: teacher 0's 2 prompts, then teacher 1's 2
B = N_SAMPLES * N_PROMPTS
VOCAB = V - 3  # a padded embedding: logits are sliced to the tokenizer's ids


def make_model(seed: int, scale: float, vocab: int = V, hidden: int = 16):
    cfg = models.qwen3_config(
        vocab_size=vocab, hidden_size=hidden, num_layers=1, num_heads=2, num_kv_heads=1
    )
    model = models.CausalLM(cfg, rngs=nnx.Rngs(seed))
    model.embed_tokens.set_value(model.embed_tokens[...] * scale)  # less uniform outputs
    return nnx.split(model, nnx.Param)


STUDENT = make_model(0, 8.0)
TEACHERS = (make_model(1, 12.0), make_model(2, 10.0))
REFERENCE = make_model(3, 8.0)
FROZEN = train_step.Frozen(teachers=tuple(t[1] for t in TEACHERS), references=(REFERENCE[1],))


def make_batch(seed: int = 0, rows: int = B, vocab: int = VOCAB, t: int = T) -> Rollout:
    rng = np.random.default_rng(seed)
    prompt_mask = (np.arange(P)[None] >= P - rng.integers(1, P + 1, rows)[:, None]).astype(int)
    length = rng.integers(1, t + 1, rows)
    length[0] = t
    mask = (np.arange(t)[None] < length[:, None]).astype(np.int32)
    return Rollout(
        prompt_tokens=jnp.asarray(rng.integers(1, vocab, (rows, P)) * prompt_mask, jnp.int32),
        prompt_mask=jnp.asarray(prompt_mask, jnp.int32),
        tokens=jnp.asarray(rng.integers(1, vocab, (rows, t)) * mask, jnp.int32),
        mask=jnp.asarray(mask),
        behaviour_logp=jnp.zeros((rows, t), jnp.float32),
        policy_logp=jnp.zeros((rows, t), jnp.float32),
        teacher=jnp.asarray(np.repeat([0, 1], rows // 2), jnp.int32),
        row_id=jnp.arange(rows, dtype=jnp.int32),
        group_id=jnp.asarray(np.repeat(np.arange(rows // N_SAMPLES), N_SAMPLES), jnp.int32),
    )


BATCH = make_batch()


def step_config(**kw) -> train_step.StepConfig:
    """Two routed teachers, lambda 1.25 (with the reference) and 1 (without)."""
    base = {
        "student": STUDENT[0],
        "teachers": tuple(t[0] for t in TEACHERS),
        "references": (REFERENCE[0],),
        "reward_scales": (1.25, 1.0),
        "reference_of": (0, None),
        "vocab_size": VOCAB,
        "divergence": divergences.get("jsd"),
        "group_size": N_SAMPLES,
        "teacher_rows": (B // 2, B // 2),
    }
    return train_step.StepConfig(**{**base, **kw})


def gradient_recorder() -> optax.GradientTransformation:
    """Applies no update; its state is the last gradient."""
    return optax.GradientTransformation(
        lambda params: jax.tree.map(jnp.zeros_like, params),
        lambda grads, state, params=None: (jax.tree.map(jnp.zeros_like, grads), grads),
    )


RECORDER = gradient_recorder()


def step_gradient(cfg, batch=BATCH, task_reward=None):
    params = jax.tree.map(jnp.copy, STUDENT[1])
    state = train_step.TrainState(jnp.zeros((), jnp.int32), params, RECORDER.init(params))
    state, metrics = train_step.train_step(cfg, RECORDER, state, FROZEN, batch, task_reward)
    assert float(metrics["skipped"]) == 0.0
    return jax.device_get(state.opt_state), jax.device_get(metrics)


def whole_logprobs(graphdef, params, rows: Rollout) -> jax.Array:
    """[R, T, VOCAB] log-softmax of a model's whole logits at the completion positions."""
    model = nnx.merge(graphdef, params)
    x = scoring.completion_hidden(
        model, rows.prompt_tokens, rows.prompt_mask, rows.tokens, rows.mask
    )
    return jax.nn.log_softmax(model.logits(x)[..., :VOCAB], axis=-1)


def reference_loss(params, cfg: train_step.StepConfig, batch=BATCH):
    """aggregate(D_t - sg(A_t) log pi_t) from whole [B, T, V] logits, teacher block by block."""
    half = B // 2
    blocks = (slice(0, half), slice(half, B))
    lp = whole_logprobs(STUDENT[0], params, batch)
    divs = []
    for k, rows in enumerate(blocks):
        part = jax.tree.map(lambda x, rows=rows: x[rows], batch)
        target = whole_logprobs(TEACHERS[k][0], TEACHERS[k][1], part)
        lam = cfg.reward_scales[k]
        if lam != 1.0:
            ref = whole_logprobs(REFERENCE[0], REFERENCE[1], part)
            target = lam * target + (1.0 - lam) * ref
        divs.append(
            fullvocab.context_divergence(
                cfg.divergence,
                lp[rows],
                target,
                support=cfg.support,
                top_k=cfg.top_k,
                tail=cfg.tail or "renormalize",
            )
        )
    d = jnp.where(batch.mask > 0, jnp.concatenate(divs), 0.0)
    logp = jnp.take_along_axis(lp, batch.tokens[..., None], axis=-1)[..., 0]
    return fullvocab.analytic_loss(
        d, logp, batch.mask, discount=cfg.discount, aggregation=cfg.aggregation
    )


SUPPORT_CASES = {
    "full γ=0": {"support": "full"},
    "full γ=0.9 token_mean, microbatched, chunked": {
        "support": "full",
        "discount": 0.9,
        "aggregation": "token_mean",
        "microbatch_rows": B // 2,
        "logits_chunk": 3,
    },
    "teacher top-3 renormalize, reverse KL": {
        "support": "teacher_topk",
        "top_k": 3,
        "tail": "renormalize",
        "divergence": divergences.get("reverse_kl"),
    },
    "teacher top-2 bucket γ=1, chunked": {
        "support": "teacher_topk",
        "top_k": 2,
        "tail": "bucket",
        "discount": 1.0,
        "logits_chunk": 4,
    },
    "student top-4 bucket, forward KL": {
        "support": "student_topk",
        "top_k": 4,
        "tail": "bucket",
        "divergence": divergences.get("forward_kl"),
    },
}


@pytest.mark.parametrize("case", list(SUPPORT_CASES))
def test_support_step_gradient_equals_the_whole_logits_reference(case):
    cfg = step_config(**SUPPORT_CASES[case])
    got, metrics = step_gradient(cfg)
    loss, want = jax.value_and_grad(reference_loss)(STUDENT[1], cfg)
    scale = max(float(np.abs(g).max()) for g in jax.tree.leaves(want))
    assert scale > 1e-3, scale  # a real signal
    chex.assert_trees_all_close(got, want, atol=2e-5 * scale, rtol=0)
    if cfg.discount == 0:  # else the surrogates' values differ (-A log pi vs -A pi / sg(pi))
        np.testing.assert_allclose(metrics["loss"], loss, rtol=1e-5)
    assert metrics["divergence_mean"] > 0


def test_the_support_changes_the_gradient():
    """The comparison has power: the full and top-k supports give different steps."""
    full, _ = step_gradient(step_config(support="full"))
    topk, _ = step_gradient(step_config(support="teacher_topk", top_k=2, tail="renormalize"))
    diff = max(
        float(np.abs(a - b).max()) for a, b in zip(*map(jax.tree.leaves, (full, topk)), strict=True)
    )
    assert diff > 1e-3


def temp_bytes(chunk: int | None, vocab: int = 151936, t: int = 256, rows: int = 2) -> int:
    """Temporary bytes of the compiled full-vocabulary train step (XLA memory analysis)."""
    student = nnx.eval_shape(lambda: make_model_module(0, vocab))
    teacher = nnx.eval_shape(lambda: make_model_module(1, vocab))
    s_graph, s_params = nnx.split(student, nnx.Param)
    t_graph, t_params = nnx.split(teacher, nnx.Param)
    cfg = train_step.StepConfig(
        student=s_graph,
        teachers=(t_graph,),
        references=(),
        reward_scales=(1.0,),
        reference_of=(None,),
        vocab_size=vocab,
        divergence=divergences.get("jsd"),
        support="full",
        logits_chunk=chunk,
    )
    opt = optax.sgd(1e-3)
    opt_state = jax.eval_shape(opt.init, s_params)
    state = train_step.TrainState(jax.ShapeDtypeStruct((), jnp.int32), s_params, opt_state)
    batch = jax.eval_shape(lambda: make_batch(rows=rows, vocab=vocab, t=t))
    frozen = train_step.Frozen(teachers=(t_params,), references=())
    compiled = train_step.train_step.lower(cfg, opt, state, frozen, batch).compile()
    return compiled.memory_analysis().temp_size_in_bytes


def make_model_module(seed: int, vocab: int):
    cfg = models.qwen3_config(
        vocab_size=vocab, hidden_size=16, num_layers=1, num_heads=2, num_kv_heads=1
    )
    return models.CausalLM(cfg, rngs=nnx.Rngs(seed))


def test_chunked_full_vocabulary_step_holds_an_eighth_of_the_unchunked_temporaries():
    """At a 151936-token vocabulary and 2 x 256 completion tokens, the compiled step's
    temporaries with 16-position chunks are <= 1/8 of the unchunked step's (which hold several
    [B, T, V] float32 arrays: 311 MB each)."""
    chunked, unchunked = temp_bytes(16), temp_bytes(None)
    assert unchunked > 2 * 256 * 151936 * 4  # the control holds whole logits
    assert chunked <= unchunked / 8, (chunked, unchunked)


# ------------------------------------------------------------------------------ task rewards

REWARD = jnp.asarray([1.0, 0.0, 1.0, 1.0, 0.0, 1.0, 0.0, 0.0])  # group 1 all equal: 0 advantage


@pytest.mark.parametrize("support", ["sampled", "full"])
def test_task_weight_0_is_pure_opd(support):
    pure, m_pure = step_gradient(step_config(support=support))
    mixed, m_mixed = step_gradient(
        step_config(support=support, task_weight=0.0), task_reward=REWARD
    )
    chex.assert_trees_all_equal(pure, mixed)
    assert m_pure.keys() == m_mixed.keys()


@pytest.mark.parametrize("kind", estimators.TASK_ADVANTAGES)
@pytest.mark.parametrize("support", ["sampled", "full"])
def test_opd_weight_0_is_pure_task_reward_policy_gradient(kind, support):
    cfg = step_config(support=support, opd_weight=0.0, task_weight=1.0, task_advantage=kind)
    got, metrics = step_gradient(cfg, task_reward=REWARD)
    r = np.asarray(REWARD).reshape(-1, N_SAMPLES)
    if kind == "loo":
        adv = r - (r.sum(1, keepdims=True) - r) / (N_SAMPLES - 1)
    else:
        adv = (r - r.mean(1, keepdims=True)) / (r.std(1, keepdims=True) + 1e-6)
    adv_BT = jnp.asarray(adv.reshape(-1, 1)) * BATCH.mask

    def task_loss(params):
        logp = scoring.completion_logprobs(
            nnx.merge(STUDENT[0], params),
            BATCH.prompt_tokens,
            BATCH.prompt_mask,
            BATCH.tokens,
            BATCH.mask,
            VOCAB,
        )
        return losses.pg_loss(logp, adv_BT, BATCH.mask)

    want = jax.grad(task_loss)(STUDENT[1])
    scale = max(float(np.abs(g).max()) for g in jax.tree.leaves(want))
    assert scale > 1e-3
    chex.assert_trees_all_close(got, want, atol=1e-5 * scale, rtol=0)
    np.testing.assert_allclose(metrics["task_reward_mean"], float(REWARD.mean()))
    # OPD is still reported, weighted 0 (full support at γ = 0: all in the divergence term).
    assert metrics["divergence_mean" if support == "full" else "opd_advantage_abs_mean"] > 0


def test_mixing_is_linear_in_the_weights():
    opd, _ = step_gradient(step_config())
    task, _ = step_gradient(step_config(opd_weight=0.0, task_weight=1.0), task_reward=REWARD)
    mixed, metrics = step_gradient(step_config(opd_weight=0.5, task_weight=2.0), task_reward=REWARD)
    want = jax.tree.map(lambda a, b: 0.5 * a + 2.0 * b, opd, task)
    scale = max(float(np.abs(g).max()) for g in jax.tree.leaves(want))
    chex.assert_trees_all_close(mixed, want, atol=1e-5 * scale, rtol=0)
    for key in ("task_reward_mean", "opd_advantage_abs_mean", "task_advantage_abs_mean"):
        assert key in metrics


def test_task_advantages_values():
    r = jnp.asarray([1.0, 0.0, 0.0, 1.0, 1.0, 1.0])
    loo = estimators.task_advantages(r, 3, kind="loo")
    np.testing.assert_allclose(loo, [1.0, -0.5, -0.5, 0.0, 0.0, 0.0], atol=1e-6)
    norm = estimators.task_advantages(r, 3, kind="group_norm")
    std = np.std([1.0, 0.0, 0.0])
    np.testing.assert_allclose(
        norm, [2 / 3 / std, -1 / 3 / std, -1 / 3 / std, 0, 0, 0], rtol=1e-5, atol=1e-6
    )


# ------------------------------------------------------------------------------ errors


@pytest.mark.parametrize(
    ("change", "match"),
    [
        ({"support": "topk"}, "support must be one of sampled, full"),
        ({"support": "full", "level": "sequence"}, "level='token'"),
        ({"support": "full", "correction": "stop_grad"}, "correction='opd_plus'"),
        ({"support": "full", "log_ratio_clip": 5.0}, "log_ratio_clip=None"),
        ({"support": "teacher_topk"}, "positive integer top_k"),
        ({"support": "teacher_topk", "top_k": 4}, "tail must be one of"),
        ({"top_k": 4}, "takes no top_k or tail"),
        ({"support": "full", "tail": "bucket"}, "takes no top_k or tail"),
        ({"opd_weight": 0.0}, "both 0"),
        ({"task_weight": -1.0}, "task_weight must be a number >= 0"),
        ({"task_weight": 1.0, "task_advantage": "mean"}, "task_advantage must be one of"),
        ({"task_weight": 1.0, "group_size": 1, "teacher_rows": None, "teachers": (TEACHERS[0][0],),
          "reward_scales": (1.0,), "reference_of": (None,)}, "needs at least 2 samples per prompt"),
    ],
)  # fmt: skip
def test_unsupported_combinations_name_the_valid_ones(change, match):
    with pytest.raises(ValueError, match=match):
        step_config(**change)


def test_task_weight_without_rewards_and_minibatches_with_full_support_are_refused():
    with pytest.raises(ValueError, match="needs task_reward, one float per row"):
        step_gradient(step_config(task_weight=1.0))
    with pytest.raises(ValueError, match="fused train_step only"):
        train_step.score_rollout(step_config(support="full"), STUDENT[1], FROZEN, BATCH)
    with pytest.raises(ValueError, match="exceeds the vocabulary"):
        step_gradient(step_config(support="teacher_topk", top_k=VOCAB + 1, tail="bucket"))
