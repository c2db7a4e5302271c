"""Prometheus metrics (prometheus-client), named as vLLM names them (prefix ``qwen2_triton:``).

The engine thread reports to ``EngineMetrics`` (the AsyncLLM observer): gauges after each step, histograms per
finished request. Each server has its own registry, so several can live in one process (tests do).
"""
from __future__ import annotations

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram, generate_latest

P = "qwen2_triton:"
_TTFT_BUCKETS = (0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 20, 40, 80)
_TPOT_BUCKETS = (0.005, 0.01, 0.025, 0.05, 0.075, 0.1, 0.25, 0.5, 1, 2.5, 5)


class EngineMetrics:
    def __init__(self, model_name: str):
        self.registry = r = CollectorRegistry()
        labels = ["model_name"]
        self.running = Gauge(P + "num_requests_running", "Requests in the running batch", labels, registry=r)
        self.waiting = Gauge(P + "num_requests_waiting", "Requests waiting for admission", labels, registry=r)
        self.kv_usage = Gauge(P + "kv_cache_usage_perc", "Fraction of KV-cache blocks in use (0-1)", labels,
                              registry=r)
        self.preemptions = Gauge(P + "num_preemptions", "Sequences preempted since start-up", labels, registry=r)
        self.prompt_tokens = Counter(P + "prompt_tokens", "Prompt tokens of finished requests", labels, registry=r)
        self.generation_tokens = Counter(P + "generation_tokens", "Tokens generated", labels, registry=r)
        self.prefix_queries = Counter(P + "prefix_cache_queries", "Prompt tokens looked up in the prefix cache",
                                      labels, registry=r)
        self.prefix_hits = Counter(P + "prefix_cache_hits", "Prompt tokens found in the prefix cache (not computed)",
                                   labels, registry=r)
        self._prefix_seen = (0, 0)  # the engine's running totals already counted
        self.request_success = Counter(P + "request_success", "Requests finished, by reason", labels + ["finished_reason"],
                                registry=r)
        self.ttft = Histogram(P + "time_to_first_token_seconds", "Arrival to first token", labels,
                              buckets=_TTFT_BUCKETS, registry=r)
        self.tpot = Histogram(P + "time_per_output_token_seconds", "Mean time between tokens after the first",
                              labels, buckets=_TPOT_BUCKETS, registry=r)
        self.e2e = Histogram(P + "e2e_request_latency_seconds", "Arrival to last token", labels, registry=r)
        self.model = model_name

    # ---- the AsyncLLM observer (called on the engine thread) -----------------------------------------------
    def step(self, stats: dict, generation_tokens: int) -> None:
        m = self.model
        self.running.labels(m).set(stats["running"])
        self.waiting.labels(m).set(stats["waiting"])
        self.kv_usage.labels(m).set(stats["kv_blocks_used"] / max(1, stats["kv_blocks_total"]))
        self.preemptions.labels(m).set(stats["preemptions"])
        if generation_tokens:
            self.generation_tokens.labels(m).inc(generation_tokens)
        queries, hits = stats.get("prefix_cache_queries", 0), stats.get("prefix_cache_hits", 0)
        if (queries, hits) != self._prefix_seen:  # the engine keeps totals; a Counter takes increments
            self.prefix_queries.labels(m).inc(queries - self._prefix_seen[0])
            self.prefix_hits.labels(m).inc(hits - self._prefix_seen[1])
            self._prefix_seen = (queries, hits)

    def request_finished(self, state) -> None:
        m, t = self.model, state.metrics
        self.prompt_tokens.labels(m).inc(len(state.prompt_ids))
        for c in state.completions:
            self.request_success.labels(m, c.finish_reason or "abort").inc()
        if "first_token" in t:
            self.ttft.labels(m).observe(t["first_token"] - t["arrival"])
            self.e2e.labels(m).observe(t["last_token"] - t["arrival"])
            n = max(len(c.token_ids) for c in state.completions)
            if n > 1:
                self.tpot.labels(m).observe((t["last_token"] - t["first_token"]) / (n - 1))

    def render(self) -> bytes:
        return generate_latest(self.registry)
