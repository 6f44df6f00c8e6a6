"""Deterministic continuation through a real `mvllm sim serve`: a request that holds the first K tokens
of an answer (chat: continue_final_message; completions: prompt + text) yields exactly the rest."""

from __future__ import annotations

import openai

from tests.procs import run_sim

FAST = ["--sim-ttft-ms", "1", "--sim-itl-ms", "0", "--sim-seed", "7"]
MSGS = [{"role": "system", "content": "You are terse."}, {"role": "user", "content": "Tell me a story."}]


def stream_tokens(c: openai.OpenAI, **kw) -> tuple[list[str], str, object]:
    """The text of each token (one per chunk, as vLLM streams), the finish reason and the usage."""
    pieces, finish, usage = [], None, None
    for ch in c.chat.completions.create(stream=True, stream_options={"include_usage": True}, **kw):
        if ch.usage is not None:
            usage = ch.usage
        for choice in ch.choices:
            if choice.delta.content:
                pieces.append(choice.delta.content)
            finish = choice.finish_reason or finish
    return pieces, finish, usage


def test_chat_and_completion_continuations_yield_the_rest_of_the_uninterrupted_answer(tmp_path):
    with run_sim(tmp_path, "m", FAST) as sim, run_sim(tmp_path, "other", [*FAST, "--served-model-name", "m"]) as sim2:
        c1 = openai.OpenAI(base_url=sim.url + "/v1", api_key="x", max_retries=0, timeout=20)
        c2 = openai.OpenAI(base_url=sim2.url + "/v1", api_key="x", max_retries=0, timeout=20)
        whole, finish, usage = stream_tokens(c1, model="m", messages=MSGS, max_tokens=40, temperature=0)
        assert len(whole) == 40 and finish == "length" and usage.completion_tokens == 40
        for k in (1, 9, 25, 39):
            # on another process (same seed), as a router resuming a broken stream does
            r = c2.chat.completions.create(
                model="m", max_tokens=40 - k, temperature=0,
                messages=[*MSGS, {"role": "assistant", "content": "".join(whole[:k])}],
                extra_body={"continue_final_message": True, "add_generation_prompt": False})
            assert r.choices[0].message.content == "".join(whole[k:]), k
            assert r.usage.completion_tokens == 40 - k and r.usage.prompt_tokens == usage.prompt_tokens + k
            assert r.choices[0].finish_reason == "length"
        # No max_tokens: the answer ends where the uninterrupted one does (EOS), finish_reason "stop".
        natural, finish, _ = stream_tokens(c1, model="m", messages=MSGS)
        assert finish == "stop"
        k = len(natural) // 2
        rest, finish, usage = stream_tokens(
            c2, model="m", messages=[*MSGS, {"role": "assistant", "content": "".join(natural[:k])}],
            extra_body={"continue_final_message": True, "add_generation_prompt": False})
        assert rest == natural[k:] and finish == "stop" and usage.completion_tokens == len(natural) - k

        prompt = "The weather today is"
        full = c1.completions.create(model="m", prompt=prompt, max_tokens=30, temperature=0)
        assert full.usage.completion_tokens == 30
        text = full.choices[0].text
        pieces = [t.choices[0].text for t in c1.completions.create(model="m", prompt=prompt, max_tokens=30, stream=True)
                  if t.choices and t.choices[0].text]
        assert "".join(pieces) == text and len(pieces) == 30
        for k in (1, 12, 29):
            r = c2.completions.create(model="m", prompt=prompt + "".join(pieces[:k]), max_tokens=30 - k, temperature=0)
            assert r.choices[0].text == "".join(pieces[k:]), k
            assert r.usage.completion_tokens == 30 - k
            assert r.usage.prompt_tokens == full.usage.prompt_tokens + k
