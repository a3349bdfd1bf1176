"""Load and export Hugging Face checkpoint folders (config.json + safetensors).

Loading reads `model.safetensors` or the shards listed in `model.safetensors.index.json`, one
tensor at a time (`safetensors.safe_open`), converts it to our layout and dtype, and places one
parameter at a time (with its `NamedSharding` when a mesh is given). The model's layers are
stacked (`transformer.DecoderLayer`: one [num_layers, ...] array per weight), so a layer weight
is assembled from the checkpoint's per-layer tensors `model.layers.{i}.*`: with a mesh, each
process fills only the blocks its own devices hold (and reads only the layers they hold), so
the host never holds more than one parameter's local blocks and one tensor beyond the model
itself; without a mesh, one stacked parameter. Before the model is built, config.json is
checked against the checkpoint's tensor index (names and shapes from the safetensors headers):
missing, unexpected or misshapen tensors are errors, so a config that does not describe the weights
never loads as a different model. Shard files must lie inside the folder.

Export writes the tensor names, shapes and config keys that `transformers`' own `save_pretrained`
writes, unstacking the layer weights (one layer's slice is gathered to the host at a time).
Every file is written to a new temporary file in the folder and renamed into place (never
through a symlink), shards of an earlier export that this one does not write are removed, and the
folder the model was loaded from is refused.
"""

from __future__ import annotations

import contextlib
import dataclasses
import json
import os
import re
import secrets
import shutil
import tempfile
from collections.abc import Callable, Iterable
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx
from jax.sharding import Mesh

from opdplus_jax import sharding as shd
from opdplus_jax.models.config import ModelConfig, load_config, read_config_json
from opdplus_jax.models.transformer import CausalLM

SAFETENSORS = "model.safetensors"
SAFETENSORS_INDEX = "model.safetensors.index.json"
SHARD_PATTERN = re.compile(r"model-\d{5}-of-\d{5}\.safetensors")  # the shards export writes
_LAYER = re.compile(r"model\.layers\.(\d+)\.")
# Buffers that old checkpoints saved but that are derived, not parameters (transformers skips them).
_IGNORED = re.compile(r"model\.layers\.\d+\.self_attn\.rotary_emb\.inv_freq")
_SHOWN = 5  # tensor names quoted in an error message


@dataclasses.dataclass(frozen=True)
class TensorSpec:
    """One checkpoint tensor: its HF name and shape, our parameter's path (in
    `nnx.to_flat_state(nnx.state(model, nnx.Param))`), the two layout conversions of one tensor,
    and `layer`: for a tensor of layer i (`model.layers.{i}.*`), i, the index of this tensor in
    our stacked [num_layers, ...] parameter at `path`; None for the others (embedding, final
    norm, lm_head), which are the whole parameter."""

    hf_name: str
    hf_shape: tuple[int, ...]
    path: tuple[Any, ...]
    to_ours: Callable[[np.ndarray], np.ndarray]
    to_hf: Callable[[np.ndarray], np.ndarray]
    layer: int | None = None

    def select(self, param: Any) -> Any:
        """This tensor's part (in our layout) of the parameter at `path`: `param[layer]` for a
        layer tensor, else `param` itself."""
        return param if self.layer is None else param[self.layer]


def _identity(x):
    return x


def tensor_specs(cfg: ModelConfig) -> list[TensorSpec]:
    """All tensors of a checkpoint of `cfg`, in transformers' order (layer by layer)."""
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
        pre = f"model.layers.{i}."
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
        specs += [TensorSpec(pre + name, s, ("layers", *p), *fns, i) for name, s, p, fns in layer]
    specs.append(TensorSpec("model.norm.weight", (d,), ("norm",), *ident))
    if not cfg.tie_word_embeddings:
        specs.append(TensorSpec("lm_head.weight", (v, d), ("lm_head",), *transpose))
    return specs


def _listed(names: list[str]) -> str:
    """The first few names, and how many more."""
    more = len(names) - _SHOWN
    return f"{names[:_SHOWN]}" + (f" and {more} more" if more > 0 else "")


def _natural(name: str) -> tuple:
    """Sort key that puts model.layers.2 before model.layers.10."""
    return tuple(int(p) if p.isdigit() else p for p in re.split(r"(\d+)", name))


