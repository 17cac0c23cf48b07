"""Stage 1: is the GPU path correct? The test suite's numerics tests on the device, then bf16 reports.

* Pass or fail: ``pytest -m device --device cuda`` on ``tests/test_loss.py`` and
  ``tests/test_decoding.py`` (a subprocess, its verdicts read from JUnit XML): the
  sequential (and chunked) backward against the naive one in fp32/fp64 and under bf16
  autocast, speculative against vanilla greedy token for token in fp32, static shapes
  and CUDA graphs against eager. The tolerances are the tests' own; nothing is restated here.
* Reported, not judged: in bf16 a forward over W tokens rounds differently from a forward
  over one, so where head 0's two best logits are nearly tied the argmax can flip; the
  engine takes the verifying forward's argmax as it is (it keeps no tie margin), so
  speculative bf16 output may part from vanilla bf16 output there, and CUDA graphs (other
  GEMM algorithms under capture) from eager. The rows count the prompts that part, where,
  and how close the tie was.
"""

from __future__ import annotations

import os
import subprocess
import sys
import tempfile
import xml.etree.ElementTree as ElementTree
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from mtp.bench.gpu_check.report import FAIL, MEASURED, PASS, Row, skipped
from mtp.config import ModelConfig
from mtp.decoding import Engine, EngineConfig, Generation, SamplingParams
from mtp.model import MTPTransformer
from mtp.tokenizer import ByteTokenizer

STAGE = "1 correctness"
REPO = Path(__file__).resolve().parents[4]
NUMERICS_TESTS = ("tests/test_loss.py", "tests/test_decoding.py")


@dataclass(frozen=True)
class CorrectnessSizes:
    tests: tuple[str, ...]  # pytest node ids, run with -m device
    decode_model: dict[str, Any]
    prompts: int
    max_new_tokens: int
    decode_batch: int


GPU = CorrectnessSizes(
    tests=NUMERICS_TESTS,
    decode_model=dict(vocab_size=260, dim=512, n_layers=8, n_heads=8, n_future=4, param_matched=True, max_seq_len=512),
    prompts=32, max_new_tokens=96, decode_batch=8,
)
TINY = CorrectnessSizes(  # one test of each file: the plumbing (the CPU suite runs them all anyway)
    tests=("tests/test_loss.py::test_sequential_backward_under_bf16_autocast_adds_no_error[None]",
           "tests/test_decoding.py::test_static_shapes_give_the_same_tokens[None]"),
    decode_model=dict(vocab_size=260, dim=64, n_layers=5, n_heads=4, n_future=4, param_matched=True, max_seq_len=128),
    prompts=8, max_new_tokens=40, decode_batch=4,
)


# ------------------------------------------------------------------ the test suite


def suite_rows(sizes: CorrectnessSizes, device: torch.device, timeout_s: float) -> list[Row]:
    """One row per test file: ``pytest -m device --device <device>`` over ``sizes.tests``."""
    env = {**os.environ, "PYTHONPATH": os.pathsep.join(filter(None, [str(REPO / "platform"),
                                                                      os.environ.get("PYTHONPATH")]))}
    with tempfile.TemporaryDirectory() as tmp:
        report = Path(tmp) / "junit.xml"
        command = [sys.executable, "-m", "pytest", "-m", "device", "--device", str(device), "-q", "-p",
                   "no:cacheprovider", f"--junitxml={report}", *sizes.tests]
        done = subprocess.run(command, cwd=REPO, env=env, capture_output=True, text=True, timeout=timeout_s)
        if not report.is_file():  # pytest missing, or it failed before collecting
            return [Row(STAGE, "pytest -m device", FAIL, (done.stdout + done.stderr).strip()[-500:] or "no report",
                        "every test passes", {"returncode": done.returncode})]
        cases = ElementTree.parse(report).getroot().iter("testcase")
        results: dict[str, dict[str, list[str]]] = {}
        for case in cases:
            verdict = "failed" if case.find("failure") is not None or case.find("error") is not None else \
                "skipped" if case.find("skipped") is not None else "passed"
            module = case.get("classname", "").rsplit(".", 1)[-1]
            results.setdefault(module, {"passed": [], "failed": [], "skipped": []})[verdict].append(case.get("name"))
    rows = []
    for module, verdicts in sorted(results.items()):
        counts = {k: len(v) for k, v in verdicts.items()}
        summary = ", ".join(f"{n} {k}" for k, n in counts.items() if n)
        if verdicts["failed"]:
            summary += f": {', '.join(verdicts['failed'][:5])}"
        rows.append(Row(STAGE, f"pytest --device {device.type}: {module}", FAIL if verdicts["failed"] or not
                        verdicts["passed"] else PASS, summary, "every test passes (the tests' tolerances)", counts))
    return rows


