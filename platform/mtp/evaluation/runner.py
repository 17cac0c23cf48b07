"""Score programs in sandboxes: locally on threads, or fanned out over a Ray cluster.

Both backends keep one ``Sandbox`` (a warm zygote) per worker and stream verdicts back
as they finish. On Ray, workers are actors sized to the cluster's free CPUs; programs
travel in small batches, two in flight per actor so no worker waits on a round trip.
An actor that dies takes only its in-flight batches with it: they are re-queued on a
fresh actor, and every verdict already received is kept.
"""

from __future__ import annotations

import os
import queue
from collections import deque
from collections.abc import Callable, Sequence
from concurrent.futures import ThreadPoolExecutor, as_completed
from dataclasses import dataclass
from typing import Literal

from mtp.sandbox import Limits, Sandbox, SandboxConfig, Verdict
from mtp.sandbox.sandbox import SOURCE_ROOT


@dataclass(frozen=True)
class Program:
    key: str  # unique within one run, e.g. "HumanEval/0#3"
    source: str


@dataclass(frozen=True)
class RunnerConfig:
    backend: Literal["ray", "local"] = "ray"
    workers: int | None = None  # None: the cluster's free CPUs (ray) or os.cpu_count() (local)
    batch_size: int = 8
    max_attempts: int = 3  # per batch, when the worker running it dies
    insecure: bool = False  # see mtp.sandbox: only where isolation is impossible, loudly

    def validate(self) -> "RunnerConfig":
        if self.backend not in ("ray", "local"):
            raise ValueError(f"RunnerConfig.backend={self.backend!r} must be 'ray' or 'local'")
        if self.workers is not None and self.workers < 1:
            raise ValueError(f"RunnerConfig.workers={self.workers} must be >= 1")
        if self.batch_size < 1 or self.max_attempts < 1:
            raise ValueError("RunnerConfig.batch_size and max_attempts must be >= 1")
        return self


OnResult = Callable[[str, Verdict], None]


class SandboxWorker:
    """One sandbox slot; the Ray actor class (``ray.remote`` is applied at use)."""

    def __init__(self, insecure: bool = False):
        self.box = Sandbox(SandboxConfig(insecure=insecure))

    def run_batch(self, batch: list[tuple[str, str]], limits: dict) -> list[tuple[str, dict]]:
        parsed = Limits.from_dict(limits)
        return [(key, self.box.run(source, parsed).to_dict()) for key, source in batch]

    def pid(self) -> int:
        return os.getpid()


def ensure_ray() -> None:
    """Join the cluster (RAY_ADDRESS or a local ``ray start``), else start a local instance."""
    import ray

    if ray.is_initialized():
        return
    if os.environ.get("RAY_ADDRESS"):
        ray.init()
    else:  # a fresh local instance: its workers must import mtp from this checkout
        ray.init(runtime_env={"env_vars": {"PYTHONPATH": SOURCE_ROOT}}, include_dashboard=False)


def score(programs: Sequence[Program], limits: Limits, config: RunnerConfig | None = None,
          on_result: OnResult | None = None) -> dict[str, Verdict]:
    """key -> verdict for every program; ``on_result`` is called as each one arrives."""
    config = (config or RunnerConfig()).validate()
    keys = [p.key for p in programs]
    if len(set(keys)) != len(keys):
        raise ValueError("program keys must be unique")
    if not programs:
        return {}
    run = _score_on_ray if config.backend == "ray" else _score_locally
    return run(list(programs), limits.validate(), config, on_result or (lambda key, verdict: None))


def _score_locally(programs: list[Program], limits: Limits, config: RunnerConfig, on_result: OnResult) -> dict[str, Verdict]:
    workers = min(config.workers or os.cpu_count() or 1, len(programs))
    boxes: queue.Queue[Sandbox] = queue.Queue()
    for _ in range(workers):
        boxes.put(Sandbox(SandboxConfig(insecure=config.insecure)))

    def run_one(program: Program) -> tuple[str, Verdict]:
        box = boxes.get()
        try:
            return program.key, box.run(program.source, limits)
        finally:
            boxes.put(box)

    results: dict[str, Verdict] = {}
    try:
        with ThreadPoolExecutor(workers) as pool:
            for future in as_completed([pool.submit(run_one, p) for p in programs]):
                key, verdict = future.result()
                results[key] = verdict
                on_result(key, verdict)
    finally:
        while not boxes.empty():
            boxes.get().close()
    return results


@dataclass
class _Batch:
    programs: list[Program]
    attempt: int = 0


def _score_on_ray(programs: list[Program], limits: Limits, config: RunnerConfig, on_result: OnResult) -> dict[str, Verdict]:
    import ray
    from ray.exceptions import RayActorError, WorkerCrashedError

    lost = (RayActorError, WorkerCrashedError)  # the worker died; a bug in run_batch is re-raised
    ensure_ray()
    free_cpus = int(ray.available_resources().get("CPU", 0)) or 1
    batches = deque(_Batch(list(programs[i:i + config.batch_size])) for i in range(0, len(programs), config.batch_size))
    n_actors = min(config.workers or free_cpus, len(batches))
    actor_class = ray.remote(num_cpus=1, max_restarts=0, max_concurrency=1)(SandboxWorker)
    spawn = lambda: actor_class.options(scheduling_strategy="SPREAD").remote(config.insecure)  # noqa: E731
    actors = [spawn() for _ in range(n_actors)]
    generation = [0] * n_actors  # bumped when an actor is replaced
    inflight: dict = {}  # ObjectRef -> (actor index, its generation, batch)
    load = [0] * n_actors
    results: dict[str, Verdict] = {}
    limits_dict = limits.to_dict()

    def submit() -> None:
        for index in sorted(range(n_actors), key=load.__getitem__):
            while load[index] < 2 and batches:
                batch = batches.popleft()
                ref = actors[index].run_batch.remote([(p.key, p.source) for p in batch.programs], limits_dict)
                inflight[ref] = (index, generation[index], batch)
                load[index] += 1

    try:
        submit()
        while inflight:
            ready, _ = ray.wait(list(inflight), num_returns=1)
            index, born, batch = inflight.pop(ready[0])
            if born == generation[index]:
                load[index] -= 1
            try:
                answers = ray.get(ready[0])
            except lost as exc:
                if born == generation[index]:  # its other in-flight batch fails too: replace once
                    ray.kill(actors[index], no_restart=True)
                    actors[index], generation[index], load[index] = spawn(), generation[index] + 1, 0
                batch.attempt += 1
                if batch.attempt < config.max_attempts:
                    batches.appendleft(batch)
                else:
                    for program in batch.programs:
                        verdict = Verdict("crashed", f"sandbox worker died {batch.attempt} times: {type(exc).__name__}")
                        results[program.key] = verdict
                        on_result(program.key, verdict)
            else:
                for key, verdict_dict in answers:
                    results[key] = Verdict.from_dict(verdict_dict)
                    on_result(key, results[key])
            submit()
    finally:
        for actor in actors:
            ray.kill(actor, no_restart=True)
    return results
