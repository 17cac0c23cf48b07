"""Evaluation inputs that do not fit the model's context are refused, or counted when allowed."""

from __future__ import annotations

import pytest
import torch

from mtp.checkpoint import save_checkpoint
from mtp.config import build_config
from mtp.evaluation.benchmarks import Benchmark, Problem
from mtp.evaluation.generation import ContextError, GenerationConfig, context_fit, generate_samples
from mtp.evaluation.tracking import ScoredRun
from mtp.model import MTPTransformer
from mtp.tokenizer import ByteTokenizer


@pytest.fixture(scope="module")
def checkpoint(tmp_path_factory) -> str:
    cfg = build_config(overrides={"train.preset": "debug"})  # a 128-token (byte) context
    torch.manual_seed(0)
    return str(save_checkpoint(tmp_path_factory.mktemp("ctx") / "ckpt", MTPTransformer(cfg.model), cfg, ByteTokenizer()))


def _benchmark() -> Benchmark:
    def problem(task_id: str, prompt: str) -> Problem:
        return Problem(task_id, prompt, prompt, "pass")

    return Benchmark("ctx", [problem("short", "def f(x):\n"), problem("long", "# " + "x" * 200 + "\ndef g():\n")])


def test_prompts_beyond_the_context_are_refused_unless_allowed(checkpoint, capsys):
    benchmark = _benchmark()
    fit = context_fit(checkpoint, benchmark, max_new_tokens=32)
    assert fit.context == 128 and fit.truncated == ["long"] and fit.clipped == ["long"]
    assert context_fit(checkpoint, benchmark, max_new_tokens=200).clipped == ["short", "long"]

    config = GenerationConfig(max_new_tokens=32, backend="local")
    with pytest.raises(ContextError, match=r"1 of 2 prompts \+ max_new_tokens=32 exceed the model's context of 128"):
        generate_samples(checkpoint, benchmark, config)

    samples = generate_samples(checkpoint, benchmark, GenerationConfig(max_new_tokens=32, backend="local",
                                                                       allow_truncation=True))
    assert "warning: ctx: 1 of 2 prompts" in capsys.readouterr().err
    flags = {s["task_id"]: (s["prompt_truncated"], s["clipped"]) for s in samples}
    assert flags == {"short": (False, False), "long": (True, True)}
    # run metrics (one cut prompt, one clipped sample); the per-sample flags go to the run as an artifact
    assert ScoredRun(None, 0.0, samples).context_metrics() == {"truncated_prompts": 1, "clipped_generations": 1}
