"""``\\_SB_.MHPC``, the ACPI memory hot plug controller: the DIMM slots' MMIO register block
and the AML that drives it (../shared/notes/ch-hotplug-reference.md §4.1), plus the stub the
reference emits without ACPI memory hot plug. The memory manager plugs DIMMs into the slots
and asks for their removal; the guest's ``MSCN`` scans, acks and ejects them here.
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
from pych.guest_log import GuestLog
from pych.snapshot import state as snap

log = logging.getLogger(__name__)
_guest_log = GuestLog(log)       # what the guest can repeat at will is rate-limited

HOTPLUG_SLOTS = 32
"""Most DIMM slots a boot describes. Slots are never reused within one boot."""

MIN_HOTPLUG_SLOTS = 8
"""Fewest DIMM slots a boot with ACPI memory hot plug describes: the reference's fixed count."""


def hotplug_slot_count(hotplug_size: int, granularity: int) -> int:
    """DIMM slots for a hot plug window of ``hotplug_size``: one per ``granularity`` (128 MiB)
    of it, at least the reference's 8 and at most 32. Every slot is a ``Mnnn`` device the guest
    kernel evaluates at boot (~0.4 s each where guest ring 0 is emulated), so the DSDT only
    describes as many as the window can use: a 1 GiB window has the reference's 8, a 4 GiB
    window 32."""
    return max(MIN_HOTPLUG_SLOTS, min(HOTPLUG_SLOTS, hotplug_size // granularity))

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
    """The ``\\_SB_.MHPC`` register block (``SIZE`` bytes of MMIO at ``mmio_base``), a bus
    device, and the AML that drives it (:meth:`to_aml`).

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

    def __init__(self, mmio_base: int, slots: int = HOTPLUG_SLOTS, *,
                 on_eject: Callable[[int], None] = lambda slot: None):
        self.mmio_base = mmio_base
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

    def save_state(self) -> dict:
        """The selection, the ``_OST`` event awaiting its status and every slot."""
        with self._lock:
            return snap.save(self, ("_selected", "_event", "slots"))

    def restore_state(self, saved: dict) -> None:
        with self._lock:
            snap.load(self, ("_selected", "_event", "slots"), saved)

    def dimms_info(self) -> list[dict]:
        """``vm.info``'s entry for each plugged DIMM (see ``MemoryManager.hotplug_info``)."""
        dimms = []
        for i, s in enumerate(self.snapshot()):
            if not s.enabled:
                continue
            dimm = {"id": f"dimm{i}", "slot": i, "address": s.base, "size": s.length,
                    "state": _dimm_state(s)}
            if s.ost_event is not None:
                dimm["ost_event"], dimm["ost_status"] = s.ost_event, s.ost_status
            dimms.append(dimm)
        return dimms

    def _slot(self) -> DimmSlot | None:
        if self._selected < len(self.slots):
            return self.slots[self._selected]
        _guest_log.warning("MHPC: slot %d selected, only %d exist", self._selected, len(self.slots))
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
            _guest_log.warning("MHPC: ignoring %d-byte read at offset %#x", size, offset)
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
                        _guest_log.warning("MHPC: the guest ejected slot %d, which is not pending "
                                    "removal: ignored", self._selected)
            else:
                _guest_log.warning("MHPC: ignoring %d-byte write at offset %#x", size, offset)
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
            _guest_log.warning("MHPC: the guest could not eject slot %d (_OST status %#x): the DIMM "
                        "stays until the next boot", self._selected, status)
            slot.pending_removal = False
            slot.removal_refused = True
        elif self._event == OST_DEVICE_CHECK:
            _guest_log.warning("MHPC: the guest could not add the DIMM in slot %d (_OST status %#x)",
                        self._selected, status)

    def to_aml(self) -> bytes:
        """``\\_SB_.MHPC`` driving this block at ``mmio_base``: its fields, the
        methods ``MSCN`` (scan: notify inserted/removed DIMMs), ``MTFY``, ``MSTA``, ``MCRS``,
        ``MEJC`` (eject) and ``MOST`` (report ``_OST``), and one PNP0C80 device ``M000``,
        ``M001``... per slot, with ``_STA``, ``_CRS``, ``_EJ0`` and ``_OST``."""
        slots, base = len(self.slots), self.mmio_base
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
        ).to_aml()


def _dimm_state(slot: DimmSlot) -> str:
    if slot.pending_removal:
        return "removing"
    if slot.removal_refused:
        return "kept"
    return "announced" if slot.inserting else "acknowledged"


def _dimm_name(slot: int) -> str:
    return f"M{slot:03d}"


def memory_hotplug_stub_aml() -> Aml:
    """``\\_SB_.MHPC`` with an empty ``MSCN`` (what the reference emits without ACPI hot plug:
    the GED's ``ESCN`` calls ``\\_SB_.MHPC.MSCN`` by absolute path)."""
    return Device(
        "\\_SB_.MHPC",
        Name("_HID", EISAName("PNP0A06")),
        Name("_UID", String("Memory Hotplug Controller")),
        Method("MSCN", 0, serialized=True),
    )
