"""virtio-fs as a vhost-user front end, without KVM: the configuration space, the
negotiation at creation, activation through the real PCI transport (the back-end gets the
memory table, the ring addresses as user addresses, the transport's kick eventfds and the
MSI-X vectors' irqfds), vector changes, driver resets, guest memory hot plug, a back-end
that fails or hangs up, hot plug and removal through the device manager and the VMM, and
one round trip of FUSE requests through Debian's real virtiofsd.

The fake back-end (:class:`tests.unit.devices.test_vhost_user.FakeBackend`) records every message.
"""

from __future__ import annotations

import itertools
import os
import struct
import subprocess
from types import SimpleNamespace

import pytest

from pych.api.errors import status_of
from pych.errors import VmmError
from pych.config import DiskConfig, FsConfig, VmRemoveDevice
from pych.config.kinds import BY_NAME
from pych.device_manager.manager import DeviceBackendError
from pych.devices.pci.msix import MSIX_CONTROL_ENABLE
from pych.devices.vhost_user import (FLAG_NEED_REPLY, SINGLE_MEM_REGION, VRING_ADDR,
                                     VHOST_USER_F_PROTOCOL_FEATURES, MEM_TABLE_HEADER,
                                     ProtocolFeature, Request, VhostUserError)
from pych.devices.virtio.device import (VIRTIO_F_EVENT_IDX, ActivationError, VIRTIO_F_INDIRECT_DESC,
                                        VIRTIO_F_VERSION_1, DeviceStatus, VirtioDeviceType,
                                        drain_eventfd)
from pych.devices.virtio.fs import VirtioFs
from pych.devices.virtio.pci_transport import CommonCfg, VirtioPciCapType
from pych.devices.virtio.queue import VIRTQ_DESC_F_NEXT, VIRTQ_DESC_F_WRITE

from tests.support.fakes import (FakeMsiInterruptManager, RecordingEvents, RecordingIrq,
                                 RecordingMsiGroup, RecordingMsiVector)
from tests.support.virtio import DeviceHarness, wait_until
from tests.support.host import unix_socket_listening
from tests.support.machines import DeviceManagerMachine, boot_fake, vm_config
from tests.unit.devices.test_vhost_user import FakeBackend, fd_identity
from tests.unit.devices.virtio.test_pci import LinuxDriver, Machine, bring_up

MiB = 1 << 20
VIRTIOFSD = "/usr/lib/qemu/virtiofsd"


def open_fds(backend: FakeBackend | None = None) -> int:
    """Descriptors open in this process, less those the in-process fake back-end holds."""
    return len(os.listdir("/proc/self/fd")) - (backend.held_fds() if backend else 0)


def same_eventfd(a: int, b: int) -> bool:
    """Whether two descriptors are the same eventfd: a write to one is read from the other.
    (Every eventfd has the same anonymous inode, so fstat cannot tell.)"""
    drain_eventfd(a)
    drain_eventfd(b)
    os.eventfd_write(a, 1)
    seen = drain_eventfd(b)
    drain_eventfd(a)
    return seen == 1


# --- fixtures ----------------------------------------------------------------------------------
@pytest.fixture
def backend():
    b = FakeBackend(check_rings=True)
    yield b
    b.close()


def make_fs(backend: FakeBackend, **kw) -> VirtioFs:
    return VirtioFs(kw.pop("tag", "hostfs"), "fake.sock", connect=lambda path: backend.frontend(),
                    **kw)


class EventfdMsiVector(RecordingMsiVector):
    """Like KVM's vectors: an eventfd (the irqfd) behind each one."""

    def __init__(self) -> None:
        super().__init__()
        self.fd = os.eventfd(0, os.EFD_CLOEXEC | os.EFD_NONBLOCK)


class EventfdMsiManager(FakeMsiInterruptManager):
    def create_msix_group(self, count: int) -> RecordingMsiGroup:
        group = RecordingMsiGroup([EventfdMsiVector() for _ in range(count)])
        self.groups.append(group)
        return group

    def close(self) -> None:
        for group in self.groups:
            for v in group.vectors:
                os.close(v.fd)


@pytest.fixture
def machine():
    m = Machine()
    m.msi = EventfdMsiManager()
    yield m
    m.close()
    m.msi.close()


def requests_after(backend: FakeBackend, start: int) -> list[str]:
    return backend.requests()[start:]


NEGOTIATION = ["SET_OWNER", "GET_FEATURES", "GET_PROTOCOL_FEATURES", "SET_PROTOCOL_FEATURES",
               "GET_QUEUE_NUM", "GET_MAX_MEM_SLOTS"]


# --- the device model --------------------------------------------------------------------------
def test_config_space_and_queues(backend):
    backend.queue_num = 3
    fs = make_fs(backend, num_request_queues=2, queue_size=256)
    try:
        assert fs.device_type == VirtioDeviceType.FS == 26
        assert fs.config_bytes() == b"hostfs".ljust(36, b"\0") + struct.pack("<I", 2)
        assert fs.read_config(0, 4) == int.from_bytes(b"host", "little")
        assert fs.read_config(36, 4) == 2
        assert fs.queue_max_sizes == (256, 256, 256)               # hiprio + 2 request queues
        assert not fs.active
    finally:
        fs.shutdown()


