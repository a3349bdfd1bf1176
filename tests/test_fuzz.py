"""Property-based fuzzing (hypothesis) of every file and input the program reads.

Inputs: a model folder's config.json, the safetensors header, the shard index, the tokenizer files,
JSONL / Parquet prompt rows, verifier inputs (math and tool calls), config overrides and the
command line. Each is mutated from a valid original (truncation, byte flips, wrong JSON types,
huge / negative / NaN numbers, deep nesting, invalid UTF-8, lone surrogates, very long strings and
integers, `../` and absolute paths). The property, for every input:

  * the reader succeeds and returns exactly what the file means (the model loaded is the weights
    in the file, equal to the original when the file is unchanged in substance; the records are
    the file's rows), or
  * it raises a clear error: ValueError, KeyError, FileNotFoundError, NotImplementedError or the
    module's own error class, whose message names the file (and line, row, field or tensor), or
    the row is counted as skipped,
  * within a hard wall-clock bound (`time_bound`: SIGALRM in the main thread, plus a faulthandler
    watchdog that ends the process if a C extension never returns), never an exception from inside
    JAX / numpy / json / safetensors / transformers (TypeError, AttributeError, IndexError,
    UnicodeDecodeError, RecursionError, OverflowError, ...), never a silently different model.

Known library defects that the fuzzer found are listed in `DEFECTS`. Each has a strict xfail test
with its minimal input (`test_defect_*`), and the fuzz properties let exactly those failures pass
(counted as hypothesis events), so a new failure mode still fails the suite; fixing a defect turns
its xfail test into an XPASS, which fails the suite until the entry is removed.

Profiles: the default run uses moderate example counts (`EXAMPLES`, first column: about a minute
on 2 cores); `pytest -m slow tests/test_fuzz.py` runs the same properties with the second column
(a few minutes). Runs are deterministic (`derandomize=True`). FUZZ_STATS=1 (with -s) prints how
many examples of each input loaded, were refused (by error type) or hit a known defect;
FUZZ_SURVEY=1 prints every violation, known or not, instead of stopping at the first (triage).
"""

from __future__ import annotations

import collections
import contextlib
import copy
import dataclasses
import datetime
import faulthandler
import io
import json
import math
import os
import pathlib
import re
import shutil
import signal
import struct
import subprocess
import sys
import tempfile
import time
import traceback
from collections.abc import Callable, Iterator
from typing import Any

import jax
import jax.numpy as jnp
import ml_dtypes
import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
from flax import nnx
from hypothesis import HealthCheck, event, given, note, settings
from hypothesis import strategies as st

from opdplus_jax import configs, data, models, trainer, verifiers
from opdplus_jax.configs import default as default_configs
from opdplus_jax.models.transformer import rope_inv_freq
from opdplus_jax.tasks import tool_use
from opdplus_jax.tasks.tokenizer import save_tokenizer
from opdplus_jax.tokenizer import Tokenizer

ROOT = pathlib.Path(__file__).resolve().parent.parent
# The rope-param-values defect's non-finite frequencies warn from numpy; the property reports it.
pytestmark = pytest.mark.filterwarnings("ignore:.*encountered in:RuntimeWarning")

# ------------------------------------------------------------------------------------ profiles

PROFILES = [pytest.param("default"), pytest.param("slow", marks=pytest.mark.slow)]
# Hypothesis examples per input: (default profile, slow profile).
EXAMPLES = {
    "config_json": (200, 2000),
    "config_json_same": (20, 200),
    "safetensors": (200, 2000),
    "shard_index": (150, 1500),
    "tokenizer": (150, 1500),
    "jsonl": (200, 2000),
    "parquet": (100, 800),
    "math": (12, 60),
    "tool_use": (300, 3000),
    "verifier_rows": (80, 500),
    "overrides": (400, 4000),
    "cli": (5, 15),
}
SURVEY = os.environ.get("FUZZ_SURVEY") == "1"
SURVEYED: list[str] = []
# Outcome counts per run ("<input>[<profile>]" -> outcome -> examples); printed at the end of the
# module with FUZZ_STATS=1 (and -s).
STATS: dict[str, collections.Counter] = {}
_tally: collections.Counter = collections.Counter()


def tally(outcome: str) -> None:
    """Counts one example's outcome (loaded, refused with <error type>, known defect ...)."""
    _tally[outcome] += 1


@pytest.fixture(scope="module", autouse=True)
def print_stats():
    yield
    if os.environ.get("FUZZ_STATS") == "1":
        for name, counts in STATS.items():
            print(f"\n{name}: {sum(counts.values())} examples", file=sys.stderr)
            for outcome, n in counts.most_common():
                print(f"  {n:6d}  {outcome}", file=sys.stderr)


# Wall-clock bounds (seconds) for one call of the code under test.
LOAD_SECONDS = 30
MATH_TIMEOUT = 2.0  # verifiers' per-answer limit in the math tests
CLI_SECONDS = 120


def run_property(name: str, profile: str, strategy: st.SearchStrategy, check: Callable) -> None:
    """Runs `check(case)` on `EXAMPLES[name]` cases drawn from `strategy` (deterministically);
    violations of known defects pass (as hypothesis events), any other fails the test."""
    n = EXAMPLES[name][profile == "slow"]

    global _tally
    _tally = STATS.setdefault(f"{name}[{profile}]", collections.Counter())

    def prop(case):
        holds(check, case)

    prop.__name__ = prop.__qualname__ = f"fuzz_{name}"
    checks = [
        HealthCheck.function_scoped_fixture,
        HealthCheck.too_slow,
        HealthCheck.data_too_large,
        HealthCheck.filter_too_much,
        HealthCheck.large_base_example,
    ]
    quiet = {"derandomize": True, "database": None, "deadline": None, "print_blob": False}
    settings(max_examples=n, suppress_health_check=checks, **quiet)(given(strategy)(prop))()


# ------------------------------------------------------------------------- violations, defects


class Violation(AssertionError):
    """A broken property: what broke, plus the failure's signature (exception type, innermost
    opdplus_jax frame, message) for matching against `DEFECTS`."""

    def __init__(
        self,
        what: str,
        *,
        exc: BaseException | None = None,
        kind: str = "",
        where: tuple[str, str] = ("", ""),
        message: str = "",
    ):
        if exc is not None:
            kind, where, message = type(exc).__name__, lib_frame(exc.__traceback__), str(exc)
        self.what, self.kind, self.where, self.message = what, kind, where, message
        super().__init__(
            f"{what}: {kind} at {where[0]}:{where[1]}: {message[:600]}" if kind else what
        )


def lib_frame(tb) -> tuple[str, str]:
    """(file under opdplus_jax/, function) of the innermost opdplus_jax frame of a traceback."""
    where = ("", "")
    for frame in traceback.extract_tb(tb):
        path = frame.filename.replace(os.sep, "/")
        if "/opdplus_jax/" in path:
            where = (path.rsplit("/opdplus_jax/", 1)[1], frame.name)
    return where


@dataclasses.dataclass(frozen=True)
class Defect:
    """A known library defect: the violations it explains (by what broke, the exception type, the
    innermost opdplus_jax frame, a message pattern and the input)."""

    key: str
    summary: str
    what: str = ""  # substring of Violation.what ("" = any)
    kinds: tuple[str, ...] = ()  # exception type names (empty = any)
    where: tuple[tuple[str, str], ...] = ()  # (file, function) of the innermost library frame
    pattern: str = ""  # regex searched in the violation's text and message
    applies: Callable[[Any], bool] = lambda case: True  # the input it is about

    def explains(self, v: Violation, case: Any) -> bool:
        return (
            self.what in v.what
            and (not self.kinds or v.kind in self.kinds)
            and (not self.where or v.where in self.where)
            and re.search(self.pattern, f"{v.what} {v.message}", re.S) is not None
            and self.applies(case)
        )


def overrides(predicate: Callable[[Override], bool]) -> Callable[[Any], bool]:
    return lambda case: isinstance(case, Override) and predicate(case)


DEFECTS: list[Defect] = [
    Defect(
        "tokenizer-errors",
        "tokenizer.py Tokenizer.from_pretrained wraps no error of transformers / tokenizers / "
        "json: JSONDecodeError, UnicodeDecodeError, UnicodeEncodeError, RecursionError, "
        "TypeError, AttributeError, the Rust parser's bare Exception, and ValueErrors that name "
        "neither the folder nor the file (e.g. a missing tokenizer.json)",
        where=(("tokenizer.py", "from_pretrained"),),
    ),
    Defect(
        "tokenizer-lazy-failure",
        "tokenizer.py Tokenizer.from_pretrained checks nothing it loads: a chat template that "
        "does not compile (chat_template.jinja '{% for %}') or a non-numeric model_max_length "
        "loads, and the first apply_chat_template / encode raises jinja2.TemplateSyntaxError / "
        "TypeError naming no file",
        what="fails on first use",
        where=(("tokenizer.py", "apply_chat_template"), ("tokenizer.py", "encode")),
    ),
    Defect(
        "tokenizer-ids",
        "tokenizer.py Tokenizer.from_pretrained checks no id: a tokenizer.json whose vocab gives "
        "two tokens one id, or whose vocab id of a special token disagrees with added_tokens "
        "(vocab['<pad>'] = 1000), loads; encode then maps both tokens to one id, or pad_id is "
        "outside the vocabulary (1000 >= vocab_size 104), and the pipeline pads with it",
        pattern="several tokens to one id|special token id is outside the vocabulary",
    ),
    Defect(
        "parquet-column-name",
        "data/records.py _read_parquet: a column name that is not valid UTF-8 makes "
        "table.to_pylist() fail, and the fallback loop's table.column_names raises pyarrow's "
        "UnicodeDecodeError unwrapped (no file, row or column named)",
        kinds=("UnicodeDecodeError",),
        where=(("data/records.py", "_read_parquet"),),
    ),
]
DEFECT_KEYS = {d.key: d for d in DEFECTS}


def known_defect(v: Violation, case: Any) -> Defect | None:
    return next((d for d in DEFECTS if d.explains(v, case)), None)


def holds(check: Callable, case: Any) -> None:
    before = _tally.copy()
    try:
        check(case)
    except Violation as v:
        defect = known_defect(v, case)
        _tally.clear()  # the example counts once, as its defect
        _tally.update(before)
        if SURVEY:
            SURVEYED.append(f"[{defect.key if defect else 'NEW'}] {v}"[:400])
            print(SURVEYED[-1], file=sys.stderr)
            return
        if defect is None:
            raise
        tally(f"known defect {defect.key}")
        event(f"known defect {defect.key}")
        note(f"known defect {defect.key}: {v}")


