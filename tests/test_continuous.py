"""Tests for the continuous-batching engine (opdplus_jax.continuous, rollout.ContinuousEngine):
samples independent of the schedule and equal to the static sampler's, EOS/stop tokens, the
admission order, meshes, compilation count, the KV memory it holds, bad arguments.

Runs on the tiny Hugging Face fixtures of tests/testdata/models (scripts/make_model_fixtures.py).
"""

from __future__ import annotations

import dataclasses
import functools
import itertools
import os

import chex
import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from opdplus_jax import continuous, evaluation, models, sampling, scoring, trainer
from opdplus_jax import sharding as shd
from opdplus_jax.models import published
from opdplus_jax.rollout import (
    ContinuousEngine,
    SamplingParams,
    StaticEngine,
    make_engine,
)
from tests import tiny_run

FIXTURES = os.path.join(os.path.dirname(__file__), "testdata", "models")
# Ragged prompts (bucket 16); 3 samples each: 15 rows.
PROMPTS = [[1, 5, 7, 9], [3, 4], [8, 8, 8, 8, 8, 8, 2], [11], [6, 1, 6, 1, 6, 1, 6, 1, 6, 1, 6]]
N_SAMPLES = 3
T = 12


@functools.cache
def model(name: str = "qwen3_untied", mesh_shape: tuple = ()) -> nnx.Module:
    mesh = shd.make_mesh(dict(mesh_shape)) if mesh_shape else None
    return models.from_pretrained(os.path.join(FIXTURES, name), mesh=mesh)


def rows(prompts=PROMPTS, n=N_SAMPLES):
    return [p for p in prompts for _ in range(n)]


@functools.cache
def stop_ids(name: str = "qwen3_untied") -> tuple[int, ...]:
    """Stop ids under which the rows of `reference()` stop at many different steps (some at
    their first token), picked from a free run with the same key."""
    free = sampling.generate(model(name), rows(), max_new_tokens=T, rng=jax.random.key(3))
    tokens = np.asarray(free.tokens)
    picks = (tokens[0, 0], tokens[7, 0], tokens[4, 2], tokens[9, 5])
    return tuple(sorted({int(t) for t in picks}))


def kw(name: str = "qwen3_untied", **extra):
    return {"max_new_tokens": T, "rng": jax.random.key(3), "stop_token_ids": stop_ids(name),
            **extra}  # fmt: skip


def assert_same_samples(a, b, atol=1e-5):
    """Tokens and masks equal; log-probs equal up to float rounding (different batch sizes)."""
    np.testing.assert_array_equal(np.asarray(a.tokens), np.asarray(b.tokens))
    np.testing.assert_array_equal(np.asarray(a.mask), np.asarray(b.mask))
    for field in ("logprobs", "sampling_logprobs"):
        np.testing.assert_allclose(
            np.asarray(getattr(a, field)), np.asarray(getattr(b, field)), atol=atol
        )


# ----------------------------------------------------------------------------- samples


def test_the_test_rows_stop_at_many_different_steps():
    ref = sampling.generate(model(), rows(), **kw())
    lengths = np.asarray(ref.mask).sum(1)
    assert len(set(lengths.tolist())) >= 4 and lengths.min() == 1 and lengths.max() == T, lengths


@pytest.mark.parametrize(
    "schedule",
    [
        {"slots": 1},
        {"slots": 2, "refill_width": 1},
        {"slots": 4},
        {"slots": 4, "tail_halvings": 0},
        {"slots": 7, "order": np.random.default_rng(0).permutation(15)},
        {"slots": 15},
        {"slots": 100},
    ],
    ids=["1", "2-width1", "4", "4-no-halving", "7-permuted", "15", "100"],
)
def test_samples_equal_the_static_samplers_for_every_schedule(schedule, name="qwen3_untied"):
    ref = sampling.generate(model(name), rows(), **kw(name, top_p=0.9))
    out = continuous.generate(model(name), PROMPTS, num_samples=N_SAMPLES, **kw(name, top_p=0.9),
                              **schedule)  # fmt: skip
    assert_same_samples(ref, out)
    np.testing.assert_array_equal(np.asarray(out.prompt_tokens), np.asarray(ref.prompt_tokens))
    np.testing.assert_array_equal(np.asarray(out.prompt_mask), np.asarray(ref.prompt_mask))


def test_another_family_matches_the_static_sampler():
    test_samples_equal_the_static_samplers_for_every_schedule({"slots": 4}, name="llama3")


