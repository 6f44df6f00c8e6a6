"""The router's own Prometheus metrics (prefix `mvllm_`, never `vllm:`), in a private CollectorRegistry.

Per-request counters and histograms are updated once per request, never per stream chunk. Node
gauges (score, load, breaker state) are read from the registry when /metrics is scraped, so the
hot path does not maintain them.
"""

from __future__ import annotations

import time
from collections.abc import Callable, Iterator
from typing import Any

from prometheus_client import CollectorRegistry, Counter, Histogram, generate_latest
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily
from prometheus_client.registry import Collector

from mvllm.router.breaker import STATE_VALUE
from mvllm.router.fleet.registry import Registry
from mvllm.router.policy import Policy
from mvllm.router.prefix_index import PrefixIndex

CONTENT_TYPE = "text/plain; version=0.0.4; charset=utf-8"

_LATENCY_BUCKETS = (0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30, 60, 120, 300)
_TTFB_BUCKETS = (0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30)


class _NodeCollector(Collector):
    def __init__(self, registry: Registry, policy: Callable[[], Policy]) -> None:
        self._registry = registry
        self._policy = policy

    def describe(self) -> list[GaugeMetricFamily]:
        # Registration must not call collect(): the state it reads is not wired up yet.
        return []

    def collect(self) -> Iterator[GaugeMetricFamily | CounterMetricFamily]:
        policy = self._policy()
        now = time.monotonic()
        families = {
            "score": GaugeMetricFamily("mvllm_node_score", "Load score of the node under the current policy", labels=["node"]),
            "in_flight": GaugeMetricFamily("mvllm_node_in_flight", "Requests the router has in flight on the node", labels=["node"]),
            "running": GaugeMetricFamily("mvllm_node_running", "Estimated running requests on the node", labels=["node"]),
            "waiting": GaugeMetricFamily("mvllm_node_waiting", "Estimated waiting requests on the node", labels=["node"]),
            "capacity": GaugeMetricFamily("mvllm_node_capacity", "Configured capacity of the node", labels=["node"]),
            "breaker": GaugeMetricFamily(
                "mvllm_node_breaker_state", "Circuit breaker state: 0 closed, 1 half-open, 2 open", labels=["node"]
            ),
            "healthy": GaugeMetricFamily("mvllm_node_healthy", "1 when the node can take requests now", labels=["node"]),
            "kv_cache": GaugeMetricFamily(
                "mvllm_node_kv_cache_usage", "The engine's vllm:kv_cache_usage_perc (0..1) at the last scrape", labels=["node"]
            ),
            "sent_after_failure": CounterMetricFamily(
                "mvllm_node_sent_after_failure",
                "Requests sent to the node while its breaker, still closed, had a failure counted "
                "(what failure_threshold costs when a node starts failing)",
                labels=["node"],
            ),
        }
        for node in self._registry.iter_all():
            n = [node.name]
            families["score"].add_metric(n, policy.score(node))
            families["in_flight"].add_metric(n, node.in_flight)
            families["running"].add_metric(n, node.running)
            families["waiting"].add_metric(n, node.waiting)
            families["capacity"].add_metric(n, node.capacity)
            families["breaker"].add_metric(n, STATE_VALUE[node.breaker.state])
            families["healthy"].add_metric(n, 1.0 if node.routable(now) else 0.0)
            families["sent_after_failure"].add_metric(n, node.breaker.sent_after_failure)
            if node.kv_cache_usage is not None:
                families["kv_cache"].add_metric(n, node.kv_cache_usage)
        yield from families.values()


class _PrefixIndexCollector(Collector):
    def __init__(self, index: PrefixIndex) -> None:
        self._index = index

    def describe(self) -> list[GaugeMetricFamily]:
        return []

    def collect(self) -> Iterator[GaugeMetricFamily]:
        size = GaugeMetricFamily("mvllm_prefix_index_bytes", "Memory of cache-aware routing's prefix index (bounded by max_tree_bytes)")
        size.add_metric([], self._index.size_bytes)
        keys = GaugeMetricFamily("mvllm_prefix_index_keys", "Prefixes (chunk chains) held by the prefix index")
        keys.add_metric([], len(self._index))
        yield size
        yield keys


class RouterMetrics:
    def __init__(self, registry: Registry, policy: Callable[[], Policy], prefix_index: PrefixIndex | None = None) -> None:
        self.registry = CollectorRegistry(auto_describe=True)
        r = self.registry
        self.requests = Counter(
            "mvllm_requests", "Requests answered, by model, node and HTTP status", ["model", "node", "status"], registry=r
        )
        self.latency = Histogram(
            "mvllm_request_duration_seconds", "Time from request to last byte sent", ["model"], buckets=_LATENCY_BUCKETS, registry=r
        )
        self.ttfb = Histogram(
            "mvllm_time_to_first_byte_seconds", "Time from request to first body byte sent", ["model"], buckets=_TTFB_BUCKETS, registry=r
        )
        self.retries = Counter("mvllm_retries", "Requests retried on another node, by reason", ["model", "reason"], registry=r)
        self.node_failures = Counter(
            "mvllm_node_failures", "Failures counted against a node, by kind", ["node", "kind"], registry=r
        )
        self.stream_errors = Counter(
            "mvllm_stream_errors", "Answers that broke after their first byte reached the client", ["node"], registry=r
        )
        self.stream_resumes = Counter(
            "mvllm_stream_resumes", "Broken streams sent on to another node, by outcome (docs/configuration.md)", ["outcome"],
            registry=r,
        )
        self.breaker_transitions = Counter(
            "mvllm_breaker_transitions", "Circuit breaker state changes", ["node", "to"], registry=r
        )
        self.reloads = Counter("mvllm_config_reloads", "Config reloads, by result", ["result"], registry=r)
        self.route_decisions = Counter(
            "mvllm_route_decisions", "Routing decisions (one per attempt), by policy and reason", ["policy", "reason"], registry=r
        )
        r.register(_NodeCollector(registry, policy))
        if prefix_index is not None:
            r.register(_PrefixIndexCollector(prefix_index))
        # labels() takes a lock and formats its values on every call: the proxy's per-request
        # updates go through these caches of children instead (the label sets are the same).
        self._request_children: dict[tuple[str, str, int], Any] = {}
        self._latency_children: dict[str, Any] = {}
        self._ttfb_children: dict[str, Any] = {}
        self._route_children: dict[tuple[str, str], Any] = {}

    def count_route(self, policy: str, reason: str) -> None:
        """mvllm_route_decisions_total{policy,reason} += 1."""
        key = (policy, reason)
        child = self._route_children.get(key)
        if child is None:
            child = self._route_children[key] = self.route_decisions.labels(policy, reason)
        child.inc()

    def count_request(self, model: str, node: str, status: int) -> None:
        """mvllm_requests_total{model,node,status} += 1."""
        key = (model, node, status)
        child = self._request_children.get(key)
        if child is None:
            child = self._request_children[key] = self.requests.labels(model, node, str(status))
        child.inc()

    def observe_latency(self, model: str, seconds: float) -> None:
        child = self._latency_children.get(model)
        if child is None:
            child = self._latency_children[model] = self.latency.labels(model)
        child.observe(seconds)

    def observe_ttfb(self, model: str, seconds: float) -> None:
        child = self._ttfb_children.get(model)
        if child is None:
            child = self._ttfb_children[model] = self.ttfb.labels(model)
        child.observe(seconds)

    def render(self) -> bytes:
        return generate_latest(self.registry)
