import pytest

from pych.arch.x86_64 import layout
from pych.devices.bus import Bus
from pych.devices.pci import (AddressAllocator, BarAllocationError, NoPciSlotAvailable, PciBus,
                              PciConfigIo, PciConfiguration, PciDevice, PciDeviceIdInUse,
                              PciDeviceIdOutOfRange, PciDeviceIdReserved, PciEcam, bdf)
from pych.devices.pci.config import BAR0, COMMAND, Command

MEM64_BASE = 1 << 40


class FakeDevice(PciDevice):
    def __init__(self, bar_size: int = 0x4000, is_64bit: bool = False, device_id: int = 0x1234):
        super().__init__(PciConfiguration(vendor_id=0x1AF4, device_id=device_id, class_code=0xFF,
                                          subclass=0xFF, interrupt_pin=1))
        if bar_size:
            self.config.add_bar(0, bar_size, is_64bit=is_64bit)
        self.moves: list[tuple[int, int | None, int | None]] = []
        self.accesses: list[tuple[str, int, int, int]] = []

    def bar_read(self, index, offset, size):
        self.accesses.append(("r", index, offset, size))
        return 0xAB

    def bar_write(self, index, offset, size, value):
        self.accesses.append(("w", index, offset, value))

    def bar_moved(self, index, old, new):
        self.moves.append((index, old, new))


@pytest.fixture
def mmio():
    return Bus("mmio")


@pytest.fixture
def bus(mmio):
    hook_calls = []
    b = PciBus(0, mmio_bus=mmio,
               mem32=AddressAllocator(layout.MEM_32BIT_DEVICES_START, layout.MEM_32BIT_DEVICES_SIZE),
               mem64=AddressAllocator(MEM64_BASE, 1 << 36),
               on_bar_moved=lambda dev, move: hook_calls.append(move))
    b.hook_calls = hook_calls
    return b


def cfg_read(bus, slot, offset, size=4):
    return bus.config_read(slot, 0, offset, size)


def test_host_bridge_at_slot_zero(bus):
    assert cfg_read(bus, 0, 0) == 0x0D57_8086
    assert cfg_read(bus, 0, 0x08) >> 16 == 0x0600
    assert list(bus.devices()) == []


def test_lowest_free_slot_allocation_and_reuse(bus):
    devices = [FakeDevice() for _ in range(3)]
    assert [bus.add_device(d) for d in devices] == [1, 2, 3]
    assert bus.remove_device(2) is devices[1]
    assert bus.add_device(FakeDevice()) == 2
    assert bus.add_device(FakeDevice()) == 4
    assert bus.bdf(4) == "0000:00:04.0"
    assert bdf(1, 0x1F) == "0001:00:1f.0"


def test_explicit_slot_rules_and_messages(bus):
    assert bus.add_device(FakeDevice(), slot=6) == 6
    with pytest.raises(PciDeviceIdOutOfRange) as e:
        bus.add_device(FakeDevice(), slot=32)
    assert str(e.value) == "Given PCI device ID (32) is out of the supported range of 0..32"
    with pytest.raises(PciDeviceIdReserved) as e:
        bus.add_device(FakeDevice(), slot=0)
    assert str(e.value) == "Given PCI device ID (0) is reserved"
    with pytest.raises(PciDeviceIdInUse) as e:
        bus.add_device(FakeDevice(), slot=6)
    assert str(e.value) == "Valid PCI device identifier but already used: 6"
    assert bus.add_device(FakeDevice()) == 1


def test_reserved_slots_are_skipped_by_dynamic_allocation(bus):
    bus.reserve_slot(1)
    assert bus.add_device(FakeDevice()) == 2
    with pytest.raises(PciDeviceIdInUse):
        bus.reserve_slot(1)
    assert bus.add_device(FakeDevice(), slot=1) == 1


def test_bus_full(bus):
    for _ in range(31):
        bus.add_device(FakeDevice(bar_size=0))
    with pytest.raises(NoPciSlotAvailable) as e:
        bus.add_device(FakeDevice())
    assert str(e.value) == "Could not find an available device slot on the PCI bus"


