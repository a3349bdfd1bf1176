"""Model configuration: a small frozen dataclass built from a Hugging Face `config.json`.

`ModelConfig` is hashable (it lives in the static part of an NNX graphdef) and describes only the
network. How the network is laid out on devices is a separate concern (`opdplus_jax.sharding`).

Supported `model_type`s are the rows of `families.FAMILIES`: `qwen3` (q/k RMSNorm), `qwen2`
(q/k/v biases), `llama` (Llama 2/3.x, including `rope_type="llama3"`). `qwen3_moe` (mixture of
experts) is planned and raises `NotImplementedError`.
"""

from __future__ import annotations

import dataclasses
import json
import math
import numbers
import os
from typing import Any

from opdplus_jax.models.families import FAMILIES, ModelFamily

PLANNED_MODEL_TYPES = {"qwen3_moe": "Qwen3-MoE (mixture-of-experts)"}
SUPPORTED_ROPE_TYPES = ("default", "linear", "llama3", "yarn")
_REQUIRED_KEYS = (
    "vocab_size",
    "hidden_size",
    "intermediate_size",
    "num_hidden_layers",
    "num_attention_heads",
    "rms_norm_eps",
)
# Sizes that must be positive integers when present (config.json key -> required).
_SIZE_KEYS = {
    "vocab_size": True,
    "hidden_size": True,
    "intermediate_size": True,
    "num_hidden_layers": True,
    "num_attention_heads": True,
    "num_key_value_heads": False,
    "head_dim": False,
    "max_position_embeddings": False,
}

TokenIds = int | tuple[int, ...] | None


@dataclasses.dataclass(frozen=True)
class ModelConfig:
    """Decoder-only transformer hyper-parameters (names follow the rest of the codebase).

    `vocab_size` is the embedding-matrix size, which may exceed the tokenizer's vocabulary (Hugging
    Face checkpoints pad it); see `opdplus_jax.tokenizer.Tokenizer.vocab_size`.
    """

    model_type: str
    vocab_size: int
    hidden_size: int
    intermediate_size: int
    num_layers: int
    num_heads: int
    num_kv_heads: int
    head_dim: int
    rms_norm_eps: float = 1e-6
    rope_theta: float = 10000.0
    rope_type: str = "default"
    # Extra rope parameters (factor, low_freq_factor, ...), as sorted (key, value) pairs.
    rope_params: tuple[tuple[str, Any], ...] = ()
    max_position_embeddings: int = 32768
    tie_word_embeddings: bool = False
    qkv_bias: bool = False
    o_bias: bool = False
    mlp_bias: bool = False
    qk_norm: bool = False
    bos_token_id: TokenIds = None
    eos_token_id: TokenIds = None
    pad_token_id: TokenIds = None
    # The original config.json (as JSON text), re-emitted on export so that every key survives.
    hf_config_json: str = dataclasses.field(default="", compare=False, repr=False)
    # The folder this config was read from (absolute; "" if built in code). `save_pretrained`
    # refuses to export into it, so a trained model never overwrites the checkpoint it came from.
    source_folder: str = dataclasses.field(default="", compare=False, repr=False)

    @property
    def family(self) -> ModelFamily:
        """The `FAMILIES` row of `model_type`."""
        return FAMILIES.get(self.model_type)

    @property
    def num_groups(self) -> int:
        """Query heads per key/value head (GQA group size)."""
        return self.num_heads // self.num_kv_heads

    @property
    def eos_token_ids(self) -> tuple[int, ...]:
        """All end-of-sequence ids as a tuple (config.json allows an int or a list)."""
        if self.eos_token_id is None:
            return ()
        if isinstance(self.eos_token_id, int):
            return (self.eos_token_id,)
        return tuple(self.eos_token_id)

    def rope_param(self, key: str, default: Any = None) -> Any:
        return dict(self.rope_params).get(key, default)

    def num_params(self) -> int:
        """Parameter count (embedding counted once when tied)."""
        d, f, v = self.hidden_size, self.intermediate_size, self.vocab_size
        q, kv = self.num_heads * self.head_dim, self.num_kv_heads * self.head_dim
        attn = d * q + 2 * d * kv + q * d
        attn += (q + 2 * kv) * self.qkv_bias + d * self.o_bias + 2 * self.head_dim * self.qk_norm
        mlp = 3 * d * f + (2 * f + d) * self.mlp_bias
        layer = attn + mlp + 2 * d
        return v * d * (1 if self.tie_word_embeddings else 2) + self.num_layers * layer + d

    def hf_config_dict(self) -> dict[str, Any]:
        """The config.json dictionary for export (the loaded one if any, else rebuilt)."""
        if self.hf_config_json:
            return json.loads(self.hf_config_json)
        rope = {
            "rope_type": self.rope_type,
            "rope_theta": self.rope_theta,
            **dict(self.rope_params),
        }
        out: dict[str, Any] = {
            "architectures": [self.family.architecture],
            "model_type": self.model_type,
            "vocab_size": self.vocab_size,
            "hidden_size": self.hidden_size,
            "intermediate_size": self.intermediate_size,
            "num_hidden_layers": self.num_layers,
            "num_attention_heads": self.num_heads,
            "num_key_value_heads": self.num_kv_heads,
            "head_dim": self.head_dim,
            "hidden_act": "silu",
            "rms_norm_eps": self.rms_norm_eps,
            "max_position_embeddings": self.max_position_embeddings,
            "rope_parameters": rope,
            "tie_word_embeddings": self.tie_word_embeddings,
            "bos_token_id": self.bos_token_id,
            "eos_token_id": list(self.eos_token_id)
            if isinstance(self.eos_token_id, tuple)
            else self.eos_token_id,
            "pad_token_id": self.pad_token_id,
        }
        out.update(self.family.config_keys(self))
        return out


