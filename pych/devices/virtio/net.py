"""virtio-net (virtio 1.x §5.1) on a host tap: queue pairs, mergeable receive buffers and
the control queue.

Queues ``2i`` (receiveq) and ``2i + 1`` (transmitq) form queue pair ``i``; the control
queue comes last (``2 × pairs``), as in the reference, which offers ``VIRTIO_NET_F_CTRL_VQ``
always and ``VIRTIO_NET_F_MQ`` (with ``max_virtqueue_pairs``) for more than one pair.
Each pair has its own tap queue (a tap opened with ``IFF_MULTI_QUEUE``, one fd per pair)
and its own worker thread, named as the reference names them (``<id>_qp<i>``); the control
queue has one too (``<id>_ctrl``).

Every frame in either direction starts with the 12-byte ``virtio_net_hdr_v1``, and the
tap is opened with the same header (see :mod:`pych.devices.net.tap`), so the device
never parses a frame: it moves each one with a single ``readv``/``writev`` between the
tap fd and guest buffers (no copy through Python bytes). That also carries the checksum
and segmentation offloads through unchanged: the tap is told (``TUNSETOFFLOAD``) to hand
us exactly the offloaded frames the driver accepted, at feature negotiation and when the
driver changes them on the control queue (``VIRTIO_NET_CTRL_GUEST_OFFLOADS_SET``).

Receiving: without ``VIRTIO_NET_F_MRG_RXBUF`` one descriptor chain holds one frame (Linux
then posts 64 KiB "big packet" chains when it accepts TSO). With it, the driver posts
small buffers and a frame spans as many as it needs: the pair keeps popped chains until
they can hold the largest frame the tap may hand over, reads the frame across them with
one ``readv``, writes the count into the header's ``num_buffers`` and publishes the used
chains together (a driver that saw only the first would drop the frame).

Receive flow control: each tap fd sits in a private epoll set that its pair's worker
polls. While the driver has posted too few receive buffers, the tap is taken out of
that set, so an incoming frame waits in the tap's queue (not in pych) until the
driver's next kick.

``VIRTIO_NET_CTRL_MQ_VQ_PAIRS_SET`` detaches the tap queues of the pairs the driver
stopped using (``TUNSETQUEUE``), so the kernel steers frames only to the pairs in use.

The tap going away under a running NIC (``ip link del``: its fds then answer ``EBADFD``)
fails the device once (:attr:`VirtioNet.failure`, which ``vm.info`` shows in
``devices_failed``; ``on_failure`` makes the VMM emit a ``device-failed`` event) and takes
its link down: the status field loses ``VIRTIO_NET_S_LINK_UP`` and the driver gets a
configuration change interrupt, so the guest sees NO-CARRIER. From then on the workers stop
polling the dead fds; transmitted frames are completed and counted as dropped, receive
buffers stay posted. ``vm.remove-device`` removes it as any NIC.
"""

from __future__ import annotations

import collections
import errno
import logging
import os
import select
import struct
import threading
from collections.abc import Callable, Sequence

from pych.devices.rate_limiter import RateLimiter
from pych.guest_log import GuestLog
from pych.devices.net.tap import (TUN_F_CSUM, TUN_F_TSO4, TUN_F_TSO6, TUN_F_TSO_ECN, TUN_F_UFO,
                                  VNET_HDR_SIZE, Tap, TapError)

from .device import VirtioDevice, VirtioDeviceType, WorkerPlan
from .queue import DescriptorChain

log = logging.getLogger(__name__)
_guest_log = GuestLog(log)       # what the guest can repeat at will is rate-limited

VIRTIO_NET_F_CSUM = 1 << 0
VIRTIO_NET_F_GUEST_CSUM = 1 << 1
VIRTIO_NET_F_CTRL_GUEST_OFFLOADS = 1 << 2
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
VIRTIO_NET_F_MRG_RXBUF = 1 << 15
VIRTIO_NET_F_STATUS = 1 << 16
VIRTIO_NET_F_CTRL_VQ = 1 << 17
VIRTIO_NET_F_MQ = 1 << 22

VIRTIO_NET_S_LINK_UP = 1

