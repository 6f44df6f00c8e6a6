"""The pure side of the cluster store's scripts: how checks are encoded and replies decoded."""

from __future__ import annotations

import json
import math

import pytest

from mvllm.router.cluster_scripts import (
    Admission,
    Denial,
    QuotaCheck,
    RateCheck,
    SlotCheck,
    TokenCheck,
    encode_checks,
    parse_admission,
    redis_key,
)


def test_keys_carry_the_prefix_and_kind():
    assert redis_key("mvllm:", RateCheck("team-a", 5)) == "mvllm:rate:team-a"
    assert redis_key("p/", SlotCheck("global", 2)) == "p/slots:global"
    assert redis_key("mvllm:", TokenCheck("k", 10, 1)) == "mvllm:tpm:k"
    assert redis_key("mvllm:", QuotaCheck("k")) == "mvllm:quota:k"


def test_encoding_defaults_and_clamps():
    checks = [RateCheck("a", 2.5), SlotCheck("a", None, 3.0), TokenCheck("a", 100, 1000), QuotaCheck("a", None, 7)]
    encoded = json.loads(encode_checks(checks, [None, "r:1", None, None]))
    assert encoded == [
        {"k": "rate", "rate": 2.5, "burst": 3.0},  # burst = max(1, ceil(rate)), as TokenBucket
        {"k": "slots", "limit": -1, "ttl": 3.0, "lease": "r:1"},  # no limit: count only
        {"k": "tpm", "limit": 100, "amount": 100, "window": 60.0, "res": 1.0},  # clamped to the limit
        {"k": "quota", "total": -1, "day": 7},
    ]
    assert json.loads(encode_checks([RateCheck("a", 0.5), TokenCheck("a", 10, -4)], [None, None])) == [
        {"k": "rate", "rate": 0.5, "burst": 1.0},
        {"k": "tpm", "limit": 10, "amount": 0, "window": 60.0, "res": 1.0},
    ]


def test_encoding_rejects_bad_checks():
    with pytest.raises(ValueError):
        encode_checks([RateCheck("a", 0)], [None])
    with pytest.raises(ValueError):
        encode_checks([SlotCheck("a", 1)], [None])
    with pytest.raises(ValueError):
        encode_checks([RateCheck("a", 1)], [])


def test_parse_allowed_reply_builds_leases_and_reservations():
    checks = [RateCheck("a", 1), SlotCheck("a", 2, 4.0), TokenCheck("a", 50, 80)]
    keys = ["p:rate:a", "p:slots:a", "p:tpm:a"]
    got = parse_admission([1, b"", b"", b"12.000000"], checks, keys, [None, "r:9", None])
    assert got.allowed and got.denials == () and got.worst is None
    assert [(x.redis_key, x.lease_id, x.ttl_s) for x in got.leases] == [("p:slots:a", "r:9", 4.0)]
    (res,) = got.reservations
    assert (res.redis_key, res.slot, res.amount) == ("p:tpm:a", "12.000000", 50)
    with pytest.raises(ValueError):
        parse_admission([1, b""], checks, keys, [None, "r:9", None])


def test_parse_denials_and_pick_the_worst_as_limitset_does():
    checks = [RateCheck("a", 1), SlotCheck("a", 1), QuotaCheck("a", 1)]
    reply = [0, 1, b"requests_per_second", b"0.250000", 2, b"max_concurrent", b"?"]
    got = parse_admission(reply, checks, ["k1", "k2", "k3"], [None, "l", None])
    assert not got.allowed and got.leases == ()
    assert got.denials == (Denial(0, "requests_per_second", 0.25), Denial(1, "max_concurrent", None))
    # As LimitSet: Retry-After 1 for both, then the known wait decides.
    assert got.worst == Denial(0, "requests_per_second", 0.25)
    slot_first = Admission(False, (Denial(1, "max_concurrent", None), Denial(0, "requests_per_second", 1.5)))
    assert slot_first.worst is not None and slot_first.worst.limit == "requests_per_second"
    never = Admission(False, (*got.denials, Denial(2, "requests_total", math.inf)))
    assert never.worst is not None and never.worst.limit == "requests_total"
    finite = Admission(False, (Denial(0, "requests_per_second", 0.2), Denial(1, "tokens_per_minute", 3.0)))
    assert finite.worst is not None and finite.worst.limit == "tokens_per_minute"
    with pytest.raises(ValueError):
        parse_admission([0, 1, b"x"], checks, ["k1", "k2", "k3"], [None, "l", None])
    with pytest.raises(ValueError):
        parse_admission([], checks, ["k1", "k2", "k3"], [None, "l", None])
