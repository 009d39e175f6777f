"""A vhost-user connection handed over by a local live migration (VhostUserDevice.
release_backend on the sender, adoption on the receiver), without KVM: the sender's device
lets go without a word to the back-end and takes everything back when the migration fails;
the receiver's device and transport take the socket, the kick eventfds (as the queues'
ioeventfds) and the call eventfds (as the MSI-X vectors' irqfds, or its relay) and send
nothing until the first change of the memory table, when they move the back-end's table
and ring addresses to their own (the sender's user addresses mean nothing here). Against
the recording fake back-end, and against Debian's virtiofsd, whose FUSE session (an open
file) must survive.

The descriptors are passed with os.dup here: what SCM_RIGHTS gives the receiver (the same
open files), without a socket in between (tests/unit/migration has the protocol).
"""

from __future__ import annotations

import os
import struct

import pytest

from pych.devices.vhost_user import (PARKING_GPA, VRING_ADDR,
                                     ProtocolFeature, Request, VhostUserError,
                                     VhostUserFrontend)
from pych.devices.virtio.device import ActiveQueue, DeviceStatus
from pych.devices.virtio.fs import VirtioFs
from pych.devices.virtio.pci_transport import CommonCfg, VirtioPciDevice
from pych.devices.virtio.queue import VIRTQ_DESC_F_NEXT, VIRTQ_DESC_F_WRITE, Virtqueue
from pych.devices.virtio.vhost_user_device import AdoptedBackend
from pych.memory.guest_memory import GuestMemory

from tests.support.fakes import RecordingInterrupt
from tests.support.virtio import DeviceHarness, wait_until
from tests.unit.devices.test_vhost_user import FakeBackend, fd_identity
from tests.unit.devices.virtio.test_fs import (_IN_HEADER, _OUT_HEADER, FUSE_READ,
                                               EventfdMsiManager, make_fs, open_and_read,
                                               request, same_eventfd, virtiofsd)  # noqa: F401
from tests.unit.devices.virtio.test_pci import Machine, bring_up
from tests.support.host import fd_is_open

MiB = 1 << 20


@pytest.fixture
def backend():
    b = FakeBackend(check_rings=True)
    # as VhostUserFrontend.connect's: with a timeout (the socket's file status flags are
    # shared with the receiver's descriptor, which uses one too)
    b._client.settimeout(30)
    yield b
    b.close()


def release(device) -> tuple[dict, list[int]]:
    """The sender's side: the hand-over spec and the descriptors as the receiver gets them."""
    fds: list[int] = []
    index: dict[int, int] = {}

    def take(fd: int) -> int:
        if fd not in index:
            index[fd] = len(fds)
            fds.append(fd)
        return index[fd]

    spec = device.release_backend(take)
    return spec, [os.dup(fd) for fd in fds]


def twin_memory(mem: GuestMemory) -> GuestMemory:
    """The receiver's RAM: the sender's memfds mapped again (a local migration)."""
    twin = GuestMemory()
    for r in mem.regions:
        twin.add_region(r.gpa, r.size, fd=os.dup(r.fd), fd_offset=r.fd_offset, name=r.name)
    return twin


def _adopt_fd(vector, fd: int) -> None:
    os.close(vector.fd)
    vector.fd = fd
    vector.adopted = True


class AdoptingMsiManager(EventfdMsiManager):
    """Eventfd-backed vectors that can take another eventfd as their irqfd, as
    KvmMsiVector.adopt_fd does."""

    def create_msix_group(self, count: int):
        group = super().create_msix_group(count)
        for v in group.vectors:
            v.adopt_fd = lambda fd, v=v: _adopt_fd(v, fd)
            v.irqfd_held = True
            v.detach_irqfd = lambda v=v: setattr(v, "irqfd_held", False)
            v.attach_irqfd = lambda v=v: setattr(v, "irqfd_held", True)
        return group


class MsiMachine(Machine):
    """A test PCI machine whose MSI-X manager (eventfd-backed, as the VMM's) goes with it."""

    def __init__(self, msi_class=None):
        super().__init__()
        self.msi = (msi_class or EventfdMsiManager)()

    def close(self) -> None:
        super().close()
        self.msi.close()


