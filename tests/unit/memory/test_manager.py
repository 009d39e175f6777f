"""The memory manager without KVM: boot RAM and the hot plug window, ACPI DIMMs plugged and
ejected (vm.resize's rules themselves: test_resize.py), virtio-mem regions, and what
vm.info reports (../shared/notes/ch-hotplug-reference.md §4.1, §4.2)."""

from __future__ import annotations

import os
import pytest

from pych.arch.x86_64 import boot, layout
from pych.config import VmConfig
from pych.devices.acpi import AcpiNotification
from pych.devices.bus import Bus
from pych.memory.hotplug import HOTPLUG_SLOTS, MemoryHotplugController
from pych.memory.manager import MemoryManager
from pych.memory.resize import InvalidMemoryResize, MemoryResizeError

from .test_hotplug import EJECT_REQUEST, NOT_SUPPORTED, guest_eject, guest_ost

MiB, GiB = layout.MiB, layout.GiB


class FakeKvmVm:
    """Records KVM memslots instead of creating them."""

    def __init__(self):
        self.memslots: dict[int, tuple[int, int]] = {}

    def add_memory(self, gpa: int, size: int, host_addr: int) -> int:
        slot = max(self.memslots, default=-1) + 1
        self.memslots[slot] = (gpa, size)
        return slot

    def remove_memory(self, slot: int, gpa: int) -> None:
        assert self.memslots.pop(slot)[0] == gpa


def memory_config(**fields):
    return VmConfig.model_validate({"payload": {"kernel": "/k"}, "memory": fields}).memory


@pytest.fixture
def manager():
    """A booted memory manager (256 MiB, 1 GiB window) factory; closed after the test."""
    made = []

    def make(size=256 * MiB, **fields):
        events = []
        mm = MemoryManager(memory_config(size=size, **fields), FakeKvmVm(), Bus("mmio"),
                           notify=events.append)
        mm.events = events
        mm.create_boot_memory()
        made.append(mm)
        return mm

    yield make
    for mm in made:
        mm.close()


# --- boot RAM and the window -----------------------------------------------------------------
def test_window_follows_boot_ram_and_the_pci_window_follows_the_window(manager):
    small = manager(hotplug_size=1 * GiB)
    assert small.hotplug_window == (4 * GiB, 1 * GiB)
    big = manager(size=3 * GiB + 100 * MiB, hotplug_size=1 * GiB)      # RAM ends at 4 GiB + 100 MiB
    assert big.hotplug_window == (4 * GiB + 128 * MiB, 1 * GiB)
    assert layout.mmio64_window(*big.hotplug_window)[0] == 6 * GiB
    assert manager().hotplug_window == (4 * GiB, 0)


def test_a_huge_window_costs_nothing(manager):
    mm = manager(hotplug_size=1 << 40)
    assert mm.hotplug_window == (4 * GiB, 1 << 40)
    assert [r.name for r in mm.guest_memory.regions] == ["ram0"]
    assert list(mm.kvm_vm.memslots.values()) == [(0, 256 * MiB)]
    assert mm.actual_size == 256 * MiB


def test_register_block_is_on_the_mmio_bus_only_with_acpi_hotplug(manager):
    assert manager(hotplug_size=1 * GiB).mmio.find(layout.ACPI_MEM_HOTPLUG_ADDR + 0x17)
    assert manager().mmio.find(layout.ACPI_MEM_HOTPLUG_ADDR) is None
    assert manager(hotplug_size=1 * GiB, hotplug_method="VirtioMem").hotplug_controller is None


