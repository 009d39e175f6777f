"""VFIO passthrough without an IOMMU: the ABI bindings, and the kernel-facing code (container,
group, device, config space, BARs, MSI-X, DMA map, reset and release) run against
``FakeVfioKernel``, a fake VFIO layer answering the ioctls at the boundary pych's code uses
(``pych.devices.vfio.kernel.VfioKernel``). The device manager and VMM flows drive it as the
guest would. The test on real hardware is described in docs/vfio.md.
"""

from __future__ import annotations

import ctypes
import errno
import mmap
import os
import struct
from types import SimpleNamespace

import pytest

from pych.api.errors import status_of
from pych.errors import VmmError
from pych.arch.x86_64 import layout
from pych.config import DeviceConfig, VmConfig, VmRemoveDevice
from pych.config.kinds import BY_NAME
from pych.device_manager.manager import DeviceBackendError, DeviceManager, DeviceManagerError
from pych.devices.acpi import AcpiNotification
from pych.devices.bus import Bus
from pych.devices.pci.config import BAR0, COMMAND, Command
from pych.devices.vfio import bindings as b
from pych.devices.virtio.mem import Request, Response
from pych.memory.hotplug import MemoryHotplugController
from pych.memory.manager import MemoryManager
from pych.vmm import Vmm

from tests.support import machines
from tests.support.fakes import RecordingIoEvents, RecordingIrq, RecordingMemslots
from tests.support.machines import MMIO64, DeviceManagerMachine, vm_config

MiB, GiB = 1 << 20, 1 << 30
VFIO = BY_NAME["vfio"]
BDF = "0000:01:00.0"
GROUP = 7


# --- the ABI -----------------------------------------------------------------------------------
@pytest.mark.parametrize("struct_type", sorted(b.KERNEL_STRUCT_SIZES, key=lambda t: t.__name__),
                         ids=lambda t: t.__name__)
def test_struct_sizes_match_the_kernel_header(struct_type):
    assert ctypes.sizeof(struct_type) == b.KERNEL_STRUCT_SIZES[struct_type]


@pytest.mark.parametrize("name", sorted(b.KNOWN_REQUEST_VALUES))
def test_request_numbers_match_the_kernel_header_and_encode_no_size(name):
    computed, expected = b.KNOWN_REQUEST_VALUES[name]
    assert computed == expected, f"{name}: {computed:#x} != {expected:#x}"
    assert computed >> 16 == 0, "VFIO requests are _IO(): size and direction are 0 (argsz instead)"


# --- the fake VFIO layer ---------------------------------------------------------------------------
def fake_config_space() -> bytearray:
    """An Intel NIC-like function: BAR0 64-bit 16 KiB (MSI-X table at 0x2000, PBA at 0x3000),
    BAR2 32-bit 4 KiB, BAR4 an I/O BAR; capabilities PM 0x40 -> MSI 0x50 -> MSI-X 0x70 ->
    PCIe 0x90."""
    c = bytearray(256)
    struct.pack_into("<HH", c, 0, 0x8086, 0x10D3)
    struct.pack_into("<H", c, 0x06, 1 << 4)                          # capabilities list
    c[0x08], c[0x09], c[0x0A], c[0x0B] = 0x01, 0x00, 0x00, 0x02      # rev, prog-if, subclass, class
    struct.pack_into("<II", c, BAR0, 0x4, 0)                         # BAR0/1: 64-bit memory
    struct.pack_into("<I", c, BAR0 + 8, 0x0)                         # BAR2: 32-bit memory
    struct.pack_into("<I", c, BAR0 + 16, 0x1)                        # BAR4: I/O
    struct.pack_into("<HH", c, 0x2C, 0x8086, 0xA01F)
    c[0x34] = 0x40
    c[0x3D] = 1                                                      # INTA#
    c[0x40:0x42] = bytes((0x01, 0x50))
    c[0x50:0x52] = bytes((0x05, 0x70))
    c[0x70:0x72] = bytes((0x11, 0x90))
    struct.pack_into("<HII", c, 0x72, 3, 0x2000 | 0, 0x3000 | 0)     # 4 vectors, BIR 0
    c[0x90:0x92] = bytes((0x10, 0x00))
    c[0xA0] = 0x5A                                                   # a device register
    return c


