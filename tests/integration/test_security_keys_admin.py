"""Quotas and key management against the real router and simulated engines on 127.0.0.1: per-key
total and daily quotas (429 insufficient_quota, Retry-After to UTC midnight for the daily one,
other keys unaffected), /admin/keys (usage, never a secret), disable/enable at run time,
reload-keys (good and bad file), usage and runtime overrides kept across a keys reload and a
router restart (subprocess), the `mvllm keys` CLI and the dashboard's keys panel."""

from __future__ import annotations

import asyncio
import json
import math
import os
import sys
import time
from pathlib import Path
from typing import Any

import aiohttp
import openai
from openai import AsyncOpenAI

from mvllm.router.access.keys import hash_key
from mvllm.tui.app import DashboardApp
from mvllm.tui.widgets import SyncedTable
from tests.integration.security_support import (
    ADMIN_KEY,
    MSG,
    OTHER_KEY,
    USER_KEY,
    auth_router,
    in_process_sims,
    key_entry,
    quick_sim,
    router_process,
    write_keys,
)
from tests.procs import REPO
from tests.support import node, wait_until_async, write_servers

DAILY_KEY = "sk-test-daily-0123456789abcdef"
SECRETS = (ADMIN_KEY, USER_KEY, OTHER_KEY, DAILY_KEY)


def keys_config(**over: dict[str, Any]) -> list[dict[str, Any]]:
    entries = {
        "admin": key_entry("admin", ADMIN_KEY, role="admin"),
        "total": key_entry("total", USER_KEY, quota={"requests_total": 2}),
        "daily": key_entry("daily", DAILY_KEY, quota={"requests_per_day": 2}, limits={"requests_per_second": 50}),
        "free": key_entry("free", OTHER_KEY),
    }
    for name, fields in over.items():
        entries[name] = {**entries[name], **fields}
    return list(entries.values())


async def chat(c: AsyncOpenAI) -> Any:
    """One small chat: the answer, or the openai exception it raised."""
    try:
        return await c.chat.completions.create(model="sim-model", messages=MSG, max_tokens=2)
    except openai.APIStatusError as exc:
        return exc


async def admin(url: str, method: str, path: str, key: str = ADMIN_KEY) -> tuple[int, Any, str]:
    async with aiohttp.ClientSession() as s, s.request(method, url + path, headers={"Authorization": f"Bearer {key}"}) as resp:
        text = await resp.text()
        return resp.status, json.loads(text), text


def by_name(doc: dict[str, Any]) -> dict[str, dict[str, Any]]:
    return {k["name"]: k for k in doc["keys"]}


