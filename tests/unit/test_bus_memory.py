import pytest

from pych.devices.bus import Bus, BusError
from pych.memory import GuestMemory, GuestMemoryError


class Reg:
    def __init__(self):
        self.writes = []

    def read(self, offset, size):
        return offset

    def write(self, offset, size, value):
        self.writes.append((offset, size, value))


def test_bus_dispatch_and_overlap():
    bus = Bus("pio")
    a, c = Reg(), Reg()
    bus.insert(0x3F8, 8, a)
    bus.insert(0x600, 4, c)
    assert bus.read(0x3FA, 1) == 2
    assert bus.write(0x601, 1, 0x34)
    assert c.writes == [(1, 1, 0x34)]
    assert bus.read(0x500, 2) == 0xFFFF
    assert not bus.write(0x500, 1, 0)
    with pytest.raises(BusError):
        bus.insert(0x3FF, 2, Reg())
    assert bus.remove(0x3F8) is a
    assert bus.find(0x3F8) is None
    with pytest.raises(BusError):
        bus.remove(0x3F8)


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
