"""The event monitor: one JSON line per event, and a reader that stops reading never blocks
the emitter: events it has no room for are dropped, counted and logged once per stall, and
no line is ever cut."""

from __future__ import annotations

import fcntl
import json
import logging
import os
import threading

import pytest

from pych.event_monitor import EventMonitor


@pytest.fixture
def pipe():
    r, w = os.pipe()
    fcntl.fcntl(w, fcntl.F_SETPIPE_SZ, 4096)          # the smallest pipe: fills after ~40 events
    yield r, w
    for fd in (r, w):
        try:
            os.close(fd)
        except OSError:
            pass


def read_all(fd: int) -> bytes:
    os.set_blocking(fd, False)
    out = b""
    while True:
        try:
            chunk = os.read(fd, 65536)
        except BlockingIOError:
            return out
        if not chunk:
            return out
        out += chunk


def emit_in_thread(monitor: EventMonitor, count: int, **props) -> bool:
    """Emit ``count`` events on another thread; True if that finished within 10 s."""
    def run():
        for i in range(count):
            monitor.emit("vm", "resized", {"i": i, **props})
    t = threading.Thread(target=run, daemon=True)
    t.start()
    t.join(10)
    return not t.is_alive()


def test_lines_are_json_with_the_references_fields(tmp_path):
    path = tmp_path / "events"
    monitor = EventMonitor(path=str(path))
    monitor.emit("vm", "booted")
    monitor.emit("vm", "device-failed", {"id": "_fs0", "error": "gone"})
    monitor.close()
    first, second = (json.loads(line) for line in path.read_text().splitlines())
    assert set(first) == {"timestamp", "source", "event", "properties"}
    assert first["event"] == "booted" and first["properties"] is None
    assert second["properties"] == {"id": "_fs0", "error": "gone"}
    assert monitor.dropped == 0


def test_a_stalled_reader_drops_events_instead_of_blocking(pipe, caplog):
    r, w = pipe
    monitor = EventMonitor(fd=w)
    with caplog.at_level(logging.WARNING, logger="pych.event_monitor"):
        assert emit_in_thread(monitor, 500), "emit blocked on a reader that does not read"
        assert 0 < monitor.dropped < 500
        stalled = [r.message for r in caplog.records if "not reading" in r.message]
        assert len(stalled) == 1                          # logged once, not per event
        delivered = read_all(r)
        assert delivered.endswith(b"\n")
        lines = [json.loads(line) for line in delivered.splitlines()]
        assert len(lines) == 500 - monitor.dropped
        assert [e["properties"]["i"] for e in lines] == list(range(len(lines)))
        # the reader reads again: events flow, and what it missed is logged once
        monitor.emit("vm", "resumed")
        assert json.loads(read_all(r))["event"] == "resumed"
        caught_up = [r.message for r in caplog.records if "reading again" in r.message]
        assert caught_up == [f"event monitor: the reader is reading again; "
                             f"{monitor.dropped} events were dropped meanwhile"]
    monitor.close()


def test_an_event_taken_in_part_is_completed_before_anything_else(pipe):
    r, w = pipe
    monitor = EventMonitor(fd=w)
    big = "x" * 3000                                      # > half the pipe: written in parts
    assert emit_in_thread(monitor, 3, blob=big)
    assert monitor.dropped >= 1
    first = read_all(r)
    monitor.emit("vm", "after")                           # the cut tail goes out first
    rest = first + read_all(r)
    lines = [json.loads(line) for line in rest.splitlines()]
    assert rest.endswith(b"\n") and lines[-1]["event"] == "after"
    assert all(e["properties"]["blob"] == big for e in lines[:-1])


def test_a_reader_that_went_away_does_not_stop_the_emitter(pipe, caplog):
    r, w = pipe
    monitor = EventMonitor(fd=w)
    os.close(r)
    with caplog.at_level(logging.WARNING, logger="pych.event_monitor"):
        assert emit_in_thread(monitor, 50)
    assert monitor.dropped == 50
    assert len([r for r in caplog.records if "Broken pipe" in r.message]) == 1
    monitor.close()
