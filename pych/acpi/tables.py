"""ACPI system description tables for x86_64, laid out like Cloud Hypervisor's.

The tables are written contiguously into guest RAM starting at the RSDP
(``layout.RSDP_POINTER``, the EBDA) in the reference's order: RSDP, DSDT, FACP, APIC (MADT),
MCFG, XSDT. The XSDT lists FACP, APIC and MCFG; the DSDT is reached only through the FADT's
X_DSDT. The platform is HW-reduced ACPI: no FACS, no PM1/GPE blocks; shutdown and reset go
through the 1-byte register at ``ACPI_SHUTDOWN_PORT`` (see ``pych.devices.acpi``).

Field offsets are those of ACPI 6.5 §5.2; see ../shared/notes/ch-hotplug-reference.md §1.2.
"""

from __future__ import annotations

import enum
import struct
from collections.abc import Callable

from pych.arch.x86_64 import layout
from pych.memory.guest_memory import GuestMemory

OEM_ID = b"CLOUDH"
OEM_REVISION = 1
CREATOR_ID = b"PYCH"
CREATOR_REVISION = 1
HYPERVISOR_VENDOR_ID = b"CLOUDHYP"

SDT_HEADER_SIZE = 36
RSDP_SIZE = 36

# FADT (revision 6, 276 bytes): byte offsets of the fields pych fills in.
FADT_REVISION = 6
FADT_MINOR_VERSION = 3
FADT_SIZE = 276
FADT_FLAGS_OFFSET = 112
FADT_RESET_REG_OFFSET = 116
FADT_RESET_VALUE_OFFSET = 128
FADT_MINOR_VERSION_OFFSET = 131
FADT_X_DSDT_OFFSET = 140
FADT_X_PM_TMR_BLK_OFFSET = 208
FADT_SLEEP_CONTROL_REG_OFFSET = 244
FADT_SLEEP_STATUS_REG_OFFSET = 256
FADT_HYPERVISOR_VENDOR_OFFSET = 268

FADT_TMR_VAL_EXT = 1 << 8           # the PM timer is 32 bits wide
FADT_RESET_REG_SUP = 1 << 10
FADT_HW_REDUCED_ACPI = 1 << 20
RESET_VALUE = 1

MADT_REVISION = 5                   # >= 5: Linux honours the Online Capable flag
MADT_LOCAL_X2APIC = 9
MADT_IO_APIC = 1
MADT_INTERRUPT_SOURCE_OVERRIDE = 2
MADT_ENABLED = 1 << 0
MADT_ONLINE_CAPABLE = 1 << 1


class AcpiTablesError(Exception):
    """The ACPI tables cannot be built or do not fit where they must go."""


class AddressSpaceId(enum.IntEnum):
    SYSTEM_MEMORY = 0
    SYSTEM_IO = 1


def checksum(data: bytes) -> int:
    """The byte that makes ``data`` (with that byte included) sum to zero modulo 256."""
    return -sum(data) & 0xFF


def generic_address(space: AddressSpaceId, address: int, width_bytes: int) -> bytes:
    """A Generic Address Structure (12 bytes) for a register of 1, 2, 4 or 8 bytes."""
    access_size = {1: 1, 2: 2, 4: 3, 8: 4}[width_bytes]
    return struct.pack("<BBBBQ", space, width_bytes * 8, 0, access_size, address)


def sdt(signature: bytes, revision: int, body: bytes, *, oem_table_id: bytes) -> bytes:
    """A system description table: 36-byte header (length, checksum filled in) plus ``body``."""
    if len(signature) != 4 or len(oem_table_id) != 8:
        raise AcpiTablesError(f"bad signature {signature!r} or OEM table id {oem_table_id!r}")
    header = struct.pack("<4sIBB6s8sI4sI", signature, SDT_HEADER_SIZE + len(body), revision, 0,
                         OEM_ID, oem_table_id, OEM_REVISION, CREATOR_ID, CREATOR_REVISION)
    table = bytearray(header + body)
    table[9] = checksum(table)
    return bytes(table)


