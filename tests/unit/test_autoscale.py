"""The autoscale policy: hysteresis timers, replica bounds, per-model limits, loading blocks, config."""

from __future__ import annotations

from dataclasses import replace

import pytest

from mvllm.common.tomlconf import ConfigError, load_toml
from mvllm.router.autoscale import (
    AutoscaleConfig,
    AutoscalePolicy,
    ModelLimits,
    ModelObservation,
    Replica,
    ScaleDown,
    ScaleUp,
    parse_autoscale,
)
from mvllm.router.config import load_config

CFG = AutoscaleConfig(
    enabled=True, min_replicas=1, max_replicas=3,
    scale_up_score=0.8, scale_up_after=5.0, scale_down_score=0.3, scale_down_after=60.0,
)


def obs(*replicas: tuple[str, str, float], model: str = "m", used: bool = True) -> ModelObservation:
    return ModelObservation(model, tuple(Replica(a, s, sc) for a, s, sc in replicas), used)  # type: ignore[arg-type]


def run(policy: AutoscalePolicy, times: list[float], observation: ModelObservation) -> list:
    out = []
    for t in times:
        out.extend((t, d) for d in policy.tick(t, [observation]))
    return out


# --- scale up ---------------------------------------------------------------------------------


def test_scale_up_only_after_the_condition_held_for_scale_up_after():
    p = AutoscalePolicy(CFG)
    busy = obs(("a", "awake", 0.95))
    assert run(p, [0.0, 1.0, 4.9], busy) == []
    [d] = p.tick(5.0, [busy])
    assert d == ScaleUp("m", d.reason)
    assert d.reason.startswith("mean score 0.95 > 0.8 for 5.0 s")


def test_scale_up_uses_the_mean_of_awake_replicas_only():
    p = AutoscalePolicy(CFG)
    # mean of awake = (1.0 + 0.5) / 2 = 0.75 <= 0.8: no scale up; the sleeping and draining ones don't count
    o = obs(("a", "awake", 1.0), ("b", "awake", 0.5), ("c", "sleeping", 0.0), ("d", "draining", 5.0))
    assert run(p, [0, 10, 20], o) == []
    o2 = obs(("a", "awake", 1.0), ("b", "awake", 0.7), ("c", "sleeping", 0.0))
    got = run(p, [30, 35], o2)
    assert len(got) == 1 and got[0][0] == 35 and "mean score 0.85" in got[0][1].reason


def test_score_exactly_at_threshold_is_not_above_it():
    p = AutoscalePolicy(CFG)
    assert run(p, [0, 10, 100], obs(("a", "awake", 0.8))) == []


def test_a_break_in_the_condition_resets_the_up_timer():
    p = AutoscalePolicy(CFG)
    busy, calm = obs(("a", "awake", 0.9)), obs(("a", "awake", 0.5))
    assert run(p, [0, 4], busy) == []
    assert p.tick(4.5, [calm]) == []  # broken: the timer restarts at the next busy tick
    assert run(p, [5, 9.4], busy) == []
    assert len(p.tick(10.0, [busy])) == 1


def test_one_scale_up_at_a_time_and_none_while_a_replica_loads():
    p = AutoscalePolicy(CFG)
    assert len(run(p, [0, 5], obs(("a", "awake", 0.9)))) == 1
    # the caller started the new replica: it is loading; however long it takes, no second step
    loading = obs(("a", "awake", 2.0), ("b", "loading", 0.0))
    assert run(p, [6, 20, 100], loading) == []
    # ready now, still overloaded: a full scale_up_after from the moment it is awake
    both = obs(("a", "awake", 0.9), ("b", "awake", 0.9))
    assert run(p, [101, 105.9], both) == []
    assert len(p.tick(106, [both])) == 1


def test_no_scale_up_beyond_max_replicas_counting_loading_and_awake():
    p = AutoscalePolicy(CFG)
    full = obs(("a", "awake", 2.0), ("b", "awake", 2.0), ("c", "awake", 2.0))
    assert run(p, [0, 5, 50, 500], full) == []
    # a sleeping copy does not count toward the bound (waking it is how the caller scales up)
    p2 = AutoscalePolicy(CFG)
    two = obs(("a", "awake", 2.0), ("b", "awake", 2.0), ("c", "sleeping", 0.0))
    assert len(run(p2, [0, 5], two)) == 1


