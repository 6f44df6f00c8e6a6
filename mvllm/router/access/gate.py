"""API keys and limits at work in the router: the check that authenticates a request before its
body is read (401/403, the admin rule; called by the router's one middleware, app.front_middleware),
the admission of a proxied request once its model is known (allow-list 403, limits 429 or a
bounded wait), settling its tokens from the usage the engine
reported, and the counters behind /metrics. The decisions are the pure ones of keys.py and limits.py.
"""

from __future__ import annotations

import asyncio
import ipaddress
import logging
import time
from collections.abc import Iterable, Iterator
from typing import Any

from aiohttp import web
from prometheus_client import CollectorRegistry, Counter
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily
from prometheus_client.registry import Collector

from mvllm.common.errors import error_response
from mvllm.router.access.config import AuthConfig
from mvllm.router.access.keys import ApiKey, KeyStore, authorize, check_model, is_admin_path
from mvllm.router.access.limits import GLOBAL_SCOPE, LimitDecision, LimitSet, Ticket, Verdict, estimate_tokens
from mvllm.router.access.shared import SharedLimits, SharedTicket
from mvllm.router.access.usage_file import KeyOverrides, UsageDoc
from mvllm.router.access.usage_tail import find_usage
from mvllm.router.request import ResponseComplete

log = logging.getLogger("mvllm.router.auth")


def _request_key(name: str, t: type) -> Any:
    # Typed request keys arrived in aiohttp 3.14; plain strings before.
    return web.RequestKey(name, t) if hasattr(web, "RequestKey") else name


API_KEY = _request_key("mvllm_api_key", ApiKey)  # the key that authenticated the request
TICKET = _request_key("mvllm_limit_ticket", Ticket)  # its passage through the limits
SHARED_TICKET = _request_key("mvllm_shared_ticket", SharedTicket)  # its admission in Redis, if any

# Paths whose requests generate no tokens: their up-front estimate is the prompt alone.
_NO_COMPLETION = ("embeddings", "score", "rerank", "pooling", "classify", "tokenize")
# Up-front completion estimate of a request that sets no max_tokens (settled from usage later).
DEFAULT_COMPLETION_ESTIMATE = 256


def is_loopback_address(address: str | None) -> bool:
    """True for 127.0.0.0/8, ::1 and IPv4-mapped loopback (a dual-stack socket's view of 127.0.0.1)."""
    if not address:
        return False
    try:
        ip = ipaddress.ip_address(address.split("%", 1)[0])
    except ValueError:
        return False
    if isinstance(ip, ipaddress.IPv6Address) and ip.ipv4_mapped is not None:
        ip = ip.ipv4_mapped
    return ip.is_loopback


def is_loopback_host(host: str) -> bool:
    """Whether a listen address keeps the router on this machine ("" and 0.0.0.0 do not)."""
    return host.lower() == "localhost" or is_loopback_address(host)


