"""Prometheus metrics with vLLM 0.25's names, types, labels and buckets, on one registry per app.

Counters and histograms are updated as the engine works (this class is its EngineObserver); gauges
(running, waiting, KV usage, sleep state, LoRA info) are read from the engine at scrape time, so
they are never stale. Label values: `model_name` = first served name, `engine` = "0".
"""

from __future__ import annotations

import time
from collections.abc import Callable, Iterator

from prometheus_client import CollectorRegistry, Counter, Histogram
from prometheus_client.core import GaugeMetricFamily, Metric
from prometheus_client.gc_collector import GCCollector
from prometheus_client.platform_collector import PlatformCollector
from prometheus_client.process_collector import ProcessCollector

from mvllm.sim.config import SimConfig
from mvllm.sim.engine import Engine, EngineSnapshot
from mvllm.sim.scheduler import Seq

TTFT_BUCKETS = [0.001, 0.005, 0.01, 0.02, 0.04, 0.06, 0.08, 0.1, 0.25, 0.5, 0.75, 1.0, 2.5, 5.0, 7.5, 10.0,
                20.0, 40.0, 80.0, 160.0, 640.0, 2560.0]
ITL_BUCKETS = [0.01, 0.025, 0.05, 0.075, 0.1, 0.15, 0.2, 0.3, 0.4, 0.5, 0.75, 1.0, 2.5, 5.0, 7.5, 10.0, 20.0,
               40.0, 80.0]
REQUEST_LATENCY_BUCKETS = [0.3, 0.5, 0.8, 1.0, 1.5, 2.0, 2.5, 5.0, 10.0, 15.0, 20.0, 30.0, 40.0, 50.0, 60.0,
                           120.0, 240.0, 480.0, 960.0, 1920.0, 7680.0]
FINISH_REASONS = ("stop", "length", "abort", "error", "repetition")
LABELS = ["model_name", "engine"]


def build_1_2_5_buckets(max_value: int) -> list[int]:
    """1, 2, 5, 10, 20, 50, ... up to max_value (vLLM's token-count buckets)."""
    out: list[int] = []
    exponent = 0
    while True:
        for m in (1, 2, 5):
            v = m * 10**exponent
            if v > max_value:
                return out
            out.append(v)
        exponent += 1


