"""Self-speculative decoding with the MTP heads: vanilla vs speculative greedy, in one run.

    python jobs/bench_decoding.py                         # trains a small model first (cached under runs/)
    python jobs/bench_decoding.py --checkpoint runs/x/final --json out.json
    python jobs/bench_decoding.py --device cuda           # the GPU check (trains there if no checkpoint)
    python jobs/bench_decoding.py --compile               # the engine's steps through torch.compile
    python jobs/bench_decoding.py --peers --prompts 16     # against Hugging Face transformers (pip install -e .[bench])

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

``--peers`` instead times the engine (compiled) against ``transformers``'
``LlamaForCausalLM`` holding the same head-0 weights (logits checked equal first):
``generate`` with its default cache, with a static cache + ``torch.compile``, and
with prompt lookup decoding; greedy at each batch size, then sampled at T=0.8 at
batch size 1. It prints a table and writes a JSON list of rows with ``method``,
``batch_size`` and ``tokens_per_s``. The logic lives in ``mtp.bench.decoding``.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "platform"))

import torch  # noqa: E402

from mtp.bench.decoding import EFFICIENCY_TARGET, default_checkpoint, humaneval_prompts, peers, speculation  # noqa: E402
from mtp.decoding import Engine, EngineConfig  # noqa: E402
from mtp.tracking.registry import resolve_checkpoint  # noqa: E402

REPO = Path(__file__).resolve().parents[1]


def main(argv: list[str] | None = None) -> list[dict[str, object]]:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--checkpoint", help="checkpoint directory or MLflow URI (default: train a small model)")
    ap.add_argument("--device", default="cpu", choices=["cpu", "cuda"])
    ap.add_argument("--dtype", default="fp32", choices=["fp32", "bf16"],
                    help="fp32 keeps greedy ties identical between 1-token and multi-token forwards")
    ap.add_argument("--no-cuda-graphs", dest="cuda_graphs", action="store_false", help="on CUDA, launch kernels eagerly")
    ap.add_argument("--compile", action="store_true", help="torch.compile the engine's steps (instead of CUDA graphs)")
    ap.add_argument("--peers", action="store_true", help="time against Hugging Face transformers instead")
    ap.add_argument("--temperature", type=float, default=0.8, help="--peers: the sampled comparison's temperature")
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
    checkpoint = args.checkpoint or default_checkpoint(args.device, REPO / "runs")
    graphs = args.device == "cuda" and args.cuda_graphs and not args.compile
    engine = Engine.from_checkpoint(str(resolve_checkpoint(checkpoint)), EngineConfig(
        max_batch_size=max(args.batch_sizes), device=args.device, dtype=args.dtype, cuda_graphs=graphs, compile=args.compile))
    room = engine.cfg.max_seq_len - args.max_new_tokens
    if room < 1:
        raise SystemExit(f"--max-new-tokens {args.max_new_tokens} leaves no room for a prompt in max_seq_len={engine.cfg.max_seq_len}")
    prompts = humaneval_prompts(engine.tokenizer, args.prompts, room)
    context = {"checkpoint": checkpoint, "device": args.device, "dtype": str(engine.packed.dtype).removeprefix("torch."),
               "threads": torch.get_num_threads() if args.device == "cpu" else None, "cuda_graphs": graphs,
               "load_before": _load()}

    if args.peers:
        results = [{**context, **row} for row in
                   peers(engine.model, engine.tokenizer, prompts, args.batch_sizes, args.max_new_tokens, args.temperature)]
        results[-1]["load_after"] = _load()
        print_peers(results)
    else:
        results = [{**context, **row} for row in
                   speculation(engine, prompts, args.batch_sizes, args.max_new_tokens, args.heldout, args.tree)]
        print_table(results)
    if args.json:
        Path(args.json).write_text(json.dumps(results, indent=2))
    return results


def _load() -> str:
    """The machine's 1/5/15-minute load averages: timings on a shared machine need them beside."""
    return "/".join(f"{x:.1f}" for x in os.getloadavg())


def print_peers(rows: list[dict[str, object]]) -> None:
    r0 = rows[0]
    print(f"\ncheckpoint {r0['checkpoint']} ({r0['device']}, {r0['dtype']}, threads={r0['threads']}, "
          f"load average {r0['load_before']} before, {rows[-1]['load_after']} after); "
          "every method decodes each chunk of prompts in turn; warm-up = compiling (engine: every step kind "
          "and batch size; HF static: its forward) plus one call, not in tok/s")
    names = ["method", "batch", "T", "tok/s", "vs hf_static_compile", "warm-up s", "distinct8 ± SE", "= engine greedy"]
    by_setting = {(r["batch_size"], r["temperature"], r["method"]): r for r in rows}
    table = []
    for r in rows:
        base = by_setting.get((r["batch_size"], r["temperature"], "hf_static_compile"))
        table.append([r["method"], str(r["batch_size"]), f"{r['temperature']:g}", f"{r['tokens_per_s']:.1f}",
                      f"{r['tokens_per_s'] / base['tokens_per_s']:.2f}x" if base else "n/a", f"{r['warmup_s']:.1f}",
                      f"{r['distinct_8gram']:.3f} ± {r['distinct_8gram_se']:.3f}",
                      "n/a" if r["same_as_engine_vanilla"] is None else f"{r['same_as_engine_vanilla']}/{r['prompts']}"])
    _print_rows(names, table)


def _print_rows(names: list[str], rows: list[list[str]]) -> None:
    widths = [max(len(n), *(len(row[i]) for row in rows)) for i, n in enumerate(names)]
    print(" | ".join(n.ljust(w) for n, w in zip(names, widths)))
    print("-+-".join("-" * w for w in widths))
    for row in rows:
        print(" | ".join(v.ljust(w) for v, w in zip(row, widths)))


def print_table(results: list[dict[str, object]]) -> None:
    r0 = results[0]
    print(f"\ncheckpoint {r0['checkpoint']} ({r0['device']}, {r0['dtype']}, threads={r0['threads']}, "
          f"compiled={r0['compiled']}, warm-up {r0['warmup_s']:.1f}s), "
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
    _print_rows(names, [[fmt.format(r[k]) if r[k] is not None else "n/a" for k, fmt in cols] for r in results])
    batch1 = next((r for r in results if r["batch_size"] == 1 and r["mode"] == "chain"), None)
    if batch1 is not None and r0["device"] == "cpu":
        verdict = "meets" if batch1["efficiency"] >= EFFICIENCY_TARGET else "MISSES"
        print(f"\nbatch-1 efficiency {batch1['efficiency']:.3f} {verdict} the target {EFFICIENCY_TARGET} "
              f"(decode steps alone: {batch1['decode_efficiency']:.3f})")
    if not all(r["exact_match"] for r in results):
        print("\nEXACTNESS FAILED: speculative output differs from vanilla greedy")


if __name__ == "__main__":
    main()
