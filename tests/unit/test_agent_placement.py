"""Placement policy: fit checks, LRU eviction among idle unpinned models, launch utilization."""

from dataclasses import replace

import pytest

from mvllm.agent.placement import (
    ACTION_SLEEP,
    ACTION_STOP,
    GIB,
    Gpu,
    Resident,
    Step,
    SwitchStep,
    effective_sleep_level,
    launch_utilization,
    need_bytes,
    plan,
    shortfall,
    switch_step,
)
from mvllm.common.state import READY, SLEEPING, STARTING

G24 = {0: Gpu(0, 24 * GIB, 0)}


def gpus(used_gib: float, total_gib: float = 24, index: int = 0) -> dict[int, Gpu]:
    return {index: Gpu(index, int(total_gib * GIB), int(used_gib * GIB))}


def res(name, state=READY, mem_gib=10.0, last=0.0, **kw) -> Resident:
    return Resident(name=name, state=state, memory={0: int(mem_gib * GIB)}, last_used=last, **kw)


def test_need_bytes_prefers_explicit_budget():
    assert need_bytes(10, 0.5, 80 * GIB) == 10 * GIB
    assert need_bytes(None, 0.5, 80 * GIB) == 40 * GIB
    assert need_bytes(None, None, 100) == 90  # default 0.9 of the card


def test_fits_with_reserve():
    assert shortfall({0: 10 * GIB}, gpus(12), reserve=GIB) == {}
    assert shortfall({0: 10 * GIB}, gpus(14), reserve=GIB) == {0: GIB}
    # No data for a GPU (no NVML): not counted short.
    assert shortfall({3: 10 * GIB}, gpus(24), reserve=GIB) == {}


def test_pending_starts_count_against_headroom():
    assert shortfall({0: 10 * GIB}, gpus(0), reserve=GIB, pending={0: 14 * GIB}) == {0: GIB}


def test_fits_needs_no_steps():
    p = plan("c", {0: 10 * GIB}, gpus(10), [res("a")], reserve=GIB)
    assert p.fits and p.feasible and p.steps == []


def test_evicts_least_recently_used_first():
    residents = [res("a", last=5.0), res("b", last=1.0)]
    p = plan("c", {0: 10 * GIB}, gpus(20), residents, reserve=GIB)
    assert not p.fits and p.feasible
    assert p.steps == [Step("b", ACTION_SLEEP, 1)]
    assert p.short == {0: 7 * GIB}


def test_never_evicts_busy_pinned_or_in_operation():
    residents = [
        res("busy", last=0.0, in_flight=1),
        res("pinned", last=1.0, pinned=True),
        res("op", last=2.0, busy=True),
        res("free", last=3.0),
    ]
    p = plan("c", {0: 10 * GIB}, gpus(40, total_gib=48), residents, reserve=GIB)
    assert [s.name for s in p.steps] == ["free"]


def test_infeasible_when_only_busy_ones_hold_memory():
    p = plan("c", {0: 10 * GIB}, gpus(20), [res("a", in_flight=2), res("b", pinned=True)], reserve=GIB)
    assert not p.fits and not p.feasible


def test_counting_in_flight_ones_tells_wait_from_never_fits():
    # The agent's question when the plan is infeasible: would it fit once the requests end?
    residents = [res("a", in_flight=2, last=5.0), res("b", pinned=True)]
    later = plan("c", {0: 10 * GIB}, gpus(20), residents, reserve=GIB, include_in_flight=True)
    assert later.feasible and not later.fits and later.steps == [Step("a", ACTION_SLEEP, 1)]
    # Pinned models and operations under way stay out even then: no wait would make room.
    stuck = [res("a", busy=True), res("b", pinned=True)]
    assert not plan("c", {0: 10 * GIB}, gpus(20), stuck, reserve=GIB, include_in_flight=True).feasible
    assert not plan("c", {0: 30 * GIB}, gpus(20), residents, reserve=GIB, include_in_flight=True).feasible


