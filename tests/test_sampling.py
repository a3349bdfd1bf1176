"""Tests for opdplus_jax.sampling: greedy equality with transformers, log-probs, sampling
distribution (chi-square), truncation, EOS/masks, sharding, compilation count, bad input.

Model-agnostic behaviour runs on `ToyLM`, a one-layer attention model implementing the models'
`hidden_states`/`init_cache`/`decode_hidden`/`logits` interface (fast, peaky distributions over
13 tokens); model behaviour runs on the tiny Hugging Face fixtures in tests/testdata/models
(scripts/make_model_fixtures.py).
"""

from __future__ import annotations

import dataclasses
import functools
import json
import math
import os

import jax
import jax.numpy as jnp
import numpy as np
import pytest
import scipy.stats
from flax import nnx

from opdplus_jax import models, sampling, scoring
from opdplus_jax import sharding as shd

FIXTURES = os.path.join(os.path.dirname(__file__), "testdata", "models")
FAMILIES = ("qwen3_tied", "qwen3_untied", "qwen2", "llama3")
ALPHA = 1e-3  # significance level of the goodness-of-fit tests (fixed seeds: deterministic)


@dataclasses.dataclass(frozen=True)
class ToyConfig:
    vocab_size: int


class ToyLM(nnx.Module):
    """One attention layer with learned positions; the `models` call/decode contract."""

    def __init__(self, vocab_size=13, dim=16, max_positions=256, *, rngs):
        self.config = ToyConfig(vocab_size)
        self.embed = nnx.Embed(vocab_size, dim, rngs=rngs)
        self.pos = nnx.Embed(max_positions, dim, rngs=rngs)
        self.q = nnx.Linear(dim, dim, use_bias=False, rngs=rngs)
        self.k = nnx.Linear(dim, dim, use_bias=False, rngs=rngs)
        self.v = nnx.Linear(dim, dim, use_bias=False, rngs=rngs)
        self.out = nnx.Linear(dim, vocab_size, rngs=rngs)

    def _project(self, tokens_BL, positions_BL):
        h_BLD = self.embed(tokens_BL) + self.pos(positions_BL)
        return h_BLD, self.q(h_BLD), self.k(h_BLD), self.v(h_BLD)

    def _hidden(self, h_BLD, q_BLD, k_BSD, v_BSD, allowed_BLS):
        s_BLS = jnp.einsum("bld,bsd->bls", q_BLD, k_BSD) / math.sqrt(q_BLD.shape[-1])
        p_BLS = jax.nn.softmax(jnp.where(allowed_BLS, s_BLS, -1e30), axis=-1)
        return jnp.tanh(h_BLD + jnp.einsum("bls,bsd->bld", p_BLS, v_BSD))

    def logits(self, x_BLD):
        return 3.0 * self.out(x_BLD)

    def __call__(self, tokens_BL, positions_BL=None, attention_mask_BL=None):
        return self.logits(self.hidden_states(tokens_BL, positions_BL, attention_mask_BL))

    def hidden_states(self, tokens_BL, positions_BL=None, attention_mask_BL=None):
        B, L = tokens_BL.shape
        mask_BL = jnp.ones((B, L), bool) if attention_mask_BL is None else attention_mask_BL
        mask_BL = mask_BL.astype(bool)
        if positions_BL is None:
            positions_BL = jnp.maximum(jnp.cumsum(mask_BL, -1) - 1, 0)
        h, q, k, v = self._project(tokens_BL, positions_BL)
        allowed = jnp.tril(jnp.ones((L, L), bool))[None] & mask_BL[:, None, :]
        return self._hidden(h, q, k, v, allowed)

    def init_cache(self, batch_size, max_length, dtype=None):
        z = jnp.zeros((batch_size, max_length, self.q.in_features), dtype or jnp.float32)
        return {"k": z, "v": z}

    def decode_hidden(self, tokens_BL, positions_BL, cache, write_index, kv_mask_BS):
        h, q, k, v = self._project(tokens_BL, positions_BL)
        k_BSD = jax.lax.dynamic_update_slice_in_dim(cache["k"], k, write_index, axis=1)
        v_BSD = jax.lax.dynamic_update_slice_in_dim(cache["v"], v, write_index, axis=1)
        L, S = tokens_BL.shape[1], k_BSD.shape[1]
        causal_LS = jnp.arange(S)[None, :] <= (write_index + jnp.arange(L))[:, None]
        allowed = causal_LS[None] & kv_mask_BS[:, None, :]
        return self._hidden(h, q, k_BSD, v_BSD, allowed), {"k": k_BSD, "v": v_BSD}


