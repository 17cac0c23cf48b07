"""The comparison table of a sweep: per model setting and arm, mean ± std, the interval to n=1, the verdict.

Trials that differ only in their seed are one arm; trials that differ in anything else
that is not the arm (a model size, a learning rate) are separate comparisons, each with
its own n=1 baseline. Every table states the floors of its metric on the same test set
and which one (plus the margin fixed in the sweep file) the verdict checks the baseline
against.
"""

from __future__ import annotations

import csv
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, Iterable

from mtp.compare.stats import ArmStats, verdict
from mtp.specs import ConfigError, build

SEED_KEYS = ("train.seed", "data.seed")
CONFOUND = "confound"  # optional record key: what else differs from the n=1 arm (shown as a last column)


@dataclass(frozen=True)
class VerdictSpec:
    """A sweep file's ``verdict:`` section, fixed before the run."""

    margin: float = 0.0  # how far the n=1 mean must clear the floor for any comparison to count
    floor: str | None = None  # the floor to clear; None: the strongest one of the metric
    seed: int = 0  # of the bootstrap
    formed_at: float | None = None  # a seed "formed" the skill when the sweep metric first reaches this

    @classmethod
    def parse(cls, raw: Any, where: str = "verdict") -> "VerdictSpec":
        spec = build(cls, {} if raw is None else raw, where)
        if spec.margin < 0:
            raise ConfigError(f"{where}.margin={spec.margin!r} must be a number >= 0")
        return spec


def arm_of(params: dict[str, Any], arm_key: str) -> str:
    """A trial's arm label: the ``arm`` column, or ``n=<n_future>`` in a sweep without controls."""
    if arm_key in params:
        return str(params[arm_key])
    return f"n={params['model.n_future']}"


def comparisons(rows: Iterable[Any], metric: str, floors: dict[str, float], spec: VerdictSpec, mode: str = "max",
                arm_key: str = "arm") -> list[dict[str, Any]]:
    """One record per (setting, arm) of ``metric``: stats, and against the setting's n=1 arm the
    difference, its interval and the verdict. ``rows``: finished trials (``TrialRow``)."""
    groups: dict[tuple, dict[str, list[float]]] = {}
    settings: dict[tuple, dict[str, Any]] = {}
    for row in rows:
        value = row.value(metric)
        if row.status != "ok" or value is None:
            continue
        setting = {k: v for k, v in row.params.items() if k not in SEED_KEYS and k not in (arm_key, "model.n_future")}
        key = tuple(sorted((k, repr(v)) for k, v in setting.items()))
        settings[key] = setting
        groups.setdefault(key, {}).setdefault(arm_of(row.params, arm_key), []).append(value)
    floor = _floor(floors, spec.floor)
    records = []
    for key, arms in groups.items():
        baseline = arms.get("n=1")
        for label, values in sorted(arms.items(), key=lambda kv: (kv[0] != "n=1", kv[0])):
            stats = ArmStats.of(values)
            record = {"metric": metric, **settings[key], "arm": label, "mean": stats.mean, "std": stats.std,
                      "n": stats.n, "diff": None, "low": None, "high": None, "verdict": "baseline" if label == "n=1" else
                      "inconclusive (no n=1 arm)"}
            if label != "n=1" and baseline:
                v = verdict(values, baseline, floor=floor[1] if floor else None, margin=spec.margin, mode=mode,
                            seed=spec.seed)
                if v.interval is not None:
                    record.update(diff=v.interval.diff, low=v.interval.low, high=v.interval.high)
                record["verdict"] = v.text()
            records.append(record)
    return records


def _floor(floors: dict[str, float], name: str | None) -> tuple[str, float] | None:
    if not floors:
        return None
    if name is not None:
        if name not in floors:
            raise ValueError(f"verdict.floor={name!r} is not a floor of this metric; floors: {sorted(floors)}")
        return name, floors[name]
    return max(floors.items(), key=lambda kv: kv[1])


