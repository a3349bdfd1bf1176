"""Ahead-of-time compile planner: will a config fit a TPU slice, and how fast could it run?

For a training config and a target, the planner compiles the train step, the sampler's prefill
and its decode loop ahead of time, with abstract weights (`nnx.eval_shape`: nothing is
allocated) and abstract sharded inputs (`jax.ShapeDtypeStruct(..., sharding=NamedSharding)`),
and reads XLA's memory and cost analyses: per chip, argument bytes, temporaries and the peak
against the chip's HBM, FLOPs, bytes accessed, a roofline step time and the compile seconds.

    target = plan.target("v5p:4x4x4")                 # 64 compile-only TPU v5p devices
    shapes = plan.resolve_shapes(config)              # config.json, or the published table
    for result in plan.plan(config, target, shapes):
        print(result.program, result.peak_bytes / plan.GIB, result.fits)

Targets:
  * TPU slices (`v5p:4x4x4`, `v5p:2x2x2`, `v6e:2x4`, `v5e:2x4`) are compiled by libtpu for
    compile-only devices (`jax.experimental.topologies`), on any host; the `tpu` extra installs
    libtpu. The HBM a chip offers is what the TPU compiler reports (a probe compile). v4
    topologies come as one device per TensorCore, which meshes refuse: v4 is in `CHIPS` only.
  * `cpu:N` (and `h100:N`, `h200:N`, `a100:N`) compile for N fake XLA:CPU devices (set
    `jax_num_cpu_devices` or `XLA_FLAGS=--xla_force_host_platform_device_count=N` before JAX
    starts; `opdplus-plan` does) and judge the result against a GPU's published figures: an
    estimate only, since XLA:GPU lays out memory and fuses differently. Nothing is compiled for a
    GPU here.

Model shapes come from each folder's config.json, or, where the folder does not exist, from the
published architectures (`opdplus_jax.models.published`) matched by the folder's name; every
assumption is listed (`Shapes.describe`).

FLOPs: `compiled.cost_analysis()` counts the body of every loop once (the layer scan, attention
and logits chunks, microbatches, the decode loop), so XLA's figure undercounts; `flops_analytic`
counts the models' matmuls and attention as the code executes them (forward 2 N per token,
backward twice that, every query against every key of its sequence) and is what the roofline
uses. The roofline is max(analytic FLOPs / peak bf16 FLOP/s, bytes / HBM bandwidth) per chip,
with bytes the larger of XLA's count and a floor (weights read per pass, optimizer state, the KV
cache read per decode step); it ignores communication and is a lower bound on the step time.
"""

from __future__ import annotations

import copy
import dataclasses
import importlib.util
import math
import os
import re
import time
from collections.abc import Callable, Mapping, Sequence
from typing import Any

import jax
import jax.numpy as jnp
from flax import nnx
from jax.sharding import Mesh, NamedSharding, PartitionSpec
from ml_collections import config_dict

from opdplus_jax import configs, models, optim, sampling, sharding, train_step, trainer
from opdplus_jax.models import published
from opdplus_jax.rollout import Rollout

GIB = 2**30
PROGRAMS = ("train_step", "prefill", "decode")


# ------------------------------------------------------------------------------ chips


@dataclasses.dataclass(frozen=True)
class Chip:
    """Published per-chip figures: dense bf16 peak FLOP/s, HBM bandwidth and capacity."""

    name: str
    bf16_flops: float  # FLOP/s, dense (no structured sparsity)
    hbm_bandwidth: float  # bytes/s
    hbm_bytes: float  # bytes


# Published vendor figures per chip. TPUs: the Cloud TPU system-architecture pages (v4: 275
# TFLOP/s, 1200 GB/s, 32 GiB; v5e: 197 TFLOP/s, 819 GB/s, 16 GB; v5p: 459 TFLOP/s, 2765 GB/s,
# 95 GB; v6e: 918 TFLOP/s, 1640 GB/s, 32 GB). GPUs: NVIDIA's datasheets, dense bf16 (the
# sparsity figures are twice these): H100 SXM 80 GB 989 TFLOP/s, 3.35 TB/s; H200 141 GB 989
# TFLOP/s, 4.8 TB/s; A100 SXM 80 GB 312 TFLOP/s, 2.039 TB/s. Capacities are taken as binary
# (GiB): the TPU compiler reports 15.75, 31.24 and 95.73 GiB usable on v5e, v6e and v5p.
CHIPS: dict[str, Chip] = {
    "v4": Chip("TPU v4", 275e12, 1200e9, 32 * GIB),
    "v5e": Chip("TPU v5e", 197e12, 819e9, 16 * GIB),
    "v5p": Chip("TPU v5p", 459e12, 2765e9, 95 * GIB),
    "v6e": Chip("TPU v6e", 918e12, 1640e9, 32 * GIB),
    "h100": Chip("NVIDIA H100 SXM 80GB", 989e12, 3.35e12, 80 * GIB),
    "h200": Chip("NVIDIA H200 141GB", 989e12, 4.8e12, 141 * GIB),
    "a100": Chip("NVIDIA A100 SXM 80GB", 312e12, 2.039e12, 80 * GIB),
}
TPU_CHIPS = ("v4", "v5e", "v5p", "v6e")
GPU_CHIPS = ("h100", "h200", "a100")
# The GPU whose figures a `cpu:N` target is judged against by default.
DEFAULT_CPU_CHIP = "h100"


@dataclasses.dataclass(frozen=True)
class Target:
    """Devices to compile for, and the chip whose HBM and peak figures judge the result.

    Attributes:
      name: as given, e.g. "v5p:4x4x4" or "cpu:8".
      chip: the published figures (roofline, and the HBM of CPU estimates).
      devices: the devices the programs are compiled for (compile-only TPU devices, or CPU).
      hbm_bytes: usable HBM per chip the peak is compared with: the TPU compiler's own figure, or
        the published capacity for an estimate.
      hbm_source: where `hbm_bytes` comes from.
      estimate: True when compiled for XLA:CPU as a stand-in for `chip`.
    """

    name: str
    chip: Chip
    devices: tuple[Any, ...]
    hbm_bytes: float
    hbm_source: str
    estimate: bool

    @property
    def chips(self) -> int:
        return len(self.devices)

    def describe(self) -> str:
        c = self.chip
        figures = (
            f"{self.hbm_bytes / GIB:.2f} GiB HBM per chip ({self.hbm_source}), peak "
            f"{c.bf16_flops / 1e12:.0f} TFLOP/s bf16, {c.hbm_bandwidth / 1e9:.0f} GB/s"
        )
        if self.estimate:
            return (
                f"{self.name}: compiled for XLA:CPU on {self.chips} fake devices, an ESTIMATE "
                f"for {self.chips} x {c.name} (not compiled for the GPU; published figures: "
                f"{figures})"
            )
        return f"{self.name}: {self.chips} x {c.name}, compiled by libtpu; {figures}"


