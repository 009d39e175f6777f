"""Where guest RAM goes: boot RAM zone by zone around the 32-bit hole, then the hot plug space
(the ACPI DIMM window, or one virtio-mem region per zone), all on 128 MiB boundaries as the
reference places them. Pure functions over sizes and addresses: the memory manager maps what
they place.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

from pych.arch.x86_64 import layout as arch_layout
from pych.devices.virtio.mem import REGION_ALIGNMENT

HOTPLUG_ALIGNMENT = 128 * arch_layout.MiB
"""Hot plugged RAM starts on, and grows by, multiples of this (Linux's memory block size)."""


def hotplug_region_start(ram_end: int) -> int:
    """Where RAM plugged after RAM ending at ``ram_end`` (exclusive) starts, as the reference
    places it: at 4 GiB while RAM ends below the 32-bit hole, else at the first 128 MiB
    boundary at or above ``ram_end``. The hot plug window starts here after boot RAM, and each
    DIMM starts here after the RAM (boot and DIMMs) before it."""
    end = max(ram_end, arch_layout.RAM_64BIT_START)
    return -(-end // HOTPLUG_ALIGNMENT) * HOTPLUG_ALIGNMENT


@dataclass(frozen=True)
class RamPiece:
    """``size`` bytes of boot RAM at guest address ``gpa``, backed by zone ``zone``'s memory
    from ``offset`` on."""

    zone: str
    gpa: int
    size: int
    offset: int


def boot_ram_layout(zones: Sequence[tuple[str, int]]) -> list[RamPiece]:
    """Where the boot RAM of ``zones`` (``(id, size)`` in order) goes, as the reference lays
    zones out: one after the other over the guest's RAM ranges (from 0 up to the 32-bit hole
    at 3 GiB, then from 4 GiB on), a zone that reaches the hole continuing at 4 GiB in a
    second piece. A zone of size 0 has no boot RAM. Without zones this is ``--memory``'s
    RAM as one zone: :func:`pych.arch.x86_64.layout.ram_regions`."""
    pieces: list[RamPiece] = []
    todo = [(zone, size) for zone, size in zones if size]
    offset = 0                                  # into the current zone (todo[0])
    for gpa, length in arch_layout.ram_regions(sum(size for _, size in todo)) if todo else []:
        end = gpa + length
        while gpa < end:
            zone, size = todo[0]
            take = min(size - offset, end - gpa)
            pieces.append(RamPiece(zone, gpa, take, offset))
            gpa += take
            offset += take
            if offset == size:
                todo.pop(0)
                offset = 0
    return pieces


def virtio_mem_layout(ram_end: int,
                      regions: Sequence[tuple[str, int]]) -> list[tuple[str, int, int]]:
    """``(zone, gpa, size)`` of each zone's virtio-mem region (``regions``: ``(zone,
    hotplug_size)`` in zone order), as the reference places them: after the RAM ending at
    ``ram_end`` (at 4 GiB when RAM ends below the 32-bit hole), each at the first 128 MiB
    boundary at or after the end of the previous one."""
    placed = []
    cursor = max(ram_end, arch_layout.RAM_64BIT_START)
    for zone, size in regions:
        start = -(-cursor // REGION_ALIGNMENT) * REGION_ALIGNMENT
        placed.append((zone, start, size))
        cursor = start + size
    return placed

