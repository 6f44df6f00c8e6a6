"""The agent's own Prometheus metrics (`mvllm_agent_*`), in a registry of its own (no global state)."""

from __future__ import annotations

from collections.abc import Callable, Iterator

from prometheus_client import CollectorRegistry, Counter, Histogram, generate_latest
from prometheus_client.core import GaugeMetricFamily
from prometheus_client.registry import Collector

from mvllm.common.state import INSTANCE_STATES, AgentState

_LOAD_BUCKETS = (0.25, 0.5, 1, 2, 5, 10, 20, 30, 60, 90, 120, 180, 300, 600)
_WAKE_BUCKETS = (0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2, 5, 10, 30)


class _StateCollector(Collector):
    """Gauges read from the supervisor's snapshot at scrape time, so they can never drift."""

    def __init__(self, snapshot: Callable[[], AgentState]) -> None:
        self.snapshot = snapshot

    def collect(self) -> Iterator[GaugeMetricFamily]:
        st = self.snapshot()
        state = GaugeMetricFamily("mvllm_agent_instance_state", "1 for the state each model is in", labels=["model", "state"])
        in_flight = GaugeMetricFamily("mvllm_agent_in_flight", "Requests being relayed to the model now", labels=["model"])
        queued = GaugeMetricFamily("mvllm_agent_queued", "Requests waiting for the model to load or wake", labels=["model"])
        sleep = GaugeMetricFamily("mvllm_agent_sleep_level", "Sleep level (0 awake or not running)", labels=["model"])
        mem = GaugeMetricFamily("mvllm_agent_instance_memory_bytes", "GPU memory the engine holds (measured)", labels=["model"])
        for inst in st.instances:
            for s in INSTANCE_STATES:
                state.add_metric([inst.name, s], 1.0 if inst.state == s else 0.0)
            in_flight.add_metric([inst.name], inst.in_flight)
            queued.add_metric([inst.name], inst.queued)
            sleep.add_metric([inst.name], inst.sleep_level)
            mem.add_metric([inst.name], inst.memory_bytes or 0)
        used = GaugeMetricFamily("mvllm_agent_gpu_memory_used_bytes", "GPU memory used", labels=["gpu", "uuid"])
        total = GaugeMetricFamily("mvllm_agent_gpu_memory_total_bytes", "GPU memory total", labels=["gpu", "uuid"])
        util = GaugeMetricFamily("mvllm_agent_gpu_utilization_percent", "GPU utilization", labels=["gpu", "uuid"])
        for g in st.gpus:
            key = [str(g.index), g.uuid]
            used.add_metric(key, g.memory_used_bytes)
            total.add_metric(key, g.memory_total_bytes)
            if g.utilization_pct is not None:
                util.add_metric(key, g.utilization_pct)
        yield from (state, in_flight, queued, sleep, mem, used, total, util)


class AgentMetrics:
    def __init__(self) -> None:
        self.registry = CollectorRegistry(auto_describe=False)
        r = self.registry
        self.requests = Counter("mvllm_agent_requests", "Requests relayed, by status", ["model", "status"], registry=r)
        self.loads = Counter("mvllm_agent_loads", "Engine starts, by result", ["model", "result"], registry=r)
        self.load_seconds = Histogram(
            "mvllm_agent_load_seconds", "Engine start to ready", ["model"], buckets=_LOAD_BUCKETS, registry=r
        )
        self.wakes = Counter("mvllm_agent_wakes", "Wakes from sleep", ["model", "level"], registry=r)
        self.wake_seconds = Histogram(
            "mvllm_agent_wake_seconds", "Wake duration", ["model", "level"], buckets=_WAKE_BUCKETS, registry=r
        )
        self.sleeps = Counter("mvllm_agent_sleeps", "Sleeps, by reason (idle, evict, api)", ["model", "level", "reason"], registry=r)
        self.stops = Counter(
            "mvllm_agent_stops", "Engine stops, by reason (idle, evict, api, shutdown)", ["model", "reason"], registry=r
        )
        self.crashes = Counter("mvllm_agent_engine_crashes", "Engine processes that exited unasked", ["model"], registry=r)
        self.rejected = Counter(
            "mvllm_agent_rejected", "Requests refused before relaying, by reason", ["model", "reason"], registry=r
        )
        self.switch_drains = Counter(
            "mvllm_agent_switch_drains",
            "Busy models drained to make room for another after max_switch_wait",
            ["model"],
            registry=r,
        )
        self.relay_retries = Counter(
            "mvllm_agent_relay_retries",
            "Requests sent to an engine again before any byte reached the client, by reason "
            "(stale_connection: a pooled connection the engine had closed; restart: the engine crashed)",
            ["model", "reason"],
            registry=r,
        )

    def watch(self, snapshot: Callable[[], AgentState]) -> None:
        self.registry.register(_StateCollector(snapshot))

    def render(self) -> bytes:
        return generate_latest(self.registry)
