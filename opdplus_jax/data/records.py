"""Load and validate prompt records from local JSONL / Parquet files or in-memory lists.

A record is a dict with ``prompt`` (non-empty string, required), ``answer`` (required for
training and eval: rewards and eval accuracy compare against it; numbers are turned into
strings), and optional ``solution`` (SFT target), ``teacher`` (teacher id), ``domain``, ``task``.
Every problem is reported as a `ValueError` that names the file (and line or row) and the fix.
"""

from __future__ import annotations

import json
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
        if name == "answer" and isinstance(value, int | float):
            value = str(value)
        if value is not None and not isinstance(value, str):
            raise ValueError(
                f"{where}: field {name!r} must be a string, got {type(value).__name__} {value!r}"
            )
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


def _read_jsonl(path: str) -> list[tuple[str, Any]]:
    rows = []
    with open(path, encoding="utf-8") as f:
        for lineno, line in enumerate(f, start=1):
            if not line.strip():
                continue
            try:
                rows.append((f"{path}:{lineno}", json.loads(line)))
            except json.JSONDecodeError as e:
                raise ValueError(
                    f"{path}:{lineno}: malformed JSON ({e.msg} at column {e.colno}); each line "
                    f'must be one JSON object, e.g. {{"prompt": "What is 2 + 3?", "answer": "5"}}'
                ) from None
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
    return [(f"{path} row {i}", row) for i, row in enumerate(table.to_pylist())]


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
