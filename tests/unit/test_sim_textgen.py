from mvllm.sim import textgen


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