@functools.cache
def toy() -> ToyLM:
    return ToyLM(rngs=nnx.Rngs(0))


@functools.cache
def fixture(name: str, mesh_shape: tuple = ()) -> tuple[nnx.Module, dict]:
    mesh = shd.make_mesh(dict(mesh_shape)) if mesh_shape else None
    model = models.from_pretrained(os.path.join(FIXTURES, name), mesh=mesh)
    with open(os.path.join(FIXTURES, name, "generate.json")) as f:
        return model, json.load(f)


TOY_PROMPTS = [[1, 2, 3], [4, 5, 6, 7, 8, 9, 1], [2], [3, 3, 12, 0]]


@nnx.jit
def forward(model, tokens_BL, mask_BL=None):
    """The full causal forward (no cache), jitted."""
    return model(tokens_BL, attention_mask_BL=mask_BL)


def full_forward_logits(model, result) -> np.ndarray:
    """float64 logits [B, T, V] at the completion positions, from one full (uncached) forward."""
    tokens = jnp.concatenate([result.prompt_tokens, result.tokens], axis=1)
    mask = jnp.concatenate([result.prompt_mask, result.mask], axis=1)
    logits = np.asarray(forward(model, tokens, mask), np.float64)
    P, T = result.prompt_tokens.shape[1], result.tokens.shape[1]
    return logits[:, P - 1 : P - 1 + T]


def reference_logprobs(logits: np.ndarray, temperature: float, top_k: int, top_p: float):
    """NumPy float64 log-probs of the tempered, top-k then top-p truncated distribution."""
    z = logits / temperature
    order = np.argsort(-z, kind="stable")
    kept = order[:top_k] if top_k else order
    probs = np.exp(z[kept] - z[kept].max())
    probs /= probs.sum()
    kept = kept[(np.cumsum(probs) - probs) < top_p]
    out = np.full(z.shape, -np.inf)
    out[kept] = z[kept] - scipy.special.logsumexp(z[kept])
    return out


def log_softmax(x):
    return x - scipy.special.logsumexp(x, axis=-1, keepdims=True)


# ----------------------------------------------------------------------------- equality


@pytest.mark.parametrize("family", FAMILIES)
def test_greedy_matches_transformers_generate(family):
    model, ref = fixture(family)
    prompts = [s["prompt"] for s in ref["samples"]]  # ragged: left padding is exercised
    r = sampling.generate(model, prompts, max_new_tokens=ref["max_new_tokens"], temperature=0)
    np.testing.assert_array_equal(np.asarray(r.tokens), [s["tokens"] for s in ref["samples"]])
    assert np.all(np.asarray(r.mask) == 1) and int(r.num_steps) == ref["max_new_tokens"]
    assert np.all(np.asarray(r.sampling_logprobs) == 0)
    logp = log_softmax(full_forward_logits(model, r))
    expect = np.take_along_axis(logp, np.asarray(r.tokens)[..., None], -1)[..., 0]
    np.testing.assert_allclose(np.asarray(r.logprobs), expect, atol=2e-5)


