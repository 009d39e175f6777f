"""The bus devices sit on: dispatch by address, overlaps refused, removal."""

import pytest

from pych.devices.bus import Bus, BusError


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
