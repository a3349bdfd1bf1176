"""LoRA students: low-rank adapters on the decoder layers' projections, through qwix.

```python
spec = lora.LoraSpec(rank=8, alpha=16.0, targets=("layers/attn", "layers/mlp"))
student = lora.apply(base, spec, rng=jax.random.key(0))    # same logits as `base` (B = 0)
graphdef, adapters, frozen, rest = lora.split_trainable(student)
model = nnx.merge(graphdef, adapters, frozen, rest)          # inside a jitted step
lora.num_adapter_params(student)                             # sum of rank * (in + out)
exported = lora.merge(student)                               # a plain CausalLM: save_pretrained
```

The adapters are qwix's (`qwix.LoraProvider`, `qwix.apply_lora_to_model`): while a matched
module runs, qwix intercepts `jnp.einsum`, recognises which operand is one of the module's
weights (`W`) and adds `(alpha / rank) * (x @ A) @ B`, with `A` (he-uniform) over the weight's
contracted axes and `B` (zeros) over its output axes, so a fresh adapter changes nothing. The
adapter variables are `nnx.LoRAParam`s named `<weight>_lora_a` / `<weight>_lora_b` next to the
weight (e.g. `layers.attn.q_proj_lora_a`). `nnx.LoRAParam` subclasses `nnx.Param`, so
`nnx.split(model, nnx.Param, ...)` (`scoring.split_model`, the samplers) carries them with the
weights, and `TRAINABLE` (`nnx.LoRAParam`) selects them alone, for gradients, an optimizer state
or an adapter-only checkpoint.

Targets are regexes matched (`re.fullmatch`) against module paths, as qwix matches rules. qwix
adapts modules, not single weights: every projection a matched module multiplies by gets an
adapter. A `CausalLM`'s adaptable modules are `layers/attn` (q_proj, k_proj, v_proj, o_proj) and
`layers/mlp` (gate_proj, up_proj, down_proj); the embedding and the output layer are never
adapted.

The layers are one stacked module run by `lax.scan`, which qwix does not know about: `apply` lets
qwix create each layer's adapters on that layer's slice (traced, so qwix follows the reshaped
q / o weights back to their parameters), stacks them on the leading "layers" axis and swaps in a
layer stack whose forward and cached decode both run through the one method qwix intercepts
(`AdaptedLayers`). The adapters carry the logical axes ("layers", None, ...): replicated on a
mesh (an adapter is rank * (in + out) numbers per layer, small next to its weight).
"""

from __future__ import annotations

import dataclasses
import math
import numbers
import re
from typing import Any

import jax
import jax.numpy as jnp
import qwix
from flax import nnx

from opdplus_jax import sharding as shd
from opdplus_jax.models import transformer
from opdplus_jax.models.transformer import CausalLM
from opdplus_jax.sampling import as_key

# The filter of the trainable variables of an adapted model: the adapters, nothing else.
TRAINABLE = nnx.LoRAParam
# Adaptable modules of a CausalLM (paths from the model) and the projections qwix adapts in each.
PROJECTIONS: dict[str, tuple[str, ...]] = {
    "layers/attn": ("q_proj", "k_proj", "v_proj", "o_proj"),
    "layers/mlp": ("gate_proj", "up_proj", "down_proj"),
}
DEFAULT_TARGETS: tuple[str, ...] = tuple(PROJECTIONS)
LORA_A, LORA_B = "_lora_a", "_lora_b"  # qwix's suffixes of a weight's adapter names


def _describe_modules() -> str:
    return ", ".join(f"{path!r} ({', '.join(names)})" for path, names in PROJECTIONS.items())


