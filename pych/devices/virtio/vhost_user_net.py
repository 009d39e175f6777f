"""vhost-user-net: a virtio-net device whose queues a vhost-user back-end serves (DPDK's
vhost PMD, OVS-DPDK, ...), so no frame passes through pych (see
:mod:`pych.devices.virtio.vhost_user_device`).

pych keeps the configuration space (MAC, link status, MTU, ``max_virtqueue_pairs``) and
offers the net feature bits the back-end offers among the checksum and segmentation
offloads and mergeable receive buffers, with VIRTIO_NET_F_MAC and VIRTIO_NET_F_STATUS (and
VIRTIO_NET_F_MTU) from pych itself; only the bits the back-end offered are passed on to it
(SET_FEATURES), since a back-end refuses bits it does not know.

Queue pairs (``num_queues`` = 2 × pairs, as in the reference): queues ``2i`` (receiveq) and
``2i + 1`` (transmitq) of pair ``i`` are the back-end's, one vring pair each. More than one
pair needs the back-end's VHOST_USER_PROTOCOL_F_MQ (pych asks GET_QUEUE_NUM and refuses the
device if the back-end serves fewer than ``num_queues`` rings, as the reference does) and its
VIRTIO_NET_F_MQ and VIRTIO_NET_F_CTRL_VQ, which pych then offers the driver with
``max_virtqueue_pairs`` = pairs. The control queue (last, ``2 × pairs``) is served by pych,
as the reference and QEMU do, whenever the back-end offers VIRTIO_NET_F_CTRL_VQ:
``VIRTIO_NET_CTRL_MQ_VQ_PAIRS_SET`` enables the rings of the pairs the driver uses and
disables the others' (SET_VRING_ENABLE, as QEMU does; the reference only acknowledges it),
so the back-end sends nothing to a receive queue the driver does not poll.

``vhost_mode`` is the reference's: ``Client`` (the default) connects to the back-end's
listening socket; ``Server`` makes pych listen at the socket path and wait for the
back-end to connect (:func:`accept_backend`), with a bound on the wait so a back-end that
never comes fails the boot or the ``vm.add-net`` with a message instead of hanging pych.

A back-end that hangs up while the NIC runs fails it (``vm.info``, a ``device-failed``
event, NEEDS_RESET) and takes its link down, so the guest sees NO-CARRIER.
"""

from __future__ import annotations

import contextlib
import logging
import os
import socket
import struct
from collections.abc import Callable
from typing import ClassVar

from pych.devices.vhost_user import (VHOST_USER_F_PROTOCOL_FEATURES, ProtocolFeature,
                                     VhostUserError, VhostUserFrontend)

from .device import VirtioDeviceType, VirtioInterrupt
from .queue import DescriptorChain
from .net import (VIRTIO_NET_CTRL_MQ, VIRTIO_NET_CTRL_MQ_VQ_PAIRS_SET, VIRTIO_NET_F_CSUM,
                  VIRTIO_NET_F_CTRL_VQ, VIRTIO_NET_F_GUEST_CSUM, VIRTIO_NET_F_GUEST_ECN,
                  VIRTIO_NET_F_MQ, answer_control_command,
                  VIRTIO_NET_F_GUEST_TSO4, VIRTIO_NET_F_GUEST_TSO6, VIRTIO_NET_F_GUEST_UFO,
                  VIRTIO_NET_F_HOST_ECN, VIRTIO_NET_F_HOST_TSO4, VIRTIO_NET_F_HOST_TSO6,
                  VIRTIO_NET_F_HOST_UFO, VIRTIO_NET_F_MAC, VIRTIO_NET_F_MRG_RXBUF,
                  VIRTIO_NET_F_MTU, VIRTIO_NET_F_STATUS, VIRTIO_NET_S_LINK_UP)
from .vhost_user_device import VhostUserDevice

