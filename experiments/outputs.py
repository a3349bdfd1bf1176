"""Outputs of the experiments: CSV, mean ± std aggregation, markdown tables, plots.

Plain helpers over lists of dict rows; `experiments.common` runs the experiments, this module
only reads and writes what they measured (the results notebook reads the same CSVs).
"""

from __future__ import annotations

import contextlib
import csv
import json
import math
import os
from collections.abc import Callable, Sequence
from typing import Any

import numpy as np


def _log(msg: str) -> None:
    print(msg, flush=True)


def read_csv(path: str) -> list[dict[str, Any]]:
    """Rows of a CSV written by `write_csv`, numbers parsed back to float."""
    if not os.path.isfile(path):
        return []
    with open(path, newline="", encoding="utf-8") as f:
        rows = list(csv.DictReader(f))
    for row in rows:
        for k, v in row.items():
            with contextlib.suppress(TypeError, ValueError):
                row[k] = float(v)
    return rows


def write_csv(path: str, rows: Sequence[dict[str, Any]]) -> str:
    """Rows (dicts) to CSV; the header is the union of keys in first-seen order."""
    header = list(dict.fromkeys(k for row in rows for k in row))
    os.makedirs(os.path.dirname(path) or ".", exist_ok=True)
    with open(path, "w", newline="", encoding="utf-8") as f:
        writer = csv.DictWriter(f, fieldnames=header)
        writer.writeheader()
        writer.writerows(rows)
    return path


# ----------------------------------------------------------------------------------- aggregate


def aggregate(rows: Sequence[dict], by: Sequence[str], keys: Sequence[str]) -> list[dict]:
    """Mean, sample std (ddof = 1; 0 for one seed) and n of `keys` per group of `by` columns,
    in first-seen group order. Missing or NaN values are skipped."""
    groups: dict[tuple, list[dict]] = {}
    for row in rows:
        groups.setdefault(tuple(row.get(b) for b in by), []).append(row)
    out = []
    for group, members in groups.items():
        agg = dict(zip(by, group, strict=True))
        agg["n"] = len(members)
        for k in keys:
            vals = np.array([float(m[k]) for m in members if k in m and m[k] not in ("", None)])
            vals = vals[np.isfinite(vals)]
            agg[f"{k}_mean"] = float(vals.mean()) if len(vals) else math.nan
            agg[f"{k}_std"] = float(vals.std(ddof=1)) if len(vals) > 1 else 0.0
        out.append(agg)
    return out


def mean_references(rows: Sequence[dict], keys: Sequence[str] = ("accuracy", "kl_per_token")):
    """Per reference label over builds: {"label", key: mean, key_std: sample std, "n"}."""
    out = []
    for label in dict.fromkeys(r["label"] for r in rows):
        vals = {k: np.array([r[k] for r in rows if r["label"] == label], float) for k in keys}
        n = len(vals[keys[0]])
        row = {"label": label, "n": n}
        for k, v in vals.items():
            row[k] = float(v.mean())
            row[f"{k}_std"] = float(v.std(ddof=1)) if n > 1 else None
        out.append(row)
    return out


def paired_differences(
    runs: Sequence[dict], against: str, keys: Sequence[str], *, level: float = 0.95
) -> list[dict]:
    """Per variant label (other than `against`): the differences of `keys` with the `against`
    run of the same seed (same data order and rollout seed), their mean, a two-sided `level`
    Student-t confidence interval (n - 1 degrees of freedom) and n. Seeds missing from either
    side are skipped."""
    from scipy import stats

    by = {(r["label"], int(float(r["seed"]))): r for r in runs}
    labels = [lab for lab in dict.fromkeys(r["label"] for r in runs) if lab != against]
    out = []
    for label in labels:
        seeds = sorted(s for (lab, s) in by if lab == label and (against, s) in by)
        row = {"label": label, "against": against, "n": len(seeds)}
        for k in keys:
            d = np.array([float(by[label, s][k]) - float(by[against, s][k]) for s in seeds])
            mean = float(d.mean()) if len(d) else math.nan
            half = math.nan
            if len(d) > 1:
                t = float(stats.t.ppf(0.5 + level / 2, len(d) - 1))
                half = t * float(d.std(ddof=1)) / math.sqrt(len(d))
            row |= {f"{k}_diff": mean, f"{k}_ci_low": mean - half, f"{k}_ci_high": mean + half}
        out.append(row)
    return out


