"""virtio-net against a fake tap: a SOCK_SEQPACKET pair keeps frame boundaries as a tap does."""

import os
import socket
import struct
import time

import pytest

from pych.devices.net.tap import TUN_F_CSUM, TUN_F_TSO4
from pych.devices.virtio.device import VIRTIO_F_EVENT_IDX, VIRTIO_F_VERSION_1
from pych.devices.virtio.net import (
    RECEIVEQ, TRANSMITQ, VIRTIO_NET_F_CSUM, VIRTIO_NET_F_GUEST_CSUM, VIRTIO_NET_F_GUEST_TSO4,
    VIRTIO_NET_F_GUEST_UFO, VIRTIO_NET_F_HOST_TSO4, VIRTIO_NET_F_MAC, VIRTIO_NET_F_MRG_RXBUF,
    VIRTIO_NET_F_MTU, VirtioNet, format_mac, offered_features, parse_mac, random_mac)

from tests.support.virtio import DeviceHarness

MAC = bytes.fromhex("525400123456")
HEADER = bytes(12)                                 # virtio_net_hdr_v1, no offload
RX_HEADER = bytes(10) + struct.pack("<H", 1)      # as received: num_buffers 1


def one_frame_per_chain(device):
    """The features a driver without mergeable receive buffers acks (all others but
    EVENT_IDX, as DeviceHarness's default)."""
    return device.avail_features & ~(VIRTIO_NET_F_MRG_RXBUF | VIRTIO_F_EVENT_IDX)


class FakeTap:
    def __init__(self):
        self.host, device_end = socket.socketpair(socket.AF_UNIX, socket.SOCK_SEQPACKET)
        device_end.setblocking(False)
        self.fd = device_end.detach()
        self.name = "faketap"
        self.offloads = []
        self.queue_enabled = []

    def set_offload(self, flags):
        self.offloads.append(flags)

    def set_queue_enabled(self, enabled):
        self.queue_enabled.append(enabled)

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
    device = VirtioNet(tap, mac=MAC)
    with DeviceHarness(device, features=one_frame_per_chain(device)) as h:
        tap.host.send(HEADER + b"first")
        tap.host.send(HEADER + b"second frame")
        mq = h.queue(RECEIVEQ)
        first = mq.add_chain(writable=[1526])
        second = mq.add_chain(writable=[8, 1518])       # header split across buffers
        bufs = mq.writable_buffers(first), mq.writable_buffers(second)
        h.kick(RECEIVEQ)
        assert h.wait_used(RECEIVEQ, 2) == [(first, 17), (second, 24)]
        assert mq.read_writable(bufs[0])[:17] == RX_HEADER + b"first"
        assert mq.read_writable(bufs[1])[:24] == RX_HEADER + b"second frame"
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
    assert not VirtioNet(FakeTap(), mac=MAC).avail_features & (1 << 22)     # no MQ
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
    device = VirtioNet(tap, mac=MAC)
    with DeviceHarness(device, features=one_frame_per_chain(device)) as h:
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

    device = VirtioNet(tap, mac=MAC)
    with DeviceHarness(device, features=one_frame_per_chain(device), stride=8 << 20) as h:
        mq = h.queue(RECEIVEQ)
        head = mq.add_chain(writable=[64] * (IOV_MAX + 76), indirect=True)
        bufs = mq.writable_buffers(head)
        tap.host.send(HEADER + b"frame")
        h.kick(RECEIVEQ)
        assert h.wait_used(RECEIVEQ) == [(head, len(HEADER) + 5)]
        assert mq.read_writable(bufs)[:len(HEADER) + 5] == RX_HEADER + b"frame"
        assert h.device.rx_frames == 1


def test_a_receive_chain_shorter_than_the_header_is_returned_empty(tap):
    """A tap refuses (EINVAL) a read into less than its virtio-net header; such a chain
    goes back to the guest empty and the frame lands in the next one (found by the fuzz
    guest: the device stopped with a traceback)."""
    device = VirtioNet(tap, mac=MAC)
    with DeviceHarness(device, features=one_frame_per_chain(device)) as h:
        mq = h.queue(RECEIVEQ)
        short = mq.add_chain(writable=[4])
        good = mq.add_chain(writable=[2048])
        buf = mq.writable_buffers(good)
        tap.host.send(HEADER + b"frame")
        h.kick(RECEIVEQ)
        assert h.wait_used(RECEIVEQ, 2) == [(short, 0), (good, len(HEADER) + 5)]
        assert mq.read_writable(buf)[:len(HEADER) + 5] == RX_HEADER + b"frame"
        assert (h.device.rx_unusable, h.device.rx_frames) == (1, 1)

