"""Interrupt lines handed to devices.

Devices get an object with ``set_level(bool)`` (level-triggered line) and ``pulse()``
(edge: raise then lower). The KVM implementation lives in ``pych.hypervisor.kvm``; tests
use :class:`RecordingIrq`.
"""

from __future__ import annotations

from typing import Protocol


class IrqLine(Protocol):
    def set_level(self, level: bool) -> None: ...

    def pulse(self) -> None: ...


class RecordingIrq:
    """An interrupt line for unit tests: remembers its level and every edge."""

    def __init__(self) -> None:
        self.level = False
        self.pulses = 0
        self.history: list[bool] = []

    def set_level(self, level: bool) -> None:
        level = bool(level)
        if level and not self.level:
            self.pulses += 1
        self.level = level
        self.history.append(level)

    def pulse(self) -> None:
        self.pulses += 1
        self.history.extend([True, False])
        self.level = False
