"""HTTP edge helpers shared by the router and the agent: which headers a proxy must not copy, and
how a request body is read far enough to route it (a JSON object, or a multipart form's field).
"""

from __future__ import annotations

import json
from collections.abc import Iterable, Mapping
from typing import Any

import orjson
from multidict import CIMultiDict

# Hop-by-hop headers (RFC 9110 §7.6.1): they describe one connection, so a proxy never copies them.
HOP_BY_HOP = frozenset(
    {"connection", "keep-alive", "proxy-authenticate", "proxy-authorization", "te", "trailer", "trailers",
     "transfer-encoding", "upgrade"}
)


# The deepest nesting a routed JSON body may have. orjson parses up to 1,024 levels, but the engine
# behind may not (Python's json hits its recursion limit near 1,000), and no OpenAI request needs
# more than a few dozen (a tool's JSON schema is the deepest): deeper is hostile, answered 400 here.
MAX_JSON_DEPTH = 128


class BodyError(ValueError):
    """A request body that cannot be routed: `message` is for the client, `code` its error code."""

    def __init__(self, message: str, code: str = "invalid_json") -> None:
        super().__init__(message)
        self.message = message
        self.code = code


def connection_tokens(src: Mapping[str, str]) -> frozenset[str]:
    """The header names a `Connection` header lists: hop-by-hop for this one message too."""
    value = src.get("Connection", "")
    if not value:
        return frozenset()
    return frozenset(t.strip().lower() for t in value.split(",") if t.strip())


def copy_headers(src: Mapping[str, str], drop: Iterable[str] | frozenset[str]) -> CIMultiDict[str]:
    """`src` minus the lower-case names in `drop` and those its Connection header names."""
    extra = connection_tokens(src)
    out: CIMultiDict[str] = CIMultiDict()
    for k, v in src.items():
        lk = k.lower()
        if lk in drop or lk in extra:
            continue
        out.add(k, v)
    return out


def json_object(body: bytes | str) -> dict[str, Any]:
    """The body as a JSON object, or BodyError. orjson parses the common case; what it refuses
    (integers past 64 bits, NaN) goes to the standard library, which accepts what vLLM accepts.
    Nesting too deep for either (RecursionError) is bad input, not a crash."""
    try:
        doc = orjson.loads(body)
    except orjson.JSONDecodeError:
        try:
            doc = json.loads(body)
        except (ValueError, RecursionError, UnicodeDecodeError, TypeError):
            raise BodyError("the request body is not valid JSON (or is nested too deeply)") from None
    if not isinstance(doc, dict):
        raise BodyError("the request body must be a JSON object")
    # Only a body with that many brackets can be that deep: the count runs at C speed, the walk
    # only for the rare large document.
    brackets = body.count("[") + body.count("{") if isinstance(body, str) else body.count(b"[") + body.count(b"{")
    if brackets > MAX_JSON_DEPTH and too_deep(doc, MAX_JSON_DEPTH):
        raise BodyError(f"the request body is nested more than {MAX_JSON_DEPTH} levels deep")
    return doc


def too_deep(doc: Any, limit: int) -> bool:
    """Whether `doc` nests arrays/objects more than `limit` levels (iterative: no recursion to blow)."""
    stack: list[tuple[Any, int]] = [(doc, 1)]
    while stack:
        value, depth = stack.pop()
        if depth > limit:
            return True
        if isinstance(value, dict):
            stack.extend((v, depth + 1) for v in value.values() if isinstance(v, (dict, list)))
        elif isinstance(value, list):
            stack.extend((v, depth + 1) for v in value if isinstance(v, (dict, list)))
    return False


def multipart_field(body: bytes, content_type: str, name: str) -> str | None:
    """The text of form field `name` in a multipart/form-data body (audio uploads carry `model`
    this way), or None when the boundary or the field is missing."""
    boundary = None
    for param in content_type.split(";")[1:]:
        key, _, value = param.strip().partition("=")
        if key.lower() == "boundary":
            boundary = value.strip().strip('"')
    if not boundary:
        return None
    marker = f'name="{name}"'.encode()
    for part in body.split(b"--" + boundary.encode()):
        head, sep, value = part.partition(b"\r\n\r\n")
        if sep and marker in head:
            # A part's value ends with the CRLF that precedes the next boundary.
            if value.endswith(b"\r\n"):
                value = value[:-2]
            return value.decode("utf-8", "replace").strip()
    return None


def is_multipart(content_type: str) -> bool:
    return content_type.startswith("multipart/form-data")
