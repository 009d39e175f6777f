"""Guest memory: regions, bounds-checked access and zero-copy views."""

import os

import pytest

from pych.memory.guest_memory import GuestMemory, GuestMemoryError
from tests.support.host import fd_is_open


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


def test_an_adopted_fd_is_the_regions_and_closed_by_any_failure():
    """``adopt``: a memfd handed over by a local migration is closed with its region, and
    by every failure to make the region (so its caller has nothing to clean up)."""
    mem = GuestMemory()
    mem.add_region(0, 0x4000)

    def memfd(size=0x4000):
        fd = os.memfd_create("adopted")
        os.ftruncate(fd, size)
        return fd
    overlapping, misaligned, kept = memfd(), memfd(), memfd()
    with pytest.raises(GuestMemoryError, match="overlaps"):
        mem.add_region(0x2000, 0x4000, fd=overlapping, adopt=True)
    with pytest.raises(GuestMemoryError, match="not page aligned"):
        mem.add_region(0x10000, 0x100, fd=misaligned, adopt=True)
    assert not fd_is_open(overlapping) and not fd_is_open(misaligned)
    region = mem.add_region(0x10000, 0x4000, fd=kept, adopt=True)
    assert region.owns_fd and fd_is_open(kept)
    mem.remove_region(region)
    region.close()
    assert not fd_is_open(kept)
    # without adopt, the caller's fd stays the caller's
    lent = memfd()
    region = mem.add_region(0x20000, 0x4000, fd=lent)
    region.close()
    assert fd_is_open(lent)
    os.close(lent)
    mem.close()
