"""Forwarding of one client request: body limit, routing by the body's `model`, retries on the
next-best node, and relay of the answer chunk by chunk as it arrives.

Hot path: the body is read once and parsed once (common.http.json_object, only for `model`), the
request goes out on a pooled connection of the relay's own client (common.upstream), and a stream's
chunks go from the node's socket read straight to the client's socket (common.downstream) with no
parsing, logging, metrics or task wake-up per chunk. Nothing reaches the client until the node has answered properly (headers plus the
first chunk of a stream, or the whole of a sized body), so up to that point a failure is retried
on another node; after it, a broken chat or completion stream is resumed on another node
(mvllm.router.resume_relay) where it can be, and any other ends with an SSE error event.
"""

from __future__ import annotations

import asyncio
import itertools
import logging
import math
import os
import time
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

import aiohttp
from aiohttp import web
from multidict import CIMultiDict

from mvllm.common.downstream import ClientSink
from mvllm.common.errors import error_response, sse_error_event
from mvllm.common.http import HOP_BY_HOP, BodyError, copy_headers, is_multipart, json_object, multipart_field
from mvllm.common.upstream import Response, Timeouts, UpstreamError
from mvllm.router.bounds import check_choices
from mvllm.router.breaker import Transition
from mvllm.router.fleet.agent_client import describe
from mvllm.router.fleet.agents import AUTH_STATUSES, load_wait_s, no_room_answer, unread_catalogs
from mvllm.router.fleet.targets import Health, Target
from mvllm.router.policy import CacheAware
from mvllm.router.prefix_index import prompt_text
from mvllm.router.request import ResponseComplete, ResponseHook
from mvllm.router.resume import EndedEarly, Transcript, plan_resume
from mvllm.router.resume_relay import RESUME_KEY, NodeBook, ResumeContext, StreamResumer
from mvllm.router.retry import (
    RETRY_STATUSES,
    AttemptFailure,
    FailureKind,
    FailureLedger,
    backoff_delay,
    classify_exception,
)
from mvllm.router.routing import ROUTE_HEADER, ROUTE_KEY, next_route
from mvllm.router.state import RouterState

log = logging.getLogger("mvllm.router.proxy")

# The request id, set by the app's first middleware for every request (typed key on aiohttp >= 3.14).
REQUEST_ID_KEY: Any = web.RequestKey("mvllm_request_id", str) if hasattr(web, "RequestKey") else "mvllm_request_id"
NODE_HEADER = "x-mvllm-node"
REQUEST_ID_HEADER = "x-request-id"

# Host and length are set for the upstream request by the client library; Expect is answered here.
_DROP_REQUEST = HOP_BY_HOP | {"host", "content-length", "expect", REQUEST_ID_HEADER}
# The headers a client's API key travels in (keys.extract_token): dropped when the router checks keys.
_CLIENT_CREDENTIALS = frozenset({"authorization", "x-api-key"})
_DROP_REQUEST_AND_CREDENTIALS = _DROP_REQUEST | _CLIENT_CREDENTIALS
# The body is relayed byte for byte (no decompression), so content-encoding stays valid; the
# length is recomputed by aiohttp; date/server are the router's own.
_DROP_RESPONSE = HOP_BY_HOP | {"content-length", "date", "server", NODE_HEADER, REQUEST_ID_HEADER, ROUTE_HEADER}

# Paths served by engines that clients may use through the router: the OpenAI API and the
# un-versioned aliases vLLM accepts. Engine control (/sleep, /wake_up, /collective_rpc, /metrics)
# must never be reachable from clients, and runtime LoRA loading is the agents' job.
PROXIED_ALIASES = frozenset(
    {"/rerank", "/score", "/tokenize", "/detokenize", "/pooling", "/classify", "/invocations", "/version", "/ping"}
)
# Un-versioned spellings of the OpenAI routes that older proxies accepted (seed 003's "compatible
# paths"): taken here and sent upstream in their /v1 form, the only one vLLM serves.
VERSIONED_ALIASES = {
    "/chat/completions": "/v1/chat/completions",
    "/completions": "/v1/completions",
    "/embeddings": "/v1/embeddings",
}
_BLOCKED = frozenset({"/v1/load_lora_adapter", "/v1/unload_lora_adapter"})
# Non-streamed answers up to this size are read whole before the client sees a byte, which makes a
# node that dies while sending one retryable. Bigger or unsized answers are streamed.
_BUFFER_LIMIT = 8 * 1024 * 1024
# A buffered answer up to this size fits the socket buffers and is handed to aiohttp to write; a
# bigger one is written under client_timeout (Proxy._send_body), since a client may never read it.
_UNWATCHED_WRITE = 256 * 1024
_UPSTREAM_ERRORS = (UpstreamError, asyncio.TimeoutError)


