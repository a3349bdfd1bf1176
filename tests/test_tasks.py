"""Synthetic tasks: determinism, disjoint splits, worked solutions verify, tool calls, tokenizer."""

import json
import re

import pytest

from opdplus_jax import tasks
from opdplus_jax.tasks import make_data
from opdplus_jax.tasks.tokenizer import ALPHABET, SPECIAL_TOKENS, save_tokenizer
from opdplus_jax.tokenizer import Tokenizer

NAMES = tasks.names()


def _corrupt(answer: str) -> str:
    """Change the last character to another one of the same kind (digit or letter)."""
    c = answer[-1]
    if c.isdigit():
        new = str((int(c) + 1) % 10)
    elif c.isalpha():
        new = "a" if c.lower() == "z" else chr(ord(c) + 1)
    else:
        new = "0"
    return answer[:-1] + new


def test_registry():
    assert set(NAMES) == {"addition", "multiplication", "modular", "sort", "reverse", "tool_use"}
    with pytest.raises(ValueError, match="unknown task 'division'; valid names: addition"):
        tasks.get("division")
    with pytest.raises(ValueError, match=r"no parameter.*max_digits=3"):
        tasks.get("addition", digits=3)
    with pytest.raises(ValueError, match="min_digits"):
        tasks.get("addition", min_digits=4, max_digits=2)
    assert tasks.get("addition", max_digits=5).max_digits == 5


@pytest.mark.parametrize("name", NAMES)
def test_deterministic_and_disjoint(name):
    task = tasks.get(name)
    a = task.generate("train", 300, seed=0)
    assert a == task.generate("train", 300, seed=0)
    assert a != task.generate("train", 300, seed=1)
    train = {ex.prompt for s in (0, 1) for ex in task.generate("train", 300, seed=s)}
    test = {ex.prompt for s in (0, 1) for ex in task.generate("test", 60, seed=s)}
    assert not train & test
    assert len({ex.prompt for ex in a}) == 300  # unique within a call
    assert all(task.split_of(p) == "test" for p in test)
    for ex in a[:5]:
        assert ex.task == name and ex.domain == task.domain and ex.teacher is None


@pytest.mark.parametrize("name", NAMES)
def test_solutions_verify_and_corruptions_fail(name):
    task = tasks.get(name, teacher="t0")
    examples = [ex for seed in range(5) for ex in task.generate("train", 40, seed=seed)]
    examples += task.generate("test", 40, seed=0)
    for ex in examples:
        assert ex.teacher == "t0"
        assert task.verify(ex.solution, ex) == 1.0, ex
        assert task.verify(ex.solution, ex.to_dict()) == 1.0
        assert task.verify(ex.solution, _corrupt(ex.answer)) == 0.0, ex
        if name != "tool_use":
            assert tasks.final_answer(ex.solution) == ex.answer
            head = ex.solution.rsplit("####", 1)[0]
            assert task.verify(f"{head}#### {_corrupt(ex.answer)}", ex) == 0.0
            assert task.verify(head, ex) == 0.0  # no final answer line


