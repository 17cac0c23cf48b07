"""What multi-token training costs against next-token training, per schedule.

In one run, at one model size, four variants train on the same random token batches
(data loading is not what is measured):

* ``n1``: the next-token model (``n_future=1``) trained the plain way (logits, then
  ``F.cross_entropy`` under autograd), the baseline of every ratio;
* ``naive``: ``n_future=4``, every head's logits alive at once (``mtp.loss.naive_loss``);
* ``sequential``: ``n_future=4``, the paper's schedule (``sequential_backward``, one
  head's full logits at a time);
* ``sequential-chunked``: the same, with the cross-entropy computed in chunks of
  positions, so no head's full logits tensor ever exists;
* ``batched``: ``n_future=4``, the heads as one batched computation and the fused
  unembedding + cross-entropy (``mtp.loss.batched_loss``, its default chunks), one backward.

The ``n_future=4`` models are ``param_matched`` (n-1 trunk layers removed), so every
variant has the same parameter count and the same number of blocks; what differs is
the shared unembedding, run once per head. Its FLOPs give the FLOP ratio
(``mtp.model.training_flops_per_token``), the floor of the step-time ratio. The
sequential variants can land under it: their cross-entropy writes its gradient into
the logits in place (``mtp.loss``), cheaper per head than the baseline's autograd one.

Time: forward+backward, the scope of the FLOP count (the AdamW update runs after each
timed step, untimed: with equal parameters it is the same work for every variant).
Steps are timed round-robin over the variants (order rotated each round), and each
ratio is the median over rounds of that round's ratio to ``n1``, so load from other
processes hits all variants alike. On CPU a step is timed in process CPU time with one
intra-op thread: the machine is shared, and wall time would count the time other
processes hold the cores. On CUDA, CUDA events time it.

Peak memory: bytes of live tensor storages at their maximum during one whole step
(forward, backward, update), with parameters, optimizer state and the batch resident.
On CUDA that is ``torch.cuda.max_memory_allocated`` (each variant measured alone on
the device). On CPU, where the allocator keeps no statistics and tracemalloc does not see it,
``mtp.bench.profiling.LiveTensorBytes`` counts the same quantity: a dispatch mode that sees
every ATen op (the backward's included) and tracks each output storage until it is
freed. "step MiB" is the peak above the resident bytes: what the step itself needs.
"""

from __future__ import annotations

import contextlib
import gc
import statistics
import time
from dataclasses import dataclass
from typing import Callable, Iterator

import torch

from mtp.bench.profiling import DeviceTimer, MemoryReading, PeakMemory
from mtp.config import ModelConfig, model_preset
from mtp.loss import mtp_targets, step_backward
from mtp.model import MTPTransformer, count_parameters, training_flops_per_token

MiB = 2**20
MEMORY_TARGET = 1.02  # n=4 memory-saving schedules' peak memory / n=1 peak memory, at most
TIME_TARGET = 0.05  # step-time ratio at most 5% above the FLOP ratio (its floor)
MEMORY_SAVING = ("sequential", "sequential-chunked", "batched")  # the variants the targets judge


@dataclass(frozen=True)
class BenchSpec:
    """One comparison: the model size, the batch and how long to measure."""

    device: str
    preset: str
    batch_size: int
    seq_len: int
    chunk_size: int
    rounds: int
    steps_per_round: int
    warmup_steps: int = 1
    n_future: int = 4

    def model_config(self, vocab_size: int, n_future: int) -> ModelConfig:
        return model_preset(
            self.preset,
            vocab_size=vocab_size,
            n_future=n_future,
            param_matched=n_future > 1,
            max_seq_len=self.seq_len,
        )


# CPU: small enough for 2 cores in a few minutes; at vocab 32000 the logits dominate.
CPU_SPEC = BenchSpec(device="cpu", preset="small", batch_size=2, seq_len=512, chunk_size=256, rounds=5, steps_per_round=1)
# CUDA: the paper's smallest size, a full 2048-token context.
CUDA_SPEC = BenchSpec(
    device="cuda", preset="0.3B", batch_size=8, seq_len=2048, chunk_size=4096, rounds=5,
    steps_per_round=5, warmup_steps=3,
)


@dataclass(frozen=True)
class Variant:
    name: str
    n_future: int
    schedule: str  # a TrainConfig.schedule: "naive", "sequential" or "batched"
    chunked: bool = False


