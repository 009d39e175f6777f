"""vhost-user-net (pych/devices/virtio/vhost_user_net.py) against a fake back-end: the
features pych offers and passes on, its own configuration space, queue pairs and the
control queue pych serves itself, server mode."""

from __future__ import annotations

import os
import socket
import struct
import threading

import pytest

from pych.devices.vhost_user import (VHOST_USER_F_PROTOCOL_FEATURES, ProtocolFeature, Request,
                                     VhostUserError)
from pych.devices.virtio.device import (VIRTIO_F_EVENT_IDX, VIRTIO_F_VERSION_1,
                                        VirtioDeviceType)
from pych.devices.virtio.net import (VIRTIO_NET_CTRL_MQ, VIRTIO_NET_CTRL_MQ_VQ_PAIRS_SET,
                                     VIRTIO_NET_ERR, VIRTIO_NET_OK, VIRTIO_NET_F_CSUM, VIRTIO_NET_F_CTRL_VQ,
                                     VIRTIO_NET_F_GUEST_CSUM, VIRTIO_NET_F_GUEST_TSO4,
                                     VIRTIO_NET_F_HOST_TSO4, VIRTIO_NET_F_HOST_UFO,
                                     VIRTIO_NET_F_MAC, VIRTIO_NET_F_MQ, VIRTIO_NET_F_MRG_RXBUF,
                                     VIRTIO_NET_F_MTU, VIRTIO_NET_F_STATUS)
from pych.devices.virtio.vhost_user_net import VhostUserNet, accept_backend

from tests.support.virtio import DeviceHarness
from tests.unit.devices.test_vhost_user import FakeBackend

VIRTIO_NET_CTRL_RX = 0

MAC = bytes.fromhex("525400abcdef")
#: What DPDK's vhost PMD offers (no MAC: DPDK leaves the configuration space to the VMM).
DPDK_FEATURES = (VIRTIO_F_VERSION_1 | VHOST_USER_F_PROTOCOL_FEATURES | VIRTIO_F_EVENT_IDX
                 | VIRTIO_NET_F_CSUM | VIRTIO_NET_F_GUEST_CSUM | VIRTIO_NET_F_HOST_TSO4
                 | VIRTIO_NET_F_GUEST_TSO4 | VIRTIO_NET_F_MRG_RXBUF | VIRTIO_NET_F_CTRL_VQ
                 | VIRTIO_NET_F_MQ)
DPDK_PROTOCOL = ProtocolFeature.MQ | ProtocolFeature.REPLY_ACK


@pytest.fixture
def backend():
    b = FakeBackend(features=DPDK_FEATURES, protocol_features=DPDK_PROTOCOL, queue_num=2)
    yield b
    b.close()


def make(backend, **kw) -> VhostUserNet:
    return VhostUserNet("dpdk.sock", mac=MAC, connect=lambda path: backend.frontend(), **kw)


def test_offers_the_backends_offloads_and_its_own_config_space(backend):
    net = make(backend, mtu=1400)
    try:
        assert net.device_type == VirtioDeviceType.NET
        # one queue pair and the control queue (pych's: the back-end offers CTRL_VQ)
        assert net.queue_max_sizes == (256, 256, 256)
        for bit in (VIRTIO_NET_F_CSUM, VIRTIO_NET_F_GUEST_TSO4, VIRTIO_NET_F_MRG_RXBUF,
                    VIRTIO_NET_F_MAC, VIRTIO_NET_F_STATUS, VIRTIO_NET_F_MTU,
                    VIRTIO_NET_F_CTRL_VQ):
            assert net.avail_features & bit, hex(bit)
        # one pair: no MQ; nor what the back-end does not offer
        assert not net.avail_features & (VIRTIO_NET_F_MQ | VIRTIO_NET_F_HOST_UFO)
        assert net.config_bytes() == MAC + struct.pack("<HHH", 1, 1, 1400)
    finally:
        net.shutdown()