REGION_SIZES = {0: 0x4000, 2: 0x1000, 4: 0x20, b.VFIO_PCI_CONFIG_REGION_INDEX: 256}


class FakeVfioKernel:
    """The host kernel's VFIO, faked at the ioctl boundary: one device ``BDF`` in group
    ``GROUP``; records what pych asked for and enforces the order the kernel needs
    (group attached before SET_IOMMU, IOMMU set before MAP_DMA, device fds closed before
    the group leaves the container)."""

    def __init__(self, *, has_vfio: bool = True, fail: dict[int, int] | None = None):
        self.has_vfio = has_vfio
        self.fail = fail or {}                       # request -> errno to answer
        self.fds: dict[int, str] = {}                # open fd -> what it is
        self._next_fd = 1000
        self.container_of: dict[int, int] = {}       # group fd -> container fd
        self.iommu: int | None = None
        self.dma: dict[int, tuple[int, int]] = {}    # iova -> (vaddr, size)
        self.resets = 0
        self.irq_sets: list[tuple[int, int, int, list[int]]] = []   # flags, index, count, fds
        self.config = fake_config_space()
        self.bars = {i: bytearray(size) for i, size in REGION_SIZES.items() if i < 6}
        self.mmaps: list[mmap.mmap] = []

    def _fd(self, what: str) -> int:
        self._next_fd += 1
        self.fds[self._next_fd] = what
        return self._next_fd

    def open(self, path: str) -> int:
        if not self.has_vfio:
            raise FileNotFoundError(errno.ENOENT, "No such file or directory", path)
        if path == "/dev/vfio/vfio":
            return self._fd("container")
        if path == f"/dev/vfio/{GROUP}":
            if "group" in self.fds.values():
                raise OSError(errno.EBUSY, "busy")
            return self._fd("group")
        raise FileNotFoundError(errno.ENOENT, "No such file or directory", path)

    def close(self, fd: int) -> None:
        what = self.fds.pop(fd)
        if what == "group":
            assert fd not in self.container_of, "group closed while still in the container"
            assert "device" not in self.fds.values(), "group closed before its device"

    def ioctl(self, fd: int, request: int, arg: int | bytearray = 0) -> int:
        if request in self.fail:
            raise OSError(self.fail[request], os.strerror(self.fail[request]))
        what = self.fds[fd]
        if request == b.VFIO_GET_API_VERSION:
            return b.VFIO_API_VERSION
        if request == b.VFIO_CHECK_EXTENSION:
            return int(arg == b.VFIO_TYPE1v2_IOMMU)
        if request == b.VFIO_GROUP_GET_STATUS:
            b.vfio_group_status.from_buffer(arg).flags = b.VFIO_GROUP_FLAGS_VIABLE
            return 0
        if request == b.VFIO_GROUP_SET_CONTAINER:
            self.container_of[fd] = int.from_bytes(arg, "little")
            assert self.fds[self.container_of[fd]] == "container"
            return 0
        if request == b.VFIO_SET_IOMMU:
            assert what == "container" and self.container_of, "SET_IOMMU needs a group attached"
            self.iommu = arg
            return 0
        if request == b.VFIO_IOMMU_MAP_DMA:
            m = b.vfio_iommu_type1_dma_map.from_buffer(arg)
            assert self.iommu == b.VFIO_TYPE1v2_IOMMU and m.argsz == 32
            assert m.flags == b.VFIO_DMA_MAP_FLAG_READ | b.VFIO_DMA_MAP_FLAG_WRITE
            self.dma[m.iova] = (m.vaddr, m.size)
            return 0
        if request == b.VFIO_IOMMU_UNMAP_DMA:
            u = b.vfio_iommu_type1_dma_unmap.from_buffer(arg)
            assert self.dma.pop(u.iova)[1] == u.size
            return 0
        if request == b.VFIO_GROUP_UNSET_CONTAINER:
            assert "device" not in self.fds.values(), "device fd still open"
            del self.container_of[fd]
            if not self.container_of:
                self.iommu = None
                self.dma.clear()
            return 0
        if request == b.VFIO_GROUP_GET_DEVICE_FD:
            assert what == "group" and fd in self.container_of
            if bytes(arg).rstrip(b"\0").decode() != BDF:
                raise OSError(errno.ENODEV, "no such device")
            return self._fd("device")
        assert what == "device", f"request {request:#x} on a {what} fd"
        if request == b.VFIO_DEVICE_GET_INFO:
            info = b.vfio_device_info.from_buffer(arg)
            info.flags = b.VFIO_DEVICE_FLAGS_PCI | b.VFIO_DEVICE_FLAGS_RESET
            info.num_regions, info.num_irqs = b.VFIO_PCI_NUM_REGIONS, 5
            return 0
        if request == b.VFIO_DEVICE_GET_REGION_INFO:
            r = b.vfio_region_info.from_buffer(arg)
            r.size = REGION_SIZES.get(r.index, 0)
            r.offset = r.index << 40
            r.flags = b.VFIO_REGION_INFO_FLAG_READ | b.VFIO_REGION_INFO_FLAG_WRITE
            if r.index < 6 and r.size:
                r.flags |= b.VFIO_REGION_INFO_FLAG_MMAP
            return 0
        if request == b.VFIO_DEVICE_GET_IRQ_INFO:
            irq = b.vfio_irq_info.from_buffer(arg)
            irq.count = 4 if irq.index == b.VFIO_PCI_MSIX_IRQ_INDEX else 0
            irq.flags = b.VFIO_IRQ_INFO_EVENTFD
            return 0
        if request == b.VFIO_DEVICE_SET_IRQS:
            s = b.vfio_irq_set.from_buffer(arg)
            assert s.argsz == len(arg) == 20 + 4 * s.count
            fds = list(struct.unpack_from(f"<{s.count}i", arg, 20))
            self.irq_sets.append((s.flags, s.index, s.count, fds))
            return 0
        if request == b.VFIO_DEVICE_RESET:
            self.resets += 1
            return 0
        raise AssertionError(f"unexpected request {request:#x}")

    def _region(self, offset: int, size: int) -> tuple[bytearray, int]:
        index, at = offset >> 40, offset & ((1 << 40) - 1)
        data = self.config if index == b.VFIO_PCI_CONFIG_REGION_INDEX else self.bars[index]
        assert at + size <= len(data)
        return data, at

    def pread(self, fd: int, size: int, offset: int) -> bytes:
        data, at = self._region(offset, size)
        return bytes(data[at:at + size])

    def pwrite(self, fd: int, data: bytes, offset: int) -> None:
        region, at = self._region(offset, len(data))
        region[at:at + len(data)] = data

    def mmap(self, fd: int, size: int, offset: int) -> mmap.mmap:
        assert self.fds[fd] == "device" and offset >> 40 < 6
        m = mmap.mmap(-1, size)
        self.mmaps.append(m)
        return m