def test_greedy_and_top_k_match_the_static_sampler():
    for extra in ({"temperature": 0.0, "rng": None}, {"top_k": 5, "temperature": 0.7}):
        ref = sampling.generate(model(), rows(), **kw(**extra))
        out = continuous.generate(model(), PROMPTS, num_samples=N_SAMPLES, slots=4, **kw(**extra))
        assert_same_samples(ref, out)


def test_stop_tokens_end_rows_and_pad_after():
    out = continuous.generate(model(), PROMPTS, num_samples=N_SAMPLES, slots=4, **kw())
    tokens, mask = np.asarray(out.tokens), np.asarray(out.mask)
    logp, slogp = np.asarray(out.logprobs), np.asarray(out.sampling_logprobs)
    for b in range(len(tokens)):
        length = int(mask[b].sum())
        np.testing.assert_array_equal(mask[b], np.arange(T) < length)  # a prefix of ones
        stopped = np.isin(tokens[b, :length], stop_ids())
        if length < T:  # ended by its last token, and by no earlier one
            assert stopped[-1] and not stopped[:-1].any()
        else:
            assert not stopped[:-1].any()
        assert np.all(tokens[b, length:] == 0)  # the pad id
        assert np.all(logp[b, length:] == 0) and np.all(slogp[b, length:] == 0)
        assert np.all(logp[b, :length] < 0)
    # Decode work: each row's tokens after its first (drawn from the prefill) are busy slot-steps.
    assert int(out.busy_steps) == int(mask.sum()) - len(tokens)
    assert int(out.busy_steps) <= int(out.slot_steps) <= 4 * int(out.num_steps)


def test_a_row_stopping_at_its_first_token_frees_its_slot():
    out = continuous.generate(model(), PROMPTS, num_samples=N_SAMPLES, slots=1, tail_halvings=0,
                              **kw())  # fmt: skip
    lengths = np.asarray(out.mask).sum(1)
    assert lengths[0] == 1  # row 0 stops at its first token (see stop_ids)
    start, slot = np.asarray(out.row_start), np.asarray(out.row_slot)
    # Row 0 filled the slot before the loop and stopped: row 1 takes it before the first decode.
    assert start[0] == start[1] == 0 and slot[0] == slot[1] == 0
    # A row admitted inside the loop that stops at once frees the slot for the next step.
    firsts = [r for r in range(1, len(lengths) - 1) if lengths[r] == 1]
    assert firsts, "the test needs a row after the first that stops at its first token"
    assert all(start[r + 1] == start[r] + 1 for r in firsts)


# ----------------------------------------------------------------------------- admission


@pytest.mark.parametrize("order", [None, "reversed", "permuted"])
def test_rows_are_admitted_in_order_as_soon_as_a_slot_frees(order):
    R, S = len(PROMPTS) * N_SAMPLES, 3
    perm = {None: np.arange(R), "reversed": np.arange(R)[::-1],
            "permuted": np.random.default_rng(1).permutation(R)}[order]  # fmt: skip
    out = continuous.generate(model(), PROMPTS, num_samples=N_SAMPLES, slots=S, tail_halvings=0,
                              refill_width=S, order=None if order is None else perm,
                              **kw())  # fmt: skip
    start, slot = np.asarray(out.row_start), np.asarray(out.row_slot)
    lengths = np.asarray(out.mask).sum(1)
    assert np.all(np.diff(start[perm]) >= 0)  # admitted in the given order
    assert sorted(slot[perm[:S]].tolist()) == list(range(S)) and np.all(start[perm[:S]] == 0)
    for s in range(S):  # in each slot, a row starts the step after its predecessor stops
        occupants = [r for r in perm if slot[r] == s]
        for prev, nxt in itertools.pairwise(occupants):
            # A row decodes steps start .. start + length - 2 (its first token is the prefill's);
            # one that stops at its first token frees the slot for the next step, or, admitted
            # by the first fill (before the loop), for step 0.
            if lengths[prev] > 1:
                expect = start[prev] + lengths[prev] - 1
            else:
                expect = 0 if prev in perm[:S] else start[prev] + 1
            assert start[nxt] == expect, (prev, nxt)


def test_order_must_be_a_permutation_of_the_rows():
    with pytest.raises(ValueError, match="permutation of the 15 rows"):
        continuous.generate(model(), PROMPTS, num_samples=N_SAMPLES, order=[0] * 15, **kw())


# ----------------------------------------------------------------------------- meshes


