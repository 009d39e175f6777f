"""The memory manager: boot RAM, and (with ``hotplug_size``) memory hot plug: ACPI DIMMs (the
hot plug window, the DIMM slots' register block and their AML, ``\\_SB_.MHPC``) or virtio-mem.

It owns the guest's RAM layout. Boot RAM is made of zones: the user's ``--memory-zone`` options
(with ``--memory size=0``), else one default zone ``mem0`` of ``--memory size``. Each zone is
one memfd (or its ``file``); :func:`boot_ram_layout` lays the zones out one after the other
over the RAM ranges around the 32-bit hole, and each piece is a mapping of the zone's memory
registered as a KVM memslot. After boot RAM comes the hot plug space, which is only guest
physical address space until RAM is plugged into it.

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

virtio-mem (``hotplug_method=virtio-mem``, reference §4.2): each zone with a
``hotplug_size`` (``mem0`` when there are no user zones) gets a region placed by
:func:`virtio_mem_layout`, one memfd mapped and registered as a single memslot at boot, and
its :class:`~pych.devices.virtio.mem.VirtioMem` device (id: the zone's), which the device
manager puts on the PCI bus. ``vm.resize`` (no user zones) and ``vm.resize-zone`` (user
zones: :meth:`MemoryManager.resize_zone`) set the device's requested size to the desired
size minus the zone's boot RAM; the guest's driver plugs or unplugs 2 MiB blocks, and
unplugged blocks are discarded from the host (see ``pych.devices.virtio.mem``).

VFIO: region listeners (:meth:`MemoryManager.add_region_listener`) hear of each DIMM when
it is plugged and before it is freed on eject; block listeners (``add_block_listener``) of
each virtio-mem block when the guest plugs it and before its memory is discarded on unplug.
:meth:`MemoryManager.dma_ranges` is what may be DMA-mapped at any moment.
"""

from __future__ import annotations

import functools
import logging
import os
import threading
from dataclasses import dataclass
from typing import Callable, Sequence

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


DEFAULT_MEMORY_ZONE = "mem0"
"""The zone (and virtio-mem device id) of ``--memory`` RAM without user-defined zones."""

RESIZE_WITH_ZONES = ("Not allowed to resize guest memory when backed with user defined memory "
                     "zones: resize each zone with vm.resize-zone")
RESIZE_ZONE_WITHOUT_ZONES = ("Not allowed to resize guest memory zone when no zone is defined "
                             "(--memory size=0 with --memory-zone): use vm.resize")


class MemoryResizeError(Exception):
    """A memory resize the memory manager cannot carry out; the message says why."""


class InvalidMemoryResize(MemoryResizeError):
    """The request itself is wrong for this VM (size, window): the client should change it."""


class UnknownMemoryZone(InvalidMemoryResize):
    """vm.resize-zone named a zone this VM does not have."""