class EventfdVector:
    """An MSI vector backed by an eventfd, as KVM's (the fd VFIO signals)."""

    def __init__(self):
        self.fd = os.eventfd(0, os.EFD_CLOEXEC | os.EFD_NONBLOCK)
        self.updates: list[tuple[int, int, bool]] = []

    def update(self, address, data, masked):
        self.updates.append((address, data, masked))

    def trigger(self):
        os.eventfd_write(self.fd, 1)


class EventfdMsi:
    def __init__(self):
        self.groups = []

    def create_msix_group(self, count):
        group = SimpleNamespace(vectors=[EventfdVector() for _ in range(count)], released=False)

        def release():
            assert not group.released
            group.released = True
            for v in group.vectors:
                os.close(v.fd)
        group.release = release
        self.groups.append(group)
        return group


def sysfs_device(root, driver: str = "vfio-pci", group: int | None = GROUP):
    """A sysfs PCI device directory like /sys/bus/pci/devices/0000:01:00.0."""
    dev = root / "devices" / BDF
    dev.mkdir(parents=True)
    (dev / "config").write_bytes(bytes(fake_config_space()))
    (dev / "vendor").write_text("0x8086\n")
    (root / "drivers" / driver).mkdir(parents=True)
    (dev / "driver").symlink_to(root / "drivers" / driver)
    if group is not None:
        (root / "iommu_groups" / str(group)).mkdir(parents=True)
        (dev / "iommu_group").symlink_to(root / "iommu_groups" / str(group))
    return str(dev) + "/"


