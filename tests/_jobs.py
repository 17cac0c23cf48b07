"""Tiny training jobs shared by the training, cluster and tracking tests."""

from __future__ import annotations

from pathlib import Path

from mtp.config import JobConfig, build_config


def write_corpus(folder: Path, n_docs: int = 60) -> Path:
    """A small code corpus (distinct functions) that a debug model learns in a few steps."""
    folder.mkdir(parents=True, exist_ok=True)
    for i in range(n_docs):
        body = "".join(f"def f_{i}_{j}(x):\n    return x + {j}\n\n" for j in range(6))
        (folder / f"m{i:03d}.py").write_text(body)
    return folder


def tiny_config(tmp_path: Path, **overrides) -> JobConfig:
    """A debug-preset job over ``write_corpus``: seconds per run on one core."""
    corpus = tmp_path / "corpus"
    if not corpus.exists():
        write_corpus(corpus)
    settings = {
        "train.preset": "debug",
        "model.n_future": 2,
        "train.seq_len": 32,
        "train.batch_size": 4,
        "train.max_steps": 8,
        "train.warmup_steps": 2,
        "train.log_every": 1,
        "train.eval_every": 4,
        "train.eval_batches": 2,
        "train.checkpoint_every": 4,
        "train.loss_chunk_size": 48,
        "train.output_dir": str(tmp_path / "runs"),
        "data.source": str(corpus),
        "data.cache_dir": str(tmp_path / "cache"),
        "data.num_proc": 1,
        "data.val_fraction": 0.1,
        "tracking.run_name": "tiny",
    }
    settings.update(overrides)
    return build_config(overrides=settings)


def losses(history: list[dict], first_step: int = 0) -> dict[int, float]:
    """Per-step mean training loss from a run's history, from ``first_step`` on."""
    return {int(h["step"]): h["train/loss"] for h in history if h["step"] > first_step}
