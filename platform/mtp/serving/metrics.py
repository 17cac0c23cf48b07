"""Ray metrics for the completions service (exported with Serve's own, e.g. to Prometheus).

Two groups, one per deployment: the ingress counts requests and their latency by
route and status; the model replica records what the engine did per generation
(tokens, tokens/s, tokens per forward), tagged by whether speculation was on.
"""

from __future__ import annotations

from ray.util import metrics

from mtp.decoding.api import Generation

LATENCY_BUCKETS_S = [0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30, 60, 120]
TOKENS_PER_S_BUCKETS = [1, 5, 10, 25, 50, 100, 250, 500, 1000, 2500, 5000]
TOKENS_PER_FORWARD_BUCKETS = [1, 1.25, 1.5, 1.75, 2, 2.5, 3, 3.5, 4, 5, 6, 8]


class IngressMetrics:
    """Per-request counters: what clients see (status codes, end-to-end latency, TTFT)."""

    def __init__(self) -> None:
        tags = ("route", "status")
        self.requests = metrics.Counter("mtp_serve_requests", "HTTP requests by route and status", tag_keys=tags)
        self.latency = metrics.Histogram(
            "mtp_serve_request_latency_s", "end-to-end request latency", LATENCY_BUCKETS_S, tag_keys=tags
        )
        self.ttft = metrics.Histogram(
            "mtp_serve_time_to_first_token_s", "streamed requests: time to the first text chunk", LATENCY_BUCKETS_S
        )

    def record(self, route: str, status: int, seconds: float) -> None:
        tags = {"route": route, "status": str(status)}
        self.requests.inc(1, tags)
        self.latency.observe(seconds, tags)


class EngineMetrics:
    """Per-generation engine statistics; acceptance is tokens per forward."""

    def __init__(self) -> None:
        tags = ("speculative",)
        self.tokens = metrics.Counter("mtp_serve_generated_tokens", "generated tokens", tag_keys=tags)
        self.forwards = metrics.Counter("mtp_serve_decode_forwards", "decode forwards after prefill", tag_keys=tags)
        self.tokens_per_s = metrics.Histogram(
            "mtp_serve_tokens_per_s", "per-generation decode speed", TOKENS_PER_S_BUCKETS, tag_keys=tags
        )
        self.tokens_per_forward = metrics.Histogram(
            "mtp_serve_tokens_per_forward", "accepted drafts + 1 per forward", TOKENS_PER_FORWARD_BUCKETS, tag_keys=tags
        )
        self.errors = metrics.Counter("mtp_serve_engine_errors", "engine calls that raised", tag_keys=("kind",))

    def record(self, generation: Generation, speculative: bool) -> None:
        tags = {"speculative": str(speculative).lower()}
        stats = generation.stats
        if stats.generated_tokens:
            self.tokens.inc(stats.generated_tokens, tags)
        if stats.forwards:
            self.forwards.inc(stats.forwards, tags)
            self.tokens_per_forward.observe(stats.tokens_per_forward, tags)
        if stats.elapsed_s > 0:
            self.tokens_per_s.observe(stats.tokens_per_s, tags)

    def record_error(self, exc: BaseException) -> None:
        self.errors.inc(1, {"kind": type(exc).__name__})
