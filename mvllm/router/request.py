"""What the proxy tells the rest of the router about one finished answer: the `ResponseComplete`
event and the hook type that receives it (the access gate settles a request's tokens with it)."""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

from aiohttp import web


@dataclass(frozen=True, slots=True)
class ResponseComplete:
    """One proxied answer, relayed to its end: its status and its last bytes (references to the
    last chunks relayed, no copies), where an engine reports the request's token usage."""

    request: web.Request
    status: int
    tail: bytes


ResponseHook = Callable[[ResponseComplete], None]
