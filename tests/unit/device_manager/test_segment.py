"""PCI segments without KVM (``--platform num_pci_segments=N``): how the MMIO windows are
carved (the reference's ``create_mmio_allocators``), each segment's bus, ECAM window, BARs
and slots, devices placed by ``pci_segment`` at boot and hot plug, and hot plug and removal
through PHPR's segment selector, played through the MMIO bus as the AML does it; the MCFG
with one entry per segment; and the DSDT's host bridges compiled with iasl."""

from __future__ import annotations

import re
import struct

import pytest

from pych.acpi import tables
from pych.arch.x86_64 import layout
from pych.config import DiskConfig, NetConfig
from pych.config.kinds import BY_NAME
from pych.device_manager.manager import DeviceManagerError
from pych.devices.acpi import AcpiNotification
from pych.devices.pci.bus import PciDeviceIdReserved

from tests.support.machines import DeviceManagerMachine, vm_config
from tests.unit.acpi.test_iasl import compile_asl, disassemble, namespace

GiB, MiB = 1 << 30, 1 << 20
MMIO64 = (64 * GiB, layout.MMIO64_WINDOW_SIZE)        # as pych.vm gives it: 64 GiB
DISK, NET = BY_NAME["disk"], BY_NAME["net"]
VIRTIO_BLK, VIRTIO_NET = 0x1042_1AF4, 0x1041_1AF4


# --- the windows ----------------------------------------------------------------------------
def test_sixteen_segments_share_the_windows_equally():
    mem32 = layout.pci_segment_windows(layout.MEM_32BIT_DEVICES_START,
                                       layout.MEM_32BIT_DEVICES_SIZE, [1] * 16,
                                       layout.PCI_SEGMENT_MMIO32_ALIGNMENT)
    assert mem32 == [(0xC000_0000 + s * 40 * MiB, 40 * MiB) for s in range(16)]
    mem64 = layout.pci_segment_windows(*MMIO64, [1] * 16, layout.PCI_SEGMENT_MMIO64_ALIGNMENT)
    assert mem64 == [(MMIO64[0] + s * 4 * GiB, 4 * GiB) for s in range(16)]
    assert layout.MAX_PCI_SEGMENTS == 16


def test_weights_and_the_last_segment_takes_the_rest():
    """The reference's rule: a unit of size / total weight rounded down to the alignment,
    shares of weight units, and the last segment up to the window's end."""
    assert layout.pci_segment_windows(0, 100, [1, 2, 1], 8) == [(0, 24), (24, 48), (72, 28)]
    with pytest.raises(ValueError, match="PCI segment 0 would get no MMIO space"):
        layout.pci_segment_windows(0, 10 * GiB, [1, 1, 1], 4 * GiB)
    assert layout.pci_segment_windows(0, 10 * GiB, [1], 4 * GiB) == [(0, 10 * GiB)]


# --- devices on segments ------------------------------------------------------------------------
@pytest.fixture
def images(tmp_path):
    paths = []
    for i in range(3):
        path = tmp_path / f"disk{i}.raw"
        path.write_bytes(bytes([i]) * MiB)
        paths.append(str(path))
    return paths


@pytest.fixture
def machine(images):
    """16 segments, the boot disk on segment 1 (the rng stays on segment 0, slot 1)."""
    m = DeviceManagerMachine(vm_config(platform={"num_pci_segments": 16},
                                       disks=[{"path": images[0], "pci_segment": 1}]),
                             mmio64=MMIO64)
    yield m
    m.close()


def ecam_read(machine, segment: int, slot: int, offset: int = 0) -> int:
    return machine.mmio.read(layout.ecam_base(segment) + (slot << 15) + offset, 4)