def receiver_machine(source: Machine) -> Machine:
    m = MsiMachine(AdoptingMsiManager)
    m.mem.close()
    m.mem = twin_memory(source.mem)
    return m


def adopt_on(machine: Machine, spec: dict, fds: list[int], saved: dict, *,
             name: str = "_fs0") -> tuple[VirtioFs, VirtioPciDevice]:
    """The receiver's side, as DeviceManager and VmTarget do it: the device adopts the
    connection, its transport the eventfds, then the transport's state is restored."""
    fs = VirtioFs("hostfs", "fake.sock", name=name,
                  adopted=AdoptedBackend.from_handover(spec, fds, "fake.sock"))
    transport = VirtioPciDevice(fs, machine.mem, machine.msi, machine.ioevents)
    transport.adopt_notifiers(*fs.take_adopted_notifiers())
    machine.pci.add_device(transport)
    transport.restore_state(saved)
    machine.pci.restore_bars()
    return fs, transport


# --- against the recording back-end ------------------------------------------------------------
def test_the_sender_lets_go_silently_and_the_receiver_adopts_without_a_word(backend):
    source = MsiMachine()
    fs = make_fs(backend, name="_fs0")
    transport, driver, queues = bring_up(source, fs, queue_size=64)
    msix = source.msi.groups[0].vectors
    kicks = {i: backend.of(Request.SET_VRING_KICK)[i].fds[0] for i in range(2)}
    saved = transport.save_state()
    sent = len(backend.messages)

    spec, fds = release(fs)
    assert len(backend.messages) == sent                 # not a word to the back-end
    assert sorted(spec["rings"]) == ["0", "1"]
    assert [spec["rings"][q]["vector"] for q in ("0", "1")] == [1, 2]
    session = spec["session"]
    assert session["connection"]["owned"] and session["connection"]["reply_ack"]
    region = source.mem.regions[0]
    assert session["table"] == [[0, region.size, region.host_addr, 0]]

    receiver = receiver_machine(source)
    try:
        fs2, transport2 = adopt_on(receiver, spec, fds, saved)
        assert len(backend.messages) == sent             # still nothing: no handshake
        assert fs2.active and fs2.acked_features == fs.acked_features
        assert fs2.avail_features == fs.avail_features and fs2.max_regions == fs.max_regions
        assert transport2.status & DeviceStatus.DRIVER_OK
        # the receiver's ioeventfds are the back-end's kick eventfds
        for index in range(2):
            address = driver.bar + 0x3000 + 4 * index
            assert same_eventfd(receiver.ioevents.fd_at(address), kicks[index])
        # its vectors' irqfds the back-end's call eventfds
        vectors = receiver.msi.groups[0].vectors
        for index in range(2):
            [call] = [m for m in backend.of(Request.SET_VRING_CALL) if m.u64() == index]
            assert getattr(vectors[index + 1], "adopted", False)
            assert same_eventfd(vectors[index + 1].fd, call.fds[0])
            assert same_eventfd(vectors[index + 1].fd, msix[index + 1].fd)
        fs2.commit_adoption()
        # the sender's VM ends: its device closes its descriptors and hangs up on no one
        source.close()
        assert len(backend.messages) == sent and not backend.eof
    finally:
        receiver.close()                                 # the receiver's VM ends: hangs up
    assert backend.wait_for(lambda b: b.eof)


def test_a_failed_migration_gives_the_sender_everything_back(backend):
    source = MsiMachine(AdoptingMsiManager)
    fs = make_fs(backend, name="_fs0")
    transport, driver, queues = bring_up(source, fs, queue_size=64)
    saved = transport.save_state()
    sent = len(backend.messages)
    spec, fds = release(fs)
    # the queues' vectors let their irqfds go (the receiver's VM registers those eventfds)
    vectors = source.msi.groups[0].vectors
    assert [v.irqfd_held for v in vectors] == [True, False, False]
    receiver = receiver_machine(source)
    try:
        adopt_on(receiver, spec, fds, saved)
    finally:
        receiver.close()                     # the receiver gave up before COMPLETE
    assert len(backend.messages) == sent and not backend.eof    # it sent nothing either
    fs.retake_backend()
    assert fs.active and all(v.irqfd_held for v in vectors)
    # the sender serves again: a driver reset stops the rings as usual
    driver.common_write(CommonCfg.DEVICE_STATUS, 1, 0)
    assert backend.requests()[sent:] == ["SET_VRING_ENABLE", "GET_VRING_BASE"] * 2
    source.close()
    assert backend.wait_for(lambda b: b.eof)


