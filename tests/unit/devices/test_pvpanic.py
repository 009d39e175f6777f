"""pych.devices.pvpanic: the PCI pvpanic function."""

from pych.devices.pvpanic import PVPANIC_CRASH_LOADED, PVPANIC_PANICKED, PvPanicDevice


def test_identity_and_one_small_memory_bar():
    device = PvPanicDevice(lambda event: None)
    assert device.config_read(0, 4) == 0x0011_1B36
    assert device.config_read(0x08, 4) >> 8 == 0x08_80_00      # class 08, subclass 80
    assert device.config_read(0x08, 1) == 1                    # revision
    [bar] = device.config.bars
    assert (bar.index, bar.size) == (0, 16)


def test_reads_the_supported_events_and_reports_each_written_one():
    events = []
    device = PvPanicDevice(events.append)
    assert device.bar_read(0, 0, 1) == PVPANIC_PANICKED | PVPANIC_CRASH_LOADED
    device.bar_write(0, 0, 1, PVPANIC_PANICKED)
    device.bar_write(0, 0, 1, PVPANIC_CRASH_LOADED)
    device.bar_write(0, 4, 1, PVPANIC_PANICKED)                # not the register
    assert events == ["panic", "crash-loaded"]