def test_sleep_level_zero_means_stop():
    p = plan("c", {0: 10 * GIB}, gpus(20), [res("a", sleep_level_on_idle=0), res("b", last=9)], reserve=GIB)
    assert p.steps[0].name == "a" and p.steps[0].action == ACTION_STOP


def test_sleeping_models_are_stopped_when_sleep_is_not_enough():
    # Two models asleep hold 1 GiB each on a 4 GiB card; a 4 GiB model needs both gone.
    residents = [res("a", SLEEPING, 1.0, last=2.0), res("b", SLEEPING, 1.0, last=1.0)]
    p = plan("c", {0: 4 * GIB}, gpus(2, total_gib=4), residents, reserve=0)
    assert [(s.name, s.action) for s in p.steps] == [("b", ACTION_STOP), ("a", ACTION_STOP)]
    assert p.feasible


def test_pass_two_turns_a_sleep_into_a_stop():
    # a is awake with 10 GiB; sleeping it frees 9, the model needs 9.5 more: stop it instead.
    p = plan("c", {0: int(9.5 * GIB)}, gpus(10, total_gib=10), [res("a", mem_gib=10)], reserve=0)
    assert [(s.name, s.action) for s in p.steps] == [("a", ACTION_STOP)]
    assert p.feasible


def test_only_models_on_short_gpus_are_candidates():
    other = Resident("other", READY, {1: 10 * GIB}, last_used=0.0)
    mine = Resident("mine", READY, {0: 10 * GIB}, last_used=5.0)
    g = {0: Gpu(0, 24 * GIB, 20 * GIB), 1: Gpu(1, 24 * GIB, 10 * GIB)}
    p = plan("c", {0: 10 * GIB}, g, [other, mine], reserve=GIB)
    assert [s.name for s in p.steps] == ["mine"]


def test_starting_models_are_not_candidates():
    p = plan("c", {0: 10 * GIB}, gpus(20), [res("s", STARTING)], reserve=GIB)
    assert not p.feasible


def test_wake_asks_only_for_the_difference():
    # A sleeping model holding 1 GiB of its 10 GiB budget needs 9 GiB more.
    p = plan("me", {0: 9 * GIB}, gpus(14), [res("me", SLEEPING, 1.0)], reserve=GIB)
    assert p.fits


def test_launch_utilization_from_free_memory():
    total = 80 * GIB
    assert launch_utilization(40 * GIB, total, free=80 * GIB, reserve=GIB) == 0.5
    # Less free than the budget: capped by what is free now, minus the reserve, floored.
    assert launch_utilization(40 * GIB, total, free=30 * GIB, reserve=GIB) == 0.362
    assert launch_utilization(40 * GIB, total, free=0, reserve=GIB) == 0.001



def test_lora_model_is_evicted_at_level_1_not_2():
    # vLLM 0.25 with --enable-lora dies reloading weights after level 2: the plan says level 1.
    residents = [res("a", sleep_level_on_idle=2, lora_enabled=True), res("b", sleep_level_on_idle=2, last=9)]
    p = plan("c", {0: 19 * GIB}, gpus(20), residents, reserve=GIB)
    assert p.steps == [Step("a", ACTION_SLEEP, 1), Step("b", ACTION_SLEEP, 2)]
    assert effective_sleep_level(2, True) == 1 and effective_sleep_level(2, False) == 2
    assert effective_sleep_level(1, True) == 1 and effective_sleep_level(0, True) == 0


def test_a_switch_waits_up_to_max_switch_wait_then_drains():
    # Before max_switch_wait: wait, and look again no later than the moment the drain falls due.
    assert switch_step(0.0, 30.0, 600.0) == SwitchStep(drain=False, wait_s=1.0)
    assert switch_step(29.7, 30.0, 600.0) == SwitchStep(drain=False, wait_s=pytest.approx(0.3))
    # From max_switch_wait on: drain now, then keep polling for one of them to go idle.
    assert switch_step(30.0, 30.0, 600.0) == SwitchStep(drain=True, wait_s=1.0)
    assert switch_step(45.0, 30.0, 600.0).drain
    # 0: drain at once; the wait never outlasts what is left of load_timeout.
    assert switch_step(0.0, 0.0, 600.0).drain
    assert switch_step(1.0, 30.0, 0.25) == SwitchStep(drain=False, wait_s=0.25)
    assert switch_step(31.0, 30.0, -1.0).wait_s == 0.0


