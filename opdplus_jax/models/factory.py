"""Fresh random-weight checkpoints of a given shape (for demos, benchmarks and tests).

    folder = factory.random_checkpoint("runs/models/student", factory.qwen3_config(
        vocab_size=128, hidden_size=64, num_layers=2, num_heads=4, num_kv_heads=2), seed=0)

The folder is a normal Hugging Face checkpoint (config.json + model.safetensors), so everything
downstream loads it through `from_pretrained` like a real model.
"""

from __future__ import annotations

import os
from typing import Any

import jax.numpy as jnp
from flax import nnx

from opdplus_jax.models.checkpoint_io import save_pretrained
from opdplus_jax.models.config import ModelConfig
from opdplus_jax.models.transformer import CausalLM


def qwen3_config(
    *,
    vocab_size: int,
    hidden_size: int,
    num_layers: int,
    num_heads: int,
    num_kv_heads: int,
    head_dim: int | None = None,
    intermediate_size: int | None = None,
    tie_word_embeddings: bool = True,
    bos_token_id: int | None = None,
    eos_token_id: int | None = None,
    pad_token_id: int | None = None,
    max_position_embeddings: int = 4096,
) -> ModelConfig:
    """A Qwen3-shaped config (q/k RMSNorm, GQA, SwiGLU, rope theta 1e6)."""
    return ModelConfig(
        model_type="qwen3",
        vocab_size=vocab_size,
        hidden_size=hidden_size,
        intermediate_size=intermediate_size or 3 * hidden_size,
        num_layers=num_layers,
        num_heads=num_heads,
        num_kv_heads=num_kv_heads,
        head_dim=head_dim or hidden_size // num_heads,
        rms_norm_eps=1e-6,
        rope_theta=1_000_000.0,
        max_position_embeddings=max_position_embeddings,
        tie_word_embeddings=tie_word_embeddings,
        qk_norm=True,
        bos_token_id=bos_token_id,
        eos_token_id=eos_token_id,
        pad_token_id=pad_token_id,
    )


def random_checkpoint(
    folder: str | os.PathLike,
    config: ModelConfig,
    *,
    seed: int = 0,
    dtype: Any = jnp.float32,
    output_scale: float = 1.0,
) -> str:
    """Initialises `config` with N(0, 0.02) weights from `seed` and saves it to `folder`.

    `output_scale` multiplies the output projection (the embedding when tied): random models are
    then more peaked (a larger scale gives lower-entropy next-token distributions).
    """
    model = CausalLM(config, dtype=dtype, param_dtype=dtype, rngs=nnx.Rngs(seed))
    head = model.embed_tokens if config.tie_word_embeddings else model.lm_head
    head.set_value(head[...] * output_scale)
    folder = os.fspath(folder)
    save_pretrained(model, folder)
    return folder
