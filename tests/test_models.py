"""Model numerics: logits vs transformers, padding, cached decoding, greedy generation, dtypes.

References come from tests/testdata/models (scripts/make_model_fixtures.py, transformers 5 on
PyTorch CPU, float32, eager attention).
"""

import contextlib
import json
import os
from types import SimpleNamespace

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from opdplus_jax import models
from opdplus_jax import sharding as shd
from opdplus_jax.models import config as config_lib
from opdplus_jax.models import transformer

DATA = os.path.join(os.path.dirname(__file__), "testdata", "models")
FAMILIES = ["qwen3_tied", "qwen3_untied", "qwen2", "llama3"]
TOL = 2e-4


@pytest.fixture(scope="module", params=FAMILIES)
def family(request):
    path = os.path.join(DATA, request.param)
    ref = dict(np.load(os.path.join(path, "reference.npz")))
    with open(os.path.join(path, "generate.json")) as f:
        gen = json.load(f)
    model = models.from_pretrained(path)
    return SimpleNamespace(
        name=request.param,
        path=path,
        model=model,
        ref=ref,
        gen=gen,
        forward=jit_forward(model),
        decode=jit_decode(model),
    )


def jit_forward(model):
    graphdef, params = nnx.split(model)

    @jax.jit
    def forward(params, tokens, positions, mask):
        return nnx.merge(graphdef, params)(tokens, positions, mask)

    return lambda tokens, mask=None, positions=None: np.asarray(
        forward(params, tokens, positions, mask)
    )


def jit_decode(model):
    graphdef, params = nnx.split(model)

    @jax.jit
    def decode(params, tokens, positions, cache, write_index, kv_mask):
        return nnx.merge(graphdef, params).decode(tokens, positions, cache, write_index, kv_mask)

    return lambda tokens, positions, cache, write_index, kv_mask: decode(
        params, tokens, positions, cache, jnp.int32(write_index), kv_mask
    )


def test_config_fields(family):
    cfg = family.model.config
    assert (cfg.vocab_size, cfg.hidden_size, cfg.num_layers) == (304, 64, 2)
    # qwen3_untied has head_dim != hidden_size / num_heads (as Qwen3-4B does).
    assert (cfg.num_heads, cfg.num_kv_heads) == (4, 2)
    assert cfg.head_dim == (32 if family.name == "qwen3_untied" else 16)
    assert cfg.eos_token_id == 2 and cfg.pad_token_id == 0
    expected = {
        "qwen3_tied": ("qwen3", True, "default"),
        "qwen3_untied": ("qwen3", False, "yarn"),
        "qwen2": ("qwen2", False, "default"),
        "llama3": ("llama", False, "llama3"),
    }[family.name]
    assert (cfg.model_type, cfg.tie_word_embeddings, cfg.rope_type) == expected
    assert cfg.qkv_bias == (family.name == "qwen2")
    assert cfg.qk_norm == family.name.startswith("qwen3")
    n_params = sum(x.size for x in jax.tree.leaves(nnx.state(family.model, nnx.Param)))
    assert n_params == cfg.num_params()


def test_logits_match_transformers(family):
    logits = family.forward(family.ref["input_ids"])
    assert logits.dtype == np.float32
    assert logits.shape == family.ref["logits"].shape
    np.testing.assert_allclose(logits, family.ref["logits"], atol=TOL, rtol=0)


def test_eager_forward_matches_transformers():
    """The un-jitted forward (slow op-by-op dispatch, so one family and a short input)."""
    path = os.path.join(DATA, "qwen3_tied")
    ref = np.load(os.path.join(path, "reference.npz"))
    eager = np.asarray(models.from_pretrained(path)(ref["input_ids"][:1, :6]))
    np.testing.assert_allclose(eager, ref["logits"][:1, :6], atol=TOL, rtol=0)