def test_max_switch_wait_at_or_above_load_timeout_never_drains():
    # The request gives up (load_timeout) before the drain falls due: the old behaviour.
    left = 10.0
    for waited in (0.0, 5.0, 9.9):
        assert not switch_step(waited, 10.0, left - waited).drain


def test_unload_sleeps_deep_while_there_is_room_and_stops_when_memory_is_wanted():
    from mvllm.agent.placement import UNLOAD_DEEPEN, UNLOAD_KEEP, UNLOAD_SLEEP, UNLOAD_STOP, unload_step

    def step(state=READY, level=0, lora=False, wanted=False, fits=True):
        return unload_step(state=state, sleep_level=level, lora_enabled=lora, memory_wanted=wanted, wake_fits=fits)

    assert step() == UNLOAD_SLEEP  # awake: straight to level 2
    assert step(SLEEPING, 1) == UNLOAD_DEEPEN  # level 1: wake (it fits), then level 2
    assert step(SLEEPING, 1, fits=False) == UNLOAD_KEEP  # no room to wake it: it stays at level 1
    assert step(SLEEPING, 2) == UNLOAD_KEEP
    assert step(SLEEPING, 1, lora=True) == UNLOAD_KEEP  # LoRA: level 1 is as deep as it goes
    assert step(READY, wanted=True) == UNLOAD_STOP and step(SLEEPING, 2, wanted=True) == UNLOAD_STOP
    assert step(STARTING) == UNLOAD_STOP


def test_eviction_weighs_measured_wake_and_cold_costs_against_idle_time():
    from mvllm.agent.placement import eviction_key

    now = 1000.0
    # Two sleeping models, 30 GiB short: one must be stopped. `old` is the least recently used,
    # but its cold start takes 100 s against `recent`'s 5 s: stopping `recent` loses less.
    old = res("old", SLEEPING, 2, last=900.0, cold_s=100.0, wake_s=0.5)
    recent = res("recent", SLEEPING, 2, last=950.0, cold_s=5.0, wake_s=0.5)
    p = plan("new", {0: 22 * GIB}, gpus(4), [old, recent], reserve=0, now=now)
    assert p.steps == [Step("recent", ACTION_STOP)]
    # Without measures (or without `now`): least recently used first, as before.
    bare = [replace(old, cold_s=None, wake_s=None), replace(recent, cold_s=None, wake_s=None)]
    assert plan("new", {0: 22 * GIB}, gpus(4), bare, reserve=0, now=now).steps == [Step("old", ACTION_STOP)]
    assert plan("new", {0: 22 * GIB}, gpus(4), [old, recent], reserve=0).steps == [Step("old", ACTION_STOP)]
    # Costs below a second are alike: recency decides (a sim's 0.02 s against 0.05 s wakes).
    a = res("a", last=100.0, wake_s=0.05)
    b = res("b", last=200.0, wake_s=0.02)
    assert eviction_key(a, ACTION_SLEEP, now) < eviction_key(b, ACTION_SLEEP, now)
    assert plan("new", {0: 10 * GIB}, gpus(20), [b, a], reserve=0, now=now).steps == [Step("a", ACTION_SLEEP, 1)]
    # A wake that costs much more (a level-2 wake reloading weights) moves an awake one back.
    slow = res("slow", last=100.0, wake_s=40.0, sleep_level_on_idle=2)
    assert plan("new", {0: 10 * GIB}, gpus(20), [slow, b], reserve=0, now=now).steps == [Step("b", ACTION_SLEEP, 1)]
