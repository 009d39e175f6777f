"""The memory manager: boot RAM, and (with ``hotplug_size``) memory hot plug: ACPI DIMMs (the
hot plug window, the DIMM slots' register block and their AML, ``\\_SB_.MHPC``) or virtio-mem.

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

A reduction changes the configuration at once, so the next boot (a new memory manager) uses
it as its boot RAM size. Beyond the reference, it also asks the guest to give the most recently
added DIMMs back live (as many as fit above the new size): each slot is marked removing, the
GED raises ``AcpiNotification.MEMORY``, ``MSCN`` sends the ``Mnnn`` device an eject request (3),
and a guest that can offline the DIMM's blocks (they were onlined movable) evaluates ``_EJ0``
(``MEJ0``): the memory manager then removes the memslot and frees the memfd, on that vCPU
thread. A guest that cannot offline them reports the failure through ``_OST`` (``MOEV``,
``MOSC``): the DIMM is kept and ``vm.info`` says so; the reduction waits for the next boot.

virtio-mem (``hotplug_method=virtio-mem``, reference §4.2): the window is one memfd region
(:class:`VirtioMemZone`, zone ``mem0``) mapped and registered as a single memslot at boot;
the device manager puts the virtio-mem device for it on the PCI bus. A resize sets the
device's requested size to ``desired - boot RAM``; the guest's driver plugs or unplugs 2 MiB
blocks, and unplugged blocks are discarded from the host (see ``pych.devices.virtio.mem``).
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
from pych.devices.virtio.mem import BLOCK_SIZE as VIRTIO_MEM_BLOCK_SIZE
from pych.devices.virtio.mem import REGION_ALIGNMENT, VirtioMem, VirtioMemResizeError
from pych.memory import GuestMemory, MemoryRegion

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


def virtio_mem_request(config, desired: int) -> int:
    """The virtio-mem requested size for ``desired`` bytes of RAM with memory configuration
    ``config`` (``hotplug_method=virtio-mem``): ``desired`` minus the boot RAM.

    Raises :class:`InvalidMemoryResize` without a ``hotplug_size``, below the boot RAM, past
    the region, or when the difference is not a multiple of the 2 MiB block size."""
    if not config.hotplug_size:
        raise InvalidMemoryResize("memory hot plug needs a virtio-mem region: boot with "
                                  "--memory hotplug_method=virtio-mem,hotplug_size=<size>")
    if desired < config.size:
        raise InvalidMemoryResize(f"desired_ram {desired} is below the boot RAM "
                                  f"({config.size} bytes): virtio-mem cannot shrink it")
    requested = desired - config.size
    if requested > config.hotplug_size:
        raise InvalidMemoryResize(f"not enough hot plug space: {requested} bytes requested, "
                                  f"hotplug_size is {config.hotplug_size}")
    if requested % VIRTIO_MEM_BLOCK_SIZE:
        raise InvalidMemoryResize(f"the memory above boot RAM ({requested} bytes) must be a "
                                  f"multiple of the virtio-mem block size "
                                  f"({VIRTIO_MEM_BLOCK_SIZE} bytes)")
    return requested


@dataclass
class VirtioMemZone:
    """A virtio-mem region: guest RAM mapped at boot, of which the device plugs blocks.
    ``initial_size`` is what the device asks for at boot (``hotplugged_size``); ``device``
    is set by the device manager when it creates the device."""

    id: str
    region: MemoryRegion
    initial_size: int
    device: VirtioMem | None = None


OST_EJECT_REQUEST = 3
"""The ``_OST`` source event of an eject request (ACPI 6.5 §6.3.5)."""

OST_SUCCESS, OST_EJECT_IN_PROGRESS = 0x00, 0x84
"""``_OST`` status codes that are not failures."""


@dataclass
class DimmSlot:
    """One slot of the register block: the DIMM's range, its guest-visible status bits and
    the VMM's own view of a removal."""

    base: int = 0
    length: int = 0
    enabled: bool = False       # MEN_: a DIMM is plugged here
    inserting: bool = False     # MINS: plugged, not yet acknowledged by the guest's MSCN
    removing: bool = False      # MRMV: the VMM asks the guest to eject it (the guest acks it)
    pending_removal: bool = False   # VMM-private: an eject of this slot is expected
    ost_status: int | None = None   # the guest's last _OST status for an eject request


