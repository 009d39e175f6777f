"""User-defined memory zones without KVM (``--memory size=0 --memory-zone ...``): each zone's
boot RAM and backing, the virtio-mem regions after it, and the command line
(../shared/notes/ch-hotplug-reference.md §4.2). Resizing a zone: test_resize.py."""

from __future__ import annotations

import os

import pytest

from pych.arch.x86_64 import boot, layout
from pych.config import ConfigError, VmConfig
from pych.devices.bus import Bus
from pych.memory.manager import MemoryManager

from .test_manager import FakeKvmVm

MiB, GiB = layout.MiB, layout.GiB


def zones_memory(zones, **fields):
    """A validated MemoryConfig with ``zones`` (dicts) and ``size=0``."""
    fields.setdefault("hotplug_method", "VirtioMem")
    return VmConfig.model_validate({"payload": {"kernel": __file__},
                                    "memory": {"size": 0, "zones": zones, **fields}}).memory


@pytest.fixture
def zones_manager():
    """A booted memory manager factory (``zones`` as dicts); closed after the test."""
    made = []

    def make(zones, **fields):
        mm = MemoryManager(zones_memory(zones, **fields), FakeKvmVm(), Bus("mmio"),
                           notify=lambda event: None)
        made.append(mm)
        mm.create_boot_memory()
        return mm

    yield make
    for mm in made:
        mm.close()


def test_each_zone_is_its_own_memfd_mapped_as_the_layout_says(zones_manager):
    mm = zones_manager([{"id": "mem0", "size": 2 * GiB}, {"id": "mem1", "size": 2 * GiB},
                        {"id": "mem2", "size": 0, "hotplug_size": 512 * MiB,
                         "hotplugged_size": 128 * MiB}])
    assert [(r.name, r.gpa, r.size) for r in mm.guest_memory.regions] == [
        ("ram0", 0, 2 * GiB), ("ram1", 2 * GiB, 1 * GiB), ("ram2", 4 * GiB, 1 * GiB),
        ("virtio-mem-mem2", 5 * GiB, 512 * MiB)]
    assert list(mm.kvm_vm.memslots.values()) == [(r.gpa, r.size) for r in mm.guest_memory.regions]
    assert [r.name for r in mm.zones["mem1"].regions] == ["ram1", "ram2"]
    # mem1's two pieces are one memfd: what the guest writes at 4 GiB is at offset 1 GiB
    mm.guest_memory.write(4 * GiB, b"zone")
    assert os.pread(mm.zones["mem1"].fd, 4, 1 * GiB) == b"zone"
    assert mm.zones["mem0"].fd != mm.zones["mem1"].fd and mm.zones["mem2"].fd == -1
    # boot RAM is in the e820 map, the virtio-mem region is not
    e820 = boot.e820_map(mm.guest_memory)
    assert [(e.addr, e.size) for e in e820 if e.type == boot.E820_RAM][-2:] == [
        (2 * GiB, 1 * GiB), (4 * GiB, 1 * GiB)]
    (zone,) = mm.virtio_mem_zones
    assert (zone.id, zone.device.name, zone.device.requested_size) == ("mem2", "mem2", 128 * MiB)
    assert mm.hotplug_window == (5 * GiB, 512 * MiB)
    assert mm.actual_size == 4 * GiB                  # nothing plugged yet
    assert layout.mmio64_window(*mm.hotplug_window)[0] == 6 * GiB


def test_several_virtio_mem_zones_and_zones_without_hotplug(zones_manager):
    mm = zones_manager([{"id": "a", "size": 256 * MiB, "hotplug_size": 256 * MiB},
                        {"id": "b", "size": 100 * MiB},
                        {"id": "c", "size": 0, "hotplug_size": 1 * GiB}])
    assert [(z.id, z.region.gpa, z.region.size) for z in mm.virtio_mem_zones] == [
        ("a", 4 * GiB, 256 * MiB), ("c", 4 * GiB + 256 * MiB, 1 * GiB)]
    assert mm.zones["b"].virtio_mem is None
    assert mm.hotplug_window == (4 * GiB, 256 * MiB + 1 * GiB)
    assert mm.hotplug_info()["virtio_mem"][1] == {
        "id": "c", "address": 4 * GiB + 256 * MiB, "size": 1 * GiB, "block_size": 2 * MiB,
        "requested_size": 0, "plugged_size": 0, "driver_active": False}


