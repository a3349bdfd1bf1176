"""JIT-compiled sampler: bucketed prefill, then a `lax.while_loop` decode over a donated KV cache.

`generate` left-pads the prompts to a bucket length (so one compilation serves many prompt
lengths), runs one jitted prefill that writes the prompt's keys/values into a preallocated cache,
then one jitted decode loop (no Python per token) that stops as soon as every row has emitted EOS
or a stop token. The two compiled programs are public, `prefill` and `decode_loop` (static
settings: `SamplerStatic`), so that they can be lowered ahead of time with abstract arguments
(`sampling.prefill.lower(graphdef, params, rest, tokens, mask, static=...)`). The model is
used as a pure function: its graphdef is a static argument and its params are ordinary
arguments, so the same compiled sampler serves updated student weights.

Two log-probs come back per sampled token (see `GenerateResult`):
  * `logprobs`: under the unmodified policy (temperature 1, no truncation): what OPD scores;
  * `sampling_logprobs`: under the distribution actually sampled from (after temperature, top-k,
    top-p): the behaviour log-probs of importance-sampling corrections (0 for greedy).

Randomness is per row: row b uses fold_in(rng, b) and step t fold_in(fold_in(rng, b), t), so a
row's sample depends neither on the rest of the batch nor on how the batch is sharded.
"""

from __future__ import annotations

import bisect
import dataclasses
import math
from collections.abc import Sequence
from functools import partial
from typing import Any

import flax.struct
import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from opdplus_jax import sharding
from opdplus_jax.scoring import (
    TRACE_COUNTS,
    ModelLike,
    gather_logprobs,
    positions_from_mask,
    split_model,
)

# Prompt lengths are padded up to one of these (powers of two, min 16).
DEFAULT_PROMPT_BUCKETS: tuple[int, ...] = tuple(2**i for i in range(4, 16))


@flax.struct.dataclass
class GenerateResult:
    """Output of `generate` (a pytree). B rows, T = max_new_tokens, P = the prompt bucket.

    Attributes:
      tokens: [B, T] int32 sampled tokens; `pad_token_id` after a row has finished.
      mask: [B, T] int32, 1 up to and including the row's EOS/stop token, 0 after.
      logprobs: [B, T] float32 log-prob of each token under the UNMODIFIED policy (temperature 1,
        no top-k/top-p): the student log-prob OPD uses. 0 where mask is 0.
      sampling_logprobs: [B, T] float32 log-prob under the distribution actually sampled from
        (after temperature, top-k, top-p): the behaviour log-prob for importance-sampling
        corrections. 0 for greedy decoding and where mask is 0.
      prompt_tokens: [B, P] int32 left-padded (bucketed) prompts; prompt_mask: [B, P] int32.
      num_steps: int32 scalar, number of decode steps run (< T when every row stopped early).
    """

    tokens: jax.Array
    mask: jax.Array
    logprobs: jax.Array
    sampling_logprobs: jax.Array
    prompt_tokens: jax.Array
    prompt_mask: jax.Array
    num_steps: jax.Array


# ----------------------------------------------------------------------------- distributions


def check_sampling_args(temperature: float, top_k: int, top_p: float) -> None:
    """ValueError naming the argument unless temperature >= 0 (finite), top_k >= 0 and top_p in
    (0, 1]."""
    if not (np.isfinite(temperature) and temperature >= 0):
        raise ValueError(
            f"temperature must be a finite number >= 0 (0 = greedy); got {temperature!r}"
        )
    check_int("top_k", top_k, 0, " (0 = no top-k truncation)")
    if not (0.0 < top_p <= 1.0):
        raise ValueError(f"top_p must be in (0, 1] (1 = no nucleus truncation); got {top_p!r}")


