"""Cross-tokenizer teachers: character spans, aligned groups, re-tokenisation, carried log-probs.

Three tokenizers segment the same addition-task text differently: the project's character
tokenizer, a SentencePiece-style BPE (Metaspace) trained here on task texts, and the byte-level
BPE of the Qwen3 test fixture (whose tokens can hold part of a multi-byte character).
"""

from __future__ import annotations

import json
import os

import numpy as np
import pytest
import transformers
from flax import nnx
from tokenizers import Tokenizer as RawTokenizer
from tokenizers import decoders, pre_tokenizers, trainers
from tokenizers import models as tok_models

from opdplus_jax import crosstok, models, scoring, tasks
from opdplus_jax.tasks.tokenizer import save_tokenizer
from opdplus_jax.tokenizer import Tokenizer

QWEN = os.path.join(os.path.dirname(__file__), "testdata", "models", "qwen3_tied")
EXAMPLES = tasks.get("addition", max_digits=4).generate("train", 64, seed=0)
EXTRA_TEXT = "12 + é = 日本, café!\n#### 5"  # multi-byte characters, spaces, punctuation


def train_bpe(pad: bool = True, eos: bool = True):
    """A Metaspace BPE trained on task texts (merges cross '+', '=', newlines: unlike Qwen's)."""
    # U+FFFD in the alphabet: it can score a student row cut inside a multi-byte character.
    corpus = [f"{e.prompt}\n{e.solution}" for e in EXAMPLES] + [EXTRA_TEXT, "\ufffd"] * 4
    raw = RawTokenizer(tok_models.BPE(unk_token="<unk>"))
    raw.pre_tokenizer = pre_tokenizers.Metaspace(replacement="▁", prepend_scheme="always")
    raw.decoder = decoders.Metaspace(replacement="▁", prepend_scheme="always")
    raw.train_from_iterator(
        corpus, trainers.BpeTrainer(vocab_size=120, special_tokens=["<pad>", "<unk>", "</s>"])
    )
    special = {"unk_token": "<unk>", "pad_token": "<pad>" if pad else None}
    special["eos_token"] = "</s>" if eos else None
    return transformers.PreTrainedTokenizerFast(tokenizer_object=raw, **special)


@pytest.fixture(scope="module")
def toks(tmp_path_factory):
    root = tmp_path_factory.mktemp("tokenizers")
    bpe = os.fspath(root / "bpe")
    train_bpe().save_pretrained(bpe)
    path = os.path.join(bpe, "tokenizer_config.json")
    with open(path, encoding="utf-8") as f:
        config = json.load(f)
    config["tokenizer_class"] = "PreTrainedTokenizerFast"
    with open(path, "w", encoding="utf-8") as f:
        json.dump(config, f)
    return {
        "char": Tokenizer.from_pretrained(save_tokenizer(root / "char")),
        "char2": Tokenizer.from_pretrained(save_tokenizer(root / "char2")),
        "bpe": Tokenizer.from_pretrained(bpe),
        "qwen": Tokenizer.from_pretrained(QWEN),
    }


def texts(multibyte: bool):
    out = [e.solution for e in EXAMPLES[:4]] + ["", "7"]
    return [*out, EXTRA_TEXT] if multibyte else out


def reference_spans(tok, ids):
    """Spans by the definition: token i ends where decode(ids[:i+1]) ends, if that decode is a
    prefix of the text and does not go backwards; otherwise where the previous token ended."""
    text = crosstok.decode_text(tok, ids)
    ends, end = [], 0
    if not ids:
        return []
    for k in range(len(ids)):
        prefix = crosstok.decode_text(tok, ids[: k + 1])
        if len(prefix) >= end and text.startswith(prefix):
            end = len(prefix)
        ends.append(end)
    return list(zip([0, *ends[:-1]], ends, strict=True))


def char_ids(tok, text):
    """A non-canonical tokenisation of `text`: one token per character (per byte for Qwen)."""
    ids = [i for ch in text for i in tok.encode(ch)]
    if crosstok.decode_text(tok, ids) != text:  # Metaspace: spaces are '▁' pieces
        ids = tok.hf.convert_tokens_to_ids(list("▁" + text.replace(" ", "▁")))
    assert crosstok.decode_text(tok, ids) == text
    return ids


