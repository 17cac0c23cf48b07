"""``make gpu-repro``: the induction experiment (paper §4.1) at the paper's smallest size, on one GPU, in one command.

n=1 against n=2 (param-matched, dim 128 x 5 layers, ~1M parameters) and the controls
(n=1 trained for n=2's FLOPs, n=2 with both heads on the next token), several seeds of
each arm trained at once on the one device (one process per trial: models this small leave
a GPU idle in any single stream), on the induction task in the paper's setting: training
names from a small closed set, test names never seen in training
(``mtp.tasks.induction``, ``train_names``). Each trial is scored by greedy head-0
second-byte accuracy on the held-out stories (``copy``), on the same stories with the
earlier mention's second byte changed (``counterfactual``: right only if the model
follows the change) and on both (``joint``); every ``eval_every`` steps on a prefix of
them, for the step at which the copy forms (the first evaluation at or above
``threshold``) and the best checkpoint beside the final one. Floors
(``mtp.compare.floors``) and the verdict (``mtp.compare.stats``) come from the same
code as the sweeps.

Needs only torch and numpy: no Ray, MLflow or HF ``datasets`` (the GPU machine has none).
Each trial stops at a wall-clock deadline, so the run fits its budget on any device and
reports the tokens it really trained on.
"""

from __future__ import annotations

import contextlib
import dataclasses
import math
import multiprocessing as mp
import tempfile
import time
from dataclasses import asdict, dataclass, replace
from pathlib import Path
from typing import Any, Sequence

import numpy as np
import torch

from mtp.compare.arms import Arm, ArmsSpec, flops_matched_steps
from mtp.compare.floors import induction_floors
from mtp.compare.stats import ArmStats, verdict
from mtp.config import ModelConfig
from mtp.loss import mtp_targets, sequential_backward
from mtp.model import MTPTransformer, count_parameters
from mtp.packing import document_units, pack_whole
from mtp.tasks.spec import TaskSpec
from mtp.tokenizer import ByteTokenizer

SETS = ("copy", "counterfactual")


@dataclass(frozen=True)
class ReproConfig:
    dim: int = 128
    n_layers: int = 5
    n_heads: int = 4
    seq_len: int = 128
    batch_size: int = 256
    steps: int = 8000  # 8000 x 256 x 128 = 262M token positions per trial, ~100x the CPU sweep's 2.6M
    lr: float = 3e-3
    warmup: int = 100
    n_futures: tuple[int, ...] = (1, 2)
    controls: bool = True  # beside each n > 1: n=1 with its FLOPs, and n with every head on t+1 (mtp.compare.arms)
    seeds: int = 4
    workers: int = 0  # trials at once; 0: all of them
    train_problems: int = 200_000
    test_problems: int = 1000
    eval_every: int = 500
    eval_problems: int = 200  # the prefix scored during training
    threshold: float = 0.9  # counterfactual accuracy at which the copy counts as formed
    margin: float = 0.05  # the n=1 baseline must clear the strongest floor by this, fixed before the run
    task_params: tuple[tuple[str, Any], ...] = (("n_names", 3), ("n_sentences", 8), ("templates", "short"),
                                                ("train_names", 4))
    budget_s: float = 400.0  # training deadline per trial, from the start of the run
    device: str = "cuda"


TINY = dict(dim=32, n_layers=3, batch_size=8, steps=40, seeds=2, workers=2, train_problems=2000, test_problems=60,
            eval_every=20, eval_problems=30, budget_s=240.0)


def task(cfg: ReproConfig) -> TaskSpec:
    return TaskSpec.parse({"name": "induction", "params": dict(cfg.task_params), "train_problems": cfg.train_problems,
                           "test_problems": cfg.test_problems})


# ----------------------------------------------------------------------- scoring


def _batch(prompts: list[list[int]], pad_id: int) -> tuple[torch.Tensor, torch.Tensor]:
    width = max(map(len, prompts))
    tokens = torch.full((len(prompts), width), pad_id, dtype=torch.long)
    for i, p in enumerate(prompts):
        tokens[i, : len(p)] = torch.tensor(p)
    return tokens, torch.tensor([len(p) - 1 for p in prompts])


@torch.no_grad()
def answers_right(model: MTPTransformer, problems: Sequence[Any], device: torch.device, batch: int = 256) -> np.ndarray:
    """Whether head 0's greedy next byte after ``[eos, *prompt]`` is the one-byte answer, per problem
    (right padding: a causal model's last prompt position never sees it)."""
    tok = ByteTokenizer()
    model.eval()
    out = []
    for s in range(0, len(problems), batch):
        chunk = problems[s : s + batch]
        tokens, last = _batch([[tok.eos_id, *tok.encode(p.prompt)] for p in chunk], tok.pad_id)
        logits = model(tokens.to(device))
        guess = logits[torch.arange(len(chunk)), last.to(device)].argmax(-1).cpu()
        out.append((guess == torch.tensor([tok.encode(p.answer)[0] for p in chunk])).numpy())
    model.train()
    return np.concatenate(out)


