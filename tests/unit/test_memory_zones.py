"""User-defined memory zones without KVM (``--memory size=0 --memory-zone ...``): the boot RAM
layout and the virtio-mem regions after it, each zone's backing, vm.resize-zone in the memory
manager and the VMM (the reference's rules, shared/notes/ch-hotplug-reference.md §4.2), and
what vm.info reports per DIMM and per virtio-mem device."""

from __future__ import annotations

import os

import pytest
from hypothesis import given
from hypothesis import strategies as st

from pych.api.handler import ApiError
from pych.arch.x86_64 import boot, layout
from pych.config import ConfigError, VmConfig, VmResize, VmResizeZone
from pych.devices.bus import Bus
from pych.devices.virtio.mem import Request, Response
from pych.memory_manager import (
    HOTPLUG_SLOTS, InvalidMemoryResize, MemoryHotplugController, MemoryManager,
    UnknownMemoryZone, boot_ram_layout, virtio_mem_layout,
)
from pych.vmm import Vmm

from tests.support.fakes import RecordingMemslots
from tests.support.machines import BootedVm, run_as_booted

MiB, GiB = layout.MiB, layout.GiB
PAGE = 4096
HOLE = (layout.MEM_32BIT_RESERVED_START, layout.RAM_64BIT_START)


def memory(zones, **fields):
    """A validated MemoryConfig with ``zones`` (dicts) and ``size=0``."""
    fields.setdefault("hotplug_method", "VirtioMem")
    return VmConfig.model_validate({"payload": {"kernel": __file__},
                                    "memory": {"size": 0, "zones": zones, **fields}}).memory


@pytest.fixture
def manager():
    """A booted memory manager factory (``zones`` as dicts); closed after the test."""
    made = []

    def make(zones, **fields):
        mm = MemoryManager(memory(zones, **fields), RecordingMemslots(), Bus("mmio"),
                           notify=lambda event: None)
        made.append(mm)
        mm.create_boot_memory()
        return mm

    yield make
    for mm in made:
        mm.close()


# --- the layout (pure) --------------------------------------------------------------------------
zone_sizes = st.lists(st.integers(0, 3 << 18).map(lambda pages: pages * PAGE), min_size=1,
                      max_size=6)


@given(zone_sizes)
def test_zones_fill_the_ram_ranges_in_order_around_the_hole(sizes):
    zones = [(f"z{i}", size) for i, size in enumerate(sizes)]
    pieces = boot_ram_layout(zones)
    # each zone gets exactly its size, from offset 0 on, in at most two pieces
    for zone, size in zones:
        mine = [p for p in pieces if p.zone == zone]
        assert sum(p.size for p in mine) == size and len(mine) <= 2
        assert [p.offset for p in mine] == [sum(p.size for p in mine[:i])
                                            for i in range(len(mine))]
        assert all(p.size > 0 for p in mine)
    # zones in order, one after the other, nothing in the 32-bit hole, no gaps elsewhere
    assert [p.zone for p in pieces] == sorted((p.zone for p in pieces), key=lambda z: int(z[1:]))
    for a, b in zip(pieces, pieces[1:]):
        assert b.gpa == (HOLE[1] if a.gpa + a.size == HOLE[0] else a.gpa + a.size)
    assert all(p.gpa + p.size <= HOLE[0] or p.gpa >= HOLE[1] for p in pieces)
    # and together they are the single-zone layout of the total
    merged: list[list[int]] = []
    for p in pieces:
        if merged and merged[-1][0] + merged[-1][1] == p.gpa:
            merged[-1][1] += p.size
        else:
            merged.append([p.gpa, p.size])
    total = sum(sizes)
    assert [tuple(m) for m in merged] == (layout.ram_regions(total) if total else [])


def test_a_zone_reaching_the_hole_continues_at_4_gib():
    pieces = boot_ram_layout([("mem0", 2 * GiB), ("mem1", 2 * GiB), ("mem2", 0),
                              ("mem3", 256 * MiB)])
    assert [(p.zone, p.gpa, p.size, p.offset) for p in pieces] == [
        ("mem0", 0, 2 * GiB, 0),
        ("mem1", 2 * GiB, 1 * GiB, 0),
        ("mem1", 4 * GiB, 1 * GiB, 1 * GiB),
        ("mem3", 5 * GiB, 256 * MiB, 0)]


@given(st.integers(0, 1 << 30).map(lambda pages: pages * PAGE),
       st.lists(st.integers(1, 64).map(lambda blocks: blocks * 128 * MiB), max_size=5))