@pytest.mark.parametrize("name", ["char", "bpe", "qwen"])
def test_char_spans_tile_the_decoded_text(toks, name):
    tok = toks[name]
    rows = [tok.encode(t) for t in texts(multibyte=name != "char")]
    rows += [char_ids(tok, EXAMPLES[5].solution), [*tok.encode("1+2"), tok.eos_id]]
    for ids in rows:
        text = crosstok.decode_text(tok, ids)
        spans = crosstok.char_spans(tok, ids)
        assert len(spans) == len(ids)
        assert "".join(text[s:e] for s, e in spans) == text
        assert crosstok.check_tiling(spans, name) == len(text)
        assert spans == reference_spans(tok, ids)  # the fast path agrees with the definition
        for i, (s, e) in enumerate(spans):
            if e > s:
                assert crosstok.decode_text(tok, ids[: i + 1]) == text[:e]
    eos_span = crosstok.char_spans(tok, rows[-1])[-1]
    assert eos_span == (3, 3)  # a special token gets an empty span


def test_a_byte_token_inside_a_character_gets_an_empty_span(toks):
    qwen = toks["qwen"]
    ids = qwen.encode("a日b")
    assert len(ids) == 5  # 'a', the three bytes of '日', 'b'
    assert crosstok.char_spans(qwen, ids) == [(0, 1), (1, 1), (1, 1), (1, 2), (2, 3)]
    cut = ids[:3]  # truncated inside the character: the bytes decode to one U+FFFD
    text = crosstok.decode_text(qwen, cut)
    assert text == "a\ufffd"
    assert crosstok.char_spans(qwen, cut) == [(0, 1), (1, 2), (2, 2)]


def test_align_hand_made_spans():
    al = crosstok.align([(0, 1), (1, 2), (2, 4)], [(0, 2), (2, 3), (3, 4)])
    assert al.student_group.tolist() == [0, 0, 1] and al.teacher_group.tolist() == [0, 1, 1]
    assert al.num_groups == 2
    # An empty-span token joins the next group; trailing ones on both sides are a last group.
    al = crosstok.align([(0, 1), (1, 1), (1, 3), (3, 3)], [(0, 2), (2, 3), (3, 3), (3, 3)])
    assert al.student_group.tolist() == [0, 0, 0, 1] and al.teacher_group.tolist() == [0, 0, 1, 1]
    assert al.num_groups == 2
    # Trailing empty tokens on one side only join the last group.
    al = crosstok.align([(0, 1), (1, 2), (2, 2)], [(0, 1), (1, 2)])
    assert al.student_group.tolist() == [0, 1, 1] and al.teacher_group.tolist() == [0, 1]
    al = crosstok.align([(0, 0)], [(0, 0), (0, 0)])  # empty text: one group
    assert al.num_groups == 1 and al.teacher_group.tolist() == [0, 0]
    al = crosstok.align([], [])
    assert al.num_groups == 0 and al.student_group.shape == (0,)


PAIRS = [("char", "bpe"), ("bpe", "char"), ("qwen", "bpe"), ("bpe", "qwen"), ("char", "qwen")]


@pytest.mark.parametrize(("student", "teacher"), PAIRS)
def test_groups_partition_both_sides_at_common_boundaries(toks, student, teacher):
    s_tok, t_tok = toks[student], toks[teacher]
    multibyte = "char" not in (student, teacher)
    for text in texts(multibyte):
        for s_ids in (s_tok.encode(text), char_ids(s_tok, text)):
            t_ids = t_tok.encode(text)
            s_spans, t_spans = crosstok.char_spans(s_tok, s_ids), crosstok.char_spans(t_tok, t_ids)
            al = crosstok.align(s_spans, t_spans)
            for groups, n in ((al.student_group, len(s_ids)), (al.teacher_group, len(t_ids))):
                assert groups.shape == (n,) and groups.dtype == np.int32
                # Non-decreasing from 0 in steps of 0 or 1, every group present on this side.
                assert n == 0 or (groups[0] == 0 and groups[-1] == al.num_groups - 1)
                assert set(np.diff(groups).tolist()) <= {0, 1}
            s_ends = np.flatnonzero(np.diff(al.student_group, append=al.num_groups))
            t_ends = np.flatnonzero(np.diff(al.teacher_group, append=al.num_groups))
            common = {e for s, e in s_spans if e > s} & {e for s, e in t_spans if e > s}
            assert [s_spans[i][1] for i in s_ends] == sorted(common)
            for i, j in zip(s_ends, t_ends, strict=True):
                end = s_spans[i][1]
                assert t_spans[j][1] == end
                assert crosstok.decode_text(s_tok, s_ids[: i + 1]) == text[:end]
                assert crosstok.decode_text(t_tok, t_ids[: j + 1]) == text[:end]