class SimMetrics:
    """The `/metrics` of one simulated engine."""

    def __init__(self, cfg: SimConfig, http_counter: bool = True) -> None:
        self.cfg = cfg
        self.registry = CollectorRegistry()
        self._engine: Engine | None = None
        self._lora_info_time = time.time()
        self._lora_info_key: tuple[str, str] = ("", "")
        r = self.registry
        # Process metrics, as vLLM's /metrics has them (per registry: no global state).
        ProcessCollector(registry=r)
        PlatformCollector(registry=r)
        GCCollector(registry=r)
        self.http_requests = Counter(
            "http_requests", "Total number of requests by method, status and handler.",
            ["handler", "method", "status"], registry=r,
        ) if http_counter else None
        self.enabled = not cfg.disable_log_stats
        if not self.enabled:
            return
        lv = (cfg.model_name, "0")

        def counter(name: str, doc: str) -> Counter:
            return Counter(name, doc, LABELS, registry=r)

        def hist(name: str, doc: str, buckets: list) -> Histogram:
            return Histogram(name, doc, LABELS, buckets=buckets, registry=r)

        self.preemptions = counter("vllm:num_preemptions", "Cumulative number of preemption from the engine.").labels(*lv)
        self.prefix_queries = counter(
            "vllm:prefix_cache_queries", "Prefix cache queries, in terms of number of queried tokens.").labels(*lv)
        self.prefix_hits = counter(
            "vllm:prefix_cache_hits", "Prefix cache hits, in terms of number of cached tokens.").labels(*lv)
        self.prompt_tokens = counter("vllm:prompt_tokens", "Number of prefill tokens processed.").labels(*lv)
        self.generation_tokens = counter(
            "vllm:generation_tokens", "Number of generation tokens processed.").labels(*lv)
        success = Counter("vllm:request_success", "Count of successfully processed requests.",
                          [*LABELS, "finished_reason"], registry=r)
        self.success = {reason: success.labels(*lv, reason) for reason in FINISH_REASONS}
        token_buckets = build_1_2_5_buckets(cfg.max_model_len)
        self.req_prompt_tokens = hist(
            "vllm:request_prompt_tokens", "Number of prefill tokens processed.", token_buckets).labels(*lv)
        self.req_generation_tokens = hist(
            "vllm:request_generation_tokens", "Number of generation tokens processed.", token_buckets).labels(*lv)
        self.ttft = hist("vllm:time_to_first_token_seconds", "Histogram of time to first token in seconds.",
                         TTFT_BUCKETS).labels(*lv)
        self.itl = hist("vllm:inter_token_latency_seconds", "Histogram of inter-token latency in seconds.",
                        ITL_BUCKETS).labels(*lv)
        self.e2e = hist("vllm:e2e_request_latency_seconds", "Histogram of e2e request latency in seconds.",
                        REQUEST_LATENCY_BUCKETS).labels(*lv)
        self.queue_time = hist("vllm:request_queue_time_seconds",
                               "Histogram of time spent in WAITING phase for request.",
                               REQUEST_LATENCY_BUCKETS).labels(*lv)
        self.inference_time = hist("vllm:request_inference_time_seconds",
                                   "Histogram of time spent in RUNNING phase for request.",
                                   REQUEST_LATENCY_BUCKETS).labels(*lv)
        self.prefill_time = hist("vllm:request_prefill_time_seconds",
                                 "Histogram of time spent in PREFILL phase for request.",
                                 REQUEST_LATENCY_BUCKETS).labels(*lv)
        self.decode_time = hist("vllm:request_decode_time_seconds",
                                "Histogram of time spent in DECODE phase for request.",
                                REQUEST_LATENCY_BUCKETS).labels(*lv)
        r.register(_LiveGauges(self))

    def attach(self, engine: Engine) -> None:
        self._engine = engine

    # --- EngineObserver -----------------------------------------------------------------------
    def on_scheduled(self, seq: Seq, now: float, first_time: bool) -> None:
        if not self.enabled:
            return
        if self.cfg.enable_prefix_caching and seq.preemptions == 0:
            # As vLLM's KV cache manager: queried tokens are the whole sequence, hits the
            # block-aligned computed tokens found; a preempted request's new lookup is counted
            # apart and not exported (so a victim re-hitting its own blocks does not inflate the
            # ratio); with caching off nothing is recorded.
            self.prefix_queries.inc(seq.prompt_tokens + seq.generated)
            self.prefix_hits.inc(seq.cached_tokens)
        if first_time:
            self.prompt_tokens.inc(seq.prompt_tokens)

    def on_token(self, seq: Seq, now: float, itl: float | None) -> None:
        if not self.enabled:
            return
        self.generation_tokens.inc()
        if itl is None:
            self.ttft.observe(now - seq.arrival)
        else:
            self.itl.observe(itl)

    def on_finished(self, seq: Seq, reason: str, now: float) -> None:
        if not self.enabled:
            return
        self.success.get(reason, self.success["error"]).inc()
        scheduled = seq.first_scheduled if seq.first_scheduled is not None else now
        first = seq.first_token_at if seq.first_token_at is not None else now
        self.e2e.observe(now - seq.arrival)
        self.queue_time.observe(scheduled - seq.arrival)
        self.inference_time.observe(now - scheduled)
        self.prefill_time.observe(first - scheduled)
        self.decode_time.observe(now - first)
        self.req_prompt_tokens.observe(seq.prompt_tokens)
        self.req_generation_tokens.observe(seq.generated)

    def on_preempted(self, seq: Seq) -> None:
        if self.enabled:
            self.preemptions.inc()

    # --- live gauges ----------------------------------------------------------------------------
    def live_families(self) -> Iterator[Metric]:
        if self._engine is None:
            return
        snap: EngineSnapshot = self._engine.snapshot()
        cfg = self.cfg
        lv = [cfg.model_name, "0"]

        def gauge(name: str, doc: str, value: float, extra: dict[str, str] | None = None) -> GaugeMetricFamily:
            extra = extra or {}
            g = GaugeMetricFamily(name, doc, labels=[*LABELS, *extra])
            g.add_metric([*lv, *extra.values()], value)
            return g

        yield gauge("vllm:num_requests_running", "Number of requests in model execution batches.", snap.running)
        yield gauge("vllm:num_requests_waiting", "Number of requests waiting to be processed.", snap.waiting)
        by_reason = GaugeMetricFamily(
            "vllm:num_requests_waiting_by_reason",
            "Number of waiting requests by reason. Reason labels: 'capacity' = waiting for scheduling capacity; "
            "'deferred' = deferred by transient constraints (LoRA budget, KV transfer, blocked status). "
            "Sum of all reasons equals vllm:num_requests_waiting.",
            labels=[*LABELS, "reason"],
        )
        by_reason.add_metric([*lv, "capacity"], snap.waiting - snap.deferred)
        by_reason.add_metric([*lv, "deferred"], snap.deferred)
        yield by_reason
        sleep = GaugeMetricFamily(
            "vllm:engine_sleep_state",
            "Engine sleep state; awake = 0 means engine is sleeping; awake = 1 means engine is awake; "
            "weights_offloaded = 1 means sleep level 1; discard_all = 1 means sleep level 2.",
            labels=[*LABELS, "sleep_state"],
        )
        level = snap.sleep_level
        sleep.add_metric([*lv, "awake"], 1.0 if level == 0 else 0.0)
        sleep.add_metric([*lv, "weights_offloaded"], 1.0 if level == 1 else 0.0)
        sleep.add_metric([*lv, "discard_all"], 1.0 if level == 2 else 0.0)
        yield sleep
        yield gauge("vllm:kv_cache_usage_perc", "KV-cache usage. 1 means 100 percent usage.", snap.kv_usage)
        if cfg.enable_lora:
            yield self._lora_info(snap)
        info = cache_config_labels(cfg)
        cc = GaugeMetricFamily("vllm:cache_config_info", "Information of the LLMEngine CacheConfig",
                               labels=list(info))
        cc.add_metric(list(info.values()), 1.0)
        yield cc

    def _lora_info(self, snap: EngineSnapshot) -> GaugeMetricFamily:
        # vLLM sets this gauge to the current time whenever the adapter sets change; its labels carry
        # the comma-joined adapter names and it has no model_name/engine labels.
        key = (",".join(snap.running_loras), ",".join(snap.waiting_loras))
        if key != self._lora_info_key:
            self._lora_info_key = key
            self._lora_info_time = time.time()
        g = GaugeMetricFamily("vllm:lora_requests_info", "Running stats on lora requests.",
                              labels=["max_lora", "waiting_lora_adapters", "running_lora_adapters"])
        g.add_metric([str(self.cfg.max_loras), key[1], key[0]], self._lora_info_time)
        return g

    def count_http(self, handler: str, method: str, status: int) -> None:
        if self.http_requests is not None:
            self.http_requests.labels(handler, method, f"{status // 100}xx").inc()


