"""The training loop: one function that a Ray Train worker or a plain process runs.

``train(cfg)`` builds the data, the model and the optimizer from one ``JobConfig``,
runs AdamW with warmup + cosine decay, gradient clipping and accumulation, and uses
the memory-efficient sequential multi-token backward (``train.schedule=batched`` for
the batched-heads fused-loss schedule, ``naive`` for the reference; ``mtp.loss``). It knows nothing about Ray or MLflow: where checkpoints go
is a ``CheckpointStore`` (a local folder by default, Ray Train's reporting under
Ray) and what happens to metrics is up to ``callbacks`` (MLflow on rank 0 under the
job). In a process group it runs data-parallel (``mtp.parallel``): each rank reads
its own blocks and gradients are averaged once per optimizer step.

A checkpoint holds weights, config, tokenizer and the complete resume state
(optimizer, scheduler, RNG, data position), so a resumed run continues exactly as
an uninterrupted one would have.
"""

from __future__ import annotations

import contextlib
import copy
import math
import random
import resource
import shutil
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable, ContextManager, Iterator, Protocol, Sequence

import numpy as np
import torch
from safetensors.torch import load_file

from mtp.checkpoint import WEIGHTS, inherit_source_model, load_train_state, save_checkpoint, transfer_weights
from mtp.config import ConfigError, JobConfig, TrainConfig
from mtp.data import BatchPrefetcher, BlockSampler, DataPosition, PackedData, gather_blocks, prepare_data, val_indices
from mtp.device import datasheet_peak_flops, mfu, resolve_device
from mtp.loss import evaluate_head_losses, mtp_targets, step_backward
from mtp.model import MTPTransformer, freeze_, training_flops_per_token
from mtp.parallel import (
    SHARDS,
    DistInfo,
    all_reduce_gradients,
    all_reduce_sum,
    broadcast_parameters,
    clip_grad_norm,
    dist_info,
    full_state_dict,
    is_sharded,
    load_sharded,
    save_sharded,
    set_gradient_sync,
    shard_blocks,
)


class TrainingError(RuntimeError):
    """Training cannot continue: the loss diverged (the message names the last checkpoint)."""


@dataclass
class TrainResult:
    """What a finished run leaves behind (on rank 0; other ranks get the same step)."""

    step: int
    checkpoint: Path | None
    metrics: dict[str, float]
    history: list[dict[str, float]] = field(default_factory=list)


class TrainCallback(Protocol):
    """Receives metrics on rank 0 (MLflow logging, progress displays).

    A callback may also define ``on_checkpoint(step, directory)``, called on rank 0 right
    after each checkpoint is written (e.g. to score it on a task while training runs).
    """

    def on_log(self, step: int, metrics: dict[str, float]) -> None: ...


class CheckpointStore(Protocol):
    """Where checkpoints go and where a restarted run finds its last one."""

    def latest(self) -> ContextManager[Path | None]:
        """A local directory holding the checkpoint to resume from, if any."""
        ...

    def save(self, step: int, write: Callable[[Path], None], metrics: dict[str, float], info: DistInfo) -> Path | None:
        """Persist a checkpoint; every rank calls ``write(dir)``, which writes what that rank holds."""
        ...


class LocalCheckpoints:
    """``<run_dir>/checkpoints/step_NNNNNN``, keeping the newest ``keep`` (rank 0 writes)."""

    def __init__(self, run_dir: str | Path, keep: int = 2):
        self.root = Path(run_dir) / "checkpoints"
        self.keep = keep

    def _all(self) -> list[Path]:
        return sorted(p for p in self.root.glob("step_*") if p.is_dir() and not p.name.endswith((".tmp", ".old")))

    @contextlib.contextmanager
    def latest(self) -> Iterator[Path | None]:
        found = self._all()
        yield found[-1] if found else None

    def save(self, step: int, write: Callable[[Path], None], metrics: dict[str, float], info: DistInfo) -> Path | None:
        directory = self.root / f"step_{step:06d}"
        write(directory)  # every rank, into the same folder (one machine)
        if not info.is_main:
            return None
        for old in self._all()[: -self.keep]:
            shutil.rmtree(old, ignore_errors=True)
        return directory


# ------------------------------------------------------------------ building blocks


def autocast_dtype(cfg: TrainConfig, device: torch.device) -> torch.dtype | None:
    """bf16 autocast on GPU by default; fp32 on CPU unless asked."""
    if cfg.dtype == "bf16" or (cfg.dtype == "auto" and device.type == "cuda"):
        return torch.bfloat16
    return None


