"""The memory resize rules (pych.memory.resize): ``vm.resize``'s ``desired_ram`` and
``vm.resize-zone``, on a configuration alone, with a recording manager, with a real memory
manager, and through the VMM (../shared/notes/ch-hotplug-reference.md §4.1, §4.2)."""

from __future__ import annotations

import pytest

from pych.api.errors import status_of
from pych.arch.x86_64 import layout
from pych.config import VmConfig, VmResize, VmResizeZone
from pych.devices.bus import Bus
from pych.devices.virtio.mem import Request, Response
from pych.errors import VmmError
from pych.memory.hotplug import HOTPLUG_SLOTS
from pych.memory.manager import MemoryManager
from pych.memory.resize import (RESIZE_WITH_ZONES, InvalidMemoryResize, MemoryResizeError,
                                UnknownMemoryZone, find_zone, resize_ram, resize_zone,
                                virtio_mem_request)
from pych.memory.zones import DEFAULT_MEMORY_ZONE
from pych.vmm import Vmm, VmState

from .test_manager import FakeKvmVm, manager, memory_config  # noqa: F401 - fixtures
from .test_zones import zones_manager, zones_memory  # noqa: F401

MiB, GiB = layout.MiB, layout.GiB
ZONES = [{"id": "mem0", "size": 256 * MiB},
         {"id": "mem1", "size": 128 * MiB, "hotplug_size": 512 * MiB}]


def request(mm: MemoryManager, desired: int) -> bool:
    """What resize_ram does with virtio-mem on a running VM, with the manager's answer
    (whether the device was asked for anything new)."""
    return mm.resize_virtio_mem(DEFAULT_MEMORY_ZONE, virtio_mem_request(mm.config, desired))


def request_zone(mm: MemoryManager, zone_id: str, desired: int) -> bool:
    """What resize_zone does on a running VM, with the manager's answer."""
    return mm.resize_virtio_mem(zone_id, virtio_mem_request(find_zone(mm.config, zone_id),
                                                            desired))


# --- resize_ram / resize_zone on a configuration (no running VM) -------------------------------
def test_resize_ram_without_a_vm_edits_the_configuration():
    acpi = memory_config(size=256 * MiB, hotplug_size=1 * GiB)
    resize_ram(acpi, 1 * GiB, None)
    assert (acpi.size, acpi.hotplugged_size) == (1 * GiB, None)
    virtio = memory_config(size=256 * MiB, hotplug_size=1 * GiB, hotplug_method="VirtioMem")
    resize_ram(virtio, 512 * MiB, None)
    assert (virtio.size, virtio.hotplugged_size) == (256 * MiB, 256 * MiB)
    resize_ram(virtio, 256 * MiB, None)
    assert (virtio.size, virtio.hotplugged_size) == (256 * MiB, None)


@pytest.mark.parametrize("fields, desired, error, message", [
    ({"size": 256 * MiB}, 0, InvalidMemoryResize, "page size"),
    ({"size": 256 * MiB}, 512 * MiB + 1, InvalidMemoryResize, "page size"),
    ({"size": 0, "hotplug_method": "VirtioMem", "zones": [{"id": "z", "size": 256 * MiB}]},
     512 * MiB, InvalidMemoryResize, RESIZE_WITH_ZONES),
    ({"size": 256 * MiB, "hotplug_method": "VirtioMem"}, 512 * MiB, InvalidMemoryResize,
     "virtio-mem region"),
    ({"size": 256 * MiB, "hotplug_size": 1 * GiB, "hotplug_method": "VirtioMem"}, 128 * MiB,
     InvalidMemoryResize, "below the boot RAM"),
])
def test_resize_ram_errors_leave_the_configuration_alone(fields, desired, error, message):
    memory = memory_config(**fields)
    before = memory.model_dump()
    with pytest.raises(error, match=message):
        resize_ram(memory, desired, None)
    assert memory.model_dump() == before


