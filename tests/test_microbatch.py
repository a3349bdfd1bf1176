"""The memory-bounded train step: microbatches, chunked log-probs and routed teachers.

A rollout split into microbatches (`StepConfig.microbatch_rows`, a `lax.scan` accumulating the
gradient) and scored with a chunked output layer (`logits_chunk`) must give the unsplit step's
new params and every metric, to float32 rounding, for every aggregation and baseline, token and
sequence level, with truncated IS on and two routed teachers whose references are shared or not.
Routing must make two teachers cost about one teacher's FLOPs, and the chunked output layer must
shrink the compiled step's temporary memory at a real vocabulary.
"""

from __future__ import annotations

import dataclasses

import chex
import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from flax import nnx

from opdplus_jax import divergences, estimators, losses, models, train_step
from opdplus_jax.rollout import Rollout

V, P, T = 64, 6, 12
N_SAMPLES, N_PROMPTS = 2, 8  # B = 16 rows: teacher 0's 4 prompts, then teacher 1's 4
B = N_SAMPLES * N_PROMPTS


def _model(seed: int, scale: float = 10.0, vocab: int = V, **kw):
    cfg = models.qwen3_config(
        vocab_size=vocab, hidden_size=32, num_layers=1, num_heads=2, num_kv_heads=1
    )
    model = models.CausalLM(cfg, rngs=nnx.Rngs(seed), **kw)
    model.embed_tokens.set_value(model.embed_tokens[...] * scale)  # less uniform outputs
    return nnx.split(model, nnx.Param)


STUDENT = _model(0)
TEACHERS = (_model(1, 15.0), _model(2, 12.0))
REFERENCE = _model(3)


