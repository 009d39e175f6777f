"""The memory manager: boot RAM, and (with ``hotplug_size``) memory hot plug: ACPI DIMMs (the
hot plug window, and the DIMM slots' register block and AML, ``\\_SB_.MHPC``, in
:mod:`pych.memory.hotplug`) or virtio-mem.

It owns the guest's RAM (:class:`~pych.memory.guest_memory.GuestMemory`), laid out by
:mod:`pych.memory.layout`. Boot RAM is made of zones (:mod:`pych.memory.zones`): the user's
``--memory-zone`` options (with ``--memory size=0``), else one default zone ``mem0`` of
``--memory size``. Each zone is one memfd (or its ``file``); :func:`boot_ram_layout` lays the
zones out one after the other over the RAM ranges around the 32-bit hole, and each piece is a
mapping of the zone's memory registered as a KVM memslot. After boot RAM comes the hot plug
space, which is only guest physical address space until RAM is plugged into it.

ACPI hot plug (../shared/notes/ch-hotplug-reference.md §4.1), end to end:

1. ``vm.resize`` (:func:`pych.memory.resize.resize_ram`, which holds the rules) asks
   :meth:`MemoryManager.resize` for more RAM. The increase becomes one new DIMM: a new memfd
   region (named ``dimm<n>``, so it stays out of the boot e820 map) placed at the next
   128 MiB boundary after the RAM so far, registered as a new KVM memslot, and put in the
   lowest never-used slot of the :class:`MemoryHotplugController`, marked enabled and
   inserting.
2. The GED raises ``AcpiNotification.MEMORY``; the guest's ``\\_SB_.GEC_.ESCN`` calls
   ``\\_SB_.MHPC.MSCN``, which walks the slots through the register block, notifies the
   ``Mnnn`` device of each inserting slot and acknowledges it.
3. The guest's ACPI memory driver evaluates ``Mnnn._STA`` / ``_CRS`` (``MSTA`` / ``MCRS``),
   adds the range, and onlines it if ``auto_online_blocks`` says so.

A reduction changes the configuration at once, so the next boot (a new memory manager) uses
it as its boot RAM size. Beyond the reference, it also asks the guest to give the most recently
added DIMMs back live (as many as fit above the new size): each slot is marked removing, the
GED raises ``AcpiNotification.MEMORY``, ``MSCN`` sends the ``Mnnn`` device an eject request (3),
and a guest that can offline the DIMM's blocks (they were onlined movable) evaluates ``_EJ0``
(``MEJ0``): the memory manager then removes the memslot and frees the memfd, on that vCPU
thread. A guest that cannot offline them reports the failure through ``_OST`` (``MOEV``,
``MOSC``): the DIMM is kept and ``vm.info`` says so; the reduction waits for the next boot.

virtio-mem (``hotplug_method=virtio-mem``, reference §4.2): each zone with a
``hotplug_size`` (``mem0`` when there are no user zones) gets a region placed by
:func:`virtio_mem_layout`, one memfd mapped and registered as a single memslot at boot, and
its :class:`~pych.devices.virtio.mem.VirtioMem` device (id: the zone's), which the device
manager puts on the PCI bus. ``vm.resize`` (no user zones) and ``vm.resize-zone`` (user
zones; both in :mod:`pych.memory.resize`) set the device's requested size to the desired size
minus the zone's boot RAM (:meth:`MemoryManager.resize_virtio_mem`); the guest's driver plugs
or unplugs 2 MiB blocks, and unplugged blocks are discarded from the host (see
``pych.devices.virtio.mem``).

VFIO: region listeners (:meth:`MemoryManager.add_region_listener`) hear of each DIMM when
it is plugged and before it is freed on eject; block listeners (``add_block_listener``) of
each virtio-mem block when the guest plugs it and before its memory is discarded on unplug.
:meth:`MemoryManager.dma_ranges` is what may be DMA-mapped at any moment.
"""

from __future__ import annotations

import os
import functools
import logging
from dataclasses import dataclass
from typing import Callable

