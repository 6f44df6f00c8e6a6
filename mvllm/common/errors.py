"""OpenAI-form error bodies (`{"error": {"message", "type", "code"}}`) for everything mvllm rejects itself."""

from __future__ import annotations

import json
from collections.abc import Mapping

from aiohttp import web

# The `type` strings follow what OpenAI and vLLM send for each status, so clients that switch on
# them (the official SDK maps status codes to exception classes) behave as they would upstream.
_TYPE_BY_STATUS = {
    400: "invalid_request_error",
    401: "authentication_error",
    403: "permission_error",
    404: "not_found_error",
    405: "invalid_request_error",
    408: "timeout_error",
    409: "conflict_error",
    413: "invalid_request_error",
    414: "invalid_request_error",
    415: "invalid_request_error",
    422: "invalid_request_error",
    429: "rate_limit_error",
    431: "invalid_request_error",
    500: "internal_server_error",
    502: "bad_gateway",
    503: "service_unavailable",
    504: "gateway_timeout",
}


def error_body(
    status: int, message: str, *, type: str | None = None, code: str | int | None = None, param: str | None = None
) -> dict:
    error: dict = {
        "message": message,
        "type": type or _TYPE_BY_STATUS.get(status, "error"),
        "code": code if code is not None else status,
    }
    if param is not None:  # the request field at fault, as OpenAI names it
        error["param"] = param
    return {"error": error}


def error_response(
    status: int,
    message: str,
    *,
    type: str | None = None,
    code: str | int | None = None,
    headers: Mapping[str, str] | None = None,
    param: str | None = None,
) -> web.Response:
    return web.Response(
        status=status,
        body=json.dumps(error_body(status, message, type=type, code=code, param=param)).encode(),
        content_type="application/json",
        headers=headers,
    )


def sse_error_event(message: str, *, type: str = "upstream_error", code: str | int = 502) -> bytes:
    """The last event of a stream that broke after its first byte: clients see why, then the end."""
    payload = json.dumps(error_body(502, message, type=type, code=code))
    return f"data: {payload}\n\ndata: [DONE]\n\n".encode()
