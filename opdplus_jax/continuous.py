"""Continuous batching: a pool of decode slots, refilled inside one compiled loop.

The static sampler (`opdplus_jax.sampling.generate`) decodes every row of a call together until
the longest one stops, with a cache of the full length for every row. On long-tailed response
lengths most of that work is spent on rows that have already stopped. Here a fixed number of
slots (S, fewer than the rows R) decode together; when a slot's row stops, the next waiting row
takes the slot in the next step of the same `lax.while_loop`. No Python runs per token.

Each prompt is prefilled once: its n samples (`num_samples`) copy its keys and values from a
prompt cache when they are admitted (shared-prefix sampling), and their first tokens are drawn
from its prefill logits. So a call with N prompts, bucket P and T new tokens holds, per token of
KV (`kv_bytes_per_token`):

    N * P          (the prompt cache, kept for the whole call)
    S * (P + T - 1)  (the slot pool)

against R * (P + T - 1) for the static sampler (`kv_cache_bytes`; `max_slots` inverts it).

Samples do not depend on the schedule: row r is sampled with the keys of the static sampler
(fold_in(rng, r), folded with the step), its slot's cache holds the same keys and values in the
same positions (prompt at [0, P), token t's at P + t - 1) and masked slots contribute exactly 0,
so a row's tokens are the same for every slot count, admission order, mesh and as the static
sampler's (equal in tests; float rounding could in principle differ across batch sizes).

The model must accept a per-row `write_index` ([B]) in `decode_hidden` (`opdplus_jax.models`
does). `ContinuousEngine` (`opdplus_jax.rollout`) is the `RolloutEngine` over `generate`.
"""

from __future__ import annotations

import dataclasses
from functools import partial
from typing import Any, NamedTuple

import flax.struct
import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from opdplus_jax import sampling, sharding
from opdplus_jax.scoring import TRACE_COUNTS, ModelLike, split_model

# Rows admitted by the narrow admit of a loop step (the first fill, and a step that finds more
# free slots than this, fill every free slot): on long-tailed lengths rows stop one or two at
# a time, and a narrow admit gathers and scatters only this many prompts' keys and values.
DEFAULT_REFILL_WIDTH = 8
# Once every row is admitted, the pool halves each time at most half of it is live, this many
# times (each halving is one more compiled decode loop, at half the width).
DEFAULT_TAIL_HALVINGS = 3


@flax.struct.dataclass
class ContinuousResult:
    """Output of `generate` (a pytree): R = prompts x num_samples rows in prompt-major order
    (prompt i's samples are rows i * n .. i * n + n - 1), T = max_new_tokens, P = prompt bucket.

    Attributes:
      tokens, mask, logprobs, sampling_logprobs: [R, T], as `sampling.GenerateResult`'s.
      prompt_tokens, prompt_mask: [R, P] int32, each row's left-padded prompt.
      num_steps: int32 scalar, decode steps (each decodes every slot of the pool once).
      slot_steps: int32 scalar, the decode work in rows: the pool's width summed over steps.
      busy_steps: int32 scalar, slot-steps that decoded a live row (<= slot_steps).
      row_slot: [R] int32, the slot that decoded each row.
      row_start: [R] int32, the loop step at which each row was admitted (0: the first fill).
    """

    tokens: jax.Array
    mask: jax.Array
    logprobs: jax.Array
    sampling_logprobs: jax.Array
    prompt_tokens: jax.Array
    prompt_mask: jax.Array
    num_steps: jax.Array
    slot_steps: jax.Array
    busy_steps: jax.Array
    row_slot: jax.Array
    row_start: jax.Array


@dataclasses.dataclass(frozen=True)
class ContinuousStatic:
    """Static (hashed) settings of the compiled `continuous_loop`.

    Attributes:
      sampler: the `sampling.SamplerStatic` of the decode (every field set; `cache_length` is
        P + T - 1, the length of one slot).
      slots: S, rows decoded together (a multiple of the mesh's batch shards).
      num_samples: n, rows per prompt (row r answers prompt r // n).
      refill_width: the narrow admit's width: a step with at most this many free slots admits
        this many rows at most, one with more admits into every free slot.
      tail_halvings: how many times the pool may halve once every row is admitted.
    """

    sampler: sampling.SamplerStatic
    slots: int
    num_samples: int
    refill_width: int = DEFAULT_REFILL_WIDTH
    tail_halvings: int = DEFAULT_TAIL_HALVINGS


