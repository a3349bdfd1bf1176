"""Teachers with a different tokenizer: re-tokenise the student's text, carry log-probs back.

A teacher that shares the student's tokenizer scores the student's own token ids, and the
per-token log-ratio log q(y_t | y_<t) - log p(y_t | y_<t) compares two distributions over the same
next-token event. Across tokenizers there is no such shared event: the teacher never sees the
student's ids. What both models do assign a probability to is *text*. `retokenize` decodes each
student completion to its text s and encodes s with the teacher's tokenizer; the teacher then
scores its own tokens (`scoring.token_logprobs` on the returned ids, after the teacher's own
prompt), and `student_token_logprobs` carries those log-probs back to the student's tokens.

Token level across tokenizers. For a prefix s[:c] of the text, the sum of a model's token
log-probs over the tokens that exactly cover s[:c] is that model's log-prob of the string s[:c]
(given its prompt), whatever its tokenizer. Such a sum is available on both sides only at a
*common boundary*: a character position c where a student token and a teacher token both end.
Between two consecutive common boundaries lies an aligned *group* (`align`): a maximal run of
student tokens and a run of teacher tokens covering the same characters, e.g. with a character
student and a teacher that has the token "10"::

    text      5 + 5 = 1 0 \\n
    student   5|+|5|=|1 0|\\n      groups: 5, +, 5, =, "10" (two student tokens), \\n
    teacher   5|+|5|=|10 |\\n      (and the EOS group when the row ended with EOS)

The "token level" of a cross-tokenizer teacher is this group level: a group's teacher log-prob is
the sum over its teacher tokens and its student log-prob the sum over its student tokens; both are
exact log-probs of the same piece of text given the same preceding text, so their difference is an
exact per-group log-ratio. Identical tokenizers give one token per group on each side, which is
the ordinary per-token case. Summed over all groups, the carried-back teacher log-probs equal the
teacher's log-prob of the whole completion text (its re-tokenisation, plus EOS), exactly up to
float32 rounding: the groups partition the teacher's tokens.

In training (`teachers.<name>.retokenize`), the train step runs the estimator on the groups
(the student's group log-prob against the teacher's) and gives every student token of a group its
group's advantage, so the gradient is that of the group's log-prob (`train_step.StepConfig.
retokenized`); the trainer fills `Rollout.teacher_group*` with the alignments and the teacher's
group log-probs.

Rewards on student tokens ("last"), for per-token views such as evaluation's KL. A group's
teacher log-prob is assigned to the group's LAST student token and every other student token of
the group gets 0. A group's log-prob is only known
once the group ends (before that no teacher token boundary coincides with the student's), and with
the reward-to-go at gamma = 1 every student token of the group still sees the whole group's
log-ratio in its return: the credit of each token is what it would be if the per-token values were
known. `group_sums` places the student's own group sums the same way, so
``student_token_logprobs(...) - group_sums(student_logp, ...)`` is the per-group log-ratio at
group ends and 0 elsewhere.

Character spans (`char_spans`). The text of a row is its decode with special tokens skipped and no
clean-up of spaces, so it is exactly the concatenation of what the tokens contribute. Token i ends
at c when decoding ids[:i+1] gives text[:c]; its span is (end of token i-1, c). Spans tile the
text: span 0 starts at 0 and span i starts where span i-1 ends. A token that does not end on a
character boundary of the text gets the EMPTY span (c, c) at the end of the previous token: a
byte-level token holding the first bytes of a multi-byte character (decoding the prefix then ends
in U+FFFD, not in the character), or a token whose text the decoder merges into the next one. The
token that completes those characters carries their whole span. Special tokens (EOS, role tokens)
decode to nothing and also get empty spans. Bytes that never form a valid character (a row cut
inside a character, byte garbage) decode to U+FFFD, which is then a character of the text like any
other, carried by the first token whose prefix decode shows it (the rest of those bytes get empty
spans); sums stay exact, only the grouping around such bytes is a convention.

Grouping rule (`align`). A group closes after a student token and a teacher token whose spans are
both non-empty and end at the same character; tokens with an empty span never close a group, so
they join the group of the next non-empty token (the character they start). Empty-span tokens
after the last text character (the EOS of a finished row on each side) form a final group of their
own; if only one side has such trailing tokens they join the last group instead, so every group
has at least one token on each side.

EOS. A row whose last masked-in token is one of the student's EOS ids ends with the teacher's EOS
id (`Tokenizer.eos_id`): the student's EOS and the teacher's EOS are the final group, and the
teacher's log-prob of ending the text there is carried to the student's EOS token. A row without
EOS (truncated at the length limit) gets no teacher EOS.

Requirements: the teacher's tokenizer must reproduce the text (decoding its own encoding gives the
text back; a `ValueError` names the row otherwise, e.g. a character outside its vocabulary), and
completion rows use the layout of `rollout.Rollout`: mask 1 from position 0 through the last token
(EOS included), then 0. Everything here runs on the host in NumPy.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any, NamedTuple

import numpy as np

REPLACEMENT = "\ufffd"  # what a decoder writes for bytes that are not (yet) a whole character
ASSIGN_MODES = ("last",)


class Alignment(NamedTuple):
    """Aligned groups of one row: `student_group[i]` / `teacher_group[j]` is the group index of
    student token i / teacher token j (non-decreasing, 0 .. num_groups - 1, every group present on
    both sides)."""

    student_group: np.ndarray  # [n_student] int32
    teacher_group: np.ndarray  # [n_teacher] int32
    num_groups: int


def hf_of(tokenizer: Any) -> Any:
    """The Hugging Face tokenizer of an `opdplus_jax.tokenizer.Tokenizer` (or an HF tokenizer)."""
    return getattr(tokenizer, "hf", tokenizer)


def decode_text(tokenizer: Any, ids: Sequence[int]) -> str:
    """The text of `ids` as this module uses it: special tokens skipped, no space clean-up."""
    return hf_of(tokenizer).decode(
        [int(i) for i in ids], skip_special_tokens=True, clean_up_tokenization_spaces=False
    )


def char_spans(tokenizer: Any, ids: Sequence[int]) -> list[tuple[int, int]]:
    """Character (start, end) of each token of `ids` within `decode_text(tokenizer, ids)`.

    The spans tile the text (see the module docstring): a token that does not end on a character
    boundary, and a special token, gets an empty span. When every token decodes on its own to
    whole characters and those pieces concatenate to the text, the spans are the pieces' lengths;
    otherwise (byte pieces of a character, decoders that depend on context such as a
    SentencePiece leading space) token i ends where the decode of ids[:i+1] ends, if that decode
    is a prefix of the text.
    """
    ids = [int(i) for i in ids]
    if not ids:
        return []
    hf = hf_of(tokenizer)
    text = decode_text(tokenizer, ids)
    kw = {"skip_special_tokens": True, "clean_up_tokenization_spaces": False}
    pieces = hf.batch_decode([[i] for i in ids], **kw)
    if "".join(pieces) == text and not any(REPLACEMENT in p for p in pieces):
        ends = np.cumsum([len(p) for p in pieces]).tolist()
    else:
        ends, end = [], 0
        for prefix in hf.batch_decode([ids[: k + 1] for k in range(len(ids))], **kw):
            if len(prefix) >= end and text.startswith(prefix):
                end = len(prefix)
            ends.append(end)
        ends[-1] = len(text)
    starts = [0, *ends[:-1]]
    return [(int(s), int(e)) for s, e in zip(starts, ends, strict=True)]


def check_tiling(spans: Sequence[tuple[int, int]], who: str) -> int:
    """Length of the text that `spans` tile; `ValueError` if they do not tile [0, length)."""
    end = 0
    for i, (s, e) in enumerate(spans):
        if s != end or e < s:
            raise ValueError(
                f"{who} spans must tile the text (span 0 starts at 0, span i starts where span "
                f"i-1 ends, start <= end); span {i} is ({s}, {e}) after end {end}"
            )
        end = e
    return end


def align(
    student_spans: Sequence[tuple[int, int]], teacher_spans: Sequence[tuple[int, int]]
) -> Alignment:
    """Group the student's and the teacher's tokens of one text at their common boundaries.

    Both span lists must tile the same text (`char_spans`). A group closes after the student token
    and the teacher token whose non-empty spans end at the same character; empty-span tokens join
    the next group, trailing ones (EOS) form a last group, or join the last one when only one side
    has them. When the text is empty and only one side has tokens (e.g. a truncated row of special
    tokens), they are one group whose other side is empty (its log-prob 0). Raises `ValueError`
    when the spans do not tile or cover texts of different lengths.
    """
    n_chars = check_tiling(student_spans, "student")
    t_chars = check_tiling(teacher_spans, "teacher")
    if n_chars != t_chars:
        raise ValueError(
            f"student spans cover {n_chars} characters but teacher spans {t_chars}: they must "
            "tile the same text"
        )
    if bool(student_spans) != bool(teacher_spans):
        # Tokens without text on one side only (e.g. a truncated row of special tokens): the
        # other side writes the same empty text with no token, log-prob 0. One group.
        s_n, t_n = len(student_spans), len(teacher_spans)
        return Alignment(np.zeros(s_n, np.int32), np.zeros(t_n, np.int32), 1)
    closing = lambda spans: {e for s, e in spans if e > s}
    common = closing(student_spans) & closing(teacher_spans)

    def groups(spans):
        out, g = [], 0
        for s, e in spans:
            out.append(g)
            g += int(e > s and e in common)
        return np.asarray(out, np.int32), g, len(spans) > 0 and out[-1] == g

    s_group, n_closed, s_trail = groups(student_spans)
    t_group, _, t_trail = groups(teacher_spans)
    if s_trail and t_trail:
        return Alignment(s_group, t_group, n_closed + 1)
    # No trailing tokens, or trailing empty tokens on one side only (then the text is not empty,
    # so a group has closed): they join the last closed group.
    s_group = np.minimum(s_group, n_closed - 1).astype(np.int32)
    t_group = np.minimum(t_group, n_closed - 1).astype(np.int32)
    return Alignment(s_group, t_group, n_closed)


def right_padded_lengths(mask: np.ndarray, what: str) -> np.ndarray:
    """Per-row number of masked-in tokens of a [B, T] mask of 1s then 0s; `ValueError` else."""
    keep = np.asarray(mask) != 0
    lengths = keep.sum(-1)
    prefix = np.arange(keep.shape[-1])[None] < lengths[:, None]
    bad = np.flatnonzero((keep != prefix).any(-1))
    if bad.size:
        raise ValueError(
            f"{what} must be 1 from position 0 through the last token then 0 (completion layout); "
            f"row {int(bad[0])} is {keep[bad[0]].astype(int).tolist()}"
        )
    return lengths


def retokenize(
    student_tok: Any,
    teacher_tok: Any,
    completion_ids: Any,
    mask: Any,
    *,
    max_len: int | None = None,
) -> tuple[np.ndarray, np.ndarray, list[Alignment]]:
    """Re-tokenise student completions with the teacher's tokenizer.

    Args:
      student_tok, teacher_tok: `opdplus_jax.tokenizer.Tokenizer`s.
      completion_ids, mask: [B, T] student completions, mask 1 from position 0 through EOS (or
        the last token of a truncated row), then 0.
      max_len: width T' of the teacher arrays. None = the longest teacher row (at least 1).

    Returns (teacher_ids [B, T'] int32 right-padded with the teacher's pad id, teacher_mask
    [B, T'] int32, alignments: one `Alignment` per row between its masked-in student tokens and
    teacher tokens). Each teacher row is the teacher's encoding (no special tokens added) of the
    row's text, followed by the teacher's EOS when the student row ends with one of the student's
    EOS ids. Raises `ValueError` on malformed arrays, a row that does not fit `max_len`, a
    teacher without EOS for a row that ends with EOS, or a teacher tokenizer that does not
    reproduce a row's text.
    """
    ids, mask = np.asarray(completion_ids), np.asarray(mask)
    if ids.ndim != 2 or ids.shape != mask.shape:
        raise ValueError(
            "completion_ids and mask must be 2-D [B, T] arrays of the same shape; got "
            f"{ids.shape} and {mask.shape}"
        )
    if max_len is not None and max_len < 0:
        raise ValueError(f"max_len must be >= 0, got {max_len}")
    lengths = right_padded_lengths(mask, "mask")
    student_eos = set(student_tok.eos_ids)
    rows, alignments = [], []
    for b in range(ids.shape[0]):
        row = ids[b, : lengths[b]].tolist()
        ends_with_eos = bool(row) and row[-1] in student_eos
        body = row[:-1] if ends_with_eos else row
        text = decode_text(student_tok, body)
        t_body = [int(i) for i in teacher_tok.encode(text, add_special_tokens=False)]
        t_text = decode_text(teacher_tok, t_body)
        if t_text != text:
            at = next(
                (i for i, (x, y) in enumerate(zip(text, t_text, strict=False)) if x != y), None
            )
            at = min(len(text), len(t_text)) if at is None else at
            raise ValueError(
                f"row {b}: the teacher tokenizer does not reproduce the student's text (it first "
                f"differs at character {at}: {text[at : at + 12]!r} became "
                f"{t_text[at : at + 12]!r}); the teacher cannot score this completion"
            )
        s_spans, t_spans = char_spans(student_tok, body), char_spans(teacher_tok, t_body)
        t_row = t_body
        if ends_with_eos:
            if teacher_tok.eos_id is None:
                raise ValueError(
                    f"row {b} ends with the student's EOS id {row[-1]} but the teacher tokenizer "
                    "has no EOS token to map it to"
                )
            t_row = [*t_body, int(teacher_tok.eos_id)]
            s_spans.append((len(text), len(text)))
            t_spans.append((len(text), len(text)))
        rows.append(t_row)
        alignments.append(align(s_spans, t_spans))
    longest = max((len(r) for r in rows), default=0)
    width = max(longest, 1) if max_len is None else max_len
    for b, r in enumerate(rows):
        if len(r) > width:
            raise ValueError(
                f"row {b}: the teacher's re-tokenisation has {len(r)} tokens (student row: "
                f"{int(lengths[b])} tokens), more than max_len={width}"
            )
    teacher_ids = np.full((len(rows), width), teacher_tok.pad_id, np.int32)
    teacher_mask = np.zeros((len(rows), width), np.int32)
    for b, r in enumerate(rows):
        teacher_ids[b, : len(r)] = r
        teacher_mask[b, : len(r)] = 1
    return teacher_ids, teacher_mask, alignments


def carry(values: Any, alignments: Sequence[Alignment], student_mask: Any, side: str):
    """Each group's sum of `values` (over the `side` tokens of the group, float64) placed at the
    group's last student token: [B, T] float32, 0 elsewhere."""
    values = np.asarray(values)
    smask = np.asarray(student_mask)
    if smask.ndim != 2:
        raise ValueError(f"student_mask must be a 2-D [B, T] array, got shape {smask.shape}")
    B, T = smask.shape
    if values.ndim != 2 or values.shape[0] != B or (side == "student" and values.shape != (B, T)):
        want = f"[{B}, {T}]" if side == "student" else f"[{B}, T']"
        raise ValueError(
            f"{side} values must be a 2-D {want} array matching student_mask {smask.shape}; got "
            f"{values.shape}"
        )
    if len(alignments) != B:
        raise ValueError(f"got {len(alignments)} alignments for {B} rows")
    lengths = right_padded_lengths(smask, "student_mask")
    out = np.zeros((B, T), np.float32)
    for b, al in enumerate(alignments):
        n_s = len(al.student_group)
        if n_s != lengths[b]:
            raise ValueError(
                f"row {b}: the alignment has {n_s} student tokens but student_mask has "
                f"{int(lengths[b])}"
            )
        groups = al.student_group if side == "student" else al.teacher_group
        if len(groups) > values.shape[1]:
            raise ValueError(
                f"row {b}: the alignment has {len(groups)} {side} tokens but the {side} values "
                f"have only {values.shape[1]} positions"
            )
        if not n_s:
            continue
        sums = np.bincount(
            groups, weights=values[b, : len(groups)].astype(np.float64), minlength=al.num_groups
        )
        last = np.flatnonzero(np.diff(al.student_group, append=al.num_groups))
        out[b, last] = sums[al.student_group[last]]
    return out


def student_token_logprobs(
    teacher_logp_BT2: Any,
    alignments: Sequence[Alignment],
    student_mask_BT: Any,
    *,
    assign: str = "last",
) -> np.ndarray:
    """Teacher log-probs of the teacher's tokens carried back to the student's tokens.

    Args:
      teacher_logp_BT2: [B, T'] the teacher's per-token log-probs of `retokenize`'s teacher_ids
        (e.g. `scoring.token_logprobs`), 0 or anything past each row's teacher tokens.
      alignments: `retokenize`'s per-row alignments.
      student_mask_BT: [B, T] the student completions' mask (1 through EOS, then 0).
      assign: "last" (the only mode): each group's teacher log-prob sum goes to the group's last
        student token, the group's other student tokens get 0 (module docstring).

    Returns [B, T] float32, 0 where the student mask is 0; each row sums to the teacher's log-prob
    of the row's text (and EOS).
    """
    if assign not in ASSIGN_MODES:
        raise ValueError(f"assign must be one of {ASSIGN_MODES}, got {assign!r}")
    return carry(teacher_logp_BT2, alignments, student_mask_BT, "teacher")


def group_sums(values_BT: Any, alignments: Sequence[Alignment], mask_BT: Any) -> np.ndarray:
    """Per-group sums of student-token values (e.g. the student's log-probs) at each group's last
    student token, 0 elsewhere: [B, T] float32, placed as `student_token_logprobs` places the
    teacher's, so their difference is the per-group log-ratio."""
    return carry(values_BT, alignments, mask_BT, "student")