def test_creation_negotiates_with_the_backend(backend):
    fs = make_fs(backend)
    try:
        assert backend.requests() == NEGOTIATION
        protocol = backend.of(Request.SET_PROTOCOL_FEATURES)[0].u64()
        assert protocol == (ProtocolFeature.MQ | ProtocolFeature.REPLY_ACK
                            | ProtocolFeature.CONFIGURE_MEM_SLOTS)
        # The guest is offered the ring features both sides implement, nothing of the
        # back-end's own (VHOST_F_LOG_ALL, the protocol-features bit, NOTIFY_ON_EMPTY).
        assert fs.avail_features == VIRTIO_F_VERSION_1 | VIRTIO_F_INDIRECT_DESC | VIRTIO_F_EVENT_IDX
        assert fs.max_regions == 32
    finally:
        fs.shutdown()
    assert backend.wait_for(lambda b: b.eof)                         # shutdown hangs up


def test_a_backend_without_protocol_features(backend):
    backend.features = VIRTIO_F_VERSION_1
    fs = make_fs(backend)
    try:
        assert backend.requests() == ["SET_OWNER", "GET_FEATURES"]
        assert fs.avail_features == VIRTIO_F_VERSION_1 and fs.max_regions == 8
    finally:
        fs.shutdown()


@pytest.mark.parametrize(("kw", "message"), [
    ({"tag": ""}, "the tag must be 1 to 36 bytes, not 0"),
    ({"tag": "x" * 37}, "the tag must be 1 to 36 bytes, not 37"),
    ({"tag": "é" * 19}, "not 38"),
    ({"num_request_queues": 0}, "num_queues must be at least 1"),
    ({"queue_size": 1000}, "queue_size 1000 is not a power of 2"),
    ({"queue_size": 65536}, "is not a power of 2 up to 32768"),
])
def test_bad_parameters_are_refused_before_connecting(kw, message):
    calls = []
    with pytest.raises(ValueError, match=message):
        VirtioFs(kw.pop("tag", "ok"), "s", connect=calls.append, **kw)
    assert calls == []


def test_unsuitable_backends_are_refused_and_hung_up_on(backend):
    with pytest.raises(VhostUserError, match=r"virtio-fs myfs: the vhost-user backend at fake.sock "
                       r"serves 2 queues \(1 high-priority \+ 1 request queues\), but "
                       r"num_queues=2 needs 3"):
        make_fs(backend, num_request_queues=2, name="myfs")
    assert backend.wait_for(lambda b: b.eof)


def test_a_legacy_backend_is_refused(backend):
    backend.features = VHOST_USER_F_PROTOCOL_FEATURES
    with pytest.raises(VhostUserError, match="does not offer VIRTIO_F_VERSION_1"):
        make_fs(backend)


def test_a_missing_socket_is_named(tmp_path):
    path = tmp_path / "nobody.sock"
    fds = open_fds()
    with pytest.raises(VhostUserError, match=f"virtio-fs _fs3: cannot connect to the vhost-user "
                                             f"backend at {path}: No such file or directory"):
        VirtioFs("t", str(path), name="_fs3")
    assert open_fds() == fds


# --- activation through the PCI transport --------------------------------------------------------
def test_driver_ok_hands_the_queues_to_the_backend(machine, backend):
    fs = make_fs(backend)
    transport, driver, queues = bring_up(machine, fs, queue_size=64)
    assert fs.active and not driver.status() & DeviceStatus.DEVICE_NEEDS_RESET
    start = len(NEGOTIATION)
    assert requests_after(backend, start) == [
        "SET_FEATURES", "ADD_MEM_REG",
        "SET_VRING_NUM", "SET_VRING_BASE", "SET_VRING_ADDR", "SET_VRING_CALL", "SET_VRING_KICK",
        "SET_VRING_NUM", "SET_VRING_BASE", "SET_VRING_ADDR", "SET_VRING_CALL", "SET_VRING_KICK",
        "SET_VRING_ENABLE", "SET_VRING_ENABLE"]
    messages = backend.messages[start:]
    assert all(m.flags == 1 | FLAG_NEED_REPLY for m in messages)     # each acknowledged
    features = messages[0].u64()
    assert features == fs.acked_features | VHOST_USER_F_PROTOCOL_FEATURES
    assert features & VIRTIO_F_VERSION_1

    # the memory table: the guest's one RAM region, its memfd, pych's address of it
    [region] = machine.mem.regions
    add = messages[1]
    assert SINGLE_MEM_REGION.unpack(add.payload) == (0, 0, region.size, region.host_addr, 0)
    assert [fd_identity(fd) for fd in add.fds] == [fd_identity(region.fd)]

    msix = machine.msi.groups[0].vectors
    for index, mq in enumerate(queues):
        ring = [m for m in messages if m.payload[:4] == struct.pack("<I", index)
                and m.request in (Request.SET_VRING_NUM, Request.SET_VRING_BASE,
                                  Request.SET_VRING_ADDR, Request.SET_VRING_ENABLE)]
        num, base, addr, enable = ring
        assert num.state() == (index, 64) and base.state() == (index, 0)
        assert enable.state() == (index, 1)
        # ring addresses are pych's user addresses of the driver's guest addresses
        assert VRING_ADDR.unpack(addr.payload) == (
            index, 0, region.host_addr + mq.desc_table, region.host_addr + mq.used_ring,
            region.host_addr + mq.avail_ring, 0)
        [call] = [m for m in backend.of(Request.SET_VRING_CALL) if m.u64() == index]
        [kick] = [m for m in backend.of(Request.SET_VRING_KICK) if m.u64() == index]
        # kick: the queue's ioeventfd, so the guest's notification reaches the back-end
        driver.notify(mq, index)
        assert os.eventfd_read(kick.fds[0]) == 1
        # call: the irqfd of the queue's MSI-X vector (index + 1), so the back-end's
        # write is the guest's interrupt
        assert same_eventfd(call.fds[0], msix[index + 1].fd)


