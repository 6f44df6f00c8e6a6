"""Typed results of the client, built from the router's JSON by pure functions; each keeps that JSON
in `raw` for fields it does not name.

The fleet types (`NodeInfo`, `InstanceInfo`, `GpuInfo`, `FleetView`) are the views of
`mvllm/client/fleet.py`, the same parsing `mvllm ps` and the dashboard use.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any

from mvllm.client.fleet import FleetView, GpuView, InstanceView, NodeView, build_fleet, instance_view

NodeInfo = NodeView
InstanceInfo = InstanceView
GpuInfo = GpuView

__all__ = [
    "ChatChoice",
    "ChatCompletion",
    "Completion",
    "CompletionChoice",
    "Event",
    "EventPage",
    "FleetView",
    "GpuInfo",
    "Health",
    "InstanceInfo",
    "Message",
    "ModelInfo",
    "NodeInfo",
    "ReloadResult",
    "Usage",
    "build_fleet",
]


def _int(value: Any, default: int = 0) -> int:
    return int(value) if isinstance(value, (int, float)) and not isinstance(value, bool) else default


@dataclass
class Usage:
    prompt_tokens: int = 0
    completion_tokens: int = 0
    total_tokens: int = 0


def usage_from(raw: Any) -> Usage | None:
    if not isinstance(raw, Mapping):
        return None
    return Usage(_int(raw.get("prompt_tokens")), _int(raw.get("completion_tokens")), _int(raw.get("total_tokens")))


@dataclass
class Message:
    role: str
    content: str | None
    reasoning: str | None = None  # vLLM's reasoning parsers put the thinking here
    tool_calls: list[dict[str, Any]] = field(default_factory=list)


@dataclass
class ChatChoice:
    index: int
    message: Message
    finish_reason: str | None


@dataclass
class ChatCompletion:
    id: str
    model: str
    created: int
    choices: list[ChatChoice]
    usage: Usage | None
    node: str | None  # the node that answered (the router's x-mvllm-node header)
    request_id: str | None  # the router's x-request-id
    raw: dict[str, Any] = field(repr=False)

    @property
    def text(self) -> str:
        """The first choice's content ("" when it has none, e.g. only tool calls)."""
        return (self.choices[0].message.content or "") if self.choices else ""


@dataclass
class CompletionChoice:
    index: int
    text: str
    finish_reason: str | None


@dataclass
class Completion:
    id: str
    model: str
    created: int
    choices: list[CompletionChoice]
    usage: Usage | None
    node: str | None
    request_id: str | None
    raw: dict[str, Any] = field(repr=False)

    @property
    def text(self) -> str:
        return self.choices[0].text if self.choices else ""


def chat_completion_from(raw: Mapping[str, Any], node: str | None = None, request_id: str | None = None) -> ChatCompletion:
    choices = []
    for c in raw.get("choices") or []:
        msg = c.get("message") or {}
        choices.append(
            ChatChoice(
                index=_int(c.get("index")),
                message=Message(
                    role=str(msg.get("role") or "assistant"),
                    content=msg.get("content"),
                    reasoning=msg.get("reasoning") or msg.get("reasoning_content"),
                    tool_calls=list(msg.get("tool_calls") or []),
                ),
                finish_reason=c.get("finish_reason"),
            )
        )
    return ChatCompletion(
        id=str(raw.get("id") or ""),
        model=str(raw.get("model") or ""),
        created=_int(raw.get("created")),
        choices=choices,
        usage=usage_from(raw.get("usage")),
        node=node,
        request_id=request_id,
        raw=dict(raw),
    )


def completion_from(raw: Mapping[str, Any], node: str | None = None, request_id: str | None = None) -> Completion:
    choices = [
        CompletionChoice(_int(c.get("index")), str(c.get("text") or ""), c.get("finish_reason"))
        for c in raw.get("choices") or []
    ]
    return Completion(
        id=str(raw.get("id") or ""),
        model=str(raw.get("model") or ""),
        created=_int(raw.get("created")),
        choices=choices,
        usage=usage_from(raw.get("usage")),
        node=node,
        request_id=request_id,
        raw=dict(raw),
    )


