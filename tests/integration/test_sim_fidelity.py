"""The simulator's bodies against answers recorded from a real vLLM 0.25.0 server (H200, tiny Llama,
2026-11-22; see docs/simulator.md "Fidelity"): same keys in the same order, same value types."""

import json

import aiohttp
import pytest

from mvllm.sim.config import SimConfig
from mvllm.sim.inprocess import start_sim

# Recorded from `vllm serve` 0.25.0 (text shortened; structure untouched).
REAL_CHAT = """{"id":"chatcmpl-aa0ce951ccd87716","object":"chat.completion","created":1795306486,"model":"tiny","choices":[{"index":0,"message":{"role":"assistant","content":"shovu nexbarfi","refusal":null,"annotations":null,"audio":null,"function_call":null,"reasoning":null},"logprobs":null,"finish_reason":"length","stop_reason":null,"token_ids":null,"routed_experts":null}],"service_tier":null,"system_fingerprint":"vllm-0.25.0-571c4ebe","usage":{"prompt_tokens":13,"total_tokens":21,"completion_tokens":8,"prompt_tokens_details":null},"prompt_logprobs":null,"prompt_token_ids":null,"prompt_text":null,"kv_transfer_params":null,"metrics":null}"""
REAL_COMPLETION = """{"id":"cmpl-a3601e5586b4e9a2","object":"text_completion","created":1795306489,"model":"tiny","choices":[{"index":0,"text":" lotenra nex","logprobs":null,"finish_reason":"length","stop_reason":null,"token_ids":null,"prompt_logprobs":null,"prompt_token_ids":null,"routed_experts":null}],"service_tier":null,"system_fingerprint":"vllm-0.25.0-571c4ebe","usage":{"prompt_tokens":4,"total_tokens":10,"completion_tokens":6,"prompt_tokens_details":null},"kv_transfer_params":null,"metrics":null}"""
REAL_CHAT_STREAM = [
    """{"id":"chatcmpl-a102ebcee31ac39b","object":"chat.completion.chunk","created":1795306486,"model":"tiny","choices":[{"index":0,"delta":{"role":"assistant","content":""},"logprobs":null,"finish_reason":null}],"prompt_token_ids":null,"prompt_text":null}""",
    """{"id":"chatcmpl-a102ebcee31ac39b","object":"chat.completion.chunk","created":1795306486,"model":"tiny","choices":[{"index":1,"delta":{"role":"assistant","content":""},"logprobs":null,"finish_reason":null}],"prompt_token_ids":null,"prompt_text":null}""",
    """{"id":"chatcmpl-a102ebcee31ac39b","object":"chat.completion.chunk","created":1795306486,"model":"tiny","choices":[{"index":0,"delta":{"content":" potenqua"},"logprobs":null,"finish_reason":null,"token_ids":null}]}""",
    """{"id":"chatcmpl-a102ebcee31ac39b","object":"chat.completion.chunk","created":1795306486,"model":"tiny","choices":[{"index":1,"delta":{"content":"tensho"},"logprobs":null,"finish_reason":null,"token_ids":null}]}""",
    """{"id":"chatcmpl-a102ebcee31ac39b","object":"chat.completion.chunk","created":1795306486,"model":"tiny","choices":[{"index":0,"delta":{"content":" drimika"},"logprobs":null,"finish_reason":null,"token_ids":null}]}""",
    """{"id":"chatcmpl-a102ebcee31ac39b","object":"chat.completion.chunk","created":1795306486,"model":"tiny","choices":[{"index":1,"delta":{"content":" shotenul"},"logprobs":null,"finish_reason":null,"token_ids":null}]}""",
    """{"id":"chatcmpl-a102ebcee31ac39b","object":"chat.completion.chunk","created":1795306486,"model":"tiny","choices":[{"index":0,"delta":{"content":"fore"},"logprobs":null,"finish_reason":"length","stop_reason":null,"token_ids":null}]}""",
    """{"id":"chatcmpl-a102ebcee31ac39b","object":"chat.completion.chunk","created":1795306486,"model":"tiny","choices":[{"index":1,"delta":{"content":" finexfi"},"logprobs":null,"finish_reason":"length","stop_reason":null,"token_ids":null}]}""",
    """{"id":"chatcmpl-a102ebcee31ac39b","object":"chat.completion.chunk","created":1795306486,"model":"tiny","choices":[],"usage":{"prompt_tokens":13,"total_tokens":19,"completion_tokens":6},"system_fingerprint":"vllm-0.25.0-571c4ebe"}""",
]
REAL_COMPLETION_CHUNK = """{"id":"cmpl-a4544941bf4dc1e1","object":"text_completion","created":1795306489,"model":"tiny","choices":[{"index":0,"text":" dripoka","logprobs":null,"finish_reason":null,"stop_reason":null,"prompt_token_ids":null,"token_ids":null}]}"""
REAL_MODELS = """{"object":"list","data":[{"id":"tiny","object":"model","created":1795307378,"owned_by":"vllm","root":"/root/tiny/tiny-llama","parent":null,"max_model_len":512,"permission":[{"id":"modelperm-8ef684e716126636","object":"model_permission","created":1795307378,"allow_create_engine":false,"allow_sampling":true,"allow_logprobs":true,"allow_search_indices":false,"allow_view":true,"allow_fine_tuning":false,"organization":"*","group":null,"is_blocking":false}]},{"id":"lora1","object":"model","created":1795307378,"owned_by":"vllm","root":"/root/tiny/tiny-lora","parent":"tiny","max_model_len":null,"permission":[{"id":"modelperm-b10678db4116bbce","object":"model_permission","created":1795307378,"allow_create_engine":false,"allow_sampling":true,"allow_logprobs":true,"allow_search_indices":false,"allow_view":true,"allow_fine_tuning":false,"organization":"*","group":null,"is_blocking":false}]}]}"""
REAL_NOT_FOUND = """{"error":{"message":"The model `nope` does not exist.","type":"NotFoundError","param":"model","code":404}}"""
REAL_TOO_LONG = """{"error":{"message":"This model's maximum context length is 512 tokens. However, you requested 2 output tokens and your prompt contains at least 511 input tokens, for a total of at least 513 tokens. Please reduce the length of the input prompt or the number of requested output tokens. (parameter=input_tokens, value=511)","type":"BadRequestError","param":"input_tokens","code":400}}"""
REAL_TOKENIZE = """{"count":9,"max_model_len":512,"tokens":[46,266,268,663,18,504,587,381,37],"token_strs":null}"""
REAL_LORA_AGAIN = """{"error":{"message":"The lora adapter 'lora1' has already been loaded. If you want to load the adapter in place, set 'load_inplace' to True.","type":"InvalidUserInput","param":null,"code":400}}"""
REAL_LORA_UNKNOWN = """{"error":{"message":"The lora adapter 'lora1' cannot be found.","type":"NotFoundError","param":null,"code":404}}"""


