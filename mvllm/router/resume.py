"""Resuming a stream whose node died mid-answer, the pure part: which requests can be resumed, the
text and usage a stream has carried so far, the continuation request, and its chunks rewritten
into the original stream (docs/configuration.md, "Resumed streams"). No I/O here."""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any

import orjson

CHAT_PATHS = frozenset({"/v1/chat/completions", "/chat/completions"})
COMPLETION_PATHS = frozenset({"/v1/completions", "/completions"})
# Constrained decoding restarts its grammar at the continuation's first token: the text so far
# would not be part of what the grammar matched, so such answers are not resumed.
_GUIDED_KEYS = ("guided_json", "guided_regex", "guided_choice", "guided_grammar", "structured_outputs")
# Kept chunks are folded into the transcript (parsed) past this many bytes: most answers are
# shorter and never parsed unless their node dies; longer ones keep their memory bounded.
_FOLD_BYTES = 256 * 1024
_DONE = b"[DONE]"


class EndedEarly(Exception):
    """A stream that ended cleanly but without its `data: [DONE]`: cut by a proxy in between (an
    agent whose engine died ends its answer as if complete)."""

    def __init__(self) -> None:
        super().__init__("the stream ended without its data: [DONE]")


@dataclass(frozen=True, slots=True)
class ResumePlan:
    """A streamed chat or completion request as the client sent it; `reason` says why it cannot be
    resumed (None when it can)."""

    kind: str  # "chat" or "completion"
    doc: Mapping[str, Any]
    reason: str | None = None


def plan_resume(path: str, doc: Any) -> ResumePlan | None:
    """The plan for a request, or None when it is not a streamed chat or completion at all."""
    if not isinstance(doc, Mapping) or doc.get("stream") is not True:
        return None
    if path in CHAT_PATHS:
        kind = "chat"
    elif path in COMPLETION_PATHS:
        kind = "completion"
    else:
        return None
    return ResumePlan(kind, doc, _unresumable(kind, doc))


def _unresumable(kind: str, doc: Mapping[str, Any]) -> str | None:
    if _int(doc.get("n"), 1) != 1 or _int(doc.get("best_of"), 1) != 1:
        return "n > 1"
    logprobs = doc.get("logprobs")  # chat: a bool; completions: a count, 0 included
    if (logprobs is not None and logprobs is not False) or doc.get("top_logprobs") is not None \
            or doc.get("prompt_logprobs") is not None:
        return "logprobs"
    if any(doc.get(k) is not None for k in _GUIDED_KEYS):
        return "guided decoding"
    fmt = doc.get("response_format")
    if isinstance(fmt, Mapping) and fmt.get("type") not in (None, "text"):
        return "response_format"
    if kind == "completion":
        if doc.get("echo"):
            return "echo"
        if not isinstance(doc.get("prompt"), str):
            return "a prompt that is not one string"
        return None
    choice = doc.get("tool_choice")
    if choice not in (None, "auto", "none"):
        return "a forced tool call"
    messages = doc.get("messages")
    if not isinstance(messages, list) or not all(isinstance(m, Mapping) and _text_only(m.get("content")) for m in messages):
        return "non-text messages"
    return None


def _int(value: Any, default: int) -> int:
    return value if isinstance(value, int) and not isinstance(value, bool) else default


def _text_only(content: Any) -> bool:
    if content is None or isinstance(content, str):
        return True
    return isinstance(content, list) and all(isinstance(p, Mapping) and p.get("type") == "text" for p in content)


