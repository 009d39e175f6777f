import pytest
from hypothesis import given
from hypothesis import strategies as st

from pych.devices.pci.config import (BAR0, CAPABILITIES_POINTER, COMMAND, INTERRUPT_LINE,
                                     INTERRUPT_PIN, STATUS, CapabilityId, Command, ConfigError,
                                     PciConfiguration, Status)


def make_config(**kw) -> PciConfiguration:
    args = dict(vendor_id=0x1AF4, device_id=0x1042, class_code=0x01, subclass=0x80, revision=1,
                subsystem_vendor_id=0x1AF4, subsystem_id=0x1042, interrupt_pin=1)
    args.update(kw)
    return PciConfiguration(**args)


def test_header_identity_fields():
    cfg = make_config()
    assert cfg.read(0, 4) == 0x1042_1AF4
    assert cfg.read(0x08, 4) == 0x0180_0001            # class 01, subclass 80, prog-if 0, rev 1
    assert cfg.read(0x2C, 4) == 0x1042_1AF4
    assert cfg.read(0x0E, 1) == 0                       # type 0, single function
    assert cfg.read(INTERRUPT_PIN, 1) == 1


def test_read_only_fields_ignore_writes():
    cfg = make_config()
    cfg.write(0, 4, 0xDEAD_BEEF)
    cfg.write(0x08, 4, 0xFFFF_FFFF)
    cfg.write(INTERRUPT_PIN, 1, 4)
    assert cfg.read(0, 4) == 0x1042_1AF4
    assert cfg.read(0x08, 4) == 0x0180_0001
    assert cfg.read(INTERRUPT_PIN, 1) == 1


def test_command_register_writable_bits_only():
    cfg = make_config()
    cfg.write(COMMAND, 2, 0xFFFF)
    assert cfg.command == (Command.IO_SPACE | Command.MEMORY_SPACE | Command.BUS_MASTER
                           | Command.PARITY_ERROR_RESPONSE | Command.SERR_ENABLE | Command.INTX_DISABLE)
    cfg.write(COMMAND, 2, Command.MEMORY_SPACE)
    assert cfg.read(COMMAND, 2) == Command.MEMORY_SPACE


def test_status_error_bits_are_write_one_to_clear():
    cfg = make_config()
    cfg.set_interrupt_status(True)
    cfg._data[STATUS + 1] = 0x20                      # RECEIVED_MASTER_ABORT latched by "hardware"
    assert cfg.read(STATUS, 2) & Status.RECEIVED_MASTER_ABORT
    cfg.write(STATUS, 2, 0)                            # writing 0 changes nothing
    assert cfg.read(STATUS, 2) & Status.RECEIVED_MASTER_ABORT
    cfg.write(STATUS, 2, Status.RECEIVED_MASTER_ABORT | Status.INTERRUPT)
    assert cfg.read(STATUS, 2) == Status.INTERRUPT     # interrupt status is read-only


def test_interrupt_line_is_scratch():
    cfg = make_config()
    cfg.write(INTERRUPT_LINE, 1, 0x0B)
    assert cfg.read(INTERRUPT_LINE, 1) == 0x0B


def test_32bit_bar_sizing():
    cfg = make_config()
    cfg.add_bar(0, 0x8000)
    cfg.set_bar_address(0, 0xC000_8000)
    assert cfg.read(BAR0, 4) == 0xC000_8000
    cfg.write(BAR0, 4, 0xFFFF_FFFF)
    assert cfg.read(BAR0, 4) == 0xFFFF_8000            # size mask, type bits 0 (32-bit, !prefetch)
    cfg.write(BAR0, 4, 0xC000_8000)
    assert cfg.bar_address(0) == 0xC000_8000


def test_64bit_prefetchable_bar_sizing_both_halves():
    cfg = make_config()
    cfg.add_bar(2, 0x10_0000, is_64bit=True, prefetchable=True)
    cfg.set_bar_address(2, 0x1_0020_0000)
    low, high = BAR0 + 8, BAR0 + 12
    assert cfg.read(low, 4) == 0x0020_000C             # 64-bit (0x4) | prefetchable (0x8)
    assert cfg.read(high, 4) == 0x1
    cfg.write(low, 4, 0xFFFF_FFFF)
    cfg.write(high, 4, 0xFFFF_FFFF)
    assert cfg.read(low, 4) == 0xFFF0_000C
    assert cfg.read(high, 4) == 0xFFFF_FFFF
    size_mask = (cfg.read(high, 4) << 32 | cfg.read(low, 4)) & ~0xF
    assert (~size_mask & (1 << 64) - 1) + 1 == 0x10_0000


