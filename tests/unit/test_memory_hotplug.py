"""ACPI memory hot plug without KVM: window placement, the MHPC register block, the memory
manager's resize, and vm.resize/vm.info in the VMM (shared/notes/ch-hotplug-reference.md §4.1)."""

from __future__ import annotations

import pytest
from hypothesis import given
from hypothesis import strategies as st

from pych.api.handler import ApiError
from pych.arch.x86_64 import boot, layout
from pych.config import VmConfig, VmResize
from pych.devices.acpi import AcpiNotification
from pych.devices.bus import Bus
from pych.devices.virtio.mem import Request, Response
from pych.memory_manager import (
    HOTPLUG_ALIGNMENT, HOTPLUG_SLOTS, InvalidMemoryResize, MemoryHotplugController,
    MemoryManager, MemoryResizeError, hotplug_region_start, virtio_mem_request,
)
from pych.vmm import Vmm

from tests.support.fakes import RecordingMemslots
from tests.support.machines import BootedVm, run_as_booted

MiB, GiB = layout.MiB, layout.GiB


def memory_config(**fields):
    return VmConfig.model_validate({"payload": {"kernel": "/k"}, "memory": fields}).memory


@pytest.fixture
def manager():
    """A booted memory manager (256 MiB, 1 GiB window) factory; closed after the test."""
    made = []

    def make(size=256 * MiB, **fields):
        events = []
        mm = MemoryManager(memory_config(size=size, **fields), RecordingMemslots(), Bus("mmio"),
                           notify=events.append)
        mm.events = events
        mm.create_boot_memory()
        made.append(mm)
        return mm

    yield make
    for mm in made:
        mm.close()


# --- placement --------------------------------------------------------------------------
@given(st.integers(1, 1 << 40).map(lambda n: n * 4096))
def test_hotplug_regions_start_at_the_first_128_mib_boundary_after_ram_and_the_hole(ram_end):
    start = hotplug_region_start(ram_end)
    assert start % HOTPLUG_ALIGNMENT == 0
    assert start >= max(ram_end, layout.RAM_64BIT_START)
    # the first such boundary: nothing lower qualifies
    assert start - HOTPLUG_ALIGNMENT < max(ram_end, layout.RAM_64BIT_START)


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
    assert [r.name for r in mm.mem.regions] == ["ram0"]
    assert mm.vm.ranges() == [(0, 256 * MiB)]
    assert mm.actual_size == 256 * MiB


def test_register_block_is_on_the_mmio_bus_only_with_acpi_hotplug(manager):
    assert manager(hotplug_size=1 * GiB).mmio.find(layout.ACPI_MEM_HOTPLUG_ADDR + 0x17)
    assert manager().mmio.find(layout.ACPI_MEM_HOTPLUG_ADDR) is None
    assert manager(hotplug_size=1 * GiB, hotplug_method="VirtioMem").controller is None


# --- the register block -------------------------------------------------------------------
def test_registers_report_the_selected_slot():
    c = MemoryHotplugController()
    c.insert(3, 0x1_2345_6000_0000, 0x2_8000_0000)
    c.write(0x00, 4, 3)
    assert [c.read(off, 4) for off in (0x00, 0x04, 0x08, 0x0C)] == [
        0x6000_0000, 0x1_2345, 0x8000_0000, 0x2]
    assert c.read(0x14, 1) == 0b011               # enabled, inserting
    c.write(0x00, 4, 2)
    assert [c.read(off, 4) for off in (0x00, 0x08)] == [0, 0]
    assert c.read(0x14, 1) == 0


def test_status_writes_acknowledge_and_eject_is_ignored():
    c = MemoryHotplugController()
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
    c = MemoryHotplugController(slots=2)
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


