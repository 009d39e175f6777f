"""One boot of a virtual machine, assembled from a VmConfig.

``Vm`` owns the KVM VM fd, guest memory, buses, devices and vCPUs of a single boot. A
guest reboot throws the whole object away and the VMM builds a new one from the
configuration as it is *then*, which is how every hot plug change survives a reboot.
"""

from __future__ import annotations

import logging
import threading
from typing import Callable

from pych.acpi import tables as acpi_tables
from pych.arch.x86_64 import boot, layout, loader
from pych.arch.x86_64.cpuid import Topology
from pych.cpu import CpuManager
from pych.device_manager import DeviceManager
from pych.devices import acpi as acpi_devices
from pych.devices.bus import Bus
from pych.devices.vhost_user import VhostUserConnections
from pych.devices.legacy.cmos import Cmos
from pych.devices.legacy.debug_port import DebugPort
from pych.devices.legacy.i8042 import I8042
from pych.devices.legacy.serial import Serial
from pych.hypervisor.kvm import Kvm
from pych.hypervisor.kvm.interrupts import KvmMsiInterruptManager
from pych.memory import GuestMemory
from pych.memory_manager import MemoryManager

log = logging.getLogger(__name__)

TSS_ADDRESS = 0xFFFB_D000
MSI_DELIVERY_NMI = 0b100 << 8
IDENTITY_MAP_ADDRESS = 0xFFFB_C000


class VmError(Exception):
    pass


class KvmIrqLine:
    """An IOAPIC pin of the in-kernel irqchip."""

    def __init__(self, vm, gsi: int):
        self._vm = vm
        self.gsi = gsi

    def set_level(self, level: bool) -> None:
        self._vm.irq_line(self.gsi, level)

    def pulse(self) -> None:
        self._vm.irq_line(self.gsi, True)
        self._vm.irq_line(self.gsi, False)


