"""Supervised fine-tuning (SFT) on worked solutions: how the demo's base and teacher are made.

    model = sft.train_sft("runs/demo/models/init", tokenizer, "runs/demo/data/train.jsonl",
                          steps=600, batch_size=64, seq_len=48, learning_rate=3e-3, seed=0)
    sft.save(model, tokenizer, "runs/demo/models/teacher")   # a normal HF checkpoint folder

The loss is the token-level cross-entropy of the solution and its EOS given the chat-templated
prompt (`data.SFTPipeline`'s `loss_mask`: token t is predicted from the logits at t - 1), averaged
over the batch's target tokens, with logits restricted to the tokenizer's vocabulary. The model is
a pure function inside one jitted, donated step (`nnx.split` -> graphdef, params); AdamW (optax,
float32) on a warm-up + cosine schedule with global-norm clipping. Given the same seed, data and
initial weights, a run is deterministic (seeded shuffling, no dropout).
"""

from __future__ import annotations

import functools
import os
import time
from collections.abc import Callable, Mapping, Sequence
from typing import Any

import jax
import jax.numpy as jnp
import optax
from flax import nnx

from opdplus_jax import data, models, optim, sharding
from opdplus_jax.tokenizer import Tokenizer

LogFn = Callable[[int, Mapping[str, float]], None]


def sft_loss(graphdef, params, batch, vocab_size: int) -> tuple[jax.Array, jax.Array]:
    """Mean cross-entropy over target tokens and the number of targets.

    `batch`: tokens, loss_mask, attention_mask, int32 [B, L] (right-padded).
    """
    model = nnx.merge(graphdef, params)
    tokens_BL = batch["tokens"]
    logits_BLV = model(tokens_BL, attention_mask_BL=batch["attention_mask"])
    logits_BLV = logits_BLV[:, :-1, :vocab_size].astype(jnp.float32)  # position t predicts t + 1
    targets_BL = tokens_BL[:, 1:]
    mask_BL = batch["loss_mask"][:, 1:].astype(jnp.float32)
    logp_BL = jnp.take_along_axis(
        jax.nn.log_softmax(logits_BLV, axis=-1), targets_BL[..., None], axis=-1
    )[..., 0]
    count = mask_BL.sum()
    return -(logp_BL * mask_BL).sum() / jnp.maximum(count, 1.0), count


@functools.partial(
    jax.jit,
    static_argnames=("graphdef", "opt", "vocab_size"),
    donate_argnames=("params", "opt_state"),
)
def sft_step(graphdef, opt, params, opt_state, batch, vocab_size: int):
    """One AdamW step on the SFT loss; returns (params, opt_state, metrics)."""
    (loss, count), grads = jax.value_and_grad(
        lambda p: sft_loss(graphdef, p, batch, vocab_size), has_aux=True
    )(params)
    updates, opt_state = opt.update(grads, opt_state, params)
    params = optax.apply_updates(params, updates)
    metrics = {"loss": loss, "grad_norm": optax.tree.norm(grads), "target_tokens": count}
    return params, opt_state, metrics