def test_no_awake_replica_means_no_decision_and_resets_timers():
    p = AutoscalePolicy(CFG)
    assert run(p, [0, 4], obs(("a", "awake", 0.9))) == []
    assert p.tick(4.5, [obs(("a", "loading", 0.0))]) == []
    assert p.tick(5.0, [obs()]) == []
    assert p.tick(6.0, [obs(("a", "awake", 0.9))]) == []  # restarted at 6.0
    assert p.tick(10.9, [obs(("a", "awake", 0.9))]) == []
    assert len(p.tick(11.0, [obs(("a", "awake", 0.9))])) == 1


def test_after_a_decision_the_next_waits_a_full_period():
    cfg = replace(CFG, max_replicas=10)
    p = AutoscalePolicy(cfg)
    busy = obs(("a", "awake", 0.9), ("b", "awake", 0.9))
    got = run(p, [0, 5, 6, 9.9, 10, 15], busy)
    assert [t for t, _ in got] == [5, 10, 15]


# --- scale down -------------------------------------------------------------------------------


def test_scale_down_releases_the_least_loaded_replica_after_scale_down_after():
    p = AutoscalePolicy(CFG)
    idle = obs(("a", "awake", 0.2), ("b", "awake", 0.05), ("c", "awake", 0.1))
    assert run(p, [0, 30, 59.9], idle) == []
    [d] = p.tick(60, [idle])
    assert isinstance(d, ScaleDown) and d.agent == "b" and d.model == "m"
    assert d.reason.startswith("mean score 0.12 < 0.3 for 60.0 s")
    assert "b" in d.reason


def test_scale_down_ties_broken_by_agent_name():
    p = AutoscalePolicy(CFG)
    [(_, d)] = run(p, [0, 60], obs(("z", "awake", 0.0), ("k", "awake", 0.0)))
    assert d.agent == "k"


def test_never_below_min_replicas_once_used():
    cfg = replace(CFG, min_replicas=2)
    p = AutoscalePolicy(cfg)
    two = obs(("a", "awake", 0.0), ("b", "awake", 0.0), used=True)
    assert run(p, [0, 60, 600, 6000], two) == []
    three = obs(("a", "awake", 0.0), ("b", "awake", 0.0), ("c", "awake", 0.01), used=True)
    # the condition held all along (only the floor stopped it): a third replica goes at once
    [(t, d)] = run(p, [7000], three)
    assert t == 7000 and d.agent == "a" and "floor 2" in d.reason


def test_unused_model_goes_down_to_one_replica_but_never_zero():
    cfg = replace(CFG, min_replicas=2)
    p = AutoscalePolicy(cfg)
    two = obs(("a", "awake", 0.0), ("b", "awake", 0.0), used=False)
    [(_, d)] = run(p, [0, 60], two)
    assert d.agent == "a"
    one = obs(("b", "awake", 0.0), ("a", "draining", 0.0), used=False)
    assert run(p, [61, 200, 2000], one) == []


def test_a_break_resets_the_down_timer():
    p = AutoscalePolicy(CFG)
    idle = obs(("a", "awake", 0.1), ("b", "awake", 0.1))
    assert run(p, [0, 59], idle) == []
    assert p.tick(59.5, [obs(("a", "awake", 0.5), ("b", "awake", 0.1))]) == []  # mean 0.3: not below
    assert run(p, [60, 119.9], idle) == []
    assert len(p.tick(120, [idle])) == 1


def test_between_the_thresholds_nothing_happens():
    p = AutoscalePolicy(CFG)
    assert run(p, [0, 100, 1000, 10000], obs(("a", "awake", 0.5), ("b", "awake", 0.5))) == []


# --- per-model limits, several models, forget, reconfigure -----------------------------------


