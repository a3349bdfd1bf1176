"""Held-out evaluation: accuracy and pass@k with the verifiers, and student-teacher KL.

`evaluate_policy` samples `num_samples` responses per problem through a rollout engine (greedy
when its temperature is 0) and scores them with `opdplus_jax.verifiers`. With a teacher scorer it
also reports `kl_per_token`, the k1 estimate of KL(student || teacher) per token (mean over
response tokens of log pi - log q), which estimates a KL only on samples of the student itself:
temperature 1 without truncation. When the engine samples that way the same responses serve both;
otherwise (greedy or tempered/truncated evaluation) a second, temperature-1 untruncated pass over
the same rows (same keys) is drawn for the KL alone. Each row is scored by its own teacher (the
example's `teacher` index, as in training), and `kl_per_token/<name>` reports each teacher's rows.
"""

from __future__ import annotations

import dataclasses
import math
from collections.abc import Callable, Sequence
from typing import Any

import jax
import numpy as np

from opdplus_jax import sharding, verifiers
from opdplus_jax.rollout import Rollout, RolloutEngine
from opdplus_jax.tokenizer import Tokenizer


def policy_engine(engine: RolloutEngine) -> RolloutEngine:
    """`engine` if it samples the policy itself, else the same engine (`with_sampling`) at
    temperature 1 without truncation (what a KL estimate needs)."""
    if not engine.sampling.off_policy_fields():
        return engine
    if not hasattr(engine, "with_sampling"):
        raise ValueError(
            f"{type(engine).__name__} does not sample at temperature 1 without truncation: pass "
            "kl_engine=, an engine of the same policy that does, for kl_per_token"
        )
    sampling = dataclasses.replace(engine.sampling, temperature=1.0, top_p=1.0, top_k=0)
    return engine.with_sampling(sampling)


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
    teacher_names: Sequence[str] | None = None,
    kl_engine: RolloutEngine | None = None,
    progress: Callable[[int], Any] | None = None,
) -> dict[str, float]:
    """Accuracy, pass@k (k = 1, 2, 4, ... <= num_samples), response length, KL to the teachers.

    Args:
      engine: samples the responses (its `SamplingParams`: temperature 0 = greedy, length).
      params: the policy's weights, as the engine takes them.
      examples: one dict per problem with at least `answer` (and `task`/`domain` for dispatch),
        and optionally `teacher`, the index of the teacher that scores its rows (default 0).
      prompts: the chat-templated prompt token ids of each problem.
      batch_size: rows per engine call; the last call is padded to it so one compilation serves
        every call.
      rng: required when the engine samples (temperature > 0) or a KL is asked for; call k uses
        fold_in(rng, k's first row).
      teacher_logprobs: optional callable (rollout) -> [B, T] log-probs of the sampled tokens,
        row b under teacher `rollout.teacher[b]`; enables `kl_per_token`: the k1 estimate of
        KL(policy || teacher) per token on temperature-1, untruncated samples of the policy. Those
        are the evaluation's own samples when `engine` samples that way; otherwise a second pass
        (`kl_engine`, same keys) draws them for the KL alone.
      teacher_names: names of the teacher indices; adds `kl_per_token/<name>` (the KL over the
        rows of that teacher) for every teacher that has rows.
      kl_engine: the temperature-1, untruncated engine of the KL pass; default
        `policy_engine(engine)` (`engine` itself when it already samples that way).
      progress: optional callable(n) advanced by the number of problems done.
    """
    if len(examples) != len(prompts):
        raise ValueError(f"{len(examples)} examples but {len(prompts)} prompts")
    if engine.sampling.temperature > 0 and rng is None:
        raise ValueError("rng is required when temperature > 0")
    if teacher_logprobs is not None:
        if rng is None:
            raise ValueError("rng is required for kl_per_token (temperature-1 samples)")
        kl_engine = policy_engine(engine) if kl_engine is None else kl_engine
        if kl_engine.sampling.off_policy_fields():
            raise ValueError("kl_engine must sample at temperature 1 without top-p/top-k")
    teacher_of = [int(ex.get("teacher", 0) or 0) for ex in examples]
    num_teachers = max(teacher_of, default=0) + 1
    if teacher_names is not None:
        num_teachers = max(num_teachers, len(teacher_names))
    correct = np.zeros((len(examples), num_samples), np.float32)
    stats = verifiers.VerifierStats()
    lengths = []
    kl_sum, kl_count = np.zeros(num_teachers), np.zeros(num_teachers)
    rows = [(i, s) for i in range(len(examples)) for s in range(num_samples)]
    for start in range(0, len(rows), batch_size):
        chunk = rows[start : start + batch_size]
        batch_prompts = [list(prompts[i]) for i, _ in chunk]
        teacher = np.array([teacher_of[i] for i, _ in chunk], np.int32)
        pad = batch_size - len(chunk)  # pad to a fixed batch so one compilation serves all
        batch_prompts += [batch_prompts[-1]] * pad
        teacher = np.concatenate([teacher, np.full(pad, teacher[-1], np.int32)])
        key = None if rng is None else jax.random.fold_in(rng, start)
        rollout = engine.generate(params, batch_prompts, rng=key, teacher=teacher)
        tokens, mask = sharding.host_array(rollout.tokens), sharding.host_array(rollout.mask)
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
            if kl_engine is not engine:  # the KL's own temperature-1 samples of the same rows
                rollout = kl_engine.generate(params, batch_prompts, rng=key, teacher=teacher)
            n = len(chunk)
            lt = sharding.host_array(teacher_logprobs(rollout)).astype(np.float64)[:n]
            ls = sharding.host_array(rollout.policy_logp).astype(np.float64)[:n]
            m = mask.astype(np.float64)[:n]
            np.add.at(kl_sum, teacher[:n], ((ls - lt) * m).sum(-1))
            np.add.at(kl_count, teacher[:n], m.sum(-1))
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
        out["kl_per_token"] = float(kl_sum.sum() / max(kl_count.sum(), 1.0))
        for t, name in enumerate(teacher_names or ()):
            if t in teacher_of:
                out[f"kl_per_token/{name}"] = float(kl_sum[t] / max(kl_count[t], 1.0))
    return out