async def test_total_and_daily_quotas_get_429_others_are_unaffected_and_admin_keys_shows_usage(tmp_path: Path, oai: Any) -> None:
    async with in_process_sims(quick_sim()) as (sim,), auth_router(tmp_path, [node(sim.url, "a")], keys=keys_config()) as r:
        total, daily, free = oai(r.url, USER_KEY), oai(r.url, DAILY_KEY), oai(r.url, OTHER_KEY)
        for c in (total, daily):
            for _ in range(2):
                assert not isinstance(await chat(c), Exception)

        exc = await chat(total)
        assert isinstance(exc, openai.RateLimitError) and exc.body["code"] == "insufficient_quota"
        assert "quota 'requests_total' of key 'total' used up (2 requests)" in exc.body["message"]
        assert "Retry-After" not in exc.response.headers  # no wait cures a used-up total

        exc = await chat(daily)
        assert isinstance(exc, openai.RateLimitError) and exc.body["code"] == "insufficient_quota"
        assert "quota 'requests_per_day' of key 'daily'" in exc.body["message"]
        to_midnight = math.ceil(86400 - time.time() % 86400)
        assert abs(int(exc.response.headers["Retry-After"]) - to_midnight) <= 5

        for _ in range(4):  # a key without quota is not touched by the others' quotas
            assert not isinstance(await chat(free), Exception)

        status, doc, body = await admin(r.url, "GET", "/admin/keys")
        assert status == 200 and doc["open"] is False
        keys = by_name(doc)
        assert list(keys) == ["admin", "total", "daily", "free"]
        assert keys["total"]["usage"]["requests_total"] == 2
        assert keys["total"]["usage"]["denied"]["requests_total"] == 1
        assert keys["total"]["quota"] == {"requests_total": 2} and keys["total"]["quota_left"] == {"requests_total": 0}
        assert keys["daily"]["usage"]["requests_today"] == 2
        assert keys["daily"]["usage"]["denied"]["requests_per_day"] == 1
        assert keys["daily"]["limits"] == {"requests_per_second": 50}
        assert keys["free"]["usage"]["requests_total"] == 4 and keys["free"]["quota"] is None
        assert keys["free"]["usage"]["tokens"] > 0  # settled from the engine's usage
        assert keys["admin"]["role"] == "admin" and keys["free"]["models"] == ["*"]
        assert keys["free"]["hint"] == OTHER_KEY[:5] + "…"
        assert doc["usage_file"]["path"] == str((tmp_path / "usage.json").resolve())
        # Never a secret, nor its hash.
        for secret in SECRETS:
            assert secret not in body and hash_key(secret).hex() not in body

        # A user key may not read it.
        status, err, _ = await admin(r.url, "GET", "/admin/keys", key=OTHER_KEY)
        assert status == 403 and err["error"]["code"] == "admin_required"

        # reset-usage gives the quota back.
        status, entry, _ = await admin(r.url, "POST", "/admin/keys/total/reset-usage")
        assert status == 200 and entry["usage"]["requests_total"] == 0
        assert not isinstance(await chat(total), Exception)


async def test_disable_enable_at_run_time_reload_keys_and_usage_across_a_reload(tmp_path: Path, oai: Any) -> None:
    async with in_process_sims(quick_sim()) as (sim,), auth_router(tmp_path, [node(sim.url, "a")], keys=keys_config()) as r:
        free, total = oai(r.url, OTHER_KEY), oai(r.url, USER_KEY)
        assert not isinstance(await chat(free), Exception)
        assert not isinstance(await chat(total), Exception)

        status, entry, _ = await admin(r.url, "POST", "/admin/keys/free/disable")
        assert status == 200 and entry["enabled"] is False and entry["enabled_in_file"] is True
        assert entry["override"]["enabled"] is False
        exc = await chat(free)  # at once, no restart
        assert isinstance(exc, openai.AuthenticationError) and exc.body["code"] == "api_key_disabled"
        assert not isinstance(await chat(total), Exception)  # the others go on

        # Unknown key → 404; the last enabled admin key cannot be disabled (it would lock admin out).
        status, err, _ = await admin(r.url, "POST", "/admin/keys/nobody/disable")
        assert status == 404 and err["error"]["code"] == "key_not_found"
        status, err, _ = await admin(r.url, "POST", "/admin/keys/admin/disable")
        assert status == 409 and err["error"]["code"] == "last_admin_key"

        # A bad keys file: 400 with the config error, the keys in force stay.
        keys_file = tmp_path / "keys.toml"
        write_keys(keys_file, [*keys_config(), key_entry("short", "sk-short")])
        status, err, _ = await admin(r.url, "POST", "/admin/reload-keys")
        assert status == 400 and err["error"]["code"] == "invalid_config"
        assert "keys.toml" in err["error"]["message"] and "too short" in err["error"]["message"]
        assert not isinstance(await chat(oai(r.url, DAILY_KEY)), Exception)
        assert isinstance(await chat(oai(r.url, "sk-short")), openai.AuthenticationError)

        # A good one: a new key, "total" with a bigger quota, "free" as it was.
        newcomer = "sk-test-newcomer-0123456789ab"
        write_keys(keys_file, [*keys_config(total={"quota": {"requests_total": 3}}), key_entry("new", newcomer)])
        status, result, _ = await admin(r.url, "POST", "/admin/reload-keys")
        assert status == 200, result
        assert (result["added"], result["removed"], result["changed"]) == (["new"], [], ["total"])
        assert not isinstance(await chat(oai(r.url, newcomer)), Exception)
        # Usage survived the reload (2 used before, quota now 3: one more, then 429).
        assert not isinstance(await chat(total), Exception)
        exc = await chat(total)
        assert isinstance(exc, openai.RateLimitError) and "(3 requests)" in exc.body["message"]
        # The runtime disable of the unchanged key survived it too.
        assert isinstance(await chat(free), openai.AuthenticationError)

        status, entry, _ = await admin(r.url, "POST", "/admin/keys/free/enable")
        assert status == 200 and entry["enabled"] is True and entry["override"] is None
        assert not isinstance(await chat(free), Exception)

        # Disabled again, then the file itself changes the key's `enabled`: the file wins.
        await admin(r.url, "POST", "/admin/keys/free/disable")
        write_keys(keys_file, [*keys_config(free={"enabled": False, "role": "user"})])
        status, result, _ = await admin(r.url, "POST", "/admin/reload-keys")
        assert status == 200 and result["removed"] == ["new"]
        keys = by_name((await admin(r.url, "GET", "/admin/keys"))[1])
        assert keys["free"]["enabled"] is False and keys["free"]["override"] is None
        status, entry, _ = await admin(r.url, "POST", "/admin/keys/free/enable")  # enable overrides the file
        assert entry["enabled"] is True and entry["enabled_in_file"] is False and entry["override"]["enabled"] is True
        assert not isinstance(await chat(free), Exception)