def test_per_model_limits_override_the_global_bounds():
    cfg = replace(CFG, models={"big": ModelLimits(max_replicas=1), "hot": ModelLimits(min_replicas=2, max_replicas=5)})
    assert cfg.bounds("big") == (1, 1) and cfg.bounds("hot") == (2, 5) and cfg.bounds("other") == (1, 3)
    p = AutoscalePolicy(cfg)
    big = obs(("a", "awake", 3.0), model="big")
    hot = obs(*((f"h{i}", "awake", 3.0) for i in range(4)), model="hot")
    other = obs(*((f"o{i}", "awake", 3.0) for i in range(3)), model="other")
    got = [d for t in (0, 5) for d in p.tick(t, [big, hot, other])]
    assert got == [ScaleUp("hot", got[0].reason)]
    assert "max_replicas 5" in got[0].reason
    idle_hot = obs(("h0", "awake", 0.0), ("h1", "awake", 0.0), model="hot")
    assert run(p, [10, 70, 700], idle_hot) == []  # min_replicas 2 for hot


def test_models_have_independent_timers_and_unobserved_models_reset():
    p = AutoscalePolicy(CFG)
    a, b = obs(("x", "awake", 0.9), model="a"), obs(("y", "awake", 0.9), model="b")
    assert p.tick(0, [a, b]) == []
    assert p.tick(3, [a]) == []  # b not observed: its timer is gone
    got = p.tick(5, [a, b])
    assert [d.model for d in got] == ["a"]
    assert p.tick(9.9, [b]) == []  # restarted at 5
    assert [d.model for d in p.tick(10, [b])] == ["b"]


def test_forget_drops_a_models_timers():
    p = AutoscalePolicy(CFG)
    busy = obs(("a", "awake", 0.9))
    p.tick(0, [busy])
    p.forget("m")
    p.forget("never-seen")
    assert p.tick(5, [busy]) == []
    assert len(p.tick(10, [busy])) == 1


def test_disabled_policy_decides_nothing():
    p = AutoscalePolicy(replace(CFG, enabled=False))
    assert run(p, [0, 5, 100, 1000], obs(("a", "awake", 5.0))) == []
    assert run(p, [0, 5, 100, 1000], obs(("a", "awake", 0.0), ("b", "awake", 0.0))) == []


def test_reconfigure_keeps_running_timers_and_applies_new_bounds():
    p = AutoscalePolicy(replace(CFG, max_replicas=1))
    busy = obs(("a", "awake", 0.9))
    assert run(p, [0, 5, 10], busy) == []  # at max
    p.reconfigure(replace(CFG, max_replicas=2))
    assert len(p.tick(11, [busy])) == 1  # the condition has held since 0


def test_reconfigure_new_threshold_breaks_the_condition():
    p = AutoscalePolicy(CFG)
    busy = obs(("a", "awake", 0.9))
    p.tick(0, [busy])
    p.reconfigure(replace(CFG, scale_up_score=0.95, scale_down_score=0.3))
    assert run(p, [5, 50], busy) == []


def test_reconfigure_to_disabled_and_back_restarts_timers():
    p = AutoscalePolicy(CFG)
    busy = obs(("a", "awake", 0.9))
    p.tick(0, [busy])
    p.reconfigure(replace(CFG, enabled=False))
    assert p.tick(5, [busy]) == []
    p.reconfigure(CFG)
    assert p.tick(6, [busy]) == []
    assert p.tick(10.9, [busy]) == []
    assert len(p.tick(11, [busy])) == 1


def test_zero_wait_decides_on_the_first_tick():
    p = AutoscalePolicy(replace(CFG, scale_up_after=0.0))
    assert len(p.tick(0, [obs(("a", "awake", 0.9))])) == 1


# --- config ------------------------------------------------------------------------------------


@pytest.fixture
def parse(tmp_path):
    def parse(text: str) -> AutoscaleConfig:
        path = tmp_path / "servers.toml"
        path.write_text(text)
        return parse_autoscale(load_toml(path).get("autoscale"), "servers.toml")

    return parse


