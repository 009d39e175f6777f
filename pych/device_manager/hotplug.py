"""PCI hot plug: ``\\_SB_.PHPR``, the ACPI PCI hot plug controller (its 16-byte MMIO register
block and AML), and the slot objects it notifies inside the host bridge
(../shared/notes/ch-hotplug-reference.md §5). The device manager sets the bits and handles the
ejects; the guest's ``PCNT`` and ``PCEJ`` read and write them here.
"""

from __future__ import annotations

import functools
import logging
import threading
from collections.abc import Callable

from pych.acpi.aml import (
    Acquire, AddressSpace, And, Arg, Device, EISAName, Else, Field, FieldAccess, FieldUpdate,
    If, LessThan, Local, Method, MethodCall, Mutex, Name, Named, Notify, OpRegion, Path,
    RegionSpace, Release, ResourceTemplate, Return, ShiftLeft, Store, String, Subtract, While,
    Xor,
)
from pych.devices.pci.bus import NUM_DEVICE_SLOTS
from pych.guest_log import GuestLog
from pych.snapshot import state as snap

log = logging.getLogger(__name__)
_guest_log = GuestLog(log)       # what the guest can repeat at will is rate-limited


class PciHotplugController:
    """``\\_SB_.PHPR``, the ACPI PCI hot plug register block (reference §5.1, 16 bytes).

    ======  ======  ==========================================================================
    offset  name    semantics (4-byte accesses only; others read 0 and are ignored)
    ======  ======  ==========================================================================
    0x00    PCIU    R: bitmap of slots added on the selected segment; reading clears it
    0x04    PCID    R: bitmap of slots the VMM wants ejected; reading clears it
    0x08    B0EJ    W: bitmap of slots the guest has ejected: ``on_eject(segment, slot)`` runs
                    for each set bit, synchronously on the writing vCPU thread; reads 0
    0x0C    PSEG    R/W: the selected segment; out-of-range writes are ignored
    ======  ======  ==========================================================================

    The VMM sets bits with :meth:`device_added` / :meth:`removal_requested` and then raises
    the GED PCI event; the guest's ``PCNT`` reads both bitmaps (clearing them) and notifies
    the slot objects: 1 (device check) for PCIU bits, 3 (eject request) for PCID bits.
    """

    SIZE = 0x10
    PCIU = 0x00
    PCID = 0x04
    B0EJ = 0x08
    PSEG = 0x0C

    def __init__(self, mmio_base: int, *, num_segments: int = 1,
                 on_eject: Callable[[int, int], None]) -> None:
        self.mmio_base = mmio_base
        self.num_segments = num_segments
        self._on_eject = on_eject
        self._lock = threading.Lock()
        self._up = [0] * num_segments
        self._down = [0] * num_segments
        self._segment = 0

    def device_added(self, segment: int, slot: int) -> None:
        with self._lock:
            self._up[segment] |= 1 << slot

    def removal_requested(self, segment: int, slot: int) -> None:
        with self._lock:
            self._down[segment] |= 1 << slot

    def save_state(self) -> dict:
        """PCIU and PCID bits the guest has not read yet, and the selected segment."""
        with self._lock:
            return snap.save(self, ("_up", "_down", "_segment"))

    def restore_state(self, saved: dict) -> None:
        with self._lock:
            snap.load(self, ("_up", "_down", "_segment"), saved)

    def read(self, offset: int, size: int) -> int:
        if size != 4:
            _guest_log.warning("PHPR: ignoring %d-byte read at offset %#x", size, offset)
            return 0
        with self._lock:
            segment = self._segment
            if offset == self.PCIU:
                value, self._up[segment] = self._up[segment], 0
                return value
            if offset == self.PCID:
                value, self._down[segment] = self._down[segment], 0
                return value
            if offset == self.PSEG:
                return segment
        return 0

    def write(self, offset: int, size: int, value: int) -> None:
        if size != 4:
            _guest_log.warning("PHPR: ignoring %d-byte write at offset %#x", size, offset)
        elif offset == self.B0EJ:
            with self._lock:
                segment = self._segment
            for slot in range(NUM_DEVICE_SLOTS):
                if value & 1 << slot:
                    self._on_eject(segment, slot)
        elif offset == self.PSEG:
            if value < self.num_segments:
                with self._lock:
                    self._segment = value
            else:
                _guest_log.warning("PHPR: ignoring selection of PCI segment %d (there are %d)",
                            value, self.num_segments)

    def to_aml(self) -> bytes:
        """``\\_SB_.PHPR``: the register fields, ``PCEJ(slot, segment)`` (eject: select the
        segment, write the slot's bit to B0EJ) and ``PSCN`` (every segment's ``PCNT``)."""
        return Device(
            "\\_SB_.PHPR",
            Name("_HID", EISAName("PNP0A06")),
            Name("_STA", 0x0B),
            Name("_UID", String("PCI Hotplug Controller")),
            Mutex("BLCK"),
            Name("_CRS", ResourceTemplate(
                AddressSpace.memory(self.mmio_base, self.mmio_base + self.SIZE - 1))),
            OpRegion("PCST", RegionSpace.SYSTEM_MEMORY, self.mmio_base, self.SIZE),
            Field("PCST", Named("PCIU", 32), Named("PCID", 32), Named("B0EJ", 32),
                  Named("PSEG", 32), access=FieldAccess.DWORD, update=FieldUpdate.WRITE_AS_ZEROS),
            Method("PCEJ", 2,
                   Acquire("BLCK"),
                   Store(Arg(1), "PSEG"),
                   ShiftLeft(1, Arg(0), "B0EJ"),
                   Release("BLCK"),
                   Return(0),
                   serialized=True),
            Method("PSCN", 0,
                   *(MethodCall(f"\\_SB_.PC{s:02X}.PCNT") for s in range(self.num_segments)),
                   serialized=True),
        ).to_aml()


