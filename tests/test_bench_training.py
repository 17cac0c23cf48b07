"""Smoke test of ``jobs/bench_training.py``: its measurement code end to end on a tiny model.

Behaviour only (what each schedule keeps alive, what the JSON holds), no timing claims:
memory counts are deterministic, step times are not.
"""

from __future__ import annotations

import importlib.util
import json
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
KEYS = {"variant", "n_future", "tokens_per_s", "peak_memory_bytes", "time_ratio", "memory_ratio", "flop_ratio"}
TINY = ["--preset", "tiny", "--vocab", "512", "--batch-size", "2", "--seq-len", "64", "--chunk-size", "16", "--rounds", "1"]


@pytest.fixture(scope="module")
def bench():
    spec = importlib.util.spec_from_file_location("bench_training", REPO / "jobs" / "bench_training.py")
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module  # its dataclasses resolve annotations through it
    spec.loader.exec_module(module)
    return module


def test_bench_reports_every_variant_and_sequential_saves_memory(bench, tmp_path, capsys):
    out = tmp_path / "bench.json"
    bench.main([*TINY, "--json", str(out)])
    rows = json.loads(out.read_text())

    by_name = {r["variant"]: r for r in rows}
    assert list(by_name) == ["n1", "naive", "sequential", "sequential-chunked"]
    for row in rows:
        assert KEYS <= row.keys(), row
        assert row["tokens_per_s"] > 0 and row["peak_memory_bytes"] > 0
    n1 = by_name["n1"]
    assert (n1["n_future"], n1["time_ratio"], n1["memory_ratio"], n1["flop_ratio"]) == (1, 1.0, 1.0, 1.0)
    assert len({r["params"] for r in rows}) == 1, "n=4 variants must be parameter-matched to n=1"
    assert all(r["flop_ratio"] > 1 for r in rows[1:]) and len({r["flop_ratio"] for r in rows[1:]}) == 1

    # What the schedules are for: never more than one head's logits, and then not even one.
    naive, seq, chunked = by_name["naive"], by_name["sequential"], by_name["sequential-chunked"]
    assert chunked["peak_memory_bytes"] < seq["peak_memory_bytes"] < naive["peak_memory_bytes"]
    assert seq["memory_ratio"] <= bench.MEMORY_TARGET
    assert naive["memory_ratio"] > 1

    printed = capsys.readouterr().out
    assert "sequential-chunked" in printed and "target sequential:" in printed


@pytest.mark.parametrize(
    "argv, message",
    [(["--rounds", "0"], "--rounds must be positive"), (["--preset", "debug"], "model.param_matched")],
)
def test_bench_rejects_bad_arguments(bench, argv, message, capsys):
    with pytest.raises(SystemExit) as exc:
        bench.main(argv)
    assert message in str(exc.value) + capsys.readouterr().err
