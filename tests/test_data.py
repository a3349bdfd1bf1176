"""Data: record loading errors, prompt/SFT pipelines, length filter, order, resumable state."""

import importlib.util
import json

import numpy as np
import pytest

from opdplus_jax import data, tasks
from opdplus_jax.tasks.tokenizer import save_tokenizer
from opdplus_jax.tokenizer import Tokenizer

HAS_PYARROW = importlib.util.find_spec("pyarrow") is not None
OVERHEAD = 4  # <bos><|user|> ... <|im_end|><|assistant|> around the prompt characters


@pytest.fixture(scope="module")
def tok(tmp_path_factory):
    return Tokenizer.from_pretrained(save_tokenizer(tmp_path_factory.mktemp("tok")))


@pytest.fixture(scope="module")
def examples():
    return tasks.get("addition").generate("train", 40, 0) + tasks.get(
        "reverse", teacher="strings"
    ).generate("train", 20, 0)


def _write(path, lines):
    path.write_text("".join(line + "\n" for line in lines))
    return path


def _drain(pipe, k=None):
    out = []
    for batch in pipe:
        out.append(batch)
        if k is not None and len(out) == k:
            break
    return out


def _same(a, b):
    assert len(a) == len(b)
    for x, y in zip(a, b, strict=True):
        assert x.keys() == y.keys()
        for key in x:
            if isinstance(x[key], np.ndarray):
                np.testing.assert_array_equal(x[key], y[key])
            else:
                assert x[key] == y[key], key


# --------------------------------------------------------------------------------- records


def test_load_jsonl(tmp_path, examples):
    path = tmp_path / "d.jsonl"
    tasks.write_jsonl(examples, path)
    with open(path, "a") as f:
        f.write('\n{"prompt": "p", "answer": 3}\n')  # blank line skipped, number -> string
    recs = data.load_records(path)
    assert len(recs) == len(examples) + 1
    assert recs[0] == {k: examples[0].to_dict()[k] for k in data.FIELDS}
    assert recs[-1]["answer"] == "3" and recs[-1]["teacher"] is None


@pytest.mark.parametrize(
    ("lines", "match"),
    [
        ([], "file has no records.*make_data"),
        (["", "  "], "file has no records"),
        (
            ['{"prompt": "a", "answer": "1"}', '{"prompt": "b", "answer": '],
            r"d\.jsonl:2: malformed JSON",
        ),
        (
            ['{"prompt": "a"}'],
            r"d\.jsonl:1: record has no 'answer' field \(fields present: prompt\)",
        ),
        (['{"answer": "1"}'], r":1: record has no 'prompt' field"),
        (['{"prompt": "  ", "answer": "1"}'], "'prompt' is empty"),
        (['{"prompt": ["a"], "answer": "1"}'], "'prompt' must be a string, got list"),
        (['["a", "1"]'], "expected a JSON object"),
    ],
)
def test_load_errors(tmp_path, lines, match):
    path = _write(tmp_path / "d.jsonl", lines)
    with pytest.raises(ValueError, match=match) as info:
        data.load_records(path)
    assert str(path) in str(info.value)


def test_load_other_errors(tmp_path):
    with pytest.raises(ValueError, match=r"missing\.jsonl: data file does not exist; .*make_data"):
        data.load_records(tmp_path / "missing.jsonl")
    with pytest.raises(ValueError, match=r"unknown data format '\.csv'"):
        data.load_records(_write(tmp_path / "d.csv", ["prompt,answer"]))
    assert data.load_records(
        _write(tmp_path / "p.jsonl", ['{"prompt": "a"}']), required=("prompt",)
    )


@pytest.mark.skipif(not HAS_PYARROW, reason="pyarrow is not installed")
def test_parquet_round_trip(tmp_path, examples):
    path = tmp_path / "d.parquet"
    data.write_parquet(examples, path)
    jsonl = tmp_path / "d.jsonl"
    tasks.write_jsonl(examples, jsonl)
    assert data.load_records(path) == data.load_records(jsonl)
    import pyarrow as pa
    import pyarrow.parquet as pq

    pq.write_table(
        pa.table({"prompt": ["a", "b"], "answer": ["1", None]}), tmp_path / "bad.parquet"
    )
    with pytest.raises(ValueError, match=r"bad\.parquet row 1: record has no 'answer'"):
        data.load_records(tmp_path / "bad.parquet")


# -------------------------------------------------------------------------------- pipeline


