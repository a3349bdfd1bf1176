"""Flax NNX decoder-only transformer (Qwen3 / Qwen2 / Llama 3 families).

Contract (shared by student, teacher and reference models, and by `opdplus_jax.sampling`):

```python
model = models.from_pretrained(path, dtype=jnp.float32, param_dtype=None, mesh=None, remat=None)
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
- The layers run as one `lax.scan` over stacked parameters, so the compiled program (and its
  compile time) does not grow with depth. `remat` (None, "full", "save_dots", "offload"; see
  `remat_policy`, names in `REMAT_POLICIES`) rematerialises each layer of the full forward in
  the backward pass; it is checked when the model is built (`check_remat`).
- `init_cache` returns a pure pytree `{"k": [L, B, K, S, H], "v": [L, B, K, S, H]}` (L = layers,
  K = kv heads, S = max_length, H = head dim), zeros, donate-able. Heads before slots, so that a
  decode step's attention reads every head's keys as one contiguous [S, H] matrix (no transpose
  of the cache per step). The decode scan carries the whole cache and writes each layer's new
  keys/values into it in place (`dynamic_update_slice`): donate it to the jitted caller.
- `decode` writes the L new tokens' keys/values into slots `[write_index, write_index + L)` (the
  same slots for every row: left-padded layout; or, with `write_index` of shape [B], from row
  b's own slot) and lets new token l attend to slots `s <= write_index + l` with
  `kv_mask_BS[b, s]` set (the caller marks the new slots as real).
  RoPE uses `positions_BL`. Prefill is `write_index=0, L=prompt length`; a decode step is `L=1`.
  `write_index` may be a traced int32 scalar (the whole call is jit-able).
- Logits are float32 [B, L, V] whatever the parameter/activation dtype; V is the embedding size,
  which can exceed the tokenizer's vocabulary (slice with `logits[..., :tokenizer.vocab_size]`).

Parameter layout (logical axes in parentheses, see `opdplus_jax.sharding`): embedding [V, D]
(vocab, embed); final norm [D] (norm); lm_head [D, V] (embed, vocab; absent when tied). The
layers are one `DecoderLayer` module (`model.layers`) whose every parameter has a leading
[L] axis (layers): q [L, D, N, H] (layers, embed, heads, head_dim); k, v [L, D, K, H];
o [L, N, H, D]; gate/up [L, D, F] (layers, embed, mlp); down [L, F, D]; norms and biases [L, ...].
Layer i is `jax.tree.map(lambda a: a[i], nnx.split(model.layers)[1])`; checkpoint files keep
Hugging Face's per-layer tensors (`checkpoint_io` stacks and unstacks them). Inside attention
the N = K x G query heads are split into K kv-head groups of G (free reshapes of q and o):
activations are q [B, K, G, L, H], k/v [B, K, L, H].
"""

from __future__ import annotations

import math
from collections.abc import Callable
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx
from jax.sharding import Mesh

from opdplus_jax import sharding as shd
from opdplus_jax.models.config import ModelConfig

# The decode cache: {"k": [num_layers, B, K, S, H], "v": [num_layers, B, K, S, H]}.
KVCache = dict[str, jax.Array]
# Valid `remat` names besides None (see `remat_policy`).
REMAT_POLICIES: tuple[str, ...] = ("full", "save_dots", "offload")
# The N(0, 0.02) weights of one layer: q, k, v, o, gate, up, down (biases and norms are constant).
RANDOM_PARAMS_PER_LAYER = 7
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


