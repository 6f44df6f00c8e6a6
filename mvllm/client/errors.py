"""The client's exceptions, one class per status a caller handles differently, built from the
router's OpenAI-form error body (`{"error": {"message", "type", "code"}}`). Pure: no I/O."""

from __future__ import annotations

import email.utils
import json
import time
from collections.abc import Mapping
from typing import Any


class MvllmError(Exception):
    """Any failed call. `status` is the HTTP status (None when no answer came), `type`, `code` and
    `message` come from the error body, `body` is that body parsed (or its text), `retry_after` the
    seconds of a `Retry-After` header, `request_id` the router's `x-request-id`."""

    def __init__(
        self,
        message: str,
        *,
        status: int | None = None,
        type: str | None = None,
        code: str | int | None = None,
        body: Any = None,
        retry_after: float | None = None,
        request_id: str | None = None,
    ) -> None:
        super().__init__(message)
        self.message = message
        self.status = status
        self.type = type
        self.code = code
        self.body = body
        self.retry_after = retry_after
        self.request_id = request_id

    def __str__(self) -> str:
        if self.status is None:
            return self.message
        code = f" {self.code}" if self.code is not None and self.code != self.status else ""
        return f"HTTP {self.status}{code}: {self.message}"


class APIConnectionError(MvllmError):
    """No HTTP answer: connection refused, name not resolved, connection dropped mid-answer."""


class APITimeoutError(APIConnectionError):
    """No answer (or no next stream chunk) within the client's timeout."""


class BadRequestError(MvllmError):
    """400, 413, 422: the request itself is wrong; sending it again will not help."""


class AuthenticationError(MvllmError):
    """401: no API key, or one the router does not know (or disabled)."""


class PermissionDeniedError(MvllmError):
    """403: a valid key that may not do this (an /admin call with a user key, a model outside its list)."""


class NotFoundError(MvllmError):
    """404: unknown model, node or path."""


class ConflictError(MvllmError):
    """409: the action does not apply now (undrain a node drained by config, sleep a stopped model)."""


class RateLimitError(MvllmError):
    """429: over a rate limit or quota of the key; `retry_after` says how long to wait (None: no wait helps)."""


class InternalServerError(MvllmError):
    """500, 502, 504 and other 5xx but 503: the router or a node failed."""


class ServiceUnavailableError(MvllmError):
    """503: no node can serve it now (all down, model loading too long, agent full); see `retry_after`."""


class ModelFailedError(ServiceUnavailableError):
    """A load that ended with the instance `failed` after the agent had answered "starting" (a load
    that fails while the agent waits is a plain 503); `instance` holds its error and engine log tail."""

    def __init__(self, message: str, *, instance: Any = None, **kw: Any) -> None:
        super().__init__(message, status=503, **kw)
        self.instance = instance


_CLASS_BY_STATUS: dict[int, type[MvllmError]] = {
    400: BadRequestError,
    401: AuthenticationError,
    403: PermissionDeniedError,
    404: NotFoundError,
    409: ConflictError,
    413: BadRequestError,
    422: BadRequestError,
    429: RateLimitError,
    503: ServiceUnavailableError,
}


def parse_retry_after(value: str | None, now: float | None = None) -> float | None:
    """Seconds from a `Retry-After` header: a number, or an HTTP date; None when absent or unreadable."""
    if not value:
        return None
    value = value.strip()
    try:
        return max(0.0, float(value))
    except ValueError:
        pass
    try:
        when = email.utils.parsedate_to_datetime(value)
    except (TypeError, ValueError):
        return None
    return max(0.0, when.timestamp() - (time.time() if now is None else now))


def _error_fields(body: Any) -> tuple[str | None, str | None, str | int | None]:
    """(message, type, code) of an OpenAI-form error, of vLLM's flat form, or of `{"detail": ...}`."""
    if not isinstance(body, Mapping):
        return None, None, None
    err = body.get("error")
    if isinstance(err, Mapping):
        body = err
    elif isinstance(err, str):
        return err, None, None
    message = body.get("message") if body.get("message") is not None else body.get("detail")
    code = body.get("code")
    return (
        str(message) if message is not None else None,
        str(body["type"]) if body.get("type") is not None else None,
        code if isinstance(code, (str, int)) and not isinstance(code, bool) else None,
    )


def error_from_response(status: int, raw: bytes | str, headers: Mapping[str, str] | None = None) -> MvllmError:
    """The exception for an error answer: its class from the status, its fields from the body."""
    text = raw.decode("utf-8", "replace") if isinstance(raw, bytes) else raw
    try:
        body: Any = json.loads(text) if text else None
    except ValueError:
        body = text
    message, type_, code = _error_fields(body)
    if not message:
        message = text.strip()[:300] or f"HTTP {status}"
    headers = headers or {}
    cls = _CLASS_BY_STATUS.get(status) or (InternalServerError if status >= 500 else MvllmError)
    return cls(
        message,
        status=status,
        type=type_,
        code=code,
        body=body,
        retry_after=parse_retry_after(headers.get("Retry-After")),
        request_id=headers.get("x-request-id"),
    )


def error_from_event(payload: Mapping[str, Any], request_id: str | None = None) -> MvllmError:
    """The exception for an error event inside a stream (the router ends a broken stream with one)."""
    message, type_, code = _error_fields(payload)
    status = code if isinstance(code, int) and 400 <= code <= 599 else 502
    cls = _CLASS_BY_STATUS.get(status) or (InternalServerError if status >= 500 else MvllmError)
    return cls(message or "the stream ended with an error", status=status, type=type_, code=code, body=dict(payload),
               request_id=request_id)  # fmt: skip