def lr_factor(step: int, cfg: TrainConfig) -> float:
    """Linear warmup to 1, then cosine decay to ``min_lr_ratio`` at ``max_steps``."""
    if step < cfg.warmup_steps:
        return (step + 1) / cfg.warmup_steps
    progress = min(1.0, (step - cfg.warmup_steps) / max(1, cfg.max_steps - cfg.warmup_steps))
    return cfg.min_lr_ratio + (1 - cfg.min_lr_ratio) * 0.5 * (1 + math.cos(math.pi * progress))


def build_optimizer(model: torch.nn.Module, cfg: TrainConfig) -> torch.optim.AdamW:
    """AdamW with weight decay on matrices only (not norms), as in LLaMA/GPT training.

    FSDP-sharded and replicated parameters go to separate groups, since the
    multi-tensor kernels do not mix DTensors with plain tensors.
    """
    groups: dict[tuple[bool, bool], list[torch.nn.Parameter]] = {}
    for p in model.parameters():
        if p.requires_grad:
            groups.setdefault((p.dim() >= 2, is_sharded(p)), []).append(p)
    return torch.optim.AdamW(
        [{"params": ps, "weight_decay": cfg.weight_decay if decay else 0.0} for (decay, _), ps in groups.items()],
        lr=cfg.lr,
        betas=(cfg.beta1, cfg.beta2),
    )


def seed_everything(seed: int) -> None:
    random.seed(seed)
    np.random.seed(seed)
    torch.manual_seed(seed)


def rng_state() -> dict:
    state = {"python": random.getstate(), "numpy": np.random.get_state(), "torch": torch.get_rng_state()}
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def set_rng_state(state: dict) -> None:
    random.setstate(state["python"])
    np.random.set_state(state["numpy"])
    torch.set_rng_state(state["torch"])
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])


def peak_memory_bytes(device: torch.device) -> int:
    if device.type == "cuda":
        return torch.cuda.max_memory_allocated(device)
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024  # Linux reports KiB


def default_run_name(cfg: JobConfig) -> str:
    return f"{cfg.train.preset}-n{cfg.model.n_future}-{time.strftime('%Y%m%d-%H%M%S')}"


def _fmt_duration(seconds: float) -> str:
    seconds = int(seconds)
    return f"{seconds // 3600}h{seconds % 3600 // 60:02d}m" if seconds >= 3600 else f"{seconds // 60}m{seconds % 60:02d}s"


# ------------------------------------------------------------------------ the loop


