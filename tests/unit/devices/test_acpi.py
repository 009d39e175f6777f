"""ACPI platform devices: GED event register, shutdown/reset register, PM timer."""

from __future__ import annotations

import threading

import pytest

from pych.arch.x86_64 import layout
from pych.devices.acpi import (
    AcpiGedDevice, AcpiNotification, AcpiPmTimer, AcpiShutdownDevice, MmioWindow,
    pci_segment_aml,
)

from tests.support.fakes import RecordingIrq

GED_BASE = 0xFEB0_0000


@pytest.fixture
def irq() -> RecordingIrq:
    return RecordingIrq()


@pytest.fixture
def ged(irq) -> AcpiGedDevice:
    return AcpiGedDevice(irq, GED_BASE)


def test_notification_bits():
    assert [int(f) for f in (AcpiNotification.CPU, AcpiNotification.MEMORY,
                             AcpiNotification.PCI, AcpiNotification.POWER_BUTTON)] == [1, 2, 4, 8]


def test_ged_reads_clear_the_latch(ged, irq):
    assert ged.read(0, 1) == 0
    ged.notify(AcpiNotification.PCI)
    assert irq.pulses == 1 and not irq.level
    assert ged.read(0, 1) == 4
    assert ged.read(0, 1) == 0


def test_ged_coalesces_events_until_read(ged, irq):
    ged.notify(AcpiNotification.CPU)
    ged.notify(AcpiNotification.MEMORY | AcpiNotification.POWER_BUTTON)
    ged.notify(AcpiNotification.CPU)
    assert irq.pulses == 3                       # one edge per notify
    assert ged.read(0, 1) == 1 | 2 | 8           # one read sees all of them
    assert ged.read(0, 1) == 0


def test_ged_notify_without_events_does_nothing(ged, irq):
    ged.notify(AcpiNotification(0))
    assert irq.pulses == 0


def test_ged_ignores_writes_and_odd_accesses(ged):
    ged.notify(AcpiNotification.PCI)
    ged.write(0, 1, 0xFF)
    assert ged.read(0, 4) == 0                   # wrong width: reads 0, does not clear
    assert ged.read(0, 1) == 4


def test_ged_loses_no_events_across_threads(ged, irq):
    flags = list(AcpiNotification)
    seen = 0
    done = threading.Event()

    def notifier():
        for i in range(2000):
            ged.notify(flags[i % len(flags)])
        done.set()

    thread = threading.Thread(target=notifier)
    thread.start()
    while not done.is_set():
        seen |= ged.read(0, 1)
    thread.join()
    seen |= ged.read(0, 1)
    assert seen == 0xF and irq.pulses == 2000


def test_ged_aml_points_at_its_register_and_gsi(irq):
    aml = AcpiGedDevice(irq, 0x1234_5000, gsi=17).to_aml()
    # OperationRegion (GDST, SystemMemory, 0x12345000, One)
    assert b"\x5b\x80GDST\x00\x0c\x00\x50\x34\x12\x01" in aml
    # Interrupt (ResourceConsumer, Edge, ActiveHigh, Exclusive) {17}
    assert bytes.fromhex("89 06 00 03 01 11 00 00 00") in aml


def shutdown_device():
    calls = []
    device = AcpiShutdownDevice(on_reset=lambda: calls.append("reset"),
                                on_poweroff=lambda: calls.append("poweroff"))
    return device, calls


def test_shutdown_device_reset_and_poweroff():
    device, calls = shutdown_device()
    device.write(0, 1, 1)
    device.write(0, 1, 0x34)                     # SLP_TYP 5 << 2 | SLP_EN
    assert calls == ["reset", "poweroff"]
    assert AcpiShutdownDevice.POWEROFF_VALUE == 0x34


@pytest.mark.parametrize("offset, size, value", [
    (0, 1, 0x80),                                # WAK_STS clear before sleeping
    (0, 1, 0x14),                                # S5 without SLP_EN
    (0, 1, 0x24),                                # SLP_EN for S1
    (0, 4, 1),                                   # wrong width
    (1, 1, 1),                                   # wrong offset
])
def test_shutdown_device_ignores_other_writes(offset, size, value):
    device, calls = shutdown_device()
    device.write(offset, size, value)
    assert calls == []


def test_shutdown_device_reads_zero():
    device, _ = shutdown_device()
    assert device.read(0, 1) == 0


class FakeClock:
    def __init__(self, ns: int = 10**12):
        self.ns = ns

    def __call__(self) -> int:
        return self.ns


def test_pm_timer_counts_at_3_579545_mhz_from_zero():
    clock = FakeClock()
    timer = AcpiPmTimer(clock)
    assert timer.read(0, 4) == 0
    clock.ns += 1_000_000_000
    assert timer.read(0, 4) == 3_579_545
    clock.ns += 1000                             # 1 us = 3.58 ticks
    assert timer.read(0, 4) == 3_579_548


def test_pm_timer_is_monotonic_on_the_real_clock():
    timer = AcpiPmTimer()
    readings = [timer.read(0, 4) for _ in range(1000)]
    assert readings == sorted(readings)


def test_pm_timer_wraps_at_32_bits_and_its_low_24_bits_wrap_consistently():
    clock = FakeClock()
    timer = AcpiPmTimer(clock)
    ns_per_wrap = (1 << 32) * 1_000_000_000 // 3_579_545      # ~1199.7 s
    clock.ns += ns_per_wrap - 1_000_000
    before = timer.read(0, 4)
    clock.ns += 2_000_000
    after = timer.read(0, 4)
    assert before > 0xFFF0_0000 and after < 0x0001_0000           # wrapped
    ticks = 7159                                                  # 2 ms at 3.579545 MHz
    assert (after - before) % (1 << 32) == ticks
    assert ((after & 0xFF_FFFF) - (before & 0xFF_FFFF)) % (1 << 24) == ticks   # 24-bit view


def test_pm_timer_narrow_reads_return_the_addressed_bytes():
    clock = FakeClock()
    timer = AcpiPmTimer(clock)
    clock.ns += 300_000_000                                       # 1073863 = 0x1062C7
    assert timer.read(0, 4) == 0x1062C7
    assert (timer.read(0, 1), timer.read(1, 1), timer.read(2, 2)) == (0xC7, 0x62, 0x10)
    assert timer.read(2, 4) == 0                                  # past the register


def test_pci_segment_aml_prt_routes_each_slot_by_the_layout_rule():
    aml = pci_segment_aml(0, MmioWindow(0xC000_0000, 640 << 20),
                          MmioWindow(1 << 40, 1 << 30)).to_aml()
    assert layout.pci_intx_irq(3) == 5 + 3 % 8
    # Package (4) {0x0003FFFF, Zero, Zero, 8}
    assert bytes.fromhex("12 0b 04 0c ff ff 03 00 00 00 0a 08") in aml
    assert b"_SB_PC00" in aml
