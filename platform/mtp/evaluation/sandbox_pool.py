"""Score programs in sandboxes: locally on threads, or fanned out over a Ray cluster.

A scorer is a pool of sandbox workers, each a ``Sandbox`` (one warm zygote), opened
once and reused for every benchmark and temperature of a job, then closed. Verdicts
stream back as they finish.

On Ray, workers are actors sized to the cluster's free CPUs (one CPU each, spread over
the nodes); programs travel in small batches, two in flight per actor, so no worker
waits on a round trip. An actor that dies takes only its in-flight batches with it:
they are re-queued on a fresh actor, and every verdict already received is kept.
"""

from __future__ import annotations

import os
import queue
import sys
from collections import deque
from collections.abc import Callable, Sequence
from concurrent.futures import ThreadPoolExecutor, as_completed
from dataclasses import dataclass
from typing import Literal, Protocol

from mtp.sandbox import Limits, OracleProgram, Sandbox, SandboxConfig, SandboxUnavailable, Verdict


@dataclass(frozen=True)
class Program:
    key: str  # unique within one run, e.g. "HumanEval/0#3"
    source: str  # the whole program, for the in-process mode
    oracle: OracleProgram | None = None  # its trusted-oracle split; None: run ``source`` in-process

    def to_wire(self) -> tuple[str, str, dict | None]:
        return self.key, self.source, self.oracle.to_dict() if self.oracle else None


BACKENDS = ("auto", "ray", "local")
# A trusted-oracle program alternates between its two processes (tests, candidate), so one
# slot leaves its core idle at every call; two slots per core keep it busy. Each slot is
# capped at one CPU and timeouts count CPU time, so the extra slots cannot time anyone out.
LOCAL_SLOTS_PER_CPU = 2


@dataclass(frozen=True)
class RunnerConfig:
    backend: Literal["auto", "ray", "local"] = "auto"  # auto: see resolve_backend
    workers: int | None = None  # None: the cluster's free CPUs (ray) or LOCAL_SLOTS_PER_CPU per core (local)
    batch_size: int = 8
    max_attempts: int = 3  # per batch, when the worker running it dies
    start_timeout_s: float = 300.0  # for Ray to place and start every worker
    insecure: bool = False  # see mtp.sandbox: only where isolation is impossible, loudly

    def validate(self) -> "RunnerConfig":
        if self.backend not in BACKENDS:
            raise ValueError(f"RunnerConfig.backend={self.backend!r} must be one of {BACKENDS}")
        if self.workers is not None and self.workers < 1:
            raise ValueError(f"RunnerConfig.workers={self.workers} must be >= 1")
        if self.batch_size < 1 or self.max_attempts < 1:
            raise ValueError("RunnerConfig.batch_size and max_attempts must be >= 1")
        return self


OnResult = Callable[[str, Verdict], None]


class ProgramScorer(Protocol):
    """An open pool of sandbox slots (local or Ray actors) that scores programs; not a sweep's
    ``mtp.sweep.scorers.Scorer``, which scores a trained model."""

    def score(self, programs: Sequence[Program], limits: Limits, on_result: OnResult) -> dict[str, Verdict]: ...

    def close(self) -> None: ...


class SandboxWorker:
    """One sandbox slot; the Ray actor class (``ray.remote`` is applied at use)."""

    def __init__(self, insecure: bool = False):
        self.box = Sandbox(SandboxConfig(insecure=insecure))

    def run_batch(self, batch: list[tuple[str, str, dict | None]], limits: dict) -> list[tuple[str, dict]]:
        parsed = Limits.from_dict(limits)
        return [(key, self.box.run(source, parsed, OracleProgram.from_dict(oracle) if oracle else None).to_dict())
                for key, source, oracle in batch]

    def ready(self) -> bool:
        return True


def resolve_backend(backend: str) -> str:
    """``auto``: Ray when a cluster is running (or this process already joined one), else local workers.

    Without a cluster, a fresh Ray instance on this machine offers the same CPUs as local
    workers and costs seconds to start (about 12 s on a loaded 2-core VM), so local always
    wins there, whatever the job's size; a cluster brings other machines' CPUs and GPUs.
    """
    if backend != "auto":
        return backend
    from mtp.cluster import ray_env

    ray = sys.modules.get("ray")
    joined = ray is not None and ray.is_initialized()
    return "ray" if joined or ray_env.cluster_address() else "local"


class LocalScorer:
    """Sandboxes in this process, driven by a thread each."""

    def __init__(self, config: RunnerConfig):
        self.workers = config.workers or LOCAL_SLOTS_PER_CPU * (os.cpu_count() or 1)
        self._boxes: queue.Queue[Sandbox] = queue.Queue()
        # Started side by side: each start is mostly waiting on its two interpreters to load.
        with ThreadPoolExecutor(self.workers) as pool:
            starts = [pool.submit(Sandbox, SandboxConfig(insecure=config.insecure)) for _ in range(self.workers)]
        for start in starts:
            if start.exception() is None:
                self._boxes.put(start.result())
        failed = next((start.exception() for start in starts if start.exception() is not None), None)
        if failed is not None:
            self.close()
            raise failed

    def _run_one(self, program: Program, limits: Limits) -> tuple[str, Verdict]:
        box = self._boxes.get()
        try:
            return program.key, box.run(program.source, limits, program.oracle)
        finally:
            self._boxes.put(box)

    def score(self, programs: Sequence[Program], limits: Limits, on_result: OnResult) -> dict[str, Verdict]:
        results: dict[str, Verdict] = {}
        pool = ThreadPoolExecutor(self.workers)
        try:
            for future in as_completed([pool.submit(self._run_one, p, limits) for p in programs]):
                key, verdict = future.result()
                results[key] = verdict
                on_result(key, verdict)
        finally:  # an interrupt (Ctrl-C) waits only for the programs already running, not for every one queued
            pool.shutdown(wait=True, cancel_futures=True)
        return results

    def close(self) -> None:
        while not self._boxes.empty():
            self._boxes.get().close()


