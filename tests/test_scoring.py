"""Tests for opdplus_jax.scoring.token_logprobs on the tiny Hugging Face fixtures."""

from __future__ import annotations

import functools
import os
import types

import jax
import jax.numpy as jnp
import numpy as np
import pytest
import scipy.special
from flax import nnx

from opdplus_jax import models, scoring
from opdplus_jax import sharding as shd

FIXTURES = os.path.join(os.path.dirname(__file__), "testdata", "models")


@functools.cache
def fixture(name: str = "qwen3_untied", mesh_shape: tuple = ()):
    mesh = shd.make_mesh(dict(mesh_shape)) if mesh_shape else None
    model = models.from_pretrained(os.path.join(FIXTURES, name), mesh=mesh)
    return model, dict(np.load(os.path.join(FIXTURES, name, "reference.npz")))


def split_reference(ref, prompt_len=9):
    """The fixtures' left-padded batch as (prompt [3, 9], completion [3, 3]) with masks."""
    ids, mask = ref["padded_input_ids"], ref["padded_attention_mask"]
    return ids[:, :prompt_len], mask[:, :prompt_len], ids[:, prompt_len:], mask[:, prompt_len:]


@pytest.mark.parametrize("family", ["qwen3_tied", "qwen3_untied", "qwen2", "llama3"])
def test_matches_transformers_logits(family):
    """Log-probs of the completion tokens equal transformers' log-softmax on the padded batch."""
    model, ref = fixture(family)
    prompt, prompt_mask, completion, completion_mask = split_reference(ref)
    got = scoring.token_logprobs(model, prompt, prompt_mask, completion, completion_mask)
    assert got.shape == completion.shape and got.dtype == jnp.float32
    logp = scipy.special.log_softmax(ref["padded_logits"].astype(np.float64), axis=-1)
    P, T = prompt.shape[1], completion.shape[1]
    expect = np.take_along_axis(logp[:, P - 1 : P - 1 + T], completion[..., None], -1)[..., 0]
    np.testing.assert_allclose(np.asarray(got), expect, atol=2e-5)


def test_left_padding_does_not_change_a_row():
    """A row scored inside a left-padded batch equals the same row scored alone, unpadded."""
    model, ref = fixture()
    prompt, prompt_mask, completion, completion_mask = split_reference(ref)
    batch = np.asarray(
        scoring.token_logprobs(model, prompt, prompt_mask, completion, completion_mask)
    )
    for b in range(prompt.shape[0]):
        real = prompt[b][prompt_mask[b] == 1][None]
        alone = scoring.token_logprobs(
            model, real, np.ones_like(real), completion[b : b + 1], completion_mask[b : b + 1]
        )
        np.testing.assert_allclose(np.asarray(alone)[0], batch[b], atol=2e-5)


def test_masked_completion_positions_are_zero_and_do_not_leak():
    model, ref = fixture()
    prompt, prompt_mask, completion, _ = split_reference(ref)
    full = np.asarray(scoring.token_logprobs(model, prompt, prompt_mask, completion,
                                             np.ones_like(completion)))  # fmt: skip
    cut = np.array([[1, 1, 1], [1, 1, 0], [1, 0, 0]])  # rows that ended at different steps
    junk = np.where(cut == 1, completion, 7)  # whatever follows the end must not matter
    got = np.asarray(scoring.token_logprobs(model, prompt, prompt_mask, junk, cut))
    np.testing.assert_array_equal(got[cut == 0], 0.0)
    np.testing.assert_allclose(got[cut == 1], full[cut == 1], atol=1e-6)


def test_split_params_reuse_the_compiled_function():
    model, ref = fixture()
    args = split_reference(ref)
    expect = scoring.token_logprobs(model, *args)
    before = scoring.TRACE_COUNTS["token_logprobs"]
    graphdef, params = nnx.split(model, nnx.Param)
    got = scoring.token_logprobs((graphdef, params), *args)
    np.testing.assert_array_equal(np.asarray(got), np.asarray(expect))
    # New weights, same architecture: same compiled function, different numbers.
    params = jax.tree.map(lambda p: p * 1.5, params)
    changed = scoring.token_logprobs((graphdef, params), *args)
    assert scoring.TRACE_COUNTS["token_logprobs"] == before
    assert not np.allclose(np.asarray(changed), np.asarray(expect))