def test_vocab_size_restricts_sampling_and_normalisation(family="qwen3_tied"):
    """With vocab_size = the tokenizer's vocabulary (the embedding has 56 padding rows), greedy
    equals transformers' generate on sliced logits, samples stay below it and both log-probs
    (and scoring) are normalised over it."""
    model, ref = fixture(family)
    V = ref["tokenizer_vocab_size"]
    prompts = [s["prompt"] for s in ref["samples"]]
    g = sampling.generate(model, prompts, max_new_tokens=8, temperature=0, vocab_size=V)
    expect = [s["tokens_tokenizer_vocab"] for s in ref["samples"]]
    np.testing.assert_array_equal(np.asarray(g.tokens), expect)
    r = sampling.generate(model, prompts * 4, max_new_tokens=6, rng=jax.random.key(2),
                          vocab_size=V)  # fmt: skip
    tokens = np.asarray(r.tokens)
    assert tokens.max() < V
    logp = log_softmax(full_forward_logits(model, r)[..., :V])
    expect = np.take_along_axis(logp, tokens[..., None], -1)[..., 0]
    np.testing.assert_allclose(np.asarray(r.logprobs), expect, atol=2e-5)
    np.testing.assert_allclose(np.asarray(r.sampling_logprobs), expect, atol=2e-5)
    scored = scoring.token_logprobs(
        model, r.prompt_tokens, r.prompt_mask, r.tokens, r.mask, vocab_size=V
    )
    np.testing.assert_allclose(np.asarray(scored), expect, atol=2e-5)


def test_toy_greedy_matches_uncached_loop():
    """The cached decode equals greedy decoding by repeated full forwards (causal, so the
    not-yet-generated positions at the end of the fixed-length buffer do not matter)."""
    model, T = toy(), 6
    r = sampling.generate(model, TOY_PROMPTS, max_new_tokens=T, temperature=0)
    P = r.prompt_tokens.shape[1]
    tokens = np.concatenate([np.asarray(r.prompt_tokens), np.zeros((len(TOY_PROMPTS), T), int)], 1)
    mask = np.concatenate([np.asarray(r.prompt_mask), np.ones((len(TOY_PROMPTS), T), int)], 1)
    for t in range(T):
        logits = forward(model, jnp.asarray(tokens), jnp.asarray(mask))
        tokens[:, P + t] = np.argmax(np.asarray(logits[:, P - 1 + t]), -1)
    np.testing.assert_array_equal(np.asarray(r.tokens), tokens[:, P:])


SETTINGS = [  # (temperature, top_k, top_p)
    (1.0, 0, 1.0),
    (0.7, 4, 1.0),
    (1.5, 0, 0.6),
    (0.8, 6, 0.8),
]


@pytest.mark.parametrize(("temperature", "top_k", "top_p"), SETTINGS)
def test_logprobs_and_truncated_support_toy(temperature, top_k, top_p):
    model = toy()
    prompts = TOY_PROMPTS * 32
    r = sampling.generate(
        model, prompts, max_new_tokens=6, temperature=temperature, top_k=top_k, top_p=top_p,
        rng=jax.random.key(0),
    )  # fmt: skip
    tokens, mask = np.asarray(r.tokens), np.asarray(r.mask).astype(bool)
    assert mask.all()  # no EOS: every row runs all steps
    logits = full_forward_logits(model, r)
    policy = np.take_along_axis(log_softmax(logits), tokens[..., None], -1)[..., 0]
    np.testing.assert_allclose(np.asarray(r.logprobs), policy, atol=2e-5)
    scored = scoring.token_logprobs(model, r.prompt_tokens, r.prompt_mask, r.tokens, r.mask)
    np.testing.assert_allclose(np.asarray(scored), np.asarray(r.logprobs), atol=2e-5)
    behaviour = np.asarray(r.sampling_logprobs)
    for b, t in np.ndindex(tokens.shape):
        ref = reference_logprobs(logits[b, t], temperature, top_k, top_p)
        assert np.isfinite(ref[tokens[b, t]]), "sampled a token outside the truncated set"
        assert behaviour[b, t] == pytest.approx(ref[tokens[b, t]], abs=2e-5)
    # The public transform gives the same distribution.
    dist = np.asarray(sampling.sampling_logprobs(
        logits.astype(np.float32), temperature=temperature, top_k=top_k, top_p=top_p
    ))  # fmt: skip
    ref = np.stack([reference_logprobs(x, temperature, top_k, top_p) for x in logits.reshape(
        -1, logits.shape[-1])]).reshape(logits.shape)  # fmt: skip
    np.testing.assert_array_equal(np.isfinite(dist), np.isfinite(ref))
    np.testing.assert_allclose(dist[np.isfinite(ref)], ref[np.isfinite(ref)], atol=2e-5)


