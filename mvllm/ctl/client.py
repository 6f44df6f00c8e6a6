"""An async HTTP client of one router's observability and admin API (`/health`, `/load-stats`,
`/metrics`, `/admin/*`), used by the CLI and by the dashboard, in the router's process or remote.

The admin key, when given, goes in `Authorization: Bearer`; it is never printed.
"""

from __future__ import annotations

import asyncio
import json
import os
from typing import Any
from urllib.parse import quote

import aiohttp

DEFAULT_ROUTER = "http://127.0.0.1:8888"
ROUTER_ENV = "MVLLM_ROUTER"
KEY_ENV = "MVLLM_ADMIN_KEY"
MODEL_ACTIONS = ("load", "unload", "sleep", "wake")


def default_router() -> str:
    return os.environ.get(ROUTER_ENV) or DEFAULT_ROUTER


def default_key() -> str | None:
    return os.environ.get(KEY_ENV) or None


class RouterError(Exception):
    """The router answered with an error status; `message` is the OpenAI-form error's message."""

    def __init__(self, status: int, message: str, code: str | int | None = None, body: Any = None) -> None:
        super().__init__(f"HTTP {status}: {message}")
        self.status = status
        self.message = message
        self.code = code
        self.body = body


class RouterUnreachable(Exception):
    """No HTTP answer at all: connection refused, DNS, timeout."""


def normalize_url(url: str) -> str:
    url = url.strip().rstrip("/")
    if "://" not in url:
        url = "http://" + url
    if url.endswith("/v1"):
        url = url[: -len("/v1")]
    return url


class RouterClient:
    """`async with RouterClient(url, key) as c: await c.nodes()`; one pooled session per client."""

    def __init__(self, base_url: str, key: str | None = None, timeout: float = 5.0) -> None:
        self.base_url = normalize_url(base_url)
        self._headers = {"Authorization": f"Bearer {key}"} if key else {}
        self._timeout = aiohttp.ClientTimeout(total=timeout)
        self._session: aiohttp.ClientSession | None = None

    async def __aenter__(self) -> RouterClient:
        return self

    async def __aexit__(self, *exc: object) -> None:
        await self.close()

    @property
    def session(self) -> aiohttp.ClientSession:
        if self._session is None or self._session.closed:
            # No proxy from the environment: the router is addressed directly, loopback included.
            self._session = aiohttp.ClientSession(headers=self._headers, timeout=self._timeout, trust_env=False)
        return self._session

    async def close(self) -> None:
        if self._session is not None:
            await self._session.close()
            self._session = None

    async def request(
        self,
        method: str,
        path: str,
        *,
        params: dict[str, str] | None = None,
        timeout: float | None = None,
        want: str = "json",
    ) -> Any:
        """One call; JSON (or text with want="text") on 2xx, else RouterError / RouterUnreachable."""
        kw: dict[str, Any] = {"params": params}
        if timeout is not None:
            kw["timeout"] = aiohttp.ClientTimeout(total=timeout)
        try:
            async with self.session.request(method, self.base_url + path, **kw) as resp:
                text = await resp.text(errors="replace")
                if resp.status >= 400:
                    raise _error_from(resp.status, text)
                if want == "text":
                    return text
                try:
                    return json.loads(text) if text else None
                except ValueError:
                    raise RouterError(resp.status, f"{path} answered something that is not JSON: {text[:200]!r}") from None
        except (aiohttp.ClientConnectionError, aiohttp.InvalidURL, asyncio.TimeoutError, OSError) as exc:
            what = "timed out" if isinstance(exc, asyncio.TimeoutError) else (str(exc) or type(exc).__name__)
            raise RouterUnreachable(f"router {self.base_url} unreachable: {what}") from exc

    # -- reads ----------------------------------------------------------------------------------------

    async def health(self) -> dict[str, Any]:
        return await self.request("GET", "/health")

    async def load_stats(self) -> dict[str, Any]:
        return await self.request("GET", "/load-stats")

    async def nodes(self) -> dict[str, Any]:
        return await self.request("GET", "/admin/nodes")

    async def metrics_text(self) -> str:
        return await self.request("GET", "/metrics", want="text")

    async def events(self, since: int = 0, limit: int | None = None) -> dict[str, Any]:
        params = {"since": str(since)}
        if limit:
            params["limit"] = str(limit)
        return await self.request("GET", "/admin/events", params=params)

    # -- actions ---------------------------------------------------------------------------------------

    async def drain(self, node: str) -> dict[str, Any]:
        return await self.request("POST", f"/admin/nodes/{quote(node, safe='')}/drain")

    async def undrain(self, node: str) -> dict[str, Any]:
        return await self.request("POST", f"/admin/nodes/{quote(node, safe='')}/undrain")

    async def reload(self) -> dict[str, Any]:
        return await self.request("POST", "/admin/reload")

    async def model_action(
        self, action: str, model: str, *, node: str | None = None, level: int | None = None, timeout: float | None = None
    ) -> Any:
        """POST /admin/models/{model}/{action}?node=N&level=L (served by the router's agent side)."""
        if action not in MODEL_ACTIONS:
            raise ValueError(f"unknown model action {action!r}")
        params: dict[str, str] = {}
        if node:
            params["node"] = node
        if level is not None:
            params["level"] = str(level)
        return await self.request(
            "POST", f"/admin/models/{quote(model, safe='')}/{action}", params=params or None, timeout=timeout
        )


def _error_from(status: int, text: str) -> RouterError:
    try:
        body = json.loads(text)
    except ValueError:
        body = None
    err = body.get("error") if isinstance(body, dict) else None
    if isinstance(err, dict) and err.get("message"):
        return RouterError(status, str(err["message"]), err.get("code"), body)
    if isinstance(err, str):
        return RouterError(status, err, None, body)
    return RouterError(status, text.strip()[:300] or f"HTTP {status}", None, body)
