"""What the training loop itself costs: ``mtp.train`` against a bare loop, and Ray on top.

The rows train the same model from the same seed on the same batches (the config's
corpus, the same ``BlockSampler``), so they compute the same thing:

* ``bare``: a nanoGPT-style loop, nothing but the work: per step the batch gather,
  ``sequential_backward``, ``torch.nn.utils.clip_grad_norm_``, AdamW (the same
  parameter groups) at the scheduled learning rate;
* ``mtp.train``: the package's loop in this process, with its logging, metrics and
  divergence check;
* ``mtp.train via Ray``: the same loop as the job runs it on Ray Train: ``build_trainer``'s
  1-worker ``TorchTrainer`` running ``worker_loop`` with its ``RayCheckpoints`` (a local
  Ray, no MLflow run). Ray's start-up and the worker's start are outside the timing
  ("once warm"): the clock runs inside the worker, from its first logged step.

Every row is timed with one clock (``StepClock``, a rank-0 callback) at logged steps,
from the first log (``train.log_every``, one interval of warm-up) to the second-to-last;
the last interval is left out, since the run evaluates and checkpoints at its last step.
Rows run one after the other, round-robin (order rotated each round); each row's ratio
to ``bare`` is taken per round, so load from other processes hits all rows alike.
"""

from __future__ import annotations

import copy
import json
import statistics
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable

import numpy as np
import torch

from mtp.config import JobConfig
from mtp.data import BlockSampler, PackedData
from mtp.loss import mtp_targets, sequential_backward
from mtp.model import MTPTransformer
from mtp.train import LocalCheckpoints, build_optimizer, lr_factor, train

BARE, TRAIN, RAY = "bare", "mtp.train", "mtp.train via Ray"


class StepClock:
    """A ``TrainCallback`` noting the time of every logged step (on rank 0).

    The clock is this process's CPU time: the machine may be shared, and wall time
    would count the time other processes hold the cores. Work the loop does on other
    threads of the process (prefetching; in a Ray worker, Ray's own) is counted too;
    Ray's other processes (raylet, GCS, the Train controller) are not.
    """

    def __init__(self, clock: Callable[[], float] = time.process_time, out: Path | None = None) -> None:
        self.clock, self.out = clock, out
        self.times: dict[int, float] = {}
        self.threads = 0

    def on_log(self, step: int, metrics: dict[str, float]) -> None:
        self.times[step] = self.clock()
        self.threads = torch.get_num_threads()

    def close(self) -> None:
        """In a Ray worker: leave the times where the driver reads them (``out``, on this machine)."""
        if self.out is not None:
            self.out.write_text(json.dumps({"times": self.times, "threads": self.threads}))

    @classmethod
    def read(cls, path: Path) -> "StepClock":
        clock = cls()
        data = json.loads(path.read_text())
        clock.times = {int(step): t for step, t in data["times"].items()}
        clock.threads = data["threads"]
        return clock


def timed_config(cfg: JobConfig, steps: int) -> JobConfig:
    """``cfg`` run for a window of ``steps`` steps after one warm-up log interval.

    Evaluation and checkpoints happen only at the last step, one log interval after
    the window closes.
    """
    cfg = copy.deepcopy(cfg)
    every = cfg.train.log_every
    if steps % every:
        raise ValueError(f"steps={steps} must be a multiple of train.log_every={every}")
    cfg.train.max_steps = steps + 2 * every
    cfg.train.eval_every = cfg.train.checkpoint_every = cfg.train.max_steps
    return cfg.validate()


def window(cfg: JobConfig, times: dict[int, float]) -> float:
    """Seconds from the first logged step to the second-to-last one."""
    every = cfg.train.log_every
    return times[cfg.train.max_steps - every] - times[every]


def bare_loop(cfg: JobConfig, data: PackedData, clock: StepClock) -> MTPTransformer:
    """The same training as ``mtp.train`` on the CPU, with nothing around it; returns the model."""
    tc = cfg.train
    torch.manual_seed(tc.seed)
    model = MTPTransformer(cfg.model)
    optimizer = build_optimizer(model, tc)
    sampler = BlockSampler(len(data.train), tc.batch_size, 0, 1, tc.seed)
    for step in range(1, tc.max_steps + 1):
        for group in optimizer.param_groups:
            group["lr"] = tc.lr * lr_factor(step - 1, tc)
        tokens = torch.from_numpy(data.train[sampler.next_indices()].astype(np.int64))
        inputs, targets = mtp_targets(tokens, cfg.model.n_future, data.tokenizer.pad_id)
        sequential_backward(model, inputs, targets, tc.head_weights, tc.loss_chunk_size)
        torch.nn.utils.clip_grad_norm_(model.parameters(), tc.grad_clip)
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        if step % tc.log_every == 0:
            clock.on_log(step, {})
    return model