def test_logprobs_and_truncated_support_real_model():
    model, ref = fixture("qwen3_untied")
    prompts = [s["prompt"] for s in ref["samples"]] * 8
    r = sampling.generate(
        model, prompts, max_new_tokens=5, temperature=0.5, top_k=20, top_p=0.7,
        rng=jax.random.key(1),
    )  # fmt: skip
    tokens = np.asarray(r.tokens)
    logits = full_forward_logits(model, r)
    policy = np.take_along_axis(log_softmax(logits), tokens[..., None], -1)[..., 0]
    np.testing.assert_allclose(np.asarray(r.logprobs), policy, atol=2e-5)
    scored = scoring.token_logprobs(model, r.prompt_tokens, r.prompt_mask, r.tokens, r.mask)
    np.testing.assert_allclose(np.asarray(scored), np.asarray(r.logprobs), atol=2e-5)
    for b, t in np.ndindex(tokens.shape):
        expect = reference_logprobs(logits[b, t], 0.5, 20, 0.7)
        assert np.isfinite(expect[tokens[b, t]]), "sampled a token outside the truncated set"
        assert float(r.sampling_logprobs[b, t]) == pytest.approx(expect[tokens[b, t]], abs=2e-5)


# ----------------------------------------------------------------------------- distribution


def chi_square_pvalue(counts: np.ndarray, probs: np.ndarray, min_expected: float = 5.0) -> float:
    """Pearson chi-square goodness of fit; cells with expected count < min_expected are pooled."""
    counts, expected = counts.ravel(), probs.ravel() * counts.sum()
    assert counts[expected == 0].sum() == 0, "sampled a zero-probability outcome"
    small = expected < min_expected
    obs = np.append(counts[~small], counts[small].sum())
    exp = np.append(expected[~small], expected[small].sum())
    keep = exp > 0
    return float(scipy.stats.chisquare(obs[keep], exp[keep] * obs.sum() / exp[keep].sum()).pvalue)


def test_temperature_one_matches_model_distribution_two_tokens():
    """Pairs (y1, y2) at temperature 1 follow p(y1) p(y2 | y1), 8192 rows, alpha = 1e-3."""
    model, prompt, n = toy(), [5, 1, 7], 8192
    r = sampling.generate(model, [prompt] * n, max_new_tokens=2, rng=jax.random.key(42))
    V = model.config.vocab_size
    p1 = np.exp(log_softmax(np.asarray(forward(model, jnp.asarray([prompt]))[0, -1], np.float64)))
    seqs = jnp.asarray([[*prompt, y] for y in range(V)])
    p2 = np.exp(log_softmax(np.asarray(forward(model, seqs)[:, -1], np.float64)))  # [y1, y2]
    counts = np.zeros((V, V))
    np.add.at(counts, (np.asarray(r.tokens[:, 0]), np.asarray(r.tokens[:, 1])), 1)
    assert chi_square_pvalue(counts, p1[:, None] * p2) > ALPHA


def test_tempered_truncated_sampling_matches_distribution_real_model():
    """First token at temperature 0.6, top-p 0.9 on a real fixture, 2048 rows, alpha = 1e-3."""
    model, ref = fixture("qwen2")
    prompt, n = ref["samples"][2]["prompt"], 2048
    r = sampling.generate(
        model, [prompt] * n, max_new_tokens=1, temperature=0.6, top_p=0.9, rng=jax.random.key(3)
    )
    logits = np.asarray(forward(model, jnp.asarray([prompt]))[0, -1], np.float64)
    probs = np.exp(reference_logprobs(logits, 0.6, 0, 0.9))
    counts = np.bincount(np.asarray(r.tokens[:, 0]), minlength=probs.size)
    assert chi_square_pvalue(counts, probs) > ALPHA