def _batch(seed: int = 0, rows: int = B) -> Rollout:
    """Random left-padded prompts and completions of random lengths; noisy behaviour log-probs."""
    rng = np.random.default_rng(seed)
    prompt_len = rng.integers(1, P + 1, rows)
    prompt_mask = (np.arange(P)[None] >= P - prompt_len[:, None]).astype(np.int32)
    length = rng.integers(1, T + 1, rows)
    length[0] = T  # one row reaches the end
    mask = (np.arange(T)[None] < length[:, None]).astype(np.int32)
    behaviour = np.where(mask, rng.normal(-3.0, 1.0, (rows, T)), 0.0)
    return Rollout(
        prompt_tokens=jnp.asarray(rng.integers(1, V, (rows, P)) * prompt_mask, jnp.int32),
        prompt_mask=jnp.asarray(prompt_mask),
        tokens=jnp.asarray(rng.integers(1, V - 4, (rows, T)) * mask, jnp.int32),
        mask=jnp.asarray(mask),
        behaviour_logp=jnp.asarray(behaviour, jnp.float32),
        policy_logp=jnp.zeros((rows, T), jnp.float32),
        teacher=jnp.asarray(np.repeat([0, 1], rows // 2), jnp.int32),
        row_id=jnp.arange(rows, dtype=jnp.int32),
        group_id=jnp.asarray(np.repeat(np.arange(rows // N_SAMPLES), N_SAMPLES), jnp.int32),
    )


def _config(shared_reference: bool = True, **kw) -> train_step.StepConfig:
    """Two routed teachers: lambda 1.25 and 0.8 sharing one reference, or 1.25 and 1 (none)."""
    base = {
        "student": STUDENT[0],
        "teachers": tuple(t[0] for t in TEACHERS),
        "references": (REFERENCE[0],),
        "reward_scales": (1.25, 0.8) if shared_reference else (1.25, 1.0),
        "reference_of": (0, 0) if shared_reference else (0, None),
        "vocab_size": V - 4,  # a padded embedding: logits are sliced to the tokenizer's ids
        "divergence": divergences.get("jsd"),
        "group_size": N_SAMPLES,
        "tis_cap": 1.5,
        "teacher_rows": (B // 2, B // 2),
    }
    return train_step.StepConfig(**{**base, **kw})


FROZEN = train_step.Frozen(teachers=tuple(t[1] for t in TEACHERS), references=(REFERENCE[1],))
LR = 0.5


def _sgd_keeping_the_gradient() -> optax.GradientTransformation:
    """SGD whose state is the last gradient, so a step's gradient can be compared directly."""
    return optax.GradientTransformation(
        lambda params: jax.tree.map(jnp.zeros_like, params),
        lambda grads, state, params=None: (jax.tree.map(lambda g: -LR * g, grads), grads),
    )


OPT = _sgd_keeping_the_gradient()


def _state(params=STUDENT[1]) -> train_step.TrainState:
    params = jax.tree.map(jnp.copy, params)
    return train_step.TrainState(
        step=jnp.zeros((), jnp.int32), params=params, opt_state=OPT.init(params)
    )


def _step(cfg, batch, params=STUDENT[1]):
    state, out = train_step.train_step(cfg, OPT, _state(params), FROZEN, batch)
    return jax.device_get(state), jax.device_get(out)


def _assert_same_step(a, b):
    """Same gradient (to 1e-5 of its largest entry), new params and metrics."""
    (state_a, metrics_a), (state_b, metrics_b) = a, b
    scale = max(float(np.abs(g).max()) for g in jax.tree.leaves(state_b.opt_state))
    assert scale > 1e-3, scale  # a real signal
    chex.assert_trees_all_close(state_a.opt_state, state_b.opt_state, atol=1e-5 * scale, rtol=0)
    chex.assert_trees_all_close(state_a.params, state_b.params, atol=1e-5 * scale, rtol=1e-6)
    assert metrics_a.keys() == metrics_b.keys()
    for key in metrics_a:
        np.testing.assert_allclose(
            metrics_a[key], metrics_b[key], rtol=2e-5, atol=1e-6, err_msg=key
        )
    assert metrics_a["skipped"] == 0.0


# Every aggregation and every baseline (and none), both levels, shared and separate references.
CASES = [
    {"aggregation": agg, "baseline": baseline, "level": level, "shared_reference": shared}
    for agg, baseline, level, shared in zip(
        losses.AGGREGATIONS.names(),
        (*estimators.BASELINES.names(), None),
        ("token", "sequence") * 2,
        (True, False) * 2,
        strict=True,
    )
]


@pytest.mark.parametrize("case", CASES, ids=lambda c: f"{c['aggregation']}-{c['baseline']}")
def test_microbatched_step_equals_the_unsplit_step(case):
    whole = _config(**case, discount=1.0 if case["level"] == "token" else 0.0)
    # 4 microbatches of 4 rows (one prompt group of each teacher), chunks that do not divide T.
    split = dataclasses.replace(whole, microbatch_rows=4, logits_chunk=5)
    batch = _batch()
    _assert_same_step(_step(split, batch), _step(whole, batch))


@pytest.mark.slow  # two more compilations of the step
def test_microbatched_bfloat16_params_accumulate_in_float32():
    params = jax.tree.map(lambda p: p.astype(jnp.bfloat16), STUDENT[1])
    whole = _config()
    split = dataclasses.replace(whole, microbatch_rows=4)
    a, b = _step(split, _batch(), params), _step(whole, _batch(), params)
    assert all(x.dtype == jnp.bfloat16 for x in jax.tree.leaves(a[0].opt_state))
    # Both gradients are rounded to bfloat16 at the end (one of a float32 sum of microbatches).
    scale = max(float(np.abs(g.astype(np.float32)).max()) for g in jax.tree.leaves(b[0].opt_state))
    chex.assert_trees_all_close(a[0].opt_state, b[0].opt_state, atol=2e-2 * scale, rtol=2e-2)
    np.testing.assert_allclose(a[1]["grad_norm"], b[1]["grad_norm"], rtol=2e-2)


def test_microbatched_scoring_and_minibatch_updates_equal_the_unsplit_ones():
    whole = _config(ppo_clip=0.2)
    split = dataclasses.replace(whole, microbatch_rows=4, logits_chunk=5)
    batch = _batch(1)
    scored = [train_step.score_rollout(c, STUDENT[1], FROZEN, batch) for c in (split, whole)]
    chex.assert_trees_all_close(scored[0][0], scored[1][0], atol=1e-6, rtol=1e-5)
    chex.assert_trees_all_close(scored[0][1], scored[1][1], atol=1e-6, rtol=1e-5)
    # A minibatch (rows 4..11: any rows, the teachers do not run) against perturbed old
    # log-probs, so that PPO clipping is active; microbatches of 2 rows.
    mb = jax.tree.map(lambda x: x[4:12], batch)
    old = scored[1][0]._replace(old_logp=scored[1][0].old_logp[4:12] + 0.3 * mb.mask)
    old = old._replace(advantages=old.advantages[4:12])
    split = dataclasses.replace(split, microbatch_rows=2)
    results = []
    for cfg in (split, whole):
        state, out = train_step.update_step(cfg, OPT, _state(), mb, old)
        results.append((jax.device_get(state), jax.device_get(out)))
    _assert_same_step(*results)
    assert results[0][1]["ppo_clip_fraction"] > 0


def test_routed_teachers_score_only_their_rows():
    """Teacher 1's block equals a one-teacher step on those rows alone: its advantages never
    depend on teacher 0 (and the shared reference sees the right rows)."""
    cfg = _config(shared_reference=False)
    batch = _batch(2)
    scored, _ = train_step.score_rollout(cfg, STUDENT[1], FROZEN, batch)
    for k, rows in enumerate((slice(0, B // 2), slice(B // 2, B))):
        alone = dataclasses.replace(
            cfg,
            teachers=(cfg.teachers[k],),
            reward_scales=(cfg.reward_scales[k],),
            reference_of=(cfg.reference_of[k],),
            teacher_rows=None,
        )
        frozen = FROZEN._replace(teachers=(FROZEN.teachers[k],))
        part = jax.tree.map(lambda x, rows=rows: x[rows], batch)
        expect, _ = train_step.score_rollout(alone, STUDENT[1], frozen, part)
        np.testing.assert_allclose(scored.advantages[rows], expect.advantages, atol=1e-6)


@pytest.mark.parametrize(
    ("change", "match"),
    [
        ({"microbatch_rows": 3}, "microbatch_rows=3 does not divide the batch's 16 rows"),
        ({"microbatch_rows": 4, "teacher_rows": (4, 12)}, "teacher 0's block of 4 rows"),
        ({"microbatch_rows": 2, "group_size": 4, "teacher_rows": (8, 8)}, "whole groups"),
        ({"teacher_rows": (8, 4)}, r"teacher_rows=\(8, 4\) sums to 12"),
    ],
)
def test_a_layout_the_batch_does_not_fit_is_a_clear_error(change, match):
    with pytest.raises(ValueError, match=match):
        _step(_config(**change), _batch())


@pytest.mark.parametrize(
    ("change", "match"),
    [
        ({"teacher_rows": None}, "2 teachers needs teacher_rows"),
        ({"teacher_rows": (8,)}, "one int >= 1 per teacher"),
        ({"microbatch_rows": 0}, "microbatch_rows must be None or an int >= 1"),
        ({"logits_chunk": -1}, "logits_chunk must be None or an int >= 1"),
    ],
)
def test_bad_step_config_fields_are_refused(change, match):
    with pytest.raises(ValueError, match=match):
        _config(**change)


# ------------------------------------------------------------------------------ cost


def _compiled(cfg, frozen, batch, params=STUDENT[1]):
    state = jax.eval_shape(_state, params)
    return train_step.train_step.lower(cfg, OPT, state, frozen, batch).compile()


def test_two_routed_teachers_cost_about_one_teacher():
    """FLOPs of the fused step with K = 2 routed teachers over K = 1 on the same batch: about 1.
    (Scoring every row with every teacher, as before routing, gave 1.25 here: the teacher's
    forward is a quarter of a step whose student does a forward and a backward.)"""
    batch = _batch()
    one = _config(
        teachers=(TEACHERS[0][0],),
        references=(),
        reward_scales=(1.0,),
        reference_of=(None,),
        teacher_rows=None,
    )
    two = _config(references=(), reward_scales=(1.0, 1.0), reference_of=(None, None))
    flops = []
    for cfg, teachers in ((one, TEACHERS[:1]), (two, TEACHERS)):
        frozen = train_step.Frozen(teachers=tuple(t[1] for t in teachers), references=())
        flops.append(_compiled(cfg, frozen, batch).cost_analysis()["flops"])
    ratio = flops[1] / flops[0]
    print(f"flops: one teacher {flops[0]:.4g}, two routed teachers {flops[1]:.4g} ({ratio:.3f})")
    assert 0.95 < ratio < 1.15, (flops, ratio)


def test_chunked_logits_shrink_the_steps_temporary_memory():
    """At the Qwen3 vocabulary (151936) the unchunked step holds [B, T, V] float32 logits and
    their gradient (1.2 GiB here: 2 rows of 512 tokens); chunks of 32 positions hold [B, 32, V]
    at a time (0.14 GiB, most of it the embedding's and output layer's float32 gradients)."""
    vocab, rows, prompt, length = 151936, 2, 8, 512
    big = tuple(
        nnx.split(nnx.eval_shape(lambda s=s: models.CausalLM(_cfg(vocab), rngs=nnx.Rngs(s))),
                  nnx.Param)
        for s in (0, 1)
    )  # fmt: skip
    batch = jax.eval_shape(lambda: _abstract_batch(rows, prompt, length))
    base = train_step.StepConfig(
        student=big[0][0],
        teachers=(big[1][0],),
        references=(),
        reward_scales=(1.0,),
        reference_of=(None,),
        vocab_size=vocab,
        divergence=divergences.get("reverse_kl"),
    )
    frozen = train_step.Frozen(teachers=(big[1][1],), references=())
    temp = {
        chunk: _compiled(dataclasses.replace(base, logits_chunk=chunk), frozen, batch, big[0][1])
        .memory_analysis()
        .temp_size_in_bytes
        for chunk in (None, 32)
    }
    print(f"temp bytes: unchunked {temp[None]}, chunk 32 {temp[32]}")
    assert temp[32] * 8 <= temp[None], temp


def _cfg(vocab):
    return models.qwen3_config(
        vocab_size=vocab, hidden_size=32, num_layers=2, num_heads=2, num_kv_heads=1
    )


def _abstract_batch(rows, prompt, length):
    ints = lambda n: jnp.ones((rows, n), jnp.int32)
    floats = jnp.zeros((rows, length), jnp.float32)
    ids = jnp.arange(rows, dtype=jnp.int32)
    return Rollout(ints(prompt), ints(prompt), ints(length), ints(length), floats, floats,
                   ids * 0, ids, ids)  # fmt: skip
