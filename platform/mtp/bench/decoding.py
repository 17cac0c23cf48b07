"""What ``jobs/bench_decoding.py`` and ``jobs/bench_serve.py`` measure, as functions.

* ``speculation``: ``mtp.decoding.metrics.compare`` (vanilla vs self-speculative on the
  same prompts, interleaved chunk by chunk) at each batch size and a draft tree, with
  the heads' teacher-forced promise and the efficiency against the ideal speedup;
* ``peers``: the engine against Hugging Face ``transformers`` on the same head-0
  weights (``mtp.bench.peers``), every method run on each chunk in turn.

Prompts are HumanEval's (``mtp.evaluation.benchmarks``); the default model is a
small one trained once with ``mtp.train`` and cached.
"""

from __future__ import annotations

import dataclasses
import time
from pathlib import Path
from typing import Callable, Sequence

import torch

from mtp.decoding.api import SamplingParams, derive_seed
from mtp.decoding.config import EngineConfig
from mtp.decoding.engine import Engine
from mtp.decoding.metrics import compare, distinct_ngrams, mean_se, teacher_forced, timed
from mtp.tokenizer import Tokenizer

EFFICIENCY_TARGET = 0.85
# The paper's parameter-matched layout: n_layers - n_future trunk blocks, so the trunk stays
# deep relative to the heads. CPU: minutes on 2 cores; CUDA: a few minutes on one GPU,
# byte-level with 8 heads as in the paper's byte-level experiments.
TRAINING = {
    "cpu": {  # narrow, so that a step is bound by per-call overhead rather than this CPU's FLOPs
        "train.preset": "tiny", "model.dim": 64, "model.n_heads": 4, "model.n_layers": 12, "model.n_future": 4,
        "model.param_matched": True, "model.multiple_of": 32, "train.seq_len": 256, "train.batch_size": 16,
        "train.max_steps": 250, "train.warmup_steps": 25, "train.eval_every": 125, "train.checkpoint_every": 125,
        "data.max_documents": 2000,
    },
    "cuda": {
        "train.preset": "small", "model.dim": 512, "model.n_layers": 20, "model.n_heads": 8, "model.n_future": 8,
        "model.param_matched": True, "model.max_seq_len": 1024, "train.seq_len": 1024, "train.batch_size": 32,
        "train.max_steps": 1500, "train.lr": 2e-3, "train.warmup_steps": 100, "train.eval_every": 500,
        "train.checkpoint_every": 500, "train.device": "cuda",
    },
}


def default_checkpoint(device: str, runs: Path) -> str:
    """A small model trained with ``mtp.train`` on the default corpus, once, reused from ``runs``."""
    run = runs / f"bench-decoding-{device}"
    final = run / "final"
    if (final / "config.json").is_file():
        return str(final)
    from mtp.checkpoint import load_model, save_checkpoint
    from mtp.config import build_config
    from mtp.train import train

    print(f"no checkpoint given: training a small model into {run} (once)", flush=True)
    cfg = build_config(overrides={**TRAINING[device], "train.output_dir": str(runs), "tracking.run_name": run.name})
    result = train(cfg)
    model, tokenizer, config = load_model(result.checkpoint)
    save_checkpoint(final, model, config, tokenizer)
    return str(final)


def humaneval_prompts(tokenizer: Tokenizer, count: int, room: int) -> list[list[int]]:
    """HumanEval prompts, cut from the left to leave room for the generation in the context."""
    from mtp.evaluation.benchmarks import humaneval

    return [tokenizer.encode(p.prompt)[-room:] for p in humaneval().problems[:count]]


def heldout_code(tokenizer: Tokenizer, count: int, limit: int) -> list[list[int]]:
    """Real code the model never trained on: HumanEval prompts with their canonical solutions."""
    from mtp.evaluation.benchmarks import humaneval

    return [tokenizer.encode(p.prompt + p.canonical_solution)[:limit] for p in humaneval().problems[-count:]]


def with_efficiency(row: dict[str, object], layer_ratio: float) -> dict[str, object]:
    """Measured speedup over the ideal one: end to end, and for the decode steps alone (the
    ideal is a per-step model; the prefill, which speculation cannot shorten, is outside it)."""
    row["ideal_speedup"] = row["tokens_per_forward"] * layer_ratio
    row["efficiency"] = row["speedup"] / row["ideal_speedup"]
    row["decode_efficiency"] = row["decode_speedup"] / row["ideal_speedup"]
    return row


# ------------------------------------------------------------------------------ peers

# (a chunk of prompts, the index of its first prompt) -> (tokens per prompt, seconds)
Generate = Callable[[list[list[int]], int], tuple[list[list[int]], float]]


def _engine_method(engine: Engine, max_new_tokens: int, temperature: float, speculative: bool) -> Generate:
    def run(chunk: list[list[int]], first: int) -> tuple[list[list[int]], float]:
        params = [SamplingParams(max_new_tokens=max_new_tokens, temperature=temperature, speculative=speculative,
                                 seed=derive_seed(first + i) if temperature else None) for i in range(len(chunk))]
        out, seconds = timed(engine, chunk, params)
        return [g.tokens for g in out], seconds
    return run