class _StackInit:
    """Makes the parameters of `num_layers` layers, stacked on a leading "layers" axis.

    The random weights use the keys that building the layers one after another draws: layer i's
    j-th random parameter (in construction order) gets the (i * RANDOM_PARAMS_PER_LAYER + j)-th
    key of `rngs.params()`, and the stream ends at the same count. A seed therefore gives the
    same weights as a list of separately built layers (the layout before the stack was scanned),
    so `factory.random_checkpoint` files do not depend on the layout.
    """

    def __init__(self, rngs: nnx.Rngs, num_layers: int):
        keys = [rngs.params() for _ in range(num_layers * RANDOM_PARAMS_PER_LAYER)]
        self.num_layers = num_layers
        self.keys_LJ = jnp.stack(keys).reshape(num_layers, RANDOM_PARAMS_PER_LAYER)
        self.drawn = 0

    def __call__(self, shape: tuple[int, ...], axes: tuple[str, ...], dtype, init="normal"):
        stacked = (self.num_layers, *shape)
        if init == "ones":
            value = jnp.ones(stacked, dtype)
        elif init == "zeros":
            value = jnp.zeros(stacked, dtype)
        else:
            keys_L = self.keys_LJ[:, self.drawn]
            self.drawn += 1
            value = 0.02 * jax.vmap(lambda key: jax.random.normal(key, shape, dtype))(keys_L)
        return nnx.Param(value, out_sharding=("layers", *axes), eager_sharding=False)


class Attention(nnx.Module):
    """Grouped-query self-attention of the layer stack (see `DecoderLayer`): parameters are made
    stacked [num_layers, ...]; the methods run on one layer's slice of them."""

    def __init__(self, cfg: ModelConfig, *, dtype, param_dtype, param: _StackInit):
        d, n, k, h = cfg.hidden_size, cfg.num_heads, cfg.num_kv_heads, cfg.head_dim
        self.cfg, self.dtype = cfg, dtype
        self.q_proj = param((d, n, h), ("embed", "heads", "head_dim"), param_dtype)
        self.k_proj = param((d, k, h), ("embed", "kv_heads", "head_dim"), param_dtype)
        self.v_proj = param((d, k, h), ("embed", "kv_heads", "head_dim"), param_dtype)
        self.o_proj = param((n, h, d), ("heads", "head_dim", "embed"), param_dtype)
        if cfg.qkv_bias:
            self.q_bias = param((n, h), ("heads", "head_dim"), param_dtype, "zeros")
            self.k_bias = param((k, h), ("kv_heads", "head_dim"), param_dtype, "zeros")
            self.v_bias = param((k, h), ("kv_heads", "head_dim"), param_dtype, "zeros")
        if cfg.o_bias:
            self.o_bias = param((d,), ("norm",), param_dtype, "zeros")
        if cfg.qk_norm:
            self.q_norm = param((h,), ("head_dim",), param_dtype, "ones")
            self.k_norm = param((h,), ("head_dim",), param_dtype, "ones")

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

    def decode(self, x_BLD, sin_BLH, cos_BLH, mask_BLS, cache, layer, write_index, chunk_size=None):
        """Attention of the new tokens over this layer's cached keys/values. `cache` is the whole
        stacked cache; the new keys/values are written in place into layer `layer`'s slots
        [write_index, write_index + L) (`write_index` an int32 scalar, or [B] per row) and the
        updated whole cache is returned."""
        q, k, v = self.qkv(x_BLD, sin_BLH, cos_BLH)
        new = {}
        for name, kv_BKLH in (("k", k), ("v", v)):
            update_BKLH = kv_BKLH.astype(cache[name].dtype)
            if write_index.ndim == 0:  # the same slots for every row: one in-place slice
                start = (layer, 0, 0, write_index, 0)
                new[name] = jax.lax.dynamic_update_slice(cache[name], update_BKLH[None], start)
            else:  # row b's slots start at write_index[b]; slots past the cache are dropped
                b, _, length, _ = update_BKLH.shape
                slot_BL = write_index[:, None] + jnp.arange(length, dtype=jnp.int32)
                row_BL = jnp.broadcast_to(jnp.arange(b, dtype=jnp.int32)[:, None], slot_BL.shape)
                at = cache[name].at[layer, row_BL, :, slot_BL]  # indexes [B, L, K, H]
                new[name] = at.set(update_BKLH.swapaxes(1, 2), mode="drop")
        k_BKSH, v_BKSH = (
            jax.lax.dynamic_index_in_dim(new[name], layer, keepdims=False).astype(self.dtype)
            for name in ("k", "v")
        )
        return self.out(attention(q, k_BKSH, v_BKSH, mask_BLS, chunk_size)), new


