"""The ACPI memory hot plug register block ``\\_SB_.MHPC`` without KVM: slot selection,
status, acks, ejects and ``_OST`` reports (../shared/notes/ch-hotplug-reference.md §4.1)."""

from __future__ import annotations

from pych.arch.x86_64 import layout
from pych.memory.hotplug import MemoryHotplugController

MiB, GiB = layout.MiB, layout.GiB
BASE = layout.ACPI_MEM_HOTPLUG_ADDR


def test_registers_report_the_selected_slot():
    c = MemoryHotplugController(BASE)
    c.insert(3, 0x1_2345_6000_0000, 0x2_8000_0000)
    c.write(0x00, 4, 3)
    assert [c.read(off, 4) for off in (0x00, 0x04, 0x08, 0x0C)] == [
        0x6000_0000, 0x1_2345, 0x8000_0000, 0x2]
    assert c.read(0x14, 1) == 0b011               # enabled, inserting
    c.write(0x00, 4, 2)
    assert [c.read(off, 4) for off in (0x00, 0x08)] == [0, 0]
    assert c.read(0x14, 1) == 0


def test_status_writes_acknowledge_and_eject_is_ignored():
    c = MemoryHotplugController(BASE)
    c.insert(0, 4 * GiB, 128 * MiB)
    c.slots[0].removing = True
    c.write(0x14, 1, MemoryHotplugController.EJECT)
    assert c.read(0x14, 1) == 0b111
    c.write(0x14, 1, MemoryHotplugController.INSERTING)
    assert c.read(0x14, 1) == 0b101
    c.write(0x14, 1, MemoryHotplugController.REMOVING)
    assert c.read(0x14, 1) == 0b001
    assert c.slots[0].base == 4 * GiB and c.slots[0].enabled


def test_bad_widths_and_selectors_read_zero_and_change_nothing():
    c = MemoryHotplugController(BASE, slots=2)
    c.insert(1, 4 * GiB, 128 * MiB)
    c.write(0x00, 4, 1)
    assert c.read(0x00, 2) == 0 and c.read(0x14, 4) == 0 and c.read(0x10, 4) == 0
    c.write(0x14, 4, MemoryHotplugController.INSERTING)     # wrong width: no ack
    c.write(0x04, 4, 0)                                      # MOEV: ignored
    assert c.read(0x14, 1) == 0b011 and c.read(0x04, 4) == 1
    c.write(0x00, 4, 2)                                      # out of range
    assert c.read(0x00, 4) == 0 and c.read(0x14, 1) == 0
    c.write(0x14, 1, MemoryHotplugController.INSERTING)
    assert c.slots[1].inserting


EJECT_REQUEST, IN_PROGRESS, NOT_SUPPORTED = 3, 0x84, 0x80


def guest_ost(controller, slot, status):
    """What the guest's ``Mnnn._OST(3, status)`` does through MOST."""
    controller.write(0x00, 4, slot)
    controller.write(0x04, 4, EJECT_REQUEST)
    controller.write(0x08, 4, status)


def guest_eject(controller, slot):
    """What the guest's ``Mnnn._EJ0`` does through MEJC."""
    controller.write(0x00, 4, slot)
    controller.write(0x14, 1, MemoryHotplugController.EJECT)


def test_only_slots_asked_for_are_ejected():
    ejected = []
    c = MemoryHotplugController(BASE, on_eject=ejected.append)
    c.insert(0, 4 * GiB, 128 * MiB)
    c.insert(1, 4 * GiB + 128 * MiB, 128 * MiB)
    guest_eject(c, 0)
    c.request_removal(1)
    c.write(0x00, 4, 1)
    assert c.read(0x14, 1) == 0b111                     # enabled, inserting, removing
    c.write(0x14, 1, MemoryHotplugController.REMOVING)  # MSCN's ack: the removal stays asked
    guest_eject(c, 1)
    guest_eject(c, 1)                                   # once only
    assert ejected == [1]


def test_ost_failure_ends_the_removal_and_is_kept():
    ejected = []
    c = MemoryHotplugController(BASE, on_eject=ejected.append)
    c.insert(0, 4 * GiB, 128 * MiB)
    c.request_removal(0)
    guest_ost(c, 0, IN_PROGRESS)
    assert c.slots[0].pending_removal and c.slots[0].ost_status == IN_PROGRESS
    guest_ost(c, 0, NOT_SUPPORTED)
    assert not c.slots[0].pending_removal and c.slots[0].ost_status == NOT_SUPPORTED
    guest_eject(c, 0)
    assert ejected == [] and c.slots[0].enabled