def test_absent_devices_and_functions_read_all_ones(bus):
    assert cfg_read(bus, 5, 0) == 0xFFFF_FFFF
    assert cfg_read(bus, 5, 0, 2) == 0xFFFF
    slot = bus.add_device(FakeDevice())
    assert bus.config_read(slot, 1, 0, 4) == 0xFFFF_FFFF
    bus.config_write(5, 0, 0x04, 2, 0xFFFF)            # goes nowhere, raises nothing


def test_bar_placement_natural_alignment_and_windows(bus):
    small, big, wide = FakeDevice(0x1000), FakeDevice(0x10_0000), FakeDevice(0x8000, is_64bit=True)
    s1, s2, s3 = bus.add_device(small), bus.add_device(big), bus.add_device(wide)
    assert small.config.bar_address(0) == 0xC000_0000
    assert big.config.bar_address(0) == 0xC010_0000     # aligned to its 1 MiB size
    assert wide.config.bar_address(0) == MEM64_BASE
    assert cfg_read(bus, s3, BAR0) == 0x4 and cfg_read(bus, s3, BAR0 + 4) == MEM64_BASE >> 32
    bus.remove_device(s1)
    again = FakeDevice(0x1000)
    bus.add_device(again)
    assert again.config.bar_address(0) == 0xC000_0000    # freed on removal


def test_bar_allocation_failure_leaves_the_slot_free(mmio):
    bus = PciBus(0, mmio_bus=mmio, mem32=AddressAllocator(0xC000_0000, 0x2000))
    bus.add_device(FakeDevice(0x2000))
    with pytest.raises(BarAllocationError):
        bus.add_device(FakeDevice(0x2000))
    assert bus.device(2) is None
    assert bus.add_device(FakeDevice(0)) == 2


def test_config_mechanism_one(bus):
    dev = FakeDevice(device_id=0x1043)
    slot = bus.add_device(dev)
    pio = Bus("pio")
    pio.insert(layout.PCI_CONFIG_IO_PORT, layout.PCI_CONFIG_IO_PORT_SIZE, PciConfigIo(bus))
    address = 0x8000_0000 | slot << 11
    pio.write(0xCF8, 4, address)
    assert pio.read(0xCF8, 4) == address
    assert pio.read(0xCFC, 4) == 0x1043_1AF4
    assert pio.read(0xCFE, 2) == 0x1043                # device id through the upper half
    pio.write(0xCF8, 4, address | 0x04)
    pio.write(0xCFC, 2, Command.MEMORY_SPACE)
    assert dev.config.command == Command.MEMORY_SPACE
    pio.write(0xCF8, 4, address & ~0x8000_0000)        # enable bit clear
    assert pio.read(0xCFC, 4) == 0xFFFF_FFFF
    pio.write(0xCF8, 4, 0x8001_0000 | slot << 11)      # bus 1 does not exist
    assert pio.read(0xCFC, 4) == 0xFFFF_FFFF
    pio.write(0xCFB, 1, 0x01)                          # Linux's type-1 probe: byte write merges
    assert pio.read(0xCF8, 4) == 0x0101_0000 | slot << 11


def test_ecam(bus, mmio):
    dev = FakeDevice(device_id=0x1044)
    slot = bus.add_device(dev)
    base = layout.ecam_base(0)
    assert base == layout.PCI_MMCONFIG_START and layout.ecam_base(2) == base + (2 << 20)
    mmio.insert(base, 1 << 20, PciEcam(bus))
    assert mmio.read(base + (slot << 15), 4) == 0x1044_1AF4
    assert mmio.read(base + (slot << 15) + 0x100, 4) == 0      # no extended capabilities
    assert mmio.read(base + (7 << 15), 4) == 0xFFFF_FFFF
    assert mmio.read(base + (slot << 15 | 1 << 12), 4) == 0xFFFF_FFFF
    mmio.write(base + (slot << 15) + COMMAND, 2, Command.MEMORY_SPACE)
    assert dev.config.command == Command.MEMORY_SPACE