def rsdp(xsdt_address: int) -> bytes:
    """The ACPI 2.0+ RSDP (revision 2, 36 bytes): no RSDT, only the XSDT pointer."""
    table = bytearray(struct.pack("<8sB6sBIIQB3x", b"RSD PTR ", 0, OEM_ID, 2, 0, RSDP_SIZE,
                                  xsdt_address, 0))
    table[8] = checksum(table[:20])
    table[32] = checksum(table)
    return bytes(table)


def dsdt(body: bytes) -> bytes:
    """The DSDT (revision 6) around an AML body."""
    return sdt(b"DSDT", 6, body, oem_table_id=b"CHDSDT  ")


def fadt(dsdt_address: int) -> bytes:
    """The FADT (revision 6.3, 276 bytes) of a HW-reduced platform.

    Reset register and sleep control/status registers are the 1-byte I/O register at
    ``ACPI_SHUTDOWN_PORT``; the PM timer is the 32-bit I/O register at ``ACPI_PM_TIMER_PORT``.
    Only X_DSDT is set (the 32-bit DSDT pointer stays 0).
    """
    table = bytearray(FADT_SIZE)
    shutdown_reg = generic_address(AddressSpaceId.SYSTEM_IO, layout.ACPI_SHUTDOWN_PORT, 1)
    flags = FADT_HW_REDUCED_ACPI | FADT_RESET_REG_SUP | FADT_TMR_VAL_EXT
    struct.pack_into("<I", table, FADT_FLAGS_OFFSET, flags)
    _put(table, FADT_RESET_REG_OFFSET, shutdown_reg)
    table[FADT_RESET_VALUE_OFFSET] = RESET_VALUE
    table[FADT_MINOR_VERSION_OFFSET] = FADT_MINOR_VERSION
    struct.pack_into("<Q", table, FADT_X_DSDT_OFFSET, dsdt_address)
    _put(table, FADT_X_PM_TMR_BLK_OFFSET,
         generic_address(AddressSpaceId.SYSTEM_IO, layout.ACPI_PM_TIMER_PORT, 4))
    _put(table, FADT_SLEEP_CONTROL_REG_OFFSET, shutdown_reg)
    _put(table, FADT_SLEEP_STATUS_REG_OFFSET, shutdown_reg)
    _put(table, FADT_HYPERVISOR_VENDOR_OFFSET, HYPERVISOR_VENDOR_ID)
    return sdt(b"FACP", FADT_REVISION, bytes(table[SDT_HEADER_SIZE:]), oem_table_id=b"CHFACP  ")


def _put(table: bytearray, offset: int, data: bytes) -> None:
    table[offset:offset + len(data)] = data


def x2apic_madt_entry(cpu_id: int, apic_id: int, enabled: bool, *,
                      online_capable: bool = False) -> bytes:
    """A Processor Local x2APIC structure (MADT type 9, 16 bytes).

    ``cpu_id`` is the ACPI processor UID (it must equal the processor device's ``_UID``).
    A CPU's ``_MAT`` uses ``enabled=True`` (Linux ignores a _MAT entry without Enabled); the
    MADT marks every possible CPU ``online_capable`` so that Linux counts the disabled ones
    as hot-pluggable.
    """
    flags = (MADT_ENABLED if enabled else 0) | (MADT_ONLINE_CAPABLE if online_capable else 0)
    return struct.pack("<BBHIII", MADT_LOCAL_X2APIC, 16, 0, apic_id, flags, cpu_id)


def _identity(cpu_id: int) -> int:
    return cpu_id


