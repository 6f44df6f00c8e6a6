"""/metrics of the simulated engine parsed by prometheus_client, and the queueing it reports."""

import asyncio
import time

import aiohttp
import openai
import pytest
from prometheus_client.parser import text_string_to_metric_families

MSG = [{"role": "user", "content": "Hello there, how are you?"}]


@pytest.fixture
def start(sim_factory):
    return sim_factory


async def scrape(sim) -> dict:
    async with aiohttp.ClientSession() as s, s.get(sim.url + "/metrics") as r:
        assert r.status == 200 and r.headers["Content-Type"].startswith("text/plain")
        text = await r.text()
    return {f.name: f for f in text_string_to_metric_families(text)}


def value(families, name, **labels):
    for sample in families[name].samples:
        if sample.name.endswith(("_created",)):
            continue
        if all(sample.labels.get(k) == v for k, v in labels.items()):
            return sample.value
    raise KeyError((name, labels))


async def test_names_types_and_labels_match_vllm(start):
    sim = await start(served_model_names=["first", "second"], enable_lora=True, max_loras=3)
    c = openai.AsyncOpenAI(base_url=sim.url + "/v1", api_key="x", max_retries=0)
    await c.chat.completions.create(model="second", messages=MSG, max_tokens=4)
    fams = await scrape(sim)
    expected = {
        "vllm:num_requests_running": "gauge",
        "vllm:num_requests_waiting": "gauge",
        "vllm:kv_cache_usage_perc": "gauge",
        "vllm:engine_sleep_state": "gauge",
        "vllm:cache_config_info": "gauge",
        "vllm:lora_requests_info": "gauge",
        "vllm:num_preemptions": "counter",
        "vllm:prefix_cache_queries": "counter",
        "vllm:prefix_cache_hits": "counter",
        "vllm:prompt_tokens": "counter",
        "vllm:generation_tokens": "counter",
        "vllm:request_success": "counter",
        "vllm:time_to_first_token_seconds": "histogram",
        "vllm:inter_token_latency_seconds": "histogram",
        "vllm:e2e_request_latency_seconds": "histogram",
        "vllm:request_queue_time_seconds": "histogram",
    }
    for name, kind in expected.items():
        assert fams[name].type == kind, name
    for name in expected:
        if name in ("vllm:cache_config_info", "vllm:lora_requests_info"):
            continue
        for sample in fams[name].samples:
            assert sample.labels["model_name"] == "first" and sample.labels["engine"] == "0", sample
    assert {s.name for s in fams["vllm:prompt_tokens"].samples} == {"vllm:prompt_tokens_total"}
    assert fams["vllm:prompt_tokens_created"].type == "gauge"  # as vLLM's text shows it
    assert value(fams, "vllm:generation_tokens") == 4
    assert value(fams, "vllm:prompt_tokens") > 0
    assert value(fams, "vllm:request_success", finished_reason="length") == 1
    assert value(fams, "vllm:request_success", finished_reason="stop") == 0
    ttft_count = [s.value for s in fams["vllm:time_to_first_token_seconds"].samples
                  if s.name.endswith("_count")]
    assert ttft_count == [1]
    itl_count = [s.value for s in fams["vllm:inter_token_latency_seconds"].samples if s.name.endswith("_count")]
    assert itl_count == [3]
    buckets = [s.labels["le"] for s in fams["vllm:time_to_first_token_seconds"].samples
               if s.name.endswith("_bucket")]
    assert buckets[0] == "0.001" and buckets[-1] == "+Inf"
    states = {s.labels["sleep_state"]: s.value for s in fams["vllm:engine_sleep_state"].samples}
    assert states == {"awake": 1.0, "weights_offloaded": 0.0, "discard_all": 0.0}
    cc = fams["vllm:cache_config_info"].samples[0]
    assert cc.value == 1.0 and "model_name" not in cc.labels and cc.labels["engine"] == "0"
    for label in ("num_gpu_blocks", "block_size", "gpu_memory_utilization", "kv_cache_size_tokens"):
        assert label in cc.labels
    assert int(cc.labels["kv_cache_size_tokens"]) == int(cc.labels["num_gpu_blocks"]) * 16
    lora = fams["vllm:lora_requests_info"].samples[0]
    assert set(lora.labels) == {"max_lora", "waiting_lora_adapters", "running_lora_adapters"}
    assert lora.labels["max_lora"] == "3" and lora.value > 1e9  # a timestamp, as vLLM sets it


