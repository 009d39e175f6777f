"""CMOS RAM and the MC146818 real-time clock at ports 0x70 (index) and 0x71 (data).

The clock reads the host's wall clock in UTC on every access; there is no stored time.
Formats follow register B as the guest sets it: BCD or binary (DM), 24- or 12-hour.
Register A's update-in-progress bit is high from 244 us before each second until the
1984 us update cycle ends, as on the part, so a guest that waits for UIP to clear and
re-reads the seconds gets a consistent date.  Guest writes to the time registers are
ignored (the clock keeps following the host), and no RTC interrupt (IRQ 8) is raised:
register C always reads 0.

The rest is 128 bytes of CMOS RAM, including the memory-size bytes that firmware reads,
filled in the way the reference and QEMU do:

=============  ==========================================================================
0x15, 0x16     base memory in KiB: 640
0x17, 0x18     extended memory from 1 MiB, in KiB, at most 0xFFFF (also at 0x30, 0x31)
0x34, 0x35     RAM below 4 GiB from 16 MiB up, in 64 KiB units, at most 0xFFFF
0x5B..0x5D     RAM above 4 GiB, in 64 KiB units, at most 0xFFFFFF
0x0F           shutdown status: plain RAM, as firmware and Linux's SMP boot treat it
=============  ==========================================================================

Bit 7 of the index is the NMI mask on real boards; it is accepted and has no effect.  The
index port is write-only and reads as 0xFF.
"""

from __future__ import annotations

import time
from collections.abc import Callable

from pych.snapshot import state as snap

PORT_COUNT = 2
INDEX = 0
DATA = 1

# --- RTC registers ----------------------------------------------------------------------------
SECONDS = 0x00
MINUTES = 0x02
HOURS = 0x04
WEEKDAY = 0x06
DAY = 0x07
MONTH = 0x08
YEAR = 0x09
REG_A = 0x0A
REG_B = 0x0B
REG_C = 0x0C
REG_D = 0x0D
SHUTDOWN_STATUS = 0x0F
CENTURY = 0x32
TIME_REGISTERS = frozenset((SECONDS, MINUTES, HOURS, WEEKDAY, DAY, MONTH, YEAR, CENTURY))

REG_A_UIP = 0x80
REG_A_DEFAULT = 0x26            # 32.768 kHz time base, 1024 Hz periodic rate
REG_B_DM_BINARY = 0x04
REG_B_24H = 0x02
REG_B_DEFAULT = REG_B_24H       # BCD, 24-hour
REG_D_VRT = 0x80                # "valid RAM and time": the battery is fine
HOURS_PM = 0x80                 # in 12-hour mode

UIP_LEAD_NS = 244_000           # UIP rises this long before the update ...
UPDATE_CYCLE_NS = 1_984_000     # ... and falls when the update cycle has run

_INDEX_MASK = 0x7F
_KiB = 1024
_MiB = 1024 * _KiB


class Cmos:
    """A :class:`pych.devices.bus.BusDevice` for ports 0x70-0x71.

    ``mem_below_4g`` and ``mem_above_4g`` are the guest's RAM sizes in bytes either side
    of the 32-bit hole; ``clock`` gives the wall clock in nanoseconds (for tests).
    """

    def __init__(self, mem_below_4g: int, mem_above_4g: int, *,
                 clock: Callable[[], int] = time.time_ns):
        self._clock = clock
        self._index = 0
        self._ram = bytearray(128)
        self._ram[REG_A] = REG_A_DEFAULT
        self._ram[REG_B] = REG_B_DEFAULT
        _put_le(self._ram, 0x15, 2, 640)
        extended_kib = min(0xFFFF, max(0, mem_below_4g - 1 * _MiB) // _KiB)
        _put_le(self._ram, 0x17, 2, extended_kib)
        _put_le(self._ram, 0x30, 2, extended_kib)
        _put_le(self._ram, 0x34, 2, min(0xFFFF, max(0, mem_below_4g - 16 * _MiB) // (64 * _KiB)))
        _put_le(self._ram, 0x5B, 3, min(0xFF_FFFF, mem_above_4g // (64 * _KiB)))

    def save_state(self) -> dict:
        """The index register and the 128 bytes of CMOS RAM (the clock is the host's)."""
        return snap.save(self, ("_index", "_ram"))

    def restore_state(self, saved: dict) -> None:
        snap.load(self, ("_index", "_ram"), saved)

    def read(self, offset: int, size: int) -> int:
        if size != 1 or offset != DATA:
            return (1 << (8 * size)) - 1
        index = self._index
        if index in TIME_REGISTERS:
            return self._read_clock(index)
        if index == REG_A:
            uip = REG_A_UIP if self._update_in_progress() else 0
            return self._ram[REG_A] & ~REG_A_UIP | uip
        if index == REG_C:
            return 0                    # no interrupt flags: the RTC raises no interrupts
        if index == REG_D:
            return REG_D_VRT
        return self._ram[index]

    def write(self, offset: int, size: int, value: int) -> None:
        if size != 1:
            return
        if offset == INDEX:
            self._index = value & _INDEX_MASK
        elif offset == DATA:
            index = self._index
            if index in TIME_REGISTERS or index in (REG_C, REG_D):
                return                  # the clock follows the host; C and D are read-only
            if index == REG_A:
                value &= ~REG_A_UIP
            self._ram[index] = value

    def _read_clock(self, index: int) -> int:
        now = time.gmtime(self._clock() // 1_000_000_000)
        if index == SECONDS:
            return self._encode(now.tm_sec)
        if index == MINUTES:
            return self._encode(now.tm_min)
        if index == HOURS:
            return self._encode_hours(now.tm_hour)
        if index == WEEKDAY:
            return self._encode((now.tm_wday + 1) % 7 + 1)      # Sunday is 1
        if index == DAY:
            return self._encode(now.tm_mday)
        if index == MONTH:
            return self._encode(now.tm_mon)
        if index == YEAR:
            return self._encode(now.tm_year % 100)
        assert index == CENTURY
        return self._encode(now.tm_year // 100)

    def _encode(self, value: int) -> int:
        if self._ram[REG_B] & REG_B_DM_BINARY:
            return value
        return (value // 10) << 4 | value % 10

    def _encode_hours(self, hour: int) -> int:
        if self._ram[REG_B] & REG_B_24H:
            return self._encode(hour)
        pm = HOURS_PM if hour >= 12 else 0
        return self._encode(hour % 12 or 12) | pm

    def _update_in_progress(self) -> bool:
        ns = self._clock() % 1_000_000_000
        return ns >= 1_000_000_000 - UIP_LEAD_NS or ns < UPDATE_CYCLE_NS


def _put_le(ram: bytearray, index: int, width: int, value: int) -> None:
    ram[index:index + width] = value.to_bytes(width, "little")