def test_prompt_batches(tok, examples):
    pipe = data.PromptPipeline(
        examples, tok, batch_size=8, max_prompt_len=32, seed=0, teachers=["math", "strings"]
    )
    batch = next(pipe)
    assert batch["prompt_ids"].shape == batch["prompt_mask"].shape == (8, 32)
    assert batch["prompt_ids"].dtype == np.int32
    for b in range(8):
        toks = batch["prompt_tokens"][b]
        i = int(batch["index"][b])
        assert batch["prompt_lens"][b] == len(toks) == batch["prompt_mask"][b].sum()
        np.testing.assert_array_equal(batch["prompt_ids"][b, 32 - len(toks) :], toks)
        assert (batch["prompt_ids"][b, : 32 - len(toks)] == tok.pad_id).all()
        assert toks == tok.apply_chat_template([{"role": "user", "content": examples[i].prompt}])
        assert batch["answer"][b] == examples[i].answer and batch["task"][b] == examples[i].task
        assert batch["teacher"][b] == (1 if examples[i].teacher == "strings" else 0)
        assert batch["teacher_name"][b] == examples[i].teacher
    json.dumps(pipe.get_state())


def test_length_filter_counts(tok):
    recs = [{"prompt": "x" * n, "answer": "1"} for n in (3, 10, 20, 12, 11, 40)]
    pipe = data.PromptPipeline(recs, tok, batch_size=2, max_prompt_len=12 + OVERHEAD, num_epochs=1)
    assert pipe.stats == {
        "num_records": 6,
        "num_kept": 4,
        "num_dropped": 2,
        "dropped": {"prompt_too_long": 2},
        "longest_kept": 12 + OVERHEAD,
        "longest_dropped": 40 + OVERHEAD,
    }
    seen = sorted(int(i) for b in _drain(pipe) for i in b["index"])
    assert seen == [0, 1, 3, 4]
    with pytest.raises(ValueError, match="all 6 prompts are longer than max_prompt_len=5"):
        data.PromptPipeline(recs, tok, batch_size=2, max_prompt_len=5)


def test_order_is_deterministic_and_covers_epochs(tok, examples):
    kw = {"batch_size": 6, "max_prompt_len": 32, "num_epochs": 3}
    a = _drain(data.PromptPipeline(examples, tok, seed=7, **kw))
    _same(a, _drain(data.PromptPipeline(examples, tok, seed=7, **kw)))
    b = _drain(data.PromptPipeline(examples, tok, seed=8, **kw))
    assert [x["index"].tolist() for x in a] != [x["index"].tolist() for x in b]
    assert len(a) == 3 * len(examples) // 6
    order = np.concatenate([x["index"] for x in a])
    epochs = np.concatenate([x["epoch"] for x in a])
    for e in range(3):  # every epoch is a permutation of all examples, re-shuffled each epoch
        assert sorted(order[epochs == e]) == list(range(len(examples)))
    assert not np.array_equal(order[epochs == 0], order[epochs == 1])
    plain = _drain(data.PromptPipeline(examples, tok, shuffle=False, **kw))
    assert np.concatenate([x["index"] for x in plain])[:60].tolist() == list(range(60))


def test_state_save_restore(tok, examples):
    kw = {"batch_size": 7, "max_prompt_len": 32, "seed": 3, "teachers": ["m", "strings"]}
    full = _drain(data.PromptPipeline(examples, tok, **kw), 25)  # crosses epoch boundaries
    first = data.PromptPipeline(examples, tok, **kw)
    head = _drain(first, 11)
    state = json.loads(json.dumps(first.get_state()))
    assert state["batches"] == 11 and state["epoch"] == 11 * 7 // len(examples)
    resumed = data.PromptPipeline(examples, tok, **kw)
    resumed.set_state(state)
    _same(full, head + _drain(resumed, 14))
    with pytest.raises(ValueError, match="seed: saved 3, now 4"):
        data.PromptPipeline(examples, tok, **{**kw, "seed": 4}).set_state(state)
    with pytest.raises(ValueError, match="data_hash"):
        data.PromptPipeline(examples[:-1], tok, **kw).set_state(state)


def test_teacher_errors_and_remainder(tok, examples):
    with pytest.raises(
        ValueError, match="record 40: unknown teacher 'strings'; valid teachers: math"
    ):
        data.PromptPipeline(examples, tok, batch_size=4, max_prompt_len=32, teachers=["math"])
    with pytest.raises(ValueError, match="fewer than batch_size=100"):
        data.PromptPipeline(examples, tok, batch_size=100, max_prompt_len=32, num_epochs=1)
    evalp = data.PromptPipeline(
        examples,
        tok,
        batch_size=25,
        max_prompt_len=32,
        num_epochs=1,
        shuffle=False,
        drop_remainder=False,
    )
    assert [len(b["answer"]) for b in evalp] == [25, 25, 10]


