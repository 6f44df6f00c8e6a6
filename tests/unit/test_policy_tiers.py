"""policy.engine_tier: the rank of an agent's engine when no node has the model awake."""

from __future__ import annotations

import pytest

from mvllm.common.state import (
    FAILED,
    PLACEMENT_EVICT,
    PLACEMENT_FITS,
    PLACEMENT_NO_ROOM,
    READY,
    SLEEPING,
    STARTING,
    STOPPED,
)
from mvllm.router.policy import (
    TIER_AWAKE,
    TIER_EVICT,
    TIER_FITS,
    TIER_LOADING,
    TIER_NO_ROOM,
    TIER_SLEEPING,
    engine_tier,
)


@pytest.mark.parametrize("pending", [False, True])
def test_awake_is_awake_whatever_else(pending: bool) -> None:
    assert engine_tier(READY, PLACEMENT_NO_ROOM, pending) == TIER_AWAKE


def test_failed_engine_is_no_candidate_even_with_requests_pending() -> None:
    assert engine_tier(FAILED, PLACEMENT_FITS, False) is None
    assert engine_tier(FAILED, PLACEMENT_FITS, True) is None


def test_starting_or_requests_pending_share_the_load() -> None:
    assert engine_tier(STARTING, PLACEMENT_NO_ROOM, False) == TIER_LOADING
    assert engine_tier(SLEEPING, PLACEMENT_FITS, True) == TIER_LOADING  # a wake under way outranks sleeping
    assert engine_tier(STOPPED, PLACEMENT_EVICT, True) == TIER_LOADING


def test_cold_engines_rank_sleeping_then_fits_then_evict_then_no_room() -> None:
    assert engine_tier(SLEEPING, PLACEMENT_NO_ROOM, False) == TIER_SLEEPING
    assert engine_tier(STOPPED, PLACEMENT_FITS, False) == TIER_FITS
    assert engine_tier(STOPPED, PLACEMENT_EVICT, False) == TIER_EVICT
    assert engine_tier(STOPPED, PLACEMENT_NO_ROOM, False) == TIER_NO_ROOM
    order = [TIER_AWAKE, TIER_LOADING, TIER_SLEEPING, TIER_FITS, TIER_EVICT, TIER_NO_ROOM]
    assert order == sorted(order)
