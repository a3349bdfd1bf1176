"""Prompt and SFT batch pipelines over grain `MapDataset`, with resumable iterator state.

Both pipelines tokenize every record once up front (so the length filter's counts are exact
before training starts), then build

    grain.MapDataset.source(kept).shuffle(seed).repeat(num_epochs).map_with_index(+epoch)
        .batch(batch_size, drop_remainder, collate).to_iter_dataset()

Shuffling is a seeded permutation, re-drawn each epoch; batching happens after repeating, so with
``drop_remainder=True`` every batch is full (static shapes under jit) and a batch may straddle two
epochs; only a finite run's final partial batch is dropped. `get_state()` returns a
JSON-serialisable dict (grain's iterator state, batches served, epoch and a fingerprint of data
and settings); `set_state` on a pipeline built the same way resumes with exactly the batches an
uninterrupted run would have seen, and refuses a state saved with other data or settings.

Per-teacher batches (`PromptPipeline(teacher_batch_sizes=...)`): every batch takes a fixed
number of prompts from each teacher's records, teacher 0's first, then teacher 1's, ..., so the
train step can route static row blocks to the teachers (`train_step.StepConfig.teacher_rows`).
Each teacher's records are then their own shuffled, repeated stream (seed + teacher index), and
batch i concatenates batch i of every stream: deterministic and resumable as above.

`PromptPipeline` batches (B = batch_size, P = max_prompt_len)::

    prompt_tokens  list of B int lists   chat-templated prompt ids, ragged (no padding)
    prompt_ids     int32 [B, P]          the same, left-padded with the tokenizer's pad id
    prompt_mask    int32 [B, P]          1 = real token
    prompt_lens    int32 [B]
    teacher        int32 [B]             index into `teachers` (0 when a record names none)
    teacher_prompt_ids, teacher_prompt_mask  int32 [B, P']  with `teacher_prompts` only: the
                                         prompt each row's teacher scores after (left-padded)
    index          int64 [B]             record position in the source (line order)
    epoch          int32 [B]
    prompt, answer, teacher_name, domain, task: lists of B strings (None where absent)

`SFTPipeline` (`sft_batches`) batches, L = seq_len, right-padded::

    tokens          int32 [B, L]  prompt (chat template with generation prompt) + solution + EOS
    loss_mask       int32 [B, L]  1 on solution and EOS tokens: token t is a target, predicted
                                  from the logits at position t - 1
    attention_mask  int32 [B, L]  1 on real tokens
    prompt_lens     int32 [B], index int64 [B], epoch int32 [B], teacher int32 [B], plus lists
"""

from __future__ import annotations

import hashlib
import logging
import os
from collections.abc import Sequence
from typing import Any

import grain
import numpy as np

from opdplus_jax.data.records import records_from
from opdplus_jax.data.teacher_prompts import TeacherPrompt, teacher_prompt_tokens
from opdplus_jax.tokenizer import Tokenizer, pad_sequences

logger = logging.getLogger(__name__)
STATE_VERSION = 1
Source = str | os.PathLike | Sequence[Any]


def chat_prompt_texts(
    tokenizer: Tokenizer, prompts: Sequence[str], system_prompt: str | None = None
) -> list[str]:
    """Each prompt as one user turn (after an optional system turn), rendered with the chat
    template and the assistant generation prompt."""
    head = [] if system_prompt is None else [{"role": "system", "content": system_prompt}]
    return [
        tokenizer.apply_chat_template(
            [*head, {"role": "user", "content": p}], add_generation_prompt=True, tokenize=False
        )
        for p in prompts
    ]


def _teacher_indices(
    records: list[dict[str, Any]], teachers: Sequence[str] | None, where: str
) -> list[int]:
    """Teacher index per record: position in `teachers`; 0 when `teachers` is None or unnamed."""
    if teachers is None:
        return [0] * len(records)
    lookup = {t: i for i, t in enumerate(teachers)}
    if not lookup or len(lookup) != len(teachers):
        raise ValueError(f"teachers must be non-empty, distinct names, got {list(teachers)}")
    out = []
    for i, rec in enumerate(records):
        t = rec["teacher"]
        if t is not None and t not in lookup:
            raise ValueError(
                f"{where}, record {i}: unknown teacher {t!r}; valid teachers: "
                f"{', '.join(teachers)} (add it to `teachers` or fix the record)"
            )
        out.append(0 if t is None else lookup[t])
    return out


