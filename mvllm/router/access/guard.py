"""Request hygiene before auth and routing: paths with dot segments or control characters, methods
no engine serves on proxied paths, and header values that cannot be relayed; each an OpenAI-form error.

Why dot segments matter: the upstream URL is `node.url + path`, and URL normalisation turns
`/v1/../sleep` (or `/v1/%2e%2e/sleep`) into the engine's unauthenticated `/sleep`.
"""

from __future__ import annotations

from typing import Any

from aiohttp import web

from mvllm.common.errors import error_response
from mvllm.router.proxy import is_proxied_path

# What the OpenAI API and vLLM's aliases use; anything else (TRACE, CONNECT, WebDAV ...) is 405
# on proxied paths. OPTIONS is answered here: CORS preflight is not relayed (docs/security.md).
PROXY_METHODS = frozenset({"GET", "HEAD", "POST", "PUT", "PATCH", "DELETE"})
ALLOW = "GET, HEAD, POST, PUT, PATCH, DELETE, OPTIONS"


def path_problem(path: str) -> str | None:
    """Why a decoded request path must be refused, or None. Pure."""
    if not path.isprintable():
        return "the path contains control characters"
    if "/." in path:
        for segment in path.split("/"):
            if segment in (".", ".."):
                return "the path contains '.' or '..' segments"
    return None


def header_problem(headers: Any) -> str | None:
    """A header value that is not valid UTF-8 (aiohttp keeps such bytes as surrogates) cannot be
    relayed to a node; refuse it here rather than fail later. Pure."""
    for name, value in headers.items():
        if not value.isascii():
            try:
                value.encode("utf-8")
            except UnicodeEncodeError:
                return f"the value of header '{name.encode('utf-8', 'backslashreplace').decode()}' is not valid UTF-8"
    return None


def guard_check(request: web.Request) -> web.StreamResponse | None:
    """The answer refusing `request` (400, 405, or 204 to OPTIONS), or None to go on."""
    path = request.path
    problem = path_problem(path)
    if problem is not None:
        return error_response(400, f"invalid request path: {problem}", code="invalid_path")
    problem = header_problem(request.headers)
    if problem is not None:
        return error_response(400, f"invalid request header: {problem}", code="invalid_header")
    if is_proxied_path(path):
        method = request.method
        if method not in PROXY_METHODS:
            if method == "OPTIONS":
                return web.Response(status=204, headers={"Allow": ALLOW})
            return error_response(
                405, f"method {method} is not allowed on {path}", code="method_not_allowed", headers={"Allow": ALLOW}
            )
    return None