def test_padded_logits_match_transformers_and_unpadded(family):
    ref = family.ref
    mask = ref["padded_attention_mask"].astype(bool)
    padded = family.forward(ref["padded_input_ids"], ref["padded_attention_mask"])
    assert np.isfinite(padded).all()
    np.testing.assert_allclose(padded[mask], ref["padded_logits"][mask], atol=TOL, rtol=0)
    # Explicit positions give the same result as the cumsum default.
    explicit = family.forward(
        ref["padded_input_ids"], ref["padded_attention_mask"], ref["padded_position_ids"]
    )
    np.testing.assert_allclose(explicit[mask], padded[mask], atol=1e-6)
    # Whatever sits in padding positions (here an out-of-range -1) cannot leak into real tokens.
    junk = np.where(mask, ref["padded_input_ids"], -1)
    np.testing.assert_array_equal(
        family.forward(junk, ref["padded_attention_mask"])[mask], padded[mask]
    )
    # Each left-padded row equals the same tokens without padding (causal: a prefix of row b).
    unpadded = family.forward(ref["input_ids"])
    for b, n in enumerate(ref["padded_lengths"]):
        np.testing.assert_allclose(padded[b, -n:], unpadded[b, :n], atol=1e-5)


def test_right_padding_equals_unpadded(family):
    ids = family.ref["input_ids"].copy()
    mask = np.ones_like(ids)
    mask[1, 5:] = 0
    ids[1, 5:] = 0
    logits = family.forward(ids, mask)
    np.testing.assert_allclose(logits[1, :5], family.ref["logits"][1, :5], atol=TOL, rtol=0)
    np.testing.assert_allclose(logits[0], family.ref["logits"][0], atol=TOL, rtol=0)


def test_cached_decode_equals_full_forward(family):
    """Prefill a left-padded batch, then decode token by token (jitted, traced write_index)."""
    ref, model, decode = family.ref, family.model, family.decode
    ids, mask = ref["padded_input_ids"], ref["padded_attention_mask"]
    batch, length = ids.shape
    full = family.forward(ids, mask)
    positions = np.maximum(np.cumsum(mask, axis=1) - 1, 0)
    slots, prefill = length + 4, 4
    cache = model.init_cache(batch, slots)
    assert sorted(cache) == ["k", "v"]
    layers, head_dim = model.config.num_layers, model.config.head_dim
    assert cache["k"].shape == cache["v"].shape == (layers, batch, 2, slots, head_dim)
    kv_mask = np.zeros((batch, slots), bool)
    kv_mask[:, :prefill] = mask[:, :prefill]
    logits, cache = decode(ids[:, :prefill], positions[:, :prefill], cache, 0, kv_mask)
    steps = [np.asarray(logits)]
    for t in range(prefill, length):
        kv_mask[:, t] = mask[:, t]
        logits, cache = decode(ids[:, t : t + 1], positions[:, t : t + 1], cache, t, kv_mask)
        steps.append(np.asarray(logits))
    incremental = np.concatenate(steps, axis=1)
    real = mask.astype(bool)
    np.testing.assert_allclose(incremental[real], full[real], atol=1e-5)
    # Multi-token chunks after the prefill agree too (L > 1 with write_index > 0).
    cache = model.init_cache(batch, slots)
    kv_mask = np.zeros((batch, slots), bool)
    chunks = []
    for start in range(0, length, prefill):
        stop = start + prefill
        kv_mask[:, start:stop] = mask[:, start:stop]
        logits, cache = decode(ids[:, start:stop], positions[:, start:stop], cache, start, kv_mask)
        chunks.append(np.asarray(logits))
    np.testing.assert_allclose(np.concatenate(chunks, axis=1)[real], full[real], atol=1e-5)


def test_greedy_decoding_matches_transformers_generate(family):
    """Batched, left-padded greedy decoding reproduces transformers' per-prompt `generate`."""
    gen, model, decode = family.gen, family.model, family.decode
    prompts = [s["prompt"] for s in gen["samples"]]
    steps, batch = gen["max_new_tokens"], len(prompts)
    width = max(map(len, prompts))
    ids = np.zeros((batch, width), np.int32)
    kv_mask = np.zeros((batch, width + steps), bool)
    for b, p in enumerate(prompts):
        ids[b, width - len(p) :] = p
        kv_mask[b, width - len(p) : width] = True
    positions = np.maximum(np.cumsum(kv_mask[:, :width], axis=1) - 1, 0)
    lengths = kv_mask.sum(axis=1)
    for key, vocab in (("tokens", None), ("tokens_tokenizer_vocab", gen["tokenizer_vocab_size"])):
        mask = kv_mask.copy()
        cache = model.init_cache(batch, width + steps)
        logits, cache = decode(ids, positions, cache, 0, mask)
        out = []
        for i in range(steps):
            tok = np.argmax(np.asarray(logits)[:, -1, :vocab], axis=-1).astype(np.int32)
            out.append(tok)
            mask[:, width + i] = True
            pos = (lengths + i)[:, None]
            logits, cache = decode(tok[:, None], pos, cache, width + i, mask)
        got = np.stack(out, axis=1).tolist()
        assert got == [s[key] for s in gen["samples"]], key


