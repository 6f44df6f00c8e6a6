"""API keys against the real router and simulated engines on 127.0.0.1: a wrong or missing key never
reaches an engine, the client's key never travels to a node, a user key cannot call /admin/* nor a
model outside its allow-list, keys hot-reload from the keys file (an invalid one is rejected whole),
and /admin/* stays on loopback while no key is configured."""

from __future__ import annotations

import asyncio
import logging
import socket
from pathlib import Path
from typing import Any

import aiohttp
import openai
import pytest
from openai import AsyncOpenAI

from mvllm.router.app import running_router
from mvllm.router.config import load_config
from tests.integration.security_support import (
    ADMIN_KEY,
    MSG,
    NODE_KEY,
    OTHER_KEY,
    USER_KEY,
    RecordingNode,
    auth_router,
    chat_body,
    engine_requests,
    http_request,
    in_process_sims,
    key_entry,
    quick_sim,
    raw_request,
    serve_app,
    write_keys,
)
from tests.support import node, wait_until_async, write_servers


async def test_a_wrong_or_missing_key_never_reaches_an_engine(tmp_path: Path, oai: Any) -> None:
    keys = [
        key_entry("admin", ADMIN_KEY, role="admin"),
        key_entry("user", USER_KEY),
        key_entry("off", OTHER_KEY, enabled=False),
    ]
    async with (
        in_process_sims(quick_sim()) as (sim,),
        auth_router(tmp_path, [node(sim.url, "a")], keys=keys) as r,
        aiohttp.ClientSession() as s,
    ):
        url = r.url + "/v1/chat/completions"
        body = {"model": "sim-model", "messages": MSG, "max_tokens": 2}
        cases: list[tuple[dict[str, str], str]] = [
            ({}, "missing_api_key"),
            ({"Authorization": "Bearer sk-wrong-0123456789abcdef"}, "invalid_api_key"),
            ({"Authorization": f"Bearer {USER_KEY}x"}, "invalid_api_key"),  # one character more
            ({"Authorization": f"Bearer {USER_KEY[:-1]}"}, "invalid_api_key"),  # one less
            ({"Authorization": f"Basic {USER_KEY}"}, "invalid_api_key"),  # another scheme
            ({"Authorization": "Bearer "}, "missing_api_key"),
            ({"x-api-key": "sk-wrong-0123456789abcdef"}, "invalid_api_key"),
            ({"Authorization": f"Bearer {OTHER_KEY}"}, "api_key_disabled"),
        ]
        for headers, code in cases:
            async with s.post(url, json=body, headers=headers) as resp:
                assert resp.status == 401, (headers, resp.status)
                err = (await resp.json())["error"]
                assert err["code"] == code and err["type"] == "authentication_error", (headers, err)
                assert resp.headers["WWW-Authenticate"].startswith("Bearer")
                assert "sk-wrong" not in err["message"] and USER_KEY[:8] not in err["message"]
        # The official client with a wrong key: the SDK's AuthenticationError.
        with pytest.raises(openai.AuthenticationError):
            await oai(r.url, "sk-nobody-0123456789abcdef").chat.completions.create(model="sim-model", messages=MSG)
        # A huge body without a key is refused before it is read.
        async with s.post(url, data=b"x" * (4 * 1024 * 1024), headers={"Content-Type": "application/json"}) as resp:
            assert resp.status == 401
        assert await engine_requests(s, sim.url, "/v1/chat/completions") == 0  # nothing above reached the engine

        # The accepted forms: Bearer (the SDK), bare Authorization, x-api-key.
        out = await oai(r.url, USER_KEY).chat.completions.create(model="sim-model", messages=MSG, max_tokens=2)
        assert out.choices[0].message.content
        for headers in ({"Authorization": USER_KEY}, {"x-api-key": USER_KEY}, {"authorization": f"bearer {USER_KEY}"}):
            async with s.post(url, json=body, headers=headers) as resp:
                assert resp.status == 200, headers
        assert await engine_requests(s, sim.url, "/v1/chat/completions") == 4
        # /health is open; the model list needs a key like the rest.
        async with s.get(r.url + "/health") as resp:
            assert resp.status == 200
        async with s.get(r.url + "/v1/models") as resp:
            assert resp.status == 401
        metrics = r.state.metrics.render().decode()
        assert 'mvllm_key_requests_total{key="user"} 4.0' in metrics
        assert 'mvllm_auth_rejected_total{reason="invalid_api_key"}' in metrics
        assert USER_KEY not in metrics and USER_KEY not in str(r.state.config)


