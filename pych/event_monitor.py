"""``--event-monitor path=P|fd=N``: one JSON object per event, as the reference emits them
(``{"timestamp": {"secs", "nanos"}, "source", "event", "properties"}``, time since the VMM
started). Objects are written one per line, so a reader can parse the stream line by line.

A reader that stops reading must not stop pych. Events are emitted on the control loop (and
from device threads), so the descriptor is made non-blocking once it is open (``path=`` is
opened as the reference opens it, so a FIFO still waits for its reader at start-up); an
event the pipe or socket has no room for is dropped and counted (:attr:`EventMonitor.dropped`)
instead of waiting. The first drop of a stall is logged once, and when the reader catches up
the count of what it missed is logged once. A line is never cut: the tail of an event the
descriptor took only in part is written before anything else, and new events are dropped
until it is out.
"""

from __future__ import annotations

import json
import logging
import os
import threading
import time

log = logging.getLogger(__name__)


class EventMonitor:
    def __init__(self, path: str | None = None, fd: int | None = None):
        if fd is not None:
            self._fd = os.dup(fd)
        elif path is not None:
            self._fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_APPEND | os.O_CLOEXEC, 0o644)
        else:
            raise ValueError("event monitor needs a path or an fd")
        try:
            os.set_blocking(self._fd, False)
        except OSError:
            pass                          # a descriptor that cannot be made non-blocking
        self._start = time.monotonic_ns()
        self._lock = threading.Lock()
        self._pending = b""               # the unwritten tail of the last event
        #: Events dropped because the reader was not reading (or the write failed).
        self.dropped = 0
        self._dropped_reported = 0        # ``dropped`` when the current stall was logged
        self._stalled = False

    def emit(self, source: str, event: str, properties: dict | None = None) -> None:
        ns = time.monotonic_ns() - self._start
        record = {"timestamp": {"secs": ns // 1_000_000_000, "nanos": ns % 1_000_000_000},
                  "source": source, "event": event, "properties": properties}
        data = (json.dumps(record, separators=(",", ":")) + "\n").encode()
        with self._lock:
            if self._fd < 0:
                return
            if self._pending:
                self._pending = self._pending[self._write(self._pending):]
                if self._pending:
                    self._drop(event)
                    return
            n = self._write(data)
            if n == 0:
                self._drop(event)
                return
            self._pending = data[n:]
            if self._stalled:
                self._stalled = False
                log.warning("event monitor: the reader is reading again; %d events were "
                            "dropped meanwhile", self.dropped - self._dropped_reported)

    def _write(self, data: bytes) -> int:
        """Write ``data`` without blocking; how many bytes went out (0: none could)."""
        try:
            return os.write(self._fd, data)
        except BlockingIOError:
            return 0
        except OSError as e:
            if not self._stalled:
                log.warning("event monitor: %s", e)
            return 0

    def _drop(self, event: str) -> None:
        self.dropped += 1
        if not self._stalled:
            self._stalled = True
            self._dropped_reported = self.dropped - 1
            log.warning("event monitor: the reader is not reading; dropping events (%r "
                        "first) instead of waiting for it", event)

    def close(self) -> None:
        with self._lock:
            if self._fd >= 0:
                os.close(self._fd)
                self._fd = -1


class NullEventMonitor:
    dropped = 0

    def emit(self, source: str, event: str, properties: dict | None = None) -> None:
        pass

    def close(self) -> None:
        pass
