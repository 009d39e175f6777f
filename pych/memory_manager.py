"""The memory manager: boot RAM, and (with ``hotplug_size``) ACPI memory hot plug: the hot plug
window, the DIMM slots' register block and their AML (``\\_SB_.MHPC``).

It owns the guest's RAM layout: the boot regions split around the 32-bit hole, each a memfd
mapping registered as a KVM memslot, and after them the hot plug window, which is only guest
physical address space: nothing is allocated for it until RAM is plugged into it.

ACPI hot plug (shared/notes/ch-hotplug-reference.md §4.1), end to end:

1. ``vm.resize`` asks :meth:`MemoryManager.resize` for more RAM. The increase becomes one new
   DIMM: a new memfd region (named ``dimm<n>``, so it stays out of the boot e820 map) placed at
   the next 128 MiB boundary after the RAM so far, registered as a new KVM memslot, and put in
   the lowest never-used slot of the :class:`MemoryHotplugController`, marked enabled and
   inserting.
2. The GED raises ``AcpiNotification.MEMORY``; the guest's ``\\_SB_.GEC_.ESCN`` calls
   ``\\_SB_.MHPC.MSCN``, which walks the slots through the register block, notifies the
   ``Mnnn`` device of each inserting slot and acknowledges it.
3. The guest's ACPI memory driver evaluates ``Mnnn._STA`` / ``_CRS`` (``MSTA`` / ``MCRS``),
   adds the range, and onlines it if ``auto_online_blocks`` says so.

A DIMM stays until the VM is torn down: a reduction only changes the configuration, which the
next boot (a new memory manager) uses as its boot RAM size.
"""

from __future__ import annotations

import logging
import threading
from dataclasses import dataclass
from typing import Callable

from pych.acpi.aml import (
    Acquire, Add, AddressSpace, Aml, Arg, Cacheability, CreateDWordField, CreateQWordField,
    Device, EISAName, Equal, Field, FieldAccess, FieldUpdate, If, Increment, LessThan, Local,
    Method, MethodCall, Mutex, Name, Named, Notify, Offset, OpRegion, Path, RegionSpace, Release,
    ResourceTemplate, Return, Store, String, Subtract, While,
)
from pych.arch.x86_64 import layout
from pych.devices import acpi as acpi_devices
from pych.devices.bus import Bus
from pych.hypervisor.kvm import Vm
from pych.memory import GuestMemory

log = logging.getLogger(__name__)

HOTPLUG_ALIGNMENT = 128 * layout.MiB
"""Hot plugged RAM starts on, and grows by, multiples of this (Linux's memory block size)."""

HOTPLUG_SLOTS = 32
"""DIMM slots per boot (the reference has 8). Slots are never reused within one boot."""


class MemoryResizeError(Exception):
    """A memory resize the memory manager cannot carry out; the message says why."""


class InvalidMemoryResize(MemoryResizeError):
    """The request itself is wrong for this VM (size, window): the client should change it."""