def test_rate_limited_transmit_holds_frames_until_the_bucket_refills(tap):
    import time

    from pych.devices.rate_limiter import RateLimiter, TokenBucket

    limiter = lambda: RateLimiter(TokenBucket(1000, 200))        # 1000 bytes per 200 ms
    with DeviceHarness(VirtioNet(tap, mac=MAC, rate_limiter=limiter)) as h:
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

    limiter = lambda: RateLimiter(TokenBucket(1000, 200))       # each direction its own
    device = VirtioNet(tap, mac=MAC, rate_limiter=limiter)
    with DeviceHarness(device, features=one_frame_per_chain(device)) as h:
        mq = h.queue(RECEIVEQ)
        heads = [mq.add_chain(writable=[2048]) for _ in range(3)]      # each a whole frame
        h.kick(RECEIVEQ)
        start = time.monotonic()
        for _ in heads:
            tap.host.send(HEADER + b"y" * 700)
        used = h.wait_used(RECEIVEQ, 3)
        elapsed = time.monotonic() - start
        assert [u.id for u in used] == heads
        # charged once read: 1000 -> 300 -> -400 (debt), then 400 bytes at 5000/s
        assert 0.07 <= elapsed < 2.0, elapsed


# --- multiqueue, the control queue, mergeable receive buffers ---------------------------------
from pych.devices.virtio.net import (  # noqa: E402
    VIRTIO_NET_CTRL_GUEST_OFFLOADS, VIRTIO_NET_CTRL_MQ, VIRTIO_NET_F_CTRL_VQ, VIRTIO_NET_F_MQ,
    VIRTIO_NET_F_GUEST_TSO6, VIRTIO_NET_F_GUEST_ECN, VIRTIO_NET_F_HOST_TSO6,
    VIRTIO_NET_F_HOST_ECN, VIRTIO_NET_F_HOST_UFO)
import threading  # noqa: E402

from pych.devices.net.tap import TUN_F_TSO6, TUN_F_TSO_ECN, TUN_F_UFO  # noqa: E402


@pytest.fixture
def taps():
    pair = [FakeTap(), FakeTap()]
    yield pair
    for t in pair:
        t.close()


def test_two_pairs_offer_mq_with_a_control_queue_and_a_worker_per_pair(taps):
    device = VirtioNet(taps, mac=MAC, name="_net1")
    assert len(device.queue_max_sizes) == 5                      # 2 pairs + control queue
    assert device.avail_features & VIRTIO_NET_F_MQ and device.avail_features & VIRTIO_NET_F_CTRL_VQ
    assert device.config_bytes()[8:10] == struct.pack("<H", 2)  # max_virtqueue_pairs
    with DeviceHarness(device, features=one_frame_per_chain(device)) as h:
        names = {t.name for t in threading.enumerate()}
        assert {"_net1_qp0", "_net1_qp1", "_net1_ctrl"} <= names
        # each pair moves frames between its own tap queue and its own queues
        for pair, tap in enumerate(taps):
            rxq, txq = 2 * pair, 2 * pair + 1
            frame = bytes([pair]) * 60
            head = h.queue(txq).add_chain([HEADER, frame])
            h.kick(txq)
            assert h.wait_used(txq) == [(head, 0)]
            assert tap.host.recv(4096) == HEADER + frame
            rx = h.queue(rxq).add_chain(writable=[1526])
            buffers = h.queue(rxq).writable_buffers(rx)
            h.kick(rxq)
            tap.host.send(HEADER + frame)
            assert h.wait_used(rxq) == [(rx, 72)]
            assert h.queue(rxq).read_writable(buffers)[:72] == RX_HEADER + frame
        assert [(p.rx_frames, p.tx_frames) for p in device.pairs] == [(1, 1), (1, 1)]
        assert device.counters() == {"rx_bytes": 120, "rx_frames": 2, "tx_bytes": 120,
                                     "tx_frames": 2}
    assert {"_net1_qp0", "_net1_qp1", "_net1_ctrl"}.isdisjoint(
        t.name for t in threading.enumerate())