def is_proxied_path(path: str) -> bool:
    if path.startswith(("/v1/", "/v2/")):
        return path not in _BLOCKED
    return path in PROXIED_ALIASES or path in VERSIONED_ALIASES


class _RequestIds:
    """Request ids as 32 hex digits, like uuid4().hex, but without a getrandom() system call and
    a UUID object per request: a random 64-bit prefix per process and a 64-bit counter."""

    def __init__(self) -> None:
        self.reseed()
        os.register_at_fork(after_in_child=self.reseed)  # a forked worker must not repeat our ids

    def reseed(self) -> None:
        self.prefix = os.urandom(8).hex()
        self.counter = itertools.count(int.from_bytes(os.urandom(4), "big"))

    def next(self) -> str:
        return f"{self.prefix}{next(self.counter):016x}"


new_request_id = _RequestIds().next


def forward_headers(src: Mapping[str, str], request_id: str, *, strip_auth: bool = False) -> CIMultiDict[str]:
    """The client's headers minus hop-by-hop ones (and those the Connection header names); with
    `strip_auth`, minus the client's credentials too (the router's API key is no node's business)."""
    out = copy_headers(src, _DROP_REQUEST_AND_CREDENTIALS if strip_auth else _DROP_REQUEST)
    out["X-Request-Id"] = request_id
    return out


def upstream_target(request: web.Request) -> str:
    """The path and query a request goes upstream with (un-versioned aliases in their /v1 form)."""
    versioned = VERSIONED_ALIASES.get(request.path)
    if versioned is not None:
        return versioned + (f"?{request.query_string}" if request.query_string else "")
    return str(request.rel_url)


def response_headers(src: Mapping[str, str], node: str, request_id: str, route: str = "") -> CIMultiDict[str]:
    out = copy_headers(src, _DROP_RESPONSE)
    out[NODE_HEADER] = node
    if route:
        out[ROUTE_HEADER] = route  # why this node (mvllm.router.routing)
    out[REQUEST_ID_HEADER] = request_id
    return out


class BadRequest(Exception):
    def __init__(self, message: str, code: str = "invalid_request") -> None:
        super().__init__(message)
        self.message = message
        self.code = code


def extract_model(body: bytes, content_type: str) -> str:
    """The `model` of a request body (JSON, or a multipart form as in audio transcriptions)."""
    return parse_request(body, content_type)[0]


def parse_request(body: bytes, content_type: str) -> tuple[str, Any]:
    """The `model` of a request body and the parsed JSON document (None for a form). Only `model`
    is checked: the engine judges the rest of the body and answers its own 400."""
    if is_multipart(content_type):
        model = multipart_field(body, content_type, "model")
        if not model:
            raise BadRequest("the form has no 'model' field", "missing_model")
        return model, None
    try:
        doc = json_object(body)
    except BodyError as exc:
        raise BadRequest(exc.message, exc.code) from None
    model = doc.get("model")
    if model is None:
        raise BadRequest("the request has no 'model'; the router needs it to pick a node", "missing_model")
    if not isinstance(model, str) or not model:
        raise BadRequest("'model' must be a non-empty string", "invalid_model")
    return model, doc


