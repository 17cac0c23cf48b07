"""How much the extra heads can and do accelerate decoding.

* ``acceptance``: what decoding measured, the accepted-draft histogram summed over
  generations and the tokens each forward yielded;
* ``teacher_forced``: what the heads promise on real text, without decoding: how
  often head ``i`` agrees with head 0's greedy choice ``i`` tokens later, turned
  into expected tokens per forward;
* ``distinct_ngrams``: a weak model that emits a run of spaces accepts every draft,
  which is not acceleration; this tells such output apart;
* ``compare``: vanilla vs self-speculative decoding on the same prompts, timed and
  counted (the speed task scores a sweep's checkpoints with it; ``mtp.bench`` builds
  its comparisons on it).
"""

from __future__ import annotations

import dataclasses
import time
from typing import TYPE_CHECKING, Sequence

import torch

from mtp.decoding.api import Generation, SamplingParams, derive_seed
from mtp.model import MTPTransformer

if TYPE_CHECKING:
    from mtp.decoding.engine import Engine

NONREPETITIVE = 0.5  # fraction of distinct 8-grams above which a generation counts as real output


def distinct_ngrams(tokens: Sequence[int], n: int = 8) -> float:
    """Fraction of distinct n-grams in a generation (1.0 when it is shorter than n)."""
    grams = [tuple(tokens[i : i + n]) for i in range(len(tokens) - n + 1)]
    return len(set(grams)) / len(grams) if grams else 1.0


def acceptance(generations: Sequence[Generation]) -> tuple[float | None, list[int]]:
    """Tokens per forward (accepted drafts + 1, averaged over steps; None without steps) and the summed histogram."""
    width = max((len(g.stats.accepted_histogram) for g in generations), default=0)
    hist = [0] * width
    for g in generations:
        for k, count in enumerate(g.stats.accepted_histogram):
            hist[k] += count
    steps = sum(hist)
    return (sum((k + 1) * c for k, c in enumerate(hist)) / steps if steps else None), hist


@torch.inference_mode()
def teacher_forced(model: MTPTransformer, texts: Sequence[Sequence[int]]) -> dict[str, object]:
    """Expected tokens per forward if chain drafts were verified against head 0 on real text.

    At position t, draft i (head i) is accepted when it equals head 0's greedy choice
    at t+i and every earlier draft was accepted; the expectation averages that
    accepted count + 1 over positions with all n-1 checks inside the text.
    """
    n = model.cfg.n_future
    device = next(model.parameters()).device
    agree_sum = torch.zeros(n)
    accepted_sum, positions = 0.0, 0
    for ids in texts:
        T = len(ids) - n + 1
        if T <= 0:
            continue
        choices = model(torch.tensor([list(ids)], device=device), all_heads=True)[:, 0].argmax(-1).cpu()  # [n, len]
        agree = torch.stack([choices[i, :T] == choices[0, i : i + T] for i in range(n)])  # [n, T]; row 0 all True
        agree_sum += agree.float().sum(1)
        accepted_sum += float(agree[1:].cumprod(0).sum())
        positions += T
    return {
        "teacher_forced_tokens_per_forward": 1 + accepted_sum / max(positions, 1),
        "teacher_forced_head_agreement": (agree_sum / max(positions, 1)).tolist(),
        "teacher_forced_positions": positions,
    }