def test_worked_steps_reconstruct_the_answer():
    for ex in tasks.get("addition", max_digits=6).generate("train", 200, seed=3):
        lines = ex.solution.splitlines()[:-1]
        sums = [int(line.split("=")[1]) for line in lines]
        digits = "".join(str(s % 10) for s in reversed(sums))
        a, b = map(int, re.findall(r"\d+", ex.prompt))
        assert str(int(str(sums[-1] // 10) + digits)) == ex.answer == str(a + b)
    for ex in tasks.get("multiplication").generate("train", 200, seed=3):
        values = [int(line.split("=")[1]) for line in ex.solution.splitlines()[:-1]]
        digits = "".join(str(v % 10) for v in reversed(values))
        a, m = map(int, re.findall(r"\d+", ex.prompt))
        assert str(int(str(values[-1] // 10) + digits)) == ex.answer == str(a * m)
    for ex in tasks.get("modular", max_ops=5).generate("train", 200, seed=3):
        expr, m = re.fullmatch(r"What is (.*) mod (\d+)\?", ex.prompt).groups()
        assert re.fullmatch(r"[()\d+*-]+", expr)
        assert str(eval(expr) % int(m)) == ex.answer  # our own generated expression
    for ex in tasks.get("sort").generate("train", 50, seed=3):
        xs = list(map(int, ex.prompt.split(":")[1].split()))
        assert ex.answer == " ".join(map(str, sorted(xs)))
    for ex in tasks.get("reverse").generate("train", 50, seed=3):
        assert ex.answer == ex.prompt.split(": ")[1][::-1]


def test_difficulty_knobs():
    for ex in tasks.get("addition", min_digits=5, max_digits=5).generate("train", 20, 0):
        assert all(len(x) == 5 for x in re.findall(r"\d+", ex.prompt))
    for ex in tasks.get("reverse", min_len=10, max_len=10, alphabet="xy").generate("train", 20, 0):
        assert re.fullmatch(r"Reverse: [xy]{10}", ex.prompt)
    with pytest.raises(ValueError, match="unique=False"):
        tasks.get("addition", min_digits=1, max_digits=1).generate("train", 200, 0)
    assert (
        len(
            tasks.get("addition", max_digits=1, min_digits=1, unique=False).generate(
                "train", 200, 0
            )
        )
        == 200
    )
    with pytest.raises(ValueError, match="split"):
        tasks.get("sort").generate("valid", 3, 0)


def test_tool_calls():
    task = tasks.get("tool_use")
    ex = {"answer": "7", "task": "tool_use"}
    ok = '{"name": "add", "arguments": {"a": 3, "b": 4}}'
    assert task.verify(ok, ex) == 1.0
    assert task.verify(f"I will call add.\n#### {ok}", ex) == 1.0
    assert task.verify('{"name": "add", "arguments": {"b": 3, "a": 4}}', ex) == 1.0
    assert task.verify('{"name": "max", "arguments": {"a": 7, "b": 1}}', ex) == 1.0  # by execution
    bad = [
        '{"name": "add", "arguments": {"a": 3, "b": 4}',  # malformed JSON
        '{"name": "add", "arguments": {"a": 3, "b": 4}} trailing',
        "add(3, 4)",
        '{"name": "pow", "arguments": {"a": 3, "b": 4}}',  # unknown tool
        '{"name": "add", "arguments": {"a": 3}}',  # missing argument
        '{"name": "add", "arguments": {"a": 3, "b": 4, "c": 0}}',  # extra argument
        '{"name": "add", "arguments": {"x": 3, "y": 4}}',  # wrong names
        '{"name": "add", "arguments": {"a": "3", "b": 4}}',  # wrong type
        '{"name": "add", "arguments": {"a": 3.0, "b": 4}}',
        '{"name": "add", "arguments": {"a": true, "b": 6}}',
        '{"name": "add", "arguments": [3, 4]}',
        '{"name": "add", "arguments": {"a": 3, "b": 4}, "id": 1}',
        '["add", 3, 4]',
        '{"name": "add", "arguments": {"a": 2, "b": 4}}',  # well formed, wrong result
        "[" * 100_000,
        "",
    ]
    for text in bad:
        assert task.verify(text, ex) == 0.0, text
    for text in bad[:13]:
        with pytest.raises(tasks.ToolCallError):
            tasks.parse_call(text)
    assert tasks.execute_call('{"name": "reverse", "arguments": {"s": "abc"}}') == "cba"
    assert tasks.execute_call('{"name": "length", "arguments": {"s": "abcd"}}') == "4"
    listed = tasks.get("tool_use", tools=("add", "upper"), show_tools=True).generate("train", 20, 0)
    assert all(ex.prompt.startswith("Tools: add(a,b) upper(s)\n") for ex in listed)
    assert {json.loads(ex.solution)["name"] for ex in listed} == {"add", "upper"}


def test_final_answer():
    assert tasks.final_answer("a\n#### 12\n") == "12"
    assert tasks.final_answer("#### 1\n#### 2 3 ") == "2 3"
    assert tasks.final_answer("no marker") is None


def test_make_data_cli_and_jsonl(tmp_path, capsys):
    out = tmp_path / "d" / "mix.jsonl"
    argv = ["--task", "addition,tool_use", "--split", "test", "--n", "7", "--out", str(out)]
    argv += ["--param", "max_digits=4", "--param", "tool_use.tools=add,mul"]
    assert make_data.main([*argv, "--teacher", "addition=math,tool_use=tools"]) == 0
    rows = [json.loads(line) for line in out.read_text().splitlines()]
    assert len(rows) == 14 and set(rows[0]) == set(tasks.base.JSONL_FIELDS)
    assert {r["task"]: r["teacher"] for r in rows} == {"addition": "math", "tool_use": "tools"}
    again = make_data.make_examples(
        ["addition", "tool_use"],
        "test",
        7,
        params={"addition": {"max_digits": 4}, "tool_use": {"tools": ("add", "mul")}},
        teachers={"addition": "math", "tool_use": "tools"},
    )
    assert [e.to_dict() for e in again] == rows
    with pytest.raises(SystemExit):
        make_data.main(["--task", "nope", "--split", "train", "--n", "1", "--out", str(out)])
    assert "valid names: addition" in capsys.readouterr().err


@pytest.fixture(scope="module")
def char_tokenizer(tmp_path_factory):
    return save_tokenizer(tmp_path_factory.mktemp("char_tokenizer"))


def test_char_tokenizer_round_trips_every_task(char_tokenizer):
    import transformers

    tok = Tokenizer.from_pretrained(char_tokenizer)
    hf = transformers.AutoTokenizer.from_pretrained(char_tokenizer, local_files_only=True)
    assert tok.vocab_size == len(SPECIAL_TOKENS) + len(ALPHABET) == len(hf)
    assert (tok.pad_id, tok.bos_id, tok.eos_id) == (0, 2, 3)
    texts = [ALPHABET]
    for name in NAMES:
        task = tasks.get(name)
        for e in task.generate("train", 30, 0) + task.generate("test", 10, 0):
            texts += [e.prompt, e.solution, e.answer]
    texts += [e.prompt for e in tasks.get("tool_use", show_tools=True).generate("train", 5, 0)]
    for text in texts:
        ids = tok.encode(text)
        assert len(ids) == len(text) and tok.hf.unk_token_id not in ids
        assert tok.decode(ids) == text
        assert hf.encode(text, add_special_tokens=False) == ids
    batch = tok.encode(texts[:4])
    assert tok.batch_decode(batch) == texts[:4]


def test_char_tokenizer_chat_template(char_tokenizer):
    tok = Tokenizer.from_pretrained(char_tokenizer)
    msgs = [{"role": "user", "content": "What is 2 + 3?"}]
    text = tok.apply_chat_template(msgs, tokenize=False)
    assert text == "<bos><|user|>What is 2 + 3?<|im_end|><|assistant|>"
    ids = tok.apply_chat_template(msgs)
    assert ids == tok.encode(text) and len(ids) == len("What is 2 + 3?") + 4
    assert tok.decode(ids) == "What is 2 + 3?"
    full = tok.apply_chat_template(
        [{"role": "system", "content": "s"}, *msgs, {"role": "assistant", "content": "5"}],
        tokenize=False,
        add_generation_prompt=False,
    )
    assert full.endswith("<|assistant|>5<|im_end|>") and full.startswith("<bos><|system|>s")
    with pytest.raises(Exception, match="unknown chat role"):
        tok.apply_chat_template([{"role": "tool", "content": "x"}])


@pytest.mark.parametrize(
    ("name", "knobs", "a", "b"),
    [
        ("addition", {"min_digits": 2, "max_digits": 2}, "What is 34 + 12?", "What is 12 + 34?"),
        ("tool_use", {}, "What is the sum of 14 and 3?", "What is the sum of 3 and 14?"),
        ("tool_use", {}, "Which is smaller, 9 or 2?", "Which is smaller, 2 or 9?"),
    ],
)
def test_swapped_operands_share_a_split(name, knobs, a, b):
    task = tasks.get(name, **knobs)
    assert task.split_key(a) == task.split_key(b)
    # Over a whole split: no held-out problem is in the train set with its operands swapped
    # (with prompt-only hashing, 121 of the demo's 200 held-out sums were).
    train = {task.split_key(ex.prompt) for ex in task.generate("train", 3000, seed=0)}
    test = [task.split_key(ex.prompt) for ex in task.generate("test", 200, seed=0)]
    assert not train.intersection(test)


def test_asymmetric_questions_keep_their_order():
    task = tasks.get("tool_use")
    assert task.split_key("What is 9 minus 2?") == "What is 9 minus 2?"
    assert task.split_key("What is 2 minus 9?") == "What is 2 minus 9?"