async def test_the_clients_key_never_travels_to_a_node(tmp_path: Path, oai: Any) -> None:
    rec = RecordingNode()
    runner, rec_url = await serve_app(rec.app())
    try:
        # A static vLLM with its own --api-key: the router sends that key, not the client's.
        async with in_process_sims(quick_sim(api_keys=[NODE_KEY])) as (sim,):
            nodes = [node(sim.url, "keyed", api_key=NODE_KEY), node(rec_url, "plain")]
            async with auth_router(tmp_path, nodes, keys=[key_entry("user", USER_KEY)]) as r:
                c = oai(r.url, USER_KEY)
                await wait_until_async(lambda: "sim-model" in r.state.registry.models(), what="keyed node's models discovered")
                out = await c.chat.completions.create(model="sim-model", messages=MSG, max_tokens=2)
                assert out.choices[0].message.content  # the sim would answer 401 to the client's key
                async with aiohttp.ClientSession() as s:
                    async with s.post(
                        r.url + "/v1/chat/completions",
                        json={"model": "rec-model", "messages": MSG},
                        headers={"Authorization": f"Bearer {USER_KEY}", "x-api-key": USER_KEY, "X-Custom": "kept"},
                    ) as resp:
                        assert resp.status == 200
                seen = rec.seen[-1]
                assert "authorization" not in seen and "x-api-key" not in seen
                assert seen["x-custom"] == "kept"
                assert NODE_KEY not in repr(r.state.config) and NODE_KEY not in repr(r.state.registry.nodes())
    finally:
        await runner.cleanup()


async def test_user_key_cannot_call_admin_nor_a_model_outside_its_list(tmp_path: Path, oai: Any) -> None:
    keys = [key_entry("admin", ADMIN_KEY, role="admin"), key_entry("user", USER_KEY, models=["alpha*"])]
    async with (
        in_process_sims(quick_sim("alpha-1"), quick_sim("beta-1")) as (a, b),
        auth_router(tmp_path, [node(a.url, "a"), node(b.url, "b")], keys=keys) as r,
        aiohttp.ClientSession() as s,
    ):
        await wait_until_async(lambda: len(r.state.registry.models()) == 2, what="both models discovered")
        user = {"Authorization": f"Bearer {USER_KEY}"}
        admin = {"Authorization": f"Bearer {ADMIN_KEY}"}
        for path in ("/admin/nodes", "//admin/nodes", "/ADMIN/nodes", "/admin", "/admin/reload"):
            async with s.get(r.url + path, headers=user) as resp:
                assert resp.status == 403, path
                assert (await resp.json())["error"]["code"] == "admin_required"
        async with s.post(r.url + "/admin/nodes/a/drain", headers=user) as resp:
            assert resp.status == 403
        assert not any(n.draining for n in r.state.registry.nodes())  # the refused drain did nothing
        async with s.get(r.url + "/admin/nodes", headers=admin) as resp:
            assert resp.status == 200
        async with s.get(r.url + "/admin/nodes") as resp:
            assert resp.status == 401

        # A model outside the allow-list: 403, never sent; the same for a model that does not exist
        # (a key learns nothing about models it may not use).
        c = oai(r.url, USER_KEY)
        for model in ("beta-1", "no-such-model"):
            with pytest.raises(openai.PermissionDeniedError) as info:
                await c.chat.completions.create(model=model, messages=MSG)
            assert info.value.body["code"] == "model_not_allowed"
        assert await engine_requests(s, b.url, "/v1/chat/completions") == 0
        assert (await c.chat.completions.create(model="alpha-1", messages=MSG, max_tokens=2)).choices
        # The model list shows a key only what it may use; the admin key sees all.
        assert [m.id for m in (await c.models.list()).data] == ["alpha-1"]
        with pytest.raises(openai.NotFoundError):
            await c.models.retrieve("beta-1")
        assert sorted(m.id for m in (await oai(r.url, ADMIN_KEY).models.list()).data) == ["alpha-1", "beta-1"]
        # /metrics and /load-stats are open by default (protect_metrics = false).
        async with s.get(r.url + "/metrics") as resp:
            assert resp.status == 200


async def test_protect_metrics_and_keys_in_servers_toml(tmp_path: Path) -> None:
    auth = {"protect_metrics": True, "keys": [key_entry("user", USER_KEY)]}
    async with (
        in_process_sims(quick_sim()) as (sim,),
        auth_router(tmp_path, [node(sim.url, "a")], auth=auth) as r,
        aiohttp.ClientSession() as s,
    ):
        for path in ("/metrics", "/load-stats"):
            async with s.get(r.url + path) as resp:
                assert resp.status == 401, path
            async with s.get(r.url + path, headers={"Authorization": f"Bearer {USER_KEY}"}) as resp:
                assert resp.status == 200, path
        async with s.get(r.url + "/load-stats", headers={"x-api-key": USER_KEY}) as resp:
            stats = await resp.json()
        assert stats["auth"]["open"] is False and [k["name"] for k in stats["auth"]["keys"]] == ["user"]
        assert USER_KEY not in str(stats) and USER_KEY[:5] not in str(stats["auth"])
        async with s.get(r.url + "/health") as resp:
            assert resp.status == 200