def completions(tok, *, multibyte: bool, width: int | None = None):
    """[B, T] student completions (mask 1 through EOS): canonical rows with and without EOS, an
    empty row, an EOS-only row, a non-canonical row, rows truncated mid-text."""
    rows = [[*tok.encode(EXAMPLES[b].solution), tok.eos_id] for b in range(3)]
    rows.append(tok.encode(EXAMPLES[3].solution)[:9])  # truncated, no EOS
    rows.append([])
    rows.append([tok.eos_id])
    rows.append([*char_ids(tok, EXAMPLES[4].solution), tok.eos_id])
    if multibyte:
        rows.append([*tok.encode(EXTRA_TEXT), tok.eos_id])
        rows.append(tok.encode(EXTRA_TEXT)[:6])  # for Qwen: cut inside 'é' (a U+FFFD)
    width = width or max(map(len, rows)) + 2
    ids, mask = tok.pad(rows, length=width, side="right")
    return ids, mask, rows


def teacher_model(vocab: int, seed: int = 0):
    cfg = models.qwen3_config(
        vocab_size=vocab + 3, hidden_size=16, num_layers=1, num_heads=2, num_kv_heads=1
    )
    model = models.CausalLM(cfg, rngs=nnx.Rngs(seed))
    model.embed_tokens.set_value(model.embed_tokens[...] * 8.0)  # less uniform outputs
    return nnx.split(model, nnx.Param)


def teacher_prompts(t_tok, n):
    return t_tok.pad([t_tok.encode(EXAMPLES[b % len(EXAMPLES)].prompt) for b in range(n)])


@pytest.mark.parametrize(
    ("student", "teacher"), [("char", "bpe"), ("qwen", "bpe"), ("bpe", "qwen")]
)
def test_sequence_level_teacher_logprob_is_exact(toks, student, teacher):
    s_tok, t_tok = toks[student], toks[teacher]
    ids, mask, rows = completions(s_tok, multibyte=student != "char")
    if student == "qwen":
        assert crosstok.decode_text(s_tok, rows[-1]).endswith("\ufffd")
    t_ids, t_mask, alignments = crosstok.retokenize(s_tok, t_tok, ids, mask)
    B = ids.shape[0]
    assert t_ids.shape[0] == B and len(alignments) == B
    model = teacher_model(t_tok.vocab_size)
    prompt, prompt_mask = teacher_prompts(t_tok, B)
    t_logp = np.asarray(
        scoring.token_logprobs(
            model, prompt, prompt_mask, t_ids, t_mask, vocab_size=t_tok.vocab_size
        )
    )
    carried = crosstok.student_token_logprobs(t_logp, alignments, mask)
    assert carried.shape == ids.shape and carried.dtype == np.float32
    assert (carried[mask == 0] == 0).all()

    # The teacher's log-prob of each completion text (+ EOS), from tokens built independently.
    refs = []
    for row in rows:
        ends = bool(row) and row[-1] == s_tok.eos_id
        text = crosstok.decode_text(s_tok, row[:-1] if ends else row)
        refs.append([*t_tok.encode(text), *([t_tok.eos_id] if ends else [])])
    ref_ids, ref_mask = t_tok.pad(refs, length=t_ids.shape[1], side="right")
    np.testing.assert_array_equal(ref_ids, t_ids)
    ref = np.asarray(
        scoring.token_logprobs(
            model, prompt, prompt_mask, ref_ids, ref_mask, vocab_size=t_tok.vocab_size
        ),
        np.float64,
    ).sum(-1)
    got = carried.astype(np.float64).sum(-1)
    assert np.all(ref[[len(r) > 0 for r in rows]] < -1.0)  # non-trivial log-probs
    np.testing.assert_allclose(got, ref, rtol=2e-6, atol=1e-5)

    for b, al in enumerate(alignments):
        # Each group's teacher log-prob sits at its last student token, the others are 0.
        group_t = np.bincount(
            al.teacher_group, t_logp[b, : len(al.teacher_group)], minlength=al.num_groups
        )
        last = np.flatnonzero(np.diff(al.student_group, append=al.num_groups))
        np.testing.assert_allclose(carried[b, last], group_t, rtol=1e-6, atol=1e-6)
        others = np.setdiff1d(np.arange(len(al.student_group)), last)
        assert (carried[b, others] == 0).all()

    # The student's group sums are placed the same way and keep each row's total.
    student_logp = np.where(mask == 1, np.random.default_rng(0).normal(size=ids.shape), 0.0)
    sums = crosstok.group_sums(student_logp, alignments, mask)
    np.testing.assert_allclose(sums.sum(-1), student_logp.sum(-1), atol=1e-5)
    for b, al in enumerate(alignments):
        last = np.flatnonzero(np.diff(al.student_group, append=al.num_groups))
        expect = np.bincount(
            al.student_group, student_logp[b, : len(al.student_group)], minlength=al.num_groups
        )
        np.testing.assert_allclose(sums[b, last], expect, atol=1e-6)
        assert np.count_nonzero(sums[b]) <= len(last)