def _positive_int(value: Any, key: str, where: str) -> int:
    """`value` as an int if it is a positive integer (not a bool, float or string), else
    `ValueError` naming `where` and `key`."""
    if isinstance(value, bool) or not isinstance(value, numbers.Integral) or value < 1:
        kind = f" (a JSON {type(value).__name__})" if isinstance(value, float | str) else ""
        raise ValueError(f"{where}: {key} must be a positive integer, got {value!r}{kind}")
    return int(value)


def _positive_float(value: Any, key: str, where: str) -> float:
    if isinstance(value, bool) or not isinstance(value, numbers.Real):
        raise ValueError(f"{where}: {key} must be a positive number, got {value!r}")
    if not (math.isfinite(value) and value > 0):
        raise ValueError(f"{where}: {key} must be a positive finite number, got {value!r}")
    return float(value)


def _ids(value: Any) -> TokenIds:
    if value is None or isinstance(value, int):
        return value
    return tuple(int(v) for v in value)


# Rope parameters that must be numbers > 0 (other numeric ones, e.g. yarn's mscale, must be
# finite; flags such as yarn's truncate are left to the rope code).
POSITIVE_ROPE_PARAMETERS = (
    "factor",
    "low_freq_factor",
    "high_freq_factor",
    "original_max_position_embeddings",
    "partial_rotary_factor",
)


def _rope_number(value: Any, key: str, where: str, *, positive: bool = True) -> float:
    """`value` as a float; ValueError naming the file and key unless it is a finite number
    (> 0 when `positive`): a bad value would give inf/NaN rotary frequencies, a silently
    different model."""
    ok = isinstance(value, int | float) and not isinstance(value, bool) and math.isfinite(value)
    if not ok or (positive and value <= 0):
        want = "a finite number > 0" if positive else "a finite number"
        raise ValueError(f"{where}: rope parameter {key!r} must be {want}; got {value!r}")
    return float(value)


