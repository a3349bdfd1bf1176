"""Per-token log-probs of completions under a model: the package's one scoring path.

Every log-prob of a sampled completion that OPD uses (the student's recompute inside the train
step, every teacher and reference, evaluation's KL, the demo's report) comes from
`completion_logprobs`: one causal forward over the concatenated [left-padded prompt | completion]
sequence that gathers, at every completion position, the float32 log-prob of the completion token
under the unmodified model (temperature 1, no truncation). It is traceable, so the fused train
step calls it inside its own jit; everything outside a jit calls `token_logprobs` (or
`rollout_logprobs` for a `Rollout`), which validates its input, places the rows on the params'
mesh and runs `completion_logprobs` compiled once per (architecture, shapes, vocab_size,
chunk_size). With `chunk_size` the output layer runs over chunks of completion positions, so at
most [B, chunk_size, V] logits are live, in the forward and in the backward.

Prompt and completion use the layout of `sampling.generate` and `rollout.Rollout`, so
`token_logprobs(student, r.prompt_tokens, r.prompt_mask, r.tokens, r.mask)` reproduces the
sampler's `logprobs` up to float32 rounding.

Models are used as pure functions: `split_model` turns an NNX module into (graphdef, params, rest);
the graphdef is a static (hashed) argument of the compiled function and the params are ordinary
arguments, so one compilation serves any weights of the same architecture.
"""

from __future__ import annotations

import collections
from functools import partial
from typing import Any

import jax
import jax.numpy as jnp
from flax import nnx

from opdplus_jax import sharding

# Number of times each compiled function has been traced (a Python side effect that runs only
# while tracing, so it counts compilations). Tests use it to check that repeated calls reuse the
# compiled code.
TRACE_COUNTS: collections.Counter[str] = collections.Counter()

ModelLike = Any  # an nnx.Module, or a (graphdef, params) / (graphdef, params, rest) tuple


def split_model(model: ModelLike) -> tuple[nnx.GraphDef, nnx.State, nnx.State]:
    """(graphdef, params, rest) of an NNX module, or of a (graphdef, params[, rest]) tuple.

    `rest` holds the non-`nnx.Param` variables (e.g. buffers); it is empty for most models.
    """
    if isinstance(model, nnx.Module):
        return nnx.split(model, nnx.Param, ...)
    if isinstance(model, tuple | list) and len(model) in (2, 3):
        graphdef, params, *rest = model
        if isinstance(graphdef, nnx.GraphDef):
            return graphdef, params, rest[0] if rest else nnx.State({})
    raise TypeError(
        "model must be an nnx.Module or a (graphdef, params) tuple from "
        f"nnx.split(model, nnx.Param); got {type(model).__name__}"
    )


def gather_logprobs(logits_BTV: jax.Array, tokens_BT: jax.Array) -> jax.Array:
    """log softmax(logits)[token] in float32, without materialising the full log-softmax.

    Computed as logit[token] - logsumexp(logits): one reduction and one gather over V.
    """
    logits_BTV = logits_BTV.astype(jnp.float32)
    lse_BT = jax.nn.logsumexp(logits_BTV, axis=-1)
    picked_BT = jnp.take_along_axis(logits_BTV, tokens_BT[..., None].astype(jnp.int32), -1)
    return picked_BT[..., 0] - lse_BT


def positions_from_mask(mask_BL: jax.Array) -> jax.Array:
    """RoPE positions of a left-padded row: 0.. over real tokens (pads get 0)."""
    return jnp.maximum(jnp.cumsum(mask_BL.astype(jnp.int32), axis=-1) - 1, 0)


def completion_hidden(model, prompt_tokens_BP, prompt_mask_BP, tokens_BT, mask_BT) -> jax.Array:
    """Final hidden states [B, T, D] that predict the completion tokens (traceable).

    One causal forward over [prompt | completion]; the state at position i predicts token i + 1,
    so completion token t is predicted at position P - 1 + t. `model.logits` of the result gives
    the completion's [B, T, V] logits (`completion_logprobs` and the full-vocabulary losses apply
    it chunk by chunk).
    """
    P, T = prompt_tokens_BP.shape[1], tokens_BT.shape[1]
    tokens_BL = jnp.concatenate([prompt_tokens_BP, tokens_BT], axis=1)
    mask_BL = jnp.concatenate([prompt_mask_BP, mask_BT], axis=1).astype(jnp.int32)
    x_BLD = model.hidden_states(
        tokens_BL, positions_BL=positions_from_mask(mask_BL), attention_mask_BL=mask_BL
    )
    return x_BLD[:, P - 1 : P - 1 + T]


