import itertools

from benchmarks.scenarios import prefix as P
from mvllm.router.prefix_index import prompt_text
from mvllm.sim.tokenizer import encode


def test_each_turn_extends_the_previous_and_conversations_differ():
    texts = [prompt_text({"messages": P.conversation_messages(3, k)}, "/v1/chat/completions") for k in range(4)]
    for earlier, later in itertools.pairwise(texts):
        assert later.startswith(earlier) and len(later) > len(earlier)
    assert P.conversation_messages(3, 2) == P.conversation_messages(3, 2)  # seeded: every policy sees the same
    other = prompt_text({"messages": P.conversation_messages(4, 0)}, "/v1/chat/completions")
    assert other[:200] != texts[0][:200]


def test_system_prompts_are_about_two_thousand_sim_tokens():
    n = len(encode(P.system_prompt("c0")))
    assert 1900 <= n <= 2300


def test_schedule_is_seeded():
    a, b = P.Schedule.seeded(3, 2.0, 1.5), P.Schedule.seeded(3, 2.0, 1.5)
    assert a == b and len(a.starts) == P.CONVERSATIONS and all(0.7 * 1.5 <= g <= 1.3 * 1.5 for g in a.gaps)
