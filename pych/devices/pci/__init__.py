"""PCI: config space, the bus and its config access mechanisms, MSI-X, BAR placement.

The hypervisor-facing protocols (MSI routes, ioeventfds) are in :mod:`.interrupts`.
"""

from .allocator import AddressAllocator, AllocationError
from .bus import (BarAllocationError, BarMove, NoPciSlotAvailable, PciBus, PciBusError,
                  PciDeviceIdInUse, PciDeviceIdOutOfRange, PciDeviceIdReserved, bdf)
from .config import Bar, CapabilityId, Command, PciConfiguration, Status
from .config_io import PciConfigIo
from .device import BarRegion, PciDevice, PciHostBridge
from .ecam import ECAM_SIZE, PciEcam
from .interrupts import IoEventRegistrar, MsiInterruptManager, MsiVector, MsiVectorGroup
from .msix import MsixController

__all__ = [
    "AddressAllocator", "AllocationError", "Bar", "BarAllocationError", "BarMove", "BarRegion",
    "CapabilityId", "Command", "ECAM_SIZE", "IoEventRegistrar", "MsiInterruptManager",
    "MsiVector", "MsiVectorGroup", "MsixController", "NoPciSlotAvailable", "PciBus",
    "PciBusError", "PciConfigIo", "PciConfiguration", "PciDevice", "PciDeviceIdInUse",
    "PciDeviceIdOutOfRange", "PciDeviceIdReserved", "PciEcam", "PciHostBridge", "Status",
    "bdf",
]
