"""The router's recent-events ring buffer (behind /admin/events, read by the dashboard's panes)."""

from __future__ import annotations

import logging

from mvllm.router.admin.nodes import EventLog
from mvllm.tui.cells import event_text


def test_events_get_sequence_numbers_and_the_ring_keeps_the_newest() -> None:
    events = EventLog(maxlen=3)
    log = logging.getLogger("mvllm.test.events")
    log.addHandler(events)
    log.setLevel(logging.INFO)
    log.propagate = False
    try:
        for i in range(5):
            log.warning("node %s is down", f"n{i}")
        log.debug("not kept: below the logger's level")
        try:
            raise ValueError("bad")
        except ValueError:
            log.exception("reload failed")
    finally:
        log.removeHandler(events)
    assert events.last_seq == 6
    got = events.since(0)
    assert [e["seq"] for e in got] == [4, 5, 6] and events.first_seq == 4
    assert got[0]["message"] == "node n3 is down" and got[0]["level"] == "WARNING"
    assert got[-1]["message"] == "reload failed: ValueError: bad" and got[-1]["level"] == "ERROR"
    assert [e["seq"] for e in events.since(5)] == [6]
    assert [e["seq"] for e in events.since(0, limit=2)] == [5, 6]
    assert events.since(6) == []


def test_an_event_renders_as_one_console_like_line() -> None:
    line = event_text({"seq": 1, "time": 0, "level": "WARNING", "logger": "mvllm.router.scraper", "message": "node a is down"})
    assert line.plain.endswith("WARNING mvllm.router.scraper: node a is down")
