"""Load and validate prompt records from local JSONL / Parquet files or in-memory lists.

A record is a dict with ``prompt`` (non-empty string, required), ``answer`` (required for
training and eval: rewards and eval accuracy compare against it; numbers are turned into
strings), and optional ``solution`` (SFT target), ``teacher`` (teacher id), ``domain``, ``task``.
Every problem is reported as a `ValueError` that names the file (and line or row) and the fix.
"""

from __future__ import annotations

import json
import math
import os
from collections.abc import Mapping, Sequence
from typing import Any

FIELDS = ("prompt", "answer", "solution", "teacher", "domain", "task")
OPTIONAL_STR_FIELDS = ("solution", "teacher", "domain", "task")
MAKE_DATA_HINT = (
    "write one with e.g. `python -m opdplus_jax.tasks.make_data --task addition --split train "
    "--n 1000 --out train.jsonl`"
)


def _validate(
    raw: Any, where: str, required: Sequence[str], fields: Sequence[str] = FIELDS
) -> dict[str, Any]:
    """One record (only the known fields), checked and normalised; `where` names it in errors."""
    if not isinstance(raw, Mapping):
        raise ValueError(
            f"{where}: expected a JSON object like "
            f'{{"prompt": "...", "answer": "..."}}, got {type(raw).__name__}'
        )
    rec: dict[str, Any] = {}
    for name in fields:
        value = raw.get(name)
        if isinstance(value, bool):
            raise ValueError(f"{where}: field {name!r} must be a string, got {value!r}")
        if name == "answer" and isinstance(value, float) and not math.isfinite(value):
            raise ValueError(
                f"{where}: field {name!r} is {value!r}, not a finite number (JSON NaN / "
                f"Infinity, or a number too large for a float); write the answer as a string"
            )
        if name == "answer" and isinstance(value, int | float):
            value = str(value)
        if value is not None and not isinstance(value, str):
            raise ValueError(
                f"{where}: field {name!r} must be a string, got {type(value).__name__} {value!r}"
            )
        if isinstance(value, str):
            _check_encodable(value, where, name)
        rec[name] = value
    for name in required:
        if rec.get(name) is None:
            present = ", ".join(sorted(str(k) for k in raw)) or "none"
            raise ValueError(
                f"{where}: record has no {name!r} field (fields present: {present}); every "
                f"record needs {', '.join(repr(r) for r in required)}"
            )
    if "prompt" in required and not rec["prompt"].strip():
        raise ValueError(f"{where}: field 'prompt' is empty; remove the record or fill it in")
    return rec


def _check_encodable(value: str, where: str, name: str) -> None:
    """A string with a lone surrogate (JSON ``"\\ud800"``) cannot be encoded or tokenized."""
    try:
        value.encode("utf-8")
    except UnicodeEncodeError as e:
        raise ValueError(
            f"{where}: field {name!r} has a lone surrogate {value[e.start]!r} at character "
            f"{e.start} (half of a UTF-16 pair, e.g. an unpaired \\ud800 escape); it is not "
            f"valid Unicode text, fix or remove it"
        ) from None


def _parse_line(raw: bytes, where: str) -> Any:
    """One JSON line; every way it can fail is a ValueError that starts with `where`."""
    try:
        line = raw.decode("utf-8")
    except UnicodeDecodeError as e:
        raise ValueError(
            f"{where}: invalid UTF-8 (byte {raw[e.start]:#04x} at byte offset {e.start} of the "
            f"line); save the file as UTF-8"
        ) from None
    try:
        return json.loads(line)
    except json.JSONDecodeError as e:
        raise ValueError(
            f"{where}: malformed JSON ({e.msg} at column {e.colno}); each line "
            f'must be one JSON object, e.g. {{"prompt": "What is 2 + 3?", "answer": "5"}}'
        ) from None
    except RecursionError:
        raise ValueError(
            f"{where}: JSON nested too deeply to parse (RecursionError); a record is one flat "
            f"object of string fields"
        ) from None
    except ValueError as e:  # e.g. an integer longer than sys.get_int_max_str_digits()
        raise ValueError(
            f"{where}: cannot parse JSON ({e}); write very long numbers as strings, "
            f'e.g. "answer": "123..."'
        ) from None