def test_offload_switches_take_bits_away(backend):
    net = make(backend, offload_csum=False, offload_tso=False, offload_ufo=False)
    try:
        assert not net.avail_features & (VIRTIO_NET_F_CSUM | VIRTIO_NET_F_GUEST_CSUM
                                         | VIRTIO_NET_F_GUEST_TSO4 | VIRTIO_NET_F_HOST_TSO4)
        assert net.avail_features & VIRTIO_NET_F_MRG_RXBUF
    finally:
        net.shutdown()


def test_set_features_passes_only_the_backends_bits(backend):
    net = make(backend)
    with DeviceHarness(net, queue_size=16) as h:
        assert backend.wait_for(lambda b: b.of(Request.SET_VRING_KICK))
        told = backend.of(Request.SET_FEATURES)[-1].u64()
        assert told & VIRTIO_NET_F_MRG_RXBUF and told & VHOST_USER_F_PROTOCOL_FEATURES
        assert not told & (VIRTIO_NET_F_MAC | VIRTIO_NET_F_STATUS)   # pych's, not DPDK's
        assert told & ~DPDK_FEATURES == 0
        # the control queue (2) stays pych's
        assert sorted(m.state()[0] for m in backend.of(Request.SET_VRING_KICK)) == [0, 1]
        assert h.device.active


def test_a_backend_without_a_control_queue_gets_none():
    b = FakeBackend(features=DPDK_FEATURES & ~(VIRTIO_NET_F_CTRL_VQ | VIRTIO_NET_F_MQ),
                    protocol_features=DPDK_PROTOCOL, queue_num=2)
    try:
        net = make(b)
        try:
            assert net.queue_max_sizes == (256, 256)
            assert not net.avail_features & (VIRTIO_NET_F_CTRL_VQ | VIRTIO_NET_F_MQ)
        finally:
            net.shutdown()
    finally:
        b.close()


def _control(h, ctrlq, command: bytes) -> int:
    mq = h.queue(ctrlq)
    head = mq.add_chain([command[:2], command[2:]], writable=[1])
    ack = mq.writable_buffers(head)
    h.kick(ctrlq)
    assert h.wait_used(ctrlq) == [(head, 1)]
    return mq.read_writable(ack)[0]


def test_two_pairs_four_rings_to_the_backend_and_the_control_queue_pychs():
    b = FakeBackend(features=DPDK_FEATURES, protocol_features=DPDK_PROTOCOL, queue_num=4)
    try:
        net = make(b, pairs=2)
        assert net.queue_max_sizes == (256,) * 5
        assert net.avail_features & VIRTIO_NET_F_MQ and net.avail_features & VIRTIO_NET_F_CTRL_VQ
        assert net.config_bytes() == MAC + struct.pack("<HHH", 1, 2, 0)  # max_virtqueue_pairs
        with DeviceHarness(net, queue_size=16) as h:
            assert b.wait_for(lambda b: len(b.of(Request.SET_VRING_ENABLE)) == 4)
            assert sorted(m.state()[0] for m in b.of(Request.SET_VRING_KICK)) == [0, 1, 2, 3]
            assert [m.state() for m in b.of(Request.SET_VRING_ENABLE)] == [
                (0, 1), (1, 1), (2, 1), (3, 1)]
            told = b.of(Request.SET_FEATURES)[-1].u64()
            assert told & VIRTIO_NET_F_MQ and told & VIRTIO_NET_F_CTRL_VQ
            set_pairs = bytes([VIRTIO_NET_CTRL_MQ, VIRTIO_NET_CTRL_MQ_VQ_PAIRS_SET])
            # one pair: the second pair's rings are disabled, as QEMU does
            assert _control(h, 4, set_pairs + struct.pack("<H", 1)) == VIRTIO_NET_OK
            assert [m.state() for m in b.of(Request.SET_VRING_ENABLE)[4:]] == [
                (0, 1), (1, 1), (2, 0), (3, 0)]
            assert net.active_pairs == 1
            assert _control(h, 4, set_pairs + struct.pack("<H", 2)) == VIRTIO_NET_OK
            assert [m.state() for m in b.of(Request.SET_VRING_ENABLE)[8:]] == [
                (0, 1), (1, 1), (2, 1), (3, 1)]
            for bad in (set_pairs + struct.pack("<H", 0), set_pairs + struct.pack("<H", 3),
                        bytes([VIRTIO_NET_CTRL_MQ, 1]) + struct.pack("<H", 1),
                        bytes([VIRTIO_NET_CTRL_RX, 0]) + b"\x01"):
                assert _control(h, 4, bad) == VIRTIO_NET_ERR, bad
            assert len(b.of(Request.SET_VRING_ENABLE)) == 12     # nothing more asked
            assert net.ctrl_errors == 4
    finally:
        b.close()


