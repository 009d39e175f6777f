"""vhost-user-blk without KVM: the negotiation (configuration space from GET_CONFIG, pych's
queue count in it, the block features passed on), what is refused, the resize path, and the
back-end going away mid-I/O: pych fails the requests it left unanswered (from the
back-end's in-flight record, or in order without one) and every later one, and reports the
failure once. The fake back-end is tests.unit.devices.test_vhost_user.FakeBackend; the real
qemu-storage-daemon is in tests/unit/devices/test_storage_daemon.py."""

from __future__ import annotations

import struct

import pytest

from pych.devices.vhost_user import ProtocolFeature, Request, VhostUserError
from pych.devices.virtio.block import (VIRTIO_BLK_F_CONFIG_WCE, VIRTIO_BLK_F_FLUSH,
                                       VIRTIO_BLK_F_MQ, VIRTIO_BLK_F_RO, VIRTIO_BLK_F_SEG_MAX,
                                       BlockStatus)
from pych.devices.virtio.device import VIRTIO_F_VERSION_1, VirtioDeviceType
from pych.devices.virtio.vhost_user_blk import VhostUserBlock

from tests.support.virtio import DeviceHarness, wait_until
from tests.unit.devices.test_vhost_user import FakeBackend

#: What qemu-storage-daemon 7.2 offers, as measured on this host (plus INFLIGHT_SHMFD, which
#: it does not offer, where a test wants the in-flight record).
QSD_FEATURES = 0x1_7500_7E46
QSD_PROTOCOL_FEATURES = 0x8F2B
SECTORS = 8192


def blk_config(capacity: int = SECTORS, num_queues: int = 4, seg_max: int = 126) -> bytes:
    config = bytearray(60)
    struct.pack_into("<QII", config, 0, capacity, 0, seg_max)
    struct.pack_into("<I", config, 20, 512)
    struct.pack_into("<H", config, 34, num_queues)
    return bytes(config)


@pytest.fixture
def backend():
    b = FakeBackend(features=QSD_FEATURES, protocol_features=QSD_PROTOCOL_FEATURES, queue_num=4)
    b.config = blk_config()
    yield b
    b.close()


def make(backend: FakeBackend, **kw) -> VhostUserBlock:
    return VhostUserBlock("qsd.sock", connect=lambda path: backend.frontend(), **kw)


def test_config_space_is_the_backends_with_pychs_queue_count(backend):
    blk = make(backend, num_queues=2, queue_size=64)
    try:
        assert blk.device_type == VirtioDeviceType.BLOCK
        assert blk.queue_max_sizes == (64, 64)
        assert blk.capacity == SECTORS
        config = blk.config_bytes()
        assert config[:34] == blk_config()[:34]                    # capacity, seg_max, blk_size
        assert struct.unpack_from("<H", config, 34)[0] == 2         # the queues pych offers
        assert backend.requests()[:7] == ["SET_OWNER", "GET_FEATURES", "GET_PROTOCOL_FEATURES",
                                          "SET_PROTOCOL_FEATURES", "GET_QUEUE_NUM",
                                          "GET_MAX_MEM_SLOTS", "GET_CONFIG"]
        negotiated = backend.of(Request.SET_PROTOCOL_FEATURES)[0].u64()
        assert negotiated == (ProtocolFeature.MQ | ProtocolFeature.REPLY_ACK
                              | ProtocolFeature.CONFIG | ProtocolFeature.CONFIGURE_MEM_SLOTS)
        # the back-end's block features pass, less CONFIG_WCE (config writes stay in pych)
        for bit in (VIRTIO_F_VERSION_1, VIRTIO_BLK_F_FLUSH, VIRTIO_BLK_F_SEG_MAX, VIRTIO_BLK_F_MQ):
            assert blk.avail_features & bit
        assert not blk.avail_features & VIRTIO_BLK_F_CONFIG_WCE
        assert not blk.avail_features & (1 << 30)                  # PROTOCOL_FEATURES stays ours
    finally:
        blk.shutdown()


def test_one_queue_offers_no_mq(backend):
    blk = make(backend)
    try:
        assert not blk.avail_features & VIRTIO_BLK_F_MQ
        assert struct.unpack_from("<H", blk.config_bytes(), 34)[0] == 1
    finally:
        blk.shutdown()


@pytest.mark.parametrize("change, kw, message", [
    (lambda b: setattr(b, "config", blk_config(num_queues=1)), {"num_queues": 2},
     "serves 1 queues, but num_queues=2"),
    (lambda b: setattr(b, "protocol_features", QSD_PROTOCOL_FEATURES & ~ProtocolFeature.CONFIG),
     {}, "does not offer its configuration space"),
    (lambda b: None, {"readonly": True}, "readonly=on, but the vhost-user backend at qsd.sock "
                                         "serves the disk writable"),
])
def test_a_backend_that_does_not_fit_is_refused_and_hung_up_on(backend, change, kw, message):
    change(backend)
    with pytest.raises(VhostUserError, match=message) as err:
        make(backend, **kw)
    assert str(err.value).startswith("vhost-user-blk disk: ")
    assert backend.wait_for(lambda b: b.eof)


