"""Prometheus metrics under vLLM's names, with the `qwenkit:` prefix.

Engine state (running/waiting requests, KV blocks, prefix cache, preemptions) is read from
`EngineClient.stats()` at scrape time; per-request counters and latency histograms are
recorded by the handlers when a request ends.
"""
from __future__ import annotations

from typing import Callable, Iterator

from prometheus_client import CONTENT_TYPE_LATEST, CollectorRegistry, Counter, Gauge, Histogram, generate_latest
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily
from prometheus_client.registry import Collector

from qwenkit.serve.engine_client import EngineStats

PREFIX = "qwenkit:"
CONTENT_TYPE = CONTENT_TYPE_LATEST

_TTFT_BUCKETS = (0.005, 0.01, 0.02, 0.04, 0.06, 0.08, 0.1, 0.25, 0.5, 0.75, 1.0, 2.5, 5.0, 7.5, 10.0, 20.0, 40.0, 80.0)
_LATENCY_BUCKETS = (0.05, 0.1, 0.3, 0.5, 0.8, 1.0, 1.5, 2.0, 2.5, 5.0, 10.0, 15.0, 20.0, 30.0, 40.0, 50.0, 60.0, 120.0, 240.0, 480.0)
_TPOT_BUCKETS = (0.001, 0.005, 0.01, 0.02, 0.04, 0.06, 0.08, 0.1, 0.15, 0.2, 0.3, 0.4, 0.5, 0.75, 1.0, 2.5)


class _EngineCollector(Collector):
    def __init__(self, stats: Callable[[], EngineStats | None], model_name: str) -> None:
        self._stats = stats
        self._model = model_name

    def collect(self) -> Iterator[GaugeMetricFamily | CounterMetricFamily]:
        s = self._stats() or EngineStats()
        labels = ["model_name"]
        values = [self._model]

        def gauge(name: str, doc: str, value: float) -> GaugeMetricFamily:
            g = GaugeMetricFamily(PREFIX + name, doc, labels=labels)
            g.add_metric(values, value)
            return g

        def counter(name: str, doc: str, value: float) -> CounterMetricFamily:
            c = CounterMetricFamily(PREFIX + name, doc, labels=labels)
            c.add_metric(values, value)
            return c

        yield gauge("num_requests_running", "Sequences in the engine's running batch.", s.num_requests_running)
        yield gauge("num_requests_waiting", "Sequences waiting to be scheduled.", s.num_requests_waiting)
        yield gauge("kv_cache_usage_perc", "KV-cache usage: 1 means every block is in use.", s.kv_cache_usage)
        yield gauge("kv_cache_blocks_total", "KV-cache blocks in the pool.", s.num_kv_blocks)
        yield gauge("kv_cache_blocks_used", "KV-cache blocks referenced by live sequences.", s.num_kv_blocks_used)
        yield counter("prefix_cache_queries", "Prompt tokens (full blocks) looked up in the prefix cache.", s.prefix_cache_queries)
        yield counter("prefix_cache_hits", "Prompt tokens (full blocks) served by the prefix cache.", s.prefix_cache_hits)
        yield counter("num_preemptions", "Sequences preempted (recompute) for lack of KV blocks.", s.num_preemptions)
        # Speculative decoding (vLLM's names); acceptance rate = accepted / draft tokens, mean
        # acceptance length = 1 + accepted / drafts.
        yield counter("spec_decode_num_drafts", "Speculative verifications (a sequence with drafts in a step).", s.spec_decode_num_drafts)
        yield counter("spec_decode_num_draft_tokens", "Draft tokens proposed.", s.spec_decode_num_draft_tokens)
        yield counter("spec_decode_num_accepted_tokens", "Draft tokens accepted.", s.spec_decode_num_accepted_tokens)
        rate = s.spec_decode_num_accepted_tokens / s.spec_decode_num_draft_tokens if s.spec_decode_num_draft_tokens else 0.0
        yield gauge("spec_decode_acceptance_rate", "Accepted / proposed draft tokens so far.", rate)
        mean = 1 + s.spec_decode_num_accepted_tokens / s.spec_decode_num_drafts if s.spec_decode_num_drafts else 0.0
        yield gauge("spec_decode_mean_acceptance_length", "Tokens per speculative verification (bonus included).", mean)


class ServerMetrics:
    def __init__(self, model_name: str, stats: Callable[[], EngineStats | None]) -> None:
        self.model_name = model_name
        r = self.registry = CollectorRegistry()
        m = ["model_name"]
        self.prompt_tokens = Counter(PREFIX + "prompt_tokens", "Prefill tokens of finished requests.", m, registry=r)
        self.generation_tokens = Counter(PREFIX + "generation_tokens", "Generated tokens.", m, registry=r)
        self.request_success = Counter(
            PREFIX + "request_success", "Requests finished, by finish reason.", m + ["finished_reason"], registry=r
        )
        self.request_aborted = Counter(
            PREFIX + "request_aborted", "Requests aborted (client disconnect, timeout, shutdown).", m + ["reason"], registry=r
        )
        self.request_rejected = Counter(
            PREFIX + "request_rejected", "Requests refused before reaching the engine.", m + ["reason"], registry=r
        )
        self.in_flight = Gauge(PREFIX + "num_requests_in_flight", "HTTP generation requests admitted.", m, registry=r)
        self.ttft = Histogram(
            PREFIX + "time_to_first_token_seconds", "Time to first token (arrival to first delta).", m,
            buckets=_TTFT_BUCKETS, registry=r,
        )  # fmt: skip
        self.tpot = Histogram(
            PREFIX + "time_per_output_token_seconds", "Mean time per output token after the first.", m,
            buckets=_TPOT_BUCKETS, registry=r,
        )  # fmt: skip
        self.e2e = Histogram(
            PREFIX + "e2e_request_latency_seconds", "End-to-end request latency.", m,
            buckets=_LATENCY_BUCKETS, registry=r,
        )  # fmt: skip
        r.register(_EngineCollector(stats, model_name))

    def observe_finished(
        self, *, prompt_tokens: int, completion_tokens: int, finish_reasons: list[str], ttft: float | None, e2e: float
    ) -> None:
        name = self.model_name
        self.prompt_tokens.labels(name).inc(prompt_tokens)
        self.generation_tokens.labels(name).inc(completion_tokens)
        for reason in finish_reasons:
            self.request_success.labels(name, reason).inc()
        if ttft is not None:
            self.ttft.labels(name).observe(ttft)
            if completion_tokens > 1:
                self.tpot.labels(name).observe((e2e - ttft) / (completion_tokens - 1))
        self.e2e.labels(name).observe(e2e)

    def render(self) -> bytes:
        return generate_latest(self.registry)
