"""The PCI hot plug register block ``\\_SB_.PHPR`` without KVM: per-segment PCIU/PCID
bitmaps, B0EJ ejects and segment selection (../shared/notes/ch-hotplug-reference.md §5.1)."""

from __future__ import annotations

import pytest

from pych.arch.x86_64 import layout
from pych.device_manager.hotplug import PciHotplugController

PHPR = layout.ACPI_PCI_HOTPLUG_ADDR


# --- the register block --------------------------------------------------------------------
@pytest.fixture
def phpr():
    ejected = []
    controller = PciHotplugController(PHPR, num_segments=2,
                                      on_eject=lambda seg, slot: ejected.append((seg, slot)))
    controller.ejected = ejected
    return controller


def test_pciu_and_pcid_are_per_segment_and_cleared_by_reading(phpr):
    phpr.device_added(0, 2)
    phpr.device_added(0, 5)
    phpr.removal_requested(0, 3)
    phpr.device_added(1, 7)
    assert phpr.read(0x0, 4) == 1 << 2 | 1 << 5
    assert phpr.read(0x0, 4) == 0
    assert phpr.read(0x4, 4) == 1 << 3
    assert phpr.read(0x4, 4) == 0
    phpr.write(0xC, 4, 1)
    assert phpr.read(0xC, 4) == 1
    assert phpr.read(0x0, 4) == 1 << 7


def test_b0ej_ejects_every_set_slot_of_the_selected_segment(phpr):
    phpr.write(0xC, 4, 1)
    phpr.write(0x8, 4, 1 << 4 | 1 << 31)
    assert phpr.ejected == [(1, 4), (1, 31)]
    assert phpr.read(0x8, 4) == 0


def test_out_of_range_segment_and_narrow_accesses_are_ignored(phpr):
    phpr.device_added(0, 2)
    phpr.write(0xC, 4, 2)                      # only segments 0 and 1 exist
    assert phpr.read(0xC, 4) == 0
    assert phpr.read(0x0, 1) == 0              # not a 4-byte access: not even cleared
    phpr.write(0x8, 2, 1 << 2)
    assert phpr.ejected == []
    assert phpr.read(0x0, 4) == 1 << 2