# --- ACPI DIMMs ------------------------------------------------------------------------------
def test_increases_become_dimms_announced_through_the_ged(manager):
    mm = manager(hotplug_size=1 * GiB)
    assert mm.resize(512 * MiB)
    assert mm.resize(640 * MiB)
    assert mm.actual_size == 640 * MiB
    dimms = [(r.name, r.gpa, r.size) for r in mm.guest_memory.regions if r.name.startswith("dimm")]
    assert dimms == [("dimm0", 4 * GiB, 256 * MiB), ("dimm1", 4 * GiB + 256 * MiB, 128 * MiB)]
    assert list(mm.kvm_vm.memslots.values())[1:] == [(g, s) for _, g, s in dimms]
    assert mm.events == [AcpiNotification.MEMORY] * 2
    slots = mm.hotplug_controller.snapshot()
    assert [(s.base, s.length, s.enabled, s.inserting) for s in slots[:3]] == [
        (4 * GiB, 256 * MiB, True, True), (4 * GiB + 256 * MiB, 128 * MiB, True, True),
        (0, 0, False, False)]
    # hot plugged RAM reaches the guest through ACPI only, never through the boot e820 map
    e820 = boot.e820_map(mm.guest_memory)
    assert [(e.addr, e.size) for e in e820 if e.type == boot.E820_RAM] == [
        (0, layout.EBDA_START), (layout.HIGH_RAM_START, 255 * MiB)]


def test_hotplug_info_lists_each_dimm_and_its_guest_acknowledgement(manager):
    mm = manager(hotplug_size=1 * GiB)
    mm.resize(384 * MiB)
    mm.hotplug_controller.write(0x14, 1, MemoryHotplugController.INSERTING)   # the guest's MSCN ack
    mm.resize(512 * MiB)
    assert mm.hotplug_info() == {
        "method": "Acpi", "window": {"start": 4 * GiB, "size": 1 * GiB},
        "dimms": [
            {"id": "dimm0", "slot": 0, "address": 4 * GiB, "size": 128 * MiB,
             "state": "acknowledged"},
            {"id": "dimm1", "slot": 1, "address": 4 * GiB + 128 * MiB, "size": 128 * MiB,
             "state": "announced"},
        ]}
    assert manager().hotplug_info() is None


def test_reductions_and_no_change_plug_nothing(manager):
    mm = manager(hotplug_size=1 * GiB)
    assert not mm.resize(256 * MiB)
    assert not mm.resize(128 * MiB)
    assert mm.actual_size == 256 * MiB and mm.events == []


@pytest.mark.parametrize("desired, message", [
    (256 * MiB + 64 * MiB, "multiple of 128 MiB"),
    (256 * MiB + 1 * GiB + 128 * MiB, "not enough hot plug space"),
])
def test_invalid_increases_are_refused_before_anything_is_plugged(manager, desired, message):
    mm = manager(hotplug_size=1 * GiB)
    with pytest.raises(InvalidMemoryResize, match=message):
        mm.resize(desired)
    assert mm.actual_size == 256 * MiB and len(mm.kvm_vm.memslots) == 1 and mm.events == []


def test_the_window_can_be_filled_exactly_and_no_further(manager):
    mm = manager(hotplug_size=1 * GiB)
    assert mm.resize(256 * MiB + 1 * GiB)
    with pytest.raises(InvalidMemoryResize, match="0 bytes left"):
        mm.resize(256 * MiB + 1 * GiB + 128 * MiB)


def test_without_a_window_there_is_nothing_to_plug_into(manager):
    with pytest.raises(InvalidMemoryResize, match="hotplug_size"):
        manager().resize(512 * MiB)


def test_slots_run_out_after_the_last_one(manager):
    mm = manager(hotplug_size=64 * GiB)
    for i in range(1, HOTPLUG_SLOTS + 1):
        mm.resize(256 * MiB + i * 128 * MiB)
    with pytest.raises(MemoryResizeError, match=f"all {HOTPLUG_SLOTS} slots"):
        mm.resize(256 * MiB + (HOTPLUG_SLOTS + 1) * 128 * MiB)
    assert mm.actual_size == 256 * MiB + HOTPLUG_SLOTS * 128 * MiB


@pytest.mark.parametrize("window, slots", [(128 * MiB, 8), (GiB, 8), (2 * GiB, 16),
                                            (4 * GiB, 32), (64 * GiB, 32)])
def test_the_dsdt_describes_only_the_slots_the_window_can_use(manager, window, slots):
    controller = manager(hotplug_size=window).hotplug_controller
    assert len(controller.slots) == slots
    aml = controller.to_aml()
    assert f"M{slots - 1:03d}".encode() in aml and f"M{slots:03d}".encode() not in aml