@pytest.mark.parametrize("mem_slots", [True, False])
def test_the_first_memory_change_moves_the_table_and_rings_to_the_receiver(backend, mem_slots):
    if not mem_slots:
        backend.protocol_features = ProtocolFeature.MQ | ProtocolFeature.REPLY_ACK
    source = MsiMachine()
    fs = make_fs(backend, name="_fs0")
    transport, driver, queues = bring_up(source, fs, queue_size=64)
    saved = transport.save_state()
    spec, fds = release(fs)
    old = source.mem.regions[0]
    old_addr, old_memfd = old.host_addr, fd_identity(old.fd)
    receiver = receiver_machine(source)
    try:
        fs2, _ = adopt_on(receiver, spec, fds, saved)
        fs2.commit_adoption()
        source.close()
        new = receiver.mem.regions[0]
        assert new.host_addr != old_addr and fd_identity(new.fd) == old_memfd
        start = len(backend.messages)
        dimm = receiver.mem.add_region(1 << 32, 2 * MiB, name="dimm0")
        fs2.memory_changed()
        if mem_slots:
            # this process's RAM and the DIMM beside the sender's, the rings moved, the
            # sender's entry gone
            expected = ["ADD_MEM_REG", "ADD_MEM_REG", "SET_VRING_ADDR", "SET_VRING_ADDR",
                        "REM_MEM_REG"]
        else:
            # a table of both, the rings moved, a table of this process's alone
            expected = ["SET_MEM_TABLE", "SET_VRING_ADDR", "SET_VRING_ADDR", "SET_MEM_TABLE"]
        assert backend.requests()[start:] == expected
        assert backend.panic is None           # every ring mapped at every step (check_rings)
        # the rings at this process's addresses of the same guest addresses
        for index, mq in enumerate(queues):
            [addr] = [m for m in backend.messages[start:] if m.request == Request.SET_VRING_ADDR
                      and m.payload[:4] == struct.pack("<I", index)]
            assert VRING_ADDR.unpack(addr.payload) == (
                index, 0, new.host_addr + mq.desc_table, new.host_addr + mq.used_ring,
                new.host_addr + mq.avail_ring, 0)
        assert sorted(backend.regions) == [(0, new.size, new.host_addr),
                                           (1 << 32, 2 * MiB, dimm.host_addr)]
        # and from now on as any device: the DIMM goes with one REM_MEM_REG
        start = len(backend.messages)
        fs2.memory_changed(going=dimm)
        assert backend.requests()[start:] == (["REM_MEM_REG"] if mem_slots
                                              else ["SET_MEM_TABLE"])
    finally:
        receiver.close()


def test_a_reboot_after_the_migration_parks_the_rings_and_unmaps_the_senders_table(backend):
    source = MsiMachine()
    fs = make_fs(backend, name="_fs0")
    transport, _, _ = bring_up(source, fs, queue_size=64)
    saved = transport.save_state()
    spec, fds = release(fs)
    receiver = receiver_machine(source)
    fs2, _ = adopt_on(receiver, spec, fds, saved)
    fs2.commit_adoption()
    source.close()
    kept = fs2.detach_backend()
    receiver.close()
    try:
        assert kept is not None and kept.connected and backend.panic is None
        parking = kept.parking
        # nothing of either VM is left in the back-end: only the parking page
        assert backend.regions == [(PARKING_GPA, 4096, parking.user_addr)]
        assert set(backend.rings.values()) == {(parking.user_addr,) * 3}
    finally:
        kept.close()


def test_an_adoption_that_does_not_match_the_restored_device_fails_the_migration(backend):
    source = MsiMachine()
    fs = make_fs(backend, name="_fs0")
    transport, _, _ = bring_up(source, fs, queue_size=64)
    saved = transport.save_state()
    spec, fds = release(fs)
    dropped = spec["rings"].pop("1")        # the sender said one ring; the driver enabled two
    receiver = receiver_machine(source)
    try:
        with pytest.raises(VhostUserError, match="the back-end runs rings \\[0\\] but the "
                                                 "driver enabled queues \\[0, 1\\]"):
            adopt_on(receiver, spec, fds, saved)
    finally:
        receiver.close()
        for key in ("kick", "call"):
            os.close(fds[dropped[key]])
    assert not backend.eof                  # the sender still holds the connection
    fs.retake_backend()
    source.close()


