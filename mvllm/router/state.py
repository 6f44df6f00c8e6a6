"""The router's shared state (one object per app, stored under an AppKey): the current config, the
registry, the policy, metrics and the pooled upstream session; and the one place a config is applied."""

from __future__ import annotations

import logging
import random
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import aiohttp

from mvllm.common.upstream import Upstream
from mvllm.router.access.gate import AuthGate
from mvllm.router.config import RouterConfig
from mvllm.router.fleet.registry import Diff, Registry
from mvllm.router.fleet.targets import Node
from mvllm.router.metrics import RouterMetrics
from mvllm.router.policy import CacheAware, Policy, make_policy
from mvllm.router.prefix_index import PrefixIndex

log = logging.getLogger("mvllm.router.state")


def upstream_timeout(config: RouterConfig) -> aiohttp.ClientTimeout:
    """One timeout object per config: connect, time to the first byte (and between bytes), total.

    sock_read bounds the wait for the response headers and for each later read, so a node that
    accepts the request and then hangs is given up after first_byte_timeout, before any byte was sent
    to the client, and the request moves on to another node.
    """
    t = config.timeouts
    return aiohttp.ClientTimeout(total=t.total, sock_connect=t.connect, sock_read=t.first_byte)


@dataclass
class ReloadStatus:
    at: float  # wall-clock time
    ok: bool
    message: str

    def as_dict(self) -> dict[str, Any]:
        return {"at": self.at, "ok": self.ok, "message": self.message}


@dataclass
class RouterState:
    config: RouterConfig
    registry: Registry
    policy: Policy
    metrics: RouterMetrics
    rng: random.Random
    timeout: aiohttp.ClientTimeout
    gate: AuthGate  # API keys and limits (access/gate.py), swapped in place on reload
    # Cache-aware routing's index of recent prompts (kept, empty, under the other policies).
    prefix_index: PrefixIndex = field(default_factory=PrefixIndex)
    session: aiohttp.ClientSession | None = None
    # The relay's own HTTP/1.1 client (common/upstream.py): requests proxied to nodes go through it.
    upstream: Upstream | None = None
    started_at: float = field(default_factory=time.time)
    last_reload: ReloadStatus | None = None
    # Called with the nodes that joined or changed, so the scraper discovers them at once.
    on_nodes_changed: Callable[[list[Node]], None] | None = None

    @classmethod
    def create(cls, config: RouterConfig, rng: random.Random | None = None) -> RouterState:
        rng = rng or random.Random()
        registry = Registry(config)
        policy = make_policy(config.policy, rng)
        index = PrefixIndex(policy.params if isinstance(policy, CacheAware) else None)
        # The collector reads the policy when /metrics is scraped, after a reload may swap it.
        metrics = RouterMetrics(registry, lambda: state.policy, index)
        state = cls(
            config=config,
            registry=registry,
            policy=policy,
            metrics=metrics,
            rng=rng,
            timeout=upstream_timeout(config),
            gate=AuthGate(config.auth, metrics.registry),
            prefix_index=index,
        )
        return state

    def forget_cache(self, node: str, why: str) -> None:
        """`node`'s KV cache is gone or no longer ours to use (left, drained, down, restarted,
        an engine slept, woke or stopped): affinity must not send prompts there for it."""
        keys = self.prefix_index.remove_target(node)
        if keys:
            log.info("prefix index: node %s forgotten (%s; %d prefixes)", node, why, keys)

    def apply_config(self, config: RouterConfig) -> Diff:
        """Swap in a validated config: node set, policy, timeouts. Host and port need a restart."""
        old = self.config
        if (config.host, config.port) != (old.host, old.port):
            log.warning("router host/port changed in config; this takes effect at the next restart")
        if (config.cluster, config.workers) != (old.cluster, old.workers):
            log.warning("[cluster] or [router] workers changed in config; this takes effect at the next restart")
        if config.policy != old.policy:
            self.policy = make_policy(config.policy, self.rng)
            log.info("policy is now %s", config.policy.type)
            if isinstance(self.policy, CacheAware):
                self.prefix_index.configure(self.policy.params, time.monotonic())  # a smaller bound applies now
            else:
                self.prefix_index.clear()
        self.config = config
        self.timeout = upstream_timeout(config)
        self.gate.apply(config.auth)
        diff = self.registry.apply(config)
        for node in diff.added:
            log.info("node %s added (%s)", node.name, node.url)
        for node in diff.changed:
            log.info("node %s updated (weight %s, capacity %s, drain %s)", node.name, node.weight, node.capacity, node.cfg.drain)
            if node.draining:
                self.forget_cache(node.name, "drained")
        for node in diff.removed:
            self.forget_cache(node.name, "removed")
        if self.on_nodes_changed is not None and (diff.added or diff.changed):
            self.on_nodes_changed(diff.added + diff.changed)
        return diff
