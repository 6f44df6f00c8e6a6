"""Streamed answers, pure: bytes of a server-sent-event stream in, `data` payloads out
(`SSEDecoder`), and the text deltas, finish reason and usage of a chat or completion stream
(`StreamAccumulator`)."""

from __future__ import annotations

import json
from typing import Any

from mvllm.client.errors import MvllmError, error_from_event
from mvllm.client.types import Usage, usage_from

DONE = "[DONE]"


class SSEDecoder:
    """Feed chunks as they arrive (a line or an event may be split anywhere); get the `data` of each
    complete event. Lines are split on bytes, so a UTF-8 character cut between chunks is whole again."""

    def __init__(self) -> None:
        self._partial = b""
        self._data: list[str] = []

    def feed(self, chunk: bytes) -> list[str]:
        lines = (self._partial + chunk).split(b"\n")
        self._partial = lines.pop()
        out: list[str] = []
        for line in lines:
            self._line(line.removesuffix(b"\r"), out)
        return out

    def end(self) -> list[str]:
        """What is left when the stream closes: a last line or event without its terminator."""
        out: list[str] = []
        if self._partial:
            self._line(self._partial.removesuffix(b"\r"), out)
            self._partial = b""
        self._line(b"", out)
        return out

    def _line(self, line: bytes, out: list[str]) -> None:
        if not line:  # a blank line ends the event
            if self._data:
                out.append("\n".join(self._data))
                self._data = []
            return
        if line.startswith(b":"):  # a comment (keep-alive)
            return
        name, _, value = line.partition(b":")
        if name == b"data":
            self._data.append(value.removeprefix(b" ").decode("utf-8", "replace"))


class StreamAccumulator:
    """The state of one chat (`kind="chat"`) or completion stream: `add(payload)` returns the text
    delta of the first choice (None when the chunk carries none) and raises the error of an error
    event; `text`, `finish_reason`, `usage`, `id` and `model` fill in as chunks arrive."""

    def __init__(self, kind: str) -> None:
        if kind not in ("chat", "completion"):
            raise ValueError(f"unknown stream kind {kind!r}")
        self.kind = kind
        self.id: str | None = None
        self.model: str | None = None
        self.finish_reason: str | None = None
        self.usage: Usage | None = None
        self.done = False
        self._parts: list[str] = []

    @property
    def text(self) -> str:
        """The text streamed so far, deltas joined."""
        return "".join(self._parts)

    def add(self, payload: str, request_id: str | None = None) -> str | None:
        if payload.strip() == DONE:
            self.done = True
            return None
        try:
            chunk: Any = json.loads(payload)
        except ValueError:
            raise MvllmError(f"the stream sent something that is not JSON: {payload[:200]!r}", status=200) from None
        if not isinstance(chunk, dict):
            return None
        if "error" in chunk:
            raise error_from_event(chunk, request_id)
        self.id = self.id or chunk.get("id")
        self.model = self.model or chunk.get("model")
        if chunk.get("usage"):
            self.usage = usage_from(chunk["usage"])
        delta = None
        for choice in chunk.get("choices") or []:
            if not isinstance(choice, dict) or choice.get("index", 0) != 0:
                continue  # n > 1: the first choice only (the OpenAI SDK streams every choice)
            if choice.get("finish_reason"):
                self.finish_reason = choice["finish_reason"]
            if self.kind == "chat":
                piece = (choice.get("delta") or {}).get("content")
            else:
                piece = choice.get("text")
            if piece:
                self._parts.append(piece)
                delta = piece if delta is None else delta + piece
        return delta
