"""Prometheus collectors. Engine state is read at scrape time; latencies are observed as
streams flow through the server."""

from __future__ import annotations

import time
from collections.abc import AsyncIterator, Callable

from prometheus_client import CollectorRegistry, Counter, Histogram
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily

from ..runtime.engine import EngineStats
from ..runtime.request import RequestOutput

_LATENCY_BUCKETS = (0.005, 0.01, 0.02, 0.04, 0.06, 0.08, 0.1, 0.15, 0.2, 0.3, 0.5, 0.75,
                    1.0, 1.5, 2.0, 3.0, 5.0, 7.5, 10.0, 20.0, 40.0, 80.0)


class _EngineCollector:
    def __init__(self, stats: Callable[[], EngineStats | None]) -> None:
        self._stats = stats

    def collect(self):
        s = self._stats()
        if s is None:
            return
        def gauge(name: str, doc: str, value: float) -> GaugeMetricFamily:
            return GaugeMetricFamily(name, doc, value=value)
        yield gauge("kiln_num_requests_running", "Requests in the running batch.", s.num_running)
        yield gauge("kiln_num_requests_waiting", "Requests waiting to be scheduled.", s.num_waiting)
        yield gauge("kiln_kv_cache_usage_ratio", "Fraction of KV-cache blocks in use.", s.kv_cache_usage)
        yield gauge("kiln_kv_cache_blocks_total", "KV-cache blocks in the pool.", s.num_blocks)
        yield gauge("kiln_kv_cache_blocks_free", "KV-cache blocks free (reusable).", s.num_free_blocks)
        hit_rate = s.prefix_cache_hits / s.prefix_cache_queries if s.prefix_cache_queries else 0.0
        yield gauge("kiln_prefix_cache_hit_rate", "Prompt tokens served from the prefix cache / prompt tokens looked up.", hit_rate)
        yield CounterMetricFamily("kiln_prefix_cache_queries", "Prompt tokens looked up in the prefix cache.", value=s.prefix_cache_queries)
        yield CounterMetricFamily("kiln_prefix_cache_hits", "Prompt tokens found in the prefix cache.", value=s.prefix_cache_hits)
        yield CounterMetricFamily("kiln_num_preemptions", "Requests preempted for lack of KV blocks.", value=s.num_preemptions)
        yield CounterMetricFamily("kiln_engine_steps", "Engine steps run.", value=s.num_steps)
        yield gauge("kiln_lora_adapters_loaded", "LoRA adapters registered.", s.num_adapters)
        yield gauge("kiln_lora_adapters_resident", "LoRA adapters whose weights are in memory.", s.num_adapters_resident)
        yield gauge("kiln_lora_resident_bytes", "Bytes of LoRA adapter weights in memory.", s.adapter_resident_bytes)
        yield CounterMetricFamily("kiln_lora_loads", "LoRA adapter weight loads (first loads and reloads after eviction).", value=s.adapter_loads)
        yield CounterMetricFamily("kiln_lora_evictions", "LoRA adapters evicted from memory.", value=s.adapter_evictions)


class ServerMetrics:
    def __init__(self, stats: Callable[[], EngineStats | None]) -> None:
        self.registry = CollectorRegistry()
        self.registry.register(_EngineCollector(stats))
        r = self.registry
        self.ttft = Histogram("kiln_time_to_first_token_seconds", "Time from arrival to the first token.", registry=r, buckets=_LATENCY_BUCKETS)
        self.itl = Histogram("kiln_inter_token_latency_seconds", "Time between tokens of a request.", registry=r, buckets=_LATENCY_BUCKETS)
        self.e2e = Histogram("kiln_e2e_request_latency_seconds", "Time from arrival to the last token.", registry=r, buckets=_LATENCY_BUCKETS)
        self.prompt_tokens = Counter("kiln_prompt_tokens", "Prompt tokens of finished requests.", registry=r)
        self.generation_tokens = Counter("kiln_generation_tokens", "Tokens generated.", registry=r)
        self.requests = Counter("kiln_requests", "Finished requests by finish reason.", ["finish_reason"], registry=r)
        self.http_errors = Counter("kiln_http_errors", "Error responses by status code.", ["status"], registry=r)
        self.lora_requests = Counter("kiln_lora_requests", "Finished requests per LoRA adapter.", ["adapter"], registry=r)
        self.lora_tokens = Counter("kiln_lora_generation_tokens", "Tokens generated per LoRA adapter.", ["adapter"], registry=r)
        self.lora_ttft = Histogram("kiln_lora_time_to_first_token_seconds", "Time to first token per LoRA adapter.",
                                   ["adapter"], registry=r, buckets=_LATENCY_BUCKETS)

    async def observe(self, arrival: float, stream: AsyncIterator[RequestOutput],
                      adapter: str | None = None) -> AsyncIterator[RequestOutput]:
        """Pass a request's stream through, recording its latencies and token counts (also
        per adapter, for requests that use one)."""
        last: float | None = None
        finished = False
        try:
            async for out in stream:
                now = time.monotonic()
                n = len(out.new_token_ids)
                if n:
                    if last is None:
                        self.ttft.observe(now - arrival)
                        if adapter:
                            self.lora_ttft.labels(adapter).observe(now - arrival)
                    else:
                        self.itl.observe((now - last) / n)
                    last = now
                    self.generation_tokens.inc(n)
                    if adapter:
                        self.lora_tokens.labels(adapter).inc(n)
                if out.finished:
                    finished = True
                    self.e2e.observe(now - arrival)
                    self.prompt_tokens.inc(out.num_prompt_tokens)
                    self.requests.labels((out.finish_reason.value if out.finish_reason else "unknown")).inc()
                    if adapter:
                        self.lora_requests.labels(adapter).inc()
                yield out
        finally:
            if not finished:
                self.requests.labels("abort").inc()