def expect(ok: bool, what: str) -> None:
    if not ok:
        raise Violation(what)


# ------------------------------------------------------------------------------- time bounds


class _Hang(BaseException):
    """Raised by the alarm (a BaseException, so that no `except Exception` swallows it)."""


@contextlib.contextmanager
def time_bound(seconds: float) -> Iterator[None]:
    """Fails (Violation) if the block runs longer than `seconds` of wall clock: SIGALRM
    interrupts Python code; a faulthandler watchdog ends the process (with every thread's stack)
    if a C extension never returns to Python. Main thread only (pytest runs tests there)."""

    def alarm(signum, frame):
        raise _Hang

    previous = signal.signal(signal.SIGALRM, alarm)
    signal.setitimer(signal.ITIMER_REAL, seconds)
    faulthandler.dump_traceback_later(seconds + 120, exit=True)
    start = time.monotonic()
    try:
        yield
    except _Hang:
        raise Violation(f"no result within {seconds:g} s (a hang)") from None
    finally:
        signal.setitimer(signal.ITIMER_REAL, 0)
        signal.signal(signal.SIGALRM, previous)
        faulthandler.cancel_dump_traceback_later()
    elapsed = time.monotonic() - start
    expect(elapsed <= seconds, f"took {elapsed:.1f} s, over the {seconds:g} s bound")


@dataclasses.dataclass
class Outcome:
    value: Any = None
    error: Exception | None = None


def attempt(fn: Callable[[], Any], seconds: float = LOAD_SECONDS) -> Outcome:
    """`fn()` under `time_bound`: its value, or the exception it raised."""
    with time_bound(seconds):
        try:
            return Outcome(value=fn())
        except Exception as e:
            return Outcome(error=e)


EXPECTED_ERRORS = (ValueError, KeyError, FileNotFoundError, NotImplementedError)
PARSER_ERRORS = (UnicodeError, json.JSONDecodeError)  # ValueErrors of the parsers, not ours


def clear_error(exc: BaseException, names: list[str]) -> None:
    """Violation unless `exc` is an expected error type whose message names one of `names`."""
    if isinstance(exc, PARSER_ERRORS) or not isinstance(exc, EXPECTED_ERRORS):
        raise Violation("an unexpected exception type escaped", exc=exc)
    if not any(str(n) in str(exc) for n in names):
        raise Violation(f"the error names none of {names}", exc=exc)


# ---------------------------------------------------------------------- strategies: values

SURROGATES = ("\ud800", "\udfff", "a\udc80b")
NASTY_TEXT = (
    "",
    " ",
    "\x00",
    "\n",
    "../../../etc/passwd",
    "/etc/passwd",
    "..",
    ".",
    "~/x",
    "C:\\x",
    "\u202e",
    "日本語",
    "NaN",
    "Infinity",
    "None",
    "null",
    "true",
    "-1",
    "1e400",
    "x" * 5000,
    *SURROGATES,
)
NASTY_NUMBERS = (
    0,
    -1,
    1,
    2,
    7,
    2**31,
    2**32 + 1,
    2**63,
    2**64,
    10**30,
    -(10**30),
    0.0,
    -0.0,
    0.5,
    1e-300,
    1e300,
    math.nan,
    math.inf,
    -math.inf,
)
scalars = st.one_of(
    st.none(),
    st.booleans(),
    st.integers(),
    st.floats(),
    st.text(max_size=10),
    st.sampled_from(NASTY_TEXT),
    st.sampled_from(NASTY_NUMBERS),
)
json_keys = st.text(max_size=8) | st.sampled_from(NASTY_TEXT)
json_values = st.recursive(
    scalars,
    lambda inner: st.lists(inner, max_size=3) | st.dictionaries(json_keys, inner, max_size=3),
    max_leaves=6,
)


def encode(text: str) -> bytes:
    """UTF-8, with lone surrogates written as their (invalid) 3-byte forms."""
    return text.encode("utf-8", "surrogatepass")


@st.composite
def json_text(draw, doc: Any) -> bytes:
    """`doc` serialised in a random style (NaN / Infinity literals, surrogates as escapes or raw
    bytes)."""
    indent = draw(st.sampled_from((None, 0, 2, "\t")))
    return encode(json.dumps(doc, indent=indent, ensure_ascii=draw(st.booleans())))


def json_paths(doc: Any, prefix: tuple = ()) -> list[tuple]:
    out = [prefix]
    if isinstance(doc, dict):
        for k, v in doc.items():
            out += json_paths(v, (*prefix, k))
    elif isinstance(doc, list):
        for i, v in enumerate(doc):
            out += json_paths(v, (*prefix, i))
    return out


def node_at(doc: Any, path: tuple) -> Any:
    for p in path:
        doc = doc[p]
    return doc


@st.composite
def json_edits(draw, doc: Any, values: st.SearchStrategy, keys: tuple[str, ...] = ()) -> tuple:
    """A structural edit of a copy of `doc`: set / delete / add a member, or replace the whole
    document. Returns (description, edited document)."""
    doc = copy.deepcopy(doc)
    paths = json_paths(doc)[1:]
    op = draw(st.sampled_from(("set", "set", "set", "delete", "add", "root")))
    if op == "root" or not paths:
        return "root := value", draw(values)
    if op in ("set", "delete"):
        path = draw(st.sampled_from(paths))
        parent = node_at(doc, path[:-1])
        if op == "delete":
            del parent[path[-1]]
            return f"delete {path!r}", doc
        parent[path[-1]] = draw(values)
        return f"set {path!r}", doc
    objects = [p for p in [(), *paths] if isinstance(node_at(doc, p), dict)] or [()]
    path = draw(st.sampled_from(objects))
    key = draw(st.sampled_from(keys) | json_keys) if keys else draw(json_keys)
    if isinstance(node_at(doc, path), dict):
        node_at(doc, path)[key] = draw(values)
    return f"add {(*path, key)!r}", doc


INVALID_UTF8 = (
    b"\xff",
    b"\xfe",
    b"\xc3",
    b"\xc3\x28",
    b"\xed\xa0\x80",
    b"\xf4\x90\x80\x80",
    b"\x80",
)
DEEP = (b"[" * 100_000, b'{"a":' * 50_000, b"[" * 3_000 + b"]" * 3_000)
BIG_INTS = (b"9" * 4301, b"-" + b"1" * 10_000)
NON_FINITE = (b"NaN", b"Infinity", b"-Infinity", b"1e999", b"-1e999")


def insert_member(blob: bytes, member: bytes) -> bytes:
    """`member` (`"key": value`) added as the first member of the first JSON object in `blob`,
    or `blob` replaced by the member's value when there is no object."""
    i = blob.find(b"{")
    if i < 0:
        return member.split(b":", 1)[1]
    rest = blob[i + 1 :]
    return blob[: i + 1] + member + (b"" if rest.lstrip().startswith(b"}") else b",") + rest


@st.composite
def byte_edits(draw, blob: bytes) -> tuple[str, bytes]:
    """A byte-level mutation of a (JSON) file: (description, new bytes)."""
    kinds = ("truncate", "flip", "insert", "invalid_utf8", "deep", "bigint", "non_finite", "bom")
    kind = draw(st.sampled_from((*kinds, "empty", "crlf")))
    pos = draw(st.integers(0, max(len(blob) - 1, 0)))
    if kind == "truncate":
        return f"truncate at {pos}", blob[:pos]
    if kind == "flip":
        out = bytearray(blob or b" ")
        for _ in range(draw(st.integers(1, 4))):
            out[draw(st.integers(0, len(out) - 1))] = draw(st.integers(0, 255))
        return "flip bytes", bytes(out)
    if kind == "insert":
        return f"insert at {pos}", blob[:pos] + draw(st.binary(min_size=1, max_size=8)) + blob[pos:]
    if kind == "invalid_utf8":
        return f"invalid UTF-8 at {pos}", blob[:pos] + draw(st.sampled_from(INVALID_UTF8)) + blob[
            pos:
        ]
    if kind == "deep":
        deep = draw(st.sampled_from(DEEP))
        return "deep nesting", deep if draw(st.booleans()) else insert_member(blob, b'"z":' + deep)
    if kind in ("bigint", "non_finite"):
        number = draw(st.sampled_from(BIG_INTS if kind == "bigint" else NON_FINITE))
        return kind, insert_member(blob, b'"fuzz": ' + number)
    if kind == "bom":
        return "UTF-8 BOM", b"\xef\xbb\xbf" + blob
    if kind == "empty":
        return "empty file", b""
    return "CRLF line ends", blob.replace(b"\n", b"\r\n")


@st.composite
def file_mutations(draw, doc: Any, values: st.SearchStrategy, keys: tuple[str, ...] = ()) -> tuple:
    """A hostile variant of the JSON file holding `doc`: a structural edit or a byte edit."""
    if draw(st.integers(0, 3)):
        what, edited = draw(json_edits(doc, values, keys))
        return what, draw(json_text(edited))
    return draw(byte_edits(encode(json.dumps(doc, indent=2))))


@st.composite
def reformatted(draw, doc: dict) -> bytes:
    """`doc` unchanged in substance: keys reordered, another indent, escapes or raw UTF-8."""
    items = draw(st.permutations(list(doc.items())))
    indent = draw(st.sampled_from((None, 0, 1, 2, 4, "\t")))
    text = json.dumps(dict(items), indent=indent, ensure_ascii=draw(st.booleans()))
    try:
        return text.encode("utf-8")
    except UnicodeEncodeError:
        return json.dumps(dict(items), indent=indent).encode()


# ----------------------------------------------------------------------------- file helpers


@contextlib.contextmanager
def scratch(root: str) -> Iterator[str]:
    """A fresh temporary folder under `root`, removed afterwards."""
    path = tempfile.mkdtemp(dir=root)
    try:
        yield path
    finally:
        shutil.rmtree(path, ignore_errors=True)


def write(path: str, content: bytes | None) -> None:
    """`path` := `content`; None removes the file."""
    if content is None:
        with contextlib.suppress(FileNotFoundError):
            os.remove(path)
        return
    with open(path, "wb") as f:
        f.write(content)


def params_of(model) -> dict[tuple, np.ndarray]:
    state = nnx.to_flat_state(nnx.state(model, nnx.Param))
    return {tuple(k): np.asarray(v.get_value()) for k, v in state}


def same_arrays(a: dict, b: dict) -> bool:
    return a.keys() == b.keys() and all(np.array_equal(a[k], b[k], equal_nan=True) for k in a)