def test_a_device_that_cannot_be_handed_over_says_why(backend):
    fs = make_fs(backend, name="_fs0")
    try:
        fs.failure = "the vhost-user backend at fake.sock hung up"
        assert "the device has failed" in fs.can_hand_over()
        with pytest.raises(VhostUserError, match="the device has failed"):
            fs.release_backend(lambda fd: 0)
    finally:
        fs.shutdown()


def test_an_adopted_connection_never_activated_closes_only_its_descriptors(backend):
    fs = make_fs(backend, name="_fs0")
    with DeviceHarness(fs, queue_size=16):
        spec, fds = release(fs)
        before = len(os.listdir("/proc/self/fd"))
        fs2 = VirtioFs("hostfs", "fake.sock", name="_fs0",
                       adopted=AdoptedBackend.from_handover(spec, fds, "fake.sock"))
        fs2.shutdown()
        assert len(os.listdir("/proc/self/fd")) == before - len(fds)
        assert not backend.eof
        fs.retake_backend()
    assert backend.wait_for(lambda b: b.eof)


def test_adopt_refuses_a_descriptor_that_is_not_a_unix_stream_socket():
    fd = os.eventfd(0)
    with pytest.raises(OSError):
        VhostUserFrontend.adopt(fd, "fake.sock", {"owned": True, "protocol_features": 0,
                                                  "reply_ack": False, "ring_addrs": {}})
    with pytest.raises(OSError):
        os.fstat(fd)                         # taken, and closed


# --- against Debian's virtiofsd ------------------------------------------------------------------
def test_debians_virtiofsd_keeps_the_fuse_session_across_a_local_migration(virtiofsd):
    """The sender's device opens a file; its connection is handed over; the receiver's
    device, mapping the same memfds at other addresses, reads through the same open file
    handle, then plugs RAM (the table and rings move to its addresses) and reads into it.
    The sender's device ends without virtiofsd noticing; the receiver's end stops it."""
    proc, socket_path, share = virtiofsd
    (share / "hello.txt").write_bytes(b"hello from the host\n")
    fs = VirtioFs("hostfs", socket_path, queue_size=1024, name="_fs0")
    with DeviceHarness(fs, queue_size=16) as h:                 # h: the guest's driver
        nodeid, fh, data = open_and_read(h, b"hello.txt")
        assert data == b"hello from the host\n"
        spec, fds = release(fs)
        assert all(ring["vector"] is None for ring in spec["rings"].values())   # relayed

        mem2 = twin_memory(h.mem)
        fs2 = VirtioFs("hostfs", socket_path, queue_size=1024, name="_fs0",
                       adopted=AdoptedBackend.from_handover(spec, fds, socket_path))
        fs2.ack_features(fs.acked_features)
        queues = []
        for index, ring in sorted(spec["rings"].items()):
            mq = h.queue(int(index))
            queues.append(ActiveQueue(int(index), Virtqueue(mem2, mq.size, mq.desc_table,
                                                            mq.avail_ring, mq.used_ring),
                                      fds[ring["kick"]]))
        interrupt = RecordingInterrupt()
        fs2.activate(mem2, queues, interrupt)
        fs2.commit_adoption()
        fs.shutdown()                                            # the sender's VM ends
        assert proc.poll() is None

        # the same FUSE session: the file handle opened before reads on
        read = struct.pack("<QQIIQII", fh, 6, 14, 0, 0, 0, 0)
        assert request(h, FUSE_READ, nodeid, read, reply_size=_OUT_HEADER.size + 14) == \
            b"from the host\n"
        assert wait_until(lambda: interrupt.queue_notifications.get(1, 0) >= 1, 5)

        # RAM plugged on the receiver: the back-end's table and rings move here first
        dimm = mem2.add_region(1 << 32, 2 * MiB, name="dimm0")
        fs2.memory_changed()
        mq = h.queue(1)
        body = _IN_HEADER.pack(_IN_HEADER.size + 40, FUSE_READ, 99, nodeid, 0, 0, 0, 0, 0)
        mq.set_descriptor(14, mq.buffer(body + struct.pack("<QQIIQII", fh, 0, 5, 0, 0, 0, 0)),
                          _IN_HEADER.size + 40, VIRTQ_DESC_F_NEXT, next=15)
        mq.set_descriptor(15, dimm.gpa, _OUT_HEADER.size + 5, VIRTQ_DESC_F_WRITE)
        mq.publish(14)
        h.kick(1)
        assert h.wait_used(1) == [(14, _OUT_HEADER.size + 5)]
        assert mem2.read(dimm.gpa + _OUT_HEADER.size, 5) == b"hello"
        assert proc.poll() is None
        fs2.shutdown()                                           # the receiver's VM ends
        for queue in queues:
            os.close(queue.kick_fd)
        mem2.close()
    proc.wait(10)                                                # hung up: virtiofsd exits


