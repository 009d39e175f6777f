"""SMBIOS tables: what the guest reads as ``/sys/class/dmi/id`` (``--platform``).

As the reference does, pych writes an SMBIOS 3.0 (64-bit) entry point at
:data:`~pych.arch.x86_64.layout.SMBIOS_START` (0xf0000, where Linux scans for ``_SM3_``
without EFI) and the structure table right after it:

- type 0, BIOS information: vendor ``cloud-hypervisor``, version ``0``, PCI supported, a
  virtual machine;
- type 1, system information: manufacturer, product name, version, serial number, UUID, SKU
  and family (``system_*`` of :class:`~pych.config.PlatformConfig`; manufacturer and product
  name default to the reference's ``Cloud Hypervisor`` / ``cloud-hypervisor``);
- type 3, chassis, only with ``chassis_asset_tag``;
- type 11, OEM strings, only with ``oem_strings``;
- type 127, end of table.

Each structure is its formatted part followed by its strings (numbered from 1, 0 meaning
"none"), each NUL-terminated, and one more NUL.  The UUID is stored as SMBIOS 2.6+ says:
its first three fields little-endian, so the guest prints the string it was given.
"""

from __future__ import annotations

import struct
import uuid as uuid_module
from collections.abc import Sequence
from dataclasses import dataclass, field

from pych.arch.x86_64 import layout

__all__ = ["SmbiosStrings", "build_smbios", "write_smbios"]

BIOS_INFORMATION = 0
SYSTEM_INFORMATION = 1
CHASSIS_INFORMATION = 3
OEM_STRINGS = 11
END_OF_TABLE = 127

PCI_SUPPORTED = 1 << 7                  # BIOS characteristics
IS_VIRTUAL_MACHINE = 1 << 4             # BIOS characteristics extension byte 2
CHASSIS_TYPE_OTHER = 1
STATE_SAFE = 3                          # chassis boot-up, power supply and thermal state
SECURITY_NONE = 3

DEFAULT_MANUFACTURER = "Cloud Hypervisor"
DEFAULT_PRODUCT_NAME = "cloud-hypervisor"
BIOS_VENDOR = "cloud-hypervisor"
BIOS_VERSION = "0"

_ENTRY_POINT = struct.Struct("<5sBBBBBBBIQ")     # 24 bytes
_HEADER = struct.Struct("<BBH")                  # type, length, handle
_BIOS = struct.Struct("<BBH BBHBB Q BB")         # 20 bytes
_SYSTEM = struct.Struct("<BBH BBBB 16s BBB")     # 27 bytes
_CHASSIS = struct.Struct("<BBH BBBBB BBBB")      # 13 bytes (SMBIOS 2.1)
_OEM = struct.Struct("<BBH B")


@dataclass(frozen=True)
class SmbiosStrings:
    """What the configuration puts in the tables (None: not given)."""

    serial_number: str | None = None
    uuid: str | None = None
    oem_strings: Sequence[str] = field(default_factory=tuple)
    manufacturer: str | None = None
    product_name: str | None = None
    version: str | None = None
    family: str | None = None
    sku_number: str | None = None
    chassis_asset_tag: str | None = None

    @classmethod
    def from_platform(cls, platform) -> SmbiosStrings:
        """From a ``PlatformConfig`` (or None: the defaults)."""
        if platform is None:
            return cls()
        return cls(platform.system_serial_number, platform.system_uuid,
                   tuple(platform.oem_strings or ()), platform.system_manufacturer,
                   platform.system_product_name, platform.system_version,
                   platform.system_family, platform.system_sku_number,
                   platform.chassis_asset_tag)


class _Strings:
    """A structure's string set: ``add`` returns the number the formatted part refers to."""

    def __init__(self) -> None:
        self.items: list[bytes] = []

    def add(self, text: str | None) -> int:
        if not text:
            return 0
        self.items.append(text.encode())
        return len(self.items)

    def pack(self) -> bytes:
        if not self.items:
            return b"\0\0"
        return b"".join(item + b"\0" for item in self.items) + b"\0"


def _checksum(data: bytes) -> int:
    return -sum(data) & 0xFF


def build_smbios(strings: SmbiosStrings, table_address: int) -> tuple[bytes, bytes]:
    """``(entry point, structure table)`` for a table placed at ``table_address``."""
    table = bytearray()
    handle = 0

    def structure(formatted: bytes, texts: _Strings) -> None:
        table.extend(formatted)
        table.extend(texts.pack())

    handle += 1
    texts = _Strings()
    vendor, version = texts.add(BIOS_VENDOR), texts.add(BIOS_VERSION)
    structure(_BIOS.pack(BIOS_INFORMATION, _BIOS.size, handle, vendor, version, 0, 0, 0,
                         PCI_SUPPORTED, 0, IS_VIRTUAL_MACHINE), texts)

    handle += 1
    texts = _Strings()
    manufacturer = texts.add(strings.manufacturer or DEFAULT_MANUFACTURER)
    product = texts.add(strings.product_name or DEFAULT_PRODUCT_NAME)
    version = texts.add(strings.version)
    serial = texts.add(strings.serial_number)
    sku = texts.add(strings.sku_number)
    family = texts.add(strings.family)
    uuid = uuid_module.UUID(strings.uuid).bytes_le if strings.uuid else bytes(16)
    structure(_SYSTEM.pack(SYSTEM_INFORMATION, _SYSTEM.size, handle, manufacturer, product,
                           version, serial, uuid, 0, sku, family), texts)

    if strings.chassis_asset_tag:
        handle += 1
        texts = _Strings()
        maker = texts.add(strings.manufacturer or DEFAULT_MANUFACTURER)
        tag = texts.add(strings.chassis_asset_tag)
        structure(_CHASSIS.pack(CHASSIS_INFORMATION, _CHASSIS.size, handle, maker,
                                CHASSIS_TYPE_OTHER, 0, 0, tag, STATE_SAFE, STATE_SAFE,
                                STATE_SAFE, SECURITY_NONE), texts)

    if strings.oem_strings:
        handle += 1
        texts = _Strings()
        for text in strings.oem_strings:
            texts.add(text)
        structure(_OEM.pack(OEM_STRINGS, _OEM.size, handle, len(strings.oem_strings)), texts)

    handle += 1
    structure(_HEADER.pack(END_OF_TABLE, _HEADER.size, handle), _Strings())

    entry = bytearray(_ENTRY_POINT.pack(b"_SM3_", 0, _ENTRY_POINT.size, 3, 2, 0, 1, 0,
                                        len(table), table_address))
    entry[5] = _checksum(entry)
    return bytes(entry), bytes(table)


def write_smbios(mem, strings: SmbiosStrings) -> int:
    """Write the entry point at ``SMBIOS_START`` and the table after it into guest memory
    ``mem``; returns the table's length."""
    table_address = layout.SMBIOS_START + _ENTRY_POINT.size
    entry, table = build_smbios(strings, table_address)
    if table_address + len(table) > layout.HIGH_RAM_START:
        raise ValueError(f"the SMBIOS tables ({len(table)} bytes) do not fit below 1 MiB")
    mem.write(layout.SMBIOS_START, entry)
    mem.write(table_address, table)
    return len(table)