@pytest.mark.parametrize("name", ["qwen3_tied", "llama3"])
def test_bf16_params_give_finite_float32_logits(name):
    family = SimpleNamespace(
        path=os.path.join(DATA, name), ref=dict(np.load(os.path.join(DATA, name, "reference.npz")))
    )
    model = models.from_pretrained(family.path, dtype=jnp.bfloat16)
    assert model.embed_tokens[...].dtype == jnp.bfloat16
    logits = jit_forward(model)(family.ref["input_ids"])
    assert logits.dtype == np.float32 and np.isfinite(logits).all()
    assert np.abs(logits - family.ref["logits"]).max() < 0.1  # bf16 rounding of the same model
    cache = model.init_cache(2, 8)
    assert cache["k"].dtype == jnp.bfloat16
    # float32 activations over bf16-stored weights.
    mixed = models.from_pretrained(family.path, dtype=jnp.float32, param_dtype=jnp.bfloat16)
    assert mixed.layers.mlp.up_proj[...].dtype == jnp.bfloat16
    assert np.isfinite(jit_forward(mixed)(family.ref["input_ids"])).all()


def test_chunked_attention_equals_full_and_has_same_gradient():
    from opdplus_jax.models.transformer import attention

    keys = jax.random.split(jax.random.key(0), 3)
    q = jax.random.normal(keys[0], (2, 2, 2, 12, 8))  # [B, K, G, L, H]
    k, v = (jax.random.normal(key, (2, 2, 12, 8)) for key in keys[1:])  # [B, K, S, H]
    mask = (
        jnp.tril(jnp.ones((12, 12), bool))[None]
        & (jnp.arange(12) >= jnp.array([[0], [5]]))[:, None]
    )

    def loss(q, k, v, chunk):
        return jnp.sum(jnp.sin(attention(q, k, v, mask, chunk)))

    grad = jax.jit(jax.value_and_grad(loss, argnums=(0, 1, 2)), static_argnums=3)
    (plain, g_plain), (chunked, g_chunked) = grad(q, k, v, None), grad(q, k, v, 5)  # 5 + 5 + 2
    np.testing.assert_allclose(chunked, plain, rtol=1e-5)
    for a, b in zip(g_plain, g_chunked, strict=True):
        np.testing.assert_allclose(a, b, atol=1e-5)


def test_chunked_attention_model_matches_transformers():
    path = os.path.join(DATA, "llama3")
    ref = np.load(os.path.join(path, "reference.npz"))
    model = models.from_pretrained(path, attention_chunk_size=5)  # 12 queries = 5 + 5 + 2
    real = ref["padded_attention_mask"].astype(bool)
    logits = jit_forward(model)(ref["padded_input_ids"], ref["padded_attention_mask"])
    np.testing.assert_allclose(logits[real], ref["padded_logits"][real], atol=TOL, rtol=0)


def test_random_init_and_split_merge():
    cfg = models.ModelConfig(
        model_type="qwen3",
        vocab_size=64,
        hidden_size=32,
        intermediate_size=48,
        num_layers=1,
        num_heads=2,
        num_kv_heads=1,
        head_dim=16,
        qk_norm=True,
    )
    model = models.CausalLM(cfg, rngs=nnx.Rngs(0))
    graphdef, params = nnx.split(model, nnx.Param)
    assert all(isinstance(x, jax.Array) for x in jax.tree.leaves(params))
    tokens = np.arange(10, dtype=np.int32).reshape(2, 5)
    out = jax.jit(lambda p, t: nnx.merge(graphdef, p)(t))(params, tokens)
    assert out.shape == (2, 5, 64) and out.dtype == jnp.float32
    assert np.isfinite(np.asarray(out)).all()


# ----- the scanned layer stack -----


def small_config(**overrides):
    """Three layers with every optional tensor (biases, q/k norms), untied."""
    fields = {
        "model_type": "qwen2",
        "vocab_size": 40,
        "hidden_size": 24,
        "intermediate_size": 40,
        "num_layers": 3,
        "num_heads": 4,
        "num_kv_heads": 2,
        "head_dim": 8,
        "qkv_bias": True,
        "o_bias": True,
        "mlp_bias": True,
        "qk_norm": True,
    }
    return models.ModelConfig(**{**fields, **overrides})


