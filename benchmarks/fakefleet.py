"""A fleet of fake engines in one process: one aiohttp app listening on many ports, each port a node
that answers /health, /v1/models and a vLLM-like /metrics for several models (no inference).

It lets the scale scenario give the router a 50-node registry without 50 Python processes. Each
node's /metrics body is rendered once: the router's scrape cost depends on its size and shape, which
follow vLLM's (gauges, counters with `_created`, histograms with buckets, `model_name` and `engine`
labels), not on the values.
"""

from __future__ import annotations

import json
import random
from collections import Counter
from dataclasses import dataclass, field

from aiohttp import web

from benchmarks.harness import HOST, free_port

_HIST_BUCKETS = (0.001, 0.005, 0.01, 0.02, 0.04, 0.06, 0.08, 0.1, 0.25, 0.5, 0.75, 1.0, 2.5, 5.0, 7.5, 10.0)
_HISTOGRAMS = (
    ("vllm:time_to_first_token_seconds", "Histogram of time to first token in seconds."),
    ("vllm:inter_token_latency_seconds", "Histogram of inter-token latency in seconds."),
    ("vllm:e2e_request_latency_seconds", "Histogram of e2e request latency in seconds."),
    ("vllm:request_queue_time_seconds", "Histogram of time spent in WAITING phase for request."),
)
_COUNTERS = (
    ("vllm:prompt_tokens", "Number of prefill tokens processed."),
    ("vllm:generation_tokens", "Number of generation tokens processed."),
    ("vllm:num_preemptions", "Cumulative number of preemption from the engine."),
    ("vllm:prefix_cache_queries", "Prefix cache queries, in terms of number of queried tokens."),
    ("vllm:prefix_cache_hits", "Prefix cache hits, in terms of number of cached tokens."),
)


def metrics_text(models: list[str], rng: random.Random) -> str:
    """A vLLM-shaped exposition covering `models` (each as if served by its own engine)."""
    out: list[str] = []

    def family(name: str, help_: str, kind: str) -> None:
        out.append(f"# HELP {name} {help_}")
        out.append(f"# TYPE {name} {kind}")

    for name, help_ in (
        ("vllm:num_requests_running", "Number of requests in model execution batches."),
        ("vllm:num_requests_waiting", "Number of requests waiting to be processed."),
        ("vllm:kv_cache_usage_perc", "KV-cache usage. 1 means 100 percent usage."),
    ):
        family(name, help_, "gauge")
        for m in models:
            value = rng.randint(0, 40) if "usage" not in name else round(rng.random(), 4)
            out.append(f'{name}{{engine="0",model_name="{m}"}} {float(value)}')
    for name, help_ in _COUNTERS:
        family(name + "_total", help_, "counter")
        for m in models:
            out.append(f'{name}_total{{engine="0",model_name="{m}"}} {float(rng.randint(0, 10**7))}')
        family(name + "_created", help_, "gauge")
        for m in models:
            out.append(f'{name}_created{{engine="0",model_name="{m}"}} 1.7632e+09')
    for name, help_ in _HISTOGRAMS:
        family(name, help_, "histogram")
        for m in models:
            count = 0
            for le in _HIST_BUCKETS:
                count += rng.randint(0, 1000)
                out.append(f'{name}_bucket{{engine="0",le="{le}",model_name="{m}"}} {float(count)}')
            out.append(f'{name}_bucket{{engine="0",le="+Inf",model_name="{m}"}} {float(count)}')
            out.append(f'{name}_count{{engine="0",model_name="{m}"}} {float(count)}')
            out.append(f'{name}_sum{{engine="0",model_name="{m}"}} {count * 0.05:.3f}')
    return "\n".join(out) + "\n"


def models_doc(models: list[str]) -> dict:
    return {
        "object": "list",
        "data": [
            {"id": m, "object": "model", "created": 0, "owned_by": "vllm", "root": m, "parent": None, "max_model_len": 4096}
            for m in models
        ],
    }


@dataclass
class FakeFleet:
    """`nodes` fake engines, each serving the same `models_per_node` models, on free loopback ports."""

    nodes: int = 50
    models_per_node: int = 10
    seed: int = 0
    ports: list[int] = field(default_factory=list)
    hits: Counter[tuple[int, str]] = field(default_factory=Counter)  # (port, path) -> count
    _metrics: dict[int, bytes] = field(default_factory=dict)
    _models: bytes = b""
    _runner: web.AppRunner | None = None

    @property
    def model_names(self) -> list[str]:
        return [f"fleet-model-{j}" for j in range(self.models_per_node)]

    @property
    def metrics_bytes(self) -> int:
        return len(next(iter(self._metrics.values()), b""))

    async def start(self) -> list[int]:
        rng = random.Random(self.seed)
        self._models = json.dumps(models_doc(self.model_names)).encode()
        app = web.Application()
        app.router.add_get("/health", self._health)
        app.router.add_get("/v1/models", self._v1_models)
        app.router.add_get("/metrics", self._metrics_handler)
        self._runner = web.AppRunner(app, access_log=None)
        await self._runner.setup()
        for _ in range(self.nodes):
            port = free_port()
            self._metrics[port] = metrics_text(self.model_names, rng).encode()
            await web.TCPSite(self._runner, HOST, port).start()
            self.ports.append(port)
        return self.ports

    async def stop(self) -> None:
        if self._runner is not None:
            await self._runner.cleanup()
            self._runner = None

    def scrapes(self) -> int:
        return sum(n for (_, path), n in self.hits.items() if path == "/metrics")

    @staticmethod
    def _port(request: web.Request) -> int:
        sock = request.transport.get_extra_info("sockname") if request.transport else None
        return int(sock[1]) if sock else 0

    async def _health(self, request: web.Request) -> web.Response:
        self.hits[(self._port(request), "/health")] += 1
        return web.Response(status=200)

    async def _v1_models(self, request: web.Request) -> web.Response:
        self.hits[(self._port(request), "/v1/models")] += 1
        return web.Response(body=self._models, content_type="application/json")

    async def _metrics_handler(self, request: web.Request) -> web.Response:
        port = self._port(request)
        self.hits[(port, "/metrics")] += 1
        return web.Response(body=self._metrics.get(port, b""), content_type="text/plain")
