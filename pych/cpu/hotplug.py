"""``\\_SB_.PRES``, the CPU hot plug controller: its 12-byte MMIO register block and the AML
that drives it, ``\\_SB_.PRES`` plus the processor container ``\\_SB_.CPUS``
(../shared/notes/ch-hotplug-reference.md §3). :class:`~pych.cpu.manager.CpuManager` owns one and
says which CPUs are being inserted or removed; the guest's AML reads and acks them here.
"""

from __future__ import annotations

import enum
import logging
import threading
from collections.abc import Iterable
from dataclasses import dataclass
from typing import Callable

from pych.acpi import tables
from pych.acpi.aml import (
    Acquire, Add, AddressSpace, Aml, Arg, Buffer, Device, EISAName, Equal, Field, FieldAccess,
    FieldUpdate, If, LessThan, Local, Method, MethodCall, Mutex, Name, Named, Notify, OpRegion,
    Path, RegionSpace, Release, Reserved, ResourceTemplate, Return, Sequence, Store, String,
    While,
)
from pych.guest_log import GuestLog
from pych.snapshot import state as snap

log = logging.getLogger(__name__)
_guest_log = GuestLog(log)       # what the guest can repeat at will is rate-limited


class VcpuState(str, enum.Enum):
    """The live state of one possible vCPU, as ``vm.info`` reports it."""

    ABSENT = "absent"          # never plugged in this boot
    INSERTING = "inserting"    # running, but the guest has not yet evaluated its _STA
    PRESENT = "present"        # running and known to the guest
    REMOVING = "removing"      # marked for removal; the guest has not ejected it yet
    EJECTED = "ejected"        # ejected by the guest in this boot; its thread is stopped


@dataclass
class _Slot:
    """Hot plug state of one possible CPU (guarded by the controller's lock)."""

    inserting: bool = False        # CINS: guest-visible, cleared by the guest's ack
    removing: bool = False         # CRMV: guest-visible, cleared by the guest's ack
    pending_removal: bool = False  # VMM-private: the guest may eject this CPU
    ejected: bool = False          # the guest ejected it and it has not been plugged again
    known: bool = False            # the guest evaluated _STA since the CPU was plugged
    sta_armed: bool = False        # insertion acked and the CPU selected again since then