def test_each_segment_has_its_bus_ecam_window_and_mmio_shares(machine):
    dm = machine.dm
    assert [s.id for s in dm.segments] == list(range(16))
    assert dm.device_tree()["_virtio-pci-_disk0"]["pci_bdf"] == "0001:00:00.0"
    assert dm.device_tree()["_virtio-pci-__rng"]["pci_bdf"] == "0000:00:01.0"
    # ECAM: the host bridge on segment 0 only; segment 1's first device takes slot 0
    assert ecam_read(machine, 0, 0) == 0x0D57_8086
    assert ecam_read(machine, 1, 0) == VIRTIO_BLK
    assert ecam_read(machine, 15, 0) == 0xFFFF_FFFF
    assert ecam_read(machine, 0, 1) != 0xFFFF_FFFF and ecam_read(machine, 1, 1) == 0xFFFF_FFFF
    # the legacy ports reach segment 0 only
    machine.pio.write(layout.PCI_CONFIG_IO_PORT, 4, 0x8000_0000)
    assert machine.pio.read(layout.PCI_CONFIG_IO_PORT + 4, 4) == 0x0D57_8086
    # a boot disk off segment 0 gets a 64-bit BAR (the reference's rule), in its segment's share
    disk = dm.segments[1].bus.device(0)
    assert disk.config.bars[0].is_64bit
    window = dm.segments[1].mem64_window
    assert window == (MMIO64[0] + 4 * GiB, 4 * GiB)
    assert window.base <= disk.config.bar_address(0) <= window.last
    assert dm.segments[15].mem32_window == (0xC000_0000 + 15 * 40 * MiB, 40 * MiB)


def test_slot_0_is_reserved_on_segment_0_only(machine):
    with pytest.raises(PciDeviceIdReserved):
        machine.dm.segments[0].bus.reserve_slot(0)
    machine.dm.segments[15].bus.reserve_slot(0)


def test_hot_plug_and_removal_on_segment_15_go_through_pseg(machine, images):
    dm = machine.dm
    first = dm.hotplug(DISK, DiskConfig(path=images[1], pci_segment=15))
    second = dm.hotplug(DISK, DiskConfig(path=images[2], pci_segment=15, pci_device_id=5))
    assert (first.id, first.bdf, second.id, second.bdf) == (
        "_disk1", "000f:00:00.0", "_disk2", "000f:00:05.0")
    assert machine.notified == [AcpiNotification.PCI] * 2
    assert machine.scan(0) == (0, 0)                      # nothing for segment 0 ...
    assert machine.scan(15) == (1 << 0 | 1 << 5, 0)       # ... PCIU of segment 15
    assert ecam_read(machine, 15, 0) == VIRTIO_BLK and ecam_read(machine, 15, 5) == VIRTIO_BLK
    bar = dm.segments[15].bus.device(0).config.bar_address(0)
    assert dm.segments[15].mem64_window.base <= bar <= dm.segments[15].mem64_window.last
    assert dm.device_tree()["_virtio-pci-_disk1"]["pci_bdf"] == "000f:00:00.0"

    ejected = []
    dm.remove_device("_disk1", on_ejected=lambda *a: ejected.append(a))
    assert machine.scan(0) == (0, 0)
    assert machine.scan(15) == (0, 1 << 0)
    machine.eject(0, segment=0)                           # segment 0's slot 0: not pending
    assert ejected == [] and dm.segments[15].bus.device(0) is not None
    machine.eject(0, segment=15)
    assert ejected == [("_disk1", "000f:00:00.0")]
    assert dm.segments[15].bus.device(0) is None and ecam_read(machine, 15, 0) == 0xFFFF_FFFF
    assert "_disk1" not in dm.device_tree() and dm.pending_removal() == []
    again = dm.hotplug(DISK, DiskConfig(path=images[1], pci_segment=15))
    assert again.bdf == "000f:00:00.0"                    # the slot is free again


def test_a_segment_without_room_refuses_and_leaves_nothing(machine, images):
    dm = machine.dm
    for slot in range(32):
        if slot != 7:
            dm.segments[3].bus.reserve_slot(slot)
    assert dm.hotplug(DISK, DiskConfig(path=images[1], pci_segment=3)).bdf == "0003:00:07.0"
    with pytest.raises(DeviceManagerError, match="available device slot"):
        dm.hotplug(DISK, DiskConfig(path=images[2], pci_segment=3))
    assert machine.scan(3) == (1 << 7, 0)


# --- ACPI: MCFG and the DSDT -------------------------------------------------------------------
def test_mcfg_has_one_ecam_window_per_segment(tmp_path):
    mcfg = tables.mcfg(16)
    assert len(mcfg) == 36 + 8 + 16 * 16
    entries = [struct.unpack_from("<QHBB4x", mcfg, 44 + 16 * s) for s in range(16)]
    assert entries == [(0xE800_0000 + s * MiB, s, 0, 0) for s in range(16)]
    dsl = disassemble(mcfg, "mcfg", tmp_path)
    assert "Incorrect checksum" not in dsl
    assert re.findall(r"Segment Group Number : (\w+)", dsl) == [f"{s:04X}" for s in range(16)]
    assert "Base Address : 00000000E8F00000" in dsl


