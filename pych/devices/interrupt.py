"""Interrupt lines handed to devices.

Devices get an object with ``set_level(bool)`` (level-triggered line) and ``pulse()``
(edge: raise then lower). The KVM implementation lives in ``pych.hypervisor.kvm``.
"""

from __future__ import annotations

from typing import Protocol


class IrqLine(Protocol):
    def set_level(self, level: bool) -> None: ...

    def pulse(self) -> None: ...