def test_a_connection_parked_by_a_reboot_before_the_migration_moves_too(backend):
    """The sender's VM had rebooted (its connection's rings were parked on its parking page,
    which the back-end maps and the sender keeps in its table): the receiver's first table
    change removes that entry with the sender's others, and the back-end ends with no
    address of the sender's (the rings run in the receiver's RAM; no ring is left parked,
    so the receiver needs no parking page of its own until it parks rings itself)."""
    first = MsiMachine()
    fs = make_fs(backend, name="_fs0")
    bring_up(first, fs, queue_size=64)
    kept = fs.detach_backend()
    first.close()
    source = MsiMachine()
    again = VirtioFs("hostfs", "fake.sock", name="_fs0", connection=kept)
    transport, _, queues = bring_up(source, again, queue_size=64)
    sender_parking = kept.parking
    saved = transport.save_state()
    spec, fds = release(again)
    assert [PARKING_GPA, 4096, sender_parking.user_addr, 0] in spec["session"]["table"]
    receiver = receiver_machine(source)
    try:
        fs2, _ = adopt_on(receiver, spec, fds, saved)
        fs2.commit_adoption()
        source.close()
        dimm = receiver.mem.add_region(1 << 32, 2 * MiB, name="dimm0")
        fs2.memory_changed()
        assert backend.panic is None                   # every ring mapped at every step
        new = receiver.mem.regions[0]
        assert sorted(backend.regions) == [(0, new.size, new.host_addr),
                                           (1 << 32, 2 * MiB, dimm.host_addr)]
        for desc, used, avail in backend.rings.values():
            assert all(new.host_addr <= a < new.host_addr + new.size for a in (desc, used, avail))
        # a reboot there parks the rings on a page of the receiver's own
        kept2 = fs2.detach_backend()
        assert kept2 is not None and backend.panic is None
        assert backend.regions == [(PARKING_GPA, 4096, kept2.parking.user_addr)]
        kept2.close()
    finally:
        receiver.close()


def test_a_transport_whose_bar_is_mapped_moves_its_ioeventfds_to_adopted_kick_eventfds(backend):
    m = MsiMachine(AdoptingMsiManager)
    fs = make_fs(backend)
    try:
        transport, driver, _ = bring_up(m, fs, queue_size=64)
        address = driver.bar + 0x3000 + 4                  # queue 1's notify address
        old = m.ioevents.fd_at(address)
        kick, call = os.eventfd(0), os.eventfd(0)
        transport.adopt_notifiers({1: kick}, {2: call})
        assert m.ioevents.fd_at(address) == kick and not fd_is_open(old)
        assert m.ioevents.fd_at(driver.bar + 0x3000) not in (None, kick)   # queue 0 kept its own
        assert m.msi.groups[0].vectors[2].fd == call
        with pytest.raises(ValueError, match="no queue 7"):
            transport.adopt_notifiers({7: kick}, {})
    finally:
        m.close()



