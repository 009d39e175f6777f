"""The device manager: the PCI segment, its devices, their ids and the device tree.

It creates the boot devices from the configuration in the reference's order (console,
disks, nets, rng, ...), so slots and default ids match Cloud Hypervisor's, and it fills
generated ids back into the configuration, so a reboot re-creates the same devices.
Devices get guest memory, MSI and ioeventfd objects injected; none sees the VM.

PCI hot plug (shared/notes/ch-hotplug-reference.md §5) lives here in one place: the
``\\_SB_.PHPR`` register block (:class:`PciHotplugController`) and its AML, the slot
objects inside the host bridge, and the add / remove / eject flows. An added device is
built completely (backend, BARs, MSI-X routes, tree node) before its PCIU bit is set and
the GED raised; a removed device stays whole until the guest writes B0EJ, and is then
torn down on that vCPU thread.
"""

from __future__ import annotations

import logging
import threading
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any, NamedTuple

from pych.acpi.aml import (
    Acquire, AddressSpace, Aml, And, Arg, Device, EISAName, Equal, Field, FieldAccess,
    FieldUpdate, If, Local, Method, MethodCall, Mutex, Name, Named, Notify, OpRegion, Path,
    RegionSpace, Release, ResourceTemplate, Return, Sequence, ShiftLeft, Store, String,
)
from pych.arch.x86_64 import layout
from pych.devices import acpi as acpi_devices
from pych.devices.acpi import AcpiNotification
from pych.devices.bus import Bus
from pych.devices.pci.allocator import AddressAllocator
from pych.devices.pci.bus import NUM_DEVICE_SLOTS, PciBus, PciBusError, bdf
from pych.devices.pci.config_io import PciConfigIo
from pych.devices.pci.ecam import PciEcam
from pych.devices.virtio.block import DiskError, VirtioBlock
from pych.devices.virtio.device import VirtioDevice, VirtioDeviceType
from pych.devices.legacy.serial_backend import open_serial_backend
from pych.devices.net.tap import Tap
from pych.devices.virtio.balloon import VirtioBalloon
from pych.devices.virtio.console import VirtioConsole
from pych.devices.vhost_user import VhostUserConnections
from pych.devices.virtio.fs import VirtioFs
from pych.devices.virtio.net import VirtioNet, format_mac, parse_mac, random_mac
from pych.devices.virtio.pci_transport import VirtioPciDevice
from pych.devices.virtio.pmem import VirtioPmem
from pych.devices.virtio.rng import VirtioRng
from pych.devices.virtio.vsock import VirtioVsock
from pych.devices.vfio import (HostVfioKernel, VfioContainer, VfioError, VfioKernel,
                               VfioPciDevice, VfioUnavailable)
from pych.memory import GuestMemory

log = logging.getLogger(__name__)

RNG_ID = "__rng"
CONSOLE_ID = "__console"
BALLOON_ID = "__balloon"

#: The virtio device types the guest may be asked to eject (the reference's list); the rest
#: (rng, console, balloon, virtio-mem ...) are part of the machine.
REMOVABLE_TYPES = frozenset({VirtioDeviceType.NET, VirtioDeviceType.BLOCK, VirtioDeviceType.PMEM,
                             VirtioDeviceType.FS, VirtioDeviceType.VSOCK})

#: What a device factory raises when the configuration names an unusable backend (a missing
#: or locked file, a bad size ...): the request was wrong, not the VMM.
BACKEND_ERRORS: tuple[type[Exception], ...] = (OSError, ValueError, DiskError)


class DeviceManagerError(Exception):
    """A hot plug request the device manager refused or could not carry out (HTTP 500)."""


class DeviceBackendError(DeviceManagerError):
    """The device's backend could not be opened or used (HTTP 400)."""


