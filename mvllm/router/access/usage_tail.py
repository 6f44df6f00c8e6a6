"""Reading the token usage an engine reported from the tail of its answer, without parsing the answer.

vLLM puts `"usage": {...}` at the end of a JSON body and in the last event of a stream (before
`data: [DONE]`) when the client asked for `stream_options.include_usage`. The router keeps the last
few chunks it relayed (references, no copies) and looks there for the last `"usage"` object.
"""

from __future__ import annotations

import json

# How much of the end of an answer is searched: the usage object and what vLLM writes after it
# (`prompt_logprobs`, `kv_transfer_params` ...: nulls, or small) fit well within it.
TAIL_BYTES = 16 * 1024
_MARKER = b'"usage"'
_DECODER = json.JSONDecoder()


def _int(value: object) -> int | None:
    return value if isinstance(value, int) and not isinstance(value, bool) and value >= 0 else None


def usage_tokens(usage: object) -> int | None:
    """Prompt + completion tokens of a usage object (OpenAI chat/completions or Responses form)."""
    if not isinstance(usage, dict):
        return None
    total = _int(usage.get("total_tokens"))
    if total is not None:
        return total
    for a, b in (("prompt_tokens", "completion_tokens"), ("input_tokens", "output_tokens")):
        x, y = _int(usage.get(a)), _int(usage.get(b))
        if x is not None or y is not None:
            return (x or 0) + (y or 0)
    return None


def find_usage(tail: bytes) -> int | None:
    """Tokens of the last `"usage": {...}` object in the last TAIL_BYTES of `tail`, or None
    (absent, null, cut off, odd). Text inside JSON strings cannot fake it: its quotes are escaped."""
    end = len(tail)
    start = max(0, end - TAIL_BYTES)
    # A few tries backwards: a later "usage" may be a null (a stream's chunks carry `"usage": null`).
    for _ in range(4):
        at = tail.rfind(_MARKER, start, end)
        if at < 0:
            return None
        colon = at + len(_MARKER)
        text = tail[colon : colon + 4096].lstrip(b" \t\r\n")
        if text[:1] == b":":
            text = text[1:].lstrip(b" \t\r\n")
            if text[:1] == b"{":
                try:
                    obj, _ = _DECODER.raw_decode(text.decode("utf-8", "replace"))
                except ValueError:
                    obj = None
                tokens = usage_tokens(obj)
                if tokens is not None:
                    return tokens
        end = at
    return None
