"""`GET /models/NAME/proxy/{path}`: one engine's own answer to a path that carries no model
(/health, /v1/models, /metrics ...: mvllm.common.engine_paths), for the router's `/proxy/{instance}/{path}`.

It never loads, wakes or touches the model (a monitor must not keep it awake); control paths stay
unreachable: the allow-list is checked here too, whatever the router sent.
"""

from __future__ import annotations

import asyncio

import aiohttp
from aiohttp import web

from mvllm.agent.appkeys import SUPERVISOR
from mvllm.agent.http_helpers import api
from mvllm.common.engine_paths import is_info_path, refusal
from mvllm.common.errors import error_response
from mvllm.common.state import READY, SLEEPING

_TIMEOUT = aiohttp.ClientTimeout(total=10)
_KEEP_HEADERS = ("Content-Type",)
# The agent's session does not decompress: ask for the body as is.
_IDENTITY = {"Accept-Encoding": "identity"}

routes = web.RouteTableDef()


@routes.get("/models/{name}/proxy/{path:.*}")
@api
async def engine_info(request: web.Request) -> web.Response:
    sup = request.app[SUPERVISOR]
    inst = sup.get(request.match_info["name"])
    path = request.match_info["path"]
    if not is_info_path(path):
        return error_response(404, refusal(path), code="path_not_passed")
    if inst.state not in (READY, SLEEPING) or inst.url is None:
        return error_response(
            503, f"model {inst.name} is {inst.state}: its engine is not running", code="engine_not_running"
        )
    try:
        async with sup.session.get(
            f"{inst.url}/{path}", params=request.query, headers=_IDENTITY, timeout=_TIMEOUT
        ) as upstream:
            body = await upstream.read()
            headers = {h: upstream.headers[h] for h in _KEEP_HEADERS if h in upstream.headers}
            headers["x-mvllm-instance"] = inst.name
            return web.Response(status=upstream.status, body=body, headers=headers)
    except (aiohttp.ClientError, asyncio.TimeoutError) as exc:
        return error_response(502, f"engine of {inst.name} did not answer: {exc!r}", type="bad_gateway")