def test_vector_changes_and_msix_off_reroute_the_calls(machine, backend):
    fs = make_fs(backend)
    transport, driver, queues = bring_up(machine, fs, queue_size=64)
    irq = RecordingIrq()
    transport.intx = irq
    msix = machine.msi.groups[0].vectors
    start = len(backend.messages)

    driver.common_write(CommonCfg.QUEUE_SELECT, 2, 1)
    driver.common_write(CommonCfg.QUEUE_MSIX_VECTOR, 2, 0)          # queue 1 -> vector 0
    [call] = backend.wait_messages(start + 1)[start:]
    assert (call.request, call.u64()) == (Request.SET_VRING_CALL, 1)
    assert same_eventfd(call.fds[0], msix[0].fd)
    driver.common_write(CommonCfg.QUEUE_MSIX_VECTOR, 2, 0)          # no change: nothing sent
    assert len(backend.messages) == start + 1

    driver.cfg_write(driver.msix_cap + 2, 2, 0)                      # MSI-X off: INTx
    calls = backend.wait_messages(start + 3)[start + 1:]
    assert [(m.request, m.u64()) for m in calls] == [(Request.SET_VRING_CALL, 0),
                                                     (Request.SET_VRING_CALL, 1)]
    relayed = calls[1].fds[0]
    assert not any(same_eventfd(relayed, v.fd) for v in msix)
    os.eventfd_write(relayed, 1)                                     # the back-end's call ...
    assert wait_until(lambda: irq.level)                             # ... pych relays as INTx
    assert driver.read(VirtioPciCapType.ISR_CFG, 0, 1) == 1

    driver.cfg_write(driver.msix_cap + 2, 2, MSIX_CONTROL_ENABLE)    # back to the irqfds
    calls = backend.wait_messages(start + 5)[start + 3:]
    assert same_eventfd(calls[0].fds[0], msix[1].fd) and same_eventfd(calls[1].fds[0], msix[0].fd)


def test_driver_reset_stops_every_ring_and_reactivation_restarts_them(machine, backend):
    fs = make_fs(backend)
    fds = open_fds(backend)
    transport, driver, queues = bring_up(machine, fs, queue_size=64)
    start = len(backend.messages)
    driver.common_write(CommonCfg.DEVICE_STATUS, 1, 0)
    assert not fs.active
    assert requests_after(backend, start) == ["SET_VRING_ENABLE", "GET_VRING_BASE"] * 2
    assert [m.state() for m in backend.messages[start:]] == [(0, 0), (0, 0), (1, 0), (1, 0)]
    assert fs.acked_features == 0
    # left: the transport's 2 kick eventfds and 3 vector eventfds; the relay and monitor
    # eventfds of the activation are gone
    assert open_fds(backend) == fds + 2 + 3

    start = len(backend.messages)
    driver.negotiate((1 << 64) - 1)
    for index in range(2):
        driver.setup_queue(index, vector=index + 1, size=64)
    driver.add_status(DeviceStatus.DRIVER_OK)
    assert fs.active
    # the memory table is still the back-end's: only the features and the rings again
    assert requests_after(backend, start) == ["SET_FEATURES"] + [
        "SET_VRING_NUM", "SET_VRING_BASE", "SET_VRING_ADDR", "SET_VRING_CALL",
        "SET_VRING_KICK"] * 2 + ["SET_VRING_ENABLE"] * 2


def test_memory_hot_plug_updates_the_backend_incrementally(machine, backend):
    fs = make_fs(backend)
    bring_up(machine, fs, queue_size=64)
    start = len(backend.messages)
    dimm = machine.mem.add_region(1 << 32, 2 * MiB, name="dimm0")
    fs.memory_changed()
    [add] = backend.messages[start:]
    assert add.request == Request.ADD_MEM_REG
    assert SINGLE_MEM_REGION.unpack(add.payload) == (0, 1 << 32, 2 * MiB, dimm.host_addr, 0)
    assert [fd_identity(fd) for fd in add.fds] == [fd_identity(dimm.fd)]
    fs.memory_changed()                                              # nothing new: nothing sent
    assert len(backend.messages) == start + 1

    fs.memory_changed(going=dimm)                                    # about to be ejected
    [rem] = backend.messages[start + 1:]
    assert (rem.request, rem.fds) == (Request.REM_MEM_REG, [])
    assert SINGLE_MEM_REGION.unpack(rem.payload)[1:4] == (1 << 32, 2 * MiB, dimm.host_addr)
    machine.mem.remove_region(dimm)

    # an eject nobody was told of is caught up with at the next change
    machine.mem.add_region(1 << 32, 2 * MiB, name="dimm1")
    fs.memory_changed()
    start = len(backend.messages)
    machine.mem.remove_region(machine.mem.regions[-1])
    again = machine.mem.add_region(1 << 32, 2 * MiB, name="dimm2")   # same place, new memory
    fs.memory_changed()
    rem, add = backend.messages[start:]
    assert (rem.request, rem.fds) == (Request.REM_MEM_REG, [])
    assert SINGLE_MEM_REGION.unpack(rem.payload)[1:3] == (1 << 32, 2 * MiB)
    assert add.request == Request.ADD_MEM_REG
    assert [fd_identity(fd) for fd in add.fds] == [fd_identity(again.fd)]


