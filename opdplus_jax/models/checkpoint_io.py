"""Load and export Hugging Face checkpoint folders (config.json + safetensors).

Loading reads `model.safetensors` or the shards listed in `model.safetensors.index.json`, one
tensor at a time (`safetensors.safe_open`), converts it to our layout and dtype, and places it
(with its `NamedSharding` when a mesh is given) before reading the next one, so the host never
holds more than one tensor beyond the model itself. Export writes the tensor names, shapes and
config keys that `transformers`' own `save_pretrained` writes.
"""

from __future__ import annotations

import dataclasses
import json
import os
from collections.abc import Callable, Iterator
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx
from jax.sharding import Mesh

from opdplus_jax import sharding as shd
from opdplus_jax.models.config import ModelConfig, load_config
from opdplus_jax.models.transformer import CausalLM

SAFETENSORS = "model.safetensors"
SAFETENSORS_INDEX = "model.safetensors.index.json"


@dataclasses.dataclass(frozen=True)
class TensorSpec:
    """One checkpoint tensor: its HF name and shape, our path, and the two layout conversions."""

    hf_name: str
    hf_shape: tuple[int, ...]
    path: tuple[Any, ...]
    to_ours: Callable[[np.ndarray], np.ndarray]
    to_hf: Callable[[np.ndarray], np.ndarray]


def _identity(x):
    return x


def tensor_specs(cfg: ModelConfig) -> list[TensorSpec]:
    """All tensors of a checkpoint of `cfg`, in transformers' order."""
    d, f, v = cfg.hidden_size, cfg.intermediate_size, cfg.vocab_size
    n, k, h = cfg.num_heads, cfg.num_kv_heads, cfg.head_dim

    def proj_in(heads):  # HF [heads*h, d] <-> ours [d, heads, h]
        return (lambda w: w.T.reshape(d, heads, h)), (lambda w: w.reshape(d, heads * h).T)

    def bias(heads):
        return (lambda b: b.reshape(heads, h)), (lambda b: b.reshape(heads * h))

    o_in = (lambda w: w.T.reshape(n, h, d), lambda w: w.reshape(n * h, d).T)
    transpose = (lambda w: w.T, lambda w: w.T)
    ident = (_identity, _identity)

    specs = [TensorSpec("model.embed_tokens.weight", (v, d), ("embed_tokens",), *ident)]
    for i in range(cfg.num_layers):
        pre, ours = f"model.layers.{i}.", ("layers", i)
        layer = [
            ("input_layernorm.weight", (d,), ("input_norm",), ident),
            ("self_attn.q_proj.weight", (n * h, d), ("attn", "q_proj"), proj_in(n)),
            ("self_attn.k_proj.weight", (k * h, d), ("attn", "k_proj"), proj_in(k)),
            ("self_attn.v_proj.weight", (k * h, d), ("attn", "v_proj"), proj_in(k)),
            ("self_attn.o_proj.weight", (d, n * h), ("attn", "o_proj"), o_in),
        ]
        if cfg.qkv_bias:
            layer += [
                ("self_attn.q_proj.bias", (n * h,), ("attn", "q_bias"), bias(n)),
                ("self_attn.k_proj.bias", (k * h,), ("attn", "k_bias"), bias(k)),
                ("self_attn.v_proj.bias", (k * h,), ("attn", "v_bias"), bias(k)),
            ]
        if cfg.o_bias:
            layer.append(("self_attn.o_proj.bias", (d,), ("attn", "o_bias"), ident))
        if cfg.qk_norm:
            layer += [
                ("self_attn.q_norm.weight", (h,), ("attn", "q_norm"), ident),
                ("self_attn.k_norm.weight", (h,), ("attn", "k_norm"), ident),
            ]
        layer += [
            ("mlp.gate_proj.weight", (f, d), ("mlp", "gate_proj"), transpose),
            ("mlp.up_proj.weight", (f, d), ("mlp", "up_proj"), transpose),
            ("mlp.down_proj.weight", (d, f), ("mlp", "down_proj"), transpose),
        ]
        if cfg.mlp_bias:
            layer += [
                ("mlp.gate_proj.bias", (f,), ("mlp", "gate_bias"), ident),
                ("mlp.up_proj.bias", (f,), ("mlp", "up_bias"), ident),
                ("mlp.down_proj.bias", (d,), ("mlp", "down_bias"), ident),
            ]
        layer.append(("post_attention_layernorm.weight", (d,), ("post_attention_norm",), ident))
        specs += [TensorSpec(pre + name, s, ours + p, *fns) for name, s, p, fns in layer]
    specs.append(TensorSpec("model.norm.weight", (d,), ("norm",), *ident))
    if not cfg.tie_word_embeddings:
        specs.append(TensorSpec("lm_head.weight", (v, d), ("lm_head",), *transpose))
    return specs


