"""The agent's gatekeeper `/v1/*`: route by `model`, load or wake on demand, count in-flight, relay bytes.

A request for a model that is not awake waits (bounded: `max_queue` waiters per model, each at most
`load_timeout`) while one shared load or wake runs, and that load waits for busy models in its way
to finish their requests before evicting them (Supervisor._make_room). The response is relayed as
it arrives, chunk by chunk, never parsed: SSE streams reach the client unbuffered.

Before any byte has reached the client, a failed send is tried again: once on a fresh connection
when it failed on a pooled one the engine had closed (engines close idle connections after 5 s;
the pool keeps them 4 s, but the close can cross a request on the wire), and once after a crash:
a refused or reset connection to an engine whose process is gone holds the request until the
supervisor has restarted it (within load_timeout), as a request waits for a load.
"""

from __future__ import annotations

import asyncio
import logging
import time

from aiohttp import web

from mvllm.agent.errors import AgentError, BadRequest, Busy, Draining, NoRoom
from mvllm.agent.metrics import AgentMetrics
from mvllm.agent.process import EngineProcess
from mvllm.agent.supervisor import Supervisor
from mvllm.common.downstream import ClientSink
from mvllm.common.errors import error_response
from mvllm.common.http import HOP_BY_HOP, BodyError, copy_headers, is_multipart, json_object, multipart_field
from mvllm.common.state import FAILED
from mvllm.common.upstream import Timeouts, Upstream, UpstreamClosedError, UpstreamConnectError, UpstreamError

# Besides the hop-by-hop set, what aiohttp recomputes itself. Authorization is the agent's token:
# engines listen on loopback without a key of their own.
_DROP_REQUEST = HOP_BY_HOP | {"host", "content-length", "authorization"}
_DROP_RESPONSE = HOP_BY_HOP | {"content-length", "server", "date"}
_NOT_JSON = "request body is not valid JSON"
_NOT_AN_OBJECT = "request body must be a JSON object"
_UPSTREAM_TIMEOUT = Timeouts(connect=10)
# Idle pooled connections to engines are dropped before the engine closes them (uvicorn, and so
# vLLM, closes them after 5 s; the sim as well, --sim-keepalive-s).
ENGINE_KEEPALIVE_S = 4.0
# A connection refused or reset by an engine still alive is no crash: how long to look for its exit.
_EXIT_GRACE_S = 0.5
# Once its process is seen gone, how long the supervision tick (every 0.25 s) may take to notice.
_NOTICE_S = 5.0
# Failures of the connection itself, before the engine answered (timeouts are not among them).
_CONNECTION_FAILURES = (UpstreamConnectError, UpstreamClosedError)