def paired_by_pair(
    runs: Sequence[dict], pairs: Sequence[tuple[str, str]], keys: Sequence[str]
) -> list[dict]:
    """`paired_differences` of each (label, against) pair in `pairs`, in order; a pair with no
    runs on either side is skipped."""
    out = []
    for label, against in pairs:
        two = [r for r in runs if r["label"] in (label, against)]
        if {r["label"] for r in two} == {label, against}:
            out += paired_differences(two, against, keys)
    return out


def reference_runs(
    refs: Sequence[dict],
    model: str,
    seeds: Sequence[int],
    build_of: Callable[[int], int],
    label: str | None = None,
) -> list[dict]:
    """The reference model `model` (references.csv rows, one per build) as one run row per seed:
    that seed's build's row, labelled `label` (default `model`), to pair runs against it."""
    by_build = {int(float(r["build"])): r for r in refs if r["label"] == model}
    return [{**by_build[build_of(s)], "label": label or model, "seed": s} for s in seeds]


def write_paired(
    out: str, runs: Sequence[dict], against: str, metrics_: Sequence[tuple[str, str, int]]
) -> str:
    """`paired_differences` of every variant against `against`, written to
    `out/paired_difference.csv`; returns their `paired_table`."""
    paired = paired_differences(runs, against, [k for k, _, _ in metrics_])
    write_csv(os.path.join(out, "paired_difference.csv"), paired)
    return paired_table(paired, metrics_)


def paired_table(paired: Sequence[dict], metrics_: Sequence[tuple[str, str, int]]) -> str:
    """Markdown: one row per variant, each metric as "mean [low, high]" (`paired_differences`)."""
    header = ["variant", "against", *(title for _, title, _ in metrics_), "seeds"]
    rows = []
    for p in paired:
        cells = [p["label"], p["against"]]
        for k, _, d in metrics_:
            cells.append(
                f"{p[f'{k}_diff']:+.{d}f} [{p[f'{k}_ci_low']:+.{d}f}, {p[f'{k}_ci_high']:+.{d}f}]"
            )
        rows.append([*cells, int(p["n"])])
    return markdown_table(header, rows)


def fmt(mean: float, std: float | None = None, digits: int = 3) -> str:
    if mean is None or (isinstance(mean, float) and math.isnan(mean)):
        return "–"
    return f"{mean:.{digits}f}" if std is None else f"{mean:.{digits}f} ± {std:.{digits}f}"


def markdown_table(header: Sequence[str], rows: Sequence[Sequence[Any]]) -> str:
    lines = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    lines += ["| " + " | ".join(str(c) for c in row) + " |" for row in rows]
    return "\n".join(lines)


def summary_table(
    summary: Sequence[dict],
    columns: Sequence[str],
    metrics_: Sequence[tuple[str, str, int]],
    references: Sequence[dict] = (),
) -> str:
    """Markdown: one row per reference model then per variant; `metrics_` are (key, title,
    digits) rendered as mean ± std."""
    header = [*columns, *(title for _, title, _ in metrics_), "seeds"]
    rows = []
    for ref in references:  # one model, or the mean ± std over builds
        cells = [ref.get("label", "")] + [""] * (len(columns) - 1)
        cells += [fmt(ref.get(k, math.nan), ref.get(f"{k}_std"), d) for k, _, d in metrics_]
        rows.append([*cells, "–"])
    for s in summary:
        cells = [s.get(c, "") for c in columns]
        cells += [fmt(s[f"{k}_mean"], s[f"{k}_std"], d) for k, _, d in metrics_]
        rows.append([*cells, int(s["n"])])
    return markdown_table(header, rows)


def write_results(args, tables: dict[str, str], meta: dict[str, Any]) -> str:
    """`results.md` (titled tables) and `meta.json` (settings, timings) into `args.out`."""
    os.makedirs(args.out, exist_ok=True)
    parts = [f"# {args.name}\n", f"{meta.get('description', '')}\n"]
    for title, table in tables.items():
        parts += [f"## {title}\n", table, ""]
    path = os.path.join(args.out, "results.md")
    with open(path, "w", encoding="utf-8") as f:
        f.write("\n".join(parts))
    with open(os.path.join(args.out, "meta.json"), "w", encoding="utf-8") as f:
        json.dump(meta, f, indent=2, sort_keys=True, default=str)
    _log("\n".join(f"## {t}\n{tab}\n" for t, tab in tables.items()))
    return path


