"""The CPU manager: creates, configures and runs the vCPUs of one VM, and hot plugs them.

It owns every vCPU of the VM and the CPU hot plug controller, ``\\_SB_.PRES``: a 12-byte
MMIO register block plus the AML that drives it (shared/notes/ch-hotplug-reference.md §3).

Hot plug, end to end:

* ``vm.resize`` up (:meth:`CpuManager.resize`, VMM thread): create the missing vCPUs (or
  reuse parked ones: KVM vCPU fds are never destroyed while the VM lives, re-creating one
  fails with EEXIST), start their threads (the vCPU waits in the kernel for the guest's
  INIT/SIPI), mark them *inserting* and raise the GED CPU event. The guest's ``CSCN`` sees
  CINS, notifies ``Cxxx`` with 1 (device check) and acks; Linux then evaluates ``_STA``
  (``CSTA``: CPEN set) and adds the CPU, offline.
* ``vm.resize`` down: mark the highest CPUs *removing* (guest-visible, guest-ackable) and
  *pending removal* (VMM-private), raise the event. ``CSCN`` notifies them with 3 (eject
  request); Linux offlines each CPU itself and evaluates ``_EJ0`` (``CEJ0``), whose register
  write stops that vCPU's thread, synchronously on the vCPU thread that wrote it. The eject
  is gated on the private flag: ``CSCN`` acks CRMV before the guest can eject (§3.4).
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
from pych.arch.x86_64 import boot, layout
from pych.arch.x86_64.cpuid import Topology, shape_cpuid
from pych.arch.x86_64.loader import LoadedKernel
from pych.devices.acpi import AcpiNotification
from pych.devices.bus import Bus
from pych.hypervisor.kvm import Kvm, Vcpu, Vm
from pych.vcpu import VcpuThread

log = logging.getLogger(__name__)


class VcpuRemovalPending(Exception):
    """A resize was asked while the guest has not yet ejected every CPU being removed."""


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

    ``is_active(cpu_id)`` tells whether that CPU's vCPU thread runs (CPEN). The controller also
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
                 is_active: Callable[[int], bool], eject: Callable[[int], bool]):
        self.mmio_base = mmio_base
        self.max_vcpus = max_vcpus
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

    # --- guest side (vCPU threads) ------------------------------------------------------------
    def read(self, offset: int, size: int) -> int:
        if (offset, size) == (self.CSEL, 4):
            with self._lock:
                return self._selected
        if (offset, size) == (self.STATUS, 1):
            return self._status()
        if offset in (self.CSEL, self.STATUS):
            log.warning("PRES: ignoring %d-byte read at offset %#x", size, offset)
        return 0

    def _status(self) -> int:
        with self._lock:
            cpu = self._selected
            if cpu >= self.max_vcpus:
                log.warning("PRES: status read of CPU %d, but there are only %d", cpu,
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
            log.warning("PRES: ignoring %d-byte write at offset %#x", size, offset)

    def _command(self, value: int) -> None:
        with self._lock:
            cpu = self._selected
            if cpu >= self.max_vcpus:
                log.warning("PRES: command %#x for CPU %d, but there are only %d", value, cpu,
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
                log.warning("PRES: the guest ejected CPU %d, which is not being removed: ignored",
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
    def aml(self, apic_id: Callable[[int], int]) -> Aml:
        """``\\_SB_.PRES`` (this block), then ``\\_SB_.CPUS``: the processor container with
        ``CSTA``/``CTFY``/``CEJ0``/``CSCN`` and one ``Cxxx`` per possible CPU (reference §3.2).
        """
        return Sequence(self._controller_aml(), self._container_aml(apic_id))

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

    def _container_aml(self, apic_id: Callable[[int], int]) -> Aml:
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
            *(self._cpu_aml(cpu, apic_id(cpu)) for cpu in range(self.max_vcpus)),
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


class CpuManager:
    """Every vCPU of one VM: boot vCPUs, hot plug (``resize``) and the ``PRES`` block.

    Thread contract: ``resize``, ``start``, ``pause``, ``resume``, ``stop`` and ``close`` run
    on the VMM thread; the guest's eject runs on a vCPU thread. ``self.threads`` (running vCPU
    threads by id) is only changed under ``self._lock``.
    """

    def __init__(self, kvm: Kvm, vm: Vm, pio: Bus, mmio: Bus, *, boot_vcpus: int, max_vcpus: int,
                 topology: Topology | None, on_exit: Callable[[str, str], None],
                 notify: Callable[[int], None]):
        if not 1 <= boot_vcpus <= max_vcpus:
            raise ValueError(f"boot vCPUs ({boot_vcpus}) must be between 1 and max ({max_vcpus})")
        if max_vcpus > kvm.max_vcpus:
            raise ValueError(f"max vCPUs ({max_vcpus}) exceeds what KVM supports ({kvm.max_vcpus})")
        self.kvm = kvm
        self.vm = vm
        self.pio = pio
        self.mmio = mmio
        self.boot_vcpus = boot_vcpus
        self.max_vcpus = max_vcpus
        self.topology = topology or Topology.flat(max_vcpus)
        self.on_exit = on_exit
        self.notify = notify                    # GED notification (AcpiNotification.CPU)
        self._supported_cpuid = kvm.supported_cpuid()
        self.vcpus: list[Vcpu] = []             # every vCPU ever created, index == id
        self.threads: dict[int, VcpuThread] = {}
        self._lock = threading.Lock()
        self._paused = False
        self.hotplug = CpuHotplugController(
            layout.ACPI_CPU_HOTPLUG_ADDR, max_vcpus, boot_vcpus,
            is_active=lambda cpu: cpu in self.threads, eject=self._stop_ejected_vcpu)
        mmio.insert(layout.ACPI_CPU_HOTPLUG_ADDR, CpuHotplugController.SIZE, self.hotplug)

    def apic_id(self, cpu_id: int) -> int:
        return self.topology.apic_id(cpu_id)

    def _create_vcpu(self, cpu_id: int) -> Vcpu:
        """Create and configure vCPU ``cpu_id`` like a boot AP: it waits for INIT/SIPI."""
        vcpu = self.vm.create_vcpu(cpu_id)
        vcpu.set_cpuid(shape_cpuid(self._supported_cpuid, cpu_id, self.topology))
        accepted = vcpu.set_msrs(boot.BOOT_MSRS)
        if accepted != len(boot.BOOT_MSRS):
            log.debug("vCPU %d: KVM accepted %d of %d boot MSRs", cpu_id, accepted, len(boot.BOOT_MSRS))
        vcpu.set_fpu(boot.initial_fpu())
        vcpu.set_lapic(boot.lapic_with_lints(vcpu.get_lapic()))
        self.vcpus.append(vcpu)
        return vcpu

    def create_boot_vcpus(self, kernel: LoadedKernel) -> None:
        """vCPU 0 starts at the kernel entry; the others wait for INIT/SIPI from the guest."""
        for cpu_id in range(self.boot_vcpus):
            vcpu = self._create_vcpu(cpu_id)
            if cpu_id == 0:
                vcpu.set_sregs(boot.boot_sregs(vcpu.get_sregs(), kernel.protocol))
                vcpu.set_regs(boot.boot_regs(kernel))

    def aml(self) -> Aml:
        return self.hotplug.aml(self.apic_id)

    # --- hot plug -------------------------------------------------------------------------------
    @property
    def requested_vcpus(self) -> int:
        """How many vCPUs the VM has once pending removals complete: ids 0..n-1."""
        with self._lock:
            running = list(self.threads)
        return sum(self.hotplug.state(cpu) is not VcpuState.REMOVING for cpu in running)

    def states(self) -> list[VcpuState]:
        """The live state of every possible vCPU, by id."""
        return [self.hotplug.state(cpu) for cpu in range(self.max_vcpus)]

    def resize(self, desired: int) -> bool:
        """Hot plug vCPUs up to ``desired`` or ask the guest to eject the highest ones down to
        it, and raise the GED CPU event. Returns False (and does nothing) when ``desired`` is
        already the requested count. Raises ``ValueError`` for a count outside 1..max_vcpus and
        :class:`VcpuRemovalPending` while the guest has not ejected every CPU being removed.
        Hot-added vCPUs reuse parked KVM vCPUs; they run paused while the VM is paused.
        """
        if not 1 <= desired <= self.max_vcpus:
            raise ValueError(f"desired vCPUs ({desired}) must be between 1 and max "
                             f"({self.max_vcpus})")
        current = self.requested_vcpus
        if desired == current:
            return False
        if self.hotplug.removal_pending():
            raise VcpuRemovalPending("a vCPU removal is still pending: the guest has not "
                                     "ejected every vCPU being removed yet; retry later")
        if desired > current:
            added = range(current, desired)
            for cpu in added:
                if cpu >= len(self.vcpus):
                    self._create_vcpu(cpu)
                self._start_thread(cpu)
            self.hotplug.insert(added)
            log.info("vCPUs %d-%d hot plugged", added[0], added[-1])
        else:
            self.hotplug.remove(range(desired, current))
            log.info("vCPUs %d-%d marked for removal", desired, current - 1)
        self.notify(AcpiNotification.CPU)
        return True

    def _stop_ejected_vcpu(self, cpu_id: int) -> bool:
        """The guest ejected ``cpu_id`` (it is offline there, halted in KVM_RUN): stop its
        thread, keeping the KVM vCPU for reuse. Runs on the ejecting vCPU thread, which
        must not be the target (a CPU cannot eject itself). Returns whether it stopped."""
        with self._lock:
            t = self.threads.get(cpu_id)
        if t is None:
            return True
        if t.thread is threading.current_thread():
            log.warning("vCPU %d tried to eject itself: refused", cpu_id)
            return False
        if not t.stop():
            return False
        with self._lock:
            del self.threads[cpu_id]
        return True

    # --- threads -----------------------------------------------------------------------------------
    def _start_thread(self, cpu_id: int) -> None:
        t = VcpuThread(self.vcpus[cpu_id], self.pio, self.mmio, self.on_exit)
        with self._lock:
            self.threads[cpu_id] = t
            t.start(paused=self._paused)

    def start(self) -> None:
        for cpu_id in range(self.boot_vcpus):
            self._start_thread(cpu_id)

    def _running(self) -> list[VcpuThread]:
        with self._lock:
            return list(self.threads.values())

    def pause(self) -> None:
        with self._lock:
            self._paused = True
        for t in self._running():
            t.pause()

    def resume(self) -> None:
        with self._lock:
            self._paused = False
        for t in self._running():
            t.resume()

    def stop(self) -> None:
        for t in self._running():
            t.stop()
        with self._lock:
            self.threads.clear()

    def close(self) -> None:
        self.stop()
        for vcpu in self.vcpus:
            vcpu.close()
        self.vcpus.clear()

    @property
    def exit_counts(self) -> dict[int, int]:
        return {t.index: t.exits for t in self._running()}