def test_defaults_when_absent_and_off():
    cfg = parse_autoscale(None, "servers.toml")
    assert cfg == AutoscaleConfig()
    assert cfg.enabled is False and cfg.bounds("x") == (1, 4)
    assert (cfg.scale_up_score, cfg.scale_up_after, cfg.scale_down_score, cfg.scale_down_after) == (0.8, 5.0, 0.3, 60.0)


def test_the_issue_example_parses(parse):
    cfg = parse("""
[autoscale]
enabled = true
min_replicas = 1
max_replicas = 4
scale_up_score = 0.8
scale_up_after = 5
scale_down_score = 0.3
scale_down_after = 60
[autoscale.models."llama-8b"]
max_replicas = 2
[autoscale.models."qwen"]
min_replicas = 2
""")
    assert cfg.enabled and cfg.scale_up_after == 5.0 and isinstance(cfg.scale_up_after, float)
    assert cfg.bounds("llama-8b") == (1, 2) and cfg.bounds("qwen") == (2, 4) and cfg.bounds("z") == (1, 4)


@pytest.mark.parametrize(
    ("text", "key", "words"),
    [
        ("enabled = 1", "autoscale.enabled", "true or false"),
        ("min_replicas = 0", "autoscale.min_replicas", ">= 1"),
        ("max_replicas = 'four'", "autoscale.max_replicas", "integer"),
        ("min_replicas = 3\nmax_replicas = 2", "autoscale.min_replicas", "<= max_replicas (2)"),
        ("scale_up_score = -1", "autoscale.scale_up_score", ">= 0"),
        ("scale_up_after = -5", "autoscale.scale_up_after", ">= 0"),
        ("scale_down_score = 0.8", "autoscale.scale_down_score", "below scale_up_score (0.8)"),
        ("scale_up_score = 0.2", "autoscale.scale_down_score", "below scale_up_score (0.2)"),
        ("scale_down_afer = 60", "autoscale.scale_down_afer", "unknown key"),
        ("models = 3", "autoscale.models", "expected a table"),
        ("[autoscale.models.m]\nmax_replicas = 0", 'autoscale.models."m".max_replicas', ">= 1"),
        ("[autoscale.models.m]\nmax = 2", 'autoscale.models."m".max', "unknown key"),
        ("[autoscale.models.m]\nmin_replicas = 5", 'autoscale.models."m".min_replicas', "must be <= max_replicas (4)"),
        ("max_replicas = 2\n[autoscale.models.m]\nmin_replicas = 3", 'autoscale.models."m".min_replicas', "(3)"),
        ("min_replicas = 3\n[autoscale.models.m]\nmax_replicas = 2", 'autoscale.models."m".max_replicas', "(2)"),
    ],
)
def test_config_errors_name_file_key_and_fix(parse, text: str, key: str, words: str):
    body = text if text.startswith("[autoscale") else "[autoscale]\n" + text
    if text.startswith("[autoscale.models"):
        body = "[autoscale]\n" + text
    with pytest.raises(ConfigError) as err:
        parse(body)
    assert err.value.path == "servers.toml"
    assert err.value.key == key
    assert words in str(err.value)
    assert str(err.value).startswith(f"servers.toml: key '{key}'")


def test_autoscale_table_that_is_not_a_table():
    with pytest.raises(ConfigError) as err:
        parse_autoscale([1, 2], "servers.toml")
    assert err.value.key == "autoscale" and "expected a table" in str(err.value)


def test_servers_toml_carries_autoscale_into_the_router_config(tmp_path):
    path = tmp_path / "servers.toml"
    path.write_text('[autoscale]\nenabled = true\nscale_up_after = 1\n[autoscale.models."a"]\nmax_replicas = 2\n')
    cfg = load_config(path, environ={}).autoscale
    assert cfg.enabled and cfg.scale_up_after == 1.0 and cfg.bounds("a") == (1, 2)
    path.write_text("[autoscale]\nenabeld = true\n")
    with pytest.raises(ConfigError) as err:
        load_config(path, environ={})
    assert err.value.key == "autoscale.enabeld"
    path.write_text("")
    assert load_config(path, environ={}).autoscale == AutoscaleConfig()
