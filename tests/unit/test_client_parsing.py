"""The pure parts of mvllm.client: SSE decoding across any chunk boundary, stream accumulation,
error bodies to exception classes, Retry-After, URLs and embeddings decoding."""

from __future__ import annotations

import base64
import json
import struct

import pytest

from mvllm.client import (
    AuthenticationError,
    BadRequestError,
    InternalServerError,
    MvllmError,
    NotFoundError,
    RateLimitError,
    ServiceUnavailableError,
    normalize_url,
)
from mvllm.client.errors import error_from_response, parse_retry_after
from mvllm.client.sse import SSEDecoder, StreamAccumulator
from mvllm.client.types import chat_completion_from, node_from_entry, vectors_from


def chunk(content: str | None = None, finish: str | None = None, index: int = 0, **extra: object) -> str:
    delta = {"content": content} if content is not None else {}
    return json.dumps({"id": "c1", "model": "m", "choices": [{"index": index, "delta": delta, "finish_reason": finish}], **extra})


STREAM = (
    f": keep-alive\n\ndata: {chunk('Hé')}\n\r\ndata: {chunk(' wörld', 'length')}\n\n"
    'data: {"id": "c1", "choices": [], "usage": {"prompt_tokens": 3, "completion_tokens": 2, "total_tokens": 5}}\n\n'
    "data: [DONE]\n\n"
).encode()


@pytest.mark.parametrize("size", [1, 2, 3, 7, 64, len(STREAM)])
def test_sse_decoder_gives_the_same_events_whatever_the_chunking(size: int) -> None:
    dec = SSEDecoder()
    events: list[str] = []
    for i in range(0, len(STREAM), size):  # cuts inside lines and inside UTF-8 characters
        events += dec.feed(STREAM[i : i + size])
    events += dec.end()
    assert len(events) == 4 and events[-1] == "[DONE]"
    acc = StreamAccumulator("chat")
    deltas = [d for e in events if (d := acc.add(e))]
    assert deltas == ["Hé", " wörld"] and acc.text == "Hé wörld" and acc.done
    assert acc.finish_reason == "length" and acc.usage is not None and acc.usage.total_tokens == 5
    assert acc.id == "c1" and acc.model == "m"


def test_sse_multiline_data_and_an_unterminated_last_event() -> None:
    dec = SSEDecoder()
    assert dec.feed(b"event: x\ndata: a\ndata: b\n\ndata: tail") == ["a\nb"]
    assert dec.end() == ["tail"]


def test_accumulator_first_choice_only_completions_and_error_events() -> None:
    acc = StreamAccumulator("chat")
    assert acc.add(chunk("other", index=1)) is None and acc.text == ""
    comp = StreamAccumulator("completion")
    assert comp.add(json.dumps({"choices": [{"index": 0, "text": "abc", "finish_reason": None}]})) == "abc"
    err = json.dumps({"error": {"message": "engine died", "type": "upstream_error", "code": 502}})
    with pytest.raises(InternalServerError) as exc:
        StreamAccumulator("chat").add(err, request_id="r1")
    assert (exc.value.status, exc.value.message, exc.value.request_id) == (502, "engine died", "r1")
    with pytest.raises(MvllmError, match="not JSON"):
        StreamAccumulator("chat").add("{broken")
    with pytest.raises(ValueError):
        StreamAccumulator("embedding")


def test_error_bodies_become_the_right_exception() -> None:
    body = {"error": {"message": "The model `x` does not exist.", "type": "not_found_error", "code": "model_not_found"}}
    e = error_from_response(404, json.dumps(body).encode(), {"x-request-id": "abc"})
    assert type(e) is NotFoundError and (e.status, e.code, e.type, e.request_id) == (404, "model_not_found", "not_found_error", "abc")
    assert str(e) == "HTTP 404 model_not_found: The model `x` does not exist."

    e = error_from_response(429, b'{"error": {"message": "slow down", "code": "rate_limit_exceeded"}}', {"Retry-After": "3"})
    assert isinstance(e, RateLimitError) and e.retry_after == 3.0
    flat = error_from_response(400, b'{"object": "error", "message": "bad temperature", "type": "BadRequestError", "code": 400}')
    assert isinstance(flat, BadRequestError) and flat.message == "bad temperature" and str(flat) == "HTTP 400: bad temperature"
    assert isinstance(error_from_response(422, b'{"detail": "field required"}'), BadRequestError)
    assert error_from_response(401, b'{"error": "no key"}').message == "no key"
    assert isinstance(error_from_response(401, b""), AuthenticationError)
    text = error_from_response(502, b"<html>Bad Gateway</html>")
    assert isinstance(text, InternalServerError) and text.message == "<html>Bad Gateway</html>"
    assert isinstance(error_from_response(503, b"{}", {"Retry-After": "x"}), ServiceUnavailableError)
    assert type(error_from_response(418, b"")) is MvllmError


def test_retry_after_as_seconds_or_a_date() -> None:
    assert parse_retry_after("2.5") == 2.5 and parse_retry_after(None) is None and parse_retry_after("soon") is None
    assert parse_retry_after("Wed, 21 Oct 2015 07:28:10 GMT", now=1445412480.0) == 10.0
    assert parse_retry_after("-4") == 0.0


def test_urls_results_and_vectors() -> None:
    assert normalize_url("127.0.0.1:8888/v1/") == "http://127.0.0.1:8888"
    assert normalize_url(" https://r.example/ ") == "https://r.example"
    message = {"role": "assistant", "content": None, "tool_calls": [{"id": "t"}]}
    answer = chat_completion_from({"id": "c", "choices": [{"index": 0, "message": message, "finish_reason": "tool_calls"}]}, node="n1")
    assert answer.text == "" and answer.usage is None and answer.choices[0].message.tool_calls == [{"id": "t"}]
    vec = [0.5, -1.25]
    b64 = base64.b64encode(struct.pack("<2f", *vec)).decode()
    assert vectors_from({"data": [{"index": 1, "embedding": b64}, {"index": 0, "embedding": [1, 2]}]}) == [[1.0, 2.0], vec]
    n = node_from_entry({"name": "a", "kind": "static", "draining": True, "drained_by": "admin", "in_flight": 2})
    assert (n.name, n.draining, n.drained_by, n.in_flight, n.raw["kind"]) == ("a", True, "admin", 2, "static")
    with pytest.raises(ValueError):
        node_from_entry({"kind": "static"})