def vectors_from(raw: Mapping[str, Any]) -> list[list[float]]:
    """The embeddings of an /v1/embeddings answer, in input order (base64 ones decoded)."""
    import base64
    import struct

    items = sorted((d for d in raw.get("data") or [] if isinstance(d, Mapping)), key=lambda d: _int(d.get("index")))
    out = []
    for d in items:
        vec = d.get("embedding")
        if isinstance(vec, str):  # encoding_format="base64": little-endian float32
            data = base64.b64decode(vec)
            vec = list(struct.unpack(f"<{len(data) // 4}f", data))
        out.append([float(x) for x in vec or []])
    return out


@dataclass
class ModelInfo:
    id: str
    owned_by: str
    created: int
    max_model_len: int | None
    raw: dict[str, Any] = field(repr=False)


def models_from(raw: Mapping[str, Any]) -> list[ModelInfo]:
    out = []
    for m in raw.get("data") or []:
        if isinstance(m, Mapping) and m.get("id"):
            mml = m.get("max_model_len")
            out.append(ModelInfo(str(m["id"]), str(m.get("owned_by") or ""), _int(m.get("created")),
                                 _int(mml) if mml is not None else None, dict(m)))  # fmt: skip
    return out


@dataclass
class Health:
    status: str
    nodes: int
    healthy_nodes: int
    models: int
    raw: dict[str, Any] = field(repr=False)

    @property
    def ok(self) -> bool:
        """The router answers and at least one node is healthy (or none is configured)."""
        return self.status == "ok" and (self.healthy_nodes > 0 or self.nodes == 0)


def health_from(raw: Mapping[str, Any]) -> Health:
    return Health(str(raw.get("status") or ""), _int(raw.get("nodes")), _int(raw.get("healthy_nodes")),
                  _int(raw.get("models")), dict(raw))  # fmt: skip


@dataclass
class Event:
    seq: int
    time: float
    level: str
    logger: str
    message: str


@dataclass
class EventPage:
    """Router log records after `since`: read the next page with `events(since=page.last)`.
    `first > since + 1` means records between them fell out of the router's ring before being read."""

    events: list[Event]
    last: int
    first: int
    raw: dict[str, Any] = field(repr=False)


def event_page_from(raw: Mapping[str, Any]) -> EventPage:
    events = [
        Event(_int(e.get("seq")), float(e.get("time") or 0.0), str(e.get("level") or ""), str(e.get("logger") or ""),
              str(e.get("message") or ""))
        for e in raw.get("events") or []
        if isinstance(e, Mapping)
    ]
    return EventPage(events, _int(raw.get("last")), _int(raw.get("first")), dict(raw))


@dataclass
class ReloadResult:
    ok: bool
    config: str | None
    message: str
    nodes: list[str]
    raw: dict[str, Any] = field(repr=False)


def reload_result_from(raw: Mapping[str, Any]) -> ReloadResult:
    return ReloadResult(bool(raw.get("ok")), raw.get("config"), str(raw.get("message") or ""),
                        [str(n) for n in raw.get("nodes") or []], dict(raw))  # fmt: skip


def node_from_entry(entry: Mapping[str, Any]) -> NodeInfo:
    """One node entry (as drain/undrain answer it) as a NodeInfo."""
    nodes = build_fleet({"nodes": [entry]}).nodes
    if not nodes:
        raise ValueError(f"not a node entry: {dict(entry)!r:.200}")
    return nodes[0]


def instance_from(raw: Mapping[str, Any], node: str | None) -> InstanceInfo:
    """An agent's instance answer (load/unload/sleep/wake) as an InstanceInfo on `node`."""
    return instance_view(node or "", raw)
