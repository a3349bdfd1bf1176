"""The documentation's links resolve inside the repository, and code cites docs/, not notes.

- Every relative link (markdown `[text](target)`, `![alt](target)`, reference definitions
  `[id]: target`, and HTML `href`/`src`) in the top-level README and CHANGELOG, docs/*.md and the
  READMEs of experiments/ and notebooks/ points to an existing file inside the repository; a
  `#fragment` into a markdown file names one of its headings (GitHub's slug rules) or explicit
  anchors.
- No Python file of the package, tests, notebooks, benchmarks or experiments cites the background
  notes that live outside the repository (its MATH and DESIGN notes under a sibling `shared`
  folder); code cites docs/ instead.
"""

from __future__ import annotations

import re
import unicodedata
from pathlib import Path
from urllib.parse import unquote

import pytest

ROOT = Path(__file__).resolve().parents[1]

DOC_FILES = ["README.md", "CHANGELOG.md", "experiments/README.md", "notebooks/README.md"]
PY_DIRS = ["opdplus_jax", "tests", "notebooks", "benchmarks", "experiments"]
# Built from parts so that this file does not match its own check.
FORBIDDEN = re.compile("shared" + r"/(MATH|DESIGN)\.md")


def _doc_paths() -> list[Path]:
    paths = [ROOT / p for p in DOC_FILES if (ROOT / p).is_file()]
    return paths + sorted((ROOT / "docs").glob("*.md"))


# ------------------------------------------------------------------------- markdown parsing

_FENCE = re.compile(r"^ {0,3}(`{3,}|~{3,})")
_INLINE_CODE = re.compile(r"(`+)(?:(?!\1).)+?\1")
_INLINE_LINK = re.compile(
    r"!?\[(?:[^\[\]]|\[[^\[\]]*\])*\]\(\s*(<[^>]*>|[^)\s]+)(?:\s+[\"'(][^)]*)?\s*\)"
)
_REF_DEF = re.compile(r"^ {0,3}\[[^\]]+\]:\s*(<[^>]*>|\S+)")
_HTML_LINK = re.compile(r"""<(?:a|img|source)\b[^>]*?\b(?:href|src)\s*=\s*["']([^"']*)["']""", re.I)
_HEADING = re.compile(r"^ {0,3}(#{1,6})\s+(.*?)\s*#*\s*$")
_HTML_ANCHOR = re.compile(r"""<a\b[^>]*?\b(?:id|name)\s*=\s*["']([^"']+)["']""", re.I)


def _prose_lines(text: str, blank_code: bool = True) -> list[tuple[int, str]]:
    """(line number, line) outside fenced code blocks, inline code spans blanked if asked."""
    out, fence = [], None
    for number, line in enumerate(text.splitlines(), 1):
        m = _FENCE.match(line)
        if fence is None and m:
            fence = m.group(1)[0] * len(m.group(1))
            continue
        if fence is not None:
            if line.strip().startswith(fence) and set(line.strip()) <= {fence[0]}:
                fence = None
            continue
        if blank_code:
            line = _INLINE_CODE.sub(lambda s: " " * len(s.group(0)), line)
        out.append((number, line))
    return out


def links(text: str) -> list[tuple[int, str]]:
    """(line number, target) of every link in a markdown text, outside code."""
    found = []
    for number, line in _prose_lines(text):
        for pattern in (_INLINE_LINK, _HTML_LINK):
            found += [(number, m.group(1)) for m in pattern.finditer(line)]
        m = _REF_DEF.match(line)
        if m:
            found.append((number, m.group(1)))
    return [(n, t[1:-1] if t.startswith("<") and t.endswith(">") else t) for n, t in found]


def github_slug(heading: str) -> str:
    """The anchor GitHub gives a heading: the rendered text, lower-cased, punctuation and symbols
    removed except `-` and `_`, each space a hyphen."""
    text = re.sub(r"!?\[([^\]]*)\]\([^)]*\)", r"\1", heading)  # links: their text
    text = re.sub(r"<[^>]+>", "", text)  # inline HTML
    text = text.replace("`", "").replace("*", "")
    text = re.sub(r"(?<!\w)_+|_+(?!\w)", "", text)  # _emphasis_ markers, not snake_case
    kept = []
    for ch in text.lower():
        if ch in "-_ " or unicodedata.category(ch)[0] in "LNM":
            kept.append(ch)
    return "".join(kept).replace(" ", "-")


