"""Device mesh, logical-axis rules and every placement helper of the package.

The mesh has three named axes, defined once here:

- `data`: pure data parallelism (parameters replicated, batch split);
- `fsdp`: fully-sharded data parallelism (batch split *and* parameters split along `embed`);
- `tensor`: tensor (model) parallelism (parameters split along heads / mlp / vocab).

Parameters carry *logical* axis names as NNX metadata (`out_sharding`, e.g. `("embed", "heads",
"head_dim")` for a query projection). `LOGICAL_RULES` maps those logical names to mesh axes; this
is the only place that knows both vocabularies, so model code never names a mesh axis and the
model configuration (`opdplus_jax.models.ModelConfig`) stays separate from the sharding
configuration (`ShardingConfig`). A dimension whose size is not divisible by its mesh axes is
replicated instead (e.g. 2 KV heads on `tensor=4`).

On a pod, put `tensor` on the fastest interconnect (within a host / ICI ring), `fsdp` across the
remaining chips of a slice and `data` across slices; `jax.make_mesh` orders devices accordingly.
"""

from __future__ import annotations

import dataclasses
import math
from collections.abc import Mapping, Sequence
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx
from jax.sharding import Mesh, NamedSharding, PartitionSpec

DATA = "data"
FSDP = "fsdp"
TENSOR = "tensor"
MESH_AXES = (DATA, FSDP, TENSOR)
BATCH_AXES = (DATA, FSDP)

AxisRules = tuple[tuple[str, str | tuple[str, ...] | None], ...]

# Logical axis name -> mesh axis (or axes, or None = replicated).
LOGICAL_RULES: AxisRules = (
    ("batch", BATCH_AXES),
    ("length", None),
    ("cache_length", None),
    ("act_embed", None),
    ("vocab", TENSOR),
    ("embed", FSDP),
    ("heads", TENSOR),
    ("kv_heads", TENSOR),
    ("head_dim", None),
    ("mlp", TENSOR),
    ("norm", None),
    ("layers", None),
)


@dataclasses.dataclass(frozen=True)
class ShardingConfig:
    """Mesh shape (one size per axis; -1 = all remaining devices) and logical-axis rules."""

    data: int = 1
    fsdp: int = -1
    tensor: int = 1
    rules: AxisRules = LOGICAL_RULES

    def shape(self) -> dict[str, int]:
        return {DATA: self.data, FSDP: self.fsdp, TENSOR: self.tensor}


def _resolve_shape(shape: Mapping[str, int], num_devices: int) -> tuple[int, ...]:
    unknown = set(shape) - set(MESH_AXES)
    if unknown:
        raise ValueError(f"unknown mesh axes {sorted(unknown)}; the mesh axes are {MESH_AXES}")
    sizes = [int(shape.get(a, 1)) for a in MESH_AXES]
    if sizes.count(-1) > 1:
        raise ValueError(f"at most one mesh axis may be -1, got {dict(shape)}")
    if -1 in sizes:
        rest = math.prod(s for s in sizes if s != -1)
        if num_devices % rest:
            raise ValueError(f"{num_devices} devices are not divisible by the fixed axes {shape}")
        sizes[sizes.index(-1)] = num_devices // rest
    if math.prod(sizes) != num_devices:
        raise ValueError(
            f"mesh {dict(zip(MESH_AXES, sizes, strict=False))} has {math.prod(sizes)} devices, "
            f"but {num_devices} are available"
        )
    return tuple(sizes)


def make_mesh(
    shape: Mapping[str, int] | ShardingConfig | None = None,
    devices: Sequence[jax.Device] | None = None,
) -> Mesh:
    """A (`data`, `fsdp`, `tensor`) mesh over `devices` (default: all devices).

    `shape` is a dict such as `{"fsdp": 4, "tensor": 2}` (missing axes have size 1, one axis may
    be -1) or a `ShardingConfig`. Default: everything on `fsdp`. Axes are `Auto` (GSPMD
    propagates shardings through the model from the parameter and batch placements).

    `devices` may be any devices of one platform, e.g. the compile-only devices of
    `jax.experimental.topologies.get_topology_desc("v5p:4x4x4", "tpu")` (`opdplus_jax.plan`).
    Where `jax.make_mesh` refuses a shape because it would split a physical axis of a TPU slice
    (an (8, 8) mesh on a 4x4x4 slice), the devices are laid out by
    `mesh_utils.create_device_mesh(..., allow_split_physical_axes=True)` instead.
    """
    if shape is None:
        shape = ShardingConfig()
    if isinstance(shape, ShardingConfig):
        shape = shape.shape()
    devices = list(devices) if devices is not None else jax.devices()
    sizes = _resolve_shape(shape, len(devices))
    auto = (jax.sharding.AxisType.Auto,) * len(MESH_AXES)
    try:
        return jax.make_mesh(sizes, MESH_AXES, axis_types=auto, devices=devices)
    except NotImplementedError:
        from jax.experimental import mesh_utils

        grid = mesh_utils.create_device_mesh(sizes, devices, allow_split_physical_axes=True)
        return Mesh(grid, MESH_AXES, axis_types=auto)