class Vm:
    """A booted (or bootable) VM. ``on_exit(kind, detail)`` is called from a vCPU or device
    thread when the guest powers off ("poweroff"), resets ("reset") or fails ("error")."""

    def __init__(self, config, kvm: Kvm, *, on_exit: Callable[[str, str], None],
                 serial_port=None, vhost_user: VhostUserConnections | None = None):
        self.config = config
        self.kvm = kvm
        self.on_exit = on_exit
        self.serial_port = serial_port      # host side of --serial, outlives reboots
        self.vhost_user = vhost_user        # vhost-user connections, outlive reboots
        self._exit_once = threading.Lock()
        self._exited = False
        self.state = "Created"
        self.vm = None
        self.mem: GuestMemory | None = None
        self.memory: MemoryManager | None = None
        self.cpus: CpuManager | None = None
        self.devices: DeviceManager | None = None
        self.pio = Bus("pio")
        self.mmio = Bus("mmio")

    # --- guest-initiated exits ------------------------------------------------------------
    def _guest_exit(self, kind: str, detail: str = "") -> None:
        with self._exit_once:
            if self._exited:
                return
            self._exited = True
        self.on_exit(kind, detail)

    # --- assembly -----------------------------------------------------------------------------
    def boot(self) -> None:
        cfg = self.config
        try:
            self.vm = self.kvm.create_vm()
            self.vm.set_tss_address(TSS_ADDRESS)
            self.vm.set_identity_map_address(IDENTITY_MAP_ADDRESS)
            self.vm.disable_halt_polling()
            self.vm.create_irqchip()
            self.vm.create_pit2()
            self.ged = acpi_devices.AcpiGedDevice(KvmIrqLine(self.vm, layout.GED_IRQ),
                                                  layout.ACPI_GED_ADDR)
            self.mmio.insert(layout.ACPI_GED_ADDR, 1, self.ged)
            self.memory = MemoryManager(cfg.memory, self.vm, self.mmio, notify=self.ged.notify)
            self.mem = self.memory.create_boot_memory()
            self._create_legacy_devices()
            self.mmio64 = layout.mmio64_window(*self.memory.hotplug_window)
            self.devices = DeviceManager(
                cfg, self.mem, self.mmio, self.pio, msi=KvmMsiInterruptManager(self.vm),
                ioevents=self.vm, memslots=self.vm, irq_line=lambda gsi: KvmIrqLine(self.vm, gsi),
                mmio64=self.mmio64, notify=self.ged.notify,
                virtio_mem=self.memory.virtio_mem_zones, dma_ranges=self.memory.dma_ranges,
                vhost_user=self.vhost_user)
            self.devices.create_boot_devices()
            self.memory.add_region_listener(self.devices.memory_region_added,
                                            self.devices.memory_region_removed)
            self.memory.add_block_listener(self.devices.dma_map, self.devices.dma_unmap)
            topo = cfg.cpus.topology
            self.cpus = CpuManager(
                self.kvm, self.vm, self.pio, self.mmio,
                boot_vcpus=cfg.cpus.boot_vcpus, max_vcpus=cfg.cpus.max_vcpus,
                topology=Topology(topo.threads_per_core, topo.cores_per_die,
                                  topo.dies_per_package, topo.packages) if topo else None,
                on_exit=self._guest_exit, notify=self.ged.notify)
            kernel = self._load_payload()
            self.cpus.create_boot_vcpus(kernel)
            self.cpus.start()
            self.state = "Running"
        except Exception:
            self.close()
            raise

    def _create_legacy_devices(self) -> None:
        irq4 = KvmIrqLine(self.vm, layout.SERIAL_IRQ)
        if self.serial_port is not None:
            self.serial = Serial(irq4, self.serial_port.write)
            self.serial_port.attach(self.serial)
            self.pio.insert(layout.COM1_PORT, 8, self.serial)
        else:
            self.serial = None
        self.pio.insert(layout.I8042_PORT, 5, I8042(on_reset=lambda: self._guest_exit("reset")))
        below, above = self._memory_split()
        self.pio.insert(layout.CMOS_PORT, 2, Cmos(below, above))
        self.pio.insert(layout.DEBUG_PORT, 1, DebugPort())
        self.pio.insert(layout.ACPI_SHUTDOWN_PORT, 8, acpi_devices.AcpiShutdownDevice(
            on_reset=lambda: self._guest_exit("reset"),
            on_poweroff=lambda: self._guest_exit("poweroff")))
        self.pio.insert(layout.ACPI_PM_TIMER_PORT, 4, acpi_devices.AcpiPmTimer())

    def _memory_split(self) -> tuple[int, int]:
        ram = [r for r in self.mem.regions if r.name.startswith("ram")]    # boot RAM only
        below = sum(r.size for r in ram if r.end <= layout.MEM_32BIT_RESERVED_START)
        return below, sum(r.size for r in ram) - below

    def _load_payload(self) -> loader.LoadedKernel:
        payload = self.config.payload
        if payload is None or not payload.kernel:
            raise VmError("no kernel to boot (give --kernel, or a payload in vm.create)")
        kernel = loader.load_kernel(self.mem, payload.kernel)
        initramfs = loader.load_initramfs(self.mem, payload.initramfs, kernel) if payload.initramfs else None
        rsdp = acpi_tables.create_acpi_tables(
            self.mem, dsdt_body=self._dsdt_body(), boot_vcpus=self.cpus.boot_vcpus,
            max_vcpus=self.cpus.max_vcpus, apic_id=self.cpus.apic_id)
        boot.write_boot_info(self.mem, kernel, payload.cmdline or "", initramfs, rsdp)
        if kernel.protocol == "linux64":
            boot.write_identity_page_tables(self.mem)
            boot.write_gdt(self.mem, boot.GDT_64)
        else:
            boot.write_gdt(self.mem, boot.GDT_PVH)
        return kernel

    def _dsdt_body(self) -> bytes:
        """The DSDT in the reference's order: device manager (PCI hot plug controller, host
        bridge, ECAM reservation), COM1, S5, power button, GED, then the CPU and memory
        managers' AML."""
        pieces = [self.devices.aml()]
        if self.serial is not None:
            pieces.append(acpi_devices.com1_aml())
        pieces += [acpi_devices.s5_aml(), acpi_devices.power_button_aml(), self.ged,
                   self.cpus.aml(), self.memory.aml()]
        return acpi_devices.build_dsdt_body(*pieces)

    # --- hot plug (VMM thread) ------------------------------------------------------------------
    def resize_vcpus(self, desired: int) -> bool:
        """Hot plug or unplug vCPUs; returns whether anything changed (see CpuManager)."""
        return self.cpus.resize(desired)

    def resize_memory(self, desired: int) -> bool:
        """Ask for ``desired`` bytes of RAM: one more ACPI DIMM, or a new virtio-mem requested
        size; False when nothing changes (see MemoryManager.resize for the errors)."""
        return self.memory.resize(desired)

    def resize_memory_zone(self, zone_id: str, desired: int) -> bool:
        """Ask for ``desired`` bytes of RAM in the user-defined zone ``zone_id`` (its
        virtio-mem device's requested size); False when nothing changes (see
        MemoryManager.resize_zone for the errors)."""
        return self.memory.resize_zone(zone_id, desired)

    # --- control (VMM thread) -------------------------------------------------------------------
    def pause(self) -> None:
        """Park every vCPU and freeze guest time: kvmclock and each vCPU's TSC are saved
        here and written back on resume, so the guest's clocks do not jump."""
        self.cpus.pause()
        self._paused_clock = self.vm.get_clock()
        self._paused_tsc = {i: self.cpus.vcpus[i].get_msrs([boot.MSR_IA32_TSC])[boot.MSR_IA32_TSC]
                            for i in self.cpus.threads}
        self.state = "Paused"

    def resume(self) -> None:
        self.vm.set_clock(self._paused_clock)
        for i, tsc in self._paused_tsc.items():
            self.cpus.vcpus[i].set_msrs({boot.MSR_IA32_TSC: tsc})
        self.cpus.resume()
        self.state = "Running"

    def nmi(self) -> None:
        """An NMI to every running vCPU, sent as an MSI with NMI delivery mode through the
        in-kernel LAPICs (a vCPU ioctl would wait for a halted vCPU to leave KVM_RUN)."""
        for cpu_id in self.cpus.threads:
            self.vm.signal_msi(layout.APIC_START | (self.cpus.apic_id(cpu_id) << 12),
                               MSI_DELIVERY_NMI)

    def power_button(self) -> None:
        self.ged.notify(acpi_devices.AcpiNotification.POWER_BUTTON)

    @property
    def memory_actual_size(self) -> int:
        return self.memory.actual_size if self.memory else self.config.memory.size

    def close(self, *, keep_connections: bool = False) -> None:
        """Stop the vCPUs and release every resource of this boot. ``keep_connections``: the
        VM is being rebuilt (a reboot), so vhost-user devices park their back-end
        connections in ``vhost_user`` for the next boot instead of hanging up."""
        if self.cpus is not None:
            self.cpus.close()
            self.cpus = None
        if self.devices is not None:
            self.devices.close(keep_connections=keep_connections)
            self.devices = None
        if self.serial_port is not None:
            self.serial_port.detach()
        if self.vm is not None:
            self.vm.close()
            self.vm = None
        if self.memory is not None:
            self.memory.close()
            self.memory = None
            self.mem = None
        self.state = "Shutdown"