def test_layer_parameters_are_stacked_with_a_layers_axis():
    cfg = small_config()
    model = nnx.eval_shape(lambda: models.CausalLM(cfg, rngs=nnx.Rngs(0)))
    flat = dict(nnx.to_flat_state(nnx.state(model.layers, nnx.Param)))
    assert len(flat) == 18  # every optional tensor: 2 norms, 4 + 4 + 2 attention, 3 + 3 MLP
    for path, var in flat.items():
        assert var.shape[0] == cfg.num_layers, path
        assert shd.logical_axes_of(var)[0] == "layers", path
    assert flat[("attn", "q_proj")].shape == (3, 24, 4, 8)
    assert flat[("mlp", "down_proj")].shape == (3, 40, 24)


def test_random_init_draws_the_per_layer_keys_in_order():
    """A seed gives the weights that separately built layers drew (embedding, then per layer
    q, k, v, o, gate, up, down, then lm_head): stacking changed no checkpoint made from a seed."""
    cfg = small_config(tie_word_embeddings=False)
    model = models.CausalLM(cfg, rngs=nnx.Rngs(7))
    rngs = nnx.Rngs(7)
    d, f, n, k, h = 24, 40, 4, 2, 8
    normal = lambda shape: np.asarray(0.02 * jax.random.normal(rngs.params(), shape))
    np.testing.assert_array_equal(np.asarray(model.embed_tokens[...]), normal((40, d)))
    attn, mlp = model.layers.attn, model.layers.mlp
    for i in range(cfg.num_layers):
        shapes = [
            (attn.q_proj, (d, n, h)),
            (attn.k_proj, (d, k, h)),
            (attn.v_proj, (d, k, h)),
            (attn.o_proj, (n, h, d)),
            (mlp.gate_proj, (d, f)),
            (mlp.up_proj, (d, f)),
            (mlp.down_proj, (f, d)),
        ]
        for param, shape in shapes:
            np.testing.assert_array_equal(np.asarray(param[...][i]), normal(shape))
    np.testing.assert_array_equal(np.asarray(model.lm_head[...]), normal((d, 40)))
    np.testing.assert_array_equal(np.asarray(model.layers.attn.q_bias[...]), 0.0)
    np.testing.assert_array_equal(np.asarray(model.layers.input_norm[...]), 1.0)


def unrolled_logits(model, tokens_BL, mask_BL):
    """Reference forward: a Python loop over the layers `jax.tree.map(lambda a: a[i], stack)`."""
    cfg = model.config
    positions_BL = jnp.maximum(jnp.cumsum(mask_BL, axis=1) - 1, 0)
    length = tokens_BL.shape[1]
    mask_BLS = jnp.tril(jnp.ones((length, length), bool))[None] & mask_BL.astype(bool)[:, None]
    sin, cos = transformer.rope_sin_cos(cfg, positions_BL, model.dtype)
    x_BLD = jnp.take(model.embed_tokens[...], tokens_BL, axis=0)
    graphdef, stack = nnx.split(model.layers)
    for i in range(cfg.num_layers):
        layer = nnx.merge(graphdef, jax.tree.map(lambda a, i=i: a[i], stack))
        x_BLD = layer(x_BLD, sin, cos, mask_BLS, model.attention_chunk_size)
    return model.logits(transformer.rms_norm(x_BLD, model.norm[...], cfg.rms_norm_eps))


def cpu_remat_policies():
    """None and every named policy this backend supports (all of them on CPU: it has pinned
    host memory)."""
    supported = [None]
    for name in transformer.REMAT_POLICIES:
        with contextlib.suppress(ValueError):
            supported.append(transformer.check_remat(name))
    return supported


