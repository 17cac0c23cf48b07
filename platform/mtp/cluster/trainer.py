"""``TorchTrainer`` for ``mtp.train``: workers, failures, checkpoints, placement, and one fit."""

from __future__ import annotations

import contextlib
import math
import os
import sys
import tempfile
import time
from pathlib import Path
from typing import Any, Callable, Iterator, Sequence

import ray
import ray.train
from ray.train.torch import TorchConfig, TorchTrainer

from mtp.cluster import logs, ray_env
from mtp.config import JobConfig, ScalingConfig, from_dict
from mtp.parallel import DistInfo, dist_info
from mtp.tracking.runs import MLflowCallback, init_dir
from mtp.tracking.store import tracking_uri
from mtp.train import train


class PlacementError(RuntimeError):
    """The cluster cannot place the requested workers."""


def worker_resources(scaling: ScalingConfig) -> dict[str, float]:
    resources = {"CPU": scaling.cpus_per_worker}
    if scaling.use_gpu:
        resources["GPU"] = scaling.gpus_per_worker
    return {k: v for k, v in resources.items() if v > 0}


def fitting_workers(scaling: ScalingConfig, nodes: list[ray_env.Node]) -> int:
    """How many workers of ``scaling``'s size the ``nodes`` (with the resources given) hold at once."""
    need = worker_resources(scaling)
    return sum(min((math.floor(node.resources.get(k, 0) / v + 1e-9) for k, v in need.items()),
                   default=scaling.num_workers) for node in nodes)


def check_placement(scaling: ScalingConfig, timeout_s: float = 30.0) -> None:
    """Fail before any work when the live nodes cannot hold ``num_workers`` workers at once."""
    need = worker_resources(scaling)
    try:
        nodes = ray_env.nodes(timeout_s)
    except ray_env.ClusterQueryError as exc:  # a pre-flight check must not stop (or hang) a job
        print(f"warning: skipping the placement check: {exc}", file=sys.stderr)
        return
    capacity = fitting_workers(scaling, nodes)
    if capacity < scaling.num_workers:
        totals = ", ".join(f"{k}={sum(n.resources.get(k, 0) for n in nodes):g}" for k in need)
        raise PlacementError(
            f"scaling.num_workers={scaling.num_workers} with {need} per worker cannot be placed: "
            f"the cluster ({len(nodes)} node(s), {totals}) fits {capacity} such worker(s)"
        )


def wait_for_placement(scaling: ScalingConfig, wait_s: float = 0.0, poll_s: float = 2.0, timeout_s: float = 30.0) -> None:
    """Check that the workers fit in what is free now (not just in the cluster's total), waiting
    up to ``wait_s`` with one line that says who holds the rest; raise PlacementError after that.

    Without this, Ray Train waits for the resources itself and prints a 30-line
    ``WorkerGroupStartupTimeoutError`` every minute, for ever.
    """
    deadline, announced = time.monotonic() + wait_s, False
    while True:
        try:
            free = ray_env.free_nodes(timeout_s)
        except ray_env.ClusterQueryError as exc:
            print(f"warning: skipping the free-resources check: {exc}", file=sys.stderr)
            return
        fits = fitting_workers(scaling, free)
        if fits >= scaling.num_workers:
            if announced:
                print(f"resources free after {wait_s - (deadline - time.monotonic()):.0f} s: starting", flush=True)
            return
        need = worker_resources(scaling)
        held = _held_by(tuple(need), timeout_s)
        what = (f"scaling.num_workers={scaling.num_workers} with {need} each: only "
                f"{', '.join(f'{k}={sum(n.resources.get(k, 0) for n in free):g}' for k in need)} is free now "
                f"(room for {fits} worker(s)); the rest is held by {held}")
        if time.monotonic() >= deadline:
            hint = "wait for them with --wait-for-resources SECONDS, " if wait_s == 0 else ""
            raise PlacementError(f"{what}; {hint}free them, or lower --num-workers")
        if not announced:
            print(f"waiting up to {wait_s:g} s for resources: {what}", flush=True)
            announced = True
        time.sleep(poll_s)


def _held_by(names: tuple[str, ...], timeout_s: float) -> str:
    """``ServeReplica:app:Model (CPU 1), ...`` for the console, or why it is not known."""
    try:
        held = ray_env.holders(names, timeout_s)
    except ray_env.ClusterQueryError:
        return "(could not list Ray's actors)"
    if not held:
        return "tasks or other drivers (no actor holds them)"
    return ", ".join(f"{who} ({', '.join(f'{k} {v:g}' for k, v in amounts.items())})"
                     for who, amounts in sorted(held.items()))