def run_bare(cfg: JobConfig, data: PackedData) -> StepClock:
    clock = StepClock()
    bare_loop(cfg, data, clock)
    return clock


def run_train(cfg: JobConfig, data: PackedData) -> StepClock:
    clock = StepClock()
    with tempfile.TemporaryDirectory() as tmp:
        train(cfg, data=data, callbacks=[clock], store=LocalCheckpoints(tmp))
    return clock


def run_via_ray(cfg: JobConfig, data: PackedData) -> StepClock:
    """One run of the job's Ray Train path on a connected Ray (``mtp.cluster.ray_env.connect``).

    The worker prepares ``data`` itself, from the same cache.
    """
    from mtp.cluster.trainer import build_trainer

    cfg = copy.deepcopy(cfg)
    cfg.scaling.num_workers = 1
    cfg.scaling.cpus_per_worker = torch.get_num_threads()  # Ray gives the worker as many intra-op threads
    cfg.tracking.run_id = None  # no MLflow run: the loop and Ray only
    with tempfile.TemporaryDirectory() as tmp:
        cfg.tracking.run_name = f"bench-loop-{time.time_ns()}"
        out = Path(tmp) / "clock.json"
        build_trainer(cfg, Path(tmp) / "storage", callbacks=[StepClock(out=out)]).fit()
        return StepClock.read(out)


RUNNERS: dict[str, Callable[[JobConfig, PackedData], StepClock]] = {BARE: run_bare, TRAIN: run_train, RAY: run_via_ray}


@dataclass
class LoopResult:
    """One row: tokens/s per round, and its time per token over another row's in the same round."""

    loop: str
    threads: int
    tokens_per_s: list[float] = field(default_factory=list)
    over_bare: list[float] = field(default_factory=list)  # 0.03 = 3% more time per token than bare
    over_train: list[float] = field(default_factory=list)  # the Ray row against the in-process loop


TARGETS = {TRAIN: (0.03, "over_bare"), RAY: (0.02, "over_train")}  # the bounds, at the median


def measure_loops(cfg: JobConfig, data: PackedData, steps: int, repeats: int, via_ray: bool,
                  log: Callable[[str], None] = print) -> list[LoopResult]:
    """``repeats`` rounds over the rows, each row one fresh run of ``steps`` timed steps."""
    cfg = timed_config(cfg, steps)
    names = [BARE, TRAIN] + ([RAY] if via_ray else [])
    tokens = steps * cfg.train.batch_size * cfg.train.grad_accum * cfg.train.seq_len
    results = {name: LoopResult(name, 0) for name in names}
    for r in range(repeats):
        seconds = {}
        for name in names[r % len(names) :] + names[: r % len(names)]:
            clock = RUNNERS[name](cfg, data)
            seconds[name], results[name].threads = window(cfg, clock.times), clock.threads
            log(f"round {r + 1}/{repeats}: {name}: {tokens / seconds[name]:,.0f} tok/s")
        for name, result in results.items():
            result.tokens_per_s.append(tokens / seconds[name])
            result.over_bare.append(seconds[name] / seconds[BARE] - 1)
            if name == RAY:
                result.over_train.append(seconds[RAY] / seconds[TRAIN] - 1)
    return list(results.values())


def _spread(values: list[float]) -> str:
    return f"{statistics.median(values):+.1%} [{min(values):+.1%}, {max(values):+.1%}]" if values else ""


def format_loop_table(cfg: JobConfig, steps: int, results: list[LoopResult]) -> str:
    tc = cfg.train
    head = (
        f"loop overhead: preset {tc.preset}, n_future={cfg.model.n_future}, batch {tc.batch_size} x {tc.seq_len} tokens, "
        f"{steps} timed steps per run, {len(results[0].tokens_per_s)} rounds; time = CPU time of the training "
        "process; time per token over another row's: median [min, max] of the rounds' ratios"
    )
    cols = ["loop", "threads", "tok/s", "time vs bare", "time vs mtp.train", "target"]
    rows = []
    for r in results:
        target = ""
        if r.loop in TARGETS:
            bound, field_name = TARGETS[r.loop]
            ok = statistics.median(getattr(r, field_name)) <= bound
            target = f"<= +{bound:.0%} vs {'bare' if field_name == 'over_bare' else 'mtp.train'}: {'met' if ok else 'MISSED'}"
        over_bare = _spread(r.over_bare) if r.loop != BARE else "(reference)"
        rows.append([r.loop, str(r.threads), f"{statistics.median(r.tokens_per_s):,.0f}", over_bare, _spread(r.over_train), target])
    widths = [max(len(c), *(len(row[i]) for row in rows)) for i, c in enumerate(cols)]
    line = lambda cells: "  ".join(c.rjust(w) if i in (1, 2) else c.ljust(w) for i, (c, w) in enumerate(zip(cells, widths)))  # noqa: E731
    return "\n".join([head, line(cols), line(["-" * w for w in widths]), *map(line, rows)])