def variants(n_future: int) -> list[Variant]:
    return [
        Variant("n1", 1, "naive"),
        Variant("naive", n_future, "naive"),
        Variant("sequential", n_future, "sequential"),
        Variant("sequential-chunked", n_future, "sequential", chunked=True),
        Variant("batched", n_future, "batched"),
    ]


@dataclass
class Result:
    """One row of the table; ``asdict`` is the JSON object."""

    variant: str
    n_future: int
    vocab_size: int
    params: int
    tokens_per_s: float
    step_s: float
    peak_memory_bytes: int
    step_memory_bytes: int  # peak above params + optimizer state + batch
    time_ratio: float
    memory_ratio: float
    step_memory_ratio: float
    flop_ratio: float


class VariantRun:
    """One variant's model, optimizer and fixed batch; ``step()`` is one training step."""

    def __init__(self, spec: BenchSpec, vocab_size: int, variant: Variant, seed: int = 0) -> None:
        self.spec, self.variant = spec, variant
        self.device = torch.device(spec.device)
        self.cfg = spec.model_config(vocab_size, variant.n_future)
        torch.manual_seed(seed)
        with self.device:  # initialise in place: a 0.3B model is slow to initialise on the host
            self.model = MTPTransformer(self.cfg)
        self.optimizer = torch.optim.AdamW(self.model.parameters(), lr=1e-4, fused=self.device.type == "cuda")
        g = torch.Generator().manual_seed(seed + 1)
        tokens = torch.randint(0, vocab_size, (spec.batch_size, spec.seq_len + 1), generator=g).to(self.device)
        self.inputs, self.targets = mtp_targets(tokens, variant.n_future)
        self.chunk_size = spec.chunk_size if variant.chunked else None

    def autocast(self) -> contextlib.AbstractContextManager:
        if self.device.type == "cuda":
            return torch.autocast("cuda", dtype=torch.bfloat16)
        return contextlib.nullcontext()

    def forward_backward(self) -> None:
        with self.autocast():
            step_backward(self.variant.schedule, self.model, self.inputs, self.targets, chunk_size=self.chunk_size)

    def update(self) -> None:
        self.optimizer.step()
        self.optimizer.zero_grad(set_to_none=True)

    def step(self) -> None:
        self.forward_backward()
        self.update()

    def timed_step(self) -> float:
        """Seconds of forward+backward (the scope of the FLOP count); the update runs untimed."""
        with DeviceTimer(self.device, cpu_clock=time.process_time) as timer:
            self.forward_backward()
        self.update()
        return timer.seconds

    def resident(self) -> Iterator[torch.Tensor]:
        """Tensors alive between steps: parameters, buffers, optimizer state, the batch."""
        yield from self.model.parameters()
        yield from self.model.buffers()
        for state in self.optimizer.state.values():
            yield from (v for v in state.values() if isinstance(v, torch.Tensor))
        yield from (self.inputs, self.targets)

    def warm_up(self) -> None:
        for _ in range(self.spec.warmup_steps):
            self.step()

    def measure_memory(self) -> MemoryReading:
        with PeakMemory(self.device, self.resident()) as peak:
            self.step()
        return peak.reading


def release(device: torch.device) -> None:
    gc.collect()
    if device.type == "cuda":
        torch.cuda.empty_cache()


def measure_memory(spec: BenchSpec, vocab_size: int, todo: list[Variant]) -> dict[str, MemoryReading]:
    """Each variant alone (on CUDA the allocator counts everything that is resident)."""
    readings = {}
    for variant in todo:
        run = VariantRun(spec, vocab_size, variant)
        run.warm_up()
        readings[variant.name] = run.measure_memory()
        del run
        release(torch.device(spec.device))
    return readings


def measure_time(spec: BenchSpec, vocab_size: int, todo: list[Variant]) -> dict[str, list[float]]:
    """Seconds per step, per round, round-robin over variants (order rotated each round)."""
    runs = [VariantRun(spec, vocab_size, v) for v in todo]
    for run in runs:
        run.warm_up()
    times: dict[str, list[float]] = {v.name: [] for v in todo}
    for r in range(spec.rounds):
        for run in runs[r % len(runs) :] + runs[: r % len(runs)]:
            seconds = sum(run.timed_step() for _ in range(spec.steps_per_round))
            times[run.variant.name].append(seconds / spec.steps_per_round)
    del runs
    release(torch.device(spec.device))
    return times


