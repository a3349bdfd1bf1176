"""Data faults: values that were silently accepted or failed without naming the file and line."""

import importlib.util
import sys

import pytest

from opdplus_jax import data

HAS_PYARROW = importlib.util.find_spec("pyarrow") is not None


def _write_bytes(path, lines):
    path.write_bytes(b"".join(line + b"\n" for line in lines))
    return path


def _load_error(path) -> str:
    with pytest.raises(ValueError) as info:
        data.load_records(path)
    message = str(info.value)
    assert str(path) in message
    return message


GOOD = b'{"prompt": "p", "answer": "1"}'


@pytest.mark.parametrize("literal", [b"NaN", b"Infinity", b"-Infinity", b"1e400"])
def test_non_finite_answer_is_an_error(tmp_path, literal):
    path = _write_bytes(
        tmp_path / "d.jsonl", [GOOD, b'{"prompt": "p", "answer": ' + literal + b"}"]
    )
    message = _load_error(path)
    assert f"{path}:2:" in message and "'answer'" in message and "finite" in message


def test_non_finite_in_memory_record_is_an_error():
    with pytest.raises(ValueError, match=r"records\[1\]: field 'answer'.*finite"):
        data.records_from([{"prompt": "p", "answer": 1.5}, {"prompt": "p", "answer": float("inf")}])
    assert data.records_from([{"prompt": "p", "answer": 1.5}])[0][0]["answer"] == "1.5"


@pytest.mark.skipif(not HAS_PYARROW, reason="pyarrow is not installed")
@pytest.mark.parametrize("value", [float("nan"), float("inf"), float("-inf")])
def test_non_finite_parquet_answer_is_an_error(tmp_path, value):
    import pyarrow as pa
    import pyarrow.parquet as pq

    path = tmp_path / "d.parquet"
    pq.write_table(pa.table({"prompt": ["a", "b"], "answer": [2.0, value]}), path)
    message = _load_error(path)
    assert f"{path} row 1:" in message and "'answer'" in message and "finite" in message


def test_very_long_integer_names_file_and_line(tmp_path):
    digits = b"7" * (sys.get_int_max_str_digits() + 10)
    path = _write_bytes(
        tmp_path / "d.jsonl", [GOOD, GOOD, b'{"prompt": "p", "answer": ' + digits + b"}"]
    )
    message = _load_error(path)
    assert f"{path}:3:" in message and "digits" in message and "string" in message


def test_invalid_utf8_names_file_and_line(tmp_path):
    bad = b'{"prompt": "caf\xe9", "answer": "1"}'  # Latin-1, not UTF-8
    path = _write_bytes(tmp_path / "d.jsonl", [GOOD, GOOD, bad, GOOD])
    message = _load_error(path)
    assert f"{path}:3:" in message and "UTF-8" in message


def test_deep_nesting_names_file_and_line(tmp_path):
    depth = 200_000
    deep = b'{"prompt": "p", "answer": "1", "extra": ' + b"[" * depth + b"]" * depth + b"}"
    path = _write_bytes(tmp_path / "d.jsonl", [GOOD, deep])
    message = _load_error(path)
    assert f"{path}:2:" in message and "nest" in message


@pytest.mark.parametrize("field", ["prompt", "answer", "solution"])
def test_lone_surrogate_names_file_line_and_field(tmp_path, field):
    fields = {"prompt": '"p"', "answer": '"1"', field: '"ok \\ud800 here"'}
    line = "{" + ", ".join(f'"{k}": {v}' for k, v in fields.items()) + "}"
    path = _write_bytes(tmp_path / "d.jsonl", [GOOD, line.encode()])
    message = _load_error(path)
    assert f"{path}:2:" in message and repr(field) in message and "surrogate" in message


def test_valid_surrogate_pair_and_non_ascii_are_accepted(tmp_path):
    path = _write_bytes(
        tmp_path / "d.jsonl",
        ['{"prompt": "caf\u00e9 \\ud83d\\ude00", "answer": "\u00bd"}'.encode()],
    )
    (rec,) = data.load_records(path)
    assert rec["prompt"] == "caf\u00e9 \U0001f600" and rec["answer"] == "\u00bd"


@pytest.mark.skipif(not HAS_PYARROW, reason="pyarrow is not installed")
def test_invalid_utf8_parquet_names_file_row_and_column(tmp_path):
    import pyarrow as pa
    import pyarrow.parquet as pq

    raw = pa.array([b"ok", b"caf\xe9"], type=pa.binary())
    prompts = pa.Array.from_buffers(pa.string(), 2, raw.buffers())  # unvalidated UTF-8
    path = tmp_path / "d.parquet"
    pq.write_table(pa.table({"prompt": prompts, "answer": ["1", "2"]}), path)
    message = _load_error(path)
    assert f"{path} row 1:" in message and "'prompt'" in message
