"""Port 0x80, the POST code port.

Firmware and boot loaders write progress codes here; Linux writes to it too, as its
default I/O delay, unless KVM's paravirtual no-op delay replaces that.  Every write is
counted and logged at debug level, with the time since the device was created and the
stage the reference assigns to the code's range.  Reads return the last code written
(0 before any), as chipsets that latch the port do.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Callable

log = logging.getLogger(__name__)

PORT_COUNT = 1

# The reference's convention for its own platform (devices/src/legacy/debug_port.rs).
_STAGES = ((0x20, "firmware"), (0x40, "bootloader"), (0x60, "kernel"), (0x80, "userspace"))


def post_code_stage(code: int) -> str:
    for limit, stage in _STAGES:
        if code < limit:
            return stage
    return "custom"


class DebugPort:
    """A :class:`pych.devices.bus.BusDevice` for port 0x80."""

    def __init__(self, clock: Callable[[], float] = time.monotonic):
        self._clock = clock
        self._created = clock()
        self.count = 0
        self.last_code = 0

    def read(self, offset: int, size: int) -> int:
        return self.last_code

    def write(self, offset: int, size: int, value: int) -> None:
        code = value & 0xFF
        self.count += 1
        self.last_code = code
        if log.isEnabledFor(logging.DEBUG):
            log.debug("POST code %#04x (%s) at %.6f s", code, post_code_stage(code),
                      self._clock() - self._created)