# Control queue (virtio 1.x §5.1.6.5).
VIRTIO_NET_OK = 0
VIRTIO_NET_ERR = 1
VIRTIO_NET_CTRL_MQ = 4
VIRTIO_NET_CTRL_MQ_VQ_PAIRS_SET = 0
VIRTIO_NET_CTRL_GUEST_OFFLOADS = 5
VIRTIO_NET_CTRL_GUEST_OFFLOADS_SET = 0

RECEIVEQ = 0
TRANSMITQ = 1
DEFAULT_QUEUE_SIZE = 256
#: Frames received per batch before the driver is interrupted (a latency bound).
RX_BATCH = 64
#: The largest frame a tap hands over with segmentation offloads on: a 64 KiB GSO packet
#: plus its Ethernet and VLAN headers, after the virtio-net header.
MAX_GSO_FRAME = VNET_HDR_SIZE + 65535 + 14 + 4
_NUM_BUFFERS_OFFSET = 10                 # virtio_net_hdr_v1.num_buffers
IOV_MAX = os.sysconf("SC_IOV_MAX")      # readv() takes no more buffers than this (EINVAL)

_CONFIG = struct.Struct("<6sHHH")       # mac, status, max_virtqueue_pairs, mtu

#: Which tap offload each guest receive feature allows.
_GUEST_OFFLOADS = (
    (VIRTIO_NET_F_GUEST_CSUM, TUN_F_CSUM),
    (VIRTIO_NET_F_GUEST_TSO4, TUN_F_TSO4),
    (VIRTIO_NET_F_GUEST_TSO6, TUN_F_TSO6),
    (VIRTIO_NET_F_GUEST_ECN, TUN_F_TSO_ECN),
    (VIRTIO_NET_F_GUEST_UFO, TUN_F_UFO),
)
_GUEST_OFFLOAD_FEATURES = 0
for _feature, _ in _GUEST_OFFLOADS:
    _GUEST_OFFLOAD_FEATURES |= _feature


#: What a tap fd answers once its interface was deleted (``tun_get`` finds no device).
TAP_GONE_ERRNOS = frozenset({errno.EBADFD, errno.ENODEV, errno.ENXIO})


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


def offered_features(*, csum: bool, tso: bool, ufo: bool, mtu: int | None,
                     pairs: int = 1) -> int:
    """The feature bits for the reference's ``offload_*`` switches (TSO and UFO need
    checksum offload, as in the spec's feature dependencies), with the control queue,
    mergeable receive buffers and, for several queue pairs, multiqueue."""
    features = (VIRTIO_NET_F_MAC | VIRTIO_NET_F_STATUS | VIRTIO_NET_F_CTRL_VQ
                | VIRTIO_NET_F_MRG_RXBUF)
    if pairs > 1:
        features |= VIRTIO_NET_F_MQ
    if mtu is not None:
        features |= VIRTIO_NET_F_MTU
    if csum:
        features |= (VIRTIO_NET_F_CSUM | VIRTIO_NET_F_GUEST_CSUM
                     | VIRTIO_NET_F_CTRL_GUEST_OFFLOADS)
        if tso:
            features |= (VIRTIO_NET_F_HOST_TSO4 | VIRTIO_NET_F_HOST_TSO6 | VIRTIO_NET_F_HOST_ECN
                         | VIRTIO_NET_F_GUEST_TSO4 | VIRTIO_NET_F_GUEST_TSO6 | VIRTIO_NET_F_GUEST_ECN)
        if ufo:
            features |= VIRTIO_NET_F_HOST_UFO | VIRTIO_NET_F_GUEST_UFO
    return features


def tap_offloads(features: int) -> int:
    """The ``TUN_F_*`` flags for the guest receive features (or guest offloads) ``features``."""
    offloads = 0
    for feature, flag in _GUEST_OFFLOADS:
        if features & feature:
            offloads |= flag
    return offloads


def _write_u16(views: Sequence[memoryview], offset: int, value: int) -> None:
    """Write a little-endian u16 at byte ``offset`` of the buffers ``views``, wherever
    they split it."""
    for byte in value.to_bytes(2, "little"):
        for view in views:
            if offset < len(view):
                view[offset] = byte
                break
            offset -= len(view)
        offset += 1