def _parse_count(text: str, name: str) -> int:
    if not text.isdigit() or int(text) < 1:
        raise ValueError(f"topology {name!r}: {text!r} is not a device count >= 1 (e.g. cpu:8)")
    return int(text)


def target(name: str, *, chip: str | None = None) -> Target:
    """The `Target` named `name`: a TPU slice ("v5p:4x4x4", "v6e:2x4", ...), or "cpu:N" /
    "h100:N" / "h200:N" / "a100:N" for an XLA:CPU estimate on N fake devices judged by the
    named GPU's published figures (`chip` picks the GPU of "cpu:N"; default H100).

    Raises:
      ValueError: an unknown or malformed name, too few CPU devices, or a TPU topology that
        libtpu cannot build; each message names the fix.
    """
    kind, sep, shape = name.partition(":")
    kind = kind.strip().lower()
    valid = "v5p:2x2x2, v5p:4x4x4, v6e:2x4, v5e:2x4, cpu:8, h100:8, h200:8, a100:8"
    if not sep or not shape:
        raise ValueError(f"topology {name!r} is not GENERATION:SHAPE; valid examples: {valid}")
    if kind in ("cpu", *GPU_CHIPS):
        gpu = chip or (kind if kind != "cpu" else DEFAULT_CPU_CHIP)
        if gpu not in CHIPS:
            raise ValueError(f"unknown chip {gpu!r}; known: {', '.join(CHIPS)}")
        count = _parse_count(shape, name)
        devices = jax.devices("cpu")
        if len(devices) < count:
            raise ValueError(
                f"topology {name!r} needs {count} CPU devices but JAX has {len(devices)}: the "
                "opdplus-plan command sets them up; in Python call "
                f"jax.config.update('jax_num_cpu_devices', {count}) (or set XLA_FLAGS="
                f"--xla_force_host_platform_device_count={count}) before JAX starts"
            )
        spec = CHIPS[gpu]
        return Target(name, spec, tuple(devices[:count]), spec.hbm_bytes, "published", True)
    if kind not in TPU_CHIPS:
        raise ValueError(
            f"unknown topology {name!r}: the generation must be one of "
            f"{', '.join(TPU_CHIPS + GPU_CHIPS)} or cpu; valid examples: {valid}"
        )
    if chip is not None and chip != kind:
        raise ValueError(f"--chip={chip} applies to cpu:N targets only; {name} is a {kind}")
    devices = tpu_devices(name)
    if len({tuple(d.coords) for d in devices}) != len(devices):
        raise ValueError(
            f"topology {name!r} has {len(devices)} devices on fewer chips (one per TensorCore), "
            "which mesh creation refuses; plan on a megacore generation (v5p, v6e, v5e)"
        )
    hbm = compiler_hbm_bytes(devices[0])
    source = "as the TPU compiler sees it"
    if hbm is None:
        hbm, source = CHIPS[kind].hbm_bytes, "published"
    return Target(name, CHIPS[kind], tuple(devices), hbm, source, False)


def tpu_devices(name: str) -> list[Any]:
    """The compile-only devices of TPU topology `name` (libtpu builds them on any host)."""
    from jax.experimental import topologies

    if importlib.util.find_spec("libtpu") is None:
        raise ValueError(
            f"topology {name!r} needs libtpu, which compiles for TPUs on any host: "
            "pip install -e '.[tpu]' (or plan on cpu:N for a CPU-compiled estimate)"
        )
    try:
        return list(topologies.get_topology_desc(name, "tpu").devices)
    except Exception as e:  # a malformed shape, or libtpu held by another process
        first = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
        hint = "check the shape (e.g. v5p:2x2x2, v5p:4x4x4, v6e:2x4, v5e:2x4)"
        if "lockfile" in first:
            hint = (
                "another process holds libtpu: set ALLOW_MULTIPLE_LIBTPU_LOAD=1 before JAX "
                "starts (opdplus-plan does)"
            )
        raise ValueError(f"cannot build TPU topology {name!r}: {first}; {hint}") from None


_HBM_MESSAGE = re.compile(r"available HBM \(([\d.]+)\s*([KMGTP]?)i?B?\)")
_SIZE_UNITS = {"": 1, "K": 2**10, "M": 2**20, "G": 2**30, "T": 2**40, "P": 2**50}


def parse_size(number: str, unit: str) -> float:
    """Bytes of an XLA size such as ("95.73", "G") (binary units, as XLA prints them)."""
    return float(number) * _SIZE_UNITS[unit.upper()]


def compiler_hbm_bytes(device: Any) -> float | None:
    """The HBM one TPU device offers a program, as its compiler reports it: read from the
    out-of-memory error of a probe that needs 2 TiB (about a second to compile). None if the
    compiler says something else."""
    huge = jax.ShapeDtypeStruct(
        (2**39,), jnp.float32, sharding=jax.sharding.SingleDeviceSharding(device)
    )
    try:
        jax.jit(lambda x: x * 2).lower(huge).compile()
    except Exception as e:
        m = _HBM_MESSAGE.search(str(e))
        return parse_size(*m.groups()) if m else None
    return None


# ------------------------------------------------------------------------------ model shapes


@dataclasses.dataclass(frozen=True)
class ModelShape:
    """One model of the config: its role, the folder the config names and its architecture."""

    role: str  # "student", "teacher/<name>" or "reference/<teacher name>"
    path: str
    config: models.ModelConfig
    origin: str  # where the architecture comes from, in words