def synchronize(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def timed(engine: Engine, chunk: list[list[int]], params: SamplingParams | list[SamplingParams]) -> tuple[list[Generation], float]:
    synchronize(engine.device)
    start = time.perf_counter()
    out = engine.generate_ids(chunk, params)
    synchronize(engine.device)
    return out, time.perf_counter() - start


def mean_se(values: Sequence[float]) -> tuple[float, float]:
    """Mean and its standard error (0 for fewer than two values)."""
    n = len(values)
    mean = sum(values) / n
    return mean, (sum((v - mean) ** 2 for v in values) / (n - 1) / n) ** 0.5 if n > 1 else 0.0


def compare(engine: Engine, prompts: list[list[int]], batch_size: int, max_new_tokens: int,
            temperature: float = 0.0, cap_s: float | None = None, draws: int = 1, seed: int = 0) -> dict[str, object]:
    """Vanilla vs self-speculative decoding at one batch size and temperature, interleaved
    chunk by chunk (each chunk's order alternates), after the engine's warm-up; with
    ``cap_s``, stops after the chunk that passes it (``prompts`` says how many ran).

    Sampled (temperature > 0), every prompt is decoded ``draws`` times, each prompt and
    draw with its own seed (the same for both modes); per-generation measures are
    reported as mean and standard error.
    """
    draws = draws if temperature > 0 else 1
    settings = {m: SamplingParams(max_new_tokens=max_new_tokens, temperature=temperature,
                                  speculative=m == "speculative") for m in ("vanilla", "speculative")}
    engine.warm_up(list(settings.values()))  # CUDA graphs / compiled steps: every batch size a shrinking batch passes
    modes = list(settings)
    items = [(i, d) for d in range(draws) for i in range(len(prompts))]
    gens: dict[str, list[Generation]] = {m: [] for m in modes}
    seconds = {m: 0.0 for m in modes}
    decode_seconds = {m: 0.0 for m in modes}  # after the prefill (a chunk's rows are admitted together)
    began = time.perf_counter()
    for n, start in enumerate(range(0, len(items), batch_size)):
        chunk = items[start : start + batch_size]
        ids = [prompts[i] for i, _ in chunk]
        for mode in (modes if n % 2 == 0 else modes[::-1]):
            params = [dataclasses.replace(settings[mode], seed=derive_seed(seed, i, d) if temperature > 0 else None)
                      for i, d in chunk]
            out, dt = timed(engine, ids, params)
            gens[mode].extend(out)
            seconds[mode] += dt
            decode_seconds[mode] += dt - max(g.stats.prefill_s for g in out)
        if cap_s is not None and time.perf_counter() - began > cap_s:
            break
    van, spec = gens["vanilla"], gens["speculative"]
    tokens = {m: sum(len(g.tokens) for g in gens[m]) for m in modes}
    decode_tokens = {m: sum(len(g.tokens) - 1 for g in gens[m]) for m in modes}  # the first comes from the prefill
    distinct = [distinct_ngrams(g.tokens) for g in spec]
    tpf, hist = acceptance(spec)
    tpf_real, _ = acceptance([g for g, d in zip(spec, distinct) if d >= NONREPETITIVE])
    per_forward = {m: sum(g.stats.elapsed_s - g.stats.prefill_s for g in gens[m]) / max(sum(g.stats.forwards for g in gens[m]), 1)
                   for m in modes}
    mismatched = [i for i, (a, b) in enumerate(zip(van, spec)) if a.tokens != b.tokens]
    distinct_mean, distinct_se = mean_se(distinct)
    out = {
        "batch_size": batch_size,
        "temperature": temperature,
        "prompts": len({i for i, _ in items[: len(van)]}),
        "draws": draws,
        "generations": len(van),
        "vanilla_tokens_per_s": tokens["vanilla"] / seconds["vanilla"],
        "speculative_tokens_per_s": tokens["speculative"] / seconds["speculative"],
        "exact_match": not mismatched,  # expected of greedy decoding only
        "identical": len(van) - len(mismatched),
        "mismatched_prompts": mismatched,
        "tokens_per_forward": tpf,
        "tokens_per_forward_nonrepetitive": tpf_real,
        "nonrepetitive_prompts": sum(d >= NONREPETITIVE for d in distinct),
        "accepted_histogram": hist,
        "distinct_8gram": distinct_mean,
        "distinct_8gram_se": distinct_se,
        "tokens_per_forward_se": mean_se(per_gen)[1] if (per_gen := [g.stats.tokens_per_forward for g in spec if g.stats.forwards]) else None,
        "step_cost_ratio": per_forward["speculative"] / per_forward["vanilla"],
    }
    out["speedup"] = out["speculative_tokens_per_s"] / out["vanilla_tokens_per_s"]
    decode_rate = {m: decode_tokens[m] / decode_seconds[m] for m in modes}
    out["decode_speedup"] = decode_rate["speculative"] / decode_rate["vanilla"]
    return out