def _hf_method(hf, max_new_tokens: int, eos_id: int | None, kwargs: dict) -> Generate:
    """``generate`` with these settings; sampled, each chunk is drawn with its own seed (torch's global RNG)."""
    from mtp.bench.peers import hf_generate

    def run(chunk: list[list[int]], first: int) -> tuple[list[list[int]], float]:
        if kwargs.get("do_sample"):
            torch.manual_seed(derive_seed("hf", first))
        return hf_generate(hf, chunk, max_new_tokens=max_new_tokens, eos_id=eos_id, **kwargs)
    return run


def peers(model, tokenizer: Tokenizer, prompts: list[list[int]], batch_sizes: Sequence[int], max_new_tokens: int,
          temperature: float = 0.8, lookup_tokens: int = 10) -> list[dict[str, object]]:
    """tokens/s of the engine (compiled) and of ``transformers`` on the same weights and prompts.

    Greedy at every batch size, then sampled at ``temperature`` at batch size 1 (where
    output is not degenerate even for a weak model). At each setting every method
    decodes each chunk of prompts in turn (order rotated per chunk); compiling and
    warming up happen before, on the longest prompt, and are reported separately.
    Greedy rows say for how many prompts they gave the engine's vanilla tokens.
    """
    from mtp.bench.peers import peer_methods, to_llama

    hf = to_llama(model)
    longest = max(prompts, key=len)
    rows: list[dict[str, object]] = []
    settings = [(b, 0.0) for b in batch_sizes] + ([(1, temperature)] if temperature > 0 else [])
    for batch_size, temp in settings:
        engine = Engine(model, tokenizer, EngineConfig.matching(model, max_batch_size=batch_size, compile=True))
        warm = engine.warm_up([SamplingParams(temperature=temp, speculative=s) for s in (True, False)])
        methods: dict[str, tuple[Generate, float]] = {
            "engine_vanilla": (_engine_method(engine, max_new_tokens, temp, False), warm),
            "engine_speculative": (_engine_method(engine, max_new_tokens, temp, True), warm),
        }
        for method in peer_methods(temp, lookup_tokens):
            if method.max_batch_size is not None and batch_size > method.max_batch_size:
                continue
            run = _hf_method(hf, max_new_tokens, tokenizer.eos_id, method.kwargs)
            start = time.perf_counter()
            run([longest] * batch_size, 0)  # compiles (static cache) and sizes the cache for the longest prompt
            methods[method.name] = (run, time.perf_counter() - start)
        names = list(methods)
        tokens: dict[str, list[list[int]]] = {name: [] for name in names}
        seconds = dict.fromkeys(names, 0.0)
        for n, start in enumerate(range(0, len(prompts), batch_size)):
            chunk = prompts[start : start + batch_size]
            for name in names[n % len(names) :] + names[: n % len(names)]:
                out, dt = methods[name][0](chunk, start)
                tokens[name] += out
                seconds[name] += dt
        for name in names:
            count = sum(len(t) for t in tokens[name])
            same = sum(a == b for a, b in zip(tokens[name], tokens["engine_vanilla"]))
            distinct, distinct_se = mean_se([distinct_ngrams(t) for t in tokens[name]])
            rows.append({
                "method": name, "batch_size": batch_size, "temperature": temp, "tokens_per_s": count / seconds[name],
                "tokens": count, "prompts": len(prompts),
                "warmup_s": methods[name][1],  # the engine's: compiling both step kinds at every batch size it uses
                "distinct_8gram": distinct, "distinct_8gram_se": distinct_se,  # over prompts, one draw each
                "same_as_engine_vanilla": same if temp == 0 else None,
            })
    return rows


def speculation(engine: Engine, prompts: list[list[int]], batch_sizes: Sequence[int], max_new_tokens: int,
                heldout: int, tree: Sequence[int] | None = None) -> list[dict[str, object]]:
    """``compare`` at each batch size (and a draft tree at batch size 1), with the heads'
    teacher-forced promise on held-out code and each row's efficiency."""
    cfg = engine.cfg
    compile_s = engine.warm_up([SamplingParams(), SamplingParams(speculative=False)])
    common = {
        "n_future": cfg.n_future,
        "compiled": engine.compiled,
        "warmup_s": compile_s,
        "layers_vanilla_step": cfg.n_trunk_layers + 1,
        "layers_speculative_step": cfg.n_trunk_layers + cfg.n_future,
        "max_new_tokens": max_new_tokens,
        **teacher_forced(engine.model, heldout_code(engine.tokenizer, heldout, cfg.max_seq_len)),
    }
    layer_ratio = common["layers_vanilla_step"] / common["layers_speculative_step"]
    results = [with_efficiency({**common, "mode": "chain", **compare(engine, prompts, b, max_new_tokens)}, layer_ratio)
               for b in batch_sizes]
    if tree:
        tree_engine = Engine(engine.model, engine.tokenizer, dataclasses.replace(engine.config, max_batch_size=1, tree=tuple(tree)))
        row = {**common, "mode": f"tree{tuple(tree)}", **compare(tree_engine, prompts, 1, max_new_tokens)}
        results.append(with_efficiency(row, layer_ratio))
    return results