@dataclass(slots=True)
class Transcript:
    """What one stream (index 0, the only choice of a resumable request) has carried so far: its
    text, its tokens (from usage when the engine streams it per chunk, else one per chunk with
    text, as vLLM and the sim stream), and what would stop a resume. Raw chunks are only kept
    (references) and parsed when a resume needs them, or in batches once they pass 256 KiB."""

    id: str | None = None
    created: int | None = None
    pieces: list[str] = field(default_factory=list)
    counted: int = 0
    usage_tokens: int | None = None  # completion_tokens of the last per-chunk usage (continuous_usage_stats)
    finish_reason: str | None = None
    final_usage: bool = False
    done: bool = False
    blocker: str | None = None  # why what was streamed cannot be continued
    raw: list[bytes] = field(default_factory=list)
    raw_bytes: int = 0
    partial: bytes = b""

    def add(self, chunk: bytes) -> None:
        """A chunk as relayed (any split of the SSE text); cheap, for the relay's hot loop."""
        self.raw.append(chunk)
        self.raw_bytes += len(chunk)
        if self.raw_bytes > _FOLD_BYTES:
            self.fold()

    def fold(self) -> None:
        """Parse the kept chunks' complete events; an unfinished one stays in `partial`."""
        data = self.partial + b"".join(self.raw)
        self.raw.clear()
        self.raw_bytes = 0
        events = data.split(b"\n\n")
        self.partial = events.pop()
        payloads = []
        for event in events:
            # The usual event is one `data: {...}` line; anything else takes the general path.
            payload = event[6:] if event.startswith(b"data: {") and b"\n" not in event else event_data(event)
            if payload == _DONE:
                self.done = True
            elif payload is not None:
                payloads.append(payload)
        try:
            objs = orjson.loads(b"[" + b",".join(payloads) + b"]")  # one parse for the batch
        except orjson.JSONDecodeError:
            objs = []
            for payload in payloads:
                try:
                    objs.append(orjson.loads(payload))
                except orjson.JSONDecodeError:
                    self.blocker = "an unreadable chunk"
        for obj in objs:
            if isinstance(obj, dict):
                self.observe(obj)

    def observe(self, obj: dict[str, Any]) -> None:
        """One parsed chunk of the stream (as the client receives it)."""
        if "error" in obj:
            self.blocker = "the engine reported an error"
            return
        if self.id is None:
            self.id = obj.get("id")
            self.created = obj.get("created")
        choices = obj.get("choices") or []
        usage = obj.get("usage")
        if isinstance(usage, Mapping) and isinstance(usage.get("completion_tokens"), int):
            if choices:
                self.usage_tokens = usage["completion_tokens"]
            else:
                self.final_usage = True
        for choice in choices:
            if not isinstance(choice, Mapping):
                continue
            if choice.get("index", 0) != 0:
                self.blocker = "several choices"
                continue
            delta = choice.get("delta")
            if isinstance(delta, Mapping):  # chat
                if delta.get("tool_calls") or delta.get("function_call"):
                    self.blocker = "a tool call in progress"
                if delta.get("reasoning_content") or delta.get("reasoning"):
                    self.blocker = "reasoning in progress"
                text = delta.get("content")
            else:
                text = choice.get("text")
            if isinstance(text, str) and text:
                self.pieces.append(text)
                self.counted += 1
            if choice.get("finish_reason") is not None:
                self.finish_reason = choice["finish_reason"]

    def settle(self) -> None:
        """Fold what is still kept: call before reading the transcript after a break."""
        if self.raw:
            self.fold()

    def ended(self) -> bool:
        """Did the stream end with its `data: [DONE]`? A look at its last bytes, else a parse."""
        last = b"".join(self.raw[-2:]) if self.raw else self.partial
        if last.rstrip().endswith(b"data: [DONE]"):
            return True
        self.settle()
        return self.done

    @property
    def text(self) -> str:
        return "".join(self.pieces)

    @property
    def tokens(self) -> int:
        return self.usage_tokens if self.usage_tokens is not None else self.counted


def event_data(event: bytes) -> bytes | None:
    """The data of one SSE event (its `data:` lines joined), None for a comment or an empty event."""
    lines = [line for line in event.split(b"\n") if line.startswith(b"data:")]
    if not lines:
        return None
    return b"\n".join(line[5:].removeprefix(b" ") for line in lines).rstrip(b"\r")


def blocker(plan: ResumePlan, sent: Transcript) -> str | None:
    """Why this broken stream cannot be continued now (None: it can)."""
    if plan.reason is not None:
        return plan.reason
    if sent.partial.strip():
        return "the node broke off inside an event"  # the client already holds half of it
    if sent.blocker is not None:
        return sent.blocker
    if sent.done:
        return "the stream had ended"
    return None


