"""The blocking mvllm client: a chat, a streamed chat, embeddings, and the router's nodes.

Try it against the demo (three simulated engines, no GPU needed):

    mvllm run --demo                      # one terminal: the router on http://127.0.0.1:8888
    python examples/plain_client.py       # another terminal

Environment: MVLLM_ROUTER (default http://127.0.0.1:8888), MVLLM_MODEL (default mvllm-demo), and
MVLLM_API_KEY / MVLLM_ADMIN_KEY when the router has API keys (`nodes` needs an admin key then).
"""

from __future__ import annotations

import os
import sys

from mvllm.client import Client, MvllmError, PermissionDeniedError

ROUTER = os.environ.get("MVLLM_ROUTER", "http://127.0.0.1:8888")
MODEL = os.environ.get("MVLLM_MODEL", "mvllm-demo")


def main() -> int:
    client = Client(ROUTER, api_key=os.environ.get("MVLLM_API_KEY"), admin_key=os.environ.get("MVLLM_ADMIN_KEY"), timeout=60)
    with client:
        health = client.health()
        print(f"router {client.base_url}: {health.status}, {health.healthy_nodes}/{health.nodes} nodes healthy")
        print("models:", ", ".join(m.id for m in client.models()))

        answer = client.chat(MODEL, [{"role": "user", "content": "Hello!"}], max_tokens=16)
        usage = answer.usage
        print(f"chat, answered by {answer.node}: {answer.text!r} ({usage.completion_tokens if usage else '?'} tokens)")

        # A stream yields text deltas; usage and finish reason are there once it ends.
        print("stream: ", end="", flush=True)
        stream = client.chat_stream(MODEL, [{"role": "user", "content": "Tell me a story"}], max_tokens=24)
        for delta in stream:
            print(delta, end="", flush=True)
        print(f"\nstream done: finish_reason={stream.finish_reason}, usage={stream.usage}, node={stream.node}")

        vectors = client.embed(MODEL, ["the first text", "the second text"])
        print(f"embeddings: {len(vectors)} vectors of {len(vectors[0])} dimensions")

        try:
            nodes = client.nodes()
        except PermissionDeniedError as exc:
            print(f"nodes: not shown ({exc.message}); set MVLLM_ADMIN_KEY")
            return 0
        for n in nodes:
            load = f"running {n.running or 0:g}, waiting {n.waiting or 0:g}, capacity {n.capacity}"
            print(f"node {n.name}: {n.kind}, {n.state_text}, {load}, models {', '.join(n.models)}")
    return 0


if __name__ == "__main__":
    try:
        sys.exit(main())
    except MvllmError as exc:
        print(f"error: {exc}", file=sys.stderr)
        sys.exit(1)