class PciHotplugSlots:
    """The AML that goes inside a host bridge ``\\_SB_.PCxx`` for :class:`PciHotplugController`:
    a slot object ``Snnn`` per slot (``_SUN``, ``_ADR``, ``_EJ0`` ->
    ``\\_SB_.PHPR.PCEJ(_SUN, _SEG)``), ``DVNT(bitmap, event)`` notifying the slots whose bit
    is set, and ``PCNT``, which selects this segment and notifies added slots with 1 and slots
    to eject with 3 (reference §5.2).

    What the guest runs on each PCI event is kept short, because its ACPI interpreter is
    slow where guest kernel code is (~0.5 µs an instruction on this host; ACPICA spends
    ~10,000 instructions on a typical AML operation, so each costs the guest 5-10 ms): the
    reference's ``DVNT`` tests each of the 32 bits in turn and ``PCNT`` calls it for both
    bitmaps, so a removal had the guest evaluate ~200 AML operations around one ``Notify``
    (measured: 1.9 s between the guest's reads of PCIU and PCID, most of the 3 s disk
    removal). Here ``PCNT`` calls ``DVNT`` only for a bitmap with a bit set, and ``DVNT``
    takes the set bits one at a time (lowest first) and finds each one's slot by a binary
    search on its value: 5 comparisons for one slot of 32.
    """

    def __init__(self, slots: int = NUM_DEVICE_SLOTS) -> None:
        self.slots = slots

    def to_aml(self) -> bytes:
        return _slots_aml(self.slots)


def _dvnt(slots: int) -> Method:
    """``DVNT(bitmap, event)``: ``Notify(Snnn, event)`` for each slot whose bit is set. Each
    round isolates the lowest set bit (``bitmap & -bitmap``), clears it, and finds its slot
    by comparing the bit's value with the bisecting powers of two."""
    return Method("DVNT", 2,
                  While(Arg(0),
                        And(Arg(0), Subtract(0, Arg(0)), Local(0)),
                        Xor(Arg(0), Local(0), Arg(0)),
                        *_notify_slot_of_bit(0, slots)),
                  serialized=True)


def _notify_slot_of_bit(lo: int, hi: int) -> list:
    """``Notify(Snnn, Arg1)`` for the slot in ``lo``..``hi - 1`` whose bit ``Local0`` is."""
    if hi - lo == 1:
        return [Notify(f"S{lo:03d}", Arg(1))]
    mid = (lo + hi + 1) // 2
    return [If(LessThan(Local(0), 1 << mid), *_notify_slot_of_bit(lo, mid)),
            Else(*_notify_slot_of_bit(mid, hi))]


@functools.cache
def _slots_aml(slots: int) -> bytes:
    """:class:`PciHotplugSlots`' AML: the same bytes inside every host bridge (the slots
    name the segment through the bridge's ``_SEG``), so encoded once per process: with 16
    segments that takes the DSDT's PCI part from ~170 ms to ~16 ms here."""
    slot_devices = [Device(
        f"S{slot:03d}",
        Name("_SUN", slot),
        Name("_ADR", slot << 16),
        Method("_EJ0", 1, MethodCall("\\_SB_.PHPR.PCEJ", Path("_SUN"), Path("_SEG")),
               serialized=True),
    ) for slot in range(slots)]
    dvnt = _dvnt(slots)
    pcnt = Method(
        "PCNT", 0,
        Acquire("\\_SB_.PHPR.BLCK"),
        Store(Path("_SEG"), "\\_SB_.PHPR.PSEG"),
        Store(Path("\\_SB_.PHPR.PCIU"), Local(0)),     # reading a bitmap clears it
        Store(Path("\\_SB_.PHPR.PCID"), Local(1)),
        If(Local(0), MethodCall("DVNT", Local(0), 1)),
        If(Local(1), MethodCall("DVNT", Local(1), 3)),
        Release("\\_SB_.PHPR.BLCK"),
        serialized=True)
    return b"".join(piece.to_aml() for piece in (*slot_devices, dvnt, pcnt))