class Trainer:
    """State of one run on one rank; ``train()`` is the public entry point."""

    def __init__(self, cfg: JobConfig, data: PackedData, store: CheckpointStore, callbacks: Sequence[TrainCallback],
                 init_dir: str | Path | None = None):
        self.cfg, self.data, self.store, self.callbacks = cfg, data, store, list(callbacks)
        self.info = dist_info()
        try:
            self.device = resolve_device(cfg.train.device, self.info.local_rank)
        except ValueError as exc:
            raise ConfigError(f"train.device: {exc}") from None
        self.amp = autocast_dtype(cfg.train, self.device)
        if cfg.model.vocab_size < data.tokenizer.vocab_size:
            raise ConfigError(
                f"model.vocab_size={cfg.model.vocab_size} is smaller than the tokenizer's "
                f"{data.tokenizer.vocab_size} ids (data.tokenizer={cfg.data.tokenizer!r}); set model.vocab_size"
            )
        seed_everything(cfg.train.seed)
        self.model = MTPTransformer(cfg.model)
        if cfg.train.init_from:  # every rank loads the same weights; a fresh optimizer follows
            heads = transfer_weights(self.model, init_dir or cfg.train.init_from)
            self._print(f"initialised from {cfg.train.init_from}: {heads}")
        if cfg.train.freeze:  # before the optimizer: frozen parameters get no state and never change
            trainable = freeze_(self.model, cfg.train.freeze)
            if not trainable:
                raise ConfigError(f"train.freeze={cfg.train.freeze} leaves no parameter to train")
            self._print(f"frozen: {', '.join(cfg.train.freeze)}; {trainable:,} parameters train")
        self.model = self.model.to(self.device)
        broadcast_parameters(self.model)
        self.sharded = cfg.scaling.strategy == "fsdp" and self.info.world_size > 1
        if self.sharded and cfg.train.schedule == "batched":
            raise ConfigError("train.schedule='batched' stacks the heads' weights, which FSDP shards: use 'sequential'")
        if self.sharded:
            shard_blocks(self.model)
        self.params = [p for p in self.model.parameters() if p.requires_grad]
        self.replicated = [p for p in self.params if not is_sharded(p)]
        self.optimizer = build_optimizer(self.model, cfg.train)
        self.scheduler = torch.optim.lr_scheduler.LambdaLR(self.optimizer, lambda s: lr_factor(s, cfg.train))
        sampler = BlockSampler(len(data.train), cfg.train.batch_size, self.info.rank, self.info.world_size, cfg.train.seed)
        self.batches = BatchPrefetcher(sampler, data.train)
        self.step = 0
        self.step_start_position = self.batches.position
        self.nonfinite = torch.zeros((), dtype=torch.bool, device=self.device)  # set by a non-finite gradient norm
        self.history: list[dict[str, float]] = []
        self.last_checkpoint: Path | None = None
        if cfg.train.compile:
            for block in (*self.model.trunk_layers, *self.model.heads):
                block.compile()

    # -- state --------------------------------------------------------------------

    def train_state(self) -> dict:
        """Resume state; under FSDP the optimizer lives in the sharded ``shards/`` instead."""
        return {
            "step": self.step,
            "optimizer": None if self.sharded else self.optimizer.state_dict(),
            "scheduler": self.scheduler.state_dict(),
            "rng": rng_state(),
            "data_position": vars(self.batches.position).copy(),
        }

    def restore(self, directory: Path) -> None:
        state = load_train_state(directory)
        if state is None:
            raise FileNotFoundError(f"{str(directory)!r} has no resume state (it is an inference-only checkpoint)")
        if self.sharded:
            load_sharded(self.model, self.optimizer, directory / SHARDS)
        elif state["optimizer"] is None:
            raise ConfigError(f"{str(directory)!r} holds a sharded optimizer state: resume it with scaling.strategy=fsdp")
        else:
            self.model.load_state_dict(load_file(str(directory / WEIGHTS), device=str(self.device)))
            self.optimizer.load_state_dict(state["optimizer"])
        self.scheduler.load_state_dict(state["scheduler"])
        set_rng_state(state["rng"])
        self.batches.seek(DataPosition(**state["data_position"]))
        self.step = int(state["step"])

    def save(self, metrics: dict[str, float]) -> None:
        def write(directory: Path) -> None:
            """Every rank calls this; rank 0 writes the full checkpoint, FSDP ranks add their shards."""
            full = full_state_dict(self.model) if self.sharded else None
            if self.info.is_main:
                save_checkpoint(
                    directory, self.model, self.cfg, self.data.tokenizer, train_state=self.train_state(), state_dict=full
                )
            if self.sharded:
                torch.distributed.barrier()
                save_sharded(self.model, self.optimizer, directory / SHARDS)

        path = self.store.save(self.step, write, {"step": self.step, **metrics}, self.info)
        self.last_checkpoint = path or self.last_checkpoint
        if path is not None:
            for callback in self.callbacks:
                if hasattr(callback, "on_checkpoint"):
                    callback.on_checkpoint(self.step, path)

    # -- one step -----------------------------------------------------------------

    def _targets(self, blocks: np.ndarray) -> tuple[torch.Tensor, torch.Tensor]:
        """Inputs and per-head targets on the device; from pinned memory, the copy does not wait for it."""
        tokens = torch.from_numpy(blocks)
        if self.device.type == "cuda":
            tokens = tokens.pin_memory()
        tokens = tokens.to(self.device, non_blocking=True)
        return mtp_targets(tokens, self.cfg.model.n_future, self.data.tokenizer.pad_id,
                           next_token_only=self.cfg.train.head_targets == "next", masked=self.data.masked)

    def _autocast(self):
        if self.amp is None:
            return contextlib.nullcontext()
        return torch.autocast(self.device.type, dtype=self.amp)

    def accumulate_gradients(self) -> torch.Tensor:
        """Forward/backward over ``grad_accum`` micro-batches, then one gradient sync.

        Leaves the step's averaged gradients in ``p.grad``; returns this rank's mean
        per-head losses.
        """
        tc = self.cfg.train
        self.step_start_position = self.batches.position
        head_losses = torch.zeros(self.cfg.model.n_future, device=self.device)
        for micro in range(tc.grad_accum):
            if self.sharded:  # FSDP blocks reduce-scatter on the last micro-batch's backward only
                set_gradient_sync(self.model, micro == tc.grad_accum - 1)
            inputs, targets = self._targets(self.batches.next())
            with self._autocast():
                losses = step_backward(tc.schedule, self.model, inputs, targets, tc.head_weights, tc.loss_chunk_size,
                                       loss_scale=1.0 / tc.grad_accum, compiled=tc.compile)
            head_losses += losses.head_losses.float() / tc.grad_accum
        all_reduce_gradients(self.replicated)
        return head_losses

    def train_step(self) -> tuple[torch.Tensor, torch.Tensor]:
        """One optimizer step; returns (this rank's head losses, the gradient norm).

        Nothing here waits for the device: a non-finite gradient norm is noted on the
        device and acted on at the next log or checkpoint (``check_finite``).
        """
        tc = self.cfg.train
        head_losses = self.accumulate_gradients()
        max_norm = tc.grad_clip if tc.grad_clip > 0 else float("inf")
        grad_norm = clip_grad_norm(self.params, max_norm)
        self.nonfinite |= ~torch.isfinite(grad_norm)
        self.optimizer.step()
        self.scheduler.step()
        self.optimizer.zero_grad(set_to_none=True)
        self.step += 1
        return head_losses, grad_norm

    def check_finite(self, since_step: int) -> None:
        """Stop if a gradient norm since ``since_step`` was not finite (one host sync).

        The weights have taken that step, so no checkpoint is written from them; the
        last checkpoint holds the run's last finite state.
        """
        if bool(self.nonfinite):
            raise TrainingError(
                f"a gradient norm between steps {since_step + 1} and {self.step} was not finite: training diverged; "
                f"the last checkpoint is {self.last_checkpoint}"
            )

    @torch.no_grad()
    def evaluate(self) -> dict[str, float]:
        """Validation loss per head and bits per byte (head 0), summed over ranks."""
        if len(self.data.val) == 0:
            return {}
        tc, n = self.cfg.train, self.cfg.model.n_future
        self.model.eval()
        sums = torch.zeros(n, 2, device=self.device, dtype=torch.float64)
        n_bytes = torch.zeros((), device=self.device, dtype=torch.float64)
        token_bytes = torch.from_numpy(self.data.token_bytes).to(self.device)
        idx = val_indices(len(self.data.val), tc.eval_batches * tc.batch_size, self.info.rank, self.info.world_size)
        for start in range(0, len(idx), tc.batch_size):
            inputs, targets = self._targets(gather_blocks(self.data.val, idx[start : start + tc.batch_size]))
            with self._autocast():
                sums += evaluate_head_losses(self.model, inputs, targets, tc.loss_chunk_size).double()
            valid = targets[0] >= 0
            n_bytes += token_bytes[targets[0][valid]].sum()
        self.model.train()
        all_reduce_sum(sums)
        all_reduce_sum(n_bytes)
        losses = (sums[:, 0] / sums[:, 1].clamp(min=1)).tolist()
        metrics = {f"val/loss_head_{i}": v for i, v in enumerate(losses)}
        metrics["val/loss_mean"] = float(np.mean(losses))
        metrics["val/bpb"] = float(sums[0, 0] / math.log(2) / n_bytes.clamp(min=1))
        return metrics

    # -- the run ------------------------------------------------------------------

    def run(self) -> TrainResult:
        tc = self.cfg.train
        tokens_per_step = tc.batch_size * tc.grad_accum * self.info.world_size * tc.seq_len
        flops_per_token = training_flops_per_token(self.cfg.model, tc.seq_len)
        device_peak = datasheet_peak_flops(self.device)
        self._print(
            f"training {self.cfg.train.preset} n_future={self.cfg.model.n_future} on {self.info.world_size} x "
            f"{self.device.type}: {len(self.data.train)} blocks of {tc.seq_len + 1} tokens, "
            f"{tokens_per_step} tokens/step, steps {self.step}->{tc.max_steps}"
        )
        interval_losses = torch.zeros(self.cfg.model.n_future, device=self.device)
        interval_steps, interval_start, metrics = 0, time.perf_counter(), {}
        checked_step = self.step
        while self.step < tc.max_steps:
            head_losses, grad_norm = self.train_step()
            interval_losses += head_losses
            interval_steps += 1
            last = self.step == tc.max_steps
            logs, saves = self.step % tc.log_every == 0 or last, self.step % tc.checkpoint_every == 0 or last
            if logs or saves:
                self.check_finite(checked_step)
                checked_step = self.step
            if logs:
                if self.device.type == "cuda":
                    torch.cuda.synchronize(self.device)
                elapsed = time.perf_counter() - interval_start
                losses = (all_reduce_sum(interval_losses.clone()) / (interval_steps * self.info.world_size)).tolist()
                metrics = {f"train/loss_head_{i}": v for i, v in enumerate(losses)}
                metrics["train/loss_mean"] = float(np.mean(losses))
                metrics["train/lr"] = self.scheduler.get_last_lr()[0]
                metrics["train/grad_norm"] = float(grad_norm)
                tokens_per_s = interval_steps * tokens_per_step / elapsed
                metrics["perf/tokens_per_s"] = tokens_per_s
                metrics["perf/step_time_s"] = elapsed / interval_steps
                metrics["perf/peak_memory_bytes"] = float(peak_memory_bytes(self.device))
                if device_peak:
                    metrics["perf/mfu"] = mfu(tokens_per_s, flops_per_token, device_peak, self.info.world_size)
                if self.step % tc.eval_every == 0 or last:
                    metrics.update(self.evaluate())
                self._log(metrics, eta=(tc.max_steps - self.step) * elapsed / interval_steps)
                interval_losses.zero_()
                interval_steps = 0
            if saves:
                self.save(metrics)
            if logs:  # evaluation, logging and checkpoints stay out of the next interval's tokens/s
                interval_start = time.perf_counter()
        return TrainResult(self.step, self.last_checkpoint, metrics, self.history)

    def _log(self, metrics: dict[str, float], eta: float) -> None:
        if not self.info.is_main:
            return
        self.history.append({"step": self.step, **metrics})
        for callback in self.callbacks:
            callback.on_log(self.step, metrics)
        val = f" | val {metrics['val/loss_mean']:.4f} ({metrics['val/bpb']:.3f} bpb)" if "val/loss_mean" in metrics else ""
        self._print(
            f"step {self.step:>6}/{self.cfg.train.max_steps} | loss {metrics['train/loss_mean']:.4f}{val} | "
            f"{metrics['perf/tokens_per_s']:,.0f} tok/s | lr {metrics['train/lr']:.2e} | eta {_fmt_duration(eta)}"
        )

    def _print(self, text: str) -> None:
        if self.info.is_main:  # stdout directly: Ray Train V2 also mirrors print() into its logs
            sys.stdout.write(text + "\n")
            sys.stdout.flush()


