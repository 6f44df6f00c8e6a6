"""An emulated vLLM backend for relay benchmarks: `python -m benchmarks.fakevllm --port P [--paced-from N --paced-ms X]`.

OpenAI chat answers with no work behind them, so that what a relay in front of it costs is not
drowned by the engine's own cost: `max_tokens` sets the number of content chunks (streamed, each
in its own write) or of tokens (JSON). Requests asking for at least `--paced-from` tokens are
streamed one chunk every `--paced-ms` ms (the "chunks arriving over ~2 s" leg); the others at once.
It also answers /health, /v1/models and a vLLM-shaped /metrics (fakefleet's) for routers that poll.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import random
import sys
from collections.abc import Sequence
from dataclasses import dataclass, field

from aiohttp import web

from benchmarks.fakefleet import metrics_text, models_doc

_SSE_HEADERS = {"content-type": "text/event-stream", "cache-control": "no-cache"}


@dataclass
class Rendered:
    """Pre-rendered answers for one token count (bytes built once, sent many times)."""

    json_body: bytes
    chunks: list[bytes]  # role chunk, one per token, the finish chunk
    usage_chunk: bytes
    done: bytes = b"data: [DONE]\n\n"


def _sse(doc: dict) -> bytes:
    return b"data: " + json.dumps(doc, separators=(",", ":")).encode() + b"\n\n"


def render(model: str, n: int) -> Rendered:
    base = {"id": "chatcmpl-bench", "object": "chat.completion.chunk", "created": 0, "model": model}
    usage = {"prompt_tokens": 8, "completion_tokens": n, "total_tokens": 8 + n}
    chunks = [
        _sse(
            {
                **base,
                "choices": [
                    {"index": 0, "delta": {"role": "assistant", "content": ""}, "finish_reason": None}
                ],
            }
        )
    ]
    chunks += [
        _sse({**base, "choices": [{"index": 0, "delta": {"content": f" tok{i}"}, "finish_reason": None}]})
        for i in range(n)
    ]
    chunks.append(_sse({**base, "choices": [{"index": 0, "delta": {}, "finish_reason": "length"}]}))
    body = {
        "id": "chatcmpl-bench",
        "object": "chat.completion",
        "created": 0,
        "model": model,
        "choices": [
            {
                "index": 0,
                "message": {"role": "assistant", "content": "".join(f" tok{i}" for i in range(n))},
                "finish_reason": "length",
            }
        ],
        "usage": usage,
    }
    return Rendered(json.dumps(body).encode(), chunks, _sse({**base, "choices": [], "usage": usage}))


@dataclass
class FakeVllm:
    model: str = "bench-model"
    paced_from: int = 64
    paced_ms: float = 31.0
    _cache: dict[int, Rendered] = field(default_factory=dict)

    def rendered(self, n: int) -> Rendered:
        r = self._cache.get(n)
        if r is None:
            r = self._cache[n] = render(self.model, n)
        return r

    def app(self) -> web.Application:
        metrics = metrics_text([self.model], random.Random(0)).encode()
        models = json.dumps(models_doc([self.model])).encode()
        app = web.Application()

        async def health(_: web.Request) -> web.Response:
            return web.Response(status=200)

        async def v1_models(_: web.Request) -> web.Response:
            return web.Response(body=models, content_type="application/json")

        async def metrics_handler(_: web.Request) -> web.Response:
            return web.Response(body=metrics, content_type="text/plain")

        app.router.add_get("/health", health)
        app.router.add_get("/v1/models", v1_models)
        app.router.add_get("/metrics", metrics_handler)
        app.router.add_post("/v1/chat/completions", self.chat)
        return app

    async def chat(self, request: web.Request) -> web.StreamResponse:
        doc = json.loads(await request.read())
        n = int(doc.get("max_tokens") or 16)
        r = self.rendered(n)
        if not doc.get("stream"):
            return web.Response(body=r.json_body, content_type="application/json")
        resp = web.StreamResponse(headers=_SSE_HEADERS)
        await resp.prepare(request)
        delay = self.paced_ms / 1000.0 if n >= self.paced_from else 0.0
        last = len(r.chunks) - 1
        for i, chunk in enumerate(r.chunks):
            await resp.write(chunk)
            if delay and 0 < i < last:
                await asyncio.sleep(delay)
        opts = doc.get("stream_options")
        if isinstance(opts, dict) and opts.get("include_usage"):
            await resp.write(r.usage_chunk)
        await resp.write_eof(r.done)
        return resp


def main(argv: Sequence[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m benchmarks.fakevllm", description=__doc__.splitlines()[0])
    p.add_argument("--host", default="127.0.0.1")
    p.add_argument("--port", type=int, required=True)
    p.add_argument("--model", default="bench-model")
    p.add_argument("--paced-from", type=int, default=64, help="max_tokens from which chunks are spaced")
    p.add_argument("--paced-ms", type=float, default=31.0, help="spacing of those chunks (ms)")
    args = p.parse_args(argv)
    try:
        import uvloop

        uvloop.install()
    except ImportError:
        pass
    fake = FakeVllm(args.model, args.paced_from, args.paced_ms)
    web.run_app(fake.app(), host=args.host, port=args.port, access_log=None, print=None, backlog=4096)
    return 0


if __name__ == "__main__":
    sys.exit(main())
