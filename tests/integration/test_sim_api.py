"""The simulated engine's OpenAI API, driven by the official `openai` client over real 127.0.0.1 sockets."""

import asyncio
import base64
import json
import struct

import aiohttp
import openai
import pytest

MSG = [{"role": "user", "content": "Hello there, how are you?"}]


@pytest.fixture
def start(sim_factory):
    return sim_factory


def client(sim, key="none"):
    return openai.AsyncOpenAI(base_url=sim.url + "/v1", api_key=key, max_retries=0, timeout=20)


async def raw_post(url, body, headers=None):
    async with aiohttp.ClientSession() as s, s.post(url, json=body, headers=headers) as r:
        return r.status, dict(r.headers), await r.read()


async def test_chat_is_deterministic_and_counts_tokens(start):
    sim = await start(served_model_names=["sim-model", "alias"])
    c = client(sim)
    a = await c.chat.completions.create(model="sim-model", messages=MSG, max_tokens=12)
    b = await c.chat.completions.create(model="alias", messages=MSG, max_tokens=12)
    assert a.id.startswith("chatcmpl-") and a.object == "chat.completion"
    assert a.model == "sim-model" and b.model == "sim-model"  # answers name the first served name
    assert a.choices[0].message.role == "assistant" and a.choices[0].message.content
    assert a.choices[0].message.content == b.choices[0].message.content
    assert a.choices[0].finish_reason == "length"
    assert a.usage.completion_tokens == 12
    status, _, body = await raw_post(sim.url + "/tokenize", {"model": "sim-model", "messages": MSG})
    assert status == 200 and a.usage.prompt_tokens == json.loads(body)["count"]
    assert a.usage.total_tokens == a.usage.prompt_tokens + 12
    other = await start(seed=7)
    c2 = await client(other).chat.completions.create(model="sim-model", messages=MSG, max_tokens=12)
    assert c2.choices[0].message.content != a.choices[0].message.content


async def test_without_max_tokens_the_model_stops_on_its_own(start):
    sim = await start(max_tokens_default=20)
    r = await client(sim).chat.completions.create(model="sim-model", messages=MSG)
    assert r.choices[0].finish_reason == "stop"
    assert 10 <= r.usage.completion_tokens <= 20


async def test_chat_stream_with_usage_and_n(start):
    sim = await start()
    stream = await client(sim).chat.completions.create(
        model="sim-model", messages=MSG, max_tokens=5, n=2, stream=True, stream_options={"include_usage": True})
    chunks = [c async for c in stream]
    assert chunks[0].choices[0].delta.role == "assistant" and chunks[0].choices[0].delta.content == ""
    assert chunks[1].choices[0].delta.role == "assistant" and chunks[1].choices[0].index == 1
    text = {0: "", 1: ""}
    finish = {}
    for ch in chunks[2:-1]:
        choice = ch.choices[0]
        text[choice.index] += choice.delta.content or ""
        if choice.finish_reason:
            finish[choice.index] = choice.finish_reason
    assert finish == {0: "length", 1: "length"}
    assert text[0] and text[1] and text[0] != text[1]
    last = chunks[-1]
    assert last.choices == [] and last.usage.completion_tokens == 10
    assert len({c.id for c in chunks}) == 1
    whole = await client(sim).chat.completions.create(model="sim-model", messages=MSG, max_tokens=5, n=2)
    assert [ch.message.content for ch in whole.choices] == [text[0], text[1]]


async def test_raw_sse_bytes_match_vllm(start):
    sim = await start()
    body = {"model": "sim-model", "messages": MSG, "max_tokens": 3, "stream": True}
    status, headers, raw = await raw_post(sim.url + "/v1/chat/completions", body)
    assert status == 200 and headers["Content-Type"] == "text/event-stream; charset=utf-8"
    events = raw.decode().split("\n\n")
    assert events[-2:] == ["data: [DONE]", ""]
    payloads = [json.loads(e.removeprefix("data: ")) for e in events[:-2]]
    assert payloads[0]["choices"][0] == {"index": 0, "delta": {"role": "assistant", "content": ""},
                                         "logprobs": None, "finish_reason": None}
    assert "prompt_token_ids" in payloads[0] and "usage" not in payloads[0]
    assert [p["choices"][0]["finish_reason"] for p in payloads[1:]] == [None, None, "length"]
    assert payloads[-1]["choices"][0]["stop_reason"] is None
    assert payloads[-1]["system_fingerprint"].startswith("vllm-0.25.0-")


async def test_stop_strings(start):
    sim = await start()
    c = client(sim)
    full = (await c.chat.completions.create(model="sim-model", messages=MSG, max_tokens=20)).choices[0].message.content
    words = full.split(" ")
    stop = " " + words[3]
    expected = full[: full.index(stop)]
    r = await c.chat.completions.create(model="sim-model", messages=MSG, max_tokens=20, stop=[stop, "zzzz"])
    assert r.choices[0].message.content == expected
    assert r.choices[0].finish_reason == "stop"
    assert r.choices[0].model_extra["stop_reason"] == stop
    assert r.usage.completion_tokens < 20
    stream = await c.chat.completions.create(model="sim-model", messages=MSG, max_tokens=20, stop=stop, stream=True)
    streamed = "".join([ch.choices[0].delta.content or "" async for ch in stream])
    assert streamed == expected


