import os
import struct

import pytest

from pych.devices.virtio.block import (VIRTIO_BLK_F_BLK_SIZE, VIRTIO_BLK_F_FLUSH, VIRTIO_BLK_F_MQ,
                                       VIRTIO_BLK_F_RO, VIRTIO_BLK_F_SEG_MAX, VIRTIO_BLK_F_SIZE_MAX,
                                       BlockStatus, DiskLockError, RequestType, VirtioBlock,
                                       default_serial)
from pych.devices.virtio.device import VIRTIO_F_VERSION_1

from tests.support.virtio import DeviceHarness

SECTORS = 128


@pytest.fixture
def image(tmp_path):
    path = tmp_path / "disk.img"
    data = bytes(i % 251 for i in range(SECTORS * 512))
    path.write_bytes(data)
    return path, data


def header(request: int, sector: int = 0) -> bytes:
    return struct.pack("<IIQ", request, 0, sector)


def submit(h: DeviceHarness, request: int, sector: int = 0, data=(), read_sizes=(), queue=0):
    """Run one request; returns (used length, data read, status byte)."""
    mq = h.queue(queue)
    head = mq.add_chain([header(request, sector), *data], [*read_sizes, 1])
    buffers = mq.writable_buffers(head)
    h.kick(queue)
    [used] = h.wait_used(queue)
    assert used.id == head
    out = mq.read_writable(buffers)
    return used.length, out[:-1], out[-1]


def config(disk: VirtioBlock):
    return struct.unpack_from("<QII4xI", disk.config_bytes())


def test_features_and_config(image):
    path, _ = image
    disk = VirtioBlock(path, size_max=1 << 20)
    try:
        for feature in (VIRTIO_BLK_F_FLUSH, VIRTIO_BLK_F_BLK_SIZE, VIRTIO_BLK_F_SEG_MAX,
                        VIRTIO_BLK_F_SIZE_MAX, VIRTIO_F_VERSION_1):
            assert disk.avail_features & feature
        assert not disk.avail_features & (VIRTIO_BLK_F_RO | VIRTIO_BLK_F_MQ)
        assert config(disk) == (SECTORS, 1 << 20, 126, 512)
        assert disk.read_config(0, 8) == SECTORS
        assert disk.read_config(34, 2) == 1                  # num_queues
        assert len(disk.config_bytes()) == 60
    finally:
        disk.shutdown()


def test_read_scatters_into_guest_buffers(image):
    path, data = image
    with DeviceHarness(VirtioBlock(path)) as h:
        used, got, status = submit(h, RequestType.IN, sector=2, read_sizes=[512, 1024])
        assert status == BlockStatus.OK
        assert got == data[1024:1024 + 1536]
        assert used == 1536 + 1
        assert h.interrupt.queue_notifications[0] >= 1


def test_write_then_read_back(image):
    path, data = image
    with DeviceHarness(VirtioBlock(path)) as h:
        payload = [b"A" * 512, b"B" * 1024]
        used, _, status = submit(h, RequestType.OUT, sector=4, data=payload)
        assert (used, status) == (1, BlockStatus.OK)
        with open(path, "rb") as f:
            content = f.read()
        assert content[2048:2048 + 1536] == b"A" * 512 + b"B" * 1024
        assert content[:2048] == data[:2048]
        _, got, status = submit(h, RequestType.IN, sector=5, read_sizes=[512])
        assert (got, status) == (b"B" * 512, BlockStatus.OK)


def test_flush_and_get_id(image):
    path, _ = image
    with DeviceHarness(VirtioBlock(path, serial="pych-serial")) as h:
        assert submit(h, RequestType.FLUSH)[2] == BlockStatus.OK
        used, got, status = submit(h, RequestType.GET_ID, read_sizes=[20])
        assert status == BlockStatus.OK
        assert got == b"pych-serial".ljust(20, b"\0")


def test_default_serial_is_the_reference_device_id(image):
    path, _ = image
    st = os.stat(path)
    assert default_serial(str(path)) == f"{st.st_dev}{st.st_rdev}{st.st_ino}".encode()[:20]
    disk = VirtioBlock(path)
    assert disk.serial[:len(default_serial(str(path)))] == default_serial(str(path))
    disk.shutdown()