def hotplug_region_start(ram_end: int) -> int:
    """Where RAM plugged after RAM ending at ``ram_end`` (exclusive) starts, as the reference
    places it: at 4 GiB while RAM ends below the 32-bit hole, else at the first 128 MiB
    boundary at or above ``ram_end``. The hot plug window starts here after boot RAM, and each
    DIMM starts here after the RAM (boot and DIMMs) before it."""
    end = max(ram_end, layout.RAM_64BIT_START)
    return -(-end // HOTPLUG_ALIGNMENT) * HOTPLUG_ALIGNMENT


@dataclass
class DimmSlot:
    """One slot of the register block: the DIMM's range and its guest-visible status bits."""

    base: int = 0
    length: int = 0
    enabled: bool = False       # MEN_: a DIMM is plugged here
    inserting: bool = False     # MINS: plugged, not yet acknowledged by the guest's MSCN
    removing: bool = False      # MRMV: the VMM asks the guest to eject it


class MemoryHotplugController:
    """The ``\\_SB_.MHPC`` register block (``SIZE`` bytes of MMIO), a bus device.

    ========  =====================  ===========================================================
    offset    read (4 bytes)         write
    ========  =====================  ===========================================================
    0x00      MHBL base[31:0]        MSEL: select a slot (4 bytes)
    0x04      MHBH base[63:32]       MOEV: ignored
    0x08      MHLL length[31:0]      MOSC: ignored
    0x0C      MHLH length[63:32]     ignored
    0x10      MHPX: reads 0          ignored
    0x14      status (1 byte): bit0 MEN_ enabled, bit1 MINS inserting, bit2 MRMV removing;
              writing bit1 / bit2 acknowledges (clears) inserting / removing; bit3 (MEJ0,
              eject) is not supported and only logged
    ========  =====================  ===========================================================

    Reads of the selected slot's base and length must be 4 bytes wide; other widths, and
    any access while the selector is out of range, read 0 (and are logged). Registers are
    accessed from vCPU threads, slots are filled from the VMM thread: one lock serialises both.
    """

    SIZE = 0x18
    SELECTION = 0x00
    STATUS = 0x14
    ENABLED, INSERTING, REMOVING, EJECT = (1 << bit for bit in range(4))

    def __init__(self, slots: int = HOTPLUG_SLOTS):
        self.slots = [DimmSlot() for _ in range(slots)]
        self._selected = 0
        self._lock = threading.Lock()

    def insert(self, index: int, base: int, length: int) -> None:
        """Plug a DIMM ``[base, base + length)`` into slot ``index``: enabled and inserting."""
        with self._lock:
            self.slots[index] = DimmSlot(base, length, enabled=True, inserting=True)

    def snapshot(self) -> list[DimmSlot]:
        """A consistent copy of every slot."""
        with self._lock:
            return [DimmSlot(**vars(slot)) for slot in self.slots]

    def _slot(self) -> DimmSlot | None:
        if self._selected < len(self.slots):
            return self.slots[self._selected]
        log.warning("MHPC: slot %d selected, only %d exist", self._selected, len(self.slots))
        return None

    def read(self, offset: int, size: int) -> int:
        with self._lock:
            slot = self._slot()
            if slot is None:
                return 0
            if offset == self.STATUS and size == 1:
                return (int(slot.enabled) | int(slot.inserting) << 1
                        | int(slot.removing) << 2)
            if offset in (0x00, 0x04, 0x08, 0x0C) and size == 4:
                value = slot.base if offset < 0x08 else slot.length
                return value >> 32 if offset & 4 else value & 0xFFFF_FFFF
        if offset != 0x10:
            log.warning("MHPC: ignoring %d-byte read at offset %#x", size, offset)
        return 0

    def write(self, offset: int, size: int, value: int) -> None:
        with self._lock:
            if offset == self.SELECTION and size == 4:
                self._selected = value
            elif offset == self.STATUS and size == 1:
                slot = self._slot()
                if slot is None:
                    return
                if value & self.INSERTING:
                    slot.inserting = False
                if value & self.REMOVING:
                    slot.removing = False
                if value & self.EJECT:
                    log.warning("MHPC: the guest ejected slot %d: DIMM removal is not supported",
                                self._selected)
            elif offset not in (0x04, 0x08):
                log.warning("MHPC: ignoring %d-byte write at offset %#x", size, offset)

    def to_aml(self, base: int) -> Aml:
        """``\\_SB_.MHPC`` driving this block at guest address ``base``: its fields, the
        methods ``MSCN`` (scan: notify inserted/removed DIMMs), ``MTFY``, ``MSTA``, ``MCRS``
        and one PNP0C80 device ``M000``, ``M001``... per slot."""
        slots = len(self.slots)
        lock, unlock = Acquire("MLCK", 0xFFFF), Release("MLCK")
        select_arg0 = Store(Arg(0), "MSEL")
        mscn = Method(
            "MSCN", 0,
            lock,
            Store(0, Local(0)),
            While(LessThan(Local(0), slots),
                  Store(Local(0), "MSEL"),
                  If(Equal(Path("MINS"), 1), MethodCall("MTFY", Local(0), 1), Store(1, "MINS")),
                  If(Equal(Path("MRMV"), 1), MethodCall("MTFY", Local(0), 3), Store(1, "MRMV")),
                  Increment(Local(0))),
            unlock,
            serialized=True,
        )
        mtfy = Method("MTFY", 2, *(If(Equal(Arg(0), i), Notify(_dimm_name(i), Arg(1)))
                                   for i in range(slots)), serialized=True)
        msta = Method(
            "MSTA", 1,
            lock, select_arg0,
            Store(0, Local(0)),
            If(Equal(Path("MEN_"), 1), Store(0xF, Local(0))),
            unlock,
            Return(Local(0)),
            serialized=True,
        )
        # The resource template is filled through overlapping views: MINL, MAXL and LENL are
        # QWords whose upper half is MINH, MAXH and LENH (the reference's names and offsets).
        # After both halves are stored the QWord views read the whole 64-bit value, so
        # MAX = MIN + LEN - 1 is computed in one 64-bit step (DSDT revision >= 2).
        mcrs = Method(
            "MCRS", 1,
            lock, select_arg0,
            Name("MR64", ResourceTemplate(AddressSpace.memory(
                0, 0xFFFF_FFFF_FFFF_FFFE, cacheability=Cacheability.CACHEABLE))),
            CreateQWordField(Path("MR64"), 14, "MINL"),
            CreateDWordField(Path("MR64"), 18, "MINH"),
            CreateQWordField(Path("MR64"), 22, "MAXL"),
            CreateDWordField(Path("MR64"), 26, "MAXH"),
            CreateQWordField(Path("MR64"), 38, "LENL"),
            CreateDWordField(Path("MR64"), 42, "LENH"),
            Store(Path("MHBL"), "MINL"),
            Store(Path("MHBH"), "MINH"),
            Store(Path("MHLL"), "LENL"),
            Store(Path("MHLH"), "LENH"),
            Add(Path("MINL"), Path("LENL"), "MAXL"),
            Subtract(Path("MAXL"), 1, "MAXL"),
            unlock,
            Return(Path("MR64")),
            serialized=True,
        )
        dimms = [Device(_dimm_name(i),
                        Name("_HID", EISAName("PNP0C80")),
                        Name("_UID", i),
                        Method("_STA", 0, Return(MethodCall("MSTA", i))),
                        Method("_CRS", 0, Return(MethodCall("MCRS", i))))
                 for i in range(slots)]
        return Device(
            "\\_SB_.MHPC",
            Name("_HID", EISAName("PNP0A06")),
            Name("_UID", String("Memory Hotplug Controller")),
            Mutex("MLCK", 0),
            Name("_CRS", ResourceTemplate(AddressSpace.memory(base, base + self.SIZE - 1))),
            OpRegion("MHPR", RegionSpace.SYSTEM_MEMORY, base, self.SIZE),
            Field("MHPR", Named("MHBL", 32), Named("MHBH", 32), Named("MHLL", 32),
                  Named("MHLH", 32), access=FieldAccess.DWORD),
            Field("MHPR", Offset(0x10), Named("MHPX", 32), access=FieldAccess.DWORD),
            Field("MHPR", Offset(self.STATUS), Named("MEN_", 1), Named("MINS", 1),
                  Named("MRMV", 1), Named("MEJ0", 1), access=FieldAccess.BYTE,
                  update=FieldUpdate.WRITE_AS_ZEROS),
            Field("MHPR", Named("MSEL", 32), Named("MOEV", 32), Named("MOSC", 32),
                  access=FieldAccess.DWORD),
            mtfy, mscn, msta, mcrs, *dimms,
        )


def _dimm_name(slot: int) -> str:
    return f"M{slot:03d}"


class MemoryManager:
    """Guest RAM of one boot. ``notify`` raises GED events (``AcpiNotification.MEMORY``);
    with ACPI hot plug the register block is put on ``mmio`` at ``ACPI_MEM_HOTPLUG_ADDR``."""

    def __init__(self, config, vm: Vm, mmio: Bus, *,
                 notify: Callable[[acpi_devices.AcpiNotification], None]):
        self.config = config            # MemoryConfig; the VMM edits its size for the next boot
        self.vm = vm
        self.mmio = mmio
        self.notify = notify
        self.mem = GuestMemory()
        self.controller: MemoryHotplugController | None = None
        self._window = (layout.RAM_64BIT_START, 0)
        self._dimms = 0                 # slots used so far (never reused within a boot)

    def create_boot_memory(self) -> GuestMemory:
        """Map boot RAM and, with ``hotplug_size``, reserve the hot plug window after it."""
        for i, (gpa, length) in enumerate(layout.ram_regions(self.config.size)):
            region = self.mem.add_region(gpa, length, name=f"ram{i}")
            region.slot = self.vm.add_memory(gpa, length, region.host_addr)
        if self.config.hotplug_size and self.config.hotplug_method == "Acpi":
            self._window = (hotplug_region_start(self.mem.end), self.config.hotplug_size)
            self.controller = MemoryHotplugController()
            self.mmio.insert(layout.ACPI_MEM_HOTPLUG_ADDR, MemoryHotplugController.SIZE,
                             self.controller)
        else:
            self._window = (max(layout.RAM_64BIT_START, self.mem.end), 0)
        return self.mem

    @property
    def hotplug_window(self) -> tuple[int, int]:
        """``(start, size)`` of the ACPI hot plug window; ``size`` is 0 without one, and then
        ``start`` is where RAM ends (at least 4 GiB). Fixed for the boot: the 64-bit PCI
        window is placed after it."""
        return self._window

    @property
    def actual_size(self) -> int:
        """RAM the guest has now: boot RAM plus every plugged DIMM."""
        return self.mem.total_size

    def resize(self, desired: int) -> bool:
        """Grow RAM to ``desired`` bytes with one new DIMM, announced to the guest through the
        GED; returns whether a DIMM was plugged. ``desired`` at or below :attr:`actual_size`
        changes nothing (DIMMs are not removed live: the caller keeps a reduction for the
        next boot).

        Raises :class:`InvalidMemoryResize` when there is no ACPI hot plug window, the
        increase is not a multiple of 128 MiB, or the DIMM would not fit in the window, and
        :class:`MemoryResizeError` when every slot of this boot has been used.
        """
        current = self.actual_size
        if desired <= current:
            return False
        increase = desired - current
        start, size = self._window
        if self.controller is None and self.config.hotplug_method == "VirtioMem":
            raise MemoryResizeError("virtio-mem hot plug is not supported by pych yet")
        if self.controller is None:
            raise InvalidMemoryResize(
                "memory hot plug needs ACPI hot plug space: boot with --memory "
                "hotplug_size=<size> (hotplug_method=acpi)")
        if increase % HOTPLUG_ALIGNMENT:
            raise InvalidMemoryResize(
                f"the memory increase ({increase} bytes: desired {desired} - current {current})"
                f" must be a multiple of 128 MiB ({HOTPLUG_ALIGNMENT} bytes)")
        gpa = hotplug_region_start(self.mem.end)
        if gpa + increase > start + size:
            available = max(0, start + size - gpa)
            raise InvalidMemoryResize(
                f"not enough hot plug space: {increase} bytes requested, {available} bytes left "
                f"of hotplug_size {size} (window {start:#x}-{start + size:#x})")
        if self._dimms == len(self.controller.slots):
            raise MemoryResizeError(
                f"no memory hot plug slot left: all {self._dimms} slots of this boot are used "
                f"(the next boot starts with the current size as boot RAM)")
        index = self._dimms
        region = self.mem.add_region(gpa, increase, name=f"dimm{index}")
        try:
            region.slot = self.vm.add_memory(gpa, increase, region.host_addr)
        except Exception:
            self.mem.remove_region(region)
            raise
        self._dimms += 1
        self.controller.insert(index, gpa, increase)
        log.info("memory: DIMM %d at %#x, %d MiB", index, gpa, increase // layout.MiB)
        self.notify(acpi_devices.AcpiNotification.MEMORY)
        return True

    def hotplug_info(self) -> dict | None:
        """What ``vm.info`` reports beyond the reference: the ACPI hot plug window and each
        plugged DIMM (``"state"``: ``"announced"`` until the guest's scan acknowledged it,
        then ``"acknowledged"``); None without ACPI hot plug."""
        if self.controller is None:
            return None
        start, size = self._window
        slots = self.controller.snapshot()[:self._dimms]
        return {
            "method": "Acpi",
            "window": {"start": start, "size": size},
            "dimms": [{"id": f"dimm{i}", "slot": i, "address": s.base, "size": s.length,
                       "state": "announced" if s.inserting else "acknowledged"}
                      for i, s in enumerate(slots)],
        }

    def aml(self) -> Aml:
        """``\\_SB_.MHPC``: the real controller with ACPI hot plug, else the reference's stub."""
        if self.controller is None:
            return acpi_devices.memory_hotplug_stub_aml()
        return self.controller.to_aml(layout.ACPI_MEM_HOTPLUG_ADDR)

    def close(self) -> None:
        self.mem.close()
