"""Flax NNX decoder-only transformer (Qwen3 / Qwen2 / Llama 3 families).

Contract (shared by student, teacher and reference models, and by `opdplus_jax.sampling`):

```python
model = models.from_pretrained(path, dtype=jnp.float32, param_dtype=None, mesh=None)
cfg = model.config                                   # ModelConfig
logits_BLV = model(tokens_BL, positions_BL=None, attention_mask_BL=None)
x_BLD = model.hidden_states(tokens_BL, positions_BL=None, attention_mask_BL=None)
logits_BLV = model.logits(x_BLD)                     # == model(...) on the same arguments
cache = model.init_cache(batch_size, max_length, dtype=None)
x_BLD, cache = model.decode_hidden(tokens_BL, positions_BL, cache, write_index, kv_mask_BS)
logits_BLV, cache = model.decode(tokens_BL, positions_BL, cache, write_index, kv_mask_BS)
graphdef, params = nnx.split(model, nnx.Param)
```

- `__call__` is the full causal forward (training / scoring). `attention_mask_BL`: 1 = real token,
  0 = padding; padding keys are never attended to. `positions_BL` defaults to `cumsum(mask) - 1`
  (clipped at 0), so left padding does not shift RoPE positions.
- `hidden_states` / `decode_hidden` stop before the output layer: they return the final hidden
  states [B, L, D] (after the final norm, in the activation dtype). Slice them to the positions
  whose logits are needed, then call `logits`: the output layer is most of a small model's FLOPs
  (scoring needs the response positions only, a prefill only the last one).
- `init_cache` returns a pure pytree: a list with one `{"k": [B, K, S, H], "v": [B, K, S, H]}`
  dict per layer (K = kv heads, S = max_length, H = head dim), zeros, donate-able. Heads before
  slots, so that a decode step's attention reads every head's keys as one contiguous [S, H]
  matrix (no transpose of the cache per step).
- `decode` writes the L new tokens' keys/values into slots `[write_index, write_index + L)` (the
  same slots for every row: left-padded layout) and lets new token l attend to slots
  `s <= write_index + l` with `kv_mask_BS[b, s]` set (the caller marks the new slots as real).
  RoPE uses `positions_BL`. Prefill is `write_index=0, L=prompt length`; a decode step is `L=1`.
  `write_index` may be a traced int32 scalar (the whole call is jit-able).
- Logits are float32 [B, L, V] whatever the parameter/activation dtype; V is the embedding size,
  which can exceed the tokenizer's vocabulary (slice with `logits[..., :tokenizer.vocab_size]`).

Parameter layout (logical axes in parentheses, see `opdplus_jax.sharding`): embedding [V, D]
(vocab, embed); q [D, N, H] (embed, heads, head_dim); k, v [D, K, H]; o [N, H, D]; gate/up
[D, F] (embed, mlp); down [F, D]; lm_head [D, V] (absent when tied). Inside attention the N = K x G
query heads are split into K kv-head groups of G (free reshapes of q and o): activations are
q [B, K, G, L, H], k/v [B, K, L, H].
"""

from __future__ import annotations

import math
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx
from jax.sharding import Mesh

from opdplus_jax import sharding as shd
from opdplus_jax.models.config import ModelConfig

KVCache = list[dict[str, jax.Array]]
_NEG = -0.7 * float(np.finfo(np.float32).max)  # finite: fully masked rows stay NaN-free


def _param(rngs: nnx.Rngs, shape: tuple[int, ...], axes: tuple[str, ...], dtype, init="normal"):
    if init == "ones":
        value = jnp.ones(shape, dtype)
    elif init == "zeros":
        value = jnp.zeros(shape, dtype)
    else:
        value = 0.02 * jax.random.normal(rngs.params(), shape, dtype)
    return nnx.Param(value, out_sharding=axes, eager_sharding=False)


def rms_norm(x: jax.Array, scale: jax.Array, eps: float) -> jax.Array:
    """RMSNorm over the last axis, statistics in float32 (as transformers does)."""
    x32 = x.astype(jnp.float32)
    x32 = x32 * jax.lax.rsqrt(jnp.mean(x32 * x32, axis=-1, keepdims=True) + eps)
    return scale.astype(x.dtype) * x32.astype(x.dtype)