def test_bar_decoding_maps_and_moves_the_region(bus, mmio):
    dev = FakeDevice(0x4000)
    slot = bus.add_device(dev)
    address = dev.config.bar_address(0)
    assert mmio.find(address) is None                   # decoding is off until the guest enables it
    bus.config_write(slot, 0, COMMAND, 2, Command.MEMORY_SPACE | Command.BUS_MASTER)
    assert bus.mapped_bar(slot, 0) == address
    assert mmio.read(address + 0x10, 4) == 0xAB
    assert dev.accesses[-1] == ("r", 0, 0x10, 4)
    assert dev.moves == [(0, None, address)]

    # Linux moves a BAR with decoding off, then turns decoding back on.
    new = 0xD000_0000
    bus.config_write(slot, 0, COMMAND, 2, 0)
    assert mmio.find(address) is None
    bus.config_write(slot, 0, BAR0, 4, new)
    bus.config_write(slot, 0, COMMAND, 2, Command.MEMORY_SPACE)
    assert mmio.find(address) is None
    mmio.write(new + 4, 4, 7)
    assert dev.accesses[-1] == ("w", 0, 4, 7)
    assert dev.moves == [(0, None, address), (0, address, None), (0, None, new)]
    assert [(m.slot, m.index, m.size, m.old, m.new) for m in bus.hook_calls] == [
        (slot, 0, 0x4000, None, address), (slot, 0, 0x4000, address, None),
        (slot, 0, 0x4000, None, new)]

    # The allocator followed the guest: the old range is free for the next device.
    other = FakeDevice(0x4000)
    bus.add_device(other)
    assert other.config.bar_address(0) == address


def test_sizing_with_decoding_on_unmaps_then_remaps(bus, mmio):
    dev = FakeDevice(0x4000)
    slot = bus.add_device(dev)
    address = dev.config.bar_address(0)
    bus.config_write(slot, 0, COMMAND, 2, Command.MEMORY_SPACE)
    bus.config_write(slot, 0, BAR0, 4, 0xFFFF_FFFF)
    assert cfg_read(bus, slot, BAR0) == 0xFFFF_C000
    assert mmio.find(address) is None
    bus.config_write(slot, 0, BAR0, 4, address)
    assert mmio.find(address) is not None
    assert dev.moves == [(0, None, address), (0, address, None), (0, None, address)]


def test_overlapping_guest_placement_is_left_unmapped(bus, mmio):
    a, b = FakeDevice(0x4000), FakeDevice(0x4000)
    sa, sb = bus.add_device(a), bus.add_device(b)
    for slot in (sa, sb):
        bus.config_write(slot, 0, COMMAND, 2, Command.MEMORY_SPACE)
    bus.config_write(sb, 0, BAR0, 4, a.config.bar_address(0))    # guest error: overlap
    assert bus.mapped_bar(sb, 0) is None
    assert mmio.read(a.config.bar_address(0), 4) == 0xAB
    assert a.accesses[-1][0] == "r" and not b.accesses


def test_remove_unmaps_bars(bus, mmio):
    dev = FakeDevice(0x4000, is_64bit=True)
    slot = bus.add_device(dev)
    bus.config_write(slot, 0, COMMAND, 2, Command.MEMORY_SPACE)
    address = bus.mapped_bar(slot, 0)
    assert address == MEM64_BASE
    assert bus.remove_device(slot) is dev
    assert mmio.find(address) is None
    assert dev.moves[-1] == (0, address, None)
    assert cfg_read(bus, slot, 0) == 0xFFFF_FFFF
    assert list(mmio) == []


def test_interrupt_line_reflects_the_slot_route(bus):
    slot = bus.add_device(FakeDevice(), slot=9)
    assert cfg_read(bus, slot, 0x3C, 1) == layout.PCI_INTX_IRQ_BASE + 9 % 8