def test_resize_zone_without_a_vm_edits_the_zone():
    memory = zones_memory(ZONES)
    resize_zone(memory, "mem1", 256 * MiB, None)                 # virtio-mem: hotplugged_size
    resize_zone(memory, "mem0", 512 * MiB, None)                 # none: the cold resize
    assert [(z.size, z.hotplugged_size) for z in memory.zones] == [(512 * MiB, None),
                                                                   (128 * MiB, 128 * MiB)]
    resize_zone(memory, "mem1", 128 * MiB, None)
    assert memory.zones[1].hotplugged_size is None


@pytest.mark.parametrize("zones, zone, desired, error, message", [
    (ZONES, "nope", 512 * MiB, UnknownMemoryZone, "Could not find the memory zone nope"),
    (ZONES, "mem0", 0, InvalidMemoryResize, "page size"),
    (ZONES, "mem1", 129 * MiB, InvalidMemoryResize, "multiple of the virtio-mem block size"),
    (None, "mem0", 512 * MiB, InvalidMemoryResize, "no zone is defined"),
])
def test_resize_zone_errors_leave_the_configuration_alone(zones, zone, desired, error, message):
    memory = zones_memory(zones) if zones else memory_config(size=256 * MiB)
    before = memory.model_dump()
    with pytest.raises(error, match=message):
        resize_zone(memory, zone, desired, None)
    assert memory.model_dump() == before


# --- resize_ram / resize_zone act on the running VM's manager, then edit the configuration -----
class RecordingManager:
    """A memory manager that records what it is asked, and fails when told to."""

    def __init__(self, error: Exception | None = None):
        self.calls: list[tuple] = []
        self.error = error

    def check_resize(self, desired: int) -> None:
        """Its checks pass; it fails (if told to) only when asked to act."""

    def check_resize_virtio_mem(self, zone_id: str) -> None:
        pass

    def resize(self, desired: int) -> bool:
        self.calls.append(("resize", desired))
        if self.error is not None:
            raise self.error
        return True

    def resize_virtio_mem(self, zone_id: str, requested: int) -> bool:
        self.calls.append(("resize_virtio_mem", zone_id, requested))
        if self.error is not None:
            raise self.error
        return True


def test_resize_ram_asks_the_manager_once_with_the_validated_request():
    acpi, manager = memory_config(size=256 * MiB, hotplug_size=1 * GiB), RecordingManager()
    resize_ram(acpi, 512 * MiB, manager)
    virtio = memory_config(size=256 * MiB, hotplug_size=1 * GiB, hotplug_method="VirtioMem")
    resize_ram(virtio, 768 * MiB, manager)
    assert manager.calls == [("resize", 512 * MiB), ("resize_virtio_mem", "mem0", 512 * MiB)]
    assert (acpi.size, virtio.hotplugged_size) == (512 * MiB, 512 * MiB)


def test_resize_zone_asks_the_manager_for_the_zones_device():
    memory, manager = zones_memory(ZONES), RecordingManager()
    resize_zone(memory, "mem1", 384 * MiB, manager)
    assert manager.calls == [("resize_virtio_mem", "mem1", 256 * MiB)]
    assert memory.zones[1].hotplugged_size == 256 * MiB
    with pytest.raises(InvalidMemoryResize, match="mem0 has no virtio-mem region"):
        resize_zone(memory, "mem0", 512 * MiB, manager)          # no cold resize while running
    assert len(manager.calls) == 1


def test_what_the_manager_refuses_leaves_the_configuration_alone():
    acpi = memory_config(size=256 * MiB, hotplug_size=1 * GiB)
    with pytest.raises(MemoryResizeError, match="no slot"):
        resize_ram(acpi, 512 * MiB, RecordingManager(MemoryResizeError("no slot")))
    assert acpi.size == 256 * MiB
    memory = zones_memory(ZONES)
    with pytest.raises(InvalidMemoryResize, match="refused"):
        resize_zone(memory, "mem1", 384 * MiB, RecordingManager(InvalidMemoryResize("refused")))
    assert memory.zones[1].hotplugged_size is None


# --- virtio-mem requests ---------------------------------------------------------------------
@pytest.mark.parametrize("desired, message", [
    (128 * MiB, "below the boot RAM"),
    (256 * MiB + 1 * GiB + 2 * MiB, "not enough hot plug space"),
    (256 * MiB + 1 * MiB, "multiple of the virtio-mem block size"),
])
def test_virtio_mem_request_errors(desired, message):
    with pytest.raises(InvalidMemoryResize, match=message):
        virtio_mem_request(memory_config(size=256 * MiB, hotplug_size=1 * GiB,
                                         hotplug_method="VirtioMem"), desired)