class _SendWatch:
    """Drops a streaming client that accepts nothing for `timeout` seconds (between one and two
    checks) while the relay waits to write to it. The hot loop only flips `writing` and counts
    `progress`; the check runs on a timer every `timeout` seconds."""

    __slots__ = ("handle", "progress", "request", "request_id", "seen", "timeout", "writing")

    def __init__(self, request: web.Request, timeout: float, request_id: str) -> None:
        self.request = request
        self.request_id = request_id
        self.timeout = timeout
        self.writing = False
        self.progress = 0
        self.seen = -1
        self.handle = asyncio.get_running_loop().call_later(timeout, self._check)

    def _check(self) -> None:
        if self.writing and self.progress == self.seen:
            log.warning("request %s: client read nothing for %g s; dropping it and the node's request",
                        self.request_id, self.timeout)
            transport = self.request.transport
            if transport is not None:
                # abort, not close: close would wait to flush to a client that does not read. The
                # lost connection cancels the handler, which closes the node's request.
                transport.abort()
            return
        self.seen = self.progress
        self.handle = asyncio.get_running_loop().call_later(self.timeout, self._check)

    def cancel(self) -> None:
        self.handle.cancel()


@dataclass(slots=True)
class UpstreamAnswer:
    """A node's failed answer, kept so that it can be returned as is if every node fails."""

    status: int
    headers: Mapping[str, str]
    body: bytes
    node: Target


@dataclass(slots=True)
class Failed:
    failure: AttemptFailure[Target]
    detail: str
    answer: UpstreamAnswer | None = None


def _ignore(done: ResponseComplete) -> None:
    pass