def format_markdown(records: list[dict[str, Any]], floors_by_metric: dict[str, dict[str, float]],
                    spec: VerdictSpec) -> str:
    """One table per metric, the floors and the verdict's rule above it (records with a ``confound``
    add that column)."""
    out = []
    for metric in dict.fromkeys(r["metric"] for r in records):
        mine = [r for r in records if r["metric"] == metric]
        setting_cols = [k for k in mine[0] if k not in ("metric", "arm", "mean", "std", "n", "diff", "low", "high",
                                                       "verdict", CONFOUND)]
        confounds = any(CONFOUND in r for r in mine)
        floors = floors_by_metric.get(metric, {})
        used = _floor(floors, spec.floor)
        shown = ", ".join(f"{k} {v:.3f}" for k, v in sorted(floors.items(), key=lambda kv: -kv[1])) or "none"
        rule = (f"the n=1 mean must clear {used[0]} ({used[1]:.3f}) by {spec.margin:g}" if used
                else "no floor for this metric")
        out += [f"**{metric}** (floors on this test set: {shown}; {rule})", "",
                "| " + " | ".join([*(c.split(".")[-1] for c in setting_cols), "arm", "mean ± std (seeds)",
                                   "difference to n=1 [95% CI]", "verdict", *([CONFOUND] if confounds else [])]) + " |",
                "|" + "---|" * (len(setting_cols) + 4 + confounds)]
        for r in mine:
            diff = f"{r['diff']:+.3f} [{r['low']:+.3f}, {r['high']:+.3f}]" if r["diff"] is not None else "-"
            out.append("| " + " | ".join([*(str(r[c]) for c in setting_cols), r["arm"],
                                          f"{r['mean']:.3f} ± {r['std']:.3f} ({r['n']})", diff, r["verdict"],
                                          *([r.get(CONFOUND) or "-"] if confounds else [])]) + " |")
        out.append("")
    return "\n".join(out)


def write_comparison(rows: list[Any], metrics: list[str], floors_by_metric: dict[str, dict[str, float]],
                     spec: VerdictSpec, mode: str, directory: Path, arm_key: str = "arm",
                     confound: Callable[[dict[str, Any]], str | None] | None = None) -> list[Path]:
    """``comparison.csv`` / ``comparison.md`` for ``metrics``; returns the paths. ``confound(record)``,
    if given, states what else differs between a record's arm and its n=1 arm (its ``confound`` cell)."""
    directory.mkdir(parents=True, exist_ok=True)
    records = [r for m in metrics for r in comparisons(rows, m, floors_by_metric.get(m, {}), spec, mode, arm_key)]
    for record in records if confound is not None else ():
        record[CONFOUND] = confound(record)
    md = directory / "comparison.md"
    md.write_text(format_markdown(records, floors_by_metric, spec) if records else "no finished trial\n")
    path = directory / "comparison.csv"
    columns = list(dict.fromkeys(k for r in records for k in r))
    with path.open("w", newline="") as fh:
        writer = csv.DictWriter(fh, fieldnames=columns or ["metric"])
        writer.writeheader()
        writer.writerows(records)
    return [path, md]


def formation(rows: Iterable[Any], histories: dict[str, list[tuple[int, float]]], metric: str, threshold: float,
              arm_key: str = "arm") -> str:
    """Per setting and arm: the final and the best checkpoint's ``metric`` (mean ± std over seeds), and how
    many seeds reached ``threshold``, at which step. ``histories``: trial id -> [(step, value)]."""
    groups: dict[tuple, list[Any]] = {}
    for row in rows:
        if row.status == "ok" and histories.get(row.trial_id):
            setting = tuple((k, v) for k, v in row.params.items()
                            if k not in SEED_KEYS and k not in (arm_key, "model.n_future"))
            groups.setdefault((setting, arm_of(row.params, arm_key)), []).append(row)
    lines = [f"**{metric}** over training: best checkpoint beside the final one; formed = first checkpoint "
             f"at or above {threshold:g}", "",
             "| setting | arm | final | best checkpoint | seeds formed | steps |", "|---|---|---|---|---|---|"]
    for (setting, arm), mine in sorted(groups.items(), key=lambda kv: (kv[0][0], kv[0][1] != "n=1", kv[0][1])):
        points = [sorted(histories[r.trial_id]) for r in mine]
        final = ArmStats.of([p[-1][1] for p in points])
        best = ArmStats.of([max(v for _, v in p) for p in points])
        steps = [next((s for s, v in p if v >= threshold), None) for p in points]
        formed = [s for s in steps if s is not None]
        shown = " ".join(f"{k.split('.')[-1]}={v}" for k, v in setting) or "-"
        lines.append(f"| {shown} | {arm} | {final.cell()} | {best.cell()} | {len(formed)}/{len(mine)} | "
                     f"{', '.join(map(str, formed)) or '-'} |")
    return "\n".join(lines) + "\n"