def hotplug_region_start(ram_end: int) -> int:
    """Where RAM plugged after RAM ending at ``ram_end`` (exclusive) starts, as the reference
    places it: at 4 GiB while RAM ends below the 32-bit hole, else at the first 128 MiB
    boundary at or above ``ram_end``. The hot plug window starts here after boot RAM, and each
    DIMM starts here after the RAM (boot and DIMMs) before it."""
    end = max(ram_end, layout.RAM_64BIT_START)
    return -(-end // HOTPLUG_ALIGNMENT) * HOTPLUG_ALIGNMENT


def virtio_mem_request(memory, desired: int) -> int:
    """The virtio-mem requested size for ``desired`` bytes of RAM: ``desired`` minus the boot
    RAM. ``memory`` is the ``MemoryConfig`` (``hotplug_method=virtio-mem``, for vm.resize)
    or a ``MemoryZoneConfig`` (for vm.resize-zone): both have ``size`` (the boot RAM, which
    virtio-mem cannot take away) and ``hotplug_size`` (the region).

    Raises :class:`InvalidMemoryResize` without a ``hotplug_size``, below the boot RAM, past
    the region, or when the difference is not a multiple of the 2 MiB block size."""
    zone = getattr(memory, "id", None)
    if not memory.hotplug_size:
        raise InvalidMemoryResize(
            "memory hot plug needs a virtio-mem region: boot with --memory "
            "hotplug_method=virtio-mem,hotplug_size=<size>" if zone is None else
            f"memory zone {zone} has no virtio-mem region to resize: give it a hotplug_size "
            "(--memory hotplug_method=virtio-mem --memory-zone id=...,hotplug_size=<size>)")
    what = "the boot RAM" if zone is None else f"the boot RAM of memory zone {zone}"
    if desired < memory.size:
        raise InvalidMemoryResize(f"desired_ram {desired} is below {what} ({memory.size} "
                                  f"bytes): virtio-mem cannot shrink it")
    requested = desired - memory.size
    if requested > memory.hotplug_size:
        raise InvalidMemoryResize(f"not enough hot plug space: {requested} bytes requested, "
                                  f"hotplug_size is {memory.hotplug_size}")
    if requested % VIRTIO_MEM_BLOCK_SIZE:
        raise InvalidMemoryResize(f"the memory above {what} ({requested} bytes) must be a "
                                  f"multiple of the virtio-mem block size "
                                  f"({VIRTIO_MEM_BLOCK_SIZE} bytes)")
    return requested


def find_zone(memory, zone_id: str):
    """The user-defined zone ``zone_id`` of the ``MemoryConfig`` ``memory``. Raises
    :class:`InvalidMemoryResize` without user-defined zones, :class:`UnknownMemoryZone`
    if none has that id (the reference's rules for vm.resize-zone)."""
    if not memory.zones:
        raise InvalidMemoryResize(RESIZE_ZONE_WITHOUT_ZONES)
    for zone in memory.zones:
        if zone.id == zone_id:
            return zone
    raise UnknownMemoryZone(f"Could not find the memory zone {zone_id} for the resize "
                            f"(zones: {', '.join(z.id for z in memory.zones)})")


# --- layout -----------------------------------------------------------------------------------
@dataclass(frozen=True)
class RamPiece:
    """``size`` bytes of boot RAM at guest address ``gpa``, backed by zone ``zone``'s memory
    from ``offset`` on."""

    zone: str
    gpa: int
    size: int
    offset: int


def boot_ram_layout(zones: Sequence[tuple[str, int]]) -> list[RamPiece]:
    """Where the boot RAM of ``zones`` (``(id, size)`` in order) goes, as the reference lays
    zones out: one after the other over the guest's RAM ranges (from 0 up to the 32-bit hole
    at 3 GiB, then from 4 GiB on), a zone that reaches the hole continuing at 4 GiB in a
    second piece. A zone of size 0 has no boot RAM. Without zones this is ``--memory``'s
    RAM as one zone: :func:`pych.arch.x86_64.layout.ram_regions`."""
    pieces: list[RamPiece] = []
    todo = [(zone, size) for zone, size in zones if size]
    offset = 0                                  # into the current zone (todo[0])
    for gpa, length in layout.ram_regions(sum(size for _, size in todo)) if todo else []:
        end = gpa + length
        while gpa < end:
            zone, size = todo[0]
            take = min(size - offset, end - gpa)
            pieces.append(RamPiece(zone, gpa, take, offset))
            gpa += take
            offset += take
            if offset == size:
                todo.pop(0)
                offset = 0
    return pieces


def virtio_mem_layout(ram_end: int, regions: Sequence[tuple[str, int]]) -> list[tuple[str, int, int]]:
    """``(zone, gpa, size)`` of each zone's virtio-mem region (``regions``: ``(zone,
    hotplug_size)`` in zone order), as the reference places them: after the RAM ending at
    ``ram_end`` (at 4 GiB when RAM ends below the 32-bit hole), each at the first 128 MiB
    boundary at or after the end of the previous one."""
    placed = []
    cursor = max(ram_end, layout.RAM_64BIT_START)
    for zone, size in regions:
        start = -(-cursor // REGION_ALIGNMENT) * REGION_ALIGNMENT
        placed.append((zone, start, size))
        cursor = start + size
    return placed


# --- zones --------------------------------------------------------------------------------------
@dataclass(frozen=True)
class ZoneSpec:
    """One memory zone as the memory manager builds it: a ``--memory-zone``, or the default
    zone ``mem0`` made of ``--memory`` (the reference's single default zone)."""

    id: str
    size: int
    hotplug_size: int | None = None       # virtio-mem only (ACPI DIMMs are not zone RAM)
    hotplugged_size: int | None = None
    file: str | None = None
    shared: bool = False
    hugepages: bool = False
    host_numa_node: int | None = None
    prefault: bool = False
    option: str = "--memory"            # what the user wrote, for error messages


def zone_specs(memory) -> list[ZoneSpec]:
    """The zones of the ``MemoryConfig`` ``memory``, in order."""
    if memory.zones:
        return [ZoneSpec(z.id, z.size, z.hotplug_size, z.hotplugged_size, z.file, z.shared,
                         z.hugepages, z.host_numa_node, z.prefault, f"--memory-zone {z.id}")
                for z in memory.zones]
    virtio_mem = memory.hotplug_method == "VirtioMem"
    return [ZoneSpec(DEFAULT_MEMORY_ZONE, memory.size,
                     memory.hotplug_size if virtio_mem else None,
                     memory.hotplugged_size if virtio_mem else None,
                     shared=memory.shared, hugepages=memory.hugepages, prefault=memory.prefault)]


@dataclass
class VirtioMemZone:
    """A zone's virtio-mem region: guest RAM mapped at boot, of which ``device`` plugs
    blocks (the device manager puts it on the PCI bus). ``initial_size`` is what the device
    asks for at boot (the zone's ``hotplugged_size``)."""

    id: str
    region: MemoryRegion
    initial_size: int
    device: VirtioMem


@dataclass(frozen=True)
class RamRange:
    """A piece of guest RAM that is not a whole region: a plugged virtio-mem block."""

    gpa: int
    size: int
    host_addr: int
    name: str


RegionListener = Callable[[MemoryRegion | RamRange], None]


class MemoryZone:
    """A zone's memory in one boot: the memfd (or ``file``) behind its boot RAM, the pieces
    of boot RAM mapped from it, and its virtio-mem region, if any. Raises ValueError when
    the zone asks for a backing pych cannot give."""

    def __init__(self, spec: ZoneSpec):
        self.spec = spec
        self.id = spec.id
        self.regions: list[MemoryRegion] = []
        self.virtio_mem: VirtioMemZone | None = None
        what = spec.option
        if spec.hugepages:
            raise ValueError(f"{what}: huge pages (hugepages=on) are not supported by pych yet")
        if spec.host_numa_node is not None:
            raise ValueError(f"{what}: host_numa_node is not supported by pych yet")
        self.shared_mapping = True          # a memfd is always mapped shared
        self.fd = -1
        if spec.file is not None:
            self.fd = _open_backing_file(what, spec.file, spec.size, spec.shared)
            self.shared_mapping = spec.shared
        elif spec.size:
            self.fd = os.memfd_create(f"pych-{spec.id}", os.MFD_CLOEXEC)
            try:
                os.ftruncate(self.fd, spec.size)
            except OSError:
                self.close()
                raise

    def close(self) -> None:
        if self.fd >= 0:
            os.close(self.fd)
            self.fd = -1


def _open_backing_file(what: str, path: str, size: int, shared: bool) -> int:
    """``path`` opened to back ``size`` bytes (read-write when ``shared``: guest writes go
    to the file; else read-only, mapped private)."""
    if os.path.isdir(path):
        raise ValueError(f"{what}: the backing file {path} is a directory (give a file)")
    try:
        fd = os.open(path, (os.O_RDWR if shared else os.O_RDONLY) | os.O_CLOEXEC)
    except OSError as e:
        raise ValueError(f"{what}: cannot open the backing file {path}: {e.strerror}") from None
    length = os.fstat(fd).st_size
    if length < size:
        os.close(fd)
        raise ValueError(f"{what}: the backing file {path} has {length} bytes, fewer than the "
                         f"{size} bytes of memory it backs")
    return fd


MADV_POPULATE_WRITE = 23        # Linux 5.14; not in Python 3.11's mmap module


def _prefault(region: MemoryRegion, what: str) -> None:
    """``prefault=on``: fault in every page of ``region`` now."""
    try:
        region.mmap.madvise(MADV_POPULATE_WRITE)
    except OSError as e:
        raise ValueError(f"{what}: cannot prefault {region.size} bytes: {e.strerror}") from None


def _blocks(region: MemoryRegion, gpa: int, size: int) -> list[RamRange]:
    """``[gpa, gpa + size)`` of the virtio-mem ``region`` as one :class:`RamRange` per block
    (VFIO maps virtio-mem memory block by block, so any block can be unmapped alone)."""
    return [RamRange(block, VIRTIO_MEM_BLOCK_SIZE, region.host_addr + block - region.gpa,
                     f"{region.name}+{block - region.gpa:#x}")
            for block in range(gpa, gpa + size, VIRTIO_MEM_BLOCK_SIZE)]


OST_DEVICE_CHECK, OST_EJECT_REQUEST = 1, 3
"""``_OST`` source events (ACPI 6.5 §6.3.5): the insertion (the guest handled our
``Notify(Mnnn, 1)``) and an eject request (``Notify(Mnnn, 3)``)."""

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
    removal_refused: bool = False   # the guest's _OST said it cannot eject it
    ost_event: int | None = None    # the guest's last _OST for this DIMM: the event ...
    ost_status: int | None = None   # ... and its status


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
            slot.removal_refused = False

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
        """The guest's ``_OST(event, status)`` for the selected slot (lock held): recorded
        for vm.info; a failed eject request ends the slot's pending removal. Reports on an
        empty slot (the ``_OST`` that follows a completed eject) are dropped."""
        slot = self._slot()
        if slot is None or not slot.enabled:
            return
        slot.ost_event, slot.ost_status = self._event, status
        if status in (OST_SUCCESS, OST_EJECT_IN_PROGRESS):
            return
        if self._event == OST_EJECT_REQUEST and slot.pending_removal:
            log.warning("MHPC: the guest could not eject slot %d (_OST status %#x): the DIMM "
                        "stays until the next boot", self._selected, status)
            slot.pending_removal = False
            slot.removal_refused = True
        elif self._event == OST_DEVICE_CHECK:
            log.warning("MHPC: the guest could not add the DIMM in slot %d (_OST status %#x)",
                        self._selected, status)

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
    if slot.removal_refused:
        return "kept"
    return "announced" if slot.inserting else "acknowledged"


def _dimm_name(slot: int) -> str:
    return f"M{slot:03d}"


class MemoryManager:
    """Guest RAM of one boot. ``notify`` raises GED events (``AcpiNotification.MEMORY``);
    with ACPI hot plug the register block is put on ``mmio`` at ``ACPI_MEM_HOTPLUG_ADDR``;
    with virtio-mem, :attr:`virtio_mem_zones` are the regions (and their devices) the device
    manager puts on the PCI bus."""

    def __init__(self, config, vm: Vm, mmio: Bus, *,
                 notify: Callable[[acpi_devices.AcpiNotification], None]):
        self.config = config            # MemoryConfig; the VMM edits it for the next boot
        self.vm = vm
        self.mmio = mmio
        self.notify = notify
        self.mem = GuestMemory()
        self.controller: MemoryHotplugController | None = None
        self.zones: dict[str, MemoryZone] = {}
        self._window = (layout.RAM_64BIT_START, 0)
        self._dimms = 0                 # slots used so far (never reused within a boot)
        self._region_listeners: list[tuple[RegionListener, RegionListener | None]] = []
        self._block_listeners: list[tuple[RegionListener, RegionListener]] = []
        self._dimm_regions: dict[int, MemoryRegion] = {}     # slot -> its plugged DIMM

    def add_region_listener(self, added: RegionListener,
                            removed: RegionListener | None = None) -> None:
        """Call ``added(region)`` for each DIMM plugged from now on, once it is guest RAM,
        and ``removed(region)`` for each DIMM the guest ejects, before its memory goes
        (VFIO devices DMA-map and unmap it, vhost-user back-ends map it). Listeners report
        their own failures; they do not raise."""
        self._region_listeners.append((added, removed))

    def add_block_listener(self, plugged: RegionListener, unplugged: RegionListener) -> None:
        """Call ``plugged(block)`` for each 2 MiB virtio-mem block the guest plugs, before
        the guest may use it, and ``unplugged(block)`` for each it unplugs, before the host
        memory is discarded (a :class:`RamRange` each; the region itself is in the memory
        map from boot on, so only DMA mappings follow its blocks). Called on the device's
        worker thread; listeners report their own failures."""
        self._block_listeners.append((plugged, unplugged))

    # --- boot RAM ------------------------------------------------------------------------------
    def create_boot_memory(self) -> GuestMemory:
        """Map boot RAM, zone by zone as :func:`boot_ram_layout` places it (one memfd, or the
        zone's ``file``, per zone), and the hot plug space after it: with ACPI an address
        window only; with virtio-mem one region per zone with a ``hotplug_size``, placed by
        :func:`virtio_mem_layout`, mapped but not populated, with its device.

        Raises ValueError for what pych cannot back (huge pages, a host NUMA node, a
        missing or short ``file``) and for a virtio-mem ``hotplug_size`` that is not a
        multiple of 128 MiB."""
        specs = zone_specs(self.config)
        for spec in specs:
            self.zones[spec.id] = MemoryZone(spec)
        for i, piece in enumerate(boot_ram_layout([(s.id, s.size) for s in specs])):
            zone = self.zones[piece.zone]
            region = self.mem.add_region(piece.gpa, piece.size, fd=zone.fd,
                                         fd_offset=piece.offset, name=f"ram{i}",
                                         shared=zone.shared_mapping)
            zone.regions.append(region)
            region.slot = self.vm.add_memory(piece.gpa, piece.size, region.host_addr)
            if zone.spec.prefault:
                _prefault(region, zone.spec.option)
        size = self.config.hotplug_size
        if size and self.config.hotplug_method == "Acpi":
            self._window = (hotplug_region_start(self.mem.end), size)
            self.controller = MemoryHotplugController(on_eject=self._eject)
            self.mmio.insert(layout.ACPI_MEM_HOTPLUG_ADDR, MemoryHotplugController.SIZE,
                             self.controller)
            return self.mem
        hotplug = [(s.id, s.hotplug_size) for s in specs if s.hotplug_size]
        for zone_id, size in hotplug:
            if size % REGION_ALIGNMENT:
                raise ValueError(f"virtio-mem hotplug_size {size} of memory zone {zone_id} is "
                                 f"not a multiple of {REGION_ALIGNMENT >> 20} MiB")
        regions = virtio_mem_layout(self.mem.end, hotplug)
        for zone_id, gpa, size in regions:
            zone = self.zones[zone_id]
            region = self.mem.add_region(gpa, size, name=f"virtio-mem-{zone_id}")
            region.slot = self.vm.add_memory(gpa, size, region.host_addr)
            device = VirtioMem(region, requested_size=zone.spec.hotplugged_size or 0,
                               name=zone_id)
            device.add_plug_listener(functools.partial(self._blocks_changed, region, 0),
                                     functools.partial(self._blocks_changed, region, 1))
            zone.virtio_mem = VirtioMemZone(zone_id, region, zone.spec.hotplugged_size or 0,
                                            device)
        if regions:
            start = regions[0][1]
            self._window = (start, regions[-1][1] + regions[-1][2] - start)
        else:
            self._window = (max(layout.RAM_64BIT_START, self.mem.end), 0)
        return self.mem

    @property
    def virtio_mem_zones(self) -> list[VirtioMemZone]:
        """The virtio-mem regions, in zone order (the order their devices go on the bus)."""
        return [z.virtio_mem for z in self.zones.values() if z.virtio_mem is not None]

    @property
    def hotplug_window(self) -> tuple[int, int]:
        """``(start, size)`` of the hot plug space (the ACPI DIMM window, or from the first
        virtio-mem region to the end of the last); ``size`` is 0 without one, and then
        ``start`` is where RAM ends (at least 4 GiB). Fixed for the boot: the 64-bit PCI
        window is placed after it."""
        return self._window

    @property
    def actual_size(self) -> int:
        """RAM the guest has now: boot RAM plus every plugged DIMM and virtio-mem block."""
        size = self.mem.total_size
        for zone in self.virtio_mem_zones:
            size += zone.device.plugged_size - zone.region.size
        return size

    def dma_ranges(self) -> list:
        """What devices may DMA to now: boot RAM, every DIMM, and each plugged virtio-mem
        block (a :class:`RamRange` each; an unplugged block has no host memory to map)."""
        sparse = {id(z.region) for z in self.virtio_mem_zones}
        ranges = [r for r in self.mem.regions if id(r) not in sparse]
        for zone in self.virtio_mem_zones:
            for gpa, size in zone.device.plugged_ranges():
                ranges += _blocks(zone.region, gpa, size)
        return ranges

    def _blocks_changed(self, region: MemoryRegion, which: int, gpa: int, size: int) -> None:
        """virtio-mem's plug listener for ``region``: ``which`` 0 plugged, 1 unplugged."""
        for block in _blocks(region, gpa, size):
            for listeners in self._block_listeners:
                listeners[which](block)

    # --- vm.resize -------------------------------------------------------------------------------
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

        Raises :class:`InvalidMemoryResize` with user-defined memory zones (they are resized
        one by one: :meth:`resize_zone`), when there is no hot plug window, or when the size
        does not fit the method's granularity (ACPI: 128 MiB increases) or the window, and
        :class:`MemoryResizeError` when every ACPI slot of this boot has been used.
        """
        if self.config.zones:
            raise InvalidMemoryResize(RESIZE_WITH_ZONES)
        if self.config.hotplug_method == "VirtioMem":
            return self._resize_virtio_mem(DEFAULT_MEMORY_ZONE, virtio_mem_request(
                self.config, desired))
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
        for added, _ in self._region_listeners:
            added(region)
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
        """The guest ejected DIMM ``index`` (on its vCPU thread): stop DMA to it, take the
        memslot away, free the memory and empty the slot."""
        region = self._dimm_regions.pop(index)
        for _, removed in self._region_listeners:
            if removed is not None:
                removed(region)
        self.vm.remove_memory(region.slot, region.gpa)
        self.mem.remove_region(region)
        self.controller.clear(index)
        log.info("memory: DIMM %d at %#x ejected by the guest and freed", index, region.gpa)

    # --- vm.resize-zone ----------------------------------------------------------------------------
    def resize_zone(self, zone_id: str, desired: int) -> bool:
        """Make the user-defined memory zone ``zone_id`` ``desired`` bytes: its virtio-mem
        device is asked for ``desired`` minus the zone's boot size (the reference's
        ``resize_zone``); returns False, changing nothing, when that is already requested.

        Raises :class:`InvalidMemoryResize` without user-defined zones or for a size the
        zone cannot take (:func:`virtio_mem_request`), :class:`UnknownMemoryZone` for an id
        that is not one of them."""
        zone_config = find_zone(self.config, zone_id)
        return self._resize_virtio_mem(zone_id, virtio_mem_request(zone_config, desired))

    def _resize_virtio_mem(self, zone_id: str, requested: int) -> bool:
        zone = self.zones[zone_id].virtio_mem
        if zone is None:
            raise MemoryResizeError(f"memory zone {zone_id} has no virtio-mem device")
        try:
            return zone.device.resize(requested)
        except VirtioMemResizeError as e:
            raise InvalidMemoryResize(str(e)) from None

    # --- vm.info -------------------------------------------------------------------------------------
    def hotplug_info(self) -> dict | None:
        """What ``vm.info`` reports beyond the reference (``memory_hotplug``); None without
        memory hot plug. Everything here is what the VMM itself knows or what the guest
        told it; whether the guest has *onlined* the memory is not visible to a VMM (it is
        the guest kernel's policy, e.g. ``auto_online_blocks``) and is not reported.

        ``{"method": "Acpi", "window": {"start", "size"}, "dimms": [...]}``, one entry per
        plugged DIMM: ``id`` (``dimm<slot>``), ``slot``, ``address``, ``size`` and
        ``state``: ``"announced"`` until the guest's scan (``MSCN``) acknowledged it, then
        ``"acknowledged"``; ``"removing"`` while the guest is asked to eject it; ``"kept"``
        when the guest refused the eject. ``ost_event`` and ``ost_status``, once the guest
        has reported on the DIMM through ``_OST``: its last report, the event it handled
        (1: the insertion, 3: an eject request) and its status (0: success, i.e. the guest
        added the DIMM or ejects it; 0x80 and up: it failed, e.g. 0x80 for an eject the
        guest does not support).

        ``{"method": "VirtioMem", "window": ..., "virtio_mem": [...]}``, one entry per
        virtio-mem device (the default ``mem0``, or each user-defined zone with a
        ``hotplug_size``): ``id`` (the zone's), ``address`` and ``size`` of its region,
        ``block_size``, ``requested_size`` (what the VMM asks for), ``plugged_size`` (what
        the guest's driver has plugged: the blocks it asked for and got, i.e. the guest's
        own account) and ``driver_active`` (whether the guest's driver has the device
        running: without it the requested size is not acted on).
        """
        start, size = self._window
        zones = self.virtio_mem_zones
        if zones:
            return {
                "method": "VirtioMem",
                "window": {"start": start, "size": size},
                "virtio_mem": [{"id": z.id, "address": z.region.gpa, "size": z.region.size,
                                "block_size": VIRTIO_MEM_BLOCK_SIZE,
                                "requested_size": z.device.requested_size,
                                "plugged_size": z.device.plugged_size,
                                "driver_active": z.device.active}
                               for z in zones],
            }
        if self.controller is None:
            return None
        dimms = []
        for i, s in enumerate(self.controller.snapshot()):
            if not s.enabled:
                continue
            dimm = {"id": f"dimm{i}", "slot": i, "address": s.base, "size": s.length,
                    "state": _dimm_state(s)}
            if s.ost_event is not None:
                dimm["ost_event"], dimm["ost_status"] = s.ost_event, s.ost_status
            dimms.append(dimm)
        return {"method": "Acpi", "window": {"start": start, "size": size}, "dimms": dimms}

    def aml(self) -> Aml:
        """``\\_SB_.MHPC``: the real controller with ACPI hot plug, else the reference's stub."""
        if self.controller is None:
            return acpi_devices.memory_hotplug_stub_aml()
        return self.controller.to_aml(layout.ACPI_MEM_HOTPLUG_ADDR)

    def close(self) -> None:
        self.mem.close()
        for zone in self.zones.values():
            zone.close()