class Machine(DeviceManagerMachine):
    """A DeviceManager (console off, no other devices) with the fake VFIO kernel, MSI-X vectors
    backed by eventfds (what VFIO signals), recorded memory slots and RAM above 4 GiB too."""

    def __init__(self, kernel: FakeVfioKernel, config: VmConfig | None = None):
        self.kernel = kernel
        super().__init__(config or vm_config(), ram=[(0, 8 * MiB), (1 << 32, 4 * MiB)],
                         msi=EventfdMsi(), memslots=RecordingMemslots(), vfio_kernel=kernel)

    def cfg_read(self, slot, offset, size=4):
        return self.dm.pci.config_read(slot, 0, offset, size)

    def cfg_write(self, slot, offset, size, value):
        self.dm.pci.config_write(slot, 0, offset, size, value)


@pytest.fixture
def kernel():
    return FakeVfioKernel()


@pytest.fixture
def machine(kernel):
    m = Machine(kernel)
    yield m
    m.close()


@pytest.fixture
def path(tmp_path):
    return sysfs_device(tmp_path)


# --- the device manager on the fake kernel ---------------------------------------------------------
def test_fake_vfio_kernel_add_sets_up_container_group_dma_and_a_reset_device(machine, kernel, path):
    added = machine.dm.hotplug(VFIO, DeviceConfig(path=path))
    assert (added.id, added.bdf) == ("_vfio0", "0000:00:02.0")
    assert sorted(kernel.fds.values()) == ["container", "device", "group"]
    assert kernel.iommu == b.VFIO_TYPE1v2_IOMMU
    assert kernel.dma == {r.gpa: (r.host_addr, r.size) for r in machine.mem.regions}
    assert kernel.resets == 1
    # announced only now, and its own PCI node in the device tree
    assert machine.notified == [AcpiNotification.PCI]
    assert machine.scan() == (1 << 2, 0)
    assert machine.dm.device_tree()["_vfio0"] == {"id": "_vfio0", "resources": [],
                                                  "children": [], "pci_bdf": "0000:00:02.0"}


