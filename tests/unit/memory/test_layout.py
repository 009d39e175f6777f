"""Where guest RAM goes, without KVM: boot RAM zone by zone around the 32-bit hole, the
hot plug window and the virtio-mem regions after it (pych.memory.layout)."""

from __future__ import annotations

from hypothesis import given
from hypothesis import strategies as st

from pych.arch.x86_64 import layout
from pych.memory.layout import (HOTPLUG_ALIGNMENT, boot_ram_layout, hotplug_region_start,
                                virtio_mem_layout)

MiB, GiB = layout.MiB, layout.GiB
PAGE = 4096
HOLE = (layout.MEM_32BIT_RESERVED_START, layout.RAM_64BIT_START)


@given(st.integers(1, 1 << 40).map(lambda n: n * 4096))
def test_hotplug_regions_start_at_the_first_128_mib_boundary_after_ram_and_the_hole(ram_end):
    start = hotplug_region_start(ram_end)
    assert start % HOTPLUG_ALIGNMENT == 0
    assert start >= max(ram_end, layout.RAM_64BIT_START)
    # the first such boundary: nothing lower qualifies
    assert start - HOTPLUG_ALIGNMENT < max(ram_end, layout.RAM_64BIT_START)


zone_sizes = st.lists(st.integers(0, 3 << 18).map(lambda pages: pages * PAGE), min_size=1,
                      max_size=6)


@given(zone_sizes)
def test_zones_fill_the_ram_ranges_in_order_around_the_hole(sizes):
    zones = [(f"z{i}", size) for i, size in enumerate(sizes)]
    pieces = boot_ram_layout(zones)
    # each zone gets exactly its size, from offset 0 on, in at most two pieces
    for zone, size in zones:
        mine = [p for p in pieces if p.zone == zone]
        assert sum(p.size for p in mine) == size and len(mine) <= 2
        assert [p.offset for p in mine] == [sum(p.size for p in mine[:i])
                                            for i in range(len(mine))]
        assert all(p.size > 0 for p in mine)
    # zones in order, one after the other, nothing in the 32-bit hole, no gaps elsewhere
    assert [p.zone for p in pieces] == sorted((p.zone for p in pieces), key=lambda z: int(z[1:]))
    for a, b in zip(pieces, pieces[1:]):
        assert b.gpa == (HOLE[1] if a.gpa + a.size == HOLE[0] else a.gpa + a.size)
    assert all(p.gpa + p.size <= HOLE[0] or p.gpa >= HOLE[1] for p in pieces)
    # and together they are the single-zone layout of the total
    merged: list[list[int]] = []
    for p in pieces:
        if merged and merged[-1][0] + merged[-1][1] == p.gpa:
            merged[-1][1] += p.size
        else:
            merged.append([p.gpa, p.size])
    total = sum(sizes)
    assert [tuple(m) for m in merged] == (layout.ram_regions(total) if total else [])


def test_a_zone_reaching_the_hole_continues_at_4_gib():
    pieces = boot_ram_layout([("mem0", 2 * GiB), ("mem1", 2 * GiB), ("mem2", 0),
                              ("mem3", 256 * MiB)])
    assert [(p.zone, p.gpa, p.size, p.offset) for p in pieces] == [
        ("mem0", 0, 2 * GiB, 0),
        ("mem1", 2 * GiB, 1 * GiB, 0),
        ("mem1", 4 * GiB, 1 * GiB, 1 * GiB),
        ("mem3", 5 * GiB, 256 * MiB, 0)]


@given(st.integers(0, 1 << 30).map(lambda pages: pages * PAGE),
       st.lists(st.integers(1, 64).map(lambda blocks: blocks * 128 * MiB), max_size=5))
def test_virtio_mem_regions_follow_ram_on_128_mib_boundaries(ram_end, sizes):
    placed = virtio_mem_layout(ram_end, [(f"z{i}", s) for i, s in enumerate(sizes)])
    assert [(zone, size) for zone, _, size in placed] == [(f"z{i}", s)
                                                          for i, s in enumerate(sizes)]
    cursor = max(ram_end, layout.RAM_64BIT_START)
    for _, gpa, size in placed:
        assert gpa % (128 * MiB) == 0 and cursor <= gpa < cursor + 128 * MiB
        cursor = gpa + size
