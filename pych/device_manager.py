"""The device manager: the PCI segment, its devices, their ids and the device tree.

It creates the boot devices from the configuration in the reference's order (console,
disks, nets, rng, ...), so slots and default ids match Cloud Hypervisor's, and it fills
generated ids back into the configuration, so a reboot re-creates the same devices.
Devices get guest memory, MSI and ioeventfd objects injected; none sees the VM.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass, field

from pych.acpi.aml import Aml, Sequence
from pych.arch.x86_64 import layout
from pych.devices import acpi as acpi_devices
from pych.devices.bus import Bus
from pych.devices.pci.allocator import AddressAllocator
from pych.devices.pci.bus import PciBus, bdf
from pych.devices.pci.config_io import PciConfigIo
from pych.devices.pci.ecam import PciEcam
from pych.devices.virtio.block import VirtioBlock
from pych.devices.virtio.device import VirtioDevice
from pych.devices.virtio.pci_transport import VirtioPciDevice
from pych.devices.virtio.rng import VirtioRng
from pych.memory import GuestMemory

log = logging.getLogger(__name__)

RNG_ID = "__rng"
CONSOLE_ID = "__console"


@dataclass
class DeviceNode:
    """One entry of ``vm.info``'s device tree."""
    id: str
    pci_bdf: str | None = None
    parent: str | None = None
    children: list[str] = field(default_factory=list)
    resources: list[dict] = field(default_factory=list)

    def to_json(self) -> dict:
        out = {"id": self.id, "resources": self.resources, "children": self.children}
        if self.parent is not None:
            out["parent"] = self.parent
        if self.pci_bdf is not None:
            out["pci_bdf"] = self.pci_bdf
        return out


class DeviceManager:
    def __init__(self, config, mem: GuestMemory, mmio: Bus, pio: Bus, *, msi, ioevents,
                 irq_line, mmio64: tuple[int, int], notify):
        self.config = config
        self.mem = mem
        self.msi = msi
        self.ioevents = ioevents
        self.irq_line = irq_line          # gsi -> IrqLine
        self.notify = notify              # GED notification (AcpiNotification.PCI)
        self.mmio64 = mmio64
        self.pci = PciBus(0, mmio_bus=mmio,
                          mem32=AddressAllocator(layout.MEM_32BIT_DEVICES_START,
                                                 layout.MEM_32BIT_DEVICES_SIZE, "mmio32"),
                          mem64=AddressAllocator(*mmio64, "mmio64"))
        pio.insert(layout.PCI_CONFIG_IO_PORT, layout.PCI_CONFIG_IO_PORT_SIZE, PciConfigIo(self.pci))
        mmio.insert(layout.PCI_MMCONFIG_START, layout.PCI_MMIO_CONFIG_SIZE_PER_SEGMENT, PciEcam(self.pci))
        self.tree: dict[str, DeviceNode] = {}
        self.devices: dict[str, VirtioPciDevice] = {}
        self._id_counter = 0

    # --- ids -------------------------------------------------------------------------------------
    def _ids_in_use(self) -> set[str]:
        return set(self.config.validate()) | set(self.tree)

    def next_device_name(self, prefix: str) -> str:
        """The reference's rule: one counter shared by every prefix, skipping used names."""
        used = self._ids_in_use()
        while True:
            name = f"{prefix}{self._id_counter}"
            self._id_counter += 1
            if name not in used:
                return name

    # --- boot devices -------------------------------------------------------------------------------
    def create_boot_devices(self) -> None:
        cfg = self.config
        for disk in cfg.disks or []:
            if disk.id is None:
                disk.id = self.next_device_name("_disk")
            self.add_virtio(disk.id, self._make_disk(disk), disk.pci_device_id, use_64bit_bar=False)
        if cfg.rng is not None:
            self.add_virtio(RNG_ID, VirtioRng(cfg.rng.src), cfg.rng.pci_device_id)

    def _make_disk(self, disk) -> VirtioBlock:
        if not disk.path:
            raise ValueError("a disk needs a path")
        return VirtioBlock(disk.path, readonly=disk.readonly, serial=disk.serial,
                           num_queues=disk.num_queues, queue_size=disk.queue_size, name=disk.id)

    # --- PCI ---------------------------------------------------------------------------------------
    def add_virtio(self, dev_id: str, device: VirtioDevice, slot: int | None = None, *,
                   use_64bit_bar: bool = True) -> str:
        """Put ``device`` on the PCI bus behind a virtio-pci transport; returns its BDF."""
        pci_dev = VirtioPciDevice(device, self.mem, self.msi, self.ioevents, use_64bit_bar=use_64bit_bar)
        try:
            slot = self.pci.add_device(pci_dev, slot)
        except Exception:
            pci_dev.shutdown()
            raise
        pci_dev.intx = self.irq_line(layout.pci_intx_irq(slot))
        address = bdf(self.pci.segment, slot)
        self.devices[dev_id] = pci_dev
        self.tree[dev_id] = DeviceNode(dev_id, parent=f"_virtio-pci-{dev_id}")
        self.tree[f"_virtio-pci-{dev_id}"] = DeviceNode(f"_virtio-pci-{dev_id}", pci_bdf=address,
                                                        children=[dev_id])
        log.info("%s at %s", dev_id, address)
        return address

    def aml(self) -> Aml:
        """The PCI hot plug controller, the segment's host bridge and the ECAM reservation."""
        mmio32 = acpi_devices.MmioWindow(layout.MEM_32BIT_DEVICES_START, layout.MEM_32BIT_DEVICES_SIZE)
        return Sequence(
            acpi_devices.pci_hotplug_stub_aml(),
            acpi_devices.pci_segment_aml(0, mmio32, acpi_devices.MmioWindow(*self.mmio64),
                                         layout.pci_intx_irq),
            acpi_devices.pci_ecam_reservation_aml(1))

    def device_tree(self) -> dict:
        return {k: v.to_json() for k, v in self.tree.items()}

    def close(self) -> None:
        for dev_id, dev in list(self.devices.items()):
            try:
                dev.shutdown()
            except Exception:  # noqa: BLE001 - keep tearing down the rest
                log.exception("shutting down %s", dev_id)
        self.devices.clear()