def test_readonly_needs_the_backends_ro(backend):
    backend.features |= VIRTIO_BLK_F_RO
    blk = make(backend, readonly=True)
    try:
        assert blk.avail_features & VIRTIO_BLK_F_RO
    finally:
        blk.shutdown()


def test_resize_is_refused_for_a_backend_pych_does_not_own(backend):
    blk = make(backend)
    try:
        with pytest.raises(ValueError, match="which pych does not own: resize it there"):
            blk.resize(2 * SECTORS * 512)
    finally:
        blk.shutdown()


def test_refresh_config_tells_the_driver_only_of_a_change(backend):
    with DeviceHarness(make(backend), queue_size=16) as h:
        generation = h.device.config_generation
        h.device.refresh_config()                               # nothing changed
        assert h.device.config_generation == generation
        backend.config = blk_config(capacity=2 * SECTORS)
        h.device.refresh_config()
        assert h.device.capacity == 2 * SECTORS
        assert h.device.config_generation == generation + 1
        # a back-end that keeps announcing the old size (qemu-storage-daemon 7.2)
        h.device.refresh_config(capacity=3 * SECTORS)
        assert h.device.capacity == 3 * SECTORS


# --- the back-end goes away --------------------------------------------------------------------
STATUS_BUFFERS: dict[int, tuple[int, int]] = {}


def request(h: DeviceHarness, sector: int = 0) -> int:
    """A 4 KiB read at ``sector``: header, data buffer, status byte."""
    head = h.queue(0).add_chain([struct.pack("<IIQ", 0, 0, sector)], [4096, 1])
    STATUS_BUFFERS[head] = h.queue(0).writable_buffers(head)[-1]
    return head


def status_of(h: DeviceHarness, head: int) -> int:
    address, _ = STATUS_BUFFERS[head]
    return h.mem.read(address, 1)[0]


def test_lost_backend_fails_what_it_left_and_what_comes_after(backend):
    failures = []
    blk = make(backend)
    blk.on_failure = lambda name, why: failures.append((name, why))
    with DeviceHarness(blk, queue_size=16) as h:
        assert backend.wait_for(lambda b: b.of(Request.SET_VRING_KICK))
        pending = [request(h, s) for s in range(3)]             # the back-end never answers
        backend.close()                                         # ... and goes away
        used = h.wait_used(0, 3)
        assert sorted(e.id for e in used) == sorted(pending)
        statuses = {head: status_of(h, head) for head in pending}
        assert set(statuses.values()) == {BlockStatus.IOERR}
        assert failures == [("disk", "the vhost-user backend at qsd.sock hung up")]
        assert blk.failure == failures[0][1] and blk.describe_failure() == blk.failure
        # later requests are failed by pych at once, through the kick eventfd
        later = request(h, 8)
        h.kick(0)
        (element,) = h.wait_used(0, 1)
        assert element.id == later and status_of(h, later) == BlockStatus.IOERR
        assert blk.failed_requests == 4
        assert failures == [failures[0]]                         # reported once


def test_lost_backend_uses_its_inflight_record(backend):
    backend.protocol_features |= ProtocolFeature.INFLIGHT_SHMFD
    blk = make(backend)
    with DeviceHarness(blk, queue_size=16) as h:
        assert backend.wait_for(lambda b: b.of(Request.SET_VRING_KICK))
        assert [m.name for m in backend.messages if "INFLIGHT" in m.name] == [
            "GET_INFLIGHT_FD", "SET_INFLIGHT_FD"]
        a, b, c = (request(h, s) for s in range(3))
        # the back-end took all three, answered b (out of order), and still holds a and c;
        # it had also taken d, answered last (its in-flight bit not yet cleared: the
        # record's used_idx lags the ring's, so the last batch head counts as done)
        region = backend.inflight
        q = h.queue(0)
        d = request(h, 3)
        for head, counter in ((a, 1), (c, 3), (d, 4)):
            region[16 + 16 * head] = 1
            struct.pack_into("<Q", region, 16 + 16 * head + 8, counter)
        struct.pack_into("<HH", region, 12, d, 1)             # last_batch_head, used_idx
        slot = q.used_ring + 4
        h.mem.write_u32(slot, b)
        h.mem.write_u32(slot + 4, 1)
        h.mem.write_u32(slot + 8, d)
        h.mem.write_u32(slot + 12, 1)
        h.mem.write_u16(q.used_ring + 2, 2)
        backend.close()
        used = h.wait_used(0, 4)
        assert [e.id for e in used] == [b, d, a, c]             # a, c failed, oldest first
        assert status_of(h, a) == status_of(h, c) == BlockStatus.IOERR
        assert blk.failed_requests == 2
        assert h.device_queue(0).next_avail == 4               # nothing taken twice