log = logging.getLogger(__name__)

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
    """A virtio-net device (``pairs`` queue pairs of ``queue_size``) served by the
    vhost-user back-end at ``socket_path``; ``mac``, ``mtu`` and the ``offload_*`` switches
    as for :class:`~pych.devices.virtio.net.VirtioNet`."""

    device_type = VirtioDeviceType.NET
    what = "vhost-user-net"
    wanted_protocol_features: ClassVar[int] = (ProtocolFeature.MQ | ProtocolFeature.REPLY_ACK
                                               | ProtocolFeature.CONFIGURE_MEM_SLOTS)
    device_features: ClassVar[int] = _CSUM | _TSO | _UFO | VIRTIO_NET_F_MRG_RXBUF

    def __init__(self, socket_path: str, *, mac: bytes, mtu: int | None = None,
                 queue_size: int = DEFAULT_QUEUE_SIZE, pairs: int = 1,
                 offload_csum: bool = True, offload_tso: bool = True,
                 offload_ufo: bool = True, name: str = "net",
                 connect: Callable[[str], VhostUserFrontend] = VhostUserFrontend.connect,
                 connection: VhostUserFrontend | None = None) -> None:
        if len(mac) != 6:
            raise ValueError(f"a MAC address has 6 bytes, not {len(mac)}")
        if pairs < 1:
            raise ValueError(f"a net device needs a queue pair, not {pairs}")
        self.mac = mac
        self.mtu = mtu
        self.pairs = pairs
        self.ctrlq = 2 * pairs
        self.active_pairs = pairs          # as the driver last set it (VQ_PAIRS_SET)
        self.ctrl_errors = 0
        self._queue_size = queue_size
        super().__init__(socket_path, queue_sizes=[queue_size] * (2 * pairs), name=name,
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

    def backend_queue_count(self) -> int:
        return 2 * self.pairs

    def _negotiate_device(self) -> None:
        """The control queue (pych's) when the back-end offers it; several pairs need the
        back-end's multiqueue."""
        offered = self.backend_features
        if self.pairs > 1:
            missing = [name for name, ok in (
                ("the vhost-user protocol feature MQ",
                 self.protocol_features & ProtocolFeature.MQ),
                ("VIRTIO_NET_F_MQ", offered & VIRTIO_NET_F_MQ),
                ("VIRTIO_NET_F_CTRL_VQ", offered & VIRTIO_NET_F_CTRL_VQ)) if not ok]
            if missing:
                raise VhostUserError(
                    f"num_queues={2 * self.pairs} needs {' and '.join(missing)}, which the "
                    f"vhost-user backend at {self.socket_path} does not offer")
            self.avail_features |= VIRTIO_NET_F_MQ
        if offered & VIRTIO_NET_F_CTRL_VQ:
            self.avail_features |= VIRTIO_NET_F_CTRL_VQ
            self.queue_max_sizes = (*self.queue_max_sizes, self._queue_size)

    def serves_queue(self, index: int) -> bool:
        return index == self.ctrlq

    def queue_kicked(self, index: int) -> None:
        self.process_queue(index)

    def handle_chain(self, index: int, chain: DescriptorChain) -> int:
        """One control queue command: class, command and data readable, one ack byte
        writable."""
        return answer_control_command(self, chain, self._control)

    def _control(self, cls: int, command: int, payload: bytes) -> bool:
        if (cls, command) != (VIRTIO_NET_CTRL_MQ, VIRTIO_NET_CTRL_MQ_VQ_PAIRS_SET):
            return False
        if not self.has_feature(VIRTIO_NET_F_MQ) or len(payload) < 2:
            return False
        pairs = int.from_bytes(payload[:2], "little")
        if not 1 <= pairs <= self.pairs:
            return False
        if self.backend_features & VHOST_USER_F_PROTOCOL_FEATURES:
            try:
                for index in self._started:
                    self._backend.set_vring_enable(index, index // 2 < pairs)
            except VhostUserError as e:
                log.error("%s: cannot switch to %d queue pair(s): %s", self.name, pairs, e)
                return False
        self.active_pairs = pairs
        log.info("%s: the driver uses %d of %d queue pairs", self.name, pairs, self.pairs)
        return True

    def reset(self) -> None:
        super().reset()
        self.active_pairs = self.pairs          # activation enables every ring again

    def backend_features_to_set(self) -> int:
        """What SET_FEATURES tells the back-end: the driver's choice among the bits the
        back-end offered (MAC, STATUS and MTU are pych's), and protocol features."""
        return ((self.acked_features & self.backend_features)
                | (self.backend_features & VHOST_USER_F_PROTOCOL_FEATURES))

    def config_bytes(self) -> bytes:
        status = VIRTIO_NET_S_LINK_UP if self.failure is None else 0
        return _CONFIG.pack(self.mac, status, self.pairs, self.mtu or 0)

    def _backend_lost(self, interrupt: VirtioInterrupt) -> dict[int, Callable[[], None]]:
        """The back-end hung up: NEEDS_RESET, and the link goes down (the status field
        loses LINK_UP, with a configuration change interrupt), as for a deleted tap."""
        sources = super()._backend_lost(interrupt)
        self.config_changed()
        return sources
