"""The device manager: the PCI segments, their devices, their ids and the device tree.

It creates the boot devices from the configuration in the reference's order (the device-kind
registry's, :data:`pych.config.kinds.DEVICE_KINDS`), so slots and default ids match Cloud
Hypervisor's, and it fills generated ids back into the configuration, so a reboot re-creates
the same devices. Devices are built by the per-kind factories (:mod:`.factories`) and get
guest memory, MSI and ioeventfd objects injected; none sees the VM. Each device goes on the
segment its ``pci_segment`` names (:mod:`.segment`: ``--platform num_pci_segments=N``).

PCI hot plug (../shared/notes/ch-hotplug-reference.md §5): :meth:`DeviceManager.hotplug` adds a
device of any hot-pluggable kind, :meth:`DeviceManager.remove_device` asks the guest to eject
one, and :meth:`DeviceManager.eject` tears it down when the guest does, through the
``\\_SB_.PHPR`` register block and its AML (:mod:`.hotplug`). An added device is built
completely (backend, BARs, MSI-X routes, tree node) before its PCIU bit is set and the GED
raised; a removed device stays whole until the guest writes B0EJ, and is then torn down on
that vCPU thread. ``vm.info``'s device tree is :mod:`.tree`.
"""

from __future__ import annotations

import logging
import threading
from collections.abc import Callable
from typing import Any, NamedTuple

from pych.acpi.aml import Sequence
from pych.arch.x86_64 import layout
from pych.config import kinds
from pych.config.kinds import BY_NAME, DEVICE_KINDS, DeviceKind
from pych.config.machine import aperture_weights
from pych.device_manager.factories import (BACKEND_ERRORS, FACTORIES, Factory, FactoryContext,
                                          rate_limit_groups)
from pych.device_manager.hotplug import PciHotplugController
from pych.device_manager.segment import create_segments
from pych.devices.pvpanic import PvPanicDevice
from pych.device_manager.tree import DeviceTree
from pych.devices.acpi import AcpiNotification, pci_ecam_reservation_aml
from pych.devices.bus import Bus
from pych.devices.pci.bus import PciBusError, bdf
from pych.devices.vfio import (HostVfioKernel, VfioContainer, VfioError, VfioKernel,
                               VfioPciDevice, VfioUnavailable)
from pych.devices.vhost_user import VhostUserConnections
from pych.devices.virtio.balloon import VirtioBalloon
from pych.devices.virtio.device import VirtioDevice
from pych.devices.virtio.net import VirtioNet
from pych.devices.virtio.vhost_user_device import VhostUserDevice
from pych.devices.virtio.pci_transport import VirtioPciDevice
from pych.memory.guest_memory import GuestMemory
from pych.snapshot.state import NotSnapshottable

log = logging.getLogger(__name__)


class DeviceManagerError(Exception):
    """A hot plug request the device manager refused or could not carry out (HTTP 500)."""


class DeviceBackendError(DeviceManagerError):
    """The device's backend could not be opened or used (HTTP 400)."""


class DeviceIdInUse(DeviceManagerError):
    """The id names a device still in the device tree: one whose removal the guest has not
    finished (HTTP 409, as a duplicate id in the configuration; the reference answers 500)."""


class UnknownDeviceId(DeviceManagerError):
    """No device has this id (HTTP 404)."""

    def __init__(self, dev_id: str) -> None:
        super().__init__(f"Unknown device id: {dev_id}")


class InvalidDiskResize(DeviceManagerError):
    """``vm.resize-disk`` asked for what cannot be done (the request's mistake)."""


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


VFIO = BY_NAME["vfio"]


PVPANIC_ID = "__pvpanic"