def test_per_teacher_batches_are_static_blocks(tok, examples):
    """Every batch: 4 prompts of teacher 0 (40 records), then 2 of teacher 1 (20 records); each
    teacher's stream covers all its records once per its own epoch, deterministically, and
    resumes where it stopped."""
    kw = {"batch_size": 6, "max_prompt_len": 32, "seed": 5, "teachers": ["math", "strings"],
          "teacher_batch_sizes": [4, 2]}  # fmt: skip
    full = _drain(data.PromptPipeline(examples, tok, **kw), 25)
    for batch in full:
        np.testing.assert_array_equal(batch["teacher"], [0, 0, 0, 0, 1, 1])
        assert batch["teacher_name"][4:] == ["strings"] * 2
    for k, (lo, hi, n) in enumerate(((0, 4, 40), (4, 6, 20))):
        order = np.concatenate([b["index"][lo:hi] for b in full[:10]])
        assert sorted(order) == sorted(i for i, ex in enumerate(examples)
                                       if (ex.teacher == "strings") == bool(k))  # fmt: skip
        assert len(order) == n
    assert not np.array_equal(full[0]["index"], full[10]["index"])  # re-shuffled per epoch
    _same(full, _drain(data.PromptPipeline(examples, tok, **kw), 25))
    first = data.PromptPipeline(examples, tok, **kw)
    head = _drain(first, 12)
    state = json.loads(json.dumps(first.get_state()))
    assert state["epoch"] == 1  # the teacher-0 stream is in its second pass
    resumed = data.PromptPipeline(examples, tok, **kw)
    resumed.set_state(state)
    _same(full, head + _drain(resumed, 13))
    mixed = data.PromptPipeline(examples, tok, **{**kw, "teacher_batch_sizes": None})
    with pytest.raises(ValueError, match=r"teacher_batch_sizes: saved \[4, 2\], now None"):
        mixed.set_state(state)


@pytest.mark.parametrize(
    ("sizes", "match"),
    [
        ([3, 2], r"must be ints >= 1 summing to batch_size=6"),
        ([6, 0], r"must be ints >= 1 summing to batch_size=6"),
        ([6], "needs one size per name in teachers"),
    ],
)
def test_bad_teacher_batch_sizes(tok, examples, sizes, match):
    with pytest.raises(ValueError, match=match):
        data.PromptPipeline(examples, tok, batch_size=6, max_prompt_len=32,
                            teachers=["math", "strings"], teacher_batch_sizes=sizes)  # fmt: skip


def test_a_teacher_without_records_cannot_fill_its_block(tok, examples):
    with pytest.raises(ValueError, match="no record \\(of 60 kept\\) names teacher 'code'"):
        data.PromptPipeline(examples, tok, batch_size=6, max_prompt_len=32,
                            teachers=["math", "strings", "code"],
                            teacher_batch_sizes=[2, 2, 2])  # fmt: skip


def test_load_from_file(tmp_path, tok, examples):
    path = tmp_path / "train.jsonl"
    tasks.write_jsonl(examples, path)
    a = _drain(data.PromptPipeline(path, tok, batch_size=5, max_prompt_len=32), 4)
    _same(a, _drain(data.PromptPipeline(examples, tok, batch_size=5, max_prompt_len=32), 4))
    with pytest.raises(ValueError, match="does not exist"):
        data.PromptPipeline(tmp_path / "nope.jsonl", tok, batch_size=5, max_prompt_len=32)


def test_sft_batches(tok, examples):
    recs = [e.to_dict() for e in examples]
    recs[0] = {**recs[0], "solution": "y" * 200}  # too long for seq_len
    pipe = data.sft_batches(recs, tok, seq_len=64, batch_size=4, seed=1)
    assert pipe.stats["dropped"] == {"sequence_too_long": 1}
    for batch in _drain(pipe, 5):
        assert batch["tokens"].shape == batch["loss_mask"].shape == (4, 64)
        for b in range(4):
            ex = examples[int(batch["index"][b])]
            n = int(batch["attention_mask"][b].sum())
            assert batch["attention_mask"][b, :n].all() and not batch["attention_mask"][b, n:].any()
            target = batch["tokens"][b][batch["loss_mask"][b] == 1]
            assert tok.decode(target[:-1]) == ex.solution and target[-1] == tok.eos_id
            p = int(batch["prompt_lens"][b])
            assert not batch["loss_mask"][b, :p].any() and batch["loss_mask"][b, p:n].all()
            assert tok.decode(batch["tokens"][b, :p]) == ex.prompt
    state = pipe.get_state()
    resumed = data.sft_batches(recs, tok, seq_len=64, batch_size=4, seed=1)
    resumed.set_state(json.loads(json.dumps(state)))
    _same(_drain(pipe, 3), _drain(resumed, 3))
    with pytest.raises(ValueError, match="no 'solution' field"):
        data.sft_batches([{"prompt": "a", "answer": "1"}], tok, seq_len=8, batch_size=1)