def continuation(plan: ResumePlan, sent: Transcript) -> dict[str, Any] | None:
    """The request for the rest of the answer, or None when nothing is left to generate."""
    body = dict(plan.doc)
    text = sent.text
    if not text:
        return body  # nothing generated yet: the request as it came
    if plan.kind == "chat":
        messages = list(plan.doc["messages"])
        last = messages[-1] if messages else None
        if (plan.doc.get("continue_final_message") and isinstance(last, Mapping)
                and last.get("role") == "assistant" and isinstance(last.get("content"), str)):
            messages[-1] = {**last, "content": last["content"] + text}  # the client's own prefix, continued
        else:
            messages.append({"role": "assistant", "content": text})
        body["messages"] = messages
        body["continue_final_message"] = True
        body["add_generation_prompt"] = False
    else:
        body["prompt"] = plan.doc["prompt"] + text
    k = sent.tokens
    for key in ("max_tokens", "max_completion_tokens"):
        limit = plan.doc.get(key)
        if isinstance(limit, int) and not isinstance(limit, bool):
            if limit - k <= 0:
                return None
            body[key] = limit - k
    least = plan.doc.get("min_tokens")
    if isinstance(least, int) and not isinstance(least, bool) and least:
        body["min_tokens"] = max(0, least - k)
    return body


class ChunkRewriter:
    """Turns a continuation's SSE stream into the rest of the original one: complete events only
    (an event cut by another failure is never half-sent), the original's id and created, no second
    role chunk, and usage for the whole request (the continuation's prompt held the K tokens sent
    before it: prompt_tokens - K, completion_tokens + K, the total unchanged)."""

    def __init__(self, original: Transcript) -> None:
        self.id = original.id
        self.created = original.created
        self.offset = original.tokens
        self.buffer = b""

    def feed(self, chunk: bytes) -> list[tuple[bytes, dict[str, Any] | None]]:
        """The events complete with this chunk, rewritten, each with its parsed form (None for [DONE])."""
        events = (self.buffer + chunk).split(b"\n\n")
        self.buffer = events.pop()
        out: list[tuple[bytes, dict[str, Any] | None]] = []
        for event in events:
            payload = event_data(event)
            if payload is None:
                continue
            if payload == _DONE:
                out.append((b"data: [DONE]\n\n", None))
                continue
            try:
                obj = orjson.loads(payload)
            except orjson.JSONDecodeError:
                out.append((event + b"\n\n", {"error": "unreadable"}))
                continue
            if not isinstance(obj, dict):
                continue
            rewritten = self.rewrite(obj)
            if rewritten is not None:
                out.append((b"data: " + orjson.dumps(rewritten) + b"\n\n", rewritten))
        return out

    def rewrite(self, obj: dict[str, Any]) -> dict[str, Any] | None:
        if "error" in obj:
            return obj
        if self.id is not None:
            obj["id"] = self.id
        if self.created is not None:
            obj["created"] = self.created
        choices = obj.get("choices")
        if isinstance(choices, list) and choices:
            kept = [c for c in choices if not _role_only(c)]
            for c in kept:
                delta = c.get("delta")
                if isinstance(delta, dict):
                    delta.pop("role", None)
            if not kept:
                return None  # the role chunk (with continuous_usage_stats, its usage: no news either)
            obj["choices"] = kept
        usage = obj.get("usage")
        if isinstance(usage, dict):
            obj["usage"] = whole_usage(usage, self.offset)
        return obj


def _role_only(choice: Any) -> bool:
    """A chat continuation's first chunk: the role again, with no text."""
    if not isinstance(choice, Mapping):
        return False
    delta = choice.get("delta")
    return (isinstance(delta, Mapping) and "role" in delta and not delta.get("content")
            and not delta.get("tool_calls") and choice.get("finish_reason") is None)


def whole_usage(usage: Mapping[str, Any], offset: int) -> dict[str, Any]:
    """A continuation's usage as the whole request's: the `offset` tokens sent before it move from
    its prompt back to the completion, so the numbers are those of an uninterrupted answer."""
    out = dict(usage)
    prompt, completion = usage.get("prompt_tokens"), usage.get("completion_tokens")
    if isinstance(prompt, int) and isinstance(completion, int):
        out["prompt_tokens"] = max(0, prompt - offset)
        out["completion_tokens"] = completion + offset
    return out
