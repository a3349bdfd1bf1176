"""Flax NNX causal LMs that load and export Hugging Face checkpoints (see `transformer` for the
call contract, `checkpoint_io` for loading/export, `config` for the configuration and `families`
for the supported model families, one `FAMILIES` row each)."""

from opdplus_jax.models.checkpoint_io import from_pretrained, save_pretrained, tensor_specs
from opdplus_jax.models.config import ModelConfig, config_from_hf, load_config
from opdplus_jax.models.factory import qwen3_config, random_checkpoint
from opdplus_jax.models.families import FAMILIES, ModelFamily
from opdplus_jax.models.transformer import REMAT_POLICIES, CausalLM, KVCache

__all__ = [
    "FAMILIES",
    "REMAT_POLICIES",
    "CausalLM",
    "KVCache",
    "ModelConfig",
    "ModelFamily",
    "config_from_hf",
    "from_pretrained",
    "load_config",
    "qwen3_config",
    "random_checkpoint",
    "save_pretrained",
    "tensor_specs",
]