def test_without_configure_mem_slots_the_whole_table_is_resent(machine, backend):
    backend.protocol_features = ProtocolFeature.MQ | ProtocolFeature.REPLY_ACK
    fs = make_fs(backend)
    assert fs.max_regions == 8
    bring_up(machine, fs, queue_size=64)
    assert len(backend.of(Request.SET_MEM_TABLE)) == 1
    dimm = machine.mem.add_region(1 << 32, 2 * MiB, name="dimm0")
    fs.memory_changed()
    first, second = backend.of(Request.SET_MEM_TABLE)
    assert MEM_TABLE_HEADER.unpack_from(first.payload) == (1, 0)
    assert MEM_TABLE_HEADER.unpack_from(second.payload) == (2, 0)
    assert [fd_identity(fd) for fd in second.fds] == [fd_identity(machine.mem.regions[0].fd),
                                                      fd_identity(dimm.fd)]


def test_a_refused_activation_sets_needs_reset_and_holds_nothing(machine, backend):
    fs = make_fs(backend)
    backend.refuse.add(Request.ADD_MEM_REG)
    fds = open_fds(backend)
    transport, driver, queues = bring_up(machine, fs, queue_size=64)
    assert not fs.active
    assert driver.status() & DeviceStatus.DEVICE_NEEDS_RESET
    assert "SET_VRING_NUM" not in backend.requests()
    assert open_fds(backend) == fds + 2 + 3         # the transport's kick and vector eventfds


def test_relayed_calls_and_a_backend_hanging_up(backend):
    """Without a transport that offers irqfds (the harness), pych relays the calls; the
    back-end going away while the device runs is noticed and reported as NEEDS_RESET."""
    fs = make_fs(backend)
    with DeviceHarness(fs, queue_size=16) as h:
        assert fs.active
        [call] = [m for m in backend.of(Request.SET_VRING_CALL) if m.u64() == 1]
        os.eventfd_write(call.fds[0], 1)
        assert h.interrupt.wait(lambda i: i.queue_notifications.get(1) == 1)
        assert not h.interrupt.reset_requested
        backend.sock.shutdown(2)                                     # virtiofsd died
        assert h.interrupt.wait(lambda i: i.reset_requested)
    assert not fs.active                                             # shutdown still completes


FUSE_READ, FUSE_FORGET = 15, 2


REPLIES: dict[tuple[int, int], int] = {}          # (queue, head): its reply buffer


def fuse_request(h: DeviceHarness, queue: int, opcode: int, unique: int,
                 reply: int = 16 + 4096) -> int:
    """A FUSE request on ``queue``: a fuse_in_header (40 bytes) and a reply buffer of
    ``reply`` bytes (none for a FORGET)."""
    header = struct.pack("<IIQQIIII", 40, opcode, unique, 1, 0, 0, 0, 0)
    head = h.queue(queue).add_chain([header], [reply] if reply else [])
    if reply:
        REPLIES[queue, head] = h.queue(queue).writable_buffers(head)[0][0]
    return head


def fuse_reply(h: DeviceHarness, queue: int, head: int) -> tuple[int, int, int]:
    return struct.unpack("<IiQ", h.mem.read(REPLIES[queue, head], 16))


def test_virtiofsd_gone_mid_io_fails_its_requests_and_later_ones(backend):
    """virtiofsd killed with requests in flight: pych answers them, and every later one,
    -EIO (the guest's read ends with an error instead of hanging), reports the failure
    once, and a driver that activates again is refused."""
    failures = []
    fs = make_fs(backend)
    fs.on_failure = lambda name, why: failures.append((name, why))
    with DeviceHarness(fs, queue_size=16) as h:
        assert backend.wait_for(lambda b: b.of(Request.SET_VRING_KICK))
        pending = [fuse_request(h, 1, FUSE_READ, unique) for unique in (10, 12)]
        forget = fuse_request(h, 0, FUSE_FORGET, 14, reply=0)
        backend.sock.shutdown(2)                                     # virtiofsd killed
        assert h.interrupt.wait(lambda i: i.reset_requested)
        used = h.wait_used(1, 2)
        assert [e.id for e in used] == pending and {e.length for e in used} == {16}
        assert [fuse_reply(h, 1, head) for head in pending] == [(16, -5, 10), (16, -5, 12)]
        (element,) = h.wait_used(0, 1)
        assert (element.id, element.length) == (forget, 0)             # FORGET: no reply
        assert failures == [("fs", "the vhost-user backend at fake.sock hung up")]
        assert fs.failure == failures[0][1]
        # a request after the failure is answered at once, through the kick eventfd
        later = fuse_request(h, 1, FUSE_READ, 16)
        h.kick(1)
        (element,) = h.wait_used(1, 1)
        assert element.id == later and fuse_reply(h, 1, later) == (16, -5, 16)
        assert fs.failed_requests == 4 and failures == [failures[0]]
        with pytest.raises(ActivationError, match="fs: the vhost-user backend at fake.sock"):
            fs.activate(h.mem, [], h.interrupt)                      # no second activation
    assert not fs.active