@pytest.mark.parametrize("remat", cpu_remat_policies())
def test_scanned_forward_and_gradient_equal_the_unrolled_layers(remat):
    cfg = small_config()
    # Chunked attention (10 queries = 4 + 4 + 2) checks the nested checkpoint inside remat.
    model = models.CausalLM(cfg, rngs=nnx.Rngs(1), remat=remat, attention_chunk_size=4)
    graphdef, params = nnx.split(model, nnx.Param)
    tokens = jax.random.randint(jax.random.key(2), (2, 10), 0, cfg.vocab_size)
    mask = jnp.ones((2, 10), jnp.int32).at[1, :3].set(0)
    weights = jax.random.normal(jax.random.key(3), (2, 10, cfg.vocab_size))

    def loss(params, forward):
        return jnp.sum(weights * jnp.tanh(forward(nnx.merge(graphdef, params), tokens, mask)))

    scanned = lambda m, t, a: m(t, attention_mask_BL=a)
    value, grads = jax.jit(jax.value_and_grad(lambda p: loss(p, scanned)))(params)
    ref_value, ref_grads = jax.jit(jax.value_and_grad(lambda p: loss(p, unrolled_logits)))(params)
    np.testing.assert_allclose(value, ref_value, rtol=1e-5)
    flat, ref_flat = nnx.to_flat_state(grads), dict(nnx.to_flat_state(ref_grads))
    for path, g in flat:
        want = np.asarray(ref_flat[path].get_value())
        np.testing.assert_allclose(np.asarray(g.get_value()), want, atol=1e-5, err_msg=str(path))
        assert np.abs(want).max() > 0 or path[-1].endswith("bias"), path


def test_remat_policies_shrink_the_saved_activations():
    """Compiled forward + backward temporaries: "full" saves less than "save_dots", which saves
    less than no remat (per layer, the attention probabilities and MLP activations go)."""
    cfg = small_config(num_layers=4)
    tokens = jax.ShapeDtypeStruct((2, 64), jnp.int32)

    def temp_bytes(remat):
        model = nnx.eval_shape(lambda: models.CausalLM(cfg, rngs=nnx.Rngs(0), remat=remat))
        graphdef, params = nnx.split(model, nnx.Param)
        grad = jax.jit(jax.grad(lambda p, t: nnx.merge(graphdef, p)(t).mean()))
        return grad.lower(params, tokens).compile().memory_analysis().temp_size_in_bytes

    none, save_dots, full = temp_bytes(None), temp_bytes("save_dots"), temp_bytes("full")
    assert full < save_dots < none


def test_remat_does_not_change_cached_decoding():
    """A remat model's cached decode equals its full forward (remat is a forward-only setting)."""
    path = os.path.join(DATA, "qwen3_untied")
    model = models.from_pretrained(path, remat="full")
    assert model.remat == "full"
    ref = np.load(os.path.join(path, "reference.npz"))
    ids = ref["input_ids"]
    batch, length = ids.shape
    positions = np.broadcast_to(np.arange(length), ids.shape)
    kv_mask = np.ones((batch, length), bool)
    logits, _ = jit_decode(model)(ids, positions, model.init_cache(batch, length), 0, kv_mask)
    np.testing.assert_allclose(np.asarray(logits), ref["logits"], atol=TOL, rtol=0)
    np.testing.assert_allclose(jit_forward(model)(ids), ref["logits"], atol=TOL, rtol=0)


def test_bad_remat_name_lists_the_valid_ones():
    cfg = small_config()
    valid = r"valid: None \(save everything\), 'full', 'save_dots', 'offload'"
    with pytest.raises(ValueError, match=rf"unknown remat policy 'dots'; {valid}"):
        models.CausalLM(cfg, rngs=nnx.Rngs(0), remat="dots")
    with pytest.raises(ValueError, match="unknown remat policy 'everything'"):
        models.from_pretrained(os.path.join(DATA, "llama3"), remat="everything")


def test_offload_on_a_backend_without_pinned_host_memory_is_refused():
    class Memory:
        def __init__(self, kind):
            self.kind = kind

    class DeviceWithoutHostMemory:
        platform = "gpu"

        def addressable_memories(self):
            return [Memory("device")]

        def __str__(self):
            return "cuda:0"

    with pytest.raises(ValueError) as e:
        transformer.check_remat("offload", DeviceWithoutHostMemory())
    msg = str(e.value)
    assert "cuda:0 (backend 'gpu') has no 'pinned_host' memory space" in msg
    assert "remat='save_dots'" in msg and "remat='full'" in msg
    assert transformer.check_remat("save_dots", DeviceWithoutHostMemory()) == "save_dots"