def test_virtio_mem_regions_follow_ram_on_128_mib_boundaries(ram_end, sizes):
    placed = virtio_mem_layout(ram_end, [(f"z{i}", s) for i, s in enumerate(sizes)])
    assert [(zone, size) for zone, _, size in placed] == [(f"z{i}", s)
                                                          for i, s in enumerate(sizes)]
    cursor = max(ram_end, layout.RAM_64BIT_START)
    for _, gpa, size in placed:
        assert gpa % (128 * MiB) == 0 and cursor <= gpa < cursor + 128 * MiB
        cursor = gpa + size


# --- boot RAM and regions -------------------------------------------------------------------------
def test_each_zone_is_its_own_memfd_mapped_as_the_layout_says(manager):
    mm = manager([{"id": "mem0", "size": 2 * GiB}, {"id": "mem1", "size": 2 * GiB},
                  {"id": "mem2", "size": 0, "hotplug_size": 512 * MiB,
                   "hotplugged_size": 128 * MiB}])
    assert [(r.name, r.gpa, r.size) for r in mm.mem.regions] == [
        ("ram0", 0, 2 * GiB), ("ram1", 2 * GiB, 1 * GiB), ("ram2", 4 * GiB, 1 * GiB),
        ("virtio-mem-mem2", 5 * GiB, 512 * MiB)]
    assert mm.vm.ranges() == [(r.gpa, r.size) for r in mm.mem.regions]
    assert [r.name for r in mm.zones["mem1"].regions] == ["ram1", "ram2"]
    # mem1's two pieces are one memfd: what the guest writes at 4 GiB is at offset 1 GiB
    mm.mem.write(4 * GiB, b"zone")
    assert os.pread(mm.zones["mem1"].fd, 4, 1 * GiB) == b"zone"
    assert mm.zones["mem0"].fd != mm.zones["mem1"].fd and mm.zones["mem2"].fd == -1
    # boot RAM is in the e820 map, the virtio-mem region is not
    assert [(e.addr, e.size) for e in boot.e820_map(mm.mem) if e.type == boot.E820_RAM][-2:] == [
        (2 * GiB, 1 * GiB), (4 * GiB, 1 * GiB)]
    (zone,) = mm.virtio_mem_zones
    assert (zone.id, zone.device.name, zone.device.requested_size) == ("mem2", "mem2", 128 * MiB)
    assert mm.hotplug_window == (5 * GiB, 512 * MiB)
    assert mm.actual_size == 4 * GiB                  # nothing plugged yet
    assert layout.mmio64_window(*mm.hotplug_window)[0] == 6 * GiB


def test_several_virtio_mem_zones_and_zones_without_hotplug(manager):
    mm = manager([{"id": "a", "size": 256 * MiB, "hotplug_size": 256 * MiB},
                  {"id": "b", "size": 100 * MiB},
                  {"id": "c", "size": 0, "hotplug_size": 1 * GiB}])
    assert [(z.id, z.region.gpa, z.region.size) for z in mm.virtio_mem_zones] == [
        ("a", 4 * GiB, 256 * MiB), ("c", 4 * GiB + 256 * MiB, 1 * GiB)]
    assert mm.zones["b"].virtio_mem is None
    assert mm.hotplug_window == (4 * GiB, 256 * MiB + 1 * GiB)
    assert mm.hotplug_info()["virtio_mem"][1] == {
        "id": "c", "address": 4 * GiB + 256 * MiB, "size": 1 * GiB, "block_size": 2 * MiB,
        "requested_size": 0, "plugged_size": 0, "driver_active": False}


def test_zones_without_hotplug_have_no_hotplug_space(manager):
    mm = manager([{"id": "a", "size": 256 * MiB}], hotplug_method="Acpi")
    assert mm.hotplug_window == (4 * GiB, 0) and mm.hotplug_info() is None
    assert mm.controller is None


def test_a_zone_can_be_backed_by_a_file_shared_or_private(manager, tmp_path):
    shared, private = tmp_path / "shared", tmp_path / "private"
    for f in (shared, private):
        f.write_bytes(bytes(64 * MiB))
    mm = manager([{"id": "s", "size": 64 * MiB, "file": str(shared), "shared": True},
                  {"id": "p", "size": 64 * MiB, "file": str(private)}])
    mm.mem.write(0, b"to the file")
    mm.mem.write(64 * MiB, b"to a private copy")
    mm.zones["s"].regions[0].mmap.flush()
    assert shared.read_bytes()[:11] == b"to the file"
    assert private.read_bytes()[:17] == bytes(17)


