"""Request helpers of the agent's API handlers: AgentError answered in OpenAI form, JSON bodies, `?wait`."""

from __future__ import annotations

import asyncio
from collections.abc import Awaitable, Callable

from aiohttp import web

from mvllm.agent.appkeys import CONFIG
from mvllm.agent.errors import AgentError, BadRequest, Busy
from mvllm.common.errors import error_response

Handler = Callable[[web.Request], Awaitable[web.StreamResponse]]


def error(exc: AgentError) -> web.Response:
    headers = {"Retry-After": str(int(exc.retry_after))} if exc.retry_after else None
    return error_response(exc.status, exc.message, code=exc.code, headers=headers)


def api(fn: Handler) -> Handler:
    """Lifecycle handlers raise AgentError; answer it in OpenAI form."""

    async def wrapped(request: web.Request) -> web.StreamResponse:
        try:
            return await fn(request)
        except AgentError as exc:
            return error(exc)
        except asyncio.TimeoutError:
            return error(Busy(f"not done within load_timeout ({request.app[CONFIG].load_timeout:g} s); see GET /state"))

    return wrapped


async def json_body(request: web.Request) -> dict:
    if not request.can_read_body:
        return {}
    try:
        data = await request.json()
    except ValueError:
        raise BadRequest("request body is not valid JSON") from None
    if not isinstance(data, dict):
        raise BadRequest("request body must be a JSON object")
    return data


def wants_wait(request: web.Request) -> bool:
    """`?wait=` (default true): answer once the operation is done, or at once with 202."""
    return request.query.get("wait", "true").lower() not in ("0", "false", "no")