# --- live DIMM removal (beyond the reference) -----------------------------------------------
def test_reductions_eject_the_newest_dimms_that_fit(manager):
    mm = manager(hotplug_size=1 * GiB)
    for size in (512, 640, 768):                        # DIMMs of 256, 128, 128 MiB
        mm.resize(size * MiB)
    mm.events.clear()
    assert mm.resize(400 * MiB)                         # 768 -> 512: dimm2 and dimm1 can go
    assert mm.events == [AcpiNotification.MEMORY]
    assert [d["state"] for d in mm.hotplug_info()["dimms"]] == ["announced", "removing",
                                                                 "removing"]
    assert not mm.resize(400 * MiB)                     # nothing more fits: no new request
    assert mm.actual_size == 768 * MiB
    guest_eject(mm.hotplug_controller, 2)
    guest_ost(mm.hotplug_controller, 1, NOT_SUPPORTED)          # the guest keeps dimm1
    assert mm.actual_size == 640 * MiB
    assert list(mm.kvm_vm.memslots.values()) == [(0, 256 * MiB), (4 * GiB, 256 * MiB),
                                                 (4 * GiB + 256 * MiB, 128 * MiB)]
    assert [r.name for r in mm.guest_memory.regions] == ["ram0", "dimm0", "dimm1"]
    assert mm.hotplug_info()["dimms"][1:] == [
        {"id": "dimm1", "slot": 1, "address": 4 * GiB + 256 * MiB, "size": 128 * MiB,
         "state": "kept", "ost_event": EJECT_REQUEST, "ost_status": NOT_SUPPORTED}]
    assert mm.resize(768 * MiB)                         # the freed space is plugged again
    assert mm.hotplug_info()["dimms"][-1]["address"] == 4 * GiB + 384 * MiB


def test_dimms_report_the_guests_ost_for_their_insertion():
    manager = MemoryManager(VmConfig.model_validate({"payload": {"kernel": __file__}, "memory": {
        "size": 256 * MiB, "hotplug_size": 1 * GiB}}).memory, FakeKvmVm(), Bus("mmio"),
        notify=lambda event: None)
    try:
        manager.create_boot_memory()
        for size in (384, 512, 640):
            manager.resize(size * MiB)
        c = manager.hotplug_controller
        c.write(0x14, 1, MemoryHotplugController.INSERTING)        # selected slot 0: acked
        _ost(c, 0, 1, 0)                                      # the guest added dimm0
        _ost(c, 1, 1, 0x80)                                   # and failed to add dimm1
        _ost(c, 5, 3, 0)                                      # an empty slot: dropped
        dimms = manager.hotplug_info()["dimms"]
        assert [(d["id"], d["state"], d.get("ost_event"), d.get("ost_status")) for d in dimms] == [
            ("dimm0", "acknowledged", 1, 0), ("dimm1", "announced", 1, 0x80),
            ("dimm2", "announced", None, None)]
        assert not c.slots[5].enabled and c.slots[5].ost_event is None
    finally:
        manager.close()


def _ost(controller, slot, event, status):
    """What the guest's ``Mnnn._OST(event, status)`` does through MOST."""
    controller.write(0x00, 4, slot)
    controller.write(0x04, 4, event)
    controller.write(0x08, 4, status)


# --- virtio-mem ------------------------------------------------------------------------------
def test_virtio_mem_region_is_mapped_at_boot_after_ram(manager):
    mm = manager(size=3 * GiB + 100 * MiB, hotplug_size=1 * GiB, hotplug_method="VirtioMem",
                 hotplugged_size=256 * MiB)
    assert mm.hotplug_controller is None and mm.mmio.find(layout.ACPI_MEM_HOTPLUG_ADDR) is None
    (zone,) = mm.virtio_mem_zones
    assert (zone.id, zone.region.gpa, zone.region.size, zone.initial_size) == (
        "mem0", 4 * GiB + 128 * MiB, 1 * GiB, 256 * MiB)
    assert (zone.device.name, zone.device.requested_size) == ("mem0", 256 * MiB)
    assert list(mm.kvm_vm.memslots.values())[-1] == (4 * GiB + 128 * MiB, 1 * GiB)
    assert mm.hotplug_window == (4 * GiB + 128 * MiB, 1 * GiB)
    assert layout.mmio64_window(*mm.hotplug_window)[0] == 6 * GiB
    # the region reaches the guest through the device only, never through the e820 map
    assert all(e.addr + e.size <= 4 * GiB + 100 * MiB
               for e in boot.e820_map(mm.guest_memory) if e.type == boot.E820_RAM)
    assert mm.actual_size == 3 * GiB + 100 * MiB           # nothing plugged yet