def test_retokenize_layout_and_eos(toks):
    s_tok, t_tok = toks["char"], toks["bpe"]
    ids, mask, rows = completions(s_tok, multibyte=False)
    t_ids, t_mask, alignments = crosstok.retokenize(s_tok, t_tok, ids, mask)
    lengths = t_mask.sum(-1)
    assert t_ids.shape[1] == lengths.max() and t_ids.dtype == np.int32
    assert (t_ids[t_mask == 0] == t_tok.pad_id).all()
    for b, row in enumerate(rows):
        n = int(lengths[b])
        assert (t_mask[b, :n] == 1).all()
        ends = bool(row) and row[-1] == s_tok.eos_id
        assert (n > 0 and t_ids[b, n - 1] == t_tok.eos_id) == ends
        body = row[:-1] if ends else row
        assert t_tok.decode(t_ids[b, :n]) == s_tok.decode(body)
        al = alignments[b]
        assert len(al.student_group) == len(row) and len(al.teacher_group) == n
        if ends:  # the student's EOS and the teacher's EOS are a group of their own
            assert al.student_group[-1] == al.teacher_group[-1] == al.num_groups - 1
            assert (al.student_group == al.num_groups - 1).sum() == 1
            assert (al.teacher_group == al.num_groups - 1).sum() == 1
    wide, _, _ = crosstok.retokenize(s_tok, t_tok, ids, mask, max_len=40)
    assert wide.shape == (ids.shape[0], 40)
    np.testing.assert_array_equal(wide[:, : t_ids.shape[1]], t_ids)
    empty, empty_mask, als = crosstok.retokenize(s_tok, t_tok, ids[:1], np.zeros_like(mask[:1]))
    assert empty.shape == (1, 1) and empty_mask.sum() == 0 and als[0].num_groups == 0


