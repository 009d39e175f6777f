"""ACPI tables: headers, checksums, field offsets (reference §1.2) and the guest memory layout."""

from __future__ import annotations

import struct

import pytest

from pych.acpi import tables
from pych.acpi.tables import AcpiTablesError, create_acpi_tables, x2apic_madt_entry
from pych.arch.x86_64 import layout
from pych.memory.guest_memory import GuestMemory


def byte_sum(data: bytes) -> int:
    return sum(data) & 0xFF


def header(table: bytes) -> tuple:
    """(signature, length, revision, oem id, oem table id, oem revision, creator, creator rev)."""
    sig, length, revision, _, oem, oem_table, oem_rev, creator, creator_rev = struct.unpack_from(
        "<4sIBB6s8sI4sI", table)
    return sig, length, revision, oem, oem_table, oem_rev, creator, creator_rev


def gas(table: bytes, offset: int) -> tuple[int, int, int, int, int]:
    """(space id, bit width, bit offset, access size, address) of a Generic Address Structure."""
    return struct.unpack_from("<BBBBQ", table, offset)


ALL_TABLES = {
    "DSDT": lambda: tables.dsdt(b"\x5b\x82\x06TST_"),
    "FACP": lambda: tables.fadt(0xA0024),
    "APIC": lambda: tables.madt(2, 4),
    "MCFG": lambda: tables.mcfg(),
    "XSDT": lambda: tables.xsdt([0x1000, 0x2000, 0x3000]),
}


@pytest.mark.parametrize("signature", ALL_TABLES)
def test_sdt_header_length_and_checksum(signature):
    table = ALL_TABLES[signature]()
    sig, length, _, oem, oem_table, oem_rev, creator, creator_rev = header(table)
    assert sig == signature.encode()
    assert length == len(table)
    assert byte_sum(table) == 0
    assert (oem, oem_rev, creator, creator_rev) == (b"CLOUDH", 1, b"PYCH", 1)
    assert len(oem_table) == 8 and oem_table.startswith(b"CH")


def test_rsdp():
    rsdp = tables.rsdp(0xA1234)
    assert len(rsdp) == 36
    signature, _, oem, revision, rsdt, length, xsdt, _ = struct.unpack("<8sB6sBIIQB3x", rsdp)
    assert (signature, oem, revision, rsdt, length, xsdt) == (
        b"RSD PTR ", b"CLOUDH", 2, 0, 36, 0xA1234)
    assert byte_sum(rsdp[:20]) == 0          # ACPI 1.0 checksum
    assert byte_sum(rsdp) == 0               # extended checksum


def test_fadt_fields():
    fadt = tables.fadt(0x1234_5678_9ABC)
    assert len(fadt) == 276
    assert fadt[8] == 6                      # revision
    assert fadt[131] == 3                    # minor version: FADT 6.3
    flags, = struct.unpack_from("<I", fadt, 112)
    assert flags == (1 << 20) | (1 << 10) | (1 << 8)     # HW_REDUCED | RESET_REG_SUP | TMR_VAL_EXT
    system_io, byte_access, dword_access = 1, 1, 3
    assert gas(fadt, 116) == (system_io, 8, 0, byte_access, 0x600)       # RESET_REG
    assert fadt[128] == 1                                                # RESET_VALUE
    assert gas(fadt, 208) == (system_io, 32, 0, dword_access, 0x608)     # X_PM_TMR_BLK
    assert gas(fadt, 244) == (system_io, 8, 0, byte_access, 0x600)       # SLEEP_CONTROL_REG
    assert gas(fadt, 256) == (system_io, 8, 0, byte_access, 0x600)       # SLEEP_STATUS_REG
    assert struct.unpack_from("<Q", fadt, 140) == (0x1234_5678_9ABC,)    # X_DSDT
    assert struct.unpack_from("<I", fadt, 40) == (0,)                    # no 32-bit DSDT
    assert struct.unpack_from("<Q", fadt, 132) == (0,)                   # no X_FIRMWARE_CTRL
    assert fadt[268:276] == b"CLOUDHYP"


def madt_entries(madt: bytes) -> list[bytes]:
    entries, offset = [], 44
    while offset < len(madt):
        length = madt[offset + 1]
        entries.append(madt[offset:offset + length])
        offset += length
    assert offset == len(madt)
    return entries


def test_madt_for_two_boot_of_four_possible_vcpus():
    madt = tables.madt(boot_vcpus=2, max_vcpus=4)
    assert madt[8] == 5                                          # revision 5
    assert struct.unpack_from("<II", madt, 36) == (0xFEE0_0000, 0)   # LAPIC address, no PCAT_COMPAT
    entries = madt_entries(madt)
    x2apics = [struct.unpack("<BBHIII", e) for e in entries if e[0] == 9]
    # (type, length, reserved, x2apic id, flags, uid): Enabled only below boot, all Online Capable
    assert x2apics == [(9, 16, 0, 0, 3, 0), (9, 16, 0, 1, 3, 1),
                       (9, 16, 0, 2, 2, 2), (9, 16, 0, 3, 2, 3)]
    assert not [e for e in entries if e[0] == 0]                 # no legacy Local APIC entries
    ioapics = [struct.unpack("<BBBBII", e) for e in entries if e[0] == 1]
    assert ioapics == [(1, 12, 0, 0, 0xFEC0_0000, 0)]
    overrides = [struct.unpack("<BBBBIH", e) for e in entries if e[0] == 2]
    assert overrides == [(2, 10, 0, 4, 4, 0)]
    assert len(madt) == 44 + 4 * 16 + 12 + 10