def _shard_path(index: str, folder: str, name: str, file: Any) -> str:
    """The path of the shard `file` that the index lists for tensor `name`, refusing anything
    that is not a relative path inside the folder."""
    if not isinstance(file, str) or not file or "\0" in file:
        raise ValueError(
            f"{index}: invalid safetensors index: weight_map[{name!r}] must be a file name, "
            f"got {file!r}"
        )
    norm = os.path.normpath(file)
    if os.path.isabs(file) or norm in (os.curdir, os.pardir) or norm.startswith(os.pardir + os.sep):
        raise ValueError(
            f"{index}: weight_map[{name!r}] = {file!r} points outside the model folder; "
            "shard files must be relative paths inside the folder"
        )
    return os.path.join(folder, norm)


def _read_index(index: str, folder: str) -> dict[str, str]:
    """Tensor name -> shard path from `model.safetensors.index.json`."""
    try:
        with open(index, encoding="utf-8") as f:
            data = json.load(f)
    except (ValueError, RecursionError) as e:  # bad JSON or UTF-8, huge integers, deep nesting
        raise ValueError(f"{index}: invalid safetensors index: not valid JSON ({e})") from e
    if not isinstance(data, dict) or not isinstance(data.get("weight_map"), dict):
        raise ValueError(
            f"{index}: invalid safetensors index: expected a JSON object whose 'weight_map' is an "
            "object of tensor name -> shard file"
        )
    return {name: _shard_path(index, folder, name, f) for name, f in data["weight_map"].items()}


def _open_safetensors(path: str):
    from safetensors import safe_open

    try:
        return safe_open(path, framework="numpy")
    except Exception as e:
        raise ValueError(f"{path}: corrupt or truncated safetensors file ({e})") from e


def _header_shapes(path: str, names: list[str] | None) -> dict[str, tuple[int, ...]]:
    """Tensor name -> shape from one file's header, for `names` (None: every tensor in it)."""
    if not os.path.isfile(path):
        needed = f" (needed for {names[0]})" if names else ""
        raise FileNotFoundError(f"{path}: safetensors shard missing{needed}")
    with _open_safetensors(path) as f:
        available = set(f.keys())
        for name in names or ():
            if name not in available:
                raise KeyError(f"{path}: tensor {name!r} listed in the index is not in the file")
        try:
            return {n: tuple(f.get_slice(n).get_shape()) for n in sorted(available)}
        except Exception as e:
            raise ValueError(f"{path}: corrupt safetensors header ({e})") from e


def _tensor_index(folder: str) -> tuple[str, dict[str, str], dict[str, tuple[int, ...]]]:
    """What the checkpoint holds, from the safetensors headers only (no tensor data is read):
    (the index file or model.safetensors, tensor name -> file, tensor name -> shape). With an
    index, the tensors are those its weight_map lists."""
    index = os.path.join(folder, SAFETENSORS_INDEX)
    single = os.path.join(folder, SAFETENSORS)
    if os.path.isfile(index):
        files = _read_index(index, folder)
        by_file: dict[str, list[str]] = {}
        for name, path in files.items():
            by_file.setdefault(path, []).append(name)
        shapes = {}
        for path, names in by_file.items():
            in_file = _header_shapes(path, names)
            shapes.update((n, in_file[n]) for n in names)
        return index, files, shapes
    if os.path.isfile(single):
        shapes = _header_shapes(single, None)
        return single, dict.fromkeys(shapes, single), shapes
    raise FileNotFoundError(f"{folder}: no {SAFETENSORS} or {SAFETENSORS_INDEX} found")


def _unexpected_error(folder: str, unexpected: list[str], cause: str) -> ValueError:
    unexpected = sorted(unexpected, key=_natural)
    return ValueError(
        f"{folder}: {len(unexpected)} unexpected tensor(s) in the checkpoint that config.json does "
        f"not describe: {_listed(unexpected)}; {cause}. Refusing to load a different model than "
        "the checkpoint holds"
    )


def _check_layer_count(num_layers: int, folder: str, where: str, names: Iterable[str]) -> None:
    """config.json's `num_hidden_layers` against the layers in the weights, before anything of
    size `num_layers` is built (a config with 10^5 layers over 2 fails here, at once)."""
    layers: dict[int, list[str]] = {}
    for name in names:
        m = _LAYER.match(name)
        if m and not _IGNORED.fullmatch(name):
            layers.setdefault(int(m.group(1)), []).append(name)
    have = max(layers) + 1 if layers else 0
    if num_layers == have:
        return
    cause = f"config.json says {num_layers} layers but the weights have {have}"
    if num_layers < have:
        extra = [n for i, group in layers.items() if i >= num_layers for n in group]
        raise _unexpected_error(folder, extra, cause)
    if not have:
        raise KeyError(f"{where}: missing the tensors of all layers ({cause})")
    # The layers past the weights' last one would hold the same tensors as that one.
    last = f"model.layers.{have - 1}."
    per_layer = sorted((n[len(last) :] for n in layers[have - 1]), key=_natural)
    first = [f"model.layers.{have}.{n}" for n in per_layer[:_SHOWN]]
    more = len(per_layer) * (num_layers - have) - len(first)
    raise KeyError(
        f"{where}: missing tensor(s) {first}"
        + (f" and {more} more" if more > 0 else "")
        + f" ({cause})"
    )