def test_fake_vfio_kernel_config_space_passes_through_with_emulated_bars_and_chain(
        machine, kernel, path):
    machine.dm.hotplug(VFIO, DeviceConfig(path=path))
    slot = 2
    assert machine.cfg_read(slot, 0x00) == 0x10D3_8086
    assert machine.cfg_read(slot, 0x2C) == 0xA01F_8086
    assert machine.cfg_read(slot, BAR0) & 0xF == 0x4                  # 64-bit memory
    bar0 = machine.cfg_read(slot, BAR0) & ~0xF | machine.cfg_read(slot, BAR0 + 4) << 32
    assert MMIO64[0] <= bar0 < MMIO64[0] + MMIO64[1]                  # placed by pych
    bar2 = machine.cfg_read(slot, BAR0 + 8)
    assert bar2 and bar2 & 0xFFF == 0
    assert machine.cfg_read(slot, BAR0 + 16) == 0                     # I/O BAR hidden
    machine.cfg_write(slot, BAR0 + 8, 4, 0xFFFF_FFFF)                 # sizing, emulated
    assert machine.cfg_read(slot, BAR0 + 8) == 0xFFFF_F000
    assert struct.unpack_from("<I", kernel.config, BAR0 + 8)[0] == 0  # never reaches the device
    machine.cfg_write(slot, BAR0 + 8, 4, bar2)
    assert machine.cfg_read(slot, 0x3C) >> 8 & 0xFF == 0              # no INTx pin
    # the chain skips MSI: PM -> MSI-X -> PCIe
    assert machine.cfg_read(slot, 0x34, 1) == 0x40
    assert machine.cfg_read(slot, 0x40, 2) == 0x7001
    assert machine.cfg_read(slot, 0x70, 2) == 0x9011
    assert machine.cfg_read(slot, 0x72, 2) & 0x7FF == 3               # 4 vectors
    assert machine.cfg_read(slot, 0x74) == 0x2000 and machine.cfg_read(slot, 0x78) == 0x3000
    machine.cfg_write(slot, 0xA0, 1, 0xA5)                            # passthrough register
    assert kernel.config[0xA0] == 0xA5 and machine.cfg_read(slot, 0xA0, 1) == 0xA5
    assert machine.cfg_read(slot, 0x100) == 0                         # no extended caps

    machine.cfg_write(slot, COMMAND, 2, Command.MEMORY_SPACE | Command.BUS_MASTER)
    assert struct.unpack_from("<H", kernel.config, COMMAND)[0] == 6  # reached the device
    (gpa, size, host_addr), = machine.memslots.slots.values()        # BAR2 only: BAR0 has MSI-X
    assert (gpa, size) == (bar2, 0x1000)
    assert host_addr == ctypes.addressof(ctypes.c_char.from_buffer(kernel.mmaps[0]))
    machine.mmio.write(bar0 + 0x10, 4, 0xCAFE)                        # trapped BAR0 register
    assert kernel.bars[0][0x10:0x14] == (0xCAFE).to_bytes(4, "little")
    assert machine.mmio.read(bar0 + 0x10, 4) == 0xCAFE


def test_fake_vfio_kernel_msix_enable_hands_the_vector_eventfds_to_vfio(machine, kernel, path):
    machine.dm.hotplug(VFIO, DeviceConfig(path=path))
    slot, msix = 2, 0x70
    machine.cfg_write(slot, COMMAND, 2, Command.MEMORY_SPACE)
    bar0 = machine.cfg_read(slot, BAR0) & ~0xF | machine.cfg_read(slot, BAR0 + 4) << 32
    entry = bar0 + 0x2000 + 16                                        # vector 1
    machine.mmio.write(entry, 4, 0xFEE0_0000)
    machine.mmio.write(entry + 8, 4, 0x41)
    machine.mmio.write(entry + 12, 4, 0)                              # unmask
    assert kernel.bars[0][0x2000:0x2020] == bytes(32)                 # the table is emulated
    assert machine.mmio.read(entry + 8, 4) == 0x41
    machine.cfg_write(slot, msix + 2, 2, 1 << 15)                     # MSI-X enable
    vectors = machine.msi.groups[-1].vectors
    assert kernel.irq_sets == [(b.VFIO_IRQ_SET_DATA_EVENTFD | b.VFIO_IRQ_SET_ACTION_TRIGGER,
                                b.VFIO_PCI_MSIX_IRQ_INDEX, 4, [v.fd for v in vectors])]
    assert vectors[1].updates[-1] == (0xFEE0_0000, 0x41, False)
    assert machine.cfg_read(slot, msix + 2, 2) == 1 << 15 | 3
    machine.cfg_write(slot, msix + 2, 2, 0)                           # disable
    assert kernel.irq_sets[-1] == (b.VFIO_IRQ_SET_DATA_NONE | b.VFIO_IRQ_SET_ACTION_TRIGGER,
                                   b.VFIO_PCI_MSIX_IRQ_INDEX, 0, [])


