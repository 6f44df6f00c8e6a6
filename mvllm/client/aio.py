"""`AsyncClient`: the one implementation of every call to a router (aiohttp, one pooled session per
client); the sync `Client` runs it on a private loop thread."""

from __future__ import annotations

import asyncio
import collections
import json
import time
from collections.abc import Awaitable, Callable, Mapping, Sequence
from dataclasses import dataclass
from typing import Any
from urllib.parse import quote

import aiohttp

from mvllm import __version__
from mvllm.client.errors import (
    APIConnectionError,
    APITimeoutError,
    ModelFailedError,
    MvllmError,
    error_from_response,
)
from mvllm.client.sse import SSEDecoder, StreamAccumulator
from mvllm.client.types import (
    ChatCompletion,
    Completion,
    EventPage,
    FleetView,
    Health,
    InstanceInfo,
    ModelInfo,
    NodeInfo,
    ReloadResult,
    Usage,
    build_fleet,
    chat_completion_from,
    completion_from,
    event_page_from,
    health_from,
    instance_from,
    models_from,
    node_from_entry,
    reload_result_from,
    vectors_from,
)

DEFAULT_URL = "http://127.0.0.1:8888"
DEFAULT_TIMEOUT = 600.0
# A model load may take minutes on a real GPU (weights download, CUDA graphs).
DEFAULT_MODEL_ACTION_TIMEOUT = 900.0
MODEL_ACTIONS = ("load", "unload", "sleep", "wake")
NODE_HEADER = "x-mvllm-node"
REQUEST_ID_HEADER = "x-request-id"
# While a load is still starting after the router answered, how often its state is read again.
_POLL_S = 0.5
_MOVING = ("starting", "stopping")

Messages = Sequence[Mapping[str, Any]]


def normalize_url(url: str) -> str:
    """`host:port`, `http://host:port/` and the OpenAI-style `.../v1` all name the router's root."""
    url = url.strip().rstrip("/")
    if "://" not in url:
        url = "http://" + url
    if url.endswith("/v1"):
        url = url[: -len("/v1")]
    return url


@dataclass
class _Answer:
    status: int
    headers: Mapping[str, str]
    body: bytes

    def json(self) -> Any:
        return json.loads(self.body) if self.body else None


class AsyncStream:
    """An async iterator of the text deltas of one streamed chat or completion. The request starts
    at the first `__anext__`; `text`, `finish_reason`, `usage`, `node` and `request_id` are filled
    while it runs. Leaving early: `await stream.aclose()` or `async with` (the router then cancels
    the request upstream)."""

    def __init__(self, opener: Callable[[], Awaitable[aiohttp.ClientResponse]], kind: str, describe: Callable[[BaseException], MvllmError]) -> None:
        self._opener = opener
        self._describe = describe
        self._acc = StreamAccumulator(kind)
        self._sse = SSEDecoder()
        self._pending: collections.deque[str] = collections.deque()
        self._resp: aiohttp.ClientResponse | None = None
        self._closed = False
        self.node: str | None = None
        self.request_id: str | None = None

    # -- facts of the stream -------------------------------------------------------------------------

    @property
    def text(self) -> str:
        return self._acc.text

    @property
    def finish_reason(self) -> str | None:
        return self._acc.finish_reason

    @property
    def usage(self) -> Usage | None:
        """Token counts, sent by the server after the last delta (chat_stream asks for them)."""
        return self._acc.usage

    @property
    def id(self) -> str | None:
        return self._acc.id

    @property
    def model(self) -> str | None:
        return self._acc.model

    # -- iteration -----------------------------------------------------------------------------------

    def __aiter__(self) -> AsyncStream:
        return self

    async def __anext__(self) -> str:
        try:
            while True:
                while self._pending:
                    delta = self._acc.add(self._pending.popleft(), self.request_id)
                    if self._acc.done:
                        break
                    if delta:
                        return delta
                if self._closed or self._acc.done:
                    await self.aclose()
                    raise StopAsyncIteration
                await self._read_more()
        except StopAsyncIteration:
            raise
        except BaseException:
            await self.aclose()
            raise

    async def _read_more(self) -> None:
        try:
            if self._resp is None:
                self._resp = await self._opener()
                self.node = self._resp.headers.get(NODE_HEADER)
                self.request_id = self._resp.headers.get(REQUEST_ID_HEADER)
            chunk = await self._resp.content.readany()
        except (aiohttp.ClientError, asyncio.TimeoutError, OSError) as exc:
            raise self._describe(exc) from exc
        if chunk:
            self._pending.extend(self._sse.feed(chunk))
        else:  # the server closed the stream
            self._pending.extend(self._sse.end())
            self._closed = True
            if not self._pending and not self._acc.done and not self._acc.finish_reason:
                raise APIConnectionError("the stream ended before its last event (connection closed)")

    async def aclose(self) -> None:
        self._closed = True
        self._pending.clear()
        if self._resp is not None:
            # A stream left half-read must not go back to the pool: close its connection.
            if not self._acc.done:
                self._resp.close()
            self._resp.release()

    async def __aenter__(self) -> AsyncStream:
        return self

    async def __aexit__(self, *exc: object) -> None:
        await self.aclose()