def _control(h, ctrlq, command: bytes) -> int:
    mq = h.queue(ctrlq)
    head = mq.add_chain([command[:2], command[2:]] if len(command) > 2 else [command],
                        writable=[1])
    ack = mq.writable_buffers(head)
    h.kick(ctrlq)
    assert h.wait_used(ctrlq) == [(head, 1)]
    return mq.read_writable(ack)[0]


def test_control_queue_sets_queue_pairs_and_guest_offloads(taps):
    device = VirtioNet(taps, mac=MAC)
    with DeviceHarness(device) as h:
        set_pairs = bytes([VIRTIO_NET_CTRL_MQ, 0])
        assert _control(h, 4, set_pairs + struct.pack("<H", 1)) == 0          # VIRTIO_NET_OK
        assert device.active_pairs == 1
        assert [t.queue_enabled[-1] for t in taps] == [True, False]        # pair 1 detached
        assert _control(h, 4, set_pairs + struct.pack("<H", 2)) == 0
        assert [t.queue_enabled[-1] for t in taps] == [True, True]
        for bad in (set_pairs + struct.pack("<H", 0), set_pairs + struct.pack("<H", 3),
                    set_pairs + b"\x01", bytes([0, 0, 1]), b"\x04"):
            assert _control(h, 4, bad) == 1, bad                             # VIRTIO_NET_ERR
        assert device.active_pairs == 2
        # the driver switches receive offloads off and back on: the taps follow
        offloads = bytes([VIRTIO_NET_CTRL_GUEST_OFFLOADS, 0])
        assert _control(h, 4, offloads + struct.pack("<Q", VIRTIO_NET_F_GUEST_CSUM)) == 0
        assert [t.offloads[-1] for t in taps] == [TUN_F_CSUM, TUN_F_CSUM]
        everything = (VIRTIO_NET_F_GUEST_CSUM | VIRTIO_NET_F_GUEST_TSO4 | VIRTIO_NET_F_GUEST_TSO6
                      | VIRTIO_NET_F_GUEST_ECN | VIRTIO_NET_F_GUEST_UFO)
        assert _control(h, 4, offloads + struct.pack("<Q", everything)) == 0
        assert taps[1].offloads[-1] == (TUN_F_CSUM | TUN_F_TSO4 | TUN_F_TSO6 | TUN_F_TSO_ECN
                                        | TUN_F_UFO)
        # an offload that is not a negotiated feature is refused
        assert _control(h, 4, offloads + struct.pack("<Q", VIRTIO_NET_F_MTU)) == 1
    # a reset attaches every queue again
    assert [t.queue_enabled[-1] for t in taps] == [True, True]


def test_one_pair_refuses_vq_pairs_set_without_mq(tap):
    device = VirtioNet(tap, mac=MAC)
    with DeviceHarness(device) as h:
        assert _control(h, 2, bytes([VIRTIO_NET_CTRL_MQ, 0]) + struct.pack("<H", 1)) == 1
        assert tap.queue_enabled == []


def _mergeable(device):
    """A driver with mergeable receive buffers and no receive segmentation offload (so the
    largest frame is 1530 bytes)."""
    return (device.avail_features & ~VIRTIO_F_EVENT_IDX
            & ~(VIRTIO_NET_F_GUEST_TSO4 | VIRTIO_NET_F_GUEST_TSO6 | VIRTIO_NET_F_GUEST_UFO
                | VIRTIO_NET_F_GUEST_ECN))