def _build(factory: Callable[[Any], VirtioDevice], cfg: Any) -> VirtioDevice:
    """``factory(cfg)``, a refused backend reported as :class:`DeviceBackendError`."""
    try:
        return factory(cfg)
    except BACKEND_ERRORS as e:
        raise DeviceBackendError(str(e)) from e


def _open_tap(net) -> Tap:
    """The tap of the net configuration ``net``, host side configured (see _make_net)."""
    if not net.fds:
        tap = Tap(net.tap)
        try:
            tap.configure_host(ip=net.ip, mask=net.mask, mac=net.host_mac, mtu=net.mtu)
        except BaseException:
            tap.close()
            raise
        return tap
    if len(net.fds) != 1:
        raise ValueError(f"{net.id}: {len(net.fds)} tap fds: pych supports one queue pair "
                         "(one fd)")
    tap = Tap.from_fd(net.fds[0])
    try:
        ignored = [key for key in ("ip", "mask", "host_mac") if getattr(net, key) is not None]
        if ignored:
            log.warning("%s: tap %s comes as an fd and is not configured: %s ignored",
                        net.id, tap.name, ", ".join(ignored))
        if net.mtu is not None:
            tap.configure_host(mtu=net.mtu, up=False)
    except BaseException:
        tap.close()
        raise
    return tap


class UnknownDeviceId(DeviceManagerError):
    """No device has this id (HTTP 404)."""

    def __init__(self, dev_id: str) -> None:
        super().__init__(f"Unknown device id: {dev_id}")


class RemovalNotAllowed(DeviceManagerError):
    def __init__(self, dev_id: str, what: str) -> None:
        super().__init__(f"Removing device {dev_id} is not allowed: a {what} device "
                         "is part of the machine and cannot be hot-unplugged")