# --- hot plug through the device manager and the VMM -------------------------------------------
@pytest.fixture
def hotplug():
    m = DeviceManagerMachine(vm_config())
    yield m
    m.close()


def test_add_fs_and_remove_it_leave_nothing_behind(hotplug, tmp_path):
    fds = open_fds()
    missing = tmp_path / "missing.sock"
    with pytest.raises(DeviceBackendError, match=f"virtio-fs _fs0: cannot connect to the "
                                                 f"vhost-user backend at {missing}"):
        hotplug.dm.hotplug(BY_NAME["fs"], FsConfig(tag="share", socket=str(missing)))
    assert open_fds() == fds
    assert hotplug.scan() == (0, 0) and set(hotplug.dm.device_tree()) == {"__rng", "_virtio-pci-__rng"}

    backend = FakeBackend(tmp_path / "virtiofsd.sock")
    try:
        fds = open_fds()
        added = hotplug.dm.hotplug(BY_NAME["fs"], FsConfig(tag="share", socket=backend.path))
        assert (added.id, added.bdf) == ("_fs0", "0000:00:02.0")      # the failure used no id
        assert hotplug.dm.pci.device(2).config_read(0, 4) == 0x105A_1AF4  # 1af4:1040+26
        assert hotplug.scan() == (1 << 2, 0)
        assert backend.requests() == NEGOTIATION
        hotplug.enable_decoding(2)
        hotplug.dm.remove_device("_fs0")
        assert not backend.eof                                      # until the guest ejects
        hotplug.eject(2)
        assert backend.wait_for(lambda b: b.eof)                    # hung up: virtiofsd exits
        assert "_fs0" not in hotplug.dm.device_tree()
        assert hotplug.dm.pci.device(2) is None
        assert open_fds() == fds                                    # socket, eventfds: all gone
    finally:
        backend.close()


def test_vm_add_fs_answers_400_for_a_missing_backend_and_200_otherwise(tmp_path):
    from pych.vmm import Vmm

    vmm = Vmm(event_monitor=RecordingEvents())
    vmm.vm_create(vm_config())
    m = boot_fake(vmm)
    backend = FakeBackend(tmp_path / "virtiofsd.sock")
    try:
        with pytest.raises(VmmError) as e:
            vmm.vm_add_fs(FsConfig(tag="t", socket=str(tmp_path / "nope.sock")))
        assert status_of(e.value) == 400
        assert e.value.messages == [
            "Error adding device to the VM",
            f"virtio-fs _fs0: cannot connect to the vhost-user backend at {tmp_path / 'nope.sock'}:"
            " No such file or directory"]
        assert vmm.config.fs is None
        info = vmm.vm_add_fs(FsConfig(tag="t", socket=backend.path))
        assert info.model_dump() == {"id": "_fs0", "bdf": "0000:00:02.0"}
        assert [(f.id, f.tag) for f in vmm.config.fs] == [("_fs0", "t")]
        vmm.vm_remove_device(VmRemoveDevice(id="_fs0"))
        assert vmm.config.fs is None
        m.eject(2)
        assert vmm.events.events == [("vm", "device-removed", {"id": "_fs0", "bdf": "0000:00:02.0"})]
        assert backend.wait_for(lambda b: b.eof)
    finally:
        m.close()
        backend.close()


def test_guest_memory_hot_plug_reaches_the_fs_devices(hotplug, tmp_path):
    backend = FakeBackend(tmp_path / "virtiofsd.sock")
    try:
        hotplug.dm.hotplug(BY_NAME["fs"], FsConfig(tag="share", socket=backend.path))
        fs = hotplug.dm.devices["_fs0"].device
        seen = []
        fs.memory_changed = lambda going=None: seen.append(going)
        dimm = object()
        hotplug.dm.memory_region_added(dimm)
        hotplug.dm.memory_region_removed(dimm)
        assert seen == [None, dimm]
    finally:
        hotplug.dm.close()
        backend.close()


# --- reboot: the connection is handed to the next boot's device -----------------------------------
def hand_over(fs: VirtioFs, machine: Machine) -> object:
    """Tear the first boot down as DeviceManager.close(keep_connections=True) does."""
    kept = fs.detach_backend()
    machine.close()                                     # the transports shut down
    return kept


