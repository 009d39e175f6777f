"""virtio-net (virtio 1.x §5.1) on a host tap, one queue pair, no control queue.

Queue 0 (receiveq) carries frames to the guest, queue 1 (transmitq) frames from it.
Every frame in either direction starts with the 12-byte ``virtio_net_hdr_v1``, and the
tap is opened with the same header (see :mod:`pych.devices.net.tap`), so the device
never parses a frame: it moves each one with a single ``readv``/``writev`` between the
tap fd and the guest buffers of one descriptor chain (no copy through Python bytes).
That also carries the checksum and segmentation offloads through unchanged: the tap is
told (``TUNSETOFFLOAD``) to hand us exactly the offloaded frames the driver accepted.

Receive flow control: the tap fd sits in a private epoll set that the worker polls.
While the driver has posted no receive buffer, the tap is taken out of that set, so an
incoming frame waits in the tap's queue (not in pych) until the driver's next kick.

Not implemented: mergeable receive buffers, multiqueue, the control queue.  Without
mergeable buffers and with the guest TSO/UFO features, Linux posts 64 KiB receive
chains ("big packets"), which hold any frame the tap produces.
"""

from __future__ import annotations

import logging
import os
import select
import struct
from collections.abc import Callable

from pych.devices.rate_limiter import RateLimiter
from pych.devices.net.tap import (TUN_F_CSUM, TUN_F_TSO4, TUN_F_TSO6, TUN_F_TSO_ECN, TUN_F_UFO,
                                  VNET_HDR_SIZE, Tap, TapError)
from pych.guest_log import GuestLog

from .device import VirtioDevice, VirtioDeviceType
from .queue import DescriptorChain

log = logging.getLogger(__name__)
_guest_log = GuestLog(log)       # what the guest can repeat at will is rate-limited

VIRTIO_NET_F_CSUM = 1 << 0
VIRTIO_NET_F_GUEST_CSUM = 1 << 1
VIRTIO_NET_F_MTU = 1 << 3
VIRTIO_NET_F_MAC = 1 << 5
VIRTIO_NET_F_GUEST_TSO4 = 1 << 7
VIRTIO_NET_F_GUEST_TSO6 = 1 << 8
VIRTIO_NET_F_GUEST_ECN = 1 << 9
VIRTIO_NET_F_GUEST_UFO = 1 << 10
VIRTIO_NET_F_HOST_TSO4 = 1 << 11
VIRTIO_NET_F_HOST_TSO6 = 1 << 12
VIRTIO_NET_F_HOST_ECN = 1 << 13
VIRTIO_NET_F_HOST_UFO = 1 << 14
VIRTIO_NET_F_STATUS = 1 << 16

VIRTIO_NET_S_LINK_UP = 1

RECEIVEQ = 0
TRANSMITQ = 1
DEFAULT_QUEUE_SIZE = 256
#: Frames received per batch before the driver is interrupted (a latency bound).
RX_BATCH = 64
IOV_MAX = os.sysconf("SC_IOV_MAX")      # a frame fits in far fewer buffers than this

_CONFIG = struct.Struct("<6sHHH")       # mac, status, max_virtqueue_pairs, mtu

#: Which tap offload each guest receive feature allows.
_GUEST_OFFLOADS = (
    (VIRTIO_NET_F_GUEST_CSUM, TUN_F_CSUM),
    (VIRTIO_NET_F_GUEST_TSO4, TUN_F_TSO4),
    (VIRTIO_NET_F_GUEST_TSO6, TUN_F_TSO6),
    (VIRTIO_NET_F_GUEST_ECN, TUN_F_TSO_ECN),
    (VIRTIO_NET_F_GUEST_UFO, TUN_F_UFO),
)


def parse_mac(text: str) -> bytes:
    """``"12:34:56:78:9a:bc"`` as 6 bytes."""
    octets = text.split(":")
    if len(octets) != 6:
        raise ValueError(f"{text!r} is not a MAC address")
    return bytes(int(o, 16) for o in octets)


def format_mac(mac: bytes) -> str:
    return ":".join(f"{b:02x}" for b in mac)


def random_mac() -> bytes:
    """A random unicast, locally administered MAC (the reference's default)."""
    mac = bytearray(os.urandom(6))
    mac[0] = (mac[0] & 0xFE) | 0x02
    return bytes(mac)


