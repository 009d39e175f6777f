"""Rate-limited logging for what a guest can trigger at will.

A guest can repeat a bad access millions of times a second; logging each one would let it
fill the host's disk.  :class:`GuestLog` logs the first occurrence of each kind of event,
then at most one line per ``interval`` seconds for that kind, saying how many were
suppressed in between.
"""

from __future__ import annotations

import logging
import threading
import time
from collections.abc import Hashable


class GuestLog:
    """``warning(message, *args, kind=...)``: ``logger.warning`` at most once per
    ``interval`` seconds per ``kind`` (any hashable; by default the message's format
    string, so each distinct warning is limited on its own)."""

    def __init__(self, logger: logging.Logger, interval: float = 10.0,
                 clock=time.monotonic) -> None:
        self._logger = logger
        self._interval = interval
        self._clock = clock
        self._lock = threading.Lock()
        self._kinds: dict[Hashable, list] = {}      # kind -> [last logged at, suppressed]

    def warning(self, message: str, *args: object, kind: Hashable = None) -> None:
        kind = message if kind is None else kind
        now = self._clock()
        with self._lock:
            entry = self._kinds.get(kind)
            if entry is not None and now - entry[0] < self._interval:
                entry[1] += 1
                return
            suppressed = entry[1] if entry is not None else 0
            self._kinds[kind] = [now, 0]
        if suppressed:
            message += " (%d more like it suppressed)"
            args = (*args, suppressed)
        self._logger.warning(message, *args)
