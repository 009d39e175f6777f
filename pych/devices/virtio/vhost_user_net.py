"""vhost-user-net: a virtio-net device whose queues a vhost-user back-end serves (DPDK's
vhost PMD, OVS-DPDK, ...), so no frame passes through pych (see
:mod:`pych.devices.virtio.vhost_user_device`).

pych keeps the configuration space (MAC, link status, MTU) and offers the net feature bits
the back-end offers among the checksum and segmentation offloads and mergeable receive
buffers, with VIRTIO_NET_F_MAC and VIRTIO_NET_F_STATUS (and VIRTIO_NET_F_MTU) from pych
itself; only the bits the back-end offered are passed on to it (SET_FEATURES), since a
back-end refuses bits it does not know. One queue pair: receiveq 0 and transmitq 1.

``vhost_mode`` is the reference's: ``Client`` (the default) connects to the back-end's
listening socket; ``Server`` makes pych listen at the socket path and wait for the
back-end to connect (:func:`accept_backend`), with a bound on the wait so a back-end that
never comes fails the boot or the ``vm.add-net`` with a message instead of hanging pych.

A back-end that hangs up while the NIC runs fails it (``vm.info``, a ``device-failed``
event, NEEDS_RESET) and takes its link down, so the guest sees NO-CARRIER.
"""

from __future__ import annotations

import contextlib
import os
import socket
import struct
from collections.abc import Callable
from typing import ClassVar

from pych.devices.vhost_user import (VHOST_USER_F_PROTOCOL_FEATURES, ProtocolFeature,
                                     VhostUserError, VhostUserFrontend)

from .device import VirtioDeviceType, VirtioInterrupt
from .net import (VIRTIO_NET_F_CSUM, VIRTIO_NET_F_GUEST_CSUM, VIRTIO_NET_F_GUEST_ECN,
                  VIRTIO_NET_F_GUEST_TSO4, VIRTIO_NET_F_GUEST_TSO6, VIRTIO_NET_F_GUEST_UFO,
                  VIRTIO_NET_F_HOST_ECN, VIRTIO_NET_F_HOST_TSO4, VIRTIO_NET_F_HOST_TSO6,
                  VIRTIO_NET_F_HOST_UFO, VIRTIO_NET_F_MAC, VIRTIO_NET_F_MRG_RXBUF,
                  VIRTIO_NET_F_MTU, VIRTIO_NET_F_STATUS, VIRTIO_NET_S_LINK_UP)
from .vhost_user_device import VhostUserDevice

DEFAULT_QUEUE_SIZE = 256
#: How long pych waits in server mode for the back-end to connect.
ACCEPT_TIMEOUT = 30.0

_CONFIG = struct.Struct("<6sHHH")       # mac, status, max_virtqueue_pairs, mtu
_TSO = (VIRTIO_NET_F_HOST_TSO4 | VIRTIO_NET_F_HOST_TSO6 | VIRTIO_NET_F_HOST_ECN
        | VIRTIO_NET_F_GUEST_TSO4 | VIRTIO_NET_F_GUEST_TSO6 | VIRTIO_NET_F_GUEST_ECN)
_UFO = VIRTIO_NET_F_HOST_UFO | VIRTIO_NET_F_GUEST_UFO
_CSUM = VIRTIO_NET_F_CSUM | VIRTIO_NET_F_GUEST_CSUM