# =============================================================================================
# 1. config.json
# =============================================================================================

TINY = {"vocab_size": 64, "hidden_size": 32, "num_layers": 2, "num_heads": 4, "num_kv_heads": 2}


@dataclasses.dataclass
class Checkpoint:
    root: str  # scratch folders go here
    folder: str
    raw: dict  # its config.json
    params: dict[tuple, np.ndarray]
    blob: bytes  # its model.safetensors


@pytest.fixture(scope="module")
def ckpt(tmp_path_factory) -> Checkpoint:
    root = tmp_path_factory.mktemp("fuzz_ckpt")
    folder = models.random_checkpoint(root / "model", models.qwen3_config(**TINY), seed=0)
    with open(os.path.join(folder, "config.json"), encoding="utf-8") as f:
        raw = json.load(f)
    with open(os.path.join(folder, "model.safetensors"), "rb") as f:
        blob = f.read()
    return Checkpoint(str(root), folder, raw, params_of(models.from_pretrained(folder)), blob)


CONFIG_KEYS = (
    "rope_parameters",
    "rope_scaling",
    "rope_theta",
    "partial_rotary_factor",
    "architectures",
    "attention_bias",
    "mlp_bias",
    "use_sliding_window",
    "layer_types",
    "hidden_act",
    "head_dim",
    "num_key_value_heads",
    "tie_word_embeddings",
    "bos_token_id",
    "eos_token_id",
    "pad_token_id",
    "max_position_embeddings",
    "model_type",
    "auto_map",
    "dtype",
    "torch_dtype",
    "quantization_config",
)
CONFIG_WORDS = (
    "qwen3",
    "qwen2",
    "llama",
    "qwen3_moe",
    "bert",
    "Qwen3ForCausalLM",
    "LlamaForCausalLM",
    "silu",
    "swish",
    "gelu",
    "full_attention",
    "sliding_attention",
    "default",
    "linear",
    "llama3",
    "yarn",
    "dynamic",
    "float32",
    "bfloat16",
)
ROPE_KEYS = (
    "rope_type",
    "type",
    "rope_theta",
    "factor",
    "low_freq_factor",
    "high_freq_factor",
    "original_max_position_embeddings",
    "partial_rotary_factor",
    "attention_factor",
    "beta_fast",
    "beta_slow",
    "mscale",
    "mscale_all_dim",
    "truncate",
)
rope_dicts = st.dictionaries(
    st.sampled_from(ROPE_KEYS),
    st.one_of(scalars, st.sampled_from(CONFIG_WORDS), st.floats(-10, 1e7)),
    max_size=5,
)
config_values = st.one_of(
    json_values,
    st.integers(-2, 130),
    rope_dicts,
    st.sampled_from(CONFIG_WORDS),
    st.lists(st.sampled_from(CONFIG_WORDS), max_size=3),
)


@dataclasses.dataclass(frozen=True)
class FileCase:
    what: str
    content: bytes | None
    same: bool = False  # unchanged in substance: must load, equal to the original

    def __repr__(self) -> str:
        content = self.content
        if content is not None and len(content) > 3000:
            content = f"{content[:1500]!r} ... {len(content) - 3000} bytes ... {content[-1500:]!r}"
        return f"FileCase(what={self.what!r}, content={content}, same={self.same})"


@st.composite
def config_cases(draw, raw: dict) -> FileCase:
    if draw(st.integers(0, 4)) == 0:  # rope parameters of a supported rope type, any values
        rope = {**raw["rope_parameters"], **draw(rope_dicts)}
        return FileCase("rope_parameters", draw(json_text({**raw, "rope_parameters": rope})))
    return FileCase(*draw(file_mutations(raw, config_values, CONFIG_KEYS)))


@st.composite
def same_config_cases(draw, raw: dict) -> FileCase:
    """config.json with unknown keys added, derived keys dropped, keys reordered, reindented."""
    doc = dict(raw)
    for key in draw(st.sets(st.sampled_from(("transformers_version", "dtype", "use_cache")))):
        doc.pop(key, None)
    extra = draw(st.dictionaries(st.text(min_size=1, max_size=6), json_values, max_size=2))
    doc.update({f"fuzz_unknown_{k}": v for k, v in extra.items()})
    return FileCase("unchanged in substance", draw(reformatted(doc)), same=True)


SIZE_ATTRS = {
    "vocab_size": "vocab_size",
    "hidden_size": "hidden_size",
    "intermediate_size": "intermediate_size",
    "num_hidden_layers": "num_layers",
    "num_attention_heads": "num_heads",
    "num_key_value_heads": "num_kv_heads",
    "head_dim": "head_dim",
    "max_position_embeddings": "max_position_embeddings",
}


def check_config_json(ckpt: Checkpoint, case: FileCase) -> None:
    with scratch(ckpt.root) as tmp:
        folder = os.path.join(tmp, "model")
        shutil.copytree(ckpt.folder, folder)
        write(os.path.join(folder, "config.json"), case.content)
        cfg_out = attempt(lambda: models.load_config(folder))
        out = attempt(lambda: models.from_pretrained(folder))
        if case.same:
            for o in (cfg_out, out):
                if o.error is not None:
                    raise Violation("config.json unchanged in substance did not load", exc=o.error)
        if cfg_out.error is not None:
            clear_error(cfg_out.error, [folder])
        if out.error is not None:
            clear_error(out.error, [folder])
            return tally(f"refused: {type(out.error).__name__}")
        check_loaded_config(case, out.value, cfg_out, ckpt)
        tally("loaded")


def check_loaded_config(case: FileCase, model, cfg_out: Outcome, ckpt: Checkpoint) -> None:
    """A model loaded from a mutated config.json: the file's weights and the file's settings."""
    try:
        raw = json.loads(case.content.decode("utf-8"))
    except (ValueError, RecursionError) as e:
        raise Violation("loaded a config.json that is not UTF-8 JSON", exc=e) from None
    cfg = model.config
    expect(same_arrays(params_of(model), ckpt.params), "loaded weights differ from the file's")
    same = cfg_out.error is None and repr(cfg_out.value) == repr(cfg)  # repr: NaN == NaN
    expect(same, "load_config disagrees with the model")
    for key, attr in SIZE_ATTRS.items():
        if raw.get(key) is not None:
            expect(getattr(cfg, attr) == raw[key], f"{attr}={getattr(cfg, attr)!r} != {key}")
    expect(cfg.rms_norm_eps == raw["rms_norm_eps"], "rms_norm_eps differs from the file")
    expect(raw.get("hidden_act", "silu") in ("silu", "swish"), "loaded an unsupported hidden_act")
    expect(not raw.get("use_sliding_window"), "loaded sliding-window attention")
    layer_types = raw.get("layer_types") or []
    expect(all(t == "full_attention" for t in layer_types), "loaded non-full attention layers")
    for key in ("bos_token_id", "eos_token_id", "pad_token_id"):
        if key in raw:
            want = tuple(raw[key]) if isinstance(raw[key], list) else raw[key]
            expect(getattr(cfg, key) == want, f"{key}={getattr(cfg, key)!r} differs from the file")
    rope = raw.get("rope_parameters")
    theta = rope.get("rope_theta") if isinstance(rope, dict) else None
    if isinstance(theta, int | float) and "rope_scaling" not in raw and "rope_theta" not in raw:
        theta = float(theta)  # rope_theta is a float: 2**53 + 1 reads as 2**53
        same_theta = cfg.rope_theta == theta or (math.isnan(cfg.rope_theta) and math.isnan(theta))
        expect(same_theta, "rope_theta differs from the file")
    try:
        inv_freq, scaling = rope_inv_freq(cfg)
    except Exception as e:
        raise Violation("the loaded model's RoPE cannot be computed", exc=e) from None
    ok = np.all(np.isfinite(inv_freq)) and math.isfinite(scaling)
    if not ok:
        raise Violation(
            "the loaded model's RoPE frequencies are not finite",
            kind="silent",
            message=f"rope_theta={cfg.rope_theta!r} rope_params={cfg.rope_params!r}",
        )
    if case.same:  # ModelConfig equality ignores the raw JSON and the folder
        expect(cfg == models.load_config(ckpt.folder), "the config differs from the original")


@pytest.mark.parametrize("profile", PROFILES)
def test_config_json(ckpt, profile):
    run_property(
        "config_json", profile, config_cases(ckpt.raw), lambda c: check_config_json(ckpt, c)
    )


@pytest.mark.parametrize("profile", PROFILES)
def test_config_json_unchanged_in_substance_loads_the_same_model(ckpt, profile):
    strategy = same_config_cases(ckpt.raw)
    run_property("config_json_same", profile, strategy, lambda c: check_config_json(ckpt, c))


# =============================================================================================
# 2. safetensors headers
# =============================================================================================

ST_DTYPES = {
    "F64": np.dtype("<f8"),
    "F32": np.dtype("<f4"),
    "F16": np.dtype("<f2"),
    "BF16": np.dtype(ml_dtypes.bfloat16),
    "F8_E4M3": np.dtype(ml_dtypes.float8_e4m3fn),
    "F8_E5M2": np.dtype(ml_dtypes.float8_e5m2),
    "I64": np.dtype("<i8"),
    "I32": np.dtype("<i4"),
    "I16": np.dtype("<i2"),
    "I8": np.dtype("i1"),
    "U64": np.dtype("<u8"),
    "U32": np.dtype("<u4"),
    "U16": np.dtype("<u2"),
    "U8": np.dtype("u1"),
    "BOOL": np.dtype("?"),
}


def split_safetensors(blob: bytes) -> tuple[dict, bytes]:
    (n,) = struct.unpack("<Q", blob[:8])
    return json.loads(blob[8 : 8 + n]), blob[8 + n :]


def join_safetensors(header: Any, data: bytes, *, pad: bool = True) -> bytes:
    text = json.dumps(header).encode()
    if pad:
        text += b" " * (-len(text) % 8)
    return struct.pack("<Q", len(text)) + text + data


def decode_safetensors(blob: bytes) -> dict[str, np.ndarray]:
    """Reference reader of the safetensors format (independent of the library's): tensor name ->
    array. Raises on anything the format does not allow."""
    (n,) = struct.unpack("<Q", blob[:8])
    header = json.loads(blob[8 : 8 + n].decode("utf-8"))
    data = blob[8 + n :]
    assert isinstance(header, dict)
    out, spans = {}, []
    for name, info in header.items():
        if name == "__metadata__":
            assert info is None or all(isinstance(v, str) for v in dict(info).values())
            continue
        assert set(info) == {"dtype", "shape", "data_offsets"}, info
        dtype, shape = ST_DTYPES[info["dtype"]], tuple(info["shape"])
        begin, end = info["data_offsets"]
        assert all(type(d) is int and d >= 0 for d in (*shape, begin, end))
        assert begin <= end <= len(data) and end - begin == math.prod(shape) * dtype.itemsize
        out[name] = np.frombuffer(data[begin:end], dtype).reshape(shape)
        spans.append((begin, end))
    position = 0
    for begin, end in sorted(spans):
        assert begin == position, "holes or overlaps between tensors"
        position = end
    assert position == len(data), "bytes after the last tensor"
    return out


