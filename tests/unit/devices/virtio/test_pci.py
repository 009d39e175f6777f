"""The virtio-pci transport driven the way Linux's virtio_pci_modern does it, through
ECAM config accesses and BAR MMIO on a real Bus, with recording fakes for KVM."""

import os
import struct

import pytest

from pych.arch.x86_64 import layout
from pych.devices.bus import Bus
from pych.devices.pci import AddressAllocator, PciBus, PciEcam
from pych.devices.pci.config import BAR0, CAPABILITIES_POINTER, COMMAND, Command
from pych.devices.pci.msix import MSIX_CONTROL_ENABLE, MSIX_CONTROL_FUNCTION_MASK
from pych.devices.virtio.block import VIRTIO_BLK_F_FLUSH, RequestType, VirtioBlock
from pych.devices.virtio.console import VirtioConsole
from pych.devices.virtio.device import (VIRTIO_F_EVENT_IDX, VIRTIO_F_INDIRECT_DESC,
                                        VIRTIO_F_VERSION_1, DeviceStatus)
from pych.devices.virtio.pci_transport import (VIRTIO_MSI_NO_VECTOR, CommonCfg, VirtioPciCapType,
                                               VirtioPciDevice)
from pych.devices.virtio.rng import VirtioRng
from pych.memory.guest_memory import GuestMemory

from tests.support.fakes import FakeMsiInterruptManager, RecordingIoEvents, RecordingIrq
from tests.support.virtio import MockQueue, wait_until

MiB = 1 << 20
MEM64 = 1 << 40
MSI_ADDRESS = 0xFEE0_0000


class Machine:
    """A bus, an MMIO bus with ECAM, guest RAM and the KVM fakes."""

    def __init__(self, *, ioevents: bool = True):
        self.mem = GuestMemory.from_ranges([(0, 8 * MiB)])
        self.mmio = Bus("mmio")
        self.msi = FakeMsiInterruptManager()
        self.ioevents = RecordingIoEvents() if ioevents else None
        self.pci = PciBus(0, mmio_bus=self.mmio,
                          mem32=AddressAllocator(layout.MEM_32BIT_DEVICES_START, layout.MEM_32BIT_DEVICES_SIZE),
                          mem64=AddressAllocator(MEM64, 1 << 32))
        self.mmio.insert(layout.ecam_base(0), 1 << 20, PciEcam(self.pci))

    def plug(self, device, **kw) -> tuple[VirtioPciDevice, int]:
        transport = VirtioPciDevice(device, self.mem, self.msi, self.ioevents, **kw)
        return transport, self.pci.add_device(transport)

    def close(self):
        for slot, dev in list(self.pci.devices()):
            self.pci.remove_device(slot)
            dev.shutdown()
        self.mem.close()


