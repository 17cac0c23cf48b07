"""n samples per problem from a checkpoint, with ``mtp.decoding.Engine``; on Ray GPUs where there are any.

Problems are sharded over one Ray task per GPU (or one CPU task without GPUs); each
task loads the engine once and generates its shard in engine-sized batches. Seeds are
derived from (base seed, task_id, sample index), so a rerun gives the same samples.
"""

from __future__ import annotations

import sys
import time
from dataclasses import dataclass, field
from typing import Literal

from mtp.decoding.config import EngineConfig
from mtp.evaluation.benchmarks import Benchmark, Problem
from mtp.evaluation.sandbox_pool import BACKENDS, resolve_backend

MIN_NEW_TOKENS = 16


@dataclass(frozen=True)
class GenerationConfig:
    n_samples: int = 1
    temperature: float = 0.0
    top_p: float = 1.0
    top_k: int | None = None
    max_new_tokens: int = 512
    seed: int = 0
    stop: tuple[str, ...] | None = None  # None: the benchmark's protocol (e.g. HumanEval's "\ndef", MBPP's [DONE])
    speculative: bool = True  # draft with the extra heads (same distribution, fewer forwards)
    allow_truncation: bool = False  # generate even where prompt + max_new_tokens exceeds the model's context
    backend: Literal["auto", "ray", "local"] = "auto"  # auto: Ray when a cluster runs (sandbox_pool.resolve_backend)
    engine: EngineConfig = EngineConfig(max_batch_size=16)  # device auto: cuda when the worker has a GPU, else cpu

    def validate(self) -> "GenerationConfig":
        if self.n_samples < 1 or self.max_new_tokens < 1:
            raise ValueError("n_samples and max_new_tokens must be >= 1")
        self.engine.validate()
        if self.n_samples > 1 and self.temperature == 0:
            raise ValueError(f"n_samples={self.n_samples} with temperature 0 gives {self.n_samples} identical greedy samples")
        if self.backend not in BACKENDS:
            raise ValueError(f"backend={self.backend!r} must be one of {BACKENDS}")
        return self


class ContextError(ValueError):
    """The model's context cannot hold the benchmark's prompts plus ``max_new_tokens``."""


def token_budget(prompt_tokens: int, max_new_tokens: int, context: int) -> tuple[int, int]:
    """(prompt tokens kept, new tokens allowed) within ``context``.

    Generate up to max_new_tokens, within the context; a prompt too long to leave even
    MIN_NEW_TOKENS keeps its end (the part the completion continues).
    """
    room = min(max_new_tokens, max(context - prompt_tokens, min(MIN_NEW_TOKENS, context - 1)))
    return min(prompt_tokens, context - room), room


@dataclass
class ContextFit:
    """How a benchmark's prompts fit a model's context at ``max_new_tokens``."""

    context: int
    max_new_tokens: int
    problems: int
    truncated: list[str] = field(default_factory=list)  # task ids whose prompt would lose its start
    clipped: list[str] = field(default_factory=list)  # task ids allowed fewer than max_new_tokens

    @property
    def fits(self) -> bool:
        return not self.truncated and not self.clipped

    def describe(self, benchmark: str) -> str:
        return (f"{benchmark}: {len(self.clipped)} of {self.problems} prompts + max_new_tokens={self.max_new_tokens} "
                f"exceed the model's context of {self.context} tokens ({len(self.truncated)} prompts would be cut "
                f"at the start, {len(self.clipped)} generations clipped below max_new_tokens)")


def context_fit(checkpoint: str, benchmark: Benchmark, max_new_tokens: int) -> ContextFit:
    """Check every prompt against the checkpoint's context, before any generation (tokenizer only)."""
    from mtp.checkpoint import model_config
    from mtp.tracking.registry import resolve_checkpoint
    from mtp.tokenizer import load_tokenizer

    directory = resolve_checkpoint(checkpoint)
    context, tokenizer = model_config(directory).max_seq_len, load_tokenizer(directory)
    fit = ContextFit(context, max_new_tokens, len(benchmark.problems))
    for problem in benchmark.problems:
        length = len(tokenizer.encode(problem.prompt))
        kept, room = token_budget(length, max_new_tokens, context)
        if kept < length:
            fit.truncated.append(problem.task_id)
        if room < max_new_tokens:
            fit.clipped.append(problem.task_id)
    return fit