def make_optimizer(
    steps: int,
    learning_rate: float,
    *,
    warmup_steps: int | None = None,
    weight_decay: float = 0.0,
    grad_clip: float | None = 1.0,
    schedule: str = "cosine",
) -> optax.GradientTransformation:
    """Clip -> AdamW (b2 = 0.98) on a warm-up + cosine (or constant) schedule: the package's
    `optim.make_optimizer` with SFT's defaults; `warmup_steps` defaults to 5% of `steps`."""
    warmup = max(1, steps // 20) if warmup_steps is None else warmup_steps
    return optim.make_optimizer(
        steps,
        learning_rate=learning_rate,
        schedule=schedule,
        warmup_steps=warmup,
        weight_decay=weight_decay,
        b2=0.98,
        grad_clip=grad_clip,
    )


def print_log(step: int, metrics: Mapping[str, float]) -> None:
    """Default `log`: one line per logged step."""
    parts = " | ".join(f"{k} {v:.4g}" for k, v in metrics.items())
    print(f"  sft step {step:5d} | {parts}", flush=True)


def train_sft(
    model: nnx.Module | str | os.PathLike,
    tokenizer: Tokenizer | str | os.PathLike,
    source: str | os.PathLike | Sequence[Any],
    *,
    steps: int,
    batch_size: int,
    seq_len: int,
    learning_rate: float,
    seed: int = 0,
    warmup_steps: int | None = None,
    weight_decay: float = 0.0,
    grad_clip: float = 1.0,
    schedule: str = "cosine",
    system_prompt: str | None = None,
    mesh: jax.sharding.Mesh | None = None,
    log: LogFn | None = print_log,
    log_every: int = 100,
) -> nnx.Module:
    """Fine-tunes `model` on the `solution` of each record of `source` for `steps` steps.

    Args:
      model: a `CausalLM` (updated in place and returned) or a checkpoint folder (loaded in
        float32, on `mesh` if given).
      tokenizer: our `Tokenizer` or its folder (chat template, EOS, vocabulary size).
      source: a JSONL/Parquet path or a list of records / `Example`s with prompt and solution.
      steps, batch_size, seq_len: optimizer steps, sequences per step, padded length (longer
        sequences are dropped, counted in the pipeline's stats).
      learning_rate, warmup_steps, weight_decay, grad_clip, schedule: see `make_optimizer`.
      seed: data-order seed (the only randomness).
      mesh: shard the batch over its data/fsdp axes (and place the model's params if loaded here
        or not yet placed). None: default device.
      log: called as log(step, metrics) every `log_every` steps and at the last step, with the
        loss averaged since the previous call; None = silent.

    Returns the model with the fine-tuned params.
    """
    if steps < 1:
        raise ValueError(f"steps must be >= 1, got {steps}")
    if not isinstance(tokenizer, Tokenizer):
        tokenizer = Tokenizer.from_pretrained(tokenizer)
    if not isinstance(model, nnx.Module):
        model = models.from_pretrained(model, dtype=jnp.float32, mesh=mesh)
    elif mesh is not None:
        sharding.shard_module(model, mesh)
    vocab_size = tokenizer.vocab_size
    if model.config.vocab_size < vocab_size:
        raise ValueError(
            f"model embedding has {model.config.vocab_size} rows, fewer than the tokenizer's "
            f"{vocab_size} ids"
        )
    pipeline = data.sft_batches(
        source,
        tokenizer,
        seq_len=seq_len,
        batch_size=batch_size,
        seed=seed,
        system_prompt=system_prompt,
    )
    opt = make_optimizer(
        steps,
        learning_rate,
        warmup_steps=warmup_steps,
        weight_decay=weight_decay,
        grad_clip=grad_clip,
        schedule=schedule,
    )
    graphdef, params = nnx.split(model, nnx.Param)
    params = jax.tree.map(jnp.copy, params)  # donated below: keep the module's buffers valid
    opt_state = opt.init(params)
    keys = ("tokens", "loss_mask", "attention_mask")
    loss_sum, loss_n, start = 0.0, 0, time.perf_counter()
    for step in range(1, steps + 1):
        raw = next(pipeline)
        batch = {k: jnp.asarray(raw[k], jnp.int32) for k in keys}
        if mesh is not None:
            batch = sharding.shard_batch(batch, mesh)
        params, opt_state, metrics = sft_step(
            graphdef, opt, params, opt_state, batch, vocab_size=vocab_size
        )
        if log is not None:
            loss_sum += float(metrics["loss"])
            loss_n += 1
            if step % log_every == 0 or step == steps:
                log(
                    step,
                    {
                        "loss": loss_sum / loss_n,
                        "grad_norm": float(metrics["grad_norm"]),
                        "seconds": time.perf_counter() - start,
                    },
                )
                loss_sum, loss_n = 0.0, 0
    nnx.update(model, params)
    return model


def save(model: nnx.Module, tokenizer: Tokenizer, folder: str | os.PathLike) -> str:
    """Writes `model` and the tokenizer files into `folder`: a normal HF checkpoint folder."""
    folder = os.fspath(folder)
    models.save_pretrained(model, folder)
    tokenizer.save_pretrained(folder)
    return folder