async def mvllm_cli(*args: str, router: str, key: str | None = ADMIN_KEY) -> tuple[int, str, str]:
    """`python -m mvllm ARGS` without blocking this loop (the router under test runs in it)."""
    env = {k: v for k, v in os.environ.items() if k not in ("MVLLM_ROUTER", "MVLLM_ADMIN_KEY")}
    env["MVLLM_ROUTER"] = router
    if key:
        env["MVLLM_ADMIN_KEY"] = key
    proc = await asyncio.create_subprocess_exec(
        sys.executable, "-m", "mvllm", *args, cwd=REPO, env=env,
        stdout=asyncio.subprocess.PIPE, stderr=asyncio.subprocess.PIPE,
    )  # fmt: skip
    out, err = await asyncio.wait_for(proc.communicate(), timeout=60)
    assert proc.returncode is not None
    return proc.returncode, out.decode(), err.decode()


async def test_usage_and_a_runtime_disable_survive_a_router_restart_and_the_cli(tmp_path: Path, oai: Any) -> None:
    keys_file = write_keys(tmp_path / "keys.toml", keys_config(total={"quota": {"requests_total": 3}}))
    servers = tmp_path / "servers.toml"
    usage_file = tmp_path / "usage.json"
    async with in_process_sims(quick_sim()) as (sim,):
        write_servers(servers, [node(sim.url, "a")], auth={"keys_file": keys_file.name})
        async with router_process(tmp_path, servers) as r:
            total, free = oai(r.url, USER_KEY), oai(r.url, OTHER_KEY)
            for _ in range(2):
                assert not isinstance(await chat(total), Exception)

            # The CLI: table, --json, disable, reload.
            rc, out, err = await mvllm_cli("keys", router=r.url)
            assert rc == 0, err
            lines = out.splitlines()
            assert lines[0].split() == ["NAME", "ROLE", "ENABLED", "TODAY", "TOTAL", "TOKENS", "LIMITS", "MODELS"]
            row = next(line.split() for line in lines if line.startswith("total "))
            assert row[:5] == ["total", "user", "yes", "2", "2/3"]
            assert "50 rps" in next(line for line in lines if line.startswith("daily "))
            assert not any(secret in out for secret in SECRETS)

            rc, out, err = await mvllm_cli("keys", "disable", "free", router=r.url)
            assert rc == 0, err
            assert out.startswith("key free disabled") and "overriding the keys file" in out
            assert isinstance(await chat(free), openai.AuthenticationError)
            rc, out, err = await mvllm_cli("keys", "--json", router=r.url)
            assert rc == 0 and by_name(json.loads(out))["free"]["enabled"] is False

            rc, out, err = await mvllm_cli("keys", "reload", router=r.url)
            assert rc == 0 and out.startswith("keys reloaded: 4 key(s)"), (out, err)
            rc, out, err = await mvllm_cli("keys", "disable", "nobody", router=r.url)
            assert rc == 1 and "no API key named 'nobody'" in err
            rc, out, err = await mvllm_cli("keys", router=r.url, key=OTHER_KEY)  # not an admin key
            assert rc == 1 and "admin" in err
            # The admin action was saved at once, without waiting for the 5 s tick.
            await wait_until_async(
                lambda: usage_file.exists() and json.loads(usage_file.read_text())["keys"].get("free", {}).get("override"),
                timeout=5,
                what="the disable in the usage file",
            )
            # Used right before the stop (within the 5 s between saves): the save at shutdown keeps it.
            assert not isinstance(await chat(oai(r.url, DAILY_KEY)), Exception)
        # Stopped (SIGTERM): the last state is in the file.
        saved = json.loads(usage_file.read_text())
        assert saved["keys"]["total"]["requests_total"] == 2
        assert saved["keys"]["free"]["override"]["enabled"] is False
        assert saved["keys"]["daily"]["requests_today"] == 1
        assert not any(secret in usage_file.read_text() for secret in SECRETS)

        async with router_process(tmp_path, servers) as r:
            total, free = oai(r.url, USER_KEY), oai(r.url, OTHER_KEY)
            assert not isinstance(await chat(total), Exception)  # the third of 3
            exc = await chat(total)
            assert isinstance(exc, openai.RateLimitError) and exc.body["code"] == "insufficient_quota"
            assert isinstance(await chat(free), openai.AuthenticationError)  # still disabled
            rc, out, err = await mvllm_cli("keys", "enable", "free", router=r.url)
            assert rc == 0 and out.startswith("key free enabled"), (out, err)
            assert not isinstance(await chat(free), Exception)