def test_decode_refuses_a_cache_of_another_layout():
    model = models.CausalLM(small_config(), rngs=nnx.Rngs(0))
    tokens, positions, kv_mask = np.zeros((1, 1), np.int32), np.zeros((1, 1)), np.ones((1, 4))
    per_layer = [{"k": np.zeros((1, 2, 4, 8)), "v": np.zeros((1, 2, 4, 8))}] * 3
    with pytest.raises(ValueError, match=r"cache must be the dict .* that init_cache returns"):
        model.decode(tokens, positions, per_layer, 0, kv_mask)
    wrong_depth = {k: v[:2] for k, v in model.init_cache(1, 4).items()}
    with pytest.raises(ValueError, match=r"cache\['k'\] has shape \(2, 1, 2, 4, 8\).*num_layers=3"):
        model.decode(tokens, positions, wrong_depth, 0, kv_mask)


def test_decode_updates_the_donated_cache_in_place():
    """The decode scan writes into the carried cache: with the cache donated, the output cache
    is the input's buffers and the compiled step's temporaries hold about one layer's keys and
    values (the slice attention reads), not a copy of the whole cache (which a scan over
    per-layer caches, rebuilding the stack as its output, would make every step)."""
    cfg = small_config(num_layers=8, num_kv_heads=4, head_dim=16, hidden_size=64)
    model = models.CausalLM(cfg, rngs=nnx.Rngs(0))
    graphdef, params = nnx.split(model)
    batch, slots = 4, 512
    cache = jax.eval_shape(lambda: model.init_cache(batch, slots))

    def step(params, cache, tokens, write_index, kv_mask):
        m = nnx.merge(graphdef, params)
        return m.decode_hidden(tokens, tokens, cache, write_index, kv_mask)

    args = (
        params,
        cache,
        jax.ShapeDtypeStruct((batch, 1), jnp.int32),
        jax.ShapeDtypeStruct((), jnp.int32),
        jax.ShapeDtypeStruct((batch, slots), bool),
    )
    memory = jax.jit(step, donate_argnums=1).lower(*args).compile().memory_analysis()
    cache_bytes = sum(x.size * x.dtype.itemsize for x in jax.tree.leaves(cache))
    assert memory.alias_size_in_bytes == cache_bytes  # the output cache is the input's buffers
    assert memory.temp_size_in_bytes < 0.3 * cache_bytes  # one layer's k, v: 1/8 of the cache


# ----- configuration errors -----


def hf_config(**overrides):
    """A tiny Qwen3 config.json as a dict (also used by test_registry)."""
    base = {
        "model_type": "qwen3",
        "architectures": ["Qwen3ForCausalLM"],
        "vocab_size": 64,
        "hidden_size": 32,
        "intermediate_size": 48,
        "num_hidden_layers": 1,
        "num_attention_heads": 2,
        "num_key_value_heads": 1,
        "head_dim": 16,
        "rms_norm_eps": 1e-6,
        "rope_parameters": {"rope_type": "default", "rope_theta": 10000.0},
    }
    base.update(overrides)
    return base


def _write(tmp_path, cfg):
    with open(tmp_path / "config.json", "w") as f:
        json.dump(cfg, f)
    return tmp_path


def test_config_missing_key_names_file_and_key(tmp_path):
    cfg = hf_config()
    del cfg["intermediate_size"]
    with pytest.raises(ValueError, match=r"config\.json.*intermediate_size"):
        models.load_config(_write(tmp_path, cfg))


def test_config_unsupported_model_type(tmp_path):
    valid = "valid names: llama, qwen2, qwen3"
    with pytest.raises(
        NotImplementedError, match=rf"config\.json: unknown model_type 'gpt2'; {valid}"
    ):
        models.load_config(_write(tmp_path, hf_config(model_type="gpt2")))


def test_config_unsupported_architecture(tmp_path):
    cfg = hf_config(architectures=["Qwen3ForSequenceClassification"])
    with pytest.raises(NotImplementedError, match="Qwen3ForSequenceClassification"):
        models.load_config(_write(tmp_path, cfg))


def test_config_moe_is_planned(tmp_path):
    with pytest.raises(NotImplementedError, match=r"Qwen3-MoE.*planned"):
        models.load_config(_write(tmp_path, hf_config(model_type="qwen3_moe")))


def test_config_unsupported_rope_type(tmp_path):
    cfg = hf_config(rope_parameters={"rope_type": "longrope", "rope_theta": 1e4})
    with pytest.raises((NotImplementedError, ValueError), match="longrope"):
        models.load_config(_write(tmp_path, cfg))


def test_config_roundtrip_through_hf_dict():
    cfg = models.load_config(os.path.join(DATA, "llama3"))
    rebuilt = config_lib.config_from_hf(SimpleNamespace(**cfg.hf_config_dict()))
    assert rebuilt == cfg