def test_mergeable_buffers_spread_a_frame_and_count_them_in_num_buffers(tap):
    device = VirtioNet(tap, mac=MAC)
    with DeviceHarness(device, features=_mergeable(device), queue_size=64) as h:
        mq = h.queue(RECEIVEQ)
        heads = [mq.add_chain(writable=[512]) for _ in range(12)]
        bufs = {hd: mq.writable_buffers(hd) for hd in heads}
        h.kick(RECEIVEQ)
        frame = bytes(range(256)) * 5 + b"tail"                  # 1284 bytes: 3 buffers
        tap.host.send(HEADER + frame)
        used = h.wait_used(RECEIVEQ, 3)
        assert used == [(heads[0], 512), (heads[1], 512), (heads[2], 12 + 1284 - 1024)]
        data = b"".join(mq.read_writable(bufs[hd]) for hd in heads[:3])
        assert data[:12] == bytes(10) + struct.pack("<H", 3)     # num_buffers
        assert data[12:12 + len(frame)] == frame
        # a small frame takes one buffer; the buffers held meanwhile are not lost
        tap.host.send(HEADER + b"small")
        assert h.wait_used(RECEIVEQ) == [(heads[3], 17)]
        assert mq.read_writable(bufs[heads[3]])[:17] == RX_HEADER + b"small"
        assert mq.used_idx == 4


def test_mergeable_receive_waits_until_the_largest_frame_fits(tap):
    device = VirtioNet(tap, mac=MAC)
    with DeviceHarness(device, features=_mergeable(device), queue_size=64) as h:
        mq = h.queue(RECEIVEQ)
        first = mq.add_chain(writable=[1024])
        h.kick(RECEIVEQ)
        tap.host.send(HEADER + b"x" * 100)
        with pytest.raises(TimeoutError):                       # 1024 < 1530 bytes
            h.wait_used(RECEIVEQ, timeout=0.3)
        mq.add_chain(writable=[1024])
        h.kick(RECEIVEQ)
        assert h.wait_used(RECEIVEQ) == [(first, 112)]


def test_mergeable_gso_frame_needs_64k_of_buffers(tap):
    device = VirtioNet(tap, mac=MAC)
    features = device.avail_features & ~VIRTIO_F_EVENT_IDX
    assert features & VIRTIO_NET_F_MRG_RXBUF and features & VIRTIO_NET_F_GUEST_TSO4
    with DeviceHarness(device, features=features, queue_size=128) as h:
        mq = h.queue(RECEIVEQ)
        heads = [mq.add_chain(writable=[4096]) for _ in range(17)]   # 69632 bytes
        bufs = {hd: mq.writable_buffers(hd) for hd in heads}
        h.kick(RECEIVEQ)
        frame = b"g" * 60000
        tap.host.send(HEADER + frame)
        used = h.wait_used(RECEIVEQ, 15)
        assert [u[0] for u in used] == heads[:15]
        assert sum(u[1] for u in used) == 60012
        data = b"".join(mq.read_writable(bufs[hd]) for hd in heads[:15])
        assert data[10:12] == struct.pack("<H", 15) and data[12:60012] == frame


# --- the tap deleted under a running NIC (a real tap in a private network namespace) ----------
def _needs_taps():
    if os.geteuid() != 0 or not os.path.exists("/dev/net/tun"):
        pytest.skip("TAP TEST NOT RUN: it needs root and /dev/net/tun")


def test_a_deleted_tap_fails_the_nic_once_and_takes_its_link_down():
    """``ip link del`` of the tap: the worker notices (EBADFD / EPOLLERR) instead of
    spinning, the device fails once (reported), its status loses LINK_UP with a config
    interrupt, transmitted frames are completed as dropped, and shutdown still works."""
    _needs_taps()
    from pyroute2 import IPRoute

    from pych.devices.net.tap import Tap
    from tests.unit.devices.net.test_tap import in_new_netns

    def scenario():
        tap = Tap("pychgone0")
        failures = []
        device = VirtioNet(tap, mac=MAC, name="_net3")
        device.on_failure = lambda name, why: failures.append((name, why))
        with DeviceHarness(device, features=one_frame_per_chain(device)) as h:
            h.queue(RECEIVEQ).add_chain(writable=[1526])
            h.kick(RECEIVEQ)
            assert device.config_bytes()[6:8] == struct.pack("<H", 1)       # link up
            with IPRoute() as ipr:
                ipr.link("del", index=ipr.link_lookup(ifname="pychgone0")[0])
            assert h.interrupt.wait(lambda i: i.config_notifications == 1)
            why = "the tap pychgone0 is gone (File descriptor in bad state); link down"
            assert failures == [("_net3", why)] and device.failure == why
            assert device.config_bytes()[6:8] == struct.pack("<H", 0)       # link down
            frame = b"\xff" * 6 + MAC + b"\x08\x00" + b"payload"
            heads = [h.queue(TRANSMITQ).add_chain([HEADER + frame]) for _ in range(3)]
            h.kick(TRANSMITQ)
            assert [e.id for e in h.wait_used(TRANSMITQ, 3)] == heads      # not stuck
            assert device.tx_dropped == 3 and device.tx_frames == 0
            h.kick(RECEIVEQ)                                               # a kick is harmless
            time_before = os.times()
            time.sleep(0.5)
            busy = sum(os.times()[:2]) - sum(time_before[:2])
            assert busy < 0.3, f"the workers spin on the dead tap ({busy:.2f} s of CPU)"
            assert failures == [("_net3", why)]                             # reported once
        return device.tap.fd

    assert in_new_netns(scenario) == -1                                   # closed on shutdown