def scores(model: MTPTransformer, sets: dict[str, list], device: torch.device, limit: int | None = None) -> dict[str, float]:
    right = {name: answers_right(model, problems[:limit], device) for name, problems in sets.items()}
    return {**{name: float(r.mean()) for name, r in right.items()}, "joint": float((right["copy"] & right["counterfactual"]).mean())}


# ----------------------------------------------------------------------- one trial


def _lr(cfg: ReproConfig, step: int, steps: int) -> float:
    if step < cfg.warmup:
        return cfg.lr * (step + 1) / cfg.warmup
    progress = (step - cfg.warmup) / max(1, steps - cfg.warmup)
    return cfg.lr * (0.1 + 0.9 * 0.5 * (1 + math.cos(math.pi * min(1.0, progress))))


def model_config(cfg: ReproConfig, n_future: int) -> ModelConfig:
    return ModelConfig(dim=cfg.dim, n_layers=cfg.n_layers, n_heads=cfg.n_heads, n_future=n_future,
                       param_matched=True, max_seq_len=cfg.seq_len, multiple_of=32)


def arms(cfg: ReproConfig) -> list[Arm]:
    return ArmsSpec(compute_matched=cfg.controls, next_token_heads=cfg.controls).arms(list(cfg.n_futures))


def arm_steps(cfg: ReproConfig, arm: Arm) -> int:
    if arm.kind != "compute_matched":
        return cfg.steps
    return flops_matched_steps(model_config(cfg, 1), model_config(cfg, arm.controls), cfg.seq_len, cfg.steps)


def train_trial(cfg: ReproConfig, arm: Arm, seed: int, blocks_path: str, deadline: float) -> dict[str, Any]:
    """Train one (arm, seed) trial until its steps or the deadline; its scores over training and at the end."""
    device = torch.device(cfg.device)
    torch.set_num_threads(1)  # many trials share the host: one thread each (the GPU does the work there)
    torch.manual_seed(seed)
    blocks = np.load(blocks_path, mmap_mode="r")
    sets = task(cfg).eval_sets()
    sets = {"copy": sets["in_domain"], "counterfactual": sets["counterfactual"]}
    model_cfg = model_config(cfg, arm.n_future)
    steps = arm_steps(cfg, arm)
    model = MTPTransformer(model_cfg).to(device)
    opt = torch.optim.AdamW(model.parameters(), lr=cfg.lr, betas=(0.9, 0.95), weight_decay=0.1)
    def amp():  # bf16 on the GPU, as the platform trains there; fp32 on the CPU dry run
        return torch.autocast("cuda", dtype=torch.bfloat16) if device.type == "cuda" else contextlib.nullcontext()

    rng = np.random.default_rng(seed)
    pad = ByteTokenizer().pad_id
    history, best, formed_step = [], None, None
    start, step = time.time(), 0
    while step < steps and time.time() < deadline:
        for group in opt.param_groups:
            group["lr"] = _lr(cfg, step, steps)
        tokens = torch.from_numpy(blocks[np.sort(rng.integers(0, len(blocks), cfg.batch_size))].astype(np.int64))
        inputs, targets = mtp_targets(tokens.to(device, non_blocking=True), arm.n_future, pad,
                                      next_token_only=arm.kind == "next_token_heads")
        with amp():
            sequential_backward(model, inputs, targets)
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        opt.step()
        opt.zero_grad(set_to_none=True)
        step += 1
        if step % cfg.eval_every == 0 or step == steps:
            with amp():
                point = {"step": step, **scores(model, sets, device, cfg.eval_problems)}
            history.append(point)
            if formed_step is None and point["counterfactual"] >= cfg.threshold:
                formed_step = step
            if best is None or point["joint"] > best["joint"]:
                best = point
    train_s = time.time() - start
    with amp():
        final = scores(model, sets, device)
    return {"arm": arm.label, "n_future": arm.n_future, "seed": seed, "steps": step, "planned_steps": steps,
            "tokens": step * cfg.batch_size * cfg.seq_len,
            "train_s": train_s, "final": final, "best": best, "formed_step": formed_step, "history": history,
            "params": count_parameters(model_cfg)["total"]}


def _trial(args: tuple) -> dict[str, Any]:
    return train_trial(*args)


# ----------------------------------------------------------------------- the run


