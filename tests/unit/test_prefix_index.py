import gc
import tracemalloc

from mvllm.router.prefix_index import (
    CacheAwareParams,
    CacheCandidate,
    PrefixIndex,
    choose_cache_aware,
    prompt_text,
)

SYSTEM = "You are a careful assistant for conversation {n}. " * 40  # ~2,000 chars each


def text(n, turn=""):
    return SYSTEM.format(n=n) + turn


def nodes(*scores, kv=None):
    kv = kv or {}
    return [CacheCandidate(f"n{i}", s, kv.get(f"n{i}", 0.0)) for i, s in enumerate(scores)]


def test_match_returns_longest_prefix_per_target():
    idx = PrefixIndex()
    turn = "first question " * 10
    idx.insert("m", "a", text(1, turn), now=0.0)
    idx.insert("m", "b", text(1), now=0.0)
    got = idx.match("m", text(1, turn + "and more"))
    # a holds the system prompt and the turn, b the system prompt, in whole chunks of 64 chars.
    assert set(got) == {"a", "b"}
    assert len(text(1, turn)) - 64 < got["a"] <= len(text(1, turn))
    assert len(text(1)) - 64 < got["b"] <= len(text(1))
    assert idx.match("m", text(1)) == {"a": len(text(1)), "b": len(text(1))}  # exact repeat: all
    assert idx.match("m", text(2)) == {}  # another system prompt shares only a short opening
    assert idx.match("other-model", text(1)) == {}  # per model


def test_match_ignores_a_different_first_chunk():
    idx = PrefixIndex()
    idx.insert("m", "a", "X" + text(1), now=0.0)
    assert idx.match("m", text(1)) == {}


def test_eviction_keeps_bytes_within_the_bound_under_100k_distinct_prompts():
    params = CacheAwareParams(max_tree_bytes=1 << 20)
    idx = PrefixIndex(params)
    for i in range(100_000):
        idx.insert("m", f"n{i % 4}", f"prompt {i} " + "y" * 300, now=i * 0.001)
        if i % 997 == 0:
            assert idx.size_bytes <= params.max_tree_bytes
    assert 0 < idx.size_bytes <= params.max_tree_bytes
    # The newest prompts survive, the oldest are gone.
    assert idx.match("m", "prompt 99999 " + "y" * 300) == {"n3": len("prompt 99999 ") + 300}
    assert idx.match("m", "prompt 5 " + "y" * 300) == {}


def test_accounted_bytes_are_the_real_ones():
    gc.collect()
    tracemalloc.start()
    try:
        idx = PrefixIndex(CacheAwareParams(max_tree_bytes=2 << 20))
        for i in range(6_000):
            idx.insert("m", f"n{i % 4}", f"distinct {i} " + "z" * 500, now=i * 0.001)
        real, _peak = tracemalloc.get_traced_memory()
    finally:
        tracemalloc.stop()
    assert idx.size_bytes > 1.9 * (1 << 20)  # the bound is reached, so eviction is what holds it
    assert 0.75 * idx.size_bytes <= real <= 1.1 * idx.size_bytes  # honest, never under-counted by >10 %


def test_ttl_ignores_then_sweeps_old_entries():
    params = CacheAwareParams(entry_ttl=10.0)
    idx = PrefixIndex(params)
    idx.insert("m", "a", text(1), now=0.0)
    assert idx.match("m", text(1), now=9.0) != {}
    assert idx.match("m", text(1), now=11.0) == {}
    before = idx.size_bytes
    idx.insert("m", "b", text(2), now=11.0)  # sweeps a's expired keys
    assert idx.match("m", text(1)) == {}
    assert idx.size_bytes < 2 * before


def test_remove_target_forgets_it_and_frees_its_keys():
    idx = PrefixIndex()
    idx.insert("m", "a", text(1), now=0.0)
    idx.insert("m", "b", text(1), now=0.0)
    idx.insert("m", "a", text(2), now=0.0)
    full = idx.size_bytes
    assert idx.remove_target("a") > 0
    assert set(idx.match("m", text(1))) == {"b"}
    assert idx.match("m", text(2)) == {}
    assert idx.size_bytes < full
    idx.remove_target("b")
    assert idx.size_bytes == 0 and len(idx) == 0


def test_prefix_hit_goes_to_the_holder_when_balanced():
    params = CacheAwareParams()
    idx = PrefixIndex(params)
    idx.insert("m", "n2", text(1), now=0.0)
    d = choose_cache_aware(nodes(0.1, 0.0, 0.2), idx, "m", text(1, "next turn"), params, now=1.0)
    assert d.chosen.name == "n2" and d.reason == "prefix_hit" and d.matched_fraction > 0.9
    assert d.runner_up.name == "n1"
    assert d.explain() == "policy=cache-aware; reason=prefix_hit; score=0.200; runner_up=n1:0.000"


def test_prefix_miss_falls_back_to_least_score_and_records_the_choice():
    params = CacheAwareParams()
    idx = PrefixIndex(params)
    d = choose_cache_aware(nodes(0.3, 0.1, 0.2), idx, "m", text(7), params, now=0.0)
    assert d.chosen.name == "n1" and d.reason == "prefix_miss" and d.matched_fraction == 0.0
    again = choose_cache_aware(nodes(0.3, 0.15, 0.0), idx, "m", text(7), params, now=1.0)
    assert again.chosen.name == "n1" and again.reason == "prefix_hit"


