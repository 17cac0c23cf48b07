"""End-of-sweep outputs: one row per trial, the best trial, and the Figure-3-shaped plot.

Kept free of Ray and MLflow: rows are plain dicts, so the same code summarises a live
``ResultGrid`` and a sweep rebuilt from MLflow.
"""

from __future__ import annotations

import csv
import json
import math
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from mtp.config import MODEL_PRESETS


@dataclass
class TrialRow:
    """The outcome of one trial, as the summary table shows it."""

    trial_id: str
    status: str  # "ok", "stopped" (early, by the scheduler) or "error"
    params: dict[str, Any]  # dotted config fields that vary (plus the plot axes)
    metrics: dict[str, float]  # last reported value of each metric
    run_id: str | None = None  # the trial's MLflow child run
    error: str | None = None

    def value(self, metric: str) -> float | None:
        value = self.metrics.get(metric)
        return float(value) if isinstance(value, (int, float)) and math.isfinite(value) else None

    def flat(self, metric: str) -> dict[str, Any]:
        return {
            "trial_id": self.trial_id, "status": self.status, "mlflow_run_id": self.run_id,
            **self.params, metric: self.value(metric),
            **{f"metrics.{k}": v for k, v in sorted(self.metrics.items()) if k != metric},
            "error": self.error,
        }


def best_row(rows: list[TrialRow], metric: str, mode: str) -> TrialRow | None:
    """The finished trial with the best last value of ``metric`` (None if no trial reported it)."""
    scored = [r for r in rows if r.status == "ok" and r.value(metric) is not None]
    if not scored:
        return None
    pick = min if mode == "min" else max
    return pick(scored, key=lambda r: r.value(metric))


def write_table(rows: list[TrialRow], metric: str, directory: Path) -> tuple[Path, Path]:
    """``summary.csv`` and ``summary.json`` (same rows) in ``directory``."""
    directory.mkdir(parents=True, exist_ok=True)
    flat = [r.flat(metric) for r in rows]
    columns: list[str] = []
    for row in flat:
        columns += [c for c in row if c not in columns]
    csv_path, json_path = directory / "summary.csv", directory / "summary.json"
    with csv_path.open("w", newline="") as fh:
        writer = csv.DictWriter(fh, fieldnames=columns)
        writer.writeheader()
        writer.writerows(flat)
    json_path.write_text(json.dumps(flat, indent=2, default=str))
    return csv_path, json_path


def format_table(rows: list[TrialRow], metric: str, params: list[str]) -> str:
    """A fixed-width text table for the terminal: trial, status, varied params, metric, error."""
    header = ["trial", "status", *params, metric, "error"]
    body = [
        [r.trial_id, r.status, *(_cell(r.params.get(p)) for p in params), _cell(r.value(metric)),
         (r.error or "").splitlines()[-1][:60] if r.error else ""]
        for r in rows
    ]
    widths = [max(len(str(c)) for c in col) for col in zip(header, *body)]
    lines = ["  ".join(str(c).ljust(w) for c, w in zip(line, widths)).rstrip() for line in [header, *body]]
    lines.insert(1, "  ".join("-" * w for w in widths))
    return "\n".join(lines)


def pooled(rows: list[TrialRow], metric: str, x: str, lines: str) -> dict[Any, dict[Any, list[float]]]:
    """``{line label: {x value: [metric of each finished trial]}}``, lines in size order, x sorted.

    Trials that errored or were stopped early are left out.
    """
    points: dict[Any, dict[Any, list[float]]] = {}
    for row in rows:
        value = row.value(metric)
        if row.status == "ok" and value is not None and x in row.params:
            points.setdefault(row.params.get(lines), {}).setdefault(row.params[x], []).append(value)
    return {label: dict(sorted(points[label].items())) for label in sorted(points, key=_line_order)}


def figure_points(rows: list[TrialRow], metric: str, mode: str, x: str, lines: str) -> dict[Any, dict[Any, float]]:
    """``{line label: {x value: metric}}`` for the plot: several finished trials at one point
    (an lr sweep, repeated samples) collapse to the best, so each line shows what the
    best-tuned run at that size and n reached."""
    pick = min if mode == "min" else max
    return {line: {xv: pick(values) for xv, values in by_x.items()} for line, by_x in pooled(rows, metric, x, lines).items()}


def plot_metric(
    rows: list[TrialRow], metric: str, mode: str, x: str, lines: str, path: Path, title: str = ""
) -> Path:
    """``metric`` against ``x``, one line per value of ``lines`` (the paper's Figure 3)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    points = figure_points(rows, metric, mode, x, lines)
    fig, ax = plt.subplots(figsize=(6, 4), dpi=120)
    for label, line in points.items():
        ax.plot(list(line), list(line.values()), marker="o", label=f"{lines.split('.')[-1]}={label}")
    ax.set_xlabel(x)
    ax.set_ylabel(metric)
    ax.set_title(title or f"{metric} vs {x}")
    if all(isinstance(v, (int, float)) for line in points.values() for v in line):
        ax.set_xticks(sorted({v for line in points.values() for v in line}))
    if points:
        ax.legend()
    else:
        ax.text(0.5, 0.5, "no trial reported the metric", ha="center", va="center", transform=ax.transAxes)
    ax.grid(alpha=0.3)
    fig.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path)
    plt.close(fig)
    return path


def _line_order(label: Any) -> tuple[int, float, str]:
    """Presets in size order (debug < ... < 13B), then numbers, then any other label."""
    if label in MODEL_PRESETS:
        return (0, float(list(MODEL_PRESETS).index(label)), "")
    if isinstance(label, (int, float)):
        return (1, float(label), "")
    return (2, 0.0, str(label))


def _cell(value: Any) -> str:
    if value is None:
        return "-"
    if isinstance(value, float):
        return f"{value:.4g}"
    return str(value)