class Proxy:
    def __init__(self, state: RouterState, on_complete: ResponseHook = _ignore) -> None:
        self.state = state
        # Told of every answer relayed to its end (the access gate settles tokens from its tail).
        self.on_complete = on_complete
        self._timeout_cache: dict[aiohttp.ClientTimeout, Timeouts] = {}
        self.resumer = StreamResumer(state, NodeBook(self._node_ok, self._node_failed, self._transition, self._node_timeouts))

    # -- entry ---------------------------------------------------------------------------------

    async def handle(self, request: web.Request) -> web.StreamResponse:
        t0 = time.perf_counter()
        state = self.state
        request_id: str = request[REQUEST_ID_KEY]
        if not is_proxied_path(request.path):
            return error_response(404, f"{request.method} {request.path} is not served by this router", code="not_found")
        body = b""
        if request.body_exists:
            limit = state.config.max_body_bytes
            length = request.content_length
            if length is not None and length > limit:
                return self._too_large(limit)
            try:
                if length is not None and request.content.is_eof():
                    # The whole body came in with the headers (the usual case): no timer needed.
                    read = await request.content.readexactly(length)
                else:
                    # A client that trickles its body (or never sends it) must not hold a handler forever.
                    async with asyncio.timeout(state.config.client_timeout):
                        read = await self._read_body(request, limit)
            except asyncio.IncompleteReadError:
                return error_response(400, "the request body ended before its Content-Length", code="incomplete_body")
            except TimeoutError:
                self._count("", "-", 408)
                return error_response(
                    408, f"the request body did not arrive within {state.config.client_timeout:g} s", code="body_timeout"
                )
            if read is None:
                return self._too_large(limit)
            body = read
        model = ""
        text: str | None = None
        if body:
            try:
                model, doc = parse_request(body, request.headers.get("Content-Type", ""))
            except BadRequest as exc:
                self._count("", "-", 400)
                return error_response(400, exc.message, code=exc.code)
            over = check_choices(doc, state.config.max_n) if doc is not None else None
            if over is not None:
                self._count("", "-", 400)
                return error_response(400, over.message, code="integer_above_max_value", param=over.param)
            nodes = state.registry.nodes_for(model)
            if not nodes:
                # The key's model allow-list first (403, before saying whether the model exists);
                # no limit is charged for a model nothing serves.
                denied = state.gate.model_denied(request, model)
                if denied is not None:
                    self._count("", "-", denied.status)
                    return denied
                self._count("", "-", 404)
                hint = unread_catalogs(state.registry.agents())  # an agent we could not read may have it
                return error_response(404, f"The model `{model}` does not exist.{hint}", code="model_not_found")
            # The key's model allow-list (403) and limits (429).
            denied = await state.gate.admit(request, model, doc)
            if denied is not None:
                self._count("", "-", denied.status)  # model unchecked yet: no label of it
                return denied
            if doc is not None and isinstance(state.policy, CacheAware):
                text = prompt_text(doc, request.path)  # from the one parse, for prefix affinity
            if state.config.resume_streams:
                plan = plan_resume(request.path, doc)
                if plan is not None:
                    request[RESUME_KEY] = ResumeContext(plan, nodes, model, text)
        else:
            denied = await state.gate.admit(request, None, None)
            if denied is not None:
                self._count("", "-", denied.status)
                return denied
            nodes = state.registry.nodes()
            if any(n.via_agent for n in nodes):
                nodes = tuple(n for n in nodes if not n.via_agent)  # agents route by the body's model only
            if not nodes:
                return error_response(503, "no node is configured", headers={"Retry-After": "5"})
        return await self._forward(request, body, model, nodes, request_id, t0, text)

    @staticmethod
    async def _read_body(request: web.Request, limit: int) -> bytes | None:
        """The whole body, or None once it exceeds `limit` (a chunked body has no length to check first)."""
        if request.content_length is not None:
            return await request.content.readexactly(request.content_length)
        buf = bytearray()
        while True:
            chunk = await request.content.readany()
            if not chunk:
                return bytes(buf)
            buf += chunk
            if len(buf) > limit:
                return None

    def _too_large(self, limit: int) -> web.Response:
        self._count("", "-", 413)
        return error_response(413, f"the request body is larger than the router's limit of {limit} bytes", code="body_too_large")

    # -- retries -------------------------------------------------------------------------------

    async def _forward(
        self,
        request: web.Request,
        body: bytes,
        model: str,
        nodes: tuple[Target, ...],
        request_id: str,
        t0: float,
        text: str | None = None,
    ) -> web.StreamResponse:
        state = self.state
        retry_cfg = state.config.retry
        headers = forward_headers(request.headers, request_id, strip_auth=not state.gate.open)
        target = upstream_target(request)
        ledger: FailureLedger[Target] = FailureLedger()
        tried: list[Target] = []
        last: Failed | None = None
        answer: UpstreamAnswer | None = None
        answers: list[UpstreamAnswer] = []  # every failed answer, to tell "no room anywhere"
        succeeded = False
        try:
            while True:
                picked = next_route(state.policy, state.prefix_index, nodes, tried, model, text, time.monotonic())
                if picked is None:
                    break
                node, route = picked
                request[ROUTE_KEY] = route.header()
                state.metrics.count_route(route.policy, route.reason)
                tried.append(node)
                sent = time.monotonic()
                result = await self._attempt(request, node, body, headers, target, model, request_id, t0, sent)
                if not isinstance(result, Failed):
                    succeeded = True
                    return result
                last = result
                if result.answer is not None:
                    answer = result.answer
                    answers.append(answer)
                failure = result.failure
                reason = failure.kind.value if failure.status is None else str(failure.status)
                # An agent's own 503 says "no room", "still loading" or "queue full": load, not a fault.
                # Everything else counts at once, 500s too, so that a node answering 500s is
                # ejected on its second failure however many requests are in flight.
                if ledger.record(failure) and not (node.via_agent and failure.status == 503):
                    self._node_failed(node, reason, sent)
                else:
                    node.breaker.on_abandon()  # no fault (429): free a probe slot
                if len(tried) > retry_cfg.max_retries or not ledger.may_retry():
                    break
                log.info("request %s: node %s failed (%s); retrying on another node", request_id, node.name, result.detail)
                state.metrics.retries.labels(model, reason).inc()
                delay = backoff_delay(len(tried), retry_cfg.backoff_base, retry_cfg.backoff_max, state.rng)
                if delay > 0:
                    await asyncio.sleep(delay)
        except asyncio.CancelledError:
            self._count(model, tried[-1].name if tried else "-", 499)  # the client went away first
            raise
        finally:
            # A 500 that followed the request to every node it tried was the request's doing.
            for n in ledger.settle(succeeded):
                self._transition(n, n.breaker.forgive())
        if answer is not None and len(answers) == len(tried):
            full = no_room_answer(model, answers)  # every node tried was an agent with no room
            if full is not None:
                self._count(model, "-", 503)
                return full
        if answer is not None:
            # Every node failed and at least one answered: return its answer as is.
            self._count(model, answer.node.name, answer.status)
            return web.Response(
                status=answer.status,
                body=answer.body,
                headers=response_headers(answer.headers, answer.node.name, request_id, request.get(ROUTE_KEY, "")),
            )
        if last is not None:
            status = 504 if last.failure.kind is FailureKind.TIMEOUT else 502
            self._count(model, last.failure.node.name, status)
            names = ", ".join(n.name for n in tried)
            return error_response(status, f"no node could answer (tried {names}; last: {last.detail})", code="upstream_failed")
        return self._unavailable(model, nodes)

    def _unavailable(self, model: str, nodes: tuple[Target, ...]) -> web.Response:
        now = time.monotonic()
        cfg = self.state.config
        waits = []
        for n in nodes:
            if n.draining:
                continue
            wait = cfg.health.interval if n.health is Health.DOWN else n.breaker.retry_after(now)
            # An agent loading or waking the model: not before that load should be done.
            loading = load_wait_s(n, now)
            waits.append(max(wait, loading) if loading is not None else wait)
        retry_after = max(1, math.ceil(min(waits))) if waits else max(1, math.ceil(cfg.health.interval))
        self._count(model, "-", 503)
        what = f"model `{model}`" if model else "this request"
        return error_response(
            503, f"no healthy node can serve {what} right now", code="no_healthy_node", headers={"Retry-After": str(retry_after)}
        )

    # -- one attempt on one node -----------------------------------------------------------------

    async def _attempt(
        self,
        request: web.Request,
        node: Target,
        body: bytes,
        headers: CIMultiDict[str],
        target: str,
        model: str,
        request_id: str,
        t0: float,
        sent: float,
    ) -> web.StreamResponse | Failed:
        state = self.state
        upstream = state.upstream
        assert upstream is not None
        node.in_flight += 1
        self._transition(node, node.breaker.on_dispatch(sent))
        up: Response | None = None
        verdict = False  # did this attempt tell the breaker anything?
        try:
            try:
                up = await upstream.request(
                    node.url,
                    request.method,
                    target,
                    # A static server's --api-key; an agent's token, and time for a load.
                    node.upstream_headers(headers).items(),
                    body,
                    self._node_timeouts(node),
                )
            except _UPSTREAM_ERRORS as exc:
                kind = classify_exception(exc)
                verdict = True
                return Failed(AttemptFailure(node, FailureKind.CONNECT if kind is FailureKind.BROKEN else kind), describe(exc))
            status = up.status
            if node.via_agent and status in AUTH_STATUSES:
                # Our token, not the client's: never hand this 401 to the client as if it were theirs.
                verdict = True
                detail = f"agent {node.name} rejected the router's token (HTTP {status}); check its token in servers.toml"
                log.error("request %s: %s", request_id, detail)
                return Failed(AttemptFailure(node, FailureKind.STATUS, status), detail)
            if status in RETRY_STATUSES:
                try:
                    data = await up.read()
                except _UPSTREAM_ERRORS:
                    data = b""
                verdict = True
                return Failed(
                    AttemptFailure(node, FailureKind.STATUS, status),
                    f"HTTP {status}",
                    UpstreamAnswer(status, up.headers.copy(), data, node),
                )
            result = await self._relay(request, up, node, model, request_id, t0, sent)
            verdict = True
            return result
        finally:
            if up is not None:
                up.release()  # read to its end: pooled again; else closed, which aborts the node's request
            if not verdict:
                node.breaker.on_abandon()  # cancelled (client went away): free a half-open probe
            node.breaker.on_settled(sent)
            node.in_flight -= 1
            if node.retired:
                state.registry.release(node)

    def _node_timeouts(self, node: Target) -> Timeouts:
        """The relay client's timeouts for `node`, from the aiohttp-style ones config and nodes speak."""
        timeout = node.upstream_timeout(self.state.timeout)
        found = self._timeout_cache.get(timeout)
        if found is None:
            if len(self._timeout_cache) > 64:
                self._timeout_cache.clear()  # one per config and agent load_timeout: a reload makes new ones
            found = self._timeout_cache[timeout] = Timeouts(timeout.sock_connect, timeout.sock_read, timeout.total)
        return found

    async def _relay(
        self,
        request: web.Request,
        up: Response,
        node: Target,
        model: str,
        request_id: str,
        t0: float,
        sent: float,
    ) -> web.StreamResponse | Failed:
        metrics = self.state.metrics
        headers = response_headers(up.headers, node.name, request_id, request.get(ROUTE_KEY, ""))
        ctype = up.headers.get("Content-Type", "")
        length = up.content_length
        idle = self.state.config.timeouts.stream_idle
        if length is not None and length <= _BUFFER_LIMIT and not ctype.startswith("text/event-stream"):
            if not up.at_eof():
                up.set_read_timeout(idle)  # the answer has begun: the first-byte wait is over
            try:
                data = await up.read()
            except _UPSTREAM_ERRORS as exc:
                up.close()
                kind = classify_exception(exc)
                return Failed(AttemptFailure(node, kind if kind is FailureKind.TIMEOUT else FailureKind.CONNECT), describe(exc))
            self._node_ok(node, sent)
            elapsed = time.perf_counter() - t0
            metrics.observe_ttfb(model, elapsed)
            metrics.observe_latency(model, elapsed)
            self._count(model, node.name, up.status)
            self.on_complete(ResponseComplete(request, up.status, data))  # the engine's usage is at its end
            if len(data) <= _UNWATCHED_WRITE:
                return web.Response(status=up.status, body=data, headers=headers)
            return await self._send_body(request, up.status, headers, data, request_id)

        # A stream (or an unsized body): wait for its first chunk (up to the first-byte timeout,
        # an agent's load_timeout) before committing to the client.
        try:
            first = await up.readany()
        except _UPSTREAM_ERRORS as exc:
            up.close()
            kind = classify_exception(exc)
            return Failed(AttemptFailure(node, kind if kind is FailureKind.TIMEOUT else FailureKind.CONNECT), describe(exc))
        self._node_ok(node, sent)
        if not up.at_eof():
            # From here on each read waits at most stream_idle_timeout: a node that hangs
            # mid-stream is given up then, not after the first-byte wait.
            up.set_read_timeout(idle)
        resp = web.StreamResponse(status=up.status, headers=headers)
        status = up.status
        # A resumable stream keeps what it relays (references; parsed only if the node dies).
        resume: ResumeContext | None = (
            request.get(RESUME_KEY) if status == 200 and ctype.startswith("text/event-stream") else None
        )
        relayed = Transcript() if resume is not None and resume.plan.reason is None else None
        watch = _SendWatch(request, self.state.config.client_timeout, request_id)
        sink: ClientSink | None = None
        tail = b""
        try:
            await resp.prepare(request)  # aiohttp sends the headers with the first chunk: one write
            # The pieces between the first and the last go from the node's socket read straight
            # to the client's socket (ClientSink; the last ones are kept: the engine's usage is in
            # them). A client slower than the engine pauses the node's socket until it drains; the
            # watch drops one that takes nothing too long.
            sink = ClientSink(request, resp, relayed.add if relayed is not None else None, watch)
            sink.keep(first)
            last = first
            if not up.at_eof():
                watch.writing = True
                await resp.write(first)  # the head and the first chunk, in one write
                watch.writing = False
                watch.progress += 1
                metrics.observe_ttfb(model, time.perf_counter() - t0)
                try:
                    last = await up.pump(sink.write, sink.drain)
                except UpstreamError as exc:
                    up.close()
                    watch.writing = True  # the error event is a write too
                    resumed = await self._broken_stream(request, resp, node, ctype, exc, request_id, sent, resume, relayed, watch)
                    last = None
                    tail = resumed if resumed is not None else sink.tail()
                sink.keep(last or b"")
            else:
                metrics.observe_ttfb(model, time.perf_counter() - t0)
            if last is not None:
                watch.writing = True
                # Ended cleanly but mid-answer (no [DONE], no finish_reason): cut by a proxy in
                # between, as an agent whose engine died does. A backend that only omits [DONE]
                # after a finished answer is relayed as it is.
                if relayed is not None and not relayed.ended() and relayed.finish_reason is None:
                    if last:
                        await resp.write(last)
                    resumed = await self._broken_stream(
                        request, resp, node, ctype, EndedEarly(), request_id, sent, resume, relayed, watch
                    )
                    tail = resumed if resumed is not None else sink.tail()
                else:
                    # The node's last bytes and the end of ours go out together, in one write.
                    await resp.write_eof(last)
                    tail = sink.tail()
        except ConnectionError:
            # The client went away: closing the upstream connection makes the engine abort.
            up.close()
            status = 499
            if sink is not None:
                tail = sink.tail()
        finally:
            watch.cancel()
        self.on_complete(ResponseComplete(request, resp.status, tail))
        metrics.observe_latency(model, time.perf_counter() - t0)
        self._count(model, node.name, status)
        return resp

    async def _send_body(
        self, request: web.Request, status: int, headers: CIMultiDict[str], data: bytes, request_id: str
    ) -> web.StreamResponse:
        """Write a whole answer too big for the socket buffers, within client_timeout: a client
        that does not read it is dropped then, not held (with the answer in memory) forever."""
        resp = web.StreamResponse(status=status, headers=headers)
        resp.content_length = len(data)
        timeout = self.state.config.client_timeout
        try:
            async with asyncio.timeout(timeout):
                await resp.prepare(request)
                await resp.write_eof(data)
        except TimeoutError:
            log.warning("request %s: client read too little of its answer in %g s; dropping it", request_id, timeout)
            if request.transport is not None:
                request.transport.abort()  # abort, not close: close would wait to flush to it
        except ConnectionError:
            pass  # the client went away
        return resp

    async def _broken_stream(
        self,
        request: web.Request,
        resp: web.StreamResponse,
        node: Target,
        ctype: str,
        exc: BaseException,
        request_id: str,
        sent: float,
        resume: ResumeContext | None = None,
        relayed: Transcript | None = None,
        watch: _SendWatch | None = None,
    ) -> bytes | None:
        """End a stream cut after its first byte: resumed on another node where it can be (the
        tail written is returned), else with an SSE error event (None)."""
        detail = describe(exc)
        log.warning("request %s: node %s broke off mid-answer (%s)", request_id, node.name, detail)
        self.state.metrics.stream_errors.labels(node.name).inc()
        self._node_failed(node, FailureKind.BROKEN.value, sent)
        if resume is not None and watch is not None:
            headers = forward_headers(request.headers, request_id, strip_auth=not self.state.gate.open)
            tail = await self.resumer.resume(resp, resume, relayed, node, headers, upstream_target(request), request_id, watch)
            if tail is not None:
                return tail
            watch.writing = True  # the error event is a write too
        if ctype.startswith("text/event-stream"):
            await resp.write(sse_error_event(f"node {node.name} failed mid-stream ({detail}); the answer is incomplete"))
        elif request.transport is not None:
            # A plain body cut short must not look complete: drop the connection without the
            # final chunk, so the client sees a truncated transfer.
            request.transport.close()
        return None

    # -- bookkeeping -------------------------------------------------------------------------------

    def _node_ok(self, node: Target, sent: float) -> None:
        self._transition(node, node.breaker.on_success(time.monotonic(), sent))

    def _node_failed(self, node: Target, kind: str, sent: float | None = None) -> None:
        self.state.metrics.node_failures.labels(node.name, kind).inc()
        self._transition(node, node.breaker.on_failure(time.monotonic(), sent))

    def _transition(self, node: Target, transition: Transition | None) -> None:
        if transition is None:
            return
        self.state.metrics.breaker_transitions.labels(node.name, transition.new.value).inc()
        if transition.new.value == "open":
            log.warning("node %s ejected: breaker open for %.1fs", node.name, node.breaker.cooldown)
        else:
            log.info("node %s breaker %s -> %s", node.name, transition.old.value, transition.new.value)

    def _count(self, model: str, node: str, status: int) -> None:
        self.state.metrics.count_request(model, node, status)