class AsyncClient:
    """A router's OpenAI API, its observability endpoints and its admin API, from asyncio code.

    `api_key` goes with /v1 calls, `admin_key` with /admin calls (each falls back to the other, and
    /health, /load-stats, /metrics take whichever is set), as `Authorization: Bearer`. `timeout` is
    the limit of one call in seconds (for a stream: of each wait for its next bytes). Use it as
    `async with AsyncClient(...) as c:` or call `await c.close()`; one client serves any number of
    concurrent calls over one connection pool.
    """

    def __init__(
        self,
        base_url: str = DEFAULT_URL,
        api_key: str | None = None,
        admin_key: str | None = None,
        timeout: float = DEFAULT_TIMEOUT,
        *,
        trust_env: bool = False,
    ) -> None:
        self.base_url = normalize_url(base_url)
        self.timeout = timeout
        self._api_key = api_key
        self._admin_key = admin_key
        # No proxy from the environment unless asked: a router is usually addressed directly.
        self._trust_env = trust_env
        self._session: aiohttp.ClientSession | None = None

    async def __aenter__(self) -> AsyncClient:
        return self

    async def __aexit__(self, *exc: object) -> None:
        await self.close()

    async def close(self) -> None:
        if self._session is not None:
            await self._session.close()
            self._session = None

    def __repr__(self) -> str:  # never the keys
        return f"AsyncClient({self.base_url!r})"

    # -- transport -----------------------------------------------------------------------------------

    @property
    def _http(self) -> aiohttp.ClientSession:
        if self._session is None or self._session.closed:
            self._session = aiohttp.ClientSession(
                headers={"User-Agent": f"mvllm-client/{__version__}"},
                trust_env=self._trust_env,
                cookie_jar=aiohttp.DummyCookieJar(),
            )
        return self._session

    def _headers(self, path: str) -> dict[str, str]:
        key = (self._admin_key or self._api_key) if path.startswith("/admin") else (self._api_key or self._admin_key)
        return {"Authorization": f"Bearer {key}"} if key else {}

    def _connection_error(self, exc: BaseException, timeout: float | None) -> MvllmError:
        if isinstance(exc, asyncio.TimeoutError):
            return APITimeoutError(f"router {self.base_url} unreachable: no answer within {timeout:g} s (timed out)")
        if isinstance(exc, aiohttp.ClientPayloadError):
            return APIConnectionError(f"router {self.base_url}: the answer broke off ({exc})")
        return APIConnectionError(f"router {self.base_url} unreachable: {str(exc) or type(exc).__name__}")

    async def _call(
        self,
        method: str,
        path: str,
        *,
        json_body: Any = None,
        params: Mapping[str, str] | None = None,
        timeout: float | None = None,
    ) -> _Answer:
        """One request; the whole answer on 2xx, else the exception for its status."""
        limit = self.timeout if timeout is None else timeout
        try:
            async with self._http.request(
                method,
                self.base_url + path,
                json=json_body,
                params=params,
                headers=self._headers(path),
                timeout=aiohttp.ClientTimeout(total=limit),
            ) as resp:
                body = await resp.read()
                if resp.status >= 400:
                    raise error_from_response(resp.status, body, resp.headers)
                return _Answer(resp.status, resp.headers, body)
        except (aiohttp.ClientError, asyncio.TimeoutError, OSError) as exc:
            raise self._connection_error(exc, limit) from exc

    async def _json(self, method: str, path: str, **kw: Any) -> tuple[Any, Mapping[str, str]]:
        answer = await self._call(method, path, **kw)
        try:
            return answer.json(), answer.headers
        except ValueError:
            raise MvllmError(f"{path} answered something that is not JSON: {answer.body[:200]!r}",
                             status=answer.status) from None  # fmt: skip

    def _stream(self, path: str, body: dict[str, Any], kind: str) -> AsyncStream:
        limit = self.timeout

        async def open_stream() -> aiohttp.ClientResponse:
            resp = await self._http.post(
                self.base_url + path,
                json=body,
                headers={**self._headers(path), "Accept": "text/event-stream"},
                # Between bytes, not in total: a long generation is fine while tokens keep coming.
                timeout=aiohttp.ClientTimeout(total=None, sock_connect=limit, sock_read=limit),
            )
            if resp.status >= 400:
                try:
                    raw = await resp.read()
                finally:
                    resp.release()
                raise error_from_response(resp.status, raw, resp.headers)
            return resp

        return AsyncStream(open_stream, kind, lambda exc: self._connection_error(exc, limit))

    # -- OpenAI API ----------------------------------------------------------------------------------

    async def chat(self, model: str, messages: Messages, **params: Any) -> ChatCompletion:
        """POST /v1/chat/completions; `params` are the request's other fields (max_tokens, temperature …)."""
        data, headers = await self._json("POST", "/v1/chat/completions", json_body=_body(model, messages=messages, **params))
        return chat_completion_from(data, headers.get(NODE_HEADER), headers.get(REQUEST_ID_HEADER))

    def chat_stream(self, model: str, messages: Messages, **params: Any) -> AsyncStream:
        """The same, streamed: iterate it for the text deltas (`async for` here, `for` with `Client`);
        `usage` is asked for and set once the stream ends."""
        params.setdefault("stream_options", {"include_usage": True})
        return self._stream("/v1/chat/completions", _body(model, messages=messages, stream=True, **params), "chat")

    async def complete(self, model: str, prompt: str | list[str], **params: Any) -> Completion:
        """POST /v1/completions."""
        data, headers = await self._json("POST", "/v1/completions", json_body=_body(model, prompt=prompt, **params))
        return completion_from(data, headers.get(NODE_HEADER), headers.get(REQUEST_ID_HEADER))

    def complete_stream(self, model: str, prompt: str, **params: Any) -> AsyncStream:
        """POST /v1/completions, streamed, as chat_stream."""
        params.setdefault("stream_options", {"include_usage": True})
        return self._stream("/v1/completions", _body(model, prompt=prompt, stream=True, **params), "completion")

    async def embed(self, model: str, input: str | Sequence[str], **params: Any) -> list[list[float]]:
        """POST /v1/embeddings: one vector per input (a single string gives a list of one)."""
        items = input if isinstance(input, str) else list(input)
        data, _ = await self._json("POST", "/v1/embeddings", json_body=_body(model, input=items, **params))
        return vectors_from(data)

    async def models(self) -> list[ModelInfo]:
        """GET /v1/models: every model some node serves or an agent can load."""
        data, _ = await self._json("GET", "/v1/models")
        return models_from(data)

    # -- observability -------------------------------------------------------------------------------

    async def health(self) -> Health:
        data, _ = await self._json("GET", "/health")
        return health_from(data)

    async def load_stats(self) -> dict[str, Any]:
        """GET /load-stats as JSON (what the dashboard reads without admin rights; `build_fleet` types it)."""
        data, _ = await self._json("GET", "/load-stats")
        return data

    async def metrics_text(self) -> str:
        """GET /metrics, the Prometheus text."""
        answer = await self._call("GET", "/metrics")
        return answer.body.decode("utf-8", "replace")

    # -- admin: reads --------------------------------------------------------------------------------

    async def nodes_document(self) -> dict[str, Any]:
        """GET /admin/nodes as JSON (`mvllm ps --json` prints it)."""
        data, _ = await self._json("GET", "/admin/nodes")
        return data

    async def fleet(self) -> FleetView:
        """Nodes, models (where each is awake, asleep, loadable), agents' GPUs and totals."""
        return build_fleet(await self.nodes_document())

    async def nodes(self) -> list[NodeInfo]:
        return (await self.fleet()).nodes

    async def events(self, since: int = 0, limit: int | None = None) -> EventPage:
        """GET /admin/events: the router's log records after sequence number `since`."""
        params = {"since": str(since)}
        if limit:
            params["limit"] = str(limit)
        data, _ = await self._json("GET", "/admin/events", params=params)
        return event_page_from(data)

    # -- admin: actions ------------------------------------------------------------------------------

    async def drain(self, node: str) -> NodeInfo:
        """No new requests go to `node`; those in flight finish (`in_flight` says how many)."""
        data, _ = await self._json("POST", f"/admin/nodes/{quote(node, safe='')}/drain")
        return node_from_entry(data)

    async def undrain(self, node: str) -> NodeInfo:
        data, _ = await self._json("POST", f"/admin/nodes/{quote(node, safe='')}/undrain")
        return node_from_entry(data)

    async def reload(self) -> ReloadResult:
        """Re-read servers.toml now; an invalid file raises BadRequestError and the old config stays."""
        data, _ = await self._json("POST", "/admin/reload")
        return reload_result_from(data)

    async def model_action(
        self,
        action: str,
        model: str,
        *,
        node: str | None = None,
        level: int | None = None,
        wait: bool = True,
        timeout: float | None = DEFAULT_MODEL_ACTION_TIMEOUT,
    ) -> dict[str, Any]:
        """One POST /admin/models/{model}/{action}: the agent's answer (its instance) as JSON, with
        the node that acted under `node`."""
        data, node_name = await self._model_call(action, model, node=node, level=level, wait=wait, timeout=timeout)
        return {**data, "node": node_name} if isinstance(data, dict) and node_name else data

    async def _model_call(
        self, action: str, model: str, *, node: str | None, level: int | None, wait: bool, timeout: float | None
    ) -> tuple[Any, str | None]:
        if action not in MODEL_ACTIONS:
            raise ValueError(f"unknown model action {action!r} (one of {', '.join(MODEL_ACTIONS)})")
        params: dict[str, str] = {}
        if node:
            params["node"] = node
        if level is not None:
            params["level"] = str(level)
        if not wait:
            params["wait"] = "false"
        data, headers = await self._json(
            "POST", f"/admin/models/{quote(model, safe='')}/{action}", params=params or None, timeout=timeout
        )
        picked = headers.get(NODE_HEADER)
        return data, (picked if picked and picked != "-" else node)

    async def load(
        self, model: str, node: str | None = None, wait: bool = True, timeout: float = DEFAULT_MODEL_ACTION_TIMEOUT
    ) -> InstanceInfo:
        """Load `model` on an agent (`node`, or the one the router picks). With `wait`, return when it
        is ready (ModelFailedError if it fails); without, as soon as it is starting."""
        t0 = time.monotonic()
        data, where = await self._model_call("load", model, node=node, level=None, wait=wait, timeout=timeout)
        inst = instance_from(data, where)
        if wait and inst.state in _MOVING:
            # The agent gave up waiting (its load_timeout) before the engine was ready: keep watching.
            inst = await self._settle(model, inst, deadline=t0 + timeout)
        if inst.state == "failed":
            raise ModelFailedError(f"load {model} failed: {inst.error or 'the engine failed'}", instance=inst)
        return inst

    async def unload(self, model: str, node: str | None = None, timeout: float = DEFAULT_MODEL_ACTION_TIMEOUT) -> InstanceInfo:
        """Stop the model's engine (in-flight requests get the agent's drain time to finish)."""
        data, where = await self._model_call("unload", model, node=node, level=None, wait=True, timeout=timeout)
        return instance_from(data, where)

    async def sleep(
        self, model: str, level: int | None = None, node: str | None = None, timeout: float = DEFAULT_MODEL_ACTION_TIMEOUT
    ) -> InstanceInfo:
        """vLLM sleep mode: level 1 keeps the weights in CPU RAM (fast wake), level 2 discards them;
        without a level, the agent uses the model's `sleep_level_on_idle`."""
        data, where = await self._model_call("sleep", model, node=node, level=level, wait=True, timeout=timeout)
        return instance_from(data, where)

    async def wake(self, model: str, node: str | None = None, timeout: float = DEFAULT_MODEL_ACTION_TIMEOUT) -> InstanceInfo:
        data, where = await self._model_call("wake", model, node=node, level=None, wait=True, timeout=timeout)
        return instance_from(data, where)

    # -- admin: ad-hoc instances and re-assignment (mvllm.router.admin.instances) -----------------------

    async def start_instance(
        self,
        model: str,
        *,
        node: str | None = None,
        params: Mapping[str, Any] | None = None,
        wait: bool = True,
        timeout: float | None = DEFAULT_MODEL_ACTION_TIMEOUT,
        **fields: Any,
    ) -> dict[str, Any]:
        """POST /admin/instances: an engine for `model` outside any catalog, with vLLM flags
        `params` (checked against the agent's allow-list); `fields`: name, served_model_name,
        devices, ttl, memory_gib. The agent's answer once it is ready (or starting, without
        `wait`), with `node`."""
        body = {"model": model, "params": dict(params or {}), **{k: v for k, v in fields.items() if v is not None}}
        if node:
            body["node"] = node
        query = None if wait else {"wait": "false"}
        data, _ = await self._json("POST", "/admin/instances", json_body=body, params=query, timeout=timeout)
        return data

    async def instances(self, node: str | None = None) -> dict[str, Any]:
        """GET /admin/instances: `{"instances": [...], "errors": {agent: why}}`."""
        data, _ = await self._json("GET", "/admin/instances", params={"node": node} if node else None)
        return data

    async def remove_instance(
        self, name: str, node: str | None = None, timeout: float | None = DEFAULT_MODEL_ACTION_TIMEOUT
    ) -> dict[str, Any]:
        """DELETE /admin/instances/{name}: drain, stop and forget an ad-hoc instance."""
        data, _ = await self._json(
            "DELETE", f"/admin/instances/{quote(name, safe='')}", params={"node": node} if node else None, timeout=timeout
        )
        return data

    async def assign(
        self,
        model: str,
        node: str | None = None,
        *,
        restart: bool = False,
        timeout: float | None = DEFAULT_MODEL_ACTION_TIMEOUT,
        **changes: Any,
    ) -> dict[str, Any]:
        """POST /admin/models/{model}/assign: change devices, gpu_memory_utilization, memory_gib,
        max_model_len, max_num_seqs or extra_args of a catalog model (saved in agent.toml)."""
        body = {**changes, "restart": restart}
        data, _ = await self._json(
            "POST", f"/admin/models/{quote(model, safe='')}/assign", json_body=body,
            params={"node": node} if node else None, timeout=timeout,
        )  # fmt: skip
        return data

    # -- admin: logs (mvllm.router.admin.logs) ------------------------------------------------------------

    async def model_logs(
        self, model: str, node: str | None = None, *, tail: int | None = None, cursor: str | None = None
    ) -> dict[str, Any]:
        """GET /admin/models/{model}/logs: the engine log's last `tail` lines, or what was written
        after `cursor` (the `cursor` of a previous answer): {text, cursor, more, skipped, node, instance}."""
        params = {k: str(v) for k, v in (("node", node), ("tail", tail), ("cursor", cursor)) if v is not None}
        data, _ = await self._json("GET", f"/admin/models/{quote(model, safe='')}/logs", params=params or None)
        return data

    async def logs_stats(self) -> dict[str, Any]:
        """GET /admin/logs/stats: the router's log files and every agent's, with sizes."""
        data, _ = await self._json("GET", "/admin/logs/stats")
        return data

    async def logs_cleanup(self, days: float | None = None) -> dict[str, Any]:
        """POST /admin/logs/cleanup: remove log files older than `days` (default: each part's log_retention_days)."""
        data, _ = await self._json("POST", "/admin/logs/cleanup", params={"days": f"{days:g}"} if days is not None else None)
        return data

    # -- admin: API keys (mvllm.router.admin.keys) ----------------------------------------------------------

    async def keys(self) -> dict[str, Any]:
        """GET /admin/keys: `{"open", "day", "keys": [{name, hint, role, enabled, enabled_in_file,
        override, models, limits, quota, usage, quota_left}], "usage_file"}` (never a secret)."""
        data, _ = await self._json("GET", "/admin/keys")
        return data

    async def set_key_enabled(self, name: str, enabled: bool) -> dict[str, Any]:
        """Enable or disable a key at run time (kept over restarts and reloads that leave the key as
        it is); the key's /admin/keys entry."""
        action = "enable" if enabled else "disable"
        data, _ = await self._json("POST", f"/admin/keys/{quote(name, safe='')}/{action}")
        return data

    async def reset_key_usage(self, name: str) -> dict[str, Any]:
        """Zero a key's quota counters, tokens and denials; its /admin/keys entry."""
        data, _ = await self._json("POST", f"/admin/keys/{quote(name, safe='')}/reset-usage")
        return data

    async def reload_keys(self) -> dict[str, Any]:
        """Re-read the keys file now: `{ok, keys, added, removed, changed}`; an invalid file raises
        BadRequestError and the keys in force stay."""
        data, _ = await self._json("POST", "/admin/reload-keys")
        return data

    async def _settle(self, model: str, inst: InstanceInfo, deadline: float) -> InstanceInfo:
        while inst.state in _MOVING:
            if time.monotonic() > deadline:
                raise APITimeoutError(f"{model} on {inst.node or 'its agent'} still {inst.state} at the time limit")
            await asyncio.sleep(_POLL_S)
            seen = (await self.fleet()).find_instance(model, inst.node or None)
            if seen is not None:
                inst = seen
        return inst


def _body(model: str, **fields: Any) -> dict[str, Any]:
    if not isinstance(model, str) or not model:
        raise ValueError("model must be a non-empty string")
    return {"model": model, **fields}
