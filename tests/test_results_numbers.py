"""Every number in the results sections of README.md and experiments/README.md is one that the
results notebook prints from the committed CSVs under experiments/results/.

A results section lies between the markers `NUMBERS_BEGIN` and `NUMBERS_END`. Each decimal
number in it (integers are counts and settings, not results) must equal, at its own precision, a
number of the notebook's output that has at least as many decimals: "0.38" matches a printed
0.380 or 0.3801, not 0.390. Signs are ignored (prose writes "KL falls by 0.08" for a printed
-0.0756), and a hyphen between two numbers is a range ("0.60-0.67"), not a sign.
"""

import os
import re
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
NUMBERS_BEGIN = "<!-- numbers: notebooks/results.py -->"
NUMBERS_END = "<!-- /numbers -->"
DOCUMENTS = ("README.md", "experiments/README.md")
DECIMAL = re.compile(r"(?<![\d.§])\d+\.\d+")  # not a section number such as §1.4

pytest.importorskip("matplotlib")


def decimals(text: str) -> list[str]:
    """The decimal numbers in `text`, as written (no sign)."""
    return DECIMAL.findall(text)


def is_printed(number: str, printed: list[str]) -> bool:
    """Whether `number` is, at its precision, one of the `printed` numbers with as many or more
    decimals."""
    places = len(number.split(".")[1])
    value = float(number)
    half = 0.5 * 10.0**-places + 1e-12
    return any(
        len(p.split(".")[1]) >= places and abs(abs(float(p)) - value) <= half for p in printed
    )


def results_sections(path: Path) -> list[str]:
    text = path.read_text(encoding="utf-8")
    parts = text.split(NUMBERS_BEGIN)[1:]
    assert parts, f"{path.name}: no {NUMBERS_BEGIN!r} marker"
    sections = []
    for part in parts:
        assert NUMBERS_END in part, f"{path.name}: a results section lacks {NUMBERS_END!r}"
        sections.append(part.split(NUMBERS_END, 1)[0])
    return sections


@pytest.fixture(scope="module")
def notebook_numbers() -> list[str]:
    env = {**os.environ, "OPDPLUS_NOTEBOOK_SMALL": "1", "MPLBACKEND": "Agg",
           "JAX_PLATFORMS": "cpu"}  # fmt: skip
    env.pop("OPDPLUS_RESULTS_DIR", None)  # the committed results
    cmd = [sys.executable, str(ROOT / "notebooks" / "results.py")]
    proc = subprocess.run(cmd, cwd=ROOT, env=env, capture_output=True, text=True, timeout=300,
                          check=False)  # fmt: skip
    assert proc.returncode == 0, proc.stderr[-4000:]
    return decimals(proc.stdout)


def test_matching_rule():
    printed = ["0.3801", "+0.220", "-0.0756", "0.57"]
    assert is_printed("0.38", printed) and is_printed("0.380", printed)
    assert is_printed("0.076", printed) and is_printed("0.22", printed)
    assert not is_printed("0.39", printed)
    assert not is_printed("0.574", printed)  # more decimals than were printed
    assert decimals("KL 5.3-7.7, −0.076 [−0.100, +0.05]; 30 steps, §1.4") == [
        "5.3", "7.7", "0.076", "0.100", "0.05"
    ]  # fmt: skip


@pytest.mark.parametrize("document", DOCUMENTS)
def test_every_result_number_is_printed_by_the_notebook(document, notebook_numbers):
    missing = []
    for section in results_sections(ROOT / document):
        for line in section.splitlines():
            missing += [(n, line.strip()[:90]) for n in decimals(line)
                        if not is_printed(n, notebook_numbers)]  # fmt: skip
    assert not missing, (
        f"{document}: numbers that notebooks/results.py does not print from the committed CSVs "
        "(regenerate the text from the notebook's output):\n"
        + "\n".join(f"  {n}: {line}" for n, line in missing)
    )