# --- resize -----------------------------------------------------------------------------------
def test_increases_become_dimms_announced_through_the_ged(manager):
    mm = manager(hotplug_size=1 * GiB)
    assert mm.resize(512 * MiB)
    assert mm.resize(640 * MiB)
    assert mm.actual_size == 640 * MiB
    dimms = [(r.name, r.gpa, r.size) for r in mm.mem.regions if r.name.startswith("dimm")]
    assert dimms == [("dimm0", 4 * GiB, 256 * MiB), ("dimm1", 4 * GiB + 256 * MiB, 128 * MiB)]
    assert mm.vm.ranges()[1:] == [(g, s) for _, g, s in dimms]
    assert mm.events == [AcpiNotification.MEMORY] * 2
    slots = mm.controller.snapshot()
    assert [(s.base, s.length, s.enabled, s.inserting) for s in slots[:3]] == [
        (4 * GiB, 256 * MiB, True, True), (4 * GiB + 256 * MiB, 128 * MiB, True, True),
        (0, 0, False, False)]
    # hot plugged RAM reaches the guest through ACPI only, never through the boot e820 map
    assert [(e.addr, e.size) for e in boot.e820_map(mm.mem) if e.type == boot.E820_RAM] == [
        (0, layout.EBDA_START), (layout.HIGH_RAM_START, 255 * MiB)]


def test_hotplug_info_lists_each_dimm_and_its_guest_acknowledgement(manager):
    mm = manager(hotplug_size=1 * GiB)
    mm.resize(384 * MiB)
    mm.controller.write(0x14, 1, MemoryHotplugController.INSERTING)   # the guest's MSCN ack
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
    assert mm.actual_size == 256 * MiB and len(mm.vm.slots) == 1 and mm.events == []


def test_the_window_can_be_filled_exactly_and_no_further(manager):
    mm = manager(hotplug_size=1 * GiB)
    assert mm.resize(256 * MiB + 1 * GiB)
    with pytest.raises(InvalidMemoryResize, match="0 bytes left"):
        mm.resize(256 * MiB + 1 * GiB + 128 * MiB)


def test_without_a_window_there_is_nothing_to_plug_into(manager):
    with pytest.raises(InvalidMemoryResize, match="hotplug_size"):
        manager().resize(512 * MiB)
    with pytest.raises(InvalidMemoryResize, match="virtio-mem region"):
        manager(hotplug_method="VirtioMem").resize(512 * MiB)


def test_slots_run_out_after_the_last_one(manager):
    mm = manager(hotplug_size=64 * GiB)
    for i in range(1, HOTPLUG_SLOTS + 1):
        mm.resize(256 * MiB + i * 128 * MiB)
    with pytest.raises(MemoryResizeError, match=f"all {HOTPLUG_SLOTS} slots"):
        mm.resize(256 * MiB + (HOTPLUG_SLOTS + 1) * 128 * MiB)
    assert mm.actual_size == 256 * MiB + HOTPLUG_SLOTS * 128 * MiB


# --- live DIMM removal (beyond the reference) -----------------------------------------------
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
    c = MemoryHotplugController(on_eject=ejected.append)
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
    c = MemoryHotplugController(on_eject=ejected.append)
    c.insert(0, 4 * GiB, 128 * MiB)
    c.request_removal(0)
    guest_ost(c, 0, IN_PROGRESS)
    assert c.slots[0].pending_removal and c.slots[0].ost_status == IN_PROGRESS
    guest_ost(c, 0, NOT_SUPPORTED)
    assert not c.slots[0].pending_removal and c.slots[0].ost_status == NOT_SUPPORTED
    guest_eject(c, 0)
    assert ejected == [] and c.slots[0].enabled


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
    guest_eject(mm.controller, 2)
    guest_ost(mm.controller, 1, NOT_SUPPORTED)          # the guest keeps dimm1
    assert mm.actual_size == 640 * MiB
    assert mm.vm.ranges() == [(0, 256 * MiB), (4 * GiB, 256 * MiB),
                                             (4 * GiB + 256 * MiB, 128 * MiB)]
    assert [r.name for r in mm.mem.regions] == ["ram0", "dimm0", "dimm1"]
    assert mm.hotplug_info()["dimms"][1:] == [
        {"id": "dimm1", "slot": 1, "address": 4 * GiB + 256 * MiB, "size": 128 * MiB,
         "state": "kept", "ost_event": EJECT_REQUEST, "ost_status": NOT_SUPPORTED}]
    assert mm.resize(768 * MiB)                         # the freed space is plugged again
    assert mm.hotplug_info()["dimms"][-1]["address"] == 4 * GiB + 384 * MiB