@dataclasses.dataclass(frozen=True)
class Shapes:
    """The architectures of a config's student, teachers and (deduplicated) references."""

    student: ModelShape
    teachers: tuple[ModelShape, ...]
    references: tuple[ModelShape, ...]
    reference_of: tuple[int | None, ...]  # per teacher: index into `references`, or None
    vocab_size: int  # the tokenizer's vocabulary: logits are sliced to it
    vocab_origin: str

    def all(self) -> tuple[ModelShape, ...]:
        return (self.student, *self.teachers, *self.references)

    def describe(self) -> list[str]:
        """One line per model: role, architecture, parameters and where its shape comes from."""
        out = []
        for m in self.all():
            c = m.config
            out.append(
                f"{m.role}: {c.num_layers} layers, hidden {c.hidden_size}, {c.num_heads}/"
                f"{c.num_kv_heads} heads, vocab {c.vocab_size}, "
                f"{c.num_params() / 1e9:.2f}B params; {m.origin}"
            )
        out.append(f"tokenizer vocabulary {self.vocab_size} ({self.vocab_origin})")
        return out


def _with_layers(shape: ModelShape, layers: int | None) -> ModelShape:
    if layers is None or layers == shape.config.num_layers:
        return shape
    if isinstance(layers, bool) or not isinstance(layers, int) or layers < 1:
        raise ValueError(f"{shape.role}: the number of layers must be an int >= 1; got {layers!r}")
    cfg = dataclasses.replace(shape.config, num_layers=layers, hf_config_json="")
    return dataclasses.replace(shape, config=cfg, origin=f"{shape.origin}, cut to {layers} layers")


def _model_shape(role: str, path: str, override: str | None) -> ModelShape:
    """The architecture of `path` (or of `override`: a published name or a folder)."""
    source = override if override is not None else path
    if source and os.path.isfile(os.path.join(source, "config.json")):
        return ModelShape(role, path, models.load_config(source), f"config.json in {source}")
    found = published.lookup(source) if source else None
    if found is not None:
        name, cfg = found
        why = "--shapes" if override is not None else f"{path} not found here"
        return ModelShape(role, path, cfg, f"published {name} config.json ({why})")
    what = f"--shapes {role}:{override}" if override is not None else f"{role} folder {path!r}"
    raise ValueError(
        f"unknown model shape for {what}: the folder has no config.json here and its name "
        f"matches no published architecture ({', '.join(published.names())}; -Base/-RL "
        f"suffixes allowed). Pass --shapes={role}:Qwen3-1.7B (a published name or a folder "
        "with a config.json), or point the config at a real checkpoint folder"
    )


def resolve_shapes(
    config: config_dict.ConfigDict,
    overrides: Mapping[str, str] | None = None,
    *,
    student_layers: int | None = None,
    frozen_layers: int | None = None,
) -> Shapes:
    """The architectures of `config`'s models, as `Trainer.setup` would load them.

    Args:
      config: a training config (student, teachers with their references).
      overrides: role -> published name or folder, for roles "student", "teacher/<name>" and
        "reference/<teacher name>" (e.g. {"teacher/default": "Qwen3-8B"}).
      student_layers, frozen_layers: cut the student, or every teacher and reference, to this
        many layers (compile-time studies); None keeps the published depth.

    Raises:
      ValueError: an override for a role the config lacks, or a model whose shape is unknown.
    """
    overrides = dict(overrides or {})
    roles = ["student"]
    for name, t in config.teachers.items():
        roles.append(f"teacher/{name}")
        if float(t.reward_scale) != 1.0 and t.reference is not None:
            roles.append(f"reference/{name}")
    unknown = sorted(set(overrides) - set(roles))
    if unknown:
        raise ValueError(f"--shapes names {unknown}, but this config's models are {roles}")
    student = _model_shape("student", config.student.path, overrides.get("student"))
    teachers, references, reference_of, index = [], [], [], {}
    for name, t in config.teachers.items():
        role = f"teacher/{name}"
        teachers.append(
            _with_layers(_model_shape(role, t.path, overrides.get(role)), frozen_layers)
        )
        if float(t.reward_scale) == 1.0 or t.reference is None:
            reference_of.append(None)
            continue
        role = f"reference/{name}"
        key = (t.reference, overrides.get(role))
        if key not in index:
            if t.reference == "student_init" and overrides.get(role) is None:
                ref = dataclasses.replace(
                    student, role=role, origin="the student's initial weights"
                )
            else:
                ref = _model_shape(role, t.reference, overrides.get(role))
            index[key] = len(references)
            references.append(_with_layers(ref, frozen_layers))
        reference_of.append(index[key])
    vocab, vocab_origin = _tokenizer_vocab(config, student)
    return Shapes(
        student=_with_layers(student, student_layers),
        teachers=tuple(teachers),
        references=tuple(references),
        reference_of=tuple(reference_of),
        vocab_size=vocab,
        vocab_origin=vocab_origin,
    )


def _tokenizer_vocab(config, student: ModelShape) -> tuple[int, str]:
    folder = config.tokenizer_path or config.student.path
    files = ("tokenizer.json", "tokenizer_config.json")
    if folder and any(os.path.isfile(os.path.join(folder, f)) for f in files):
        from opdplus_jax.tokenizer import Tokenizer

        return Tokenizer.from_pretrained(folder).vocab_size, f"the tokenizer in {folder}"
    if student.origin.startswith("published"):
        return published.tokenizer_vocab(student.config), f"published {student.config.model_type}"
    return student.config.vocab_size, "no tokenizer here: the student's embedding size"


# ------------------------------------------------------------------------------ abstract inputs


def model_kwargs(config: config_dict.ConfigDict) -> dict[str, Any]:
    """`models.CausalLM` keyword arguments `Trainer.setup` loads every model with (dtypes,
    attention chunk); the student also gets `remat=config.memory.remat`."""
    return {
        "dtype": jnp.dtype(config.student.dtype),
        "param_dtype": jnp.dtype(config.student.param_dtype),
        "attention_chunk_size": config.memory.attention_chunk,
    }


def abstract_model(cfg: models.ModelConfig, mesh: Mesh, **kwargs: Any) -> nnx.Module:
    """A `CausalLM` of `cfg` on `mesh` with abstract weights (`nnx.eval_shape`: no memory)."""
    return nnx.eval_shape(lambda: models.CausalLM(cfg, rngs=nnx.Rngs(0), mesh=mesh, **kwargs))