class MLP(nnx.Module):
    """SwiGLU MLP of the layer stack (parameters stacked, methods on one layer's slice)."""

    def __init__(self, cfg: ModelConfig, *, dtype, param_dtype, param: _StackInit):
        d, f = cfg.hidden_size, cfg.intermediate_size
        self.cfg, self.dtype = cfg, dtype
        self.gate_proj = param((d, f), ("embed", "mlp"), param_dtype)
        self.up_proj = param((d, f), ("embed", "mlp"), param_dtype)
        self.down_proj = param((f, d), ("mlp", "embed"), param_dtype)
        if cfg.mlp_bias:
            self.gate_bias = param((f,), ("mlp",), param_dtype, "zeros")
            self.up_bias = param((f,), ("mlp",), param_dtype, "zeros")
            self.down_bias = param((d,), ("norm",), param_dtype, "zeros")

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
    """All `num_layers` pre-norm decoder layers as one module.

    Every parameter is stacked: it has a leading [num_layers] axis (logical axis "layers"), and
    `CausalLM` runs the layers with one `lax.scan` over that axis. `__call__` and `decode` are one
    layer: they run on a module whose parameters are one layer's slice, as the scan body sees them
    (`nnx.merge(graphdef, jax.tree.map(lambda a: a[i], state))` of `nnx.split(stack)` is layer i).
    """

    def __init__(self, cfg: ModelConfig, *, num_layers: int, dtype, param_dtype, rngs: nnx.Rngs):
        d = cfg.hidden_size
        param = _StackInit(rngs, num_layers)
        kw = {"dtype": dtype, "param_dtype": param_dtype, "param": param}
        self.eps = cfg.rms_norm_eps
        self.input_norm = param((d,), ("norm",), param_dtype, "ones")
        self.attn = Attention(cfg, **kw)
        self.post_attention_norm = param((d,), ("norm",), param_dtype, "ones")
        self.mlp = MLP(cfg, **kw)
        if param.drawn != RANDOM_PARAMS_PER_LAYER:
            raise AssertionError(f"a layer drew {param.drawn} random weights, not 7")

    def __call__(self, x_BLD, sin, cos, mask_BLS, chunk_size=None):
        h = rms_norm(x_BLD, self.input_norm[...], self.eps)
        x_BLD = x_BLD + self.attn(h, sin, cos, mask_BLS, chunk_size)
        return x_BLD + self.mlp(rms_norm(x_BLD, self.post_attention_norm[...], self.eps))

    def decode(self, x_BLD, sin, cos, mask_BLS, cache, layer, write_index, chunk_size=None):
        """One layer's cached forward; `cache` is the whole stacked cache, `layer` this layer's
        index in it (traced). Returns (x_BLD, updated whole cache)."""
        h = rms_norm(x_BLD, self.input_norm[...], self.eps)
        a, cache = self.attn.decode(h, sin, cos, mask_BLS, cache, layer, write_index, chunk_size)
        x_BLD = x_BLD + a
        return x_BLD + self.mlp(rms_norm(x_BLD, self.post_attention_norm[...], self.eps)), cache


def remat_policy(name: str | None) -> Callable[..., Any] | None:
    """The `jax.checkpoint` policy of the remat setting `name` (None for `name=None`).

    The policy applies to one layer of the scanned stack, in the full forward (`hidden_states`,
    `__call__`), the one that is differentiated:

    - None: no rematerialisation; the backward reads every intermediate saved by the forward;
    - "full": save nothing inside a layer (`nothing_saveable`); the backward recomputes each
      layer from its input (only the [B, L, D] layer inputs are kept): the least memory;
    - "save_dots": save the matmul outputs without batch dimensions, i.e. the q/k/v/o and MLP
      projections, not the attention scores (`dots_with_no_batch_dims_saveable`);
    - "offload": those same matmul outputs, kept in host memory instead of device memory
      (`offload_dot_with_no_batch_dims("device", "pinned_host")`).

    ValueError (listing the valid names) for any other name.
    """
    if name is None:
        return None
    policies = jax.checkpoint_policies
    if name == "full":
        return policies.nothing_saveable
    if name == "save_dots":
        return policies.dots_with_no_batch_dims_saveable
    if name == "offload":
        return policies.offload_dot_with_no_batch_dims("device", "pinned_host")
    raise ValueError(
        f"unknown remat policy {name!r}; valid: None (save everything), "
        + ", ".join(repr(n) for n in REMAT_POLICIES)
    )