@pytest.mark.parametrize("zone, message", [
    ({"hugepages": True}, "huge pages"),
    ({"host_numa_node": 0}, "host_numa_node"),
    ({"file": "/nonexistent/pych"}, "cannot open the backing file"),
    ({"file": "/"}, "is a directory"),
])
def test_backings_pych_cannot_give_are_refused_with_one_line(manager, zone, message):
    with pytest.raises(ValueError, match=message):
        manager([{"id": "z", "size": 64 * MiB, **zone}])


def test_a_file_shorter_than_its_zone_is_refused(manager, tmp_path):
    (tmp_path / "f").write_bytes(bytes(MiB))
    with pytest.raises(ValueError, match="has 1048576 bytes, fewer than"):
        manager([{"id": "z", "size": 64 * MiB, "file": str(tmp_path / "f")}])


def test_memory_hugepages_are_refused_not_ignored():
    mm = MemoryManager(VmConfig.model_validate({"payload": {"kernel": __file__}, "memory": {
        "size": 64 * MiB, "hugepages": True}}).memory, RecordingMemslots(), Bus("mmio"),
        notify=lambda event: None)
    try:
        with pytest.raises(ValueError, match="--memory: huge pages"):
            mm.create_boot_memory()
    finally:
        mm.close()


@pytest.mark.parametrize("zones, message", [
    ([{"id": "a", "size": 0}], "neither a size nor a hotplug_size"),
    ([{"id": "a", "size": 0, "hotplug_size": 128 * MiB}], "no boot RAM"),
])
def test_zones_must_give_the_guest_boot_ram(zones, message):
    config = VmConfig.model_validate({"payload": {"kernel": __file__}, "memory": {
        "size": 0, "hotplug_method": "VirtioMem", "zones": zones}})
    with pytest.raises(ConfigError, match=message):
        config.validate()


# --- resize-zone in the memory manager ----------------------------------------------------------
ZONES = [{"id": "mem0", "size": 256 * MiB},
         {"id": "mem1", "size": 128 * MiB, "hotplug_size": 512 * MiB}]


def test_resize_zone_sets_the_zone_devices_requested_size(manager):
    mm = manager(ZONES)
    device = mm.zones["mem1"].virtio_mem.device
    assert mm.resize_zone("mem1", 384 * MiB) and device.requested_size == 256 * MiB
    assert not mm.resize_zone("mem1", 384 * MiB)            # already asked for: no-op
    region = mm.zones["mem1"].virtio_mem.region
    assert device.request(Request.PLUG, region.gpa, 8)[0] == Response.ACK   # the guest: 16 MiB
    assert mm.actual_size == 384 * MiB + 16 * MiB
    assert mm.resize_zone("mem1", 128 * MiB) and device.requested_size == 0


@pytest.mark.parametrize("zone, desired, error, message", [
    ("mem1", 64 * MiB, InvalidMemoryResize, "below the boot RAM of memory zone mem1"),
    ("mem1", 128 * MiB + 514 * MiB, InvalidMemoryResize, "not enough hot plug space"),
    ("mem1", 129 * MiB, InvalidMemoryResize, "multiple of the virtio-mem block size"),
    ("mem0", 512 * MiB, InvalidMemoryResize, "mem0 has no virtio-mem region"),
    ("nope", 512 * MiB, UnknownMemoryZone, "Could not find the memory zone nope"),
])
def test_resize_zone_errors_change_nothing(manager, zone, desired, error, message):
    mm = manager(ZONES)
    with pytest.raises(error, match=message):
        mm.resize_zone(zone, desired)
    assert mm.zones["mem1"].virtio_mem.device.requested_size == 0


def test_resize_zone_needs_zones_and_resize_refuses_them(manager):
    mm = MemoryManager(VmConfig.model_validate({"payload": {"kernel": __file__}, "memory": {
        "size": 256 * MiB, "hotplug_size": 256 * MiB, "hotplug_method": "VirtioMem"}}).memory,
        RecordingMemslots(), Bus("mmio"), notify=lambda event: None)
    try:
        mm.create_boot_memory()
        with pytest.raises(InvalidMemoryResize, match="no zone is defined"):
            mm.resize_zone("mem0", 512 * MiB)
    finally:
        mm.close()
    with pytest.raises(InvalidMemoryResize, match="user defined memory zones"):
        manager(ZONES).resize(512 * MiB)


