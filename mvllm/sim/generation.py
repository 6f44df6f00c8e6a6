"""Serving one chat / completion / responses request: plan its choices, run them through the engine,
answer as one JSON body or as vLLM's SSE stream (chunks written as the engine produces tokens)."""

from __future__ import annotations

import asyncio
import json
import time
from collections.abc import Iterator

from aiohttp import web

from mvllm.sim import protocol, responses, textgen
from mvllm.sim.config import SimConfig
from mvllm.sim.engine import Engine
from mvllm.sim.faults import MIDSTREAM_CHUNKS
from mvllm.sim.protocol import GenRequest
from mvllm.sim.scheduler import Seq, chained_block_hashes

SUBMIT_BATCH = 256  # choices set up between two yields to the event loop


def json_response(obj: object, status: int = 200) -> web.Response:
    """JSON as vLLM's server writes it: compact, UTF-8 kept as is."""
    body = json.dumps(obj, ensure_ascii=False, separators=(",", ":")).encode()
    return web.Response(body=body, status=status, content_type="application/json")


def drop_connection(request: web.Request) -> None:
    """Close the client's connection at once (faults `reset` and `midstream`)."""
    transport = request.transport
    if transport is not None:
        transport.abort()


def plan_choices(
    cfg: SimConfig, weights_valid: bool, req: GenRequest, lora: str | None
) -> Iterator[tuple[int, protocol.Prompt, textgen.LazyCompletion]]:
    """(choice index, prompt, lazily generated completion) for every choice of every prompt, in
    index order: cheap per choice, so a large `n` costs time only as its tokens are generated."""
    salt = f"{lora or ''}|{'' if req.seed is None else req.seed}"
    # Discarded (level-2) weights that were not reloaded: vLLM writes tokens without text and
    # never an end-of-sequence token, so such an answer runs to its length limit.
    garbage = not weights_valid
    for p_idx, prompt in enumerate(req.prompts):
        room = cfg.max_model_len - len(prompt.token_ids)
        for i in range(req.n):
            index = p_idx * req.n + i
            if req.max_tokens is not None:
                length, reason = min(req.max_tokens, room), "length"
            elif req.ignore_eos or garbage:
                length, reason = room, "length"
            else:
                # A chat answer being continued: the length of the whole answer, less what it holds.
                key = prompt.text if prompt.answer_of is None else prompt.answer_of
                natural = textgen.natural_length(cfg.seed, key + salt, i, cfg.max_tokens_default)
                natural = max(1, natural - prompt.answered)
                length, reason = (natural, "stop") if natural <= room else (room, "length")
            pieces = textgen.context_pieces(cfg.seed, prompt.text, i, salt)
            yield index, prompt, textgen.LazyCompletion(pieces, length, [] if garbage else req.stop, reason)


def new_seq(cfg: SimConfig, engine: Engine, prompt: protocol.Prompt, target: int, reason: str, lora: str | None,
            index: int, pooling_only: bool = False, block_hashes: tuple[int, ...] | None = None) -> Seq:
    """One engine sequence for `prompt`, its prefix-cache block hashes salted by the adapter
    (`block_hashes`: already computed, for the choices of one prompt)."""
    if block_hashes is None:
        block_hashes = chained_block_hashes(prompt.token_ids, cfg.block_size, lora or "")
    return Seq(
        seq_id=engine.new_seq_id(),
        prompt_tokens=len(prompt.token_ids),
        target_tokens=target,
        finish_reason=reason,
        arrival=engine.clock(),
        block_hashes=block_hashes,
        lora=lora,
        index=index,
        pooling=pooling_only,
    )