def abstract_sharded(tree: Any, mesh: Mesh) -> Any:
    """`tree` with every leaf a `jax.ShapeDtypeStruct` carrying its `NamedSharding`: an NNX
    variable's from its logical axes (as the trainer places weights and optimizer moments),
    anything else replicated (step counters, schedules)."""

    def one(leaf):
        if isinstance(leaf, nnx.Variable):
            where = sharding.logical_sharding(mesh, sharding.logical_axes_of(leaf), leaf.shape)
            return leaf.replace(jax.ShapeDtypeStruct(leaf.shape, leaf.dtype, sharding=where))
        return jax.ShapeDtypeStruct(
            jnp.shape(leaf), leaf.dtype, sharding=NamedSharding(mesh, PartitionSpec())
        )

    return jax.tree.map(one, tree, is_leaf=lambda x: isinstance(x, nnx.Variable))


def batch_spec(mesh: Mesh, shape: Sequence[int], dtype: Any) -> jax.ShapeDtypeStruct:
    """An abstract [rows, ...] array split over the mesh's batch axes (as `shard_batch`)."""
    spec = PartitionSpec(sharding.BATCH_AXES)
    return jax.ShapeDtypeStruct(tuple(shape), dtype, sharding=NamedSharding(mesh, spec))


def replicated(mesh: Mesh, shape: Sequence[int], dtype: Any) -> jax.ShapeDtypeStruct:
    return jax.ShapeDtypeStruct(tuple(shape), dtype, sharding=NamedSharding(mesh, PartitionSpec()))


def batch_shards(mesh: Mesh) -> int:
    """Devices the rows are split over (the `data` x `fsdp` axes)."""
    return math.prod(mesh.shape[a] for a in sharding.BATCH_AXES if a in mesh.shape)


# ------------------------------------------------------------------------------ programs


@dataclasses.dataclass
class Program:
    """One program ready to lower: a jitted function, its (abstract) arguments and its sizes.

    `flops_analytic` counts the whole program (all chips); `bytes_floor` is per chip."""

    name: str
    fn: Callable[..., Any]
    args: tuple[Any, ...]
    kwargs: dict[str, Any]
    rows: int
    prompt_len: int
    max_new_tokens: int
    microbatch_rows: int | None  # rows per device per microbatch (train step), None = all
    flops_analytic: float
    bytes_floor: float


@dataclasses.dataclass
class Setting:
    """The sizes a config's programs are compiled at (derived from the config by `settings`)."""

    rows: int  # data.batch_size x rollout.num_samples
    prompt_len: int  # the prompt bucket of rollout.max_prompt_len
    max_new_tokens: int
    microbatch_rows: int | None  # per device; None = the whole batch in one microbatch


def settings(config: config_dict.ConfigDict) -> Setting:
    """The rollout shapes of `config`: rows = data.batch_size x rollout.num_samples, the prompt
    bucket of rollout.max_prompt_len, rollout.max_new_tokens and memory.microbatch_rows."""
    return Setting(
        rows=config.data.batch_size * config.rollout.num_samples,
        prompt_len=sampling.bucket_length(config.rollout.max_prompt_len),
        max_new_tokens=config.rollout.max_new_tokens,
        microbatch_rows=config.memory.microbatch_rows,
    )


def with_fields(config: config_dict.ConfigDict, **fields: Any) -> config_dict.ConfigDict:
    """A copy of `config` with dotted fields changed (`**{"rollout.max_new_tokens": 4096}`)."""
    out = copy.deepcopy(config)
    configs.apply_overrides(out, fields)
    return out


def layer_matmul_params(cfg: models.ModelConfig) -> int:
    """Weights of one layer that multiply every token (projections and MLP)."""
    d, f = cfg.hidden_size, cfg.intermediate_size
    q, kv = cfg.num_heads * cfg.head_dim, cfg.num_kv_heads * cfg.head_dim
    return d * (q + 2 * kv) + q * d + 3 * d * f


def forward_flops(
    cfg: models.ModelConfig, *, rows: int, queries: int, keys: int, logits: int
) -> float:
    """FLOPs of one forward of `rows` rows: `queries` new positions per row attending to `keys`
    positions (every one: the code masks, it does not skip), and the output layer at `logits`
    positions per row."""
    attention = 4 * queries * keys * cfg.num_heads * cfg.head_dim
    per_row = cfg.num_layers * (2 * layer_matmul_params(cfg) * queries + attention)
    return rows * (per_row + 2 * cfg.hidden_size * cfg.vocab_size * logits)


def _weights_bytes(cfg: models.ModelConfig, dtype: Any, mesh: Mesh) -> float:
    """Bytes of the weights one chip reads in one pass: the whole model (gathered over `data`
    and `fsdp`) in the activation dtype, split over `tensor`."""
    return cfg.num_params() * jnp.dtype(dtype).itemsize / mesh.shape.get(sharding.TENSOR, 1)


