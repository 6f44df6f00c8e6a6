import itertools
import random

import pytest

from mvllm.sim import protocol, textgen, tokenizer


def test_same_inputs_same_text_other_inputs_other_text():
    a = textgen.generate_pieces(1, "hello", 0, 20)
    assert a == textgen.generate_pieces(1, "hello", 0, 20)
    assert a != textgen.generate_pieces(2, "hello", 0, 20)  # seed
    assert a != textgen.generate_pieces(1, "hello!", 0, 20)  # prompt
    assert a != textgen.generate_pieces(1, "hello", 1, 20)  # choice index
    assert a != textgen.generate_pieces(1, "hello", 0, 20, salt="lora-a")


def test_longer_output_extends_shorter_one():
    short = textgen.generate_pieces(5, "p", 0, 10)
    long = textgen.generate_pieces(5, "p", 0, 40)
    assert long[:10] == short


def test_natural_length_within_half_to_full_default():
    lengths = {textgen.natural_length(0, f"prompt {i}", 0, 32) for i in range(200)}
    assert min(lengths) >= 16 and max(lengths) <= 32
    assert len(lengths) > 5  # it varies with the prompt


def test_stop_string_cuts_text_and_counts_the_token_that_completed_it():
    pieces = ["The", " cat", " sat", " on", " the", " mat"]
    c = textgen.plan_completion(pieces, [" on"], "length")
    assert c.text == "The cat sat"
    assert c.finish_reason == "stop" and c.stop_reason == " on"
    assert len(c.pieces) == 4  # "The", " cat", " sat", and the token " on" that completed the stop
    assert "".join(c.pieces) == c.text


def test_stop_string_spanning_tokens_and_earliest_match_wins():
    pieces = ["ab", "cd", "ef", "gh"]
    c = textgen.plan_completion(pieces, ["fg", "bc"], "stop")
    assert c.text == "a" and c.stop_reason == "bc" and len(c.pieces) == 2
    assert "".join(c.pieces) == "a"


def test_no_stop_match_keeps_everything():
    pieces = ["x", "y"]
    c = textgen.plan_completion(pieces, ["zz", ""], "length")
    assert c.text == "xy" and c.finish_reason == "length" and c.stop_reason is None


def _lazy_all(pieces, stop, reason):
    lazy = textgen.LazyCompletion(iter(pieces), len(pieces), stop, reason)
    out = []
    j = 0
    while j < lazy.target:
        out.append(lazy.piece(j))
        j += 1
    return lazy, out


def test_lazy_completion_applies_stop_strings_exactly_as_the_whole_plan():
    rng = random.Random(7)
    alphabet = ["a", "b", "ab", "ba", " ", "bb", "aab", "."]
    for _ in range(3000):
        pieces = [rng.choice(alphabet) for _ in range(rng.randint(1, 12))]
        stop = [rng.choice(["a", "b", " "]) * rng.randint(1, 3) + rng.choice(["", "a", "b."]) for _ in range(rng.randint(0, 3))]
        whole = textgen.plan_completion(pieces, stop, "length")
        lazy, out = _lazy_all(pieces, stop, "length")
        assert tuple(out) == whole.pieces, (pieces, stop)
        assert "".join(out) == whole.text
        assert (lazy.finish_reason, lazy.stop_reason, lazy.target) == (whole.finish_reason, whole.stop_reason,
                                                                        len(whole.pieces))


def test_lazy_completion_generates_only_what_is_asked_plus_the_stop_lookahead():
    made = []

    def source():
        for i in itertools.count():
            made.append(i)
            yield " w"

    lazy = textgen.LazyCompletion(source(), 10**9, [], "length")
    assert lazy.piece(0) == " w" and lazy.piece(4) == " w"
    assert len(made) == 5
    lazy = textgen.LazyCompletion(source(), 10**9, ["xxxx"], "length")
    made.clear()
    lazy.piece(0)
    assert len(made) == 3  # " w" + 3 more characters decide whether a 4-character stop string starts in it


@pytest.mark.parametrize("context", ["user: hi\nassistant:", "Hello", "Once upon a time.", "", "x\n", "Q: why?\nA: "])
def test_text_is_a_function_of_the_context_so_a_continuation_yields_the_rest(context):
    whole = textgen.generate_pieces(11, context, 0, 60, salt="|")
    for k in range(0, 60, 7):
        rest = textgen.generate_pieces(11, context + "".join(whole[:k]), 0, 60 - k, salt="|")
        assert rest == whole[k:], k
    assert textgen.generate_pieces(12, context, 0, 60, salt="|") != whole  # the seed matters


def test_chat_answers_start_capitalised_without_a_space_completions_continue_their_prompt():
    chat = textgen.generate_pieces(0, "user: hi\nassistant:", 0, 5)
    assert chat[0][0].isupper() and not chat[0].startswith(" ")
    assert all(p.startswith(" ") or p in ".,;:" for p in chat[1:])
    done = textgen.generate_pieces(0, "The cat", 0, 5)
    assert done[0].startswith(" ") and done[0][1].islower()


def test_continue_final_message_renders_the_prompt_that_began_the_answer_plus_its_start():
    msgs = [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "hi"}]
    fresh = protocol.parse_chat({"messages": msgs})
    cont = protocol.parse_chat({"messages": [*msgs, {"role": "assistant", "content": "Side point. But"}],
                                "continue_final_message": True, "add_generation_prompt": False})
    [p0], [p1] = fresh.prompts, cont.prompts
    assert p1.text == p0.text + "Side point. But"
    assert p1.token_ids == p0.token_ids + tokenizer.encode("Side point. But")
    assert (p1.answer_of, p1.answered) == (p0.text, 4)
    with pytest.raises(protocol.ApiError) as err:
        protocol.parse_chat({"messages": msgs, "continue_final_message": True})
    assert err.value.status == 400 and "Cannot set both" in err.value.message
