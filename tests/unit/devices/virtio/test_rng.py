from pych.devices.virtio.device import VirtioDeviceType
from pych.devices.virtio.queue import VIRTQ_DESC_F_NEXT, VIRTQ_DESC_F_WRITE, QueueError
from pych.devices.virtio.rng import VirtioRng

from tests.support.virtio import DeviceHarness


def test_fills_writable_buffers_from_the_source(tmp_path):
    source = tmp_path / "entropy"
    source.write_bytes(bytes(range(256)) * 4)
    with DeviceHarness(VirtioRng(source)) as h:
        mq = h.queue(0)
        head = mq.add_chain(writable=[16, 48])
        buffers = mq.writable_buffers(head)
        h.kick(0)
        assert h.wait_used(0) == [(head, 64)]
        assert mq.read_writable(buffers) == bytes(range(64))
        assert h.interrupt.queue_notifications == {0: 1}


def test_finite_source_returns_what_it_had(tmp_path):
    source = tmp_path / "short"
    source.write_bytes(b"\x01" * 10)
    with DeviceHarness(VirtioRng(source)) as h:
        head = h.queue(0).add_chain(writable=[32])
        h.kick(0)
        assert h.wait_used(0) == [(head, 10)]


def test_urandom_by_default_and_no_config_space():
    rng = VirtioRng()
    assert rng.device_type == VirtioDeviceType.RNG and rng.source == "/dev/urandom"
    assert rng.config_bytes() == b"" and rng.read_config(0, 4) == 0
    with DeviceHarness(rng) as h:
        mq = h.queue(0)
        heads = [mq.add_chain(writable=[4096]) for _ in range(3)]
        buffers = [mq.writable_buffers(head) for head in heads]
        h.kick(0)
        assert [u.length for u in h.wait_used(0, 3)] == [4096] * 3
        assert len({mq.read_writable(b) for b in buffers}) == 3


def test_guest_errors_do_not_stop_the_device():
    with DeviceHarness(VirtioRng()) as h:
        mq = h.queue(0)
        mq.set_descriptor(15, 0x1000, 8, VIRTQ_DESC_F_WRITE | VIRTQ_DESC_F_NEXT, next=15)   # loop
        mq.publish(15)
        mq.publish(99)                                                                  # bad head
        good = mq.add_chain(writable=[8])
        h.kick(0)
        assert h.wait_used(0, 2) == [(15, 0), (good, 8)]
        queue = h.device_queue(0)
        assert queue.errors[QueueError.CHAIN_TOO_LONG] == 1
        assert queue.errors[QueueError.HEAD_OUT_OF_RANGE] == 1
        assert not h.interrupt.reset_requested
