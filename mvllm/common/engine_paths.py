"""The engine paths that carry no model and change nothing (health, version, the model list,
metrics): what `/proxy/{instance}/{path}` on the router and `/models/NAME/proxy/{path}` on the agent
pass to one engine. Everything else (control paths, requests with a model) stays off that route.
"""

from __future__ import annotations

INFO_PATHS = frozenset({"health", "ping", "version", "load", "metrics", "v1/models"})


def is_info_path(path: str) -> bool:
    """Whether `path` (no leading slash) is one of INFO_PATHS or a model's card `v1/models/ID`."""
    if path in INFO_PATHS:
        return True
    head, _, card = path.partition("v1/models/")
    return head == "" and bool(card) and "/" not in card.strip("/") and ".." not in card


def refusal(path: str) -> str:
    """Why `path` is not passed, and where such a request goes instead."""
    return (
        f"/{path} is not passed to one engine: only GET /health, /ping, /version, /load, /metrics, "
        "/v1/models and /v1/models/ID are; a request that names a model goes to /v1/... with "
        '"model" set to the instance\'s name'
    )