async def test_completions_text_lists_and_streaming(start):
    sim = await start()
    c = client(sim)
    r = await c.completions.create(model="sim-model", prompt="Once upon a time", max_tokens=6)
    assert r.id.startswith("cmpl-") and r.object == "text_completion"
    assert r.choices[0].text.startswith(" ") and r.usage.completion_tokens == 6
    two = await c.completions.create(model="sim-model", prompt=["Once upon a time", "Bye"], max_tokens=2)
    assert [ch.index for ch in two.choices] == [0, 1] and two.choices[0].text.startswith(r.choices[0].text[:3])
    echo = await c.completions.create(model="sim-model", prompt="Echo me", max_tokens=2, echo=True)
    assert echo.choices[0].text.startswith("Echo me")
    default = await c.completions.create(model="sim-model", prompt="Once upon a time")
    assert default.usage.completion_tokens == 16  # the completions API's default max_tokens
    stream = await c.completions.create(model="sim-model", prompt="Once upon a time", max_tokens=6, stream=True,
                                        stream_options={"include_usage": True})
    chunks = [ch async for ch in stream]
    assert "".join(ch.choices[0].text for ch in chunks if ch.choices) == r.choices[0].text
    assert chunks[-1].usage.completion_tokens == 6 and chunks[-2].choices[0].finish_reason == "length"


async def test_embeddings_float_and_base64(start):
    sim = await start(embedding_dim=64)
    c = client(sim)
    r = await c.embeddings.create(model="sim-model", input=["the cat sat", "the cat sat down", "quantum flux"],
                                  encoding_format="float")
    vecs = [d.embedding for d in r.data]
    assert [len(v) for v in vecs] == [64, 64, 64]
    assert all(abs(sum(x * x for x in v) - 1.0) < 1e-6 for v in vecs)

    def cos(a, b):
        return sum(x * y for x, y in zip(a, b, strict=True))

    assert cos(vecs[0], vecs[1]) > cos(vecs[0], vecs[2])
    again = await c.embeddings.create(model="sim-model", input="the cat sat", encoding_format="float")
    assert again.data[0].embedding == vecs[0]
    b64 = await c.embeddings.create(model="sim-model", input="the cat sat", encoding_format="base64")
    raw = b64.data[0].embedding
    decoded = list(struct.unpack("<64f", base64.b64decode(raw))) if isinstance(raw, str) else raw
    assert max(abs(x - y) for x, y in zip(decoded, vecs[0], strict=True)) < 1e-6
    short = await c.embeddings.create(model="sim-model", input="the cat sat", dimensions=8, encoding_format="float")
    assert len(short.data[0].embedding) == 8
    assert r.usage.prompt_tokens > 0 and r.usage.total_tokens == r.usage.prompt_tokens


async def test_rerank_and_score(start):
    sim = await start()
    docs = ["the cat sat on the mat", "stock prices fell", "a cat and a mat"]
    for path in ("/rerank", "/v1/rerank"):
        status, _, body = await raw_post(sim.url + path, {"model": "sim-model", "query": "cat on mat",
                                                          "documents": docs, "top_n": 2})
        res = json.loads(body)
        assert status == 200 and res["id"].startswith("score-") and len(res["results"]) == 2
        scores = [x["relevance_score"] for x in res["results"]]
        assert scores == sorted(scores, reverse=True) and all(0 <= s <= 1 for s in scores)
        assert res["results"][0]["document"]["text"] in docs and res["usage"]["prompt_tokens"] > 0
    for path in ("/score", "/v1/score"):
        status, _, body = await raw_post(sim.url + path, {"model": "sim-model", "text_1": "cat", "text_2": docs})
        res = json.loads(body)
        assert status == 200 and [d["index"] for d in res["data"]] == [0, 1, 2]
        assert all(d["object"] == "score" for d in res["data"])


async def test_tokenize_detokenize_round_trip(start):
    sim = await start()
    text = "Tokenize this, please: 42 times!"
    status, _, body = await raw_post(sim.url + "/tokenize", {"model": "sim-model", "prompt": text})
    tok = json.loads(body)
    assert status == 200 and tok["count"] == len(tok["tokens"]) and tok["max_model_len"] == 8192
    assert tok["token_strs"] is None
    status, _, body = await raw_post(sim.url + "/detokenize", {"model": "sim-model", "tokens": tok["tokens"][1:]})
    assert status == 200 and json.loads(body) == {"prompt": text}


