"""``--event-monitor path=P|fd=N``: one JSON object per event, as the reference emits them
(``{"timestamp": {"secs", "nanos"}, "source", "event", "properties"}``, time since the VMM
started). Objects are written one per line, so a reader can parse the stream line by line.
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
        self._start = time.monotonic_ns()
        self._lock = threading.Lock()

    def emit(self, source: str, event: str, properties: dict | None = None) -> None:
        ns = time.monotonic_ns() - self._start
        record = {"timestamp": {"secs": ns // 1_000_000_000, "nanos": ns % 1_000_000_000},
                  "source": source, "event": event, "properties": properties}
        data = (json.dumps(record, separators=(",", ":")) + "\n").encode()
        with self._lock:
            try:
                os.write(self._fd, data)
            except OSError as e:
                log.warning("event monitor: %s", e)

    def close(self) -> None:
        with self._lock:
            if self._fd >= 0:
                os.close(self._fd)
                self._fd = -1


class NullEventMonitor:
    def emit(self, source: str, event: str, properties: dict | None = None) -> None:
        pass

    def close(self) -> None:
        pass