def compare(spec: BenchSpec, vocab_size: int, log: Callable[[str], None] = print) -> list[Result]:
    """Measure every variant at one vocabulary size; ratios are against ``n1``."""
    todo = variants(spec.n_future)
    log(f"[vocab {vocab_size}] peak memory, one variant at a time ...")
    memory = measure_memory(spec, vocab_size, todo)
    log(f"[vocab {vocab_size}] step time, {spec.rounds} rounds x {spec.steps_per_round} steps ...")
    times = measure_time(spec, vocab_size, todo)
    base = todo[0]
    base_cfg = spec.model_config(vocab_size, base.n_future)
    tokens = spec.batch_size * spec.seq_len
    results = []
    for v in todo:
        cfg = spec.model_config(vocab_size, v.n_future)
        step_s = statistics.median(times[v.name])
        mem, base_mem = memory[v.name], memory[base.name]
        results.append(
            Result(
                variant=v.name,
                n_future=v.n_future,
                vocab_size=vocab_size,
                params=count_parameters(cfg)["total"],
                tokens_per_s=tokens / step_s,
                step_s=step_s,
                peak_memory_bytes=mem.peak_bytes,
                step_memory_bytes=mem.added_bytes,
                time_ratio=statistics.median(t / b for t, b in zip(times[v.name], times[base.name])),
                memory_ratio=mem.peak_bytes / base_mem.peak_bytes,
                step_memory_ratio=mem.added_bytes / base_mem.added_bytes,
                flop_ratio=training_flops_per_token(cfg, spec.seq_len) / training_flops_per_token(base_cfg, spec.seq_len),
            )
        )
    return results


def format_table(spec: BenchSpec, results: list[Result]) -> str:
    cfg = spec.model_config(results[0].vocab_size, 1)
    head = (
        f"{spec.device}: preset {spec.preset}, dim {cfg.dim}, {cfg.n_layers} blocks, vocab {cfg.vocab_size}, "
        f"batch {spec.batch_size} x {spec.seq_len} tokens, chunk {spec.chunk_size}, "
        f"{'bf16 autocast' if spec.device == 'cuda' else 'fp32'}; n={spec.n_future} variants param-matched "
        f"(trunk {cfg.n_layers - spec.n_future} + {spec.n_future} heads vs trunk {cfg.n_layers - 1} + 1 head)"
    )
    cols = ["variant", "n", "params", "tok/s", "time x", "FLOP x", "time/FLOP", "peak MiB", "mem x", "step MiB", "step mem x"]
    rows = [
        [
            r.variant, str(r.n_future), f"{r.params / 1e6:.2f}M", f"{r.tokens_per_s:,.0f}", f"{r.time_ratio:.3f}",
            f"{r.flop_ratio:.3f}", f"{r.time_ratio / r.flop_ratio:.3f}", f"{r.peak_memory_bytes / MiB:,.1f}",
            f"{r.memory_ratio:.3f}", f"{r.step_memory_bytes / MiB:,.1f}", f"{r.step_memory_ratio:.3f}",
        ]
        for r in results
    ]
    widths = [max(len(c), *(len(row[i]) for row in rows)) for i, c in enumerate(cols)]
    line = lambda cells: "  ".join(c.rjust(w) if i else c.ljust(w) for i, (c, w) in enumerate(zip(cells, widths)))  # noqa: E731
    return "\n".join([head, line(cols), line(["-" * w for w in widths]), *map(line, rows), *target_lines(results)])


def target_lines(results: list[Result]) -> list[str]:
    """The issues' targets, judged on the memory-saving variants."""
    lines = []
    for r in results:
        if r.variant not in MEMORY_SAVING:
            continue
        mem_ok = r.memory_ratio <= MEMORY_TARGET
        gap = r.time_ratio / r.flop_ratio - 1
        time_ok = gap <= TIME_TARGET
        below = "; below the floor: n1's autograd cross-entropy costs more per head" if gap < -TIME_TARGET else ""
        lines.append(
            f"target {r.variant}: memory {r.memory_ratio:.3f}x n1 (<= {MEMORY_TARGET}: {'met' if mem_ok else 'MISSED'}); "
            f"time {r.time_ratio:.3f}x vs FLOPs {r.flop_ratio:.3f}x, {gap:+.1%} (<= +{TIME_TARGET:.0%}: "
            f"{'met' if time_ok else 'MISSED'}{below})"
        )
    return lines
