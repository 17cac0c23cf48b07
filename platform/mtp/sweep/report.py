"""Mean ± std over seeds: the table and figure an experiment's MLflow parent run holds.

Trials that differ only in their seed (or any dimension that is neither the x axis
nor the line label) are pooled, so each point of the figure is the mean of its
trials with the standard deviation as error bar, one line per model size.
"""

from __future__ import annotations

import csv
import math
import statistics
from pathlib import Path
from typing import Any

from mtp.sweep.summary import TrialRow, _line_order, pooled


def mean_std(values: list[float]) -> tuple[float, float]:
    return statistics.fmean(values), statistics.stdev(values) if len(values) > 1 else 0.0


def write_summary(rows: list[TrialRow], metrics: list[str], x: str, lines: str, directory: Path,
                  title: str, floors: dict[str, dict[str, float]] | None = None) -> list[Path]:
    """``task_summary.csv`` / ``task_summary.md`` (mean ± std, n) and one error-bar figure per metric
    (``floors``: per metric, each floor drawn as a horizontal line)."""
    directory.mkdir(parents=True, exist_ok=True)
    records = []
    for metric in metrics:
        for line, by_x in pooled(rows, metric, x, lines).items():
            for xv, values in by_x.items():
                mean, std = mean_std(values)
                records.append({"metric": metric, lines: line, x: xv, "mean": mean, "std": std, "n": len(values)})
    csv_path = directory / "task_summary.csv"
    with csv_path.open("w", newline="") as fh:
        writer = csv.DictWriter(fh, fieldnames=["metric", lines, x, "mean", "std", "n"])
        writer.writeheader()
        writer.writerows(records)
    md_path = directory / "task_summary.md"
    md_path.write_text(format_markdown(records, x, lines))
    figures = [plot_with_error_bars(rows, m, x, lines, directory / f"{m.replace('/', '_')}_vs_{x}.png", title,
                                    (floors or {}).get(m, {}))
               for m in metrics]
    return [csv_path, md_path, *figures]


def format_markdown(records: list[dict[str, Any]], x: str, lines: str) -> str:
    """One table per metric: a row per line label, a column per x value, cells ``mean ± std (n)``."""
    out = []
    for metric in dict.fromkeys(r["metric"] for r in records):
        mine = [r for r in records if r["metric"] == metric]
        xs = sorted({r[x] for r in mine}, key=_line_order)
        out += [f"**{metric}**", "", f"| {lines} | " + " | ".join(f"{x.split('.')[-1]}={v}" for v in xs) + " |",
                "|---|" + "---|" * len(xs)]
        for line in sorted({r[lines] for r in mine}, key=_line_order):
            cells = {r[x]: r for r in mine if r[lines] == line}
            out.append(f"| {line} | " + " | ".join(
                f"{cells[v]['mean']:.3f} ± {cells[v]['std']:.3f} ({cells[v]['n']})" if v in cells else "-"
                for v in xs) + " |")
        out.append("")
    return "\n".join(out)


def plot_with_error_bars(rows: list[TrialRow], metric: str, x: str, lines: str, path: Path, title: str,
                        floors: dict[str, float] | None = None) -> Path:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(6, 4), dpi=120)
    points = pooled(rows, metric, x, lines)
    for line, by_x in points.items():
        stats = [mean_std(v) for v in by_x.values()]
        n = min(len(v) for v in by_x.values())
        ax.errorbar(list(by_x), [m for m, _ in stats], yerr=[s for _, s in stats], marker="o", capsize=4,
                    label=f"{lines.split('.')[-1]}={line} (n>={n} seeds)")
    for i, (name, value) in enumerate(sorted((floors or {}).items(), key=lambda kv: -kv[1])):
        ax.axhline(value, color="grey", linestyle=("--", ":", "-.")[i % 3], linewidth=1, label=f"floor: {name}")
    ax.set_xlabel(x)
    ax.set_ylabel(f"{metric} (mean ± std)")
    ax.set_title(title)
    xs = sorted({v for by_x in points.values() for v in by_x if isinstance(v, (int, float)) and math.isfinite(v)})
    if xs:
        ax.set_xticks(xs)
    if points:
        ax.legend()
    ax.grid(alpha=0.3)
    fig.tight_layout()
    fig.savefig(path)
    plt.close(fig)
    return path