def madt(boot_vcpus: int, max_vcpus: int, apic_id: Callable[[int], int] = _identity) -> bytes:
    """The MADT (revision 5): an x2APIC entry per possible vCPU, the IOAPIC, ISA IRQ 4's ISO.

    vCPUs 0..boot_vcpus-1 are Enabled; every entry is Online Capable (as in the reference).
    There are no legacy Local APIC (type 0) entries and PCAT_COMPAT is clear.
    """
    if not 1 <= boot_vcpus <= max_vcpus:
        raise AcpiTablesError(f"need 1 <= boot_vcpus ({boot_vcpus}) <= max_vcpus ({max_vcpus})")
    body = [struct.pack("<II", layout.APIC_START, 0)]
    body += [x2apic_madt_entry(cpu, apic_id(cpu), cpu < boot_vcpus, online_capable=True)
             for cpu in range(max_vcpus)]
    body.append(struct.pack("<BBBBII", MADT_IO_APIC, 12, 0, 0, layout.IOAPIC_START, 0))
    body.append(struct.pack("<BBBBIH", MADT_INTERRUPT_SOURCE_OVERRIDE, 10, 0,
                            layout.SERIAL_IRQ, layout.SERIAL_IRQ, 0))
    return sdt(b"APIC", MADT_REVISION, b"".join(body), oem_table_id=b"CHMADT  ")


def mcfg(pci_segments: int = 1) -> bytes:
    """The MCFG: one ECAM window (bus 0 only) per PCI segment, 1 MiB apart."""
    entries = [struct.pack("<QHBB4x", layout.ecam_base(segment), segment, 0, 0)
               for segment in range(pci_segments)]
    return sdt(b"MCFG", 1, bytes(8) + b"".join(entries), oem_table_id=b"CHMCFG  ")


def xsdt(table_addresses: list[int]) -> bytes:
    """The XSDT: 64-bit pointers to the listed tables."""
    body = struct.pack(f"<{len(table_addresses)}Q", *table_addresses)
    return sdt(b"XSDT", 1, body, oem_table_id=b"CHXSDT  ")


def create_acpi_tables(mem: GuestMemory, *, dsdt_body: bytes, boot_vcpus: int, max_vcpus: int,
                       apic_id: Callable[[int], int] = _identity, pci_segments: int = 1) -> int:
    """Write RSDP, DSDT, FACP, APIC, MCFG and XSDT back to back at ``layout.RSDP_POINTER``.

    Returns the RSDP's guest physical address (for ``boot_params.acpi_rsdp_addr`` or
    ``hvm_start_info.rsdp_paddr``). Raises :class:`AcpiTablesError` if the tables would
    run past the EBDA area (``EBDA_START`` .. ``SMBIOS_START``); nothing is written then.
    """
    dsdt_table = dsdt(dsdt_body)
    dsdt_address = layout.RSDP_POINTER + RSDP_SIZE
    tables = [dsdt_table, fadt(dsdt_address), madt(boot_vcpus, max_vcpus, apic_id),
              mcfg(pci_segments)]
    addresses = [dsdt_address]
    for table in tables[:-1]:
        addresses.append(addresses[-1] + len(table))
    xsdt_address = addresses[-1] + len(tables[-1])
    xsdt_table = xsdt(addresses[1:])            # FACP, APIC, MCFG; never the DSDT
    end = xsdt_address + len(xsdt_table)
    if end > layout.SMBIOS_START:
        raise AcpiTablesError(
            f"ACPI tables need {end - layout.RSDP_POINTER:#x} bytes from {layout.RSDP_POINTER:#x}"
            f" but only {layout.SMBIOS_START - layout.RSDP_POINTER:#x} fit below"
            f" {layout.SMBIOS_START:#x} (DSDT is {len(dsdt_table):#x} bytes)")
    mem.write(layout.RSDP_POINTER, rsdp(xsdt_address))
    for address, table in zip(addresses + [xsdt_address], tables + [xsdt_table]):
        mem.write(address, table)
    return layout.RSDP_POINTER
