"""Log files: the engines' size cap by copy-and-truncate and the cursor reads across a rotation
(mvllm.agent.enginelogs), the router/agent rotating log file, listing and age cleanup
(mvllm.common.logfiles). Real files in a temporary directory; the "engine" is a file opened for
appending, as the agent opens it for the engine it spawns."""

from __future__ import annotations

import logging
import os
import time
from pathlib import Path

import pytest

from mvllm.agent.enginelogs import EngineLogs, parse_cursor
from mvllm.agent.errors import BadRequest
from mvllm.common.logfiles import LogConfig, file_logging, remove_older_than, rotated_files


def engine_writer(path: Path):
    return open(path, "ab", buffering=0)  # the engine's stdout: O_APPEND, unbuffered


def test_copy_truncate_keeps_the_engine_writing_at_the_start(tmp_path):
    logs = EngineLogs(tmp_path, max_bytes=1024, backups=2)
    with engine_writer(logs.path("m")) as out:
        out.write(b"x" * 2999 + b"\n")
        assert logs.rotate_if_big("m") is True
        assert logs.path("m").stat().st_size == 0
        assert (tmp_path / "m.log.1").read_bytes() == b"x" * 2999 + b"\n"
        out.write(b"after\n")  # O_APPEND: at the new end, no hole of 3000 zero bytes
    assert logs.path("m").read_bytes() == b"after\n"
    assert logs.rotate_if_big("m") is False  # under the cap


def test_backups_are_shifted_and_capped(tmp_path):
    logs = EngineLogs(tmp_path, max_bytes=1024, backups=2)
    for i in range(4):
        logs.path("m").write_bytes(f"gen {i}\n".encode() * 300)
        assert logs.rotate_if_big("m")
    assert (tmp_path / "m.log.1").read_bytes().startswith(b"gen 3")
    assert (tmp_path / "m.log.2").read_bytes().startswith(b"gen 2")
    assert not (tmp_path / "m.log.3").exists()
    assert [p.name for p in rotated_files(logs.path("m"))] == ["m.log.1", "m.log.2"]
    none_kept = EngineLogs(tmp_path / "b", max_bytes=1024, backups=0)
    (tmp_path / "b").mkdir()
    none_kept.path("m").write_bytes(b"y" * 2000)
    assert none_kept.rotate_if_big("m") and none_kept.path("m").stat().st_size == 0
    assert rotated_files(none_kept.path("m")) == []


def test_cursor_follows_across_one_rotation(tmp_path):
    logs = EngineLogs(tmp_path, max_bytes=1024, backups=1)
    with engine_writer(logs.path("m")) as out:
        out.write(b"line 1\nline 2\n")
        first = logs.tail("m", 1)
        assert first.text == "line 2\n" and first.cursor == "0:14"
        out.write(b"line 3\n" + b"pad\n" * 300)  # over the cap
        assert logs.rotate_if_big("m")
        out.write(b"line 4\n")
        nxt = logs.read("m", first.cursor)
        assert nxt.text == "line 3\n" + "pad\n" * 300 + "line 4\n" and not nxt.skipped
        assert nxt.cursor == "1:7"
        assert logs.read("m", nxt.cursor).text == ""


def test_a_reader_two_rotations_behind_is_told(tmp_path):
    logs = EngineLogs(tmp_path, max_bytes=1024, backups=1)
    with engine_writer(logs.path("m")) as out:
        out.write(b"a\n")
        cursor = logs.tail("m", 10).cursor
        for _ in range(2):
            out.write(b"b\n" * 600)
            logs.rotate_if_big("m")
        out.write(b"c\n")
    chunk = logs.read("m", cursor)
    assert chunk.skipped and chunk.text == "c\n"


def test_reads_give_whole_lines_and_respect_the_limit(tmp_path):
    logs = EngineLogs(tmp_path, max_bytes=10**6, backups=1)
    with engine_writer(logs.path("m")) as out:
        out.write(b"done\npart")
        chunk = logs.read("m", "0:0")
        assert chunk.text == "done\n" and chunk.cursor == "0:5"
        out.write(b"ial\n")
        chunk = logs.read("m", chunk.cursor)
        assert chunk.text == "partial\n" and chunk.cursor == "0:13"
        out.write(b"0123456789\n" * 10)
    seen, cursor, reads = "", chunk.cursor, 0
    while True:
        chunk = logs.read("m", cursor, limit=25)
        seen += chunk.text
        cursor = chunk.cursor
        reads += 1
        if not chunk.more:
            break
    assert seen == "0123456789\n" * 10 and reads >= 5


def test_bad_cursor():
    with pytest.raises(BadRequest):
        parse_cursor("12")
    assert parse_cursor("3:40") == (3, 40)


def test_cleanup_by_age_keeps_live_logs(tmp_path):
    own = LogConfig(file=tmp_path / "agent.log")
    logs = EngineLogs(tmp_path, max_bytes=1024, backups=3, own=own)
    old = time.time() - 10 * 86400
    for name in ("m.log", "m.log.1", "m.log.2", "gone.log", "agent.log", "agent.log.1", "other.txt"):
        (tmp_path / name).write_text("x\n")
        os.utime(tmp_path / name, (old, old))
    (tmp_path / "fresh.log.1").write_text("new\n")
    stats = logs.stats(["m"])
    by_name = {f["name"]: f for f in stats["files"]}
    assert "other.txt" not in by_name and by_name["agent.log"]["kind"] == "agent" and by_name["m.log"]["active"]
    assert stats["total"] == {"files": 7, "bytes": sum(f["bytes"] for f in stats["files"])}
    removed = {r["name"] for r in logs.cleanup(["m"], days=7)}
    assert removed == {"m.log.1", "m.log.2", "gone.log", "agent.log.1"}
    left = {p.name for p in tmp_path.iterdir()}
    assert {"m.log", "agent.log", "fresh.log.1", "other.txt"} <= left


def test_remove_older_than(tmp_path):
    a, b = tmp_path / "a", tmp_path / "b"
    a.write_text("1")
    b.write_text("2")
    os.utime(a, (1000, 1000))
    assert [r["name"] for r in remove_older_than([a, b, tmp_path / "missing"], days=1)] == ["a"]
    assert b.exists() and not a.exists()


def test_rotating_file_written_by_the_listener_thread(tmp_path):
    path = tmp_path / "logs" / "router.log"
    logger = logging.getLogger("mvllm.test.logfiles")
    logger.setLevel(logging.INFO)
    with file_logging(LogConfig(file=path, max_bytes=4096, backups=2)) as active:
        assert active == path
        for i in range(400):
            logger.info("line %d of the test log", i)
    assert path.exists() and (tmp_path / "logs" / "router.log.1").exists()
    assert not (tmp_path / "logs" / "router.log.3").exists()
    last = path.read_text().splitlines()[-1]
    assert last.endswith("mvllm.test.logfiles: line 399 of the test log") and " INFO " in last
    assert all(h.__class__.__name__ != "QueueHandler" for h in logging.getLogger().handlers)  # removed on exit
