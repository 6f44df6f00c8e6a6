"""The agent's gatekeeper `/v1/*`: route by `model`, load or wake on demand, count in-flight, relay bytes.

A request for a model that is not awake waits (bounded: `max_queue` waiters per model, each at most
`load_timeout`) while one shared load or wake runs, and that load waits for busy models in its way
to finish their requests before evicting them (Supervisor._make_room). The response is relayed as
it arrives, chunk by chunk, never parsed: SSE streams reach the client unbuffered.
"""

from __future__ import annotations

import asyncio
import time

import aiohttp
from aiohttp import web

from mvllm.agent.errors import AgentError, BadRequest, Busy, Draining, NoRoom
from mvllm.agent.metrics import AgentMetrics
from mvllm.agent.process import EngineProcess
from mvllm.agent.supervisor import Supervisor
from mvllm.common.errors import error_response
from mvllm.common.http import HOP_BY_HOP, BodyError, copy_headers, is_multipart, json_object, multipart_field

# Besides the hop-by-hop set, what aiohttp recomputes itself. Authorization is the agent's token:
# engines listen on loopback without a key of their own.
_DROP_REQUEST = HOP_BY_HOP | {"host", "content-length", "authorization"}
_DROP_RESPONSE = HOP_BY_HOP | {"content-length", "server", "date"}
_NOT_JSON = "request body is not valid JSON"
_NOT_AN_OBJECT = "request body must be a JSON object"
_UPSTREAM_TIMEOUT = aiohttp.ClientTimeout(total=None, sock_connect=10, sock_read=None)


def body_model(body: bytes, content_type: str) -> str | None:
    """The `model` a request names: a JSON body's field, or a multipart form field (audio uploads)."""
    if not body:
        return None
    if is_multipart(content_type):
        return multipart_field(body, content_type, "model")
    try:
        data = json_object(body)
    except BodyError as exc:
        # The agent's wording since 0.1, which its clients may match on.
        raise BadRequest(_NOT_AN_OBJECT if exc.message.endswith("JSON object") else _NOT_JSON) from None
    model = data.get("model")
    return model if isinstance(model, str) else None


