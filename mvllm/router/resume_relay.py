"""Resuming a stream whose node died mid-answer, the I/O part: the continuation (mvllm.router.resume)
goes to another node of the model, and its chunks, rewritten, go on into the client's stream."""

from __future__ import annotations

import asyncio
import enum
import logging
import time
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any, Protocol

import orjson
from aiohttp import web
from multidict import CIMultiDict

from mvllm.common.upstream import Response, Timeouts, UpstreamError
from mvllm.router.breaker import Transition
from mvllm.router.fleet.agent_client import describe
from mvllm.router.fleet.agents import AUTH_STATUSES
from mvllm.router.fleet.targets import Target
from mvllm.router.resume import ChunkRewriter, ResumePlan, Transcript, blocker, continuation
from mvllm.router.retry import RETRY_STATUSES, FailureKind, classify_exception
from mvllm.router.routing import next_route
from mvllm.router.state import RouterState

log = logging.getLogger("mvllm.router.resume")

_UPSTREAM_ERRORS = (UpstreamError, asyncio.TimeoutError)
_DONE_EVENT = b"data: [DONE]\n\n"


class Outcome(enum.Enum):
    """The label of mvllm_stream_resumes_total, one count per broken stream."""

    RESUMED = "resumed"  # another node's continuation went on into the client's stream
    FAILED = "failed"  # resumable, but no node took the continuation: the SSE error
    UNRESUMABLE = "unresumable"  # n > 1, logprobs, a tool call... : the SSE error


@dataclass(frozen=True, slots=True)
class ResumeContext:
    """Set on a resumable-kind request (streamed chat or completion) while resume_streams is on."""

    plan: ResumePlan
    nodes: tuple[Target, ...]
    model: str
    text: str | None = None  # the prompt's text under cache-aware (routing.next_route's affinity)


RESUME_KEY: Any = web.RequestKey("mvllm_resume", ResumeContext) if hasattr(web, "RequestKey") else "mvllm_resume"


@dataclass(frozen=True, slots=True)
class NodeBook:
    """The proxy's bookkeeping of attempts on nodes (breaker, failure metrics), lent to the resumer."""

    ok: Callable[[Target, float], None]
    failed: Callable[[Target, str, float], None]
    transition: Callable[[Target, Transition | None], None]
    timeouts: Callable[[Target], Timeouts]  # a node's connect / first-byte / total for the relay client


class WriteWatch(Protocol):
    """The proxy's slow-client watch: `writing` while a write waits, `progress` per write done."""

    writing: bool
    progress: int


class _Step(enum.Enum):
    DONE = "done"  # relayed to its end
    REFUSED = "refused"  # nothing relayed: another node may take it
    BROKEN = "broken"  # broke after some of it was relayed: resume again from there
    GIVE_UP = "give_up"  # the node judged the request itself (a 4xx): no node will do better


@dataclass(slots=True)
class _Relayed:
    step: _Step
    tail: bytes = b""
    wrote: bool = False


