"""The admin API of API keys: `GET /admin/keys` (every key with its settings and usage, never its
secret), enable/disable and reset-usage of one key at run time, `POST /admin/reload-keys`; and the
wiring of the usage file (usage_store.py) into the app's lifetime."""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import AsyncIterator
from dataclasses import asdict
from pathlib import Path
from typing import Any

from aiohttp import web

from mvllm.router.access.gate import AuthGate
from mvllm.router.access.keys import ApiKey
from mvllm.router.access.limits import LIMIT_NAMES
from mvllm.router.access.usage_file import day_to_date, utc_day
from mvllm.router.access.usage_store import UsageStore
from mvllm.router.admin.errors import AdminError
from mvllm.router.appkeys import CONFIG_PATH_KEY, STATE_KEY
from mvllm.router.cluster import CLUSTER_KEY
from mvllm.router.cluster_store import QuotaUsage
from mvllm.router.reload import reload_config

log = logging.getLogger("mvllm.router.admin")

USAGE_STORE_KEY = web.AppKey("mvllm_router_usage_store", UsageStore)


def _spec(obj: object | None) -> dict[str, Any] | None:
    """A LimitSpec / QuotaSpec as JSON, without the limits it does not set."""
    if obj is None:
        return None
    return {k: v for k, v in asdict(obj).items() if v is not None}  # type: ignore[call-overload]


def key_entry(gate: AuthGate, key: ApiKey, counters: dict[str, dict[str, float]]) -> dict[str, Any]:
    """One key as /admin/keys shows it: settings, runtime state and usage. The hint is what the
    config loader made (`sk-ab…` or `sha256:1a2b3c4d…`); the secret is not held anywhere."""
    c = counters.get(key.name, {})
    file_key = gate.file_key(key.name)
    override = gate.overrides.get(key.name)
    used_total = int(c.get("requests_total", 0))
    used_today = int(c.get("requests_today", 0))
    quota = key.quota
    left: dict[str, int] = {}
    if quota is not None and quota.requests_total is not None:
        left["requests_total"] = max(0, quota.requests_total - used_total)
    if quota is not None and quota.requests_per_day is not None:
        left["requests_per_day"] = max(0, quota.requests_per_day - used_today)
    return {
        "name": key.name,
        "hint": key.hint,
        "role": key.role,
        "enabled": key.enabled,
        "enabled_in_file": file_key.enabled if file_key is not None else key.enabled,
        "override": {"enabled": override.enabled, "at": override.at} if override is not None else None,
        "models": list(key.models),
        "limits": _spec(key.limits),
        "quota": _spec(quota),
        "usage": {
            "requests_today": used_today,
            "requests_total": used_total,
            "tokens": int(c.get("tokens_reported", 0)),
            "in_flight": int(c.get("in_flight", 0)),
            "queued": int(c.get("queued", 0)),
            "denied": {limit: int(c.get(f"denied_{limit}", 0)) for limit in LIMIT_NAMES},
        },
        "quota_left": left or None,
    }


def keys_document(gate: AuthGate, store: UsageStore | None) -> dict[str, Any]:
    counters = gate.limits.counters()
    return {
        "open": gate.open,
        "day": day_to_date(utc_day(time.time())),  # the UTC day `requests_today` counts
        "keys": [key_entry(gate, k, counters) for k in gate.store],
        "usage_file": {
            "path": str(store.path) if store is not None and store.path is not None else None,
            "saved_at": store.saved_at if store is not None else None,
            "error": store.error if store is not None else None,
        },
    }


def _key_or_404(gate: AuthGate, name: str) -> ApiKey:
    key = gate.store.by_name(name)
    if key is None:
        known = ", ".join(k.name for k in gate.store) or "none: no key is configured"
        raise AdminError(404, f"no API key named {name!r} (keys: {known})", code="key_not_found")
    return key


def _entry(request: web.Request, name: str) -> dict[str, Any]:
    gate = request.app[STATE_KEY].gate
    key = gate.store.by_name(name)
    assert key is not None
    return key_entry(gate, key, gate.limits.counters())


# -- handlers ------------------------------------------------------------------------------------------


async def get_keys(request: web.Request) -> web.Response:
    doc = keys_document(request.app[STATE_KEY].gate, request.app.get(USAGE_STORE_KEY))
    cluster = request.app.get(CLUSTER_KEY)
    if cluster is not None:  # quotas are counted in Redis, over every router: show those numbers
        shared = await cluster.quota_usage([e["name"] for e in doc["keys"] if e["quota"]])
        for entry in doc["keys"]:
            if entry["name"] in shared:
                with_shared_quota(entry, shared[entry["name"]], utc_day(time.time()))
    return web.json_response(doc)


