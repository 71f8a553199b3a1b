"""Prometheus metrics of one server, in its own registry (several servers may share a process, as in tests).

* HTTP requests by endpoint and status code (counted by the app's middleware);
* from the engine, read at scrape time: prompt / generation / prefill tokens, engine steps, preemptions and
  finished requests by reason (counters); running and waiting requests, state slots and KV blocks used and
  in total (gauges);
* time to first token and inter-token latency histograms, fed from the engine's latency samples
  (`EngineMetrics.drain_latencies`) at every scrape and after every request, so the samples never pile up;
* end-to-end request latency, observed by the serving code.
"""

from __future__ import annotations

from typing import Any, Iterator

from prometheus_client import CollectorRegistry, Counter, Histogram, disable_created_metrics, generate_latest
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily, Metric
from prometheus_client.registry import Collector

disable_created_metrics()  # no `_created` timestamp series beside every counter and histogram

CONTENT_TYPE = "text/plain; version=0.0.4; charset=utf-8"
PREFIX = "hylm"

_TTFT_BUCKETS = (0.001, 0.005, 0.01, 0.02, 0.04, 0.06, 0.08, 0.1, 0.25, 0.5, 0.75, 1.0, 2.5, 5.0, 7.5, 10.0,
                 20.0, 40.0, 80.0)
_ITL_BUCKETS = (0.001, 0.0025, 0.005, 0.01, 0.015, 0.02, 0.025, 0.03, 0.04, 0.05, 0.075, 0.1, 0.15, 0.2, 0.3,
                0.4, 0.5, 0.75, 1.0, 2.5)
_E2E_BUCKETS = (0.01, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 20.0, 40.0, 60.0, 120.0, 300.0, 600.0)


class _EngineCollector(Collector):
    """Counters and gauges read from the engine when scraped (plain ints, written by the engine thread)."""

    def __init__(self, engine: Any):
        self.engine = engine

    def collect(self) -> Iterator[Metric]:
        m = self.engine.metrics
        counters = (
            ("prompt_tokens", "Prompt tokens of admitted requests", m.prompt_tokens),
            ("generation_tokens", "Tokens generated", m.decode_tokens),
            ("prefill_tokens", "Tokens fed in prefill chunks, recomputation after preemption included",
             m.prefill_tokens),
            ("engine_steps", "Engine steps (batched forwards)", m.steps),
            ("preemptions", "Requests preempted to free memory", m.preemptions),
            # speculative decoding, where the engine has it
            ("spec_steps", "Speculative verification steps", getattr(m, "spec_steps", None)),
            ("spec_draft_tokens", "Draft tokens proposed", getattr(m, "spec_draft_tokens", None)),
            ("spec_accepted_tokens", "Draft tokens accepted", getattr(m, "spec_accepted_tokens", None)),
        )
        for name, doc, value in counters:
            if value is not None:
                yield CounterMetricFamily(f"{PREFIX}_{name}", doc, value=value)
        if m.spec_steps:
            yield GaugeMetricFamily(f"{PREFIX}_spec_acceptance_rate", "Accepted / proposed draft tokens",
                                    value=m.spec_acceptance_rate)
            yield GaugeMetricFamily(f"{PREFIX}_spec_mean_accepted_length",
                                    "Tokens produced per verification step", value=m.spec_mean_accepted_length)
        cache = getattr(self.engine, "prefix_cache", None)
        if cache is not None:
            st = cache.stats
            yield CounterMetricFamily(f"{PREFIX}_prefix_cache_hits", "Admissions resumed from a cached prefix",
                                      value=st.hits)
            misses = CounterMetricFamily(f"{PREFIX}_prefix_cache_misses", "Admissions with no usable cached prefix, "
                                         "by reason", labels=["reason"])
            for reason, n in sorted(st.misses.items()):
                misses.add_metric([reason], n)
            yield misses
            yield CounterMetricFamily(f"{PREFIX}_prefix_cache_tokens_reused", "Prompt tokens not recomputed",
                                      value=st.tokens_reused)
            yield CounterMetricFamily(f"{PREFIX}_prefix_cache_evictions", "Checkpoints evicted", value=st.evictions)
            yield GaugeMetricFamily(f"{PREFIX}_prefix_cache_bytes", "Bytes held by state checkpoints",
                                    value=st.bytes_used)
            yield GaugeMetricFamily(f"{PREFIX}_prefix_cache_budget_bytes", "Budget for state checkpoints",
                                    value=st.budget_bytes)
        finished = CounterMetricFamily(f"{PREFIX}_requests_finished", "Engine requests finished, by reason",
                                       labels=["reason"])
        for reason, n in sorted(m.requests_finished.copy().items()):
            finished.add_metric([reason], n)
        yield finished
        gauges = (
            ("num_requests_running", "Requests holding a state slot", m.num_running),
            ("num_requests_waiting", "Requests waiting for a state slot", m.num_waiting),
            ("state_slots_used", "Sequence state slots in use", m.slots_used),
            ("state_slots_total", "Sequence state slots", m.slots_total),
            ("kv_blocks_used", "KV-cache blocks in use", m.blocks_used),
            ("kv_blocks_total", "KV-cache blocks", m.blocks_total),
        )
        for name, doc, value in gauges:
            yield GaugeMetricFamily(f"{PREFIX}_{name}", doc, value=value)


class ServerMetrics:
    def __init__(self, engine: Any):
        self.engine = engine
        self.registry = CollectorRegistry()
        self.http_requests = Counter(f"{PREFIX}_http_requests", "HTTP requests by endpoint and status code",
                                     ["endpoint", "status"], registry=self.registry)
        self.ttft = Histogram(f"{PREFIX}_time_to_first_token_seconds", "Time from arrival to the first token",
                              buckets=_TTFT_BUCKETS, registry=self.registry)
        self.itl = Histogram(f"{PREFIX}_inter_token_latency_seconds", "Time between two tokens of a request",
                             buckets=_ITL_BUCKETS, registry=self.registry)
        self.e2e = Histogram(f"{PREFIX}_request_duration_seconds",
                             "Completion and chat requests, from arrival to the last byte, by endpoint",
                             ["endpoint"], buckets=_E2E_BUCKETS, registry=self.registry)
        self.registry.register(_EngineCollector(engine))

    def count_http(self, endpoint: str, status: int) -> None:
        self.http_requests.labels(endpoint, str(status)).inc()

    def drain_latencies(self) -> None:
        ttft, itl = self.engine.metrics.drain_latencies()
        for v in ttft:
            self.ttft.observe(v)
        for v in itl:
            self.itl.observe(v)

    def render(self) -> bytes:
        self.drain_latencies()
        return generate_latest(self.registry)
