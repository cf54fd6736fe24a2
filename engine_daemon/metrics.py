"""Prometheus metrics of one engine daemon, served on their own port (names follow vLLM's where they fit)."""

from __future__ import annotations

import time
from typing import TYPE_CHECKING, Any

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram, start_http_server

if TYPE_CHECKING:
    from engine_daemon.engine import StepOutput
    from engine_daemon.protocol import EngineSnapshot
    from engine_daemon.service import EngineService

_LATENCY_BUCKETS = (0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0, 60.0)
_ADAPTER_COUNT_BUCKETS = (0, 1, 2, 4, 8, 16, 32, 64)
TIERS = ("gpu", "host", "disk", "loading", "failed")


class EngineMetrics:
    """Updated from the service loop's thread; prometheus_client makes reads from the HTTP thread safe."""

    def __init__(self, service: EngineService, registry: CollectorRegistry | None = None) -> None:
        self.service = service
        self.registry = registry or CollectorRegistry()
        labels = {"model_name": service.base_model, "engine": service.engine_id}
        names = list(labels)

        def gauge(name: str, doc: str, extra: tuple[str, ...] = ()) -> Gauge:
            return Gauge(name, doc, names + list(extra), registry=self.registry)

        def counter(name: str, doc: str, extra: tuple[str, ...] = ()) -> Counter:
            return Counter(name, doc, names + list(extra), registry=self.registry)

        def histogram(name: str, doc: str, buckets: tuple[float, ...] = _LATENCY_BUCKETS) -> Histogram:
            return Histogram(name, doc, names, buckets=buckets, registry=self.registry)

        config = service.engine.config

        self.labels = labels
        self.running = gauge("lorafleet:num_requests_running", "Requests in the running batch")
        self.waiting = gauge("lorafleet:num_requests_waiting", "Requests waiting to be scheduled")
        self.kv_usage = gauge("lorafleet:kv_cache_usage_perc", "Share of KV cache blocks in use (0-1)")
        self.memory = gauge("lorafleet:memory_bytes", "Device memory by use", ("kind",))
        self.adapters = gauge("lorafleet:lora_adapters", "Adapters by residency tier", ("tier",))
        self.capacity = gauge("lorafleet:lora_adapter_capacity",
                              "Adapters a tier can hold (host); gpu: distinct adapters in one step", ("tier",))
        self.tier_bytes = gauge("lorafleet:lora_adapter_bytes",
                                "Bytes of adapter weights by tier: device pool rows taken, host copies, files", ("tier",))
        self.capacity.labels(**labels, tier="gpu").set(config.max_loras)
        self.capacity.labels(**labels, tier="host").set(config.max_cpu_loras)
        self.prompt_tokens = counter("lorafleet:prompt_tokens", "Prompt tokens processed")
        self.generation_tokens = counter("lorafleet:generation_tokens", "Tokens generated")
        self.finished = counter("lorafleet:request_success", "Finished requests by reason", ("finished_reason",))
        self.loads = counter("lorafleet:lora_adapter_loads", "Adapter loads onto the device, by source", ("source",))
        self.evictions = counter("lorafleet:lora_adapter_evictions", "Adapters evicted from the device")
        self.slot_hits = counter("lorafleet:lora_adapter_slot_hits", "Requests whose adapter was already on the device")
        self.preemptions = counter("lorafleet:num_preemptions", "Sequences preempted (their KV freed, recomputed later)")
        self.prefix_blocks = gauge("lorafleet:prefix_cache_blocks", "KV blocks in the prefix cache, in use or idle")
        self.prefix_queries = counter(
            "lorafleet:prefix_cache_queries", "Prompt tokens looked up in the prefix cache, by tenant", ("tenant",))
        self.prefix_hits = counter(
            "lorafleet:prefix_cache_hits", "Prompt tokens found in the prefix cache, by tenant", ("tenant",))
        self.prefix_hit_rate = gauge(
            "lorafleet:prefix_cache_hit_rate", "Share of prompt tokens found in the prefix cache since the engine started")
        self.load_time = histogram("lorafleet:lora_adapter_load_seconds", "Time to bring an adapter onto the device")
        self.adapter_wait = histogram("lorafleet:lora_adapter_wait_seconds",
                                      "Time requests that found their adapter off the device waited for it")
        self.ttft = histogram("lorafleet:time_to_first_token_seconds", "Time from request creation to its first token")
        self.itl = histogram("lorafleet:inter_token_latency_seconds", "Time between two tokens of one request")
        self.e2e = histogram("lorafleet:e2e_request_latency_seconds", "Time from request creation to its end")
        self.step_time = histogram("lorafleet:step_seconds", "Duration of one engine step")
        self.adapters_per_step = histogram(
            "lorafleet:lora_adapters_per_step", "Distinct adapters sharing one engine step", _ADAPTER_COUNT_BUCKETS
        )
        for metric in (self.running, self.waiting, self.kv_usage, self.prompt_tokens, self.generation_tokens,
                       self.evictions, self.slot_hits, self.preemptions, self.load_time, self.ttft, self.itl,
                       self.e2e, self.step_time, self.adapters_per_step, self.prefix_blocks, self.prefix_hit_rate,
                       self.adapter_wait):
            metric.labels(**labels)  # exported at 0 from the start, so that rate() and absent() behave
        self._last_token: dict[str, float] = {}
        self._seen_prompt = 0
        self._seen_preemptions = 0
        self._seen_prefix: dict[str, tuple[int, int]] = {}  # tenant -> (prompt, cached) tokens already counted
        self._seen_steps = service.engine.stats.steps
        # Per adapter, so that removing one (its stats go with it) never makes a counter run backwards.
        self._seen_adapter: dict[tuple[str, str], int] = {}
        service.on_step.append(self.observe_step)
        service.on_beat.append(self.refresh)  # gauges stay current while the engine idles

    def observe_step(self, outputs: list[StepOutput], seconds: float) -> None:
        now = time.time()
        self.step_time.labels(**self.labels).observe(seconds)
        stats = self.service.engine.stats
        if stats.steps > self._seen_steps and stats.recent:  # a step that ran the model, not only adapter loads
            self.adapters_per_step.labels(**self.labels).observe(stats.recent[-1].num_adapters)
        self._seen_steps = stats.steps
        for out in outputs:
            if out.new_token_ids:
                self.generation_tokens.labels(**self.labels).inc(len(out.new_token_ids))
                last = self._last_token.get(out.request_id)
                if last is None:
                    created = self._created(out.request_id)
                    if created:
                        self.ttft.labels(**self.labels).observe(max(0.0, now - created))
                else:
                    self.itl.labels(**self.labels).observe(now - last)
                self._last_token[out.request_id] = now
            if out.finished:
                self._last_token.pop(out.request_id, None)
                self.finished.labels(**self.labels, finished_reason=out.finish_reason or "stop").inc()
                created = self._created(out.request_id)
                if created:
                    self.e2e.labels(**self.labels).observe(max(0.0, now - created))
        self.refresh()

    def _created(self, request_id: str) -> float | None:
        flight = self.service.in_flight.get(request_id)
        return flight.request.created if flight is not None and flight.request.created else None

    def refresh(self) -> None:
        """Gauges and counters that the engine keeps itself."""
        engine = self.service.engine
        snap = engine.snapshot()
        self.running.labels(**self.labels).set(snap.running)
        self.waiting.labels(**self.labels).set(snap.waiting)
        self.kv_usage.labels(**self.labels).set(snap.kv_blocks_used / max(1, snap.kv_blocks_total))
        for kind, value in snap.memory.items():
            self.memory.labels(**self.labels, kind=kind).set(value)
        counts = dict.fromkeys(TIERS, 0)
        evictions = slot_hits = 0
        for row in snap.adapters:
            counts[row["tier"]] = counts.get(row["tier"], 0) + 1
            evictions += self._adapter_delta(row["name"], "evictions", row["evictions"])
            slot_hits += self._adapter_delta(row["name"], "gpu_hits", row["gpu_hits"])
        known = {row["name"] for row in snap.adapters}
        self._seen_adapter = {key: value for key, value in self._seen_adapter.items() if key[0] in known}
        for tier, count in counts.items():
            self.adapters.labels(**self.labels, tier=tier).set(count)
        for tier, size in snap.adapter_bytes.items():
            self.tier_bytes.labels(**self.labels, tier=tier).set(size)
        if evictions:
            self.evictions.labels(**self.labels).inc(evictions)
        if slot_hits:
            self.slot_hits.labels(**self.labels).inc(slot_hits)
        if snap.prompt_tokens > self._seen_prompt:
            self.prompt_tokens.labels(**self.labels).inc(snap.prompt_tokens - self._seen_prompt)
            self._seen_prompt = snap.prompt_tokens
        if snap.preemptions > self._seen_preemptions:
            self.preemptions.labels(**self.labels).inc(snap.preemptions - self._seen_preemptions)
            self._seen_preemptions = snap.preemptions
        self._refresh_prefix_cache(snap)
        events = engine.residency.load_events
        while events:
            _name, seconds, source = events.popleft()
            self.loads.labels(**self.labels, source=source).inc()
            self.load_time.labels(**self.labels).observe(seconds)
        waits = engine.scheduler.adapter_waits
        while waits:
            self.adapter_wait.labels(**self.labels).observe(waits.popleft())

    def _refresh_prefix_cache(self, snap: EngineSnapshot) -> None:
        self.prefix_blocks.labels(**self.labels).set(snap.prefix_cache_blocks)
        self.prefix_hit_rate.labels(**self.labels).set(snap.prefix_hit_rate or 0.0)
        for tenant, (prompt, cached) in snap.prefix_tenants.items():
            seen = self._seen_prefix.get(tenant)
            if seen == (prompt, cached):
                continue
            seen_prompt, seen_cached = seen or (0, 0)
            # Both series exist from a tenant's first request on, so that hits / queries is 0, not absent.
            self.prefix_queries.labels(**self.labels, tenant=tenant).inc(max(0, prompt - seen_prompt))
            self.prefix_hits.labels(**self.labels, tenant=tenant).inc(max(0, cached - seen_cached))
            self._seen_prefix[tenant] = (max(prompt, seen_prompt), max(cached, seen_cached))

    def _adapter_delta(self, name: str, stat: str, value: int) -> int:
        """How much an adapter's own counter grew since the last look (a re-added adapter starts again at 0)."""
        seen = self._seen_adapter.get((name, stat), 0)
        self._seen_adapter[(name, stat)] = value
        return value - seen if value >= seen else value


def serve_metrics(service: EngineService, port: int, host: str = "127.0.0.1") -> str:
    """Start the /metrics HTTP server in a background thread; returns its URL (port 0: a free port)."""
    metrics = EngineMetrics(service)
    metrics.refresh()
    server, _thread = start_http_server(port, addr=host, registry=metrics.registry)
    return f"http://{host}:{server.server_port}/metrics"


def metric_families(text: str) -> dict[str, Any]:
    """Parse exposition text (tests and tools): family name → family."""
    from prometheus_client.parser import text_string_to_metric_families

    return {family.name: family for family in text_string_to_metric_families(text)}