@pytest.mark.parametrize(
    "mesh_shape", [(("data", 2), ("fsdp", 2), ("tensor", 2)), (("fsdp", 8),)], ids=["2x2x2", "f8"]
)
def test_eight_devices_give_the_samples_of_one(mesh_shape):
    assert jax.device_count() == 8
    one = continuous.generate(model(), PROMPTS, num_samples=N_SAMPLES, slots=5, **kw())
    eight = continuous.generate(model("qwen3_untied", mesh_shape), PROMPTS,
                                num_samples=N_SAMPLES, slots=5, **kw())  # fmt: skip
    assert_same_samples(one, eight)


# ----------------------------------------------------------------------------- compilation


def test_no_recompilation_across_calls_with_the_same_shapes():
    base = {"num_samples": 2, "slots": 3, "max_new_tokens": 6, "stop_token_ids": (5,)}
    continuous.generate(model(), [[1, 2], [3]], rng=jax.random.key(0), top_p=0.9, **base)
    before = dict(sampling.TRACE_COUNTS)
    graphdef, params, rest = scoring.split_model(model())
    params = jax.tree.map(lambda x: x * 1.01, params)  # new weights, same shapes
    calls = [
        (model(), [[1, 2, 3, 4, 5], [6]], 0.7, 0.5),
        (model(), [[9] * 16, [1, 2, 3]], 1.3, 0.95),
        ((graphdef, params, rest), [[4], [5, 6, 7]], 1.0, 0.8),
    ]
    for i, (m, prompts, temperature, top_p) in enumerate(calls):
        continuous.generate(m, prompts, rng=jax.random.key(i), temperature=temperature,
                            top_p=top_p, **base)  # fmt: skip
    assert dict(sampling.TRACE_COUNTS) == before
    continuous.generate(model(), [[1] * 17, [2]], rng=jax.random.key(0), top_p=0.9, **base)
    assert sampling.TRACE_COUNTS["continuous"] == before["continuous"] + 1


# ----------------------------------------------------------------------------- memory


def test_kv_bytes_per_token_and_the_slots_a_budget_holds():
    cfg = published.get("Qwen3-8B")  # 36 layers, 8 kv heads of 128
    assert continuous.kv_bytes_per_token(cfg, jnp.bfloat16) == 2 * 36 * 8 * 128 * 2
    assert continuous.kv_bytes_per_token(cfg, jnp.float32) == 2 * 36 * 8 * 128 * 4
    shape = {"prompt_len": 1024, "max_new_tokens": 8192, "num_prompts": 64}
    budget = 40 * 2**30
    slots = continuous.max_slots(cfg, jnp.bfloat16, budget, **shape)
    assert continuous.kv_cache_bytes(cfg, jnp.bfloat16, slots=slots, **shape) <= budget
    assert continuous.kv_cache_bytes(cfg, jnp.bfloat16, slots=slots + 1, **shape) > budget
    assert continuous.max_slots(cfg, jnp.bfloat16, 1e6, **shape) == 0


def _lowered(slots: int, rows_per_prompt: int = 8, num_prompts: int = 8, P: int = 16):
    m = model()
    graphdef, params, rest = scoring.split_model(m)
    abstract = lambda t: jax.tree.map(lambda x: jax.ShapeDtypeStruct(x.shape, x.dtype), t)
    sampler = sampling.SamplerStatic(cache_length=P + 63, max_new_tokens=64, stop_ids=(2,))
    static = continuous.ContinuousStatic(sampler, slots, rows_per_prompt)
    i32 = lambda *shape: jax.ShapeDtypeStruct(shape, jnp.int32)
    args = (abstract(params), abstract(rest), i32(num_prompts, P), i32(num_prompts, P),
            i32(num_prompts * rows_per_prompt), jax.random.key(0), jnp.float32(1),
            jnp.float32(1))  # fmt: skip
    return continuous.continuous_loop.lower(graphdef, *args, static=static).compile()


def test_the_compiled_kv_memory_follows_the_slots_not_the_rows():
    cfg = model().config
    small, large = (_lowered(s).memory_analysis().temp_size_in_bytes for s in (4, 32))
    pool = continuous.kv_bytes_per_token(cfg, jnp.float32) * (16 + 63)  # one slot's cache
    assert large - small >= 28 * pool  # 28 more slots hold 28 more slot caches
    assert small < 64 * pool  # far below a cache for all 64 rows (the static sampler's)