def completion_logprobs(
    model,
    prompt_tokens_BP,
    prompt_mask_BP,
    tokens_BT,
    mask_BT,
    vocab_size: int | None = None,
    *,
    chunk_size: int | None = None,
) -> jax.Array:
    """log pi(y_t | prompt, y_<t) [B, T] (float32, 0 where mask_BT is 0) in one causal forward.

    Traceable (not jitted). The output layer runs at the T positions that predict the completion
    only (hidden states are sliced first), and the log-probs are gathered logits minus logsumexp
    (`gather_logprobs`), without a [B, P + T, V] logits or a [B, T, V] log-softmax array.

    `chunk_size` (None = all T positions at once) bounds the logits further: the final hidden
    states are computed once, then the output layer and the gather run over chunks of
    `chunk_size` completion positions (a `lax.map` of a `jax.checkpoint`ed function; T is padded
    to a multiple of the chunk and sliced back), so at most [B, chunk_size, V] float32 logits are
    live, in the forward and in the backward (which recomputes each chunk's logits). The result
    and its gradient equal the unchunked ones to float32 rounding; a chunk >= T is the unchunked
    path.
    """
    if chunk_size is not None and not (isinstance(chunk_size, int) and chunk_size >= 1):
        raise ValueError(
            f"chunk_size must be None (no chunking) or an int >= 1; got {chunk_size!r}"
        )
    T = tokens_BT.shape[1]
    x_BTD = completion_hidden(model, prompt_tokens_BP, prompt_mask_BP, tokens_BT, mask_BT)

    def chunk_logprobs(x_BCD, tokens_BC):
        return gather_logprobs(model.logits(x_BCD)[..., :vocab_size], tokens_BC)

    if chunk_size is None or chunk_size >= T:
        logp_BT = chunk_logprobs(x_BTD, tokens_BT)
    else:
        B, D = x_BTD.shape[0], x_BTD.shape[-1]
        n = -(-T // chunk_size)
        pad = n * chunk_size - T
        x_BNCD = jnp.pad(x_BTD, ((0, 0), (0, pad), (0, 0))).reshape(B, n, chunk_size, D)
        x_NBCD = x_BNCD.transpose(1, 0, 2, 3)
        tokens_NBC = jnp.pad(tokens_BT, ((0, 0), (0, pad))).reshape(B, n, chunk_size)
        tokens_NBC = tokens_NBC.transpose(1, 0, 2)
        # Rematerialised: the backward recomputes a chunk's logits instead of saving them.
        one = jax.checkpoint(lambda xs: chunk_logprobs(*xs), prevent_cse=False)
        logp_NBC = jax.lax.map(one, (x_NBCD, tokens_NBC))
        logp_BT = logp_NBC.transpose(1, 0, 2).reshape(B, n * chunk_size)[:, :T]
    return jnp.where(mask_BT.astype(bool), logp_BT, 0.0)


@partial(jax.jit, static_argnames=("graphdef", "vocab_size", "chunk_size"))
def _token_logprobs(
    graphdef,
    params,
    rest,
    prompt_tokens_BP,
    prompt_mask_BP,
    completion_tokens_BT,
    mask_BT,
    vocab_size,
    chunk_size,
):
    TRACE_COUNTS["token_logprobs"] += 1
    model = nnx.merge(graphdef, params, rest)
    return completion_logprobs(
        model,
        prompt_tokens_BP,
        prompt_mask_BP,
        completion_tokens_BT,
        mask_BT,
        vocab_size,
        chunk_size=chunk_size,
    )


def token_logprobs(
    model: ModelLike,
    prompt_tokens: jax.Array,
    prompt_mask: jax.Array,
    completion_tokens: jax.Array,
    completion_mask: jax.Array,
    *,
    vocab_size: int | None = None,
    chunk_size: int | None = None,
) -> jax.Array:
    """Float32 log-probs [B, T] of `completion_tokens` under `model` (0 where the mask is 0).

    Args:
      model: an NNX causal LM, or its (graphdef, params[, rest]) split.
      prompt_tokens, prompt_mask: [B, P] left-padded prompts (mask 1 = real token), P >= 1.
      completion_tokens, completion_mask: [B, T] completions right after the prompt (mask 1 up
        to and including EOS), e.g. `generate(...).tokens` and `.mask`.

      vocab_size: normalise over the first vocab_size logit columns only (the tokenizer's
        vocabulary of a padded embedding), as `generate(..., vocab_size=)` samples. None = all.
      chunk_size: completion positions per output-layer chunk (`completion_logprobs`): at most
        [B, chunk_size, V] logits are live. None = all T at once. The result is the same.

    The log-probs are those of the unmodified model (temperature 1, no top-k/top-p).
    """
    graphdef, params, rest = split_model(model)
    arrays = tuple(jnp.asarray(a) for a in (prompt_tokens, prompt_mask, completion_tokens,
                                            completion_mask))  # fmt: skip
    prompt_tokens, prompt_mask, completion_tokens, completion_mask = arrays
    if prompt_tokens.ndim != 2 or prompt_tokens.shape != prompt_mask.shape:
        raise ValueError(
            "prompt_tokens and prompt_mask must be 2-D [B, P] arrays of the same shape; got "
            f"{prompt_tokens.shape} and {prompt_mask.shape}"
        )
    if completion_tokens.ndim != 2 or completion_tokens.shape != completion_mask.shape:
        raise ValueError(
            "completion_tokens and completion_mask must be 2-D [B, T] arrays of the same shape; "
            f"got {completion_tokens.shape} and {completion_mask.shape}"
        )
    if prompt_tokens.shape[0] != completion_tokens.shape[0] or prompt_tokens.shape[1] < 1:
        raise ValueError(
            "prompt and completion must have the same batch size and the prompt at least one "
            f"position; got prompt {prompt_tokens.shape}, completion {completion_tokens.shape}"
        )
    placed = sharding.place_rows(
        sharding.infer_mesh(params), *(a.astype(jnp.int32) for a in arrays)
    )
    logp_BT = _token_logprobs(
        graphdef, params, rest, *placed, vocab_size=vocab_size, chunk_size=chunk_size
    )
    return logp_BT[: prompt_tokens.shape[0]]


def rollout_logprobs(
    model: ModelLike,
    rollout: Any,
    *,
    vocab_size: int | None = None,
    chunk_size: int | None = None,
) -> jax.Array:
    """`token_logprobs` of a `rollout.Rollout`'s completions (anything with `prompt_tokens`,
    `prompt_mask`, `tokens` and `mask` attributes): [B, T] float32, 0 where the mask is 0."""
    return token_logprobs(
        model,
        rollout.prompt_tokens,
        rollout.prompt_mask,
        rollout.tokens,
        rollout.mask,
        vocab_size=vocab_size,
        chunk_size=chunk_size,
    )