def test_short_match_below_the_threshold_is_a_miss():
    params = CacheAwareParams()
    idx = PrefixIndex(params)
    idx.insert("m", "n0", text(1), now=0.0)
    long_turn = text(1, "q" * 3 * len(text(1)))  # the held prefix is a quarter of the prompt
    d = choose_cache_aware(nodes(0.1, 0.0), idx, "m", long_turn, params, now=1.0)
    assert d.reason == "prefix_miss" and d.chosen.name == "n1"


def test_balance_override_by_absolute_and_relative_imbalance():
    params = CacheAwareParams(balance_abs_threshold=0.25, balance_rel_threshold=1.5)
    idx = PrefixIndex(params)
    idx.insert("m", "n0", text(1), now=0.0)
    # 0.6 vs 0.2: gap 0.4 > 0.25 and 0.6 > 1.5 * 0.2 -> imbalanced: least score.
    d = choose_cache_aware(nodes(0.6, 0.2), idx, "m", text(1), params, now=1.0, record=False)
    assert (d.chosen.name, d.reason) == ("n1", "imbalanced")
    # 0.4 vs 0.2: gap within 0.25 -> balanced.
    d = choose_cache_aware(nodes(0.4, 0.2), idx, "m", text(1), params, now=1.0, record=False)
    assert (d.chosen.name, d.reason) == ("n0", "prefix_hit")
    # 1.4 vs 1.0: gap 0.4 > 0.25 but 1.4 <= 1.5 * 1.0 -> balanced.
    d = choose_cache_aware(nodes(1.4, 1.0), idx, "m", text(1), params, now=1.0, record=False)
    assert (d.chosen.name, d.reason) == ("n0", "prefix_hit")
    # Another node's load does not stop affinity to an unloaded holder (we compare the holder).
    d = choose_cache_aware(nodes(0.0, 0.0, 5.0), idx, "m", text(1), params, now=1.0, record=False)
    assert (d.chosen.name, d.reason) == ("n0", "prefix_hit")


def test_kv_full_node_gets_no_affinity():
    params = CacheAwareParams(kv_full=0.9)
    idx = PrefixIndex(params)
    idx.insert("m", "n0", text(1), now=0.0)
    d = choose_cache_aware(nodes(0.0, 0.1, kv={"n0": 0.95}), idx, "m", text(1), params, now=1.0, record=False)
    assert (d.chosen.name, d.reason) == ("n0", "kv_full")  # least score may still pick it
    d = choose_cache_aware(nodes(0.1, 0.0, kv={"n0": 0.9}), idx, "m", text(1), params, now=1.0, record=False)
    assert (d.chosen.name, d.reason) == ("n1", "kv_full")
    d = choose_cache_aware(nodes(0.1, 0.0, kv={"n0": 0.89}), idx, "m", text(1), params, now=1.0, record=False)
    assert (d.chosen.name, d.reason) == ("n0", "prefix_hit")


def test_ties_go_to_the_less_loaded_holder():
    params = CacheAwareParams()
    idx = PrefixIndex(params)
    for n in ("n0", "n1", "n2"):
        idx.insert("m", n, text(1), now=0.0)
    d = choose_cache_aware(nodes(0.2, 0.1, 0.15, 0.0), idx, "m", text(1), params, now=1.0)
    assert (d.chosen.name, d.reason) == ("n1", "prefix_hit")


def test_no_prompt_and_no_candidates():
    params = CacheAwareParams()
    idx = PrefixIndex(params)
    d = choose_cache_aware(nodes(0.3, 0.1), idx, "m", None, params, now=0.0)
    assert (d.chosen.name, d.reason, d.runner_up.name) == ("n1", "no_prompt", "n0")
    assert len(idx) == 0
    assert choose_cache_aware([], idx, "m", "x", params, now=0.0).chosen is None
    one = choose_cache_aware(nodes(0.5), idx, "m", None, params, now=0.0)
    assert one.runner_up is None and one.explain().endswith("runner_up=-")


def test_prompt_text_chat_and_completions():
    chat = {"messages": [
        {"role": "system", "content": "Be brief."},
        {"role": "user", "content": [{"type": "text", "text": "Hi "},
                                     {"type": "image_url", "image_url": {"url": "data:"}},
                                     {"type": "text", "text": "there"}]},
        {"role": "assistant", "content": None},
    ]}
    assert prompt_text(chat, "/v1/chat/completions") == "system\nBe brief.\nuser\nHi there\nassistant\n\n"
    # A later turn extends the earlier one's text: its prefix matches.
    longer = {"messages": [*chat["messages"][:2], {"role": "assistant", "content": "Hello"}]}
    assert prompt_text(longer, "/v1/chat/completions").startswith("system\nBe brief.\nuser\nHi there\nassistant\n")
    assert prompt_text({"prompt": "once upon"}, "/v1/completions") == "once upon"
    assert prompt_text({"prompt": ["a", "b"]}, "/v1/completions") == "a\nb"
    assert prompt_text({"prompt": [1, 2, 3]}, "/v1/completions") is None
    assert prompt_text({"prompt": [[1, 2], [3]]}, "/v1/completions") is None
    assert prompt_text({"prompt": ""}, "/v1/completions") is None
    assert prompt_text({"input": "x"}, "/v1/embeddings") is None
    assert prompt_text({"messages": "nope"}, "/v1/chat/completions") is None