# --------------------------------------------------------------------------- decoding


def random_prompts(count: int, max_len: int, seed: int = 2) -> list[list[int]]:
    """Printable-ASCII prompts of varied lengths (1/8 to 1/2 of ``max_len``)."""
    g = torch.Generator().manual_seed(seed)
    lengths = torch.randint(max(1, max_len // 8), max(2, max_len // 2), (count,), generator=g).tolist()
    return [torch.randint(32, 127, (n,), generator=g).tolist() for n in lengths]


def greedy(engine: Engine, prompts: list[list[int]], max_new_tokens: int, speculative: bool) -> list[Generation]:
    return engine.generate_ids(prompts, SamplingParams(max_new_tokens=max_new_tokens, speculative=speculative))


def first_divergence(a: list[int], b: list[int]) -> int | None:
    """Index of the first differing token (or of the shorter end), None when equal."""
    if a == b:
        return None
    return next((i for i, (x, y) in enumerate(zip(a, b)) if x != y), min(len(a), len(b)))


@torch.inference_mode()
def top2_gap(model: MTPTransformer, prefix: list[int]) -> float:
    """Head 0's best minus second-best logit after ``prefix`` (a full causal forward)."""
    device = next(model.parameters()).device
    logits = model(torch.tensor([prefix], device=device))[0, -1].float()
    top = logits.topk(2).values
    return float(top[0] - top[1])


def decode_model(sizes: CorrectnessSizes, device: torch.device) -> MTPTransformer:
    """A random model whose heads are copies of head 0.

    Independent random heads almost never agree with head 0, so every draft would be
    rejected and only the rejection path would run. Copies draft head 0's own next token
    at every depth, which is accepted wherever greedy output repeats (random models fall
    into loops) and rejected elsewhere: both paths run.
    """
    torch.manual_seed(3)
    model = MTPTransformer(ModelConfig(**sizes.decode_model))
    for head in model.heads[1:]:
        head.load_state_dict(model.heads[0].state_dict())
    return model.to(device).eval()


def bf16_rows(sizes: CorrectnessSizes, device: torch.device) -> list[Row]:
    """In bf16: speculative vs vanilla greedy, and (on CUDA) CUDA graphs vs eager with static shapes."""
    model = decode_model(sizes, device).to(torch.bfloat16)
    prompts = random_prompts(sizes.prompts, model.cfg.max_seq_len - sizes.max_new_tokens)

    def run(**flags: bool) -> list[list[int]]:  # every prompt vanilla, then every prompt speculative
        engine = Engine(model, ByteTokenizer(), EngineConfig.matching(model, max_batch_size=sizes.decode_batch, **flags))
        return [g.tokens for s in (False, True) for g in greedy(engine, prompts, sizes.max_new_tokens, s)]

    eager, n = run(), len(prompts)
    rows = [parted_row("speculative vs vanilla greedy, bf16", eager[n:], eager[:n], prompts, model)]
    if device.type != "cuda":
        return rows + [skipped(STAGE, "CUDA graphs vs eager, bf16", "needs CUDA")]
    # cuBLAS may pick other GEMM algorithms while a graph is captured: the same near-tie flips
    return rows + [parted_row("CUDA graphs vs eager, bf16", run(cuda_graphs=True), run(static_shapes=True),
                              prompts * 2, model)]


def parted_row(name: str, outputs: list[list[int]], reference: list[list[int]], prompts: list[list[int]],
               model: MTPTransformer) -> Row:
    """How many generations part from the reference's, where, and head 0's top-2 logit gap there."""
    parted = [(i, k) for i, (a, b) in enumerate(zip(outputs, reference)) if (k := first_divergence(a, b)) is not None]
    gaps = [top2_gap(model, prompts[i] + reference[i][:k]) for i, k in parted]
    summary = f"{len(parted)}/{len(outputs)} generations part"
    if parted:
        summary += (f", at tokens {sorted(k for _, k in parted)}; head-0 top-2 logit gap there: "
                    f"max {max(gaps):.3f}, median {sorted(gaps)[len(gaps) // 2]:.3f}")
    return Row(STAGE, name, MEASURED, summary, "reported: near-tied argmaxes may flip (the engine keeps no tie margin)",
               {"parted": len(parted), "generations": len(outputs), "first_divergence": dict(parted), "top2_gap": gaps})