class StreamResumer:
    """Continues one broken stream on the model's other nodes, up to max_retries of them."""

    def __init__(self, state: RouterState, book: NodeBook) -> None:
        self.state = state
        self.book = book

    async def resume(
        self,
        resp: web.StreamResponse,
        ctx: ResumeContext,
        sent: Transcript | None,
        broken: Target,
        headers: CIMultiDict[str],
        target: str,
        request_id: str,
        watch: WriteWatch,
    ) -> bytes | None:
        """Write the rest of the answer into `resp`: the tail written (the whole request's usage is
        in it), or None when the stream cannot go on (the caller ends it with the SSE error)."""
        counter = self.state.metrics.stream_resumes
        if sent is None:
            counter.labels(Outcome.UNRESUMABLE.value).inc()
            log.info("request %s: stream not resumed (%s)", request_id, ctx.plan.reason)
            return None
        tried = [broken]
        watch.writing = False  # waiting for a node's continuation is no write the client holds up
        while True:
            sent.settle()
            why = blocker(ctx.plan, sent)
            if why is None and sent.finish_reason is not None:
                # Every token was sent, only the stream's end was lost: end it, unless the client
                # waits for a usage chunk that only the dead node knew.
                if self._wants_usage(ctx.plan) and not sent.final_usage:
                    why = "the usage chunk was lost"
                else:
                    watch.writing = True
                    await resp.write(_DONE_EVENT)
                    counter.labels(Outcome.RESUMED.value).inc()
                    return _DONE_EVENT
            body = continuation(ctx.plan, sent) if why is None else None
            if why is None and body is None:
                why = "every token allowed was sent"
            if why is not None:
                counter.labels(Outcome.UNRESUMABLE.value).inc()
                log.info("request %s: stream not resumed (%s)", request_id, why)
                return None
            assert body is not None
            while True:
                node = self._next_node(ctx, tried)
                if node is None:
                    counter.labels(Outcome.FAILED.value).inc()
                    log.warning("request %s: no node could continue the stream (tried %s)",
                                request_id, ", ".join(n.name for n in tried))
                    return None
                tried.append(node)
                log.info("request %s: resuming the stream on %s after %d tokens", request_id, node.name, sent.tokens)
                relayed = await self._continue_on(node, resp, body, sent, headers, target, request_id, watch)
                if relayed.step is _Step.GIVE_UP:
                    counter.labels(Outcome.FAILED.value).inc()
                    return None
                if relayed.step is _Step.REFUSED:
                    continue
                counter.labels(Outcome.RESUMED.value).inc()
                if relayed.step is _Step.DONE:
                    return relayed.tail
                break  # broken again: resume what is sent by now (counted as a new break)

    def _next_node(self, ctx: ResumeContext, tried: list[Target]) -> Target | None:
        if len(tried) > self.state.config.retry.max_retries:
            return None
        # The proxy's own choice (stall filter, tiers, cache affinity): a continuation is one more attempt.
        state = self.state
        picked = next_route(state.policy, state.prefix_index, ctx.nodes, tried, ctx.model, ctx.text, time.monotonic())
        return None if picked is None else picked[0]

    @staticmethod
    def _wants_usage(plan: ResumePlan) -> bool:
        opts = plan.doc.get("stream_options")
        return isinstance(opts, dict) and bool(opts.get("include_usage"))

    async def _continue_on(
        self,
        node: Target,
        resp: web.StreamResponse,
        body: dict[str, Any],
        sent: Transcript,
        headers: CIMultiDict[str],
        target: str,
        request_id: str,
        watch: WriteWatch,
    ) -> _Relayed:
        state = self.state
        book = self.book
        client = state.upstream
        assert client is not None
        node.in_flight += 1
        at = time.monotonic()
        book.transition(node, node.breaker.on_dispatch(at))
        up: Response | None = None
        verdict = False
        out = _Relayed(_Step.REFUSED)
        upstream = node.upstream_headers(headers)
        upstream["Content-Type"] = "application/json"
        try:
            try:
                up = await client.request(node.url, "POST", target, upstream.items(), orjson.dumps(body), book.timeouts(node))
            except _UPSTREAM_ERRORS as exc:
                verdict = True
                kind = classify_exception(exc)
                book.failed(node, (FailureKind.CONNECT if kind is FailureKind.BROKEN else kind).value, at)
                log.info("request %s: %s could not take the continuation (%s)", request_id, node.name, describe(exc))
                return out
            if up.status != 200 or not up.headers.get("Content-Type", "").startswith("text/event-stream"):
                try:
                    detail = (await up.read())[:300].decode("utf-8", "replace")
                except _UPSTREAM_ERRORS:
                    detail = ""
                verdict = True
                log.warning("request %s: %s answered the continuation with HTTP %d %s", request_id, node.name, up.status, detail)
                if up.status in RETRY_STATUSES or (node.via_agent and up.status in AUTH_STATUSES):
                    if not (node.via_agent and up.status == 503) and up.status != 429:
                        book.failed(node, str(up.status), at)
                    else:
                        node.breaker.on_abandon()
                    return out
                node.breaker.on_abandon()
                out.step = _Step.GIVE_UP
                return out
            rewriter = ChunkRewriter(sent)
            started = False
            tail_prev = tail = b""
            while True:
                try:
                    chunk = await up.readany()
                except _UPSTREAM_ERRORS as exc:
                    verdict = True
                    up.close()
                    if out.wrote:
                        state.metrics.stream_errors.labels(node.name).inc()
                        book.failed(node, FailureKind.BROKEN.value, at)
                        out.step = _Step.BROKEN
                    else:
                        kind = classify_exception(exc)
                        book.failed(node, (FailureKind.CONNECT if kind is FailureKind.BROKEN else kind).value, at)
                    log.warning("request %s: %s broke off the continuation (%s)", request_id, node.name, describe(exc))
                    return out
                if not started:
                    started = True
                    verdict = True
                    book.ok(node, at)
                    up.set_read_timeout(state.config.timeouts.stream_idle)
                if not chunk:
                    out.step = _Step.DONE
                    out.tail = tail_prev + tail
                    return out
                events = rewriter.feed(chunk)
                if not events:
                    continue
                for _, obj in events:
                    if obj is None:
                        sent.done = True
                    else:
                        sent.observe(obj)
                data = b"".join(e for e, _ in events)
                watch.writing = True
                await resp.write(data)
                watch.writing = False
                watch.progress += 1
                out.wrote = True
                tail_prev, tail = tail, data
        except BaseException:
            if up is not None:
                up.close()  # the client went away: closing makes the engine abort
            raise
        finally:
            if up is not None:
                up.release()
            if not verdict:
                node.breaker.on_abandon()
            node.breaker.on_settled(at)  # every dispatch is matched (the breaker's unanswered count)
            node.in_flight -= 1
            if node.retired:
                state.registry.release(node)