def test_bad_requests_get_error_statuses(image):
    path, data = image
    with DeviceHarness(VirtioBlock(path)) as h:
        assert submit(h, RequestType.IN, sector=SECTORS - 1, read_sizes=[1024])[2] == BlockStatus.IOERR
        assert submit(h, RequestType.IN, sector=0, read_sizes=[100])[2] == BlockStatus.IOERR
        assert submit(h, RequestType.OUT, sector=SECTORS, data=[b"x" * 512])[2] == BlockStatus.IOERR
        assert submit(h, RequestType.DISCARD)[2] == BlockStatus.UNSUPP
        assert submit(h, 0xDEAD)[2] == BlockStatus.UNSUPP
        with open(path, "rb") as f:
            assert f.read() == data


def test_malformed_request_is_skipped_and_the_device_keeps_going(image):
    path, data = image
    with DeviceHarness(VirtioBlock(path)) as h:
        mq = h.queue(0)
        head = mq.add_chain([header(RequestType.IN)])          # no status byte at all
        h.kick(0)
        assert h.wait_used(0) == [(head, 0)]
        assert h.device.malformed_requests == 1
        assert submit(h, RequestType.IN, read_sizes=[512])[1] == data[:512]
        assert not h.interrupt.reset_requested


def test_readonly_disk(image):
    path, data = image
    with DeviceHarness(VirtioBlock(path, readonly=True)) as h:
        assert h.device.avail_features & VIRTIO_BLK_F_RO
        used, _, status = submit(h, RequestType.OUT, sector=0, data=[b"\xff" * 512])
        assert status == BlockStatus.IOERR
        assert submit(h, RequestType.IN, read_sizes=[512])[1] == data[:512]
        assert submit(h, RequestType.FLUSH)[2] == BlockStatus.OK
    with open(path, "rb") as f:
        assert f.read() == data


def test_image_locking(image):
    path, _ = image
    first = VirtioBlock(path)
    try:
        with pytest.raises(DiskLockError, match="locked"):
            VirtioBlock(path)
        with pytest.raises(DiskLockError):
            VirtioBlock(path, readonly=True)
    finally:
        first.shutdown()
    readers = [VirtioBlock(path, readonly=True), VirtioBlock(path, readonly=True)]
    with pytest.raises(DiskLockError):
        VirtioBlock(path)
    readers[0].image.unlock()                       # released early (remove-device time)
    readers[1].shutdown()
    VirtioBlock(path).shutdown()
    readers[0].shutdown()


def test_multiqueue(image):
    path, data = image
    with DeviceHarness(VirtioBlock(path, num_queues=2)) as h:
        assert h.device.avail_features & VIRTIO_BLK_F_MQ
        assert h.device.read_config(34, 2) == 2
        assert submit(h, RequestType.IN, sector=1, read_sizes=[512], queue=1)[1] == data[512:1024]
        assert submit(h, RequestType.IN, sector=3, read_sizes=[512], queue=0)[1] == data[1536:2048]


def test_event_idx_and_indirect(image):
    path, data = image
    with DeviceHarness(VirtioBlock(path), event_idx=True) as h:
        mq = h.queue(0)
        heads = [mq.add_chain([header(RequestType.IN, s)], [512, 1], indirect=True) for s in range(4)]
        buffers = [mq.writable_buffers(head) for head in heads]
        h.kick(0)
        assert sorted(u.id for u in h.wait_used(0, 4)) == sorted(heads)
        for sector, bufs in enumerate(buffers):
            assert mq.read_writable(bufs) == data[512 * sector:512 * (sector + 1)] + b"\0"
        assert mq.avail_event == 4                  # re-armed for the next request


def test_counters_count_what_the_device_did(image):
    path, _ = image
    with DeviceHarness(VirtioBlock(path)) as h:
        zero = h.device.counters()
        assert zero == {"read_bytes": 0, "read_ops": 0, "read_latency_min": 0,
                        "read_latency_max": 0, "read_latency_avg": 0, "write_bytes": 0,
                        "write_ops": 0, "write_latency_min": 0, "write_latency_max": 0,
                        "write_latency_avg": 0}
        submit(h, RequestType.IN, sector=0, read_sizes=[512, 1024])
        submit(h, RequestType.IN, sector=8, read_sizes=[512])
        submit(h, RequestType.OUT, sector=4, data=[b"A" * 1024])
        submit(h, RequestType.FLUSH)
        submit(h, RequestType.IN, sector=SECTORS, read_sizes=[512])      # past the end: IOERR
        c = h.device.counters()
        assert (c["read_bytes"], c["read_ops"], c["write_bytes"], c["write_ops"]) == \
            (2048, 2, 1024, 1)
        assert c["read_latency_min"] <= c["read_latency_avg"] <= c["read_latency_max"]
        assert c["write_latency_min"] == c["write_latency_avg"] == c["write_latency_max"]


