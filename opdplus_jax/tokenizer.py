"""Tokenizer wrapper over `transformers.AutoTokenizer` (local folders only).

Hugging Face checkpoints often pad the embedding matrix beyond the tokenizer's vocabulary (e.g.
Qwen3: 151936 rows, 151669 tokens). The model keeps those rows (so export is lossless) and emits
logits over all of them; `Tokenizer.vocab_size` is the real vocabulary and `slice_logits` drops the
padding columns, which is what makes a student and a teacher with different embedding sizes but
the same tokenizer comparable (`check_compatible`).
"""

from __future__ import annotations

import os
import shutil
import tempfile
from collections.abc import Sequence
from typing import Any

import numpy as np

from opdplus_jax.models.config import read_json_object


class Tokenizer:
    """Chat templates, special ids, ragged batch encode/decode and left/right padding."""

    def __init__(self, hf_tokenizer: Any, extra_eos_ids: Sequence[int] = ()):
        self.hf = hf_tokenizer
        eos = [] if hf_tokenizer.eos_token_id is None else [int(hf_tokenizer.eos_token_id)]
        self._eos_ids = tuple(dict.fromkeys(eos + [int(i) for i in extra_eos_ids]))

    @classmethod
    def from_pretrained(cls, folder: str | os.PathLike) -> Tokenizer:
        """Load `folder`'s tokenizer; EOS ids from `generation_config.json` are added if present.

        Code in the folder is never run (`trust_remote_code=False`, so transformers never asks
        either): a tokenizer that only custom code can load raises `ValueError`.
        """
        import transformers

        folder = os.fspath(folder)
        if not os.path.isdir(folder):
            raise FileNotFoundError(f"{folder}: tokenizer folder does not exist")
        try:
            hf = transformers.AutoTokenizer.from_pretrained(
                folder, local_files_only=True, trust_remote_code=False
            )
        except ValueError as e:
            if "trust_remote_code" not in str(e):
                raise
            raise ValueError(
                f"{folder}: this tokenizer needs custom code from the folder (auto_map in "
                "tokenizer_config.json or config.json); opdplus_jax never runs code from a "
                "checkpoint folder. Use a tokenizer that transformers supports natively"
            ) from e
        return cls(hf, generation_eos_ids(folder))

    def save_pretrained(self, folder: str | os.PathLike) -> str:
        """Writes the tokenizer files into `folder` (created if needed) the way transformers
        does, but each file is written in a fresh temporary folder and renamed into place: a
        symlink in `folder` is replaced, never written through."""
        folder = os.fspath(folder)
        os.makedirs(folder, exist_ok=True)
        tmp = tempfile.mkdtemp(prefix=".tokenizer.", suffix=".tmp", dir=folder)
        try:
            self.hf.save_pretrained(tmp)
            for name in sorted(os.listdir(tmp)):
                os.replace(os.path.join(tmp, name), os.path.join(folder, name))
        finally:
            shutil.rmtree(tmp, ignore_errors=True)
        return folder

    @property
    def vocab_size(self) -> int:
        """Real vocabulary size (base vocabulary + added tokens); logits beyond it are padding."""
        return len(self.hf)

    @property
    def bos_id(self) -> int | None:
        return self.hf.bos_token_id

    @property
    def eos_id(self) -> int | None:
        return self._eos_ids[0] if self._eos_ids else None

    @property
    def eos_ids(self) -> tuple[int, ...]:
        """Every id that ends a sequence (tokenizer EOS first, then generation_config ones)."""
        return self._eos_ids

    @property
    def pad_id(self) -> int:
        """Padding id: the tokenizer's pad token, else EOS, else 0 (padding is always masked)."""
        for i in (self.hf.pad_token_id, self.eos_id):
            if i is not None:
                return int(i)
        return 0

    def apply_chat_template(
        self,
        messages: list[dict[str, str]],
        *,
        add_generation_prompt: bool = True,
        tokenize: bool = True,
        **kwargs: Any,
    ) -> list[int] | str:
        """Render one conversation with the tokenizer's chat template (token ids or text)."""
        if not getattr(self.hf, "chat_template", None):
            raise ValueError("this tokenizer has no chat template")
        out = self.hf.apply_chat_template(
            messages,
            add_generation_prompt=add_generation_prompt,
            tokenize=tokenize,
            return_dict=tokenize,
            **kwargs,
        )
        return [int(i) for i in out["input_ids"]] if tokenize else out

    def encode(
        self, text: str | Sequence[str], *, add_special_tokens: bool = False
    ) -> list[int] | list[list[int]]:
        """Token ids of one string, or a ragged list of lists for a batch of strings."""
        if isinstance(text, str):
            return list(self.hf.encode(text, add_special_tokens=add_special_tokens))
        enc = self.hf(list(text), add_special_tokens=add_special_tokens)["input_ids"]
        return [list(ids) for ids in enc]

    def decode(self, ids: Sequence[int], *, skip_special_tokens: bool = True) -> str:
        return self.hf.decode([int(i) for i in ids], skip_special_tokens=skip_special_tokens)

    def batch_decode(
        self,
        ids: Sequence[Sequence[int]],
        mask: Any = None,
        *,
        skip_special_tokens: bool = True,
    ) -> list[str]:
        """Decode each row; with `mask` (same shape, 1 = keep) only the masked-in tokens."""
        rows = [list(np.asarray(r).tolist()) for r in ids]
        if mask is not None:
            rows = [
                [t for t, m in zip(r, np.asarray(mk).tolist(), strict=True) if m]
                for r, mk in zip(rows, mask, strict=True)
            ]
        return [self.decode(r, skip_special_tokens=skip_special_tokens) for r in rows]

    def pad(
        self,
        sequences: Sequence[Sequence[int]],
        *,
        length: int | None = None,
        side: str = "left",
    ) -> tuple[np.ndarray, np.ndarray]:
        """Pad ragged id lists to `length` (default: the longest): ids [B, L] int32, mask [B, L]."""
        return pad_sequences(sequences, self.pad_id, length=length, side=side)