class Gatekeeper:
    def __init__(
        self, sup: Supervisor, session: aiohttp.ClientSession, metrics: AgentMetrics, load_timeout: float, max_queue: int
    ) -> None:
        self.sup = sup
        self.session = session
        self.metrics = metrics
        self.load_timeout = load_timeout
        self.max_queue = max_queue

    # ------------------------------------------------------------ /v1/models

    def _model_card(self, name: str, inst: EngineProcess, lora: str | None) -> dict:
        return {
            "id": name,
            "object": "model",
            "created": int(inst.history.started_at or self.sup.started_at),
            "owned_by": "mvllm-agent",
            "root": inst.spec.model if lora is None else (inst.spec.lora_adapters.get(lora) or inst.extra_loras.get(lora)),
            "parent": None if lora is None else inst.spec.served_model_names[0],
            "max_model_len": inst.spec.max_model_len if lora is None and isinstance(inst.spec.max_model_len, int) else None,
            "mvllm_instance": inst.name,
            "mvllm_state": inst.state,
        }

    async def list_models(self, request: web.Request) -> web.Response:
        data = [self._model_card(n, inst, lora) for n, inst, lora in self.sup.routable()]
        return web.json_response({"object": "list", "data": data})

    async def get_model(self, request: web.Request) -> web.Response:
        model = request.match_info["model"]
        found = self.sup.resolve(model)
        if found is None:
            return error_response(404, f"The model `{model}` does not exist.", code="model_not_found")
        return web.json_response(self._model_card(model, found[0], found[1]))

    # --------------------------------------------------------------- relay

    async def _acquire(self, inst: EngineProcess, lora: str | None) -> None:
        """Wait until `inst` can take the request, then count it in flight (no yield in between)."""
        if inst.can_serve_now(lora):
            inst.begin()
            return
        if inst.draining:
            self.metrics.rejected.labels(inst.name, "draining").inc()
            raise Draining(
                f"model {inst.name} is draining on this agent to make room for another model "
                "(max_switch_wait passed); try another node, or again shortly"
            )
        if inst.queued >= self.max_queue:
            self.metrics.rejected.labels(inst.name, "queue_full").inc()
            raise Busy(f"model {inst.name}: {inst.queued} requests already wait for it to load; try again")
        deadline = time.monotonic() + self.load_timeout
        try:
            with inst.queue_slot():
                while True:
                    left = deadline - time.monotonic()
                    if left <= 0:
                        raise asyncio.TimeoutError
                    await asyncio.wait_for(self.sup.ensure_ready(inst, lora), left)
                    if inst.can_serve_now(lora):
                        inst.begin()
                        return
        except asyncio.TimeoutError:
            if inst.room_wait:  # its load still waits for busy models to make room: say so
                self.metrics.rejected.labels(inst.name, "no_room").inc()
                raise NoRoom(
                    f"not enough GPU memory for {inst.name} yet: {', '.join(inst.room_wait)} still answering "
                    f"requests after {self.load_timeout:g} s (a busy model is never evicted); try again"
                ) from None
            self.metrics.rejected.labels(inst.name, "load_timeout").inc()
            raise Busy(f"model {inst.name} is still {inst.state} after {self.load_timeout:g} s; try again") from None

    async def relay(self, request: web.Request) -> web.StreamResponse:
        body = await request.read()
        try:
            model = body_model(body, request.headers.get("Content-Type", ""))
        except AgentError as exc:
            return error_response(400, exc.message)
        if model is None:
            return error_response(400, "the request must name a `model`", code="missing_model")
        found = self.sup.resolve(model)
        if found is None:
            self.metrics.rejected.labels("", "unknown_model").inc()
            return error_response(404, f"The model `{model}` does not exist.", code="model_not_found")
        inst, lora = found
        try:
            await self._acquire(inst, lora)
        except AgentError as exc:
            headers = {"Retry-After": str(int(exc.retry_after))} if exc.retry_after else None
            return error_response(exc.status, exc.message, code=exc.code, headers=headers)
        try:
            return await self._forward(request, inst, body)
        finally:
            inst.end()

    async def _forward(self, request: web.Request, inst: EngineProcess, body: bytes) -> web.StreamResponse:
        headers = copy_headers(request.headers, _DROP_REQUEST)
        resp: web.StreamResponse | None = None
        try:
            async with self.session.request(
                request.method,
                f"{inst.url}{request.rel_url}",
                data=body or None,
                headers=headers,
                timeout=_UPSTREAM_TIMEOUT,
                allow_redirects=False,
            ) as upstream:
                resp = web.StreamResponse(status=upstream.status, reason=upstream.reason)
                resp.headers.extend(copy_headers(upstream.headers, _DROP_RESPONSE))
                if upstream.content_length is not None:
                    resp.content_length = upstream.content_length
                resp.headers["x-mvllm-instance"] = inst.name
                await resp.prepare(request)
                async for chunk in upstream.content.iter_any():
                    await resp.write(chunk)
                    inst.touch()
                await resp.write_eof()
                self.metrics.requests.labels(inst.name, str(upstream.status)).inc()
                return resp
        except (aiohttp.ClientError, asyncio.TimeoutError, ConnectionResetError) as exc:
            if resp is None or not resp.prepared:
                self.metrics.requests.labels(inst.name, "502").inc()
                return error_response(502, f"engine of {inst.name} did not answer: {exc!r}", type="bad_gateway")
            # Cut after the first byte (engine died or client left): the client sees a cut stream,
            # as it would from vLLM itself; leaving the `async with` closes the upstream request.
            self.metrics.requests.labels(inst.name, "cut").inc()
            return resp