def test_fake_vfio_kernel_eject_releases_the_device_and_the_container_drops_dma(
        machine, kernel, path):
    machine.dm.hotplug(VFIO, DeviceConfig(path=path))
    machine.cfg_write(2, COMMAND, 2, Command.MEMORY_SPACE)
    machine.cfg_write(2, 0x72, 2, 1 << 15)
    machine.scan()
    assert machine.dm.remove_device("_vfio0") == "_vfio0"
    assert machine.scan() == (0, 1 << 2)
    assert "device" in kernel.fds.values()                            # until the guest ejects
    machine.eject(2)
    assert "_vfio0" not in machine.dm.device_tree() and machine.dm.pci.device(2) is None
    assert kernel.irq_sets[-1][2] == 0                                # MSI-X handed back
    assert machine.memslots.slots == {} and kernel.dma == {}
    assert kernel.resets == 2                                         # on add and on release
    assert list(kernel.fds.values()) == ["container"] and kernel.container_of == {}
    assert machine.msi.groups[-1].released
    # the slot and id are free again; the group re-attaches and RAM is mapped again
    assert machine.dm.hotplug(VFIO, DeviceConfig(path=path, id="_vfio0")).bdf == "0000:00:02.0"
    assert len(kernel.dma) == len(machine.mem.regions)
    machine.dm.close()
    assert kernel.fds == {}


def test_fake_vfio_kernel_memory_hot_added_later_is_dma_mapped(machine, kernel, path):
    machine.dm.hotplug(VFIO, DeviceConfig(path=path))
    dimm = machine.mem.add_region(1 << 33, 128 * MiB, name="dimm0")
    machine.dm.memory_region_added(dimm)
    assert kernel.dma[1 << 33] == (dimm.host_addr, 128 * MiB)


def test_fake_vfio_kernel_failed_add_leaves_nothing_behind(machine, kernel, path):
    kernel.fail[b.VFIO_DEVICE_GET_IRQ_INFO] = errno.EIO
    groups = len(machine.msi.groups)
    with pytest.raises(DeviceManagerError, match="_vfio0: VFIO MSI-X IRQ info failed: "):
        machine.dm.hotplug(VFIO, DeviceConfig(path=path))
    assert list(kernel.fds.values()) == ["container"] and kernel.dma == {}
    assert kernel.mmaps == [] and len(machine.msi.groups) == groups
    assert "_vfio0" not in machine.dm.device_tree() and machine.notified == []
    del kernel.fail[b.VFIO_DEVICE_GET_IRQ_INFO]
    assert machine.dm.hotplug(VFIO, DeviceConfig(path=path)).id == "_vfio0"     # id not consumed


def test_fake_vfio_kernel_boot_device_comes_after_the_virtio_devices(kernel, path):
    m = Machine(kernel, vm_config(disks=[{"path": "/dev/null", "readonly": True}],
                                  devices=[{"path": path}]))
    try:
        # ids from the one shared counter: _disk0, then _vfio1
        assert m.dm.device_tree()["_vfio1"]["pci_bdf"] == "0000:00:03.0"
        assert m.dm.config.devices[0].id == "_vfio1"
    finally:
        m.close()


# --- errors: one clear line ---------------------------------------------------------------------
@pytest.mark.parametrize("setup, message", [
    (lambda root: str(root), "is not a PCI device in sysfs"),
    (lambda root: sysfs_device(root, driver="e1000e"), f"{BDF} is bound to e1000e, not vfio-pci"),
    (lambda root: sysfs_device(root, group=None), f"{BDF} has no IOMMU group"),
])
def test_a_path_that_is_not_a_vfio_device_is_refused_with_one_line(machine, kernel, tmp_path,
                                                                   setup, message):
    with pytest.raises(DeviceBackendError, match=message) as e:
        machine.dm.hotplug(VFIO, DeviceConfig(path=setup(tmp_path)))
    assert "\n" not in str(e.value)
    assert "_vfio0" not in machine.dm.device_tree() and set(kernel.fds.values()) <= {"container"}


def test_a_host_without_dev_vfio_is_one_clear_line(tmp_path, path):
    m = Machine(FakeVfioKernel(has_vfio=False))
    try:
        with pytest.raises(DeviceBackendError) as e:
            m.dm.hotplug(VFIO, DeviceConfig(path=path))
        assert str(e.value) == ("VFIO is not available on this host: /dev/vfio/vfio does not "
                                "exist (it needs an IOMMU and the vfio-pci module)")
    finally:
        m.close()


@pytest.fixture
def vmm():
    vmm = Vmm()
    vmm.vm_create(vm_config())
    yield vmm
    if vmm.vm is not None:
        vmm.vm.devices.close()
        vmm.vm.guest_memory.close()