def train(
    cfg: JobConfig,
    *,
    resume_from: str | Path | None = None,
    callbacks: Sequence[TrainCallback] = (),
    store: CheckpointStore | None = None,
    data: PackedData | None = None,
    init_dir: str | Path | None = None,
) -> TrainResult:
    """Train ``cfg`` in this process (one rank of a process group, or alone).

    ``init_dir`` is the local checkpoint directory ``train.init_from`` names, when that is
    an MLflow URI (``mtp.tracking.registry.resolve_checkpoint``); the config keeps the URI.

    The run continues from ``store.latest()`` when the store already holds a
    checkpoint (a restarted Ray attempt, or a re-run into the same run directory),
    else from ``resume_from`` (a checkpoint directory) if given, else from scratch.
    ``store`` defaults to ``<train.output_dir>/<tracking.run_name>/checkpoints``.
    Returns the final step, metrics and (on rank 0) the final checkpoint's directory;
    a run its store already holds complete returns that checkpoint without training.
    """
    cfg = copy.deepcopy(cfg).validate()
    if cfg.train.init_from:
        inherit_source_model(cfg, init_dir or cfg.train.init_from)
    cfg.tracking.run_name = cfg.tracking.run_name or default_run_name(cfg)
    store = store or LocalCheckpoints(Path(cfg.train.output_dir) / cfg.tracking.run_name)
    data = data or prepare_data(cfg.data, cfg.train.seq_len)
    trainer = Trainer(cfg, data, store, callbacks, init_dir)
    with store.latest() as latest:
        source = latest if latest is not None else (Path(resume_from) if resume_from is not None else None)
        if source is not None:
            trainer.restore(source)
            trainer._print(f"resumed from {source} at step {trainer.step}")
            if latest is not None and trainer.step >= cfg.train.max_steps and trainer.info.is_main:
                trainer.last_checkpoint = latest  # already complete: its last checkpoint is the final one
    try:
        return trainer.run()
    except KeyboardInterrupt:
        if trainer.info.world_size == 1 and not bool(trainer.nonfinite):
            trainer.batches.seek(trainer.step_start_position)  # the unfinished step is redone on resume
            trainer.save({})
            print(f"stopped at step {trainer.step}; checkpoint saved to {trainer.last_checkpoint}", file=sys.stderr)
        raise
    finally:
        trainer.batches.close()