def check_remat(name: str | None, device: jax.Device | None = None) -> str | None:
    """`name` if it is a valid remat setting (see `remat_policy`) usable on `device` (default:
    `jax.devices()[0]`), else ValueError: an unknown name, or "offload" on a device without a
    "pinned_host" memory space to offload to."""
    remat_policy(name)
    if name == "offload":
        device = jax.devices()[0] if device is None else device
        kinds = sorted(m.kind for m in device.addressable_memories())
        if "pinned_host" not in kinds:
            raise ValueError(
                f"remat='offload' keeps saved activations in host memory, but {device} (backend "
                f"{device.platform!r}) has no 'pinned_host' memory space (it has {kinds}); use "
                "remat='save_dots' to keep them on the device or remat='full' to recompute them"
            )
    return name


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
        remat: str | None = None,
    ):
        """`mesh`/`rules` add activation sharding constraints; `attention_chunk_size` bounds the
        attention-score memory of the full forward (queries per chunk, None = no chunking);
        `remat` is the rematerialisation policy of each layer in the full forward: None,
        "full", "save_dots" or "offload" (see `remat_policy`). The remat setting is checked
        here, before any weight is made: ValueError for an unknown name, or for "offload" when
        the mesh's devices (default: `jax.devices()[0]`) have no pinned host memory."""
        device = None if mesh is None else mesh.devices.flat[0]
        self.remat = check_remat(remat, device)
        param_dtype = dtype if param_dtype is None else param_dtype
        self.attention_chunk_size = attention_chunk_size
        self.config = config
        self.dtype = jnp.dtype(dtype)
        self.param_dtype = jnp.dtype(param_dtype)
        self.mesh, self.rules = mesh, rules
        v, d = config.vocab_size, config.hidden_size
        kw = {"dtype": self.dtype, "param_dtype": self.param_dtype, "rngs": rngs}
        self.embed_tokens = _param(rngs, (v, d), ("vocab", "embed"), self.param_dtype)
        self.layers = DecoderLayer(config, num_layers=config.num_layers, **kw)
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

    def _scan_layers(self, step, carry, xs=None, remat=None):
        """`carry = step(layer, carry, x)` for every layer in order, as one `lax.scan` over the
        stacked parameters (`layer`: a `DecoderLayer` holding one layer's slice; `x`: that
        layer's slice of `xs`). With `remat`, the step is a `jax.checkpoint` of that policy."""
        graphdef, stack = nnx.split(self.layers)

        def body(carry, stack_x):
            layer_state, x = stack_x
            return step(nnx.merge(graphdef, layer_state), carry, x), None

        if remat is not None:
            body = jax.checkpoint(body, policy=remat_policy(remat), prevent_cse=False)
        carry, _ = jax.lax.scan(body, carry, (stack, xs))
        return carry

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
        """Full causal forward up to the output layer: final hidden states [B, L, D]. The layers
        run as one scan, each rematerialised with the model's `remat` policy."""
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

        def step(layer, x_BLD, _):
            x_BLD = layer(x_BLD, sin, cos, mask_BLS, self.attention_chunk_size)
            return self._constrain(x_BLD, ("batch", "length", "act_embed"))

        x = self._scan_layers(step, self._embed(tokens_BL), remat=self.remat)
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
        """Zero KV cache {"k", "v"}, each [num_layers, batch_size, K, max_length, H] (placed with
        its logical sharding when the model has a mesh)."""
        cfg = self.config
        dtype = self.dtype if dtype is None else jnp.dtype(dtype)
        shape = (cfg.num_layers, batch_size, cfg.num_kv_heads, max_length, cfg.head_dim)
        device = None
        if self.mesh is not None:
            axes = ("layers", "batch", "kv_heads", "cache_length", "head_dim")
            device = shd.logical_sharding(self.mesh, axes, shape, self.rules)
        return {
            "k": jnp.zeros(shape, dtype, device=device),
            "v": jnp.zeros(shape, dtype, device=device),
        }

    def _check_cache(self, cache: Any) -> None:
        layout = '{"k": [num_layers, B, K, S, H], "v": [num_layers, B, K, S, H]}'
        if not isinstance(cache, dict) or set(cache) != {"k", "v"}:
            raise ValueError(
                f"cache must be the dict {layout} that init_cache returns; got "
                f"{type(cache).__name__}"
                + (f" with keys {sorted(cache)}" if isinstance(cache, dict) else "")
            )
        cfg = self.config
        for name, value in cache.items():
            if value.ndim != 5 or value.shape[0] != cfg.num_layers:
                raise ValueError(
                    f"cache[{name!r}] has shape {tuple(value.shape)}; expected {layout} with "
                    f"num_layers={cfg.num_layers} (make it with init_cache)"
                )

    def decode_hidden(
        self,
        tokens_BL: jax.Array,
        positions_BL: jax.Array,
        cache: KVCache,
        write_index: jax.Array | int,
        kv_mask_BS: jax.Array,
    ) -> tuple[jax.Array, KVCache]:
        """Cached forward of L new tokens written at slots [write_index, write_index + L), up to
        the output layer: (final hidden states [B, L, D], updated cache). `write_index` is an
        int32 scalar (every row writes the same slots: the left-padded layout of one batch) or
        [B], row b writing from slot write_index[b] (rows at different points of their
        sequences, as in continuous batching; slots past the cache are dropped, so a row that
        should not write can pass the cache length). The layers run as one scan that carries
        the whole stacked cache and updates each layer's slice in place (donate the cache to a
        jitted caller to avoid a copy)."""
        self._check_cache(cache)
        tokens_BL = jnp.asarray(tokens_BL, jnp.int32)
        batch, length = tokens_BL.shape
        slots = cache["k"].shape[3]
        write_index = jnp.asarray(write_index, jnp.int32)
        if write_index.shape not in ((), (batch,)):
            raise ValueError(
                f"write_index must be an int32 scalar (the same slots for every row) or one "
                f"slot per row, shape ({batch},); got shape {write_index.shape}"
            )
        # The slot of each new token ([L], or [B, L] per row); a query sees slots up to its own.
        query_slot = write_index[..., None] + jnp.arange(length, dtype=jnp.int32)
        causal = jnp.arange(slots, dtype=jnp.int32) <= query_slot[..., None]  # [(B,) L, S]
        mask_BLS = causal & jnp.asarray(kv_mask_BS).astype(bool)[:, None, :]
        sin, cos = rope_sin_cos(self.config, jnp.asarray(positions_BL), self.dtype)
        chunk = self.attention_chunk_size

        def step(layer, x_cache, index):
            x_BLD, cache = x_cache
            return layer.decode(x_BLD, sin, cos, mask_BLS, cache, index, write_index, chunk)

        indices = jnp.arange(self.config.num_layers, dtype=jnp.int32)
        x, cache = self._scan_layers(step, (self._embed(tokens_BL), dict(cache)), indices)
        return self._final_norm(x), cache

    def decode(self, *args: Any, **kwargs: Any) -> tuple[jax.Array, KVCache]:
        """`decode_hidden` (same arguments) then the output layer: (float32 logits [B, L, V],
        updated cache)."""
        x_BLD, cache = self.decode_hidden(*args, **kwargs)
        return self.logits(x_BLD), cache