from pych.arch.x86_64 import layout
from pych.devices.acpi import AcpiNotification
from pych.devices.bus import Bus
from pych.devices.virtio.mem import BLOCK_SIZE as VIRTIO_MEM_BLOCK_SIZE
from pych.devices.virtio.mem import REGION_ALIGNMENT, VirtioMem, VirtioMemResizeError
from pych.hypervisor.kvm import Vm
from pych.memory.guest_memory import GuestMemory, MemoryRegion
from pych.memory.hotplug import (
    DimmSlot, MemoryHotplugController, hotplug_slot_count, memory_hotplug_stub_aml,
)
from pych.memory.layout import (HOTPLUG_ALIGNMENT, boot_ram_layout, hotplug_region_start,
                                virtio_mem_layout)
from pych.memory.resize import InvalidMemoryResize, MemoryResizeError
from pych.memory import hugepages
from pych.memory.zones import (DEFAULT_MEMORY_ZONE, MemoryZone, VirtioMemZone,
                               dimm_hugepage_size, map_error, mergeable, prefault,
                               transparent_huge_pages, zone_specs)

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class RamRange:
    """A piece of guest RAM that is not a whole region: a plugged virtio-mem block."""

    gpa: int
    size: int
    host_addr: int
    name: str


RegionListener = Callable[[MemoryRegion | RamRange], None]



def _blocks(region: MemoryRegion, gpa: int, size: int) -> list[RamRange]:
    """``[gpa, gpa + size)`` of the virtio-mem ``region`` as one :class:`RamRange` per block
    (VFIO maps virtio-mem memory block by block, so any block can be unmapped alone)."""
    return [RamRange(block, VIRTIO_MEM_BLOCK_SIZE, region.host_addr + block - region.gpa,
                     f"{region.name}+{block - region.gpa:#x}")
            for block in range(gpa, gpa + size, VIRTIO_MEM_BLOCK_SIZE)]



