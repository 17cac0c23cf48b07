"""The four stages in order, under one budget; a correctness failure stops the rest.

``GPU`` sizes are the issue's (0.3B/1.3B at seq 2048, a ~3-minute training run, 164
HumanEval prompts) for one H200 in at most 8 minutes; ``TINY`` runs the same code on
toy sizes in seconds (the CPU dry run CI keeps alive).
"""

from __future__ import annotations

import platform
import sys
import time
from dataclasses import asdict, dataclass
from typing import Callable, Sequence

import torch

from mtp.bench.gpu_check import acceleration, correctness, decoding, training
from mtp.bench.gpu_check.report import Budget, Row, error_row, skipped
from mtp.bench.schedules import release


@dataclass(frozen=True)
class Profile:
    correctness: correctness.CorrectnessSizes
    training: training.ThroughputSizes
    decoding: decoding.DecodingSizes
    acceleration: acceleration.AccelerationSizes
    plan_s: dict[str, float]  # each stage's planned share of the budget, in run order
    entry_s: float  # a stage starts only if this much of its share is left
    budget_s: float  # default --budget-s


STAGES = (correctness.STAGE, training.STAGE, decoding.STAGE, acceleration.STAGE)
GPU = Profile(
    correctness.GPU, training.GPU, decoding.GPU, acceleration.GPU,
    plan_s=dict(zip(STAGES, (60, 140, 100, 150))), entry_s=15, budget_s=450,
)
TINY = Profile(
    correctness.TINY, training.TINY, decoding.TINY, acceleration.TINY,
    plan_s=dict(zip(STAGES, (10, 20, 30, 40))), entry_s=2, budget_s=300,
)


def _correctness(p: Profile, device: torch.device, budget: Budget) -> list[Row]:
    rows = []
    for name, check in (("pytest -m device", lambda: correctness.suite_rows(p.correctness, device, budget.spendable())),
                        ("bf16", lambda: correctness.bf16_rows(p.correctness, device))):
        try:
            rows += check()
        except Exception as exc:  # noqa: BLE001 - reported as a failed check
            rows.append(error_row(correctness.STAGE, name, exc))
        release(device)
    return rows


RUNNERS: dict[str, Callable[[Profile, torch.device, Budget], list[Row]]] = {
    correctness.STAGE: _correctness,
    training.STAGE: lambda p, d, b: training.run(p.training, d, b),
    decoding.STAGE: lambda p, d, b: decoding.run(p.decoding, d, b),
    acceleration.STAGE: lambda p, d, b: acceleration.run(p.acceleration, d, b),
}


def environment(device: torch.device) -> dict[str, object]:
    env: dict[str, object] = {
        "date_utc": time.strftime("%Y-%m-%d %H:%M:%S", time.gmtime()),
        "device": torch.cuda.get_device_name(device) if device.type == "cuda" else platform.processor() or "cpu",
        "torch": torch.__version__,
        "cuda": torch.version.cuda,
        "python": sys.version.split()[0],
    }
    try:
        import transformers

        env["transformers"] = transformers.__version__
    except ImportError:
        env["transformers"] = None
    return env


def run_check(device: torch.device, tiny: bool, budget_s: float | None = None, stages: Sequence[int] | None = None,
              on_row: Callable[[Row], None] = lambda row: None) -> dict[str, object]:
    """Run every stage that fits (of ``stages``, numbered from 1; default all); returns the
    JSON document (environment, rows, verdict)."""
    profile = TINY if tiny else GPU
    chosen = [STAGES[i - 1] for i in stages] if stages else list(STAGES)
    budget = Budget(budget_s if budget_s is not None else profile.budget_s,
                    {s: t for s, t in profile.plan_s.items() if s in chosen})
    rows: list[Row] = []
    stage_seconds: dict[str, float] = {}
    stopped = False
    for stage in STAGES:
        budget.enter(stage)
        start = time.monotonic()
        if stage not in chosen:
            new = [skipped(stage, "stage", "not selected (--stages)")]
        elif stopped:
            new = [skipped(stage, "stage", "a correctness check failed")]
        elif not budget.allows(profile.entry_s):
            new = [skipped(stage, "stage", "budget")]
        else:
            try:
                new = RUNNERS[stage](profile, device, budget)
            except Exception as exc:  # noqa: BLE001 - a broken stage must not hide the others
                new = [error_row(stage, "stage", exc)]
            release(device)
        for row in new:
            on_row(row)
        stage_seconds[stage] = round(time.monotonic() - start, 1)
        rows += new
        stopped = stopped or (stage == correctness.STAGE and any(r.failed for r in new))
    return {
        "environment": environment(device),
        "tiny": tiny,
        "budget_s": budget.total_s,
        "elapsed_s": budget.elapsed(),
        "stage_seconds": stage_seconds,
        "passed": not any(r.failed for r in rows),
        "rows": [asdict(r) for r in rows],
    }