def _nucleus_mask(probs_BV, top_p):
    """Nucleus of each row without sorting: keep token i iff the mass of the strictly more
    probable tokens is < top_p (the sorted-prefix rule; tied tokens are kept or dropped together).

    Kept = {i : bits(p_i) >= T}, with T the smallest int32 threshold whose mass strictly above is
    < top_p, found by bisection over the bit patterns of the (non-negative, so monotone) float32
    probabilities: 32 masked sums over V instead of a full sort (which is ~30x slower on CPU).
    """
    bits_BV = jax.lax.bitcast_convert_type(probs_BV, jnp.int32)

    def bisect(_, lo_hi):
        lo_B, hi_B = lo_hi  # mass_above(lo) >= top_p > mass_above(hi)
        mid_B = lo_B + (hi_B - lo_B) // 2
        above_B = jnp.where(bits_BV > mid_B[:, None], probs_BV, 0.0).sum(-1)
        return jnp.where(above_B < top_p, lo_B, mid_B), jnp.where(above_B < top_p, mid_B, hi_B)

    hi_B = bits_BV.max(-1)
    _, hi_B = jax.lax.fori_loop(0, 32, bisect, (jnp.full_like(hi_B, -1), hi_B))
    return bits_BV >= hi_B[:, None]


def _truncate(scaled_BV, top_k: int, use_top_p: bool, top_p):
    """Candidates of the sampling distribution: (logits [B, K] with -inf outside, ids or None).

    Order as in Hugging Face: temperature (already applied), then top-k, then top-p on the
    renormalised top-k distribution. top-k keeps exactly k ids (ties broken by lower id); top-p
    keeps the shortest prefix of the sorted distribution whose mass reaches top_p (at least one).
    Without top-k the candidates are the whole vocabulary and the ids are None.
    """
    if top_k == 0:
        if use_top_p:
            keep_BV = _nucleus_mask(jax.nn.softmax(scaled_BV, axis=-1), top_p)
            scaled_BV = jnp.where(keep_BV, scaled_BV, -jnp.inf)
        return scaled_BV, None
    vals_BK, ids_BK = jax.lax.top_k(scaled_BV, min(top_k, scaled_BV.shape[-1]))  # sorted
    if use_top_p:
        probs_BK = jax.nn.softmax(vals_BK, axis=-1)
        mass_before_BK = jnp.cumsum(probs_BK, axis=-1) - probs_BK
        keep_BK = (mass_before_BK < top_p).at[:, 0].set(True)
        vals_BK = jnp.where(keep_BK, vals_BK, -jnp.inf)
    return vals_BK, ids_BK


def _gumbel_argmax(key, logits_BK):
    """argmax(logits + Gumbel noise) per row; the noise is materialised first (fused into the
    argmax reduction, XLA:CPU runs the logarithms unvectorised, ~3x slower)."""
    gumbel_BK = jax.vmap(lambda k: jax.random.gumbel(k, logits_BK.shape[-1:]))(key)
    return jnp.argmax(logits_BK + jax.lax.optimization_barrier(gumbel_BK), axis=-1)


