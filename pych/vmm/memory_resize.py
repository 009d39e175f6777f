"""``vm.resize``'s ``desired_ram`` and ``vm.resize-zone``: validate, act on the running VM's
memory manager if there is one, then update the configuration so a reboot comes back with the
size asked for. Both raise the memory manager's errors (``InvalidMemoryResize``,
``UnknownMemoryZone``, ``MemoryResizeError``); the VMM turns them into domain errors.
"""

from __future__ import annotations

import os

from pych.memory_manager import (RESIZE_WITH_ZONES, InvalidMemoryResize, MemoryManager,
                                 find_zone, virtio_mem_request)


def resize_ram(memory, desired: int, manager: MemoryManager | None) -> None:
    """``desired_ram`` for the ``MemoryConfig`` ``memory``; ``manager``: the running VM's.

    On a running VM an increase is hot plugged now as one ACPI DIMM (MemoryManager.resize); a
    reduction, as in the reference, is for the next boot, and beyond it the guest is asked to
    eject the newest DIMMs that fit live (vm.info's ``memory_hotplug`` shows which went and
    which the guest kept). Either way ``memory.size`` becomes ``desired``, so a reboot boots
    with that much RAM.

    With virtio-mem the device is asked for ``desired`` minus boot RAM, growing or shrinking
    live, and ``memory.hotplugged_size`` becomes that amount (None for 0), so a reboot plugs as
    much again; ``memory.size`` stays the boot RAM.

    Invalid (InvalidMemoryResize): a size that cannot be boot RAM, an increase that is not a
    multiple of 128 MiB or does not fit the hot plug window, with virtio-mem a size below boot
    RAM or not a multiple of 2 MiB above it, user-defined memory zones (use vm.resize-zone; the
    reference fails, and before boot it writes ``memory.size``, which the zones forbid: pych
    refuses in both cases). No hot plug slot left: MemoryResizeError.
    """
    _check_ram_size(desired)
    if memory.zones:
        raise InvalidMemoryResize(RESIZE_WITH_ZONES)
    if memory.hotplug_method == "VirtioMem":
        requested = virtio_mem_request(memory, desired)
    if manager is not None:
        manager.resize(desired)
    if memory.hotplug_method == "VirtioMem":
        memory.hotplugged_size = requested or None
    else:
        memory.size = desired


def resize_zone(memory, zone_id: str, desired: int, manager: MemoryManager | None) -> None:
    """``vm.resize-zone {id, desired_ram}``: make the user-defined memory zone ``zone_id``
    ``desired`` bytes, the reference's rules: only with user-defined zones (``--memory size=0``
    and ``--memory-zone``), only a zone with a virtio-mem region (``hotplug_size``, so
    ``hotplug_method=virtio-mem``), from the zone's ``size`` (its boot RAM, which stays) up to
    ``size + hotplug_size``, in 2 MiB steps. On a running VM (``manager``) the zone's
    virtio-mem device is asked for ``desired - size`` and the guest plugs or unplugs blocks in
    its own time; either way the zone's ``hotplugged_size`` becomes that amount (None for 0),
    so a reboot plugs as much again.

    Before boot the configuration is edited as a live resize would leave it. Only a zone
    without a ``hotplug_size`` gets the reference's cold resize: its ``size`` becomes
    ``desired``.

    No zone with that id: UnknownMemoryZone. No user-defined zones, a zone without a
    virtio-mem region, or a size out of range or not a multiple of 2 MiB: InvalidMemoryResize
    (the reference fails all of these alike; pych's errors say whose mistake it is, and keep
    the reference's words). The device failing: MemoryResizeError. Asking for the size already
    requested is a no-op (the reference fails it).
    """
    zone = find_zone(memory, zone_id)
    if manager is None and zone.hotplug_size is None:
        _check_ram_size(desired)
        zone.size = desired
        return
    requested = virtio_mem_request(zone, desired)
    if manager is not None:
        manager.resize_zone(zone.id, desired)
    zone.hotplugged_size = requested or None


def _check_ram_size(desired: int) -> None:
    """A RAM size must be a positive multiple of the page size."""
    if desired <= 0 or desired % os.sysconf("SC_PAGE_SIZE"):
        raise InvalidMemoryResize(f"desired_ram {desired} is not a positive multiple of the "
                                  f"page size")