@pytest.mark.parametrize("mem_slots", [True, False])
def test_a_reboot_keeps_the_connection_and_maps_the_new_guest_memory(backend, mem_slots):
    if not mem_slots:
        backend.protocol_features = ProtocolFeature.MQ | ProtocolFeature.REPLY_ACK
    first = Machine()
    first.msi = EventfdMsiManager()
    fs = make_fs(backend, name="_fs0")
    bring_up(first, fs, queue_size=64)
    old_memfd = fd_identity(first.mem.regions[0].fd)
    start = len(backend.messages)
    kept = hand_over(fs, first)
    first.msi.close()
    assert kept is not None and kept.connected and not backend.eof
    # the rings stopped as a driver reset stops them, then point at the parking page, and
    # the old RAM is unmapped: the back-end holds no address of the old VM
    parking = kept.parking
    assert (parking.guest_addr, parking.size) == ((1 << 52) - 4096, 4096)    # no guest's
    if mem_slots:
        parked = ["ADD_MEM_REG", "SET_VRING_ADDR", "SET_VRING_ADDR", "REM_MEM_REG"]
    else:
        parked = ["SET_MEM_TABLE", "SET_VRING_ADDR", "SET_VRING_ADDR", "SET_MEM_TABLE"]
    assert requests_after(backend, start) == ["SET_VRING_ENABLE", "GET_VRING_BASE"] * 2 + parked
    assert backend.regions == [(parking.guest_addr, 4096, parking.user_addr)]
    assert set(backend.rings.values()) == {(parking.user_addr,) * 3}

    second = Machine()
    second.msi = EventfdMsiManager()
    try:
        start = len(backend.messages)
        again = VirtioFs("hostfs", "fake.sock", name="_fs0", connection=kept)
        # owned once per connection, protocol features as negotiated: only re-read
        assert requests_after(backend, start) == (["GET_FEATURES", "GET_QUEUE_NUM"]
                                                  + (["GET_MAX_MEM_SLOTS"] if mem_slots else []))
        assert again.protocol_features == fs.protocol_features
        assert again.max_regions == fs.max_regions
        start = len(backend.messages)
        bring_up(second, again, queue_size=64)
        assert again.active
        sent = backend.messages[start:]
        assert [m.name for m in sent[:2]] == ["SET_FEATURES",
                                              "ADD_MEM_REG" if mem_slots else "SET_MEM_TABLE"]
        new_memfd = fd_identity(second.mem.regions[0].fd)
        assert new_memfd != old_memfd
        # the new VM's memfd; the parking page stays (in a table of its own, or already there)
        assert [fd_identity(fd) for fd in sent[1].fds] == (
            [new_memfd] if mem_slots else [new_memfd, fd_identity(parking.fd)])
        assert requests_after(backend, start + 2).count("SET_VRING_KICK") == 2
        assert backend.of(Request.SET_OWNER) == [backend.messages[0]]   # one session
        assert backend.panic is None and not backend.eof
        region = second.mem.regions[0]
        assert sorted(backend.regions) == [(0, region.size, region.host_addr),
                                           (parking.guest_addr, 4096, parking.user_addr)]
    finally:
        second.close()                                  # shut down for real: hangs up
        second.msi.close()
    assert backend.wait_for(lambda b: b.eof)


def test_a_broken_connection_is_not_handed_over(backend):
    fs = make_fs(backend)
    with DeviceHarness(fs, queue_size=16) as h:
        backend.sock.shutdown(2)                                     # virtiofsd died
        assert h.interrupt.wait(lambda i: i.reset_requested)
        assert fs.detach_backend() is None                           # the next boot connects anew


class FakeVm:
    """pych.vm.Vm's interface for the VMM's boot and reboot path: each boot builds a
    DeviceManagerMachine (new guest RAM) given the VMM's kept vhost-user connections."""

    def __init__(self, config, kvm, *, on_exit, serial_port=None, vhost_user=None,
                 on_guest_event=None,
                 on_device_failed=None, after_answer=None):
        self.config, self.vhost_user = config, vhost_user

    def boot(self):
        self.machine = DeviceManagerMachine(self.config, vhost_user=self.vhost_user)
        self.devices, self.mem = self.machine.dm, self.machine.mem

    def close(self, *, keep_connections=False):
        self.devices.close(keep_connections=keep_connections)
        self.mem.close()


def activate(machine, slot: int) -> None:
    """The guest's virtiofs driver probes the device at ``slot`` and sets DRIVER_OK."""
    driver = LinuxDriver(machine, slot)
    driver.probe()
    driver.enable_msix(3)
    driver.negotiate((1 << 64) - 1)
    for index in range(2):
        driver.setup_queue(index, vector=index + 1, size=64)
    driver.add_status(DeviceStatus.DRIVER_OK)


@pytest.fixture
def rebootable_vmm(monkeypatch):
    from pych.vmm import Vmm

    monkeypatch.setattr("pych.vmm.vmm.Vm", FakeVm)
    vmm = Vmm(event_monitor=RecordingEvents())
    vmm._kvm = SimpleNamespace(close=lambda: None)
    yield vmm
    vmm.close()


