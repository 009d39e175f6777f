"""The PCI function interface the bus drives, and the host bridge."""

from __future__ import annotations

from .config import PciConfiguration

PCI_VENDOR_ID_INTEL = 0x8086
PCI_DEVICE_ID_INTEL_VIRT_PCIE_HOST = 0x0D57
PCI_CLASS_BRIDGE = 0x06
PCI_SUBCLASS_HOST_BRIDGE = 0x00


class PciDevice:
    """A single-function PCI device: a config space plus the BARs it decodes.

    The bus calls ``config_read``/``config_write`` (vCPU threads), ``bar_read``/
    ``bar_write`` through :class:`BarRegion` on the MMIO bus, ``bar_moved`` whenever a
    BAR starts or stops decoding at an address, and ``shutdown`` never: removal returns
    the device to its owner, who shuts it down.
    """

    def __init__(self, config: PciConfiguration) -> None:
        self.config = config

    def config_read(self, offset: int, size: int) -> int:
        return self.config.read(offset, size)

    def config_write(self, offset: int, size: int, value: int) -> None:
        self.config.write(offset, size, value)

    def bar_read(self, index: int, offset: int, size: int) -> int:
        return (1 << (8 * size)) - 1

    def bar_write(self, index: int, offset: int, size: int, value: int) -> None:
        pass

    def bar_moved(self, index: int, old: int | None, new: int | None) -> None:
        """BAR ``index`` stopped decoding at ``old`` and/or started at ``new`` (e.g. move
        ioeventfds).  Called after the MMIO bus was updated."""

    def shutdown(self) -> None:
        """Release threads and host resources; the device is off every bus by now."""


class PciHostBridge(PciDevice):
    """Device 0 of every bus: the Intel 0x0d57 host bridge the reference exposes."""

    def __init__(self) -> None:
        super().__init__(PciConfiguration(
            vendor_id=PCI_VENDOR_ID_INTEL, device_id=PCI_DEVICE_ID_INTEL_VIRT_PCIE_HOST,
            class_code=PCI_CLASS_BRIDGE, subclass=PCI_SUBCLASS_HOST_BRIDGE))


class BarRegion:
    """The :class:`~pych.devices.bus.BusDevice` put on the MMIO bus for one BAR."""

    __slots__ = ("device", "index")

    def __init__(self, device: PciDevice, index: int) -> None:
        self.device = device
        self.index = index

    def read(self, offset: int, size: int) -> int:
        return self.device.bar_read(self.index, offset, size)

    def write(self, offset: int, size: int, value: int) -> None:
        self.device.bar_write(self.index, offset, size, value)