@dataclasses.dataclass(frozen=True)
class LoraSpec:
    """Adapter rank, scale numerator and target modules: `W + (alpha / rank) * A @ B`.

    `targets`: regexes over module paths (see the module docstring), default every adaptable
    module. ValueError names the bad field and a valid choice.
    """

    rank: int
    alpha: float
    targets: tuple[str, ...] = DEFAULT_TARGETS

    def __post_init__(self):
        rank = self.rank
        if isinstance(rank, bool) or not isinstance(rank, numbers.Integral) or rank < 1:
            raise ValueError(f"LoraSpec.rank must be an int >= 1 (e.g. 8); got {rank!r}")
        alpha = self.alpha
        ok = isinstance(alpha, numbers.Real) and not isinstance(alpha, bool)
        if not (ok and math.isfinite(alpha) and alpha > 0):
            raise ValueError(
                f"LoraSpec.alpha must be a finite number > 0 (the scale is alpha / rank; "
                f"alpha = 2 * rank is common); got {alpha!r}"
            )
        targets = self.targets
        if isinstance(targets, str) or not isinstance(targets, tuple | list):
            raise ValueError(
                f"LoraSpec.targets must be a tuple of module-path regexes, e.g. "
                f"{DEFAULT_TARGETS}; got {targets!r}"
            )
        if not targets:
            raise ValueError(
                f"LoraSpec.targets is empty: name at least one module to adapt, e.g. "
                f"{DEFAULT_TARGETS} (adaptable: {_describe_modules()})"
            )
        for target in targets:
            if not isinstance(target, str):
                raise ValueError(f"LoraSpec.targets: {target!r} is not a string (a regex)")
            try:
                re.compile(target)
            except re.error as e:
                raise ValueError(f"LoraSpec.targets: {target!r} is not a valid regex ({e})") from e
        object.__setattr__(self, "rank", int(rank))
        object.__setattr__(self, "alpha", float(alpha))
        object.__setattr__(self, "targets", tuple(targets))

    @property
    def scale(self) -> float:
        """The factor of the adapters' product: alpha / rank (qwix's convention)."""
        return self.alpha / self.rank

    def modules(self) -> tuple[str, ...]:
        """The adaptable module paths the targets match; ValueError for a target that matches
        none (listing the adaptable modules)."""
        for target in self.targets:
            if not any(re.fullmatch(target, path) for path in PROJECTIONS):
                raise ValueError(
                    f"LoraSpec.targets: {target!r} matches no adaptable module of the model. "
                    "Targets are regexes matched against module paths (qwix adapts every "
                    f"projection of a matched module); the adaptable modules are "
                    f"{_describe_modules()}. E.g. targets=('layers/attn',) adapts attention only"
                )
        return tuple(p for p in PROJECTIONS if any(re.fullmatch(t, p) for t in self.targets))


class AdaptedLayers(transformer.DecoderLayer):
    """The layer stack of an adapted model: a `DecoderLayer` whose cached `decode` also runs
    through `__call__`.

    qwix intercepts one method of an NNX module, and the adapters act only while it runs; both
    entry points of the scanned stack (the full forward and the sampler's cached decode) go
    through `__call__`, so they see the same adapters. `lora_spec` is the spec it was made with.
    It runs traced only (RuntimeError under `jax.disable_jit()`).
    """

    def __call__(self, *args, cached: bool = False, **kwargs):
        if jax.config.jax_disable_jit:
            raise RuntimeError(
                "a LoRA model cannot run under jax.disable_jit(): qwix finds the reshaped q/o "
                "weights through the traced program and would silently skip their adapters. "
                "Run it traced (the default), or lora.merge(model) first"
            )
        if cached:
            return super().decode(*args, **kwargs)
        return super().__call__(*args, **kwargs)

    def decode(self, *args, **kwargs):
        return self(*args, cached=True, **kwargs)


def is_adapted(model: CausalLM) -> bool:
    """Whether `model` carries adapters (made by `apply`)."""
    return isinstance(model.layers, AdaptedLayers)


def _check_model(model: Any) -> None:
    if not isinstance(model, CausalLM):
        raise TypeError(f"expected an opdplus_jax CausalLM; got {type(model).__name__}")