def test_without_a_virtio_mem_region_there_is_nothing_to_resize(manager):
    mm = manager(hotplug_method="VirtioMem")
    with pytest.raises(InvalidMemoryResize, match="virtio-mem region"):
        resize_ram(mm.config, 512 * MiB, mm)


def test_virtio_mem_resize_sets_the_requested_size(manager):
    mm = manager(hotplug_size=1 * GiB, hotplug_method="VirtioMem")
    (zone,) = mm.virtio_mem_zones
    device = zone.device
    assert request(mm, 768 * MiB) and device.requested_size == 512 * MiB
    assert not request(mm, 768 * MiB)
    assert request(mm, 256 * MiB) and device.requested_size == 0
    assert device.request(Request.PLUG, zone.region.gpa, 4)[0] == Response.NACK
    request(mm, 512 * MiB)
    device.request(Request.PLUG, zone.region.gpa, 4)                   # the guest plugs 8 MiB
    assert mm.actual_size == 264 * MiB
    assert mm.hotplug_info() == {
        "method": "VirtioMem", "window": {"start": 4 * GiB, "size": 1 * GiB},
        "virtio_mem": [{"id": "mem0", "address": 4 * GiB, "size": 1 * GiB,
                        "block_size": 2 * MiB, "requested_size": 256 * MiB,
                        "plugged_size": 8 * MiB, "driver_active": False}]}
    assert mm.events == []                                  # no GED: the device interrupts


def test_resize_zone_sets_the_zone_devices_requested_size(zones_manager):
    mm = zones_manager(ZONES)
    device = mm.zones["mem1"].virtio_mem.device
    assert request_zone(mm, "mem1", 384 * MiB) and device.requested_size == 256 * MiB
    assert not request_zone(mm, "mem1", 384 * MiB)            # already asked for: no-op
    region = mm.zones["mem1"].virtio_mem.region
    assert device.request(Request.PLUG, region.gpa, 8)[0] == Response.ACK   # the guest: 16 MiB
    assert mm.actual_size == 384 * MiB + 16 * MiB
    assert request_zone(mm, "mem1", 128 * MiB) and device.requested_size == 0


@pytest.mark.parametrize("zone, desired, error, message", [
    ("mem1", 64 * MiB, InvalidMemoryResize, "below the boot RAM of memory zone mem1"),
    ("mem1", 128 * MiB + 514 * MiB, InvalidMemoryResize, "not enough hot plug space"),
    ("mem1", 129 * MiB, InvalidMemoryResize, "multiple of the virtio-mem block size"),
    ("mem0", 512 * MiB, InvalidMemoryResize, "mem0 has no virtio-mem region"),
    ("nope", 512 * MiB, UnknownMemoryZone, "Could not find the memory zone nope"),
])
def test_resize_zone_errors_change_nothing(zones_manager, zone, desired, error, message):
    mm = zones_manager(ZONES)
    with pytest.raises(error, match=message):
        resize_zone(mm.config, zone, desired, mm)
    assert mm.zones["mem1"].virtio_mem.device.requested_size == 0
    assert [(z.size, z.hotplugged_size) for z in mm.config.zones] == [(256 * MiB, None),
                                                                      (128 * MiB, None)]


def test_resize_zone_needs_zones_and_resize_refuses_them(zones_manager):
    mm = MemoryManager(VmConfig.model_validate({"payload": {"kernel": __file__}, "memory": {
        "size": 256 * MiB, "hotplug_size": 256 * MiB, "hotplug_method": "VirtioMem"}}).memory,
        FakeKvmVm(), Bus("mmio"), notify=lambda event: None)
    try:
        mm.create_boot_memory()
        with pytest.raises(InvalidMemoryResize, match="no zone is defined"):
            resize_zone(mm.config, "mem0", 512 * MiB, mm)
    finally:
        mm.close()
    with pytest.raises(InvalidMemoryResize, match="user defined memory zones"):
        mm = zones_manager(ZONES)
        resize_ram(mm.config, 512 * MiB, mm)