def rope_inv_freq(cfg: ModelConfig) -> tuple[np.ndarray, float]:
    """Inverse frequencies [H/2] (float32) and the cos/sin scaling factor for `cfg`'s RoPE."""
    dim, base = cfg.head_dim, cfg.rope_theta
    exps = np.arange(0, dim, 2, dtype=np.float32) / np.float32(dim)
    pos_freqs = np.power(np.float32(base), exps, dtype=np.float32)
    inv_freq = (1.0 / pos_freqs).astype(np.float32)
    p = cfg.rope_param
    scaling = 1.0
    if cfg.rope_type == "linear":
        inv_freq = inv_freq / np.float32(p("factor"))
    elif cfg.rope_type == "llama3":
        factor, lo, hi = p("factor"), p("low_freq_factor"), p("high_freq_factor")
        old = p("original_max_position_embeddings")
        wavelen = 2 * math.pi / inv_freq
        scaled = np.where(wavelen > old / lo, inv_freq / factor, inv_freq)
        smooth = (old / wavelen - lo) / (hi - lo)
        smoothed = (1 - smooth) * scaled / factor + smooth * scaled
        medium = ~(wavelen < old / hi) & ~(wavelen > old / lo)
        inv_freq = np.where(medium, smoothed, scaled).astype(np.float32)
    elif cfg.rope_type == "yarn":
        old = p("original_max_position_embeddings", cfg.max_position_embeddings)
        factor = p("factor") or cfg.max_position_embeddings / old

        def mscale(scale, m=1.0):
            return 1.0 if scale <= 1 else 0.1 * m * math.log(scale) + 1.0

        scaling = p("attention_factor")
        if scaling is None:
            m, m_all = p("mscale"), p("mscale_all_dim")
            scaling = mscale(factor, m) / mscale(factor, m_all) if m and m_all else mscale(factor)
        fast, slow = p("beta_fast") or 32, p("beta_slow") or 1

        def corr(rot):
            return dim * math.log(old / (rot * 2 * math.pi)) / (2 * math.log(base))

        low, high = corr(fast), corr(slow)
        if p("truncate", True):
            low, high = math.floor(low), math.ceil(high)
        low, high = max(low, 0), min(high, dim - 1)
        high = high + 0.001 if low == high else high
        ramp = np.clip((np.arange(dim // 2, dtype=np.float32) - low) / (high - low), 0, 1)
        extra = 1 - ramp
        inv_freq = (inv_freq / factor * (1 - extra) + inv_freq * extra).astype(np.float32)
    return inv_freq, float(scaling)


def rope_sin_cos(cfg: ModelConfig, positions_BL: jax.Array, dtype) -> tuple[jax.Array, jax.Array]:
    """sin, cos tables [B, L, H] for the rotate-half RoPE convention."""
    inv_freq, scaling = rope_inv_freq(cfg)
    freqs = positions_BL.astype(jnp.float32)[..., None] * jnp.asarray(inv_freq)
    emb = jnp.concatenate([freqs, freqs], axis=-1)
    return (jnp.sin(emb) * scaling).astype(dtype), (jnp.cos(emb) * scaling).astype(dtype)


def apply_rope(x_BLH: jax.Array, sin_BLH: jax.Array, cos_BLH: jax.Array) -> jax.Array:
    """Rotate x [..., L, H] (any leading head axes between B and L broadcast against sin/cos)."""
    x1, x2 = jnp.split(x_BLH, 2, axis=-1)
    rotated = jnp.concatenate([-x2, x1], axis=-1)
    return x_BLH * cos_BLH + rotated * sin_BLH


def _attention(q_BKGLH, k_BKSH, v_BKSH, mask_BLS) -> jax.Array:
    h = q_BKGLH.shape[-1]
    scores = jnp.einsum("BKGLH,BKSH->BKGLS", q_BKGLH, k_BKSH, preferred_element_type=jnp.float32)
    scores = scores * (h**-0.5)
    scores = jnp.where(mask_BLS[:, None, None], scores, _NEG)
    probs = jax.nn.softmax(scores, axis=-1).astype(v_BKSH.dtype)
    return jnp.einsum("BKGLS,BKSH->BKGLH", probs, v_BKSH)


def attention(q_BKGLH, k_BKSH, v_BKSH, mask_BLS, chunk_size: int | None = None) -> jax.Array:
    """Grouped-query softmax attention; scores and softmax in float32. Returns [B, K, G, L, H].

    Query head (k, g) (head k * G + g of the N = K x G) attends with kv head k. With
    `chunk_size` < L, queries are processed in chunks (`lax.map` of a rematerialised function),
    so only [B, N, chunk_size, S] scores are live, in the forward and the backward.
    """
    b, k, g, length, h = q_BKGLH.shape
    if not chunk_size or length <= chunk_size:
        return _attention(q_BKGLH, k_BKSH, v_BKSH, mask_BLS)
    chunks = -(-length // chunk_size)
    pad = chunks * chunk_size - length
    q = jnp.pad(q_BKGLH, ((0, 0), (0, 0), (0, 0), (0, pad), (0, 0)))
    mask = jnp.pad(mask_BLS, ((0, 0), (0, pad), (0, 0)))
    q_CBKGlH = jnp.moveaxis(q.reshape(b, k, g, chunks, chunk_size, h), 3, 0)
    mask_CBlS = mask.reshape(b, chunks, chunk_size, -1).swapaxes(0, 1)
    one = jax.checkpoint(lambda qm: _attention(qm[0], k_BKSH, v_BKSH, qm[1]))
    out_CBKGlH = jax.lax.map(one, (q_CBKGlH, mask_CBlS))
    out = jnp.moveaxis(out_CBKGlH, 0, 3).reshape(b, k, g, chunks * chunk_size, h)
    return out[:, :, :, :length]


class Attention(nnx.Module):
    def __init__(self, cfg: ModelConfig, *, dtype, param_dtype, rngs: nnx.Rngs):
        d, n, k, h = cfg.hidden_size, cfg.num_heads, cfg.num_kv_heads, cfg.head_dim
        self.cfg, self.dtype = cfg, dtype
        self.q_proj = _param(rngs, (d, n, h), ("embed", "heads", "head_dim"), param_dtype)
        self.k_proj = _param(rngs, (d, k, h), ("embed", "kv_heads", "head_dim"), param_dtype)
        self.v_proj = _param(rngs, (d, k, h), ("embed", "kv_heads", "head_dim"), param_dtype)
        self.o_proj = _param(rngs, (n, h, d), ("heads", "head_dim", "embed"), param_dtype)
        if cfg.qkv_bias:
            self.q_bias = _param(rngs, (n, h), ("heads", "head_dim"), param_dtype, "zeros")
            self.k_bias = _param(rngs, (k, h), ("kv_heads", "head_dim"), param_dtype, "zeros")
            self.v_bias = _param(rngs, (k, h), ("kv_heads", "head_dim"), param_dtype, "zeros")
        if cfg.o_bias:
            self.o_bias = _param(rngs, (d,), ("norm",), param_dtype, "zeros")
        if cfg.qk_norm:
            self.q_norm = _param(rngs, (h,), ("head_dim",), param_dtype, "ones")
            self.k_norm = _param(rngs, (h,), ("head_dim",), param_dtype, "ones")

    def qkv(self, x_BLD, sin_BLH, cos_BLH):
        """q [B, K, G, L, H] and k, v [B, K, L, H] (RoPE applied to q and k)."""
        cfg, dt = self.cfg, self.dtype
        d, kv, h = cfg.hidden_size, cfg.num_kv_heads, cfg.head_dim
        q_DKGH = self.q_proj[...].astype(dt).reshape(d, kv, cfg.num_heads // kv, h)
        # Projections in the dot's natural output order, then heads before length (for L = 1, as
        # in a decode step, a free reshape; projecting straight to BKLH makes XLA copy weights).
        q = jnp.einsum("BLD,DKGH->BLKGH", x_BLD, q_DKGH).transpose(0, 2, 3, 1, 4)
        k = jnp.einsum("BLD,DKH->BLKH", x_BLD, self.k_proj[...].astype(dt)).swapaxes(1, 2)
        v = jnp.einsum("BLD,DKH->BLKH", x_BLD, self.v_proj[...].astype(dt)).swapaxes(1, 2)
        if cfg.qkv_bias:
            q = q + self.q_bias[...].astype(dt).reshape(kv, -1, 1, h)
            k = k + self.k_bias[...].astype(dt)[:, None]
            v = v + self.v_bias[...].astype(dt)[:, None]
        if cfg.qk_norm:
            q = rms_norm(q, self.q_norm[...], cfg.rms_norm_eps)
            k = rms_norm(k, self.k_norm[...], cfg.rms_norm_eps)
        sin_B1LH, cos_B1LH = sin_BLH[:, None], cos_BLH[:, None]
        q = apply_rope(q, sin_B1LH[:, None], cos_B1LH[:, None])
        return q, apply_rope(k, sin_B1LH, cos_B1LH), v

    def out(self, o_BKGLH):
        cfg = self.cfg
        kv, d = cfg.num_kv_heads, cfg.hidden_size
        o_KGHD = self.o_proj[...].astype(self.dtype).reshape(kv, cfg.num_heads // kv, -1, d)
        y = jnp.einsum("BKGLH,KGHD->BLD", o_BKGLH, o_KGHD)
        if cfg.o_bias:
            y = y + self.o_bias[...].astype(self.dtype)
        return y

    def __call__(self, x_BLD, sin_BLH, cos_BLH, mask_BLS, chunk_size=None):
        q, k, v = self.qkv(x_BLD, sin_BLH, cos_BLH)
        return self.out(attention(q, k, v, mask_BLS, chunk_size))

    def decode(self, x_BLD, sin_BLH, cos_BLH, mask_BLS, cache, write_index, chunk_size=None):
        q, k, v = self.qkv(x_BLD, sin_BLH, cos_BLH)
        start = (0, 0, write_index, 0)
        k_BKSH = jax.lax.dynamic_update_slice(cache["k"], k.astype(cache["k"].dtype), start)
        v_BKSH = jax.lax.dynamic_update_slice(cache["v"], v.astype(cache["v"].dtype), start)
        o = attention(q, k_BKSH.astype(self.dtype), v_BKSH.astype(self.dtype), mask_BLS, chunk_size)
        return self.out(o), {"k": k_BKSH, "v": v_BKSH}


class MLP(nnx.Module):
    def __init__(self, cfg: ModelConfig, *, dtype, param_dtype, rngs: nnx.Rngs):
        d, f = cfg.hidden_size, cfg.intermediate_size
        self.cfg, self.dtype = cfg, dtype
        self.gate_proj = _param(rngs, (d, f), ("embed", "mlp"), param_dtype)
        self.up_proj = _param(rngs, (d, f), ("embed", "mlp"), param_dtype)
        self.down_proj = _param(rngs, (f, d), ("mlp", "embed"), param_dtype)
        if cfg.mlp_bias:
            self.gate_bias = _param(rngs, (f,), ("mlp",), param_dtype, "zeros")
            self.up_bias = _param(rngs, (f,), ("mlp",), param_dtype, "zeros")
            self.down_bias = _param(rngs, (d,), ("norm",), param_dtype, "zeros")

    def __call__(self, x_BLD):
        dt = self.dtype
        gate = jnp.einsum("BLD,DF->BLF", x_BLD, self.gate_proj[...].astype(dt))
        up = jnp.einsum("BLD,DF->BLF", x_BLD, self.up_proj[...].astype(dt))
        if self.cfg.mlp_bias:
            gate, up = gate + self.gate_bias[...].astype(dt), up + self.up_bias[...].astype(dt)
        y = jnp.einsum("BLF,FD->BLD", jax.nn.silu(gate) * up, self.down_proj[...].astype(dt))
        if self.cfg.mlp_bias:
            y = y + self.down_bias[...].astype(dt)
        return y


class DecoderLayer(nnx.Module):
    def __init__(self, cfg: ModelConfig, *, dtype, param_dtype, rngs: nnx.Rngs):
        d = cfg.hidden_size
        self.eps = cfg.rms_norm_eps
        self.input_norm = _param(rngs, (d,), ("norm",), param_dtype, "ones")
        self.attn = Attention(cfg, dtype=dtype, param_dtype=param_dtype, rngs=rngs)
        self.post_attention_norm = _param(rngs, (d,), ("norm",), param_dtype, "ones")
        self.mlp = MLP(cfg, dtype=dtype, param_dtype=param_dtype, rngs=rngs)

    def __call__(self, x_BLD, sin, cos, mask_BLS, chunk_size=None):
        h = rms_norm(x_BLD, self.input_norm[...], self.eps)
        x_BLD = x_BLD + self.attn(h, sin, cos, mask_BLS, chunk_size)
        return x_BLD + self.mlp(rms_norm(x_BLD, self.post_attention_norm[...], self.eps))

    def decode(self, x_BLD, sin, cos, mask_BLS, cache, write_index, chunk_size=None):
        h = rms_norm(x_BLD, self.input_norm[...], self.eps)
        a, cache = self.attn.decode(h, sin, cos, mask_BLS, cache, write_index, chunk_size)
        x_BLD = x_BLD + a
        return x_BLD + self.mlp(rms_norm(x_BLD, self.post_attention_norm[...], self.eps)), cache


class CausalLM(nnx.Module):
    """Decoder-only causal LM; see the module docstring for the call contract."""

    def __init__(
        self,
        config: ModelConfig,
        *,
        dtype: Any = jnp.float32,
        param_dtype: Any = None,
        rngs: nnx.Rngs,
        mesh: Mesh | None = None,
        rules: shd.AxisRules = shd.LOGICAL_RULES,
        attention_chunk_size: int | None = 1024,
    ):
        """`mesh`/`rules` add activation sharding constraints; `attention_chunk_size` bounds the
        attention-score memory of the full forward (queries per chunk, None = no chunking)."""
        param_dtype = dtype if param_dtype is None else param_dtype
        self.attention_chunk_size = attention_chunk_size
        self.config = config
        self.dtype = jnp.dtype(dtype)
        self.param_dtype = jnp.dtype(param_dtype)
        self.mesh, self.rules = mesh, rules
        v, d = config.vocab_size, config.hidden_size
        kw = {"dtype": self.dtype, "param_dtype": self.param_dtype, "rngs": rngs}
        self.embed_tokens = _param(rngs, (v, d), ("vocab", "embed"), self.param_dtype)
        self.layers = nnx.List([DecoderLayer(config, **kw) for _ in range(config.num_layers)])
        self.norm = _param(rngs, (d,), ("norm",), self.param_dtype, "ones")
        if not config.tie_word_embeddings:
            self.lm_head = _param(rngs, (d, v), ("embed", "vocab"), self.param_dtype)

    def _constrain(self, x, axes):
        return shd.constrain(x, axes, self.mesh, self.rules)

    def _embed(self, tokens_BL):
        # mode="clip": an out-of-range id (e.g. a -1 pad) must not turn into NaN (jnp's default),
        # which would leak into every row through 0 * NaN in the attention of masked keys.
        x = jnp.take(self.embed_tokens[...], tokens_BL, axis=0, mode="clip").astype(self.dtype)
        return self._constrain(x, ("batch", "length", "act_embed"))

    def logits(self, x_BLD: jax.Array) -> jax.Array:
        """Output layer: float32 logits [B, L, V] of final hidden states from `hidden_states`."""
        if self.config.tie_word_embeddings:
            w, spec = self.embed_tokens[...].astype(self.dtype), "BLD,VD->BLV"
        else:
            w, spec = self.lm_head[...].astype(self.dtype), "BLD,DV->BLV"
        logits = jnp.einsum(spec, x_BLD, w, preferred_element_type=jnp.float32)
        return self._constrain(logits.astype(jnp.float32), ("batch", "length", "vocab"))

    def _final_norm(self, x_BLD):
        return rms_norm(x_BLD, self.norm[...], self.config.rms_norm_eps)

    def hidden_states(
        self,
        tokens_BL: jax.Array,
        positions_BL: jax.Array | None = None,
        attention_mask_BL: jax.Array | None = None,
    ) -> jax.Array:
        """Full causal forward up to the output layer: final hidden states [B, L, D]."""
        tokens_BL = jnp.asarray(tokens_BL, jnp.int32)
        length = tokens_BL.shape[1]
        if attention_mask_BL is None:
            mask_BL = jnp.ones(tokens_BL.shape, bool)
        else:
            mask_BL = jnp.asarray(attention_mask_BL).astype(bool)
        if positions_BL is None:
            positions_BL = jnp.maximum(jnp.cumsum(mask_BL.astype(jnp.int32), axis=1) - 1, 0)
        causal_LS = jnp.tril(jnp.ones((length, length), bool))
        mask_BLS = causal_LS[None] & mask_BL[:, None, :]
        sin, cos = rope_sin_cos(self.config, positions_BL, self.dtype)
        x = self._embed(tokens_BL)
        for layer in self.layers:
            x = layer(x, sin, cos, mask_BLS, self.attention_chunk_size)
        return self._final_norm(x)

    def __call__(
        self,
        tokens_BL: jax.Array,
        positions_BL: jax.Array | None = None,
        attention_mask_BL: jax.Array | None = None,
    ) -> jax.Array:
        """Full causal forward: float32 logits [B, L, V]."""
        return self.logits(self.hidden_states(tokens_BL, positions_BL, attention_mask_BL))

    def init_cache(self, batch_size: int, max_length: int, dtype: Any = None) -> KVCache:
        """Zero KV cache: per layer {"k", "v"} of shape [batch_size, K, max_length, H]."""
        cfg = self.config
        dtype = self.dtype if dtype is None else jnp.dtype(dtype)
        shape = (batch_size, cfg.num_kv_heads, max_length, cfg.head_dim)
        device = None
        if self.mesh is not None:
            axes = ("batch", "kv_heads", "cache_length", "head_dim")
            device = shd.logical_sharding(self.mesh, axes, shape, self.rules)
        return [
            {
                "k": jnp.zeros(shape, dtype, device=device),
                "v": jnp.zeros(shape, dtype, device=device),
            }
            for _ in range(cfg.num_layers)
        ]

    def decode_hidden(
        self,
        tokens_BL: jax.Array,
        positions_BL: jax.Array,
        cache: KVCache,
        write_index: jax.Array | int,
        kv_mask_BS: jax.Array,
    ) -> tuple[jax.Array, KVCache]:
        """Cached forward of L new tokens written at slots [write_index, write_index + L), up to
        the output layer: (final hidden states [B, L, D], updated cache)."""
        tokens_BL = jnp.asarray(tokens_BL, jnp.int32)
        length = tokens_BL.shape[1]
        slots = cache[0]["k"].shape[2]
        write_index = jnp.asarray(write_index, jnp.int32)
        query_slot_L = write_index + jnp.arange(length, dtype=jnp.int32)
        causal_LS = jnp.arange(slots, dtype=jnp.int32)[None, :] <= query_slot_L[:, None]
        mask_BLS = causal_LS[None] & jnp.asarray(kv_mask_BS).astype(bool)[:, None, :]
        sin, cos = rope_sin_cos(self.config, jnp.asarray(positions_BL), self.dtype)
        x = self._embed(tokens_BL)
        new_cache = []
        for layer, layer_cache in zip(self.layers, cache, strict=True):
            x, layer_cache = layer.decode(
                x, sin, cos, mask_BLS, layer_cache, write_index, self.attention_chunk_size
            )
            new_cache.append(layer_cache)
        return self._final_norm(x), new_cache

    def decode(self, *args: Any, **kwargs: Any) -> tuple[jax.Array, KVCache]:
        """`decode_hidden` (same arguments) then the output layer: (float32 logits [B, L, V],
        updated cache)."""
        x_BLD, cache = self.decode_hidden(*args, **kwargs)
        return self.logits(x_BLD), cache
