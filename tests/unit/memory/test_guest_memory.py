"""Guest memory: regions, bounds-checked access and zero-copy views."""

import pytest

from pych.memory.guest_memory import GuestMemory, GuestMemoryError


def test_guest_memory_regions_and_bounds():
    mem = GuestMemory.from_ranges([(0, 1 << 20), (1 << 32, 1 << 20)])
    try:
        mem.write_u64(0x1000, 0x1122334455667788)
        assert mem.read_u32(0x1004) == 0x11223344
        mem.write((1 << 32) + 8, b"abc")
        assert bytes(mem.view((1 << 32) + 8, 3)) == b"abc"
        assert mem.total_size == 2 << 20 and mem.end == (1 << 32) + (1 << 20)
        with pytest.raises(GuestMemoryError):
            mem.read((1 << 20) - 2, 4)           # crosses the end of a region
        with pytest.raises(GuestMemoryError):
            mem.write(0x200000, b"x")            # hole
        with pytest.raises(GuestMemoryError):
            mem.add_region(0x80000, 0x100000)    # overlap
        assert all(r.fd >= 0 for r in mem.regions)
    finally:
        mem.close()
