"""Supported model families: one `ModelFamily` row each, in the `FAMILIES` registry.

Every family runs on the same network (`transformer.CausalLM`: pre-norm decoder, RoPE, grouped-
query attention, SwiGLU MLP) with the same checkpoint tensor names (`checkpoint_io`). A row says
what differs between families: the Hugging Face architecture class, and which optional tensors
(q/k/v and o biases, MLP biases, q/k RMSNorm) a checkpoint has, each either fixed for the family
or read from a `config.json` key. Adding a family whose checkpoints fit that network is one row:

    FAMILIES.register(ModelFamily("my_family", "MyFamilyForCausalLM", qkv_bias="attention_bias"))

(the `model_type` must also be known to `transformers`, which parses and writes config.json).
"""

from __future__ import annotations

import dataclasses
from typing import TYPE_CHECKING, Any

from opdplus_jax.registry import Registry

if TYPE_CHECKING:
    from opdplus_jax.models.config import ModelConfig

__all__ = ["FAMILIES", "SWITCHES", "ModelFamily"]

# A family's setting of one switch: a constant, or the config.json key it is read from (a missing
# key reads as False).
Switch = bool | str
# The switches of a row, named as the `ModelConfig` fields they set.
SWITCHES = ("qkv_bias", "o_bias", "mlp_bias", "qk_norm")


@dataclasses.dataclass(frozen=True)
class ModelFamily:
    """What one `model_type` decides about the network; see the module docstring.

    Attributes:
      model_type: config.json's ``model_type`` (also the `transformers.CONFIG_MAPPING` key).
      architecture: the Hugging Face model class in config.json's ``architectures``.
      qkv_bias: biases on the q, k and v projections.
      o_bias: a bias on the attention output projection.
      mlp_bias: biases on the gate, up and down projections.
      qk_norm: RMSNorm of each query and key head before RoPE.
    """

    model_type: str
    architecture: str
    qkv_bias: Switch = False
    o_bias: Switch = False
    mlp_bias: Switch = False
    qk_norm: Switch = False

    @property
    def name(self) -> str:
        """The registry name: `model_type`."""
        return self.model_type

    def switches(self, hf: Any) -> dict[str, bool]:
        """The `SWITCHES` values of a checkpoint whose config (attributes) is `hf`."""
        values: dict[str, bool] = {}
        for field in SWITCHES:
            setting = getattr(self, field)
            values[field] = (
                bool(getattr(hf, setting, False)) if isinstance(setting, str) else setting
            )
        return values

    def config_keys(self, cfg: ModelConfig) -> dict[str, bool]:
        """The config.json keys this family reads its switches from, with `cfg`'s values.

        When two switches share a key, the first in `SWITCHES` gives its value.
        """
        keys: dict[str, bool] = {}
        for field in SWITCHES:
            setting = getattr(self, field)
            if isinstance(setting, str):
                keys.setdefault(setting, getattr(cfg, field))
        return keys


FAMILIES: Registry[ModelFamily] = Registry("model_type")

FAMILIES.register(
    ModelFamily(
        "qwen3",
        "Qwen3ForCausalLM",
        qkv_bias="attention_bias",
        o_bias="attention_bias",
        qk_norm=True,
    )
)
FAMILIES.register(ModelFamily("qwen2", "Qwen2ForCausalLM", qkv_bias=True))
FAMILIES.register(
    ModelFamily(
        "llama",
        "LlamaForCausalLM",
        qkv_bias="attention_bias",
        o_bias="attention_bias",
        mlp_bias="mlp_bias",
    )
)
