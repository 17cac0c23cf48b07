"""What one trial reserves, whether the cluster can ever place it, and how many fit at once.

A multi-worker trial is a small process (the Tune function trainable) that starts a
Ray Train run with ``scaling.num_workers`` workers. Its own bundle must not hold the
CPUs its workers need: with Tune's default of 1 CPU per trial, two trials on a 2-CPU
machine take both CPUs and their workers wait forever. So that process reserves only
``resources.trial`` (a token amount of memory by default). A 1-worker trial trains in
its own process, so its bundle is the worker's (``scaling.cpus_per_worker``, plus
``gpus_per_worker`` with ``use_gpu``). Concurrency defaults to what the cluster fits.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

from mtp.cluster import ray_env
from mtp.cluster.trainer import worker_resources
from mtp.config import JobConfig
from mtp.sweep.spec import SweepError, SweepSpec


@dataclass(frozen=True)
class TrialDemand:
    """Resources of one trial: its own bundle plus ``num_workers`` identical worker bundles."""

    trial: dict[str, float]
    worker: dict[str, float]
    num_workers: int

    @classmethod
    def of(cls, spec: SweepSpec, cfg: JobConfig) -> "TrialDemand":
        worker = worker_resources(cfg.scaling)
        if runs_inline(cfg):  # the trial process is the worker (Tune rejects an empty bundle)
            return cls(worker or spec.trial_resources, {}, 0)
        return cls(spec.trial_resources, worker, cfg.scaling.num_workers)

    @property
    def total(self) -> dict[str, float]:
        total = dict(self.trial)
        for name, amount in self.worker.items():
            total[name] = total.get(name, 0.0) + amount * self.num_workers
        return total

    def describe(self) -> str:
        return f"trial {_fmt(self.trial)} + {self.num_workers} worker(s) x {_fmt(self.worker)}"


def runs_inline(cfg: JobConfig) -> bool:
    """A 1-worker trial trains in its own process: no Ray Train start-up, no nested placement."""
    return cfg.scaling.num_workers == 1


def trial_bundle(spec: SweepSpec, params: dict) -> dict[str, float]:
    """What Tune reserves for the trial process with these sampled ``params``."""
    return TrialDemand.of(spec, spec.base(dict(params))).trial


def check_feasible(
    demands: list[TrialDemand],
    cluster: dict[str, float],
    nodes: list[dict[str, float]],
) -> None:
    """Raise SweepError if some trial needs more than the cluster has, in total or on one node."""
    for demand in demands:
        for name, amount in demand.total.items():
            have = cluster.get(name, 0.0)
            if amount > have:
                raise SweepError(
                    f"a trial needs {name}={amount:g} ({demand.describe()}) but the cluster has {name}={have:g}; "
                    f"lower scaling.num_workers / scaling.cpus_per_worker / resources.trial, "
                    f"or add nodes"
                )
        for bundle, what in ((demand.trial, "the trial process"), (demand.worker, "one worker")):
            if bundle and not any(_fits(bundle, node) for node in nodes):
                raise SweepError(f"no single node can hold {what}: {_fmt(bundle)}")


def fitting_concurrency(demands: list[TrialDemand], cluster: dict[str, float]) -> int:
    """How many of the largest trials the cluster runs side by side (at least 1)."""
    worst: dict[str, float] = {}
    for demand in demands:
        for name, amount in demand.total.items():
            worst[name] = max(worst.get(name, 0.0), amount)
    limits = [math.floor(cluster.get(name, 0.0) / amount + 1e-9) for name, amount in worst.items() if amount > 0]
    return max(1, min(limits, default=1))


def cluster_view() -> tuple[dict[str, float], list[dict[str, float]]]:
    """Total resources and each alive node's resources, from the connected Ray cluster."""
    alive = ray_env.nodes()  # one snapshot for both, so they cannot disagree
    return ray_env.total_resources(alive), [node.resources for node in alive]


def _fits(bundle: dict[str, float], node: dict[str, float]) -> bool:
    return all(node.get(name, 0.0) >= amount for name, amount in bundle.items())


def _fmt(bundle: dict[str, float]) -> str:
    return "{" + ", ".join(f"{k}: {v:g}" for k, v in sorted(bundle.items())) + "}"