ST_WORDS = (*ST_DTYPES, "XYZ", "", "f32", "F32 ", "F4", "C64")


@st.composite
def safetensors_cases(draw, blob: bytes) -> FileCase:
    header, data = split_safetensors(blob)
    names = [k for k in header if k != "__metadata__"]
    kind = draw(st.sampled_from(("length", "header", "header", "header", "header_bytes", "bytes")))
    if kind == "length":
        (n,) = struct.unpack("<Q", blob[:8])
        size = draw(
            st.sampled_from((0, 1, n - 1, n + 1, n + 8, len(blob), 2**31, 2**63, 2**64 - 1))
            | st.integers(0, 2**64 - 1)
        )
        return FileCase(f"header length {size}", struct.pack("<Q", size) + blob[8:])
    if kind == "bytes":
        what, edited = draw(byte_edits(blob))
        if draw(st.booleans()):  # flips in the tensor data: a valid file with other weights
            out = bytearray(blob)
            for _ in range(draw(st.integers(1, 8))):
                out[draw(st.integers(len(blob) - len(data), len(blob) - 1))] = draw(
                    st.integers(0, 255)
                )
            what, edited = "flip data bytes", bytes(out)
        return FileCase(what, edited)
    if kind == "header_bytes":
        what, text = draw(byte_edits(json.dumps(header).encode()))
        keep = draw(st.booleans())  # the original length prefix, or the edited text's
        prefix = blob[:8] if keep else struct.pack("<Q", len(text))
        return FileCase(f"header {what}", prefix + text + data)
    header = copy.deepcopy(header)
    name = draw(st.sampled_from(names))
    info = header[name]
    numel = math.prod(info["shape"])
    op = draw(st.sampled_from(("dtype", "shape", "offsets", "rename", "delete", "add", "meta")))
    if op == "dtype":
        info["dtype"] = draw(st.sampled_from(ST_WORDS) | json_values)
    elif op == "shape":
        same_size = [list(reversed(info["shape"])), [numel], [numel, 1], [1, *info["shape"]]]
        dims = st.integers(-2, 2**65) | st.sampled_from(NASTY_NUMBERS)
        info["shape"] = draw(st.sampled_from(same_size) | st.lists(dims, max_size=3) | json_values)
    elif op == "offsets":
        begin, end = info["data_offsets"]
        other = header[draw(st.sampled_from(names))]["data_offsets"]
        shift = draw(st.integers(-16, 16))
        choices = [[end, begin], [begin + shift, end + shift], [begin, end + shift], other]
        ints = st.integers(-1, 2**65)
        info["data_offsets"] = draw(
            st.sampled_from(choices) | st.lists(ints, max_size=3) | json_values
        )
    elif op == "rename":
        tricks = (
            "../x",
            "/abs",
            "model.layers.99.input_layernorm.weight",
            "model.layers.-1.input_layernorm.weight",
            "model.layers.99999999999999999999.mlp.up_proj.weight",
            "model.layers.0.self_attn.rotary_emb.inv_freq",
            "lm_head.weight",
            "",
            *SURROGATES,
        )
        header[draw(st.sampled_from(tricks) | st.text(max_size=12))] = header.pop(name)
    elif op == "delete":
        del header[name]
    elif op == "add":
        header[draw(st.sampled_from(("lm_head.weight", "extra", "__metadata__")))] = dict(info)
    else:
        header["__metadata__"] = draw(json_values)
    return FileCase(
        f"header {op} of {name}", join_safetensors(header, data, pad=draw(st.booleans()))
    )


def check_safetensors(ckpt: Checkpoint, case: FileCase) -> None:
    with scratch(ckpt.root) as tmp:
        folder = os.path.join(tmp, "model")
        shutil.copytree(ckpt.folder, folder)
        write(os.path.join(folder, "model.safetensors"), case.content)
        out = attempt(lambda: models.from_pretrained(folder))
        if out.error is not None:
            clear_error(out.error, [folder])
            return tally(f"refused: {type(out.error).__name__}")
        model = out.value
        try:
            tensors = decode_safetensors(case.content)
        except Exception as e:
            raise Violation("loaded a safetensors file the format does not allow", exc=e) from None
        got = params_of(model)
        for spec in models.tensor_specs(model.config):
            want = np.ascontiguousarray(spec.to_ours(tensors[spec.hf_name])).astype(np.float32)
            expect(
                np.array_equal(spec.select(got[spec.path]), want, equal_nan=True),
                f"tensor {spec.hf_name} differs from the file's",
            )
        tally("loaded")


@pytest.mark.parametrize("profile", PROFILES)
def test_safetensors_header(ckpt, profile):
    strategy = safetensors_cases(ckpt.blob)
    run_property("safetensors", profile, strategy, lambda c: check_safetensors(ckpt, c))


# =============================================================================================
# 3. model.safetensors.index.json
# =============================================================================================

INDEX = "model.safetensors.index.json"
SHARD_SIZE = 30_000  # bytes: the tiny model in 5 shards
ABS = "@ABS@"  # stands for the scratch folder (an absolute path), filled in when checked


@dataclasses.dataclass
class Sharded:
    root: str
    folder: str  # the sharded checkpoint
    decoy: str  # the same shard names and shapes, other weights
    index: dict
    params: dict[tuple, np.ndarray]


@pytest.fixture(scope="module")
def sharded(ckpt) -> Sharded:
    root = tempfile.mkdtemp(dir=ckpt.root)
    folder, decoy = os.path.join(root, "model"), os.path.join(root, "decoy")
    models.save_pretrained(models.from_pretrained(ckpt.folder), folder, max_shard_size=SHARD_SIZE)
    other = models.random_checkpoint(
        os.path.join(root, "other"), models.qwen3_config(**TINY), seed=1
    )
    models.save_pretrained(models.from_pretrained(other), decoy, max_shard_size=SHARD_SIZE)
    with open(os.path.join(folder, INDEX), encoding="utf-8") as f:
        index = json.load(f)
    assert len(set(index["weight_map"].values())) > 2
    return Sharded(root, folder, decoy, index, ckpt.params)


def shard_names(shard: str) -> tuple[tuple[str, ...], tuple[str, ...]]:
    """(spellings of `shard` that mean the same file, hostile spellings)."""
    same = ("./" + shard, "sub/../" + shard, shard + "/", "./sub/.././" + shard)
    hostile = (
        "../decoy/" + shard,
        "../model/" + shard,
        "sub/../../decoy/" + shard,
        f"{ABS}/decoy/{shard}",
        f"{ABS}/model/{shard}",
        "/etc/passwd",
        "",
        "\x00",
        shard + "\x00",
        ".",
        "..",
        "config.json",
        "model-00002-of-00005.safetensors",
        "model-00009-of-00009.safetensors",
        "nope.safetensors",
        "~/" + shard,
        "//" + shard,
        "..\\" + shard,
        "%2e%2e/" + shard,
        "file://" + shard,
        shard.upper(),
        " " + shard,
        "a" * 5000,
        *SURROGATES,
    )
    return same, hostile


@st.composite
def index_cases(draw, index: dict) -> FileCase:
    weight_map = index["weight_map"]
    kind = draw(st.sampled_from(("path", "path", "same", "file")))
    if kind == "file":
        return FileCase(*draw(file_mutations(index, json_values, ("weight_map", "metadata"))))
    doc = copy.deepcopy(index)
    names = draw(st.lists(st.sampled_from(sorted(weight_map)), min_size=1, max_size=3, unique=True))
    for name in names:
        same, hostile = shard_names(weight_map[name])
        pool = same if kind == "same" else hostile
        doc["weight_map"][name] = draw(
            st.sampled_from(pool) | (json_values if kind == "path" else st.nothing())
        )
    if kind == "same" and draw(st.booleans()):
        doc["metadata"] = draw(json_values)
    content = draw(json_text(doc)) if kind != "same" else json.dumps(doc).encode()
    return FileCase(f"weight_map paths ({kind})", content, same=kind == "same")


def check_index(sharded: Sharded, case: FileCase) -> None:
    with scratch(sharded.root) as tmp:
        folder = os.path.join(tmp, "model")
        shutil.copytree(sharded.folder, folder)
        shutil.copytree(sharded.decoy, os.path.join(tmp, "decoy"))
        content = case.content.replace(ABS.encode(), tmp.encode())
        write(os.path.join(folder, INDEX), content)
        out = attempt(lambda: models.from_pretrained(folder))
        if out.error is not None:
            if case.same:
                raise Violation("an index unchanged in substance did not load", exc=out.error)
            clear_error(out.error, [folder])
            return tally(f"refused: {type(out.error).__name__}")
        expect(same_arrays(params_of(out.value), sharded.params), "loaded other weights")
        tally("loaded")


@pytest.mark.parametrize("profile", PROFILES)
def test_shard_index(sharded, profile):
    strategy = index_cases(sharded.index)
    run_property("shard_index", profile, strategy, lambda c: check_index(sharded, c))


# =============================================================================================
# 4. tokenizer files
# =============================================================================================

TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json", "special_tokens_map.json")
TOKENIZER_KEYS = {
    "tokenizer.json": ("version", "model", "added_tokens", "pre_tokenizer", "decoder"),
    "tokenizer_config.json": (
        "bos_token",
        "eos_token",
        "pad_token",
        "unk_token",
        "extra_special_tokens",
        "tokenizer_class",
        "model_max_length",
        "padding_side",
        "chat_template",
        "auto_map",
        "tokenizer_file",
        "added_tokens_decoder",
        "clean_up_tokenization_spaces",
    ),
    "special_tokens_map.json": (
        "bos_token",
        "eos_token",
        "pad_token",
        "unk_token",
        "additional_special_tokens",
    ),
}
TOKENIZER_WORDS = (
    "<pad>",
    "<unk>",
    "<bos>",
    "<|im_end|>",
    "<|user|>",
    "<zzz>",
    "PreTrainedTokenizerFast",
    "LlamaTokenizer",
    "left",
    "right",
)
SAMPLE = "What is 2 + 3?"