# --- vm.resize-zone and vm.info in the VMM -------------------------------------------------------
def created_vmm(zones, **fields) -> Vmm:
    vmm = Vmm()
    vmm.vm_create(VmConfig.model_validate({"payload": {"kernel": __file__}, "memory": {
        "size": 0, "hotplug_method": "VirtioMem", "zones": zones, **fields}}))
    return vmm


def booted_vmm(zones) -> Vmm:
    vmm = created_vmm(zones)
    mm = MemoryManager(vmm.config.memory, RecordingMemslots(), Bus("mmio"), notify=lambda e: None)
    mm.create_boot_memory()
    run_as_booted(vmm, BootedVm(memory=mm))
    return vmm


@pytest.fixture
def vmm():
    vmm = booted_vmm(ZONES)
    yield vmm
    vmm.close()


def resize_zone(vmm, zone, desired):
    return vmm.vm_resize_zone(VmResizeZone(id=zone, desired_ram=desired))


def test_vm_resize_zone_resizes_live_and_keeps_it_for_the_next_boot(vmm):
    device = vmm.vm.memory.zones["mem1"].virtio_mem.device
    assert resize_zone(vmm, "mem1", 640 * MiB) is None             # 204
    assert device.requested_size == 512 * MiB
    info = vmm.vm_info()
    assert info["config"]["memory"]["zones"][1]["hotplugged_size"] == 512 * MiB
    assert info["config"]["memory"]["zones"][1]["size"] == 128 * MiB
    assert info["memory_actual_size"] == 384 * MiB                 # the guest plugged nothing yet
    assert info["memory_hotplug"]["virtio_mem"][0]["requested_size"] == 512 * MiB
    resize_zone(vmm, "mem1", 128 * MiB)
    assert device.requested_size == 0
    assert "hotplugged_size" not in vmm.vm_info()["config"]["memory"]["zones"][1]


@pytest.mark.parametrize("zone, desired, status, message", [
    ("nope", 512 * MiB, 404, "Could not find the memory zone nope"),
    ("mem0", 512 * MiB, 400, "mem0 has no virtio-mem region"),
    ("mem1", 64 * MiB, 400, "below the boot RAM of memory zone mem1"),
    ("mem1", 1 * GiB, 400, "not enough hot plug space"),
    ("mem1", 129 * MiB, 400, "multiple of the virtio-mem block size"),
])
def test_vm_resize_zone_errors_leave_the_configuration_alone(vmm, zone, desired, status,
                                                             message):
    with pytest.raises(ApiError) as e:
        resize_zone(vmm, zone, desired)
    assert e.value.status == status and message in e.value.messages[-1]
    assert e.value.messages[0] == "The memory zone could not be resized"
    assert [z.hotplugged_size for z in vmm.config.memory.zones] == [None, None]
    assert [z.size for z in vmm.config.memory.zones] == [256 * MiB, 128 * MiB]


def test_vm_resize_zone_without_zones_or_vm():
    vmm = Vmm()
    try:
        with pytest.raises(ApiError) as e:
            resize_zone(vmm, "mem0", 512 * MiB)
        assert e.value.status == 404                                  # no VM
        vmm.vm_create(VmConfig.model_validate({"payload": {"kernel": __file__},
                                               "memory": {"size": 256 * MiB}}))
        with pytest.raises(ApiError) as e:
            resize_zone(vmm, "mem0", 512 * MiB)
        assert e.value.status == 400 and "no zone is defined" in e.value.messages[-1]
    finally:
        vmm.close()


def test_vm_resize_refuses_user_defined_zones_booted_or_not(vmm):
    for machine in (vmm, created_vmm(ZONES)):
        with pytest.raises(ApiError) as e:
            machine.vm_resize(VmResize(desired_ram=1 * GiB))
        assert e.value.status == 400 and "vm.resize-zone" in e.value.messages[-1]
        assert machine.config.memory.size == 0                # still a valid configuration
    machine.close()


def test_vm_resize_zone_before_boot_edits_the_configuration():
    vmm = created_vmm(ZONES)
    try:
        assert vmm.vm_info()["memory_actual_size"] == 384 * MiB    # the zones' boot RAM
        resize_zone(vmm, "mem1", 256 * MiB)                       # as a live resize would
        assert [(z.size, z.hotplugged_size) for z in vmm.config.memory.zones] == [
            (256 * MiB, None), (128 * MiB, 128 * MiB)]
        resize_zone(vmm, "mem0", 512 * MiB)                       # no virtio-mem: cold resize
        assert vmm.config.memory.zones[0].size == 512 * MiB
        with pytest.raises(ApiError) as e:
            resize_zone(vmm, "mem1", 1 * GiB)
        assert e.value.status == 400
        with pytest.raises(ApiError) as e:
            resize_zone(vmm, "mem0", 0)
        assert e.value.status == 400 and "page size" in e.value.messages[-1]
    finally:
        vmm.close()


