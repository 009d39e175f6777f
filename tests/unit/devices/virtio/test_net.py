"""virtio-net against a fake tap: a SOCK_SEQPACKET pair keeps frame boundaries as a tap does."""

import os
import socket
import struct

import pytest

from pych.devices.net.tap import TUN_F_CSUM, TUN_F_TSO4
from pych.devices.virtio.device import VIRTIO_F_VERSION_1
from pych.devices.virtio.net import (
    RECEIVEQ, TRANSMITQ, VIRTIO_NET_F_CSUM, VIRTIO_NET_F_GUEST_CSUM, VIRTIO_NET_F_GUEST_TSO4,
    VIRTIO_NET_F_GUEST_UFO, VIRTIO_NET_F_HOST_TSO4, VIRTIO_NET_F_MAC, VIRTIO_NET_F_MTU,
    VirtioNet, format_mac, offered_features, parse_mac, random_mac)

from tests.support.virtio import DeviceHarness

MAC = bytes.fromhex("525400123456")
HEADER = bytes(12)                                 # virtio_net_hdr_v1, no offload


class FakeTap:
    def __init__(self):
        self.host, device_end = socket.socketpair(socket.AF_UNIX, socket.SOCK_SEQPACKET)
        device_end.setblocking(False)
        self.fd = device_end.detach()
        self.name = "faketap"
        self.offloads = []

    def set_offload(self, flags):
        self.offloads.append(flags)

    def close(self):
        if self.fd >= 0:
            os.close(self.fd)
            self.fd = -1
        self.host.close()


@pytest.fixture
def tap():
    return FakeTap()


def test_transmitted_frames_reach_the_tap_whole(tap):
    with DeviceHarness(VirtioNet(tap, mac=MAC)) as h:
        frame = b"\xff" * 6 + MAC + b"\x08\x00" + b"payload"
        head = h.queue(TRANSMITQ).add_chain([HEADER, frame[:10], frame[10:]])
        h.kick(TRANSMITQ)
        assert h.wait_used(TRANSMITQ) == [(head, 0)]
        assert tap.host.recv(4096) == HEADER + frame
        assert h.device.tx_frames == 1


def test_received_frames_wait_for_buffers_then_fill_one_chain_each(tap):
    with DeviceHarness(VirtioNet(tap, mac=MAC)) as h:
        tap.host.send(HEADER + b"first")
        tap.host.send(HEADER + b"second frame")
        mq = h.queue(RECEIVEQ)
        first = mq.add_chain(writable=[1526])
        second = mq.add_chain(writable=[8, 1518])       # header split across buffers
        bufs = mq.writable_buffers(first), mq.writable_buffers(second)
        h.kick(RECEIVEQ)
        assert h.wait_used(RECEIVEQ, 2) == [(first, 17), (second, 24)]
        assert mq.read_writable(bufs[0])[:17] == HEADER + b"first"
        assert mq.read_writable(bufs[1])[:24] == HEADER + b"second frame"
        assert h.interrupt.wait(lambda i: i.queue_notifications.get(RECEIVEQ, 0) >= 1)
        # a buffer posted before the frame arrives is filled when it does
        third = mq.add_chain(writable=[1526])
        h.kick(RECEIVEQ)
        tap.host.send(HEADER + b"later")
        assert h.wait_used(RECEIVEQ) == [(third, 17)]


def test_guest_receive_features_set_the_tap_offloads(tap):
    device = VirtioNet(tap, mac=MAC)
    device.ack_features(VIRTIO_F_VERSION_1 | VIRTIO_NET_F_GUEST_CSUM | VIRTIO_NET_F_GUEST_TSO4)
    assert tap.offloads == [TUN_F_CSUM | TUN_F_TSO4]
    device.ack_features(VIRTIO_F_VERSION_1)
    assert tap.offloads[-1] == 0
    device.shutdown()
    assert tap.fd == -1


def test_offered_features_follow_the_offload_switches():
    everything = offered_features(csum=True, tso=True, ufo=True, mtu=1400)
    assert everything & VIRTIO_NET_F_MTU and everything & VIRTIO_NET_F_GUEST_UFO
    assert everything & VIRTIO_NET_F_HOST_TSO4 and everything & VIRTIO_NET_F_MAC
    no_csum = offered_features(csum=False, tso=True, ufo=True, mtu=None)
    assert no_csum & (VIRTIO_NET_F_CSUM | VIRTIO_NET_F_GUEST_CSUM | VIRTIO_NET_F_HOST_TSO4
                      | VIRTIO_NET_F_GUEST_TSO4 | VIRTIO_NET_F_MTU) == 0


def test_config_space_holds_mac_link_up_one_pair_and_mtu(tap):
    device = VirtioNet(tap, mac=MAC, mtu=1400)
    assert device.config_bytes() == MAC + struct.pack("<HHH", 1, 1, 1400)
    device.shutdown()


