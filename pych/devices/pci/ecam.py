"""PCI Express enhanced configuration access (ECAM / MMCONFIG).

Each segment has one bus, so its ECAM window is 1 MiB: ``slot << 15 | function << 12 |
register``.  Segment ``s`` lives at :func:`pych.arch.x86_64.layout.ecam_base` (what the
MCFG table and the ``_CRS`` of ``\\_SB_.PCxx`` advertise); insert one :class:`PciEcam` per
segment on the MMIO bus there.
"""

from __future__ import annotations

from pych.arch.x86_64.layout import PCI_MMIO_CONFIG_SIZE_PER_SEGMENT

from .bus import PciBus

ECAM_SIZE = PCI_MMIO_CONFIG_SIZE_PER_SEGMENT


class PciEcam:
    def __init__(self, bus: PciBus) -> None:
        self._bus = bus

    @staticmethod
    def _decode(offset: int) -> tuple[int, int, int]:
        return (offset >> 15) & 0x1F, (offset >> 12) & 0x7, offset & 0xFFF

    def read(self, offset: int, size: int) -> int:
        if size == 8:                                   # two dword config reads
            return self.read(offset, 4) | self.read(offset + 4, 4) << 32
        slot, function, register = self._decode(offset)
        return self._bus.config_read(slot, function, register, size)

    def write(self, offset: int, size: int, value: int) -> None:
        if size == 8:
            self.write(offset, 4, value & 0xFFFF_FFFF)
            self.write(offset + 4, 4, value >> 32)
            return
        slot, function, register = self._decode(offset)
        self._bus.config_write(slot, function, register, size, value)
