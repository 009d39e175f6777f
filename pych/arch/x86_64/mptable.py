"""The Intel MultiProcessor Specification 1.4 table (MP floating pointer + configuration table).

Why a guest that has ACPI needs one: Linux looks for the MP floating pointer early in
``setup_arch`` (``default_find_smp_config``), scanning 0x0–0x3FF, then the last KiB of base
memory (639 KiB = 0x9FC00), then the whole BIOS area 0xF0000–0xFFFFF, 16 bytes at a time, with
an ``early_memremap`` per step. Without a table it walks all 4096 BIOS-area steps; under
emulated guest code (PVM) that was ~3.8 s of a ~20 s boot. With the pointer at
``layout.MPTABLE_START`` (0x9FC00, where Cloud Hypervisor and Firecracker put theirs) the
second scan finds it at once.

The table only shortens the scan: with ACPI present the kernel enumerates CPUs and IOAPICs
from the MADT (``default_get_smp_config`` returns early when ``acpi_lapic && acpi_ioapic``),
so the MADT's possible-but-absent vCPUs, x2APIC ids and hot plug are unaffected. What the
table says agrees with the MADT anyway: one processor entry per boot vCPU (the BSP flagged),
the IOAPIC with the MADT's id (0) and address, ISA bus 0 with IRQs 0–15 identity mapped to
the IOAPIC's pins (KVM's default GSI routing, and what the MADT implies: its only override,
IRQ 4, is to pin 4), LINT0 ExtINT and LINT1 NMI as ``boot.lapic_with_lints`` programs them.

Layout: the 16-byte floating pointer at 0x9FC00, the configuration table right after it when
it fits in that KiB (up to 40 vCPUs), otherwise ending just below 0x9FC00. Both lie in e820
RAM; the kernel ``memblock_reserve``s them before its first allocation. The ACPI tables start
at ``layout.EBDA_START`` (0xA0000) and SMBIOS at 0xF0000, so nothing overlaps.
"""

from __future__ import annotations

import struct
from collections.abc import Callable

from pych.arch.x86_64 import layout
from pych.memory.guest_memory import GuestMemory

MPTABLE_START = layout.MPTABLE_START
MPTABLE_AREA_END = layout.EBDA_START          # the KiB the kernel scans ends here

MPF_SIGNATURE = b"_MP_"
MPC_SIGNATURE = b"PCMP"
MP_SPEC_REVISION = 4                          # MP spec 1.4
MPF_SIZE = 16
MPC_HEADER_SIZE = 44

# Entry types and sizes (MP spec 1.4, table 4-3).
MP_PROCESSOR, MP_BUS, MP_IOAPIC, MP_INTSRC, MP_LINTSRC = 0, 1, 2, 3, 4
PROCESSOR_ENTRY_SIZE = 20
OTHER_ENTRY_SIZE = 8

CPU_ENABLED = 1
CPU_BOOTPROCESSOR = 2
APIC_VERSION = 0x14                          # an integrated xAPIC, as KVM's LAPIC reports
CPU_SIGNATURE = 0x600                        # family 6 (the spec's signature field)
CPU_FEATURE_FPU = 1 << 0
CPU_FEATURE_APIC = 1 << 9
IOAPIC_USABLE = 1
IOAPIC_ID = 0                                # as in the MADT
ISA_BUS_ID = 0
ISA_IRQS = 16
MP_INT, MP_NMI, MP_EXTINT = 0, 1, 3          # interrupt types
MP_IRQ_CONFORMING = 0                        # polarity and trigger as the bus defines
ALL_LOCAL_APICS = 0xFF
MAX_XAPIC_ID = 0xFE                          # 0xFF is the broadcast id; larger ids need x2APIC
OEM_ID = b"PYCH    "
PRODUCT_ID = b"PYCHVM      "


def checksum(data: bytes) -> int:
    """The byte that makes ``data``'s bytes sum to zero mod 256."""
    return -sum(data) & 0xFF


def _with_checksum(data: bytearray, offset: int) -> bytes:
    data[offset] = 0
    data[offset] = checksum(data)
    return bytes(data)


def configuration_table(boot_vcpus: int, apic_id: Callable[[int], int] = lambda cpu: cpu) -> bytes:
    """The MP configuration table ("PCMP"): header, then entries in the spec's order."""
    entries = []
    for cpu in range(boot_vcpus):
        aid = apic_id(cpu)
        if aid > MAX_XAPIC_ID:
            continue                           # not representable; the MADT's x2APIC entry is
        flags = CPU_ENABLED | (CPU_BOOTPROCESSOR if cpu == 0 else 0)
        entries.append(struct.pack("<BBBBIIII", MP_PROCESSOR, aid, APIC_VERSION, flags,
                                   CPU_SIGNATURE, CPU_FEATURE_APIC | CPU_FEATURE_FPU, 0, 0))
    entries.append(struct.pack("<BB6s", MP_BUS, ISA_BUS_ID, b"ISA   "))
    entries.append(struct.pack("<BBBBI", MP_IOAPIC, IOAPIC_ID, APIC_VERSION, IOAPIC_USABLE,
                               layout.IOAPIC_START))
    for irq in range(ISA_IRQS):
        entries.append(struct.pack("<BBHBBBB", MP_INTSRC, MP_INT, MP_IRQ_CONFORMING, ISA_BUS_ID,
                                   irq, IOAPIC_ID, irq))
    entries.append(struct.pack("<BBHBBBB", MP_LINTSRC, MP_EXTINT, MP_IRQ_CONFORMING, ISA_BUS_ID,
                               0, ALL_LOCAL_APICS, 0))
    entries.append(struct.pack("<BBHBBBB", MP_LINTSRC, MP_NMI, MP_IRQ_CONFORMING, ISA_BUS_ID,
                               0, ALL_LOCAL_APICS, 1))
    body = b"".join(entries)
    header = bytearray(struct.pack("<4sHBB8s12sIHHIHBB", MPC_SIGNATURE, MPC_HEADER_SIZE + len(body),
                                   MP_SPEC_REVISION, 0, OEM_ID, PRODUCT_ID, 0, 0, len(entries),
                                   layout.APIC_START, 0, 0, 0))
    assert len(header) == MPC_HEADER_SIZE
    return _with_checksum(header + body, 7)


def floating_pointer(config_address: int) -> bytes:
    """The 16-byte MP floating pointer structure ("_MP_"), pointing at the configuration table."""
    data = bytearray(struct.pack("<4sIBBBB4x", MPF_SIGNATURE, config_address, 1,
                                 MP_SPEC_REVISION, 0, 0))
    return _with_checksum(data, 10)


def place(boot_vcpus: int, apic_id: Callable[[int], int] = lambda cpu: cpu) -> list[tuple[int, bytes]]:
    """[(guest address, bytes)] of the floating pointer and the configuration table."""
    if boot_vcpus < 1:
        raise ValueError(f"an MP table needs at least one vCPU, not {boot_vcpus}")
    table = configuration_table(boot_vcpus, apic_id)
    after = MPTABLE_START + MPF_SIZE
    if after + len(table) <= MPTABLE_AREA_END:
        table_address = after
    else:
        table_address = (MPTABLE_START - len(table)) & ~0xF
    return [(MPTABLE_START, floating_pointer(table_address)), (table_address, table)]


def write_mptable(mem: GuestMemory, boot_vcpus: int,
                  apic_id: Callable[[int], int] = lambda cpu: cpu) -> int:
    """Write the MP table; returns the floating pointer's guest address."""
    for address, data in place(boot_vcpus, apic_id):
        mem.write(address, data)
    return MPTABLE_START