def test_large_64bit_bar_has_read_only_low_address_bits():
    cfg = make_config()
    cfg.add_bar(0, 1 << 33, is_64bit=True)
    cfg.write(BAR0, 4, 0xFFFF_FFFF)
    cfg.write(BAR0 + 4, 4, 0xFFFF_FFFF)
    assert cfg.read(BAR0, 4) == 0x4
    assert cfg.read(BAR0 + 4, 4) == 0xFFFF_FFFE


def test_unimplemented_bars_and_rom_read_zero_after_sizing():
    cfg = make_config()
    cfg.add_bar(0, 0x1000)
    for offset in (BAR0 + 4, BAR0 + 20, 0x30):
        cfg.write(offset, 4, 0xFFFF_FFFF)
        assert cfg.read(offset, 4) == 0


def test_bar_declaration_errors():
    cfg = make_config()
    with pytest.raises(ConfigError):
        cfg.add_bar(0, 0x1800)                          # not a power of two
    cfg.add_bar(4, 0x1000, is_64bit=True)
    with pytest.raises(ConfigError):
        cfg.add_bar(5, 0x1000)                          # upper half of BAR 4
    with pytest.raises(ConfigError):
        cfg.add_bar(3, 0x1000, is_64bit=True)           # would overlap BAR 4
    with pytest.raises(ConfigError):
        cfg.set_bar_address(4, 0x1234)                  # misaligned


def test_decoded_address_follows_memory_enable_and_sizing():
    cfg = make_config()
    cfg.add_bar(0, 0x4000)
    cfg.set_bar_address(0, 0xC000_4000)
    assert cfg.decoded_bar_address(0) is None          # memory decoding off
    cfg.write(COMMAND, 2, Command.MEMORY_SPACE)
    assert cfg.decoded_bar_address(0) == 0xC000_4000
    cfg.write(BAR0, 4, 0xFFFF_FFFF)                    # sizing with decoding on
    assert cfg.decoded_bar_address(0) is None
    cfg.write(BAR0, 4, 0)
    assert cfg.decoded_bar_address(0) is None          # address 0 means unassigned


def test_capability_chain():
    cfg = make_config()
    assert not cfg.read(STATUS, 2) & Status.CAPABILITIES_LIST
    first = cfg.add_capability(CapabilityId.VENDOR_SPECIFIC, bytes([16, 1]) + bytes(12))
    second = cfg.add_capability(CapabilityId.MSIX, bytes(10), writable=b"\x00\xc0" + bytes(8))
    assert cfg.read(STATUS, 2) & Status.CAPABILITIES_LIST
    assert cfg.read(CAPABILITIES_POINTER, 1) == first == 0x40
    assert cfg.read(first, 1) == CapabilityId.VENDOR_SPECIFIC
    assert cfg.read(first + 1, 1) == second == 0x50
    assert cfg.read(second, 1) == CapabilityId.MSIX and cfg.read(second + 1, 1) == 0
    cfg.write(second + 2, 2, 0xFFFF)
    assert cfg.read(second + 2, 2) == 0xC000
    cfg.write(first + 2, 4, 0xFFFF_FFFF)               # no write mask: read-only
    assert cfg.read(first + 2, 2) == 0x0110
    assert cfg.capability_offsets(CapabilityId.MSIX) == [second]


def test_extended_config_space_reads_zero():
    cfg = make_config()
    assert cfg.read(0x100, 4) == 0
    cfg.write(0x100, 4, 0xFFFF_FFFF)
    assert cfg.read(0x100, 4) == 0


@given(st.lists(st.tuples(st.integers(0, 255), st.sampled_from([1, 2, 4]),
                          st.integers(0, 0xFFFF_FFFF)), max_size=60))
def test_guest_writes_never_change_identity(writes):
    cfg = make_config()
    cfg.add_bar(0, 0x8000, is_64bit=True)
    cfg.add_capability(CapabilityId.VENDOR_SPECIFIC, bytes(14))
    before = cfg.read(0, 4), cfg.read(0x08, 4), cfg.read(0x2C, 4), cfg.read(0x40, 2)
    for offset, size, value in writes:
        cfg.write(offset, size, value & ((1 << 8 * size) - 1))
    assert (cfg.read(0, 4), cfg.read(0x08, 4), cfg.read(0x2C, 4), cfg.read(0x40, 2)) == before
    assert cfg.read(BAR0, 4) & 0xF == 0x4              # BAR type bits survive anything
    assert cfg.bar_address(0) % 0x8000 == 0