class CpuHotplugController:
    """``\\_SB_.PRES``, the CPU hot plug register block (reference §3.1, 12 bytes).

    ======  =====  ==============================================================================
    offset  width  semantics
    ======  =====  ==============================================================================
    0x00    4      CSEL, R/W: the selected CPU id
    0x04    1      R: status of the selected CPU: bit 0 CPEN (its vCPU thread runs), bit 1 CINS
                   (insertion pending), bit 2 CRMV (removal pending); 0 for ids >= max_vcpus.
                   W: bit 1 acks CINS, bit 2 acks CRMV, bit 3 (CEJ0) ejects the selected CPU
    0x05    1      CCMD, 0x08 4: CDAT: declared by the AML, unused (read 0, writes ignored)
    ======  =====  ==============================================================================

    Accesses of another width to CSEL or the status byte are ignored (reads return 0).
    An eject runs ``eject(cpu_id) -> bool`` synchronously on the writing vCPU thread; it is
    honoured only for a CPU the VMM marked pending removal, never for CPU 0, and the CPU stays
    pending removal if ``eject`` reports that its thread could not be stopped.

    ``is_active(cpu_id)`` tells whether that CPU's vCPU thread runs (CPEN); ``apic_id(cpu_id)``
    is its x2APIC id, for the ``_MAT`` of its processor object (default: the CPU id, as in the
    flat topology). The controller also
    records when the guest has *evaluated* ``_STA`` of an inserted CPU: the reference's AML
    acks CINS in ``CSCN`` under the same selection as its CINS/CRMV reads, while ``CSTA``
    selects the CPU afresh and reads once, so the first status read under a selection made
    after the ack is the guest's ``_STA``.
    """

    SIZE = 0x0C
    CSEL = 0x00
    STATUS = 0x04
    CPEN = 1 << 0
    CINS = 1 << 1
    CRMV = 1 << 2
    CEJ0 = 1 << 3

    def __init__(self, mmio_base: int, max_vcpus: int, boot_vcpus: int, *,
                 is_active: Callable[[int], bool], eject: Callable[[int], bool],
                 apic_id: Callable[[int], int] = lambda cpu: cpu):
        self.mmio_base = mmio_base
        self.max_vcpus = max_vcpus
        self._apic_id = apic_id
        self._is_active = is_active
        self._eject = eject
        self._lock = threading.Lock()
        self._selected = 0
        self._slots = [_Slot(known=cpu < boot_vcpus) for cpu in range(max_vcpus)]

    # --- VMM side ----------------------------------------------------------------------------
    def insert(self, cpu_ids: Iterable[int]) -> None:
        """Mark CPUs whose threads now run as inserting (the guest has yet to see them)."""
        with self._lock:
            for cpu in cpu_ids:
                self._slots[cpu] = _Slot(inserting=True)

    def remove(self, cpu_ids: Iterable[int]) -> None:
        """Mark CPUs for removal: the guest sees CRMV and may then eject them."""
        with self._lock:
            for cpu in cpu_ids:
                slot = self._slots[cpu]
                slot.removing = slot.pending_removal = True

    def removal_pending(self) -> bool:
        with self._lock:
            return any(slot.pending_removal for slot in self._slots)

    def state(self, cpu_id: int) -> VcpuState:
        with self._lock:
            slot = self._slots[cpu_id]
            if slot.pending_removal:
                return VcpuState.REMOVING
            if self._is_active(cpu_id):
                return VcpuState.PRESENT if slot.known else VcpuState.INSERTING
            return VcpuState.EJECTED if slot.ejected else VcpuState.ABSENT

    def save_state(self) -> dict:
        """The selection and every slot's bits (inserting, removing, pending removal, ...)."""
        with self._lock:
            return snap.save(self, ("_selected", "_slots"))

    def restore_state(self, saved: dict) -> None:
        with self._lock:
            snap.load(self, ("_selected", "_slots"), saved)

    # --- guest side (vCPU threads) ------------------------------------------------------------
    def read(self, offset: int, size: int) -> int:
        if (offset, size) == (self.CSEL, 4):
            with self._lock:
                return self._selected
        if (offset, size) == (self.STATUS, 1):
            return self._status()
        if offset in (self.CSEL, self.STATUS):
            _guest_log.warning("PRES: ignoring %d-byte read at offset %#x", size, offset)
        return 0

    def _status(self) -> int:
        with self._lock:
            cpu = self._selected
            if cpu >= self.max_vcpus:
                _guest_log.warning("PRES: status read of CPU %d, but there are only %d", cpu,
                            self.max_vcpus)
                return 0
            slot = self._slots[cpu]
            active = self._is_active(cpu)
            if slot.sta_armed:
                slot.sta_armed = False
                slot.known = active
            return (self.CPEN * active | self.CINS * slot.inserting
                    | self.CRMV * slot.removing)

    def write(self, offset: int, size: int, value: int) -> None:
        if (offset, size) == (self.CSEL, 4):
            with self._lock:
                self._selected = value
                if value < self.max_vcpus:
                    slot = self._slots[value]
                    slot.sta_armed = not slot.known and not slot.inserting
        elif (offset, size) == (self.STATUS, 1):
            self._command(value)
        elif offset in (self.CSEL, self.STATUS):
            _guest_log.warning("PRES: ignoring %d-byte write at offset %#x", size, offset)

    def _command(self, value: int) -> None:
        with self._lock:
            cpu = self._selected
            if cpu >= self.max_vcpus:
                _guest_log.warning("PRES: command %#x for CPU %d, but there are only %d", value, cpu,
                            self.max_vcpus)
                return
            slot = self._slots[cpu]
            if value & self.CINS:
                slot.inserting = False
            if value & self.CRMV:
                slot.removing = False
            if not value & self.CEJ0:
                return
            if cpu == 0 or not slot.pending_removal:
                _guest_log.warning("PRES: the guest ejected CPU %d, which is not being removed: ignored",
                            cpu)
                return
        # Stop the thread without holding the lock: the target vCPU may be reading PRES.
        if not self._eject(cpu):
            log.error("PRES: CPU %d could not be stopped; it stays pending removal", cpu)
            return
        with self._lock:
            self._slots[cpu] = _Slot(ejected=True)
        log.info("CPU %d ejected by the guest", cpu)

    # --- AML ------------------------------------------------------------------------------------
    def to_aml(self) -> bytes:
        """``\\_SB_.PRES`` (this block), then ``\\_SB_.CPUS``: the processor container with
        ``CSTA``/``CTFY``/``CEJ0``/``CSCN`` and one ``Cxxx`` per possible CPU (reference §3.2).
        """
        return Sequence(self._controller_aml(), self._container_aml()).to_aml()

    def _controller_aml(self) -> Aml:
        return Device(
            "\\_SB_.PRES",
            Name("_HID", EISAName("PNP0A06")),
            Name("_UID", String("CPU Hotplug Controller")),
            Mutex("CPLK"),
            Name("_CRS", ResourceTemplate(
                AddressSpace.memory(self.mmio_base, self.mmio_base + self.SIZE - 1))),
            OpRegion("PRST", RegionSpace.SYSTEM_MEMORY, self.mmio_base, self.SIZE),
            Field("PRST", Reserved(8 * self.STATUS), Named("CPEN", 1), Named("CINS", 1),
                  Named("CRMV", 1), Named("CEJ0", 1), Reserved(4), Named("CCMD", 8),
                  access=FieldAccess.BYTE, update=FieldUpdate.WRITE_AS_ZEROS),
            Field("PRST", Named("CSEL", 32), Reserved(32), Named("CDAT", 32),
                  access=FieldAccess.DWORD),
        )

    def _container_aml(self) -> Aml:
        lock, select = "\\_SB_.PRES.CPLK", "\\_SB_.PRES.CSEL"
        csta = Method(
            "CSTA", 1,
            Acquire(lock),
            Store(Arg(0), select),
            Store(0, Local(0)),
            If(Equal(Path("\\_SB_.PRES.CPEN"), 1), Store(0x0F, Local(0))),
            Release(lock),
            Return(Local(0)),
            serialized=True)
        ctfy = Method(
            "CTFY", 2,
            *(If(Equal(Arg(0), cpu), Notify(_cpu_device_name(cpu), Arg(1)))
              for cpu in range(self.max_vcpus)),
            serialized=True)
        cej0 = Method(
            "CEJ0", 1,
            Acquire(lock),
            Store(Arg(0), select),
            Store(1, "\\_SB_.PRES.CEJ0"),
            Release(lock),
            serialized=True)
        cscn = Method(
            "CSCN", 0,
            Acquire(lock),
            Store(0, Local(0)),
            While(LessThan(Local(0), self.max_vcpus),
                  Store(Local(0), select),
                  If(Equal(Path("\\_SB_.PRES.CINS"), 1),
                     MethodCall("CTFY", Local(0), 1),
                     Store(1, "\\_SB_.PRES.CINS")),
                  If(Equal(Path("\\_SB_.PRES.CRMV"), 1),
                     MethodCall("CTFY", Local(0), 3),
                     Store(1, "\\_SB_.PRES.CRMV")),
                  Add(Local(0), 1, Local(0))),
            Release(lock),
            serialized=True)
        return Device(
            "\\_SB_.CPUS",
            Name("_HID", String("ACPI0010")),
            Name("_CID", EISAName("PNP0A05")),
            csta, ctfy, cej0, cscn,
            *(self._cpu_aml(cpu, self._apic_id(cpu)) for cpu in range(self.max_vcpus)),
        )

    @staticmethod
    def _cpu_aml(cpu: int, apic_id: int) -> Aml:
        return Device(
            _cpu_device_name(cpu),
            Name("_HID", String("ACPI0007")),
            Name("_UID", cpu),
            Method("_STA", 0, Return(MethodCall("CSTA", cpu))),
            Method("_PXM", 0, Return(0)),
            # Linux wants the Enabled flag here even for CPUs the MADT lists as disabled.
            Name("_MAT", Buffer(tables.x2apic_madt_entry(cpu, apic_id, enabled=True))),
            Method("_EJ0", 1, MethodCall("CEJ0", cpu)),
        )


def _cpu_device_name(cpu: int) -> str:
    return f"C{cpu:03X}"