@pytest.mark.parametrize(
    "mesh_shape", [(("data", 2), ("fsdp", 2), ("tensor", 2)), (("fsdp", 8),)], ids=["2x2x2", "f8"]
)
def test_sharded_equals_single_device(mesh_shape):
    single, ref = fixture()
    sharded, _ = fixture("qwen3_untied", mesh_shape)
    args = split_reference(ref)  # 3 rows: padded to the batch shards internally
    expect = np.asarray(scoring.token_logprobs(single, *args))
    np.testing.assert_allclose(
        np.asarray(scoring.token_logprobs(sharded, *args)), expect, atol=1e-5
    )


def test_bad_shapes_raise_value_errors():
    model, ref = fixture()
    prompt, prompt_mask, completion, completion_mask = split_reference(ref)
    with pytest.raises(ValueError, match="prompt_mask"):
        scoring.token_logprobs(model, prompt, prompt_mask[:, 1:], completion, completion_mask)
    with pytest.raises(ValueError, match="completion_mask"):
        scoring.token_logprobs(model, prompt, prompt_mask, completion, completion_mask[0])
    with pytest.raises(ValueError, match="batch size"):
        scoring.token_logprobs(model, prompt, prompt_mask, completion[:2], completion_mask[:2])
    with pytest.raises(TypeError, match=r"nnx\.Module"):
        scoring.token_logprobs(object(), prompt, prompt_mask, completion, completion_mask)


# ------------------------------------------------------------------ chunked output layer


@pytest.mark.parametrize("chunk_size", [1, 2, 3, 64])
def test_chunked_logprobs_equal_the_unchunked_ones(chunk_size):
    """Chunks that divide T, that do not (T is padded), and one larger than T."""
    model, ref = fixture()
    args = split_reference(ref)
    expect = np.asarray(scoring.token_logprobs(model, *args))
    got = scoring.token_logprobs(model, *args, chunk_size=chunk_size)
    np.testing.assert_allclose(np.asarray(got), expect, atol=1e-6)
    sharded, _ = fixture("qwen3_untied", (("fsdp", 8),))
    rollout = types.SimpleNamespace(**dict(zip(("prompt_tokens", "prompt_mask", "tokens",
                                                 "mask"), args, strict=True)))  # fmt: skip
    got = scoring.rollout_logprobs(sharded, rollout, chunk_size=chunk_size)
    np.testing.assert_allclose(np.asarray(got), expect, atol=1e-5)


def test_chunked_logprobs_have_the_unchunked_gradient():
    cfg = models.qwen3_config(
        vocab_size=96, hidden_size=32, num_layers=2, num_heads=2, num_kv_heads=1
    )
    graphdef, params = nnx.split(models.CausalLM(cfg, rngs=nnx.Rngs(0)), nnx.Param)
    rng = np.random.default_rng(0)
    B, P, T = 3, 5, 29
    prompt = jnp.asarray(rng.integers(1, 90, (B, P)), jnp.int32)
    tokens = jnp.asarray(rng.integers(1, 90, (B, T)), jnp.int32)
    mask = jnp.asarray(np.arange(T)[None] < np.array([[T], [17], [4]]), jnp.int32)
    weight_T = jnp.linspace(-1.0, 2.0, T)  # a loss that weighs every position differently

    def loss(p, chunk):
        logp = scoring.completion_logprobs(
            nnx.merge(graphdef, p), prompt, jnp.ones_like(prompt), tokens, mask, 90,
            chunk_size=chunk,
        )  # fmt: skip
        return (logp * weight_T).sum(), logp

    grad = jax.jit(jax.grad(loss, has_aux=True), static_argnums=1)
    (g_full, logp_full), (g_chunk, logp_chunk) = grad(params, None), grad(params, 8)
    np.testing.assert_allclose(logp_chunk, logp_full, atol=1e-5)
    scale = max(float(jnp.abs(g).max()) for g in jax.tree.leaves(g_full))
    for a, b in zip(jax.tree.leaves(g_chunk), jax.tree.leaves(g_full), strict=True):
        np.testing.assert_allclose(a, b, rtol=0, atol=1e-5 * scale)


def test_bad_chunk_size_is_a_value_error():
    model, ref = fixture()
    for bad in (0, -3, 2.5):
        with pytest.raises(ValueError, match="chunk_size must be None"):
            scoring.token_logprobs(model, *split_reference(ref), chunk_size=bad)