async def test_responses_api_minimal(start):
    sim = await start()
    c = client(sim)
    r = await c.responses.create(model="sim-model", input="Say hi", max_output_tokens=4)
    assert r.id.startswith("resp_") and r.status == "incomplete" and r.usage.output_tokens == 4
    assert r.output_text
    events = [e async for e in await c.responses.create(model="sim-model", input="Say hi", max_output_tokens=4,
                                                         stream=True)]
    assert events[0].type == "response.created" and events[-1].type == "response.completed"
    deltas = "".join(e.delta for e in events if e.type == "response.output_text.delta")
    assert deltas == r.output_text


async def test_errors_have_vllm_shape_and_status(start):
    sim = await start(max_model_len=64)
    c = client(sim)
    with pytest.raises(openai.NotFoundError) as nf:
        await c.chat.completions.create(model="nope", messages=MSG, max_tokens=2)
    assert nf.value.status_code == 404
    assert nf.value.body == {"message": "The model `nope` does not exist.", "type": "NotFoundError",
                             "param": "model", "code": 404}
    with pytest.raises(openai.BadRequestError) as long:
        await c.chat.completions.create(model="sim-model", messages=[{"role": "user", "content": "word " * 100}],
                                        max_tokens=2)
    assert "maximum context length is 64 tokens" in long.value.body["message"]
    assert long.value.body["param"] == "input_tokens"
    with pytest.raises(openai.BadRequestError) as big:
        await c.chat.completions.create(model="sim-model", messages=MSG, max_tokens=1000)
    assert big.value.body["param"] == "max_tokens"
    for bad in ({"n": 0}, {"temperature": -1}, {"max_tokens": -1}):
        with pytest.raises(openai.BadRequestError):
            await c.chat.completions.create(model="sim-model", messages=MSG, **bad)
    async with aiohttp.ClientSession() as s:
        async with s.post(sim.url + "/v1/chat/completions", data=b"{not json",
                          headers={"Content-Type": "application/json"}) as r:
            err = await r.json()
            assert r.status == 400 and err["error"]["type"] == "Bad Request" and err["error"]["code"] == 400
        status, _, body = await raw_post(sim.url + "/v1/chat/completions", {"model": "sim-model"})
        assert status == 400 and json.loads(body)["error"]["param"] == "body.messages"
        async with s.get(sim.url + "/v1/chat/completions") as r:
            assert r.status == 405 and await r.json() == {"detail": "Method Not Allowed"}
        async with s.get(sim.url + "/v1/nothing-here") as r:
            assert r.status == 404 and await r.json() == {"detail": "Not Found"}


async def test_api_key_guards_v1_only(start):
    sim = await start(api_keys=["s3cret"])
    with pytest.raises(openai.AuthenticationError) as exc:
        await client(sim, key="wrong").chat.completions.create(model="sim-model", messages=MSG, max_tokens=2)
    assert exc.value.status_code == 401
    ok = await client(sim, key="s3cret").chat.completions.create(model="sim-model", messages=MSG, max_tokens=2)
    assert ok.usage.completion_tokens == 2
    async with aiohttp.ClientSession() as s:
        for path in ("/health", "/metrics", "/version", "/ping"):
            async with s.get(sim.url + path) as r:
                assert r.status == 200, path
        async with s.get(sim.url + "/v1/models") as r:
            assert r.status == 401 and await r.json() == {"error": "Unauthorized"}


async def test_health_version_load_models(start):
    sim = await start(enable_server_load_tracking=True, max_model_len=4096)
    async with aiohttp.ClientSession() as s:
        async with s.get(sim.url + "/health") as r:
            assert r.status == 200 and await r.read() == b""
        async with s.post(sim.url + "/ping") as r:
            assert r.status == 200
        async with s.get(sim.url + "/version") as r:
            assert await r.json() == {"version": "0.25.0"}
        async with s.get(sim.url + "/load") as r:
            assert await r.json() == {"server_load": 0}
        async with s.get(sim.url + "/v1/models") as r:
            models = await r.json()
    assert models["object"] == "list"
    card = models["data"][0]
    assert (card["id"], card["root"], card["parent"], card["max_model_len"], card["owned_by"]) == (
        "sim-model", "sim-model", None, 4096, "vllm")


@pytest.mark.parametrize("stream", [False, True])
async def test_client_disconnect_aborts_the_request(start, stream):
    sim = await start(itl_ms=10.0, enable_server_load_tracking=True)
    body = {"model": "sim-model", "messages": MSG, "max_tokens": 500, "stream": stream}
    async with aiohttp.ClientSession() as s:
        with pytest.raises(asyncio.TimeoutError):
            async with s.post(sim.url + "/v1/chat/completions", json=body,
                              timeout=aiohttp.ClientTimeout(total=0.3)) as r:
                await r.read()
        for _ in range(100):
            async with s.get(sim.url + "/sim/state") as r:
                running = (await r.json())["running"]
            if running == 0:
                break
            await asyncio.sleep(0.02)
        assert running == 0
        async with s.get(sim.url + "/load") as r:
            assert await r.json() == {"server_load": 0}