class MemoryHotplugController:
    """The ``\\_SB_.MHPC`` register block (``SIZE`` bytes of MMIO), a bus device.

    ========  =====================  ===========================================================
    offset    read (4 bytes)         write
    ========  =====================  ===========================================================
    0x00      MHBL base[31:0]        MSEL: select a slot (4 bytes)
    0x04      MHBH base[63:32]       MOEV: the selected slot's _OST source event (4 bytes)
    0x08      MHLL length[31:0]      MOSC: its _OST status code (4 bytes): a failure of an
                                     eject request ends the slot's pending removal
    0x0C      MHLH length[63:32]     ignored
    0x10      MHPX: reads 0          ignored
    0x14      status (1 byte): bit0 MEN_ enabled, bit1 MINS inserting, bit2 MRMV removing;
              writing bit1 / bit2 acknowledges (clears) inserting / removing; bit3 (MEJ0)
              ejects the slot if the VMM asked for its removal: ``on_eject(slot)`` runs on
              the writing vCPU thread (and must clear the slot); other ejects are ignored
    ========  =====================  ===========================================================

    Reads of the selected slot's base and length must be 4 bytes wide; other widths, and
    any access while the selector is out of range, read 0 (and are logged). Registers are
    accessed from vCPU threads, slots are filled from the VMM thread: one lock serialises both.
    ``on_eject`` runs without it held.
    """

    SIZE = 0x18
    SELECTION = 0x00
    OST_EVENT = 0x04
    OST_STATUS = 0x08
    STATUS = 0x14
    ENABLED, INSERTING, REMOVING, EJECT = (1 << bit for bit in range(4))

    def __init__(self, slots: int = HOTPLUG_SLOTS, *,
                 on_eject: Callable[[int], None] = lambda slot: None):
        self.slots = [DimmSlot() for _ in range(slots)]
        self._selected = 0
        self._event = 0                 # MOEV, waiting for its MOSC
        self._on_eject = on_eject
        self._lock = threading.Lock()

    def insert(self, index: int, base: int, length: int) -> None:
        """Plug a DIMM ``[base, base + length)`` into slot ``index``: enabled and inserting."""
        with self._lock:
            self.slots[index] = DimmSlot(base, length, enabled=True, inserting=True)

    def request_removal(self, index: int) -> None:
        """Ask the guest to eject slot ``index`` (the caller then raises the GED event)."""
        with self._lock:
            slot = self.slots[index]
            slot.removing = slot.pending_removal = True
            slot.ost_status = None

    def clear(self, index: int) -> None:
        """Empty slot ``index``: its DIMM is gone (``_STA`` now reads 0)."""
        with self._lock:
            self.slots[index] = DimmSlot()

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
        eject = None
        with self._lock:
            if offset == self.SELECTION and size == 4:
                self._selected = value
            elif offset == self.OST_EVENT and size == 4:
                self._event = value
            elif offset == self.OST_STATUS and size == 4:
                self._ost(value)
            elif offset == self.STATUS and size == 1:
                slot = self._slot()
                if slot is None:
                    return
                if value & self.INSERTING:
                    slot.inserting = False
                if value & self.REMOVING:
                    slot.removing = False
                if value & self.EJECT:
                    if slot.pending_removal:
                        slot.pending_removal = False
                        eject = self._selected
                    else:
                        log.warning("MHPC: the guest ejected slot %d, which is not pending "
                                    "removal: ignored", self._selected)
            else:
                log.warning("MHPC: ignoring %d-byte write at offset %#x", size, offset)
        if eject is not None:
            self._on_eject(eject)

    def _ost(self, status: int) -> None:
        """The guest's ``_OST(event, status)`` for the selected slot (lock held)."""
        slot = self._slot()
        if slot is None or self._event != OST_EJECT_REQUEST or not slot.pending_removal:
            return
        slot.ost_status = status
        if status not in (OST_SUCCESS, OST_EJECT_IN_PROGRESS):
            log.warning("MHPC: the guest could not eject slot %d (_OST status %#x): the DIMM "
                        "stays until the next boot", self._selected, status)
            slot.pending_removal = False

    def to_aml(self, base: int) -> Aml:
        """``\\_SB_.MHPC`` driving this block at guest address ``base``: its fields, the
        methods ``MSCN`` (scan: notify inserted/removed DIMMs), ``MTFY``, ``MSTA``, ``MCRS``,
        ``MEJC`` (eject) and ``MOST`` (report ``_OST``), and one PNP0C80 device ``M000``,
        ``M001``... per slot, with ``_STA``, ``_CRS``, ``_EJ0`` and ``_OST``."""
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
        mejc = Method("MEJC", 1, lock, select_arg0, Store(1, "MEJ0"), unlock, serialized=True)
        most = Method("MOST", 3, lock, select_arg0, Store(Arg(1), "MOEV"), Store(Arg(2), "MOSC"),
                      unlock, serialized=True)
        dimms = [Device(_dimm_name(i),
                        Name("_HID", EISAName("PNP0C80")),
                        Name("_UID", i),
                        Method("_STA", 0, Return(MethodCall("MSTA", i))),
                        Method("_CRS", 0, Return(MethodCall("MCRS", i))),
                        Method("_EJ0", 1, MethodCall("MEJC", i)),
                        Method("_OST", 3, MethodCall("MOST", i, Arg(0), Arg(1))))
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
            mtfy, mscn, msta, mcrs, mejc, most, *dimms,
        )


