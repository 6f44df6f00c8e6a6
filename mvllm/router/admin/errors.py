"""Errors of the admin API: a handler raises `AdminError` where it can explain the problem, and
`handler` (wrapped around every admin route by admin.register) renders it in OpenAI form;
`non_negative_param` reads a query parameter that must be a number >= 0."""

from __future__ import annotations

import functools
from collections.abc import Awaitable, Callable, Mapping
from typing import TypeVar

from aiohttp import web

from mvllm.common.errors import error_response

Handler = Callable[[web.Request], Awaitable[web.StreamResponse]]
Num = TypeVar("Num", int, float)


class AdminError(Exception):
    """An admin request that cannot be done: HTTP status, message, OpenAI error type and code."""

    def __init__(
        self,
        status: int,
        message: str,
        type: str | None = None,
        code: str | int | None = None,
        *,
        headers: Mapping[str, str] | None = None,
    ) -> None:
        super().__init__(message)
        self.status = status
        self.message = message
        self.type = type
        self.code = code
        self.headers = headers

    def response(self) -> web.Response:
        return error_response(self.status, self.message, type=self.type, code=self.code, headers=self.headers)


def handler(fn: Handler) -> Handler:
    """`fn` with its AdminError answered in OpenAI form (the one place that renders them)."""

    @functools.wraps(fn)
    async def wrapped(request: web.Request) -> web.StreamResponse:
        try:
            return await fn(request)
        except AdminError as exc:
            return exc.response()

    return wrapped


def non_negative_param(
    request: web.Request, name: str, parse: Callable[[str], Num], message: str, default: Num | None = None
) -> Num | None:
    """Query parameter `name` read by `parse` (`default` when absent or empty); a value that does
    not parse or is negative is a 400 whose message is `message` formatted with `name` and `raw`."""
    raw = request.query.get(name)
    if raw is None or raw == "":
        return default
    try:
        value = parse(raw)
    except ValueError:
        value = parse("-1")
    if value < 0:
        raise AdminError(400, message.format(name=name, raw=raw), code="invalid_parameter")
    return value
