"""Python client of an mvllm router: its OpenAI API (chat, completions, embeddings, models, with
streaming), its health and load, and its admin API (nodes, drain, reload, model load/sleep/wake),
with typed results and one exception class per kind of failure.

    from mvllm.client import Client
    with Client("http://127.0.0.1:8888") as c:
        print(c.chat("mvllm-demo", [{"role": "user", "content": "Hello!"}]).text)

Design: `AsyncClient` (aiohttp, already a dependency) is the only implementation of request
building, transport and response parsing. The blocking `Client` runs those same coroutines on a
private event loop in a daemon thread and waits for each. Why not a second transport on
urllib/http.client: two transports would mean two sets of timeout, connection-error and streaming
behaviours to keep equal; a loop thread gives one behaviour, a pooled session shared safely by
any number of caller threads, and works where the caller already runs an event loop (Jupyter),
where `asyncio.run` would refuse. Its cost is one thread per `Client` and a thread hop per call
or stream chunk (measured: /health took 0.69 ms through `Client` against 0.32 ms through
`AsyncClient`, on a busy 2-core VM; small next to a generation). The pure parts (error bodies, SSE
decoding, typed results) live in `errors`, `sse` and `types`.
"""

from __future__ import annotations

from mvllm.client.aio import DEFAULT_TIMEOUT, DEFAULT_URL, AsyncClient, AsyncStream, normalize_url
from mvllm.client.errors import (
    APIConnectionError,
    APITimeoutError,
    AuthenticationError,
    BadRequestError,
    ConflictError,
    InternalServerError,
    ModelFailedError,
    MvllmError,
    NotFoundError,
    PermissionDeniedError,
    RateLimitError,
    ServiceUnavailableError,
)
from mvllm.client.sync import Client, Stream
from mvllm.client.types import (
    ChatChoice,
    ChatCompletion,
    Completion,
    CompletionChoice,
    Event,
    EventPage,
    FleetView,
    GpuInfo,
    Health,
    InstanceInfo,
    Message,
    ModelInfo,
    NodeInfo,
    ReloadResult,
    Usage,
)

__all__ = [
    "DEFAULT_TIMEOUT",
    "DEFAULT_URL",
    "APIConnectionError",
    "APITimeoutError",
    "AsyncClient",
    "AsyncStream",
    "AuthenticationError",
    "BadRequestError",
    "ChatChoice",
    "ChatCompletion",
    "Client",
    "Completion",
    "CompletionChoice",
    "ConflictError",
    "Event",
    "EventPage",
    "FleetView",
    "GpuInfo",
    "Health",
    "InstanceInfo",
    "InternalServerError",
    "Message",
    "ModelFailedError",
    "ModelInfo",
    "MvllmError",
    "NodeInfo",
    "NotFoundError",
    "PermissionDeniedError",
    "RateLimitError",
    "ReloadResult",
    "ServiceUnavailableError",
    "Stream",
    "Usage",
    "normalize_url",
]
