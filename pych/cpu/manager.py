"""The CPU manager: creates, configures and runs the vCPUs of one VM, and hot plugs them.

It owns every vCPU of the VM (their threads: :mod:`pych.cpu.vcpu`) and the CPU hot plug
controller, ``\\_SB_.PRES`` (:mod:`pych.cpu.hotplug`: its register block and AML,
../shared/notes/ch-hotplug-reference.md §3).

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

import logging
import threading
from collections.abc import Mapping
from typing import Callable

from pych.arch.x86_64 import boot, layout
from pych.arch.x86_64.cpuid import CpuidTable, Topology
from pych.arch.x86_64.loader import LoadedKernel
from pych.cpu.hotplug import CpuHotplugController, VcpuState
from pych.cpu.vcpu import VcpuThread
from pych.devices.acpi import AcpiNotification
from pych.devices.bus import Bus
from pych.hypervisor.kvm import Kvm, Vcpu, Vm
from pych.hypervisor.kvm.kvm import VCPU_STATE, pack_msrs
from pych.snapshot.state import StateError
from pych.threads import ThreadStarter

log = logging.getLogger(__name__)


class VcpuRemovalPending(Exception):
    """A resize was asked while the guest has not yet ejected every CPU being removed."""


class CpuManager:
    """Every vCPU of one VM: boot vCPUs, hot plug (``resize``) and the ``PRES`` block.

    Thread contract: ``resize``, ``start``, ``pause``, ``resume``, ``stop`` and ``close`` run
    on the VMM thread; the guest's eject runs on a vCPU thread. ``self.threads`` (running vCPU
    threads by id) is only changed under ``self._lock``.
    """

    def __init__(self, kvm: Kvm, kvm_vm: Vm, pio: Bus, mmio: Bus, *, boot_vcpus: int,
                 max_vcpus: int, topology: Topology | None, on_exit: Callable[[str, str], None],
                 notify: Callable[[int], None],
                 affinity: Mapping[int, frozenset[int]] | None = None,
                 start_later: Callable[[Callable[[], None]], None] | None = None):
        if not 1 <= boot_vcpus <= max_vcpus:
            raise ValueError(f"boot vCPUs ({boot_vcpus}) must be between 1 and max ({max_vcpus})")
        if max_vcpus > kvm.max_vcpus:
            raise ValueError(f"max vCPUs ({max_vcpus}) exceeds what KVM supports ({kvm.max_vcpus})")
        self.kvm = kvm
        self.kvm_vm = kvm_vm
        self.pio = pio
        self.mmio = mmio
        self.boot_vcpus = boot_vcpus
        self.max_vcpus = max_vcpus
        self.topology = topology or Topology.flat(max_vcpus)
        self.on_exit = on_exit
        self.notify = notify                    # GED notification (AcpiNotification.CPU)
        # runs the start of hot-added vCPUs' threads: the VMM's, once the resize request is
        # answered (its answer need not wait for the host to schedule them); default at once
        self.start_later = start_later or (lambda start: start())
        self.affinity = dict(affinity or {})    # vCPU id -> host CPUs (boot and hot-added)
        # What every vCPU is given, prepared once (a hot add's answer waits for it).
        self._cpuid = CpuidTable(kvm.supported_cpuid(), self.topology)
        self._boot_msrs = pack_msrs(boot.BOOT_MSRS)
        self._initial_fpu = boot.initial_fpu()
        self.vcpus: list[Vcpu] = []             # every vCPU ever created, index == id
        self.threads: dict[int, VcpuThread] = {}
        self._lock = threading.Lock()
        self._paused = False
        # A hot-added vCPU runs on a thread started ahead of need, so that vm.resize does
        # not wait for the host to schedule a new thread (readied in start()).
        self._starter = (ThreadStarter("vcpu-spare", replace_first=True)
                         if max_vcpus > boot_vcpus else None)
        self.hotplug_controller = CpuHotplugController(
            layout.ACPI_CPU_HOTPLUG_ADDR, max_vcpus, boot_vcpus,
            is_active=lambda cpu: cpu in self.threads, eject=self._stop_ejected_vcpu,
            apic_id=self.topology.apic_id)
        mmio.insert(layout.ACPI_CPU_HOTPLUG_ADDR, CpuHotplugController.SIZE,
                    self.hotplug_controller)

    def apic_id(self, cpu_id: int) -> int:
        return self.topology.apic_id(cpu_id)

    def _create_vcpu(self, cpu_id: int) -> Vcpu:
        """Create and configure vCPU ``cpu_id`` like a boot AP: it waits for INIT/SIPI."""
        vcpu = self.kvm_vm.create_vcpu(cpu_id)
        vcpu.set_cpuid_packed(self._cpuid.count, self._cpuid.packed(cpu_id))
        accepted = vcpu.set_msrs(self._boot_msrs)
        if accepted != self._boot_msrs.count:
            log.debug("vCPU %d: KVM accepted %d of %d boot MSRs", cpu_id, accepted,
                      self._boot_msrs.count)
        vcpu.set_fpu(self._initial_fpu)
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

    # --- snapshot (VMM thread, vCPUs paused) -------------------------------------------------------
    def save_state(self) -> dict:
        """Every running vCPU's KVM state (registers, special registers, FPU, XSAVE, XCRs,
        MSRs, LAPIC, debug registers, events, MP state: :data:`VCPU_STATE`) and how many KVM
        vCPUs exist (ejected ones are kept for reuse). The ``PRES`` block is a bus device,
        saved with the others (:meth:`pych.vm.Vm.state`)."""
        msrs = self._saved_msr_indices()
        return {
            "created": len(self.vcpus),
            "vcpus": {str(cpu): {**{name: self.vcpus[cpu].get_state(name).hex()
                                    for name in VCPU_STATE},
                                 "msrs": {f"{i:#x}": v for i, v in
                                          self.vcpus[cpu].get_msrs(msrs).items()}}
                      for cpu in sorted(self.threads)},
        }

    def _saved_msr_indices(self) -> list[int]:
        """KVM's MSR index list plus the boot MSRs it does not list (the MTRR default type)."""
        indices = self.kvm.msr_index_list()
        return indices + [i for i in boot.BOOT_MSRS if i not in indices]

    def restore_state(self, saved: dict) -> None:
        """Create the vCPUs of a snapshot (as many as it had), put each running one's state
        back and start its thread parked (the VM comes up paused)."""
        for cpu in range(saved["created"]):
            self._create_vcpu(cpu)
        for cpu_id, vcpu_state in saved["vcpus"].items():
            vcpu = self.vcpus[int(cpu_id)]
            last = ("vcpu_events", "mp_state")
            for name in VCPU_STATE:             # in VCPU_STATE's order (see there)
                if name not in last:
                    vcpu.set_state(name, bytes.fromhex(vcpu_state[name]))
            msrs = {int(i, 16): v for i, v in vcpu_state["msrs"].items()}
            accepted = vcpu.set_msrs(msrs)
            if accepted != len(msrs):
                raise StateError(f"vCPU {cpu_id}: KVM accepted {accepted} of {len(msrs)} "
                                 f"saved MSRs (stopped at {list(msrs)[accepted]:#x})")
            for name in last:
                vcpu.set_state(name, bytes.fromhex(vcpu_state[name]))
        with self._lock:
            self._paused = True
        for cpu_id in sorted(int(i) for i in saved["vcpus"]):
            self._start_thread(cpu_id)
        self._ready_starter()

    def to_aml(self) -> bytes:
        """The CPU hot plug controller's AML and the processor objects (see
        :meth:`CpuHotplugController.to_aml`)."""
        return self.hotplug_controller.to_aml()

    # --- hot plug -------------------------------------------------------------------------------
    @property
    def requested_vcpus(self) -> int:
        """How many vCPUs the VM has once pending removals complete: ids 0..n-1."""
        with self._lock:
            running = list(self.threads)
        return sum(self.hotplug_controller.state(cpu) is not VcpuState.REMOVING for cpu in running)

    def states(self) -> list[VcpuState]:
        """The live state of every possible vCPU, by id."""
        return [self.hotplug_controller.state(cpu) for cpu in range(self.max_vcpus)]

    def resize(self, desired: int) -> bool:
        """Hot plug vCPUs up to ``desired`` or ask the guest to eject the highest ones down to
        it, and raise the GED CPU event. Returns False (and does nothing) when ``desired`` is
        already the requested count. Raises ``ValueError`` for a count outside 1..max_vcpus and
        :class:`VcpuRemovalPending` while the guest has not ejected every CPU being removed.
        Hot-added vCPUs reuse parked KVM vCPUs; they run paused while the VM is paused.
        """
        if not self.check_resize(desired):
            return False
        current = self.requested_vcpus
        launch = []
        if desired > current:
            added = range(current, desired)
            for cpu in added:
                if cpu >= len(self.vcpus):
                    self._create_vcpu(cpu)
                launch.append(self._register_thread(cpu))
            self.hotplug_controller.insert(added)
            log.info("vCPUs %d-%d hot plugged", added[0], added[-1])
        else:
            self.hotplug_controller.remove(range(desired, current))
            log.info("vCPUs %d-%d marked for removal", desired, current - 1)
        # The new vCPUs' threads and the GED event get going once the request is answered
        # (ControlLoop.after_answer): set going here, either competes for the GIL with the
        # thread that is to write the answer. A new vCPU's thread runs Python up to
        # KVM_RUN; the GED event has vCPU 0 run the event's AML, each register it reads an
        # exit handled in Python (traced, guest idle: with the event raised here, 2.5 ms
        # passed between raising it and the answer being ready; raised after the answer,
        # the whole round trip took 1.6 ms). KVM keeps the guest's INIT and SIPI for a
        # vCPU until its thread enters KVM_RUN; the CPU counts as present from its
        # registration, so the guest's _STA sees it; a pause or stop meanwhile is honoured
        # by _launch.
        def after_answer() -> None:
            for thread in launch:
                self._launch(thread, self._starter)
            self.notify(AcpiNotification.CPU)
        self.start_later(after_answer)
        return True

    def check_resize(self, desired: int) -> bool:
        """What :meth:`resize` would refuse, without doing anything: returns whether there
        is anything to do, raises as :meth:`resize` does."""
        if not 1 <= desired <= self.max_vcpus:
            raise ValueError(f"desired vCPUs ({desired}) must be between 1 and max "
                             f"({self.max_vcpus})")
        if desired == self.requested_vcpus:
            return False
        if self.hotplug_controller.removal_pending():
            raise VcpuRemovalPending("a vCPU removal is still pending: the guest has not "
                                     "ejected every vCPU being removed yet; retry later")
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
        self._launch(self._register_thread(cpu_id), None)

    def _register_thread(self, cpu_id: int) -> VcpuThread:
        """vCPU ``cpu_id``'s thread, counted as running (the guest sees the CPU present)
        but not started yet (:meth:`_launch`)."""
        t = VcpuThread(self.vcpus[cpu_id], self.pio, self.mmio, self.on_exit,
                       host_cpus=self.affinity.get(cpu_id))
        with self._lock:
            self.threads[cpu_id] = t
        return t

    def _launch(self, t: VcpuThread, starter: ThreadStarter | None) -> None:
        with self._lock:
            if self.threads.get(t.index) is t:      # not stopped meanwhile
                t.start(paused=self._paused, starter=starter)

    def _ready_starter(self) -> None:
        if self._starter is not None:
            self._starter.ready()

    def start(self) -> None:
        for cpu_id in range(self.boot_vcpus):
            self._start_thread(cpu_id)
        self._ready_starter()

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
        if self._starter is not None:
            self._starter.close()
        self.stop()
        for vcpu in self.vcpus:
            vcpu.close()
        self.vcpus.clear()