def _weight_files(folder: str) -> dict[str, str]:
    """Map tensor name -> safetensors file for a checkpoint folder."""
    from safetensors import safe_open

    index = os.path.join(folder, SAFETENSORS_INDEX)
    single = os.path.join(folder, SAFETENSORS)
    if os.path.isfile(index):
        try:
            with open(index, encoding="utf-8") as f:
                weight_map = json.load(f)["weight_map"]
        except (json.JSONDecodeError, KeyError) as e:
            raise ValueError(f"{index}: invalid safetensors index ({e!r})") from e
        return {name: os.path.join(folder, file) for name, file in weight_map.items()}
    if not os.path.isfile(single):
        raise FileNotFoundError(f"{folder}: no {SAFETENSORS} or {SAFETENSORS_INDEX} found")
    try:
        with safe_open(single, framework="numpy") as f:
            return dict.fromkeys(f.keys(), single)
    except Exception as e:
        raise ValueError(f"{single}: corrupt or truncated safetensors file ({e})") from e


def _read_tensors(files: dict[str, str], names: list[str]) -> Iterator[tuple[str, np.ndarray]]:
    """Yield (name, array) one at a time, opening each file once."""
    from safetensors import safe_open

    by_file: dict[str, list[str]] = {}
    for name in names:
        by_file.setdefault(files[name], []).append(name)
    for path, file_names in by_file.items():
        if not os.path.isfile(path):
            raise FileNotFoundError(
                f"{path}: safetensors shard missing (needed for {file_names[0]})"
            )
        try:
            handle = safe_open(path, framework="numpy")
        except Exception as e:
            raise ValueError(f"{path}: corrupt or truncated safetensors file ({e})") from e
        with handle as f:
            available = set(f.keys())
            for name in file_names:
                if name not in available:
                    raise KeyError(
                        f"{path}: tensor {name!r} listed in the index is not in the file"
                    )
                try:
                    array = f.get_tensor(name)
                except Exception as e:
                    raise ValueError(f"{path}: cannot read tensor {name!r} ({e})") from e
                yield name, array


def from_pretrained(
    path: str | os.PathLike,
    *,
    dtype: Any = jnp.float32,
    param_dtype: Any = None,
    mesh: Mesh | None = None,
    rules: shd.AxisRules = shd.LOGICAL_RULES,
    attention_chunk_size: int | None = 1024,
) -> CausalLM:
    """Load a Hugging Face checkpoint folder into a `CausalLM`.

    `dtype` is the activation dtype, `param_dtype` (default `dtype`) the stored weight dtype. With
    `mesh`, every weight is placed with the `NamedSharding` its logical axes map to (`rules`).
    `attention_chunk_size`: queries per attention chunk in the full forward (see `CausalLM`).
    Errors name the file and tensor (missing config.json or tensor, shape mismatch, corrupt file).
    """
    folder = os.fspath(path)
    cfg = load_config(folder)
    param_dtype = jnp.dtype(dtype if param_dtype is None else param_dtype)
    abstract = nnx.eval_shape(
        lambda: CausalLM(
            cfg,
            dtype=dtype,
            param_dtype=param_dtype,
            rngs=nnx.Rngs(0),
            mesh=mesh,
            rules=rules,
            attention_chunk_size=attention_chunk_size,
        )
    )
    graphdef, state = nnx.split(abstract)
    variables = dict(nnx.to_flat_state(state))
    specs = {s.hf_name: s for s in tensor_specs(cfg)}
    files = _weight_files(folder)
    missing = [name for name in specs if name not in files]
    if missing:
        index = os.path.join(folder, SAFETENSORS_INDEX)
        where = index if os.path.isfile(index) else os.path.join(folder, SAFETENSORS)
        raise KeyError(
            f"{where}: missing tensor(s) {missing[:5]}"
            + (f" and {len(missing) - 5} more" if len(missing) > 5 else "")
        )
    for name, array in _read_tensors(files, list(specs)):
        spec = specs[name]
        if tuple(array.shape) != spec.hf_shape:
            raise ValueError(
                f"{files[name]}: tensor {name!r} has shape {tuple(array.shape)}, but config.json "
                f"implies {spec.hf_shape}"
            )
        value = np.ascontiguousarray(spec.to_ours(array)).astype(param_dtype, copy=False)
        del array
        var = variables[spec.path]
        if mesh is not None:
            sharding = shd.logical_sharding(mesh, shd.logical_axes_of(var), value.shape, rules)
            # Each device receives only its block (also correct with several processes).
            placed = jax.make_array_from_callback(
                value.shape, sharding, lambda idx, v=value: v[idx]
            )
        else:
            placed = jax.device_put(value)
        del value
        var.set_value(placed)
    return nnx.merge(graphdef, nnx.from_flat_state(variables))