def _rope(hf: Any, where: str) -> tuple[float, str, tuple[tuple[str, Any], ...]]:
    params = getattr(hf, "rope_parameters", None)
    if params is None:  # older transformers: rope_theta + rope_scaling
        params = dict(getattr(hf, "rope_scaling", None) or {})
        params.setdefault("rope_theta", getattr(hf, "rope_theta", 10000.0))
    params = dict(params)
    if "rope_type" not in params:
        params["rope_type"] = params.pop("type", "default")
    if any(isinstance(v, dict) for v in params.values()):
        raise NotImplementedError(f"{where}: per-layer-type rope parameters are not supported")
    rope_type = params.pop("rope_type")
    if rope_type not in SUPPORTED_ROPE_TYPES:
        raise NotImplementedError(
            f"{where}: rope_type {rope_type!r} is not supported (supported: {SUPPORTED_ROPE_TYPES})"
        )
    theta = _rope_number(
        params.pop("rope_theta", getattr(hf, "rope_theta", 10000.0)), "rope_theta", where
    )
    for key, value in params.items():
        numeric = isinstance(value, int | float) and not isinstance(value, bool)
        if (key in POSITIVE_ROPE_PARAMETERS and value is not None) or numeric:
            _rope_number(value, key, where, positive=key in POSITIVE_ROPE_PARAMETERS)
    if float(params.get("partial_rotary_factor", 1.0)) != 1.0:
        raise NotImplementedError(f"{where}: partial_rotary_factor != 1 is not supported")
    if rope_type == "llama3":
        for key in (
            "factor",
            "low_freq_factor",
            "high_freq_factor",
            "original_max_position_embeddings",
        ):
            if key not in params:
                raise ValueError(f"{where}: rope_type 'llama3' needs rope parameter {key!r}")
    if rope_type == "linear" and params.get("factor") is None:
        raise ValueError(f"{where}: rope_type 'linear' needs rope parameter 'factor'")
    extra = tuple(sorted((k, v) for k, v in params.items() if v is not None))
    return theta, rope_type, extra


def config_from_hf(hf: Any, where: str = "config") -> ModelConfig:
    """Build a `ModelConfig` from a `transformers` config object (or anything with its attributes).

    Raises `NotImplementedError` for unsupported model types/features and `ValueError` for missing
    keys or inconsistent sizes; messages start with `where` (normally the config.json path).
    """
    model_type = getattr(hf, "model_type", None)
    if model_type in PLANNED_MODEL_TYPES:
        raise NotImplementedError(
            f"{where}: model_type {model_type!r} ({PLANNED_MODEL_TYPES[model_type]}) is planned "
            "but not implemented yet"
        )
    try:
        family = FAMILIES.get(model_type)
    except ValueError as e:  # the registry's message, with the valid names
        raise NotImplementedError(f"{where}: {e}") from e
    archs = getattr(hf, "architectures", None) or []
    expected = family.architecture
    if archs and expected not in archs:
        raise NotImplementedError(
            f"{where}: unsupported architectures {archs} for model_type {model_type!r} "
            f"(supported: {expected!r})"
        )
    missing = [k for k in _REQUIRED_KEYS if getattr(hf, k, None) is None]
    if missing:
        raise ValueError(f"{where}: missing required config key(s) {missing}")
    if getattr(hf, "hidden_act", "silu") not in ("silu", "swish"):
        raise NotImplementedError(f"{where}: hidden_act {hf.hidden_act!r} is not supported (silu)")
    if getattr(hf, "use_sliding_window", False):
        raise NotImplementedError(f"{where}: sliding-window attention is not supported")
    layer_types = getattr(hf, "layer_types", None) or []
    if any(t != "full_attention" for t in layer_types):
        raise NotImplementedError(f"{where}: only full_attention layers are supported")
    sizes = {}
    for key, required in _SIZE_KEYS.items():
        value = getattr(hf, key, None)
        if value is not None or required:
            sizes[key] = _positive_int(value, key, where)
    num_heads = sizes["num_attention_heads"]
    num_kv_heads = sizes.get("num_key_value_heads", num_heads)
    head_dim = sizes.get("head_dim") or sizes["hidden_size"] // num_heads
    if head_dim < 1:
        raise ValueError(
            f"{where}: hidden_size={sizes['hidden_size']} is smaller than "
            f"num_attention_heads={num_heads} (no head_dim given)"
        )
    rms_norm_eps = _positive_float(hf.rms_norm_eps, "rms_norm_eps", where)
    if num_heads % num_kv_heads:
        raise ValueError(
            f"{where}: num_attention_heads={num_heads} is not a multiple of {num_kv_heads=}"
        )
    theta, rope_type, rope_params = _rope(hf, where)
    hf_json = hf.to_json_string(use_diff=False) if hasattr(hf, "to_json_string") else ""
    return ModelConfig(
        model_type=model_type,
        vocab_size=sizes["vocab_size"],
        hidden_size=sizes["hidden_size"],
        intermediate_size=sizes["intermediate_size"],
        num_layers=sizes["num_hidden_layers"],
        num_heads=num_heads,
        num_kv_heads=num_kv_heads,
        head_dim=head_dim,
        rms_norm_eps=rms_norm_eps,
        rope_theta=theta,
        rope_type=rope_type,
        rope_params=rope_params,
        max_position_embeddings=sizes.get("max_position_embeddings", 32768),
        tie_word_embeddings=bool(getattr(hf, "tie_word_embeddings", False)),
        **family.switches(hf),
        bos_token_id=_ids(getattr(hf, "bos_token_id", None)),
        eos_token_id=_ids(getattr(hf, "eos_token_id", None)),
        pad_token_id=_ids(getattr(hf, "pad_token_id", None)),
        hf_config_json=hf_json,
    )


