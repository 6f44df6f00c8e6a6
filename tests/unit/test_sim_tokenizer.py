import pytest

from mvllm.sim import textgen, tokenizer

SAMPLES = [
    "Hello world, how are you?",
    "internationalization is LONG: HTTP/1.1 200 OK\n\ttabs  and   spaces",
    "Ünïcödé — 日本語 emoji 🎉 and digits 1234567890",
    "",
    " leading and trailing ",
    "a",
    "MixedCase camelCaseWords snake_case_words",
]


@pytest.mark.parametrize("text", SAMPLES)
def test_round_trip(text):
    assert tokenizer.decode(tokenizer.encode(text)) == text


def test_about_one_token_per_short_word_or_mark():
    text = "The quick brown fox jumps over the lazy dog, then runs home."
    # 12 words of <= 6 letters plus ',' and '.'
    assert tokenizer.count(text) == 14


def test_long_words_and_digits_take_several_tokens():
    assert tokenizer.count("internationalization") == 4  # 6+6+6+2 letters
    assert tokenizer.count("2026") == 4  # one per digit, as Llama's tokenizer


def test_ids_are_stable_and_in_vocabulary():
    ids = tokenizer.encode("Hello world")
    assert ids == tokenizer.encode("Hello world")
    assert all(0 <= i < tokenizer.VOCAB_LIMIT < 2**31 for i in ids)
    assert tokenizer.decode([tokenizer.BOS_ID]) == "<s>"


def test_out_of_vocabulary_id_is_rejected():
    with pytest.raises(ValueError, match="out of vocabulary"):
        tokenizer.decode([tokenizer.VOCAB_LIMIT])
    with pytest.raises(ValueError):
        tokenizer.decode([-1])


def test_every_generated_piece_is_exactly_one_token():
    pieces = textgen.generate_pieces(seed=3, prompt="p", index=0, n_tokens=300)
    assert len(pieces) == 300
    assert all(tokenizer.count(p) == 1 for p in pieces)
    assert tokenizer.count("".join(pieces)) == 300
