"""The memory resize rules, in one place: ``vm.resize``'s ``desired_ram`` (:func:`resize_ram`)
and ``vm.resize-zone`` (:func:`resize_zone`).

Each validates the request against the configuration, acts on the running VM's memory
manager if there is one (a new ACPI DIMM or an eject request, or a virtio-mem requested
size), then updates the configuration so the next boot comes back with the size asked for.
A refused request changes nothing. Errors: :class:`InvalidMemoryResize` (the request is
wrong for this VM), :class:`UnknownMemoryZone` (no zone has that id) and
:class:`MemoryResizeError` (the VM could not carry it out).
"""

from __future__ import annotations

import os
from typing import TYPE_CHECKING

from pych.devices.virtio.mem import BLOCK_SIZE as VIRTIO_MEM_BLOCK_SIZE
from pych.memory.zones import DEFAULT_MEMORY_ZONE

if TYPE_CHECKING:
    from pych.config import MemoryConfig
    from pych.memory.manager import MemoryManager

RESIZE_WITH_ZONES = ("Not allowed to resize guest memory when backed with user defined memory "
                     "zones: resize each zone with vm.resize-zone")
RESIZE_ZONE_WITHOUT_ZONES = ("Not allowed to resize guest memory zone when no zone is defined "
                             "(--memory size=0 with --memory-zone): use vm.resize")


class MemoryResizeError(Exception):
    """A memory resize the memory manager cannot carry out; the message says why."""


class InvalidMemoryResize(MemoryResizeError):
    """The request itself is wrong for this VM (size, window): the client should change it."""


class UnknownMemoryZone(InvalidMemoryResize):
    """vm.resize-zone named a zone this VM does not have."""


def resize_ram(memory: MemoryConfig, desired: int, manager: MemoryManager | None) -> None:
    """``vm.resize``'s ``desired_ram``: make the VM's RAM ``desired`` bytes.

    With ACPI hot plug, on a running VM (``manager``) an increase is plugged now as one DIMM
    and a reduction asks the guest to eject the newest DIMMs that fit
    (:meth:`MemoryManager.resize`); either way ``memory.size`` becomes ``desired``, so the
    next boot has that much RAM. With virtio-mem the device is asked for ``desired`` minus
    the boot RAM (:func:`virtio_mem_request`), growing or shrinking live, and
    ``memory.hotplugged_size`` becomes that amount (None for 0); ``memory.size`` stays.

    Raises :class:`InvalidMemoryResize` for a size that is not a positive multiple of the
    page size, with user-defined zones (they are resized one by one, :func:`resize_zone`),
    for a virtio-mem size out of range, and for what the running VM cannot take (an
    increase not a multiple of 128 MiB or past the window); :class:`MemoryResizeError` when
    every DIMM slot of this boot is used.
    """
    requested = check_ram(memory, desired, manager)
    virtio_mem = memory.hotplug_method == "VirtioMem"
    if manager is not None:
        if virtio_mem:
            manager.resize_virtio_mem(DEFAULT_MEMORY_ZONE, requested)
        else:
            manager.resize(desired)
    if virtio_mem:
        memory.hotplugged_size = requested or None
    else:
        memory.size = desired


def check_ram(memory: MemoryConfig, desired: int, manager: MemoryManager | None) -> int:
    """Everything :func:`resize_ram` would refuse, raised the same way, without changing
    anything; returns the virtio-mem requested size (0 with ACPI). ``vm.resize`` checks all
    its parts with this before it changes any (one request, one transaction)."""
    _check_ram_size(desired)
    if memory.zones:
        raise InvalidMemoryResize(RESIZE_WITH_ZONES)
    if memory.hotplug_method == "VirtioMem":
        requested = virtio_mem_request(memory, desired)
        if manager is not None:
            manager.check_resize_virtio_mem(DEFAULT_MEMORY_ZONE)
        return requested
    if manager is not None:
        manager.check_resize(desired)
    return 0