def logical_to_spec(
    logical_axes: Sequence[str | None],
    *,
    mesh: Mesh | None = None,
    shape: Sequence[int] | None = None,
    rules: AxisRules = LOGICAL_RULES,
) -> PartitionSpec:
    """Map logical axis names to a `PartitionSpec` of mesh axes.

    With `mesh` and `shape`, mesh axes that do not divide their dimension, have size 1 or were
    already used by an earlier dimension are dropped (that dimension is then less sharded).
    """
    table = dict(rules)
    used: set[str] = set()
    out: list[Any] = []
    for i, name in enumerate(logical_axes):
        target = table.get(name) if name is not None else None
        axes = () if target is None else (target,) if isinstance(target, str) else tuple(target)
        kept = []
        for ax in axes:
            if ax in used:
                continue
            if mesh is not None:
                size = mesh.shape[ax]
                prod = math.prod(mesh.shape[a] for a in kept) * size
                if size == 1 or (shape is not None and shape[i] % prod):
                    continue
            kept.append(ax)
        used.update(kept)
        out.append(None if not kept else kept[0] if len(kept) == 1 else tuple(kept))
    while out and out[-1] is None:
        out.pop()
    return PartitionSpec(*out)


def named_sharding(mesh: Mesh, spec: PartitionSpec | Sequence[Any] = ()) -> NamedSharding:
    """`NamedSharding(mesh, spec)`; `spec` may be a PartitionSpec or a tuple of mesh-axis names."""
    if not isinstance(spec, PartitionSpec):
        spec = PartitionSpec(*spec)
    return NamedSharding(mesh, spec)


def logical_sharding(
    mesh: Mesh,
    logical_axes: Sequence[str | None],
    shape: Sequence[int] | None = None,
    rules: AxisRules = LOGICAL_RULES,
) -> NamedSharding:
    """The `NamedSharding` of an array with the given logical axes (see `logical_to_spec`)."""
    return NamedSharding(mesh, logical_to_spec(logical_axes, mesh=mesh, shape=shape, rules=rules))


def logical_axes_of(variable: nnx.Variable) -> tuple[str | None, ...]:
    """Logical axis names stored on an NNX variable (replicated if it has none)."""
    axes = variable.get_metadata().get("out_sharding")
    return tuple(axes) if axes else (None,) * len(variable.shape)


def param_shardings(tree: Any, mesh: Mesh, rules: AxisRules = LOGICAL_RULES) -> Any:
    """`NamedSharding` for every NNX variable in `tree` (a module or an `nnx.State`).

    Returns a pytree with the structure of `nnx.state(tree)` (or of the given state), suitable for
    `jax.jit(..., in_shardings=...)` or `jax.device_put`.
    """
    state = tree if isinstance(tree, nnx.State) else nnx.state(tree)

    def one(v):
        if isinstance(v, nnx.Variable):
            return v.replace(logical_sharding(mesh, logical_axes_of(v), v.shape, rules))
        return NamedSharding(mesh, PartitionSpec())

    return jax.tree.map(one, state, is_leaf=lambda x: isinstance(x, nnx.Variable))


def shard_module(module: nnx.Module, mesh: Mesh, rules: AxisRules = LOGICAL_RULES) -> None:
    """Place (in place) every variable of `module` on `mesh` according to its logical axes."""
    state = nnx.state(module)
    shardings = param_shardings(state, mesh, rules)
    nnx.update(module, jax.device_put(state, shardings))


def shard_batch(batch: Any, mesh: Mesh, batch_axes: str | tuple[str, ...] = BATCH_AXES) -> Any:
    """Place every array of `batch` (a pytree) with dimension 0 split over `batch_axes`.

    Each process passes its local part of the global batch (a single process passes the whole
    batch); other dimensions are replicated. The leading dimension must be divisible by the
    number of devices along `batch_axes` (on this process). An array that already spans several
    processes (e.g. a rollout sampled on the mesh) is global: it is resharded as it is.
    """
    axes = (batch_axes,) if isinstance(batch_axes, str) else tuple(batch_axes)
    n = math.prod(mesh.shape[a] for a in axes)

    def one(x):
        x = np.asarray(x) if not isinstance(x, jax.Array) else x
        if x.ndim == 0:
            return jax.device_put(x, NamedSharding(mesh, PartitionSpec()))
        if isinstance(x, jax.Array) and not x.is_fully_addressable:
            spec = PartitionSpec(axes if len(axes) > 1 else axes[0])
            return jax.device_put(x, NamedSharding(mesh, spec))
        local = n // max(1, jax.process_count()) or 1
        if x.shape[0] % local:
            raise ValueError(
                f"batch dimension {x.shape[0]} is not divisible by the {n} devices of mesh axes "
                f"{axes} (local share {local}); pad the batch"
            )
        sharding = NamedSharding(mesh, PartitionSpec(axes if len(axes) > 1 else axes[0]))
        return jax.make_array_from_process_local_data(sharding, x)

    return jax.tree.map(one, batch)


