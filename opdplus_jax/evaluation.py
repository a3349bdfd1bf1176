"""Held-out evaluation: accuracy and pass@k with the verifiers, and student-teacher KL.

`evaluate_policy` samples `num_samples` responses per problem through a rollout engine (greedy
when its temperature is 0), scores them with `opdplus_jax.verifiers`, and optionally scores the same
responses with a teacher to report the per-token KL(student || teacher) on the student's own
samples (the k1 estimate, mean over response tokens of log pi - log q).
"""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence
from typing import Any

import jax
import numpy as np

from opdplus_jax import verifiers
from opdplus_jax.rollout import Rollout, RolloutEngine
from opdplus_jax.tokenizer import Tokenizer


def pass_at_k(num_samples: int, num_correct: int, k: int) -> float:
    """Unbiased pass@k from n samples with c correct: 1 - C(n - c, k) / C(n, k)."""
    if num_samples - num_correct < k:
        return 1.0
    return 1.0 - math.comb(num_samples - num_correct, k) / math.comb(num_samples, k)


def evaluate_policy(
    engine: RolloutEngine,
    params: Any,
    tokenizer: Tokenizer,
    examples: Sequence[dict],
    prompts: Sequence[Sequence[int]],
    *,
    num_samples: int = 1,
    batch_size: int = 32,
    rng: jax.Array | None = None,
    teacher_logprobs: Callable[[Rollout], Any] | None = None,
    progress: Callable[[int], Any] | None = None,
) -> dict[str, float]:
    """Accuracy, pass@k (k = 1, 2, 4, ... <= num_samples), response length, KL to a teacher.

    Args:
      engine: samples the responses (its `SamplingParams`: temperature 0 = greedy, length).
      params: the policy's weights, as the engine takes them.
      examples: one dict per problem with at least `answer` (and `task`/`domain` for dispatch).
      prompts: the chat-templated prompt token ids of each problem.
      batch_size: rows per engine call; the last call is padded to it so one compilation serves
        every call.
      rng: required when the engine samples (temperature > 0); call k uses fold_in(rng, k's
        first row).
      teacher_logprobs: optional callable (rollout) -> [B, T] teacher log-probs of the sampled
        tokens; enables `kl_per_token`, a k1 estimate that is a KL only on samples of the
        policy itself (temperature 1, no truncation).
      progress: optional callable(n) advanced by the number of problems done.
    """
    if len(examples) != len(prompts):
        raise ValueError(f"{len(examples)} examples but {len(prompts)} prompts")
    if engine.sampling.temperature > 0 and rng is None:
        raise ValueError("rng is required when temperature > 0")
    correct = np.zeros((len(examples), num_samples), np.float32)
    stats = verifiers.VerifierStats()
    lengths, kl_sum, kl_count = [], 0.0, 0.0
    rows = [(i, s) for i in range(len(examples)) for s in range(num_samples)]
    for start in range(0, len(rows), batch_size):
        chunk = rows[start : start + batch_size]
        batch_prompts = [list(prompts[i]) for i, _ in chunk]
        pad = batch_size - len(chunk)  # pad to a fixed batch so one compilation serves all
        batch_prompts += [batch_prompts[-1]] * pad
        key = None if rng is None else jax.random.fold_in(rng, start)
        rollout = engine.generate(params, batch_prompts, rng=key)
        tokens, mask = np.asarray(rollout.tokens), np.asarray(rollout.mask)
        texts = tokenizer.batch_decode(
            [t[m > 0].tolist() for t, m in zip(tokens, mask, strict=True)]
        )
        scores, _ = verifiers.batch_verify(
            texts[: len(chunk)], [examples[i] for i, _ in chunk], stats=stats
        )
        for (i, s), score in zip(chunk, scores, strict=True):
            correct[i, s] = score
        lengths.extend(mask[: len(chunk)].sum(-1).tolist())
        if teacher_logprobs is not None:
            lt = np.asarray(teacher_logprobs(rollout))[: len(chunk)]
            ls = np.asarray(rollout.policy_logp)[: len(chunk)]
            m = mask[: len(chunk)]
            kl_sum += float(((ls - lt) * m).sum())
            kl_count += float(m.sum())
        if progress is not None:
            progress(len({i for i, _ in chunk}))
    out = {
        "accuracy": float(correct.mean()),
        "response_length": float(np.mean(lengths)),
        "num_problems": float(len(examples)),
        **stats.metrics(),
    }
    k = 1
    while k <= num_samples:
        c = correct.sum(-1).astype(int)
        out[f"pass@{k}"] = float(np.mean([pass_at_k(num_samples, int(ci), k) for ci in c]))
        k *= 2
    if teacher_logprobs is not None:
        out["kl_per_token"] = kl_sum / max(kl_count, 1.0)
    return out
