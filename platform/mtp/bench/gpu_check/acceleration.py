"""Stage 4: real acceleration on a real model, trained here for a few minutes.

A byte-level n_future=4 model of about 85M parameters trains on the built-in corpus
(the interpreter's standard library) with the users' loop (``mtp.train.Trainer``),
for as many steps as fit the time given: a throwaway Trainer measures the step time
first, so the real run gets a complete warmup + cosine schedule.

Then self-speculative decoding on the HumanEval prompts, greedy and sampled
(T=0.8), at batch 1 and 8, against vanilla decoding with the same engine (CUDA graphs
on a GPU, for greedy steps): tokens per forward, on all outputs and on the
non-repetitive ones (a weak model that loops accepts every draft, which is not
acceleration), end-to-end speedup, and whether greedy outputs are token-identical
(fp32: they must be). Vanilla and speculative alternate chunk by chunk, so load hits
both alike; a comparison that would overrun its time share stops after a chunk and
says how many prompts it covered.
"""

from __future__ import annotations

import statistics
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from mtp.bench.decoding import humaneval_prompts
from mtp.bench.gpu_check.report import FAIL, MEASURED, PASS, Budget, Row, error_row, skipped
from mtp.bench.schedules import release
from mtp.config import build_config
from mtp.data import prepare_data
from mtp.decoding import Engine, EngineConfig
from mtp.decoding.metrics import compare
from mtp.model import count_parameters
from mtp.tokenizer import Tokenizer
from mtp.train import LocalCheckpoints, Trainer

STAGE = "4 acceleration"
PAPER = "paper: 7B n=4 on code 3.5 tok/fwd, x3.05; byte-level n=8 x6.4"


@dataclass(frozen=True)
class AccelerationSizes:
    overrides: dict[str, Any]  # the training job, as dotted config keys
    train_s: float  # training time wanted (shrinks to what the budget leaves)
    calibration_steps: int  # timed on a throwaway Trainer (the first compiles)
    prompts: int  # HumanEval prompts (164: all)
    batches: tuple[int, ...]
    temperatures: tuple[float, ...]
    max_new_tokens: int
    decode_s: float  # time kept for decoding after training
    finish_s: float  # time kept for the run's final evaluation (compiles a forward-only graph) and checkpoint
    estimate_s: float  # the least a training run is worth starting for


GPU = AccelerationSizes(
    overrides={
        "train.preset": "small", "model.dim": 768, "model.n_layers": 12, "model.n_heads": 12, "model.n_future": 4,
        "model.param_matched": True, "model.max_seq_len": 1024, "train.seq_len": 1024, "train.batch_size": 32,
        "train.lr": 1.5e-3, "train.warmup_steps": 100, "train.compile": True, "train.dtype": "bf16",
        "train.log_every": 100, "data.num_proc": 1,
    },
    train_s=180, calibration_steps=12, prompts=164, batches=(1, 8), temperatures=(0.0, 0.8), max_new_tokens=128,
    decode_s=70, finish_s=25, estimate_s=60,
)
TINY = AccelerationSizes(
    overrides={
        "train.preset": "tiny", "model.dim": 64, "model.n_layers": 5, "model.n_heads": 4, "model.n_future": 4,
        "model.param_matched": True, "model.max_seq_len": 96, "train.seq_len": 64, "train.batch_size": 4,
        "train.warmup_steps": 5, "train.log_every": 10, "data.max_documents": 20,
        "data.num_proc": 1,
    },
    train_s=3, calibration_steps=2, prompts=4, batches=(1, 2), temperatures=(0.0, 0.8), max_new_tokens=16,
    decode_s=15, finish_s=0.5, estimate_s=2,
)


# --------------------------------------------------------------------------- training


def job_config(sizes: AccelerationSizes, device: torch.device, out: Path, max_steps: int):
    return build_config(overrides={
        **sizes.overrides, "train.device": device.type, "train.max_steps": max_steps, "train.eval_every": max_steps,
        "train.checkpoint_every": max_steps, "train.output_dir": str(out), "tracking.run_name": "gpu-check",
        "data.cache_dir": str(out / "data"),
    })


def seconds_per_step(sizes: AccelerationSizes, device: torch.device, data, out: Path) -> float:
    """Median step time of a throwaway Trainer (after the first, compiling, step)."""
    cfg = job_config(sizes, device, out / "calibration", 10**6)
    trainer = Trainer(cfg, data, LocalCheckpoints(out / "calibration"), [])
    times = []
    try:
        for _ in range(sizes.calibration_steps):
            start = time.perf_counter()
            trainer.train_step()
            if trainer.device.type == "cuda":
                torch.cuda.synchronize(trainer.device)
            times.append(time.perf_counter() - start)
    finally:
        trainer.batches.close()
    return statistics.median(times[1:] or times)


