"""Task metrics from the platform's own decoding engine: greedy, batched, on held-out problems.

Each prompt is fed as the model saw problems in training (after the end-of-document
token that separates packed documents), decoded greedily for as many tokens as the
answer has, and compared with the answer: ``exact_match`` (the whole answer) and
``token_accuracy`` (per answer token, a softer signal where exact match is rare).
"""

from __future__ import annotations

from pathlib import Path

from mtp.decoding import Engine, EngineConfig, SamplingParams
from mtp.tasks.problem import Problem

METRICS = ("exact_match", "token_accuracy")


def score(engine: Engine, problems: list[Problem]) -> dict[str, float]:
    """``exact_match`` and ``token_accuracy`` of greedy answers to ``problems``."""
    tok = engine.tokenizer
    answers = [tok.encode(p.answer) for p in problems]
    prompts = [[tok.eos_id, *tok.encode(p.prompt)] for p in problems]
    params = [SamplingParams(max_new_tokens=len(a), temperature=0.0) for a in answers]
    generations = engine.generate_ids(prompts, params)
    exact, correct, total = 0, 0, 0
    for answer, generation in zip(answers, generations):
        got = generation.tokens[: len(answer)]
        exact += got == answer
        correct += sum(a == b for a, b in zip(answer, got))
        total += len(answer)
    return {"exact_match": exact / len(problems), "token_accuracy": correct / total}


def evaluate_task(checkpoint: str | Path, eval_sets: dict[str, list[Problem]], engine: EngineConfig) -> dict[str, float]:
    """``task/<eval set>/<metric>`` for every evaluation set, from one checkpoint."""
    engine = Engine.from_checkpoint(str(checkpoint), engine)
    return {f"task/{name}/{metric}": value
            for name, problems in eval_sets.items() for metric, value in score(engine, problems).items()}
