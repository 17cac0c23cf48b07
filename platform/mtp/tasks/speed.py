"""Self-speculative speed against n (the shape of the paper's Tables S2/S3, byte level).

For one checkpoint, on held-out code (validation documents of the corpus it trained
on, which no training block contains): ``prompts`` prompts and ``heldout`` texts, one
validation block each, spread evenly over all held-out files (``speed/prompt_files`` and
``speed/teacher_forced_files`` count the files they come from, ``speed/heldout_files`` all):

* ``teacher_forced_tokens_per_forward``: what the heads promise without decoding;
* greedy decoding, vanilla vs self-speculative, interleaved chunk by chunk: tokens
  per forward, wall-clock speedup, and the fraction of distinct 8-grams of the output
  (a model that repeats itself accepts every draft, which is not acceleration);
* speculative sampling at T=0.8, whose output is not degenerate: the same measures;

at batch 1 and 8. Wall-clock speedups on a shared CPU are noisy; tokens per forward
are exact counts.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from mtp.decoding import Engine, EngineConfig
from mtp.decoding.metrics import compare, teacher_forced
from mtp.device import intra_op_threads
from mtp.specs import build
from mtp.tasks.spec import TaskError

SPEED_METRICS = ("tokens_per_forward", "speedup", "distinct_8gram")  # of each batch size and mode
FILE_COUNTS = ("heldout", "prompt", "teacher_forced")  # held-out files in all, and those each measure reads


@dataclass(frozen=True)
class SpeedSpec:
    """What to measure: prompts cut from held-out code, generation length, batch sizes."""

    name: str = "speed"
    prompts: int = 16
    prompt_tokens: int = 64
    max_new_tokens: int = 96
    heldout: int = 32
    batch_sizes: list[int] = field(default_factory=lambda: [1, 8])
    temperature: float = 0.8
    threads: int = 1
    engine: EngineConfig = EngineConfig()  # ``engine:``: device, dtype, compile, ...; its rows are max(batch_sizes)

    @classmethod
    def parse(cls, raw: Any, where: str = "task") -> "SpeedSpec":
        spec = build(cls, raw, where)
        if "max_batch_size" in (raw.get("engine") or {}):
            raise TaskError(f"{where}.engine.max_batch_size: the speed task's engine rows are max({where}.batch_sizes)")
        spec.engine.validate()
        for name in ("prompts", "prompt_tokens", "max_new_tokens", "heldout", "threads"):
            if getattr(spec, name) < 1:
                raise TaskError(f"{where}.{name}={getattr(spec, name)!r} must be a positive integer")
        if not spec.batch_sizes or min(spec.batch_sizes) < 1:
            raise TaskError(f"{where}.batch_sizes={spec.batch_sizes!r} must be positive integers")
        return spec

    def metric_names(self) -> list[str]:
        names = ["speed/teacher_forced_tokens_per_forward", *(f"speed/{w}_files" for w in FILE_COUNTS)]
        for b in self.batch_sizes:
            for mode in ("greedy", "sampled"):
                names += [f"speed/b{b}/{mode}_{m}" for m in SPEED_METRICS]
        return names

    progress_limit = 0  # measured on the final checkpoint only

    def training_config(self) -> dict[str, Any]:
        """Trains on the sweep's own ``data.source`` (the stdlib corpus by default)."""
        return {}

    def prepare(self) -> None:
        pass

    def evaluate(self, checkpoint: str | Path, limit: int | None = None) -> dict[str, float]:
        """Every metric of ``metric_names`` (``limit``: unused, the prompts are ``prompts``)."""
        from mtp.checkpoint import read_config
        from mtp.config import from_dict
        from mtp.data import prepare_data

        with intra_op_threads(self.threads):  # the sweep's process keeps its own setting afterwards
            cfg = from_dict(read_config(checkpoint))
            data = prepare_data(cfg.data, cfg.train.seq_len)
            prompt_blocks, forced_blocks = spread_blocks(data.val, self.prompts, self.heldout)
            files = held_out_files(data.val, data.tokenizer.eos_id)
            engine = Engine.from_checkpoint(
                str(checkpoint), dataclasses.replace(self.engine, max_batch_size=max(self.batch_sizes)))
            prompts = [ids[: self.prompt_tokens] for ids in block_texts(data.val, prompt_blocks)]
            metrics = {"speed/teacher_forced_tokens_per_forward":
                       teacher_forced(engine.model, block_texts(data.val, forced_blocks))["teacher_forced_tokens_per_forward"],
                       "speed/heldout_files": float((np.asarray(data.val) == data.tokenizer.eos_id).sum()),
                       "speed/prompt_files": float(len({files[i] for i in prompt_blocks})),
                       "speed/teacher_forced_files": float(len({files[i] for i in forced_blocks}))}
            for b in self.batch_sizes:
                for mode, temperature in (("greedy", 0.0), ("sampled", self.temperature)):
                    row = compare(engine, prompts, b, self.max_new_tokens, temperature)
                    row["tokens_per_forward"] = row["tokens_per_forward"] or 1.0  # no drafts: one per forward
                    metrics.update({f"speed/b{b}/{mode}_{k}": row[k] for k in SPEED_METRICS})
            return metrics


def spread_blocks(val_blocks: np.ndarray, prompts: int, heldout: int) -> tuple[list[int], list[int]]:
    """Validation blocks for the prompts and for the teacher-forced texts: disjoint, each set spread
    evenly over the whole split, which holds the held-out documents one after another (the first
    ``prompts + heldout`` blocks, used before, were the first 2 of 50 held-out files)."""
    usable = np.flatnonzero((np.asarray(val_blocks) < 256).sum(1) > 8)  # byte ids; padding and eos excluded
    total = prompts + heldout
    if len(usable) < total:
        raise ValueError(f"the validation split has {len(usable)} usable blocks, {total} needed")
    picks = usable[np.linspace(0, len(usable) - 1, total).round().astype(int)].tolist()
    chosen = {round(k * total / prompts) for k in range(prompts)}
    return [picks[j] for j in sorted(chosen)], [p for j, p in enumerate(picks) if j not in chosen]


def block_texts(val_blocks: np.ndarray, indices: list[int]) -> list[list[int]]:
    """The blocks' byte ids, padding and eos removed."""
    return [[int(t) for t in val_blocks[i] if t < 256] for i in indices]


def held_out_files(val_blocks: np.ndarray, eos_id: int) -> np.ndarray:
    """The held-out document each block starts in (each document ends with one eos)."""
    ends = np.cumsum((np.asarray(val_blocks) == eos_id).sum(1))
    return np.concatenate([[0], ends[:-1]])
