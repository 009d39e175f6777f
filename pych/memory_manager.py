"""The memory manager: boot RAM, and (with ``hotplug_size``) the memory hot plug window,
its register block (``\\_SB_.MHPC``) and its AML.

It owns the guest's RAM layout: the boot regions split around the 32-bit hole, each a
memfd mapping registered as a KVM memslot.
"""

from __future__ import annotations

import logging
from typing import Callable

from pych.acpi.aml import Aml
from pych.arch.x86_64 import layout
from pych.devices import acpi as acpi_devices
from pych.hypervisor.kvm import Vm
from pych.memory import GuestMemory

log = logging.getLogger(__name__)


class MemoryManager:
    def __init__(self, config, vm: Vm, *, notify: Callable[[int], None]):
        self.config = config            # MemoryConfig
        self.vm = vm
        self.notify = notify            # GED notification (AcpiNotification.MEMORY)
        self.mem = GuestMemory()

    def create_boot_memory(self) -> GuestMemory:
        for i, (gpa, length) in enumerate(layout.ram_regions(self.config.size)):
            region = self.mem.add_region(gpa, length, name=f"ram{i}")
            region.slot = self.vm.add_memory(gpa, length, region.host_addr)
        return self.mem

    @property
    def hotplug_window(self) -> tuple[int, int]:
        """[start, size) of the memory hot plug window (size 0 without hotplug_size)."""
        return max(layout.RAM_64BIT_START, self.mem.end), 0

    @property
    def actual_size(self) -> int:
        return self.mem.total_size

    def aml(self) -> Aml:
        return acpi_devices.memory_hotplug_stub_aml()

    def close(self) -> None:
        self.mem.close()