# --- virtio-mem ------------------------------------------------------------------------------
def test_virtio_mem_region_is_mapped_at_boot_after_ram(manager):
    mm = manager(size=3 * GiB + 100 * MiB, hotplug_size=1 * GiB, hotplug_method="VirtioMem",
                 hotplugged_size=256 * MiB)
    assert mm.controller is None and mm.mmio.find(layout.ACPI_MEM_HOTPLUG_ADDR) is None
    (zone,) = mm.virtio_mem_zones
    assert (zone.id, zone.region.gpa, zone.region.size, zone.initial_size) == (
        "mem0", 4 * GiB + 128 * MiB, 1 * GiB, 256 * MiB)
    assert (zone.device.name, zone.device.requested_size) == ("mem0", 256 * MiB)
    assert mm.vm.ranges()[-1] == (4 * GiB + 128 * MiB, 1 * GiB)
    assert mm.hotplug_window == (4 * GiB + 128 * MiB, 1 * GiB)
    assert layout.mmio64_window(*mm.hotplug_window)[0] == 6 * GiB
    # the region reaches the guest through the device only, never through the e820 map
    assert all(e.addr + e.size <= 4 * GiB + 100 * MiB
               for e in boot.e820_map(mm.mem) if e.type == boot.E820_RAM)
    assert mm.actual_size == 3 * GiB + 100 * MiB           # nothing plugged yet


def test_virtio_mem_regions_are_whole_memory_blocks(manager):
    with pytest.raises(ValueError, match="multiple of 128 MiB"):
        manager(hotplug_size=200 * MiB, hotplug_method="VirtioMem")


def test_virtio_mem_resize_sets_the_requested_size(manager):
    mm = manager(hotplug_size=1 * GiB, hotplug_method="VirtioMem")
    (zone,) = mm.virtio_mem_zones
    device = zone.device
    assert mm.resize(768 * MiB) and device.requested_size == 512 * MiB
    assert not mm.resize(768 * MiB)
    assert mm.resize(256 * MiB) and device.requested_size == 0
    assert device.request(Request.PLUG, zone.region.gpa, 4)[0] == Response.NACK
    mm.resize(512 * MiB)
    device.request(Request.PLUG, zone.region.gpa, 4)                   # the guest plugs 8 MiB
    assert mm.actual_size == 264 * MiB
    assert mm.hotplug_info() == {
        "method": "VirtioMem", "window": {"start": 4 * GiB, "size": 1 * GiB},
        "virtio_mem": [{"id": "mem0", "address": 4 * GiB, "size": 1 * GiB,
                        "block_size": 2 * MiB, "requested_size": 256 * MiB,
                        "plugged_size": 8 * MiB, "driver_active": False}]}
    assert mm.events == []                                  # no GED: the device interrupts


@pytest.mark.parametrize("desired, message", [
    (128 * MiB, "below the boot RAM"),
    (256 * MiB + 1 * GiB + 2 * MiB, "not enough hot plug space"),
    (256 * MiB + 1 * MiB, "multiple of the virtio-mem block size"),
])
def test_virtio_mem_request_errors(desired, message):
    with pytest.raises(InvalidMemoryResize, match=message):
        virtio_mem_request(memory_config(size=256 * MiB, hotplug_size=1 * GiB,
                                         hotplug_method="VirtioMem"), desired)


# --- vm.resize and vm.info in the VMM ------------------------------------------------------
def booted_vmm(**memory) -> Vmm:
    """A VMM running a VM with ``memory`` (no vCPUs, no devices but virtio-mem's)."""
    vmm = Vmm()
    config = VmConfig.model_validate({"payload": {"kernel": __file__}, "memory": memory})
    vmm.vm_create(config)
    manager = MemoryManager(config.memory, RecordingMemslots(), Bus("mmio"), notify=lambda e: None)
    manager.create_boot_memory()
    run_as_booted(vmm, BootedVm(memory=manager))
    return vmm