async def test_dashboard_shows_a_keys_panel_only_when_keys_are_configured(tmp_path: Path, oai: Any) -> None:
    async with in_process_sims(quick_sim()) as (sim,):
        async with auth_router(tmp_path, [node(sim.url, "a")], keys=keys_config()) as r:
            for _ in range(3):
                await chat(oai(r.url, DAILY_KEY))
            app = DashboardApp(r.url, key=ADMIN_KEY, refresh_interval=0.2)
            async with app.run_test(size=(160, 48)):
                table = app.query_one("#keys", SyncedTable)
                await wait_until_async(lambda: table.row_count == 4, 15, what="the keys panel")
                assert app.query_one("#keys-pane").display
                assert table.cell_text("daily", "today") == "2/2"
                assert table.cell_text("total", "enabled") == "yes"
                await admin(r.url, "POST", "/admin/keys/total/disable")
                await wait_until_async(lambda: table.cell_text("total", "enabled") == "no (admin)", 10, what="disabled on screen")
                assert "API keys" in app.screen_text()

        # No keys: no panel.
        (tmp_path / "open").mkdir()
        async with auth_router(tmp_path / "open", [node(sim.url, "a")]) as r:
            app = DashboardApp(r.url, refresh_interval=0.2)
            async with app.run_test(size=(160, 48)):
                await wait_until_async(lambda: app.polls >= 3, 15, what="polls")
                assert not app.query_one("#keys-pane").display
                assert app.query_one("#keys", SyncedTable).row_count == 0