def test_vm_reboot_hands_boot_and_hot_added_shares_over_and_hangs_up_on_removed_ones(
        rebootable_vmm, tmp_path):
    vmm = rebootable_vmm
    boot, hot, removed = (FakeBackend(tmp_path / f"{n}.sock", check_rings=True)
                          for n in ("boot", "hot", "gone"))
    try:
        vmm.vm_create(vm_config(fs=[{"tag": "boot", "socket": boot.path}]))
        vmm.vm_boot()
        first = vmm.vm
        activate(first.machine, 2)                                   # _fs0 at 00:02.0
        assert first.devices.devices["_fs0"].device.active
        assert vmm.vm_add_fs(FsConfig(tag="hot", socket=hot.path)).id == "_fs1"
        assert vmm.vm_add_fs(FsConfig(tag="gone", socket=removed.path)).id == "_fs2"
        vmm.vm_remove_device(VmRemoveDevice(id="_fs2"))              # pending: never ejected
        starts = {b: len(b.messages) for b in (boot, hot)}

        vmm.vm_reboot()
        assert vmm.vm is not first and vmm.events.events[-4:] == [
            ("vm", "rebooting", None), ("vm", "booting", None), ("vm", "booted", None),
            ("vm", "rebooted", None)]
        assert removed.wait_for(lambda b: b.eof)                     # not in the config any more
        assert not boot.eof and not hot.eof
        assert (boot.connections, hot.connections) == (1, 1)         # the very same connections
        assert requests_after(boot, starts[boot]) == [
            "SET_VRING_ENABLE", "GET_VRING_BASE", "SET_VRING_ENABLE", "GET_VRING_BASE",
            "ADD_MEM_REG", "SET_VRING_ADDR", "SET_VRING_ADDR", "REM_MEM_REG",     # parked
            "GET_FEATURES", "GET_QUEUE_NUM", "GET_MAX_MEM_SLOTS"]
        assert requests_after(hot, starts[hot]) == ["GET_FEATURES", "GET_QUEUE_NUM",
                                                    "GET_MAX_MEM_SLOTS"]   # never activated
        assert len(vmm._vhost_user) == 0
        # both are boot devices now, in the reference's order (fs after the rng)
        assert sorted(vmm.vm.devices.devices) == ["__rng", "_fs0", "_fs1"]

        start = len(boot.messages)
        activate(vmm.vm.machine, 2)
        add = boot.messages[start + 1]
        assert (add.name, [fd_identity(fd) for fd in add.fds]) == (
            "ADD_MEM_REG", [fd_identity(vmm.vm.mem.regions[0].fd)])   # the new VM's memfd
        assert vmm.vm.devices.devices["_fs0"].device.active and boot.panic is None

        vmm.vm_shutdown()                                            # for real: hangs up
        assert boot.wait_for(lambda b: b.eof) and hot.wait_for(lambda b: b.eof)
    finally:
        for b in (boot, hot, removed):
            b.close()


def test_a_failed_reboot_hangs_up_on_the_kept_connections(rebootable_vmm, tmp_path):
    vmm = rebootable_vmm
    backend = FakeBackend(tmp_path / "virtiofsd.sock")
    try:
        vmm.vm_create(vm_config(fs=[{"tag": "t", "socket": backend.path}]))
        vmm.vm_boot()
        vmm.config.disks = [DiskConfig(path=str(tmp_path / "gone.raw"))]   # made before fs
        with pytest.raises(DeviceBackendError, match="gone.raw"):
            vmm.vm_reboot()
        assert vmm.exit_code == 1 and vmm.vm is None
        assert backend.wait_for(lambda b: b.eof) and len(vmm._vhost_user) == 0
    finally:
        backend.close()


def test_vmm_exit_after_a_reboot_hangs_up(rebootable_vmm, tmp_path):
    vmm = rebootable_vmm
    backend = FakeBackend(tmp_path / "virtiofsd.sock")
    try:
        vmm.vm_create(vm_config(fs=[{"tag": "t", "socket": backend.path}]))
        vmm.vm_boot()
        vmm._guest_exit(vmm.vm, "reset", "")                         # the guest rebooted
        assert vmm.vm is not None and not backend.eof and backend.connections == 1
        vmm.vmm_shutdown()
        assert backend.wait_for(lambda b: b.eof)
    finally:
        backend.close()


# --- the real virtiofsd ---------------------------------------------------------------------------
FUSE_LOOKUP, FUSE_OPEN, FUSE_READ, FUSE_INIT = 1, 14, 15, 26
_IN_HEADER = struct.Struct("<IIQQIIIHH")        # len, opcode, unique, nodeid, uid, gid, pid, extlen, pad
_OUT_HEADER = struct.Struct("<IiQ")             # len, error, unique


@pytest.fixture
def virtiofsd(tmp_path):
    if not os.path.exists(VIRTIOFSD) or os.geteuid() != 0:
        pytest.skip(f"needs {VIRTIOFSD} (Debian's qemu-system-common, scripts/install-deps.sh) "
                    "and root")
    share = tmp_path / "share"
    share.mkdir()
    socket_path = str(tmp_path / "virtiofsd.sock")
    log = open(tmp_path / "virtiofsd.log", "wb")
    proc = subprocess.Popen([VIRTIOFSD, f"--socket-path={socket_path}", "-o", f"source={share}",
                             "-o", "cache=none"], stdout=log, stderr=subprocess.STDOUT)
    assert wait_until(lambda: unix_socket_listening(socket_path) or proc.poll() is not None, 10)
    yield proc, socket_path, share
    if proc.poll() is None:
        proc.kill()
    proc.wait()
    log.close()


_unique = itertools.count(1)