def infer_mesh(tree: Any) -> Mesh | None:
    """The mesh of the first `NamedSharding`-placed array in `tree`, else None."""
    for leaf in jax.tree.leaves(tree):
        sharding = getattr(leaf, "sharding", None)
        if isinstance(sharding, NamedSharding) and isinstance(sharding.mesh, Mesh):
            return sharding.mesh
    return None


def batch_axes(mesh: Mesh | None) -> tuple[str, ...]:
    """The mesh axes the batch is split over (`data`, `fsdp`, those present and larger than 1)."""
    if mesh is None:
        return ()
    return tuple(a for a in BATCH_AXES if a in mesh.axis_names and mesh.shape[a] > 1)


def batch_shards(mesh: Mesh | None) -> int:
    """How many shards the mesh's batch axes split rows into (1 without a mesh)."""
    return math.prod(mesh.shape[a] for a in batch_axes(mesh)) if mesh is not None else 1


def place_rows(mesh: Mesh | None, *arrays: Any) -> tuple[jax.Array, ...]:
    """Pad [B, ...] arrays with zero rows to a multiple of the batch shards and split dim 0 over
    the mesh's batch axes (no-op without a mesh). Slice results back to the first B rows.

    For single-process callers that hold the whole batch (the sampler, scoring); the train step's
    process-local batches go through `shard_batch`.
    """
    axes = batch_axes(mesh)
    if not axes:
        return tuple(jnp.asarray(a) for a in arrays)
    extra = -len(arrays[0]) % batch_shards(mesh)
    sharding = NamedSharding(mesh, PartitionSpec(axes))
    pad = lambda a: jnp.pad(a, [(0, extra)] + [(0, 0)] * (a.ndim - 1)) if extra else a
    return tuple(jax.device_put(pad(jnp.asarray(a)), sharding) for a in arrays)


def global_rows(mesh: Mesh, x: Any, batch_axes: str | tuple[str, ...] = BATCH_AXES) -> jax.Array:
    """A [B, ...] array that every process holds whole (e.g. host-side scores of a global batch,
    computed from `host_array`s), placed with dimension 0 over `batch_axes`: each process puts
    its devices' rows. Unlike `shard_batch`, no process passes a local part."""
    x = np.asarray(x)
    axes = (batch_axes,) if isinstance(batch_axes, str) else tuple(batch_axes)
    spec = PartitionSpec(axes if len(axes) > 1 else axes[0])
    return jax.make_array_from_callback(x.shape, NamedSharding(mesh, spec), lambda i: x[i])


def host_array(x: Any) -> np.ndarray:
    """The whole value of `x` as a NumPy array on every process.

    A jax.Array split over several processes' devices cannot be read with `np.asarray`; it is
    gathered with `multihost_utils.process_allgather`, a collective: every process must call this
    for the same arrays in the same order (as the trainer and evaluation do). Anything else
    (NumPy arrays, single-process or fully replicated arrays) is read directly.
    """
    if isinstance(x, jax.Array) and not (x.is_fully_addressable or x.is_fully_replicated):
        from jax.experimental import multihost_utils

        return np.asarray(multihost_utils.process_allgather(x, tiled=True))
    return np.asarray(x)


def constrain_rows(x: jax.Array, mesh: Mesh | None) -> jax.Array:
    """Inside jit: shard dim 0 of `x` over the mesh's batch axes (no-op without a mesh)."""
    axes = batch_axes(mesh)
    if not axes:
        return x
    spec = PartitionSpec(axes, *([None] * (x.ndim - 1)))
    return jax.lax.with_sharding_constraint(x, NamedSharding(mesh, spec))


def constrain(
    x: jax.Array,
    logical_axes: Sequence[str | None],
    mesh: Mesh | None,
    rules: AxisRules = LOGICAL_RULES,
) -> jax.Array:
    """`with_sharding_constraint` by logical axes (no-op without a mesh)."""
    if mesh is None:
        return x
    return jax.lax.with_sharding_constraint(x, logical_sharding(mesh, logical_axes, x.shape, rules))