class GenerationProgress:
    """``humaneval T=0.2: 640/3280 samples, 4.1/s, about 10.7 min left``, at most every ``every_s``:
    generation can run for minutes with nothing else to say."""

    def __init__(self, label: str, every_s: float = 15.0):
        self.label, self.every_s = label, every_s
        self.start = self.last = time.monotonic()

    def __call__(self, done: int, total: int) -> None:
        now = time.monotonic()
        if now - self.last < self.every_s or done >= total:
            return
        self.last = now
        rate = done / (now - self.start)
        print(f"{self.label}: {done}/{total} samples, {rate:.1f}/s, about {(total - done) / rate / 60:.1f} min left",
              flush=True)


def generate_shard(checkpoint: str, problems: list[Problem], stop: list[str], config: GenerationConfig,
                   label: str | None = None) -> list[dict]:
    """[{task_id, sample_index, completion, finish_reason, prompt_truncated, clipped}] for one shard,
    in one process; with a ``label``, its progress on the console (``GenerationProgress``)."""
    from mtp.decoding import Engine, SamplingParams
    from mtp.decoding.api import derive_seed
    from mtp.tracking.registry import resolve_checkpoint

    engine = Engine.from_checkpoint(str(resolve_checkpoint(checkpoint)), config.engine)
    limit = engine.cfg.max_seq_len
    ids, params, keys, flags = [], [], [], {}
    for problem in problems:
        prompt = engine.tokenizer.encode(problem.prompt)
        kept, room = token_budget(len(prompt), config.max_new_tokens, limit)
        flags[problem.task_id] = {"prompt_truncated": kept < len(prompt), "clipped": room < config.max_new_tokens}
        prompt = prompt[len(prompt) - kept:]
        for index in range(config.n_samples):
            ids.append(prompt)
            params.append(SamplingParams(
                max_new_tokens=room, temperature=config.temperature, top_k=config.top_k, top_p=config.top_p,
                stop=list(stop), seed=derive_seed(config.seed, problem.task_id, index), speculative=config.speculative,
            ))
            keys.append((problem.task_id, index))
    generations = engine.generate_ids(ids, params, GenerationProgress(label) if label else None)
    return [
        {"task_id": task_id, "sample_index": index, "completion": g.text, "finish_reason": g.finish_reason,
         **flags[task_id]}
        for (task_id, index), g in zip(keys, generations)
    ]


def generate_samples(checkpoint: str, benchmark: Benchmark, config: GenerationConfig) -> list[dict]:
    """Samples for every problem, ordered by (problem, sample index).

    Raises ContextError when prompts + max_new_tokens do not fit the model's context,
    unless ``config.allow_truncation``; then warns once, with the counts, and each
    sample records ``prompt_truncated`` and ``clipped``.
    """
    config.validate()
    fit = context_fit(checkpoint, benchmark, config.max_new_tokens)
    if not fit.fits:
        if not config.allow_truncation:
            raise ContextError(fit.describe(benchmark.name) + "; use a model with a longer max_seq_len, a smaller "
                               "--max-new-tokens, or --allow-truncation to score it anyway")
        print(f"warning: {fit.describe(benchmark.name)}", file=sys.stderr)
    stop = list(config.stop) if config.stop is not None else benchmark.stop
    label = f"generating {benchmark.name} T={config.temperature:g}"
    if resolve_backend(config.backend) == "local":
        return generate_shard(checkpoint, benchmark.problems, stop, config, label)
    import ray

    from mtp.cluster import ray_env

    ray_env.connect()
    gpus = int(ray_env.resources().get("GPU", 0))
    shards = max(1, min(gpus, len(benchmark.problems)))
    task = ray.remote(generate_shard).options(num_gpus=1 if gpus else 0, num_cpus=1, max_retries=2)
    refs = [
        task.remote(checkpoint, benchmark.problems[i::shards], stop, config,
                    label if shards == 1 else f"{label} (shard {i + 1} of {shards})") for i in range(shards)
    ]
    rows = [row for shard in ray.get(refs) for row in shard]
    order = {p.task_id: i for i, p in enumerate(benchmark.problems)}
    return sorted(rows, key=lambda r: (order[r["task_id"]], r["sample_index"]))