def test_bfloat16_kv_cache_samples_close_to_float32():
    f32 = continuous.generate(model(), PROMPTS, num_samples=N_SAMPLES, slots=4, **kw())
    bf16 = continuous.generate(model(), PROMPTS, num_samples=N_SAMPLES, slots=4,
                               **kw(kv_dtype="bfloat16"))  # fmt: skip
    static_bf16 = sampling.generate(model(), rows(), **kw(kv_dtype="bfloat16"))
    assert_same_samples(static_bf16, bf16, atol=1e-4)  # bfloat16 keys round more coarsely
    agree = np.asarray(f32.tokens) == np.asarray(bf16.tokens)
    first = np.asarray(f32.logprobs)[:, 0] - np.asarray(bf16.logprobs)[:, 0]
    assert np.abs(first).max() < 2e-2 and agree.mean() > 0.5
    m = model()
    _, cache = sampling.prefill(*scoring.split_model(m), *sampling.pad_prompts(PROMPTS),
                                static=sampling.SamplerStatic(16, kv_dtype="bfloat16"))  # fmt: skip
    assert cache["k"].dtype == jnp.bfloat16


def test_chunked_prefill_equals_the_whole_prompt():
    m = model()
    tokens, mask = sampling.pad_prompts([list(range(3, 40)), [5, 6]])  # bucket 64
    whole = sampling.prefill(*scoring.split_model(m), tokens, mask,
                             static=sampling.SamplerStatic(80))  # fmt: skip
    chunked = sampling.prefill(*scoring.split_model(m), tokens, mask,
                               static=sampling.SamplerStatic(80, prefill_chunk=16))  # fmt: skip
    chex.assert_trees_all_close(whole[0], chunked[0], atol=1e-5)  # the first token's logits
    real = np.asarray(mask, bool)  # padding slots hold unread values, which may differ
    for k in ("k", "v"):
        a, b = (
            np.asarray(c[k])[:, :, :, :64].transpose(1, 3, 0, 2, 4) for c in (whole[1], chunked[1])
        )
        np.testing.assert_allclose(a[real], b[real], atol=1e-5)
    a = continuous.generate(m, PROMPTS, num_samples=2, slots=3, **kw(prefill_chunk=16))
    b = continuous.generate(m, PROMPTS, num_samples=2, slots=3, **kw())
    assert_same_samples(a, b)
    with pytest.raises(ValueError, match="does not divide the prompt bucket 16"):
        sampling.generate(m, PROMPTS, **kw(prefill_chunk=6))


def test_per_row_write_index_writes_each_rows_own_slot():
    m = model()
    B, S = 3, 10
    tokens = jnp.asarray([[4], [7], [9]], jnp.int32)
    cache = m.init_cache(B, S)
    mask = jnp.ones((B, S), bool)
    scalar, c1 = m.decode_hidden(tokens, tokens * 0 + 2, cache, 5, mask)
    rowwise, c2 = m.decode_hidden(tokens, tokens * 0 + 2, cache, jnp.full((B,), 5), mask)
    chex.assert_trees_all_close((scalar, c1), (rowwise, c2), atol=1e-6)
    where = jnp.asarray([0, 4, S])  # row 2 writes past the cache: dropped
    x, c3 = m.decode_hidden(tokens, tokens * 0 + 2, cache, where, mask)
    written = np.asarray(jnp.abs(c3["k"]).sum((0, 2, 4)) > 0)  # [B, S]
    np.testing.assert_array_equal(written, [*np.eye(S, dtype=bool)[[0, 4]].tolist(), [0] * S])
    for b, w in ((0, 0), (1, 4)):  # each row as if decoded alone at its own slot
        alone, _ = m.decode_hidden(tokens[b : b + 1], tokens[b : b + 1] * 0 + 2,
                                   m.init_cache(1, S), w, mask[b : b + 1])  # fmt: skip
        np.testing.assert_allclose(np.asarray(x[b]), np.asarray(alone[0]), atol=1e-5)
    with pytest.raises(ValueError, match=r"write_index must be an int32 scalar .* shape \(3,\)"):
        m.decode_hidden(tokens, tokens, cache, jnp.zeros((2,), jnp.int32), mask)


# ----------------------------------------------------------------------------- engines