def accept_backend(path: str, *, timeout: float = ACCEPT_TIMEOUT) -> VhostUserFrontend:
    """Server mode: listen at ``path`` (a stale socket file there is replaced) and take the
    first back-end that connects within ``timeout`` seconds. The listening socket and its
    file are gone afterwards, as the connection is all pych keeps. Raises
    :class:`VhostUserError`."""
    listener = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM | socket.SOCK_CLOEXEC)
    try:
        with contextlib.suppress(FileNotFoundError):
            if os.path.exists(path) and not os.path.isdir(path):
                os.unlink(path)
        try:
            listener.bind(path)
            listener.listen(1)
        except OSError as e:
            raise VhostUserError(f"cannot listen for the vhost-user backend at {path}: "
                                 f"{e.strerror or e}") from None
        listener.settimeout(timeout)
        try:
            sock, _ = listener.accept()
        except TimeoutError:
            raise VhostUserError(f"no vhost-user backend connected to {path} within "
                                 f"{timeout:g} s (vhost_mode=server)") from None
        except OSError as e:
            raise VhostUserError(f"waiting for the vhost-user backend at {path}: "
                                 f"{e.strerror or e}") from None
        sock.settimeout(None)
        from pych.devices.vhost_user import REPLY_TIMEOUT
        sock.settimeout(REPLY_TIMEOUT)
        return VhostUserFrontend(sock, path)
    finally:
        listener.close()
        with contextlib.suppress(OSError):
            os.unlink(path)


class VhostUserNet(VhostUserDevice):
    """A virtio-net device (one queue pair of ``queue_size``) served by the vhost-user
    back-end at ``socket_path``; ``mac``, ``mtu`` and the ``offload_*`` switches as for
    :class:`~pych.devices.virtio.net.VirtioNet`."""

    device_type = VirtioDeviceType.NET
    what = "vhost-user-net"
    wanted_protocol_features: ClassVar[int] = (ProtocolFeature.MQ | ProtocolFeature.REPLY_ACK
                                               | ProtocolFeature.CONFIGURE_MEM_SLOTS)
    device_features: ClassVar[int] = _CSUM | _TSO | _UFO | VIRTIO_NET_F_MRG_RXBUF

    def __init__(self, socket_path: str, *, mac: bytes, mtu: int | None = None,
                 queue_size: int = DEFAULT_QUEUE_SIZE, offload_csum: bool = True,
                 offload_tso: bool = True, offload_ufo: bool = True, name: str = "net",
                 connect: Callable[[str], VhostUserFrontend] = VhostUserFrontend.connect,
                 connection: VhostUserFrontend | None = None) -> None:
        if len(mac) != 6:
            raise ValueError(f"a MAC address has 6 bytes, not {len(mac)}")
        self.mac = mac
        self.mtu = mtu
        super().__init__(socket_path, queue_sizes=[queue_size, queue_size], name=name,
                         connect=connect, connection=connection)
        # The offload switches take bits away (TSO and UFO need checksum offload).
        if not offload_csum:
            self.avail_features &= ~(_CSUM | _TSO | _UFO)
        if not offload_tso:
            self.avail_features &= ~_TSO
        if not offload_ufo:
            self.avail_features &= ~_UFO
        # pych's own: the configuration space is pych's.
        self.avail_features |= VIRTIO_NET_F_MAC | VIRTIO_NET_F_STATUS
        if mtu is not None:
            self.avail_features |= VIRTIO_NET_F_MTU

    def __repr__(self) -> str:
        return f"<VhostUserNet {self.name} socket={self.socket_path}>"

    def backend_features_to_set(self) -> int:
        """What SET_FEATURES tells the back-end: the driver's choice among the bits the
        back-end offered (MAC, STATUS and MTU are pych's), and protocol features."""
        return ((self.acked_features & self.backend_features)
                | (self.backend_features & VHOST_USER_F_PROTOCOL_FEATURES))

    def config_bytes(self) -> bytes:
        status = VIRTIO_NET_S_LINK_UP if self.failure is None else 0
        return _CONFIG.pack(self.mac, status, 1, self.mtu or 0)

    def _backend_lost(self, interrupt: VirtioInterrupt) -> dict[int, Callable[[], None]]:
        """The back-end hung up: NEEDS_RESET, and the link goes down (the status field
        loses LINK_UP, with a configuration change interrupt), as for a deleted tap."""
        sources = super()._backend_lost(interrupt)
        self.config_changed()
        return sources