def resize_zone(memory: MemoryConfig, zone_id: str, desired: int,
                manager: MemoryManager | None) -> None:
    """``vm.resize-zone``: make the user-defined memory zone ``zone_id`` ``desired`` bytes,
    the reference's rules: only with user-defined zones, only a zone with a virtio-mem
    region (``hotplug_size``), from the zone's ``size`` (its boot RAM, which stays) up to
    ``size + hotplug_size``, in 2 MiB steps. On a running VM (``manager``) the zone's
    virtio-mem device is asked for ``desired - size``; either way the zone's
    ``hotplugged_size`` becomes that amount (None for 0), so the next boot plugs as much
    again. Without a running VM, a zone without a ``hotplug_size`` gets the reference's
    cold resize: its ``size`` becomes ``desired``.

    Raises :class:`UnknownMemoryZone` for an id no zone has, :class:`InvalidMemoryResize`
    without user-defined zones or for a size the zone cannot take, and
    :class:`MemoryResizeError` when the device fails.
    """
    zone = find_zone(memory, zone_id)
    if manager is None and zone.hotplug_size is None:
        _check_ram_size(desired)
        zone.size = desired
        return
    requested = virtio_mem_request(zone, desired)
    if manager is not None:
        manager.resize_virtio_mem(zone.id, requested)
    zone.hotplugged_size = requested or None


def _check_ram_size(desired: int) -> None:
    """A RAM size must be a positive multiple of the page size."""
    if desired <= 0 or desired % os.sysconf("SC_PAGE_SIZE"):
        raise InvalidMemoryResize(f"desired_ram {desired} is not a positive multiple of the "
                                  f"page size")


def virtio_mem_request(memory, desired: int) -> int:
    """The virtio-mem requested size for ``desired`` bytes of RAM: ``desired`` minus the boot
    RAM. ``memory`` is the ``MemoryConfig`` (``hotplug_method=virtio-mem``, for vm.resize)
    or a ``MemoryZoneConfig`` (for vm.resize-zone): both have ``size`` (the boot RAM, which
    virtio-mem cannot take away) and ``hotplug_size`` (the region).

    Raises :class:`InvalidMemoryResize` without a ``hotplug_size``, below the boot RAM, past
    the region, or when the difference is not a multiple of the 2 MiB block size."""
    zone = getattr(memory, "id", None)
    if not memory.hotplug_size:
        raise InvalidMemoryResize(
            "memory hot plug needs a virtio-mem region: boot with --memory "
            "hotplug_method=virtio-mem,hotplug_size=<size>" if zone is None else
            f"memory zone {zone} has no virtio-mem region to resize: give it a hotplug_size "
            "(--memory hotplug_method=virtio-mem --memory-zone id=...,hotplug_size=<size>)")
    what = "the boot RAM" if zone is None else f"the boot RAM of memory zone {zone}"
    if desired < memory.size:
        raise InvalidMemoryResize(f"desired_ram {desired} is below {what} ({memory.size} "
                                  f"bytes): virtio-mem cannot shrink it")
    requested = desired - memory.size
    if requested > memory.hotplug_size:
        raise InvalidMemoryResize(f"not enough hot plug space: {requested} bytes requested, "
                                  f"hotplug_size is {memory.hotplug_size}")
    if requested % VIRTIO_MEM_BLOCK_SIZE:
        raise InvalidMemoryResize(f"the memory above {what} ({requested} bytes) must be a "
                                  f"multiple of the virtio-mem block size "
                                  f"({VIRTIO_MEM_BLOCK_SIZE} bytes)")
    return requested



def find_zone(memory, zone_id: str):
    """The user-defined zone ``zone_id`` of the ``MemoryConfig`` ``memory``. Raises
    :class:`InvalidMemoryResize` without user-defined zones, :class:`UnknownMemoryZone`
    if none has that id (the reference's rules for vm.resize-zone)."""
    if not memory.zones:
        raise InvalidMemoryResize(RESIZE_ZONE_WITHOUT_ZONES)
    for zone in memory.zones:
        if zone.id == zone_id:
            return zone
    raise UnknownMemoryZone(f"Could not find the memory zone {zone_id} for the resize "
                            f"(zones: {', '.join(z.id for z in memory.zones)})")

