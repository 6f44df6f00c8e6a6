"""Per-key usage kept across restarts: the usage file's round trip (codec and atomic write), the
UTC-day rollover of restored counters, LimitSet export/restore/reset, and the runtime overrides
of a key's `enabled` (kept for an unchanged key, dropped when the file changes its secret or its
`enabled`), as pure logic."""

from __future__ import annotations

import asyncio
import json
from pathlib import Path

import pytest

from mvllm.router.access.config import AuthConfig, load_auth
from mvllm.router.access.gate import AuthGate
from mvllm.router.access.keys import ApiKey, hash_key
from mvllm.router.access.limits import SECONDS_PER_DAY, KeyUsage, LimitSet, QuotaSpec, Verdict
from mvllm.router.access.usage_file import (
    KeyOverride,
    KeyOverrides,
    UsageDoc,
    UsageFileError,
    date_to_day,
    day_to_date,
    decode_usage,
    encode_usage,
    key_fingerprint,
)
from mvllm.router.access.usage_store import UsageStore, read_usage_file, write_usage_file

SECRET = "sk-unit-usage-0123456789abcdef"
OTHER = "sk-unit-other-0123456789abcdef"
DAY = 20_000  # 2024-10-04, a UTC day number
NOON = DAY * SECONDS_PER_DAY + 12 * 3600


def key(name: str = "k", secret: str = SECRET, **kw: object) -> ApiKey:
    return ApiKey(name, hash_key(secret), secret[:5] + "…", **kw)  # type: ignore[arg-type]


class Clock:
    def __init__(self, wall: float) -> None:
        self.wall = wall

    def __call__(self) -> float:
        return self.wall


def take(ls: LimitSet, k: ApiKey) -> Verdict:
    ticket = ls.ticket(k)
    d = ls.admit(ticket)
    ls.release(ticket)
    return d.verdict


# -- the file -------------------------------------------------------------------------------------


def test_usage_doc_round_trip_through_the_file(tmp_path: Path) -> None:
    doc = UsageDoc(
        usage={
            "team-a": KeyUsage(requests_total=120, requests_today=7, day=DAY, tokens=48_000, denied={"requests_per_day": 2}),
            "idle": KeyUsage(),
        },
        overrides={"team-a": KeyOverride(False, key_fingerprint(key("team-a")), True, 1_700_000_000.5)},
        saved_at=1_700_000_001.0,
    )
    path = tmp_path / "state" / "usage.json"  # the directory is made on first write
    write_usage_file(path, encode_usage(doc))
    back = read_usage_file(path)
    assert back == doc
    raw = json.loads(path.read_text())
    assert raw["version"] == 1 and raw["keys"]["team-a"]["day"] == "2024-10-04"
    assert raw["keys"]["team-a"]["override"]["enabled"] is False
    # Nothing left behind by the atomic write but the file itself.
    assert sorted(p.name for p in path.parent.iterdir()) == ["usage.json"]
    assert read_usage_file(tmp_path / "absent.json") is None


def test_the_file_never_holds_the_key_or_its_hash() -> None:
    k = key("team-a")
    text = encode_usage(UsageDoc({}, {"team-a": KeyOverride(False, key_fingerprint(k), True, 0.0)})).decode()
    assert SECRET not in text and k.digest.hex() not in text and k.digest.hex()[:16] not in text


@pytest.mark.parametrize(
    ("content", "problem"),
    [
        (b"{not json", "not JSON"),
        (b"[]", "expected a JSON object"),
        (b'{"version": 7, "keys": {}}', "version 7"),
        (b'{"version": 1, "keys": {"a": {"requests_total": -1}}}', "keys.a.requests_total"),
        (b'{"version": 1, "keys": {"a": {"requests_total": 1, "day": "yesterday"}}}', "keys.a.day"),
        (b'{"version": 1, "keys": {"a": {"override": {"enabled": "no"}}}}', "keys.a.override"),
    ],
)
def test_a_bad_file_is_refused_with_the_field_named(content: bytes, problem: str) -> None:
    with pytest.raises(UsageFileError, match=problem):
        decode_usage(content)