@dataclass
class _Batch:
    programs: list[Program]
    attempt: int = 0


class RayScorer:
    """Sandbox actors over the cluster; a dead actor is replaced and its batches re-run."""

    def __init__(self, config: RunnerConfig):
        import ray
        from ray.exceptions import GetTimeoutError, RayActorError

        from mtp.cluster import ray_env

        ray_env.connect()
        self.config = config
        cpus = int(ray_env.resources().get("CPU", 0))
        if config.workers and config.workers > cpus:
            raise ValueError(f"RunnerConfig.workers={config.workers} exceeds the cluster's {cpus} CPUs (one per worker)")
        free_cpus = int(ray_env.resources(available=True).get("CPU", 0)) or 1
        self._class = ray.remote(num_cpus=1, max_restarts=0, max_concurrency=1)(SandboxWorker)
        self.actors = [self._spawn() for _ in range(config.workers or free_cpus)]
        self.generation = [0] * len(self.actors)  # bumped when an actor is replaced
        try:  # fail here, once and clearly, rather than retrying batches on workers that cannot start
            ray.get([actor.ready.remote() for actor in self.actors], timeout=config.start_timeout_s)
        except (RayActorError, GetTimeoutError) as exc:
            self.close()
            raise SandboxUnavailable(f"{len(self.actors)} sandbox workers could not start on the cluster "
                                     f"within {config.start_timeout_s:g}s: {exc}") from exc

    def _spawn(self):
        return self._class.options(scheduling_strategy="SPREAD").remote(self.config.insecure)

    def _replace(self, index: int) -> None:
        import ray

        ray.kill(self.actors[index], no_restart=True)
        self.actors[index] = self._spawn()
        self.generation[index] += 1

    def score(self, programs: Sequence[Program], limits: Limits, on_result: OnResult) -> dict[str, Verdict]:
        import ray
        from ray.exceptions import RayActorError, WorkerCrashedError

        size = self.config.batch_size
        batches = deque(_Batch(list(programs[i:i + size])) for i in range(0, len(programs), size))
        load = [0] * len(self.actors)
        inflight: dict = {}  # ObjectRef -> (actor index, its generation, batch)
        results: dict[str, Verdict] = {}
        limits_dict = limits.to_dict()

        def submit() -> None:
            for index in sorted(range(len(self.actors)), key=load.__getitem__):
                while load[index] < 2 and batches:
                    batch = batches.popleft()
                    ref = self.actors[index].run_batch.remote([p.to_wire() for p in batch.programs], limits_dict)
                    inflight[ref] = (index, self.generation[index], batch)
                    load[index] += 1

        def record(key: str, verdict: Verdict) -> None:
            results[key] = verdict
            on_result(key, verdict)

        submit()
        while inflight:
            ready, _ = ray.wait(list(inflight), num_returns=1)
            index, born, batch = inflight.pop(ready[0])
            current = born == self.generation[index]
            if current:
                load[index] -= 1
            try:
                answers = ray.get(ready[0])
            except (RayActorError, WorkerCrashedError) as exc:  # the worker died; a bug in run_batch is raised
                if current:  # its other in-flight batch fails too: replace the actor once
                    self._replace(index)
                    load[index] = 0
                batch.attempt += 1
                if batch.attempt < self.config.max_attempts:
                    batches.appendleft(batch)
                else:
                    for program in batch.programs:
                        record(program.key, Verdict("crashed", f"sandbox worker died {batch.attempt} times: {type(exc).__name__}"))
            else:
                for key, verdict in answers:
                    record(key, Verdict.from_dict(verdict))
            submit()
        return results

    def close(self) -> None:
        import ray

        for actor in self.actors:
            ray.kill(actor, no_restart=True)


def open_scorer(config: RunnerConfig | None = None) -> ProgramScorer:
    """A worker pool for ``config.backend``; close it (or use ``score``) when done."""
    config = (config or RunnerConfig()).validate()
    return RayScorer(config) if resolve_backend(config.backend) == "ray" else LocalScorer(config)


def score(programs: Sequence[Program], limits: Limits, config: RunnerConfig | ProgramScorer | None = None,
          on_result: OnResult | None = None) -> dict[str, Verdict]:
    """key -> verdict for every program, on an open scorer or a pool opened for this call.

    ``on_result`` is called as each verdict arrives.
    """
    keys = [p.key for p in programs]
    if len(set(keys)) != len(keys):
        raise ValueError("program keys must be unique")
    limits.validate()
    if not programs:
        return {}
    callback = on_result or (lambda key, verdict: None)
    if config is not None and not isinstance(config, RunnerConfig):
        return config.score(programs, limits, callback)
    scorer = open_scorer(config)
    try:
        return scorer.score(programs, limits, callback)
    finally:
        scorer.close()
