"""Load-test the Serve completions service and compare its speedup with the bare engine's.

    python jobs/bench_serve.py --checkpoint runs/<run>/final
    python jobs/bench_serve.py --checkpoint models:/mtp-model/3 --concurrency 1 4 16 --json out.json
    python jobs/bench_serve.py          # bench_decoding's default model (trained once, cached under runs/)

In one run, on 127.0.0.1:

1. the engine alone, batch 1, in this process: ``jobs/bench_decoding.py``'s own
   vanilla-vs-speculative comparison on the same prompts and model;
2. a local Ray + ``serve.run`` of ``mtp.serving.app:build_app`` (one ModelServer
   replica with 1 CPU, the engine thread count used in step 1);
3. a closed-loop load generator at each concurrency, speculation on and off:
   requests/s, tokens/s, p50/p99 latency and errors for non-streamed requests (the
   batched path), then time to first token from streamed requests.

Checks: Serve keeps >= 0.85 of the engine's batch-1 speedup at concurrency 1;
speculative is not slower than vanilla at the highest concurrency; 0 errors.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "platform"))

from mtp.bench.decoding import default_checkpoint  # noqa: E402
from mtp.bench.loadtest import (  # noqa: E402
    REPLICA_CPUS, RETENTION_TARGET, Cell, bench_prompts, checks, engine_speedup, measure, scrape_metrics,
    start_service, stop_service,
)
from mtp.tracking.registry import resolve_checkpoint  # noqa: E402

REPO = Path(__file__).resolve().parents[1]


def progress(cell: Cell) -> None:
    s = cell.summary()
    print(f"  c={cell.concurrency:<3} spec={str(cell.speculative):<5} {s['tokens_per_s']:8.1f} tok/s "
          f"p50 {s['p50_latency_s']:.3f}s errors {cell.errors}", flush=True)


# ---------------------------------------------------------------------------- main


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--checkpoint", help="checkpoint dir or MLflow URI (default: bench_decoding's model, trained once)")
    parser.add_argument("--concurrency", type=int, nargs="+", default=[1, 4, 16])
    parser.add_argument("--requests", type=int, default=16,
                        help="non-streamed requests per cell (at least 2x concurrency)")
    parser.add_argument("--rounds", type=int, default=2, help="alternations of vanilla and speculative per cell")
    parser.add_argument("--stream-requests", type=int, default=4, help="streamed requests per cell, for TTFT")
    parser.add_argument("--prompts", type=int, default=8, help="HumanEval prompts to cycle through")
    parser.add_argument("--max-tokens", type=int, default=128)
    parser.add_argument("--timeout", type=float, default=300.0, help="per-request client timeout (s)")
    parser.add_argument("--json", help="write the results here")
    return parser.parse_args(argv)


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    checkpoint = args.checkpoint or default_checkpoint("cpu", REPO / "runs")
    checkpoint = str(resolve_checkpoint(checkpoint))
    bare, prompt_ids = bench_prompts(checkpoint, args.prompts, args.max_tokens)
    prompts = [bare.tokenizer.decode(ids) for ids in prompt_ids]

    print(f"engine alone, batch 1, {REPLICA_CPUS} thread(s), {len(prompts)} prompts x {args.max_tokens} tokens")
    engine = engine_speedup(bare, prompt_ids, args.max_tokens)
    print(f"  vanilla {engine['vanilla_tokens_per_s']:.1f} tok/s, speculative {engine['speculative_tokens_per_s']:.1f} "
          f"tok/s, speedup {engine['speedup']:.2f}x, tokens/forward {engine['tokens_per_forward']:.2f} "
          f"({engine['tokens_per_forward_nonrepetitive'] or float('nan'):.2f} on the {engine['nonrepetitive_prompts']} "
          f"non-repetitive generations; distinct 8-grams {engine['distinct_8gram']:.2f}), "
          f"exact match {engine['exact_match']}")

    url = start_service(checkpoint, args.max_tokens)
    try:
        cells = measure(url, prompts, args.concurrency, args.requests, args.rounds, args.stream_requests, args.max_tokens,
                        args.timeout, progress)
        metrics = scrape_metrics()
    finally:
        stop_service()

    rows = [c.summary() for c in cells]
    report = {"checkpoint": checkpoint, "max_tokens": args.max_tokens, "prompts": len(prompts),
              "engine_batch1": engine, "serve": rows, "checks": checks(engine, rows), "exported_metrics": metrics}
    print_table(report)
    if args.json:
        Path(args.json).write_text(json.dumps(report, indent=2))
        print(f"wrote {args.json}")
    return 0 if all(v["ok"] for v in report["checks"].values()) else 1


def print_table(report: dict) -> None:
    header = f"{'conc':>4} {'spec':>5} {'req/s':>7} {'tok/s':>8} {'p50 s':>7} {'p99 s':>7} {'ttft50 s':>8} " \
             f"{'tok/fwd':>7} {'errors':>6}"
    print("\n" + header + "\n" + "-" * len(header))
    for r in report["serve"]:
        print(f"{r['concurrency']:>4} {str(r['speculative']):>5} {r['requests_per_s']:>7.2f} {r['tokens_per_s']:>8.1f} "
              f"{r['p50_latency_s']:>7.3f} {r['p99_latency_s']:>7.3f} {r['p50_ttft_s']:>8.3f} "
              f"{r['tokens_per_forward']:>7.2f} {r['errors']:>6}")
    c = report["checks"]
    ret = c["speedup_retention"]
    print(f"\nspeedup at concurrency {ret['concurrency']}: Serve {ret['serve_speedup']:.2f}x vs engine (batch 1) "
          f"{ret['engine_speedup']:.2f}x -> retention {ret['retention']:.2f} (target >= {RETENTION_TARGET}) "
          f"{'OK' if ret['ok'] else 'FAIL'}")
    hi = c["speculative_not_slower"]
    print(f"speculative / vanilla tokens/s at concurrency {hi['concurrency']}: {hi['ratio']:.2f} "
          f"{'OK' if hi['ok'] else 'FAIL'}")
    print(f"errors: {c['errors']['count']} {'OK' if c['errors']['ok'] else 'FAIL'}")
    exported = report["exported_metrics"]
    print("exported Ray metrics: " + (", ".join(f"{k}={v:g}" for k, v in sorted(exported.items()) if
                                               k.endswith(("_total", "_count"))) or "none seen"))


if __name__ == "__main__":
    raise SystemExit(main())
