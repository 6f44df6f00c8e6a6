"""The agent's routes that change what it serves at run time: ad-hoc instances (`/instances`) and
catalog re-assignment (`POST /models/NAME/assign`), with the ttl expiry loop in a cleanup_ctx.

Wired by `mvllm.agent.app.create_app` (`routes`, `runtime_ctx`); the supervisor exists once the
app's own context ran.
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import AsyncIterator

from aiohttp import web

from mvllm.agent.adhoc import AdhocManager, ParamRejected
from mvllm.agent.appkeys import ADHOC, ASSIGNER, CONFIG, SUPERVISOR
from mvllm.agent.assign import Assigner
from mvllm.agent.http_helpers import api, json_body, wants_wait
from mvllm.common.errors import error_response
from mvllm.common.tasks import background_task

log = logging.getLogger("mvllm.agent")

_EXPIRY_TICK_S = 0.25

routes = web.RouteTableDef()


@routes.post("/instances")
@api
async def create_instance(request: web.Request) -> web.Response:
    manager = request.app[ADHOC]
    try:
        inst, ready = await manager.create(await json_body(request), wait=wants_wait(request))
    except ParamRejected as exc:
        # The message names the flag; the code tells this 400 from the others.
        return error_response(400, exc.message, code="invalid_parameter")
    return web.json_response(manager.describe(inst), status=201 if ready else 202)


@routes.get("/instances")
@api
async def list_instances(request: web.Request) -> web.Response:
    manager = request.app[ADHOC]
    acfg = request.app[CONFIG].adhoc
    return web.json_response(
        {
            "instances": [manager.describe(i) for i in manager.instances()],
            "max_instances": acfg.max_instances,
            "default_ttl_s": acfg.default_ttl,
            "allowed_params": sorted({*acfg.allowed_params, *(["trust_remote_code"] if acfg.allow_trust_remote_code else [])}),
            "base_params": acfg.base_params,
        }
    )


@routes.get("/instances/{name}")
@api
async def get_instance(request: web.Request) -> web.Response:
    manager = request.app[ADHOC]
    return web.json_response(manager.describe(manager.get(request.match_info["name"])))


@routes.delete("/instances/{name}")
@api
async def delete_instance(request: web.Request) -> web.Response:
    manager = request.app[ADHOC]
    inst = manager.get(request.match_info["name"])
    doc = manager.describe(inst)
    await manager.remove(inst.name, reason="api")
    doc.update(state=inst.state, pid=None, port=None, url=None, removed=inst.name not in request.app[SUPERVISOR].instances)
    return web.json_response(doc)


@routes.post("/models/{name}/assign")
@api
async def assign_model(request: web.Request) -> web.Response:
    result = await request.app[ASSIGNER].assign(request.match_info["name"], await json_body(request))
    return web.json_response(result)


async def runtime_ctx(app: web.Application) -> AsyncIterator[None]:
    sup = app[SUPERVISOR]
    manager = AdhocManager(sup)
    app[ADHOC] = manager
    app[ASSIGNER] = Assigner(sup)

    async def expiry_loop() -> None:
        while True:
            try:
                await manager.tick()
            except asyncio.CancelledError:
                raise
            except Exception:
                log.exception("ad-hoc expiry check failed")
            await asyncio.sleep(_EXPIRY_TICK_S)

    try:
        async with background_task(expiry_loop(), name="mvllm-adhoc-expiry"):
            yield
    finally:
        await manager.close()  # the supervisor's own shutdown then stops every engine left
