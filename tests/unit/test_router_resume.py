"""The pure part of resuming a broken stream: which requests qualify, what a stream carried so far,
the continuation request, and the continuation's chunks rewritten into the original stream."""

from __future__ import annotations

import json

import pytest

from mvllm.router.resume import ChunkRewriter, Transcript, blocker, continuation, plan_resume, whole_usage

MSGS = [{"role": "user", "content": "hi"}]


def sse(obj: dict) -> bytes:
    return b"data: " + json.dumps(obj).encode() + b"\n\n"


def chat_chunk(content: str | None = None, *, role: bool = False, finish: str | None = None, **extra) -> bytes:
    delta: dict = {"role": "assistant", "content": ""} if role else {"content": content}
    return sse({"id": "chatcmpl-1", "created": 100, "object": "chat.completion.chunk",
                "choices": [{"index": 0, "delta": delta, "finish_reason": finish}], **extra})


def completion_chunk(text: str, finish: str | None = None) -> bytes:
    return sse({"id": "cmpl-1", "created": 100, "choices": [{"index": 0, "text": text, "finish_reason": finish}]})


@pytest.mark.parametrize(
    ("path", "doc", "reason"),
    [
        ("/v1/chat/completions", {"stream": True, "messages": MSGS}, None),
        ("/chat/completions", {"stream": True, "messages": MSGS, "tools": [{}], "tool_choice": "auto"}, None),
        ("/v1/chat/completions", {"stream": True, "messages": MSGS, "n": 2}, "n > 1"),
        ("/v1/chat/completions", {"stream": True, "messages": MSGS, "logprobs": True}, "logprobs"),
        ("/v1/chat/completions", {"stream": True, "messages": MSGS, "tool_choice": "required"}, "a forced tool call"),
        ("/v1/chat/completions", {"stream": True, "messages": MSGS, "response_format": {"type": "json_object"}},
         "response_format"),
        ("/v1/chat/completions", {"stream": True, "messages": MSGS, "guided_json": {}}, "guided decoding"),
        ("/v1/chat/completions",
         {"stream": True, "messages": [{"role": "user", "content": [{"type": "image_url", "image_url": {}}]}]},
         "non-text messages"),
        ("/v1/chat/completions",
         {"stream": True, "messages": [{"role": "user", "content": [{"type": "text", "text": "x"}]}]}, None),
        ("/v1/completions", {"stream": True, "prompt": "x"}, None),
        ("/v1/completions", {"stream": True, "prompt": "x", "echo": True}, "echo"),
        ("/v1/completions", {"stream": True, "prompt": "x", "logprobs": 0}, "logprobs"),
        ("/v1/completions", {"stream": True, "prompt": "x", "best_of": 3}, "n > 1"),
        ("/v1/completions", {"stream": True, "prompt": [1, 2, 3]}, "a prompt that is not one string"),
        ("/v1/completions", {"stream": True, "prompt": ["a", "b"]}, "a prompt that is not one string"),
    ],
)
def test_plan_names_why_a_stream_cannot_be_resumed(path, doc, reason):
    plan = plan_resume(path, doc)
    assert plan is not None and plan.reason == reason


def test_only_streamed_chats_and_completions_have_a_plan():
    assert plan_resume("/v1/chat/completions", {"messages": MSGS}) is None
    assert plan_resume("/v1/chat/completions", {"messages": MSGS, "stream": False}) is None
    assert plan_resume("/v1/embeddings", {"input": "x", "stream": True}) is None
    assert plan_resume("/v1/completions", None) is None


def transcript_of(data: bytes, split: int) -> Transcript:
    t = Transcript()
    for i in range(0, len(data), split):  # any split of the SSE text, as TCP delivers it
        t.add(data[i:i + split])
    t.settle()
    return t


@pytest.mark.parametrize("split", [1, 7, 10_000])
def test_transcript_accumulates_text_and_tokens_over_any_split(split):
    data = chat_chunk(role=True) + chat_chunk("Hello") + chat_chunk(" world") + chat_chunk(",")
    t = transcript_of(data, split)
    assert (t.text, t.tokens, t.id, t.created) == ("Hello world,", 3, "chatcmpl-1", 100)
    assert t.finish_reason is None and t.partial == b""


def test_transcript_prefers_per_chunk_usage_and_folds_large_streams():
    usage = {"prompt_tokens": 5, "completion_tokens": 7, "total_tokens": 12}
    t = transcript_of(chat_chunk("ab", usage=usage), 10_000)
    assert t.tokens == 7  # two tokens in one chunk: usage knows, counting does not
    big = Transcript()
    for _ in range(6000):  # ~600 KiB: folded as it comes, not kept whole
        big.add(completion_chunk(" w"))
    assert big.raw_bytes <= 257 * 1024 and big.counted > 0
    big.settle()
    assert big.tokens == 6000 and big.text == " w" * 6000


def test_transcript_reads_the_unusual_events_too():
    odd = b": a comment\n\n" + b'data: {"id": "c", "choices":\ndata: [{"index": 0, "text": " b"}]}\n\n'
    t = transcript_of(completion_chunk(" a") + odd + completion_chunk(" c"), 10_000)
    assert (t.text, t.blocker) == (" a b c", None)
    bad = transcript_of(completion_chunk(" a") + b"data: {nope\n\n" + completion_chunk(" c"), 10_000)
    assert (bad.text, bad.blocker) == (" a c", "an unreadable chunk")