def test_madt_uses_the_apic_id_mapping():
    madt = tables.madt(1, 3, apic_id=lambda cpu: cpu * 4)
    x2apics = [struct.unpack("<BBHIII", e) for e in madt_entries(madt) if e[0] == 9]
    assert [(apic, uid) for _, _, _, apic, _, uid in x2apics] == [(0, 0), (4, 1), (8, 2)]


@pytest.mark.parametrize("boot, maximum", [(0, 1), (3, 2)])
def test_madt_rejects_bad_vcpu_counts(boot, maximum):
    with pytest.raises(AcpiTablesError):
        tables.madt(boot, maximum)


def test_x2apic_entry_for_mat_is_enabled_only():
    assert x2apic_madt_entry(5, 7, True) == struct.pack("<BBHIII", 9, 16, 0, 7, 1, 5)
    assert x2apic_madt_entry(5, 7, False, online_capable=True) == struct.pack(
        "<BBHIII", 9, 16, 0, 7, 2, 5)


def test_mcfg():
    mcfg = tables.mcfg()
    assert mcfg[8] == 1 and len(mcfg) == 36 + 8 + 16
    assert mcfg[36:44] == bytes(8)
    assert struct.unpack_from("<QHBB4x", mcfg, 44) == (0xE800_0000, 0, 0, 0)
    second = struct.unpack_from("<QHBB4x", tables.mcfg(2), 60)
    assert second == (0xE800_0000 + (1 << 20), 1, 0, 0)


def test_xsdt():
    xsdt = tables.xsdt([0xA0100, 0xA0200])
    assert xsdt[8] == 1
    assert struct.unpack_from("<2Q", xsdt, 36) == (0xA0100, 0xA0200)


@pytest.fixture
def mem():
    memory = GuestMemory.from_ranges([(0, 1 << 20)])
    yield memory
    memory.close()


def table_at(mem: GuestMemory, addr: int) -> bytes:
    """The checksummed table at ``addr`` in guest memory."""
    length, = struct.unpack("<I", mem.read(addr + 4, 4))
    table = mem.read(addr, length)
    assert byte_sum(table) == 0
    return table


def xsdt_pointers(mem: GuestMemory, rsdp_addr: int) -> tuple[int, tuple[int, ...]]:
    """(XSDT address, the table addresses it lists), found from the RSDP."""
    rsdp = mem.read(rsdp_addr, 36)
    assert rsdp[:8] == b"RSD PTR " and byte_sum(rsdp) == 0 == byte_sum(rsdp[:20])
    xsdt_addr, = struct.unpack_from("<Q", rsdp, 24)
    xsdt = table_at(mem, xsdt_addr)
    assert xsdt[:4] == b"XSDT"
    return xsdt_addr, struct.unpack_from(f"<{(len(xsdt) - 36) // 8}Q", xsdt, 36)


def test_layout_in_guest_memory(mem):
    body = b"\x5b\x82\x06TST_"
    rsdp_addr = create_acpi_tables(mem, dsdt_body=body, boot_vcpus=2, max_vcpus=4)
    assert rsdp_addr == layout.RSDP_POINTER == 0xA0000
    xsdt_addr, pointers = xsdt_pointers(mem, rsdp_addr)
    assert [table_at(mem, p)[:4] for p in pointers] == [b"FACP", b"APIC", b"MCFG"]   # no DSDT
    facp_addr, apic_addr, mcfg_addr = pointers
    dsdt_addr, = struct.unpack_from("<Q", table_at(mem, facp_addr), 140)
    dsdt = table_at(mem, dsdt_addr)
    assert dsdt[:4] == b"DSDT" and dsdt[8] == 6 and dsdt[36:] == body
    # contiguous, in the reference's order: RSDP, DSDT, FACP, APIC, MCFG, XSDT
    assert dsdt_addr == rsdp_addr + 36
    assert facp_addr == dsdt_addr + len(dsdt)
    assert apic_addr == facp_addr + 276
    assert mcfg_addr == apic_addr + 44 + 4 * 16 + 12 + 10
    assert xsdt_addr == mcfg_addr + 60


def test_tables_that_overflow_the_ebda_are_refused_and_not_written(mem):
    too_big = bytes(layout.SMBIOS_START - layout.EBDA_START)
    with pytest.raises(AcpiTablesError, match="0xf0000"):
        create_acpi_tables(mem, dsdt_body=too_big, boot_vcpus=1, max_vcpus=1)
    assert mem.read(layout.RSDP_POINTER, 64) == bytes(64)


def test_4096_possible_vcpus_fit(mem):
    rsdp_addr = create_acpi_tables(mem, dsdt_body=b"", boot_vcpus=1, max_vcpus=4096)
    _, (_, apic_addr, _) = xsdt_pointers(mem, rsdp_addr)
    assert len(table_at(mem, apic_addr)) == 44 + 4096 * 16 + 12 + 10
