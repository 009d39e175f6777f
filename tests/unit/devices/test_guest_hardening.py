"""What a hostile guest writes must not hang, crash or bloat the VMM: bus accesses of any
width, a virtqueue index far ahead of the device, oversized indirect tables and chains."""

import logging
import resource
import time

import pytest

from pych.devices.bus import Bus
from pych.devices.virtio.console import VirtioConsole
from pych.devices.virtio.queue import (DESCRIPTOR_SIZE, MAX_QUEUE_SIZE, VIRTQ_DESC_F_INDIRECT,
                                       VIRTQ_DESC_F_NEXT, VIRTQ_DESC_F_WRITE, QueueError)
from pych.devices.virtio.rng import IOV_MAX, VirtioRng
from tests.support.virtio import DeviceHarness, wait_until
from pych.guest_log import GuestLog


def _worker_cpu_seconds(device) -> float:
    """CPU time of the device's worker thread (Linux: per-thread clock)."""
    return time.clock_gettime(time.pthread_getcpuclockid(device._worker.ident))


@pytest.mark.parametrize("jump", [17, 0xFFFF])
def test_avail_index_far_ahead_does_not_spin_the_worker(jump):
    """avail.idx moved ahead by more than the queue size: the device logs it, serves
    nothing, and its worker goes back to sleep instead of spinning on the bad index."""
    with DeviceHarness(VirtioRng(), queue_size=16) as h:
        h.queue(0).set_avail_idx(jump)
        h.kick(0)
        queue = h.device_queue(0)
        assert wait_until(lambda: queue.errors[QueueError.AVAIL_INDEX_JUMP] == 1)
        assert not queue.has_available() and not queue.enable_notification()
        before = _worker_cpu_seconds(h.device)
        time.sleep(0.5)
        assert _worker_cpu_seconds(h.device) - before < 0.1
        h.queue(0).set_avail_idx(0)                 # the driver repairs its index
        head = h.queue(0).add_chain(writable=[8])
        h.kick(0)
        assert h.wait_used(0) == [(head, 8)]
    # reset (in close) joined the worker: nothing hung


def test_console_receive_with_a_bad_index_does_not_spin():
    console = VirtioConsole()
    with DeviceHarness(console, queue_size=16) as h:
        h.queue(0).set_avail_idx(0xFFFF)            # the receive queue
        console.enqueue_input(b"x" * 100)
        assert wait_until(lambda: h.device_queue(0).errors[QueueError.AVAIL_INDEX_JUMP] == 1)
        before = _worker_cpu_seconds(console)
        time.sleep(0.5)
        assert _worker_cpu_seconds(console) - before < 0.1


def test_indirect_table_larger_than_any_queue_is_refused():
    with DeviceHarness(VirtioRng(), queue_size=16, stride=8 << 20) as h:
        mq = h.queue(0)
        entries = MAX_QUEUE_SIZE + 1
        table = mq.alloc(entries * DESCRIPTOR_SIZE, alignment=16)
        mq.set_descriptor(15, table, entries * DESCRIPTOR_SIZE, VIRTQ_DESC_F_INDIRECT)
        mq.publish(15)
        good = mq.add_chain(writable=[4])
        h.kick(0)
        assert h.wait_used(0, 2) == [(15, 0), (good, 4)]
        assert h.device_queue(0).errors[QueueError.INDIRECT_TABLE_INVALID] == 1


def test_rng_chain_of_more_buffers_than_iov_max():
    """readv takes at most IOV_MAX buffers; a longer chain is filled in several calls
    (it used to raise EINVAL out of the worker and stop the device)."""
    buffers = IOV_MAX + 100
    with DeviceHarness(VirtioRng(), queue_size=16, stride=8 << 20) as h:
        mq = h.queue(0)
        table = mq.alloc(buffers * DESCRIPTOR_SIZE, alignment=16)
        data = mq.alloc(buffers * 8)
        for i in range(buffers):
            last = i == buffers - 1
            mq.set_descriptor(i, data + 8 * i, 8,
                              VIRTQ_DESC_F_WRITE | (0 if last else VIRTQ_DESC_F_NEXT),
                              0 if last else i + 1, table=table)
        mq.set_descriptor(15, table, buffers * DESCRIPTOR_SIZE, VIRTQ_DESC_F_INDIRECT)
        mq.publish(15)
        h.kick(0)
        assert h.wait_used(0) == [(15, buffers * 8)]
        assert not h.interrupt.reset_requested


class _Sink:
    def __init__(self):
        self.writes = []

    def write(self, data):
        self.writes.append(len(data))


def test_console_output_of_a_huge_chain_is_written_in_pieces():
    """A transmit chain naming the same 4 MiB buffer 16 times is written piece by piece,
    never joined into one 64 MiB string."""
    sink = _Sink()
    console = VirtioConsole(sink)
    with DeviceHarness(console, queue_size=16, stride=8 << 20) as h:
        mq = h.queue(1)
        buf = mq.alloc(4 << 20)
        for i in range(16):
            mq.set_descriptor(i, buf, 4 << 20, 0 if i == 15 else VIRTQ_DESC_F_NEXT, i + 1)
        mq.publish(0)
        peak_before = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
        h.kick(1)
        assert h.wait_used(1, timeout=30) == [(0, 0)]
        assert sum(sink.writes) == 64 << 20 and max(sink.writes) <= 64 << 10
        assert resource.getrusage(resource.RUSAGE_SELF).ru_maxrss - peak_before < 32 << 10  # KiB


class _Exploding:
    def read(self, offset, size):
        raise OverflowError("int too big to convert")

    def write(self, offset, size, value):
        raise RuntimeError("device bug")


class _Wide:
    def read(self, offset, size):
        return 0x1122334455667788

    def write(self, offset, size, value):
        pass


@pytest.mark.parametrize("size", [1, 2, 4, 8])
def test_bus_answers_every_access_with_a_value_of_its_width(size):
    bus = Bus("mmio")
    bus.insert(0x1000, 0x100, _Wide())
    bus.insert(0x2000, 0x100, _Exploding())
    assert bus.read(0x1000, size) == 0x1122334455667788 & ((1 << (8 * size)) - 1)
    assert bus.read(0x2000, size) == (1 << (8 * size)) - 1      # a failing device: all ones
    assert bus.write(0x2000, size, 1) is True                     # dropped, not raised
    assert bus.read(0x9000, size) == (1 << (8 * size)) - 1      # open bus


def test_guest_log_is_rate_limited(caplog):
    now = [0.0]
    log = GuestLog(logging.getLogger("pych.test"), interval=10.0, clock=lambda: now[0])
    with caplog.at_level(logging.WARNING, logger="pych.test"):
        for _ in range(64000):
            log.warning("guest did %s", "it")
        now[0] = 11.0
        log.warning("guest did %s", "it")
        log.warning("something else")
        log.warning("guest did %s", "it", kind="another kind")
    assert [r.getMessage() for r in caplog.records] == [
        "guest did it", "guest did it (63999 more like it suppressed)", "something else",
        "guest did it"]
