"""Hostile input the router must answer itself, in OpenAI form, without troubling an engine: deep
JSON, `n`/`best_of` past `max_n`, what aiohttp's HTTP parser refuses (unknown methods, bad request
lines, oversized lines and headers), and requests for models no node serves under a limited key."""

from __future__ import annotations

import json
import logging
from pathlib import Path

import aiohttp
import pytest

from mvllm.common.tomlconf import ConfigError
from mvllm.router.config import load_config
from tests.integration.security_support import (
    USER_KEY,
    assert_openai_error,
    auth_router,
    chat_body,
    engine_requests,
    http_request,
    in_process_sims,
    key_entry,
    quick_sim,
    raw_request,
    serves_normally,
)
from tests.support import node, write_servers


async def test_deep_json_is_the_routers_400_without_a_traceback(tmp_path: Path, caplog: pytest.LogCaptureFixture) -> None:
    caplog.set_level(logging.INFO)
    async with in_process_sims(quick_sim()) as (sim,), auth_router(tmp_path, [node(sim.url, "a")]) as r:
        deep_list = b'{"model": "sim-model", "messages": ' + b"[" * 1000 + b"]" * 1000 + b"}"
        deep_obj = b'{"model": "sim-model", "x": ' + b'{"a": ' * 1000 + b"1" + b"}" * 1000 + b"}"
        for body in (deep_list, deep_obj):
            resp = await raw_request(r.port, http_request("POST", "/v1/chat/completions", body))
            assert_openai_error(resp, 400, "invalid_json")
            assert resp.headers["x-mvllm-node"] == "-"  # the router's answer, not the engine's
        # A legitimately nested body (a tool schema a few dozen levels deep) still goes through.
        schema: dict = {"type": "string"}
        for _ in range(40):
            schema = {"type": "object", "properties": {"x": schema}}
        ok = chat_body(tools=[{"type": "function", "function": {"name": "f", "parameters": schema}}])
        resp = await raw_request(r.port, http_request("POST", "/v1/chat/completions", ok))
        assert resp.status == 200, resp.body[:300]
        async with aiohttp.ClientSession() as s:
            assert await engine_requests(s, sim.url) == 1
    assert not [rec for rec in caplog.records if rec.levelno >= logging.ERROR], [rec.getMessage() for rec in caplog.records]


async def test_n_and_best_of_above_max_n_are_refused_by_the_router(tmp_path: Path) -> None:
    async with in_process_sims(quick_sim()) as (sim,), auth_router(tmp_path, [node(sim.url, "a")], max_n=8) as r:
        for path, body, param in (
            ("/v1/chat/completions", chat_body(n=10**9), "n"),
            ("/v1/chat/completions", chat_body(n=9), "n"),
            ("/v1/completions", json.dumps({"model": "sim-model", "prompt": "x", "best_of": 100}).encode(), "best_of"),
        ):
            resp = await raw_request(r.port, http_request("POST", path, body))
            err = assert_openai_error(resp, 400, "integer_above_max_value")
            assert err["param"] == param and resp.headers["x-mvllm-node"] == "-"
        async with aiohttp.ClientSession() as s:
            assert await engine_requests(s, sim.url) == 0
        resp = await raw_request(r.port, http_request("POST", "/v1/chat/completions", chat_body(n=8)))
        assert resp.status == 200 and len(resp.json()["choices"]) == 8


async def test_default_max_n_is_16_and_validated(tmp_path: Path) -> None:
    assert load_config(write_servers(tmp_path / "a.toml", [node("http://127.0.0.1:9", "a")])).max_n == 16
    with pytest.raises(ConfigError, match="max_n"):
        load_config(write_servers(tmp_path / "b.toml", [node("http://127.0.0.1:9", "a")], max_n=0))


async def test_what_the_http_parser_refuses_is_answered_in_openai_form(tmp_path: Path, caplog: pytest.LogCaptureFixture) -> None:
    caplog.set_level(logging.INFO)
    async with in_process_sims(quick_sim()) as (sim,), auth_router(tmp_path, [node(sim.url, "a")]) as r:
        cases: list[tuple[bytes, int, str]] = [
            (b"FOOBAR /v1/models HTTP/1.1\r\nHost: x\r\n\r\n", 405, "method_not_allowed"),
            (b"FOOBAR /v1/chat/completions HTTP/1.1\r\nHost: x\r\nContent-Length: 2\r\n\r\n{}", 405, "method_not_allowed"),
            (b"FO(O /v1/models HTTP/1.1\r\nHost: x\r\n\r\n", 400, "invalid_request_line"),
            (b"GARBAGE\r\n\r\n", 400, "invalid_request_line"),
            (b"GET /v1/" + b"a" * 20000 + b" HTTP/1.1\r\nHost: x\r\n\r\n", 414, "uri_too_long"),
            (b"GET /health HTTP/1.1\r\nHost: x\r\nX-Big: " + b"a" * 20000 + b"\r\n\r\n", 431, "header_too_large"),
            (b"GET /health HTTP/1.1\r\nHost: x\r\n" + b"".join(b"X-%d: 1\r\n" % i for i in range(300)) + b"\r\n", 431,
             "too_many_headers"),
        ]
        for data, status, code in cases:
            resp = await raw_request(r.port, data)
            assert_openai_error(resp, status, code)
            assert resp.headers["content-type"].startswith("application/json")
            if status == 405:
                assert "POST" in resp.headers["allow"] and "GET" in resp.headers["allow"]
        # A method aiohttp knows on a route that does not take it: 405 with the route's Allow.
        resp = await raw_request(r.port, b"PUT /health HTTP/1.1\r\nHost: x\r\nContent-Length: 0\r\n\r\n")
        assert_openai_error(resp, 405)
        assert resp.headers["allow"] == "GET,HEAD"
        await serves_normally(r.port)
    # Hostile clients are logged in one line each, never a traceback at ERROR.
    assert not [rec for rec in caplog.records if rec.levelno >= logging.ERROR], [rec.getMessage() for rec in caplog.records]


async def test_requests_for_unserved_models_are_not_charged_to_the_key(tmp_path: Path) -> None:
    keys = [key_entry("capped", USER_KEY, quota={"requests_total": 1}, limits={"requests_per_second": 0.01, "burst": 1})]
    auth = {"Authorization": f"Bearer {USER_KEY}"}
    async with in_process_sims(quick_sim()) as (sim,), auth_router(tmp_path, [node(sim.url, "a")], keys=keys) as r:
        for _ in range(3):
            resp = await raw_request(r.port, http_request("POST", "/v1/chat/completions", chat_body("ghost"), auth))
            assert_openai_error(resp, 404, "model_not_found")
        # The key's one request (quota 1, burst 1) is still there for a model that exists.
        resp = await raw_request(r.port, http_request("POST", "/v1/chat/completions", chat_body(), auth))
        assert resp.status == 200, resp.body[:300]
        resp = await raw_request(r.port, http_request("POST", "/v1/chat/completions", chat_body(), auth))
        assert resp.status == 429  # and the limit itself still holds