@pytest.fixture
def vmm():
    vmm = booted_vmm(size=256 * MiB, hotplug_size=1 * GiB)
    yield vmm
    vmm.close()


def resize(vmm, desired):
    vmm.vm_resize(VmResize(desired_ram=desired))


def test_vm_resize_grows_now_and_keeps_the_size_for_the_next_boot(vmm):
    resize(vmm, 512 * MiB)
    info = vmm.vm_info()
    assert info["config"]["memory"]["size"] == 512 * MiB
    assert info["memory_actual_size"] == 512 * MiB
    assert [d["size"] for d in info["memory_hotplug"]["dimms"]] == [256 * MiB]


def test_vm_resize_reduction_changes_only_the_configuration(vmm):
    resize(vmm, 512 * MiB)
    resize(vmm, 384 * MiB)
    info = vmm.vm_info()
    assert info["config"]["memory"]["size"] == 384 * MiB
    assert info["memory_actual_size"] == 512 * MiB
    resize(vmm, 640 * MiB)                       # growing again counts from the RAM plugged
    assert vmm.vm_info()["memory_actual_size"] == 640 * MiB


@pytest.mark.parametrize("desired, status, message", [
    (256 * MiB + 64 * MiB, 400, "multiple of 128 MiB"),
    (2 * GiB, 400, "not enough hot plug space"),
    (512 * MiB + 1, 400, "page size"),
    (0, 400, "page size"),
])
def test_vm_resize_errors_leave_the_configuration_alone(vmm, desired, status, message):
    with pytest.raises(ApiError) as e:
        resize(vmm, desired)
    assert e.value.status == status and message in e.value.messages[-1]
    assert vmm.config.memory.size == 256 * MiB


def test_vm_resize_of_a_created_vm_edits_its_configuration():
    vmm = Vmm()
    try:
        vmm.vm_create(VmConfig.model_validate({"payload": {"kernel": __file__},
                                               "memory": {"size": 256 * MiB}}))
        resize(vmm, 1 * GiB)
        info = vmm.vm_info()
        assert info["config"]["memory"]["size"] == 1 * GiB and "memory_hotplug" not in info
    finally:
        vmm.close()


def test_vm_resize_with_virtio_mem_grows_and_shrinks_live_and_keeps_it_for_reboot():
    vmm = booted_vmm(size=256 * MiB, hotplug_size=1 * GiB, hotplug_method="VirtioMem")
    try:
        device = vmm.vm.memory.virtio_mem_zones[0].device
        resize(vmm, 768 * MiB)
        assert device.requested_size == 512 * MiB
        memory = vmm.vm_info()["config"]["memory"]
        assert (memory["size"], memory["hotplugged_size"]) == (256 * MiB, 512 * MiB)
        assert vmm.vm_info()["memory_actual_size"] == 256 * MiB        # nothing plugged yet
        resize(vmm, 256 * MiB)
        assert device.requested_size == 0
        assert "hotplugged_size" not in vmm.vm_info()["config"]["memory"]
        with pytest.raises(ApiError) as e:
            resize(vmm, 128 * MiB)
        assert e.value.status == 400 and "below the boot RAM" in e.value.messages[-1]
    finally:
        vmm.close()


def test_vm_resize_with_virtio_mem_of_a_created_vm_edits_hotplugged_size():
    vmm = Vmm()
    try:
        vmm.vm_create(VmConfig.model_validate({"payload": {"kernel": __file__}, "memory": {
            "size": 256 * MiB, "hotplug_size": 1 * GiB, "hotplug_method": "VirtioMem"}}))
        resize(vmm, 512 * MiB)
        assert vmm.config.memory.hotplugged_size == 256 * MiB
        assert vmm.config.memory.size == 256 * MiB
    finally:
        vmm.close()
