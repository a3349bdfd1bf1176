"""The rollout seam: a typed `Rollout` batch and the `RolloutEngine` protocol that produces it.

Everything that samples from the student (the trainer's rollouts, evaluation, the demo's report,
the benchmarks) asks an engine for a `Rollout`, and everything that consumes one (the train step,
teacher and reference scoring, verifiers) reads its named fields. An engine is bound to one
architecture (its graphdef) and one set of `SamplingParams`; the weights are an argument of every
call, so the trainer passes the current student params each step and one compilation serves them
all. `StaticEngine` (the compiled bucketed prefill + `while_loop` decode of `opdplus_jax.sampling`)
decodes each call's rows together until the last stops; `ContinuousEngine` (the slot pool of
`opdplus_jax.continuous`) decodes a fixed number of rows at a time and refills a slot as soon as
its row stops, prefilling each prompt once for its samples. Another engine (an external server)
implements the same two methods and returns the same `Rollout`, in the order of its input
prompts. `make_engine` builds the one a config names (`rollout.engine`).

Row layout: prompt i's samples are rows i * n .. i * n + n - 1 (n = `num_samples`), so
`group_id = i` and `row_id = i * n + s`; the group baselines of `opdplus_jax.estimators` rely on
rows of one prompt being contiguous. Row `row_id` samples with the key fold_in(rng, row_id): a
row's tokens depend on neither the other rows nor the mesh.
"""

from __future__ import annotations

import copy
import dataclasses
from collections.abc import Sequence
from typing import Any, Protocol, runtime_checkable

import flax.struct
import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from opdplus_jax import continuous, sampling, scoring
from opdplus_jax.sampling import check_int


@flax.struct.dataclass
class Rollout:
    """A batch of sampled completions (a pytree; B = prompts x samples, P = prompt bucket,
    T = max_new_tokens).

    Attributes:
      prompt_tokens, prompt_mask: [B, P] int32 left-padded prompts (mask 1 = real token).
      tokens: [B, T] int32 sampled completions, the pad id after a row finished.
      mask: [B, T] int32, 1 up to and including the row's EOS/stop token, 0 after.
      behaviour_logp: [B, T] float32 log-probs under the distribution actually sampled from
        (after temperature, top-k, top-p): the behaviour policy of importance-sampling
        corrections; 0 for greedy decoding and where the mask is 0.
      policy_logp: [B, T] float32 log-probs under the unmodified sampling policy (temperature 1,
        no truncation) at sampling time; 0 where the mask is 0.
      teacher: [B] int32 index of the teacher that scores each row (0 with one teacher).
      row_id: [B] int32 position of the row in the request (prompt-major); keys its randomness.
      group_id: [B] int32 index of the row's prompt in the request.
      teacher_prompt_tokens, teacher_prompt_mask: [B, P'] left-padded prompts the teachers (and
        their references) score the completion after, when they differ from the student's
        (teacher-side context: a teacher's own chat template, privileged fields of the data
        row); None: the teachers score after `prompt_tokens`. See `for_teacher`.
      teacher_group, teacher_group_logp, teacher_group_mask: [B, T] for teachers with their own
        tokenizer (`opdplus_jax.crosstok`): each student token's aligned group index, and per
        group g (column g) the teacher's log-prob of the group's text and 1 for a real group.
        Rows of other teachers hold one group per token. None without such teachers.
    """

    prompt_tokens: jax.Array
    prompt_mask: jax.Array
    tokens: jax.Array
    mask: jax.Array
    behaviour_logp: jax.Array
    policy_logp: jax.Array
    teacher: jax.Array
    row_id: jax.Array
    group_id: jax.Array
    teacher_prompt_tokens: jax.Array | None = None
    teacher_prompt_mask: jax.Array | None = None
    teacher_group: jax.Array | None = None
    teacher_group_logp: jax.Array | None = None
    teacher_group_mask: jax.Array | None = None

    @property
    def num_rows(self) -> int:
        return self.tokens.shape[0]

    def for_teacher(self) -> Rollout:
        """The rollout as its teachers score it: their prompts in place of the student's (the
        same rollout without teacher prompts)."""
        if self.teacher_prompt_tokens is None:
            return self
        return self.replace(
            prompt_tokens=self.teacher_prompt_tokens, prompt_mask=self.teacher_prompt_mask
        )