def _check_tensors(
    cfg: ModelConfig,
    folder: str,
    where: str,
    files: dict[str, str],
    shapes: dict[str, tuple[int, ...]],
) -> list[TensorSpec]:
    """Every tensor of `cfg` present with its shape, and no other; returns the specs."""
    specs = tensor_specs(cfg)
    missing = [s.hf_name for s in specs if s.hf_name not in shapes]
    if missing:
        hint = ""
        if "lm_head.weight" in missing and not cfg.tie_word_embeddings:
            hint = (
                " (tie_word_embeddings is false but lm_head.weight is absent: does the output "
                "layer share the embedding?)"
            )
        raise KeyError(f"{where}: missing tensor(s) {_listed(missing)}{hint}")
    wanted = {s.hf_name for s in specs}
    unexpected = [n for n in files if n not in wanted and not _IGNORED.fullmatch(n)]
    if unexpected:
        if cfg.tie_word_embeddings and "lm_head.weight" in unexpected:
            cause = "tie_word_embeddings is true but lm_head.weight is present"
        else:
            cause = (
                f"model_type {cfg.model_type!r} with these settings (biases, q/k norms, tied "
                "embeddings) has no such tensors"
            )
        raise _unexpected_error(folder, unexpected, cause)
    for spec in specs:
        shape = shapes[spec.hf_name]
        if shape != spec.hf_shape:
            raise ValueError(
                f"{files[spec.hf_name]}: tensor {spec.hf_name!r} has shape {shape}, but "
                f"config.json implies {spec.hf_shape}"
            )
    return specs


class _Reader:
    """Reads checkpoint tensors by name, opening each file once (all stay open until the `with`
    block ends), with the file and tensor named in every error."""

    def __init__(self, files: dict[str, str]):
        self.files = files
        self.handles: dict[str, tuple[Any, set[str]]] = {}
        self.stack = contextlib.ExitStack()

    def __enter__(self) -> _Reader:
        return self

    def __exit__(self, *exc: Any) -> None:
        self.stack.close()

    def read(self, spec: TensorSpec) -> np.ndarray:
        """The tensor of `spec` (its shape checked), converted to our layout."""
        name = spec.hf_name
        path = self.files[name]
        if path not in self.handles:
            if not os.path.isfile(path):
                raise FileNotFoundError(f"{path}: safetensors shard missing (needed for {name})")
            f = self.stack.enter_context(_open_safetensors(path))
            self.handles[path] = (f, set(f.keys()))
        f, available = self.handles[path]
        if name not in available:
            raise KeyError(f"{path}: tensor {name!r} listed in the index is not in the file")
        try:
            array = f.get_tensor(name)
        except Exception as e:
            raise ValueError(f"{path}: cannot read tensor {name!r} ({e})") from e
        if tuple(array.shape) != spec.hf_shape:  # the header said otherwise: a changed file
            raise ValueError(
                f"{path}: tensor {name!r} has shape {tuple(array.shape)}, but config.json "
                f"implies {spec.hf_shape}"
            )
        return np.ascontiguousarray(spec.to_ours(array))


def _block_key(index: tuple[slice, ...], shape: tuple[int, ...]) -> tuple[tuple[int, int], ...]:
    """A device's block of an array, as (start, stop) per dimension."""
    index = tuple(index) + (slice(None),) * (len(shape) - len(index))
    return tuple(s.indices(n)[:2] for s, n in zip(index, shape, strict=True))