def _read_jsonl(path: str) -> list[tuple[str, Any]]:
    rows = []
    with open(path, "rb") as f:  # bytes, so invalid UTF-8 is reported with its line
        for lineno, raw in enumerate(f, start=1):
            if not raw.strip():
                continue
            where = f"{path}:{lineno}"
            rows.append((where, _parse_line(raw, where)))
    return rows


def _read_parquet(path: str) -> list[tuple[str, Any]]:
    try:
        import pyarrow.parquet as pq
    except ImportError:
        raise ValueError(
            f"{path}: reading Parquet needs pyarrow; install it with `pip install "
            f"'pyarrow>=15,<28'` or convert the file to JSONL"
        ) from None
    try:
        table = pq.read_table(path)
    except Exception as e:  # pyarrow raises several types for corrupt files
        raise ValueError(f"{path}: cannot read as Parquet ({type(e).__name__}: {e})") from None
    try:
        rows = table.to_pylist()
    except Exception:  # e.g. invalid UTF-8 in a string column: find the row and column
        for i in range(table.num_rows):
            for name in table.column_names:
                try:
                    table.column(name).slice(i, 1).to_pylist()
                except Exception as e:
                    raise ValueError(
                        f"{path} row {i}: cannot read column {name!r} ({type(e).__name__}: {e})"
                    ) from None
        raise
    return [(f"{path} row {i}", row) for i, row in enumerate(rows)]


def load_records(
    path: str | os.PathLike, *, required: Sequence[str] = ("prompt", "answer")
) -> list[dict[str, Any]]:
    """Records of a local ``.jsonl`` / ``.json`` (JSON lines) or ``.parquet`` file.

    Each record has every key of `FIELDS` (None when absent). Raises ValueError for a missing or
    empty file, an unknown extension, a malformed line (file:line) or a missing required field.
    """
    path = os.fspath(path)
    if not os.path.isfile(path):
        kind = "is a directory, not a file" if os.path.isdir(path) else "does not exist"
        raise ValueError(f"{path}: data file {kind}; {MAKE_DATA_HINT}")
    ext = os.path.splitext(path)[1].lower()
    if ext in (".jsonl", ".json"):
        rows = _read_jsonl(path)
    elif ext in (".parquet", ".pq"):
        rows = _read_parquet(path)
    else:
        raise ValueError(f"{path}: unknown data format {ext!r}; use .jsonl or .parquet")
    if not rows:
        raise ValueError(f"{path}: file has no records; {MAKE_DATA_HINT}")
    return [_validate(raw, where, required) for where, raw in rows]


def records_from(
    source: str | os.PathLike | Sequence[Any], *, required: Sequence[str] = ("prompt", "answer")
) -> tuple[list[dict[str, Any]], str]:
    """(records, description) from a file path, or from a list of dicts / `Example`s."""
    if isinstance(source, str | os.PathLike):
        return load_records(source, required=required), os.fspath(source)
    items = list(source)
    if not items:
        raise ValueError(
            f"no records given; pass a data file or a non-empty list ({MAKE_DATA_HINT})"
        )
    out = []
    for i, item in enumerate(items):
        raw = item.to_dict() if hasattr(item, "to_dict") else item
        out.append(_validate(raw, f"records[{i}]", required))
    return out, f"{len(items)} in-memory records"


def write_parquet(records: Sequence[Mapping[str, Any]], path: str | os.PathLike) -> None:
    """Write records (the `FIELDS` columns, strings or nulls) to a Parquet file (needs pyarrow)."""
    import pyarrow as pa
    import pyarrow.parquet as pq

    rows = [r.to_dict() if hasattr(r, "to_dict") else r for r in records]
    cols = {k: pa.array([r.get(k) for r in rows], type=pa.string()) for k in FIELDS}
    pq.write_table(pa.table(cols), os.fspath(path))