def _device_text(dsl: str, name: str) -> str:
    """The ASL of ``Device (name)`` up to the next top-level device."""
    start = dsl.index(f"Device (\\{name})")
    following = re.search(r"\n    Device \(|\n    Scope \(|\n}", dsl[start + 1:])
    return dsl[start:start + 1 + following.start()] if following else dsl[start:]


def test_dsdt_has_a_host_bridge_per_segment(machine, tmp_path):
    dsdt = tables.dsdt(machine.dm.to_aml())
    dsl = disassemble(dsdt, "dsdt", tmp_path)
    assert "External (" not in dsl
    for s in range(16):
        assert f"Device (\\_SB.PC{s:02X})" in dsl
        assert f"\\_SB.PC{s:02X}.PCNT ()" in dsl                   # PSCN scans every segment
    pc00, pc0f = _device_text(dsl, "_SB.PC00"), _device_text(dsl, "_SB.PC0F")
    assert "Name (_SEG, 0x0F)" in pc0f and "Name (_BBN, Zero)" in pc0f
    assert "Name (_SEG, Zero)" in pc00
    assert "0xE8F00000" in pc0f and "0xE8000000" in pc00       # each its own ECAM window
    assert "IO (Decode16" in pc00 and "IO (Decode16" not in pc0f   # 0xCF8 on segment 0 only
    assert "WordIO" in pc00 and "WordIO" not in pc0f
    base32, base64 = 0xC000_0000 + 15 * 40 * MiB, MMIO64[0] + 15 * 4 * GiB
    assert f"0x{base32:08X}" in pc0f and f"0x{base32 + 40 * MiB - 1:08X}" in pc0f
    assert f"0x{base64:016X}" in pc0f and f"0x{base64 + 4 * GiB - 1:016X}" in pc0f
    assert "\\_SB.PHPR.PSEG = _SEG" in pc0f and pc0f.count("\\_SB.PHPR.PCEJ (_SUN, _SEG)") == 32
    mbrd = _device_text(dsl, "_SB.MBRD")
    assert mbrd.count("Memory32Fixed") == 16 and "0xE8F00000" in mbrd
    compile_asl("dsdt.dsl", tmp_path, "-oa", "-p", "recompiled")
    assert (tmp_path / "recompiled.aml").read_bytes()[36:] == dsdt[36:]
    compile_asl("dsdt.dsl", tmp_path, "-ln", "-p", "names")
    objects = namespace((tmp_path / "names.nsp").read_text())
    for name, kind in (("_SEG", "Integer"), ("_BBN", "Integer"), ("_CRS", "Buffer"),
                       ("_PRT", "Package"), ("S000", "Device"), ("S031", "Device"),
                       ("PCNT", "Method"), ("DVNT", "Method")):
        assert objects.get(f"\\_SB_.PC0F.{name}") == kind, name


def test_aperture_weights_of_pci_segments_shape_the_windows():
    """``--pci-segment pci_segment=1,mmio32_aperture_weight=2,mmio64_aperture_weight=3`` with
    3 segments: segment 1 gets 2 of 4 units of the hole and 3 of 5 units of the 64-bit window
    (4 GiB aligned: 12 GiB); the last segment takes the rest."""
    m = DeviceManagerMachine(vm_config(platform={"num_pci_segments": 3}, pci_segments=[
        {"pci_segment": 1, "mmio32_aperture_weight": 2, "mmio64_aperture_weight": 3}]),
        mmio64=MMIO64)
    try:
        windows = [(s.mem32_window, s.mem64_window) for s in m.dm.segments]
    finally:
        m.close()
    assert [w[0] for w in windows] == [(0xC000_0000, 160 * MiB), (0xCA00_0000, 320 * MiB),
                                       (0xDE00_0000, 160 * MiB)]
    assert [w[1] for w in windows] == [(MMIO64[0], 12 * GiB), (MMIO64[0] + 12 * GiB, 36 * GiB),
                                       (MMIO64[0] + 48 * GiB, 16 * GiB)]


def test_weights_beyond_the_window_are_refused():
    from pych.config import ConfigError

    config = vm_config(platform={"num_pci_segments": 2},
                       pci_segments=[{"pci_segment": 1, "mmio64_aperture_weight": 16}])
    with pytest.raises(ConfigError, match=r"pci_segments: mmio64_aperture_weight of segment 1 "
                       r"is not supported by pych: the weights of the 2 segments add up to 17"):
        config.validate()