@dataclasses.dataclass
class TokenizerFolder:
    root: str
    folder: str
    docs: dict[str, Any]  # file name -> parsed JSON
    reference: Tokenizer


@pytest.fixture(scope="module")
def tok_folder(tmp_path_factory) -> TokenizerFolder:
    root = str(tmp_path_factory.mktemp("fuzz_tok"))
    folder = save_tokenizer(os.path.join(root, "tokenizer"))
    docs = {}
    for name in TOKENIZER_FILES:
        with open(os.path.join(folder, name), encoding="utf-8") as f:
            docs[name] = json.load(f)
    return TokenizerFolder(root, folder, docs, Tokenizer.from_pretrained(folder))


@dataclasses.dataclass(frozen=True)
class TokenizerCase:
    file: str
    what: str
    content: bytes | None  # None: the file is removed
    same: bool = False


@st.composite
def tokenizer_cases(draw, docs: dict[str, Any]) -> TokenizerCase:
    file = draw(
        st.sampled_from((*TOKENIZER_FILES, "generation_config.json", "chat_template.jinja"))
    )
    if file == "generation_config.json":
        doc = {"eos_token_id": draw(json_values | st.lists(st.integers(-2, 200), max_size=3))}
        return TokenizerCase(file, "generation_config", draw(json_text(doc)))
    if file == "chat_template.jinja":
        pieces = ("{{", "}}", "{%", "%}", "{% for %}", "{% endfor %}", "{{ bos_token }}", "x", "{#")
        text = "".join(draw(st.lists(st.sampled_from(pieces) | st.text(max_size=5), max_size=6)))
        return TokenizerCase(file, "chat template", encode(text))
    kind = draw(st.sampled_from(("edit", "edit", "edit", "delete", "same")))
    doc = docs[file]
    if kind == "delete":
        return TokenizerCase(file, "delete", None)
    if kind == "same":
        return TokenizerCase(file, "reformatted", draw(reformatted(doc)), same=True)
    values = json_values | st.sampled_from(TOKENIZER_WORDS) | st.integers(-2, 200)
    what, content = draw(file_mutations(doc, values, TOKENIZER_KEYS[file]))
    return TokenizerCase(file, what, content)


def check_tokenizer(tok: TokenizerFolder, case: TokenizerCase) -> None:
    with scratch(tok.root) as tmp:
        folder = os.path.join(tmp, "tokenizer")
        shutil.copytree(tok.folder, folder)
        write(os.path.join(folder, case.file), case.content)
        out = attempt(lambda: Tokenizer.from_pretrained(folder))
        if out.error is not None:
            if case.same:
                raise Violation(
                    "tokenizer files unchanged in substance did not load", exc=out.error
                )
            clear_error(out.error, [folder])
            return tally(f"refused: {type(out.error).__name__}")
        use = attempt(lambda: tokenizer_usable(out.value))
        if isinstance(use.error, Violation):
            raise use.error
        if use.error is not None:
            raise Violation("the loaded tokenizer fails on first use", exc=use.error)
        if case.same:
            expect(same_tokenizer(out.value, tok.reference), "the tokenizer differs")
        tally("loaded")


def tokenizer_usable(t: Tokenizer) -> None:
    """What the pipeline and the trainer do with a tokenizer; raises if any step fails."""
    vocab, n = t.hf.get_vocab(), t.vocab_size
    if len(set(vocab.values())) != len(vocab):
        raise Violation("the vocabulary maps several tokens to one id", kind="silent")
    # generation_config.json's extra EOS ids only need to be ids (`generation_eos_ids`).
    ids = [i for i in (t.hf.eos_token_id, t.hf.pad_token_id, t.bos_id) if i is not None]
    if not all(0 <= i < n for i in ids):
        raise Violation(
            "a special token id is outside the vocabulary", kind="silent", message=f"{ids} vs {n}"
        )
    encoded = t.encode(SAMPLE)
    assert all(0 <= i < n for i in encoded)
    t.decode(encoded)
    if t.hf.chat_template:
        data.chat_prompt_texts(t, [SAMPLE])


def same_tokenizer(a: Tokenizer, b: Tokenizer) -> bool:
    return (
        a.hf.get_vocab() == b.hf.get_vocab()
        and (a.eos_ids, a.pad_id, a.bos_id) == (b.eos_ids, b.pad_id, b.bos_id)
        and a.encode(SAMPLE) == b.encode(SAMPLE)
        and data.chat_prompt_texts(a, [SAMPLE]) == data.chat_prompt_texts(b, [SAMPLE])
    )


@pytest.mark.parametrize("profile", PROFILES)
def test_tokenizer_files(tok_folder, profile):
    strategy = tokenizer_cases(tok_folder.docs)
    run_property("tokenizer", profile, strategy, lambda c: check_tokenizer(tok_folder, c))


# =============================================================================================
# 5. JSONL and Parquet prompt rows
# =============================================================================================

BASE_ROWS = (
    {"prompt": "What is 2 + 3?", "answer": "5", "task": "addition", "domain": "math"},
    {"prompt": "Reverse abc", "answer": "cba", "teacher": None},
    {"prompt": "What is 7 * 6?", "answer": 42},
    {"prompt": "Sum of 3 and 14?", "answer": "17", "solution": "3+14=17", "domain": "math"},
)
MAX_PROMPT_LEN = 40  # tokens: the base prompts fit, prompts of 30+ characters do not
ROW_KEYS = (*data.FIELDS, "extra", "Prompt")
BAD = object()  # a row the reference says is invalid


def reference_record(obj: Any) -> Any:
    """The record a row means (records.py's documented contract, written independently), or
    BAD: an object with a non-empty string prompt, an answer (string or finite number, turned
    into a string), optional string solution / teacher / domain / task; valid Unicode only."""
    if not isinstance(obj, dict):
        return BAD
    rec = {}
    for name in data.FIELDS:
        value = obj.get(name)
        if isinstance(value, bool):
            return BAD
        if name == "answer" and isinstance(value, int | float):
            if not math.isfinite(value):
                return BAD
            value = str(value)
        if value is not None and not isinstance(value, str):
            return BAD
        if isinstance(value, str) and re.search("[\ud800-\udfff]", value):
            return BAD
        rec[name] = value
    if rec["prompt"] is None or rec["answer"] is None or not rec["prompt"].strip():
        return BAD
    return rec


def reference_jsonl(blob: bytes) -> list[tuple[int, Any]]:
    """(line number, record or BAD) of each non-blank line."""
    out = []
    for lineno, raw in enumerate(io.BytesIO(blob), start=1):
        if not raw.strip():
            continue
        try:
            obj = json.loads(raw.decode("utf-8"))
        except (ValueError, RecursionError):
            out.append((lineno, BAD))
            continue
        out.append((lineno, reference_record(obj)))
    return out


@pytest.fixture(scope="module")
def tokenizer(tok_folder) -> Tokenizer:
    return tok_folder.reference


row_values = st.one_of(
    json_values,
    st.text(max_size=60),
    st.integers(),
    st.sampled_from(("<|im_end|>", "{{ bos_token }}", "x" * 100, " \n\t", "\u2028")),
)


@st.composite
def jsonl_cases(draw) -> FileCase:
    lines = [json.dumps(r).encode() for r in BASE_ROWS]
    for _ in range(draw(st.integers(1, 2))):
        i = draw(st.integers(0, len(lines)))
        ops = ("edit", "edit", "bytes", "value", "blank", "insert", "long", "delete")
        op = draw(st.sampled_from(ops))
        if op in ("edit", "bytes", "delete") and i == len(lines):
            i -= 1
        if op == "edit":
            _, doc = draw(json_edits(dict(BASE_ROWS[i % len(BASE_ROWS)]), row_values, ROW_KEYS))
            lines[i] = draw(json_text(doc)).replace(b"\n", b" ")
        elif op == "bytes":
            lines[i] = draw(byte_edits(lines[i]))[1]
        elif op == "value":
            lines.insert(i, draw(json_text(draw(json_values))).replace(b"\n", b" "))
        elif op == "blank":
            lines.insert(i, draw(st.sampled_from((b"", b"   ", b"\t", b"\r", b"\x0c"))))
        elif op == "insert":
            lines.insert(i, json.dumps(draw(st.sampled_from(BASE_ROWS))).encode())
        elif op == "long":  # a valid row whose prompt is over max_prompt_len: skipped, counted
            prompt = "x" * draw(st.sampled_from((MAX_PROMPT_LEN, 100, 5000)))
            lines.insert(i, json.dumps({"prompt": prompt, "answer": "1"}).encode())
        else:
            del lines[i]
    end = draw(st.sampled_from((b"\n", b"", b"\r\n", b"\n\n")))
    return FileCase("rows", b"\n".join(lines) + end)


def check_records(tok: Tokenizer, path: str, expected: list[Any], where: Callable[[int], str]):
    """The prompt pipeline over `path` against the reference `expected` (record or BAD per row;
    `where(i)` names row i in an error)."""
    out = attempt(
        lambda: list_batches(
            data.PromptPipeline(
                path,
                tok,
                batch_size=1,
                max_prompt_len=MAX_PROMPT_LEN,
                shuffle=False,
                num_epochs=1,
                drop_remainder=False,
            )
        )
    )
    bad = [i for i, rec in enumerate(expected) if rec is BAD]
    if out.error is not None:
        clear_error(out.error, [path])
        message = str(out.error)
        if bad:
            expect(any(where(i) in message for i in bad), "the error names no bad row")
            return tally("refused: names a bad row")
        lengths = [prompt_length(tok, rec["prompt"]) for rec in expected]
        expect(
            not expected or min(lengths) > MAX_PROMPT_LEN,
            "valid rows were refused",
        )
        return tally("refused: no rows / all too long")
    expect(not bad, f"bad rows {[where(i) for i in bad]} were accepted")
    stats, batches = out.value
    kept = [
        i for i, rec in enumerate(expected) if prompt_length(tok, rec["prompt"]) <= MAX_PROMPT_LEN
    ]
    expect(stats["num_records"] == len(expected), "num_records is not the number of rows")
    expect(stats["num_dropped"] == len(expected) - len(kept), "dropped rows not counted")
    served = [int(b["index"][0]) for b in batches]
    expect(served == kept, f"served rows {served}, expected {kept}")
    for b, i in zip(batches, served, strict=True):
        rec = expected[i]
        got = (b["prompt"][0], b["answer"][0], b["task"][0], b["domain"][0], b["teacher_name"][0])
        want = (rec["prompt"], rec["answer"], rec["task"], rec["domain"], rec["teacher"])
        expect(got == want, f"row {i} served as {got!r}, the file says {want!r}")
    tally("loaded, some rows skipped (too long)" if len(kept) < len(expected) else "loaded")