def test_flush_is_answered_only_after_the_image_is_fsynced(image, monkeypatch):
    """VIRTIO_BLK_F_FLUSH is a durability promise: the guest's flush (fsync, sync, a journal
    commit) completes only once the host kernel has put the image's data on stable storage,
    so a SIGKILL of pych afterwards loses nothing the guest flushed."""
    import pych.devices.virtio.block as block

    path, _ = image
    calls = []
    real = os.fsync
    with DeviceHarness(VirtioBlock(path)) as h:
        monkeypatch.setattr(block.os, "fsync", lambda fd: (calls.append(os.fstat(fd).st_ino),
                                                          real(fd))[1])
        submit(h, RequestType.OUT, sector=2, data=[b"F" * 512])
        assert calls == []                                  # a write alone is not a flush
        assert submit(h, RequestType.FLUSH)[2] == BlockStatus.OK
        assert calls == [os.stat(path).st_ino]              # the image itself, once


def test_a_failed_flush_is_an_io_error_for_the_guest(image, monkeypatch):
    import pych.devices.virtio.block as block

    path, _ = image
    with DeviceHarness(VirtioBlock(path)) as h:
        def fail(fd):
            raise OSError(5, "Input/output error")
        monkeypatch.setattr(block.os, "fsync", fail)
        assert submit(h, RequestType.FLUSH)[2] == BlockStatus.IOERR
        monkeypatch.undo()
        assert submit(h, RequestType.FLUSH)[2] == BlockStatus.OK     # the device goes on

def test_a_rate_limited_disk_holds_requests_until_the_bucket_refills(image):
    """1024 bytes per 200 ms: three 1 KiB reads take two refills; the worker sleeps in
    between (its CPU time stays small) and completes them in order."""
    import time

    from pych.devices.rate_limiter import RateLimiter, TokenBucket

    path, data = image
    limiter = RateLimiter(TokenBucket(1024, 200))
    with DeviceHarness(VirtioBlock(path, rate_limiter=limiter)) as h:
        mq = h.queue(0)
        heads = [mq.add_chain([header(RequestType.IN, 2 * i)], [1024, 1]) for i in range(3)]
        start, cpu = time.monotonic(), time.thread_time()
        h.kick(0)
        first = h.wait_used(0, 1)
        assert time.monotonic() - start < 0.15
        rest = h.wait_used(0, 2)
        elapsed = time.monotonic() - start
        assert [u.id for u in first + rest] == heads
        assert 0.38 <= elapsed < 2.0, elapsed
        assert h.device.stats["read"].bytes == 3 * 1024


def test_direct_disk_is_opened_o_direct_and_serves_unaligned_guest_buffers(image):
    import fcntl

    path, data = image
    disk = VirtioBlock(path, direct=True)
    assert fcntl.fcntl(disk.image.fd, fcntl.F_GETFL) & os.O_DIRECT
    with DeviceHarness(disk) as h:
        mq = h.queue(0)
        mq.alloc(8)                                      # the next buffers are not aligned
        used, got, status = submit(h, RequestType.IN, sector=1, read_sizes=[512, 1024])
        assert status == BlockStatus.OK and got == data[512:2048]
        mq.alloc(8)
        used, _, status = submit(h, RequestType.OUT, sector=8, data=[b"Z" * 1024])
        assert status == BlockStatus.OK
    assert path.read_bytes()[4096:5120] == b"Z" * 1024


def test_direct_disk_on_a_filesystem_refusing_o_direct_is_refused_with_the_reason(
        image, monkeypatch):
    """open(O_DIRECT) fails with EINVAL where the filesystem has no direct I/O (tmpfs before
    Linux 6.6; this host's tmpfs has it, so the refusal is simulated at the system call)."""
    import errno

    from pych.devices.virtio import block
    from pych.devices.virtio.block import DiskError

    real_open = os.open

    def no_direct(path, flags, *args):
        if flags & os.O_DIRECT:
            raise OSError(errno.EINVAL, "Invalid argument")
        return real_open(path, flags, *args)

    monkeypatch.setattr(block.os, "open", no_direct)
    path, _ = image
    with pytest.raises(DiskError, match=r"with O_DIRECT \(direct=on\): its filesystem "
                                        r"does not support direct I/O"):
        VirtioBlock(path, direct=True)
    VirtioBlock(path).shutdown()                         # without direct=on it opens