class RayCheckpoints:
    """``mtp.train.CheckpointStore`` over Ray Train: report to storage, restore on restart.

    Every rank writes into its own temporary folder and calls ``ray.train.report``
    (Ray requires all to); Ray merges the folders of the ranks that wrote something
    (rank 0 under DDP, every rank's shards under FSDP) into one checkpoint.
    """

    @contextlib.contextmanager
    def latest(self) -> Iterator[Path | None]:
        checkpoint = ray.train.get_checkpoint()
        if checkpoint is None:
            yield None
            return
        with checkpoint.as_directory() as directory:
            yield Path(directory)

    def save(self, step: int, write: Callable[[Path], None], metrics: dict[str, float], info: DistInfo) -> Path | None:
        with tempfile.TemporaryDirectory() as tmp:
            directory = Path(tmp) / "checkpoint"
            write(directory)
            checkpoint = ray.train.Checkpoint.from_directory(str(directory)) if directory.is_dir() else None
            ray.train.report(metrics, checkpoint=checkpoint, checkpoint_dir_name=f"checkpoint_{step:06d}")
        return None


def worker_loop(payload: dict[str, Any]) -> None:
    """What each Ray Train worker runs: rebuild the config, train, log from rank 0.

    ``payload["resume_from"]`` (a checkpoint path on storage every worker can read)
    is where a ``--resume`` job starts; Ray's own latest checkpoint wins after a restart.
    ``payload["callbacks"]`` are further rank-0 callbacks (mtp.bench.loop times the loop with one).
    """
    logs.quiet_process()
    cfg = from_dict(payload["config"])
    callbacks = list(payload.get("callbacks", ())) if dist_info().is_main else []
    if dist_info().is_main and cfg.tracking.run_id:
        restarted = _restarted(payload.get("resume_from"))
        resumed = restarted or payload.get("resume_from") is not None
        callbacks.append(MLflowCallback(cfg.tracking.run_id, tracking_uri(cfg.tracking), resumed=resumed,
                                        restarted=restarted))
    try:
        train(cfg, resume_from=payload.get("resume_from"), callbacks=callbacks, store=RayCheckpoints(),
              init_dir=init_dir(cfg))
    finally:
        for callback in callbacks:
            callback.close()


def _restarted(resume_from: str | None) -> bool:
    """Whether Ray restarted the worker group after a failure: it hands the workers a checkpoint,
    other than the one a ``--resume`` in the same run directory starts from (Ray restores that too)."""
    checkpoint = ray.train.get_checkpoint()
    if checkpoint is None:
        return False
    return resume_from is None or os.path.realpath(checkpoint.path) != os.path.realpath(resume_from)


def build_trainer(
    cfg: JobConfig,
    storage_path: str | Path,
    resume_from: str | Path | None = None,
    callbacks: Sequence[Any] = (),
    controller_callbacks: Sequence[ray.train.UserCallback] = (),
) -> TorchTrainer:
    """A ``TorchTrainer`` running ``worker_loop`` as ``cfg.scaling`` asks.

    ``callbacks`` (picklable ``mtp.train.TrainCallback``s) run on rank 0; ``controller_callbacks``
    run on the Train controller (a sweep forwards reports to Tune with one).
    """
    scaling = cfg.scaling
    return TorchTrainer(
        worker_loop,
        train_loop_config={
            "config": cfg.to_dict(),
            "resume_from": str(resume_from) if resume_from else None,
            "callbacks": list(callbacks),
        },
        torch_config=TorchConfig(backend="nccl" if scaling.use_gpu else "gloo"),
        scaling_config=ray.train.ScalingConfig(
            num_workers=scaling.num_workers, use_gpu=scaling.use_gpu, resources_per_worker=worker_resources(scaling)
        ),
        run_config=ray.train.RunConfig(
            name=cfg.tracking.run_name,
            storage_path=str(storage_path),
            failure_config=ray.train.FailureConfig(max_failures=scaling.max_failures),
            checkpoint_config=ray.train.CheckpointConfig(num_to_keep=2),
            logging_config=logs.train_logging_config(),
            callbacks=list(controller_callbacks),
        ),
    )


@contextlib.contextmanager
def fit_on_workers(
    cfg: JobConfig,
    storage_path: str | Path,
    resume_from: str | Path | None = None,
    controller_callbacks: Sequence[ray.train.UserCallback] = (),
) -> Iterator[tuple[Path | None, ray.train.Result]]:
    """Train on Ray Train workers; yields the final checkpoint as a local directory, and Ray's result.

    The run is ``<storage_path>/<tracking.run_name>``: a rerun under the same name resumes
    it from its last reported checkpoint. A failed fit raises its error.
    """
    result = build_trainer(cfg, storage_path, resume_from, controller_callbacks=controller_callbacks).fit()
    if result.error is not None:
        raise result.error
    if result.checkpoint is None:
        yield None, result
        return
    with result.checkpoint.as_directory() as directory:
        yield Path(directory), result
