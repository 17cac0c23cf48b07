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
    return {int(h["step"]): h["train/loss_mean"] for h in history if h["step"] > first_step}


# ------------------------------------------------------------ plain process groups


def free_port() -> int:
    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _rank_entry(rank, world_size, port, fn, args, out):
    import os

    import torch
    import torch.distributed as dist

    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    torch.set_num_threads(1)  # as a 1-CPU Ray worker runs
    dist.init_process_group("gloo", rank=rank, world_size=world_size)
    try:
        torch.save(fn(*args), Path(out) / f"{rank}.pt")
    finally:
        dist.destroy_process_group()


def run_ranks(fn, world_size: int, *args) -> list:
    """Run ``fn(*args)`` in ``world_size`` fresh processes joined by a gloo group; return each rank's result."""
    import tempfile

    import torch
    import torch.multiprocessing as mp

    with tempfile.TemporaryDirectory() as out:
        mp.spawn(_rank_entry, args=(world_size, free_port(), fn, args, out), nprocs=world_size, join=True)
        return [torch.load(Path(out) / f"{r}.pt", weights_only=False) for r in range(world_size)]


def step_gradients(cfg_dict: dict) -> dict:
    """One step's synced gradients on this rank, and how many all-reduces produced them."""
    import tempfile

    import torch.distributed as dist

    from mtp.config import from_dict
    from mtp.data import prepare_data
    from mtp.train import LocalCheckpoints, Trainer

    cfg = from_dict(cfg_dict)
    trainer = Trainer(cfg, prepare_data(cfg.data, cfg.train.seq_len), LocalCheckpoints(tempfile.mkdtemp()), [])
    calls = []
    original = dist.all_reduce
    dist.all_reduce = lambda *a, **k: (calls.append(1), original(*a, **k))[1]
    try:
        trainer.accumulate_gradients()
    finally:
        dist.all_reduce = original
    return {"grads": {n: p.grad.clone() for n, p in trainer.model.named_parameters()}, "all_reduce_calls": len(calls)}


def train_history(cfg_dict: dict) -> list[dict]:
    """A complete plain-process run's logged history (rank 0's; empty elsewhere)."""
    from mtp.config import from_dict
    from mtp.train import train

    return train(from_dict(cfg_dict)).history


def ddp_fsdp_and_resumed_runs(cfg_dict: dict) -> dict:
    """In one process group: a DDP run, the same run under FSDP2, and FSDP resumed from its midway checkpoint."""
    from mtp.config import apply_overrides, from_dict
    from mtp.train import train

    def run(run_name: str, strategy: str, resume_from=None):
        cfg = apply_overrides(from_dict(cfg_dict), {"tracking.run_name": run_name, "scaling.strategy": strategy})
        return train(cfg, resume_from=resume_from)

    ddp = run("ddp", "ddp")
    fsdp = run("fsdp", "fsdp")
    midway = Path(cfg_dict["train"]["output_dir"]) / "fsdp" / "checkpoints" / "step_000004"
    resumed = run("fsdp-resumed", "fsdp", resume_from=midway)
    return {"ddp": ddp.history, "fsdp": fsdp.history, "resumed": resumed.history, "checkpoint": fsdp.checkpoint}