def list_batches(pipe) -> tuple[dict, list[dict]]:
    return pipe.stats, list(pipe)


def prompt_length(tok: Tokenizer, prompt: str) -> int:
    return len(tok.encode(data.chat_prompt_texts(tok, [prompt])[0]))


def check_jsonl(tok: Tokenizer, root: str, case: FileCase) -> None:
    with scratch(root) as tmp:
        path = os.path.join(tmp, "rows.jsonl")
        write(path, case.content)
        rows = reference_jsonl(case.content)
        expected = [rec for _, rec in rows]
        check_records(tok, path, expected, lambda i: f"{path}:{rows[i][0]}")


@pytest.mark.parametrize("profile", PROFILES)
def test_jsonl_rows(tokenizer, tok_folder, profile):
    run_property(
        "jsonl", profile, jsonl_cases(), lambda c: check_jsonl(tokenizer, tok_folder.root, c)
    )


# Arrow column types and values of that type.
ARROW_COLUMNS = {
    "string": (pa.string(), st.none() | st.text(max_size=40) | st.sampled_from(NASTY_TEXT[:-4])),
    "large_string": (pa.large_string(), st.none() | st.text(max_size=8)),
    "binary": (pa.binary(), st.none() | st.binary(max_size=8) | st.sampled_from(INVALID_UTF8)),
    "int64": (pa.int64(), st.none() | st.integers(-(2**63), 2**63 - 1)),
    "float64": (pa.float64(), st.none() | st.floats()),
    "float32": (pa.float32(), st.none() | st.floats(width=32)),
    "bool": (pa.bool_(), st.none() | st.booleans()),
    "list": (pa.list_(pa.string()), st.none() | st.lists(st.text(max_size=3), max_size=2)),
    "struct": (pa.struct([("x", pa.string())]), st.none() | st.builds(dict, x=st.text(max_size=3))),
    "timestamp": (
        pa.timestamp("s"),
        st.none() | st.datetimes(max_value=datetime.datetime(2100, 1, 1)),
    ),
    "null": (pa.null(), st.none()),
}


@dataclasses.dataclass(frozen=True)
class ParquetCase:
    columns: dict[str, tuple[str, list]]  # name -> (ARROW_COLUMNS key, values)
    byte_edit: tuple[str, int, int] | None  # ("flip" | "truncate" | "name", position, byte)


@st.composite
def parquet_cases(draw) -> ParquetCase:
    rows = [{k: (None if v is None else str(v)) for k, v in r.items()} for r in BASE_ROWS]
    n = len(rows)
    columns = {k: ("string", [r.get(k) for r in rows]) for k in data.FIELDS}
    for _ in range(draw(st.integers(0, 2))):
        name = draw(st.sampled_from((*data.FIELDS, "extra", "", "prompt ")))
        op = draw(st.sampled_from(("type", "type", "cell", "drop")))
        if op == "drop":
            columns.pop(name, None)
        elif op == "cell" and name in columns and columns[name][0] == "string":
            values = list(columns[name][1])
            values[draw(st.integers(0, n - 1))] = draw(ARROW_COLUMNS["string"][1])
            columns[name] = ("string", values)
        else:
            kind = draw(st.sampled_from(sorted(ARROW_COLUMNS)))
            columns[name] = (kind, draw(st.lists(ARROW_COLUMNS[kind][1], min_size=n, max_size=n)))
    edit = None
    if draw(st.integers(0, 2)) == 0:
        edit = (
            draw(st.sampled_from(("flip", "flip", "truncate", "name"))),
            draw(st.integers(0, 10**6)),
            draw(st.integers(0, 255)),
        )
    return ParquetCase(columns, edit)


def write_parquet_case(case: ParquetCase, path: str) -> None:
    arrays = {
        name: pa.array(values, type=ARROW_COLUMNS[kind][0])
        for name, (kind, values) in case.columns.items()
    }
    pq.write_table(pa.table(arrays), path)
    if case.byte_edit is None:
        return
    with open(path, "rb") as f:
        blob = bytearray(f.read())
    kind, pos, byte = case.byte_edit
    if kind == "truncate":
        blob = blob[: pos % len(blob)]
    elif kind == "name":  # a byte of a column name in the footer's schema
        spots = [
            m.start()
            for name in case.columns
            if name
            for m in re.finditer(re.escape(name.encode()), blob)
        ]
        if spots:
            blob[spots[pos % len(spots)]] = byte | 0x80
    else:
        blob[pos % len(blob)] = byte
    with open(path, "wb") as f:
        f.write(blob)


def check_parquet(tok: Tokenizer, root: str, case: ParquetCase) -> None:
    with scratch(root) as tmp:
        path = os.path.join(tmp, "rows.parquet")
        write_parquet_case(case, path)
        try:
            rows = pq.read_table(path).to_pylist()
        except Exception:  # pyarrow itself cannot read it: the loader must say so, naming the file
            out = attempt(lambda: data.load_records(path))
            expect(out.error is not None, "read a Parquet file that pyarrow cannot read")
            clear_error(out.error, [path])
            return tally("refused: pyarrow cannot read it")
        expected = [reference_record(r) for r in rows]
        check_records(tok, path, expected, lambda i: f"{path} row {i}")


@pytest.mark.parametrize("profile", PROFILES)
def test_parquet_rows(tokenizer, tok_folder, profile):
    run_property(
        "parquet", profile, parquet_cases(), lambda c: check_parquet(tokenizer, tok_folder.root, c)
    )


# =============================================================================================
# 6. verifier inputs
# =============================================================================================


@pytest.fixture(scope="module")
def math_workers():
    verifiers.MATH_WORKERS.warm_up()  # the first answer's limit does not include the startup
    return verifiers.MATH_WORKERS


latex_atoms = st.one_of(
    st.integers(-(10**6), 10**6).map(str),
    st.sampled_from(
        (
            "x",
            "y",
            "\\pi",
            "e",
            "i",
            "\\infty",
            "0.5",
            ".5",
            "1/3",
            "9" * 400,
            "10^{10^{10}}",
            "9!",
            "\\sqrt{2}",
            "\\emptyset",
            "",
            " ",
            "\\",
            "{",
            "}",
            "$",
            "\ud800",
            "日本",
        )
    ),
)
latex = st.recursive(
    latex_atoms,
    lambda inner: st.one_of(
        st.tuples(
            inner,
            st.sampled_from(("+", "-", "*", "/", "^", "=", ",", "\\cdot ", "\\times ")),
            inner,
        ).map("".join),
        inner.map(lambda s: "{" + s + "}"),
        inner.map(lambda s: "^{" + s + "}"),
        st.tuples(inner, inner).map(lambda p: "\\frac{" + p[0] + "}{" + p[1] + "}"),
        inner.map(lambda s: "\\left(" + s + "\\right)"),
        inner.map(lambda s: "\\sqrt{" + s + "}"),
        inner.map(lambda s: "9^{9^{" + s + "}}"),
    ),
    max_leaves=6,
)


@st.composite
def math_responses(draw) -> str:
    body = draw(latex)
    form = draw(st.sampled_from(("boxed", "boxed", "hash", "fbox", "plain", "unbalanced")))
    text = {
        "boxed": f"The answer is \\boxed{{{body}}}.",
        "hash": f"work...\n#### {body}",
        "fbox": f"\\fbox{{{body}}}",
        "plain": body,
        "unbalanced": "\\boxed{" + body,
    }[form]
    return draw(st.text(max_size=10)) + text


@dataclasses.dataclass(frozen=True)
class VerifyCase:
    responses: tuple[str, ...]
    examples: tuple[Any, ...]
    budget: float | None = None


@st.composite
def math_cases(draw) -> VerifyCase:
    n = draw(st.integers(1, 3))
    responses, examples = [], []
    for _ in range(n):
        answer = draw(latex | st.integers(0, 10**6).map(str))
        if draw(st.integers(0, 3)) == 0:  # a correct plain answer: must score 1
            answer = str(draw(st.integers(0, 10**6)))
            responses.append(f"so \\boxed{{{answer}}}")
        else:
            responses.append(draw(math_responses()))
        examples.append(
            draw(
                st.sampled_from((answer, {"answer": answer}, {"answer": answer, "domain": "math"}))
            )
        )
    return VerifyCase(tuple(responses), tuple(examples))


def check_verify(case: VerifyCase, *, seconds: float) -> verifiers.VerifierStats:
    """batch_verify never raises, scores every row 0 or 1 within the bound and counts every row
    once (a call, failure, timeout or skip); a plain correct answer scores 1."""
    n = len(case.responses)
    out = attempt(
        lambda: verifiers.batch_verify(
            list(case.responses),
            list(case.examples),
            timeout_seconds=MATH_TIMEOUT,
            time_budget_seconds=case.budget,
        ),
        seconds,
    )
    if out.error is not None:
        raise Violation("batch_verify raised", exc=out.error)
    scores, stats = out.value
    expect(scores.shape == (n,) and set(np.unique(scores)) <= {0.0, 1.0}, f"scores {scores}")
    expect(
        stats.calls + stats.skipped == n, f"{stats.calls} calls + {stats.skipped} skipped != {n}"
    )
    expect(math.isclose(stats.score_sum, float(scores.sum())), "score_sum != the scores' sum")
    problems = [name for name in ("timeouts", "failures", "skipped") if getattr(stats, name)]
    tally(
        f"{'rows with ' + ' and '.join(problems) if problems else 'all rows verified'}"
        f"{', some scored 1' if scores.any() else ''}"
    )
    for i, (response, example) in enumerate(zip(case.responses, case.examples, strict=True)):
        answer = example.get("answer") if isinstance(example, dict) else example
        plain = (
            isinstance(answer, str) and answer.isdigit() and response == f"so \\boxed{{{answer}}}"
        )
        if plain and not stats.timeouts:
            expect(scores[i] == 1.0, f"a correct answer {answer!r} scored 0")
    return stats


@pytest.mark.parametrize("profile", PROFILES)
def test_math_verifier(math_workers, profile):
    def check(case):
        check_verify(case, seconds=30 + 8 * len(case.responses))

    run_property("math", profile, math_cases(), check)


tool_names = st.sampled_from((*tool_use.TOOLS, "ADD", "", "eval", "__import__", "add "))
tool_args = st.dictionaries(
    st.sampled_from(("a", "b", "s", "c", "")),
    st.one_of(
        scalars,
        st.integers(-(10**31), 10**31),
        st.text(max_size=20),
        st.just("x" * (tool_use.MAX_STR_LEN + 1)),
    ),
    max_size=3,
)