def kv_bytes_per_token(model_config: Any, dtype: Any) -> int:
    """Bytes of KV cache per token: 2 (keys, values) x layers x kv heads x head dim x itemsize."""
    c = model_config
    return 2 * c.num_layers * c.num_kv_heads * c.head_dim * jnp.dtype(dtype).itemsize


def kv_cache_bytes(
    model_config: Any,
    dtype: Any,
    *,
    prompt_len: int,
    max_new_tokens: int,
    slots: int,
    num_prompts: int = 0,
) -> int:
    """KV bytes of a call: `slots` slots of prompt_len + max_new_tokens - 1 tokens, plus the
    prompt cache of `num_prompts` prompts (continuous engine; 0 for the static sampler, whose
    `slots` are all its rows)."""
    tokens = num_prompts * prompt_len + slots * (prompt_len + max_new_tokens - 1)
    return kv_bytes_per_token(model_config, dtype) * tokens


def max_slots(
    model_config: Any,
    dtype: Any,
    budget_bytes: float,
    *,
    prompt_len: int,
    max_new_tokens: int,
    num_prompts: int = 0,
) -> int:
    """The most slots whose KV cache (`kv_cache_bytes`) fits `budget_bytes` (0 if none does)."""
    per_token = kv_bytes_per_token(model_config, dtype)
    room = budget_bytes / per_token - num_prompts * prompt_len
    return max(0, int(room // (prompt_len + max_new_tokens - 1)))


class _Slots(NamedTuple):
    """Per-slot decode state ([W] arrays, W the current pool width)."""

    row: jax.Array  # the row a slot decodes (R: none)
    t: jax.Array  # tokens sampled so far for that row
    tok: jax.Array  # the last sampled token, fed at the next step
    length: jax.Array  # the row's prompt length (its RoPE position offset)
    live: jax.Array  # the row has not stopped


class _State(NamedTuple):
    pool: Any  # the slot pool's KV cache, {"k", "v": [layers, W, K, C, H]}
    kv_mask: jax.Array  # [W, C] cache positions holding the slot's row
    slots: _Slots
    admitted: jax.Array  # rows admitted so far
    outs: tuple[jax.Array, ...]  # tokens, mask, logprobs, sampling_logprobs [R, T]
    steps: jax.Array  # decode steps run
    slot_steps: jax.Array  # sum over steps of the pool width (decode compute, in rows)
    busy: jax.Array  # sum over steps of the live slots (useful decode compute)
    row_slot: jax.Array  # [R]
    row_start: jax.Array  # [R]


@partial(jax.jit, static_argnames=("graphdef", "static"))
def continuous_loop(graphdef, params, rest, prompt_tokens_NP, prompt_mask_NP, order_R, rng,
                    temperature, top_p, *, static: ContinuousStatic):  # fmt: skip
    """Prefill each prompt once, then decode R = prompts x num_samples rows through
    `static.slots` slots (compiled; one program per shapes and `static`).

    While rows wait, a `lax.while_loop` admits them into freed slots and decodes every slot
    once per step. Once all are admitted, the pool is halved (the live rows' slots gathered
    into a pool of half the width) each time at most half its slots are live, down to
    `static.slots // 2**static.tail_halvings`: the long tail of the last rows runs at the width
    it needs instead of the whole pool's.

    Args:
      graphdef, params, rest: `scoring.split_model(model)`.
      prompt_tokens_NP, prompt_mask_NP: [N, P] int32 left-padded prompts (N >= R / n: prompts
        after the request's are mesh padding, never admitted).
      order_R: [R] int32, a permutation of the rows: the order in which rows are admitted.
      rng: a typed key; row r samples with fold_in(rng, r) as in `sampling.decode_loop`.
      temperature, top_p: float32 scalars, as for `sampling.decode_loop`.
      static: a `ContinuousStatic`.

    Returns:
      (tokens, mask, logprobs, sampling_logprobs: [R, T]; steps, slot_steps, busy: int32
      scalars; row_slot, row_start: [R] int32), the fields of `ContinuousResult`.
    """
    TRACE_COUNTS["continuous"] += 1
    model = nnx.merge(graphdef, params, rest)
    s = static.sampler
    N, P = prompt_tokens_NP.shape
    R, S, T, C = order_R.shape[0], static.slots, s.max_new_tokens, s.cache_length
    c = s.constrain
    sample = partial(sampling.sample_step, temperature=temperature, top_p=top_p,
                     greedy=s.greedy, top_k=s.top_k, use_top_p=s.use_top_p)  # fmt: skip
    stop_ids = jnp.asarray(s.stop_ids, jnp.int32)
    is_stop = lambda tok: (tok[:, None] == stop_ids[None, :]).any(-1)
    row_keys = lambda rows: jax.vmap(jax.random.fold_in, (None, 0))(rng, rows)

    # Shared prefix: each prompt's keys/values and first-token logits, computed once.
    logits0_NV, prompt_cache = sampling.prefill(
        graphdef, params, rest, prompt_tokens_NP, prompt_mask_NP,
        static=dataclasses.replace(s, cache_length=P).for_prefill(),
    )  # fmt: skip
    prompt_len_N = prompt_mask_NP.astype(jnp.int32).sum(-1)
    prompt_kv_mask_NC = jnp.pad(prompt_mask_NP.astype(bool), ((0, 0), (0, C - P)))

    def record(outs, rows, step, sampled):
        """Write sampled (token, policy logp, sampling logp) at [rows, step] (row R: dropped)."""
        tok, logp, slogp = sampled
        new = (tok, jnp.ones_like(tok), logp, slogp)
        return tuple(o.at[rows, step].set(v, mode="drop") for o, v in zip(outs, new, strict=True))

    def admit(st: _State, width: int) -> _State:
        """Give up to `width` free slots the next waiting rows: copy their prompt's cache in and
        draw their first token from its prefill logits."""
        slot_W = jnp.nonzero(~st.slots.live, size=width, fill_value=S)[0]  # free slots, in order
        next_W = st.admitted + jnp.arange(width, dtype=jnp.int32)
        ok_W = (slot_W < S) & (next_W < R)
        row_W = jnp.where(ok_W, order_R[jnp.minimum(next_W, R - 1)], R)
        slot_W = jnp.where(ok_W, slot_W, S)  # S and R index nothing: those writes are dropped
        group_W = jnp.minimum(row_W // static.num_samples, N - 1)
        pool = {
            k: v.at[:, slot_W, :, :P].set(prompt_cache[k][:, group_W], mode="drop")
            for k, v in st.pool.items()
        }
        sampled = sample(logits0_NV[group_W], row_keys(row_W), 0)
        live_W = ok_W & ~is_stop(sampled[0]) & (T > 1)
        new = _Slots(row_W, jnp.ones_like(row_W), sampled[0], prompt_len_N[group_W], live_W)
        slots = _Slots(
            *(a.at[slot_W].set(v, mode="drop") for a, v in zip(st.slots, new, strict=True))
        )
        return st._replace(
            pool=pool,
            kv_mask=st.kv_mask.at[slot_W].set(prompt_kv_mask_NC[group_W], mode="drop"),
            slots=slots,
            admitted=st.admitted + ok_W.sum(dtype=jnp.int32),
            outs=record(st.outs, row_W, 0, sampled),
            row_slot=st.row_slot.at[row_W].set(slot_W, mode="drop"),
            row_start=st.row_start.at[row_W].set(st.steps, mode="drop"),
        )

    def decode(st: _State) -> _State:
        """One token for every live slot (dead slots compute too, and write nothing)."""
        sl, width = st.slots, st.slots.live.shape[0]
        write_W = jnp.where(sl.live, P + sl.t - 1, C)  # the fed token's cache slot; C: dropped
        kv_mask = c(st.kv_mask.at[jnp.arange(width), write_W].set(True, mode="drop"))
        positions_W1 = (sl.length + sl.t - 1)[:, None]
        x_W1D, pool = model.decode_hidden(sl.tok[:, None], positions_W1, st.pool, write_W, kv_mask)
        sampled = sample(model.logits(x_W1D)[:, 0, : s.vocab_size], row_keys(sl.row), sl.t)
        done_W = is_stop(sampled[0]) | (sl.t + 1 >= T)
        slots = sl._replace(
            t=sl.t + sl.live, tok=jnp.where(sl.live, sampled[0], sl.tok), live=sl.live & ~done_W
        )
        return st._replace(
            pool=pool,
            kv_mask=kv_mask,
            slots=slots,
            outs=record(st.outs, jnp.where(sl.live, sl.row, R), sl.t, sampled),
            steps=st.steps + 1,
            slot_steps=st.slot_steps + width,
            busy=st.busy + sl.live.sum(dtype=jnp.int32),
        )

    def admit_and_decode(st: _State) -> _State:
        # Nothing to do while every slot is live; up to refill_width free slots are filled by a
        # narrow admit, more (a whole wave stopping at once, as with equal lengths) by a full one.
        free = S - st.slots.live.sum(dtype=jnp.int32)
        width = min(static.refill_width, S)
        branch = jnp.where(free == 0, 0, jnp.where(free <= width, 1, 2))
        branches = (lambda st: st, lambda st: admit(st, width), lambda st: admit(st, S))
        return decode(jax.lax.switch(branch, branches, st))

    def compact(st: _State, width: int) -> _State:
        """Gather the (at most `width`) live slots into a pool of `width` slots."""
        index_W = jnp.nonzero(st.slots.live, size=width, fill_value=0)[0]
        keep_W = jnp.arange(width) < st.slots.live.sum()
        slots = _Slots(*(a[index_W] for a in st.slots))
        slots = slots._replace(row=jnp.where(keep_W, slots.row, R), live=slots.live & keep_W)
        return st._replace(
            pool={k: v[:, index_W] for k, v in st.pool.items()},
            kv_mask=c(st.kv_mask[index_W]),
            slots=_Slots(*(c(a) for a in slots)),
        )

    zeros = lambda fill, dtype: c(jnp.full((S,), fill, dtype))
    fills = ((s.pad_token_id, jnp.int32), (0, jnp.int32), (0, jnp.float32), (0, jnp.float32))
    st = _State(
        pool=model.init_cache(S, C, dtype=s.kv_dtype),
        kv_mask=c(jnp.zeros((S, C), bool)),
        slots=_Slots(
            zeros(R, jnp.int32), *(zeros(0, jnp.int32) for _ in range(3)), zeros(False, bool)
        ),
        admitted=jnp.int32(0),
        outs=tuple(jnp.full((R, T), f, d) for f, d in fills),
        steps=jnp.int32(0),
        slot_steps=jnp.int32(0),
        busy=jnp.int32(0),
        row_slot=jnp.full((R,), S, jnp.int32),
        row_start=jnp.zeros((R,), jnp.int32),
    )
    st = admit(st, S)  # the first fill: every slot at once
    st = jax.lax.while_loop(lambda st: st.admitted < R, admit_and_decode, st)
    shards, width = sharding.batch_shards(s.mesh), S
    for _ in range(static.tail_halvings):
        half = -(-(width // 2) // shards) * shards
        if half >= width:
            break
        more_than = lambda st, half=half: st.slots.live.sum() > half
        st = compact(jax.lax.while_loop(more_than, decode, st), half)
        width = half
    st = jax.lax.while_loop(lambda st: st.slots.live.any(), decode, st)
    return (*st.outs, st.steps, st.slot_steps, st.busy, st.row_slot, st.row_start)


def generate(
    model: ModelLike,
    prompts: Any,
    *,
    max_new_tokens: int,
    num_samples: int = 1,
    slots: int = 64,
    temperature: float = 1.0,
    top_p: float = 1.0,
    top_k: int = 0,
    eos_token_id: int | list[int] | None = None,
    stop_token_ids: Any = (),
    rng: Any = None,
    pad_token_id: int = 0,
    prompt_buckets: Any = sampling.DEFAULT_PROMPT_BUCKETS,
    vocab_size: int | None = None,
    mesh: jax.sharding.Mesh | None = None,
    kv_dtype: Any = None,
    prefill_chunk: int = 0,
    order: Any = None,
    refill_width: int = DEFAULT_REFILL_WIDTH,
    tail_halvings: int = DEFAULT_TAIL_HALVINGS,
) -> ContinuousResult:
    """`num_samples` completions of each prompt, decoded `slots` rows at a time with refill.

    Arguments as `sampling.generate`'s, and:
      num_samples: n rows per prompt (rows prompt-major); the prompt is prefilled once.
      slots: S, rows decoded together; capped at the row count, rounded up to a multiple of the
        mesh's batch shards. The KV cache holds S slots (see the module docstring).
      order: admission order of the rows, a permutation of range(R) (default: row order). The
        samples do not depend on it; the schedule (`row_slot`, `row_start`) does.
      refill_width: the narrow admit's width: a step with at most this many free slots admits
        this many rows at most, one with more admits into every free slot.
      tail_halvings: times the pool may halve for the tail, once every row is admitted (0: the
        whole pool decodes until the last row stops).

    Compiles once per (prompt count, bucket, n, S, T, sampling switches, stop ids, vocab_size);
    temperature and top_p values are traced.
    """
    num_samples = sampling.check_int("num_samples", num_samples, 1)
    slots = sampling.check_int("slots", slots, 1, " (rows decoded together)")
    refill_width = sampling.check_int("refill_width", refill_width, 1)
    tail_halvings = sampling.check_int("tail_halvings", tail_halvings, 0)
    graphdef, params, rest = split_model(model)
    mesh = mesh if mesh is not None else sharding.infer_mesh(params)
    settings, key, temperature, top_p = sampling.checked_request(
        max_new_tokens=max_new_tokens, temperature=temperature, top_p=top_p, top_k=top_k,
        eos_token_id=eos_token_id, stop_token_ids=stop_token_ids, rng=rng,
        pad_token_id=pad_token_id, vocab_size=vocab_size, mesh=mesh, kv_dtype=kv_dtype,
        prefill_chunk=prefill_chunk,
    )  # fmt: skip
    tokens_np, mask_np = sampling.pad_prompts(
        prompts, buckets=prompt_buckets, pad_token_id=pad_token_id
    )
    N, P = tokens_np.shape
    R = N * num_samples
    order_np = np.arange(R, dtype=np.int32) if order is None else np.asarray(order)
    if order_np.shape != (R,) or not np.array_equal(np.sort(order_np), np.arange(R)):
        raise ValueError(
            f"order must be a permutation of the {R} rows (range({R})), the order in which rows "
            f"are admitted; got {np.asarray(order).tolist()!r:.200}"
        )
    shards = sharding.batch_shards(mesh)
    slots = -(-min(slots, R) // shards) * shards
    tokens, mask = sharding.place_rows(mesh, tokens_np, mask_np)
    sampler = dataclasses.replace(settings, cache_length=P + settings.max_new_tokens - 1)
    static = ContinuousStatic(sampler, slots, num_samples, refill_width, tail_halvings)
    outs = continuous_loop(graphdef, params, rest, tokens, mask, jnp.asarray(order_np, jnp.int32),
                           key, temperature, top_p, static=static)  # fmt: skip
    *arrays, num_steps, slot_steps, busy, row_slot, row_start = outs
    prompt_tokens = jnp.asarray(np.repeat(tokens_np, num_samples, axis=0))
    prompt_mask = jnp.asarray(np.repeat(mask_np, num_samples, axis=0))
    return ContinuousResult(*arrays, prompt_tokens, prompt_mask, num_steps, slot_steps, busy,
                            row_slot, row_start)  # fmt: skip