# --- live migration: the tap handed over -------------------------------------------------------
def test_a_quiesced_nic_takes_no_frame_until_it_runs_again(tap):
    """What a live migration relies on while it hands the tap over: the workers stop (the
    queues and their buffers are kept), a frame waits in the tap, and once the device runs
    again (the migration failed) it is received into the buffer posted before."""
    device = VirtioNet(tap, mac=MAC)
    with DeviceHarness(device, features=one_frame_per_chain(device)) as h:
        mq = h.queue(RECEIVEQ)
        head = mq.add_chain(writable=[1526])
        h.kick(RECEIVEQ)
        time.sleep(0.1)
        device.quiesce()
        assert not any(w.is_alive() for w in device._workers)
        tap.host.send(HEADER + b"while handed over")
        h.kick(RECEIVEQ)
        time.sleep(0.3)
        assert mq.used() == []                           # nobody took it
        device.unquiesce()
        assert h.wait_used(RECEIVEQ) == [(head, 29)]
        assert device.rx_frames == 1


def test_release_and_retake_of_a_tap_pych_created():
    """By name (unix/tcp): the tap is made persistent and closed, so it outlives the sender
    and the receiver can open it; a failed migration reopens it, persistence as it was.
    By fd (local): the fds stay open and the tap is only no longer polled."""
    _needs_taps()
    from pych.devices.net.tap import Tap
    from tests.unit.devices.net.test_tap import in_new_netns, links

    def scenario():
        out = {}
        first = Tap("pychmig0")
        first.configure_host()                           # up: a tap that is down takes no frame
        device = VirtioNet(first, mac=MAC, name="_net1")
        with DeviceHarness(device, features=one_frame_per_chain(device)) as h:
            out["persisted"] = device.release_taps(close=True)
            out["closed"] = device.tap.fd
            out["kept"] = "pychmig0" in links()
            taker = Tap("pychmig0")                      # what the receiver does
            out["taker_persistent"] = taker.persistent
            taker.close()
            device.retake_taps()
            out["retaken"] = (device.tap.fd >= 0, device.tap.persistent)
            frame = b"\xff" * 6 + MAC + b"\x08\x00" + b"payload"
            head = h.queue(TRANSMITQ).add_chain([HEADER + frame])
            h.kick(TRANSMITQ)
            out["sent"] = (h.wait_used(TRANSMITQ) == [(head, 0)], device.tx_frames,
                           device.tx_dropped)
            fd = device.tap.fd
            out["by_fd"] = (device.release_taps(close=False), device.tap.fd == fd)
            device.retake_taps()
            # the migration succeeded: the device is shut down with its taps handed over
            device.release_taps(close=True)
            device.shutdown()
            out["shut_down"] = "pychmig0" in links()
            taker = Tap("pychmig0")                      # the receiver's part
            taker.set_persistent(False)
            taker.close()
        out["after"] = "pychmig0" in links()
        return out

    out = in_new_netns(scenario)
    assert out["persisted"] == ["pychmig0"] and out["closed"] == -1 and out["kept"]
    assert out["taker_persistent"] is True
    assert out["retaken"] == (True, False)
    assert out["sent"] == (True, 1, 0)
    assert out["by_fd"] == ([], True)
    assert out["shut_down"] is True                   # the receiver's now
    assert out["after"] is False                      # not persistent: gone with its last queue