def test_dates_and_day_numbers() -> None:
    assert day_to_date(0) == "1970-01-01"
    assert date_to_day(day_to_date(DAY)) == DAY


# -- LimitSet: export, restore, rollover, reset -----------------------------------------------------


def test_restored_counters_keep_the_quota_used_up() -> None:
    k = key(quota=QuotaSpec(requests_total=5, requests_per_day=3))
    before = LimitSet(wall=Clock(NOON))
    assert [take(before, k) for _ in range(4)] == [Verdict.ALLOW] * 3 + [Verdict.DENY]
    saved = before.export_usage()["k"]
    assert (saved.requests_total, saved.requests_today, saved.day) == (3, 3, DAY)
    assert saved.denied == {"requests_per_day": 1}

    after = LimitSet(wall=Clock(NOON + 60))  # a restart later the same day
    after.restore_usage("k", saved)
    ticket = after.ticket(k)
    d = after.admit(ticket)
    assert (d.verdict, d.limit) == (Verdict.DENY, "requests_per_day")
    assert d.retry_after == 12 * 3600 - 60  # until 00:00 UTC
    assert after.counters()["k"]["denied_requests_per_day"] == 2


def test_restored_daily_count_of_an_earlier_day_reads_as_zero_but_the_total_stays() -> None:
    k = key(quota=QuotaSpec(requests_total=5, requests_per_day=3))
    clock = Clock(NOON)
    ls = LimitSet(wall=clock)
    ls.restore_usage("k", KeyUsage(requests_total=4, requests_today=3, day=DAY - 1))
    assert ls.counters()["k"]["requests_today"] == 0
    assert take(ls, k) is Verdict.ALLOW  # the day rolled over
    d = ls.admit(ls.ticket(k))  # the total (4 + 1 = 5) is used up now
    assert (d.verdict, d.limit, d.retry_after) == (Verdict.DENY, "requests_total", None)
    assert ls.export_usage()["k"].day == DAY

    # The day rolls over at midnight UTC while the router runs, too.
    clock.wall = (DAY + 1) * SECONDS_PER_DAY
    assert ls.export_usage()["k"] == KeyUsage(requests_total=5, requests_today=0, day=DAY + 1, tokens=0, denied={"requests_total": 1})


def test_reset_usage_zeroes_the_counters() -> None:
    k = key(quota=QuotaSpec(requests_total=1))
    ls = LimitSet(wall=Clock(NOON))
    assert take(ls, k) is Verdict.ALLOW
    assert take(ls, k) is Verdict.DENY
    ls.reset_usage("k")
    c = ls.counters()["k"]
    assert (c["requests_total"], c["requests_today"], c["denied_requests_total"]) == (0, 0, 0)
    assert take(ls, k) is Verdict.ALLOW


# -- overrides ------------------------------------------------------------------------------------


def test_an_override_holds_until_the_file_changes_the_secret_or_enabled() -> None:
    overrides = KeyOverrides()
    k = key("a")
    assert overrides.set(k, False, 1.0) is not None
    assert [x.enabled for x in overrides.apply([k])] == [False]

    # Other fields of the entry may change: the admin's disable stays.
    edited = key("a", models=("m-*",), quota=QuotaSpec(requests_total=9))
    assert overrides.reconcile([edited]) == []
    assert overrides.apply([edited])[0].enabled is False

    # The file now says enabled = false itself: a newer decision, the override goes.
    assert overrides.reconcile([key("a", enabled=False)]) == ["a"]
    assert len(overrides) == 0

    # A new secret under the same name is a new key: the override goes too.
    overrides.set(k, False, 2.0)
    assert overrides.reconcile([key("a", secret=OTHER)]) == ["a"]

    # Setting what the file says clears the override; a removed key loses it.
    overrides.set(k, False, 3.0)
    assert overrides.set(k, True, 4.0) is None and overrides.get("a") is None
    overrides.set(k, False, 5.0)
    assert overrides.reconcile([]) == ["a"]


def test_a_key_disabled_in_the_file_can_be_enabled_at_run_time() -> None:
    overrides = KeyOverrides()
    off = key("a", enabled=False)
    overrides.set(off, True, 1.0)
    assert overrides.apply([off])[0].enabled is True


