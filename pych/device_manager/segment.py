"""PCI segments (``--platform num_pci_segments=N``): each its own host bridge with its own
bus 0, ECAM window and share of the MMIO windows, as the reference's
``vmm/src/pci_segment.rs`` (../shared/notes/ch-hotplug-reference.md §1.2, §5.2).

Segment 0 also answers the legacy configuration ports (0xCF8) and has the host bridge
device in slot 0; the other segments are reached through their ECAM window only and their
slot 0 is free. Every segment's devices route INTx by slot with the same rule
(:func:`~pych.arch.x86_64.layout.pci_intx_irq`), as the reference shares one table of
IRQs across segments. Hot plug on any segment goes through the one ``\\_SB_.PHPR`` register
block (its PSEG register selects the segment: :mod:`.hotplug`).
"""

from __future__ import annotations

from pych.arch.x86_64 import layout
from pych.devices.acpi import MmioWindow, pci_segment_aml
from pych.devices.bus import Bus
from pych.devices.pci.allocator import AddressAllocator
from pych.devices.pci.bus import PciBus
from pych.devices.pci.config_io import PciConfigIo
from pych.devices.pci.ecam import PciEcam

from .hotplug import PciHotplugSlots


class PciSegment:
    """Segment ``segment``: its :class:`PciBus` (``bus``) with BARs placed in ``mem32`` and
    ``mem64`` (allocators over this segment's shares of the 32-bit hole and the 64-bit
    window), its ECAM window put on ``mmio`` at :func:`~pych.arch.x86_64.layout.ecam_base`,
    on segment 0 the 0xCF8 ports put on ``pio``, and its host bridge's AML."""

    def __init__(self, segment: int, *, mmio: Bus, pio: Bus, mem32: MmioWindow,
                 mem64: MmioWindow) -> None:
        self.id = segment
        self.mem32_window = mem32
        self.mem64_window = mem64
        self.mem32 = AddressAllocator(mem32.base, mem32.size, f"mmio32 of segment {segment}")
        self.mem64 = AddressAllocator(mem64.base, mem64.size, f"mmio64 of segment {segment}")
        self.bus = PciBus(segment, mmio_bus=mmio, mem32=self.mem32, mem64=self.mem64)
        mmio.insert(layout.ecam_base(segment), layout.PCI_MMIO_CONFIG_SIZE_PER_SEGMENT,
                    PciEcam(self.bus))
        if segment == 0:
            pio.insert(layout.PCI_CONFIG_IO_PORT, layout.PCI_CONFIG_IO_PORT_SIZE,
                       PciConfigIo(self.bus))

    def to_aml(self) -> bytes:
        """``\\_SB_.PCxx``: the host bridge with ``_SEG``, its ECAM and MMIO windows in
        ``_CRS`` and the hot plug slot objects."""
        return pci_segment_aml(self.id, self.mem32_window, self.mem64_window,
                               PciHotplugSlots()).to_aml()


def create_segments(num_segments: int, *, mmio: Bus, pio: Bus, mmio64: tuple[int, int],
                    mmio32_weights: list[int] | None = None,
                    mmio64_weights: list[int] | None = None) -> list[PciSegment]:
    """Segments 0..num_segments-1 sharing the 32-bit device hole and the 64-bit window
    ``mmio64`` (base, size) by their weights (default 1 each), as the reference carves them
    (:func:`~pych.arch.x86_64.layout.pci_segment_windows`)."""
    ones = [1] * num_segments
    mem32 = layout.pci_segment_windows(layout.MEM_32BIT_DEVICES_START,
                                       layout.MEM_32BIT_DEVICES_SIZE, mmio32_weights or ones,
                                       layout.PCI_SEGMENT_MMIO32_ALIGNMENT)
    mem64 = layout.pci_segment_windows(*mmio64, mmio64_weights or ones,
                                       layout.PCI_SEGMENT_MMIO64_ALIGNMENT)
    return [PciSegment(segment, mmio=mmio, pio=pio, mem32=MmioWindow(*mem32[segment]),
                       mem64=MmioWindow(*mem64[segment]))
            for segment in range(num_segments)]
