"""`Client`, the blocking client: every method runs the same `AsyncClient` method on a private event
loop in a daemon thread and waits for it, so both share one implementation."""

from __future__ import annotations

import asyncio
import concurrent.futures
import functools
import threading
import weakref
from collections.abc import Awaitable, Callable, Coroutine
from typing import Any, Concatenate, ParamSpec, TypeVar

from mvllm.client.aio import DEFAULT_TIMEOUT, DEFAULT_URL, AsyncClient, AsyncStream
from mvllm.client.types import Usage

P = ParamSpec("P")
R = TypeVar("R")


class _LoopThread:
    """An event loop running forever in its own daemon thread; `run` waits for a coroutine on it."""

    def __init__(self) -> None:
        self.loop = asyncio.new_event_loop()
        self._thread = threading.Thread(target=self._main, name="mvllm-client", daemon=True)
        self._thread.start()

    def _main(self) -> None:
        asyncio.set_event_loop(self.loop)
        self.loop.run_forever()

    def run(self, coro: Coroutine[Any, Any, R]) -> R:
        if threading.current_thread() is self._thread:
            coro.close()
            raise RuntimeError("a blocking mvllm Client was called from its own loop thread")
        if self.loop.is_closed():
            coro.close()
            raise RuntimeError("this mvllm Client is closed")
        future = asyncio.run_coroutine_threadsafe(coro, self.loop)
        try:
            return future.result()
        except BaseException:
            # Ctrl-C (or any interruption of the waiting thread) cancels the call on the loop too.
            future.cancel()
            raise

    def stop(self) -> None:
        if self.loop.is_closed():
            return
        self.loop.call_soon_threadsafe(self.loop.stop)
        self._thread.join(timeout=5)
        if not self._thread.is_alive():
            self.loop.close()


def _shutdown(runner: _LoopThread, aio: AsyncClient) -> None:
    if not runner.loop.is_closed() and runner.loop.is_running():
        future = asyncio.run_coroutine_threadsafe(aio.close(), runner.loop)
        try:
            future.result(timeout=5)
        except (concurrent.futures.TimeoutError, RuntimeError):
            pass
    runner.stop()


class Stream:
    """An iterator of the text deltas of one streamed chat or completion (the blocking face of
    AsyncStream): `for delta in stream`, then `stream.usage`, `stream.text`, `stream.finish_reason`.
    Leaving early: `stream.close()` or `with client.chat_stream(...) as stream:`."""

    def __init__(self, runner: _LoopThread, inner: AsyncStream) -> None:
        self._runner = runner
        self._inner = inner

    def __iter__(self) -> Stream:
        return self

    def __next__(self) -> str:
        try:
            return self._runner.run(self._inner.__anext__())
        except StopAsyncIteration:
            raise StopIteration from None

    def close(self) -> None:
        if not self._runner.loop.is_closed():
            self._runner.run(self._inner.aclose())

    def __enter__(self) -> Stream:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    @property
    def text(self) -> str:
        """The text streamed so far."""
        return self._inner.text

    @property
    def finish_reason(self) -> str | None:
        return self._inner.finish_reason

    @property
    def usage(self) -> Usage | None:
        return self._inner.usage

    @property
    def node(self) -> str | None:
        """The node that answered (the router's x-mvllm-node header)."""
        return self._inner.node

    @property
    def request_id(self) -> str | None:
        return self._inner.request_id

    @property
    def id(self) -> str | None:
        return self._inner.id

    @property
    def model(self) -> str | None:
        return self._inner.model


def _blocking(method: Callable[Concatenate[AsyncClient, P], Awaitable[R]]) -> Callable[Concatenate[Client, P], R]:
    """The blocking twin of an AsyncClient coroutine method (same name, signature and docstring)."""

    @functools.wraps(method)
    def call(self: Client, *args: P.args, **kwargs: P.kwargs) -> R:
        return self._runner.run(method(self._aio, *args, **kwargs))  # type: ignore[arg-type]

    return call


def _streaming(method: Callable[Concatenate[AsyncClient, P], AsyncStream]) -> Callable[Concatenate[Client, P], Stream]:
    @functools.wraps(method)
    def call(self: Client, *args: P.args, **kwargs: P.kwargs) -> Stream:
        return Stream(self._runner, method(self._aio, *args, **kwargs))

    return call


class Client:
    """The blocking client: the methods of `AsyncClient`, each returning its result. Safe to share
    between threads (calls run concurrently on the client's loop). `with Client(...) as c:` or
    `c.close()` ends its thread and connections; an unclosed client is closed when collected."""

    def __init__(
        self,
        base_url: str = DEFAULT_URL,
        api_key: str | None = None,
        admin_key: str | None = None,
        timeout: float = DEFAULT_TIMEOUT,
        *,
        trust_env: bool = False,
    ) -> None:
        self._aio = AsyncClient(base_url, api_key, admin_key, timeout, trust_env=trust_env)
        self._runner = _LoopThread()
        self._finalizer = weakref.finalize(self, _shutdown, self._runner, self._aio)

    @property
    def base_url(self) -> str:
        return self._aio.base_url

    def close(self) -> None:
        self._finalizer()

    def __enter__(self) -> Client:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def __repr__(self) -> str:
        return f"Client({self.base_url!r})"

    chat = _blocking(AsyncClient.chat)
    chat_stream = _streaming(AsyncClient.chat_stream)
    complete = _blocking(AsyncClient.complete)
    complete_stream = _streaming(AsyncClient.complete_stream)
    embed = _blocking(AsyncClient.embed)
    models = _blocking(AsyncClient.models)
    health = _blocking(AsyncClient.health)
    load_stats = _blocking(AsyncClient.load_stats)
    metrics_text = _blocking(AsyncClient.metrics_text)
    nodes_document = _blocking(AsyncClient.nodes_document)
    fleet = _blocking(AsyncClient.fleet)
    nodes = _blocking(AsyncClient.nodes)
    events = _blocking(AsyncClient.events)
    drain = _blocking(AsyncClient.drain)
    undrain = _blocking(AsyncClient.undrain)
    reload = _blocking(AsyncClient.reload)
    model_action = _blocking(AsyncClient.model_action)
    load = _blocking(AsyncClient.load)
    unload = _blocking(AsyncClient.unload)
    sleep = _blocking(AsyncClient.sleep)
    wake = _blocking(AsyncClient.wake)
    start_instance = _blocking(AsyncClient.start_instance)
    instances = _blocking(AsyncClient.instances)
    remove_instance = _blocking(AsyncClient.remove_instance)
    assign = _blocking(AsyncClient.assign)
    model_logs = _blocking(AsyncClient.model_logs)
    logs_stats = _blocking(AsyncClient.logs_stats)
    logs_cleanup = _blocking(AsyncClient.logs_cleanup)
    keys = _blocking(AsyncClient.keys)
    set_key_enabled = _blocking(AsyncClient.set_key_enabled)
    reset_key_usage = _blocking(AsyncClient.reset_key_usage)
    reload_keys = _blocking(AsyncClient.reload_keys)