def test_virtio_mem_regions_are_whole_memory_blocks(manager):
    with pytest.raises(ValueError, match="multiple of 128 MiB"):
        manager(hotplug_size=200 * MiB, hotplug_method="VirtioMem")


def test_dimm_slots_are_described_only_with_acpi_memory_hot_plug(manager):
    """Without ACPI hot plug (no hotplug_size, or virtio-mem) the DSDT gets the reference's
    MHPC stub and no DIMM slot; with it, every slot of the boot's controller."""
    import re
    dimm = re.compile(rb"M\d{3}")
    for fields in ({}, {"hotplug_method": "VirtioMem", "hotplug_size": 512 * MiB}):
        aml = manager(**fields).to_aml()
        assert b"MHPC" in aml and not dimm.search(aml), fields
    aml = manager(hotplug_size=4096 * MiB).to_aml()
    assert {m.group() for m in dimm.finditer(aml)} == {f"M{i:03d}".encode()
                                                       for i in range(HOTPLUG_SLOTS)}


def _vm_flags(address: int) -> set[str]:
    """The VmFlags of this process's mapping that holds ``address``."""
    flags, inside = None, False
    with open("/proc/self/smaps") as smaps:
        for line in smaps:
            head = line.split()[0]
            if "-" in head and not head.endswith(":"):
                start, end = (int(x, 16) for x in head.split("-"))
                inside = start <= address < end
            elif inside and head == "VmFlags:":
                flags = set(line.split()[1:])
    assert flags is not None, f"no mapping holds {address:#x}"
    return flags


def test_thp_advises_huge_pages_on_boot_ram_and_dimms_and_off_does_not(manager):
    on = manager(hotplug_size=1024 * MiB)
    on.resize(384 * MiB)
    for region in on.guest_memory.regions:
        assert "hg" in _vm_flags(region.host_addr), region.name
    off = manager(thp=False)
    assert "hg" not in _vm_flags(off.guest_memory.regions[0].host_addr)


def test_virtio_mem_regions_are_in_the_saved_layout_and_restored_in_place(manager):
    mm = manager(hotplug_size=1 * GiB, hotplug_method="VirtioMem")
    (zone,) = mm.virtio_mem_zones
    saved = mm.save_state()
    assert saved["virtio_mem"] == {"mem0": {"gpa": zone.region.gpa, "size": 1 * GiB}}
    # a snapshot copies only the plugged blocks of the region
    assert zone.region.in_use() == []
    zone.device.resize(4 * MiB)
    zone.device.request(0, zone.region.gpa + 2 * MiB, 1)          # PLUG one block
    assert zone.region.in_use() == [(2 * MiB, 2 * MiB)]
    # a local migration passes the region's memfd, and the receiver maps that same memory
    names, fds = mm.shared_fds()
    assert fds[names["virtio-mem:mem0"]] == zone.region.fd
    zone.region.mmap[2 * MiB:2 * MiB + 5] = b"moved"
    fresh = MemoryManager(mm.config, FakeKvmVm(), Bus("mmio"), notify=lambda e: None)
    try:
        fresh.restore_state(saved, {"virtio-mem:mem0": os.dup(zone.region.fd)})
        (moved,) = fresh.virtio_mem_zones
        assert (moved.region.gpa, moved.region.size) == (zone.region.gpa, 1 * GiB)
        assert moved.region.mmap[2 * MiB:2 * MiB + 5] == b"moved"
    finally:
        fresh.close()
    other = MemoryManager(mm.config, FakeKvmVm(), Bus("mmio"), notify=lambda e: None)
    try:
        with pytest.raises(ValueError, match="saved virtio-mem regions"):
            other.restore_state({**saved, "virtio_mem": {"mem0": {"gpa": 0, "size": 1 * GiB}}})
    finally:
        other.close()
