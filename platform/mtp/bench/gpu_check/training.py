"""Stage 2: training throughput of the users' loop (``mtp.train.Trainer``), n=1 vs n=4.

Each variant is a ``JobConfig`` as a user would write it (bf16 autocast, compiled
blocks, seq 2048), trained by ``Trainer.train_step`` on random token blocks (data
loading is not what is measured). The n=4 models are parameter-matched (n-1 trunk
blocks fewer), so the FLOP ratio (``mtp.model.training_flops_per_token``) is the
floor of the time ratio: every head pays the shared unembedding.

MFU is against a bf16 matmul peak measured here first (a square product), not a
datasheet number. Two times per variant: forward+backward (the scope of the FLOP
count; the time ratio uses it) and the whole optimizer step (clipping and AdamW
included; tokens/s and MFU use it, since that is what a user gets).
"""

from __future__ import annotations

import statistics
import tempfile
from dataclasses import dataclass
from pathlib import Path
from typing import Iterable

import numpy as np
import torch

from mtp.bench.gpu_check.report import MEASURED, Budget, Row, error_row, skipped
from mtp.bench.profiling import DeviceTimer, PeakMemory
from mtp.bench.schedules import Variant, release, variants
from mtp.config import TrainConfig, build_config
from mtp.data import PackedData, token_byte_lengths
from mtp.model import count_parameters, training_flops_per_token
from mtp.tokenizer import ByteTokenizer
from mtp.train import LocalCheckpoints, Trainer

STAGE = "2 training"
GiB = 2**30

# Targets and anchors (issue 13). Anchors: a plain compiled PyTorch reference on this H200.
TIME_OVER_FLOOR_TARGET = 1.03  # n=4 / n=1 step time at most this times the FLOP ratio
SEQUENTIAL_MEMORY_TARGET = 1.0  # sequential peak memory at most this times n=1's
MFU_TARGET_1_3B = 0.65  # n=4 MFU at 1.3B at least
ANCHOR_TIME_RATIO = {"0.3B": "1.36 (floor 1.30; paper 1.22)", "1.3B": "1.21 (floor 1.16; paper 1.12)"}
ANCHOR_MFU_1_3B = {1: 0.65, 4: 0.61}
ANCHOR_MEMORY = {"naive": 1.35, "sequential": 1.03}


VARIANTS = variants(n_future=4)  # n1, naive, sequential, sequential-chunked (bench_training's)


@dataclass(frozen=True)
class ThroughputSizes:
    presets: tuple[str, ...]
    vocab_size: int
    seq_len: int
    batch_size: int
    chunk_size: int | None  # None: the users' default, TrainConfig.loss_chunk_size
    warmup_steps: int  # the first one compiles
    timed_steps: int
    compile: bool
    matmul_size: int
    estimate_s: dict[str, float]  # per variant (the first of a preset also compiles)


GPU = ThroughputSizes(
    presets=("0.3B", "1.3B"), vocab_size=32000, seq_len=2048, batch_size=8, chunk_size=None,
    warmup_steps=2, timed_steps=3, compile=True, matmul_size=8192, estimate_s={"0.3B": 6, "1.3B": 10, "compile": 45},
)
TINY = ThroughputSizes(
    presets=("tiny",), vocab_size=512, seq_len=64, batch_size=2, chunk_size=32,
    warmup_steps=1, timed_steps=1, compile=False, matmul_size=256, estimate_s={"tiny": 1, "compile": 0},
)


def matmul_peak(device: torch.device, n: int, warmup: int = 3, repeats: int = 10) -> float:
    """Median FLOP/s of an ``n x n x n`` bf16 matmul on random data (zeros run faster)."""
    a, b = (torch.randn(n, n, device=device, dtype=torch.bfloat16) for _ in range(2))
    for _ in range(warmup):
        a @ b
    seconds = []
    for _ in range(repeats):
        with DeviceTimer(device) as t:
            a @ b
        seconds.append(t.seconds)
    return 2 * n**3 / statistics.median(seconds)


def random_blocks(vocab_size: int, seq_len: int, n_blocks: int, directory: Path) -> PackedData:
    """Random token blocks in the shape ``prepare_data`` returns (no validation split)."""
    tok = ByteTokenizer()
    train = np.random.default_rng(0).integers(0, vocab_size, (n_blocks, seq_len + 1), dtype=np.int32)
    return PackedData(train, train[:0], tok, token_byte_lengths(tok), 0, directory)


def variant_config(sizes: ThroughputSizes, preset: str, v: Variant, device: torch.device, out: Path):
    chunk = (sizes.chunk_size or TrainConfig.loss_chunk_size) if v.chunked else None
    return build_config(overrides={
        "train.preset": preset, "model.vocab_size": sizes.vocab_size, "model.n_future": v.n_future,
        "model.param_matched": v.n_future > 1, "model.max_seq_len": sizes.seq_len, "train.seq_len": sizes.seq_len,
        "train.batch_size": sizes.batch_size, "train.schedule": v.schedule, "train.loss_chunk_size": chunk,
        "train.dtype": "bf16", "train.compile": sizes.compile, "train.device": device.type,
        "train.output_dir": str(out), "train.max_steps": 10**6, "train.warmup_steps": 0,
    })


def _resident(trainer: Trainer) -> Iterable[torch.Tensor]:
    yield from trainer.model.parameters()
    yield from trainer.model.buffers()
    for state in trainer.optimizer.state.values():
        yield from (v for v in state.values() if isinstance(v, torch.Tensor))


