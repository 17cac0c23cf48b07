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
import os
import socket
import sys
import threading
import time
from dataclasses import dataclass, field
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "platform"))

import requests  # noqa: E402
import torch  # noqa: E402

from mtp.checkpoint import local_checkpoint_dir  # noqa: E402
from mtp.decoding import Engine, SamplingParams  # noqa: E402
from mtp.decoding.benchmark import compare, default_checkpoint, humaneval_prompts  # noqa: E402

REPO = Path(__file__).resolve().parents[1]
RETENTION_TARGET = 0.85
REPLICA_CPUS = 1  # the ModelServer replica's num_cpus; the engine baseline uses as many threads


# ------------------------------------------------------------ inputs and the bare engine
# The model, the prompts and the engine's batch-1 speedup come from mtp.decoding.benchmark,
# so "the speedup bench_decoding measures" is measured by the same code here.


def bench_prompts(checkpoint: str, count: int, max_tokens: int) -> tuple[Engine, list[list[int]]]:
    """A batch-1 engine and HumanEval prompts (token ids), cut to leave room for ``max_tokens``."""
    torch.set_num_threads(REPLICA_CPUS)
    engine = Engine.from_checkpoint(checkpoint, max_batch_size=1)
    context = engine.cfg.max_seq_len
    if context - max_tokens < 8:
        raise SystemExit(f"--max-tokens {max_tokens} leaves no room for a prompt in a context of {context}")
    return engine, humaneval_prompts(engine.tokenizer, count, context - max_tokens)


def engine_speedup(engine: Engine, prompts: list[list[int]], max_tokens: int) -> dict[str, object]:
    """bench_decoding's batch-1 comparison (vanilla vs speculative greedy, interleaved)."""
    engine.warm_up([SamplingParams(), SamplingParams(speculative=False)])
    result = compare(engine, prompts, 1, max_tokens)
    return {k: v for k, v in result.items() if not isinstance(v, list)}


# ----------------------------------------------------------------------- the service


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def start_service(checkpoint: str, max_tokens: int) -> str:
    """A local Ray instance and the application on 127.0.0.1; returns the base URL."""
    from ray import serve

    from mtp.cluster.ray_env import connect
    from mtp.serving.app import build_app

    os.environ.setdefault("RAY_AUTH_MODE", "disabled")
    os.environ.pop("MTP_SERVE_API_KEY", None)
    connect("local", num_cpus=2, log_to_driver=False)
    port = _free_port()
    serve.start(http_options={"host": "127.0.0.1", "port": port})
    serve.run(build_app({"model": checkpoint, "max_tokens_cap": max_tokens}), name="bench", route_prefix="/")
    return f"http://127.0.0.1:{port}"


def scrape_metrics(prefix: str = "ray_mtp_serve_", wait_s: float = 20.0) -> dict[str, float]:
    """Sum of each of our Ray metrics as this node's Prometheus endpoint exports them.

    Shows the counters really leave the replicas; they are flushed every few seconds.
    """
    import ray

    port = ray._private.worker.global_worker.node.metrics_export_port
    deadline, totals = time.monotonic() + wait_s, {}
    while time.monotonic() < deadline:
        text = requests.get(f"http://127.0.0.1:{port}/metrics", timeout=10).text
        totals = {}
        for line in text.splitlines():
            if line.startswith(prefix):
                name = line.split("{")[0].split(" ")[0]
                totals[name] = totals.get(name, 0.0) + float(line.rsplit(" ", 1)[1])
        if f"{prefix}requests_total" in totals and f"{prefix}generated_tokens_total" in totals:
            break
        time.sleep(2)
    return totals


def stop_service() -> None:
    import ray
    from ray import serve

    serve.shutdown()
    ray.shutdown()


# --------------------------------------------------------------------------- load


@dataclass
class Cell:
    """One (concurrency, speculation) measurement."""

    concurrency: int
    speculative: bool
    requests: int = 0
    errors: int = 0
    completion_tokens: int = 0
    elapsed_s: float = 0.0
    latencies_s: list[float] = field(default_factory=list)
    ttft_s: list[float] = field(default_factory=list)
    forwards: int = 0

    def summary(self) -> dict[str, float | int | bool]:
        return {
            "concurrency": self.concurrency,
            "speculative": self.speculative,
            "requests": self.requests,
            "errors": self.errors,
            "requests_per_s": self.requests / self.elapsed_s if self.elapsed_s else 0.0,
            "tokens_per_s": self.completion_tokens / self.elapsed_s if self.elapsed_s else 0.0,
            "p50_latency_s": _percentile(self.latencies_s, 50),
            "p99_latency_s": _percentile(self.latencies_s, 99),
            "p50_ttft_s": _percentile(self.ttft_s, 50),
            "tokens_per_forward": self.completion_tokens / self.forwards if self.forwards else 0.0,
        }


def _percentile(values: list[float], q: float) -> float:
    if not values:
        return float("nan")
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, max(0, round(q / 100 * (len(ordered) - 1))))]