def cache_config_labels(cfg: SimConfig) -> dict[str, str]:
    """The labels of `vllm:cache_config_info`: every CacheConfig field as a string, plus engine."""
    tokens = cfg.kv_cache_size_tokens
    return {
        "block_size": str(cfg.block_size),
        "cache_dtype": "auto",
        "calculate_kv_scales": "False",
        "enable_prefix_caching": str(cfg.enable_prefix_caching),
        "engine": "0",
        "gpu_memory_utilization": str(cfg.gpu_memory_utilization),
        "hash_block_size": "None",
        "is_attention_free": "False",
        "kv_cache_dtype_skip_layers": "[]",
        "kv_cache_max_concurrency": str(tokens / cfg.max_model_len),
        "kv_cache_memory_bytes": str(cfg.kv_cache_memory_bytes),
        "kv_cache_size_tokens": str(tokens),
        "kv_offloading_backend": "native",
        "kv_offloading_size": "None",
        "kv_sharing_fast_prefill": "False",
        "mamba_block_size": "None",
        "mamba_cache_dtype": "auto",
        "mamba_cache_mode": "none",
        "mamba_page_size_padded": "None",
        "mamba_ssm_cache_dtype": "auto",
        "num_cpu_blocks": "None",
        "num_gpu_blocks": str(cfg.num_gpu_blocks),
        "num_gpu_blocks_override": "None",
        "prefix_caching_hash_algo": "sha256",
        "sliding_window": "None",
        "user_specified_block_size": "False",
        "user_specified_mamba_block_size": "False",
    }


class _LiveGauges:
    """A prometheus_client collector that asks the engine at scrape time."""

    def __init__(self, metrics: SimMetrics) -> None:
        self._collect: Callable[[], Iterator[Metric]] = metrics.live_families

    def collect(self) -> Iterator[Metric]:
        return self._collect()
