"""Pure request handling of the proxy: which paths are proxied, the body's model, header filtering."""

from __future__ import annotations

import json

import pytest
from multidict import CIMultiDict

from mvllm.router.proxy import BadRequest, extract_model, forward_headers, is_proxied_path, response_headers


@pytest.mark.parametrize(
    "path",
    ["/v1/chat/completions", "/v1/completions", "/v1/embeddings", "/v1/responses", "/v1/audio/transcriptions",
     "/v1/rerank", "/v2/rerank", "/rerank", "/score", "/tokenize", "/detokenize", "/version", "/pooling"],
)
def test_proxied_paths(path: str) -> None:
    assert is_proxied_path(path)


@pytest.mark.parametrize(
    "path", ["/sleep", "/wake_up", "/collective_rpc", "/is_sleeping", "/server_info", "/v1/load_lora_adapter",
             "/v1/unload_lora_adapter", "/reset_prefix_cache", "/sim/fault", "/", "/admin/x"],
)
def test_engine_control_paths_are_not_proxied(path: str) -> None:
    assert not is_proxied_path(path)


def test_model_from_json() -> None:
    body = json.dumps({"model": "llama", "messages": [{"role": "user", "content": "hi"}]}).encode()
    assert extract_model(body, "application/json") == "llama"
    assert extract_model(body, "") == "llama"  # curl -d without a content type
    assert extract_model(b'{"model": "Qwen/Qwen3-0.6B"}', "application/json") == "Qwen/Qwen3-0.6B"


@pytest.mark.parametrize(
    ("body", "code"),
    [
        (b'{"messages": []}', "missing_model"),
        (b'{"model": ""}', "invalid_model"),
        (b'{"model": 3}', "invalid_model"),
        (b"[1, 2]", "invalid_json"),
        (b"{not json", "invalid_json"),
        (b"\xff\xfe", "invalid_json"),
    ],
)
def test_bad_bodies(body: bytes, code: str) -> None:
    with pytest.raises(BadRequest) as info:
        extract_model(body, "application/json")
    assert info.value.code == code


def test_model_from_multipart_form() -> None:
    boundary = "XyZ"
    body = (
        f"--{boundary}\r\nContent-Disposition: form-data; name=\"file\"; filename=\"a.wav\"\r\n"
        f"Content-Type: audio/wav\r\n\r\nRIFF....\r\n"
        f"--{boundary}\r\nContent-Disposition: form-data; name=\"model\"\r\n\r\nwhisper-small\r\n"
        f"--{boundary}--\r\n"
    ).encode()
    assert extract_model(body, f"multipart/form-data; boundary={boundary}") == "whisper-small"
    with pytest.raises(BadRequest):
        extract_model(body.replace(b'name="model"', b'name="other"'), f"multipart/form-data; boundary={boundary}")


def test_forward_headers_drop_hop_by_hop() -> None:
    src = CIMultiDict(
        {
            "Host": "router:8888",
            "Connection": "keep-alive, X-Secret-Hop",
            "X-Secret-Hop": "1",
            "Keep-Alive": "timeout=5",
            "Transfer-Encoding": "chunked",
            "Content-Length": "12",
            "TE": "trailers",
            "Authorization": "Bearer k",
            "Content-Type": "application/json",
            "X-Request-Id": "client-id",
        }
    )
    out = forward_headers(src, "rid-1")
    assert set(k.lower() for k in out) == {"authorization", "content-type", "x-request-id"}
    assert out["X-Request-Id"] == "rid-1"


def test_response_headers_drop_hop_by_hop_and_tag_the_node() -> None:
    src = CIMultiDict(
        {
            "Content-Type": "text/event-stream; charset=utf-8",
            "Transfer-Encoding": "chunked",
            "Content-Length": "5",
            "Connection": "close",
            "Server": "uvicorn",
            "Date": "x",
            "X-Custom": "kept",
        }
    )
    out = response_headers(src, "node-a", "rid-2")
    assert dict(out) == {
        "Content-Type": "text/event-stream; charset=utf-8",
        "X-Custom": "kept",
        "x-mvllm-node": "node-a",
        "x-request-id": "rid-2",
    }
