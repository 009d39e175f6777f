"""pych.arch.x86_64.smbios: the SMBIOS 3.0 entry point and structures, byte for byte."""

from __future__ import annotations

import struct
import uuid

import pytest

from pych.arch.x86_64 import layout
from pych.arch.x86_64.smbios import SmbiosStrings, build_smbios, write_smbios
from pych.config import ConfigError
from pych.config.machine import PlatformConfig
from pych.memory.guest_memory import GuestMemory

UUID = "4a3f8d6e-94d1-4c6b-8d2e-6f1f2a0b9c11"


def structures(table: bytes) -> list[tuple[int, int, bytes, list[bytes]]]:
    """(type, handle, formatted bytes, strings) of each structure, as a guest walks them."""
    out, offset = [], 0
    while offset < len(table):
        kind, length, handle = struct.unpack_from("<BBH", table, offset)
        formatted = table[offset:offset + length]
        end = table.index(b"\0\0", offset + length)
        strings = table[offset + length:end].split(b"\0") if end > offset + length else []
        out.append((kind, handle, formatted, [s for s in strings if s]))
        offset = end + 2
    return out


def test_entry_point_is_smbios_3_with_a_valid_checksum_and_points_at_the_table():
    entry, table = build_smbios(SmbiosStrings(), 0xF0018)
    assert len(entry) == 24 and entry[:5] == b"_SM3_"
    assert sum(entry) % 256 == 0
    assert (entry[6], entry[7], entry[8], entry[9], entry[10]) == (24, 3, 2, 0, 1)
    assert struct.unpack_from("<IQ", entry, 12) == (len(table), 0xF0018)


def test_defaults_are_the_references_bios_and_system_strings():
    _, table = build_smbios(SmbiosStrings(), 0)
    (bios, system, end) = structures(table)
    assert bios[0] == 0 and bios[3] == [b"cloud-hypervisor", b"0"]
    assert bios[2][4:6] == bytes([1, 2])                             # vendor, version
    assert struct.unpack_from("<Q", bios[2], 10)[0] == 1 << 7          # PCI supported
    assert bios[2][19] == 1 << 4                                       # a virtual machine
    assert system[0] == 1 and system[3] == [b"Cloud Hypervisor", b"cloud-hypervisor"]
    assert system[2][4:8] == bytes([1, 2, 0, 0]) and system[2][8:24] == bytes(16)
    assert end[0] == 127 and [s[1] for s in (bios, system, end)] == [1, 2, 3]


def test_serial_uuid_oem_strings_and_the_rest_land_where_linux_reads_them():
    strings = SmbiosStrings(serial_number="SER-1", uuid=UUID, oem_strings=("a=1", "b"),
                            manufacturer="M", product_name="P", version="V", family="F",
                            sku_number="K", chassis_asset_tag="TAG")
    _, table = build_smbios(strings, 0)
    kinds = structures(table)
    assert [k[0] for k in kinds] == [0, 1, 3, 11, 127]
    system = kinds[1]
    assert system[3] == [b"M", b"P", b"V", b"SER-1", b"K", b"F"]
    assert system[2][4:8] == bytes([1, 2, 3, 4]) and system[2][25:27] == bytes([5, 6])
    assert uuid.UUID(bytes_le=system[2][8:24]) == uuid.UUID(UUID)      # SMBIOS 2.6+ order
    chassis = kinds[2]
    assert chassis[2][4] == 1 and chassis[2][8] == 2 and chassis[3] == [b"M", b"TAG"]
    oem = kinds[3]
    assert oem[2][4] == 2 and oem[3] == [b"a=1", b"b"]


def test_written_at_0xf0000_with_the_table_after_the_entry_point():
    mem = GuestMemory.from_ranges([(0, 1 << 20)])
    length = write_smbios(mem, SmbiosStrings(serial_number="S"))
    entry = mem.read(layout.SMBIOS_START, 24)
    assert entry[:5] == b"_SM3_"
    address = struct.unpack_from("<Q", entry, 16)[0]
    assert address == layout.SMBIOS_START + 24
    assert structures(mem.read(address, length))[1][3][-1] == b"S"


@pytest.mark.parametrize(("fields", "message"), [
    ({"uuid": "not-a-uuid"}, "platform.system_uuid='not-a-uuid' is not a UUID"),
    ({"oem_strings": ["a", ""]}, r"platform.oem_strings\[1\] is empty"),
    ({"serial_number": "a\0b"}, "platform.system_serial_number holds a NUL"),
])
def test_strings_smbios_cannot_hold_are_refused_at_the_request(fields, message):
    with pytest.raises(ConfigError, match=message):
        PlatformConfig.model_validate(fields)._validate()