# --- vhost-user-blk on a back-end someone else runs: handed over the same way -------------------
def test_a_vhost_user_blk_connection_is_adopted_with_its_configuration_space():
    from pych.devices.virtio.vhost_user_blk import VhostUserBlock
    from tests.unit.devices.virtio.test_vhost_user_blk import (QSD_FEATURES,
                                                               QSD_PROTOCOL_FEATURES, blk_config)
    backend = FakeBackend(features=QSD_FEATURES, protocol_features=QSD_PROTOCOL_FEATURES,
                          queue_num=4, check_rings=True)
    backend.config = blk_config(capacity=12345)
    backend._client.settimeout(30)
    source = MsiMachine()
    blk = VhostUserBlock("qsd.sock", connect=lambda path: backend.frontend(), name="_disk0")
    receiver = None
    try:
        transport, _, _ = bring_up(source, blk, queue_size=64)
        saved = transport.save_state()
        sent = len(backend.messages)
        spec, fds = release(blk)
        assert spec["session"]["device"]["config"] == blk.config_bytes().hex()
        receiver = receiver_machine(source)
        blk2 = VhostUserBlock("qsd.sock", name="_disk0",
                              adopted=AdoptedBackend.from_handover(spec, fds, "qsd.sock"))
        assert blk2.capacity == 12345 and blk2.config_bytes() == blk.config_bytes()
        transport2 = VirtioPciDevice(blk2, receiver.mem, receiver.msi, receiver.ioevents)
        transport2.adopt_notifiers(*blk2.take_adopted_notifiers())
        receiver.pci.add_device(transport2)
        transport2.restore_state(saved)
        receiver.pci.restore_bars()
        blk2.commit_adoption()
        assert blk2.active and len(backend.messages) == sent      # no GET_CONFIG, nothing
        source.close()
        assert not backend.eof
    finally:
        if receiver is not None:
            receiver.close()
        backend.close()


def test_qemu_storage_daemon_serves_the_adopted_connection(tmp_path):
    """A qemu-storage-daemon someone else runs (``vhost_user=on,socket=``): the receiver's
    device reads the disk through the connection the sender's device handed over, after
    the sender's ended."""
    import shutil
    from pych.devices.storage_daemon import StorageDaemon, connect_when_listening
    from pych.devices.virtio.vhost_user_blk import VhostUserBlock
    if shutil.which("qemu-storage-daemon") is None or os.geteuid() != 0:
        pytest.skip("needs qemu-storage-daemon (scripts/install-deps.sh) and root")
    image = tmp_path / "disk.raw"
    image.write_bytes(b"".join(i.to_bytes(2, "little") * 256 for i in range(2048)))
    daemon = StorageDaemon(str(image), "raw", name="theirs")
    daemon.start()
    try:
        blk = VhostUserBlock(daemon.socket_path, name="_disk0",
                             connection=connect_when_listening(daemon.socket_path))
        with DeviceHarness(blk, queue_size=16) as h:
            assert _read_sector(h, 7) == (7).to_bytes(2, "little") * 256
            spec, fds = release(blk)
            mem2 = twin_memory(h.mem)
            blk2 = VhostUserBlock(daemon.socket_path, name="_disk0",
                                  adopted=AdoptedBackend.from_handover(spec, fds,
                                                                       daemon.socket_path))
            blk2.ack_features(blk.acked_features)
            queues = [ActiveQueue(int(i), Virtqueue(mem2, h.queue(int(i)).size,
                                                   h.queue(int(i)).desc_table,
                                                   h.queue(int(i)).avail_ring,
                                                   h.queue(int(i)).used_ring),
                                  fds[ring["kick"]])
                      for i, ring in sorted(spec["rings"].items())]
            blk2.activate(mem2, queues, RecordingInterrupt())
            blk2.commit_adoption()
            blk.shutdown()                                  # the sender's VM ends
            assert daemon.running()
            assert _read_sector(h, 1500) == (1500).to_bytes(2, "little") * 256
            blk2.shutdown()
            for q in queues:
                os.close(q.kick_fd)
            mem2.close()
    finally:
        daemon.stop()


def _read_sector(h, sector: int) -> bytes:
    """A virtio-blk read of one sector on queue 0, as the guest's driver sends it."""
    mq = h.queue(0)
    head = mq.add_chain([struct.pack("<IIQ", 0, 0, sector)], [512, 1])
    buffers = mq.writable_buffers(head)
    h.kick(0)
    [used] = h.wait_used(0)
    data = mq.read_writable(buffers)
    assert used.id == head and data[512] == 0                # VIRTIO_BLK_S_OK
    return data[:512]
