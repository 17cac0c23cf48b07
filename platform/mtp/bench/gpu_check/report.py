"""Rows of the GPU check, the time budget they run under, and the printed table.

Every measurement, failure and skipped item is one ``Row``: the table and the JSON
are both made from the same list, so what is printed is what is recorded.
"""

from __future__ import annotations

import time
import traceback
from dataclasses import dataclass, field
from typing import Any, Callable

PASS, FAIL, MEASURED, SKIPPED, ERROR = "pass", "FAIL", "measured", "skipped", "ERROR"


@dataclass
class Row:
    """One check or measurement: ``status`` is pass/FAIL (correctness), measured, skipped or ERROR."""

    stage: str
    name: str
    status: str
    summary: str = ""  # the numbers, as printed
    target: str = ""  # target or anchor beside it, with whether it was met
    metrics: dict[str, Any] = field(default_factory=dict)

    @property
    def failed(self) -> bool:
        return self.status in (FAIL, ERROR)


class Budget:
    """Wall-clock budget of the whole run, shared out over stages.

    Each stage has a planned share, scaled so the shares add up to ``total_s`` (a
    smaller ``--budget-s`` shrinks every stage rather than starving the first); while
    a stage runs it may spend everything left except what the later stages planned,
    so time a stage does not use flows on.
    An item starts only if its estimate fits (``allows``); a running item is never
    cut short, so estimates should be generous.
    """

    def __init__(self, total_s: float, plan: dict[str, float], clock: Callable[[], float] = time.monotonic):
        scale = total_s / sum(plan.values()) if plan else 1.0
        self.total_s, self.plan, self.clock = total_s, {s: t * scale for s, t in plan.items()}, clock
        self.start = clock()
        self.stage: str | None = None

    def elapsed(self) -> float:
        return self.clock() - self.start

    def remaining(self) -> float:
        return self.total_s - self.elapsed()

    def enter(self, stage: str) -> None:
        self.stage = stage

    def spendable(self) -> float:
        """Seconds the current stage may still use."""
        names = list(self.plan)
        later = names[names.index(self.stage) + 1 :] if self.stage in self.plan else []
        return self.remaining() - sum(self.plan[s] for s in later)

    def allows(self, estimate_s: float) -> bool:
        return estimate_s <= self.spendable()


def skipped(stage: str, name: str, reason: str) -> Row:
    return Row(stage, name, SKIPPED, f"skipped: {reason}")


def error_row(stage: str, name: str, exc: BaseException) -> Row:
    """An item that raised: the message in the table, the traceback in the JSON."""
    message = f"{type(exc).__name__}: {exc}".splitlines()[0][:300]
    return Row(stage, name, ERROR, message, metrics={"traceback": traceback.format_exc()})


def format_table(rows: list[Row]) -> str:
    """One line per row: stage, check, status, numbers, target/anchor."""
    cols = ["stage", "check", "status", "result", "target / anchor"]
    cells = [[r.stage, r.name, r.status, r.summary, r.target] for r in rows]
    widths = [min(max(len(c), *(len(row[i]) for row in cells)) if cells else len(c), 80) for i, c in enumerate(cols)]
    line = lambda values: " | ".join(v.ljust(w) for v, w in zip(values, widths)).rstrip()  # noqa: E731
    return "\n".join([line(cols), "-+-".join("-" * w for w in widths), *map(line, cells)])
