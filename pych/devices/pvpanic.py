"""pvpanic (``--pvpanic``): the PCI device a guest writes when it panics.

QEMU's and the reference's PCI pvpanic (vendor 0x1b36, device 0x0011, class "system
peripheral, other"): one memory BAR whose first byte reads back the events the device
supports (``PANICKED`` and ``CRASH_LOADED``) and takes the event the guest reports.
Linux's ``pvpanic-pci`` driver writes ``PANICKED`` from its panic notifier.  The device
hands each event to ``on_event`` (on the vCPU thread that wrote it): the VMM logs it and
emits ``{"source": "guest", "event": "panic"}`` on the event monitor.
"""

from __future__ import annotations

import logging
from collections.abc import Callable

from pych.devices.pci.config import PciConfiguration
from pych.devices.pci.device import PciDevice

log = logging.getLogger(__name__)

PVPANIC_VENDOR_ID = 0x1B36             # Red Hat (QEMU)
PVPANIC_DEVICE_ID = 0x0011
PCI_CLASS_SYSTEM_PERIPHERAL = 0x08
PCI_SUBCLASS_OTHER = 0x80
PVPANIC_PANICKED = 1 << 0
PVPANIC_CRASH_LOADED = 1 << 1
SUPPORTED_EVENTS = PVPANIC_PANICKED | PVPANIC_CRASH_LOADED
BAR_SIZE = 16                          # the smallest memory BAR; the register is byte 0
EVENT_NAMES = {PVPANIC_PANICKED: "panic", PVPANIC_CRASH_LOADED: "crash-loaded"}


class PvPanicDevice(PciDevice):
    """The pvpanic PCI function; ``on_event(name)`` gets ``"panic"`` or ``"crash-loaded"``."""

    def __init__(self, on_event: Callable[[str], None]) -> None:
        super().__init__(PciConfiguration(
            vendor_id=PVPANIC_VENDOR_ID, device_id=PVPANIC_DEVICE_ID,
            class_code=PCI_CLASS_SYSTEM_PERIPHERAL, subclass=PCI_SUBCLASS_OTHER, revision=1,
            subsystem_vendor_id=PVPANIC_VENDOR_ID, subsystem_id=PVPANIC_DEVICE_ID))
        self.config.add_bar(0, BAR_SIZE)
        self.on_event = on_event
        self.events: list[str] = []

    def bar_read(self, index: int, offset: int, size: int) -> int:
        return SUPPORTED_EVENTS if offset == 0 else 0

    def bar_write(self, index: int, offset: int, size: int, value: int) -> None:
        if offset != 0:
            return
        for bit, name in EVENT_NAMES.items():
            if value & bit:
                self.events.append(name)
                self.on_event(name)