def run(cfg: ReproConfig) -> dict[str, Any]:
    """Every (n, seed) trial, ``cfg.workers`` at a time; the summary, floors and verdicts."""
    t0 = time.time()
    spec = task(cfg)
    tok = ByteTokenizer()
    train = spec.problems("train", cfg.train_problems)
    blocks = pack_whole(document_units([p.text for p in train], tok), cfg.seq_len + 1, tok.pad_id)
    sets = spec.eval_sets()
    floors = {"copy": induction_floors(sets["in_domain"]), "counterfactual": induction_floors(sets["counterfactual"])}
    data_s = time.time() - t0
    trials = [(arm, s) for s in range(cfg.seeds) for arm in arms(cfg)]
    with tempfile.TemporaryDirectory() as tmp:
        path = str(Path(tmp) / "blocks.npy")
        np.save(path, blocks)
        deadline = t0 + cfg.budget_s
        jobs = [(cfg, arm, s, path, deadline) for arm, s in trials]
        workers = min(cfg.workers or len(jobs), len(jobs))
        if workers == 1:
            results = [_trial(j) for j in jobs]
        else:
            with mp.get_context("spawn").Pool(workers) as pool:
                results = pool.map(_trial, jobs)
    return {"config": asdict(cfg), "data": {"train_stories": len(train), "blocks": len(blocks), "seconds": data_s},
            "floors": floors, "trials": results, "summary": summarize(cfg, results, floors),
            "elapsed_s": time.time() - t0}


def summarize(cfg: ReproConfig, results: list[dict], floors: dict[str, dict]) -> list[dict[str, Any]]:
    """Per arm and score: final and best mean ± std, formation, and each arm's verdict against n=1."""
    rows = []
    for name in (*SETS, "joint"):
        floor = max(floors["counterfactual" if name != "copy" else "copy"].values(), key=lambda f: f["exact_match"])
        by_arm = {a.label: [r for r in results if r["arm"] == a.label] for a in arms(cfg)}
        for label, mine in by_arm.items():
            final = [r["final"][name] for r in mine]
            best = [r["best"][name] if r["best"] else r["final"][name] for r in mine]
            formed = [r["formed_step"] for r in mine if r["formed_step"] is not None]
            row = {"score": name, "arm": label, "final": asdict(ArmStats.of(final)), "best": asdict(ArmStats.of(best)),
                   "formed": f"{len(formed)}/{len(mine)}", "formed_steps": formed,
                   "steps": [r["steps"] for r in mine], "planned_steps": mine[0]["planned_steps"],
                   "tokens": sum(r["tokens"] for r in mine) / len(mine), "floor": floor["exact_match"]}
            if label != "n=1":
                v = verdict(final, [r["final"][name] for r in by_arm["n=1"]], floor=floor["exact_match"],
                            margin=cfg.margin)
                row["verdict"], row["interval"] = v.text(), asdict(v.interval) if v.interval else None
            rows.append(row)
    return rows


def format_table(result: dict[str, Any]) -> str:
    lines = ["| score | arm | final (mean ± std, seeds) | difference to n=1 [95% CI] | best checkpoint | "
             "copy formed (seeds, steps) | steps done / planned | tokens/trial | verdict vs n=1 |",
             "|---|---|---|---|---|---|---|---|---|"]
    for r in result["summary"]:
        f, b = r["final"], r["best"]
        ci = r.get("interval")
        shown_ci = f"{ci['diff']:+.3f} [{ci['low']:+.3f}, {ci['high']:+.3f}]" if ci else "-"
        lines.append(f"| {r['score']} | {r['arm']} | {f['mean']:.3f} ± {f['std']:.3f} ({f['n']}) | {shown_ci} | "
                     f"{b['mean']:.3f} ± {b['std']:.3f} | {r['formed']} {r['formed_steps'] or ''} | "
                     f"{min(r['steps'])}-{max(r['steps'])} / {r['planned_steps']} | {r['tokens'] / 1e6:.2f}M | "
                     f"{r.get('verdict', 'baseline')} |")
    shown = "; ".join(f"{s}: " + ", ".join(f"{k} {v['exact_match']:.3f}" for k, v in f.items())
                      for s, f in result["floors"].items())
    return "\n".join(lines) + f"\n\nfloors on the same test stories: {shown}"


def config_for(tiny: bool, device: str, settings: Sequence[str] = (), **overrides: Any) -> ReproConfig:
    """The default (or tiny) sizes, then ``settings`` (``field=value``, e.g. ``dim=64``), then ``overrides``."""
    fields = {f.name: f for f in dataclasses.fields(ReproConfig)}
    parsed = {}
    for item in settings:
        key, sep, value = item.partition("=")
        if not sep or key not in fields or key in ("task_params", "n_futures", "device"):
            raise ValueError(f"--set {item!r}: use field=value with a field among "
                             f"{sorted(set(fields) - {'task_params', 'n_futures', 'device'})}")
        kind = type(getattr(ReproConfig(), key))
        parsed[key] = value.lower() in ("1", "true", "yes") if kind is bool else kind(value)
    cfg = ReproConfig(device=device)
    return replace(cfg, **{**(TINY if tiny else {}), **parsed, **{k: v for k, v in overrides.items() if v is not None}})

