"""PCI type-0 configuration space.

A 256-byte register file with two masks per byte: bits the guest may write, and bits it
clears by writing 1 (status error bits).  Everything else about the header falls out of
those masks, including BAR sizing: the address bits of a BAR are the only writable ones,
so after the guest writes all-ones it reads back ``~(size - 1)`` plus the read-only type
bits, exactly as hardware does.

Capabilities are appended from 0x40 upward and chained through their ``next`` bytes;
their contents are plain bytes with their own write masks.  Devices that need behaviour
behind a capability (MSI-X enable, virtio's PCI-config window) intercept the access in
their ``config_read``/``config_write`` and use this object as storage.
"""

from __future__ import annotations

import enum
from dataclasses import dataclass

CONFIG_SPACE_SIZE = 256
NUM_BARS = 6

# Type-0 header offsets.
VENDOR_ID = 0x00
DEVICE_ID = 0x02
COMMAND = 0x04
STATUS = 0x06
REVISION_ID = 0x08
PROG_IF = 0x09
SUBCLASS = 0x0A
CLASS_CODE = 0x0B
CACHE_LINE_SIZE = 0x0C
LATENCY_TIMER = 0x0D
HEADER_TYPE = 0x0E
BAR0 = 0x10
SUBSYSTEM_VENDOR_ID = 0x2C
SUBSYSTEM_ID = 0x2E
EXPANSION_ROM = 0x30
CAPABILITIES_POINTER = 0x34
INTERRUPT_LINE = 0x3C
INTERRUPT_PIN = 0x3D

FIRST_CAPABILITY = 0x40

# Low BAR bits (read-only).
BAR_MEM_TYPE_64 = 0x4
BAR_MEM_PREFETCHABLE = 0x8
BAR_MEM_FLAGS_MASK = 0xF


class Command(enum.IntFlag):
    IO_SPACE = 1 << 0
    MEMORY_SPACE = 1 << 1
    BUS_MASTER = 1 << 2
    PARITY_ERROR_RESPONSE = 1 << 6
    SERR_ENABLE = 1 << 8
    INTX_DISABLE = 1 << 10


class Status(enum.IntFlag):
    INTERRUPT = 1 << 3
    CAPABILITIES_LIST = 1 << 4
    MASTER_DATA_PARITY_ERROR = 1 << 8
    SIGNALED_TARGET_ABORT = 1 << 11
    RECEIVED_TARGET_ABORT = 1 << 12
    RECEIVED_MASTER_ABORT = 1 << 13
    SIGNALED_SYSTEM_ERROR = 1 << 14
    DETECTED_PARITY_ERROR = 1 << 15


_COMMAND_WRITABLE = (Command.IO_SPACE | Command.MEMORY_SPACE | Command.BUS_MASTER
                     | Command.PARITY_ERROR_RESPONSE | Command.SERR_ENABLE | Command.INTX_DISABLE)
_STATUS_WRITE_1_TO_CLEAR = (Status.MASTER_DATA_PARITY_ERROR | Status.SIGNALED_TARGET_ABORT
                            | Status.RECEIVED_TARGET_ABORT | Status.RECEIVED_MASTER_ABORT
                            | Status.SIGNALED_SYSTEM_ERROR | Status.DETECTED_PARITY_ERROR)


class CapabilityId(enum.IntEnum):
    MSI = 0x05
    VENDOR_SPECIFIC = 0x09
    PCI_EXPRESS = 0x10
    MSIX = 0x11


class ConfigError(Exception):
    pass


@dataclass(frozen=True)
class Bar:
    """A memory BAR as declared by the device (the address lives in config space)."""
    index: int
    size: int
    is_64bit: bool = False
    prefetchable: bool = False

    @property
    def registers(self) -> range:
        """Config-space offsets of the BAR's dwords."""
        return range(BAR0 + 4 * self.index, BAR0 + 4 * (self.index + (2 if self.is_64bit else 1)), 4)


def _int(buf: bytearray, offset: int, size: int) -> int:
    return int.from_bytes(buf[offset:offset + size], "little")


