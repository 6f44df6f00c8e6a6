"""Where the operator's commands find the router and its admin key when no flag names them: the
environment (MVLLM_ROUTER, MVLLM_ADMIN_KEY), else the default local router."""

from __future__ import annotations

import os

from mvllm.client.aio import DEFAULT_URL

ROUTER_ENV = "MVLLM_ROUTER"
KEY_ENV = "MVLLM_ADMIN_KEY"


def default_router() -> str:
    return os.environ.get(ROUTER_ENV) or DEFAULT_URL


def default_key() -> str | None:
    return os.environ.get(KEY_ENV) or None