@pytest.mark.parametrize("name", ["char", "qwen"])
def test_identical_tokenizers_give_the_identity_alignment(toks, name):
    s_tok = toks[name]
    t_tok = toks["char2"] if name == "char" else Tokenizer.from_pretrained(QWEN)
    rows = [[*s_tok.encode(EXAMPLES[b].solution), s_tok.eos_id] for b in range(3)]
    rows.append(s_tok.encode(EXAMPLES[3].solution)[:6])
    ids, mask = s_tok.pad(rows, side="right")
    t_ids, t_mask, alignments = crosstok.retokenize(s_tok, t_tok, ids, mask)
    np.testing.assert_array_equal(t_mask, mask)
    np.testing.assert_array_equal(np.where(mask == 1, t_ids, -1), np.where(mask == 1, ids, -1))
    for row, al in zip(rows, alignments, strict=True):
        n = len(row)
        assert al.num_groups == n
        np.testing.assert_array_equal(al.student_group, np.arange(n))
        np.testing.assert_array_equal(al.teacher_group, np.arange(n))
    model = teacher_model(t_tok.vocab_size, seed=1)
    prompt, prompt_mask = teacher_prompts(t_tok, len(rows))
    t_logp = np.asarray(
        scoring.token_logprobs(
            model, prompt, prompt_mask, t_ids, t_mask, vocab_size=t_tok.vocab_size
        )
    )
    carried = crosstok.student_token_logprobs(t_logp, alignments, mask)
    np.testing.assert_array_equal(carried, t_logp)
    np.testing.assert_array_equal(crosstok.group_sums(t_logp, alignments, mask), t_logp)


def test_bad_inputs_raise_clear_errors(toks):
    char, bpe = toks["char"], toks["bpe"]
    ids, mask, _ = completions(char, multibyte=False)
    with pytest.raises(ValueError, match="same shape"):
        crosstok.retokenize(char, bpe, ids, mask[:, :-1])
    with pytest.raises(ValueError, match="2-D"):
        crosstok.retokenize(char, bpe, ids[0], mask[0])
    holes = mask.copy()
    holes[0, 1] = 0
    with pytest.raises(ValueError, match="row 0 is"):
        crosstok.retokenize(char, bpe, ids, holes)
    with pytest.raises(
        ValueError,
        match=r"row 0: the teacher's re-tokenisation has \d+ tokens "
        r"\(student row: \d+ tokens\), more than max_len=3",
    ):
        crosstok.retokenize(char, bpe, ids, mask, max_len=3)
    no_eos = Tokenizer(train_bpe(eos=False))
    assert no_eos.eos_id is None
    with pytest.raises(ValueError, match="row 0 ends with the student's EOS id 3 but the teacher"):
        crosstok.retokenize(char, no_eos, ids, mask)
    crosstok.retokenize(char, no_eos, ids[3:5], mask[3:5])  # rows without EOS need none
    odd, odd_mask = char.pad([char.encode("1+2"), char.encode("1 + 2 ~ 3")], side="right")
    with pytest.raises(ValueError, match="row 1: the teacher tokenizer does not reproduce"):
        crosstok.retokenize(char, bpe, odd, odd_mask)  # '~' is outside the BPE's alphabet

    with pytest.raises(ValueError, match="must tile"):
        crosstok.align([(0, 1), (2, 3)], [(0, 3)])
    with pytest.raises(ValueError, match="must tile"):
        crosstok.align([(1, 2)], [(0, 2)])
    with pytest.raises(ValueError, match="student spans cover 2 characters but teacher spans 3"):
        crosstok.align([(0, 2)], [(0, 3)])
    # Special tokens without text on one side only: one group, the other side empty.
    al = crosstok.align([(0, 0), (0, 0)], [])
    assert al.num_groups == 1 and al.student_group.tolist() == [0, 0] and len(al.teacher_group) == 0

    t_ids, _, als = crosstok.retokenize(char, bpe, ids, mask)
    t_logp = np.zeros(t_ids.shape, np.float32)
    with pytest.raises(ValueError, match="assign must be one of"):
        crosstok.student_token_logprobs(t_logp, als, mask, assign="mean")
    with pytest.raises(ValueError, match=r"got 2 alignments for \d+ rows"):
        crosstok.student_token_logprobs(t_logp, als[:2], mask)
    with pytest.raises(ValueError, match="matching student_mask"):
        crosstok.student_token_logprobs(t_logp[:2], als, mask)
    with pytest.raises(ValueError, match="teacher values have only 2 positions"):
        crosstok.student_token_logprobs(t_logp[:, :2], als, mask)
    short = mask.copy()
    short[0, int(mask[0].sum()) - 1] = 0
    with pytest.raises(ValueError, match=r"row 0: the alignment has \d+ student tokens but"):
        crosstok.student_token_logprobs(t_logp, als, short)
    with pytest.raises(ValueError, match="matching student_mask"):
        crosstok.group_sums(np.zeros((ids.shape[0], 3)), als, mask)