def _dimm_state(slot: DimmSlot) -> str:
    if slot.pending_removal:
        return "removing"
    if slot.ost_status not in (None, OST_SUCCESS, OST_EJECT_IN_PROGRESS):
        return "kept"
    return "announced" if slot.inserting else "acknowledged"


def _dimm_name(slot: int) -> str:
    return f"M{slot:03d}"


class MemoryManager:
    """Guest RAM of one boot. ``notify`` raises GED events (``AcpiNotification.MEMORY``);
    with ACPI hot plug the register block is put on ``mmio`` at ``ACPI_MEM_HOTPLUG_ADDR``;
    with virtio-mem, :attr:`virtio_mem` is the region the device manager makes a device for."""

    def __init__(self, config, vm: Vm, mmio: Bus, *,
                 notify: Callable[[acpi_devices.AcpiNotification], None]):
        self.config = config            # MemoryConfig; the VMM edits its size for the next boot
        self.vm = vm
        self.mmio = mmio
        self.notify = notify
        self.mem = GuestMemory()
        self.controller: MemoryHotplugController | None = None
        self.virtio_mem: VirtioMemZone | None = None
        self._window = (layout.RAM_64BIT_START, 0)
        self._dimms = 0                 # slots used so far (never reused within a boot)
        self._region_listeners: list[Callable[[MemoryRegion], None]] = []
        self._dimm_regions: dict[int, MemoryRegion] = {}     # slot -> its plugged DIMM

    def add_region_listener(self, listener: Callable[[MemoryRegion], None]) -> None:
        """Call ``listener(region)`` for each DIMM plugged from now on, once it is guest RAM
        (VFIO devices DMA-map it). Listeners report their own failures; they do not raise."""
        self._region_listeners.append(listener)

    def create_boot_memory(self) -> GuestMemory:
        """Map boot RAM and, with ``hotplug_size``, reserve the hot plug window after it (ACPI:
        address space only; virtio-mem: the whole region, mapped but not populated).

        Raises ValueError when a virtio-mem ``hotplug_size`` is not a multiple of 128 MiB."""
        for i, (gpa, length) in enumerate(layout.ram_regions(self.config.size)):
            region = self.mem.add_region(gpa, length, name=f"ram{i}")
            region.slot = self.vm.add_memory(gpa, length, region.host_addr)
        size = self.config.hotplug_size
        if size and self.config.hotplug_method == "Acpi":
            self._window = (hotplug_region_start(self.mem.end), size)
            self.controller = MemoryHotplugController(on_eject=self._eject)
            self.mmio.insert(layout.ACPI_MEM_HOTPLUG_ADDR, MemoryHotplugController.SIZE,
                             self.controller)
        elif size:
            if size % REGION_ALIGNMENT:
                raise ValueError(f"virtio-mem hotplug_size {size} is not a multiple of "
                                 f"{REGION_ALIGNMENT >> 20} MiB")
            self._window = (hotplug_region_start(self.mem.end), size)
            region = self.mem.add_region(self._window[0], size, name="virtio-mem0")
            region.slot = self.vm.add_memory(region.gpa, size, region.host_addr)
            self.virtio_mem = VirtioMemZone("mem0", region, self.config.hotplugged_size or 0)
        else:
            self._window = (max(layout.RAM_64BIT_START, self.mem.end), 0)
        return self.mem

    @property
    def hotplug_window(self) -> tuple[int, int]:
        """``(start, size)`` of the hot plug window (ACPI DIMMs or the virtio-mem region);
        ``size`` is 0 without one, and then ``start`` is where RAM ends (at least 4 GiB).
        Fixed for the boot: the 64-bit PCI window is placed after it."""
        return self._window

    @property
    def actual_size(self) -> int:
        """RAM the guest has now: boot RAM plus every plugged DIMM and virtio-mem block."""
        zone = self.virtio_mem
        if zone is None:
            return self.mem.total_size
        plugged = zone.device.plugged_size if zone.device is not None else 0
        return self.mem.total_size - zone.region.size + plugged

    def resize(self, desired: int) -> bool:
        """Make the guest's RAM ``desired`` bytes; returns whether the guest was asked to
        change anything.

        With virtio-mem the device's requested size becomes ``desired`` minus boot RAM
        (:func:`virtio_mem_request` says which sizes are valid); the guest plugs or unplugs
        blocks in its own time. Asking for the size already requested changes nothing.

        With ACPI, sizes count from the RAM the guest keeps once the removals already asked
        for are done. An increase becomes one new DIMM, announced to the guest through the
        GED. A reduction asks the guest to eject the most recently added DIMMs, as many as
        can go without going below ``desired`` (the caller keeps the whole reduction for the
        next boot); the DIMMs go when the guest ejects them (:meth:`_eject`).

        Raises :class:`InvalidMemoryResize` when there is no hot plug window, the size does
        not fit the method's granularity (ACPI: 128 MiB increases) or the window, and
        :class:`MemoryResizeError` when every ACPI slot of this boot has been used.
        """
        if self.config.hotplug_method == "VirtioMem":
            return self._resize_virtio_mem(desired)
        slots = self.controller.snapshot() if self.controller is not None else []
        current = self.actual_size - sum(s.length for s in slots if s.pending_removal)
        if desired < current:
            return self._request_removal(slots, current, desired)
        if desired == current:
            return False
        increase = desired - current
        start, size = self._window
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
        self._dimm_regions[index] = region
        for listener in self._region_listeners:
            listener(region)
        self.controller.insert(index, gpa, increase)
        log.info("memory: DIMM %d at %#x, %d MiB", index, gpa, increase // layout.MiB)
        self.notify(acpi_devices.AcpiNotification.MEMORY)
        return True

    def _request_removal(self, slots: list[DimmSlot], current: int, desired: int) -> bool:
        """Ask the guest to eject the newest DIMMs that fit between ``current`` and
        ``desired``; returns whether any was asked for."""
        asked = False
        for index in reversed(range(len(slots))):
            slot = slots[index]
            if not slot.enabled or slot.pending_removal:
                continue
            if current - slot.length < desired:
                break
            self.controller.request_removal(index)
            current -= slot.length
            asked = True
            log.info("memory: asking the guest to eject DIMM %d (%d MiB)", index,
                     slot.length // layout.MiB)
        if asked:
            self.notify(acpi_devices.AcpiNotification.MEMORY)
        return asked

    def _eject(self, index: int) -> None:
        """The guest ejected DIMM ``index`` (on its vCPU thread): take the memslot away, free
        the memory and empty the slot."""
        region = self._dimm_regions.pop(index)
        self.vm.remove_memory(region.slot, region.gpa)
        self.mem.remove_region(region)
        self.controller.clear(index)
        log.info("memory: DIMM %d at %#x ejected by the guest and freed", index, region.gpa)

    def _resize_virtio_mem(self, desired: int) -> bool:
        requested = virtio_mem_request(self.config, desired)
        zone = self.virtio_mem
        if zone is None or zone.device is None:
            raise MemoryResizeError("this VM has no virtio-mem device")
        try:
            return zone.device.resize(requested)
        except VirtioMemResizeError as e:
            raise InvalidMemoryResize(str(e)) from None

    def hotplug_info(self) -> dict | None:
        """What ``vm.info`` reports beyond the reference: the hot plug window and, with ACPI,
        each plugged DIMM (``"state"``: ``"announced"`` until the guest's scan acknowledged
        it, then ``"acknowledged"``; ``"removing"`` while the guest is asked to eject it;
        ``"kept"``, with the guest's ``"ost_status"``, when it could not), with virtio-mem
        each device's requested and plugged sizes; None without memory hot plug."""
        start, size = self._window
        zone = self.virtio_mem
        if zone is not None and zone.device is not None:
            return {
                "method": "VirtioMem",
                "window": {"start": start, "size": size},
                "virtio_mem": [{"id": zone.id, "address": zone.region.gpa,
                                "size": zone.region.size, "block_size": VIRTIO_MEM_BLOCK_SIZE,
                                "requested_size": zone.device.requested_size,
                                "plugged_size": zone.device.plugged_size}],
            }
        if self.controller is None:
            return None
        dimms = []
        for i, s in enumerate(self.controller.snapshot()):
            if not s.enabled:
                continue
            dimm = {"id": f"dimm{i}", "slot": i, "address": s.base, "size": s.length,
                    "state": _dimm_state(s)}
            if dimm["state"] == "kept":
                dimm["ost_status"] = s.ost_status
            dimms.append(dimm)
        return {"method": "Acpi", "window": {"start": start, "size": size}, "dimms": dimms}

    def aml(self) -> Aml:
        """``\\_SB_.MHPC``: the real controller with ACPI hot plug, else the reference's stub."""
        if self.controller is None:
            return acpi_devices.memory_hotplug_stub_aml()
        return self.controller.to_aml(layout.ACPI_MEM_HOTPLUG_ADDR)

    def close(self) -> None:
        self.mem.close()
