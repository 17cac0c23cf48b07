"""Load-testing the Serve completions service against the bare engine (``jobs/bench_serve.py``).

The bare engine's batch-1 speedup comes from ``mtp.decoding.metrics.compare``, the
code ``jobs/bench_decoding.py`` measures with. The service is a local Ray instance
running ``mtp.serving.app:build_app`` on 127.0.0.1; ``measure`` drives it with a
closed loop of clients per concurrency, speculation off and on alternated, then
streamed requests for the time to first token.
"""

from __future__ import annotations

import json
import os
import socket
import sys
import threading
import time
from dataclasses import dataclass, field
from typing import Callable

import requests
import torch

from mtp.bench.decoding import humaneval_prompts
from mtp.decoding import Engine, EngineConfig
from mtp.decoding.metrics import compare

RETENTION_TARGET = 0.85
REPLICA_CPUS = 1  # the ModelServer replica's num_cpus; the engine baseline uses as many threads


# ------------------------------------------------------------ inputs and the bare engine
# The model, the prompts and the engine's batch-1 speedup come from mtp.bench.decoding and mtp.decoding.metrics,
# so "the speedup bench_decoding measures" is measured by the same code here.


def bench_prompts(checkpoint: str, count: int, max_tokens: int) -> tuple[Engine, list[list[int]]]:
    """A batch-1 engine and HumanEval prompts (token ids), cut to leave room for ``max_tokens``."""
    torch.set_num_threads(REPLICA_CPUS)
    engine = Engine.from_checkpoint(checkpoint, EngineConfig(max_batch_size=1))
    context = engine.cfg.max_seq_len
    if context - max_tokens < 8:
        raise SystemExit(f"--max-tokens {max_tokens} leaves no room for a prompt in a context of {context}")
    return engine, humaneval_prompts(engine.tokenizer, count, context - max_tokens)


def engine_speedup(engine: Engine, prompts: list[list[int]], max_tokens: int) -> dict[str, object]:
    """bench_decoding's batch-1 comparison (vanilla vs speculative greedy, interleaved, after warm-up)."""
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


def measure(url: str, prompts: list[str], concurrencies: list[int], requests_per_cell: int, rounds: int,
            stream_requests: int, max_tokens: int, timeout: float,
            progress: Callable[[Cell], None] = lambda cell: None) -> list[Cell]:
    """Vanilla and speculative cells at each concurrency, alternated ``rounds`` times, then TTFT."""
    for _ in range(2):  # warm-up: fill the proxy's and replica's caches
        _one_request(requests.Session(), url, _request_body(prompts[0], 8, True, False), timeout)
    cells: list[Cell] = []
    for concurrency in concurrencies:
        pair = [Cell(concurrency, False), Cell(concurrency, True)]
        per_round = max(max(requests_per_cell, 2 * concurrency) // rounds, concurrency)
        for _ in range(rounds):  # alternate the modes so machine noise hits both alike
            for cell in pair:
                run_load(url, prompts, cell, per_round, max_tokens, stream=False, timeout=timeout)
        for cell in pair:
            run_load(url, prompts, cell, max(stream_requests, concurrency), max_tokens, stream=True, timeout=timeout)
            cells.append(cell)
            progress(cell)
    return cells


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