def _place(
    group: list[TensorSpec], shape: tuple[int, ...], dtype: Any, sharding: Any, reader: _Reader
) -> jax.Array:
    """Our parameter of `shape` from its checkpoint tensors: one tensor (`group[0].layer` is
    None), or one per layer of a stacked parameter (`group[i].layer == i`). Placed with
    `sharding`, or on the default device when it is None.

    With a sharding, every distinct block the process's devices hold is filled on the host, layer
    by layer, and handed to `make_array_from_callback`: a process reads only the layers its
    devices hold and keeps only its own blocks."""
    stacked = group[0].layer is not None
    if sharding is None:
        if not stacked:
            return jax.device_put(reader.read(group[0]).astype(dtype, copy=False))
        host = np.empty(shape, dtype)
        for spec in group:
            host[spec.layer] = reader.read(spec)
        return jax.device_put(host)
    if not stacked:
        value = reader.read(group[0]).astype(dtype, copy=False)
        # Each device receives only its block (also correct with several processes).
        return jax.make_array_from_callback(shape, sharding, lambda idx: value[idx])
    keys = {
        _block_key(idx, shape) for idx in sharding.addressable_devices_indices_map(shape).values()
    }
    blocks = {key: np.empty([stop - start for start, stop in key], dtype) for key in keys}
    for spec in group:
        holders = [key for key in blocks if key[0][0] <= spec.layer < key[0][1]]
        if not holders:
            continue  # no device of this process holds this layer
        tensor = reader.read(spec)
        for key in holders:
            rest = tuple(slice(start, stop) for start, stop in key[1:])
            blocks[key][spec.layer - key[0][0]] = tensor[rest]
        del tensor
    return jax.make_array_from_callback(shape, sharding, lambda idx: blocks[_block_key(idx, shape)])


def from_pretrained(
    path: str | os.PathLike,
    *,
    dtype: Any = jnp.float32,
    param_dtype: Any = None,
    mesh: Mesh | None = None,
    rules: shd.AxisRules = shd.LOGICAL_RULES,
    attention_chunk_size: int | None = 1024,
    remat: str | None = None,
) -> CausalLM:
    """Load a Hugging Face checkpoint folder into a `CausalLM`.

    `dtype` is the activation dtype, `param_dtype` (default `dtype`) the stored weight dtype. With
    `mesh`, every weight is placed with the `NamedSharding` its logical axes map to (`rules`).
    `attention_chunk_size`: queries per attention chunk in the full forward (see `CausalLM`).
    `remat`: the layers' rematerialisation policy in the full forward, None, "full", "save_dots"
    or "offload" (see `transformer.remat_policy`); checked before any tensor is read.
    Errors name the file and tensor (missing config.json or tensor, tensors config.json does not
    describe, shape mismatch, corrupt file, shard outside the folder); config.json is checked
    against the safetensors headers before the model is built. The model's `config.source_folder`
    is this folder (`save_pretrained` will not write into it).
    """
    folder = os.fspath(path)
    raw = read_config_json(folder)
    where, files, shapes = _tensor_index(folder)
    _check_layer_count(raw["num_hidden_layers"], folder, where, files)
    cfg = load_config(folder)
    specs = {s.hf_name: s for s in _check_tensors(cfg, folder, where, files, shapes)}
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
            remat=remat,
        )
    )
    graphdef, state = nnx.split(abstract)
    variables = dict(nnx.to_flat_state(state))
    groups: dict[tuple[Any, ...], list[TensorSpec]] = {}  # parameter path -> its tensors
    for spec in specs.values():
        groups.setdefault(spec.path, []).append(spec)
    with _Reader(files) as reader:
        for path, group in groups.items():
            var = variables[path]
            sharding = None
            if mesh is not None:
                axes = shd.logical_axes_of(var)
                sharding = shd.logical_sharding(mesh, axes, var.shape, rules)
            var.set_value(_place(group, tuple(var.shape), param_dtype, sharding, reader))
    return nnx.merge(graphdef, nnx.from_flat_state(variables))


@jax.jit
def _layer_of(stacked: jax.Array, layer: jax.Array) -> jax.Array:
    """Layer `layer` (traced: one compilation per parameter shape) of a stacked parameter."""
    return jax.lax.dynamic_index_in_dim(stacked, layer, keepdims=False)


def _host(x: jax.Array) -> np.ndarray:
    if isinstance(x, jax.Array) and not x.is_fully_addressable:
        from jax.experimental import multihost_utils

        x = multihost_utils.process_allgather(x, tiled=True)
    return np.asarray(jax.device_get(x))


def _same_folder(a: str, b: str) -> bool:
    try:
        return os.path.samefile(a, b)
    except OSError:  # one of them does not exist
        return os.path.realpath(a) == os.path.realpath(b)


def _new_file(folder: str, stem: str) -> str:
    """A new empty file `.<stem>.<random>.tmp` in `folder`, created exclusively (never an existing
    file or symlink), with the permissions the umask gives."""
    while True:
        path = os.path.join(folder, f".{stem}.{secrets.token_hex(8)}.tmp")
        try:
            fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o666)
        except FileExistsError:
            continue
        os.close(fd)
        return path


