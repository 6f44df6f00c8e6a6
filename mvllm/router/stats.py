"""The JSON snapshot behind /load-stats (also what the dashboard and `mvllm ps` read): every node
with its load, score, health and breaker, an agent's /state facts, the model index and auth."""

from __future__ import annotations

import time
from typing import Any, cast

from mvllm import __version__
from mvllm.router.fleet.agents import AgentNode, agent_stats
from mvllm.router.fleet.targets import Health
from mvllm.router.state import RouterState


def load_stats_snapshot(state: RouterState, config_path: str | None = None) -> dict[str, Any]:
    """The JSON snapshot behind /load-stats (also what the dashboard reads)."""
    now = time.monotonic()
    policy = state.policy
    nodes = []
    for n in state.registry.iter_all():
        score = policy.score(n)
        entry = {
            "name": n.name,
            "url": n.url,
            "kind": n.kind,
            "models": sorted(n.models),
            "running": round(n.running, 3),
            "waiting": round(n.waiting, 3),
            "in_flight": n.in_flight,
            "capacity": n.capacity,
            "weight": n.weight,
            "score": round(score, 4) if score != float("inf") else None,
            "healthy": n.routable(now),
            "health": n.health.value,
            "breaker": n.breaker.state.value,
            "draining": n.draining,
            "removed": n.retired,
            # The engine's vllm:kv_cache_usage_perc (0..1) and prefix-cache hit ratio, when it says.
            "kv_cache_usage": round(n.kv_cache_usage, 4) if n.kv_cache_usage is not None else None,
            "prefix_hit_ratio": round(hr, 4) if (hr := n.prefix_hit_ratio) is not None else None,
            "last_scrape_age_s": round(now - n.last_scrape, 3) if n.last_scrape is not None else None,
            "scrape_error": n.scrape_error,
            "health_error": n.health_error if n.health is not Health.UP else None,
        }
        if n.via_agent:
            entry.update(agent_stats(cast(AgentNode, n), policy, now))  # error, and the agent's GPUs, engines, catalog
        nodes.append(entry)
    return {
        "router": {
            "version": __version__,
            "uptime_s": round(time.time() - state.started_at, 1),
            "policy": policy.type,
            "prefix_index_bytes": state.prefix_index.size_bytes,
            "config": config_path,
            "last_reload": state.last_reload.as_dict() if state.last_reload else None,
        },
        "nodes": nodes,
        "models": {m: [n.name for n in state.registry.nodes_for(m)] for m in sorted(state.registry.models())},
        "auth": state.gate.snapshot(),
    }