def _host(x: jax.Array) -> np.ndarray:
    if isinstance(x, jax.Array) and not x.is_fully_addressable:
        from jax.experimental import multihost_utils

        x = multihost_utils.process_allgather(x, tiled=True)
    return np.asarray(jax.device_get(x))


def save_pretrained(
    model: CausalLM, path: str | os.PathLike, *, max_shard_size: int = 5 * 2**30
) -> None:
    """Write a folder that `transformers` loads: `config.json` plus `model.safetensors` (or
    `model-0000i-of-0000n.safetensors` + index above `max_shard_size` bytes), in transformers'
    tensor names, layout and the parameter dtype. Tensors are gathered one at a time; with several
    processes every process must call this (for the gathers) and process 0 writes."""
    from safetensors.numpy import save_file

    folder = os.fspath(path)
    cfg = model.config
    state = dict(nnx.to_flat_state(nnx.state(model, nnx.Param)))
    writer = jax.process_index() == 0
    if writer:
        os.makedirs(folder, exist_ok=True)
    parts: list[list[str]] = [[]]  # tensor names per output file
    current: dict[str, np.ndarray] = {}
    size = total = 0

    def flush():
        if writer:
            tmp = os.path.join(folder, f".part-{len(parts) - 1}.tmp")
            save_file(current, tmp, metadata={"format": "pt"})
        parts[-1] = list(current)
        parts.append([])
        current.clear()

    for spec in tensor_specs(cfg):
        array = np.ascontiguousarray(spec.to_hf(_host(state[spec.path].get_value())))
        if current and size + array.nbytes > max_shard_size:
            flush()
            size = 0
        current[spec.hf_name] = array
        size += array.nbytes
        total += array.nbytes
    flush()
    parts.pop()
    if not writer:
        return
    n = len(parts)
    names = (
        [SAFETENSORS]
        if n == 1
        else [f"model-{i:05d}-of-{n:05d}.safetensors" for i in range(1, n + 1)]
    )
    for i, name in enumerate(names):
        os.replace(os.path.join(folder, f".part-{i}.tmp"), os.path.join(folder, name))
    index = os.path.join(folder, SAFETENSORS_INDEX)
    if n > 1:
        weight_map = {t: names[i] for i, part in enumerate(parts) for t in part}
        with open(index, "w", encoding="utf-8") as f:
            json.dump({"metadata": {"total_size": total}, "weight_map": weight_map}, f, indent=2)
    elif os.path.exists(index):
        os.remove(index)
    _save_config(cfg, model.param_dtype, folder)


def _save_config(cfg: ModelConfig, param_dtype: Any, folder: str) -> None:
    """config.json through transformers' own config class (same keys as its save_pretrained)."""
    import transformers

    d = cfg.hf_config_dict()
    for key in ("transformers_version", "_name_or_path", "torch_dtype"):
        d.pop(key, None)
    hf = transformers.CONFIG_MAPPING[cfg.model_type].from_dict(d)
    hf.architectures = [cfg.family.architecture]
    hf.dtype = jnp.dtype(param_dtype).name
    hf.save_pretrained(folder)