class LinuxDriver:
    """The guest side: what drivers/virtio/virtio_pci_modern*.c does, step by step."""

    def __init__(self, machine: Machine, slot: int):
        self.m = machine
        self.ecam = layout.ecam_base(0) + (slot << 15)
        self.caps = {}
        self.bar = None

    # config space through ECAM
    def cfg_read(self, offset, size=4):
        return self.m.mmio.read(self.ecam + offset, size)

    def cfg_write(self, offset, size, value):
        self.m.mmio.write(self.ecam + offset, size, value)

    def probe(self):
        assert self.cfg_read(0, 2) == 0x1AF4
        pointer = self.cfg_read(CAPABILITIES_POINTER, 1)
        while pointer:
            cap_id, nxt = self.cfg_read(pointer, 1), self.cfg_read(pointer + 1, 1)
            if cap_id == 0x09:
                cfg_type, bar = self.cfg_read(pointer + 3, 1), self.cfg_read(pointer + 4, 1)
                offset, length = self.cfg_read(pointer + 8), self.cfg_read(pointer + 12)
                self.caps.setdefault(cfg_type, (bar, offset, length, pointer))
            elif cap_id == 0x11:
                self.msix_cap = pointer
            pointer = nxt
        for required in (VirtioPciCapType.COMMON_CFG, VirtioPciCapType.ISR_CFG, VirtioPciCapType.NOTIFY_CFG):
            assert required in self.caps
        self.notify_multiplier = self.cfg_read(self.caps[VirtioPciCapType.NOTIFY_CFG][3] + 16)
        low = self.cfg_read(BAR0)
        assert low & 0x6 == 0x4                                     # a 64-bit memory BAR
        self.bar = (low & ~0xF) | self.cfg_read(BAR0 + 4) << 32
        self.cfg_write(COMMAND, 2, Command.MEMORY_SPACE | Command.BUS_MASTER)   # pci_enable_device

    def region(self, cfg_type):
        bar, offset, length, _ = self.caps[cfg_type]
        assert bar == 0
        return self.bar + offset

    def read(self, cfg_type, offset, size):
        return self.m.mmio.read(self.region(cfg_type) + offset, size)

    def write(self, cfg_type, offset, size, value):
        self.m.mmio.write(self.region(cfg_type) + offset, size, value)

    def common_read(self, field, size):
        return self.read(VirtioPciCapType.COMMON_CFG, field, size)

    def common_write(self, field, size, value):
        self.write(VirtioPciCapType.COMMON_CFG, field, size, value)

    def status(self):
        return self.common_read(CommonCfg.DEVICE_STATUS, 1)

    def add_status(self, bit):
        self.common_write(CommonCfg.DEVICE_STATUS, 1, self.status() | bit)

    def enable_msix(self, vectors):
        """pci_alloc_irq_vectors: enable with everything masked, program, then unmask."""
        control = self.msix_cap + 2
        self.cfg_write(control, 2, MSIX_CONTROL_ENABLE | MSIX_CONTROL_FUNCTION_MASK)
        table = self.cfg_read(self.msix_cap + 4)
        assert table & 7 == 0
        base = self.bar + (table & ~7)
        for v in range(vectors):
            entry = base + 16 * v
            self.m.mmio.write(entry, 4, MSI_ADDRESS)
            self.m.mmio.write(entry + 4, 4, 0)
            self.m.mmio.write(entry + 8, 4, 0x40 + v)
            self.m.mmio.write(entry + 12, 4, 0)
        self.cfg_write(control, 2, MSIX_CONTROL_ENABLE)

    def negotiate(self, wanted):
        self.common_write(CommonCfg.DEVICE_STATUS, 1, 0)              # reset
        assert self.status() == 0
        self.add_status(DeviceStatus.ACKNOWLEDGE)
        self.add_status(DeviceStatus.DRIVER)
        offered = 0
        for select in (0, 1):
            self.common_write(CommonCfg.DEVICE_FEATURE_SELECT, 4, select)
            offered |= self.common_read(CommonCfg.DEVICE_FEATURE, 4) << (32 * select)
        features = offered & wanted
        for select in (0, 1):
            self.common_write(CommonCfg.DRIVER_FEATURE_SELECT, 4, select)
            self.common_write(CommonCfg.DRIVER_FEATURE, 4, (features >> (32 * select)) & 0xFFFF_FFFF)
        self.add_status(DeviceStatus.FEATURES_OK)
        return offered, features, bool(self.status() & DeviceStatus.FEATURES_OK)

    def setup_queue(self, index, vector, size=None):
        self.common_write(CommonCfg.QUEUE_SELECT, 2, index)
        max_size = self.common_read(CommonCfg.QUEUE_SIZE, 2)
        assert max_size and not self.common_read(CommonCfg.QUEUE_ENABLE, 2)
        size = size or max_size
        mq = MockQueue(self.m.mem, size, base=(1 + index) * MiB, data_size=MiB // 2)
        self.common_write(CommonCfg.QUEUE_SIZE, 2, size)
        for field, address in ((CommonCfg.QUEUE_DESC, mq.desc_table),
                               (CommonCfg.QUEUE_DRIVER, mq.avail_ring),
                               (CommonCfg.QUEUE_DEVICE, mq.used_ring)):
            self.common_write(field, 4, address & 0xFFFF_FFFF)        # vp_iowrite64_twopart
            self.common_write(field + 4, 4, address >> 32)
        self.common_write(CommonCfg.QUEUE_MSIX_VECTOR, 2, vector)
        assert self.common_read(CommonCfg.QUEUE_MSIX_VECTOR, 2) == vector
        notify_off = self.common_read(CommonCfg.QUEUE_NOTIFY_OFF, 2)
        mq.notify_address = self.region(VirtioPciCapType.NOTIFY_CFG) + notify_off * self.notify_multiplier
        self.common_write(CommonCfg.QUEUE_ENABLE, 2, 1)
        return mq

    def notify(self, mq, index):
        """iowrite16(index, notify address).  With KVM and an ioeventfd there, the write
        signals the eventfd in the kernel; without one it is an MMIO exit."""
        ioevents = self.m.ioevents
        fd = ioevents.fd_at(mq.notify_address) if ioevents else None
        if fd is not None:
            os.eventfd_write(fd, 1)
        else:
            self.m.mmio.write(mq.notify_address, 2, index)


@pytest.fixture
def disk_image(tmp_path):
    path = tmp_path / "disk.img"
    path.write_bytes(bytes(i % 253 for i in range(64 * 512)))
    return path


@pytest.fixture
def machine():
    m = Machine()
    yield m
    m.close()


def bring_up(machine, device, *, wanted=None, queue_size=None):
    transport, slot = machine.plug(device)
    driver = LinuxDriver(machine, slot)
    driver.probe()
    vectors = len(device.queue_max_sizes) + 1
    driver.enable_msix(vectors)
    offered, features, ok = driver.negotiate(wanted if wanted is not None else (1 << 64) - 1)
    assert ok
    driver.common_write(CommonCfg.CONFIG_MSIX_VECTOR, 2, 0)
    assert driver.common_read(CommonCfg.CONFIG_MSIX_VECTOR, 2) == 0
    queues = [driver.setup_queue(i, vector=i + 1, size=queue_size) for i in range(len(device.queue_max_sizes))]
    driver.add_status(DeviceStatus.DRIVER_OK)
    return transport, driver, queues


def block_read(driver, mq, sector, length=512):
    head = mq.add_chain([struct.pack("<IIQ", RequestType.IN, 0, sector)], [length, 1])
    buffers = mq.writable_buffers(head)
    driver.notify(mq, 0)
    assert wait_until(lambda: mq.used_idx == mq.avail_idx)
    [used] = mq.used()
    assert used.id == head
    return mq.read_writable(buffers)


def test_linux_init_sequence_and_a_block_request(machine, disk_image):
    disk = VirtioBlock(disk_image, num_queues=1, queue_size=128)
    transport, slot = machine.plug(disk)
    driver = LinuxDriver(machine, slot)
    assert driver.cfg_read(0) == 0x1042_1AF4                  # 1af4:1040+2
    assert driver.cfg_read(0x08, 1) == 1                      # revision 1: modern only
    assert driver.cfg_read(0x2C) == 0x1042_1AF4
    driver.probe()
    assert driver.bar == transport.config.bar_address(0) >= MEM64
    assert machine.pci.mapped_bar(slot, 0) == driver.bar
    device_cfg = driver.region(VirtioPciCapType.DEVICE_CFG)
    assert machine.mmio.read(device_cfg, 8) == 64             # capacity in sectors

    driver.enable_msix(2)
    offered, features, ok = driver.negotiate(VIRTIO_F_VERSION_1 | VIRTIO_F_EVENT_IDX
                                             | VIRTIO_F_INDIRECT_DESC | VIRTIO_BLK_F_FLUSH)
    assert ok and offered & VIRTIO_F_VERSION_1
    assert disk.acked_features == features
    assert driver.common_read(CommonCfg.NUM_QUEUES, 2) == 1
    driver.common_write(CommonCfg.CONFIG_MSIX_VECTOR, 2, 0)
    mq = driver.setup_queue(0, vector=1, size=64)
    assert not disk.active
    driver.add_status(DeviceStatus.DRIVER_OK)
    assert driver.status() == (DeviceStatus.ACKNOWLEDGE | DeviceStatus.DRIVER
                               | DeviceStatus.FEATURES_OK | DeviceStatus.DRIVER_OK)
    assert disk.active

    # The notify address is an ioeventfd: the request reaches the worker without an exit.
    assert machine.ioevents.fd_at(mq.notify_address) is not None
    assert block_read(driver, mq, sector=3) == bytes(i % 253 for i in range(1536, 2048)) + b"\0"
    vectors = machine.msi.groups[0].vectors
    assert vectors[1].wait_for_triggers(1)
    assert vectors[1].address == MSI_ADDRESS and vectors[1].data == 0x41 and not vectors[1].masked

    # Reset stops the worker and forgets the queues.
    driver.common_write(CommonCfg.DEVICE_STATUS, 1, 0)
    assert driver.status() == 0 and not disk.active
    driver.common_write(CommonCfg.QUEUE_SELECT, 2, 0)
    assert driver.common_read(CommonCfg.QUEUE_ENABLE, 2) == 0
    assert driver.common_read(CommonCfg.QUEUE_SIZE, 2) == 128
    assert driver.common_read(CommonCfg.CONFIG_MSIX_VECTOR, 2) == VIRTIO_MSI_NO_VECTOR

    # ... and the device comes back up after a second probe.
    _, _, ok = driver.negotiate(VIRTIO_F_VERSION_1)
    assert ok
    mq = driver.setup_queue(0, vector=1, size=64)
    driver.add_status(DeviceStatus.DRIVER_OK)
    assert block_read(driver, mq, sector=0)[:4] == bytes([0, 1, 2, 3])


def test_notifications_without_ioeventfds_take_the_mmio_path(disk_image):
    machine = Machine(ioevents=False)
    try:
        _, driver, [mq] = bring_up(machine, VirtioBlock(disk_image), queue_size=16)
        assert block_read(driver, mq, sector=1)[:2] == bytes([512 % 253, 513 % 253])
    finally:
        machine.close()


def test_feature_negotiation_failures(machine):
    transport, slot = machine.plug(VirtioRng())
    driver = LinuxDriver(machine, slot)
    driver.probe()
    _, _, ok = driver.negotiate(VIRTIO_F_EVENT_IDX)           # a legacy driver: no VERSION_1
    assert not ok
    driver.add_status(DeviceStatus.DRIVER_OK)
    assert not driver.status() & DeviceStatus.DRIVER_OK and not transport.device.active

    driver.common_write(CommonCfg.DEVICE_STATUS, 1, 0)
    for status in (DeviceStatus.ACKNOWLEDGE, DeviceStatus.DRIVER):
        driver.add_status(status)
    driver.common_write(CommonCfg.DRIVER_FEATURE_SELECT, 4, 1)
    driver.common_write(CommonCfg.DRIVER_FEATURE, 4, 1 | 1 << 30)    # VERSION_1 + an unoffered bit
    driver.add_status(DeviceStatus.FEATURES_OK)
    assert not driver.status() & DeviceStatus.FEATURES_OK


def test_features_are_frozen_after_features_ok(machine):
    _, driver, _ = bring_up(machine, VirtioRng(), wanted=VIRTIO_F_VERSION_1)
    driver.common_write(CommonCfg.DRIVER_FEATURE_SELECT, 4, 0)
    driver.common_write(CommonCfg.DRIVER_FEATURE, 4, 0xFFFF_FFFF)
    assert driver.common_read(CommonCfg.DRIVER_FEATURE, 4) == 0


def test_unmappable_vector_reads_back_no_vector(machine):
    transport, slot = machine.plug(VirtioRng())
    driver = LinuxDriver(machine, slot)
    driver.probe()
    driver.common_write(CommonCfg.CONFIG_MSIX_VECTOR, 2, 7)   # the table has 2 entries
    assert driver.common_read(CommonCfg.CONFIG_MSIX_VECTOR, 2) == VIRTIO_MSI_NO_VECTOR
    driver.common_write(CommonCfg.QUEUE_SELECT, 2, 5)          # no such queue
    assert driver.common_read(CommonCfg.QUEUE_SIZE, 2) == 0


def test_bad_queue_layout_sets_needs_reset(machine):
    transport, slot = machine.plug(VirtioRng())
    driver = LinuxDriver(machine, slot)
    driver.probe()
    driver.enable_msix(2)
    assert driver.negotiate(VIRTIO_F_VERSION_1)[2]
    driver.common_write(CommonCfg.CONFIG_MSIX_VECTOR, 2, 0)
    driver.common_write(CommonCfg.QUEUE_SELECT, 2, 0)
    driver.common_write(CommonCfg.QUEUE_SIZE, 2, 100)         # not a power of two
    driver.common_write(CommonCfg.QUEUE_ENABLE, 2, 1)
    driver.add_status(DeviceStatus.DRIVER_OK)
    assert driver.status() & DeviceStatus.DEVICE_NEEDS_RESET
    assert not transport.device.active
    assert machine.msi.groups[0].vectors[0].triggers == 1     # config-change interrupt
    driver.common_write(CommonCfg.DEVICE_STATUS, 1, 0)
    assert driver.status() == 0


def test_bar_relocation_moves_the_ioeventfds(machine):
    transport, driver, [mq] = bring_up(machine, VirtioRng(), queue_size=16)
    old_notify = mq.notify_address
    assert machine.ioevents.fd_at(old_notify) is not None
    # Linux moves a 64-bit BAR with decoding off.
    new_bar = MEM64 + (1 << 30)
    driver.cfg_write(COMMAND, 2, Command.BUS_MASTER)
    assert machine.ioevents.registered == {}
    driver.cfg_write(BAR0, 4, new_bar & 0xFFFF_FFFF)
    driver.cfg_write(BAR0 + 4, 4, new_bar >> 32)
    driver.cfg_write(COMMAND, 2, Command.MEMORY_SPACE | Command.BUS_MASTER)
    new_notify = old_notify - driver.bar + new_bar
    driver.bar = new_bar
    assert machine.ioevents.fd_at(old_notify) is None
    assert machine.ioevents.fd_at(new_notify) is not None
    mq.notify_address = new_notify
    head = mq.add_chain(writable=[32])
    driver.notify(mq, 0)
    assert wait_until(lambda: mq.used_idx == mq.avail_idx)
    assert mq.used() == [(head, 32)]
    assert driver.common_read(CommonCfg.NUM_QUEUES, 2) == 1   # registers answer at the new place


def test_intx_fallback_without_msix(machine):
    transport, slot = machine.plug(VirtioRng())
    irq = RecordingIrq()
    transport.intx = irq
    driver = LinuxDriver(machine, slot)
    driver.probe()
    assert driver.cfg_read(0x3D, 1) == 1                       # INTA#
    assert driver.negotiate(VIRTIO_F_VERSION_1)[2]
    mq = driver.setup_queue(0, vector=VIRTIO_MSI_NO_VECTOR, size=16)
    driver.add_status(DeviceStatus.DRIVER_OK)
    mq.add_chain(writable=[8])
    driver.notify(mq, 0)
    assert wait_until(lambda: irq.level)
    assert driver.cfg_read(0x06, 2) & 0x8                      # PCI status: interrupt pending
    assert driver.read(VirtioPciCapType.ISR_CFG, 0, 1) == 1     # queue interrupt; read clears
    assert not irq.level
    assert driver.read(VirtioPciCapType.ISR_CFG, 0, 1) == 0


def test_pci_cfg_access_window(machine):
    transport, slot = machine.plug(VirtioRng())
    driver = LinuxDriver(machine, slot)
    driver.probe()
    cap = driver.caps[VirtioPciCapType.PCI_CFG][3]
    assert driver.cfg_read(cap + 2, 1) == 20
    driver.cfg_write(cap + 4, 1, 0)                            # bar
    driver.cfg_write(cap + 8, 4, CommonCfg.NUM_QUEUES)         # offset
    driver.cfg_write(cap + 12, 4, 2)                           # length
    assert driver.cfg_read(cap + 16, 2) == 1
    driver.cfg_write(cap + 8, 4, CommonCfg.DEVICE_STATUS)
    driver.cfg_write(cap + 12, 4, 1)
    driver.cfg_write(cap + 16, 1, DeviceStatus.ACKNOWLEDGE)
    assert driver.status() == DeviceStatus.ACKNOWLEDGE


def test_removal_releases_everything(machine):
    transport, driver, [mq] = bring_up(machine, VirtioRng(), queue_size=16)
    device = transport.device
    slot = machine.pci.slot_of(transport)
    assert machine.ioevents.registered
    assert machine.pci.remove_device(slot) is transport
    assert machine.ioevents.registered == {}
    assert machine.mmio.find(driver.bar) is None
    transport.shutdown()
    assert not device.active
    assert machine.msi.groups[0].released
    assert driver.cfg_read(0) == 0xFFFF_FFFF


def test_console_config_change_interrupt(machine):
    console = VirtioConsole(cols=80, rows=24)
    transport, driver, queues = bring_up(machine, console, queue_size=16)
    generation = driver.common_read(CommonCfg.CONFIG_GENERATION, 1)
    console.resize(100, 30)
    assert driver.common_read(CommonCfg.CONFIG_GENERATION, 1) == generation + 1
    assert driver.read(VirtioPciCapType.DEVICE_CFG, 0, 4) == 30 << 16 | 100
    assert machine.msi.groups[0].vectors[0].wait_for_triggers(1)


@pytest.mark.parametrize("size", [1, 2, 4])
def test_pci_cfg_data_reads_are_as_wide_as_the_access(machine, size):
    """A read of pci_cfg_data returns ``size`` bytes of the window, whatever its length."""
    transport, slot = machine.plug(VirtioRng())
    driver = LinuxDriver(machine, slot)
    driver.probe()
    cap = driver.caps[VirtioPciCapType.PCI_CFG][3]
    driver.cfg_write(cap + 4, 1, 0)
    driver.cfg_write(cap + 8, 4, CommonCfg.DEVICE_FEATURE)
    driver.cfg_write(cap + 12, 4, 4)
    for offset in range(0, 5 - size):
        value = driver.cfg_read(cap + 16 + offset, size)
        assert 0 <= value < 1 << (8 * size)
    driver.cfg_write(cap + 16 + 1, 1, 0xFF)       # a partial write does not reach the BAR
    assert driver.status() == 0


@pytest.mark.parametrize("seed", [1, 2, 3])
def test_random_config_and_bar_accesses_never_fail_in_a_device(machine, disk_image, caplog,
                                                               seed):
    """What the fuzz guest does to the transport, at unit speed: random ECAM and BAR
    accesses of every width and value (common config, ISR, notify, device config, MSI-X
    table and PBA, the pci_cfg window, BARs and the command register) on live devices. The
    bus contains a device's exception (it logs "failed in"); none may happen at all."""
    import logging
    import random

    rnd = random.Random(seed)
    devices = [VirtioRng(), VirtioBlock(disk_image), VirtioConsole()]
    drivers = [bring_up(machine, device)[1] for device in devices]
    values = [0, 0xFF, 0xFFFF, 0xFFFF_FFFF, 1 << 63, (1 << 64) - 1]
    caplog.set_level(logging.WARNING)
    for _ in range(20000):
        d = rnd.choice(drivers)
        size = rnd.choice([1, 2, 4, 8])
        value = rnd.choice(values + [rnd.getrandbits(8 * size)]) & ((1 << (8 * size)) - 1)
        if rnd.random() < 0.3:
            offset = rnd.randrange(0x100 if rnd.random() < 0.8 else 0x1000)
            if offset in range(BAR0, BAR0 + 24) and rnd.random() < 0.9:
                continue                       # BARs move, but mostly leave them be
            addr = d.ecam + offset
        else:
            addr = d.bar + rnd.randrange(0x4000)
        if rnd.random() < 0.5:
            got = machine.mmio.read(addr, size)
            assert 0 <= got < 1 << (8 * size)
        else:
            machine.mmio.write(addr, size, value)
    failed = [r.getMessage() for r in caplog.records if "failed in" in r.getMessage()]
    assert failed == []