def train_step_program(config, shapes: Shapes, mesh: Mesh) -> Program:
    """The fused `train_step.train_step` at the config's rollout shapes and memory settings:
    the student's params and optimizer state (`optim.from_config`) donated, teachers and
    references frozen, the `StepConfig` from `trainer.step_config` (as `Trainer.setup`)."""
    s = settings(config)
    if config.lora.rank is not None:
        raise ValueError(
            f"the planner compiles full fine-tuning only, not LoRA students (lora.rank="
            f"{config.lora.rank}): plan with --config.lora.rank=None, whose train step holds "
            "more (every weight's gradient and optimizer state) than the LoRA step"
        )
    if s.rows % batch_shards(mesh):
        raise ValueError(
            f"data.batch_size x rollout.num_samples = {s.rows} rows do not split over the "
            f"{batch_shards(mesh)} devices of the mesh's batch axes (mesh.data x mesh.fsdp), as "
            "the train step needs: change data.batch_size or the mesh"
        )
    kw = model_kwargs(config)
    student = abstract_model(shapes.student.config, mesh, **kw, remat=config.memory.remat)
    teachers = [abstract_model(m.config, mesh, **kw) for m in shapes.teachers]
    references = [abstract_model(m.config, mesh, **kw) for m in shapes.references]
    opt = optim.from_config(config.optimizer, config.train.num_steps)
    graphdef = lambda m: nnx.split(m, nnx.Param)[0]
    cfg = trainer.step_config(
        config,
        student=graphdef(student),
        teachers=[graphdef(m) for m in teachers],
        references=[graphdef(m) for m in references],
        reference_of=shapes.reference_of,
        vocab_size=shapes.vocab_size,
        mesh=mesh,
    )
    rows = s.rows
    params = abstract_sharded(nnx.split(student, nnx.Param)[1], mesh)
    state = train_step.TrainState(
        step=replicated(mesh, (), jnp.int32),
        params=params,
        opt_state=abstract_sharded(jax.eval_shape(opt.init, params), mesh),
    )
    frozen = train_step.Frozen(
        teachers=tuple(abstract_sharded(nnx.split(m, nnx.Param)[1], mesh) for m in teachers),
        references=tuple(abstract_sharded(nnx.split(m, nnx.Param)[1], mesh) for m in references),
    )
    P, T = s.prompt_len, s.max_new_tokens
    ints = lambda *shape: batch_spec(mesh, shape, jnp.int32)
    floats = lambda *shape: batch_spec(mesh, shape, jnp.float32)
    batch = Rollout(
        prompt_tokens=ints(rows, P),
        prompt_mask=ints(rows, P),
        tokens=ints(rows, T),
        mask=ints(rows, T),
        behaviour_logp=floats(rows, T),
        policy_logp=floats(rows, T),
        teacher=ints(rows),
        row_id=ints(rows),
        group_id=ints(rows),
    )
    L = P + T
    remat = config.memory.remat
    passes = 4 if remat == "full" else 3  # forward, backward (2x); `full` recomputes the forward
    one = lambda c, r: forward_flops(c, rows=r, queries=L, keys=L, logits=T)
    flops = passes * one(shapes.student.config, rows)
    n = config.rollout.num_samples
    blocks = [p * n for p in trainer.teacher_batch_sizes(config)]  # each teacher's own rows
    for k, (teacher, block) in enumerate(zip(shapes.teachers, blocks, strict=True)):
        flops += one(teacher.config, block)
        if shapes.reference_of[k] is not None:
            flops += one(shapes.references[shapes.reference_of[k]].config, block)
    dtype, pdt = kw["dtype"], jnp.dtype(kw["param_dtype"]).itemsize
    # Every microbatch reads every model's (gathered) weights again.
    microbatches = rows // (cfg.microbatch_rows or rows)
    frozen_weights = sum(
        _weights_bytes(m.config, dtype, mesh) for m in (*shapes.teachers, *shapes.references)
    )
    floor = microbatches * (passes * _weights_bytes(shapes.student.config, dtype, mesh))
    floor += microbatches * frozen_weights
    # Optimizer update: params, gradients and both moments read and written (about 10 passes).
    floor += 10 * shapes.student.config.num_params() * pdt / mesh.size
    return Program(
        "train_step",
        train_step.train_step,
        (cfg, opt, state, frozen, batch),
        {},
        rows,
        P,
        T,
        s.microbatch_rows,
        flops,
        floor,
    )


def sampler_rows(config, mesh: Mesh, rows: int | None = None) -> int:
    """Rows of one sampler call: `rows` (default the rollout's), padded to the batch shards as
    `sharding.place_rows` pads them."""
    rows = settings(config).rows if rows is None else rows
    return -(-rows // batch_shards(mesh)) * batch_shards(mesh)


def _cache_specs(model, mesh: Mesh, rows: int, length: int) -> Any:
    """The abstract KV cache of `model.init_cache(rows, length)`, sharded by its logical axes."""
    cache = jax.eval_shape(lambda: model.init_cache(rows, length))

    def one(x):
        axes = ("batch", "kv_heads", "cache_length", "head_dim")
        axes = ("layers", *axes) if x.ndim == 5 else axes
        where = sharding.logical_sharding(mesh, axes, x.shape)
        return jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=where)

    return jax.tree.map(one, cache)


def sampler_programs(
    config, shapes: Shapes, mesh: Mesh, rows: int | None = None
) -> tuple[Program, Program]:
    """The sampler's prefill and decode loop at the rollout shapes (`rows` overrides the rows
    of a call; they are padded to the batch shards)."""
    s = settings(config)
    rows = sampler_rows(config, mesh, rows)
    P, T = s.prompt_len, s.max_new_tokens
    kw = model_kwargs(config)
    model = abstract_model(shapes.student.config, mesh, **kw)
    graphdef, params, rest = nnx.split(model, nnx.Param, ...)
    params = abstract_sharded(params, mesh)
    r = config.rollout
    cache_length = P + T - 1
    eos = shapes.student.config.eos_token_ids
    static = sampling.SamplerStatic(
        cache_length=cache_length, vocab_size=shapes.vocab_size, mesh=mesh
    )
    loop_static = dataclasses.replace(
        static,
        max_new_tokens=T,
        greedy=r.temperature == 0,
        top_k=int(r.top_k),
        use_top_p=r.top_p < 1.0,
        stop_ids=tuple(sorted(set(eos))),
    )
    prompt = batch_spec(mesh, (rows, P), jnp.int32)
    key = jax.eval_shape(lambda: jax.random.key(0))
    cfg, dtype = shapes.student.config, kw["dtype"]
    itemsize = jnp.dtype(dtype).itemsize
    cache_bytes = 2 * cfg.num_layers * rows * cfg.num_kv_heads * cache_length * cfg.head_dim
    cache_bytes *= itemsize / mesh.size
    weights = _weights_bytes(cfg, dtype, mesh)
    prefill_program = Program(
        "prefill",
        sampling.prefill,
        (graphdef, params, rest, prompt, prompt),
        {"static": static},
        rows,
        P,
        T,
        None,
        forward_flops(cfg, rows=rows, queries=P, keys=cache_length, logits=1),
        weights + cache_bytes,
    )
    decode_args = (
        graphdef,
        params,
        rest,
        _cache_specs(model, mesh, rows, cache_length),
        batch_spec(mesh, (rows, shapes.vocab_size), jnp.float32),
        prompt,
        batch_spec(mesh, (rows,), jnp.int32),
        replicated(mesh, (), key.dtype),
        replicated(mesh, (), jnp.float32),
        replicated(mesh, (), jnp.float32),
    )
    steps = max(T - 1, 1)  # the first token is sampled from the prefill's logits
    decode_program = Program(
        "decode",
        sampling.decode_loop,
        decode_args,
        {"static": loop_static},
        rows,
        P,
        T,
        None,
        steps * forward_flops(cfg, rows=rows, queries=1, keys=cache_length, logits=1),
        steps * (weights + cache_bytes),
    )
    return prefill_program, decode_program