class _QueuePair:
    """Queue pair ``index``: its tap queue, rate limiters, receive state and counters.
    Everything here runs on the pair's worker thread."""

    def __init__(self, device: VirtioNet, index: int, tap: Tap,
                 rx_rate_limiter: RateLimiter | None,
                 tx_rate_limiter: RateLimiter | None) -> None:
        self.device = device
        self.index = index
        self.rxq = 2 * index
        self.txq = 2 * index + 1
        self.tap = tap
        self.rx_frames = self.tx_frames = 0
        self.rx_bytes = self.tx_bytes = 0      # frame bytes, the virtio-net header not counted
        self.tx_dropped = 0
        self.rx_unusable = 0                   # receive chains returned empty (driver mistakes)
        # Popped receive chains waiting for a frame (each with how many of the buffers and
        # bytes below are its own), their buffers and their capacity.
        self._rx_chains: collections.deque[tuple[DescriptorChain, int, int]] = \
            collections.deque()
        self._rx_views: list[memoryview] = []
        self._rx_space = 0
        self._tap_events = select.epoll(1)
        self._tap_events.register(tap.fd, select.EPOLLIN)
        self._tap_polled = True
        self._tap_gone = False                 # the tap was deleted: its fd is dead
        self._handed_over = False              # a live migration took the tap (stop_polling)
        # Rate limiting (None: no check per frame at all). Receive learns a frame's size
        # only once it has read it, so it waits while the limiter is empty and charges after.
        self.rx_rate_limiter = rx_rate_limiter
        self.tx_rate_limiter = tx_rate_limiter
        self._rx_throttled = False
        self._tx_held: DescriptorChain | None = None

    def reset(self) -> None:
        self._rx_chains.clear()
        for view in self._rx_views:
            view.release()
        self._rx_views = []
        self._rx_space = 0
        self._rx_throttled = False
        self._tx_held = None
        self._poll_tap(True)

    def close(self) -> None:
        self._tap_events.close()
        self.tap.close()

    def plan(self, name: str) -> WorkerPlan | None:
        queues = tuple(i for i in (self.rxq, self.txq) if i in self.device.queues)
        if not queues:
            return None
        sources = [(self._tap_events.fileno(), self.receive)] if self.rxq in queues else []
        return WorkerPlan(f"{name}_qp{self.index}", queues, sources, self.woken)

    # --- transmit -----------------------------------------------------------------------------
    def process_queue(self, index: int) -> None:
        if index == self.rxq:                  # new receive buffers: frames may flow again
            if not self._rx_throttled:
                self._poll_tap(True)
                self.receive()
        elif self.tx_rate_limiter is None:
            self._transmit()
        elif self._tx_held is None:            # a held frame waits for its wake-up
            self._transmit_limited()

    def woken(self) -> None:
        if self._rx_throttled:
            self._rx_throttled = False
            self._poll_tap(True)
            self.receive()
        if self._tx_held is not None:
            self._transmit_limited()

    def _transmit(self) -> None:
        queue = self.device.queues[self.txq].queue
        while True:
            queue.disable_notification()
            for chain in queue:
                self._send(chain)
                queue.add_used(chain.head, 0)
            if not queue.enable_notification():
                break
        self.device.signal_used(self.txq)

    def _transmit_limited(self) -> None:
        """Transmit through the rate limiter: a frame it holds back is kept and retried
        when the tokens are there, with the queue's notifications off meanwhile."""
        if self.txq not in self.device.queues:
            return
        queue = self.device.queues[self.txq].queue
        limiter = self.tx_rate_limiter
        while True:
            queue.disable_notification()
            while (chain := self._tx_held or queue.pop()) is not None:
                self._tx_held = None
                wait = limiter.consume(max(0, chain.readable_len - VNET_HDR_SIZE), 1)
                if wait:
                    self._tx_held = chain
                    self.device.wake_after(wait)
                    self.device.signal_used(self.txq)
                    return
                self._send(chain)
                queue.add_used(chain.head, 0)
            if not queue.enable_notification():
                break
        self.device.signal_used(self.txq)

    def _send(self, chain: DescriptorChain) -> None:
        """Transmit one frame (header included) to the tap."""
        if self._tap_gone:
            self.tx_dropped += 1
            return
        try:
            sent = os.writev(self.tap.fd, chain.readable_views())
            self.tx_frames += 1
            self.tx_bytes += max(0, sent - VNET_HDR_SIZE)
        except OSError as e:                   # a full tap queue or a malformed frame
            self.tx_dropped += 1
            if e.errno in TAP_GONE_ERRNOS:
                self._lost(e)
                return
            if self.tx_dropped == 1:
                log.warning("%s: dropped a transmitted frame (%s); further drops are only "
                            "counted", self.device.name, e.strerror)

    # --- receive ------------------------------------------------------------------------------
    def receive(self) -> None:
        """Move frames from the tap into receive chains until either runs out."""
        device = self.device
        active = device.queues.get(self.rxq)
        if active is None or self._tap_gone:
            self._poll_tap(False)              # the driver did not enable receiving
            return
        queue = active.queue
        mergeable = device.has_feature(VIRTIO_NET_F_MRG_RXBUF)
        needed = device.rx_frame_max() if mergeable else 1
        filled = 0
        limiter = self.rx_rate_limiter
        while True:
            if limiter is not None and (wait := limiter.blocked()):
                self._rx_throttled = True      # frames wait in the tap until woken
                self._poll_tap(False)
                device.wake_after(wait)
                break
            if not self._fill_rx_chains(queue, needed):
                if self._tap_deleted():        # EPOLLERR, which no event mask turns off
                    self._lost(OSError(errno.EBADFD, os.strerror(errno.EBADFD)))
                    break
                self._poll_tap(False)          # until the driver kicks with new buffers
                break
            try:
                n = os.readv(self.tap.fd, self._rx_views)
            except BlockingIOError:
                break                          # the chains wait for the next frame
            except OSError as e:               # whatever else the tap refuses of the buffers
                if e.errno in TAP_GONE_ERRNOS:
                    self._lost(e)
                    break
                self._return_rx_chains(queue, e.strerror)
                filled += 1
                continue
            used = self._take_rx_chains(n)
            if limiter is not None:
                limiter.charge(max(0, n - VNET_HDR_SIZE), 1)
            if len(used) == 1:
                queue.add_used(*used[0])
            else:
                queue.add_used_batch(used)
            self.rx_frames += 1
            self.rx_bytes += max(0, n - VNET_HDR_SIZE)
            filled += 1
            if filled % RX_BATCH == 0:
                device.signal_used(self.rxq)
        if filled:
            device.signal_used(self.rxq)

    def _fill_rx_chains(self, queue, needed: int) -> bool:
        """Pop receive chains until they hold ``needed`` bytes (mergeable buffers) or there
        is one (``needed`` 1: one chain per frame). False: too few buffers for now. With
        every descriptor of the ring held and still too little room, go on with what there
        is (a driver that posts so little gets its frames truncated, not a stalled NIC)."""
        while self._rx_space < needed:
            if len(self._rx_views) >= IOV_MAX:
                return True                    # as many buffers as one readv() takes
            chain = queue.pop()
            if chain is None:
                if queue.enable_notification():
                    continue                   # buffers arrived meanwhile
                return bool(self._rx_chains) and len(self._rx_chains) >= queue.size
            views = chain.writable_views()
            space = chain.writable_len
            if not self._rx_chains and space < VNET_HDR_SIZE:
                # Nothing to write into, or less than the header the tap writes first (the
                # tap refuses such a read): a driver's mistake, the chain goes back empty.
                self._rx_unusable(queue, chain, "shorter than the virtio-net header")
                continue
            room = IOV_MAX - len(self._rx_views)
            if len(views) > room:              # readv() takes no more: the rest stays unused
                for view in views[room:]:
                    view.release()
                views = views[:room]
                space = sum(len(v) for v in views)
            self._rx_chains.append((chain, len(views), space))
            self._rx_views.extend(views)
            self._rx_space += space
        return True

    def _rx_unusable(self, queue, chain: DescriptorChain, why: str) -> None:
        self.rx_unusable += 1
        _guest_log.warning("%s: receive buffer the tap cannot fill (%s); returned empty",
                           self.device.name, why)
        queue.add_used(chain.head, 0)

    def _return_rx_chains(self, queue, why: str) -> None:
        """The tap refused a read into the held chains: each goes back to the guest empty."""
        for chain, _, _ in self._rx_chains:
            self._rx_unusable(queue, chain, why)
        self._rx_chains.clear()
        for view in self._rx_views:
            view.release()
        self._rx_views = []
        self._rx_space = 0

    def _take_rx_chains(self, n: int) -> list[tuple[int, int]]:
        """The ``(head, length)`` of the chains a frame of ``n`` bytes filled, dropped from
        the held ones, with ``num_buffers`` set in its header."""
        used: list[tuple[int, int]] = []
        first_views: list[memoryview] | None = None
        remaining = max(n, 1)
        views_taken = 0
        while remaining > 0 and self._rx_chains:
            chain, count, space = self._rx_chains.popleft()
            if first_views is None:
                first_views = self._rx_views[:count]
            views_taken += count
            length = min(space, remaining)
            self._rx_space -= space
            used.append((chain.head, length if n else 0))
            remaining -= length
        if first_views is not None and n >= VNET_HDR_SIZE:
            _write_u16(first_views, _NUM_BUFFERS_OFFSET, len(used))
        for view in self._rx_views[:views_taken]:
            view.release()
        del self._rx_views[:views_taken]
        return used

    def _poll_tap(self, enabled: bool) -> None:
        if self._tap_gone or self._handed_over:
            return
        if enabled != self._tap_polled and not self._tap_events.closed:
            self._tap_events.modify(self.tap.fd, select.EPOLLIN if enabled else 0)
            self._tap_polled = enabled

    def stop_polling(self) -> None:
        """(Workers stopped) forget the tap fd in the epoll set: it is being handed over
        (a reset or shutdown meanwhile leaves it alone)."""
        self._handed_over = True
        if not self._tap_gone and not self._tap_events.closed:
            try:
                self._tap_events.unregister(self.tap.fd)
            except OSError:
                pass
        self._tap_polled = False

    def start_polling(self) -> None:
        """(Workers stopped) poll the (possibly reopened) tap fd again."""
        self._handed_over = False
        if not self._tap_gone and not self._tap_events.closed:
            self._tap_events.register(self.tap.fd, select.EPOLLIN)
            self._tap_polled = True

    def _tap_deleted(self) -> bool:
        """Whether the tap fd reports an error (a deleted tun device: ``tun_chr_poll``)."""
        poller = select.poll()
        poller.register(self.tap.fd, select.POLLIN)
        return any(ev & select.POLLERR for _, ev in poller.poll(0))

    def _lost(self, error: OSError) -> None:
        """The tap was deleted: stop polling its fd (a dead tun fd reports EPOLLERR even
        when no event is asked for) and fail the device."""
        self._tap_gone = True
        if not self._tap_events.closed:
            try:
                self._tap_events.unregister(self.tap.fd)
            except OSError:
                pass
        self._tap_polled = False
        self.device.tap_lost(self, error)


