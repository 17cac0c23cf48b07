"""Bring-your-own-model, end to end: a next-token model gets trained multi-token heads.

1. train an ``n_future=1`` model with the platform (BPE, the built-in corpus);
2. export it to Hugging Face format (``mtp.importing.export``), as a user's model would be;
3. import it back with ``n_future`` heads, the new ones copies of the last layer;
4. train the new heads only (``train.freeze=[trunk, head0]``) from that import;
5. decode held-out prompts at batch 1: the base model plainly, the import and the
   trained model self-speculatively. Greedy output must equal the base model's
   (the trunk and head 0 are bit-identical), tokens per forward rises from about 1.

No Ray, no MLflow: the same ``mtp.train.train`` the Ray workers run, in this process.
"""

from __future__ import annotations

import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from mtp.checkpoint import load_model
from mtp.config import build_config
from mtp.data import prepare_data
from mtp.decoding.api import SamplingParams
from mtp.decoding.config import EngineConfig
from mtp.decoding.engine import Engine
from mtp.decoding.metrics import acceptance
from mtp.importing.export import export_hf
from mtp.importing.hf import import_hf
from mtp.train import train


@dataclass
class ByomSettings:
    preset: str = "tiny"
    source: str = "stdlib"  # data.source: the built-in corpus
    vocab: int = 1024
    max_documents: int | None = 600
    seq_len: int = 128
    batch_size: int = 8
    base_steps: int = 300
    head_steps: int = 300
    n_future: int = 4
    prompts: int = 8
    prompt_tokens: int = 48
    new_tokens: int = 96
    lr: float = 3e-3


def _overrides(s: ByomSettings, workdir: Path, run: str, **extra: Any) -> dict[str, Any]:
    return {"train.preset": s.preset, "model.n_future": 1, "data.source": s.source, "data.tokenizer": "bpe",
            "data.bpe_vocab_size": s.vocab, "data.max_documents": s.max_documents, "data.num_proc": 1, "data.cache_dir": str(workdir / "data"),
            "train.seq_len": s.seq_len, "train.batch_size": s.batch_size, "train.lr": s.lr,
            "train.warmup_steps": 20, "train.log_every": 50, "train.eval_every": 10_000, "train.eval_batches": 2,
            "train.output_dir": str(workdir / "runs"), "tracking.run_name": run, "model.vocab_size": s.vocab, **extra}


def held_out_prompts(cfg, s: ByomSettings) -> list[list[int]]:
    """The first ``prompt_tokens`` of validation blocks: text no step trained on."""
    data = prepare_data(cfg.data, cfg.train.seq_len)
    blocks = data.val[: s.prompts]
    return [[int(t) for t in block[: s.prompt_tokens]] for block in blocks]


def decode(checkpoint: Path, prompts: list[list[int]], s: ByomSettings, speculative: bool) -> dict[str, Any]:
    model, tokenizer, _ = load_model(checkpoint)
    engine = Engine(model, tokenizer, EngineConfig(max_batch_size=1, device="cpu"))
    params = SamplingParams(max_new_tokens=s.new_tokens, speculative=speculative)
    engine.generate_ids(prompts[:1], params)  # warm-up
    start = time.perf_counter()
    generations = [engine.generate_ids([p], params)[0] for p in prompts]
    seconds = time.perf_counter() - start
    tpf, hist = acceptance(generations)
    tokens = sum(len(g.tokens) for g in generations)
    return {"tokens": [g.tokens for g in generations], "tokens_per_forward": tpf, "histogram": hist,
            "tokens_per_s": tokens / seconds, "seconds": seconds}


def run_byom(workdir: str | Path, s: ByomSettings = ByomSettings()) -> dict[str, Any]:
    """Run the five steps in ``workdir``; a rerun there reuses its finished training runs."""
    workdir = Path(workdir)
    timings: dict[str, float] = {}
    clock = time.perf_counter()
    base_cfg = build_config(overrides=_overrides(s, workdir, "base", **{"train.max_steps": s.base_steps,
                                                                         "train.checkpoint_every": s.base_steps}))
    if s.prompt_tokens + s.new_tokens > base_cfg.model.max_seq_len:
        raise ValueError(f"prompt_tokens + new_tokens = {s.prompt_tokens + s.new_tokens} exceeds the {s.preset} "
                         f"preset's max_seq_len={base_cfg.model.max_seq_len}")
    base = train(base_cfg).checkpoint
    timings["train_base_s"] = time.perf_counter() - clock

    clock = time.perf_counter()
    hf_dir = export_hf(base, workdir / "hf", overwrite=True)
    timings["export_s"] = time.perf_counter() - clock
    clock = time.perf_counter()
    imported = import_hf(hf_dir, workdir / "imported", n_future=s.n_future, overwrite=True)
    timings["import_s"] = time.perf_counter() - clock

    clock = time.perf_counter()
    heads_cfg = build_config(overrides=_overrides(s, workdir, "heads", **{
        "model.n_future": s.n_future, "train.init_from": str(imported), "train.freeze": "[trunk, head0]",
        "train.max_steps": s.head_steps, "train.checkpoint_every": s.head_steps}))
    trained = train(heads_cfg).checkpoint
    timings["train_heads_s"] = time.perf_counter() - clock

    prompts = held_out_prompts(base_cfg, s)
    results = {
        "base (n=1, plain)": decode(base, prompts, s, speculative=False),
        "imported (heads = copies)": decode(imported, prompts, s, speculative=True),
        "heads trained": decode(trained, prompts, s, speculative=True),
        "heads trained, plain": decode(trained, prompts, s, speculative=False),
    }
    before, after = load_model(imported)[0].state_dict(), load_model(trained)[0].state_dict()
    unchanged = [k for k in before if not k.startswith("heads.") or k.startswith("heads.0.")]
    return {
        "settings": vars(s),
        "timings": timings,
        "decoding": {k: {m: v for m, v in r.items() if m != "tokens"} for k, r in results.items()},
        "greedy_identical": {k: r["tokens"] == results["base (n=1, plain)"]["tokens"] for k, r in results.items()},
        "trunk_and_head0_bit_identical": all(torch.equal(before[k], after[k]) for k in unchanged),
        "speedup_batch1": results["heads trained"]["tokens_per_s"] / results["heads trained, plain"]["tokens_per_s"],
        "checkpoints": {"base": str(base), "hf": str(hf_dir), "imported": str(imported), "trained": str(trained)},
    }


def table(result: dict[str, Any]) -> str:
    rows = ["| decoding (batch 1, greedy) | tokens/forward | tokens/s | greedy = base |", "|---|---|---|---|"]
    for name, r in result["decoding"].items():
        tpf = f"{r['tokens_per_forward']:.2f}" if r["tokens_per_forward"] is not None else "1 (plain)"
        rows.append(f"| {name} | {tpf} | {r['tokens_per_s']:.1f} | {result['greedy_identical'][name]} |")
    return "\n".join(rows)