def _layer_probe(model: CausalLM) -> tuple[jax.Array, ...]:
    """Inputs of one layer's `__call__` for one token (values do not matter)."""
    cfg = model.config
    x_BLD = jnp.zeros((1, 1, cfg.hidden_size), model.dtype)
    sin, cos = transformer.rope_sin_cos(cfg, jnp.zeros((1, 1), jnp.int32), model.dtype)
    return x_BLD, sin, cos, jnp.ones((1, 1, 1), bool)


def apply(model: CausalLM, spec: LoraSpec, *, rng: Any) -> CausalLM:
    """A copy of `model` with qwix LoRA adapters on `spec`'s target modules (`model` unchanged;
    the two share the base weights' arrays).

    Its outputs are `model`'s until the adapters are trained: B starts at zero, so every adapter
    adds exact zeros (the compiled forward may still differ from the base model's in the last
    float32 bits, as XLA fuses the extra products differently).
    `rng`: a `jax.random.key`, a raw uint32[2] key or an int seed (layer i's A draws from
    `fold_in(rng, i)`). The adapters have the weights' dtype and are placed replicated on the
    weights' mesh, if any.
    """
    _check_model(model)
    if is_adapted(model):
        raise ValueError("model already has LoRA adapters; call lora.merge(model) first")
    if not isinstance(spec, LoraSpec):
        raise TypeError(f"spec must be a lora.LoraSpec; got {type(spec).__name__}")
    modules = spec.modules()
    key = as_key(rng)
    layer_graphdef, stack = nnx.split(model.layers)
    slice_shapes = jax.tree.map(lambda a: jax.ShapeDtypeStruct(a.shape[1:], a.dtype), stack)
    probe = _layer_probe(model)
    # qwix matches its rules against paths inside the module it adapts (one layer): "attn".
    inner = "|".join(re.escape(path.split("/", 1)[1]) for path in modules)
    provider = qwix.LoraProvider(module_path=inner, rank=spec.rank, alpha=spec.alpha)

    def adapted_layer(layer_key):
        # One layer's module (zero weights: an adapter's initial value does not depend on W),
        # without logical axes: qwix would derive the adapters' axes from the stacked ones.
        zeros = jax.tree.map(lambda s: jnp.zeros(s.shape, s.dtype), slice_shapes)
        layer = nnx.merge(layer_graphdef, zeros)
        for _, node in nnx.iter_graph(layer):
            if isinstance(node, nnx.Variable):
                node.set_metadata("out_sharding", None)
        layer.__class__ = AdaptedLayers
        rngs = nnx.Rngs(params=layer_key)
        return qwix.apply_lora_to_model(layer, provider, *probe, rngs=rngs)

    adapted_graphdef, shapes, _ = nnx.split(nnx.eval_shape(adapted_layer, key), TRAINABLE, ...)
    _check_adapters(shapes, modules)
    init = jax.jit(lambda k: nnx.state(adapted_layer(k), TRAINABLE))
    per_layer = [init(jax.random.fold_in(key, i)) for i in range(model.config.num_layers)]
    adapters = jax.tree.map(lambda *xs: jnp.stack(xs), *per_layer)
    for _, var in nnx.to_flat_state(adapters):
        var.set_metadata("out_sharding", ("layers",) + (None,) * (var.ndim - 1))
    mesh = shd.infer_mesh(stack)
    if mesh is not None:
        adapters = jax.device_put(adapters, shd.param_shardings(adapters, mesh, model.rules))
    layers = nnx.merge(adapted_graphdef, adapters, stack)
    layers.lora_spec = spec
    out = nnx.clone(model)
    out.layers = layers
    return out


def _adapted_weights(state: nnx.State) -> dict[tuple[str, str], tuple[Any, Any]]:
    """{(module path, weight name): (A, B)} of the adapter variables in a layer-stack state."""
    flat = dict(nnx.to_flat_state(state))
    found = {}
    for path, var in flat.items():
        *module, name = (str(p) for p in path)
        if isinstance(var, nnx.LoRAParam) and name.endswith(LORA_A):
            weight = name[: -len(LORA_A)]
            b = flat.get((*path[:-1], weight + LORA_B))
            found["/".join(("layers", *module)), weight] = (var, b)
    return found


