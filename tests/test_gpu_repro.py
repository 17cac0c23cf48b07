"""``make gpu-repro``: its CPU dry run, where Ray, MLflow and ``datasets`` cannot be imported (as on the GPU machine)."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

from test_gpu_check import BLOCKER

REPO = Path(__file__).resolve().parents[1]


def test_tiny_dry_run_trains_both_arms_concurrently_and_reports_floors_and_verdicts(tmp_path):
    site = tmp_path / "site"
    site.mkdir()
    (site / "sitecustomize.py").write_text(BLOCKER)
    out = tmp_path / "gpu_repro.json"
    env = {**os.environ, "PYTHONPATH": f"{site}{os.pathsep}{REPO / 'platform'}"}
    proc = subprocess.run([sys.executable, str(REPO / "jobs" / "gpu_repro.py"), "--device", "cpu", "--tiny",
                           "--json", str(out)], env=env, capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    result = json.loads(out.read_text())
    trials = result["trials"]
    arms = ["n=1", "n=2", "n=1 compute-matched to n=2", "n=2 all heads t+1"]
    assert sorted((t["arm"], t["seed"]) for t in trials) == sorted((a, s) for a in arms for s in (0, 1))
    assert all(t["steps"] == t["planned_steps"] and t["tokens"] == t["steps"] * 8 * 128 for t in trials)
    planned = {t["arm"]: t["planned_steps"] for t in trials}
    assert planned["n=1"] == planned["n=2"] == planned["n=2 all heads t+1"] == 40
    assert 40 < planned["n=1 compute-matched to n=2"] < 60  # n=2's extra unembedding, paid in steps
    # scored along the way (formation, best checkpoint) and at the end, on both sets and jointly
    assert all([h["step"] for h in t["history"]][:2] == [20, 40] for t in trials)
    assert all(set(t["final"]) == {"copy", "counterfactual", "joint"} for t in trials)
    assert set(result["floors"]) == {"copy", "counterfactual"}
    assert 0.3 < result["floors"]["copy"]["guess_seen"]["exact_match"] < 0.6
    verdicts = [r["verdict"] for r in result["summary"] if r["arm"] != "n=1"]
    assert len(verdicts) == 9 and all(v.startswith(("inconclusive", "better", "worse", "no difference")) for v in verdicts)
    assert "| copy | n=2 all heads t+1 |" in proc.stdout and "floors on the same test stories" in proc.stdout