def offered_features(*, csum: bool, tso: bool, ufo: bool, mtu: int | None) -> int:
    """The feature bits for the reference's ``offload_*`` switches (TSO and UFO need
    checksum offload, as in the spec's feature dependencies)."""
    features = VIRTIO_NET_F_MAC | VIRTIO_NET_F_STATUS
    if mtu is not None:
        features |= VIRTIO_NET_F_MTU
    if csum:
        features |= VIRTIO_NET_F_CSUM | VIRTIO_NET_F_GUEST_CSUM
        if tso:
            features |= (VIRTIO_NET_F_HOST_TSO4 | VIRTIO_NET_F_HOST_TSO6 | VIRTIO_NET_F_HOST_ECN
                         | VIRTIO_NET_F_GUEST_TSO4 | VIRTIO_NET_F_GUEST_TSO6 | VIRTIO_NET_F_GUEST_ECN)
        if ufo:
            features |= VIRTIO_NET_F_HOST_UFO | VIRTIO_NET_F_GUEST_UFO
    return features


class VirtioNet(VirtioDevice):
    """A virtio-net device that owns ``tap`` (closed on shutdown)."""

    device_type = VirtioDeviceType.NET

    def __init__(self, tap: Tap, *, mac: bytes, mtu: int | None = None,
                 queue_size: int = DEFAULT_QUEUE_SIZE, offload_csum: bool = True,
                 offload_tso: bool = True, offload_ufo: bool = True, name: str = "net",
                 rx_rate_limiter: RateLimiter | None = None,
                 tx_rate_limiter: RateLimiter | None = None) -> None:
        if len(mac) != 6:
            raise ValueError(f"a MAC address has 6 bytes, not {len(mac)}")
        super().__init__(name=name, queue_sizes=[queue_size, queue_size],
                         features=offered_features(csum=offload_csum, tso=offload_tso,
                                                   ufo=offload_ufo, mtu=mtu))
        self.tap = tap
        self.mac = mac
        self.mtu = mtu
        self.rx_frames = self.tx_frames = 0
        self.rx_bytes = self.tx_bytes = 0       # frame bytes, the virtio-net header not counted
        self.tx_dropped = 0
        self.rx_unusable = 0
        self._rx_chain: DescriptorChain | None = None     # popped, waiting for a frame
        self._tap_events = select.epoll(1)
        self._tap_events.register(tap.fd, select.EPOLLIN)
        self._tap_polled = True
        # Rate limiting (None: no check per frame at all). Receive learns a frame's size
        # only once it has read it, so it waits while the limiter is empty and charges after.
        self.rx_rate_limiter = rx_rate_limiter
        self.tx_rate_limiter = tx_rate_limiter
        self._rx_throttled = False
        self._tx_held: DescriptorChain | None = None

    # --- config space -------------------------------------------------------------------------
    def config_bytes(self) -> bytes:
        return _CONFIG.pack(self.mac, VIRTIO_NET_S_LINK_UP, 1, self.mtu or 0)

    # --- lifecycle ----------------------------------------------------------------------------
    def ack_features(self, features: int) -> None:
        super().ack_features(features)
        offloads = 0
        for feature, flag in _GUEST_OFFLOADS:
            if self.has_feature(feature):
                offloads |= flag
        try:
            self.tap.set_offload(offloads)
        except TapError as e:
            # The frames the tap then hands us are plain; the driver copes with those.
            _guest_log.warning("%s: %s; receiving without offloads", self.name, e)

    def reset(self) -> None:
        super().reset()
        self._rx_chain = None
        self._rx_throttled = False
        self._tx_held = None
        self._poll_tap(True)

    def close_backend(self) -> None:
        self._tap_events.close()
        self.tap.close()

    # --- worker -------------------------------------------------------------------------------
    def event_sources(self) -> list[tuple[int, Callable[[], None]]]:
        return [(self._tap_events.fileno(), self._receive)]

    def process_queue(self, index: int) -> None:
        if index == RECEIVEQ:                  # new receive buffers: frames may flow again
            if not self._rx_throttled:
                self._poll_tap(True)
                self._receive()
        elif self.tx_rate_limiter is None:
            super().process_queue(index)
        elif self._tx_held is None:            # a held frame waits for its wake-up
            self._transmit_limited()

    def woken(self) -> None:
        if self._rx_throttled:
            self._rx_throttled = False
            self._poll_tap(True)
            self._receive()
        if self._tx_held is not None:
            self._transmit_limited()

    def _transmit_limited(self) -> None:
        """Transmit through the rate limiter: a frame it holds back is kept and retried
        when the tokens are there, with the queue's notifications off meanwhile."""
        if TRANSMITQ not in self.queues:
            return
        queue = self.queues[TRANSMITQ].queue
        limiter = self.tx_rate_limiter
        while True:
            queue.disable_notification()
            while (chain := self._tx_held or queue.pop()) is not None:
                self._tx_held = None
                wait = limiter.consume(max(0, chain.readable_len - VNET_HDR_SIZE), 1)
                if wait:
                    self._tx_held = chain
                    self.wake_after(wait)
                    self.signal_used(TRANSMITQ)
                    return
                queue.add_used(chain.head, self.handle_chain(TRANSMITQ, chain))
            if not queue.enable_notification():
                break
        self.signal_used(TRANSMITQ)

    def counters(self) -> dict[str, int]:
        """The reference's net counters."""
        return {"rx_bytes": self.rx_bytes, "rx_frames": self.rx_frames,
                "tx_bytes": self.tx_bytes, "tx_frames": self.tx_frames}

    def handle_chain(self, index: int, chain: DescriptorChain) -> int:
        """Transmit one frame (header included) to the tap."""
        try:
            sent = os.writev(self.tap.fd, chain.readable_views())
            self.tx_frames += 1
            self.tx_bytes += max(0, sent - VNET_HDR_SIZE)
        except OSError as e:                   # a full tap queue or a malformed frame
            self.tx_dropped += 1
            if self.tx_dropped == 1:
                log.warning("%s: dropped a transmitted frame (%s); further drops are only "
                            "counted", self.name, e.strerror)
        return 0

    def _receive(self) -> None:
        """Move frames from the tap into receive chains until either runs out."""
        active = self.queues.get(RECEIVEQ)
        if active is None:
            self._poll_tap(False)              # the driver did not enable receiving
            return
        queue = active.queue
        filled = 0
        limiter = self.rx_rate_limiter
        while True:
            if limiter is not None and (wait := limiter.blocked()):
                self._rx_throttled = True      # frames wait in the tap until woken
                self._poll_tap(False)
                self.wake_after(wait)
                break
            chain = self._rx_chain or self._next_rx_chain()
            if chain is None:
                self._poll_tap(False)          # until the driver kicks with new buffers
                break
            if chain.writable_len < VNET_HDR_SIZE:
                # the tap refuses a read shorter than its header (EINVAL): give the chain
                # back empty, the frame waits for the next one
                self._rx_chain = None
                self._rx_unusable(queue, chain, "shorter than the virtio-net header")
                filled += 1
                continue
            try:
                n = os.readv(self.tap.fd, chain.writable_views()[:IOV_MAX])
            except BlockingIOError:
                self._rx_chain = chain         # keep it for the next frame
                break
            except OSError as e:               # whatever else the tap refuses of a chain
                self._rx_chain = None
                self._rx_unusable(queue, chain, e.strerror)
                filled += 1
                continue
            self._rx_chain = None
            if limiter is not None:
                limiter.charge(max(0, n - VNET_HDR_SIZE), 1)
            queue.add_used(chain.head, n)
            self.rx_frames += 1
            self.rx_bytes += max(0, n - VNET_HDR_SIZE)
            filled += 1
            if filled % RX_BATCH == 0:
                self.signal_used(RECEIVEQ)
        if filled:
            self.signal_used(RECEIVEQ)

    def _rx_unusable(self, queue, chain: DescriptorChain, why: str) -> None:
        self.rx_unusable += 1
        _guest_log.warning("%s: receive buffer the tap cannot fill (%s); returned empty",
                           self.name, why)
        queue.add_used(chain.head, 0)

    def _next_rx_chain(self) -> DescriptorChain | None:
        queue = self.queues[RECEIVEQ].queue
        while True:
            chain = queue.pop()
            if chain is not None or not queue.enable_notification():
                return chain

    def _poll_tap(self, enabled: bool) -> None:
        if enabled != self._tap_polled and not self._tap_events.closed:
            self._tap_events.modify(self.tap.fd, select.EPOLLIN if enabled else 0)
            self._tap_polled = enabled