class Generation:
    """Serves one chat/completion/responses request: submits its sequences, then answers, streamed or not."""

    def __init__(self, cfg: SimConfig, engine: Engine, fingerprint: str, request: web.Request, req: GenRequest,
                 req_id: str, model_name: str, lora: str | None, midstream: bool, responses_api: bool = False) -> None:
        self.cfg = cfg
        self.engine = engine
        self.fingerprint = fingerprint
        self.request = request
        self.req = req
        self.req_id = req_id
        self.model_name = model_name
        self.midstream = midstream
        self.responses_api = responses_api
        self.lora = lora
        self.plans: list[tuple[int, protocol.Prompt, textgen.LazyCompletion]] = []  # filled by run()
        # (choice, finish reason or None for a token, the token's text, is it the choice's last)
        self.queue: asyncio.Queue[tuple[int, str | None, str, bool]] = asyncio.Queue()
        self.seqs: list[Seq] = []
        k = len(req.prompts) * req.n
        self.unfinished = k
        self.counts = [0] * k
        self.texts: list[list[str]] = [[] for _ in range(k)]
        self.finish: list[str | None] = [None] * k
        self.prompt_tokens = sum(len(p.token_ids) for p in req.prompts)

    def _sink(self, seq: Seq, reason: str | None) -> None:
        """Called by the engine as it steps: a token's text is made here, and a stop string it
        completes shortens the sequence so that the engine ends it on this token."""
        if reason is not None:
            self.queue.put_nowait((seq.index, reason, "", False))
            return
        comp = self.plans[seq.index][2]
        piece = comp.piece(seq.generated - 1) if seq.weights_valid else ""
        if comp.target < seq.target_tokens:
            seq.target_tokens, seq.finish_reason = comp.target, comp.finish_reason
        self.queue.put_nowait((seq.index, None, piece, seq.generated >= seq.target_tokens))

    def _take(self, event: tuple[int, str | None, str, bool]) -> tuple[int, str, bool] | None:
        """Apply one engine event; returns (choice, new text, is_last) for a token that a client
        sees, or for an abort of a started choice; None otherwise."""
        idx, reason, piece, last = event
        if self.finish[idx] is not None:
            return None
        if reason is None:
            self.counts[idx] += 1
            self.texts[idx].append(piece)
            if last:
                self.finish[idx] = self.plans[idx][2].finish_reason
                self.unfinished -= 1
            return idx, piece, last
        self.finish[idx] = reason
        self.unfinished -= 1
        return (idx, "", True) if self.counts[idx] > 0 else None

    def _finish_info(self, idx: int) -> tuple[str, str | None]:
        reason = self.finish[idx] or "abort"
        comp = self.plans[idx][2]
        stop_reason = comp.stop_reason if reason == comp.finish_reason and reason == "stop" else None
        return reason, stop_reason

    async def _submit(self) -> None:
        """Plan and submit every choice, yielding to the event loop between batches: a request with
        a large `n` starts at once and never stalls the server while its choices are set up."""
        hashes: dict[int, tuple[int, ...]] = {}
        for index, prompt, comp in plan_choices(self.cfg, self.engine.weights_valid, self.req, self.lora):
            key = id(prompt)
            if key not in hashes:
                hashes[key] = chained_block_hashes(prompt.token_ids, self.cfg.block_size, self.lora or "")
            seq = new_seq(self.cfg, self.engine, prompt, comp.target, comp.finish_reason, self.lora, index,
                          block_hashes=hashes[key])
            seq.sink = self._sink
            self.plans.append((index, prompt, comp))
            self.seqs.append(seq)
            self.engine.submit(seq)
            if len(self.seqs) % SUBMIT_BATCH == 0:
                await asyncio.sleep(0)

    async def run(self) -> web.StreamResponse:
        try:
            await self._submit()
            if self.req.stream:
                return await self._stream()
            return await self._whole()
        finally:
            for seq in self.seqs:  # client gone, fault or shutdown: stop what still runs
                self.engine.abort(seq)

    async def _whole(self) -> web.StreamResponse:
        while self.unfinished:
            self._take(await self.queue.get())
        completion_tokens = sum(self.counts)
        if self.responses_api:
            body = self._responses_body("completed")
        elif self.req.kind == "chat":
            choices = [responses.chat_choice(i, "".join(self.texts[i]), *self._finish_info(i))
                       for i in range(len(self.plans))]
            body = responses.chat_response(self.req_id, self.model_name, int(time.time()), choices,
                                           self.prompt_tokens, completion_tokens, self.fingerprint)
        else:
            choices = []
            for i, (_, prompt, _) in enumerate(self.plans):
                text = (prompt.text if self.req.echo else "") + "".join(self.texts[i])
                choices.append(responses.completion_choice(i, text, *self._finish_info(i)))
            body = responses.completion_response(self.req_id, self.model_name, int(time.time()), choices,
                                                 self.prompt_tokens, completion_tokens, self.fingerprint)
        if not self.midstream:
            return json_response(body)
        # midstream fault: headers and half of the body, then the connection drops.
        raw = json.dumps(body).encode()
        resp = web.StreamResponse(status=200, headers={"Content-Type": "application/json"})
        resp.content_length = len(raw)
        await resp.prepare(self.request)
        await resp.write(raw[: len(raw) // 2])
        drop_connection(self.request)
        return resp

    async def _stream(self) -> web.StreamResponse:
        resp = web.StreamResponse(status=200, headers={"Content-Type": "text/event-stream; charset=utf-8"})
        await resp.prepare(self.request)
        try:
            if self.responses_api:
                return await self._stream_responses(resp)
            return await self._stream_chunks(resp)
        except ConnectionResetError:
            return resp  # the client went away; run() aborts what is left

    async def _stream_chunks(self, resp: web.StreamResponse) -> web.StreamResponse:
        w = responses.ChunkWriter(self.req.kind, self.req_id, self.model_name, self.fingerprint,
                                  include_usage=self.req.include_usage, continuous_usage=self.req.continuous_usage)
        started = False
        sent_tokens = 0
        per_prompt = [len(p.token_ids) for _, p, _ in self.plans]
        while self.unfinished:
            events = [await self.queue.get()]
            while not self.queue.empty():  # one write for everything produced in this step
                events.append(self.queue.get_nowait())
            out = bytearray()
            for event in events:
                taken = self._take(event)
                if taken is None:
                    continue
                idx, text, last = taken
                if not started and self.req.kind == "chat":
                    for i in range(len(self.plans)):
                        out += w.role(i, per_prompt[i])
                started = True
                if self.req.kind == "completion" and self.req.echo and self.counts[idx] == 1:
                    text = self.plans[idx][1].text + text
                reason, stop_reason = self._finish_info(idx) if last else (None, None)
                out += w.token(idx, text, reason, stop_reason, per_prompt[idx], self.counts[idx])
                sent_tokens += 1
            if out:
                await resp.write(bytes(out))
            if self.midstream and sent_tokens >= MIDSTREAM_CHUNKS:
                drop_connection(self.request)
                return resp
        tail = bytearray()
        if self.req.include_usage:
            tail += w.final_usage(self.prompt_tokens, sum(self.counts))
        tail += responses.SSE_DONE
        await resp.write(bytes(tail))
        await resp.write_eof()
        return resp

    # --- Responses API ---
    def _responses_body(self, status: str, text: str | None = None, msg_id: str | None = None) -> dict:
        text = "".join(self.texts[0]) if text is None else text
        reason = self.finish[0]
        incomplete = reason == "length"
        if status == "completed" and incomplete:
            status = "incomplete"
        output = [] if status == "in_progress" else [{
            "id": msg_id or f"msg_{responses.random_id()}",
            "content": [{"annotations": [], "text": text, "type": "output_text", "logprobs": None}],
            "role": "assistant", "status": "completed", "type": "message", "phase": None,
        }]
        out_tokens = sum(self.counts)
        return {
            "id": self.req_id, "created_at": int(time.time()),
            "incomplete_details": {"reason": "max_output_tokens"} if incomplete and status != "in_progress" else None,
            "instructions": None, "metadata": None, "model": self.model_name, "object": "response",
            "output": output, "parallel_tool_calls": True, "temperature": 1.0, "tool_choice": "none", "tools": [],
            "top_p": 1.0, "background": False, "max_output_tokens": self.req.max_tokens, "max_tool_calls": None,
            "previous_response_id": None, "prompt": None, "reasoning": None, "service_tier": "auto",
            "status": status, "text": None, "top_logprobs": None, "truncation": "disabled",
            "usage": None if status == "in_progress" else {
                "input_tokens": self.prompt_tokens,
                "input_tokens_details": {"cached_tokens": 0, "input_tokens_per_turn": [], "cached_tokens_per_turn": []},
                "output_tokens": out_tokens,
                "output_tokens_details": {"reasoning_tokens": 0, "tool_output_tokens": 0, "output_tokens_per_turn": [],
                                          "tool_output_tokens_per_turn": []},
                "total_tokens": self.prompt_tokens + out_tokens,
            },
            "user": None, "presence_penalty": 0.0, "frequency_penalty": 0.0, "kv_transfer_params": None,
            "input_messages": None, "output_messages": None,
        }

    async def _stream_responses(self, resp: web.StreamResponse) -> web.StreamResponse:
        seq_no = 0
        item_id = responses.random_id()

        def event(kind: str, payload: dict) -> bytes:
            nonlocal seq_no
            payload = {**payload, "sequence_number": seq_no, "type": kind}
            seq_no += 1
            return f"event: {kind}\n".encode() + responses.sse(payload)

        head = self._responses_body("in_progress")
        out = event("response.created", {"response": head})
        out += event("response.in_progress", {"response": head})
        out += event("response.output_item.added", {"item": {"id": item_id, "content": [], "role": "assistant",
                                                              "status": "in_progress", "type": "message", "phase": None},
                                                     "output_index": 0})
        out += event("response.content_part.added", {"content_index": 0, "item_id": item_id, "output_index": 0,
                                                      "part": {"annotations": [], "text": "", "type": "output_text",
                                                               "logprobs": []}})
        await resp.write(out)
        sent = 0
        while self.finish[0] is None:
            taken = self._take(await self.queue.get())
            if taken is None or not taken[1]:
                continue
            await resp.write(event("response.output_text.delta", {"content_index": 0, "delta": taken[1],
                                                                  "item_id": item_id, "logprobs": [],
                                                                  "output_index": 0}))
            sent += 1
            if self.midstream and sent >= MIDSTREAM_CHUNKS:
                drop_connection(self.request)
                return resp
        text = "".join(self.texts[0])
        part = {"annotations": [], "text": text, "type": "output_text", "logprobs": None}
        out = event("response.output_text.done", {"content_index": 0, "item_id": item_id, "logprobs": [],
                                                  "output_index": 0, "text": text})
        out += event("response.content_part.done", {"content_index": 0, "item_id": item_id, "output_index": 0,
                                                    "part": part})
        out += event("response.output_item.done", {"item": {"id": item_id, "content": [part], "role": "assistant",
                                                            "status": "completed", "type": "message", "phase": None,
                                                            "summary": []}, "output_index": 0})
        out += event("response.completed", {"response": self._responses_body("completed", text)})
        await resp.write(out)
        await resp.write_eof()
        return resp
