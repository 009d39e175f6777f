"""PCI configuration mechanism #1: the 0xCF8 address latch and the 0xCFC data window.

Inserted on the port I/O bus at ``PCI_CONFIG_IO_PORT`` with length 8.  It reaches bus 0
of segment 0 only; other segments are reachable through ECAM.
"""

from __future__ import annotations

from .bus import PciBus

_ENABLE = 1 << 31


class PciConfigIo:
    def __init__(self, bus: PciBus) -> None:
        self._bus = bus
        self._address = 0

    def read(self, offset: int, size: int) -> int:
        mask = (1 << (8 * size)) - 1
        if offset < 4:
            return (self._address >> (8 * offset)) & mask
        target = self._target(offset)
        if target is None:
            return mask
        return self._bus.config_read(*target, size)

    def write(self, offset: int, size: int, value: int) -> None:
        if offset < 4:
            # Partial writes merge into the latch (Linux probes with ``outb(1, 0xCFB)``).
            shift = 8 * offset
            mask = ((1 << (8 * min(size, 4 - offset))) - 1) << shift
            self._address = (self._address & ~mask) | ((value << shift) & mask)
            return
        target = self._target(offset)
        if target is not None:
            self._bus.config_write(*target, size, value)

    def _target(self, offset: int) -> tuple[int, int, int] | None:
        """(slot, function, register) selected by the latch, or None."""
        address = self._address
        if not address & _ENABLE or (address >> 16) & 0xFF != 0:
            return None
        register = (address & 0xFC) + (offset - 4)
        return (address >> 11) & 0x1F, (address >> 8) & 0x7, register