# ----------------------------------------------------------------------------------------- plots


def _pyplot():
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


def _save(plt, fig, path: str) -> str:
    """Lay out `fig`, write it to `path` and close it; returns `path`."""
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)
    return path


def _reference_lines(ax, key: str, refs: dict[str, dict] | None) -> None:
    """Horizontal gray lines at `refs` {name: {key: y}} values of `key` (where present)."""
    for i, (name, vals) in enumerate((refs or {}).items()):
        if key in vals:
            ax.axhline(vals[key], ls=("--", ":")[i % 2], color="gray", label=name)


def plot_curves(path: str, curves: Sequence[dict], key: str = "accuracy", refs=None,
                title: str = "") -> str:  # fmt: skip
    """Mean ± std (band) over seeds of `key` vs step, one line per label; `refs`: {name: y}."""
    plt = _pyplot()
    fig, ax = plt.subplots(figsize=(7, 4.5))
    labels = list(dict.fromkeys(c["label"] for c in curves))
    for label in labels:
        agg = aggregate([c for c in curves if c["label"] == label], ["step"], [key])
        steps = np.array([a["step"] for a in agg], float)
        mean = np.array([a[f"{key}_mean"] for a in agg])
        std = np.array([a[f"{key}_std"] for a in agg])
        (line,) = ax.plot(steps, mean, "o-", ms=3, label=label)
        ax.fill_between(steps, mean - std, mean + std, color=line.get_color(), alpha=0.15)
    for i, (name, y) in enumerate((refs or {}).items()):
        ax.axhline(y, ls=("--", ":", "-.")[i % 3], color="gray", label=name)
    ax.set(xlabel="OPD step", ylabel=f"held-out {key} (greedy)", title=title)
    ax.legend(fontsize=7, ncol=2)
    return _save(plt, fig, path)


def plot_bars(path: str, summary: Sequence[dict], label_of: Callable[[dict], str],
              keys: Sequence[tuple[str, str]], refs=None, title: str = "") -> str:  # fmt: skip
    """One panel per (key, ylabel): bars of the mean with std error bars; `refs` {name: {key: y}}
    are drawn as horizontal lines."""
    plt = _pyplot()
    fig, axes = plt.subplots(1, len(keys), figsize=(5 * len(keys), 4.5), squeeze=False)
    names = [label_of(s) for s in summary]
    for ax, (key, ylabel) in zip(axes[0], keys, strict=True):
        x = np.arange(len(summary))
        ax.bar(x, [s[f"{key}_mean"] for s in summary], yerr=[s[f"{key}_std"] for s in summary],
               capsize=3, color="tab:blue", alpha=0.8)  # fmt: skip
        _reference_lines(ax, key, refs)
        ax.set_xticks(x, names, rotation=45, ha="right", fontsize=8)
        ax.set_ylabel(ylabel)
        if refs:
            ax.legend(fontsize=7)
    fig.suptitle(title)
    return _save(plt, fig, path)


def plot_vs_x(path: str, summary: Sequence[dict], x: str, keys: Sequence[tuple[str, str]],
              refs=None, title: str = "") -> str:  # fmt: skip
    """One panel per (key, ylabel): mean ± std of `key` against the numeric column `x`."""
    plt = _pyplot()
    fig, axes = plt.subplots(1, len(keys), figsize=(5 * len(keys), 4), squeeze=False)
    xs = np.array([float(s[x]) for s in summary])
    for ax, (key, ylabel) in zip(axes[0], keys, strict=True):
        ax.errorbar(xs, [s[f"{key}_mean"] for s in summary], [s[f"{key}_std"] for s in summary],
                    fmt="o-", capsize=3, label="student")  # fmt: skip
        _reference_lines(ax, key, refs)
        ax.set(xlabel=x, ylabel=ylabel)
        ax.legend(fontsize=7)
    fig.suptitle(title)
    return _save(plt, fig, path)