def test_engines_return_the_same_rollout_and_scores():
    params_model = model()
    sp = SamplingParams(max_new_tokens=T, stop_token_ids=stop_ids())
    static, params = StaticEngine.for_model(params_model, sp)
    cont = ContinuousEngine(static.graphdef, sp, slots=4)
    teacher = np.arange(len(PROMPTS)) % 2
    a = static.generate(params, PROMPTS, rng=jax.random.key(3), num_samples=N_SAMPLES,
                        teacher=teacher)  # fmt: skip
    b = cont.generate(params, PROMPTS, rng=jax.random.key(3), num_samples=N_SAMPLES,
                      teacher=teacher)  # fmt: skip
    for field in ("prompt_tokens", "prompt_mask", "tokens", "mask", "teacher", "row_id",
                  "group_id"):  # fmt: skip
        np.testing.assert_array_equal(np.asarray(getattr(a, field)), np.asarray(getattr(b, field)))
    for field in ("behaviour_logp", "policy_logp"):
        np.testing.assert_allclose(getattr(a, field), getattr(b, field), atol=1e-5)
    np.testing.assert_allclose(cont.score(params, b), static.score(params, a), atol=1e-5)
    np.testing.assert_allclose(cont.score(params, b), b.policy_logp, atol=1e-5)
    assert isinstance(make_engine("continuous", static.graphdef, sp, slots=4), ContinuousEngine)
    cold = cont.with_sampling(dataclasses.replace(sp, temperature=0.5))
    assert isinstance(cold, ContinuousEngine) and cold.slots == 4
    kl = evaluation.policy_engine(cold)
    assert isinstance(kl, ContinuousEngine) and kl.sampling.temperature == 1.0


@pytest.mark.parametrize(
    "call, match",
    [
        (lambda m: continuous.generate(m, PROMPTS, slots=0, **kw()), "slots must be an int >= 1"),
        (lambda m: continuous.generate(m, PROMPTS, num_samples=0, **kw()), "num_samples"),
        (lambda m: continuous.generate(m, PROMPTS, refill_width=0, **kw()), "refill_width"),
        (lambda m: continuous.generate(m, PROMPTS, **kw(kv_dtype="int8")), "kv_dtype must be"),
        (lambda m: continuous.generate(m, PROMPTS, max_new_tokens=4), "rng is required"),
        (lambda m: continuous.generate(m, [[]], **kw()), "prompt 0 is empty"),
        (lambda m: ContinuousEngine(m, SamplingParams(max_new_tokens=2)), "graphdef"),
        (lambda m: make_engine("vllm", None, SamplingParams(max_new_tokens=2)), "'continuous'"),
        (lambda m: SamplingParams(max_new_tokens=2, prefill_chunk=-1), "prefill_chunk"),
    ],
)
def test_bad_arguments_raise_clear_errors(call, match):
    with pytest.raises((ValueError, TypeError), match=match):
        call(model())


# ----------------------------------------------------------------------------- the trainer


@pytest.fixture(scope="module")
def assets(tmp_path_factory):
    return tiny_run.build_assets(tmp_path_factory.mktemp("continuous"))


def test_the_trainer_samples_and_steps_alike_with_either_engine(assets):
    mesh = shd.make_mesh({"fsdp": 1}, jax.devices()[:1])
    results = {}
    for engine in ("static", "continuous"):
        config = tiny_run.config(assets, **{"rollout.engine": engine, "rollout.slots": 3})
        run = trainer.Trainer.setup(config, mesh=mesh)
        assert type(run.engine).__name__ == f"{engine.capitalize()}Engine"
        assert type(run.eval_engine) is type(run.engine)
        state = run.init_state()
        _, prompts = run.eval_set()  # four prompts of the task: one data batch
        batch = {"prompt_tokens": prompts[:4], "teacher": np.zeros(4, np.int32)}
        rollout = run.rollout(state.params, batch, jax.random.key(0))
        new_state, stats = run.update(state, rollout)
        results[engine] = (rollout, new_state.params, stats)
    (ra, pa, sa), (rb, pb, sb) = results["static"], results["continuous"]
    np.testing.assert_array_equal(np.asarray(ra.tokens), np.asarray(rb.tokens))
    chex.assert_trees_all_close(pa, pb, atol=1e-5)
    np.testing.assert_allclose(float(sa["loss"]), float(sb["loss"]), atol=1e-5)


def test_config_names_a_valid_engine(assets):
    config = tiny_run.config(assets, **{"rollout.engine": "paged"})
    with pytest.raises(ValueError, match="unknown rollout engine 'paged'"):
        trainer.validate(config)
    config = tiny_run.config(assets, **{"rollout.slots": 0})
    with pytest.raises(ValueError, match=r"rollout\.slots must be an int >= 1"):
        trainer.validate(config)
    config = tiny_run.config(assets, **{"rollout.kv_dtype": "int4"})
    with pytest.raises(ValueError, match="rollout: kv_dtype must be"):
        trainer.validate(config)