def anchors(text: str) -> set[str]:
    """Every anchor of a markdown text: heading slugs (with GitHub's -1, -2 suffixes for repeats)
    and explicit `<a id=...>` / `<a name=...>` anchors."""
    found, seen = set(), {}
    for _, line in _prose_lines(text, blank_code=False):
        m = _HEADING.match(line)
        if m:
            slug = github_slug(m.group(2))
            n = seen.get(slug, 0)
            seen[slug] = n + 1
            found.add(slug if n == 0 else f"{slug}-{n}")
        found.update(a.lower() for a in _HTML_ANCHOR.findall(line))
    return found


def _is_external(target: str) -> bool:
    return bool(re.match(r"^[a-zA-Z][a-zA-Z0-9+.-]*:", target)) or target.startswith("//")


def check_file(path: Path, root: Path = ROOT) -> list[str]:
    """Problems with the links of one markdown file under `root` (empty if all resolve)."""
    text = path.read_text(encoding="utf-8")
    rel = path.relative_to(root)
    problems = []
    for number, target in links(text):
        where = f"{rel}:{number}: {target!r}"
        if not target or _is_external(target):
            continue
        file_part, _, fragment = target.partition("#")
        file_part = unquote(file_part.split("?")[0])
        if file_part.startswith("/"):
            problems.append(f"{where} is absolute; use a path relative to {rel.parent}/")
            continue
        dest = (path.parent / file_part).resolve() if file_part else path.resolve()
        try:
            dest.relative_to(root)
        except ValueError:
            problems.append(f"{where} points outside the repository")
            continue
        if not dest.exists():
            problems.append(f"{where} points to a missing file {dest.relative_to(root)}")
            continue
        if (
            fragment
            and dest.suffix.lower() == ".md"
            and unquote(fragment).lower() not in anchors(dest.read_text(encoding="utf-8"))
        ):
            problems.append(f"{where}: no heading or anchor #{fragment} in {dest.name}")
    return problems


# ------------------------------------------------------------------------------------- tests


def test_the_docs_exist():
    for name in ("README.md", "conventions.md", "math.md", "design.md"):
        assert (ROOT / "docs" / name).is_file(), f"docs/{name} is missing"


@pytest.mark.parametrize("path", _doc_paths(), ids=lambda p: str(p.relative_to(ROOT)))
def test_relative_links_resolve_inside_the_repository(path):
    problems = check_file(path)
    assert not problems, "broken links:\n" + "\n".join(problems)


def test_python_files_cite_docs_not_the_notes_outside_the_repository():
    offenders = []
    for folder in PY_DIRS:
        for path in sorted((ROOT / folder).rglob("*.py")):
            if ".venv" in path.parts:
                continue
            for number, line in enumerate(path.read_text(encoding="utf-8").splitlines(), 1):
                if FORBIDDEN.search(line):
                    offenders.append(f"{path.relative_to(ROOT)}:{number}: {line.strip()}")
    assert not offenders, (
        "these lines cite notes outside the repository; cite docs/math.md, docs/conventions.md "
        "or docs/design.md instead:\n" + "\n".join(offenders)
    )


# ---------------------------------------------------------------- the checker checks itself


def test_slugs_follow_github_rules():
    assert github_slug("1.2 The exact gradient and the OPD+ advantage") == (
        "12-the-exact-gradient-and-the-opd-advantage"
    )
    assert github_slug("Sequence level, token level and credit assignment") == (
        "sequence-level-token-level-and-credit-assignment"
    )
    assert github_slug("The `Trainer`") == "the-trainer"
    assert github_slug("Full-vocabulary (analytic) estimator (`opdplus_jax.fullvocab`)") == (
        "full-vocabulary-analytic-estimator-opdplus_jaxfullvocab"
    )
    assert github_slug("G-OPD and ExOPD") == "g-opd-and-exopd"


def test_checker_finds_broken_and_escaping_links(tmp_path):
    (tmp_path / "docs").mkdir()
    (tmp_path / "docs" / "a.md").write_text(
        "# Title\n\n## Sub section\n\n### The `Trainer`\n\n## Sub section\n", encoding="utf-8"
    )
    page = tmp_path / "README.md"
    page.write_text(
        "[ok](docs/a.md#sub-section) [self](#top) [web](https://example.com)\n"
        "[code](docs/a.md#the-trainer) [repeat](docs/a.md#sub-section-1)\n"
        "[gone](docs/b.md) [out](../outside.md) [bad anchor](docs/a.md#nope)\n"
        '<a href="docs/a.md">html ok</a> <a href="missing.md">html gone</a>\n'
        "```\n[in code](nowhere.md)\n```\n`[inline code](nowhere.md)`\n"
        "# Top\n",
        encoding="utf-8",
    )
    problems = check_file(page, root=tmp_path)
    text = "\n".join(problems)
    assert len(problems) == 4, text
    assert "docs/b.md" in text and "outside the repository" in text
    assert "#nope" in text and "missing.md" in text