def build_program(name: str, config, shapes: Shapes, mesh: Mesh) -> Program:
    """Program `name` (one of `PROGRAMS`) of `config` on `mesh`; ValueError for a setting the
    trainer refuses (e.g. microbatches that do not split the batch)."""
    if name == "train_step":
        return train_step_program(config, shapes, mesh)
    if name in ("prefill", "decode"):
        return sampler_programs(config, shapes, mesh)[name == "decode"]
    raise ValueError(f"unknown program {name!r}; valid: {', '.join(PROGRAMS)}")


# ------------------------------------------------------------------------------ compile


@dataclasses.dataclass
class Result:
    """What compiling one program for one target showed (bytes and FLOPs per chip).

    `peak_bytes` = arguments + outputs - aliased (donated) + temporaries: what the device holds
    while the program runs, compared with `hbm_fraction` x `hbm_bytes` for `fits`.

    `error` is set, in plain words, when the program does not fit or failed to compile; the
    byte counts are then None."""

    program: str
    topology: str
    chips: int
    compiled_for: str  # "TPU v5p" or "XLA:CPU (estimate for NVIDIA H100 SXM 80GB)"
    rows: int
    rows_per_device: float
    prompt_len: int
    max_new_tokens: int
    microbatch_rows: int | None
    hbm_bytes: float
    hbm_fraction: float
    peak_bytes: float | None = None
    argument_bytes: float | None = None
    output_bytes: float | None = None
    alias_bytes: float | None = None
    temp_bytes: float | None = None
    xla_peak_bytes: float | None = None  # XLA's own heap-simulation peak, for reference
    flops: float | None = None  # XLA's cost analysis: every loop body counted once
    flops_analytic: float = 0.0  # the models' FLOPs, per chip
    bytes_accessed: float | None = None  # XLA's cost analysis (loop bodies once)
    bytes_floor: float = 0.0
    roofline_seconds: float | None = None
    compile_seconds: float | None = None
    fits: bool = False
    error: str | None = None
    required_bytes: float | None = None  # after an out-of-memory: what XLA said it needs

    def to_json(self) -> dict[str, Any]:
        return dataclasses.asdict(self)


_OOM_TEMPORARIES = re.compile(
    r"HLO temporaries \(([\d.]+)\s*([KMGTP]?)\S*\) exceeds available HBM \(([\d.]+)\s*([KMGTP]?)"
)
_OOM_USED = re.compile(r"Used ([\d.]+)([KMGTP]?)\S* of ([\d.]+)([KMGTP]?)\S* hbm")

KNOBS = {
    "train_step": (
        "memory.microbatch_rows (fewer rows per device per microbatch), memory.remat='full' "
        "(recompute each layer in the backward), memory.logits_chunk (e.g. 1024: bounds the "
        "[rows, T, vocab] logits), memory.attention_chunk, a larger mesh.fsdp or mesh.tensor "
        "(splits the weights further), or a smaller rollout.max_new_tokens"
    ),
    "prefill": (
        "a smaller data.batch_size (the sampler takes all data.batch_size x rollout.num_samples "
        "rows in one call; optimizer.grad_accum keeps the prompts per update), a smaller "
        "rollout.max_new_tokens (the KV cache holds prompt + new tokens), or more chips per "
        "batch (mesh.data x mesh.fsdp)"
    ),
}
KNOBS["decode"] = KNOBS["prefill"]


def _fmt(n: float | None) -> str:
    return "?" if n is None else f"{n / GIB:.2f} GiB"


def out_of_memory_bytes(error: str) -> tuple[float | None, float | None]:
    """(bytes needed, bytes available) per chip from an XLA out-of-memory message."""
    m = _OOM_TEMPORARIES.search(error) or _OOM_USED.search(error)
    if not m:
        return None, None
    return parse_size(*m.group(1, 2)), parse_size(*m.group(3, 4))


def out_of_memory_message(program: str, topology: str, error: str) -> str:
    """Plain words for an XLA compile-time out-of-memory error: what exceeded what, by how much,
    and the knobs that help."""
    m = _OOM_TEMPORARIES.search(error)
    if m:
        need, have = parse_size(*m.group(1, 2)), parse_size(*m.group(3, 4))
        what = f"its temporaries need {_fmt(need)} per chip"
    else:
        m = _OOM_USED.search(error)
        need, have = (parse_size(*m.group(1, 2)), parse_size(*m.group(3, 4))) if m else (None, None)
        what = f"it needs {_fmt(need)} per chip"
    over = f", {_fmt(need - have)} too much" if need is not None and have is not None else ""
    return (
        f"{program} does not fit on {topology}: {what}, more than the {_fmt(have)} of HBM a chip "
        f"has{over} (XLA refused it at compile time). Knobs that help: {KNOBS[program]}."
    )


def compile_program(
    program: Program, target: Target, mesh: Mesh, *, hbm_fraction: float = 0.9
) -> Result:
    """Lowers and compiles `program` for `target` and analyses it. An out-of-memory at compile
    time, or a peak above `hbm_fraction` of the chip's HBM, gives `fits=False` with the reason
    in `error`, never an exception; other compile errors are reported the same way."""
    chips = target.chips
    label = (
        target.chip.name if not target.estimate else f"XLA:CPU (estimate for {target.chip.name})"
    )
    result = Result(
        program=program.name,
        topology=target.name,
        chips=chips,
        compiled_for=label,
        rows=program.rows,
        rows_per_device=program.rows / batch_shards(mesh),
        prompt_len=program.prompt_len,
        max_new_tokens=program.max_new_tokens,
        microbatch_rows=program.microbatch_rows,
        hbm_bytes=target.hbm_bytes,
        hbm_fraction=hbm_fraction,
        flops_analytic=program.flops_analytic / chips,
        bytes_floor=program.bytes_floor,
    )
    start = time.perf_counter()
    try:
        compiled = program.fn.lower(*program.args, **program.kwargs).compile()
    except Exception as e:  # XLA reports an out-of-memory as a runtime error
        result.compile_seconds = time.perf_counter() - start
        text = str(e)
        if "RESOURCE_EXHAUSTED" in text or "out of memory" in text.lower():
            result.error = out_of_memory_message(program.name, target.name, text)
            result.required_bytes = out_of_memory_bytes(text)[0]
        else:
            first = text.strip().splitlines()[0] if text.strip() else type(e).__name__
            result.error = f"{program.name} failed to compile for {target.name}: {first[:500]}"
        return result
    result.compile_seconds = time.perf_counter() - start
    memory = compiled.memory_analysis()
    result.argument_bytes = float(memory.argument_size_in_bytes)
    result.output_bytes = float(memory.output_size_in_bytes)
    result.alias_bytes = float(memory.alias_size_in_bytes)
    result.temp_bytes = float(memory.temp_size_in_bytes)
    # What the device holds while the program runs: its arguments, its outputs that do not
    # reuse a donated argument's buffer, and the temporaries allocation (as MaxText counts).
    peak = result.argument_bytes + result.output_bytes - result.alias_bytes + result.temp_bytes
    result.peak_bytes = peak
    result.xla_peak_bytes = float(getattr(memory, "peak_memory_in_bytes", 0) or 0) or None
    cost = compiled.cost_analysis()
    cost = cost[0] if isinstance(cost, list | tuple) else (cost or {})
    result.flops = float(cost.get("flops", 0.0))
    result.bytes_accessed = float(cost.get("bytes accessed", 0.0))
    memory_bytes = max(result.bytes_accessed, program.bytes_floor)
    result.roofline_seconds = max(
        result.flops_analytic / target.chip.bf16_flops, memory_bytes / target.chip.hbm_bandwidth
    )
    limit = hbm_fraction * target.hbm_bytes
    result.fits = peak <= limit
    if not result.fits:
        result.error = (
            f"{program.name} does not fit on {target.name}: its peak is {_fmt(peak)} per chip, "
            f"more than {hbm_fraction:.0%} of the {_fmt(target.hbm_bytes)} of HBM a chip has "
            f"({_fmt(peak - limit)} too much). Knobs that help: {KNOBS[program.name]}."
        )
    return result


