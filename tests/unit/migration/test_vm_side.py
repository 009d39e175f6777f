"""pych.migration.vm_side's page arithmetic and GuestMemory's device-write tracking (the
KVM side, dirty logging on a real memslot: scripts/kvm_dirty_log_probe.py and
tests/guest/test_migration.py)."""

from __future__ import annotations

import struct

from pych.memory.guest_memory import GuestMemory
from pych.migration.vm_side import bitmap_pages, page_runs


def test_bitmap_pages_reads_kvm_words_little_endian():
    bitmap = struct.pack("<QQ", (1 << 0) | (1 << 63), 1 << 5)
    assert bitmap_pages(bitmap, 0x100) == [0x100, 0x100 + 63, 0x100 + 64 + 5]
    assert bitmap_pages(bytes(16), 0) == []


def test_page_runs_coalesce_contiguous_pages_up_to_a_limit():
    assert page_runs({1, 2, 3, 7}) == [(0x1000, 0x3000), (0x7000, 0x1000)]
    assert page_runs(range(4), limit=0x2000) == [(0, 0x2000), (0x2000, 0x2000)]
    assert page_runs([]) == []


def test_guest_memory_tracks_device_writes_only_while_asked():
    mem = GuestMemory.from_ranges([(0, 1 << 20)])
    try:
        mem.write(0x3000, b"x")
        assert mem.take_written() == set()              # not tracking
        mem.track_writes(True)
        mem.write_u32(0x5ffe, 1)                        # straddles pages 5 and 6
        view = mem.view(0x8000, 0x2000)                 # a buffer a device may fill
        assert mem.take_written() == {5, 6, 8, 9}
        assert mem.take_written() == set()              # taken: a new round starts empty
        view[0:1] = b"y"                                # written after its page was sent
        mem.write_u16(0x1000, 2)
        # the final round (VM paused) sends every page viewed since tracking began again
        assert mem.take_written(final=True) == {1, 8, 9}
        mem.track_writes(False)
        mem.write(0x3000, b"z")
        assert mem.take_written() == set()
        del view
    finally:
        mem.close()