def request(h, opcode, nodeid, args, reply_size=4096):
    """One FUSE request on the harness's request queue (1), as the guest's driver sends it;
    returns the reply's payload."""
    u = next(_unique)
    body = _IN_HEADER.pack(_IN_HEADER.size + len(args), opcode, u, nodeid, 0, 0, 0, 0, 0) + args
    mq = h.queue(1)
    head = mq.add_chain([body], [reply_size])
    buffers = mq.writable_buffers(head)
    h.kick(1)
    [used] = h.wait_used(1)
    data = mq.read_writable(buffers)
    length, error, got = _OUT_HEADER.unpack_from(data)
    assert (used.id, got, error) == (head, u, 0)
    assert used.length == length
    return data[_OUT_HEADER.size:length]


def open_and_read(h, name: bytes) -> tuple[int, int, bytes]:
    """A new FUSE session (INIT), then LOOKUP, OPEN and READ of ``name``: (nodeid, fh, data)."""
    init = request(h, FUSE_INIT, 0, struct.pack("<IIII", 7, 31, 0, 0))
    assert struct.unpack_from("<I", init) == (7,)                        # FUSE 7.x agreed
    entry = request(h, FUSE_LOOKUP, 1, name + b"\0")
    nodeid = struct.unpack_from("<Q", entry)[0]
    fh = struct.unpack_from("<Q", request(h, FUSE_OPEN, nodeid, struct.pack("<II", os.O_RDONLY, 0)))[0]
    # as Linux does, the reply buffer is as large as the read (virtiofsd reads into all of
    # it, and refuses a smaller one with E2BIG)
    data = request(h, FUSE_READ, nodeid, struct.pack("<QQIIQII", fh, 0, 1024, 0, 0, 0, 0),
                   reply_size=_OUT_HEADER.size + 1024)
    return nodeid, fh, data


def test_fuse_requests_through_debians_virtiofsd(virtiofsd):
    proc, socket_path, share = virtiofsd
    (share / "hello.txt").write_bytes(b"hello from the host\n")
    fs = VirtioFs("hostfs", socket_path, queue_size=1024, name="fs0")

    with DeviceHarness(fs, queue_size=16) as h:
        nodeid, fh, data = open_and_read(h, b"hello.txt")
        assert data == b"hello from the host\n"

        # RAM plugged while the device runs (ADD_MEM_REG): virtiofsd writes a reply there
        dimm = h.mem.add_region(1 << 32, 2 * MiB, name="dimm0")
        fs.memory_changed()
        mq = h.queue(1)
        body = _IN_HEADER.pack(_IN_HEADER.size + 40, FUSE_READ, 99, nodeid, 0, 0, 0, 0, 0)
        mq.set_descriptor(14, mq.buffer(body + struct.pack("<QQIIQII", fh, 6, 64, 0, 0, 0, 0)),
                          _IN_HEADER.size + 40, VIRTQ_DESC_F_NEXT, next=15)
        mq.set_descriptor(15, dimm.gpa + 0x1000, _OUT_HEADER.size + 64, VIRTQ_DESC_F_WRITE)
        mq.publish(14)
        h.kick(1)
        assert h.wait_used(1) == [(14, _OUT_HEADER.size + 14)]
        assert _OUT_HEADER.unpack(h.mem.read(dimm.gpa + 0x1000, 16)) == (30, 0, 99)
        assert h.mem.read(dimm.gpa + 0x1000 + 16, 14) == b"from the host\n"
        # and unplugged again (REM_MEM_REG): the device goes on
        h.mem.remove_region(dimm)
        fs.memory_changed()
        assert request(h, FUSE_READ, nodeid, struct.pack("<QQIIQII", fh, 0, 5, 0, 0, 0, 0),
                       reply_size=_OUT_HEADER.size + 5) == b"hello"
        # the replies came back as interrupts through pych's relay (no transport here)
        assert h.interrupt.queue_notifications.get(1, 0) >= 1
    # removal hung up: virtiofsd exits by itself
    proc.wait(10)


def test_debians_virtiofsd_serves_the_next_boot_on_the_kept_connection(virtiofsd):
    """A reboot with the real back-end: the first boot's device stops its rings, unmaps its
    RAM and hands the connection over; the next boot's device, in new guest memory, starts
    a new FUSE session on it. Hanging up would have made virtiofsd exit."""
    proc, socket_path, share = virtiofsd
    (share / "hello.txt").write_bytes(b"hello from the host\n")
    fs = VirtioFs("hostfs", socket_path, queue_size=1024, name="_fs0")
    with DeviceHarness(fs, queue_size=16) as h:
        assert open_and_read(h, b"hello.txt")[2] == b"hello from the host\n"
        h.mem.add_region(1 << 32, 2 * MiB, name="dimm0")             # two regions to unmap
        fs.memory_changed()
        kept = fs.detach_backend()
    assert kept is not None and kept.connected and proc.poll() is None
    (share / "after.txt").write_bytes(b"after the reboot\n")
    again = VirtioFs("hostfs", socket_path, queue_size=1024, name="_fs0", connection=kept)
    with DeviceHarness(again, queue_size=16) as h:                     # new memfds
        assert open_and_read(h, b"after.txt")[2] == b"after the reboot\n"
    proc.wait(10)                                                      # shut down for real