def mesh_for(config: config_dict.ConfigDict, target: Target) -> Mesh:
    """The config's mesh (`config.mesh`) over the target's devices; ValueError naming the fix
    when its shape does not match the number of chips."""
    try:
        return sharding.make_mesh(dict(config.mesh), target.devices)
    except ValueError as e:
        raise ValueError(
            f"{target.name}: {e}; set --config.mesh.data/fsdp/tensor to a shape of "
            f"{target.chips} chips (one axis may be -1)"
        ) from None


def plan(
    config: config_dict.ConfigDict,
    target: Target,
    shapes: Shapes,
    programs: Sequence[str] = PROGRAMS,
    *,
    hbm_fraction: float = 0.9,
    on_result: Callable[[Result], None] | None = None,
) -> list[Result]:
    """Compiles `programs` of `config` for `target` (see the module docstring); one `Result`
    each, in order. `on_result` is called as each one is ready (compiles take minutes)."""
    unknown = [p for p in programs if p not in PROGRAMS]
    if unknown:
        raise ValueError(f"unknown program(s) {unknown}; valid: {', '.join(PROGRAMS)}")
    mesh = mesh_for(config, target)
    out = []
    for name in programs:
        try:
            program = build_program(name, config, shapes, mesh)
        except ValueError as e:
            out.append(refused(name, config, target, mesh, hbm_fraction, str(e)))
        else:
            out.append(compile_program(program, target, mesh, hbm_fraction=hbm_fraction))
            del program
        if on_result is not None:
            on_result(out[-1])
    return out


def refused(name: str, config, target: Target, mesh: Mesh, hbm_fraction: float, why: str):
    """The `Result` of a program the config cannot build on this mesh (nothing compiled)."""
    s = settings(config)
    return Result(
        program=name,
        topology=target.name,
        chips=target.chips,
        compiled_for="not compiled",
        rows=s.rows,
        rows_per_device=s.rows / batch_shards(mesh),
        prompt_len=s.prompt_len,
        max_new_tokens=s.max_new_tokens,
        microbatch_rows=s.microbatch_rows,
        hbm_bytes=target.hbm_bytes,
        hbm_fraction=hbm_fraction,
        error=f"{name} cannot be built for {target.name}: {why}",
    )


# ------------------------------------------------------------------------------ fit search


@dataclasses.dataclass
class Fit:
    """The largest value of one knob (`knob`) at which a program fits, the others as configured.

    `largest` is 0 when even the smallest value does not fit; `tried` maps each value compiled to
    whether it fitted."""

    program: str
    topology: str
    knob: str  # "microbatch_rows", "rows_per_device" (a sampler call's) or "max_new_tokens"
    largest: int
    configured: int  # the knob's value in the config
    at: dict[str, int]
    tried: dict[int, bool]

    def to_json(self) -> dict[str, Any]:
        return {"fit": self.knob, **dataclasses.asdict(self)}


# The row knob of each program: the train step's microbatches, the sampler's rows per call.
ROW_KNOB = {
    "train_step": "microbatch_rows",
    "prefill": "rows_per_device",
    "decode": "rows_per_device",
}