def test_two_stage_categorical_is_exact():
    """The grouped Gumbel-max draw follows softmax(logits): K = 1000 (32 groups of 32, the last
    one padded), every 7th logit -inf, 20000 rows, alpha = 1e-3."""
    V, n = 1000, 20000
    logits = 2.0 * jax.random.normal(jax.random.key(5), (V,))
    logits = logits.at[::7].set(-jnp.inf)
    keys = jax.vmap(jax.random.fold_in, (None, 0))(jax.random.key(1), jnp.arange(n))
    draw = jax.jit(lambda k, x: sampling.categorical(k, 0, jnp.broadcast_to(x, (n, V))))
    counts = np.bincount(np.asarray(draw(keys, logits)), minlength=V)
    probs = np.exp(log_softmax(np.asarray(logits, np.float64)))
    assert chi_square_pvalue(counts, probs) > ALPHA


def test_rows_do_not_depend_on_batch_composition():
    model = toy()
    kw = {"max_new_tokens": 6, "rng": jax.random.key(5), "top_k": 8}
    a = sampling.generate(model, [[1, 2, 3], [4, 4], [7]], **kw)
    b = sampling.generate(model, [[1, 2, 3], [9, 9, 9, 9, 1], [3, 2]], **kw)
    np.testing.assert_array_equal(np.asarray(a.tokens[0]), np.asarray(b.tokens[0]))
    c = sampling.generate(model, [[1, 2, 3], [4, 4], [7]], **{**kw, "rng": jax.random.key(6)})
    assert not np.array_equal(np.asarray(a.tokens), np.asarray(c.tokens))


# ----------------------------------------------------------------------------- EOS and masks


def test_eos_masks_for_rows_stopping_at_different_steps():
    model, T = toy(), 10
    prompts = TOY_PROMPTS * 2
    kw = {"max_new_tokens": T, "rng": jax.random.key(11)}
    free = sampling.generate(model, prompts, **kw)
    free_tokens = np.asarray(free.tokens)
    eos, stop = 12, 0  # stop at the first 12 (EOS) or 0 (extra stop token)
    r = sampling.generate(model, prompts, eos_token_id=eos, stop_token_ids=(stop,), **kw)
    tokens, mask = np.asarray(r.tokens), np.asarray(r.mask)
    ends = []
    for b in range(len(prompts)):
        hits = np.flatnonzero(np.isin(free_tokens[b], [eos, stop]))
        end = hits[0] + 1 if hits.size else T  # tokens kept, including the stop token
        ends.append(end)
        np.testing.assert_array_equal(tokens[b, :end], free_tokens[b, :end])
        assert np.all(tokens[b, end:] == 0) and np.all(mask[b, end:] == 0)
        assert np.all(mask[b, :end] == 1)
        np.testing.assert_array_equal(r.logprobs[b, :end], free.logprobs[b, :end])
        assert np.all(np.asarray(r.logprobs[b, end:]) == 0)
        assert np.all(np.asarray(r.sampling_logprobs[b, end:]) == 0)
    assert len(set(ends)) >= 3, f"test needs rows stopping at different steps, got {ends}"
    assert int(r.num_steps) == max(ends)


def test_loop_stops_early_when_every_row_is_done():
    model, V = toy(), toy().config.vocab_size
    r = sampling.generate(model, TOY_PROMPTS, max_new_tokens=50, stop_token_ids=range(V),
                          rng=jax.random.key(0))  # fmt: skip
    assert int(r.num_steps) == 1
    np.testing.assert_array_equal(np.asarray(r.mask)[:, :2], [[1, 0]] * len(TOY_PROMPTS))
    greedy = sampling.generate(model, TOY_PROMPTS, max_new_tokens=50, temperature=0)
    first = np.asarray(greedy.tokens)[:, :3]  # stop ids that end each row within 3 steps
    r = sampling.generate(model, TOY_PROMPTS, max_new_tokens=50, temperature=0,
                          eos_token_id=list(np.unique(first[:, 2])))  # fmt: skip
    assert int(r.num_steps) <= 3 and np.asarray(r.mask)[:, 3:].sum() == 0


