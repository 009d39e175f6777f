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
from pych.arch.x86_64 import boot, layout, loader, mptable, smbios
from pych.arch.x86_64.cpuid import Topology
from pych.cpu.manager import CpuManager
from pych.device_manager.manager import DeviceManager
from pych.devices import acpi as acpi_devices
from pych.devices.bus import Bus
from pych.devices.legacy.cmos import Cmos
from pych.devices.legacy.debug_port import DebugPort
from pych.devices.legacy.i8042 import I8042
from pych.devices.legacy.serial import Serial
from pych.devices.vhost_user import VhostUserConnections
from pych.hypervisor.kvm import Kvm
from pych.hypervisor.kvm import Vm as KvmVm
from pych.hypervisor.kvm.interrupts import KvmIrqLine, KvmMsiInterruptManager
from pych.memory.guest_memory import GuestMemory
from pych.memory.manager import MemoryManager

log = logging.getLogger(__name__)


class VmError(Exception):
    pass


class Vm:
    """A booted (or bootable) VM. ``on_exit(kind, detail)`` is called from a vCPU or device
    thread when the guest powers off ("poweroff"), resets ("reset") or fails ("error")."""

    def __init__(self, config, kvm: Kvm, *, on_exit: Callable[[str, str], None],
                 serial_port=None, vhost_user: VhostUserConnections | None = None,
                 on_guest_event: Callable[[str], None] | None = None,
                 on_device_failed: Callable[[str, str], None] | None = None,
                 after_answer: Callable[[Callable[[], None]], None] | None = None):
        self.config = config
        # how work a request sets going but need not wait for is run (the VMM's: once the
        # request is answered; by default at once)
        self.after_answer = after_answer or (lambda fn: fn())
        self.on_device_failed = on_device_failed   # (id, why): a device's back-end is gone
        self.kvm = kvm
        self.on_exit = on_exit
        self.serial_port = serial_port      # host side of --serial, outlives reboots
        self.vhost_user = vhost_user        # vhost-user connections, outlive reboots
        self.on_guest_event = on_guest_event  # pvpanic's events ("panic"), from a vCPU thread
        self._exit_once = threading.Lock()
        self._exited = False
        self.kvm_vm: KvmVm | None = None        # the KVM VM fd of this boot
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
        """Build the VM from its configuration, load the payload and start the vCPUs."""
        try:
            self._assemble(None)
            kernel = self._load_payload()
            self.cpus.create_boot_vcpus(kernel)
            self.cpus.start()
        except Exception:
            self.close()
            raise

    def restore(self, saved: dict, load_memory: Callable[[GuestMemory], None]) -> None:
        """Build the VM a snapshot's ``saved`` state (:meth:`state`) describes, from the
        snapshot's configuration: RAM as it was (boot RAM, DIMMs), its contents from
        ``load_memory``, the vCPUs', irqchip's and PIT's state, every device at its slot
        with its state, and the bus devices'. The VM is paused: :meth:`resume` continues
        the guest with its clock and TSCs where they stopped."""
        try:
            self._assemble(saved)
            load_memory(self.guest_memory)
            self._restore_state(saved)
        except Exception:
            self.close()
            raise

    # --- live migration: RAM first, the rest once the sender paused (pych.migration) --------
    def prepare_incoming(self, layout: dict, fds: dict[str, int] | None = None) -> None:
        """The KVM VM and guest RAM laid out as the sender's (``layout["memory"]``, its
        :meth:`MemoryManager.save_state`), to receive its contents; ``fds`` (a local
        migration): map the sender's own memfds (region or zone name to fd, taken over)."""
        try:
            self._assemble_memory(layout, fds)
        except Exception:
            self.close()
            raise

    def finish_incoming(self, saved: dict, taps: dict[str, list[int]] | None = None,
                        vhost_user: dict | None = None) -> None:
        """After :meth:`prepare_incoming` and the RAM: the devices at their slots, the vCPUs,
        and everyone's state, as :meth:`restore` does; the VM stays paused. ``taps`` (a
        local migration): net id -> the tap queue fds the sender passed (taken over);
        ``vhost_user``: device id -> the vhost-user connection the sender handed over
        (an ``AdoptedBackend``, taken over: the device adopts it; one no device took is
        left in the dict for the caller)."""
        try:
            self._assemble_devices(saved, taps, vhost_user)
            self._restore_state(saved)
        except Exception:
            self.close()
            raise

    def _restore_state(self, saved: dict) -> None:
        """The vCPUs', irqchip's, PIT's, devices' and bus devices' state of ``saved``."""
        # vCPUs (LAPICs) and the irqchip first: a device restarting its queues may
        # interrupt the guest at once, and that must not be overwritten.
        self.cpus.restore_state(saved["cpus"])
        for chip in saved["irqchip"]:
            self.kvm_vm.set_irqchip(bytes.fromhex(chip))
        self.kvm_vm.set_pit2(bytes.fromhex(saved["pit"]))
        self.devices.restore_state(saved["devices"])
        devices = self._bus_devices()
        if set(devices) != set(saved["bus"]):
            raise VmError("the snapshot's platform devices are not this VM's: "
                          f"{sorted(set(devices) ^ set(saved['bus']))}")
        for key, device in devices.items():
            device.restore_state(saved["bus"][key])
        self._paused_clock = saved["clock"]
        self._paused_tsc = {int(i): tsc for i, tsc in saved["tsc"].items()}

    def save_state(self, *, local_migration: bool = False) -> dict:
        """The VM's state for a snapshot (``local_migration``: for a local migration's
        receiver, which adopts the vhost-user connections); the VM must be paused (:meth:`pause`). The guest
        clock and TSCs are the ones :meth:`pause` froze; every bus device with a
        ``state()`` (serial, CMOS, GED, the CPU, memory and PCI hot plug register blocks) is
        found by walking the buses, every PCI device by the device manager."""
        kvm_vm = self.kvm_vm
        return {
            "clock": self._paused_clock,
            "tsc": {str(i): tsc for i, tsc in self._paused_tsc.items()},
            "irqchip": [kvm_vm.get_irqchip(chip).hex() for chip in (0, 1, 2)],
            "pit": kvm_vm.get_pit2().hex(),
            "memory": self.memory.save_state(),
            "cpus": self.cpus.save_state(),
            "devices": self.devices.save_state(local_migration=local_migration),
            "bus": {key: device.save_state() for key, device in self._bus_devices().items()},
        }

    def _bus_devices(self) -> dict:
        """Every device on the port and MMIO buses that keeps state, by bus and address."""
        return {f"{bus.name}@{base:#x}": device
                for bus in (self.pio, self.mmio) for base, _, device in bus
                if callable(getattr(device, "save_state", None))}

    def _assemble(self, saved: dict | None) -> None:
        """The KVM VM, memory, platform and PCI devices and the CPU manager: from the
        configuration (a boot), or as the snapshot state ``saved`` has them (a restore)."""
        self._assemble_memory(saved)
        self._assemble_devices(saved)

    def _assemble_memory(self, saved: dict | None, fds: dict[str, int] | None = None) -> None:
        cfg = self.config
        kvm_vm = self.kvm_vm = self.kvm.create_vm()
        kvm_vm.set_tss_address(layout.TSS_ADDRESS)
        kvm_vm.set_identity_map_address(layout.IDENTITY_MAP_ADDRESS)
        kvm_vm.disable_halt_polling()
        kvm_vm.create_irqchip()
        kvm_vm.create_pit2()
        self.ged = acpi_devices.AcpiGedDevice(KvmIrqLine(kvm_vm, layout.GED_IRQ),
                                              layout.ACPI_GED_ADDR)
        self.mmio.insert(layout.ACPI_GED_ADDR, 1, self.ged)
        self.memory = MemoryManager(cfg.memory, kvm_vm, self.mmio, notify=self.ged.notify)
        if saved is None:
            self.memory.create_boot_memory()
        else:
            self.memory.restore_state(saved["memory"], fds)

    def _assemble_devices(self, saved: dict | None,
                          taps: dict[str, list[int]] | None = None,
                          vhost_user: dict | None = None) -> None:
        cfg, kvm_vm = self.config, self.kvm_vm
        self._create_legacy_devices()
        self.mmio64 = layout.mmio64_window(*self.memory.hotplug_window)
        self.devices = DeviceManager(
            cfg, self.guest_memory, self.mmio, self.pio, msi=KvmMsiInterruptManager(kvm_vm),
            ioevents=kvm_vm, memslots=kvm_vm, irq_line=lambda gsi: KvmIrqLine(kvm_vm, gsi),
            mmio64=self.mmio64, notify=self.ged.notify,
            virtio_mem=self.memory.virtio_mem_zones, dma_ranges=self.memory.dma_ranges,
            vhost_user=self.vhost_user, on_guest_event=self.on_guest_event,
            on_device_failed=self.on_device_failed,
            restore_slots=saved["devices"]["slots"] if saved is not None else None,
            adopt_taps=taps, adopt_vhost_user=vhost_user)
        self.devices.create_boot_devices()
        self.memory.add_region_listener(self.devices.memory_region_added,
                                        self.devices.memory_region_removed)
        self.memory.add_block_listener(self.devices.dma_map, self.devices.dma_unmap)
        topo = cfg.cpus.topology
        self.cpus = CpuManager(
            self.kvm, kvm_vm, self.pio, self.mmio,
            boot_vcpus=cfg.cpus.boot_vcpus, max_vcpus=cfg.cpus.max_vcpus,
            topology=Topology(topo.threads_per_core, topo.cores_per_die,
                              topo.dies_per_package, topo.packages) if topo else None,
            on_exit=self._guest_exit, notify=self.ged.notify,
            affinity=cfg.cpus.affinity_map(), start_later=self.after_answer)

    def _create_legacy_devices(self) -> None:
        irq4 = KvmIrqLine(self.kvm_vm, layout.SERIAL_IRQ)
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
        ram = [r for r in self.guest_memory.regions if r.name.startswith("ram")]   # boot RAM
        below = sum(r.size for r in ram if r.end <= layout.MEM_32BIT_RESERVED_START)
        return below, sum(r.size for r in ram) - below

    def _load_payload(self) -> loader.LoadedKernel:
        payload = self.config.payload
        if payload is None or not payload.kernel:
            raise VmError("no kernel to boot (give --kernel, or a payload in vm.create)")
        mem = self.guest_memory
        kernel = loader.load_kernel(mem, payload.kernel)
        initramfs = (loader.load_initramfs(mem, payload.initramfs, kernel) if payload.initramfs
                     else None)
        rsdp = acpi_tables.create_acpi_tables(
            mem, dsdt_body=self._dsdt_body(), boot_vcpus=self.cpus.boot_vcpus,
            max_vcpus=self.cpus.max_vcpus, apic_id=self.cpus.apic_id,
            pci_segments=len(self.devices.segments))
        boot.write_boot_info(mem, kernel, payload.cmdline or "", initramfs, rsdp)
        smbios.write_smbios(mem, smbios.SmbiosStrings.from_platform(self.config.platform))
        mptable.write_mptable(mem, self.cpus.boot_vcpus, self.cpus.apic_id)
        if kernel.protocol == "linux64":
            boot.write_identity_page_tables(mem)
            boot.write_gdt(mem, boot.GDT_64)
        else:
            boot.write_gdt(mem, boot.GDT_PVH)
        return kernel

    def _dsdt_body(self) -> bytes:
        """The DSDT in the reference's order: device manager (PCI hot plug controller, host
        bridge, ECAM reservation), COM1, S5, power button, GED, then the CPU and memory
        managers' AML. Every piece is an :class:`~pych.acpi.aml.Aml`."""
        pieces = [self.devices]
        if self.serial is not None:
            pieces.append(acpi_devices.com1_aml())
        pieces += [acpi_devices.s5_aml(), acpi_devices.power_button_aml(), self.ged,
                   self.cpus, self.memory]
        return acpi_devices.build_dsdt_body(*pieces)

    # --- hot plug (VMM thread) ------------------------------------------------------------------
    def resize_vcpus(self, desired: int) -> bool:
        """Hot plug or unplug vCPUs; returns whether anything changed (see CpuManager)."""
        return self.cpus.resize(desired)

    # --- control (VMM thread) -------------------------------------------------------------------
    def pause(self) -> None:
        """Park every vCPU and freeze guest time: kvmclock and each vCPU's TSC are saved
        here and written back on resume, so the guest's clocks do not jump."""
        self.cpus.pause()
        self._paused_clock = self.kvm_vm.get_clock()
        self._paused_tsc = {i: self.cpus.vcpus[i].get_msrs([boot.MSR_IA32_TSC])[boot.MSR_IA32_TSC]
                            for i in self.cpus.threads}

    def resume(self) -> None:
        self.kvm_vm.set_clock(self._paused_clock)
        for i, tsc in self._paused_tsc.items():
            self.cpus.vcpus[i].set_msrs({boot.MSR_IA32_TSC: tsc})
        self.cpus.resume()

    def nmi(self) -> None:
        """An NMI to every running vCPU, sent as an MSI with NMI delivery mode through the
        in-kernel LAPICs (a vCPU ioctl would wait for a halted vCPU to leave KVM_RUN)."""
        for cpu_id in self.cpus.threads:
            self.kvm_vm.signal_msi(layout.APIC_START | (self.cpus.apic_id(cpu_id) << 12),
                                   layout.MSI_DELIVERY_NMI)

    def power_button(self) -> None:
        self.ged.notify(acpi_devices.AcpiNotification.POWER_BUTTON)

    @property
    def guest_memory(self) -> GuestMemory | None:
        """Guest RAM of this boot (the memory manager's), None before boot or after close."""
        return self.memory.guest_memory if self.memory is not None else None

    @property
    def memory_actual_size(self) -> int:
        return self.memory.actual_size if self.memory else self.config.memory.size

    @property
    def memslots_in_use(self) -> int | None:
        """KVM memory slots this boot has registered (boot RAM, DIMMs, virtio-mem, pmem, VFIO
        BARs), as counted by the KVM VM; None when there is no KVM VM (before boot, after
        close)."""
        return self.kvm_vm.memslots_in_use if self.kvm_vm is not None else None

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
        if self.kvm_vm is not None:
            self.kvm_vm.close()
            self.kvm_vm = None
        if self.memory is not None:
            self.memory.close()
            self.memory = None