@dataclasses.dataclass(frozen=True)
class SamplingParams:
    """How an engine samples (hashable): `sampling.generate`'s keyword arguments of that name.

    `stop_token_ids` end a row (EOS included); `vocab_size` restricts sampling and scoring to the
    tokenizer's ids of a padded embedding; temperature 0 is greedy decoding; `kv_dtype` (None =
    the model's) and `prefill_chunk` (0 = whole prompt) trade memory for precision and speed.
    """

    max_new_tokens: int
    temperature: float = 1.0
    top_p: float = 1.0
    top_k: int = 0
    stop_token_ids: tuple[int, ...] = ()
    pad_token_id: int = 0
    vocab_size: int | None = None
    kv_dtype: str | None = None
    prefill_chunk: int = 0

    def __post_init__(self):
        sampling.check_sampling_args(self.temperature, self.top_k, self.top_p)
        sampling.check_int("max_new_tokens", self.max_new_tokens, 1)
        sampling.check_int("prefill_chunk", self.prefill_chunk, 0, " (0 = whole prompt)")
        object.__setattr__(self, "kv_dtype", sampling.check_kv_dtype(self.kv_dtype))
        if self.vocab_size is not None:
            sampling.check_int("vocab_size", self.vocab_size, 1, " (or None for all logits)")

    def off_policy_fields(self) -> tuple[str, ...]:
        """The fields that make this distribution differ from the policy's own (temperature
        != 1, top-p < 1, top-k > 0); () when it samples the policy itself."""
        changed = (
            ("temperature", self.temperature != 1.0),
            ("top_p", self.top_p < 1.0),
            ("top_k", self.top_k > 0),
        )
        return tuple(name for name, differs in changed if differs)

    @classmethod
    def for_tokenizer(cls, tokenizer: Any, **fields: Any) -> SamplingParams:
        """Stop at the tokenizer's EOS ids, pad with its pad id, sample within its vocabulary."""
        return cls(
            stop_token_ids=tuple(int(t) for t in tokenizer.eos_ids),
            pad_token_id=int(tokenizer.pad_id),
            vocab_size=int(tokenizer.vocab_size),
            **fields,
        )


Prompts = Sequence[Sequence[int]]  # token ids of each prompt (ragged)


@runtime_checkable
class RolloutEngine(Protocol):
    """Produces rollouts from prompts and the current weights, and scores completions."""

    sampling: SamplingParams

    def generate(self, params, prompts: Prompts, *, rng, num_samples=1, teacher=None) -> Rollout:
        """`num_samples` completions of each prompt with weights `params` (rows prompt-major),
        row `row_id` keyed by fold_in(rng, row_id); `teacher[i]` scores prompt i's rows
        (default 0). `rng` may be None for greedy decoding."""
        ...

    def score(self, params: nnx.State, rollout: Rollout) -> jax.Array:
        """[B, T] float32 log-probs of the rollout's completions under these weights."""
        ...


def request_ids(num_prompts: int, num_samples: int, teacher: Any = None) -> tuple[jax.Array, ...]:
    """(teacher, row_id, group_id), each [num_prompts * num_samples] int32, of a prompt-major
    request; `teacher` holds one teacher index per prompt (default all 0)."""
    num_samples = sampling.check_int("num_samples", num_samples, 1)
    teacher = np.zeros(num_prompts, np.int32) if teacher is None else np.asarray(teacher)
    if teacher.shape != (num_prompts,) or not np.issubdtype(teacher.dtype, np.integer):
        raise ValueError(
            f"teacher must hold one integer teacher index per prompt ({num_prompts}); got "
            f"shape {teacher.shape}, dtype {teacher.dtype}"
        )
    rows = num_prompts * num_samples
    return (
        jnp.asarray(np.repeat(teacher.astype(np.int32), num_samples)),
        jnp.arange(rows, dtype=jnp.int32),
        jnp.asarray(np.repeat(np.arange(num_prompts, dtype=np.int32), num_samples)),
    )