# ----------------------------------------------------------------------------- sharding


@pytest.mark.parametrize(
    "mesh_shape", [(("data", 2), ("fsdp", 2), ("tensor", 2)), (("fsdp", 8),)], ids=["2x2x2", "f8"]
)
def test_sharded_run_gives_the_same_tokens(mesh_shape):
    assert jax.device_count() == 8
    single, ref = fixture("qwen3_untied")
    sharded, _ = fixture("qwen3_untied", mesh_shape)
    prompts = [s["prompt"] for s in ref["samples"]] * 3  # 9 rows: padded to 12 / 16 on the mesh
    kw = {"max_new_tokens": 6, "temperature": 1.0, "top_p": 0.95, "rng": jax.random.key(7)}
    a = sampling.generate(single, prompts, **kw)
    b = sampling.generate(sharded, prompts, **kw)
    np.testing.assert_array_equal(np.asarray(a.tokens), np.asarray(b.tokens))
    np.testing.assert_allclose(np.asarray(a.logprobs), np.asarray(b.logprobs), atol=1e-5)
    np.testing.assert_allclose(
        np.asarray(a.sampling_logprobs), np.asarray(b.sampling_logprobs), atol=1e-5
    )


# ----------------------------------------------------------------------------- compilation


def test_no_recompilation_within_a_bucket():
    model = toy()
    kw = {"max_new_tokens": 5, "top_k": 3, "top_p": 0.9}
    sampling.generate(model, [[1, 2], [3]], temperature=1.0, rng=jax.random.key(0), **kw)
    before = dict(sampling.TRACE_COUNTS)
    graphdef, params = nnx.split(ToyLM(rngs=nnx.Rngs(1)), nnx.Param)  # new weights
    calls = [
        (model, [[1, 2, 3, 4, 5], [6]], 0.7, 0.5),
        (model, [[9] * 16, [1, 2, 3]], 1.3, 0.95),
        ((graphdef, params), [[4], [5, 6, 7]], 1.0, 0.8),
    ]
    for i, (m, prompts, temperature, top_p) in enumerate(calls):
        sampling.generate(m, prompts, temperature=temperature, rng=jax.random.key(i),
                          **{**kw, "top_p": top_p})  # fmt: skip
    assert dict(sampling.TRACE_COUNTS) == before
    sampling.generate(model, [[1] * 17, [2]], temperature=1.0, rng=jax.random.key(0), **kw)
    after = dict(sampling.TRACE_COUNTS)  # a new bucket (32) compiles once more
    assert after["prefill"] == before["prefill"] + 1 and after["decode"] == before["decode"] + 1