class MemoryManager:
    """Guest RAM of one boot. ``notify`` raises GED events (``AcpiNotification.MEMORY``);
    with ACPI hot plug the register block is put on ``mmio`` at ``ACPI_MEM_HOTPLUG_ADDR``;
    with virtio-mem, :attr:`virtio_mem_zones` are the regions (and their devices) the device
    manager puts on the PCI bus."""

    def __init__(self, config, kvm_vm: Vm, mmio: Bus, *,
                 notify: Callable[[AcpiNotification], None]):
        self.config = config            # MemoryConfig; the VMM edits it for the next boot
        self.kvm_vm = kvm_vm
        self.mmio = mmio
        self.notify = notify
        self.guest_memory = GuestMemory()
        self.hotplug_controller: MemoryHotplugController | None = None
        self.zones: dict[str, MemoryZone] = {}
        self._window = (layout.RAM_64BIT_START, 0)
        self._dimms = 0                 # slots used so far (never reused within a boot)
        self._region_listeners: list[tuple[RegionListener, RegionListener | None]] = []
        self._block_listeners: list[tuple[RegionListener, RegionListener]] = []
        self._dimm_regions: dict[int, MemoryRegion] = {}     # slot -> its plugged DIMM

    def add_region_listener(self, added: RegionListener,
                            removed: RegionListener | None = None) -> None:
        """Call ``added(region)`` for each DIMM plugged from now on, once it is guest RAM,
        and ``removed(region)`` for each DIMM the guest ejects, before its memory goes
        (VFIO devices DMA-map and unmap it, vhost-user back-ends map it). Listeners report
        their own failures; they do not raise."""
        self._region_listeners.append((added, removed))

    def add_block_listener(self, plugged: RegionListener, unplugged: RegionListener) -> None:
        """Call ``plugged(block)`` for each 2 MiB virtio-mem block the guest plugs, before
        the guest may use it, and ``unplugged(block)`` for each it unplugs, before the host
        memory is discarded (a :class:`RamRange` each; the region itself is in the memory
        map from boot on, so only DMA mappings follow its blocks). Called on the device's
        worker thread; listeners report their own failures."""
        self._block_listeners.append((plugged, unplugged))

    # --- boot RAM ------------------------------------------------------------------------------
    def create_boot_memory(self) -> GuestMemory:
        """Map boot RAM, zone by zone as :func:`boot_ram_layout` places it (one memfd, or the
        zone's ``file``, per zone), and the hot plug space after it: with ACPI an address
        window only; with virtio-mem one region per zone with a ``hotplug_size``, placed by
        :func:`virtio_mem_layout`, mapped but not populated, with its device.

        Raises ValueError for what pych cannot back (a host NUMA node, a missing or short
        ``file``, huge pages the host's pool cannot give) and for a virtio-mem ``hotplug_size`` that is not a
        multiple of 128 MiB."""
        specs = zone_specs(self.config)
        adopt = getattr(self, "_adopt_fds", None) or {}
        for spec in specs:
            self.zones[spec.id] = MemoryZone(spec, adopt.pop(f"zone:{spec.id}", None))
        for i, piece in enumerate(boot_ram_layout([(s.id, s.size) for s in specs])):
            zone = self.zones[piece.zone]
            try:
                region = self.guest_memory.add_region(piece.gpa, piece.size, fd=zone.fd,
                                                      fd_offset=piece.offset, name=f"ram{i}",
                                                      shared=zone.shared_mapping)
            except OSError as e:
                raise map_error(e, zone.spec.option, zone.hugepage_size, piece.size) from None
            zone.regions.append(region)
            region.slot = self.kvm_vm.add_memory(piece.gpa, piece.size, region.host_addr)
            if zone.spec.thp:
                transparent_huge_pages(region, zone.spec.option)
            if zone.spec.mergeable:
                mergeable(region, zone.spec.option)
            if zone.spec.prefault:
                prefault(region, zone.spec.option)
        size = self.config.hotplug_size
        if size and self.config.hotplug_method == "Acpi":
            self._window = (hotplug_region_start(self.guest_memory.end), size)
            self.hotplug_controller = MemoryHotplugController(
                layout.ACPI_MEM_HOTPLUG_ADDR, hotplug_slot_count(size, HOTPLUG_ALIGNMENT),
                on_eject=self._eject)
            self.mmio.insert(layout.ACPI_MEM_HOTPLUG_ADDR, MemoryHotplugController.SIZE,
                             self.hotplug_controller)
            return self.guest_memory
        hotplug = [(s.id, s.hotplug_size) for s in specs if s.hotplug_size]
        for zone_id, size in hotplug:
            if size % REGION_ALIGNMENT:
                raise ValueError(f"virtio-mem hotplug_size {size} of memory zone {zone_id} is "
                                 f"not a multiple of {REGION_ALIGNMENT >> 20} MiB")
        regions = virtio_mem_layout(self.guest_memory.end, hotplug)
        for zone_id, gpa, size in regions:
            zone = self.zones[zone_id]
            adopted = adopt.pop(f"virtio-mem:{zone_id}", None)
            region = self.guest_memory.add_region(gpa, size, name=f"virtio-mem-{zone_id}",
                                                  fd=adopted, adopt=adopted is not None)
            region.slot = self.kvm_vm.add_memory(gpa, size, region.host_addr)
            if self.config.thp:
                transparent_huge_pages(region, "--memory")
            device = VirtioMem(region, requested_size=zone.spec.hotplugged_size or 0,
                               name=zone_id)
            region.in_use = device.plugged_offsets
            device.add_plug_listener(functools.partial(self._blocks_changed, region, 0),
                                     functools.partial(self._blocks_changed, region, 1))
            zone.virtio_mem = VirtioMemZone(zone_id, region, zone.spec.hotplugged_size or 0,
                                            device)
        if regions:
            start = regions[0][1]
            self._window = (start, regions[-1][1] + regions[-1][2] - start)
        else:
            self._window = (max(layout.RAM_64BIT_START, self.guest_memory.end), 0)
        return self.guest_memory

    @property
    def virtio_mem_zones(self) -> list[VirtioMemZone]:
        """The virtio-mem regions, in zone order (the order their devices go on the bus)."""
        return [z.virtio_mem for z in self.zones.values() if z.virtio_mem is not None]

    @property
    def hotplug_window(self) -> tuple[int, int]:
        """``(start, size)`` of the hot plug space (the ACPI DIMM window, or from the first
        virtio-mem region to the end of the last); ``size`` is 0 without one, and then
        ``start`` is where RAM ends (at least 4 GiB). Fixed for the boot: the 64-bit PCI
        window is placed after it."""
        return self._window

    @property
    def actual_size(self) -> int:
        """RAM the guest has now: boot RAM plus every plugged DIMM and virtio-mem block."""
        size = self.guest_memory.total_size
        for zone in self.virtio_mem_zones:
            size += zone.device.plugged_size - zone.region.size
        return size

    def dma_ranges(self) -> list:
        """What devices may DMA to now: boot RAM, every DIMM, and each plugged virtio-mem
        block (a :class:`RamRange` each; an unplugged block has no host memory to map)."""
        sparse = {id(z.region) for z in self.virtio_mem_zones}
        ranges = [r for r in self.guest_memory.regions if id(r) not in sparse]
        for zone in self.virtio_mem_zones:
            for gpa, size in zone.device.plugged_ranges():
                ranges += _blocks(zone.region, gpa, size)
        return ranges

    def _blocks_changed(self, region: MemoryRegion, which: int, gpa: int, size: int) -> None:
        """virtio-mem's plug listener for ``region``: ``which`` 0 plugged, 1 unplugged."""
        for block in _blocks(region, gpa, size):
            for listeners in self._block_listeners:
                listeners[which](block)

    # --- snapshot -------------------------------------------------------------------------------
    def save_state(self) -> dict:
        """The layout of this boot's RAM: each zone's boot RAM as booted (the configuration
        may already say more, for the next boot) and every plugged DIMM (the ``MHPC`` block
        is a bus device, saved with the others). The contents are saved region by region (:meth:`saved_regions`)."""
        self.check_saveable()
        return {
            "zones": {zone_id: sum(r.size for r in zone.regions)
                      for zone_id, zone in self.zones.items()},
            "dimms": {str(slot): {"gpa": r.gpa, "size": r.size}
                      for slot, r in self._dimm_regions.items()},
            "dimms_used": self._dimms,
            "virtio_mem": {z.id: {"gpa": z.region.gpa, "size": z.region.size}
                           for z in self.virtio_mem_zones},
        }

    def check_saveable(self) -> None:
        """NotSnapshottable for RAM pych cannot save yet (none now: boot RAM, DIMMs and
        virtio-mem regions are all saved; kept for the callers' one check)."""

    def saved_regions(self) -> list[tuple[MemoryRegion, bool]]:
        """Each RAM region, and whether a snapshot copies it: not a region mapped shared
        from the zone's own ``file``, which is the guest's memory itself (recorded by path
        in the configuration, not copied)."""
        shared_files = {id(r) for zone in self.zones.values()
                        if zone.spec.file and zone.spec.shared for r in zone.regions}
        return [(r, id(r) not in shared_files) for r in self.guest_memory.regions]

    def shared_fds(self) -> tuple[dict[str, int], list[int]]:
        """For a local migration: each zone's, virtio-mem region's and DIMM's memfd, as
        ``{"zone:<id>", "virtio-mem:<zone id>" or "dimm<slot>": index}`` into the list of fds
        returned with it (not duplicated)."""
        names: dict[str, int] = {}
        fds: list[int] = []
        for zone_id, zone in self.zones.items():
            if zone.fd >= 0:
                names[f"zone:{zone_id}"] = len(fds)
                fds.append(zone.fd)
        for zone in self.virtio_mem_zones:
            names[f"virtio-mem:{zone.id}"] = len(fds)
            fds.append(zone.region.fd)
        for slot, region in self._dimm_regions.items():
            names[f"dimm{slot}"] = len(fds)
            fds.append(region.fd)
        return names, fds

    def restore_state(self, saved: dict, fds: dict[str, int] | None = None) -> None:
        """Map this boot's RAM as a snapshot had it (instead of :meth:`create_boot_memory`):
        each zone's boot RAM at its booted size, then every DIMM in its slot. The contents
        are loaded by the caller. ``fds`` (a local migration, see :meth:`shared_fds`): map
        these memfds (taken over, closed with the memory) instead of new ones."""
        self._adopt_fds = dict(fds or {})
        try:
            self._restore_layout(saved)
        finally:
            for fd in self._adopt_fds.values():     # not used: still ours to close
                try:
                    os.close(fd)
                except OSError:
                    pass
            self._adopt_fds = {}

    def _restore_layout(self, saved: dict) -> None:
        live = self.config
        zones = saved["zones"]
        if live.zones:
            booted = live.model_copy(update={"zones": [
                z.model_copy(update={"size": zones[z.id]}) for z in live.zones]})
        else:
            booted = live.model_copy(update={"size": zones[DEFAULT_MEMORY_ZONE]})
        self.config = booted
        try:
            self.create_boot_memory()
        finally:
            self.config = live
        placed = {z.id: {"gpa": z.region.gpa, "size": z.region.size}
                  for z in self.virtio_mem_zones}
        if placed != saved.get("virtio_mem", {}):
            raise ValueError(f"the saved virtio-mem regions {saved.get('virtio_mem', {})} are not "
                             f"where this configuration places them ({placed})")
        for slot, dimm in sorted(saved["dimms"].items(), key=lambda item: int(item[0])):
            region = self._add_dimm_region(dimm["gpa"], dimm["size"], int(slot),
                                           adopt_fd=self._adopt_fds.pop(f"dimm{slot}", None))
            self._dimm_regions[int(slot)] = region
        self._dimms = saved["dimms_used"]

    # --- vm.resize (pych.memory.resize validates the request, then calls these) -------------
    def resize(self, desired: int) -> bool:
        """ACPI hot plug: make the guest's RAM ``desired`` bytes; returns whether the guest
        was asked to change anything.

        Sizes count from the RAM the guest keeps once the removals already asked for are
        done. An increase becomes one new DIMM, announced to the guest through the GED. A
        reduction asks the guest to eject the most recently added DIMMs, as many as can go
        without going below ``desired`` (the configuration keeps the whole reduction for the
        next boot); the DIMMs go when the guest ejects them (:meth:`_eject`).

        Raises :class:`InvalidMemoryResize` when there is no hot plug window, or when the
        increase is not a multiple of 128 MiB or does not fit the window, and
        :class:`MemoryResizeError` when every slot of this boot has been used.
        """
        plan = self._plan(desired)
        if plan is None:
            return False
        if isinstance(plan, list):
            return self._request_removal(plan, self._current(plan), desired)
        gpa, increase = plan
        index = self._dimms
        region = self._add_dimm_region(gpa, increase, index)
        self._dimms += 1
        self._dimm_regions[index] = region
        for added, _ in self._region_listeners:
            added(region)
        self.hotplug_controller.insert(index, gpa, increase)
        log.info("memory: DIMM %d at %#x, %d MiB", index, gpa, increase // layout.MiB)
        self.notify(AcpiNotification.MEMORY)
        return True

    def _add_dimm_region(self, gpa: int, size: int, index: int, *,
                         adopt_fd: int | None = None) -> MemoryRegion:
        """DIMM ``index``'s RAM, mapped and registered: backed as ``--memory`` says (huge
        pages, private mergeable memory, or a memfd of its own with the THP advice), or by
        ``adopt_fd``, the DIMM's memfd passed by a local migration's sender (then ours)."""
        hugepage_size = dimm_hugepage_size(self.config)
        fd = adopt_fd if adopt_fd is not None else (-1 if self.config.mergeable else None)
        try:
            region = self.guest_memory.add_region(
                gpa, size, fd=fd, name=f"dimm{index}", hugepage_size=hugepage_size,
                adopt=adopt_fd is not None)
        except OSError as e:
            raise map_error(e, "--memory", hugepage_size, size) from None
        try:
            if self.config.thp and not hugepage_size:
                transparent_huge_pages(region, "--memory")
            if self.config.mergeable:
                mergeable(region, "--memory")
            region.slot = self.kvm_vm.add_memory(gpa, size, region.host_addr)
        except Exception:
            self.guest_memory.remove_region(region)
            raise
        return region

    def check_resize(self, desired: int) -> None:
        """What :meth:`resize` would refuse, without doing anything."""
        self._plan(desired)

    def _current(self, slots: list[DimmSlot]) -> int:
        """The RAM the guest keeps once the removals already asked for are done."""
        return self.actual_size - sum(s.length for s in slots if s.pending_removal)

    def _plan(self, desired: int) -> list[DimmSlot] | tuple[int, int] | None:
        """What :meth:`resize` does for ``desired``: None (nothing), the DIMM slots to
        choose removals from (a reduction), or the new DIMM's ``(gpa, size)`` (an increase);
        raises as :meth:`resize` does."""
        slots = self.hotplug_controller.snapshot() if self.hotplug_controller is not None else []
        current = self._current(slots)
        if desired < current:
            return slots
        if desired == current:
            return None
        increase = desired - current
        start, size = self._window
        if self.hotplug_controller is None:
            raise InvalidMemoryResize(
                "memory hot plug needs ACPI hot plug space: boot with --memory "
                "hotplug_size=<size> (hotplug_method=acpi)")
        if increase % HOTPLUG_ALIGNMENT:
            raise InvalidMemoryResize(
                f"the memory increase ({increase} bytes: desired {desired} - current {current})"
                f" must be a multiple of 128 MiB ({HOTPLUG_ALIGNMENT} bytes)")
        gpa = hotplug_region_start(self.guest_memory.end)
        if gpa + increase > start + size:
            available = max(0, start + size - gpa)
            raise InvalidMemoryResize(
                f"not enough hot plug space: {increase} bytes requested, {available} bytes left "
                f"of hotplug_size {size} (window {start:#x}-{start + size:#x})")
        if self._dimms == len(self.hotplug_controller.slots):
            raise MemoryResizeError(
                f"no memory hot plug slot left: all {self._dimms} slots of this boot are used "
                f"(the next boot starts with the current size as boot RAM)")
        if self.config.hugepages:
            try:
                hugepages.check_available(
                    [("--memory", dimm_hugepage_size(self.config), increase)])
            except hugepages.HugePageError as e:
                raise MemoryResizeError(f"cannot plug a DIMM of {increase >> 20} MiB: {e}") \
                    from None
        return gpa, increase

    def _request_removal(self, slots: list[DimmSlot], current: int, desired: int) -> bool:
        """Ask the guest to eject the newest DIMMs that fit between ``current`` and
        ``desired``; returns whether any was asked for."""
        asked = False
        for index in reversed(range(len(slots))):
            slot = slots[index]
            if not slot.enabled or slot.pending_removal:
                continue
            if current - slot.length < desired:
                break
            self.hotplug_controller.request_removal(index)
            current -= slot.length
            asked = True
            log.info("memory: asking the guest to eject DIMM %d (%d MiB)", index,
                     slot.length // layout.MiB)
        if asked:
            self.notify(AcpiNotification.MEMORY)
        return asked

    def _eject(self, index: int) -> None:
        """The guest ejected DIMM ``index`` (on its vCPU thread): stop DMA to it, take the
        memslot away, free the memory and empty the slot."""
        region = self._dimm_regions.pop(index)
        for _, removed in self._region_listeners:
            if removed is not None:
                removed(region)
        self.kvm_vm.remove_memory(region.slot, region.gpa)
        self.guest_memory.remove_region(region)
        self.hotplug_controller.clear(index)
        log.info("memory: DIMM %d at %#x ejected by the guest and freed", index, region.gpa)

    def _virtio_mem_zone(self, zone_id: str) -> VirtioMemZone:
        """Zone ``zone_id``'s virtio-mem region; :class:`MemoryResizeError` if it has none."""
        zone = self.zones[zone_id].virtio_mem
        if zone is None:
            raise MemoryResizeError(f"memory zone {zone_id} has no virtio-mem device")
        return zone

    def check_resize_virtio_mem(self, zone_id: str) -> None:
        """What :meth:`resize_virtio_mem` would refuse for a size
        :func:`~pych.memory.resize.virtio_mem_request` accepted, without doing anything."""
        self._virtio_mem_zone(zone_id)

    def resize_virtio_mem(self, zone_id: str, requested: int) -> bool:
        """virtio-mem: ask zone ``zone_id``'s device for ``requested`` bytes (a size
        :func:`~pych.memory.resize.virtio_mem_request` accepted); the guest's driver plugs or
        unplugs blocks in its own time. Returns False, changing nothing, when that is already
        requested. Raises :class:`InvalidMemoryResize` if the device refuses the size and
        :class:`MemoryResizeError` if the zone has no virtio-mem device."""
        zone = self._virtio_mem_zone(zone_id)
        try:
            return zone.device.resize(requested)
        except VirtioMemResizeError as e:
            raise InvalidMemoryResize(str(e)) from None

    # --- vm.info ------------------------------------------------------------------------------
    def hotplug_info(self) -> dict | None:
        """What ``vm.info`` reports beyond the reference (``memory_hotplug``); None without
        memory hot plug. Everything here is what the VMM itself knows or what the guest
        told it; whether the guest has *onlined* the memory is not visible to a VMM (it is
        the guest kernel's policy, e.g. ``auto_online_blocks``) and is not reported.

        ``{"method": "Acpi", "window": {"start", "size"}, "dimms": [...]}``, one entry per
        plugged DIMM: ``id`` (``dimm<slot>``), ``slot``, ``address``, ``size`` and
        ``state``: ``"announced"`` until the guest's scan (``MSCN``) acknowledged it, then
        ``"acknowledged"``; ``"removing"`` while the guest is asked to eject it; ``"kept"``
        when the guest refused the eject. ``ost_event`` and ``ost_status``, once the guest
        has reported on the DIMM through ``_OST``: its last report, the event it handled
        (1: the insertion, 3: an eject request) and its status (0: success, i.e. the guest
        added the DIMM or ejects it; 0x80 and up: it failed, e.g. 0x80 for an eject the
        guest does not support).

        ``{"method": "VirtioMem", "window": ..., "virtio_mem": [...]}``, one entry per
        virtio-mem device (the default ``mem0``, or each user-defined zone with a
        ``hotplug_size``): ``id`` (the zone's), ``address`` and ``size`` of its region,
        ``block_size``, ``requested_size`` (what the VMM asks for), ``plugged_size`` (what
        the guest's driver has plugged: the blocks it asked for and got, i.e. the guest's
        own account) and ``driver_active`` (whether the guest's driver has the device
        running: without it the requested size is not acted on).
        """
        start, size = self._window
        zones = self.virtio_mem_zones
        if zones:
            return {
                "method": "VirtioMem",
                "window": {"start": start, "size": size},
                "virtio_mem": [{"id": z.id, "address": z.region.gpa, "size": z.region.size,
                                "block_size": VIRTIO_MEM_BLOCK_SIZE,
                                "requested_size": z.device.requested_size,
                                "plugged_size": z.device.plugged_size,
                                "driver_active": z.device.active}
                               for z in zones],
            }
        if self.hotplug_controller is None:
            return None
        return {"method": "Acpi", "window": {"start": start, "size": size},
                "dimms": self.hotplug_controller.dimms_info()}

    def to_aml(self) -> bytes:
        """``\\_SB_.MHPC``: the real controller with ACPI hot plug, else the reference's stub."""
        if self.hotplug_controller is None:
            return memory_hotplug_stub_aml().to_aml()
        return self.hotplug_controller.to_aml()

    def close(self) -> None:
        self.guest_memory.close()
        for zone in self.zones.values():
            zone.close()
