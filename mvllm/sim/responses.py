"""Response bodies and SSE chunks, field for field as vLLM 0.25 serialises them (pure; no I/O).

Shapes were checked against a real vLLM 0.25.0 server (docs/simulator.md, "Fidelity"): non-streamed
bodies carry every field (nulls included, as pydantic `model_dump()`), streamed chunks only the fields
vLLM sets (`exclude_unset`), and the final usage chunk drops nulls.
"""

from __future__ import annotations

import json
import secrets
import time


def random_id() -> str:
    """vLLM's `random_uuid()`: 16 hex digits."""
    return secrets.token_hex(8)


def sse(obj: dict) -> bytes:
    return b"data: " + json.dumps(obj, ensure_ascii=False, separators=(",", ":")).encode() + b"\n\n"


SSE_DONE = b"data: [DONE]\n\n"


def usage(prompt_tokens: int, completion_tokens: int, *, details: bool = True) -> dict:
    u = {"prompt_tokens": prompt_tokens, "total_tokens": prompt_tokens + completion_tokens,
         "completion_tokens": completion_tokens}
    if details:
        u["prompt_tokens_details"] = None
    return u


def chat_response(
    req_id: str, model: str, created: int, choices: list[dict], prompt_tokens: int, completion_tokens: int,
    fingerprint: str,
) -> dict:
    return {
        "id": req_id,
        "object": "chat.completion",
        "created": created,
        "model": model,
        "choices": choices,
        "service_tier": None,
        "system_fingerprint": fingerprint,
        "usage": usage(prompt_tokens, completion_tokens),
        "prompt_logprobs": None,
        "prompt_token_ids": None,
        "prompt_text": None,
        "kv_transfer_params": None,
        "metrics": None,
    }


def chat_choice(index: int, text: str, finish_reason: str, stop_reason: str | None) -> dict:
    return {
        "index": index,
        "message": {
            "role": "assistant",
            "content": text,
            "refusal": None,
            "annotations": None,
            "audio": None,
            "function_call": None,
            "reasoning": None,
        },
        "logprobs": None,
        "finish_reason": finish_reason,
        "stop_reason": stop_reason,
        "token_ids": None,
        "routed_experts": None,
    }


def completion_response(
    req_id: str, model: str, created: int, choices: list[dict], prompt_tokens: int, completion_tokens: int,
    fingerprint: str,
) -> dict:
    return {
        "id": req_id,
        "object": "text_completion",
        "created": created,
        "model": model,
        "choices": choices,
        "service_tier": None,
        "system_fingerprint": fingerprint,
        "usage": usage(prompt_tokens, completion_tokens),
        "kv_transfer_params": None,
        "metrics": None,
    }


def completion_choice(index: int, text: str, finish_reason: str, stop_reason: str | None) -> dict:
    return {
        "index": index,
        "text": text,
        "logprobs": None,
        "finish_reason": finish_reason,
        "stop_reason": stop_reason,
        "token_ids": None,
        "prompt_logprobs": None,
        "prompt_token_ids": None,
        "routed_experts": None,
    }


class ChunkWriter:
    """Builds the SSE chunks of one streamed request (chat or completion)."""

    def __init__(self, kind: str, req_id: str, model: str, fingerprint: str, *, include_usage: bool,
                 continuous_usage: bool) -> None:
        self.kind = kind
        self.req_id = req_id
        self.model = model
        self.created = int(time.time())
        self.fingerprint = fingerprint
        self.include_usage = include_usage
        self.continuous_usage = continuous_usage
        self.object = "chat.completion.chunk" if kind == "chat" else "text_completion"

    def _head(self, choices: list[dict]) -> dict:
        return {"id": self.req_id, "object": self.object, "created": self.created, "model": self.model,
                "choices": choices}

    def role(self, index: int, prompt_tokens: int) -> bytes:
        """Chat only: the first chunk of each choice, sent with the first token."""
        chunk = self._head([{"index": index, "delta": {"role": "assistant", "content": ""}, "logprobs": None,
                             "finish_reason": None}])
        if self.continuous_usage:
            chunk["usage"] = usage(prompt_tokens, 0, details=False)
        chunk["prompt_token_ids"] = None
        chunk["prompt_text"] = None
        return sse(chunk)

    def token(self, index: int, text: str, finish_reason: str | None, stop_reason: str | None,
              prompt_tokens: int, completion_tokens: int) -> bytes:
        if self.kind == "chat":
            choice: dict = {"index": index, "delta": {"content": text}, "logprobs": None,
                            "finish_reason": finish_reason}
            if finish_reason is not None:
                choice["stop_reason"] = stop_reason
            choice["token_ids"] = None
        else:
            choice = {"index": index, "text": text, "logprobs": None, "finish_reason": finish_reason,
                      "stop_reason": stop_reason, "prompt_token_ids": None, "token_ids": None}
        chunk = self._head([choice])
        if self.continuous_usage:
            chunk["usage"] = usage(prompt_tokens, completion_tokens, details=False)
        if finish_reason is not None and not self.include_usage:
            chunk["system_fingerprint"] = self.fingerprint
        return sse(chunk)

    def final_usage(self, prompt_tokens: int, completion_tokens: int) -> bytes:
        chunk = self._head([])
        chunk["usage"] = usage(prompt_tokens, completion_tokens, details=False)
        chunk["system_fingerprint"] = self.fingerprint
        return sse(chunk)


def model_card(model_id: str, root: str | None, parent: str | None, max_model_len: int | None, created: int) -> dict:
    return {
        "id": model_id,
        "object": "model",
        "created": created,
        "owned_by": "vllm",
        "root": root,
        "parent": parent,
        "max_model_len": max_model_len,
        "permission": [
            {
                "id": f"modelperm-{random_id()}",
                "object": "model_permission",
                "created": created,
                "allow_create_engine": False,
                "allow_sampling": True,
                "allow_logprobs": True,
                "allow_search_indices": False,
                "allow_view": True,
                "allow_fine_tuning": False,
                "organization": "*",
                "group": None,
                "is_blocking": False,
            }
        ],
    }
