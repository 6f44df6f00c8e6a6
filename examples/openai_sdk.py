"""The official `openai` Python SDK against the router: the router speaks the OpenAI API, so any
OpenAI client works by pointing its base URL at the router's /v1.

Try it against the demo (three simulated engines, no GPU needed):

    mvllm run --demo                      # one terminal: the router on http://127.0.0.1:8888
    python examples/openai_sdk.py         # another terminal

Environment: MVLLM_ROUTER (default http://127.0.0.1:8888), MVLLM_MODEL (default mvllm-demo),
MVLLM_API_KEY when the router has API keys (without keys any string does).
"""

from __future__ import annotations

import os
import sys

import openai

ROUTER = os.environ.get("MVLLM_ROUTER", "http://127.0.0.1:8888").rstrip("/")
MODEL = os.environ.get("MVLLM_MODEL", "mvllm-demo")


def main() -> int:
    client = openai.OpenAI(base_url=ROUTER + "/v1", api_key=os.environ.get("MVLLM_API_KEY", "unused"), timeout=60)

    print("models:", ", ".join(m.id for m in client.models.list()))

    # with_raw_response shows the router's headers: which node answered, the request id.
    raw = client.chat.completions.with_raw_response.create(
        model=MODEL, messages=[{"role": "user", "content": "Hello!"}], max_tokens=16
    )
    answer = raw.parse()
    print(f"chat, answered by {raw.headers.get('x-mvllm-node')}: {answer.choices[0].message.content!r}")

    print("stream: ", end="", flush=True)
    stream = client.chat.completions.create(
        model=MODEL,
        messages=[{"role": "user", "content": "Tell me a story"}],
        max_tokens=24,
        stream=True,
        stream_options={"include_usage": True},
    )
    usage = None
    for chunk in stream:
        if chunk.choices and chunk.choices[0].delta.content:
            print(chunk.choices[0].delta.content, end="", flush=True)
        if chunk.usage:
            usage = chunk.usage
    print(f"\nstream usage: {usage.prompt_tokens if usage else '?'} prompt + {usage.completion_tokens if usage else '?'} completion tokens")

    text = client.completions.create(model=MODEL, prompt="Once upon a time", max_tokens=8)
    print(f"completion: {text.choices[0].text!r}")

    emb = client.embeddings.create(model=MODEL, input=["the first text", "the second text"])
    print(f"embeddings: {len(emb.data)} vectors of {len(emb.data[0].embedding)} dimensions")

    try:
        client.chat.completions.create(model="no-such-model", messages=[{"role": "user", "content": "hi"}])
    except openai.NotFoundError as exc:
        print(f"unknown model: HTTP {exc.status_code}, code {exc.code}")
    return 0


if __name__ == "__main__":
    try:
        sys.exit(main())
    except openai.OpenAIError as exc:
        print(f"error: {exc}", file=sys.stderr)
        sys.exit(1)
