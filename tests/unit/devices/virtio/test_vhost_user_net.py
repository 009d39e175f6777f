"""vhost-user-net (pych/devices/virtio/vhost_user_net.py) against a fake back-end: the
features pych offers and passes on, its own configuration space, server mode."""

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
from pych.devices.virtio.net import (VIRTIO_NET_F_CSUM, VIRTIO_NET_F_CTRL_VQ,
                                     VIRTIO_NET_F_GUEST_CSUM, VIRTIO_NET_F_GUEST_TSO4,
                                     VIRTIO_NET_F_HOST_TSO4, VIRTIO_NET_F_HOST_UFO,
                                     VIRTIO_NET_F_MAC, VIRTIO_NET_F_MQ, VIRTIO_NET_F_MRG_RXBUF,
                                     VIRTIO_NET_F_MTU, VIRTIO_NET_F_STATUS)
from pych.devices.virtio.vhost_user_net import VhostUserNet, accept_backend

from tests.support.virtio import DeviceHarness
from tests.unit.devices.test_vhost_user import FakeBackend

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
        assert net.queue_max_sizes == (256, 256)
        for bit in (VIRTIO_NET_F_CSUM, VIRTIO_NET_F_GUEST_TSO4, VIRTIO_NET_F_MRG_RXBUF,
                    VIRTIO_NET_F_MAC, VIRTIO_NET_F_STATUS, VIRTIO_NET_F_MTU):
            assert net.avail_features & bit, hex(bit)
        # one queue pair, no control queue: the back-end's MQ and CTRL_VQ are not offered,
        # nor what the back-end does not offer
        assert not net.avail_features & (VIRTIO_NET_F_MQ | VIRTIO_NET_F_CTRL_VQ
                                         | VIRTIO_NET_F_HOST_UFO)
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
        assert sorted(m.state()[0] for m in backend.of(Request.SET_VRING_KICK)) == [0, 1]
        assert h.device.active


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
