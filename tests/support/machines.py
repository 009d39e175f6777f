"""pych's managers on the fakes of :mod:`tests.support.fakes`, standing in for a booted VM.

* :class:`DeviceManagerMachine`: a DeviceManager with its boot devices, on guest RAM, MMIO and
  PIO buses and fake KVM objects, plus the guest's side of the PCI hot plug registers (PHPR)
  played through the MMIO bus as the AML does it: ``PCNT`` reads PCIU and PCID
  (:meth:`~DeviceManagerMachine.scan`), ``PCEJ`` writes PSEG then B0EJ
  (:meth:`~DeviceManagerMachine.eject`).
* :class:`BootedVm`: what the Vmm uses of a booted ``pych.vm.Vm``, around whichever of a
  CpuManager, a MemoryManager and a DeviceManagerMachine a test built;
  :func:`run_as_booted` hands it to a Vmm as ``vm.boot`` would, :func:`boot_fake` does that
  with a DeviceManagerMachine for the Vmm's configuration.
"""

from __future__ import annotations

from collections.abc import Iterable

from pych.arch.x86_64 import layout
from pych.config import VmConfig
from pych.device_manager.manager import DeviceManager
from pych.devices.acpi import AcpiNotification
from pych.devices.bus import Bus
from pych.devices.pci.config import COMMAND, Command
from pych.memory.guest_memory import GuestMemory
from pych.vmm import VmState

from tests.support.fakes import FakeMsiInterruptManager, RecordingIoEvents, RecordingIrq

MiB = 1 << 20
MMIO64 = (1 << 40, 1 << 32)             # the 64-bit device window: (base, size)
PHPR = layout.ACPI_PCI_HOTPLUG_ADDR
PCIU, PCID, B0EJ, PSEG = (PHPR + offset for offset in (0x0, 0x4, 0x8, 0xC))


def vm_config(**fields) -> VmConfig:
    """A VM configuration like the test guest's (--console off, so the rng holds slot 1),
    with ``fields`` added."""
    return VmConfig.model_validate({"payload": {"kernel": __file__},
                                    "console": {"mode": "Off"}, **fields})


class DeviceManagerMachine:
    """A DeviceManager on fake KVM objects (MSI-X vectors, ioeventfds, interrupt lines; given,
    memory slots, a VFIO kernel and the VMM's kept vhost-user connections), its boot devices
    created, with the guest's view of the PHPR registers. ``notified`` lists the GED
    notifications the device manager raised."""

    def __init__(self, config: VmConfig, *, ram: Iterable[tuple[int, int]] = ((0, 8 * MiB),),
                 msi=None, memslots=None, vfio_kernel=None, vhost_user=None,
                 mmio64: tuple[int, int] = MMIO64):
        self.mem = GuestMemory.from_ranges(list(ram))
        self.mmio, self.pio = Bus("mmio"), Bus("pio")
        self.msi = FakeMsiInterruptManager() if msi is None else msi
        self.ioevents = RecordingIoEvents()
        self.memslots = memslots
        self.notified: list[AcpiNotification] = []
        self.dm = None
        try:
            self.dm = DeviceManager(config, self.mem, self.mmio, self.pio, msi=self.msi,
                                    ioevents=self.ioevents, irq_line=lambda gsi: RecordingIrq(),
                                    mmio64=mmio64, notify=self.notified.append,
                                    memslots=memslots, vhost_user=vhost_user)
            if vfio_kernel is not None:
                self.dm.vfio_kernel = vfio_kernel
            self.dm.create_boot_devices()
        except BaseException:
            # A machine that cannot be built (a probe run with a field dropped) leaves
            # nothing open: its RAM's memfds would otherwise wait for the garbage collector
            # and vanish from a later test's fd-table comparison.
            self.close()
            raise

    def scan(self, segment: int = 0) -> tuple[int, int]:
        """What the guest's PCNT of ``segment`` reads: (PCIU, PCID)."""
        self.mmio.write(PSEG, 4, segment)
        return self.mmio.read(PCIU, 4), self.mmio.read(PCID, 4)

    def enable_decoding(self, slot: int) -> None:
        """The guest driver turns memory decoding on: BARs map, ioeventfds register."""
        self.dm.pci.config_write(slot, 0, COMMAND, 2, Command.MEMORY_SPACE)

    def eject(self, slot: int, segment: int = 0) -> None:
        """The guest's _EJ0 -> PCEJ(slot, segment)."""
        self.mmio.write(PSEG, 4, segment)
        self.mmio.write(B0EJ, 4, 1 << slot)

    def close(self) -> None:
        if self.dm is not None:
            self.dm.close()
        self.mem.close()


class BootedVm:
    """What the Vmm uses of a booted ``pych.vm.Vm``, around the parts a test built: ``cpus``
    (a CpuManager), ``memory`` (a MemoryManager), ``machine`` (a DeviceManagerMachine, which
    gives ``devices`` and ``guest_memory``). A part not given is None, as in a VM without it.
    There is no KVM VM handle (``kvm_vm``), so ``vm.info`` reports no memslots."""

    kvm_vm = memslots_in_use = None

    def __init__(self, *, cpus=None, memory=None, machine: DeviceManagerMachine | None = None,
                 memory_actual_size: int = 0):
        self.cpus, self.memory, self.machine = cpus, memory, machine
        self.devices = machine.dm if machine else None
        self.guest_memory = machine.mem if machine else None
        self._memory_actual_size = memory_actual_size

    @property
    def memory_actual_size(self) -> int:
        """The memory manager's, or ``memory_actual_size`` as given without one."""
        return self.memory.actual_size if self.memory else self._memory_actual_size

    def resize_vcpus(self, desired: int) -> bool:
        return self.cpus.resize(desired)

    def close(self, *, keep_connections: bool = False) -> None:
        """Close the parts (the Vmm does when the VM shuts down or is deleted)."""
        if self.machine is not None:
            self.machine.close()
        if self.memory is not None:
            self.memory.close()


def run_as_booted(vmm, vm: BootedVm) -> BootedVm:
    """Make ``vm`` the VM ``vmm`` runs, as ``vm.boot`` does once it has built one."""
    vmm.vm, vmm.state = vm, VmState.Running
    return vm


def boot_fake(vmm, machine: DeviceManagerMachine | None = None) -> DeviceManagerMachine:
    """Run ``machine`` (by default a DeviceManagerMachine for ``vmm.config``) as the VM
    ``vmm`` booted, with the configuration's RAM size; returns the machine."""
    machine = machine or DeviceManagerMachine(vmm.config)
    run_as_booted(vmm, BootedVm(machine=machine, memory_actual_size=vmm.config.memory.size))
    return machine