class PciConfiguration:
    """The configuration header and capability list of one PCI function."""

    def __init__(self, *, vendor_id: int, device_id: int, class_code: int, subclass: int,
                 prog_if: int = 0, revision: int = 0, subsystem_vendor_id: int = 0,
                 subsystem_id: int = 0, interrupt_pin: int = 0, header_type: int = 0) -> None:
        self._data = bytearray(CONFIG_SPACE_SIZE)
        self._writable = bytearray(CONFIG_SPACE_SIZE)
        self._write_1_to_clear = bytearray(CONFIG_SPACE_SIZE)
        self._bars: list[Bar | None] = [None] * NUM_BARS
        self._capabilities: list[tuple[int, int]] = []     # (cap id, offset)
        self._next_capability = FIRST_CAPABILITY

        self._init(VENDOR_ID, 2, vendor_id)
        self._init(DEVICE_ID, 2, device_id)
        self._init(COMMAND, 2, 0, writable=_COMMAND_WRITABLE)
        self._init(STATUS, 2, 0, write_1_to_clear=_STATUS_WRITE_1_TO_CLEAR)
        self._init(REVISION_ID, 1, revision)
        self._init(PROG_IF, 1, prog_if)
        self._init(SUBCLASS, 1, subclass)
        self._init(CLASS_CODE, 1, class_code)
        self._init(CACHE_LINE_SIZE, 1, 0, writable=0xFF)
        self._init(HEADER_TYPE, 1, header_type)
        self._init(SUBSYSTEM_VENDOR_ID, 2, subsystem_vendor_id)
        self._init(SUBSYSTEM_ID, 2, subsystem_id)
        self._init(INTERRUPT_LINE, 1, 0, writable=0xFF)
        self._init(INTERRUPT_PIN, 1, interrupt_pin)

    def _init(self, offset: int, size: int, value: int, *, writable: int = 0,
              write_1_to_clear: int = 0) -> None:
        self._data[offset:offset + size] = value.to_bytes(size, "little")
        self._writable[offset:offset + size] = int(writable).to_bytes(size, "little")
        self._write_1_to_clear[offset:offset + size] = int(write_1_to_clear).to_bytes(size, "little")

    # --- guest access ---------------------------------------------------------------------
    def read(self, offset: int, size: int) -> int:
        """Read ``size`` bytes; offsets past the 256-byte space (PCIe extended space
        through ECAM) read as zero, which tells the guest there are no extended caps."""
        if offset < 0 or offset + size > CONFIG_SPACE_SIZE:
            return 0
        return _int(self._data, offset, size)

    def write(self, offset: int, size: int, value: int) -> None:
        if offset < 0 or offset + size > CONFIG_SPACE_SIZE:
            return
        old = _int(self._data, offset, size)
        writable = _int(self._writable, offset, size)
        clearable = _int(self._write_1_to_clear, offset, size)
        new = (old & ~writable) | (value & writable)
        new &= ~(value & clearable)
        self._data[offset:offset + size] = new.to_bytes(size, "little")

    # --- snapshot --------------------------------------------------------------------------
    def save_state(self) -> dict:
        """The 256 bytes as the guest left them (BAR addresses, command, capabilities);
        the write masks and the capability layout come from the device's construction."""
        return {"data": self._data.hex()}

    def restore_state(self, saved: dict) -> None:
        data = bytes.fromhex(saved["data"])
        if len(data) != CONFIG_SPACE_SIZE or data[:4] != self._data[:4]:
            raise ConfigError("saved PCI config space is not this device's (vendor/device "
                              f"{data[:4].hex()} != {self._data[:4].hex()})")
        self._data[:] = data

    # --- header helpers -------------------------------------------------------------------
    @property
    def vendor_id(self) -> int:
        return self.read(VENDOR_ID, 2)

    @property
    def device_id(self) -> int:
        return self.read(DEVICE_ID, 2)

    @property
    def command(self) -> Command:
        return Command(self.read(COMMAND, 2) & _COMMAND_WRITABLE)

    @property
    def interrupt_pin(self) -> int:
        return self.read(INTERRUPT_PIN, 1)

    def set_interrupt_line(self, line: int) -> None:
        self._data[INTERRUPT_LINE] = line & 0xFF

    def set_interrupt_status(self, asserted: bool) -> None:
        """The device-driven INTx status bit (read-only to the guest)."""
        status = self.read(STATUS, 2)
        status = status | Status.INTERRUPT if asserted else status & ~Status.INTERRUPT
        self._data[STATUS:STATUS + 2] = int(status).to_bytes(2, "little")

    # --- BARs -----------------------------------------------------------------------------
    def add_bar(self, index: int, size: int, *, is_64bit: bool = False,
                prefetchable: bool = False) -> Bar:
        """Declare memory BAR ``index`` of ``size`` bytes (a power of two >= 16)."""
        if size < 16 or size & (size - 1):
            raise ConfigError(f"BAR size {size:#x} is not a power of two >= 16")
        if not is_64bit and size > 1 << 31:
            raise ConfigError(f"32-bit BAR of {size:#x} bytes")
        bar = Bar(index, size, is_64bit, prefetchable)
        last = bar.registers[-1]
        if not 0 <= index < NUM_BARS or last >= BAR0 + 4 * NUM_BARS:
            raise ConfigError(f"BAR index {index} out of range")
        if any(self._bars[(r - BAR0) // 4] is not None or self._is_upper_half(r)
               for r in bar.registers):
            raise ConfigError(f"BAR {index} overlaps another BAR")
        self._bars[index] = bar

        address_mask = ~(size - 1) & ((1 << 64) - 1)
        flags = (BAR_MEM_TYPE_64 if is_64bit else 0) | (BAR_MEM_PREFETCHABLE if prefetchable else 0)
        low = BAR0 + 4 * index
        self._init(low, 4, flags, writable=address_mask & 0xFFFF_FFF0)
        if is_64bit:
            self._init(low + 4, 4, 0, writable=address_mask >> 32)
        return bar

    def _is_upper_half(self, register: int) -> bool:
        below = (register - BAR0) // 4 - 1
        return below >= 0 and (b := self._bars[below]) is not None and b.is_64bit

    @property
    def bars(self) -> tuple[Bar, ...]:
        return tuple(b for b in self._bars if b is not None)

    def bar(self, index: int) -> Bar:
        bar = self._bars[index] if 0 <= index < NUM_BARS else None
        if bar is None:
            raise ConfigError(f"no BAR {index}")
        return bar

    def bar_address(self, index: int) -> int:
        """The address currently programmed into the BAR (maybe a sizing pattern)."""
        bar = self.bar(index)
        low = BAR0 + 4 * index
        address = self.read(low, 4) & ~BAR_MEM_FLAGS_MASK
        if bar.is_64bit:
            address |= self.read(low + 4, 4) << 32
        return address

    def set_bar_address(self, index: int, address: int) -> None:
        """Program the BAR as firmware would (the VMM's initial placement)."""
        bar = self.bar(index)
        if address & (bar.size - 1) or address >> (64 if bar.is_64bit else 32):
            raise ConfigError(f"address {address:#x} unusable for BAR {index} ({bar.size:#x} bytes)")
        low = BAR0 + 4 * index
        flags = self.read(low, 4) & BAR_MEM_FLAGS_MASK
        self._data[low:low + 4] = ((address & 0xFFFF_FFFF) | flags).to_bytes(4, "little")
        if bar.is_64bit:
            self._data[low + 4:low + 8] = (address >> 32).to_bytes(4, "little")

    def decoded_bar_address(self, index: int) -> int | None:
        """Where the BAR answers right now, or None while it does not decode.

        A BAR decodes when memory space is enabled and it holds a usable address: not
        zero, and not a sizing pattern (whose last byte would be the top of the BAR's
        address space).  Guests size and move BARs with decoding off, so transient
        half-written 64-bit addresses are never mapped.
        """
        if not self.command & Command.MEMORY_SPACE:
            return None
        bar = self.bar(index)
        address = self.bar_address(index)
        top = (1 << (64 if bar.is_64bit else 32)) - 1
        if address == 0 or address + bar.size - 1 >= top:
            return None
        return address

    # --- capabilities -----------------------------------------------------------------------
    def add_capability(self, cap_id: int, body: bytes, writable: bytes | None = None) -> int:
        """Append a capability (``body`` excludes the id and next bytes); returns its offset."""
        offset = self._next_capability
        length = 2 + len(body)
        if offset + length > CONFIG_SPACE_SIZE:
            raise ConfigError("no room left in config space for another capability")
        if writable is not None and len(writable) != len(body):
            raise ConfigError("capability write mask and body differ in length")
        self._data[offset] = cap_id
        self._data[offset + 1] = 0
        self._data[offset + 2:offset + length] = body
        if writable is not None:
            self._writable[offset + 2:offset + length] = writable
        if self._capabilities:
            self._data[self._capabilities[-1][1] + 1] = offset
        else:
            self._data[CAPABILITIES_POINTER] = offset
            status = self.read(STATUS, 2) | Status.CAPABILITIES_LIST
            self._data[STATUS:STATUS + 2] = int(status).to_bytes(2, "little")
        self._capabilities.append((cap_id, offset))
        self._next_capability = (offset + length + 3) & ~3
        return offset

    def capability_offsets(self, cap_id: int) -> list[int]:
        return [off for cid, off in self._capabilities if cid == cap_id]