@pytest.mark.parametrize("missing, message", [
    ({"queue_num": 3}, "serves 3 queues, but this device needs 4"),
    ({"protocol_features": ProtocolFeature.REPLY_ACK}, "the vhost-user protocol feature MQ"),
    ({"features": DPDK_FEATURES & ~VIRTIO_NET_F_MQ}, "needs VIRTIO_NET_F_MQ, which"),
    ({"features": DPDK_FEATURES & ~VIRTIO_NET_F_CTRL_VQ}, "needs VIRTIO_NET_F_CTRL_VQ, which"),
])
def test_two_pairs_need_the_backends_multiqueue(missing, message):
    kw = {"features": DPDK_FEATURES, "protocol_features": DPDK_PROTOCOL, "queue_num": 4}
    b = FakeBackend(**{**kw, **missing})
    try:
        with pytest.raises(VhostUserError, match=message):
            make(b, pairs=2)
    finally:
        b.close()


def test_server_mode_waits_for_the_backend_and_removes_its_socket(tmp_path):
    path = str(tmp_path / "net.sock")
    accepted = {}

    def serve():
        accepted["frontend"] = accept_backend(path, timeout=10)

    thread = threading.Thread(target=serve)
    thread.start()
    client = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    for _ in range(500):
        try:
            client.connect(path)
            break
        except OSError:
            threading.Event().wait(0.01)
    thread.join(10)
    frontend = accepted["frontend"]
    try:
        assert frontend.connected and not os.path.exists(path)
    finally:
        frontend.close()
        client.close()


def test_server_mode_gives_up_with_a_message(tmp_path):
    path = str(tmp_path / "never.sock")
    with pytest.raises(VhostUserError, match=r"no vhost-user backend connected to .*never.sock "
                       r"within 0.2 s \(vhost_mode=server\)"):
        accept_backend(path, timeout=0.2)
    assert not os.path.exists(path)


def test_client_mode_without_a_backend_names_the_socket(tmp_path):
    with pytest.raises(VhostUserError, match="vhost-user-net _net1: cannot connect to the "
                       "vhost-user backend at .*absent.sock"):
        VhostUserNet(str(tmp_path / "absent.sock"), mac=MAC, name="_net1")


def test_a_backend_that_hangs_up_takes_the_link_down(backend):
    failures = []
    net = make(backend)
    net.on_failure = lambda name, why: failures.append(why)
    with DeviceHarness(net, queue_size=16) as h:
        assert backend.wait_for(lambda b: b.of(Request.SET_VRING_KICK))
        assert struct.unpack_from("<H", net.config_bytes(), 6)[0] == 1     # link up
        backend.sock.shutdown(socket.SHUT_RDWR)                           # the back-end died
        assert h.interrupt.wait(lambda i: i.reset_requested and i.config_notifications == 1)
        assert struct.unpack_from("<H", net.config_bytes(), 6)[0] == 0     # link down
        assert failures == [net.failure] and "hung up" in net.failure