def test_gate_restores_usage_and_overrides_for_the_configured_keys_only() -> None:
    a, b = key("a", quota=QuotaSpec(requests_total=10)), key("b", secret=OTHER)
    gate = AuthGate(AuthConfig(keys=(a, b)))
    doc = UsageDoc(
        usage={"a": KeyUsage(requests_total=6, requests_today=1, day=DAY), "gone": KeyUsage(requests_total=3)},
        overrides={
            "b": KeyOverride(False, key_fingerprint(b), True, 1.0),
            "a": KeyOverride(False, "0000000000000000", True, 1.0),  # set on another secret
        },
    )
    assert gate.restore(doc) == ["a"]
    assert gate.store.by_name("b").enabled is False and gate.store.by_name("a").enabled is True
    saved = gate.usage_doc()
    assert set(saved.usage) == {"a"} and saved.usage["a"].requests_total == 6
    assert set(saved.overrides) == {"b"}

    # A reload that keeps "b" as it is keeps its override; usage of "a" survives too.
    gate.apply(AuthConfig(keys=(a, b)))
    assert gate.store.by_name("b").enabled is False
    assert gate.usage_doc().usage["a"].requests_total == 6


def test_usage_file_setting(tmp_path: Path) -> None:
    servers = tmp_path / "servers.toml"
    keys = [{"name": "a", "key": SECRET}]
    assert load_auth({"keys": keys}, servers).usage_file == (tmp_path / "usage.json").resolve()
    assert load_auth({"keys": keys, "usage_file": "state/u.json"}, servers).usage_file == (tmp_path / "state/u.json").resolve()
    assert load_auth({"keys": keys, "usage_file": False}, servers).usage_file is None
    with pytest.raises(Exception, match="usage_file"):
        load_auth({"keys": keys, "usage_file": ""}, servers)


def test_the_default_usage_file_goes_to_systemds_state_directory(tmp_path: Path) -> None:
    servers = tmp_path / "etc" / "servers.toml"
    keys = [{"name": "a", "key": SECRET}]
    state = tmp_path / "var-lib-mvllm"
    env = {"STATE_DIRECTORY": f"{state}:{tmp_path / 'other'}"}
    assert load_auth({"keys": keys}, servers, env=env).usage_file == (state / "usage.json").resolve()
    # An explicit name stays relative to servers.toml; an empty variable counts as unset.
    assert load_auth({"keys": keys, "usage_file": "u.json"}, servers, env=env).usage_file == (servers.parent / "u.json").resolve()
    assert load_auth({"keys": keys}, servers, env={"STATE_DIRECTORY": ""}).usage_file == (servers.parent / "usage.json").resolve()


def set_aside(directory: Path) -> list[Path]:
    return list(directory.glob("usage.json.bad-*"))


async def test_store_saves_only_on_change_and_sets_a_bad_file_aside(tmp_path: Path) -> None:
    path = tmp_path / "usage.json"
    a = key("a", quota=QuotaSpec(requests_total=10))
    gate = AuthGate(AuthConfig(keys=(a,), usage_file=path))
    store = UsageStore(gate)
    await store.load()  # no file yet
    assert await store.save() is True and path.exists()
    assert await store.save() is False  # nothing changed
    take(gate.limits, a)
    assert await store.save() is True
    assert read_usage_file(path).usage["a"].requests_total == 1

    path.write_text("{broken")
    fresh = UsageStore(AuthGate(AuthConfig(keys=(a,), usage_file=path)))
    await fresh.load()
    assert fresh.error is not None and "unreadable" in fresh.error
    assert not path.exists() and len(set_aside(tmp_path)) == 1

    # The save loop writes at once when asked, and once more at stop.
    task = asyncio.get_running_loop().create_task(fresh.run())
    take(fresh.gate.limits, a)
    fresh.save_soon()
    for _ in range(200):
        if path.exists():
            break
        await asyncio.sleep(0.01)
    assert read_usage_file(path).usage["a"].requests_total == 1
    take(fresh.gate.limits, a)
    await fresh.stop(task)
    assert read_usage_file(path).usage["a"].requests_total == 2