def _request_body(prompt: str, max_tokens: int, speculative: bool, stream: bool) -> dict:
    body = {"prompt": prompt, "max_tokens": max_tokens, "temperature": 0, "speculative": speculative}
    if stream:
        body.update(stream=True, stream_options={"include_usage": True})
    return body


def _one_request(session: requests.Session, url: str, body: dict, timeout: float) -> tuple[float, float | None, dict]:
    """(latency, time to first text chunk or None, usage) of one request; raises on any error."""
    start = time.perf_counter()
    if not body.get("stream"):
        r = session.post(f"{url}/v1/completions", json=body, timeout=timeout)
        r.raise_for_status()
        return time.perf_counter() - start, None, r.json()["usage"]
    first, usage, done = None, None, False
    with session.post(f"{url}/v1/completions", json=body, timeout=timeout, stream=True) as r:
        r.raise_for_status()
        for line in r.iter_lines():
            if not line.startswith(b"data: "):
                continue
            payload = line[6:]
            if payload == b"[DONE]":
                done = True
                break
            event = json.loads(payload)
            if "error" in event:
                raise RuntimeError(event["error"]["message"])
            if first is None and event["choices"] and event["choices"][0]["text"]:
                first = time.perf_counter() - start
            usage = event.get("usage", usage)
    if not done or usage is None:
        raise RuntimeError("stream ended without usage and [DONE]")
    return time.perf_counter() - start, first, usage


def run_load(url: str, prompts: list[str], cell: Cell, total: int, max_tokens: int, stream: bool,
             timeout: float) -> None:
    """Closed loop: ``cell.concurrency`` clients send ``total`` requests, cycling through prompts."""
    lock, counter = threading.Lock(), iter(range(total))

    def client() -> None:
        session = requests.Session()  # keep-alive, as a real client would
        while True:
            with lock:
                i = next(counter, None)
            if i is None:
                return
            body = _request_body(prompts[i % len(prompts)], max_tokens, cell.speculative, stream)
            try:
                latency, ttft, usage = _one_request(session, url, body, timeout)
            except Exception as exc:  # noqa: BLE001 - every failure is counted and shown
                with lock:
                    cell.errors += 1
                print(f"  request failed: {type(exc).__name__}: {exc}", file=sys.stderr)
                continue
            with lock:
                if stream:
                    cell.ttft_s.append(ttft if ttft is not None else latency)
                else:
                    cell.requests += 1
                    cell.latencies_s.append(latency)
                    cell.completion_tokens += usage["completion_tokens"]
                    cell.forwards += usage["forwards"]

    threads = [threading.Thread(target=client) for _ in range(cell.concurrency)]
    start = time.perf_counter()
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    if not stream:
        cell.elapsed_s += time.perf_counter() - start


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
    checkpoint = str(local_checkpoint_dir(checkpoint))
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
    cells: list[Cell] = []
    try:
        for _ in range(2):  # warm-up: compile paths, fill the proxy's and replica's caches
            _one_request(requests.Session(), url, _request_body(prompts[0], 8, True, False), args.timeout)
        for concurrency in args.concurrency:
            pair = [Cell(concurrency, False), Cell(concurrency, True)]
            per_round = max(max(args.requests, 2 * concurrency) // args.rounds, concurrency)
            for _ in range(args.rounds):  # alternate the modes so machine noise hits both alike
                for cell in pair:
                    run_load(url, prompts, cell, per_round, args.max_tokens, stream=False, timeout=args.timeout)
            for cell in pair:
                run_load(url, prompts, cell, max(args.stream_requests, concurrency), args.max_tokens, stream=True,
                         timeout=args.timeout)
                cells.append(cell)
                s = cell.summary()
                print(f"  c={concurrency:<3} spec={str(cell.speculative):<5} {s['tokens_per_s']:8.1f} tok/s "
                      f"p50 {s['p50_latency_s']:.3f}s errors {cell.errors}", flush=True)
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


def checks(engine: dict[str, float], rows: list[dict]) -> dict[str, dict]:
    by = {(r["concurrency"], r["speculative"]): r for r in rows}
    lowest, highest = min(r["concurrency"] for r in rows), max(r["concurrency"] for r in rows)
    serve_speedup = by[(lowest, True)]["tokens_per_s"] / by[(lowest, False)]["tokens_per_s"]
    retention = serve_speedup / engine["speedup"]
    high_ratio = by[(highest, True)]["tokens_per_s"] / by[(highest, False)]["tokens_per_s"]
    errors = sum(r["errors"] for r in rows)
    return {
        "speedup_retention": {"serve_speedup": serve_speedup, "engine_speedup": engine["speedup"],
                              "retention": retention, "target": RETENTION_TARGET,
                              "ok": retention >= RETENTION_TARGET, "concurrency": lowest},
        "speculative_not_slower": {"concurrency": highest, "ratio": high_ratio, "ok": high_ratio >= 1.0},
        "errors": {"count": errors, "ok": errors == 0},
    }


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