def boot_fake(vmm, kernel):
    return machines.boot_fake(vmm, Machine(kernel, vmm.config))


def test_vm_add_device_answers_400_for_a_bad_path_and_200_with_the_bdf(vmm, kernel, tmp_path):
    assert vmm.vm_add_device(DeviceConfig(path="/cold/add", id="cold"), []) is None  # 204
    assert [d.path for d in vmm.config.devices] == ["/cold/add"]
    vmm.vm_remove_device(VmRemoveDevice(id="cold"))
    boot_fake(vmm, kernel)
    with pytest.raises(VmmError) as e:
        vmm.vm_add_device(DeviceConfig(path=str(tmp_path / "nothing")), [])
    assert status_of(e.value) == 400 and len(e.value.messages) == 2
    info = vmm.vm_add_device(DeviceConfig(path=sysfs_device(tmp_path)), [])
    assert info.model_dump() == {"id": "_vfio0", "bdf": "0000:00:02.0"}
    assert [d.id for d in vmm.config.devices] == ["_vfio0"]
    vmm.vm_remove_device(VmRemoveDevice(id="_vfio0"))
    assert vmm.config.devices is None


def test_vm_add_device_refuses_cdev_fds_and_closes_them(vmm):
    r, w = os.pipe()
    with pytest.raises(VmmError) as e:
        vmm.vm_add_device(DeviceConfig(path="/x"), [r, w])
    assert status_of(e.value) == 400 and "iommufd" in e.value.messages[1]
    for fd in (r, w):
        with pytest.raises(OSError):
            os.fstat(fd)


# --- guest RAM that goes away: DIMM ejects and virtio-mem unplugs unmap it first --------------------
class MemoryMachine:
    """A MemoryManager and a DeviceManager wired as ``pych.vm.Vm`` wires them (virtio-mem
    devices on the bus, DMA ranges, region and block listeners), with the fake VFIO kernel."""

    def __init__(self, kernel: FakeVfioKernel, memory: dict):
        self.kernel = kernel
        config = vm_config(memory=memory)
        self.mmio = Bus("mmio")
        self.memslots = RecordingMemslots()
        self.memory = MemoryManager(config.memory, self.memslots, self.mmio,
                                    notify=lambda event: None)
        self.mem = self.memory.create_boot_memory()
        self.dm = DeviceManager(config, self.mem, self.mmio, Bus("pio"), msi=EventfdMsi(),
                                ioevents=RecordingIoEvents(), irq_line=lambda gsi: RecordingIrq(),
                                mmio64=layout.mmio64_window(*self.memory.hotplug_window),
                                notify=lambda event: None, memslots=self.memslots,
                                virtio_mem=self.memory.virtio_mem_zones,
                                dma_ranges=self.memory.dma_ranges)
        self.dm.vfio_kernel = kernel
        self.dm.create_boot_devices()
        self.memory.add_region_listener(self.dm.memory_region_added,
                                        self.dm.memory_region_removed)
        self.memory.add_block_listener(self.dm.dma_map, self.dm.dma_unmap)

    def close(self):
        self.dm.close()
        self.memory.close()


@pytest.fixture
def memory_machine(kernel):
    made = []

    def make(**memory):
        m = MemoryMachine(kernel, memory)
        made.append(m)
        return m

    yield make
    for m in made:
        m.close()