def test_blockers_after_a_break():
    chat = plan_resume("/v1/chat/completions", {"stream": True, "messages": MSGS})
    assert chat is not None
    t = transcript_of(chat_chunk("Hi") + chat_chunk("x")[:20], 10_000)
    assert blocker(chat, t) == "the node broke off inside an event"
    tool = sse({"id": "c", "choices": [{"index": 0, "delta": {"tool_calls": [{"index": 0}]}}]})
    assert blocker(chat, transcript_of(chat_chunk("Hi") + tool, 10_000)) == "a tool call in progress"
    err = sse({"error": {"message": "boom"}})
    assert blocker(chat, transcript_of(chat_chunk("Hi") + err, 10_000)) == "the engine reported an error"
    assert blocker(chat, transcript_of(chat_chunk("Hi") + b"data: [DONE]\n\n", 10_000)) == "the stream had ended"
    assert blocker(chat, transcript_of(chat_chunk("Hi"), 10_000)) is None


def test_chat_continuation_holds_the_text_so_far():
    doc = {"model": "m", "stream": True, "messages": MSGS, "max_tokens": 10, "min_tokens": 4, "temperature": 0}
    plan = plan_resume("/v1/chat/completions", doc)
    assert plan is not None
    t = transcript_of(chat_chunk(role=True) + chat_chunk("Hello") + chat_chunk(" world"), 10_000)
    body = continuation(plan, t)
    assert body == {**doc, "messages": [*MSGS, {"role": "assistant", "content": "Hello world"}], "max_tokens": 8,
                    "min_tokens": 2, "continue_final_message": True, "add_generation_prompt": False}
    assert doc["messages"] == MSGS  # the client's request is not changed


def test_chat_continuation_of_a_prefilled_assistant_message_extends_it():
    msgs = [*MSGS, {"role": "assistant", "content": "Sure:"}]
    doc = {"stream": True, "messages": msgs, "continue_final_message": True, "add_generation_prompt": False,
           "max_completion_tokens": 5}
    plan = plan_resume("/v1/chat/completions", doc)
    assert plan is not None
    body = continuation(plan, transcript_of(chat_chunk(" one"), 10_000))
    assert body is not None
    assert body["messages"] == [*MSGS, {"role": "assistant", "content": "Sure: one"}]
    assert body["max_completion_tokens"] == 4


def test_completion_continuation_and_the_edges():
    doc = {"stream": True, "prompt": "The sky", "max_tokens": 3}
    plan = plan_resume("/v1/completions", doc)
    assert plan is not None
    body = continuation(plan, transcript_of(completion_chunk(" is") + completion_chunk(" blue"), 10_000))
    assert body == {**doc, "prompt": "The sky is blue", "max_tokens": 1}
    all_sent = transcript_of(completion_chunk(" a") + completion_chunk(" b") + completion_chunk(" c"), 10_000)
    assert continuation(plan, all_sent) is None
    assert continuation(plan, Transcript()) == doc  # nothing generated yet: the request as it came


def test_rewriter_continues_the_original_stream():
    original = transcript_of(chat_chunk(role=True) + chat_chunk("A") + chat_chunk("B"), 10_000)
    rw = ChunkRewriter(original)
    cont = (
        sse({"id": "other", "created": 999, "choices": [{"index": 0, "delta": {"role": "assistant", "content": ""},
                                                         "finish_reason": None}]})
        + sse({"id": "other", "created": 999, "choices": [{"index": 0, "delta": {"content": "C"}, "finish_reason": "length"}]})
        + sse({"id": "other", "created": 999, "choices": [],
               "usage": {"prompt_tokens": 12, "completion_tokens": 1, "total_tokens": 13}})
        + b"data: [DONE]\n\n"
    )
    out = rw.feed(cont[:50]) + rw.feed(cont[50:])
    assert [o for _, o in out][-1] is None and out[-1][0] == b"data: [DONE]\n\n"
    objs = [o for _, o in out if o is not None]
    assert len(objs) == 2  # the role chunk is not sent twice
    assert {(o["id"], o["created"]) for o in objs} == {("chatcmpl-1", 100)}
    assert objs[0]["choices"][0]["delta"] == {"content": "C"}
    assert objs[1]["usage"] == {"prompt_tokens": 10, "completion_tokens": 3, "total_tokens": 13}
    assert all(e.startswith(b"data: ") and e.endswith(b"\n\n") for e, _ in out)
    assert rw.feed(b'data: {"id": "x", "choi') == []  # an unfinished event is held, never half-sent


def test_whole_usage_moves_the_tokens_sent_back_to_the_completion():
    u = {"prompt_tokens": 30, "completion_tokens": 5, "total_tokens": 35, "prompt_tokens_details": None}
    assert whole_usage(u, 10) == {"prompt_tokens": 20, "completion_tokens": 15, "total_tokens": 35,
                                  "prompt_tokens_details": None}


def test_ended_tells_a_stream_with_its_done_from_a_cut_one():
    whole = completion_chunk(" a") + b"data: [DONE]\n\n"
    assert transcript_of(whole, 10_000).ended()
    for split in (1, 3):  # [DONE] in many pieces: found by the parse
        t = Transcript()
        for i in range(0, len(whole), split):
            t.add(whole[i:i + split])
        assert t.ended()
    cut = Transcript()
    cut.add(completion_chunk(" a"))
    assert not cut.ended()