def test_prefill_and_decode_loop_lower_ahead_of_time_from_abstract_arguments():
    """The two compiled programs `generate` runs are public and lower from shapes alone (as an
    ahead-of-time planner does); the compiled pair reproduces `generate`, and the decode loop
    updates the donated stacked cache in place (a cache with spare slots, S = 1024, so that a
    copy of the whole cache would stand out among the loop's temporaries)."""
    model, ref = fixture("qwen3_tied")
    prompts = [s["prompt"] for s in ref["samples"]]
    T = 5
    graphdef, params, rest = scoring.split_model(model)
    tokens, mask = sampling.pad_prompts(prompts)
    B, P = tokens.shape
    S = 1024
    prefill_static = sampling.SamplerStatic(cache_length=S)
    static = dataclasses.replace(prefill_static, max_new_tokens=T, greedy=True, stop_ids=(2,))
    shape_of = lambda tree: jax.tree.map(lambda x: jax.ShapeDtypeStruct(x.shape, x.dtype), tree)
    rows = jax.ShapeDtypeStruct((B, P), jnp.int32)
    prefill = sampling.prefill.lower(
        graphdef, shape_of(params), shape_of(rest), rows, rows, static=prefill_static
    ).compile()
    logits_shape, cache_shape = prefill.out_info
    cfg = model.config
    layout = (cfg.num_layers, B, cfg.num_kv_heads, S, cfg.head_dim)
    assert cache_shape["k"].shape == cache_shape["v"].shape == layout
    assert logits_shape.shape == (B, cfg.vocab_size)
    scalar = jax.ShapeDtypeStruct((), jnp.float32)
    decode = sampling.decode_loop.lower(
        graphdef, shape_of(params), shape_of(rest), cache_shape, logits_shape, rows,
        jax.ShapeDtypeStruct((B,), jnp.int32), jax.eval_shape(lambda: jax.random.key(0)),
        scalar, scalar, static=static,
    ).compile()  # fmt: skip
    memory = decode.memory_analysis()
    cache_bytes = 2 * math.prod(layout) * 4
    assert memory.alias_size_in_bytes == cache_bytes
    assert memory.temp_size_in_bytes < cache_bytes  # about one layer's k and v: half of it
    logits0, cache = prefill(params, rest, tokens, mask)
    row_ids = jnp.arange(B, dtype=jnp.int32)
    one = jnp.float32(1.0)
    (out, out_mask, *_), _ = decode(params, rest, cache, logits0, mask, row_ids, jax.random.key(0),
                                    one, one)  # fmt: skip
    expect = sampling.generate(model, prompts, max_new_tokens=T, temperature=0, eos_token_id=2)
    np.testing.assert_array_equal(np.asarray(out), np.asarray(expect.tokens))
    np.testing.assert_array_equal(np.asarray(out_mask), np.asarray(expect.mask))


# ----------------------------------------------------------------------------- prompts / input


def test_pad_prompts_left_pads_to_a_bucket():
    tokens, mask = sampling.pad_prompts([[5, 6, 7], [8]], buckets=(4, 8), pad_token_id=0)
    np.testing.assert_array_equal(tokens, [[0, 5, 6, 7], [0, 0, 0, 8]])
    np.testing.assert_array_equal(mask, [[0, 1, 1, 1], [0, 0, 0, 1]])
    tokens, mask = sampling.pad_prompts(np.array([[1, 2, 3, 4, 5]]), buckets=(4, 8))
    assert tokens.shape == (1, 8) and mask.sum() == 5
    right_padded, m = np.array([[3, 4, 0], [5, 0, 0]]), np.array([[1, 1, 0], [1, 0, 0]])
    tokens, mask = sampling.pad_prompts(right_padded, prompt_mask=m, buckets=(2, 4))
    np.testing.assert_array_equal(tokens, [[3, 4], [0, 5]])
    assert sampling.bucket_length(16) == 16 and sampling.bucket_length(17) == 32


@pytest.mark.parametrize(
    ("kwargs", "match"),
    [
        ({"prompts": [[1, 2], []]}, "prompt 1 is empty"),
        ({"prompts": [[1] * 40], "prompt_buckets": (16, 32)}, "prompt_buckets"),
        ({"top_p": 0.0}, "top_p"),
        ({"top_p": 1.5}, "top_p"),
        ({"top_k": -1}, "top_k"),
        ({"top_k": 2.5}, "top_k"),
        ({"temperature": -0.5}, "temperature"),
        ({"temperature": float("nan")}, "temperature"),
        ({"rng": None}, "rng"),
        ({"max_new_tokens": 0}, "max_new_tokens"),
        ({"prompts": []}, "prompts"),
        ({"eos_token_id": -1}, "eos_token_id"),
        ({"vocab_size": 0}, "vocab_size"),
    ],
)
def test_bad_input_raises_a_clear_value_error(kwargs, match):
    call = {"prompts": [[1, 2]], "max_new_tokens": 4, "rng": jax.random.key(0)} | kwargs
    with pytest.raises(ValueError, match=match):
        sampling.generate(toy(), call.pop("prompts"), **call)
