"""The MP table parsed back the way Linux's mpparse.c reads it."""
import struct

import pytest

from pych.arch.x86_64 import layout, mptable
from pych.memory.guest_memory import GuestMemory


def _scan(mem: GuestMemory, base: int, length: int) -> int | None:
    """Linux's smp_scan_config: a 16-byte aligned "_MP_" with length 1, spec 1 or 4, sum 0."""
    area = mem.read(base, length)
    for off in range(0, length, 16):
        mpf = area[off:off + 16]
        if mpf[:4] == b"_MP_" and mpf[8] == 1 and sum(mpf) % 256 == 0 and mpf[9] in (1, 4):
            return base + off
    return None


def _parse(mem: GuestMemory):
    """Find the pointer in the kernel's scan order and parse the configuration table."""
    found = (_scan(mem, 0, 0x400) or _scan(mem, 639 * 0x400, 0x400)
             or _scan(mem, 0xF0000, 0x10000))
    assert found is not None, "no MP floating pointer where Linux scans"
    physptr, length, spec, _, feature1 = struct.unpack_from("<IBBBB", mem.read(found + 4, 8))
    assert feature1 == 0                          # 0: a configuration table is present
    header = mem.read(physptr, 44)
    sig, total, rev, _csum, oem, product, _, _, count, lapic = struct.unpack_from(
        "<4sHBB8s12sIHHI", header)
    assert sig == b"PCMP" and rev == 4
    table = mem.read(physptr, total)
    assert sum(table) % 256 == 0                  # mpf_checksum over the whole table
    entries, off = [], 44
    for _ in range(count):
        kind = table[off]
        size = 20 if kind == 0 else 8
        entries.append(table[off:off + size])
        off += size
    assert off == total                           # entry count and length agree
    return found, physptr, lapic, entries


@pytest.fixture
def mem():
    m = GuestMemory.from_ranges(layout.ram_regions(16 << 20))
    yield m
    m.close()


def test_found_in_the_second_scan_with_every_entry(mem):
    mptable.write_mptable(mem, 2)
    found, physptr, lapic, entries = _parse(mem)
    assert found == 0x9FC00 and physptr == 0x9FC10
    assert lapic == layout.APIC_START
    kinds = [e[0] for e in entries]
    assert kinds == [0, 0, 1, 2] + [3] * 16 + [4, 4]
    cpus = [struct.unpack_from("<BBBBIII", e) for e in entries[:2]]
    assert [(c[1], c[3]) for c in cpus] == [(0, 3), (1, 1)]     # APIC id, enabled | BSP on cpu 0
    assert entries[2][2:8] == b"ISA   "
    _, ioapic_id, _, ioapic_flags, ioapic_addr = struct.unpack("<BBBBI", entries[3])
    assert (ioapic_id, ioapic_flags, ioapic_addr) == (0, 1, layout.IOAPIC_START)
    irqs = [struct.unpack("<BBHBBBB", e) for e in entries[4:20]]
    assert [(i[1], i[4], i[5], i[6]) for i in irqs] == [(0, irq, 0, irq) for irq in range(16)]
    lints = [struct.unpack("<BBHBBBB", e) for e in entries[20:]]
    assert [(i[1], i[5], i[6]) for i in lints] == [(3, 0xFF, 0), (1, 0xFF, 1)]   # ExtINT, NMI


def test_stays_inside_the_last_kib_and_clear_of_acpi(mem):
    for n in (1, 40):
        placed = mptable.place(n)
        assert all(layout.MPTABLE_START <= a and a + len(d) <= layout.EBDA_START
                   for a, d in placed), n


def test_many_vcpus_put_the_table_below_the_pointer(mem):
    mptable.write_mptable(mem, 100)
    found, physptr, _, entries = _parse(mem)
    assert found == 0x9FC00
    assert physptr % 16 == 0 and physptr + 44 + 100 * 20 + 20 * 8 <= found
    assert sum(1 for e in entries if e[0] == 0) == 100


def test_apic_ids_beyond_xapic_are_left_to_the_madt(mem):
    mptable.write_mptable(mem, 4, apic_id=lambda cpu: 0xFD + cpu)
    _, _, _, entries = _parse(mem)
    assert [e[1] for e in entries if e[0] == 0] == [0xFD, 0xFE]


def test_checksums_are_the_complement():
    assert mptable.checksum(b"\x01\x02") == 0xFD
    mpf = mptable.floating_pointer(0x9FC10)
    assert len(mpf) == 16 and sum(mpf) % 256 == 0
    assert struct.unpack_from("<I", mpf, 4)[0] == 0x9FC10