class DeviceManager:
    def __init__(self, config, mem: GuestMemory, mmio: Bus, pio: Bus, *, msi, ioevents,
                 irq_line, mmio64: tuple[int, int], notify, memslots=None, virtio_mem=(),
                 dma_ranges=None, vhost_user: VhostUserConnections | None = None,
                 on_guest_event: Callable[[str], None] | None = None,
                 on_device_failed: Callable[[str, str], None] | None = None,
                 restore_slots: dict[str, dict] | None = None,
                 adopt_taps: dict[str, list[int]] | None = None,
                 adopt_vhost_user: dict[str, Any] | None = None):
        self.config = config
        self.on_device_failed = on_device_failed   # (id, why), from a device's own thread
        self.mem = mem
        self.msi = msi
        self.ioevents = ioevents
        self.irq_line = irq_line          # gsi -> IrqLine
        self.notify = notify              # GED notification (AcpiNotification.PCI)
        self.memslots = memslots          # add_memory/remove_memory (KVM): device memory (pmem)
        self.virtio_mem = list(virtio_mem)  # the memory manager's VirtioMemZones (with devices)
        self.dma_ranges = dma_ranges      # the memory manager's: guest RAM VFIO may map now
        self.vhost_user = vhost_user      # the VMM's: vhost-user connections kept across reboots
        self.on_guest_event = on_guest_event  # pvpanic: "panic", "crash-loaded" (vCPU thread)
        self.pvpanic: PvPanicDevice | None = None
        # A restore: each device's slot and BAR width as the snapshot had them (see state())
        self._restore_slots = restore_slots
        self.mmio64 = mmio64
        # Each segment its bus, ECAM window and shares of the MMIO windows (BARs, pmem).
        mmio32_weights, mmio64_weights = aperture_weights(config)
        self.segments = create_segments(len(mmio32_weights), mmio=mmio, pio=pio, mmio64=mmio64,
                                        mmio32_weights=mmio32_weights,
                                        mmio64_weights=mmio64_weights)
        self.pci = self.segments[0].bus     # segment 0's bus
        self.tree = DeviceTree()
        self.devices: dict[str, VirtioPciDevice] = {}
        self.vfio_devices: dict[str, VfioPciDevice] = {}
        self.vfio_kernel: VfioKernel = HostVfioKernel()    # the ioctl boundary (tests: a fake)
        self._vfio_container: VfioContainer | None = None
        groups = rate_limit_groups(config)      # one limiter per group, whatever the segment
        # a local migration's receiver: each net's tap queues, passed by the sender (shared
        # by the segments' contexts: each net takes its own once)
        adopted = adopt_taps if adopt_taps is not None else {}
        #: and each vhost-user device's connection (what no device took is closed by the
        #: caller: see VmTarget.finish)
        self.adopt_vhost_user = adopt_vhost_user if adopt_vhost_user is not None else {}
        self._factory_contexts = [FactoryContext(segment.mem64, memslots, vhost_user, groups,
                                                 adopt_taps=adopted,
                                                 adopt_vhost_user=self.adopt_vhost_user)
                                  for segment in self.segments]
        self._kinds: dict[str, DeviceKind] = {}     # device id -> its kind (virtio-mem: none)
        self._id_counter = 0
        self.balloon: VirtioBalloon | None = None       # for vm.resize's desired_balloon
        # Hot plug: the tree, ``devices`` and the pending removals change on the VMM thread
        # (add, remove) and on a vCPU thread (the guest's eject), always under this lock.
        self._lock = threading.RLock()
        self._pending_removal: dict[str, Callable[[str, str], None] | None] = {}
        self.hotplug_controller = PciHotplugController(layout.ACPI_PCI_HOTPLUG_ADDR,
                                                       num_segments=len(self.segments),
                                                       on_eject=self.eject)
        mmio.insert(layout.ACPI_PCI_HOTPLUG_ADDR, PciHotplugController.SIZE,
                    self.hotplug_controller)

    # --- ids -------------------------------------------------------------------------------------
    def next_device_name(self, prefix: str) -> str:
        """The reference's rule: one counter shared by every prefix, skipping the ids the
        configuration or a placed device uses."""
        used = _config_identifiers(self.config) | set(self.tree)
        while True:
            name = f"{prefix}{self._id_counter}"
            self._id_counter += 1
            if name not in used:
                return name

    # --- boot devices ---------------------------------------------------------------------------
    def create_boot_devices(self) -> None:
        """Create the configured devices in the registry's order (console, disks, nets, rng,
        fs, pmem, vsock, then the memory manager's virtio-mem devices, balloon, VFIO), so
        slots and default ids come out as Cloud Hypervisor's; generated ids (and a net's
        generated MAC) are written back into the configuration.

        Slots asked for with ``pci_device_id`` are reserved before any device is placed, so
        a device placed earlier never takes them (the reference's rule); a slot asked for
        twice is refused. A backend that cannot be used raises :class:`DeviceBackendError`.
        On failure the ids generated here are taken out of the configuration again (the
        caller closes the devices already made)."""
        configs = [cfg for kind in DEVICE_KINDS for cfg in kind.configs(self.config)
                   if _created_at_boot(kind, cfg)]
        unnamed = [c for c in configs if c.id is None]
        try:
            if self._restore_slots is not None:
                for placed in self._restore_slots.values():
                    self.pci.reserve_slot(placed["slot"])
            for c in configs:
                if c.pci_device_id is not None and self._restore_slots is None:
                    self.segments[c.pci_segment].bus.reserve_slot(c.pci_device_id)
            for kind in DEVICE_KINDS:
                if kind.name == "balloon":      # the reference creates virtio-mem devices here
                    for zone in self.virtio_mem:
                        self._place_virtio(zone.id, zone.device, self._restored_slot(zone.id))
                for cfg in kind.configs(self.config):
                    if _created_at_boot(kind, cfg):
                        self._add_boot_device(kind, cfg)
            if self.config.pvpanic:
                self._add_pvpanic()
        except BaseException:
            for c in unnamed:
                c.id = None
            raise

    def _add_boot_device(self, kind: DeviceKind, cfg) -> None:
        if kind is VFIO:
            if cfg.id is None:
                cfg.id = self.next_device_name(kind.id_prefix)
            self._add_vfio_device(cfg)
            return
        dev_id = cfg.id or kind.fixed_id     # a single kind's id may be given, as any other
        if dev_id is None:
            cfg.id = dev_id = self.next_device_name(kind.id_prefix)
        factory = FACTORIES[kind.name]
        device = self._build(factory, cfg, dev_id)
        if kind.name == "balloon":
            self.balloon = device
        # The reference's rule: a 32-bit BAR only for boot devices of segment 0 that ask
        # for one (disks, for firmware).
        slot = cfg.pci_device_id
        use_64bit_bar = factory.boot_64bit_bar or cfg.pci_segment > 0
        if self._restore_slots is not None:
            slot = self._restored_slot(dev_id)
            use_64bit_bar = self._restore_slots[dev_id]["bar64"]
        self._place_virtio(dev_id, device, slot, kind=kind, segment=cfg.pci_segment,
                           use_64bit_bar=use_64bit_bar)

    def _restored_slot(self, dev_id: str) -> int | None:
        if self._restore_slots is None:
            return None
        placed = self._restore_slots.get(dev_id)
        if placed is None:
            raise DeviceManagerError(f"the snapshot has no device {dev_id}, which the "
                                     "configuration lists")
        return placed["slot"]

    def _add_pvpanic(self) -> None:
        """``--pvpanic``: the PCI pvpanic device after the others, as the reference places
        it, with the reference's id ``__pvpanic``."""
        device = PvPanicDevice(self.on_guest_event or (lambda event: None))
        slot = self.pci.add_device(device)
        address = bdf(self.pci.segment, slot)
        self.pvpanic = device
        self.tree.add_pci(PVPANIC_ID, address)
        log.info("%s at %s", PVPANIC_ID, address)

    # --- snapshot (VMM thread, VM paused) ---------------------------------------------------------
    SNAPSHOT_KINDS = frozenset({"disk", "net", "rng", "console", "virtio-mem"})
    """The device kinds whose whole state pych saves (the others are refused by name)."""

    def save_state(self, *, local_migration: bool = False) -> dict:
        """Every device's slot and BAR width (:meth:`slots`: a restore places them there),
        each device's state (config space, MSI-X, virtio registers and queues) and the id
        counter (the ``PHPR`` block is a bus device, saved with the others). Raises NotSnapshottable for a device pych cannot save
        yet, and while a removal is pending (the guest may eject the device at any time).
        ``local_migration``: the state goes to a local migration's receiver, which adopts
        the vhost-user connections that can be handed over (virtio-fs)."""
        with self._lock:
            self._check_saveable(local_migration)
            return {
                "slots": self._slots(),
                "devices": {dev_id: d.save_state() for dev_id, d in self.devices.items()},
                "id_counter": self._id_counter,
            }

    def slots(self) -> dict:
        """Each device's PCI slot and BAR width (where a restore places it)."""
        with self._lock:
            return self._slots()

    def _slots(self) -> dict:
        return {dev_id: {"slot": self._location(d)[1], "bar64": d.config.bar(0).is_64bit}
                for dev_id, d in self.devices.items()}

    def check_saveable(self, *, local_migration: bool = False) -> None:
        """What :meth:`save_state` would refuse (NotSnapshottable), for a VM still running
        (a live migration checks it when asked, before it starts)."""
        with self._lock:
            self._check_saveable(local_migration)

    def _check_saveable(self, local_migration: bool = False) -> None:
        """(``self._lock`` held) NotSnapshottable for what pych cannot save yet. A device
        served by a vhost-user back-end cannot be saved: its back-end holds the device's
        state (virtiofsd: the FUSE session, its open files and inode table) and cannot hand
        it to another back-end; a local migration hands the connection itself over
        (virtio-fs; see :meth:`VhostUserDevice.release_backend`)."""
        if self._pending_removal:
            raise NotSnapshottable("a device removal is pending (the guest has not ejected "
                             f"{', '.join(sorted(self._pending_removal))} yet): retry "
                             "once it has")
        if self.vfio_devices:
            raise NotSnapshottable("VFIO devices cannot be snapshotted "
                             f"({', '.join(self.vfio_devices)})")
        for dev_id in self.devices:
            kind = self._kinds.get(dev_id)
            name = kind.name if kind is not None else "virtio-mem"
            device = self.devices[dev_id].device
            if isinstance(device, VhostUserDevice):
                why = vhost_user_refusal(dev_id, device, local_migration)
                if why is None:
                    continue
                raise NotSnapshottable(why)
            if name not in self.SNAPSHOT_KINDS:
                raise NotSnapshottable(f"device {dev_id}: pych cannot snapshot {name} devices "
                                 f"yet (it can: {', '.join(sorted(self.SNAPSHOT_KINDS))})")

    def vhost_user_devices(self) -> dict:
        """The devices served by a vhost-user back-end, by id (a local migration hands
        their connections over)."""
        with self._lock:
            return {dev_id: d.device for dev_id, d in self.devices.items()
                    if isinstance(d.device, VhostUserDevice)}

    def tap_nets(self) -> dict:
        """The in-process virtio-net devices (on taps), by id (a live migration hands their
        taps over)."""
        with self._lock:
            return {dev_id: d.device for dev_id, d in self.devices.items()
                    if isinstance(d.device, VirtioNet)}

    def disk_images(self) -> list:
        """The image files of the in-process disks (for a live migration to hand their locks
        over to the receiver)."""
        with self._lock:
            devices = [d.device for d in self.devices.values()]
        return [device.image for device in devices
                if hasattr(getattr(device, "image", None), "relock")]

    def restore_state(self, saved: dict) -> None:
        """After :meth:`create_boot_devices` placed the devices at their saved slots: each
        device's state, BARs where the guest had them, the id counter."""
        missing = set(saved["devices"]) ^ set(self.devices)
        if missing:
            raise DeviceManagerError("the snapshot's devices and its configuration's differ: "
                                     + ", ".join(sorted(missing)))
        for dev_id, device in self.devices.items():
            device.restore_state(saved["devices"][dev_id])
        for segment in self.segments:
            segment.bus.restore_bars()
        self._id_counter = saved["id_counter"]

    def _build(self, factory: Factory, cfg, dev_id: str) -> VirtioDevice:
        """``factory`` applied to ``cfg`` (on its PCI segment: pmem maps into that segment's
        64-bit window), a refused backend reported as :class:`DeviceBackendError`."""
        try:
            return factory.make(cfg, dev_id, self._factory_contexts[cfg.pci_segment])
        except BACKEND_ERRORS as e:
            raise DeviceBackendError(str(e)) from e

    # --- PCI ------------------------------------------------------------------------------------
    def _place_virtio(self, dev_id: str, device: VirtioDevice, slot: int | None = None, *,
                      kind: DeviceKind | None = None, segment: int = 0,
                      use_64bit_bar: bool = True) -> str:
        """Put ``device`` (of ``kind``; None for the machine's virtio-mem devices) on the bus
        of PCI segment ``segment`` behind a virtio-pci transport; returns its BDF."""
        try:
            pci_dev = VirtioPciDevice(device, self.mem, self.msi, self.ioevents,
                                      use_64bit_bar=use_64bit_bar)
        except BaseException:
            device.shutdown()
            raise
        take = getattr(device, "take_adopted_notifiers", None)
        notifiers = take() if take is not None else None
        if notifiers is not None:       # a migrated vhost-user connection's eventfds
            try:
                pci_dev.adopt_notifiers(*notifiers)
            except BaseException:
                pci_dev.shutdown()
                raise
        try:
            slot = self.segments[segment].bus.add_device(pci_dev, slot)
        except BaseException:
            pci_dev.shutdown()
            raise
        pci_dev.intx = self.irq_line(layout.pci_intx_irq(slot))
        if hasattr(device, "on_failure"):         # a device whose back-end can go away
            device.on_failure = self.on_device_failed
        address = bdf(segment, slot)
        self.devices[dev_id] = pci_dev
        if kind is not None:
            self._kinds[dev_id] = kind
        self.tree.add_virtio(dev_id, address)
        log.info("%s at %s", dev_id, address)
        return address

    def to_aml(self) -> bytes:
        """The PCI hot plug controller, each segment's host bridge (with its hot plug slots)
        and the reservation of every segment's ECAM window."""
        return Sequence(self.hotplug_controller, *self.segments,
                        pci_ecam_reservation_aml(len(self.segments))).to_aml()

    # --- PCI hot plug (VMM thread; eject on the guest's vCPU thread) --------------------------
    def hotplug(self, kind: DeviceKind, cfg: Any) -> HotPlugged:
        """Hot add a device of ``kind`` (a hot-pluggable kind of the registry) configured by
        ``cfg`` (a ``DiskConfig``..., left untouched).

        The device is built from a copy of ``cfg`` with the next ``<kind.id_prefix>N`` of the
        shared counter as its id if it has none; the factory may fill in generated fields (a
        net's MAC), and that copy is returned for the VM configuration to record. The device
        is complete (backend opened and locked, transport with its MSI-X vectors, BARs placed,
        tree node) before its PCIU bit is set and the GED PCI event raised. On failure nothing
        is left behind (no slot, id, fd, thread or route): :class:`DeviceBackendError` if the
        backend cannot be used, :class:`DeviceManagerError` otherwise (id in use, slot taken
        or none left, a kind pych cannot hot plug)."""
        if kind is VFIO:
            return self._hotplug_vfio(cfg)
        factory = FACTORIES.get(kind.name)
        if factory is None or not kind.hotpluggable:
            raise DeviceManagerError(f"{kind.name} devices cannot be hot plugged by pych")
        with self._lock:
            if cfg.id is not None and cfg.id in self.tree:
                raise DeviceIdInUse(f"Identifier {cfg.id} is not unique"
                                         + (" (its removal is pending: the guest has not "
                                            "ejected it yet)" if cfg.id in self._pending_removal
                                            else ""))
            counter = self._id_counter
            cfg = cfg.model_copy(update={"id": cfg.id or self.next_device_name(kind.id_prefix)})
            try:
                device = self._build(factory, cfg, cfg.id)
                try:
                    address = self._place_virtio(cfg.id, device, cfg.pci_device_id, kind=kind,
                                                 segment=cfg.pci_segment)
                except PciBusError as e:
                    raise DeviceManagerError(str(e)) from e
            except BaseException:
                self._id_counter = counter          # the generated id was never used
                raise
            self.hotplug_controller.device_added(*self._location(self.devices[cfg.id]))
        self.notify(AcpiNotification.PCI)
        return HotPlugged(cfg, address)

    def _hotplug_vfio(self, device) -> HotPlugged:
        """Hot add the host PCI device ``device.path`` with VFIO (a ``DeviceConfig``, left
        untouched; the returned copy has its id, ``_vfioN`` by default). As for virtio
        devices the device is complete (DMA map, BARs, MSI-X routes, tree node) before its
        PCIU bit is set, and a failure leaves nothing behind: :class:`DeviceBackendError`
        when the path or the host cannot do VFIO, :class:`DeviceManagerError` otherwise."""
        with self._lock:
            if device.id is not None and device.id in self.tree:
                raise DeviceIdInUse(f"Identifier {device.id} is not unique")
            counter = self._id_counter
            device = device.model_copy(
                update={"id": device.id or self.next_device_name(VFIO.id_prefix)})
            try:
                address = self._add_vfio_device(device)
            except BaseException:
                self._id_counter = counter
                raise
            self.hotplug_controller.device_added(*self._location(self.vfio_devices[device.id]))
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
            slot = self.segments[device.pci_segment].bus.add_device(pci_dev, device.pci_device_id)
        except BaseException as e:
            pci_dev.shutdown()
            if isinstance(e, PciBusError):
                raise DeviceManagerError(str(e)) from e
            raise
        address = bdf(device.pci_segment, slot)
        self.vfio_devices[device.id] = pci_dev
        self._kinds[device.id] = VFIO
        self.tree.add_pci(device.id, address)
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
                    if isinstance(d.device, VhostUserDevice) and dev_id not in self._pending_removal
                    and getattr(d.device, "daemon", None) is None]
        for dev_id, device in kept:
            try:
                self.vhost_user.park(dev_id, device.socket_path, device.detach_backend())
            except Exception:  # noqa: BLE001 - the device then hangs up with the rest
                log.exception("%s: cannot keep its vhost-user connection", dev_id)

    def _vhost_user_devices(self) -> list[VhostUserDevice]:
        with self._lock:
            return [d.device for d in self.devices.values()
                    if isinstance(d.device, VhostUserDevice)]

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
                kind = self._kinds.get(dev_id)
                if kind is None or not kind.removable:
                    raise RemovalNotAllowed(dev_id, pci_dev.device.device_type.name.lower())
            self._pending_removal[dev_id] = on_ejected
            self.hotplug_controller.removal_requested(*self._location(pci_dev))
        self.notify(AcpiNotification.PCI)
        return dev_id

    def _location(self, pci_dev) -> tuple[int, int]:
        """(segment, slot) of a device on one of the segments' buses."""
        for segment in self.segments:
            slot = segment.bus.slot_of(pci_dev)
            if slot is not None:
                return segment.id, slot
        raise DeviceManagerError("the device is on no PCI segment")

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
            bus = self.segments[segment].bus if 0 <= segment < len(self.segments) else None
            pci_dev = bus.device(slot) if bus is not None else None
            dev_id = next((i for i, d in (*self.devices.items(), *self.vfio_devices.items())
                           if d is pci_dev), None)
            if dev_id is None or dev_id not in self._pending_removal:
                log.warning("guest ejected PCI %s, which is not pending removal: ignored",
                            bdf(segment, slot))
                return
            on_ejected = self._pending_removal.pop(dev_id)
            address = bdf(segment, slot)
            bus.remove_device(slot)
            if self.devices.pop(dev_id, None) is None:
                del self.vfio_devices[dev_id]
            del self._kinds[dev_id]
            self.tree.remove(dev_id)
            pci_dev.shutdown()
        log.info("%s at %s ejected by the guest and removed", dev_id, address)
        if on_ejected is not None:
            on_ejected(dev_id, address)

    def counters(self) -> dict[str, dict[str, int]]:
        """``vm.counters``: each virtio device that keeps counters, by id (the reference's
        ``DeviceManager::counters``)."""
        with self._lock:
            devices = list(self.devices.items())
        return {dev_id: counters for dev_id, pci_dev in devices
                if (counters := pci_dev.device.counters()) is not None}

    def failed_devices(self) -> list[dict[str, str]]:
        """The devices whose back-end went away (``[{"id", "error"}]``): they answer the
        guest with errors until removed."""
        with self._lock:
            devices = list(self.devices.items())
        return [{"id": dev_id, "error": failure} for dev_id, pci_dev in devices
                if (failure := getattr(pci_dev.device, "failure", None)) is not None]

    def describe_failure(self, dev_id: str) -> str | None:
        """Why device ``dev_id`` failed, as fully as can be told (None: it did not, or it is
        gone); for the control loop (it may wait a little for a daemon's exit status)."""
        with self._lock:
            pci_dev = self.devices.get(dev_id)
        describe = getattr(pci_dev.device, "describe_failure", None) if pci_dev else None
        return describe() if describe is not None else None

    def resize_disk(self, dev_id: str, size: int) -> None:
        """``vm.resize-disk``: grow disk ``dev_id`` to ``size`` bytes and tell the guest.
        UnknownDeviceId if no disk has that id; InvalidDiskResize for a size that is not a
        multiple of 512, smaller than the disk (shrinking is refused: the guest's data
        there would go), or a disk whose back-end pych does not own; DeviceBackendError
        when the image or its daemon fails."""
        with self._lock:
            pci_dev = self.devices.get(dev_id)
            kind = self._kinds.get(dev_id)
        if pci_dev is None or kind is None or kind.name != "disk":
            raise UnknownDeviceId(dev_id)
        device = pci_dev.device
        if size % 512:
            raise InvalidDiskResize("Disk image size is not a multiple of 512")
        current = device.capacity * 512
        if size < current:
            raise InvalidDiskResize(f"shrinking disks is not supported: {dev_id} has "
                                    f"{current} bytes, {size} asked for")
        try:
            device.resize(size)
        except ValueError as e:
            raise InvalidDiskResize(str(e)) from None
        except OSError as e:
            raise DeviceBackendError(f"Disk resize failed: {e.strerror or e}") from None

    def pending_removal(self) -> list[str]:
        """Ids of the devices the guest has been asked to eject and has not ejected yet."""
        with self._lock:
            return sorted(self._pending_removal)

    def device_tree(self) -> dict:
        """``vm.info``'s ``device_tree`` (see :meth:`DeviceTree.to_json`)."""
        with self._lock:
            return self.tree.to_json()

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

    # lead: delete these at merge: the VMM calls ``hotplug(kind, config)``.
    def add_disk(self, disk) -> HotPlugged:
        return self.hotplug(BY_NAME["disk"], disk)

    def add_net(self, net) -> HotPlugged:
        return self.hotplug(BY_NAME["net"], net)

    def add_fs(self, fs) -> HotPlugged:
        return self.hotplug(BY_NAME["fs"], fs)

    def add_pmem(self, pmem) -> HotPlugged:
        return self.hotplug(BY_NAME["pmem"], pmem)

    def add_vsock(self, vsock) -> HotPlugged:
        return self.hotplug(BY_NAME["vsock"], vsock)

    def add_vfio(self, device) -> HotPlugged:
        return self.hotplug(VFIO, device)