class VirtioNet(VirtioDevice):
    """A virtio-net device with one queue pair per tap queue in ``taps`` (closed on
    shutdown). ``rate_limiter`` makes a fresh limiter (or None): each pair gets one for
    receive and one for transmit, as in the reference."""

    device_type = VirtioDeviceType.NET

    def __init__(self, taps: Tap | Sequence[Tap], *, mac: bytes, mtu: int | None = None,
                 queue_size: int = DEFAULT_QUEUE_SIZE, offload_csum: bool = True,
                 offload_tso: bool = True, offload_ufo: bool = True, name: str = "net",
                 rate_limiter: Callable[[], RateLimiter | None] | None = None) -> None:
        if len(mac) != 6:
            raise ValueError(f"a MAC address has 6 bytes, not {len(mac)}")
        taps = [taps] if isinstance(taps, Tap) or not isinstance(taps, Sequence) else list(taps)
        if not taps:
            raise ValueError("virtio-net needs at least one tap queue")
        pairs = len(taps)
        super().__init__(name=name, queue_sizes=[queue_size] * (2 * pairs + 1),
                         features=offered_features(csum=offload_csum, tso=offload_tso,
                                                   ufo=offload_ufo, mtu=mtu, pairs=pairs))
        self.mac = mac
        self.mtu = mtu
        self.ctrlq = 2 * pairs
        make = rate_limiter or (lambda: None)
        self.pairs = [_QueuePair(self, i, tap, make(), make()) for i, tap in enumerate(taps)]
        self.active_pairs = pairs              # as the driver last set it (VQ_PAIRS_SET)
        self.ctrl_errors = 0
        #: Why the NIC stopped working (its tap was deleted), or None.
        self.failure: str | None = None
        #: Told ``(device name, failure)`` once, from a worker thread, when it fails.
        self.on_failure: Callable[[str, str], None] | None = None
        self._failure_lock = threading.Lock()

    @property
    def tap(self) -> Tap:
        """The first pair's tap queue (the interface every pair's queue belongs to)."""
        return self.pairs[0].tap

    @property
    def taps(self) -> list[Tap]:
        return [pair.tap for pair in self.pairs]

    # Totals over the pairs (each pair counts on its own worker thread).
    @property
    def rx_frames(self) -> int:
        return sum(p.rx_frames for p in self.pairs)

    @property
    def tx_frames(self) -> int:
        return sum(p.tx_frames for p in self.pairs)

    @property
    def rx_bytes(self) -> int:
        return sum(p.rx_bytes for p in self.pairs)

    @property
    def tx_bytes(self) -> int:
        return sum(p.tx_bytes for p in self.pairs)

    @property
    def tx_dropped(self) -> int:
        return sum(p.tx_dropped for p in self.pairs)

    @property
    def rx_unusable(self) -> int:
        return sum(p.rx_unusable for p in self.pairs)

    # --- config space -------------------------------------------------------------------------
    def config_bytes(self) -> bytes:
        status = VIRTIO_NET_S_LINK_UP if self.failure is None else 0
        return _CONFIG.pack(self.mac, status, len(self.pairs), self.mtu or 0)

    def tap_lost(self, pair: _QueuePair, error: OSError) -> None:
        """Queue pair ``pair``'s tap queue is dead (the tap was deleted; on its worker):
        fail the device once, take the link down and tell the driver."""
        with self._failure_lock:
            if self.failure is not None:
                return
            self.failure = f"the tap {pair.tap.name} is gone ({error.strerror}); link down"
        log.error("%s: %s; the device has failed", self.name, self.failure)
        self.config_changed()
        on_failure = self.on_failure
        if on_failure is not None:
            try:
                on_failure(self.name, self.failure)
            except Exception:  # noqa: BLE001 - a reporting problem must not stop the worker
                log.exception("%s: reporting the failure", self.name)

    def rx_frame_max(self) -> int:
        """The most bytes one frame from the tap can take, header included."""
        if self.acked_features & (VIRTIO_NET_F_GUEST_TSO4 | VIRTIO_NET_F_GUEST_TSO6
                                  | VIRTIO_NET_F_GUEST_UFO):
            return MAX_GSO_FRAME
        return VNET_HDR_SIZE + 14 + 4 + max(self.mtu or 1500, 1500)

    # --- lifecycle ----------------------------------------------------------------------------
    def ack_features(self, features: int) -> None:
        super().ack_features(features)
        self._set_tap_offloads(tap_offloads(self.acked_features))

    def _set_tap_offloads(self, offloads: int) -> bool:
        try:
            for tap in self.taps:
                tap.set_offload(offloads)
        except TapError as e:
            # The frames the tap then hands us are plain; the driver copes with those.
            _guest_log.warning("%s: %s; receiving without offloads", self.name, e)
            return False
        return True

    def reset(self) -> None:
        super().reset()
        for pair in self.pairs:
            pair.reset()
        if self.active_pairs != len(self.pairs):
            self._set_active_pairs(len(self.pairs))

    def close_backend(self) -> None:
        for pair in self.pairs:
            pair.close()

    # --- live migration: handing the tap over ------------------------------------------------
    def release_taps(self, *, close: bool) -> list[str]:
        """Stop using the taps (the VM is paused; the workers stop, see :meth:`quiesce`) so
        another VMM can take them: over SCM_RIGHTS (``close`` False: the fds stay open,
        :attr:`taps`), or by name (``close``: each queue is closed; a tap that would go
        with its last queue is made persistent first). Returns the names of the taps made
        persistent (the taker makes them non-persistent again once it runs the guest).
        Raises :class:`TapError`, the taps then back in use."""
        self.quiesce()
        made_persistent: list[str] = []
        try:
            if close and not self.tap.persistent:
                self.tap.set_persistent(True)
                made_persistent.append(self.tap.name)
            for pair in self.pairs:
                pair.stop_polling()
            if close:
                for pair in self.pairs:
                    pair.tap.close()
        except BaseException:
            self._made_persistent = made_persistent
            self.retake_taps()
            raise
        self._made_persistent = made_persistent
        return made_persistent

    def retake_taps(self) -> None:
        """The migration failed: use the taps again (reopened by name if
        :meth:`release_taps` closed them, persistence as it was) and restart the workers.
        Raises :class:`TapError` when a tap cannot be reopened."""
        try:
            for pair in self.pairs:
                if pair.tap.fd < 0:
                    pair.tap = Tap(pair.tap.name, multi_queue=len(self.pairs) > 1)
                    if self.acked_features:
                        self._set_tap_offloads(tap_offloads(self.acked_features))
                pair.start_polling()
            for name in getattr(self, "_made_persistent", ()):
                self.tap.set_persistent(False)
            self._made_persistent = []
        finally:
            self.unquiesce()

    def counters(self) -> dict[str, int]:
        """The reference's net counters (totals over the queue pairs)."""
        return {"rx_bytes": self.rx_bytes, "rx_frames": self.rx_frames,
                "tx_bytes": self.tx_bytes, "tx_frames": self.tx_frames}

    # --- workers ------------------------------------------------------------------------------
    def worker_plans(self) -> list[WorkerPlan]:
        plans = [plan for pair in self.pairs if (plan := pair.plan(self.name)) is not None]
        if self.ctrlq in self.queues:
            plans.append(WorkerPlan(f"{self.name}_ctrl", (self.ctrlq,), [], self.woken))
        return plans

    def process_queue(self, index: int) -> None:
        if index == self.ctrlq:
            super().process_queue(index)
        else:
            self.pairs[index // 2].process_queue(index)

    def handle_chain(self, index: int, chain: DescriptorChain) -> int:
        """Serve one control queue command: class, command and data readable, one ack
        byte writable."""
        return answer_control_command(self, chain, self._control)

    def _control(self, cls: int, command: int, payload: bytes) -> bool:
        if (cls, command) == (VIRTIO_NET_CTRL_MQ, VIRTIO_NET_CTRL_MQ_VQ_PAIRS_SET):
            if not self.has_feature(VIRTIO_NET_F_MQ) or len(payload) < 2:
                return False
            pairs = int.from_bytes(payload[:2], "little")
            if not 1 <= pairs <= len(self.pairs):
                return False
            self._set_active_pairs(pairs)
            return True
        if (cls, command) == (VIRTIO_NET_CTRL_GUEST_OFFLOADS, VIRTIO_NET_CTRL_GUEST_OFFLOADS_SET):
            if not self.has_feature(VIRTIO_NET_F_CTRL_GUEST_OFFLOADS) or len(payload) < 8:
                return False
            offloads = int.from_bytes(payload[:8], "little")
            # Only offloads negotiated as features can be switched on.
            if offloads & ~(self.acked_features & _GUEST_OFFLOAD_FEATURES):
                return False
            return self._set_tap_offloads(tap_offloads(offloads))
        return False

    def _set_active_pairs(self, pairs: int) -> None:
        self.active_pairs = pairs
        if len(self.pairs) == 1:
            return
        for pair in self.pairs:
            try:
                pair.tap.set_queue_enabled(pair.index < pairs)
            except TapError as e:
                if "Invalid argument" not in str(e):   # already in that state
                    log.warning("%s: %s", self.name, e)


def answer_control_command(device, chain: DescriptorChain,
                           control: Callable[[int, int, bytes], bool]) -> int:
    """One virtio-net control queue command (class, command and data readable, one ack byte
    writable), carried out by ``control(class, command, data)``; returns the used length. A
    refused command is answered VIRTIO_NET_ERR and counted in ``device.ctrl_errors``, logged
    the first time only (a guest can repeat it at will). virtio-net and vhost-user-net (which
    serves its control queue itself) share it."""
    data = chain.reader().read(chain.readable_len)
    ok = len(data) >= 2 and control(data[0], data[1], data[2:])
    if not ok:
        device.ctrl_errors += 1
        if device.ctrl_errors == 1:
            log.warning("%s: refused control command %s; further refusals are only counted",
                        device.name, data[:2].hex())
    return chain.writer().write(bytes([VIRTIO_NET_OK if ok else VIRTIO_NET_ERR]))
