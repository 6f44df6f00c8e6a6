"""Request validation with vLLM 0.25's error shapes, statuses and messages (pure; no I/O).

vLLM's errors are `{"error": {"message", "type", "param", "code"}}` where `type` is a class-like name
("BadRequestError", "NotFoundError", "InvalidUserInput", ...) or an HTTP phrase ("Bad Request") for
request-validation failures. Anything here raises ApiError; app.py turns it into a response.
"""

from __future__ import annotations

import json
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any

from mvllm.sim import tokenizer


class ApiError(Exception):
    def __init__(self, status: int, message: str, err_type: str = "BadRequestError", param: str | None = None):
        super().__init__(message)
        self.status = status
        self.message = message
        self.err_type = err_type
        self.param = param

    def body(self) -> dict:
        return {"error": {"message": self.message, "type": self.err_type, "param": self.param, "code": self.status}}


def validation_error(message: str, param: str | None = None, value: object = None) -> ApiError:
    """vLLM's VLLMValidationError: the message ends with `(parameter=..., value=...)`."""
    suffix = f" (parameter={param}, value={value})" if param is not None else ""
    return ApiError(400, message + suffix, "BadRequestError", param)


def bad_request_body(message: str, param: str | None = None) -> ApiError:
    """FastAPI request-validation failures: type is the HTTP phrase, as vLLM's handler sets it."""
    return ApiError(400, message, "Bad Request", param)


def not_found_model(model: str) -> ApiError:
    return ApiError(404, f"The model `{model}` does not exist.", "NotFoundError", "model")


def parse_json_object(raw: bytes, content_type: str) -> dict:
    if content_type != "application/json":
        raise bad_request_body("Unsupported Media Type: Only 'application/json' is allowed")
    try:
        body = json.loads(raw)
    except (ValueError, UnicodeDecodeError) as exc:
        raise bad_request_body(f"JSON decode error: {exc}", "body") from exc
    except RecursionError:
        # Nesting deeper than the interpreter's stack: bad input, never a 500 with a traceback.
        raise bad_request_body("JSON decode error: the body is nested too deeply", "body") from None
    if not isinstance(body, dict):
        raise bad_request_body("Input should be a valid dictionary or object to extract fields from", "body")
    # A lone surrogate (`"\ud800"`) is valid JSON but no Unicode string: vLLM's request validation
    # (pydantic) rejects it with a 400, so must we, rather than fail later on encoding it (a 500).
    # Only a `\u` escape can produce one: raw UTF-8 surrogates already failed to decode above.
    if b"\\u" in raw:
        try:
            json.dumps(body, ensure_ascii=False).encode("utf-8")
        except RecursionError:
            raise bad_request_body("JSON decode error: the body is nested too deeply", "body") from None
        except UnicodeEncodeError as exc:
            raise bad_request_body(
                f"Input should be a valid string, unable to parse raw data as a unicode string: {exc.reason}", "body"
            ) from exc
    return body


# --- typed requests -------------------------------------------------------------------------------


@dataclass
class Prompt:
    text: str  # what the deterministic text generator keys on
    token_ids: list[int]
    # A chat whose final assistant message is continued (continue_final_message): the prompt that
    # answer was begun from, and the tokens of it already written.
    answer_of: str | None = None
    answered: int = 0


@dataclass
class GenRequest:
    """A validated chat or completion request."""

    kind: str  # "chat" | "completion"
    model: str | None
    prompts: list[Prompt]
    n: int = 1
    max_tokens: int | None = None
    max_tokens_param: str = "max_tokens"
    stop: list[str] = field(default_factory=list)
    stream: bool = False
    include_usage: bool = False
    continuous_usage: bool = False
    seed: int | None = None
    ignore_eos: bool = False
    echo: bool = False


def _opt_int(body: Mapping[str, Any], key: str) -> int | None:
    v = body.get(key)
    if v is None:
        return None
    if isinstance(v, bool) or not isinstance(v, int):
        raise bad_request_body(f"Input should be a valid integer ({key})", f"body.{key}")
    return v


def _opt_bool(body: Mapping[str, Any], key: str) -> bool:
    v = body.get(key, False)
    if v is None:
        return False
    if not isinstance(v, bool):
        raise bad_request_body(f"Input should be a valid boolean ({key})", f"body.{key}")
    return v


