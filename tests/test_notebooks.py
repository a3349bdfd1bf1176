"""Every notebook under notebooks/ runs top to bottom, in small mode, and prints sane numbers.

Notebooks are jupytext percent-format scripts (`notebooks/*.py`), so a notebook run is a run of
the script in a fresh interpreter (its own float64 setting and devices, nothing written to the
repository: small mode saves no figures). The markdown tables a notebook prints are then checked:
every "OPD+ rel. bias" cell is at round-off, stop-grad is unbiased only for reverse KL, and the
full-vocabulary estimator never has more variance than the sampled-token one.
"""

import os
import pathlib
import subprocess
import sys

import pytest

ROOT = pathlib.Path(__file__).resolve().parents[1]
NOTEBOOKS = sorted((ROOT / "notebooks").glob("*.py"))

pytest.importorskip("matplotlib")


def _tables(text: str) -> list[tuple[list[str], list[list[str]]]]:
    """Markdown tables in `text` as (header, rows) with stripped cells."""
    cells = lambda line: [c.strip() for c in line.strip().strip("|").split("|")]
    lines = text.splitlines()
    tables = []
    i = 0
    while i + 1 < len(lines):
        if lines[i].startswith("|") and lines[i + 1].startswith("|---"):
            header, rows = cells(lines[i]), []
            i += 2
            while i < len(lines) and lines[i].startswith("|"):
                if i + 1 < len(lines) and lines[i + 1].startswith("|---"):
                    break  # the header of the next table
                rows.append(cells(lines[i]))
                i += 1
            tables.append((header, rows))
        else:
            i += 1
    return tables


def _column(header, rows, name):
    """Float values of the column called `name` (empty cells skipped), keyed by the first cell."""
    k = header.index(name)
    return [(row[0], float(row[k])) for row in rows if row[k]]


def test_notebooks_found():
    assert any(p.name == "estimator_analysis.py" for p in NOTEBOOKS)


@pytest.mark.parametrize("path", NOTEBOOKS, ids=lambda p: p.stem)
def test_notebook_is_a_jupytext_notebook(path):
    jupytext = pytest.importorskip("jupytext")
    nbformat = pytest.importorskip("nbformat")
    notebook = jupytext.read(path)
    nbformat.validate(notebook)
    kinds = [cell.cell_type for cell in notebook.cells]
    assert kinds.count("markdown") >= 2 and kinds.count("code") >= 2, kinds


@pytest.mark.parametrize("path", NOTEBOOKS, ids=lambda p: p.stem)
def test_notebook_runs_in_small_mode(path, tmp_path):
    before = sorted(p.relative_to(ROOT) for p in (ROOT / "notebooks").rglob("*"))
    env = {
        **os.environ,
        "OPDPLUS_NOTEBOOK_SMALL": "1",
        "MPLBACKEND": "Agg",
        "JAX_PLATFORMS": "cpu",
        "PYTHONPATH": os.pathsep.join(filter(None, [str(ROOT), os.environ.get("PYTHONPATH")])),
    }
    proc = subprocess.run(
        [sys.executable, str(path)],
        cwd=tmp_path,
        env=env,
        capture_output=True,
        text=True,
        timeout=900,
        check=False,
    )
    assert proc.returncode == 0, f"{proc.stdout[-4000:]}\n{proc.stderr[-8000:]}"
    assert sorted(p.relative_to(ROOT) for p in (ROOT / "notebooks").rglob("*")) == before
    assert not any(tmp_path.iterdir()), "small mode must not write files"

    tables = _tables(proc.stdout)
    assert tables, proc.stdout
    opd_plus = [
        (header[k], row)
        for header, rows in tables
        for k, name in enumerate(header)
        if "OPD+ rel. bias" in name or "G-OPD" in name
        for row in _column(header, rows, name)
    ]
    if path.stem == "estimator_analysis":
        assert len(opd_plus) >= 10, proc.stdout
    for column, (first, value) in opd_plus:
        assert value < 1e-9, (column, first, value)

    for header, rows in tables:
        if "stop-grad rel. bias" in header and header[0] == "divergence":
            for name, value in _column(header, rows, "stop-grad rel. bias"):
                if name == "reverse_kl":
                    assert value < 1e-9, (name, value)
                else:
                    assert value > 1e-3, (name, value)
        if "max Δ variance" in header:  # Rao-Blackwellisation: Var C <= Var B per coordinate
            assert all(value <= 1e-12 for _, value in _column(header, rows, "max Δ variance"))