def categorical(keys_B, step, logits_BK):
    """One exact draw per row from softmax(logits_BK), with the row's key folded with `step` (an
    int32 scalar, or [B]: each row's own step).

    Two-stage Gumbel-max: the K logits are split into G groups of about sqrt(K); a group is drawn
    with probability equal to its mass (Gumbel-max over the groups' logsumexps), then a token
    within it (Gumbel-max over its logits). The product is exactly softmax(logits), but it needs
    about 2 sqrt(K) Gumbel variates per row instead of K (the noise dominated the step's cost).
    """
    keys_B = jax.vmap(jax.random.fold_in, (0, 0 if jnp.ndim(step) else None))(keys_B, step)
    B, K = logits_BK.shape
    size = math.isqrt(K - 1) + 1  # ceil(sqrt(K))
    if size < 8:  # tiny vocabulary: plain Gumbel-max
        return _gumbel_argmax(keys_B, logits_BK).astype(jnp.int32)
    groups = -(-K // size)
    padded_BK = jnp.pad(logits_BK, ((0, 0), (0, groups * size - K)), constant_values=-jnp.inf)
    grouped_BGS = padded_BK.reshape(B, groups, size)
    group_keys_B, token_keys_B = jax.vmap(lambda k: tuple(jax.random.split(k)))(keys_B)
    group_B = _gumbel_argmax(group_keys_B, jax.nn.logsumexp(grouped_BGS, axis=-1))
    within_BS = jnp.take_along_axis(grouped_BGS, group_B[:, None, None], axis=1)[:, 0]
    return (group_B * size + _gumbel_argmax(token_keys_B, within_BS)).astype(jnp.int32)


def sampling_logprobs(
    logits: jax.Array, *, temperature: float = 1.0, top_k: int = 0, top_p: float = 1.0
) -> jax.Array:
    """Log-probs [..., V] (float32, -inf outside the kept set) of the distribution `generate`
    samples from for these logits. temperature=0 gives the greedy one-hot (log 1 at the argmax)."""
    check_sampling_args(temperature, top_k, top_p)
    logits = jnp.asarray(logits, jnp.float32)
    shape, V = logits.shape, logits.shape[-1]
    logits_BV = logits.reshape(-1, V)
    if temperature == 0:
        onehot = jax.nn.one_hot(jnp.argmax(logits_BV, -1), V, dtype=bool)
        return jnp.where(onehot, 0.0, -jnp.inf).reshape(shape)
    vals_BK, ids_BK = _truncate(logits_BV / temperature, top_k, top_p < 1.0, top_p)
    logp_BK = jax.nn.log_softmax(vals_BK, axis=-1)
    if ids_BK is None:
        return logp_BK.reshape(shape)
    out_BV = jnp.full_like(logits_BV, -jnp.inf)
    out_BV = jax.vmap(lambda o, i, v: o.at[i].set(v))(out_BV, ids_BK, logp_BK)
    return out_BV.reshape(shape)


def sample_step(logits_BV, keys_B, step, temperature, top_p, *, greedy, top_k, use_top_p):
    """Sample one token per row: (token [B] int32, policy logp [B], sampling logp [B])."""
    logits_BV = logits_BV.astype(jnp.float32)
    if greedy:
        tok_B = jnp.argmax(logits_BV, axis=-1).astype(jnp.int32)
        sample_logp_B = jnp.zeros(tok_B.shape, jnp.float32)
    else:
        vals_BK, ids_BK = _truncate(logits_BV / temperature, top_k, use_top_p, top_p)
        choice_B = categorical(keys_B, step, vals_BK)
        sample_logp_B = gather_logprobs(vals_BK, choice_B)
        tok_B = choice_B if ids_BK is None else jnp.take_along_axis(ids_BK, choice_B[:, None], -1)
        tok_B = tok_B.reshape(-1).astype(jnp.int32)
    return tok_B, gather_logprobs(logits_BV, tok_B), sample_logp_B


# ----------------------------------------------------------------------------- prompts


def bucket_length(length: int, buckets: Sequence[int] = DEFAULT_PROMPT_BUCKETS) -> int:
    """The smallest bucket >= length (ValueError if the prompt is longer than every bucket)."""
    buckets = sorted(buckets)
    i = bisect.bisect_left(buckets, length)
    if i == len(buckets):
        raise ValueError(
            f"a prompt has {length} tokens, longer than the largest prompt bucket "
            f"({buckets[-1]}); truncate the prompt or pass prompt_buckets with a bucket >= {length}"
        )
    return buckets[i]


def pad_prompts(
    prompts: Any,
    *,
    prompt_mask: Any = None,
    buckets: Sequence[int] = DEFAULT_PROMPT_BUCKETS,
    pad_token_id: int = 0,
) -> tuple[np.ndarray, np.ndarray]:
    """Left-pad ragged prompts to a bucket: (tokens [B, P] int32, mask [B, P] int32).

    `prompts` is a list of token-id lists, or a 2-D int array whose rows are whole prompts (or,
    with `prompt_mask`, whose real tokens are where the mask is 1, e.g. a padded batch).
    """
    if isinstance(prompts, np.ndarray | jax.Array) or prompt_mask is not None:
        arr = np.asarray(prompts)
        if arr.ndim != 2:
            raise ValueError(f"prompts as an array must be 2-D [B, L]; got shape {arr.shape}")
        if prompt_mask is not None:
            m = np.asarray(prompt_mask).astype(bool)
            if m.shape != arr.shape:
                raise ValueError(
                    f"prompt_mask must have the prompts' shape {arr.shape}; got {m.shape}"
                )
            rows = [row[keep] for row, keep in zip(arr, m, strict=True)]
        else:
            rows = list(arr)
    else:
        rows = [np.asarray(p) for p in prompts]
    if not rows:
        raise ValueError("prompts is empty; pass at least one prompt")
    for i, row in enumerate(rows):
        if row.ndim != 1 or row.size == 0:
            raise ValueError(
                f"prompt {i} is empty or not a flat list of token ids; every prompt needs at "
                "least one token (e.g. the BOS token)"
            )
        if not np.issubdtype(row.dtype, np.integer):
            raise ValueError(f"prompt {i} must hold integer token ids; got dtype {row.dtype}")
    bucket = bucket_length(max(r.size for r in rows), buckets)
    tokens = np.full((len(rows), bucket), pad_token_id, np.int32)
    mask = np.zeros((len(rows), bucket), np.int32)
    for i, row in enumerate(rows):
        tokens[i, bucket - row.size :] = row
        mask[i, bucket - row.size :] = 1
    return tokens, mask


# ----------------------------------------------------------------------------- compiled steps


@dataclasses.dataclass(frozen=True)
class SamplerStatic:
    """Static (hashed) settings of the compiled `prefill` / `decode_loop`: one compilation per
    value. `prefill` reads `cache_length`, `vocab_size` and `mesh`; `decode_loop` all fields.

    Attributes:
      cache_length: S, cache slots: the prompt bucket P plus max_new_tokens - 1.
      max_new_tokens: T, tokens sampled per row (the decode loop's length).
      greedy: argmax instead of sampling (temperature 0).
      top_k: top-k truncation (0 = off); use_top_p: whether nucleus truncation is on (its
        threshold is a traced argument).
      stop_ids: sorted token ids after which a row stops (EOS and stop tokens).
      pad_token_id: fills the tokens of finished rows.
      vocab_size: sample only ids below it (None = every logit column).
      mesh: the mesh whose batch axes split the rows (None: no constraints).
      kv_dtype: dtype name of the KV cache (None = the model's activation dtype); "bfloat16"
        halves a float32 model's cache.
      prefill_chunk: prefill the prompt this many positions at a time (0 = all at once), so that
        the prefill's activations are [B, chunk, ...] rather than [B, P, ...]; must divide P.
    """

    cache_length: int
    max_new_tokens: int = 0
    greedy: bool = False
    top_k: int = 0
    use_top_p: bool = False
    stop_ids: tuple[int, ...] = ()
    pad_token_id: int = 0
    vocab_size: int | None = None
    mesh: jax.sharding.Mesh | None = None
    kv_dtype: str | None = None
    prefill_chunk: int = 0

    def for_prefill(self) -> SamplerStatic:
        """Only the fields `prefill` reads (so that one prefill serves every decode setting)."""
        return SamplerStatic(
            cache_length=self.cache_length, vocab_size=self.vocab_size, mesh=self.mesh,
            kv_dtype=self.kv_dtype, prefill_chunk=self.prefill_chunk,
        )  # fmt: skip

    def constrain(self, x):
        """Shard dim 0 of `x` over the mesh's batch axes (no-op without a mesh)."""
        return sharding.constrain_rows(x, self.mesh)


@partial(jax.jit, static_argnames=("graphdef", "static"))
def prefill(graphdef, params, rest, prompt_tokens_BP, prompt_mask_BP, *, static: SamplerStatic):
    """Write the prompts' keys/values into a fresh cache (compiled; one program per shapes and
    `static`).

    Args:
      graphdef, params, rest: `scoring.split_model(model)` (graphdef static; params and rest
        pytrees of arrays, e.g. `jax.ShapeDtypeStruct`s when lowering ahead of time).
      prompt_tokens_BP: [B, P] int32 left-padded prompts (P: the bucket).
      prompt_mask_BP: [B, P] int32 (1 = real token).
      static: a `SamplerStatic`; `cache_length` (S >= P), `vocab_size`, `mesh`, `kv_dtype`
        and `prefill_chunk` matter.

    Returns:
      (logits [B, V'] float32 at the last prompt position, V' = `vocab_size` or the model's V;
      the model's KV cache with S slots, e.g. {"k", "v": [num_layers, B, K, S, H]}).
    """
    TRACE_COUNTS["prefill"] += 1
    model = nnx.merge(graphdef, params, rest)
    B, Pn = prompt_tokens_BP.shape
    chunk = static.prefill_chunk if 0 < static.prefill_chunk < Pn else Pn
    if Pn % chunk:
        raise ValueError(
            f"prefill_chunk={static.prefill_chunk} does not divide the prompt bucket {Pn}; use a "
            "power of two (the default buckets are powers of two) or 0 for one chunk"
        )
    cache = model.init_cache(B, static.cache_length, dtype=static.kv_dtype)
    kv_mask_BS = jnp.pad(prompt_mask_BP.astype(bool), ((0, 0), (0, static.cache_length - Pn)))
    kv_mask_BS = static.constrain(kv_mask_BS)
    positions_BP = positions_from_mask(prompt_mask_BP)

    def run_chunk(start, cache):  # positions [start, start + chunk) of every prompt
        tokens_BC, positions_BC = (
            jax.lax.dynamic_slice_in_dim(a, start, chunk, axis=1)
            for a in (prompt_tokens_BP, positions_BP)
        )
        return model.decode_hidden(tokens_BC, positions_BC, cache, start, kv_mask_BS)

    # Every chunk but the last only fills the cache; the last one's final position gives logits.
    cache = jax.lax.fori_loop(
        0, Pn // chunk - 1, lambda i, cache: run_chunk(i * chunk, cache)[1], cache
    )
    x_BCD, cache = run_chunk(Pn - chunk, cache)
    logits_B1V = model.logits(x_BCD[:, -1:])  # the output layer at the last position only
    return static.constrain(logits_B1V[:, 0, : static.vocab_size].astype(jnp.float32)), cache


@partial(jax.jit, static_argnames=("graphdef", "static"), donate_argnames=("cache",))
def decode_loop(graphdef, params, rest, cache, logits0_BV, prompt_mask_BP, row_ids_B, rng,
                temperature, top_p, *, static: SamplerStatic):  # fmt: skip
    """Sample `static.max_new_tokens` tokens per row (fewer steps if every row stops) in one
    `lax.while_loop` (compiled; one program per shapes and `static`). The cache is donated.

    Args:
      graphdef, params, rest: as for `prefill`.
      cache: the cache `prefill` returned (S = `static.cache_length` slots), donated.
      logits0_BV: [B, V'] float32, `prefill`'s last-position logits (the first token's).
      prompt_mask_BP: [B, P] int32, the prompts' mask given to `prefill`.
      row_ids_B: [B] int32 row ids: row b's randomness is fold_in(rng, row_ids_B[b]).
      rng: a typed `jax.random.key` (shape ()).
      temperature: float32 scalar (> 0; 1.0 for greedy, where it is unused).
      top_p: float32 scalar in (0, 1] (used when `static.use_top_p`).
      static: a `SamplerStatic` with every field set.

    Returns:
      ((tokens [B, T] int32, mask [B, T] int32, logprobs [B, T] float32, sampling_logprobs
      [B, T] float32, num_steps int32 scalar), cache): the arrays of `GenerateResult` and the
      final cache, which aliases the donated input buffers.
    """
    TRACE_COUNTS["decode"] += 1
    model = nnx.merge(graphdef, params, rest)
    B, Pn = prompt_mask_BP.shape
    T, c = static.max_new_tokens, static.constrain
    sample = partial(sample_step, temperature=temperature, top_p=top_p, greedy=static.greedy,
                     top_k=static.top_k, use_top_p=static.use_top_p)  # fmt: skip
    keys_B = jax.vmap(jax.random.fold_in, (None, 0))(rng, row_ids_B)
    stop_ids = jnp.asarray(static.stop_ids, jnp.int32)
    is_stop = lambda tok_B: (tok_B[:, None] == stop_ids[None, :]).any(-1)

    def batch_full(fill, dtype):  # a new [B, T] array, sharded like the batch
        return c(jnp.broadcast_to(jnp.full_like(row_ids_B, fill, dtype)[:, None], (B, T)))

    def record(arrays, step, sampled, alive_B):
        fills = (static.pad_token_id, 0, 0.0, 0.0)
        new = (*sampled[:1], alive_B.astype(jnp.int32), *sampled[1:])
        new = [jnp.where(alive_B, n, f)[:, None] for n, f in zip(new, fills, strict=True)]
        return tuple(c(jax.lax.dynamic_update_slice_in_dim(a, n, step, axis=1))
                     for a, n in zip(arrays, new, strict=True))  # fmt: skip

    def body(state):
        step, cache, kv_mask_BS, done_B, arrays = state
        write = Pn + step - 1  # cache slot of the token fed at this step (the previous sample)
        prev_B1 = jax.lax.dynamic_slice_in_dim(arrays[0], step - 1, 1, axis=1)
        kv_mask_BS = jax.lax.dynamic_update_slice_in_dim(
            kv_mask_BS, jnp.ones_like(prev_B1, bool), write, axis=1
        )
        positions_B1 = (lengths_B + step - 1)[:, None]
        x_B1D, cache = model.decode_hidden(prev_B1, positions_B1, cache, write, kv_mask_BS)
        sampled = sample(model.logits(x_B1D)[:, 0, : static.vocab_size], keys_B, step)
        arrays = record(arrays, step, sampled, ~done_B)
        return step + 1, cache, kv_mask_BS, done_B | is_stop(sampled[0]), arrays

    sampled = sample(logits0_BV, keys_B, 0)
    arrays = tuple(batch_full(f, d) for f, d in ((static.pad_token_id, jnp.int32), (0, jnp.int32),
                                                 (0, jnp.float32), (0, jnp.float32)))  # fmt: skip
    arrays = record(arrays, 0, sampled, jnp.ones_like(sampled[0], bool))
    kv_mask_BS = c(jnp.pad(prompt_mask_BP.astype(bool), ((0, 0), (0, static.cache_length - Pn))))
    lengths_B = prompt_mask_BP.astype(jnp.int32).sum(-1)
    state = (jnp.int32(1), cache, kv_mask_BS, is_stop(sampled[0]), arrays)
    cond = lambda state: (state[0] < T) & ~state[3].all()
    num_steps, cache, _, _, arrays = jax.lax.while_loop(cond, body, state)
    return (*arrays, num_steps), cache  # the cache aliases the donated input buffer


# ----------------------------------------------------------------------------- public API


def as_key(rng: Any) -> jax.Array:
    """A typed PRNG key from `jax.random.key(seed)`, a raw uint32[2] key or an int seed."""
    if isinstance(rng, int | np.integer):
        return jax.random.key(int(rng))
    rng = rng if isinstance(rng, jax.Array) else jnp.asarray(rng)
    if jnp.issubdtype(rng.dtype, jax.dtypes.prng_key) and rng.shape == ():
        return rng
    if rng.shape == (2,) and rng.dtype == jnp.uint32:
        return jax.random.wrap_key_data(rng)
    raise ValueError(
        f"rng must be jax.random.key(seed), a raw uint32[2] key or an int; got {rng!r}"
    )


def check_kv_dtype(kv_dtype: Any) -> str | None:
    """The name of a floating KV-cache dtype (None stays None: the model's activation dtype);
    ValueError naming the valid choices otherwise."""
    if kv_dtype is None:
        return None
    try:
        dtype = jnp.dtype(kv_dtype)
    except TypeError:
        dtype = None
    if dtype is None or not jnp.issubdtype(dtype, jnp.floating):
        raise ValueError(
            f"kv_dtype must be a floating dtype such as 'bfloat16' or 'float32' (None = the "
            f"model's activation dtype); got {kv_dtype!r}"
        )
    return dtype.name


def checked_request(
    *,
    max_new_tokens: int,
    temperature: float,
    top_p: float,
    top_k: int,
    eos_token_id: Any,
    stop_token_ids: Any,
    rng: Any,
    pad_token_id: int,
    vocab_size: int | None,
    mesh: jax.sharding.Mesh | None,
    kv_dtype: Any,
    prefill_chunk: int,
) -> tuple[SamplerStatic, jax.Array, jax.Array, jax.Array]:
    """The checked settings of a sampling call (`generate`'s and `continuous.generate`'s
    arguments of these names): (a `SamplerStatic` with every field but `cache_length` set, the
    typed key, temperature and top_p as float32 scalars). ValueError naming the argument."""
    check_sampling_args(temperature, top_k, top_p)
    max_new_tokens = check_int("max_new_tokens", max_new_tokens, 1)
    if vocab_size is not None:
        vocab_size = check_int("vocab_size", vocab_size, 1, " (or None for all logits)")
    greedy = temperature == 0
    if not greedy and rng is None:
        raise ValueError(
            "rng is required when temperature > 0: pass rng=jax.random.key(seed), a new key per "
            "call (or temperature=0 for greedy decoding)"
        )
    key = as_key(rng) if rng is not None else jax.random.key(0)
    eos = [] if eos_token_id is None else np.atleast_1d(eos_token_id).tolist()
    stop_ids = tuple(sorted({int(t) for t in (*eos, *stop_token_ids)}))
    if any(t < 0 for t in stop_ids):
        raise ValueError(f"eos_token_id and stop_token_ids must be >= 0; got {stop_ids}")
    static = SamplerStatic(
        cache_length=0, max_new_tokens=max_new_tokens, greedy=greedy, top_k=int(top_k),
        use_top_p=top_p < 1.0, stop_ids=stop_ids, pad_token_id=int(pad_token_id),
        vocab_size=vocab_size, mesh=mesh, kv_dtype=check_kv_dtype(kv_dtype),
        prefill_chunk=check_int("prefill_chunk", prefill_chunk, 0, " (0 = whole prompt)"),
    )  # fmt: skip
    temperature = jnp.float32(1.0 if greedy else temperature)
    return static, key, temperature, jnp.float32(top_p)


def check_int(name: str, value: Any, minimum: int, hint: str = "") -> int:
    """`value` as an int; ValueError naming `name` unless it is an int >= `minimum`."""
    if isinstance(value, bool) or not isinstance(value, int | np.integer) or value < minimum:
        raise ValueError(f"{name} must be an int >= {minimum}{hint}; got {value!r}")
    return int(value)


def generate(
    model: ModelLike,
    prompts: Any,
    *,
    max_new_tokens: int,
    temperature: float = 1.0,
    top_p: float = 1.0,
    top_k: int = 0,
    eos_token_id: int | Sequence[int] | None = None,
    stop_token_ids: Sequence[int] = (),
    rng: Any = None,
    pad_token_id: int = 0,
    prompt_buckets: Sequence[int] = DEFAULT_PROMPT_BUCKETS,
    prompt_mask: Any = None,
    vocab_size: int | None = None,
    mesh: jax.sharding.Mesh | None = None,
    kv_dtype: Any = None,
    prefill_chunk: int = 0,
) -> GenerateResult:
    """Sample up to `max_new_tokens` tokens per prompt with a compiled prefill + decode loop.

    Args:
      model: NNX causal LM with the `init_cache`/`decode_hidden`/`logits` interface of
        `opdplus_jax.models`, or its (graphdef, params[, rest]) split (so a trainer can pass
        updated params).
      prompts: list of token-id lists (ragged), or a 2-D int array of whole prompts (or of a
        padded batch, with `prompt_mask` marking real tokens).
      max_new_tokens: T, the length of the returned arrays.
      temperature: 0 = greedy (argmax); otherwise logits are divided by it before truncation.
      top_p, top_k: nucleus / top-k truncation (1.0 / 0 = off), applied after temperature.
      eos_token_id, stop_token_ids: a row finishes after emitting any of these (kept, mask 1).
        None / () = run all max_new_tokens steps.
      rng: jax.random.key (required when temperature > 0; use a fresh key per call).
      pad_token_id: fills prompt padding and the tokens after a row finished.
      prompt_buckets: allowed padded prompt lengths (one compilation per bucket).
      vocab_size: sample only ids below it, e.g. the tokenizer's vocabulary when the embedding
        is padded (151669 of 151936 rows); both log-probs are normalised over those ids (score
        with `token_logprobs(..., vocab_size=)` alike). None = every logit column.
      mesh: mesh to run on; default: the mesh the params are placed on, if any. The batch is
        split over its `data`/`fsdp` axes (padded with dummy rows to a multiple), the model as
        its params are sharded.
      kv_dtype: dtype of the KV cache (None = the model's activation dtype), e.g. "bfloat16".
      prefill_chunk: prefill long prompts this many positions at a time (0 = at once); a power
        of two, so that it divides the prompt bucket.

    Compiles once per (batch size, prompt bucket, max_new_tokens, greedy/top-k/top-p on-off,
    stop ids, vocab_size); temperature and top_p values are traced (no recompilation).
    """
    graphdef, params, rest = split_model(model)
    mesh = mesh if mesh is not None else sharding.infer_mesh(params)
    settings, key, temperature, top_p = checked_request(
        max_new_tokens=max_new_tokens, temperature=temperature, top_p=top_p, top_k=top_k,
        eos_token_id=eos_token_id, stop_token_ids=stop_token_ids, rng=rng,
        pad_token_id=pad_token_id, vocab_size=vocab_size, mesh=mesh, kv_dtype=kv_dtype,
        prefill_chunk=prefill_chunk,
    )  # fmt: skip
    tokens_np, mask_np = pad_prompts(
        prompts, prompt_mask=prompt_mask, buckets=prompt_buckets, pad_token_id=pad_token_id
    )
    B, Pn = tokens_np.shape
    tokens, mask, row_ids = sharding.place_rows(
        mesh, tokens_np, mask_np, np.arange(B, dtype=np.int32)
    )
    static = dataclasses.replace(settings, cache_length=Pn + settings.max_new_tokens - 1)
    logits0, cache = prefill(graphdef, params, rest, tokens, mask, static=static.for_prefill())
    (*outs, num_steps), _ = decode_loop(graphdef, params, rest, cache, logits0, mask, row_ids,
                                        key, temperature, top_p, static=static)  # fmt: skip
    outs = [x[:B] for x in (*outs, tokens, mask)]  # drop the rows added for the mesh
    return GenerateResult(*outs, num_steps=num_steps)