def generation_eos_ids(folder: str | os.PathLike) -> list[int]:
    """The `eos_token_id`s of `folder/generation_config.json` ([] without the file or the key).
    A file that is not a JSON object, or ids that are not non-negative ints, raise `ValueError`
    naming the file."""
    path = os.path.join(os.fspath(folder), "generation_config.json")
    if not os.path.isfile(path):
        return []
    raw = read_json_object(path)
    eos = raw.get("eos_token_id")
    ids = [] if eos is None else eos if isinstance(eos, list) else [eos]
    if not all(isinstance(i, int) and not isinstance(i, bool) and i >= 0 for i in ids):
        raise ValueError(
            f"{path}: eos_token_id must be a token id or a list of token ids, got {eos!r}"
        )
    return ids


def pad_sequences(
    sequences: Sequence[Sequence[int]],
    pad_id: int,
    *,
    length: int | None = None,
    side: str = "left",
) -> tuple[np.ndarray, np.ndarray]:
    """Pad ragged id lists: ids [B, L] int32 and mask [B, L] int32 (1 = real token)."""
    if side not in ("left", "right"):
        raise ValueError(f"side must be 'left' or 'right', got {side!r}")
    longest = max((len(s) for s in sequences), default=0)
    length = longest if length is None else length
    if longest > length:
        raise ValueError(f"a sequence has {longest} tokens, more than length={length}")
    ids = np.full((len(sequences), length), pad_id, np.int32)
    mask = np.zeros((len(sequences), length), np.int32)
    for b, seq in enumerate(sequences):
        n = len(seq)
        if n:
            sl = slice(length - n, length) if side == "left" else slice(0, n)
            ids[b, sl] = np.asarray(seq, np.int32)
            mask[b, sl] = 1
    return ids, mask


def slice_logits(logits: Any, vocab_size: int) -> Any:
    """Drop embedding-padding columns: logits[..., :vocab_size] (works on numpy and jax arrays)."""
    if logits.shape[-1] < vocab_size:
        raise ValueError(f"logits have {logits.shape[-1]} columns, fewer than vocab {vocab_size}")
    return logits[..., :vocab_size]


def check_compatible(
    student_tok: Tokenizer, teacher_tok: Tokenizer, student_cfg, teacher_cfg
) -> int:
    """Check that student and teacher score the same token ids; return the shared vocab size.

    Requires identical tokenizer vocabularies (token -> id) and that each model's embedding covers
    its tokenizer. Embedding sizes may differ (vocab padding): slice both models' logits to the
    returned size. Raises `ValueError` naming both sizes otherwise.
    """
    s, t = student_tok.vocab_size, teacher_tok.vocab_size
    if s != t:
        raise ValueError(f"tokenizer vocab sizes differ: student {s} vs teacher {t}")
    if student_tok.hf.get_vocab() != teacher_tok.hf.get_vocab():
        raise ValueError(f"tokenizers differ: same size {s} but different token -> id mappings")
    for who, tok, cfg in (
        ("student", student_tok, student_cfg),
        ("teacher", teacher_tok, teacher_cfg),
    ):
        if cfg.vocab_size < tok.vocab_size:
            raise ValueError(
                f"{who} model embedding has {cfg.vocab_size} rows, fewer than its tokenizer's "
                f"vocab size {tok.vocab_size} (student model {student_cfg.vocab_size}, teacher "
                f"model {teacher_cfg.vocab_size})"
            )
    return s