def vhost_user_refusal(dev_id: str, device: VhostUserDevice, local_migration: bool) -> str | None:
    """Why the state of ``device`` (served by a vhost-user back-end) cannot be saved for a
    snapshot or a migration (``local_migration``: a local one, which hands the connection
    over when the device can), in words a user can act on; None when it can."""
    what = device.what
    if local_migration:
        why = device.can_hand_over()
        if why is None:
            return None
        if not device.adoptable and what == "vhost-user-net":
            return (f"device {dev_id}: pych cannot migrate {what} devices yet, not even "
                    "locally: only virtio-fs and vhost-user-blk connections are handed over "
                    "to the receiver; remove the device before migrating")
        return f"device {dev_id}: its vhost-user connection cannot be handed over: {why}"
    if what == "virtio-fs":
        return (f"device {dev_id}: the state of {what} {dev_id} lives in its back-end at "
                f"{device.socket_path} (virtiofsd keeps the guest's FUSE session: open "
                "files and the inode table) and virtiofsd cannot save it or hand it to "
                "another virtiofsd, so neither a snapshot nor a migration to another host "
                "can keep it; a local migration (vm.send-migration with \"local\": true, "
                "guest RAM shared) keeps the same virtiofsd serving the guest")
    local = (" (a local migration, vm.send-migration with \"local\": true, hands the same "
             "connection over)" if device.adoptable else "")
    return (f"device {dev_id}: the state of {what} {dev_id} lives in its back-end at "
            f"{device.socket_path} (its rings and the requests in flight), which pych cannot "
            f"save or move to another host{local}; remove the device first")


def _created_at_boot(kind: DeviceKind, cfg) -> bool:
    """Whether the configured device ``cfg`` of ``kind`` is created at boot: VFIO devices and
    the kinds with a factory that wants it (a console that is off is not created)."""
    if kind is VFIO:
        return True
    factory = FACTORIES.get(kind.name)
    return factory is not None and factory.wanted(cfg)


def _config_identifiers(config) -> frozenset[str]:
    """Every id ``config`` uses: its devices', rate limit groups', rtc's and memory zones'."""
    # lead: use VmConfig.identifiers()
    ids = {device.id for _, device in kinds.devices(config)}
    ids.update(group.id for group in config.rate_limit_groups or ())
    ids.update(zone.id for zone in config.memory.zones or ())
    if config.rtc is not None:
        ids.add(config.rtc.id)
    ids.discard(None)
    return frozenset(ids)