def shape(value):
    """Keys in order and value types; strings and numbers stand for themselves only by type."""
    if isinstance(value, dict):
        return {"keys": list(value), "values": [shape(v) for v in value.values()]}
    if isinstance(value, list):
        return [shape(v) for v in value[:1]]
    if isinstance(value, bool) or value is None:
        return value
    return type(value).__name__


MSG = [{"role": "user", "content": "Hello there, how are you?"}]


@pytest.fixture
async def sim():
    cfg = SimConfig(model="/root/tiny/tiny-llama", served_model_names=["tiny"], max_model_len=512, ttft_ms=1,
                    itl_ms=1, wake_ms=0, enable_lora=True, runtime_lora_updating=True)
    s = await start_sim(cfg)
    yield s
    await s.close()


async def post(s, url, body):
    async with s.post(url, json=body) as r:
        return r.status, await r.read()


async def test_bodies_have_vllm_shapes(sim):
    async with aiohttp.ClientSession() as s:
        status, body = await post(s, sim.url + "/v1/chat/completions", {"model": "tiny", "messages": MSG, "max_tokens": 8})
        assert status == 200 and shape(json.loads(body)) == shape(json.loads(REAL_CHAT))
        status, body = await post(s, sim.url + "/v1/completions", {"model": "tiny", "prompt": "Hello world", "max_tokens": 6})
        assert status == 200 and shape(json.loads(body)) == shape(json.loads(REAL_COMPLETION))
        status, body = await post(s, sim.url + "/tokenize", {"model": "tiny", "prompt": "Hello world, how are you?"})
        assert shape(json.loads(body)) == shape(json.loads(REAL_TOKENIZE))
        status, body = await post(s, sim.url + "/v1/chat/completions", {"model": "nope", "messages": MSG})
        assert status == 404 and json.loads(body) == json.loads(REAL_NOT_FOUND)
        status, body = await post(s, sim.url + "/v1/chat/completions",
                                  {"model": "tiny", "messages": [{"role": "user", "content": "word " * 600}], "max_tokens": 2})
        assert status == 400 and shape(json.loads(body)) == shape(json.loads(REAL_TOO_LONG))
        assert json.loads(body)["error"]["message"].startswith("This model's maximum context length is 512 tokens.")
        lora = {"lora_name": "lora1", "lora_path": "/root/tiny/tiny-lora"}
        assert (await post(s, sim.url + "/v1/load_lora_adapter", lora))[0] == 200
        status, body = await post(s, sim.url + "/v1/load_lora_adapter", lora)
        assert status == 400 and json.loads(body) == json.loads(REAL_LORA_AGAIN)
        async with s.get(sim.url + "/v1/models") as r:
            models = await r.json()
        real = json.loads(REAL_MODELS)
        assert shape(models) == shape(real)
        assert [(m["id"], m["root"], m["parent"], m["max_model_len"]) for m in models["data"]] == [
            (m["id"], m["root"], m["parent"], m["max_model_len"]) for m in real["data"]]
        await post(s, sim.url + "/v1/unload_lora_adapter", {"lora_name": "lora1"})
        status, body = await post(s, sim.url + "/v1/unload_lora_adapter", {"lora_name": "lora1"})
        assert status == 404 and json.loads(body) == json.loads(REAL_LORA_UNKNOWN)


async def test_stream_chunks_have_vllm_shapes(sim):
    async with aiohttp.ClientSession() as s:
        body = {"model": "tiny", "messages": MSG, "max_tokens": 3, "n": 2, "stream": True,
                "stream_options": {"include_usage": True}}
        status, raw = await post(s, sim.url + "/v1/chat/completions", body)
        events = raw.decode().split("\n\n")
        assert status == 200 and events[-2:] == ["data: [DONE]", ""]
        ours = [shape(json.loads(e.removeprefix("data: "))) for e in events[:-2]]
        assert ours == [shape(json.loads(c)) for c in REAL_CHAT_STREAM]
        body = {"model": "tiny", "prompt": "Hello", "max_tokens": 3, "stream": True}
        status, raw = await post(s, sim.url + "/v1/completions", body)
        first = raw.decode().split("\n\n")[0].removeprefix("data: ")
        assert shape(json.loads(first)) == shape(json.loads(REAL_COMPLETION_CHUNK))