def _common(body: Mapping[str, Any], req: GenRequest) -> None:
    model = body.get("model")
    if model is not None and not isinstance(model, str):
        raise bad_request_body("Input should be a valid string (model)", "body.model")
    req.model = model or None
    n = _opt_int(body, "n")
    if n is not None and n < 1:
        raise ApiError(400, f"n must be at least 1, got {n}.", "BadRequestError", None)
    req.n = n or 1
    temperature = body.get("temperature")
    if temperature is not None:
        if isinstance(temperature, bool) or not isinstance(temperature, (int, float)):
            raise bad_request_body("Input should be a valid number (temperature)", "body.temperature")
        if temperature < 0:
            raise validation_error(
                f"temperature must be non-negative, got {float(temperature)}.", "temperature", float(temperature)
            )
    stop = body.get("stop")
    if stop is None:
        req.stop = []
    elif isinstance(stop, str):
        req.stop = [stop]
    elif isinstance(stop, list) and all(isinstance(s, str) for s in stop):
        req.stop = list(stop)
    else:
        raise bad_request_body("Input should be a valid string or list of strings (stop)", "body.stop")
    req.stream = _opt_bool(body, "stream")
    opts = body.get("stream_options")
    if opts:
        if not req.stream:
            raise validation_error("Stream options can only be defined when `stream=True`.", "stream_options", None)
        if not isinstance(opts, dict):
            raise bad_request_body("Input should be a valid dictionary (stream_options)", "body.stream_options")
        req.include_usage = bool(opts.get("include_usage"))
        req.continuous_usage = req.include_usage and bool(opts.get("continuous_usage_stats"))
    req.seed = _opt_int(body, "seed")
    req.ignore_eos = _opt_bool(body, "ignore_eos")


def _max_tokens(body: Mapping[str, Any], req: GenRequest, keys: tuple[str, ...]) -> None:
    for key in keys:
        v = _opt_int(body, key)
        if v is not None:
            if v < 1:
                raise validation_error(f"{key} must be at least 1, got {v}.", key, v)
            req.max_tokens, req.max_tokens_param = v, key
            return


def render_chat(messages: list[dict], add_generation_prompt: bool = True, continue_final_message: bool = False) -> str:
    """The simulated chat template: `role: content` lines, then `assistant:` to answer. With
    `continue_final_message` the last message is left open, `role:` then its text, so that an
    assistant message holding the start of an answer renders as the prompt that began it plus
    that start."""
    lines = []
    last = len(messages) - 1 if continue_final_message else -1
    for i, m in enumerate(messages):
        text = message_text(m.get("content"))
        lines.append(f"{m['role']}:{text}" if i == last else f"{m['role']}: {text}\n")
    if add_generation_prompt:
        lines.append("assistant:")
    return "".join(lines)


def message_text(content: object) -> str:
    if content is None:
        return ""
    if isinstance(content, str):
        return content
    # A list of content parts: text parts count, other modalities are not modelled.
    return "\n".join(p.get("text", "") for p in content if isinstance(p, dict) and p.get("type") == "text")


def parse_messages(body: Mapping[str, Any]) -> list[dict]:
    if "messages" not in body:
        raise bad_request_body("Field required (messages)", "body.messages")
    messages = body["messages"]
    if not isinstance(messages, list):
        raise bad_request_body("Input should be a valid list (messages)", "body.messages")
    for i, m in enumerate(messages):
        if not isinstance(m, dict) or not isinstance(m.get("role"), str):
            raise bad_request_body(f"Each message needs a string 'role' (messages.{i})", f"body.messages.{i}")
        content = m.get("content")
        if content is not None and not isinstance(content, (str, list)):
            raise bad_request_body(f"Input should be a valid string or list (messages.{i}.content)",
                                   f"body.messages.{i}.content")
    return messages


def chat_prompt(messages: list[dict], add_generation_prompt: bool = True, continue_final_message: bool = False) -> Prompt:
    text = render_chat(messages, add_generation_prompt, continue_final_message)
    prompt = Prompt(text, [tokenizer.BOS_ID, *tokenizer.encode(text)])
    if continue_final_message and messages and messages[-1]["role"] == "assistant":
        prompt.answer_of = render_chat(messages[:-1])
        prompt.answered = tokenizer.count(message_text(messages[-1].get("content")))
    return prompt


def generation_prompt_flags(body: Mapping[str, Any]) -> tuple[bool, bool]:
    """(add_generation_prompt, continue_final_message), refused together as vLLM refuses them."""
    add_gen = bool(body.get("add_generation_prompt", True))
    cont = bool(body.get("continue_final_message", False))
    if add_gen and cont:
        raise bad_request_body("Value error, Cannot set both `continue_final_message` and "
                               "`add_generation_prompt` to True.", "body")
    return add_gen, cont


def text_prompt(text: str, add_special_tokens: bool = True) -> Prompt:
    ids = tokenizer.encode(text)
    return Prompt(text, [tokenizer.BOS_ID, *ids] if add_special_tokens else ids)