def test_zones_without_hotplug_have_no_hotplug_space(zones_manager):
    mm = zones_manager([{"id": "a", "size": 256 * MiB}], hotplug_method="Acpi")
    assert mm.hotplug_window == (4 * GiB, 0) and mm.hotplug_info() is None
    assert mm.hotplug_controller is None


def test_a_zone_can_be_backed_by_a_file_shared_or_private(zones_manager, tmp_path):
    shared, private = tmp_path / "shared", tmp_path / "private"
    for f in (shared, private):
        f.write_bytes(bytes(64 * MiB))
    mm = zones_manager([{"id": "s", "size": 64 * MiB, "file": str(shared), "shared": True},
                        {"id": "p", "size": 64 * MiB, "file": str(private)}])
    mm.guest_memory.write(0, b"to the file")
    mm.guest_memory.write(64 * MiB, b"to a private copy")
    mm.zones["s"].regions[0].mmap.flush()
    assert shared.read_bytes()[:11] == b"to the file"
    assert private.read_bytes()[:17] == bytes(17)


@pytest.mark.parametrize("zone, message", [
    ({"host_numa_node": 0}, "host_numa_node"),
    ({"file": "/nonexistent/pych"}, "cannot open the backing file"),
    ({"file": "/"}, "is a directory"),
])
def test_backings_pych_cannot_give_are_refused_with_one_line(zones_manager, zone, message):
    with pytest.raises(ValueError, match=message):
        zones_manager([{"id": "z", "size": 64 * MiB, **zone}])


def test_a_file_shorter_than_its_zone_is_refused(zones_manager, tmp_path):
    (tmp_path / "f").write_bytes(bytes(MiB))
    with pytest.raises(ValueError, match="has 1048576 bytes, fewer than"):
        zones_manager([{"id": "z", "size": 64 * MiB, "file": str(tmp_path / "f")}])


@pytest.mark.parametrize("zones, message", [
    ([{"id": "a", "size": 0}], "neither a size nor a hotplug_size"),
    ([{"id": "a", "size": 0, "hotplug_size": 128 * MiB}], "no boot RAM"),
])
def test_zones_must_give_the_guest_boot_ram(zones, message):
    config = VmConfig.model_validate({"payload": {"kernel": __file__}, "memory": {
        "size": 0, "hotplug_method": "VirtioMem", "zones": zones}})
    with pytest.raises(ConfigError, match=message):
        config.validate()


def test_the_command_line_takes_memory_zones():
    from pych.cli.main import build_parser, config_from_args
    args = build_parser().parse_args([
        "--kernel", __file__, "--memory", "size=0,hotplug_method=virtio-mem",
        "--memory-zone", "id=mem0,size=256M",
        "--memory-zone", "id=mem1,size=0,hotplug_size=512M,hotplugged_size=128M"])
    zones = config_from_args(args).memory.zones
    assert [(z.id, z.size, z.hotplug_size, z.hotplugged_size) for z in zones] == [
        ("mem0", 256 * MiB, None, None), ("mem1", 0, 512 * MiB, 128 * MiB)]


def test_prefault_populates_the_zone_at_boot(zones_manager):
    mm = zones_manager([{"id": "lazy", "size": 8 * MiB},
                        {"id": "eager", "size": 8 * MiB, "prefault": True}])
    assert os.fstat(mm.zones["lazy"].fd).st_blocks == 0
    assert os.fstat(mm.zones["eager"].fd).st_blocks * 512 >= 8 * MiB


def test_prefault_of_a_virtio_mem_region_populates_only_its_plugged_blocks():
    """``--restore prefault=on``: unplugged virtio-mem blocks stay without host memory."""
    from pych.memory.guest_memory import GuestMemory
    from pych.memory.zones import prefault
    from pych.snapshot.format import _allocated_chunks
    mem = GuestMemory()
    try:
        region = mem.add_region(1 << 32, 16 * MiB, name="virtio-mem-mem0")
        region.in_use = lambda: [(4 * MiB, 2 * MiB), (10 * MiB, 2 * MiB)]
        prefault(region, "--restore prefault=on")
        assert list(_allocated_chunks(region)) == [4 * MiB, 5 * MiB, 10 * MiB, 11 * MiB]
    finally:
        mem.close()