log = logging.getLogger("mvllm.agent")


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
    def __init__(self, sup: Supervisor, upstream: Upstream, metrics: AgentMetrics, load_timeout: float, max_queue: int) -> None:
        self.sup = sup
        self.upstream = upstream  # the relay's client to the engines (common/upstream.py)
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
            "root": inst.spec.model if lora is None else inst.lora_path(lora),
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
            raise Busy.waiting_on_load(
                f"model {inst.name} is still {inst.state} after {self.load_timeout:g} s; try again", inst.predicted_wait_s()
            ) from None

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
            return await self._send(request, inst, lora, body)
        finally:
            inst.end()

    async def _send(self, request: web.Request, inst: EngineProcess, lora: str | None, body: bytes) -> web.StreamResponse:
        """Relay to the engine, sent again before any byte reached the client: once after a stale
        pooled connection, once after a crash and restart (see the module docstring)."""
        deadline = time.monotonic() + self.load_timeout
        stale_retried = restarted = False
        while True:
            handle, restarts = inst.handle, inst.history.restarts
            sent = await self._forward(request, inst, body)
            if isinstance(sent, web.StreamResponse):
                return sent
            exc, reused = sent
            if reused and not stale_retried and isinstance(exc, _CONNECTION_FAILURES):
                stale_retried = True
                self.metrics.relay_retries.labels(inst.name, "stale_connection").inc()
                log.info("%s: a pooled connection to the engine failed (%r); sending again on a new one", inst.name, exc)
                continue
            if not restarted and isinstance(exc, _CONNECTION_FAILURES) and await self._crashed(inst, handle, restarts):
                restarted = True
                log.warning("%s: the engine's connection failed (%r) and its process is gone: holding the request "
                            "until it has restarted", inst.name, exc)  # fmt: skip
                try:
                    await asyncio.wait_for(self.sup.ensure_ready(inst, lora), max(0.1, deadline - time.monotonic()))
                except AgentError as err:
                    log.warning("%s: %d: the engine did not come back after a crash: %s", inst.name, err.status, err.message)
                    return error_response(err.status, err.message, code=err.code, headers=_retry_after(err))
                except asyncio.TimeoutError:
                    err = Busy.waiting_on_load(
                        f"the engine of {inst.name} crashed and is not back after {self.load_timeout:g} s; try again",
                        inst.predicted_wait_s(),
                    )
                    log.warning("%s: 503: %s", inst.name, err.message)
                    return error_response(err.status, err.message, code=err.code, headers=_retry_after(err))
                self.metrics.relay_retries.labels(inst.name, "restart").inc()
                continue
            log.warning("%s: 502: the engine did not answer %s %s: %r", inst.name, request.method, request.rel_url.path, exc)
            self.metrics.requests.labels(inst.name, "502").inc()
            return error_response(502, f"engine of {inst.name} did not answer: {exc!r}", type="bad_gateway")

    async def _crashed(self, inst: EngineProcess, handle: object, restarts: int) -> bool:
        """After a refused or reset connection: whether the engine's process exited unasked and the
        supervisor has seen it (a restart under way, or the model failed), rather than an engine
        alive that refused, or one stopped on purpose (unload, eviction)."""
        deadline = time.monotonic() + _EXIT_GRACE_S
        exited = False
        while time.monotonic() < deadline:
            if inst.history.restarts != restarts or inst.state == FAILED:
                return True
            if inst.handle is not handle or inst.expect_exit:
                return False  # stopped by us: its request was cut by that stop, not by a crash
            if not exited and inst.handle is not None and not inst.handle.alive:
                exited = True  # the supervision tick restarts it: wait for it to notice
                deadline = time.monotonic() + _NOTICE_S
            await asyncio.sleep(0.05)
        return False

    async def _forward(
        self, request: web.Request, inst: EngineProcess, body: bytes
    ) -> web.StreamResponse | tuple[BaseException, bool]:
        """One send to the engine: the response relayed (whole, or cut after its first byte), or the
        failure and whether it was on a pooled connection, when nothing reached the client."""
        headers = copy_headers(request.headers, _DROP_REQUEST)
        try:
            upstream = await self.upstream.request(
                inst.url, request.method, str(request.rel_url), headers.items(), body, _UPSTREAM_TIMEOUT
            )
        except UpstreamError as exc:
            return exc, exc.reused
        try:
            resp = web.StreamResponse(status=upstream.status, reason=upstream.reason)
            resp.headers.extend(copy_headers(upstream.headers, _DROP_RESPONSE))
            if upstream.content_length is not None:
                resp.content_length = upstream.content_length
            resp.headers["x-mvllm-instance"] = inst.name
            await resp.prepare(request)  # the head goes out with the first bytes: one write
            try:
                first = await upstream.readany()
                if upstream.at_eof():
                    last = first
                else:
                    await resp.write(first)
                    # The rest goes from the engine's socket read straight to the client's socket.
                    sink = ClientSink(request, resp)
                    last = await upstream.pump(sink.write, sink.drain)
            except UpstreamError:
                # Cut after the first byte (the engine died): the client sees the stream end where
                # the engine's did, as it would from vLLM itself.
                self.metrics.requests.labels(inst.name, "cut").inc()
                return resp
            await resp.write_eof(last)
            inst.touch()
            self.metrics.requests.labels(inst.name, str(upstream.status)).inc()
            return resp
        except ConnectionError:
            # The client went away: closing the engine's connection (below) makes it abort.
            self.metrics.requests.labels(inst.name, "cut").inc()
            return resp
        finally:
            upstream.release()


def _retry_after(err: AgentError) -> dict[str, str] | None:
    return {"Retry-After": str(int(err.retry_after))} if err.retry_after else None
