"""The asyncio mvllm client: several requests at once (plain and streamed) over one connection
pool, and which node answered each.

Try it against the demo (three simulated engines of different speeds, no GPU needed):

    mvllm run --demo                      # one terminal: the router on http://127.0.0.1:8888
    python examples/async_client.py       # another terminal

Environment: MVLLM_ROUTER (default http://127.0.0.1:8888), MVLLM_MODEL (default mvllm-demo),
MVLLM_API_KEY when the router has API keys.
"""

from __future__ import annotations

import asyncio
import collections
import os
import sys
import time

from mvllm.client import AsyncClient, MvllmError

ROUTER = os.environ.get("MVLLM_ROUTER", "http://127.0.0.1:8888")
MODEL = os.environ.get("MVLLM_MODEL", "mvllm-demo")
REQUESTS = 12


async def streamed(client: AsyncClient, i: int) -> tuple[str | None, str]:
    stream = client.chat_stream(MODEL, [{"role": "user", "content": f"Story number {i}"}], max_tokens=16)
    async with stream:  # closes the stream even if the loop below stops early
        pieces = [delta async for delta in stream]
    return stream.node, "".join(pieces)


async def main() -> int:
    async with AsyncClient(ROUTER, api_key=os.environ.get("MVLLM_API_KEY"), timeout=60) as client:
        t0 = time.monotonic()
        chats = [client.chat(MODEL, [{"role": "user", "content": f"Question {i}"}], max_tokens=8) for i in range(REQUESTS)]
        answers = await asyncio.gather(*chats)
        print(f"{len(answers)} chats at once in {time.monotonic() - t0:.2f}s")
        per_node = collections.Counter(a.node for a in answers)
        print("answered by:", ", ".join(f"{node} x{n}" for node, n in sorted(per_node.items(), key=str)))

        t0 = time.monotonic()
        streams = await asyncio.gather(*(streamed(client, i) for i in range(4)))
        for node, text in streams:
            print(f"stream from {node}: {text!r}")
        print(f"4 streams at once in {time.monotonic() - t0:.2f}s")

        # Errors are exceptions, one class per kind; gather can collect them instead of raising.
        results = await asyncio.gather(client.chat("no-such-model", [{"role": "user", "content": "hi"}]), return_exceptions=True)
        err = results[0]
        print(f"unknown model: {type(err).__name__} (HTTP {getattr(err, 'status', '?')}): {getattr(err, 'message', err)}")
    return 0


if __name__ == "__main__":
    try:
        sys.exit(asyncio.run(main()))
    except MvllmError as exc:
        print(f"error: {exc}", file=sys.stderr)
        sys.exit(1)
