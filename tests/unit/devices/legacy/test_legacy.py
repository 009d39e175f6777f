"""CMOS/RTC, i8042 and the POST code port."""

import calendar
import logging

from pych.devices.legacy.cmos import (
    CENTURY, DATA, DAY, HOURS, INDEX, MINUTES, MONTH, REG_A, REG_B, REG_B_DM_BINARY, REG_C,
    REG_D, SECONDS, SHUTDOWN_STATUS, WEEKDAY, YEAR, Cmos,
)
from pych.devices.legacy.debug_port import DebugPort
from pych.devices.legacy.i8042 import COMMAND, DATA as KBD_DATA, PORT_B, STATUS, I8042

GiB = 1 << 30
MiB = 1 << 20

# Thursday 2024-02-29 23:59:58 UTC, half a second in.
LEAP_DAY = calendar.timegm((2024, 2, 29, 23, 59, 58)) * 10**9 + 500_000_000


class Clock:
    def __init__(self, now):
        self.now = now

    def __call__(self):
        return self.now


def cmos_read(cmos, index):
    cmos.write(INDEX, 1, index)
    return cmos.read(DATA, 1)


def cmos_write(cmos, index, value):
    cmos.write(INDEX, 1, index)
    cmos.write(DATA, 1, value)


def test_cmos_clock_in_bcd():
    cmos = Cmos(1 * GiB, 0, clock=Clock(LEAP_DAY))
    got = {reg: cmos_read(cmos, reg)
           for reg in (SECONDS, MINUTES, HOURS, WEEKDAY, DAY, MONTH, YEAR, CENTURY)}
    assert got == {SECONDS: 0x58, MINUTES: 0x59, HOURS: 0x23, WEEKDAY: 5,   # Sunday is 1
                   DAY: 0x29, MONTH: 0x02, YEAR: 0x24, CENTURY: 0x20}
    assert cmos_read(cmos, REG_B) == 0x02                # 24-hour, BCD
    assert cmos_read(cmos, REG_D) == 0x80                # valid RAM and time
    assert cmos_read(cmos, REG_C) == 0


def test_cmos_clock_follows_register_b_formats():
    cmos = Cmos(1 * GiB, 0, clock=Clock(LEAP_DAY))
    cmos_write(cmos, REG_B, 0x00)                        # 12-hour, BCD
    assert cmos_read(cmos, HOURS) == 0x80 | 0x11         # 11 PM
    cmos_write(cmos, REG_B, REG_B_DM_BINARY | 0x02)      # 24-hour, binary
    assert [cmos_read(cmos, r) for r in (SECONDS, HOURS, DAY, YEAR)] == [58, 23, 29, 24]


def test_cmos_update_in_progress_window():
    clock = Clock(LEAP_DAY)
    cmos = Cmos(1 * GiB, 0, clock=clock)
    assert cmos_read(cmos, REG_A) == 0x26                # 32.768 kHz, 1024 Hz, no UIP
    second = LEAP_DAY - 500_000_000 + 10**9
    for offset, uip in ((-300_000, False), (-200_000, True), (0, True),
                        (1_900_000, True), (2_100_000, False)):
        clock.now = second + offset
        assert bool(cmos_read(cmos, REG_A) & 0x80) == uip, offset
    clock.now = second + 2_100_000                        # the update has rolled the date over
    assert [cmos_read(cmos, r) for r in (SECONDS, MINUTES, HOURS, DAY, MONTH)] == \
        [0x59, 0x59, 0x23, 0x29, 0x02]
    clock.now += 10**9
    assert [cmos_read(cmos, r) for r in (SECONDS, MINUTES, HOURS, DAY, MONTH)] == \
        [0x00, 0x00, 0x00, 0x01, 0x03]


def test_cmos_time_writes_are_ignored_and_ram_is_ram():
    cmos = Cmos(1 * GiB, 0, clock=Clock(LEAP_DAY))
    cmos_write(cmos, SECONDS, 0x11)
    assert cmos_read(cmos, SECONDS) == 0x58
    cmos_write(cmos, REG_A, 0xA6)                        # UIP is read-only
    assert cmos_read(cmos, REG_A) == 0x26
    cmos.write(INDEX, 1, 0x80 | SHUTDOWN_STATUS)         # with the NMI-disable bit
    cmos.write(DATA, 1, 0x0A)
    assert cmos_read(cmos, SHUTDOWN_STATUS) == 0x0A
    assert cmos.read(INDEX, 1) == 0xFF                   # the index port is write-only


def test_cmos_memory_size_bytes():
    cmos = Cmos(3 * GiB, 5 * GiB)
    below = cmos_read(cmos, 0x34) | cmos_read(cmos, 0x35) << 8
    above = cmos_read(cmos, 0x5B) | cmos_read(cmos, 0x5C) << 8 | cmos_read(cmos, 0x5D) << 16
    assert below == (3 * GiB - 16 * MiB) // (64 << 10)
    assert above == 5 * GiB // (64 << 10)
    assert cmos_read(cmos, 0x15) | cmos_read(cmos, 0x16) << 8 == 640
    assert cmos_read(cmos, 0x17) | cmos_read(cmos, 0x18) << 8 == 0xFFFF
    small = Cmos(8 * MiB, 0)
    assert cmos_read(small, 0x34) == cmos_read(small, 0x35) == 0
    assert cmos_read(small, 0x30) | cmos_read(small, 0x31) << 8 == 7 * 1024


def test_i8042_reset_command_calls_back():
    resets = []
    kbd = I8042(on_reset=lambda: resets.append(True))
    assert kbd.read(STATUS, 1) == 0                      # nothing to read, ready for commands
    assert kbd.read(PORT_B, 1) & 0x20                    # PIT channel 2 output: calibration ends
    kbd.write(COMMAND, 1, 0xAA)
    kbd.write(KBD_DATA, 1, 0xFE)
    assert resets == []
    kbd.write(COMMAND, 1, 0xFE)
    assert resets == [True]


def test_debug_port_counts_and_logs_post_codes(caplog):
    clock = Clock(10.0)
    port = DebugPort(clock=clock)
    assert port.read(0, 1) == 0
    clock.now = 10.25
    with caplog.at_level(logging.DEBUG, logger="pych.devices.legacy.debug_port"):
        port.write(0, 1, 0x41)
        port.write(0, 1, 0x00)
    assert port.count == 2 and port.read(0, 1) == 0
    assert "POST code 0x41 (kernel) at 0.250000 s" in caplog.text
    assert "POST code 0x00 (firmware)" in caplog.text