# --- vm.resize and vm.info in the VMM ------------------------------------------------------
class BootedVm:
    """The part of a booted ``Vm`` the VMM uses for memory, around a real MemoryManager."""

    cpus = devices = kvm_vm = memslots_in_use = None    # no KVM VM, vCPUs or devices

    def __init__(self, memory: MemoryManager):
        self.memory = memory

    @property
    def memory_actual_size(self) -> int:
        return self.memory.actual_size

    def close(self) -> None:
        self.memory.close()


def booted_vmm(**memory) -> Vmm:
    """A VMM running a VM with ``memory`` (no vCPUs, no devices but virtio-mem's)."""
    vmm = Vmm()
    config = VmConfig.model_validate({"payload": {"kernel": __file__}, "memory": memory})
    vmm.vm_create(config)
    manager = MemoryManager(config.memory, FakeKvmVm(), Bus("mmio"), notify=lambda e: None)
    manager.create_boot_memory()
    vmm.vm, vmm.state = BootedVm(manager), VmState.Running
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
    with pytest.raises(VmmError) as e:
        resize(vmm, desired)
    assert status_of(e.value) == status and message in e.value.messages[-1]
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
        with pytest.raises(VmmError) as e:
            resize(vmm, 128 * MiB)
        assert status_of(e.value) == 400 and "below the boot RAM" in e.value.messages[-1]
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


def test_more_increases_than_slots_are_a_clear_500():
    vmm = Vmm()
    vmm.vm_create(VmConfig.model_validate({"payload": {"kernel": __file__}, "memory": {
        "size": 128 * MiB, "hotplug_size": 64 * GiB}}))
    mm = MemoryManager(vmm.config.memory, FakeKvmVm(), Bus("mmio"), notify=lambda e: None)
    mm.create_boot_memory()
    vmm.vm, vmm.state = BootedVm(mm), VmState.Running
    try:
        for i in range(1, HOTPLUG_SLOTS + 1):
            vmm.vm_resize(VmResize(desired_ram=(i + 1) * 128 * MiB))
        with pytest.raises(VmmError) as e:
            vmm.vm_resize(VmResize(desired_ram=(HOTPLUG_SLOTS + 2) * 128 * MiB))
        assert status_of(e.value) == 500
        assert f"all {HOTPLUG_SLOTS} slots of this boot are used" in e.value.messages[-1]
        assert vmm.config.memory.size == (HOTPLUG_SLOTS + 1) * 128 * MiB   # the last that worked
    finally:
        vmm.close()


# --- vm.resize-zone in the VMM -------------------------------------------------------------
def created_vmm(zones, **fields) -> Vmm:
    vmm = Vmm()
    vmm.vm_create(VmConfig.model_validate({"payload": {"kernel": __file__}, "memory": {
        "size": 0, "hotplug_method": "VirtioMem", "zones": zones, **fields}}))
    return vmm


def booted_zones_vmm(zones) -> Vmm:
    vmm = created_vmm(zones)
    mm = MemoryManager(vmm.config.memory, FakeKvmVm(), Bus("mmio"), notify=lambda e: None)
    mm.create_boot_memory()
    vmm.vm, vmm.state = BootedVm(mm), VmState.Running
    return vmm


@pytest.fixture
def zones_vmm():
    vmm = booted_zones_vmm(ZONES)
    yield vmm
    vmm.close()


def vm_resize_zone(vmm, zone, desired):
    return vmm.vm_resize_zone(VmResizeZone(id=zone, desired_ram=desired))


def test_vm_resize_zone_resizes_live_and_keeps_it_for_the_next_boot(zones_vmm):
    device = zones_vmm.vm.memory.zones["mem1"].virtio_mem.device
    assert vm_resize_zone(zones_vmm, "mem1", 640 * MiB) is None             # 204
    assert device.requested_size == 512 * MiB
    info = zones_vmm.vm_info()
    assert info["config"]["memory"]["zones"][1]["hotplugged_size"] == 512 * MiB
    assert info["config"]["memory"]["zones"][1]["size"] == 128 * MiB
    assert info["memory_actual_size"] == 384 * MiB                 # the guest plugged nothing yet
    assert info["memory_hotplug"]["virtio_mem"][0]["requested_size"] == 512 * MiB
    vm_resize_zone(zones_vmm, "mem1", 128 * MiB)
    assert device.requested_size == 0
    assert "hotplugged_size" not in zones_vmm.vm_info()["config"]["memory"]["zones"][1]


