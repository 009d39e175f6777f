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
from pych.memory_manager import (
    HOTPLUG_ALIGNMENT, HOTPLUG_SLOTS, InvalidMemoryResize, MemoryHotplugController,
    MemoryManager, MemoryResizeError, hotplug_region_start,
)
from pych.vmm import Vmm

MiB, GiB = layout.MiB, layout.GiB


class FakeKvmVm:
    """Records KVM memslots instead of creating them."""

    def __init__(self):
        self.memslots: dict[int, tuple[int, int]] = {}

    def add_memory(self, gpa: int, size: int, host_addr: int) -> int:
        slot = len(self.memslots)
        self.memslots[slot] = (gpa, size)
        return slot


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
    assert list(mm.vm.memslots.values()) == [(0, 256 * MiB)]
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
    assert list(mm.vm.memslots.values())[1:] == [(g, s) for _, g, s in dimms]
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
    assert mm.actual_size == 256 * MiB and len(mm.vm.memslots) == 1 and mm.events == []


def test_the_window_can_be_filled_exactly_and_no_further(manager):
    mm = manager(hotplug_size=1 * GiB)
    assert mm.resize(256 * MiB + 1 * GiB)
    with pytest.raises(InvalidMemoryResize, match="0 bytes left"):
        mm.resize(256 * MiB + 1 * GiB + 128 * MiB)


def test_without_a_window_there_is_nothing_to_plug_into(manager):
    with pytest.raises(InvalidMemoryResize, match="hotplug_size"):
        manager().resize(512 * MiB)
    with pytest.raises(MemoryResizeError, match="virtio-mem"):
        manager(hotplug_size=1 * GiB, hotplug_method="VirtioMem").resize(512 * MiB)


def test_slots_run_out_after_the_last_one(manager):
    mm = manager(hotplug_size=64 * GiB)
    for i in range(1, HOTPLUG_SLOTS + 1):
        mm.resize(256 * MiB + i * 128 * MiB)
    with pytest.raises(MemoryResizeError, match=f"all {HOTPLUG_SLOTS} slots"):
        mm.resize(256 * MiB + (HOTPLUG_SLOTS + 1) * 128 * MiB)
    assert mm.actual_size == 256 * MiB + HOTPLUG_SLOTS * 128 * MiB


# --- vm.resize and vm.info in the VMM ------------------------------------------------------
class BootedVm:
    """The part of a booted ``Vm`` the VMM uses for memory, around a real MemoryManager."""

    cpus = devices = None

    def __init__(self, memory: MemoryManager):
        self.memory = memory

    def resize_memory(self, desired: int) -> bool:
        return self.memory.resize(desired)

    @property
    def memory_actual_size(self) -> int:
        return self.memory.actual_size

    def close(self) -> None:
        self.memory.close()


@pytest.fixture
def vmm():
    vmm = Vmm()
    config = VmConfig.model_validate({"payload": {"kernel": "/k"},
                                      "memory": {"size": 256 * MiB, "hotplug_size": 1 * GiB}})
    vmm.vm_create(config)
    memory = MemoryManager(config.memory, FakeKvmVm(), Bus("mmio"), notify=lambda e: None)
    memory.create_boot_memory()
    vmm.vm, vmm.state = BootedVm(memory), "Running"
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
        vmm.vm_create(VmConfig.model_validate({"payload": {"kernel": "/k"},
                                               "memory": {"size": 256 * MiB}}))
        resize(vmm, 1 * GiB)
        info = vmm.vm_info()
        assert info["config"]["memory"]["size"] == 1 * GiB and "memory_hotplug" not in info
    finally:
        vmm.close()