@st.composite
def tool_cases(draw) -> VerifyCase:
    n = draw(st.integers(1, 3))
    responses, examples = [], []
    for _ in range(n):
        kind = draw(st.sampled_from(("valid", "call", "call", "json", "text", "bigint")))
        answer = draw(st.integers(-200, 200).map(str) | st.text(max_size=6))
        if kind == "valid":  # a well-formed call; the answer is usually its result
            tool = tool_use.TOOLS[draw(st.sampled_from(sorted(tool_use.TOOLS)))]
            ints = st.integers(-tool_use.MAX_INT_ABS, tool_use.MAX_INT_ABS)
            strs = st.text(max_size=tool_use.MAX_STR_LEN)
            args = {p: draw(ints if typ is int else strs) for p, typ in tool.params}
            body = tool_use.format_call(tool.name, args)
            if draw(st.integers(0, 3)):
                answer = str(tool.fn(**args))
        elif kind == "call":
            body = json.dumps({"name": draw(tool_names), "arguments": draw(tool_args)})
        elif kind == "json":
            body = json.dumps(draw(json_values))
        elif kind == "text":
            body = draw(st.text(max_size=40))
        else:  # an integer literal over Python's int-parsing limit
            body = '{"name": "add", "arguments": {"a": ' + "9" * 5000 + ', "b": 1}}'
        prefix = draw(st.sampled_from(("", "####", "thinking...\n#### ", "{", "#### ####")))
        suffix = draw(st.sampled_from(("", " ", "\n", "}", " trailing")))
        responses.append(prefix + body + suffix)
        key = draw(st.sampled_from(("task", "domain")))
        examples.append({"answer": answer, key: "tool_use"})
    return VerifyCase(tuple(responses), tuple(examples))


def check_tool_use(case: VerifyCase) -> None:
    """batch_verify's properties, plus: the tool-use verifier is total on strings (a malformed
    call scores 0, it is not a verifier failure), and a well-formed call scores 1 exactly when
    executing it gives the answer."""
    stats = check_verify(case, seconds=30)
    expect(stats.failures == 0, f"tool-use verifier failed: {stats.messages}")
    scores, _ = verifiers.batch_verify(list(case.responses), list(case.examples))
    for response, example, score in zip(case.responses, case.examples, scores, strict=True):
        try:
            result = tool_use.execute_call(response)
        except tool_use.ToolCallError:
            expect(score == 0.0, "a malformed tool call scored 1")
            continue
        except ValueError:  # the integer-limit defect; reported through stats above
            continue
        expect(score == float(result == example["answer"]), "the score is not the call's result")


@pytest.mark.parametrize("profile", PROFILES)
def test_tool_use_verifier(profile):
    run_property("tool_use", profile, tool_cases(), check_tool_use)


@st.composite
def verifier_row_cases(draw) -> VerifyCase:
    """Rows of any shape: tasks, domains and answers of any JSON type, non-dict rows."""
    n = draw(st.integers(1, 3))
    task = (
        st.none()
        | st.sampled_from(("tool_use", "addition", "sort", "math", "gsm8k", "", "\ud800"))
        | json_values
    )
    rows = st.one_of(
        st.fixed_dictionaries(
            {"answer": json_values | st.text(max_size=5)},
            optional={"task": task, "domain": task, "teacher": json_values},
        ),
        json_values,
    )
    responses = st.text(max_size=30) | st.sampled_from(
        ('{"name": "add", "arguments": {"a": 1, "b": 2}}', "#### 3", "\\boxed{3}")
    )
    budget = st.none() | st.sampled_from((0.0, 0.5, 5.0))
    return VerifyCase(
        tuple(draw(st.lists(responses, min_size=n, max_size=n))),
        tuple(draw(st.lists(rows, min_size=n, max_size=n))),
        draw(budget),
    )


@pytest.mark.parametrize("profile", PROFILES)
def test_verifier_rows_of_any_shape(math_workers, profile):
    def check(case):
        check_verify(case, seconds=30 + 8 * len(case.responses))

    run_property("verifier_rows", profile, verifier_row_cases(), check)


# =============================================================================================
# 7. config overrides and the command line
# =============================================================================================


def config_fields(config, prefix: str = "") -> list[str]:
    """Every dotted field of a config, sections included."""
    out = []
    for key, value in config.items():
        out.append(prefix + key)
        if hasattr(value, "items"):
            out += config_fields(value, f"{prefix}{key}.")
    return out


CPU_CONFIG = default_configs.get_config("cpu")
FIELDS = tuple(config_fields(CPU_CONFIG))
SECTIONS = frozenset(f for f in FIELDS if hasattr(node_at(CPU_CONFIG, f.split(".")), "items"))
LEAF_FIELDS = tuple(f for f in FIELDS if f not in SECTIONS)
FIELD_PARTS = frozenset(p for f in FIELDS for p in f.split("."))


@st.composite
def misspelt(draw, field: str) -> str:
    op = draw(st.sampled_from(("drop", "double", "swap", "upper", "child", "dots", "magic")))
    i = draw(st.integers(0, max(len(field) - 2, 0)))
    if op == "drop":
        return field[:i] + field[i + 1 :]
    if op == "double":
        return field[: i + 1] + field[i:]
    if op == "swap":
        return field[:i] + field[i + 1 : i + 2] + field[i : i + 1] + field[i + 2 :]
    if op == "upper":
        return field.upper()
    if op == "child":
        return field + "." + draw(st.sampled_from(("x", "path", "items", "lock")))
    if op == "dots":
        return draw(st.sampled_from(("." + field, field + ".", field.replace(".", "..", 1))))
    return (
        field.rsplit(".", 1)[0]
        + "."
        + draw(st.sampled_from(("__class__", "__dict__", "items", "lock", "get")))
    )


override_fields = st.one_of(
    st.sampled_from(FIELDS),
    st.sampled_from(FIELDS),
    st.sampled_from(FIELDS).flatmap(misspelt),
    st.text(max_size=12),
)
override_values = st.one_of(
    json_values,
    st.integers(-3, 300),
    st.floats(-2, 2),
    st.sampled_from(
        (
            "jsd",
            "reverse_kl",
            "loo",
            "mean",
            "none",
            "cosine",
            "token",
            "sequence",
            "float32",
            "bfloat16",
            "int8",
            "float16",
            "student_init",
            "opd_plus",
        )
    ),
)


@dataclasses.dataclass(frozen=True)
class Override:
    field: str
    value: Any


@st.composite
def typed_overrides(draw) -> Override:
    """A field and a value of the type its default has (so it gets past apply_overrides)."""
    field = draw(st.sampled_from(LEAF_FIELDS))
    current = node_at(CPU_CONFIG, field.split("."))
    if isinstance(current, bool):
        values = st.booleans()
    elif isinstance(current, int):
        values = st.integers(-3, 300) | st.sampled_from((2**31, 2**63, 2**64, -(2**63) - 1))
    elif isinstance(current, float):
        values = st.floats() | st.floats(-2, 2) | st.integers(-3, 300)
    else:  # strings, and the placeholders (None: off)
        words = ("jsd", "loo", "mean", "mean_std", "none", "token", "sequence", "cosine")
        values = st.sampled_from((*words, "float32", "int8", "", "student_init")) | st.floats()
    return Override(field, draw(values | st.none()))


def names_field(message: str, field: str, value: Any = None) -> bool:
    """The message names the dotted field, its leaf, a misspelt part of it, or a key of the
    dict given as its value."""
    if isinstance(value, dict) and any(repr(k) in message for k in value):
        return True
    parts = field.split(".")
    wrong = [p for p in parts if p and p not in FIELD_PARTS]
    return (
        field in message
        or (bool(parts[-1]) and parts[-1] in message)
        or any(p in message for p in wrong)
    )


def check_override(root: str, case: Override) -> None:
    """apply_overrides + everything Trainer.setup does before loading a model: a ValueError
    naming the field, or accepted (setup then stops at the missing student folder); an accepted
    config has a seed jax.random.key takes and floating-point dtypes."""
    config = default_configs.get_config("cpu")
    out = attempt(lambda: configs.apply_overrides(config, {case.field: case.value}), 10)
    if out.error is not None:
        if type(out.error) is not ValueError or case.field not in str(out.error):
            raise Violation("apply_overrides: not a ValueError naming the field", exc=out.error)
        return tally("refused by apply_overrides")
    missing = os.path.join(root, "no_model")
    if case.field != "student.path":
        with contextlib.suppress(ValueError):
            configs.apply_overrides(config, {"student.path": missing})
    setup = attempt(lambda: trainer.Trainer.setup(config), 30)
    exc = setup.error
    if exc is None:
        raise Violation("Trainer.setup succeeded without a model folder")
    accepted = type(exc) in (FileNotFoundError, ValueError) and "student.path" in str(exc)
    if not accepted:
        if type(exc) is not ValueError:
            raise Violation("setup: not a ValueError", exc=exc)
        if not names_field(str(exc), case.field, case.value):
            raise Violation("setup: the error does not name the field", exc=exc)
        return tally("refused by validate / setup")
    try:
        jax.random.key(config.seed)
    except Exception as e:
        raise Violation("accepted a seed that jax.random.key refuses", exc=e) from None
    for name in ("dtype", "param_dtype"):
        value = config.student[name]
        floating = isinstance(value, str) and jnp.issubdtype(jnp.dtype(value), jnp.floating)
        if not floating:
            raise Violation(
                f"accepted a non-floating student.{name}", kind="silent", message=repr(value)
            )
    tally("accepted")


@pytest.mark.parametrize("profile", PROFILES)
def test_config_overrides(tmp_path, profile):
    strategy = st.builds(Override, override_fields, override_values) | typed_overrides()
    run_property("overrides", profile, strategy, lambda c: check_override(str(tmp_path), c))


CLI_VALUES = (
    "None",
    "abc",
    "-1",
    "0",
    "2",
    "1e400",
    "nan",
    "inf",
    "",
    "[1]",
    "True",
    "1.5",
    "int8",
    "loo",
    "99999999999999999999999",
)
JAX_FRAME = re.compile(r'File "[^"]*[/\\](jax|jaxlib)[/\\]')
LIB_FRAME = re.compile(r'File "[^"]*[/\\]opdplus_jax[/\\]([^"]+)", line \d+, in (\S+)')