def token_prompt(ids: list[int]) -> Prompt:
    try:
        text = tokenizer.decode(ids)
    except ValueError as exc:
        raise validation_error(str(exc), "prompt", None) from exc
    return Prompt(text, list(ids))


def parse_chat(body: Mapping[str, Any]) -> GenRequest:
    messages = parse_messages(body)
    req = GenRequest(kind="chat", model=None, prompts=[])
    _common(body, req)
    _max_tokens(body, req, ("max_completion_tokens", "max_tokens"))
    add_gen, cont = generation_prompt_flags(body)
    req.prompts = [chat_prompt(messages, add_gen, cont)]
    return req


def parse_completion(body: Mapping[str, Any]) -> GenRequest:
    prompt = body.get("prompt")
    prompts: list[Prompt]
    if isinstance(prompt, str) and prompt:
        prompts = [text_prompt(prompt)]
    elif isinstance(prompt, list) and prompt and all(isinstance(p, str) for p in prompt):
        prompts = [text_prompt(p) for p in prompt]
    elif isinstance(prompt, list) and prompt and all(isinstance(p, int) and not isinstance(p, bool) for p in prompt):
        prompts = [token_prompt(prompt)]
    elif isinstance(prompt, list) and prompt and all(isinstance(p, list) and p for p in prompt):
        prompts = [token_prompt(p) for p in prompt]
    else:
        raise ApiError(
            400,
            "Value error, Either prompt or prompt_embeds must be provided and non-empty. (parameter=prompt)",
            "Bad Request",
            "prompt",
        )
    req = GenRequest(kind="completion", model=None, prompts=prompts)
    _common(body, req)
    _max_tokens(body, req, ("max_tokens",))
    if req.max_tokens is None and "max_tokens" not in body:
        # The completions API defaults max_tokens to 16 (OpenAI's and vLLM's default).
        req.max_tokens = 16
    req.echo = _opt_bool(body, "echo")
    return req


def check_n(req: GenRequest, max_n: int) -> None:
    """vLLM's bound on `n` (SamplingParams, VLLM_MAX_N_SEQUENCES; 16384 by default)."""
    if req.n > max_n:
        raise ApiError(400, f"n must be at most {max_n}, got {req.n}. To increase this limit, set the "
                            "VLLM_MAX_N_SEQUENCES environment variable.", "BadRequestError", None)


def check_lengths(req: GenRequest, max_model_len: int) -> None:
    """vLLM's length checks: max_tokens above the context, or prompt + max_tokens above it."""
    if req.max_tokens is not None and req.max_tokens > max_model_len:
        raise validation_error(
            f"{req.max_tokens_param}={req.max_tokens} cannot be greater than "
            f"max_model_len=max_total_tokens={max_model_len}. Please request fewer output tokens.",
            req.max_tokens_param,
            req.max_tokens,
        )
    requested = req.max_tokens or 0
    for p in req.prompts:
        if len(p.token_ids) + max(requested, 1) > max_model_len:
            raise validation_error(
                f"This model's maximum context length is {max_model_len} tokens. However, you requested "
                f"{requested} output tokens and your prompt contains {len(p.token_ids)} input tokens, "
                f"for a total of {len(p.token_ids) + requested} tokens. Please reduce the length of the "
                f"input prompt or the number of requested output tokens.",
                "input_tokens",
                len(p.token_ids),
            )


def as_text_list(value: object, name: str) -> list[str]:
    """Inputs of embeddings/score/rerank: a string or a list of strings."""
    if isinstance(value, str):
        return [value]
    if isinstance(value, list) and value and all(isinstance(v, str) for v in value):
        return list(value)
    raise bad_request_body(f"Input should be a string or a non-empty list of strings ({name})", f"body.{name}")


def responses_messages(body: Mapping[str, Any]) -> list[dict]:
    """The messages of a /v1/responses request: `instructions` as system, then `input`."""
    inp = body.get("input")
    messages: list[dict] = []
    if isinstance(body.get("instructions"), str):
        messages.append({"role": "system", "content": body["instructions"]})
    if isinstance(inp, str):
        messages.append({"role": "user", "content": inp})
    elif isinstance(inp, list) and inp:
        for item in inp:
            if not isinstance(item, dict):
                raise bad_request_body("Input items should be objects (input)", "body.input")
            content = item.get("content")
            if isinstance(content, list):
                content = "\n".join(p.get("text", "") for p in content if isinstance(p, dict))
            messages.append({"role": item.get("role", "user"), "content": content or ""})
    else:
        raise bad_request_body("Field required (input)", "body.input")
    return messages