def _check_adapters(state: nnx.State, modules: tuple[str, ...]) -> None:
    """RuntimeError unless qwix adapted exactly the projections of `modules`."""
    got = set(_adapted_weights(state))
    want = {(m, w) for m in modules for w in PROJECTIONS[m]}
    if got != want:
        raise RuntimeError(
            f"qwix adapted {sorted(got)}, expected {sorted(want)}: it no longer recognises "
            "these modules' weights in their einsums (check the installed qwix version)"
        )


def split_trainable(model: CausalLM) -> tuple[nnx.GraphDef, nnx.State, nnx.State, nnx.State]:
    """(graphdef, adapters, frozen, rest) of an adapted model: the adapters (`TRAINABLE`), the
    other parameters (the frozen base weights) and the remaining variables.
    `nnx.merge(graphdef, adapters, frozen, rest)` rebuilds the model; `nnx.update(model,
    adapters)` loads trained (e.g. restored) adapters into an `apply`-made model of the same spec.
    ValueError for a model without adapters (nothing would train)."""
    _check_model(model)
    if not is_adapted(model):
        raise ValueError("model has no LoRA adapters to train (make them with lora.apply)")
    return nnx.split(model, TRAINABLE, nnx.Param, ...)


def num_adapter_params(model: CausalLM) -> int:
    """Number of trainable numbers: the adapters' sizes (0 for a model without adapters)."""
    return sum(math.prod(x.shape) for x in jax.tree.leaves(nnx.state(model, TRAINABLE)))


def merge(model: CausalLM) -> CausalLM:
    """A plain `CausalLM` (no adapters) whose adapted weights are `W + (alpha / rank) * A @ B`
    (computed in float32 at highest precision, stored in the weight's dtype and placement): its
    logits equal the adapted model's to float32 rounding, its graphdef is the base model's (the
    same compiled functions serve both), and `models.save_pretrained` exports it."""
    _check_model(model)
    if not is_adapted(model):
        raise ValueError("model has no LoRA adapters (make them with lora.apply)")
    spec: LoraSpec = model.layers.lora_spec
    adapters, base = nnx.state(model.layers, TRAINABLE, ...)
    flat = dict(nnx.to_flat_state(base))
    # A spans a weight's contracted (input) axes and B its output axes, and every projection
    # stores its input axes first, so A @ B (flattened) reshapes onto the weight.
    for (module, weight), (a, b) in _adapted_weights(adapters).items():
        path = (*module.split("/")[1:], weight)
        w = flat[path]
        num_layers, rank = a.shape[0], a.shape[-1]
        a_LIR = a[...].reshape(num_layers, -1, rank).astype(jnp.float32)
        b_LRO = b[...].reshape(num_layers, rank, -1).astype(jnp.float32)
        if a_LIR.shape[1] * b_LRO.shape[2] != math.prod(w.shape[1:]):
            raise RuntimeError(
                f"{module}/{weight}: adapters {a.shape} x {b.shape} do not match the weight "
                f"{w.shape}"
            )
        delta = jnp.einsum("LIR,LRO->LIO", a_LIR, b_LRO, precision=jax.lax.Precision.HIGHEST)
        value = w[...].astype(jnp.float32) + spec.scale * delta.reshape(w.shape)
        flat[path] = w.replace(jax.device_put(value.astype(w.dtype), w[...].sharding))
    cfg = model.config
    plain = nnx.eval_shape(
        lambda: transformer.DecoderLayer(
            cfg,
            num_layers=cfg.num_layers,
            dtype=model.dtype,
            param_dtype=model.param_dtype,
            rngs=nnx.Rngs(0),
        )
    )
    out = nnx.clone(model)
    out.layers = nnx.merge(nnx.graphdef(plain), nnx.from_flat_state(flat))
    return out
