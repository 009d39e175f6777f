"""The CPU manager: creates, configures and runs the vCPUs of one VM.

It owns every vCPU of the VM. KVM vCPU fds are never destroyed while the VM lives
(re-creating one fails with EEXIST), so a vCPU removed later is parked and reused.
"""

from __future__ import annotations

import logging
from typing import Callable

from pych.acpi.aml import Aml
from pych.arch.x86_64 import boot
from pych.arch.x86_64.cpuid import Topology, shape_cpuid
from pych.arch.x86_64.loader import LoadedKernel
from pych.devices import acpi as acpi_devices
from pych.devices.bus import Bus
from pych.hypervisor.kvm import Kvm, Vcpu, Vm
from pych.vcpu import VcpuThread

log = logging.getLogger(__name__)


class CpuManager:
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

    def apic_id(self, cpu_id: int) -> int:
        return self.topology.apic_id(cpu_id)

    def _create_vcpu(self, cpu_id: int) -> Vcpu:
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
        return acpi_devices.cpu_hotplug_stub_aml()

    def resize(self, desired: int) -> bool:
        raise NotImplementedError("CPU hot plug is not implemented yet")

    def start(self) -> None:
        for vcpu in self.vcpus[:self.boot_vcpus]:
            t = VcpuThread(vcpu, self.pio, self.mmio, self.on_exit)
            self.threads[vcpu.index] = t
            t.start()

    def pause(self) -> None:
        for t in self.threads.values():
            t.pause()

    def resume(self) -> None:
        for t in self.threads.values():
            t.resume()

    def stop(self) -> None:
        for t in self.threads.values():
            t.stop()
        self.threads.clear()

    def close(self) -> None:
        self.stop()
        for vcpu in self.vcpus:
            vcpu.close()
        self.vcpus.clear()

    @property
    def exit_counts(self) -> dict[int, int]:
        return {i: t.exits for i, t in self.threads.items()}