async def test_disable_log_stats_removes_engine_metrics(start):
    sim = await start(disable_log_stats=True)
    fams = await scrape(sim)
    assert not [n for n in fams if n.startswith("vllm:")]


async def test_queueing_never_exceeds_max_num_seqs(start):
    sim = await start(max_num_seqs=2, itl_ms=15.0)
    c = openai.AsyncOpenAI(base_url=sim.url + "/v1", api_key="x", max_retries=0, timeout=30)
    tasks = [asyncio.create_task(c.chat.completions.create(model="sim-model", messages=MSG, max_tokens=10))
             for _ in range(6)]
    seen_full_queue = False
    max_running = 0
    deadline = time.monotonic() + 20
    while not all(t.done() for t in tasks) and time.monotonic() < deadline:
        fams = await scrape(sim)
        running = value(fams, "vllm:num_requests_running")
        waiting = value(fams, "vllm:num_requests_waiting")
        max_running = max(max_running, running)
        if running == 2 and waiting == 4:
            seen_full_queue = True
        await asyncio.sleep(0.01)
    results = await asyncio.gather(*tasks)
    assert max_running == 2
    assert seen_full_queue
    assert all(r.usage.completion_tokens == 10 for r in results)
    fams = await scrape(sim)
    assert value(fams, "vllm:num_requests_running") == 0 and value(fams, "vllm:num_requests_waiting") == 0
    queue = next(s.value for s in fams["vllm:request_queue_time_seconds"].samples if s.name.endswith("_sum"))
    assert queue > 0.1  # four of six requests waited for a batch slot


async def test_prefix_cache_hits_on_repeated_prompt(start):
    sim = await start()
    c = openai.AsyncOpenAI(base_url=sim.url + "/v1", api_key="x", max_retries=0)
    long = [{"role": "user", "content": "shared system prompt words " * 30}]
    r = await c.chat.completions.create(model="sim-model", messages=long, max_tokens=1)
    first = await scrape(sim)
    assert value(first, "vllm:prefix_cache_hits") == 0
    await c.chat.completions.create(model="sim-model", messages=long, max_tokens=1)
    second = await scrape(sim)
    hits = value(second, "vllm:prefix_cache_hits")
    queries = value(second, "vllm:prefix_cache_queries")
    # Every full 16-token block hits within the first n - 1 tokens (vLLM always computes the last
    # token, and hits are whole blocks).
    assert hits == (r.usage.prompt_tokens - 1) // 16 * 16 and hits >= 96
    assert queries == 2 * value(first, "vllm:prefix_cache_queries") == 2 * r.usage.prompt_tokens


async def test_prefix_still_prefilling_is_computed_again(start):
    sim = await start(prefill_ms_per_token=1.0)
    c = openai.AsyncOpenAI(base_url=sim.url + "/v1", api_key="x", max_retries=0)
    long = [{"role": "user", "content": "another shared system prompt " * 30}]
    t0 = time.monotonic()
    both = await asyncio.gather(*(c.chat.completions.create(model="sim-model", messages=long, max_tokens=1)
                                  for _ in range(2)))
    together = time.monotonic() - t0
    fams = await scrape(sim)
    # Both arrived before either prefill was done: neither found the prefix computed, both paid.
    assert value(fams, "vllm:prefix_cache_hits") == 0
    assert together >= both[0].usage.prompt_tokens * 1.0 / 1000.0
    t1 = time.monotonic()
    await c.chat.completions.create(model="sim-model", messages=long, max_tokens=1)
    assert value(await scrape(sim), "vllm:prefix_cache_hits") >= 96
    assert time.monotonic() - t1 < together


async def test_timing_follows_ttft_and_itl(start):
    sim = await start(ttft_ms=150.0, itl_ms=20.0)
    c = openai.AsyncOpenAI(base_url=sim.url + "/v1", api_key="x", max_retries=0)
    t0 = time.monotonic()
    stream = await c.chat.completions.create(model="sim-model", messages=MSG, max_tokens=11, stream=True)
    arrivals = []
    async for ch in stream:
        if ch.choices and ch.choices[0].delta.content:
            arrivals.append(time.monotonic() - t0)
    assert len(arrivals) == 11
    # First token after ttft; ten more steps of itl each. Generous upper bounds: shared CI machine.
    assert 0.14 <= arrivals[0] < 1.5
    assert 0.14 + 10 * 0.019 <= arrivals[-1] < 3.0