def largest_fitting(
    fits: Callable[[int], bool], candidates: Sequence[int], start: int
) -> tuple[int, dict[int, bool]]:
    """The largest of `candidates` with `fits(value)`, assuming fitting is monotone: from the
    largest candidate <= `start`, doubling (or halving) until the answer is bracketed, then
    bisection between the two. 0 if the smallest candidate does not fit. Returns (value,
    {value: fitted} for every value tried, each one compile)."""
    values = sorted(set(candidates))
    if not values:
        return 0, {}
    tried: dict[int, bool] = {}

    def ok(i: int) -> bool:
        if values[i] not in tried:
            tried[values[i]] = fits(values[i])
        return tried[values[i]]

    at_most = lambda v: max([i for i, x in enumerate(values) if x <= v], default=0)
    at_least = lambda v: min([i for i, x in enumerate(values) if x >= v], default=len(values) - 1)
    i = at_most(start)
    lo, hi = (i, None) if ok(i) else (None, i)
    while lo is not None and hi is None and lo < len(values) - 1:  # double up
        j = max(at_least(2 * values[lo]), lo + 1)
        lo, hi = (j, None) if ok(j) else (lo, j)
    while hi is not None and lo is None and hi > 0:  # halve down
        j = min(at_most(values[hi] // 2), hi - 1)
        lo, hi = (j, hi) if ok(j) else (None, j)
    if lo is None:
        return 0, tried
    while hi is not None and hi - lo > 1:
        mid = (lo + hi) // 2
        lo, hi = (mid, hi) if ok(mid) else (lo, mid)
    return values[lo], tried


def fit(
    config: config_dict.ConfigDict,
    target: Target,
    shapes: Shapes,
    program: str,
    knob: str,
    *,
    hbm_fraction: float = 0.9,
    token_step: int = 256,
    rows_per_device: int | None = None,
    on_try: Callable[[Result], None] | None = None,
) -> Fit:
    """The largest value of `knob` at which `program` fits within `hbm_fraction` of the HBM,
    every other setting as configured: "rows" is `memory.microbatch_rows` for the train step
    and the rows per device of one call for the sampler (at the configured max_new_tokens);
    "max_new_tokens" is `rollout.max_new_tokens`, a multiple of `token_step`, at
    `rows_per_device` (default: as configured; e.g. the rows a "rows" search found). Each value
    tried is one compile, so this takes several times as long as `plan`."""
    if knob not in ("rows", "max_new_tokens"):
        raise ValueError(f"knob must be 'rows' or 'max_new_tokens'; got {knob!r}")
    mesh = mesh_for(config, target)
    shards = batch_shards(mesh)
    s = settings(config)
    per_device = -(-s.rows // shards)
    train = program == "train_step"
    micro = "memory.microbatch_rows"

    def compile_with(cfg, rows_per_device: int) -> Result:
        if train:
            built = train_step_program(with_fields(cfg, **{micro: rows_per_device}), shapes, mesh)
        else:
            pair = sampler_programs(cfg, shapes, mesh, rows_per_device * shards)
            built = pair[0] if program == "prefill" else pair[1]
        result = compile_program(built, target, mesh, hbm_fraction=hbm_fraction)
        if on_try is not None:
            on_try(result)
        return result

    def valid_microbatch(v: int) -> bool:  # rows per device the train step accepts
        try:
            return trainer.microbatch_rows(with_fields(config, **{micro: v}), mesh) is not None
        except ValueError:
            return False

    configured_rows = (s.microbatch_rows or per_device) if train else per_device
    if knob == "rows":
        fits = lambda v: compile_with(config, v).fits
        candidates = (
            [v for v in range(1, per_device + 1) if valid_microbatch(v)]
            if train
            else range(1, 64 * per_device + 1)
        )
        largest, tried = largest_fitting(fits, candidates, configured_rows)
        configured, at = configured_rows, {"max_new_tokens": s.max_new_tokens}
    else:
        rows = rows_per_device or configured_rows
        fits = lambda v: (
            compile_with(with_fields(config, **{"rollout.max_new_tokens": v}), rows).fits
        )
        cap = max(token_step, shapes.student.config.max_position_embeddings - s.prompt_len)
        candidates = range(token_step, cap + 1, token_step)
        largest, tried = largest_fitting(fits, candidates, s.max_new_tokens)
        configured, at = s.max_new_tokens, {ROW_KNOB[program]: rows}
    knob = ROW_KNOB[program] if knob == "rows" else knob
    return Fit(program, target.name, knob, largest, configured, at, tried)


# ------------------------------------------------------------------------------ report


def format_header(target: Target, config_name: str, mesh_shape: Mapping[str, int]) -> list[str]:
    mesh = " ".join(f"{k}={v}" for k, v in mesh_shape.items())
    return [f"opdplus-plan {config_name} on {target.describe()}", f"mesh {mesh}"]


COLUMNS = (
    ("program", 10),
    ("rows(/dev)", 14),
    ("prompt+new", 11),
    ("peak GiB", 9),
    ("HBM GiB", 8),
    ("args", 7),
    ("out", 7),
    ("temp", 7),
    ("fits", 5),
    ("TFLOP/chip model|XLA", 22),
    ("roofline s", 11),
    ("compile s", 9),
)


def format_table(results: Sequence[Result]) -> list[str]:
    """A fixed-width table of results, per chip: peak = args + out + temp GiB (out: outputs
    that do not reuse a donated argument), FLOPs as the models count them | as XLA counts them
    (loop bodies once)."""
    gib = lambda v: "-" if v is None else "<0.01" if v < 0.01 * GIB else f"{v / GIB:.3g}"
    lines = ["  ".join(name.ljust(width) for name, width in COLUMNS)]
    for r in results:
        tflop = f"{r.flops_analytic / 1e12:.3g} | " + (
            "-" if r.flops is None else f"{r.flops / 1e12:.3g}"
        )
        rows = f"{r.rows}({r.rows_per_device:g})"
        cells = (
            r.program,
            rows,
            f"{r.prompt_len}+{r.max_new_tokens}",
            gib(r.peak_bytes),
            f"{r.hbm_bytes / GIB:.1f}",
            gib(r.argument_bytes),
            gib(None if r.output_bytes is None else r.output_bytes - r.alias_bytes),
            gib(r.temp_bytes),
            "yes" if r.fits else "NO",
            tflop,
            "-" if r.roofline_seconds is None else f"{r.roofline_seconds:.3g}",
            "-" if r.compile_seconds is None else f"{r.compile_seconds:.1f}",
        )
        lines.append("  ".join(c.ljust(w) for c, (_, w) in zip(cells, COLUMNS, strict=True)))
    return lines


def format_fit(f: Fit) -> str:
    at = ", ".join(f"{k}={v}" for k, v in f.at.items())
    knob = "rows per device per sampler call" if f.knob == "rows_per_device" else f.knob
    if f.largest == 0:
        return f"{f.program} on {f.topology}: does not fit at any {knob} ({at})"
    tried = ", ".join(f"{v}{'' if ok else ' no'}" for v, ok in sorted(f.tried.items()))
    return (
        f"{f.program} on {f.topology}: largest {knob} that fits = {f.largest} ({at}; tried {tried})"
    )


def format_try(r: Result) -> str:
    """One line for a value the fit search compiled."""
    if r.peak_bytes is not None:
        peak = f"peak {r.peak_bytes / GIB:.1f} GiB"
    elif r.required_bytes is not None:
        peak = f"out of memory (temporaries {r.required_bytes / GIB:.1f} GiB)"
    else:
        peak = "failed"
    micro = "" if r.microbatch_rows is None else f", microbatch_rows={r.microbatch_rows}"
    return (
        f"tried {r.program}: {r.rows_per_device:g} rows/device{micro}, max_new_tokens="
        f"{r.max_new_tokens}: {peak}, {'fits' if r.fits else 'does not fit'} "
        f"({r.compile_seconds:.0f} s)"
    )