def with_shared_quota(entry: dict[str, Any], usage: QuotaUsage, today: int) -> dict[str, Any]:
    """A key_entry with the cluster's quota counters instead of this router's own."""
    used_today = usage.requests_today if usage.day == today else 0
    entry["usage"]["requests_total"] = usage.requests_total
    entry["usage"]["requests_today"] = used_today
    entry["usage"]["quota_counted"] = "cluster"
    quota = entry["quota"] or {}
    left = {}
    if "requests_total" in quota:
        left["requests_total"] = max(0, quota["requests_total"] - usage.requests_total)
    if "requests_per_day" in quota:
        left["requests_per_day"] = max(0, quota["requests_per_day"] - used_today)
    entry["quota_left"] = left or None
    return entry


async def _set_enabled(request: web.Request, enabled: bool) -> web.Response:
    gate = request.app[STATE_KEY].gate
    key = _key_or_404(gate, request.match_info["name"])
    if not enabled and key.is_admin and key.enabled and not any(k.is_admin and k.enabled and k.name != key.name for k in gate.store):
        raise AdminError(
            409,
            f"key {key.name!r} is the last enabled admin key: disabling it would lock the admin API out "
            "(enable or add another admin key first, or set enabled = false in the keys file)",
            code="last_admin_key",
        )
    was = key.enabled
    gate.set_enabled(key.name, enabled)
    cluster = request.app.get(CLUSTER_KEY)
    if cluster is not None:  # every router sharing the Redis applies it too
        await cluster.set_key_enabled(key.name, enabled)
    file_enabled = gate.file_key(key.name).enabled  # type: ignore[union-attr]
    if was != enabled:
        where = "as the keys file says" if enabled == file_enabled else "overriding the keys file until its entry changes"
        log.info("key %s %s by admin (%s)", key.name, "enabled" if enabled else "disabled", where)
    store = request.app.get(USAGE_STORE_KEY)
    if store is not None:
        store.save_soon()
    return web.json_response(_entry(request, key.name))


async def disable_key(request: web.Request) -> web.Response:
    return await _set_enabled(request, False)


async def enable_key(request: web.Request) -> web.Response:
    return await _set_enabled(request, True)


async def reset_usage(request: web.Request) -> web.Response:
    gate = request.app[STATE_KEY].gate
    key = _key_or_404(gate, request.match_info["name"])
    gate.reset_usage(key.name)
    cluster = request.app.get(CLUSTER_KEY)
    if cluster is not None:  # the quota every router counts against
        await cluster.reset_quota(key.name)
    log.info("key %s: usage reset by admin (quota counters, tokens, denials)", key.name)
    store = request.app.get(USAGE_STORE_KEY)
    if store is not None:
        store.save_soon()
    return web.json_response(_entry(request, key.name))


async def reload_keys(request: web.Request) -> web.Response:
    """Re-read the keys now: servers.toml and the keys file it names (the same load as a save of
    either). Invalid → 400 with the config error; the keys in force stay."""
    state = request.app[STATE_KEY]
    path = request.app.get(CONFIG_PATH_KEY)
    if path is None:
        raise AdminError(409, "this router runs without a config file (the demo): no keys to reload", code="no_config_file")
    gate = state.gate
    before = {k.name: k for k in gate.config.keys}
    log.info("keys reload asked through the admin API")
    if not await reload_config(state, Path(path)):
        message = state.last_reload.message if state.last_reload else "invalid config"
        raise AdminError(400, f"keys rejected, the previous keys stay: {message}", code="invalid_config")
    after = {k.name: k for k in gate.config.keys}
    return web.json_response(
        {
            "ok": True,
            "keys_file": str(gate.config.keys_file) if gate.config.keys_file else None,
            "keys": list(after),
            "added": [n for n in after if n not in before],
            "removed": [n for n in before if n not in after],
            "changed": [n for n in after if n in before and after[n] != before[n]],
        }
    )


# -- wiring --------------------------------------------------------------------------------------------


async def _usage_ctx(app: web.Application) -> AsyncIterator[None]:
    store = app[USAGE_STORE_KEY]
    await store.load()  # before the site listens: no request is counted against a zero it should not be
    task = asyncio.get_running_loop().create_task(store.run(), name="mvllm-usage-save")
    try:
        yield
    finally:
        await store.stop(task)


ROUTES = [
    web.get("/admin/keys", get_keys),
    web.post("/admin/keys/{name}/disable", disable_key),
    web.post("/admin/keys/{name}/enable", enable_key),
    web.post("/admin/keys/{name}/reset-usage", reset_usage),
    web.post("/admin/reload-keys", reload_keys),
]


def setup(app: web.Application) -> None:
    """The usage file's load/save loop."""
    app[USAGE_STORE_KEY] = UsageStore(app[STATE_KEY].gate)
    app.cleanup_ctx.append(_usage_ctx)