def measure_variant(sizes: ThroughputSizes, preset: str, v: Variant, device: torch.device, peak_flops: float) -> dict:
    with tempfile.TemporaryDirectory() as tmp:
        cfg = variant_config(sizes, preset, v, device, Path(tmp))
        data = random_blocks(sizes.vocab_size, sizes.seq_len, 4 * sizes.batch_size, Path(tmp))
        with device:  # parameters are created on the device: initialising 1.3B on the host takes seconds
            trainer = Trainer(cfg, data, LocalCheckpoints(tmp), callbacks=[])
        try:
            for _ in range(sizes.warmup_steps):
                trainer.train_step()
            with PeakMemory(device, _resident(trainer)) as memory:
                trainer.train_step()
            step_s, fwd_bwd_s = [], []
            for _ in range(sizes.timed_steps):
                with DeviceTimer(device) as t:
                    trainer.train_step()
                step_s.append(t.seconds)
            for _ in range(sizes.timed_steps):
                with DeviceTimer(device) as t:
                    trainer.accumulate_gradients()
                trainer.optimizer.zero_grad(set_to_none=True)
                fwd_bwd_s.append(t.seconds)
        finally:
            trainer.batches.close()
        del trainer
    release(device)
    tokens = sizes.batch_size * sizes.seq_len
    step, fwd_bwd = statistics.median(step_s), statistics.median(fwd_bwd_s)
    flops = training_flops_per_token(cfg.model, sizes.seq_len)
    return {
        "preset": preset, "variant": v.name, "n_future": v.n_future, "params": count_parameters(cfg.model)["total"],
        "step_s": step, "fwd_bwd_s": fwd_bwd, "tokens_per_s": tokens / step, "flops_per_token": flops,
        "mfu": tokens * flops / step / peak_flops, "mfu_fwd_bwd": tokens * flops / fwd_bwd / peak_flops,
        "peak_memory_bytes": memory.reading.peak_bytes, "chunk_size": cfg.train.loss_chunk_size,
        "compiled": cfg.train.compile,
    }


def _row(m: dict, base: dict | None) -> Row:
    summary = (f"{m['tokens_per_s']:,.0f} tok/s, MFU {m['mfu']:.2f} (fwd+bwd {m['mfu_fwd_bwd']:.2f}), "
               f"peak {m['peak_memory_bytes'] / GiB:.2f} GiB")
    targets = []
    if m["n_future"] > 1 and base is not None:
        m["time_ratio"] = m["fwd_bwd_s"] / base["fwd_bwd_s"]
        m["flop_ratio"] = m["flops_per_token"] / base["flops_per_token"]
        m["memory_ratio"] = m["peak_memory_bytes"] / base["peak_memory_bytes"]
        summary += f", time x{m['time_ratio']:.3f} vs FLOPs x{m['flop_ratio']:.3f}, mem x{m['memory_ratio']:.3f}"
        over = m["time_ratio"] / m["flop_ratio"]
        targets.append(f"time/floor {over:.3f} <= {TIME_OVER_FLOOR_TARGET} {_met(over <= TIME_OVER_FLOOR_TARGET)}")
        if m["variant"].startswith("sequential"):
            ok = m["memory_ratio"] <= SEQUENTIAL_MEMORY_TARGET
            targets.append(f"mem <= {SEQUENTIAL_MEMORY_TARGET}x n1 {_met(ok)}")
        if m["preset"] in ANCHOR_TIME_RATIO:
            anchor_mem = ANCHOR_MEMORY.get(m["variant"].split("-")[0], "-")
            targets.append(f"anchor time x{ANCHOR_TIME_RATIO[m['preset']]}, mem x{anchor_mem}")
    if m["preset"] == "1.3B":
        if m["n_future"] > 1:
            targets.append(f"MFU >= {MFU_TARGET_1_3B} {_met(m['mfu'] >= MFU_TARGET_1_3B)}")
        targets.append(f"anchor MFU {ANCHOR_MFU_1_3B[min(m['n_future'], 4)]}")
    return Row(STAGE, f"{m['preset']} {m['variant']}", MEASURED, summary, "; ".join(targets), m)


def _met(ok: bool) -> str:
    return "met" if ok else "MISSED"


def run(sizes: ThroughputSizes, device: torch.device, budget: Budget) -> list[Row]:
    if not budget.allows(5):
        return [skipped(STAGE, "bf16 matmul peak", "budget")]
    peak = matmul_peak(device, sizes.matmul_size)
    rows = [Row(STAGE, "bf16 matmul peak", MEASURED, f"{peak / 1e12:.1f} TFLOP/s ({sizes.matmul_size}^3, random data)",
                "H200 seen here: 769-798 TFLOP/s", {"flops": peak})]
    for preset in sizes.presets:
        torch._dynamo.reset()  # each size compiles afresh instead of growing one cache
        base, compiled = None, False
        for v in VARIANTS:
            name = f"{preset} {v.name}"
            if not budget.allows(sizes.estimate_s[preset] + (0 if compiled else sizes.estimate_s["compile"])):
                rows.append(skipped(STAGE, name, "budget"))
                continue
            try:
                m = measure_variant(sizes, preset, v, device, peak)
            except Exception as exc:  # noqa: BLE001 - one variant failing (OOM, compile) must not hide the others
                rows.append(error_row(STAGE, name, exc))
                release(device)
                continue
            compiled = True
            base = m if v.name == "n1" else base
            rows.append(_row(m, base))
    return rows