def test_an_ejected_dimm_is_unmapped_from_the_container_before_it_is_freed(memory_machine,
                                                                          kernel, path):
    m = memory_machine(size=256 * MiB, hotplug_size=1 * GiB)
    m.dm.hotplug(VFIO, DeviceConfig(path=path))
    for size in (384, 512):                                     # two 128 MiB DIMMs
        m.memory.resize(size * MiB)
    dimm1 = 4 * GiB + 128 * MiB
    assert sorted(kernel.dma) == [0, 4 * GiB, dimm1]
    host_addr = kernel.dma[dimm1][0]
    unmapped_first = []
    remove_memory = m.memslots.remove_memory

    def remove_memory_after_unmap(slot, gpa):
        unmapped_first.append(gpa not in kernel.dma)           # the IOMMU let go first
        remove_memory(slot, gpa)

    m.memslots.remove_memory = remove_memory_after_unmap
    m.memory.resize(384 * MiB)                                  # the guest is asked for dimm1
    m.mmio.write(layout.ACPI_MEM_HOTPLUG_ADDR, 4, 1)            # and ejects it (MEJC)
    m.mmio.write(layout.ACPI_MEM_HOTPLUG_ADDR + 0x14, 1, MemoryHotplugController.EJECT)
    assert unmapped_first == [True]
    assert sorted(kernel.dma) == [0, 4 * GiB]                   # the rest stays mapped
    assert all(addr != host_addr for addr, _ in kernel.dma.values())
    m.memory.resize(512 * MiB)                                  # plugged again: mapped again
    assert sorted(kernel.dma) == [0, 4 * GiB, dimm1]


def test_virtio_mem_blocks_are_mapped_as_plugged_and_unmapped_before_the_discard(
        memory_machine, kernel, path):
    m = memory_machine(size=256 * MiB, hotplug_method="VirtioMem", hotplug_size=512 * MiB,
                       hotplugged_size=16 * MiB)
    (zone,) = m.memory.virtio_mem_zones
    base, block = zone.region.gpa, 2 * MiB
    assert zone.device.request(Request.PLUG, base, 2)[0] == Response.ACK   # before VFIO
    m.dm.hotplug(VFIO, DeviceConfig(path=path))
    # boot RAM and the plugged blocks, block by block; not the rest of the region
    assert kernel.dma == {0: (m.mem.regions[0].host_addr, 256 * MiB),
                          base: (zone.region.host_addr, block),
                          base + block: (zone.region.host_addr + block, block)}
    assert zone.device.request(Request.PLUG, base + 8 * block, 3)[0] == Response.ACK
    assert sorted(kernel.dma)[3:] == [base + 8 * block, base + 9 * block, base + 10 * block]
    assert kernel.dma[base + 9 * block] == (zone.region.host_addr + 9 * block, block)

    zone.region.mmap[9 * block:9 * block + 4] = b"data"
    seen = []
    discard = zone.device._discard

    def discard_after_unmap(mask):
        seen.append(sorted(kernel.dma))
        discard(mask)

    zone.device._discard = discard_after_unmap
    assert zone.device.request(Request.UNPLUG, base + 8 * block, 2)[0] == Response.ACK
    assert seen == [[0, base, base + block, base + 10 * block]]     # unmapped, then discarded
    assert zone.region.mmap[9 * block:9 * block + 4] == bytes(4)
    assert zone.device.request(Request.UNPLUG_ALL)[0] == Response.ACK
    assert sorted(kernel.dma) == [0]


def test_mapping_twice_or_unmapping_what_is_not_mapped_does_nothing(machine, kernel, path):
    """A virtio-mem block can be plugged while the first group attaches (the attach maps it
    from ``dma_ranges``, then the plug listener maps it again): the container absorbs it."""
    machine.dm.hotplug(VFIO, DeviceConfig(path=path))
    dimm = machine.mem.add_region(1 << 33, 128 * MiB, name="dimm0")
    machine.dm.memory_region_added(dimm)
    machine.dm.dma_map(dimm)
    assert kernel.dma[1 << 33] == (dimm.host_addr, 128 * MiB)
    machine.dm.memory_region_removed(dimm)
    machine.dm.dma_unmap(dimm)
    assert 1 << 33 not in kernel.dma and len(kernel.dma) == 2


def test_unmapping_part_of_a_mapping_is_refused_and_logged(machine, kernel, path, caplog):
    machine.dm.hotplug(VFIO, DeviceConfig(path=path))
    half = SimpleNamespace(gpa=0, size=4 * MiB, host_addr=0, name="half of ram0")
    machine.dm.dma_unmap(half)
    assert 0 in kernel.dma and "covers only part of the DMA mapping" in caplog.text