def _write_text(folder: str, name: str, text: str) -> None:
    """`folder/name` := `text`, through a new file renamed into place (replaces a symlink at
    `name` instead of writing through it)."""
    tmp = _new_file(folder, name)
    try:
        with open(tmp, "w", encoding="utf-8") as f:
            f.write(text)
        os.replace(tmp, os.path.join(folder, name))
    except BaseException:
        os.remove(tmp)
        raise


def _remove_stale_weights(folder: str, written: set[str]) -> None:
    """Remove the weight files of an earlier export that this one did not write: shards named
    like ours, `model.safetensors` and the index. Nothing else is touched."""
    for entry in os.scandir(folder):
        if entry.name in written or entry.is_dir(follow_symlinks=False):
            continue
        if SHARD_PATTERN.fullmatch(entry.name) or entry.name in (SAFETENSORS, SAFETENSORS_INDEX):
            os.remove(entry.path)  # a symlink: the link, never its target


def save_pretrained(
    model: CausalLM,
    path: str | os.PathLike,
    *,
    max_shard_size: int = 5 * 2**30,
    overwrite_source: bool = False,
) -> None:
    """Write a folder that `transformers` loads: `config.json` plus `model.safetensors` (or
    `model-0000i-of-0000n.safetensors` + index above `max_shard_size` bytes), in transformers'
    tensor names, layout and the parameter dtype. Tensors are gathered one at a time; with several
    processes every process must call this (for the gathers) and process 0 writes.

    Each file is written to a new temporary file in the folder and renamed into place, so a
    symlink in the folder is replaced, never written through. Weight files of an earlier export
    that this one does not write (`model-*-of-*.safetensors`, `model.safetensors`, the index) are
    removed; other files are kept. Writing into the folder the model was loaded from
    (`model.config.source_folder`) is refused with `ValueError` unless `overwrite_source`."""
    from safetensors.numpy import save_file

    folder = os.fspath(path)
    cfg = model.config
    if not overwrite_source and cfg.source_folder and _same_folder(folder, cfg.source_folder):
        raise ValueError(
            f"{folder}: refusing to export into the folder the model was loaded from "
            f"({cfg.source_folder}); that would overwrite the source checkpoint. Choose another "
            "output folder (or pass overwrite_source=True to replace it on purpose)"
        )
    state = dict(nnx.to_flat_state(nnx.state(model, nnx.Param)))
    writer = jax.process_index() == 0
    if writer:
        os.makedirs(folder, exist_ok=True)
    parts: list[list[str]] = [[]]  # tensor names per output file
    temps: list[str] = []  # their temporary files (process 0)
    current: dict[str, np.ndarray] = {}
    size = total = 0

    def flush():
        if writer:
            temps.append(_new_file(folder, "part"))
            save_file(current, temps[-1], metadata={"format": "pt"})
        parts[-1] = list(current)
        parts.append([])
        current.clear()

    try:
        for spec in tensor_specs(cfg):
            value = state[spec.path].get_value()
            if spec.layer is not None:
                value = _layer_of(value, spec.layer)
            array = np.ascontiguousarray(spec.to_hf(_host(value)))
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
        for tmp, name in zip(temps, names, strict=True):
            os.replace(tmp, os.path.join(folder, name))
        temps.clear()
        written = set(names)
        if n > 1:
            weight_map = {t: names[i] for i, part in enumerate(parts) for t in part}
            index = {"metadata": {"total_size": total}, "weight_map": weight_map}
            _write_text(folder, SAFETENSORS_INDEX, json.dumps(index, indent=2))
            written.add(SAFETENSORS_INDEX)
        _remove_stale_weights(folder, written)
        _save_config(cfg, model.param_dtype, folder)
    finally:
        for tmp in temps:  # an export that failed half-way leaves no temporary files
            if os.path.exists(tmp):
                os.remove(tmp)


def _save_config(cfg: ModelConfig, param_dtype: Any, folder: str) -> None:
    """config.json through transformers' own config class (same keys as its save_pretrained),
    written in a fresh temporary folder and renamed into place."""
    import transformers

    d = cfg.hf_config_dict()
    for key in ("transformers_version", "_name_or_path", "torch_dtype"):
        d.pop(key, None)
    hf = transformers.CONFIG_MAPPING[cfg.model_type].from_dict(d)
    hf.architectures = [cfg.family.architecture]
    hf.dtype = jnp.dtype(param_dtype).name
    tmp = tempfile.mkdtemp(prefix=".config.", suffix=".tmp", dir=folder)
    try:
        hf.save_pretrained(tmp)
        os.replace(os.path.join(tmp, "config.json"), os.path.join(folder, "config.json"))
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