def cli_failure(output: str) -> tuple[str, tuple[str, str], str]:
    """(exception type, innermost opdplus_jax frame, message) of a traceback in `output`."""
    frames = LIB_FRAME.findall(output)
    where = (frames[-1][0].replace("\\", "/"), frames[-1][1]) if frames else ("", "")
    last = [ln for ln in output.splitlines() if re.match(r"^[A-Za-z_.]+(Error|Exception)\b", ln)]
    kind, _, message = (last[-1] if last else "").partition(": ")
    return kind.rsplit(".", 1)[-1], where, message


def check_cli(root: str, case: Override) -> None:
    """The command line never prints a traceback from inside JAX, and exits non-zero naming the
    field (or, for an accepted value, the missing model folder)."""
    with scratch(root) as tmp:
        cmd = [
            sys.executable,
            "-m",
            "opdplus_jax.main",
            "train",
            "--config=configs/default.py:cpu",
            f"--workdir={tmp}/run",
            f"--config.student.path={tmp}/no_model",
            f"--config.{case.field}={case.value}",
        ]
        env = {**os.environ, "JAX_PLATFORMS": "cpu"}
        with time_bound(CLI_SECONDS):
            proc = subprocess.run(
                cmd, cwd=ROOT, capture_output=True, text=True, env=env, check=False
            )
        output = proc.stdout + proc.stderr
        kind, where, message = cli_failure(output)
        if JAX_FRAME.search(output):
            raise Violation(
                "printed a traceback from inside JAX", kind=kind, where=where, message=message
            )
        expect(proc.returncode != 0, "exited 0 without a model folder")
        text = "\n".join(
            ln for ln in output.splitlines() if ln and not ln.startswith((" ", "Traceback"))
        )
        if not (names_field(text, case.field) or "student.path" in text):
            raise Violation(
                "the error does not name the field",
                kind=kind or "cli",
                where=where,
                message=message or text[-300:],
            )
        tally("accepted (missing model folder)" if "student.path" in text else "refused")


@pytest.mark.parametrize("profile", PROFILES)
def test_command_line_overrides(tmp_path, profile):
    fields = st.sampled_from(LEAF_FIELDS).filter(lambda f: "path" not in f)
    typos = fields.flatmap(misspelt).filter(
        lambda f: ".." not in f and not f.startswith(".") and not f.endswith(".")
    )
    valid = fields.map(lambda f: Override(f, str(node_at(CPU_CONFIG, f.split(".")))))
    strategy = st.builds(Override, fields | typos, st.sampled_from(CLI_VALUES)) | valid
    run_property("cli", profile, strategy, lambda c: check_cli(str(tmp_path), c))


# =============================================================================================
# Known defects: the minimal failing input of each (strict xfail: a fix makes it XPASS and fail)
# =============================================================================================


def xfail_defect(key: str):
    return pytest.mark.xfail(
        strict=True, raises=Violation, reason=f"{key}: {DEFECT_KEYS[key].summary}"
    )


def reproduce(key: str, check: Callable[[Any], None], case: Any) -> None:
    """`check(case)` on a defect's minimal input: it must break the property in the way defect
    `key` describes (then the xfail holds); any other failure is an error of this test."""
    global _tally
    _tally = collections.Counter()  # not counted in the fuzz runs' STATS
    try:
        check(case)
    except Violation as v:
        found = known_defect(v, case)
        assert found is not None and found.key == key, f"not defect {key}: {v}"
        raise


def config_with(raw: dict, **changes: Any) -> bytes:
    return json.dumps({**raw, **changes}).encode()


def test_defect_config_json_long_integer(ckpt):
    case = FileCase("min", b'{"model_type": "qwen3", "vocab_size": ' + b"9" * 4301 + b"}")
    reproduce("json-long-integer", lambda c: check_config_json(ckpt, c), case)


@pytest.mark.parametrize(
    "rope",
    [
        {"rope_type": "default", "rope_theta": "abc"},
        {"rope_type": "default", "rope_theta": 1e6, "partial_rotary_factor": "x"},
    ],
    ids=["rope_theta-string", "partial_rotary_factor-string"],
)
def test_defect_rope_param_types(ckpt, rope):
    case = FileCase("min", config_with(ckpt.raw, rope_parameters=rope))
    reproduce("rope-param-types", lambda c: check_config_json(ckpt, c), case)


@pytest.mark.parametrize(
    "rope",
    [
        {"rope_type": "default", "rope_theta": -1.0},
        {"rope_type": "default", "rope_theta": 0},
        {"rope_type": "default", "rope_theta": math.nan},
        {"rope_type": "linear", "rope_theta": 1e6, "factor": 0},
        {"rope_type": "linear", "rope_theta": 1e6, "factor": "abc"},
    ],
    ids=["theta-negative", "theta-zero", "theta-nan", "linear-factor-0", "linear-factor-string"],
)
def test_defect_rope_param_values(ckpt, rope):
    case = FileCase("min", config_with(ckpt.raw, rope_parameters=rope))
    reproduce("rope-param-values", lambda c: check_config_json(ckpt, c), case)


@pytest.mark.parametrize(
    "changes",
    [{"architectures": 5}, {"model_type": ["qwen3"]}],
    ids=["architectures-int", "model_type-list"],
)
def test_defect_config_types(ckpt, changes):
    case = FileCase("min", config_with(ckpt.raw, **changes))
    reproduce("config-types", lambda c: check_config_json(ckpt, c), case)


@pytest.mark.parametrize(
    "content",
    [b"[" * 100_000, b'{"weight_map": {}, "metadata": {"total_size": ' + b"9" * 4301 + b"}}"],
    ids=["deep-nesting", "long-integer"],
)
def test_defect_index_parse(sharded, content):
    reproduce("index-parse", lambda c: check_index(sharded, c), FileCase("min", content))


def tokenizer_file(tok: TokenizerFolder, file: str, **changes: Any) -> bytes:
    return json.dumps({**tok.docs[file], **changes}).encode()


@xfail_defect("tokenizer-errors")
@pytest.mark.parametrize(
    "file, content",
    [
        ("tokenizer_config.json", b""),
        ("tokenizer_config.json", b"\xff"),
        ("special_tokens_map.json", "eos_token=5"),
        ("tokenizer.json", "version=9.9"),
        ("tokenizer.json", None),
    ],
    ids=[
        "empty-config",
        "invalid-utf8",
        "eos_token-int",
        "tokenizer.json-unparsable",
        "tokenizer.json-missing",
    ],
)
def test_defect_tokenizer_errors(tok_folder, file, content):
    if content == "eos_token=5":
        content = tokenizer_file(tok_folder, file, eos_token=5)
    elif content == "version=9.9":
        content = tokenizer_file(tok_folder, file, version="9.9")
    case = TokenizerCase(file, "min", content)
    reproduce("tokenizer-errors", lambda c: check_tokenizer(tok_folder, c), case)


def test_defect_generation_config_long_integer(tok_folder):
    content = b'{"eos_token_id": ' + b"9" * 4301 + b"}"
    case = TokenizerCase("generation_config.json", "min", content)
    reproduce("json-long-integer", lambda c: check_tokenizer(tok_folder, c), case)


@xfail_defect("tokenizer-lazy-failure")
@pytest.mark.parametrize(
    "file, content",
    [("chat_template.jinja", b"{% for %}"), ("tokenizer_config.json", "model_max_length=x")],
    ids=["chat-template", "model_max_length-string"],
)
def test_defect_tokenizer_lazy_failure(tok_folder, file, content):
    if content == "model_max_length=x":
        content = tokenizer_file(tok_folder, file, model_max_length="x")
    case = TokenizerCase(file, "min", content)
    reproduce("tokenizer-lazy-failure", lambda c: check_tokenizer(tok_folder, c), case)


@xfail_defect("tokenizer-ids")
@pytest.mark.parametrize(
    "token, new_id", [("a", 0), ("<pad>", 1000)], ids=["duplicate-id", "pad-outside-vocab"]
)
def test_defect_tokenizer_ids(tok_folder, token, new_id):
    doc = copy.deepcopy(tok_folder.docs["tokenizer.json"])
    doc["model"]["vocab"][token] = new_id  # id 0 is <pad>'s; the vocabulary has 104 ids
    case = TokenizerCase("tokenizer.json", "min", json.dumps(doc).encode())
    reproduce("tokenizer-ids", lambda c: check_tokenizer(tok_folder, c), case)


@xfail_defect("parquet-column-name")
def test_defect_parquet_column_name(tokenizer, tok_folder):
    # One row written like data.write_parquet; the first byte of the schema's "prompt" := 0xff.
    columns = {"prompt": ("string", ["What is 2 + 3?"]), "answer": ("string", ["5"])}
    case = ParquetCase(columns, ("name", 0, 0xFF))
    reproduce("parquet-column-name", lambda c: check_parquet(tokenizer, tok_folder.root, c), case)


def test_defect_tool_call_long_int():
    response = '{"name": "add", "arguments": {"a": ' + "9" * 4301 + ', "b": 1}}'
    case = VerifyCase((response,), ({"answer": "3", "task": "tool_use"},))
    reproduce("tool-call-long-int", check_tool_use, case)


OVERRIDE_DEFECTS = [
    ("override-sections", "rollout", None),
    ("override-sections", "teachers.default", None),
    ("override-sections", "optimizer", {}),
    ("override-dotted-keys", "rollout", {"a.b": 1}),
    ("override-none-number", "estimator.discount", None),
    ("override-none-number", "teachers.default.reward_scale", None),
    ("override-none-number", "rollout.temperature", None),
    ("override-none-number", "rollout.top_p", None),
    ("override-none-number", "optimizer.learning_rate", None),
    ("mesh-values", "mesh.data", None),
    ("mesh-values", "mesh.data", 0),
    ("mesh-values", "mesh.tensor", -2),
    ("dtype-message", "student.param_dtype", "abc"),
    ("dtype-non-float", "student.param_dtype", "int8"),
    ("dtype-non-float", "student.dtype", None),
    ("seed-range", "seed", None),
    ("seed-range", "seed", 2**64),
]


@pytest.mark.parametrize(
    "key, field, value",
    [
        pytest.param(
            k, f, v, marks=[xfail_defect(k)] if k in DEFECT_KEYS else [], id=f"{k}-{f}={v!r}"
        )
        for k, f, v in OVERRIDE_DEFECTS
    ],
)
def test_defect_config_override(tmp_path, key, field, value):
    reproduce(key, lambda c: check_override(str(tmp_path), c), Override(field, value))


def test_defect_command_line_mesh_zero(tmp_path):
    reproduce("mesh-values", lambda c: check_cli(str(tmp_path), c), Override("mesh.data", "0"))
