"""OpenAI-form answers for what aiohttp rejects before the router's handlers run: a request line
or headers its HTTP parser refuses (unknown method, bad token, oversized line, too many headers).

aiohttp answers those through `RequestHandler.handle_error`, in plain text; `JsonErrorRunner` is an
`AppRunner` whose server makes connection handlers that answer in the router's JSON form instead,
with the status the fault deserves: 405 (and `Allow`) for a well-formed line whose method is
unknown, 414 for a request line too long, 431 for header lines too long or too many, 400 else.
"""

from __future__ import annotations

import asyncio
import logging
import re
from typing import Any

from aiohttp import web
from aiohttp.http_exceptions import BadHttpMessage, BadHttpMethod, LineTooLong

from mvllm.common.errors import error_response
from mvllm.router.access.guard import ALLOW

log = logging.getLogger("mvllm.router.wire")

# RFC 9110 §5.6.2 token, a request target, and the version: a request line that is well formed
# apart from naming a method the parser does not know.
_REQUEST_LINE = re.compile(r"^[!#$%&'*+\-.^_`|~0-9A-Za-z]+ \S+ HTTP/\d\.\d$")
_QUOTED_LINE = re.compile(r"b'([^'\n]*)'")


def parser_error(status: int, exc: BaseException | None) -> tuple[int, str, str, dict[str, str] | None]:
    """(status, code, message, headers) of the answer to a request aiohttp could not parse."""
    if isinstance(exc, BadHttpMethod):
        found = _QUOTED_LINE.search(exc.message)
        line = found.group(1) if found else ""
        if _REQUEST_LINE.match(line):
            method = line.split(" ", 1)[0]
            return 405, "method_not_allowed", f"method {method!r} is not served by this router", {"Allow": ALLOW}
        return 400, "invalid_request_line", "the request line is not HTTP/1.x (method, target, version)", None
    if isinstance(exc, LineTooLong):
        line = exc.args[0] if exc.args else b""
        head = bytes(line[:4]) if isinstance(line, (bytes, bytearray)) else str(line)[:4].encode()
        if head.startswith((b"/", b"http")):
            return 414, "uri_too_long", "the request target is longer than the router accepts", None
        return 431, "header_too_large", "a request header line is longer than the router accepts", None
    if isinstance(exc, BadHttpMessage):
        if "too many headers" in exc.message.lower():
            return 431, "too_many_headers", "the request has more headers than the router accepts", None
        return 400, "bad_request", f"the request is not valid HTTP: {exc.message.splitlines()[0][:200]}", None
    if status == 504:
        return 504, "timeout", "the router did not answer in time", None
    if status >= 500:
        return status, "internal_error", "internal error in the router (see its log)", None
    return status, "bad_request", "the request is not valid HTTP", None


class JsonErrorRequestHandler(web.RequestHandler):
    """aiohttp's connection handler, answering its own errors in OpenAI form."""

    def handle_error(
        self, request: Any, status: int = 500, exc: BaseException | None = None, message: str | None = None
    ) -> web.StreamResponse:
        if request.writer.output_size > 0:
            # Part of an answer is out already: aiohttp's own path drops the connection.
            return super().handle_error(request, status, exc, message)
        if isinstance(exc, BadHttpMessage):
            # Hostile or broken clients: one line, not a traceback at ERROR per request.
            log.info("unparsable request from %s: %s", request.remote, exc.message.splitlines()[0][:200])
        else:
            log.error("error handling a request from %s", request.remote, exc_info=exc)
        code_status, code, text, headers = parser_error(status, exc)
        resp = error_response(code_status, text, code=code, headers=headers)
        resp.force_close()
        return resp


class JsonErrorServer(web.Server):
    """A server whose connections are JsonErrorRequestHandlers (aiohttp's Server makes plain ones)."""

    def __init__(self, handler: Any, **kwargs: Any) -> None:
        super().__init__(handler, **kwargs)
        self._handler_kwargs = {k: v for k, v in kwargs.items() if k not in ("request_factory", "handler_cancellation", "loop")}

    def __call__(self) -> web.RequestHandler:
        return JsonErrorRequestHandler(self, loop=asyncio.get_running_loop(), **self._handler_kwargs)


class JsonErrorRunner(web.AppRunner):
    """An AppRunner serving its app through a JsonErrorServer. Takes AppRunner's arguments; the
    handler ones (keepalive_timeout, access_log ...) reach every connection handler."""

    def __init__(self, app: web.Application, **kwargs: Any) -> None:
        super().__init__(app, **kwargs)
        self._server_kwargs = {k: v for k, v in kwargs.items() if k not in ("handle_signals", "shutdown_timeout")}

    async def _make_server(self) -> web.Server:
        # The app's own server (startup, freezing) tells the handler and the request factory.
        base = await super()._make_server()
        return JsonErrorServer(
            base.request_handler, request_factory=base.request_factory, **self._server_kwargs
        )