class HotPlugged(NamedTuple):
    """A hot-added device: its configuration as built (id and generated fields filled in:
    what the VM configuration records, so a reboot re-creates it) and its BDF."""

    config: Any
    bdf: str

    @property
    def id(self) -> str:
        return self.config.id


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

    def read(self, offset: int, size: int) -> int:
        if size != 4:
            log.warning("PHPR: ignoring %d-byte read at offset %#x", size, offset)
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
            log.warning("PHPR: ignoring %d-byte write at offset %#x", size, offset)
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
                log.warning("PHPR: ignoring selection of PCI segment %d (there are %d)",
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

    @staticmethod
    def segment_aml(slots: int = NUM_DEVICE_SLOTS) -> list[Aml]:
        """What goes inside a host bridge ``\\_SB_.PCxx``: a slot object ``Snnn`` per slot
        (``_SUN``, ``_ADR``, ``_EJ0`` -> ``\\_SB_.PHPR.PCEJ(_SUN, _SEG)``), ``DVNT(bitmap,
        event)`` notifying the slots whose bit is set, and ``PCNT``, which selects this
        segment and notifies added slots with 1 and slots to eject with 3."""
        slot_devices = [Device(
            f"S{slot:03d}",
            Name("_SUN", slot),
            Name("_ADR", slot << 16),
            Method("_EJ0", 1, MethodCall("\\_SB_.PHPR.PCEJ", Path("_SUN"), Path("_SEG")),
                   serialized=True),
        ) for slot in range(slots)]
        dvnt = Method("DVNT", 2, *(item for slot in range(slots) for item in (
            And(Arg(0), 1 << slot, Local(0)),
            If(Equal(Local(0), 1 << slot), Notify(f"S{slot:03d}", Arg(1))),
        )), serialized=True)
        pcnt = Method(
            "PCNT", 0,
            Acquire("\\_SB_.PHPR.BLCK"),
            Store(Path("_SEG"), "\\_SB_.PHPR.PSEG"),
            MethodCall("DVNT", Path("\\_SB_.PHPR.PCIU"), 1),
            MethodCall("DVNT", Path("\\_SB_.PHPR.PCID"), 3),
            Release("\\_SB_.PHPR.BLCK"),
            serialized=True)
        return [*slot_devices, dvnt, pcnt]


class _DeviceMemoryMapper:
    """Maps device memory (a pmem file) into the guest: an aligned range of the segment's
    64-bit window, backed by a KVM memslot (pmem's :class:`~pych.devices.virtio.pmem.GuestMapper`)."""

    def __init__(self, window: AddressAllocator, memslots) -> None:
        self._window = window
        self._memslots = memslots
        self._slots: dict[int, int] = {}

    def map(self, host_addr: int, size: int, alignment: int) -> int:
        gpa = self._window.allocate(size, alignment)
        try:
            self._slots[gpa] = self._memslots.add_memory(gpa, size, host_addr)
        except BaseException:
            self._window.free(gpa)
            raise
        return gpa

    def unmap(self, gpa: int) -> None:
        self._memslots.remove_memory(self._slots.pop(gpa), gpa)
        self._window.free(gpa)


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
                 irq_line, mmio64: tuple[int, int], notify, memslots=None, virtio_mem=(),
                 dma_ranges=None, vhost_user: VhostUserConnections | None = None):
        self.config = config
        self.mem = mem
        self.msi = msi
        self.ioevents = ioevents
        self.irq_line = irq_line          # gsi -> IrqLine
        self.notify = notify              # GED notification (AcpiNotification.PCI)
        self.memslots = memslots          # add_memory/remove_memory (KVM): device memory (pmem)
        self.virtio_mem = list(virtio_mem)  # the memory manager's VirtioMemZones (with devices)
        self.dma_ranges = dma_ranges      # the memory manager's: guest RAM VFIO may map now
        self.vhost_user = vhost_user      # the VMM's: vhost-user connections kept across reboots
        self.mmio64 = mmio64
        self.mem64 = AddressAllocator(*mmio64, "mmio64")   # 64-bit BARs and device memory
        self.pci = PciBus(0, mmio_bus=mmio,
                          mem32=AddressAllocator(layout.MEM_32BIT_DEVICES_START,
                                                 layout.MEM_32BIT_DEVICES_SIZE, "mmio32"),
                          mem64=self.mem64)
        pio.insert(layout.PCI_CONFIG_IO_PORT, layout.PCI_CONFIG_IO_PORT_SIZE, PciConfigIo(self.pci))
        mmio.insert(layout.PCI_MMCONFIG_START, layout.PCI_MMIO_CONFIG_SIZE_PER_SEGMENT, PciEcam(self.pci))
        self.tree: dict[str, DeviceNode] = {}
        self.devices: dict[str, VirtioPciDevice] = {}
        self.vfio_devices: dict[str, VfioPciDevice] = {}
        self.vfio_kernel: VfioKernel = HostVfioKernel()    # the ioctl boundary (tests: a fake)
        self._vfio_container: VfioContainer | None = None
        self._id_counter = 0
        self.balloon: VirtioBalloon | None = None       # for vm.resize's desired_balloon
        # Hot plug: the tree, ``devices`` and the pending removals change on the VMM thread
        # (add, remove) and on a vCPU thread (the guest's eject), always under this lock.
        self._lock = threading.RLock()
        self._pending_removal: dict[str, Callable[[str, str], None] | None] = {}
        self.hotplug = PciHotplugController(layout.ACPI_PCI_HOTPLUG_ADDR, on_eject=self.eject)
        mmio.insert(layout.ACPI_PCI_HOTPLUG_ADDR, PciHotplugController.SIZE, self.hotplug)

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
        """Create the configured devices in the reference's order (console, disks, nets, rng,
        fs, pmem, vsock, virtio-mem, balloon), so slots and default ids come out as Cloud Hypervisor's;
        generated ids (and a net's generated MAC) are written back into the configuration.

        Slots asked for with ``pci_device_id`` are reserved before any device is placed, so
        a device placed earlier never takes them (the reference's rule); a slot asked for
        twice is refused. A backend that cannot be used raises :class:`DeviceBackendError`.
        On failure the ids generated here are taken out of the configuration again (the
        caller closes the devices already made)."""
        configs = self._boot_pci_configs()
        unnamed = [c for c in configs if c.id is None]
        try:
            for c in configs:
                if c.pci_device_id is not None:
                    self.pci.reserve_slot(c.pci_device_id)
            self._create_boot_devices()
        except BaseException:
            for c in unnamed:
                c.id = None
            raise

    def _boot_pci_configs(self) -> list:
        """The configurations of the boot devices that go on the PCI bus."""
        cfg = self.config
        single = [cfg.console if cfg.console is not None and cfg.console.mode != "Off" else None,
                  cfg.rng, cfg.vsock, cfg.balloon]
        return [c for c in single if c is not None] + [
            *(cfg.disks or []), *(cfg.net or []), *(cfg.fs or []), *(cfg.pmem or []),
            *(cfg.devices or [])]

    def _create_boot_devices(self) -> None:
        cfg = self.config
        if cfg.console is not None and cfg.console.mode != "Off":
            self.add_virtio(CONSOLE_ID, _build(self._make_console, cfg.console),
                            cfg.console.pci_device_id)
        for disk in cfg.disks or []:
            self._add_boot_device("_disk", disk, self._make_disk, use_64bit_bar=False)
        for net in cfg.net or []:
            self._add_boot_device("_net", net, self._make_net)
        if cfg.rng is not None:
            self.add_virtio(RNG_ID, _build(lambda rng: VirtioRng(rng.src), cfg.rng),
                            cfg.rng.pci_device_id)
        for fs in cfg.fs or []:
            self._add_boot_device("_fs", fs, self._make_fs)
        for pmem in cfg.pmem or []:
            self._add_boot_device("_pmem", pmem, self._make_pmem)
        if cfg.vsock is not None:
            self._add_boot_device("_vsock", cfg.vsock, self._make_vsock)
        for zone in self.virtio_mem:
            self.add_virtio(zone.id, zone.device)
        if cfg.balloon is not None:
            self.balloon = _build(self._make_balloon, cfg.balloon)
            self.add_virtio(BALLOON_ID, self.balloon, cfg.balloon.pci_device_id)
        for device in cfg.devices or []:
            if device.id is None:
                device.id = self.next_device_name("_vfio")
            self._add_vfio_device(device)

    def _add_boot_device(self, prefix: str, cfg, factory, *, use_64bit_bar: bool = True) -> None:
        if cfg.id is None:
            cfg.id = self.next_device_name(prefix)
        self.add_virtio(cfg.id, _build(factory, cfg), cfg.pci_device_id,
                        use_64bit_bar=use_64bit_bar)

    # Factories: each builds a complete device from one configuration object (with its id
    # set) and raises, holding nothing, when the backend cannot be used.  Boot and
    # ``vm.add-*`` share them.
    def _make_console(self, console) -> VirtioConsole:
        """``--console``: hvc0, its host end one of the serial backends (tty, pty, file,
        socket, null), owned and closed by the device."""
        backend = open_serial_backend(console.mode, console.file or console.socket)
        try:
            device = VirtioConsole(backend, owns_sink=True, name=CONSOLE_ID)
        except BaseException:
            backend.close()
            raise
        backend.start(device)
        return device

    def _make_disk(self, disk) -> VirtioBlock:
        if not disk.path:
            raise ValueError("a disk needs a path")
        return VirtioBlock(disk.path, readonly=disk.readonly, serial=disk.serial,
                           num_queues=disk.num_queues, queue_size=disk.queue_size, name=disk.id)

    def _make_net(self, net) -> VirtioNet:
        """virtio-net on a tap: opened or created by name with its host side configured,
        or, with ``fds`` (``--net fd=[N]``, SCM_RIGHTS with ``vm.add-net``), the tap queue
        someone else set up, on a duplicate of the fd (the configuration keeps the
        original, so every boot of the VM gets its own copy; the VMM closes the original
        when the device is removed or the VM deleted). Such a tap is not configured: only
        ``mtu`` is applied, as in the reference; ``ip``, ``mask`` and ``host_mac`` are
        ignored. A generated MAC is written back into ``net`` so a reboot keeps it."""
        if net.vhost_user:
            raise ValueError(f"{net.id}: vhost-user net is not supported by pych")
        if net.num_queues != 2:
            raise ValueError(f"{net.id}: num_queues={net.num_queues}: pych supports one "
                             "queue pair (num_queues=2, one tap fd)")
        mac = parse_mac(net.mac) if net.mac else random_mac()
        tap = _open_tap(net)
        try:
            device = VirtioNet(tap, mac=mac, mtu=net.mtu, queue_size=net.queue_size,
                               offload_csum=net.offload_csum, offload_tso=net.offload_tso,
                               offload_ufo=net.offload_ufo, name=net.id)
        except BaseException:
            tap.close()
            raise
        net.mac = format_mac(mac)
        log.info("%s: tap %s, mac %s", net.id, tap.name, net.mac)
        return device

    def _make_pmem(self, pmem) -> VirtioPmem:
        """The file mapped at a 2 MiB aligned address of the 64-bit window."""
        if self.memslots is None:
            raise ValueError(f"{pmem.id}: this device manager cannot map device memory")
        return VirtioPmem(pmem.file, _DeviceMemoryMapper(self.mem64, self.memslots),
                          size=pmem.size, discard_writes=pmem.discard_writes, name=pmem.id)

    def _make_vsock(self, vsock) -> VirtioVsock:
        return VirtioVsock(vsock.cid, vsock.socket, name=vsock.id)

    def _make_fs(self, fs) -> VirtioFs:
        """virtio-fs served by the vhost-user back-end (virtiofsd) listening at ``fs.socket``:
        connected and negotiated now, so a missing or unsuitable back-end fails the boot or
        the add (400). After a reboot the device takes back the connection its predecessor
        of the same id and socket parked (:meth:`close` with ``keep_connections``). Removal
        stops its rings and hangs up (``VirtioFs.shutdown``)."""
        parked = self.vhost_user.take(fs.id, fs.socket) if self.vhost_user is not None else None
        return VirtioFs(fs.tag, fs.socket, num_request_queues=fs.num_queues,
                        queue_size=fs.queue_size, name=fs.id, connection=parked)

    def _make_balloon(self, balloon) -> VirtioBalloon:
        return VirtioBalloon(balloon.size, deflate_on_oom=balloon.deflate_on_oom,
                             free_page_reporting=balloon.free_page_reporting, name=BALLOON_ID)

    # --- PCI ---------------------------------------------------------------------------------------
    def add_virtio(self, dev_id: str, device: VirtioDevice, slot: int | None = None, *,
                   use_64bit_bar: bool = True) -> str:
        """Put ``device`` on the PCI bus behind a virtio-pci transport; returns its BDF."""
        try:
            pci_dev = VirtioPciDevice(device, self.mem, self.msi, self.ioevents,
                                      use_64bit_bar=use_64bit_bar)
        except BaseException:
            device.shutdown()
            raise
        try:
            slot = self.pci.add_device(pci_dev, slot)
        except BaseException:
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
        """The PCI hot plug controller, the segment's host bridge (with its hot plug slots)
        and the ECAM reservation."""
        mmio32 = acpi_devices.MmioWindow(layout.MEM_32BIT_DEVICES_START, layout.MEM_32BIT_DEVICES_SIZE)
        return Sequence(
            self.hotplug,
            acpi_devices.pci_segment_aml(0, mmio32, acpi_devices.MmioWindow(*self.mmio64),
                                         layout.pci_intx_irq, *self.hotplug.segment_aml()),
            acpi_devices.pci_ecam_reservation_aml(1))

    # --- PCI hot plug (VMM thread; eject on the guest's vCPU thread) --------------------------
    def add_disk(self, disk) -> HotPlugged:
        return self.hotplug_virtio("_disk", disk, self._make_disk)

    def add_net(self, net) -> HotPlugged:
        return self.hotplug_virtio("_net", net, self._make_net)

    def add_fs(self, fs) -> HotPlugged:
        return self.hotplug_virtio("_fs", fs, self._make_fs)

    def add_pmem(self, pmem) -> HotPlugged:
        return self.hotplug_virtio("_pmem", pmem, self._make_pmem)

    def add_vsock(self, vsock) -> HotPlugged:
        return self.hotplug_virtio("_vsock", vsock, self._make_vsock)

    def add_vfio(self, device) -> HotPlugged:
        """Hot add the host PCI device ``device.path`` with VFIO (a ``DeviceConfig``, left
        untouched; the returned copy has its id, ``_vfioN`` by default). As for virtio
        devices the device is complete (DMA map, BARs, MSI-X routes, tree node) before its
        PCIU bit is set, and a failure leaves nothing behind: :class:`DeviceBackendError`
        when the path or the host cannot do VFIO, :class:`DeviceManagerError` otherwise."""
        with self._lock:
            if device.id is not None and device.id in self.tree:
                raise DeviceManagerError(f"Identifier {device.id} is not unique")
            counter = self._id_counter
            device = device.model_copy(update={"id": device.id or self.next_device_name("_vfio")})
            try:
                address = self._add_vfio_device(device)
            except BaseException:
                self._id_counter = counter
                raise
            self.hotplug.device_added(self.pci.segment,
                                      self.pci.slot_of(self.vfio_devices[device.id]))
        self.notify(AcpiNotification.PCI)
        return HotPlugged(device, address)

    def _add_vfio_device(self, device) -> str:
        """Open, reset and place the VFIO device of ``device`` (its id set); returns its BDF.
        The device is its own PCI node in the device tree (reference §5.4)."""
        if device.fd is not None:
            raise DeviceBackendError(f"{device.id}: fd= (a VFIO cdev with iommufd) is not "
                                     "supported by pych; give path=")
        if self._vfio_container is None:
            self._vfio_container = VfioContainer(self.vfio_kernel, self.mem, ram=self.dma_ranges)
        try:
            pci_dev = VfioPciDevice(device.path, self._vfio_container, msi=self.msi,
                                    memslots=self.memslots, name=device.id,
                                    exclude_mmap_bars=device.x_exclude_mmap_bars)
        except VfioUnavailable as e:
            raise DeviceBackendError(str(e)) from None
        except VfioError as e:
            raise DeviceManagerError(str(e)) from None
        try:
            slot = self.pci.add_device(pci_dev, device.pci_device_id)
        except BaseException as e:
            pci_dev.shutdown()
            if isinstance(e, PciBusError):
                raise DeviceManagerError(str(e)) from e
            raise
        address = bdf(self.pci.segment, slot)
        self.vfio_devices[device.id] = pci_dev
        self.tree[device.id] = DeviceNode(device.id, pci_bdf=address)
        log.info("%s (VFIO %s) at %s", device.id, device.path, address)
        return address

    def memory_region_added(self, region) -> None:
        """Guest RAM grew (a hot plugged DIMM): VFIO devices must be able to DMA to it and
        vhost-user back-ends (virtio-fs) must map it (a MemoryManager region listener: logs a
        failure rather than raising it)."""
        if self._vfio_container is not None:
            try:
                self._vfio_container.region_added(region)
            except VfioError as e:
                log.error("%s: VFIO devices cannot DMA to this memory", e)
        for device in self._vhost_user_devices():   # they map guest RAM too
            device.memory_changed()

    def memory_region_removed(self, region) -> None:
        """Guest RAM is going (a DIMM the guest ejected, before it is freed): VFIO devices
        stop DMA to it and vhost-user back-ends unmap it (a MemoryManager region listener:
        logs a failure)."""
        self.dma_unmap(region)
        for device in self._vhost_user_devices():
            device.memory_changed(going=region)

    def _park_vhost_user(self) -> None:
        with self._lock:
            kept = [(dev_id, d.device) for dev_id, d in self.devices.items()
                    if isinstance(d.device, VirtioFs) and dev_id not in self._pending_removal]
        for dev_id, device in kept:
            try:
                self.vhost_user.park(dev_id, device.socket_path, device.detach_backend())
            except Exception:  # noqa: BLE001 - the device then hangs up with the rest
                log.exception("%s: cannot keep its vhost-user connection", dev_id)

    def _vhost_user_devices(self) -> list[VirtioFs]:
        with self._lock:
            return [d.device for d in self.devices.values() if isinstance(d.device, VirtioFs)]

    def dma_map(self, ram) -> None:
        """Let VFIO devices DMA to ``ram`` (a virtio-mem block the guest plugged; a
        MemoryManager block listener: logs a failure)."""
        if self._vfio_container is not None:
            try:
                self._vfio_container.region_added(ram)
            except VfioError as e:
                log.error("%s: VFIO devices cannot DMA to this memory", e)

    def dma_unmap(self, ram) -> None:
        """VFIO devices stop DMA to ``ram`` (RAM about to be freed or discarded)."""
        if self._vfio_container is not None:
            try:
                self._vfio_container.region_removed(ram)
            except VfioError as e:
                log.error("%s", e)

    def hotplug_virtio(self, prefix: str, cfg: Any,
                       factory: Callable[[Any], VirtioDevice]) -> HotPlugged:
        """Hot add the virtio device ``factory(cfg)``.

        ``cfg`` is a device configuration (``DiskConfig``...), left untouched: the factory
        gets a copy, with the next ``<prefix>N`` of the shared counter as its id if it has
        none, and may fill in generated fields (a net's MAC); that copy is returned for the
        VM configuration to record. The device is built completely (backend opened and
        locked, transport with its MSI-X vectors, BARs placed, tree node) and only then is
        its PCIU bit set and the GED PCI event raised. On failure nothing is left behind (no
        slot, id, fd, thread or route): :class:`DeviceBackendError` if the factory rejected
        the backend, :class:`DeviceManagerError` otherwise (id in use, slot taken or none
        left).
        """
        with self._lock:
            if cfg.id is not None and cfg.id in self.tree:
                raise DeviceManagerError(f"Identifier {cfg.id} is not unique"
                                         + (" (its removal is pending: the guest has not "
                                            "ejected it yet)" if cfg.id in self._pending_removal
                                            else ""))
            counter = self._id_counter
            cfg = cfg.model_copy(update={"id": cfg.id or self.next_device_name(prefix)})
            try:
                try:
                    device = factory(cfg)
                except BACKEND_ERRORS as e:
                    raise DeviceBackendError(str(e)) from e
                try:
                    address = self.add_virtio(cfg.id, device, cfg.pci_device_id)
                except PciBusError as e:
                    raise DeviceManagerError(str(e)) from e
            except BaseException:
                self._id_counter = counter          # the generated id was never used
                raise
            self.hotplug.device_added(self.pci.segment, self.pci.slot_of(self.devices[cfg.id]))
        self.notify(AcpiNotification.PCI)
        return HotPlugged(cfg, address)

    def remove_device(self, dev_id: str,
                      on_ejected: Callable[[str, str], None] | None = None) -> str:
        """Ask the guest to eject device ``dev_id`` (its id or its ``_virtio-pci-`` node);
        returns the device's id.

        Sets its PCID bit and raises the GED PCI event; asking again while the removal is
        pending signals the guest again (it may have missed the interrupt). The device keeps
        working until the guest writes B0EJ; then :meth:`eject` tears it down and calls
        ``on_ejected(id, bdf)`` on that vCPU thread. Raises :class:`UnknownDeviceId` or
        :class:`RemovalNotAllowed`.
        """
        with self._lock:
            if dev_id in self.vfio_devices:
                pci_dev = self.vfio_devices[dev_id]
            else:
                dev_id = self._virtio_id(dev_id)
                pci_dev = self.devices[dev_id]
                if pci_dev.device.device_type not in REMOVABLE_TYPES:
                    raise RemovalNotAllowed(dev_id, pci_dev.device.device_type.name.lower())
            self._pending_removal[dev_id] = on_ejected
            self.hotplug.removal_requested(self.pci.segment, self.pci.slot_of(pci_dev))
        self.notify(AcpiNotification.PCI)
        return dev_id

    def _virtio_id(self, dev_id: str) -> str:
        node = self.tree.get(dev_id)
        if node is None:
            raise UnknownDeviceId(dev_id)
        if dev_id not in self.devices:                  # the PCI node: its virtio child
            dev_id = next((c for c in node.children if c in self.devices), None)
            if dev_id is None:
                raise DeviceManagerError(f"Device {node.id} is not a hot-pluggable PCI device")
        return dev_id

    def eject(self, segment: int, slot: int) -> None:
        """The guest ejected ``slot`` (B0EJ, on its vCPU thread): take the device off the bus,
        free its BARs and slot, stop its worker, release its ioeventfds, irqfds and GSI
        routes, close its backend, drop its tree nodes, then report ``on_ejected``.

        Only devices pending removal are ejected: the configuration still lists any other
        device, so tearing it down would make the VM and its configuration disagree."""
        with self._lock:
            pci_dev = self.pci.device(slot) if segment == self.pci.segment else None
            dev_id = next((i for i, d in (*self.devices.items(), *self.vfio_devices.items())
                           if d is pci_dev), None)
            if dev_id is None or dev_id not in self._pending_removal:
                log.warning("guest ejected PCI %s, which is not pending removal: ignored",
                            bdf(segment, slot))
                return
            on_ejected = self._pending_removal.pop(dev_id)
            address = bdf(segment, slot)
            self.pci.remove_device(slot)
            if self.devices.pop(dev_id, None) is not None:
                del self.tree[f"_virtio-pci-{dev_id}"]
            else:
                del self.vfio_devices[dev_id]
            del self.tree[dev_id]
            pci_dev.shutdown()
        log.info("%s at %s ejected by the guest and removed", dev_id, address)
        if on_ejected is not None:
            on_ejected(dev_id, address)

    def pending_removal(self) -> list[str]:
        """Ids of the devices the guest has been asked to eject and has not ejected yet."""
        with self._lock:
            return sorted(self._pending_removal)

    def device_tree(self) -> dict:
        with self._lock:
            return {k: v.to_json() for k, v in self.tree.items()}

    def close(self, *, keep_connections: bool = False) -> None:
        """Shut every device down and release its backend. With ``keep_connections`` (the VM
        is rebuilt for a reboot) each vhost-user device still in the configuration stops
        its rings and parks its connection in ``vhost_user`` for the next boot instead of
        hanging up (see ``pych/devices/virtio/fs.py``, "Reboot")."""
        if keep_connections and self.vhost_user is not None:
            self._park_vhost_user()
        for dev_id, dev in [*self.devices.items(), *self.vfio_devices.items()]:
            try:
                dev.shutdown()
            except Exception:  # noqa: BLE001 - keep tearing down the rest
                log.exception("shutting down %s", dev_id)
        self.devices.clear()
        self.vfio_devices.clear()
        if self._vfio_container is not None:
            self._vfio_container.close()
            self._vfio_container = None