class CompiledEngine:
    """What the compiled engines share: bound to an architecture (graphdef), `SamplingParams` and
    an optional mesh; `score` through `scoring.rollout_logprobs`. Subclasses add `generate`.

    Args:
      graphdef: the student architecture (`nnx.split(model, nnx.Param)[0]`).
      sampling: how to sample; `SamplingParams.for_tokenizer(tok, max_new_tokens=...)`.
      mesh: where to run; default the mesh the params are placed on, if any.
    """

    def __init__(
        self,
        graphdef: nnx.GraphDef,
        sampling: SamplingParams,
        *,
        mesh: jax.sharding.Mesh | None = None,
    ):
        if not isinstance(graphdef, nnx.GraphDef):
            name = type(self).__name__
            raise TypeError(
                f"{name} needs the model's graphdef (nnx.split(model, nnx.Param)[0]); got "
                f"{type(graphdef).__name__}. {name}.for_model(model, sampling) splits one."
            )
        self.graphdef = graphdef
        self.sampling = sampling
        self.mesh = mesh

    @classmethod
    def for_model(cls, model: nnx.Module, sampling: SamplingParams, **kw: Any):
        """(engine, params) of an NNX model."""
        graphdef, params = nnx.split(model, nnx.Param)
        return cls(graphdef, sampling, **kw), params

    def with_sampling(self, sampling: SamplingParams):
        """The same engine (architecture, mesh, engine settings) with other `SamplingParams`."""
        new = copy.copy(self)
        new.sampling = sampling
        return new

    def score(self, params: nnx.State, rollout: Rollout) -> jax.Array:
        return scoring.rollout_logprobs(
            (self.graphdef, params), rollout, vocab_size=self.sampling.vocab_size
        )


class StaticEngine(CompiledEngine):
    """The compiled sampler as a `RolloutEngine`: every row of a call decodes in one batch until
    all rows have stopped (or `max_new_tokens`), with a KV cache of the whole length per row.
    Arguments as `CompiledEngine`'s."""

    def generate(self, params, prompts: Prompts, *, rng, num_samples=1, teacher=None) -> Rollout:
        ids = request_ids(len(prompts), num_samples, teacher)
        rows = [p for p in prompts for _ in range(num_samples)]
        # SamplingParams' fields are `sampling.generate`'s keyword arguments.
        out = sampling.generate(
            (self.graphdef, params),
            rows,
            rng=rng,
            mesh=self.mesh,
            **dataclasses.asdict(self.sampling),
        )
        arrays = (out.prompt_tokens, out.prompt_mask, out.tokens, out.mask)
        return Rollout(*arrays, out.sampling_logprobs, out.logprobs, *ids)


class ContinuousEngine(CompiledEngine):
    """The continuous-batching sampler (`opdplus_jax.continuous`) as a `RolloutEngine`: `slots`
    rows decode together, a stopped row's slot takes the next waiting row inside the compiled
    loop, and each prompt is prefilled once for its samples. Samples are the same as
    `StaticEngine`'s for the same keys.

    Args:
      graphdef, sampling, mesh: as for `CompiledEngine`.
      slots: rows decoded together (capped at a call's rows; rounded up to the mesh's batch
        shards); the KV cache holds this many sequences (`continuous.kv_cache_bytes`).
    """

    def __init__(
        self,
        graphdef: nnx.GraphDef,
        sampling: SamplingParams,
        *,
        slots: int = 64,
        mesh: jax.sharding.Mesh | None = None,
    ):
        super().__init__(graphdef, sampling, mesh=mesh)
        self.slots = check_int("slots", slots, 1, " (rows decoded together)")

    def generate(self, params, prompts: Prompts, *, rng, num_samples=1, teacher=None) -> Rollout:
        ids = request_ids(len(prompts), num_samples, teacher)
        out = continuous.generate(
            (self.graphdef, params),
            prompts,
            num_samples=num_samples,
            slots=self.slots,
            rng=rng,
            mesh=self.mesh,
            **dataclasses.asdict(self.sampling),
        )
        arrays = (out.prompt_tokens, out.prompt_mask, out.tokens, out.mask)
        return Rollout(*arrays, out.sampling_logprobs, out.logprobs, *ids)


ENGINES: tuple[str, ...] = ("static", "continuous")


def make_engine(
    name: str,
    graphdef: nnx.GraphDef,
    sampling: SamplingParams,
    *,
    slots: int = 64,
    mesh: jax.sharding.Mesh | None = None,
) -> StaticEngine | ContinuousEngine:
    """The engine a config names (`rollout.engine`): "static" (`StaticEngine`) or "continuous"
    (`ContinuousEngine` with `slots`); ValueError naming both otherwise."""
    if check_engine(name) == "static":
        return StaticEngine(graphdef, sampling, mesh=mesh)
    return ContinuousEngine(graphdef, sampling, slots=slots, mesh=mesh)


def check_engine(name: Any) -> str:
    """`name` if it is one of `ENGINES`, else ValueError naming them."""
    if name not in ENGINES:
        raise ValueError(
            f"unknown rollout engine {name!r}; valid: 'static' (every row of a call decodes "
            "until the last stops) or 'continuous' (rollout.slots rows at a time, refilled as "
            "rows stop)"
        )
    return name