def read_json_object(path: str | os.PathLike) -> dict[str, Any]:
    """The JSON object in the file at `path`; ValueError naming the file if it is not valid
    JSON (or not UTF-8) or holds anything but an object."""
    try:
        with open(path, encoding="utf-8") as f:
            raw = json.load(f)
    except (ValueError, RecursionError) as e:  # bad JSON or UTF-8, huge integers, deep nesting
        raise ValueError(f"{os.fspath(path)}: invalid JSON ({e})") from e
    if not isinstance(raw, dict):
        raise ValueError(
            f"{os.fspath(path)}: expected a JSON object, got a JSON {type(raw).__name__}"
        )
    return raw


def read_config_json(folder: str | os.PathLike) -> dict[str, Any]:
    """`folder/config.json` as a dict, checked on the raw file (before `transformers` fills in
    defaults): a JSON object with a supported `model_type`, the required keys, positive integer
    sizes and a supported rope type. Errors name the file and the key."""
    path = os.path.join(os.fspath(folder), "config.json")
    if not os.path.isfile(path):
        raise FileNotFoundError(
            f"{path}: missing config.json (not a Hugging Face checkpoint folder)"
        )
    raw = read_json_object(path)
    model_type = raw.get("model_type")
    if model_type is None:
        raise ValueError(f"{path}: missing required config key 'model_type'")
    if not isinstance(model_type, str):
        raise ValueError(f"{path}: model_type must be a string; got {model_type!r}")
    architectures = raw.get("architectures")
    if architectures is not None and not (
        isinstance(architectures, list) and all(isinstance(a, str) for a in architectures)
    ):
        raise ValueError(f"{path}: architectures must be a list of strings; got {architectures!r}")
    if model_type not in FAMILIES:
        config_from_hf(_Namespace(raw), where=path)  # raises the model_type error
    missing = [k for k in _REQUIRED_KEYS if k not in raw]
    if missing:  # checked on the raw file: AutoConfig would silently fill in defaults
        raise ValueError(f"{path}: missing required config key(s) {missing}")
    for key, required in _SIZE_KEYS.items():
        if raw.get(key) is not None or required:
            _positive_int(raw.get(key), key, path)
    _positive_float(raw["rms_norm_eps"], "rms_norm_eps", path)
    rope = raw.get("rope_parameters") or raw.get("rope_scaling") or {}
    rope_type = (
        rope.get("rope_type", rope.get("type", "default")) if isinstance(rope, dict) else None
    )
    if rope_type is not None and rope_type not in SUPPORTED_ROPE_TYPES:
        raise NotImplementedError(
            f"{path}: rope_type {rope_type!r} is not supported (supported: {SUPPORTED_ROPE_TYPES})"
        )
    return raw


def load_config(folder: str | os.PathLike) -> ModelConfig:
    """Read `folder/config.json` with `transformers.AutoConfig` (local files only, never running
    code from the folder), after the raw-file checks of `read_config_json`. The result records
    the folder (`source_folder`)."""
    import transformers  # heavy import, deferred

    folder = os.fspath(folder)
    path = os.path.join(folder, "config.json")
    read_config_json(folder)
    try:
        hf = transformers.AutoConfig.from_pretrained(
            folder, local_files_only=True, trust_remote_code=False
        )
    except Exception as e:
        raise ValueError(f"{path}: transformers cannot parse this config ({e})") from e
    cfg = config_from_hf(hf, where=path)
    return dataclasses.replace(cfg, source_folder=os.path.abspath(folder))


class _Namespace:
    def __init__(self, d: dict[str, Any]):
        self.__dict__.update(d)