def visible_models(key: ApiKey | None, cards: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """The model cards a key may see: those it may use (all of them without a key)."""
    if key is None or key.models == ("*",):
        return cards
    return [c for c in cards if isinstance(c.get("id"), str) and key.allows_model(c["id"])]


class AuthGate:
    """The router's current keys and limits (swapped on reload) and the counters of both."""

    def __init__(self, config: AuthConfig, registry: CollectorRegistry | None = None) -> None:
        self.config = config
        # Admin enable/disable at run time (usage_file.py); the store holds the keys as in force.
        self.overrides = KeyOverrides()
        self.store = self._build_store()
        self.limits = LimitSet(config.limits, config.queue)
        self.metrics = AuthMetrics(self, registry)
        self.active = False
        self._global_tpm = False
        # Set by router/cluster.py when [cluster] redis_url is configured: limits shared in Redis.
        self.shared: SharedLimits | None = None
        self._refresh()

    def _refresh(self) -> None:
        # Tickets only when something reads them: limits to apply, or keys to count requests of.
        self.active = not self.store.open or not self.config.limits.empty
        self._global_tpm = self.config.limits.tokens_per_minute is not None

    @property
    def open(self) -> bool:
        return self.store.open

    def apply(self, config: AuthConfig) -> None:
        """A reloaded config: new keys and limits for new requests; those in flight finish as they are."""
        old = self.config
        self.config = config
        for name in self.overrides.reconcile(config.keys):
            log.info("key %s: the keys file changed its secret or its enabled, or removed it: the runtime enable/disable is dropped", name)
        self.store = self._build_store()
        self.limits.update(config.limits, config.queue)
        self.limits.prune(k.name for k in config.keys)
        self._refresh()
        if (old.keys, old.limits, old.queue, old.protect_metrics) != (
            config.keys,
            config.limits,
            config.queue,
            config.protect_metrics,
        ):
            names = ", ".join(k.name + ("" if k.enabled else " (disabled)") for k in self.store)
            log.info("auth: %d key(s)%s", len(config.keys), f": {names}" if names else " (open: no auth)")

    # -- key management (router/admin/keys.py) and usage kept across restarts (router/access/usage_store.py) --

    def _build_store(self) -> KeyStore:
        return KeyStore(self.overrides.apply(self.config.keys), protect_metrics=self.config.protect_metrics)

    def file_key(self, name: str) -> ApiKey | None:
        """The key named `name` as the config has it (before any runtime override)."""
        return next((k for k in self.config.keys if k.name == name), None)

    def set_enabled(self, name: str, enabled: bool) -> ApiKey | None:
        """Enable or disable a key now, for new requests (None: no such key)."""
        key = self.file_key(name)
        if key is None:
            return None
        self.overrides.set(key, enabled, time.time())
        self.store = self._build_store()
        return self.store.by_name(name)

    def reset_usage(self, name: str) -> bool:
        if self.file_key(name) is None:
            return False
        self.limits.reset_usage(name)
        return True

    def usage_doc(self) -> UsageDoc:
        """What the usage file should hold now: the configured keys' usage and overrides."""
        names = {k.name for k in self.config.keys}
        usage = {n: u for n, u in self.limits.export_usage().items() if n in names}
        return UsageDoc(usage, dict(self.overrides.items()), time.time())

    def restore(self, doc: UsageDoc) -> list[str]:
        """Take the usage and overrides of a saved file for the keys configured now (at start).
        Returns the names whose saved override no longer applies (key changed or gone)."""
        names = {k.name for k in self.config.keys}
        for name, usage in doc.usage.items():
            if name in names:
                self.limits.restore_usage(name, usage)
        for name, override in doc.overrides.items():
            self.overrides.put(name, override)
        dropped = self.overrides.reconcile(self.config.keys)
        self.store = self._build_store()
        return dropped

    def exposure_warning(self, host: str) -> str | None:
        if not self.store.open or is_loopback_host(host):
            return None
        return (
            f"no API key is configured and the router listens on {host or 'all interfaces'}: anyone who can "
            "reach it may use every model (the admin API stays loopback-only); configure keys in [auth] "
            "(see docs/security.md)"
        )

    # -- one request ------------------------------------------------------------------------------

    def _wants_estimate(self, key: ApiKey | None) -> bool:
        if self._global_tpm:
            return True
        return key is not None and key.limits is not None and key.limits.tokens_per_minute is not None

    def model_denied(self, request: web.Request, model: str) -> web.Response | None:
        """The 403 of a key whose allow-list lacks `model`, or None (no key, or allowed)."""
        key: ApiKey | None = request.get(API_KEY)
        if key is None:
            return None
        decision = check_model(key, model)
        if decision.allowed:
            return None
        self.metrics.rejected.labels(decision.code or "403").inc()
        return error_response(decision.status, decision.message, code=decision.code)

    async def admit(self, request: web.Request, model: str | None, body: Any) -> web.StreamResponse | None:
        """Called by the proxy once the body named the model: None to go on, or the answer to give."""
        key: ApiKey | None = request.get(API_KEY)
        if model is not None:
            denied = self.model_denied(request, model)
            if denied is not None:
                return denied
        if not self.active:
            return None
        estimate = 0
        if self._wants_estimate(key):
            path = request.path
            default = 0 if any(word in path for word in _NO_COMPLETION) else DEFAULT_COMPLETION_ESTIMATE
            estimate = estimate_tokens(body if isinstance(body, dict) else {}, default_completion=default)
        limits = self.limits
        ticket = limits.ticket(key, estimate)
        request[TICKET] = ticket  # released by the middleware, whatever happens next
        shared = self.shared
        decision: LimitDecision | None = None
        if shared is not None:
            outcome = await shared.admit(limits, self.config.limits, key, ticket)
            if outcome.down and shared.rejects(self.config.limits, key):
                limits.release(ticket)
                self.metrics.rejected.labels("limits_unavailable").inc()
                return error_response(
                    503,
                    "the shared limits are unavailable (Redis unreachable) and [cluster] on_redis_down = "
                    "\"reject\": requests a limit applies to are refused until it is back",
                    code="limits_unavailable",
                    headers={"Retry-After": "1"},
                )
            decision = outcome.decision
            if outcome.shared is not None:
                request[SHARED_TICKET] = outcome.shared
        if decision is None:  # in memory: no cluster, or Redis down with on_redis_down = "local"
            decision = limits.admit(ticket)
            while decision.verdict is Verdict.WAIT:
                await asyncio.sleep(decision.wait)
                decision = limits.admit(ticket)
        if decision.allowed:
            return None
        limits.release(ticket)
        scope = "global" if decision.scope == GLOBAL_SCOPE else "key"  # no key may be named "global"
        self.metrics.limited.labels(key.name if key is not None else "-", decision.limit or "", scope).inc()
        return error_response(decision.status, decision.message, code=decision.code, headers=decision.headers)

    def response_complete(self, done: ResponseComplete) -> None:
        """The proxy's hook (request.ResponseHook): settle the request's tokens from the usage at
        the end of the answer relayed."""
        ticket: Ticket | None = done.request.get(TICKET)
        if ticket is None or not ticket.admitted or ticket.settled:
            return
        tail = done.tail
        tokens = find_usage(tail) if tail else None
        if tokens is None and done.status >= 400:
            tokens = 0  # a node's error answer generated nothing
        if tokens is not None:
            self.limits.settle(ticket, tokens)
            shared: SharedTicket | None = done.request.get(SHARED_TICKET)
            if shared is not None:
                shared.used_tokens = tokens
        # else: a stream without include_usage, or cut: the up-front estimate stays charged.

    def finish(self, request: web.Request, resp: web.StreamResponse | None) -> None:
        """The request is over: an error answer of the router's own generated nothing (an answer
        relayed was settled by response_complete); free its slot."""
        ticket: Ticket | None = request.get(TICKET)
        if ticket is None:
            return
        shared: SharedTicket | None = request.get(SHARED_TICKET)
        if ticket.admitted and not ticket.settled and resp is not None and resp.status >= 400:
            self.limits.settle(ticket, 0)
            if shared is not None:
                shared.used_tokens = 0
        self.limits.release(ticket)
        if shared is not None and self.shared is not None:
            self.shared.finish(shared)

    def snapshot(self) -> dict[str, Any]:
        """What /load-stats shows of auth: names and counters, never keys or hints."""
        return {
            "open": self.store.open,
            "keys": [
                {"name": k.name, "role": k.role, "enabled": k.enabled, "models": list(k.models)} for k in self.store
            ],
            "limits": self.limits.counters(),
        }


GATE_KEY = web.AppKey("mvllm_router_auth", AuthGate)


def authenticate(gate: AuthGate, request: web.Request) -> web.StreamResponse | None:
    """401/403 before the body is read, and the admin rule: the refusal, or None to go on (with the
    key that authenticated stored under API_KEY). Whoever goes on must call `gate.finish` at the end
    when `gate.active`."""
    store = gate.store
    if store.open:
        if is_admin_path(request.path) and not is_loopback_address(request.remote):
            gate.metrics.rejected.labels("admin_loopback_only").inc()
            return error_response(
                403,
                "the admin API answers only on 127.0.0.1 while no API key is configured; "
                "configure an admin key to use it from elsewhere",
                code="admin_loopback_only",
            )
        return None
    decision = authorize(store, request.headers, request.path)
    if not decision.allowed:
        gate.metrics.rejected.labels(decision.code or str(decision.status)).inc()
        return error_response(decision.status, decision.message, code=decision.code, headers=decision.headers)
    if decision.key is not None:
        request[API_KEY] = decision.key
        gate.metrics.count_key(decision.key.name)
    return None


class AuthMetrics:
    """mvllm_key_requests_total{key}, mvllm_auth_rejected_total{reason},
    mvllm_rate_limited_total{key,limit,scope}, and the limit gauges read at scrape time."""

    def __init__(self, gate: AuthGate, registry: CollectorRegistry | None) -> None:
        self.key_requests = Counter(
            "mvllm_key_requests", "Requests authenticated with each API key", ["key"], registry=registry
        )
        self.rejected = Counter(
            "mvllm_auth_rejected", "Requests refused by auth (401/403), by reason", ["reason"], registry=registry
        )
        self.limited = Counter(
            "mvllm_rate_limited",
            "Requests answered 429 by a limit: the key ('-' without auth), the limit, and whether it was "
            "the key's own limit or the router's global one",
            ["key", "limit", "scope"],
            registry=registry,
        )
        if registry is not None:
            registry.register(_LimitCollector(gate))
        # labels() takes a lock and builds a tuple each call: keep each key's child at hand.
        self._per_key: dict[str, Any] = {}

    def count_key(self, name: str) -> None:
        child = self._per_key.get(name)
        if child is None:
            child = self._per_key[name] = self.key_requests.labels(name)
        child.inc()


class _LimitCollector(Collector):
    def __init__(self, gate: AuthGate) -> None:
        self._gate = gate

    def describe(self) -> list[GaugeMetricFamily]:
        return []

    def collect(self) -> Iterator[GaugeMetricFamily | CounterMetricFamily]:
        counters = self._gate.limits.counters()
        glob = counters.pop(GLOBAL_SCOPE, {})
        yield _gauge("mvllm_limit_in_flight", "Requests admitted by the limits and not finished", glob, "in_flight")
        yield _gauge("mvllm_limit_queued", "Requests waiting in the limits' queue", glob, "queued")
        if "tokens_in_window" in glob:
            yield _gauge("mvllm_limit_tokens_in_window", "Tokens counted in the global per-minute window", glob, "tokens_in_window")
        yield from _per_key(counters)


def _gauge(name: str, doc: str, values: dict[str, float], field: str) -> GaugeMetricFamily:
    g = GaugeMetricFamily(name, doc)
    g.add_metric([], values.get(field, 0))
    return g


def _per_key(counters: dict[str, dict[str, float]]) -> Iterable[GaugeMetricFamily | CounterMetricFamily]:
    in_flight = GaugeMetricFamily("mvllm_key_in_flight", "Requests of each key in flight", labels=["key"])
    queued = GaugeMetricFamily("mvllm_key_queued", "Requests of each key waiting for a limit", labels=["key"])
    window = GaugeMetricFamily("mvllm_key_tokens_in_window", "Tokens of each key in its per-minute window", labels=["key"])
    tokens = CounterMetricFamily("mvllm_key_tokens", "Tokens the engines reported for each key", labels=["key"])
    for name, c in counters.items():
        in_flight.add_metric([name], c.get("in_flight", 0))
        queued.add_metric([name], c.get("queued", 0))
        tokens.add_metric([name], c.get("tokens_reported", 0))
        if "tokens_in_window" in c:
            window.add_metric([name], c["tokens_in_window"])
    return (in_flight, queued, window, tokens)