def test_the_zones_hotplugged_size_is_plugged_again_at_the_next_boot(vmm):
    resize_zone(vmm, "mem1", 384 * MiB)
    vmm.vm.close()
    reborn = MemoryManager(vmm.config.memory, RecordingMemslots(), Bus("mmio"),
                           notify=lambda e: None)
    try:
        reborn.create_boot_memory()
        assert reborn.zones["mem1"].virtio_mem.device.requested_size == 256 * MiB
    finally:
        reborn.close()
        vmm.vm = None


# --- vm.info: what the guest said about each DIMM ---------------------------------------------------
def guest_ost(controller, slot, event, status):
    """What the guest's ``Mnnn._OST(event, status)`` does through MOST."""
    controller.write(0x00, 4, slot)
    controller.write(0x04, 4, event)
    controller.write(0x08, 4, status)


def test_dimms_report_the_guests_ost_for_their_insertion():
    manager = MemoryManager(VmConfig.model_validate({"payload": {"kernel": __file__}, "memory": {
        "size": 256 * MiB, "hotplug_size": 1 * GiB}}).memory, RecordingMemslots(), Bus("mmio"),
        notify=lambda event: None)
    try:
        manager.create_boot_memory()
        for size in (384, 512, 640):
            manager.resize(size * MiB)
        c = manager.controller
        c.write(0x14, 1, MemoryHotplugController.INSERTING)        # selected slot 0: acked
        guest_ost(c, 0, 1, 0)                                      # the guest added dimm0
        guest_ost(c, 1, 1, 0x80)                                   # and failed to add dimm1
        guest_ost(c, 5, 3, 0)                                      # an empty slot: dropped
        dimms = manager.hotplug_info()["dimms"]
        assert [(d["id"], d["state"], d.get("ost_event"), d.get("ost_status")) for d in dimms] == [
            ("dimm0", "acknowledged", 1, 0), ("dimm1", "announced", 1, 0x80),
            ("dimm2", "announced", None, None)]
        assert not c.slots[5].enabled and c.slots[5].ost_event is None
    finally:
        manager.close()


def test_more_increases_than_slots_are_a_clear_500():
    vmm = Vmm()
    vmm.vm_create(VmConfig.model_validate({"payload": {"kernel": __file__}, "memory": {
        "size": 128 * MiB, "hotplug_size": 64 * GiB}}))
    mm = MemoryManager(vmm.config.memory, RecordingMemslots(), Bus("mmio"), notify=lambda e: None)
    mm.create_boot_memory()
    run_as_booted(vmm, BootedVm(memory=mm))
    try:
        for i in range(1, HOTPLUG_SLOTS + 1):
            vmm.vm_resize(VmResize(desired_ram=(i + 1) * 128 * MiB))
        with pytest.raises(ApiError) as e:
            vmm.vm_resize(VmResize(desired_ram=(HOTPLUG_SLOTS + 2) * 128 * MiB))
        assert e.value.status == 500
        assert f"all {HOTPLUG_SLOTS} slots of this boot are used" in e.value.messages[-1]
        assert vmm.config.memory.size == (HOTPLUG_SLOTS + 1) * 128 * MiB   # the last that worked
    finally:
        vmm.close()


def test_the_command_line_takes_memory_zones():
    from pych.cli.main import build_parser, config_from_args
    args = build_parser().parse_args([
        "--kernel", __file__, "--memory", "size=0,hotplug_method=virtio-mem",
        "--memory-zone", "id=mem0,size=256M",
        "--memory-zone", "id=mem1,size=0,hotplug_size=512M,hotplugged_size=128M"])
    zones = config_from_args(args).memory.zones
    assert [(z.id, z.size, z.hotplug_size, z.hotplugged_size) for z in zones] == [
        ("mem0", 256 * MiB, None, None), ("mem1", 0, 512 * MiB, 128 * MiB)]


def test_prefault_populates_the_zone_at_boot(manager):
    mm = manager([{"id": "lazy", "size": 8 * MiB}, {"id": "eager", "size": 8 * MiB,
                                                     "prefault": True}])
    assert os.fstat(mm.zones["lazy"].fd).st_blocks == 0
    assert os.fstat(mm.zones["eager"].fd).st_blocks * 512 >= 8 * MiB