def test_macs():
    assert parse_mac("52:54:00:12:34:56") == MAC
    assert format_mac(MAC) == "52:54:00:12:34:56"
    for _ in range(32):
        mac = random_mac()
        assert mac[0] & 0x03 == 0x02                 # unicast, locally administered
    with pytest.raises(ValueError):
        parse_mac("52:54:00:12:34")



def test_counters_count_frames_and_bytes_without_the_header(tap):
    with DeviceHarness(VirtioNet(tap, mac=MAC)) as h:
        assert h.device.counters() == {"rx_bytes": 0, "rx_frames": 0, "tx_bytes": 0,
                                       "tx_frames": 0}
        head = h.queue(TRANSMITQ).add_chain([HEADER, b"x" * 60])
        h.kick(TRANSMITQ)
        assert h.wait_used(TRANSMITQ) == [(head, 0)]
        tap.host.send(HEADER + b"y" * 42)
        h.queue(RECEIVEQ).add_chain(writable=[1526])
        h.kick(RECEIVEQ)
        h.wait_used(RECEIVEQ)
        assert h.device.counters() == {"rx_bytes": 42, "rx_frames": 1, "tx_bytes": 60,
                                       "tx_frames": 1}


def test_a_receive_chain_of_more_buffers_than_iov_max_still_takes_a_frame(tap):
    """readv() refuses more than IOV_MAX buffers (EINVAL): the device offers the tap the
    first IOV_MAX of a longer chain (found by the fuzz guest: the device stopped with a
    traceback)."""
    from pych.devices.virtio.net import IOV_MAX

    with DeviceHarness(VirtioNet(tap, mac=MAC), stride=8 << 20) as h:
        mq = h.queue(RECEIVEQ)
        head = mq.add_chain(writable=[64] * (IOV_MAX + 76), indirect=True)
        bufs = mq.writable_buffers(head)
        tap.host.send(HEADER + b"frame")
        h.kick(RECEIVEQ)
        assert h.wait_used(RECEIVEQ) == [(head, len(HEADER) + 5)]
        assert mq.read_writable(bufs)[:len(HEADER) + 5] == HEADER + b"frame"
        assert h.device.rx_frames == 1


def test_a_receive_chain_shorter_than_the_header_is_returned_empty(tap):
    """A tap refuses (EINVAL) a read into less than its virtio-net header; such a chain
    goes back to the guest empty and the frame lands in the next one (found by the fuzz
    guest: the device stopped with a traceback)."""
    with DeviceHarness(VirtioNet(tap, mac=MAC)) as h:
        mq = h.queue(RECEIVEQ)
        short = mq.add_chain(writable=[4])
        good = mq.add_chain(writable=[1526])
        buf = mq.writable_buffers(good)
        tap.host.send(HEADER + b"frame")
        h.kick(RECEIVEQ)
        assert h.wait_used(RECEIVEQ, 2) == [(short, 0), (good, len(HEADER) + 5)]
        assert mq.read_writable(buf)[:len(HEADER) + 5] == HEADER + b"frame"
        assert (h.device.rx_unusable, h.device.rx_frames) == (1, 1)

def test_rate_limited_transmit_holds_frames_until_the_bucket_refills(tap):
    import time

    from pych.devices.rate_limiter import RateLimiter, TokenBucket

    limiter = RateLimiter(TokenBucket(1000, 200))                 # 1000 bytes per 200 ms
    with DeviceHarness(VirtioNet(tap, mac=MAC, tx_rate_limiter=limiter)) as h:
        frame = b"\xff" * 6 + MAC + b"\x08\x00" + b"x" * 586        # 600 bytes
        heads = [h.queue(TRANSMITQ).add_chain([HEADER, frame]) for _ in range(3)]
        start = time.monotonic()
        h.kick(TRANSMITQ)
        used = h.wait_used(TRANSMITQ, 3)
        elapsed = time.monotonic() - start
        assert [u.id for u in used] == heads
        assert 0.15 <= elapsed < 2.0, elapsed          # 1800 bytes: one refill's wait
        assert [tap.host.recv(4096) for _ in heads] == [HEADER + frame] * 3


def test_rate_limited_receive_waits_in_the_tap_and_resumes(tap):
    import time

    from pych.devices.rate_limiter import RateLimiter, TokenBucket

    limiter = RateLimiter(TokenBucket(1000, 200))
    with DeviceHarness(VirtioNet(tap, mac=MAC, rx_rate_limiter=limiter)) as h:
        mq = h.queue(RECEIVEQ)
        heads = [mq.add_chain(writable=[1526]) for _ in range(3)]
        h.kick(RECEIVEQ)
        start = time.monotonic()
        for _ in heads:
            tap.host.send(HEADER + b"y" * 700)
        used = h.wait_used(RECEIVEQ, 3)
        elapsed = time.monotonic() - start
        assert [u.id for u in used] == heads
        # charged once read: 1000 -> 300 -> -400 (debt), then 400 bytes at 5000/s
        assert 0.07 <= elapsed < 2.0, elapsed