def train_model(sizes: AccelerationSizes, device: torch.device, train_s: float, out: Path
                ) -> tuple[torch.nn.Module, Tokenizer, Row]:
    start = time.perf_counter()
    cfg = job_config(sizes, device, out, 1)
    data = prepare_data(cfg.data, cfg.train.seq_len)
    prepared_s = time.perf_counter() - start
    step_s = seconds_per_step(sizes, device, data, out)
    steps = max(2, int((train_s - sizes.finish_s - (time.perf_counter() - start)) / step_s))
    cfg = job_config(sizes, device, out, steps)
    trainer = Trainer(cfg, data, LocalCheckpoints(out / "run"), [])
    trained = time.perf_counter()
    try:
        result = trainer.run()
    finally:
        trainer.batches.close()
    m = result.metrics
    seconds = time.perf_counter() - trained
    params = count_parameters(cfg.model)["total"]
    metrics = {
        "params": params, "steps": steps, "train_s": seconds, "prepare_data_s": prepared_s,
        "tokens": steps * cfg.train.batch_size * cfg.train.seq_len, "corpus_tokens": int(data.train.size), **m,
    }
    mfu = f", MFU {m['perf/mfu']:.2f}" if "perf/mfu" in m else ", MFU n/a (no datasheet peak)"
    row = Row(
        STAGE, f"train byte-level n={cfg.model.n_future}", MEASURED,
        f"{params / 1e6:.3g}M params, {steps} steps in {seconds:.0f} s ({metrics['tokens'] / 1e6:.3g}M tokens, "
        f"corpus {data.train.size / 1e6:.3g}M), {m['perf/tokens_per_s']:,.0f} tok/s{mfu}; "
        f"val loss {m.get('val/loss_mean', float('nan')):.3f} (mean of heads), {m.get('val/bpb', float('nan')):.3f} bpb (head 0)",
        f"users' loop, {cfg.train.dtype}, compile={cfg.train.compile}", metrics,
    )
    return trainer.model, data.tokenizer, row


# --------------------------------------------------------------------------- decoding


def _row(m: dict[str, Any], graphs: bool) -> Row:
    """One comparison; greedy rows pass only when every output is token-identical (fp32)."""
    greedy = m["temperature"] == 0
    nonrep = m["tokens_per_forward_nonrepetitive"]
    summary = (f"{m['tokens_per_forward']:.2f} tok/fwd (non-repetitive {nonrep:.2f} on {m['nonrepetitive_prompts']}/"
               f"{m['prompts']})" if nonrep is not None else f"{m['tokens_per_forward']:.2f} tok/fwd (no non-repetitive output)")
    summary += (f", speedup x{m['speedup']:.2f} ({m['vanilla_tokens_per_s']:,.0f} -> {m['speculative_tokens_per_s']:,.0f} tok/s"
                f"{', CUDA graphs' if graphs and greedy else ''})")
    status = MEASURED
    if greedy:
        summary += f", identical {m['identical']}/{m['prompts']}"
        status = PASS if m["identical"] == m["prompts"] else FAIL
    name = f"{'greedy' if greedy else 'T=' + format(m['temperature'], 'g')} b{m['batch_size']} (fp32)"
    return Row(STAGE, name, status, summary, PAPER, m)


def run(sizes: AccelerationSizes, device: torch.device, budget: Budget) -> list[Row]:
    train_s = min(sizes.train_s, budget.spendable() - sizes.decode_s)
    if train_s < sizes.estimate_s:
        return [skipped(STAGE, "train + decode", "budget")]
    torch._dynamo.reset()  # the training stage's compiled sizes are done with
    with tempfile.TemporaryDirectory() as tmp:
        try:
            model, tokenizer, train_row = train_model(sizes, device, train_s, Path(tmp))
        except Exception as exc:  # noqa: BLE001
            return [error_row(STAGE, "train", exc)]
    rows = [train_row]
    model = model.float().eval()  # fp32 decoding: greedy speculative output must equal vanilla exactly
    graphs = device.type == "cuda"
    engine = Engine(model, tokenizer, EngineConfig.matching(model, max_batch_size=max(sizes.batches), cuda_graphs=graphs))
    room = model.cfg.max_seq_len - sizes.max_new_tokens
    prompts = humaneval_prompts(tokenizer, sizes.prompts, room)
    todo = [(b, t) for t in sizes.temperatures for b in sizes.batches]
    for i, (batch, temperature) in enumerate(todo):
        name = f"T={temperature:g} b{batch}"
        cap = budget.spendable() / (len(todo) - i) - 5  # an even share of what is left, less a warm-up
        if cap <= 0:
            rows.append(skipped(STAGE, name, "budget"))
            continue
        try:
            rows.append(_row(compare(engine, prompts, batch, sizes.max_new_tokens, temperature, cap), graphs))
        except Exception as exc:  # noqa: BLE001
            rows.append(error_row(STAGE, name, exc))
    del engine, model
    release(device)
    return rows