@pytest.mark.parametrize("zone, desired, status, message", [
    ("nope", 512 * MiB, 404, "Could not find the memory zone nope"),
    ("mem0", 512 * MiB, 400, "mem0 has no virtio-mem region"),
    ("mem1", 64 * MiB, 400, "below the boot RAM of memory zone mem1"),
    ("mem1", 1 * GiB, 400, "not enough hot plug space"),
    ("mem1", 129 * MiB, 400, "multiple of the virtio-mem block size"),
])
def test_vm_resize_zone_errors_leave_the_configuration_alone(zones_vmm, zone, desired, status,
                                                             message):
    with pytest.raises(VmmError) as e:
        vm_resize_zone(zones_vmm, zone, desired)
    assert status_of(e.value) == status and message in e.value.messages[-1]
    assert e.value.messages[0] == "The memory zone could not be resized"
    assert [z.hotplugged_size for z in zones_vmm.config.memory.zones] == [None, None]
    assert [z.size for z in zones_vmm.config.memory.zones] == [256 * MiB, 128 * MiB]


def test_vm_resize_zone_without_zones_or_vm():
    vmm = Vmm()
    try:
        with pytest.raises(VmmError) as e:
            vm_resize_zone(vmm, "mem0", 512 * MiB)
        assert status_of(e.value) == 404                                  # no VM
        vmm.vm_create(VmConfig.model_validate({"payload": {"kernel": __file__},
                                               "memory": {"size": 256 * MiB}}))
        with pytest.raises(VmmError) as e:
            vm_resize_zone(vmm, "mem0", 512 * MiB)
        assert status_of(e.value) == 400 and "no zone is defined" in e.value.messages[-1]
    finally:
        vmm.close()


def test_vm_resize_refuses_user_defined_zones_booted_or_not(zones_vmm):
    for machine in (zones_vmm, created_vmm(ZONES)):
        with pytest.raises(VmmError) as e:
            machine.vm_resize(VmResize(desired_ram=1 * GiB))
        assert status_of(e.value) == 400 and "vm.resize-zone" in e.value.messages[-1]
        assert machine.config.memory.size == 0                # still a valid configuration
    machine.close()


def test_vm_resize_zone_before_boot_edits_the_configuration():
    vmm = created_vmm(ZONES)
    try:
        assert vmm.vm_info()["memory_actual_size"] == 384 * MiB    # the zones' boot RAM
        vm_resize_zone(vmm, "mem1", 256 * MiB)                       # as a live resize would
        assert [(z.size, z.hotplugged_size) for z in vmm.config.memory.zones] == [
            (256 * MiB, None), (128 * MiB, 128 * MiB)]
        vm_resize_zone(vmm, "mem0", 512 * MiB)                       # no virtio-mem: cold resize
        assert vmm.config.memory.zones[0].size == 512 * MiB
        with pytest.raises(VmmError) as e:
            vm_resize_zone(vmm, "mem1", 1 * GiB)
        assert status_of(e.value) == 400
        with pytest.raises(VmmError) as e:
            vm_resize_zone(vmm, "mem0", 0)
        assert status_of(e.value) == 400 and "page size" in e.value.messages[-1]
    finally:
        vmm.close()


def test_the_zones_hotplugged_size_is_plugged_again_at_the_next_boot(zones_vmm):
    vm_resize_zone(zones_vmm, "mem1", 384 * MiB)
    zones_vmm.vm.close()
    reborn = MemoryManager(zones_vmm.config.memory, FakeKvmVm(), Bus("mmio"), notify=lambda e: None)
    try:
        reborn.create_boot_memory()
        assert reborn.zones["mem1"].virtio_mem.device.requested_size == 256 * MiB
    finally:
        reborn.close()
        zones_vmm.vm = None