class _BatchStream:
    """Seeded shuffle / repeat / batch over a list of prepared items, with resumable state."""

    def __init__(
        self,
        items: list[dict[str, Any]],
        *,
        batch_size: int,
        seed: int,
        shuffle: bool,
        num_epochs: int | None,
        drop_remainder: bool,
        read_options: grain.ReadOptions | None,
        settings: dict[str, Any],
        strata: Sequence[int] | None = None,
    ):
        if batch_size < 1:
            raise ValueError(f"batch_size must be >= 1, got {batch_size}")
        if num_epochs is not None and num_epochs < 1:
            raise ValueError(f"num_epochs must be >= 1 or None (forever), got {num_epochs}")
        n = len(items)
        if drop_remainder and n * (num_epochs or 1) < batch_size and num_epochs is not None:
            raise ValueError(
                f"only {n} examples x {num_epochs} epoch(s), fewer than batch_size={batch_size}; "
                f"lower batch_size, add data or pass drop_remainder=False"
            )
        self.batch_size = batch_size
        self.num_examples = n
        if strata is None:
            self._strata = None
            ds = grain.MapDataset.source(items)
            if shuffle:
                ds = ds.shuffle(seed=seed)
            ds = ds.repeat(num_epochs).map_with_index(lambda i, item: (i // n, item))
            self._dataset = ds.batch(
                batch_size, drop_remainder=drop_remainder, batch_fn=self._collate
            )
        else:
            self._dataset, self._strata = self._stratified(
                items, strata, seed=seed, shuffle=shuffle, num_epochs=num_epochs,
                drop_remainder=drop_remainder,
            )  # fmt: skip
        self._read_options = read_options or grain.ReadOptions(
            num_threads=0, prefetch_buffer_size=0
        )
        digest = hashlib.blake2b(digest_size=16)
        for item in items:
            digest.update(repr((item["index"], item["tokens"], item["answer"])).encode())
        self._fingerprint = {
            **settings,
            "num_examples": n,
            "batch_size": batch_size,
            "seed": seed,
            "shuffle": shuffle,
            "num_epochs": num_epochs,
            "drop_remainder": drop_remainder,
            "data_hash": digest.hexdigest(),
        }
        self._iterator = iter(self._dataset.to_iter_dataset(self._read_options))
        self._batches = 0

    def _stratified(self, items, sizes, *, seed, shuffle, num_epochs, drop_remainder):
        """Batch i = batch i of teacher 0's stream (sizes[0] items), then of teacher 1's, ...;
        returns the dataset and (batch size, number of items) per teacher."""
        if sum(sizes) != self.batch_size or any(size < 1 for size in sizes):
            raise ValueError(
                f"teacher_batch_sizes={list(sizes)} must be ints >= 1 summing to batch_size="
                f"{self.batch_size}"
            )
        if not drop_remainder:
            raise ValueError("teacher_batch_sizes needs drop_remainder=True (fixed-size blocks)")
        parts, strata = [], []
        for k, size in enumerate(sizes):
            own = [item for item in items if item["teacher"] == k]
            if num_epochs is not None and len(own) * num_epochs < size:
                raise ValueError(
                    f"teacher {k} has only {len(own)} examples x {num_epochs} epoch(s), fewer "
                    f"than its {size} prompts per batch"
                )
            ds = grain.MapDataset.source(own)
            if shuffle:
                ds = ds.shuffle(seed=seed + k)
            m = len(own)
            ds = ds.repeat(num_epochs).map_with_index(lambda i, item, m=m: (i // m, item))
            parts.append(ds.batch(size, drop_remainder=drop_remainder, batch_fn=list))
            strata.append((size, m))
        length = min(len(part) for part in parts)
        concat = lambda i: self._collate([row for part in parts for row in part[i]])
        return grain.MapDataset.range(length).map(concat), tuple(strata)

    def _collate(self, rows: Sequence[tuple[int, dict[str, Any]]]) -> dict[str, Any]:
        raise NotImplementedError

    @staticmethod
    def _common(rows: Sequence[tuple[int, dict[str, Any]]]) -> dict[str, Any]:
        items = [item for _, item in rows]
        return {
            "index": np.array([it["index"] for it in items], np.int64),
            "epoch": np.array([e for e, _ in rows], np.int32),
            "teacher": np.array([it["teacher"] for it in items], np.int32),
            "prompt_lens": np.array([it["prompt_len"] for it in items], np.int32),
            **{
                k: [it[k] for it in items]
                for k in ("prompt", "answer", "teacher_name", "domain", "task")
            },
        }

    def __iter__(self):
        return self

    def __next__(self) -> dict[str, Any]:
        batch = next(self._iterator)
        self._batches += 1
        return batch

    def __len__(self) -> int:
        """Number of batches in the whole run (huge when repeating forever)."""
        return len(self._dataset)

    @property
    def batches_per_epoch(self) -> float:
        """Batches per pass over the data (per-teacher batches: over the teacher whose records
        run out first)."""
        if self._strata is not None:
            return min(m / size for size, m in self._strata)
        return self.num_examples / self.batch_size

    @property
    def epoch(self) -> int:
        """Epoch of the next example to be served (0-based; per-teacher batches: the most
        advanced teacher stream's)."""
        if self._strata is not None:
            return max(self._batches * size // m for size, m in self._strata)
        return self._batches * self.batch_size // self.num_examples

    def get_state(self) -> dict[str, Any]:
        """JSON-serialisable iterator state (see `set_state`)."""
        return {
            "version": STATE_VERSION,
            "batches": self._batches,
            "epoch": self.epoch,
            "grain": self._iterator.get_state(),
            "fingerprint": dict(self._fingerprint),
        }

    def set_state(self, state: dict[str, Any]) -> None:
        """Resume from `get_state()` of a pipeline built with the same data and settings."""
        if state.get("version") != STATE_VERSION:
            raise ValueError(f"unsupported pipeline state version {state.get('version')!r}")
        saved = state["fingerprint"]
        diff = {k: (saved.get(k), v) for k, v in self._fingerprint.items() if saved.get(k) != v}
        if diff:
            details = "; ".join(f"{k}: saved {a!r}, now {b!r}" for k, (a, b) in diff.items())
            raise ValueError(
                f"cannot restore the data pipeline: its data or settings changed ({details})"
            )
        self._iterator.set_state(state["grain"])
        self._batches = int(state["batches"])


class PromptPipeline(_BatchStream):
    """Batches of chat-templated, tokenized prompts for rollouts (see the module docstring).

    Args:
      source: a ``.jsonl`` / ``.parquet`` path, or a list of record dicts / `Example`s.
      tokenizer: our `Tokenizer` (its chat template renders each prompt as a user turn).
      batch_size: prompts per batch.
      max_prompt_len: prompts with more tokens are dropped and counted in `stats`.
      seed: shuffling seed. shuffle: False keeps source order (e.g. for eval).
      num_epochs: passes over the data; None repeats forever.
      teachers: teacher names; a record's ``teacher`` maps to its index (unknown => ValueError;
        absent => 0). None: single teacher, every index 0.
      teacher_batch_sizes: prompts per batch from each teacher's records (one int >= 1 per
        name in `teachers`, summing to batch_size): every batch is teacher 0's prompts, then
        teacher 1's, ... (see the module docstring). None: batches of the shuffled mix.
      drop_remainder: only full batches (default); False keeps a final smaller batch.
      require_answer: records must have an ``answer`` (rewards and eval need it).
      system_prompt: optional system turn before every prompt.
      teacher_prompts: per teacher (in `teachers` order) a `TeacherPrompt` rendering the prompt
        that teacher scores the completions after (its own chat template, privileged context),
        or None for the student's prompt. With any, batches add `teacher_prompt_ids` and
        `teacher_prompt_mask` [B, P'] (P' = the longest limit); a record whose teacher prompt
        exceeds its limit is dropped and counted as `teacher_prompt_too_long`.
      read_options: grain read options (default: no background threads).
    """

    def __init__(
        self,
        source: Source,
        tokenizer: Tokenizer,
        *,
        batch_size: int,
        max_prompt_len: int,
        seed: int = 0,
        shuffle: bool = True,
        num_epochs: int | None = None,
        teachers: Sequence[str] | None = None,
        teacher_batch_sizes: Sequence[int] | None = None,
        drop_remainder: bool = True,
        require_answer: bool = True,
        system_prompt: str | None = None,
        teacher_prompts: Sequence[TeacherPrompt | None] | None = None,
        read_options: grain.ReadOptions | None = None,
    ):
        if teacher_batch_sizes is not None and (
            teachers is None or len(teacher_batch_sizes) != len(teachers)
        ):
            raise ValueError(
                f"teacher_batch_sizes={teacher_batch_sizes!r} needs one size per name in "
                f"teachers={teachers!r}"
            )
        required = ("prompt", "answer") if require_answer else ("prompt",)
        records, where = records_from(source, required=required)
        teacher_ids = _teacher_indices(records, teachers, where)
        texts = chat_prompt_texts(tokenizer, [r["prompt"] for r in records], system_prompt)
        sequences = [(toks, len(toks)) for toks in tokenizer.encode(texts)]
        items, self.stats = _length_filtered_items(
            records,
            teacher_ids,
            sequences,
            where,
            limit=("max_prompt_len", max_prompt_len),
            reason="prompt_too_long",
            what="prompts",
        )
        builders = list(teacher_prompts or ())
        if any(b is not None for b in builders):
            own = teacher_prompt_tokens(builders, records, teacher_ids, where)
            items, dropped = _teacher_prompt_items(items, own, builders)
            self.stats["dropped"]["teacher_prompt_too_long"] = dropped
            self.stats["num_dropped"] += dropped
            self.stats["num_kept"] = len(items)
            if not items:
                raise ValueError(
                    f"{where}: every record's teacher prompt is longer than its limit "
                    "(teachers.<name>.max_prompt_len): raise it"
                )
            limits = [b.max_len for b in builders if b is not None]
            self.teacher_prompt_len = max(max_prompt_len, *limits)
        else:
            self.teacher_prompt_len = None
        self.max_prompt_len = max_prompt_len
        self.pad_id = tokenizer.pad_id
        self.teachers = None if teachers is None else list(teachers)
        for k, size in enumerate(teacher_batch_sizes or ()):
            if not any(item["teacher"] == k for item in items):
                raise ValueError(
                    f"{where}: no record (of {len(items)} kept) names teacher {teachers[k]!r}, "
                    f"but every batch needs {size} of its prompts: add its records or drop the "
                    "teacher"
                )
        super().__init__(
            items,
            batch_size=batch_size,
            seed=seed,
            shuffle=shuffle,
            num_epochs=num_epochs,
            drop_remainder=drop_remainder,
            read_options=read_options,
            settings={
                "kind": "prompt",
                "max_prompt_len": max_prompt_len,
                "teachers": self.teachers,
                "teacher_batch_sizes": None
                if teacher_batch_sizes is None
                else [int(x) for x in teacher_batch_sizes],
                "teacher_prompts": [None if b is None else b.describe() for b in builders],
            },
            strata=None if teacher_batch_sizes is None else tuple(teacher_batch_sizes),
        )

    def _collate(self, rows):
        batch = self._common(rows)
        tokens = [list(item["tokens"]) for _, item in rows]
        ids, mask = pad_sequences(tokens, self.pad_id, length=self.max_prompt_len, side="left")
        out = {"prompt_tokens": tokens, "prompt_ids": ids, "prompt_mask": mask, **batch}
        if self.teacher_prompt_len is not None:
            own = [list(item["teacher_tokens"] or item["tokens"]) for _, item in rows]
            out["teacher_prompt_ids"], out["teacher_prompt_mask"] = pad_sequences(
                own, self.pad_id, length=self.teacher_prompt_len, side="left"
            )
        return out


def _teacher_prompt_items(items, own, builders) -> tuple[list[dict], int]:
    """`items` with their teacher's prompt tokens (`teacher_tokens`, None for the student's
    prompt), those over their teacher's limit dropped; and the number dropped."""
    kept, dropped = [], 0
    for item in items:
        tokens = own[item["index"]]
        if tokens is not None and len(tokens) > builders[item["teacher"]].max_len:
            dropped += 1
            continue
        kept.append({**item, "teacher_tokens": None if tokens is None else tuple(tokens)})
    return kept, dropped


class SFTPipeline(_BatchStream):
    """Prompt + solution sequences with a loss mask over the solution (see the module docstring).

    Records need ``prompt`` and ``solution``; sequences longer than `seq_len` are dropped and
    counted in `stats`. Other arguments as in `PromptPipeline`.
    """

    def __init__(
        self,
        source: Source,
        tokenizer: Tokenizer,
        *,
        seq_len: int,
        batch_size: int,
        seed: int = 0,
        shuffle: bool = True,
        num_epochs: int | None = None,
        teachers: Sequence[str] | None = None,
        drop_remainder: bool = True,
        system_prompt: str | None = None,
        read_options: grain.ReadOptions | None = None,
    ):
        records, where = records_from(source, required=("prompt", "solution"))
        if tokenizer.eos_id is None:
            raise ValueError("the tokenizer has no EOS token; SFT targets end with EOS")
        teacher_ids = _teacher_indices(records, teachers, where)
        prompts = tokenizer.encode(
            chat_prompt_texts(tokenizer, [r["prompt"] for r in records], system_prompt)
        )
        solutions = tokenizer.encode([r["solution"] for r in records])
        sequences = [
            ([*p, *s, tokenizer.eos_id], len(p)) for p, s in zip(prompts, solutions, strict=True)
        ]
        items, self.stats = _length_filtered_items(
            records,
            teacher_ids,
            sequences,
            where,
            limit=("seq_len", seq_len),
            reason="sequence_too_long",
            what="prompt + solution sequences",
        )
        self.seq_len = seq_len
        self.pad_id = tokenizer.pad_id
        self.teachers = None if teachers is None else list(teachers)
        super().__init__(
            items,
            batch_size=batch_size,
            seed=seed,
            shuffle=shuffle,
            num_epochs=num_epochs,
            drop_remainder=drop_remainder,
            read_options=read_options,
            settings={"kind": "sft", "seq_len": seq_len, "teachers": self.teachers},
        )

    def _collate(self, rows):
        batch = self._common(rows)
        seqs = [item["tokens"] for _, item in rows]
        tokens, attention = pad_sequences(seqs, self.pad_id, length=self.seq_len, side="right")
        loss_mask = attention.copy()
        for b, (_, item) in enumerate(rows):
            loss_mask[b, : item["prompt_len"]] = 0
        return {"tokens": tokens, "loss_mask": loss_mask, "attention_mask": attention, **batch}


def sft_batches(
    source: Source, tokenizer: Tokenizer, *, seq_len: int, batch_size: int, **kwargs: Any
) -> SFTPipeline:
    """The SFT view of a data source: an `SFTPipeline` (iterable, with get_state/set_state)."""
    return SFTPipeline(source, tokenizer, seq_len=seq_len, batch_size=batch_size, **kwargs)


def _item(index: int, rec: dict[str, Any], teacher: int, tokens, prompt_len: int) -> dict:
    return {
        "index": index,
        "tokens": tuple(int(t) for t in tokens),
        "prompt_len": prompt_len,
        "prompt": rec["prompt"],
        "answer": rec["answer"],
        "teacher": teacher,
        "teacher_name": rec["teacher"],
        "domain": rec["domain"],
        "task": rec["task"],
    }


def _length_filtered_items(
    records: list[dict[str, Any]],
    teacher_ids: list[int],
    sequences: Sequence[tuple[Sequence[int], int]],
    where: str,
    *,
    limit: tuple[str, int],
    reason: str,
    what: str,
) -> tuple[list[dict], dict[str, Any]]:
    """Items of the records whose (tokens, prompt_len) in `sequences` fit `limit` (its setting's
    name, max tokens), and the length stats (longer ones are dropped, counted under `reason`
    and logged). Raises ValueError naming `what` (e.g. "prompts") when none fits."""
    name, max_len = limit
    items, dropped = [], []
    for i, (rec, (toks, prompt_len)) in enumerate(zip(records, sequences, strict=True)):
        if len(toks) > max_len:
            dropped.append(len(toks))
            continue
        items.append(_item(i, rec, teacher_ids[i], toks, prompt_len))
    stats = _length_stats(len(records), items, dropped, reason)
    if not items:
        raise ValueError(
            f"{where}: all {len(records)} {what} are longer than {name}={max_len} tokens "
            f"(shortest: {min(dropped)}); raise {name}"
        )
    _log_drops(where, stats, f"{name}={max_len}")
    return items, stats


def _length_stats(total: int, items: list, dropped: list[int], reason: str) -> dict[str, Any]:
    return {
        "num_records": total,
        "num_kept": len(items),
        "num_dropped": len(dropped),
        "dropped": {reason: len(dropped)},
        "longest_kept": max(len(it["tokens"]) for it in items) if items else 0,
        "longest_dropped": max(dropped, default=0),
    }


def _log_drops(where: str, stats: dict[str, Any], limit: str) -> None:
    if stats["num_dropped"]:
        logger.warning(
            "%s: dropped %d of %d records longer than %s (longest: %d tokens)",
            where,
            stats["num_dropped"],
            stats["num_records"],
            limit,
            stats["longest_dropped"],
        )