async def test_keys_file_hot_reload_and_an_invalid_one_is_rejected_whole(
    tmp_path: Path, caplog: pytest.LogCaptureFixture, oai: Any
) -> None:
    caplog.set_level(logging.INFO, logger="mvllm")
    keys_path = tmp_path / "keys.toml"
    async with (
        in_process_sims(quick_sim()) as (sim,),
        auth_router(tmp_path, [node(sim.url, "a")], keys=[key_entry("user", USER_KEY)], watch=True) as r,
    ):
        user, other = oai(r.url, USER_KEY), oai(r.url, OTHER_KEY)

        async def works(c: AsyncOpenAI) -> bool:
            try:
                await c.chat.completions.create(model="sim-model", messages=MSG, max_tokens=1)
                return True
            except openai.AuthenticationError:
                return False

        async def refused(c: AsyncOpenAI) -> bool:
            return not await works(c)

        assert await works(user) and not await works(other)
        write_keys(keys_path, [key_entry("user", USER_KEY), key_entry("other", OTHER_KEY)])
        await wait_until_async(lambda: works(other), timeout=10, what="the new key accepted after the keys file changed")

        # Invalid: a key too short. The whole file is refused; both keys keep working.
        write_keys(keys_path, [key_entry("user", USER_KEY), key_entry("other", OTHER_KEY), key_entry("x", "sk-tiny")])
        await wait_until_async(
            lambda: r.state.last_reload is not None and not r.state.last_reload.ok, timeout=10, what="rejected reload"
        )
        assert "keys.toml" in r.state.last_reload.message and "too short" in r.state.last_reload.message
        assert "sk-tiny" not in r.state.last_reload.message  # the error names the key, never the secret
        assert any("rejected" in rec.getMessage() for rec in caplog.records)
        assert await works(user) and await works(other)
        # Commenting every key out must not open the router.
        keys_path.write_text("# [[keys]]\n# name = 'user'\n")
        await asyncio.sleep(0.5)
        assert not await works(oai(r.url, "sk-anybody-0123456789abcdef"))

        # A leaked key: disable it, save, and its next request gets 401.
        write_keys(keys_path, [key_entry("user", USER_KEY), key_entry("other", OTHER_KEY, enabled=False)])
        await wait_until_async(lambda: r.state.last_reload is not None and r.state.last_reload.ok, timeout=10)
        await wait_until_async(lambda: refused(other), timeout=10, what="disabled key refused")
        assert await works(user)

        # servers.toml names another keys file: that one is read, and watched from then on.
        third_key = "sk-test-third-0123456789abcdef"
        third = oai(r.url, third_key)
        write_keys(tmp_path / "keys2.toml", [key_entry("third", third_key)])
        write_servers(tmp_path / "servers.toml", [node(sim.url, "a")], auth={"keys_file": "keys2.toml"})
        await wait_until_async(lambda: works(third), timeout=10, what="the keys of the new keys file")
        assert await refused(user)
        write_keys(tmp_path / "keys2.toml", [key_entry("third", third_key), key_entry("user", USER_KEY)])
        await wait_until_async(lambda: works(user), timeout=10, what="the new keys file is watched")
        logs = "\n".join(rec.getMessage() for rec in caplog.records)
        assert USER_KEY not in logs and OTHER_KEY not in logs


async def test_admin_is_loopback_only_without_keys(tmp_path: Path, caplog: pytest.LogCaptureFixture) -> None:
    caplog.set_level(logging.WARNING, logger="mvllm")
    async with in_process_sims(quick_sim()) as (sim,):
        async with auth_router(tmp_path, [node(sim.url, "a")]) as r:
            resp = await raw_request(r.port, http_request("GET", "/admin/nodes"))
            assert resp.status == 200  # from 127.0.0.1: the operator on the router's host
            resp = await raw_request(r.port, http_request("POST", "/v1/chat/completions", chat_body()))
            assert resp.status == 200  # no keys: the API is open
        assert not any("no API key is configured" in rec.getMessage() for rec in caplog.records)  # loopback

        address = _non_loopback_address()
        if address is None:
            pytest.skip("this host has no non-loopback IPv4 address to reach the router from")
        # Bound to this host's own interface address only (not 0.0.0.0), for the length of the test.
        path = write_servers(tmp_path / "servers-lan.toml", [node(sim.url, "a")])
        async with running_router(load_config(path), host=address, port=0) as r, aiohttp.ClientSession() as s:
            async with s.get(f"http://{address}:{r.port}/admin/nodes") as resp:
                assert resp.status == 403
                assert (await resp.json())["error"]["code"] == "admin_loopback_only"
            async with s.get(f"http://{address}:{r.port}/health") as resp:
                assert resp.status == 200
        # Listening beyond loopback without keys: the start says so.
        assert any("no API key is configured" in rec.getMessage() for rec in caplog.records)


def _non_loopback_address() -> str | None:
    """An address of this host's own interface (traffic to it stays on this machine)."""
    with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as probe:
        try:
            probe.connect(("10.255.255.255", 1))  # UDP connect sends nothing: it only picks the route
            address = probe.getsockname()[0]
        except OSError:
            return None
    return None if address.startswith("127.") or address == "0.0.0.0" else address
