"""The front-end side of the vhost-user protocol (QEMU's ``docs/interop/vhost-user.rst``).

A vhost-user back-end (virtiofsd, a vhost-user-blk server ...) is a separate process that
serves a device's virtqueues itself, straight in guest memory: the VMM connects to its Unix
socket, shares every guest RAM region with it (memfd descriptors passed with SCM_RIGHTS),
and tells it where each ring is and which eventfds carry the notifications both ways.  From
then on the data path does not touch the VMM at all: the guest's queue notifications land in
a KVM ioeventfd the back-end polls, and the back-end interrupts the guest by writing a KVM
irqfd.

Every message is a 12-byte header, then a payload of ``size`` bytes::

    u32 request | u32 flags (version 1 in bits 0-1, REPLY bit 2, NEED_REPLY bit 3) | u32 size

All numbers are in the host's byte order (little-endian here).  Ring addresses are *user*
addresses: where the VMM has guest memory mapped; the memory table tells the back-end how
those map to the regions it mmaps from the passed descriptors.

:class:`VhostUserFrontend` is one connection: one method per message, one request (and its
reply) at a time, from any thread. :class:`VhostUserConnections` keeps connections open while
the VMM rebuilds a VM for a reboot (a back-end such as virtiofsd exits when its connection
closes).  Anything that goes wrong on the connection (the back-end
is not listening, refuses a request, answers something else, hangs up or times out) raises
:class:`VhostUserError` with a sentence naming the socket; after a broken exchange the
connection is closed (as the specification asks), so later requests fail at once.
"""

from __future__ import annotations

import array
import enum
import logging
import os
import select
import socket
import struct
import threading
from collections.abc import Sequence
from typing import NamedTuple

from pych.memory.guest_memory import PAGE_SIZE, GuestMemory, MemoryRegion

log = logging.getLogger(__name__)

VHOST_USER_VERSION = 0x1
FLAG_VERSION_MASK = 0x3
FLAG_REPLY = 1 << 2
FLAG_NEED_REPLY = 1 << 3

#: The virtio feature bit (the reserved bit 30) through which a back-end says it speaks the
#: protocol-feature extension (GET/SET_PROTOCOL_FEATURES).
VHOST_USER_F_PROTOCOL_FEATURES = 1 << 30

#: SET_MEM_TABLE carries at most this many regions (and descriptors); more need
#: CONFIGURE_MEM_SLOTS (ADD_MEM_REG / REM_MEM_REG, one region each).
MEM_TABLE_MAX_REGIONS = 8

#: Bits 0-7 of SET_VRING_KICK/CALL's payload: the ring; bit 8: no descriptor attached.
VRING_INDEX_MASK = 0xFF
VRING_NOFD = 1 << 8

#: The guest physical address of a connection's parking page (:meth:`VhostUserFrontend.
#: parking_region`): beyond the 52 bits of x86 physical addresses, so never guest memory.
PARKING_GPA = (1 << 52) - PAGE_SIZE

#: How long the front-end waits for one reply (or for a message to leave) before giving up.
REPLY_TIMEOUT = 30.0


class Request(enum.IntEnum):
    """Front-end message types (the ones pych sends)."""
    GET_FEATURES = 1
    SET_FEATURES = 2
    SET_OWNER = 3
    RESET_OWNER = 4
    SET_MEM_TABLE = 5
    SET_VRING_NUM = 8
    SET_VRING_ADDR = 9
    SET_VRING_BASE = 10
    GET_VRING_BASE = 11
    SET_VRING_KICK = 12
    SET_VRING_CALL = 13
    SET_VRING_ERR = 14
    GET_PROTOCOL_FEATURES = 15
    SET_PROTOCOL_FEATURES = 16
    GET_QUEUE_NUM = 17
    SET_VRING_ENABLE = 18
    GET_INFLIGHT_FD = 31
    SET_INFLIGHT_FD = 32
    GET_CONFIG = 24
    SET_CONFIG = 25
    GET_MAX_MEM_SLOTS = 36
    ADD_MEM_REG = 37
    REM_MEM_REG = 38


class ProtocolFeature(enum.IntFlag):
    """Protocol feature bits (GET/SET_PROTOCOL_FEATURES), as masks."""
    MQ = 1 << 0
    LOG_SHMFD = 1 << 1
    RARP = 1 << 2
    REPLY_ACK = 1 << 3
    MTU = 1 << 4
    BACKEND_REQ = 1 << 5
    CROSS_ENDIAN = 1 << 6
    CRYPTO_SESSION = 1 << 7
    PAGEFAULT = 1 << 8
    CONFIG = 1 << 9
    BACKEND_SEND_FD = 1 << 10
    HOST_NOTIFIER = 1 << 11
    INFLIGHT_SHMFD = 1 << 12
    RESET_DEVICE = 1 << 13
    INBAND_NOTIFICATIONS = 1 << 14
    CONFIGURE_MEM_SLOTS = 1 << 15
    STATUS = 1 << 16


HEADER = struct.Struct("<III")               # request, flags, size
U64 = struct.Struct("<Q")
VRING_STATE = struct.Struct("<II")           # index, num
VRING_ADDR = struct.Struct("<IIQQQQ")        # index, flags, desc, used, avail, log
MEM_TABLE_HEADER = struct.Struct("<II")      # nregions, padding
MEM_REGION = struct.Struct("<QQQQ")          # guest address, size, user address, mmap offset
SINGLE_MEM_REGION = struct.Struct("<QQQQQ")  # padding, then MEM_REGION
INFLIGHT = struct.Struct("<QQHH")             # mmap size, mmap offset, queues, queue size
CONFIG_HEADER = struct.Struct("<III")        # offset, size, flags; then ``size`` bytes

#: The largest device configuration space GET_CONFIG may ask for (the protocol's limit).
MAX_CONFIG_SIZE = 256

#: The largest reply payload pych expects (a u64 or a vring state); anything bigger is a
#: protocol error rather than an allocation request.
_MAX_REPLY_PAYLOAD = 4096


class VhostUserError(OSError):
    """The back-end cannot be used: not listening, refused a request, broke the protocol,
    hung up or stopped answering.  An ``OSError``, like any other unusable device backend."""


class MemoryRegionInfo(NamedTuple):
    """One guest RAM region as the back-end is told of it."""
    guest_addr: int
    size: int
    user_addr: int           # where the front-end (pych) has it mapped
    mmap_offset: int         # offset of the region in ``fd``
    fd: int                  # the memfd the back-end maps

    @property
    def key(self) -> tuple[int, int, int]:
        """What identifies the region to REM_MEM_REG (the offset is ignored there)."""
        return self.guest_addr, self.size, self.user_addr

    def pack(self) -> bytes:
        return MEM_REGION.pack(self.guest_addr, self.size, self.user_addr, self.mmap_offset)


class VhostUserFrontend:
    """One connection to a vhost-user back-end's socket (pych is the front-end).

    The connection remembers the session state the protocol ties to it rather than to a
    device: ``owned`` (SET_OWNER was sent; the back-end takes it once per connection),
    ``protocol_features`` (what SET_PROTOCOL_FEATURES settled, None before),
    ``addressed_rings`` (the rings given addresses: a back-end keeps them after a ring
    stops) and ``parking`` (the page those rings point at between two boots of a VM, see
    :meth:`parking_region`). A connection handed from one boot of a VM to the next
    (:class:`VhostUserConnections`) keeps all of them.

    ``reply_ack`` becomes true once REPLY_ACK is negotiated (:meth:`set_protocol_features`);
    from then on every request without a reply of its own asks for an acknowledgement, so a
    refusal surfaces as a :class:`VhostUserError` at the request that caused it.
    """

    def __init__(self, sock: socket.socket | None, path: str = "") -> None:
        self._sock = sock                       # None: closed (every request then fails)
        self.path = path or "<socket>"
        self.reply_ack = False
        self.owned = False
        self.protocol_features: int | None = None
        #: Each ring given an address (SET_VRING_ADDR), as the back-end holds it: ``(desc,
        #: used, avail)`` user addresses (a back-end keeps them after a ring stops).
        self.ring_addrs: dict[int, tuple[int, int, int]] = {}
        self._parking: GuestMemory | None = None
        self._lock = threading.Lock()

    @classmethod
    def connect(cls, path: str, *, timeout: float = REPLY_TIMEOUT) -> "VhostUserFrontend":
        """Connect to the back-end listening at ``path``."""
        sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM | socket.SOCK_CLOEXEC)
        try:
            sock.settimeout(timeout)
            sock.connect(path)
        except OSError as e:
            sock.close()
            reason = e.strerror or str(e)
            raise VhostUserError(f"cannot connect to the vhost-user backend at {path}: "
                                 f"{reason}") from None
        return cls(sock, path)

    # --- connection -------------------------------------------------------------------------
    @classmethod
    def adopt(cls, fd: int, path: str, session: dict) -> "VhostUserFrontend":
        """The connection another pych made, its socket descriptor ``fd`` passed to this one
        (a local live migration), with the session state :meth:`session` recorded there
        (nothing is sent to the back-end). Takes ``fd`` (closed on error too). Both
        processes' descriptors share the socket's file status flags: this one waits with a
        timeout (non-blocking underneath), as every connection :meth:`connect` makes."""
        try:
            sock = socket.socket(fileno=fd)
        except OSError:
            os.close(fd)
            raise
        try:
            if sock.family != socket.AF_UNIX or sock.type != socket.SOCK_STREAM:
                raise VhostUserError(f"the descriptor passed for {path} is not a Unix stream "
                                     "socket")
            sock.settimeout(REPLY_TIMEOUT)
            connection = cls(sock, path)
            connection.owned = bool(session["owned"])
            protocol = session["protocol_features"]
            connection.protocol_features = None if protocol is None else int(protocol)
            connection.reply_ack = bool(session["reply_ack"])
            connection.ring_addrs = {int(i): tuple(int(a) for a in addrs)
                                     for i, addrs in session["ring_addrs"].items()}
        except BaseException:
            sock.close()
            raise
        return connection

    def session(self) -> dict:
        """What this connection settled with the back-end (for :meth:`adopt`)."""
        return {"owned": self.owned, "protocol_features": self.protocol_features,
                "reply_ack": self.reply_ack,
                "ring_addrs": {str(i): list(a) for i, a in sorted(self.ring_addrs.items())}}

    @property
    def addressed_rings(self) -> set[int]:
        """The rings given an address (they keep it after they stop)."""
        return set(self.ring_addrs)

    def release(self) -> None:
        """Close this process's descriptor of the socket and forget the parking page,
        without hanging up on the back-end: another process holds the connection now (a
        local live migration's receiver), so the back-end sees nothing."""
        self.close()

    @property
    def connected(self) -> bool:
        return self._sock is not None

    def fileno(self) -> int:
        """The socket's descriptor (-1 once closed): poll it for the back-end hanging up."""
        sock = self._sock
        return sock.fileno() if sock is not None else -1

    def hung_up(self) -> bool:
        """Whether the connection is closed or the back-end has closed its end (checked
        without sending anything or blocking)."""
        sock = self._sock
        if sock is None:
            return True
        poller = select.poll()
        poller.register(sock, select.POLLRDHUP)
        return bool(poller.poll(0))

    def close(self) -> None:
        """Hang up: the back-end sees the connection end (virtiofsd then exits)."""
        with self._lock:
            sock, self._sock = self._sock, None
            parking, self._parking = self._parking, None
        if sock is not None:
            sock.close()
        if parking is not None:
            parking.close()

    @property
    def parking(self) -> MemoryRegionInfo | None:
        """The parking page as a memory region, once :meth:`parking_region` made it."""
        parking = self._parking
        return _region_info(parking.regions[0]) if parking is not None else None

    def parking_region(self) -> MemoryRegionInfo:
        """A page of pych's memory for this connection's rings to point at while no guest
        memory is mapped (between two boots of a VM); made on first use, kept mapped as
        long as the connection, so no later guest RAM mapping can take its address.

        A back-end keeps a stopped ring's addresses, and libvhost-user (QEMU 7.2's
        virtiofsd) checks at every change of its memory table that each ring it was ever
        given still lies in mapped memory, and gives up the connection if not. Its guest
        physical address is beyond 52 bits, where no x86 guest has memory."""
        with self._lock:
            if self._parking is None:
                self._parking = GuestMemory.from_ranges([(PARKING_GPA, PAGE_SIZE)],
                                                        name="vhost-user-parking")
            return _region_info(self._parking.regions[0])

    def __enter__(self) -> "VhostUserFrontend":
        return self

    def __exit__(self, *exc) -> None:
        self.close()

    # --- messages ---------------------------------------------------------------------------
    def get_features(self) -> int:
        return self._get_u64(Request.GET_FEATURES)

    def set_features(self, features: int) -> None:
        self._send_request(Request.SET_FEATURES, U64.pack(features))

    def get_protocol_features(self) -> int:
        return self._get_u64(Request.GET_PROTOCOL_FEATURES)

    def set_protocol_features(self, features: int) -> None:
        self._send_request(Request.SET_PROTOCOL_FEATURES, U64.pack(features))
        self.protocol_features = features
        self.reply_ack = bool(features & ProtocolFeature.REPLY_ACK)

    def set_owner(self) -> None:
        self._send_request(Request.SET_OWNER)
        self.owned = True

    def get_queue_num(self) -> int:
        """How many queues the back-end serves (needs protocol feature MQ)."""
        return self._get_u64(Request.GET_QUEUE_NUM)

    def get_max_mem_slots(self) -> int:
        """How many regions the back-end can map (needs CONFIGURE_MEM_SLOTS)."""
        return self._get_u64(Request.GET_MAX_MEM_SLOTS)

    def set_mem_table(self, regions: Sequence[MemoryRegionInfo]) -> None:
        """Replace the back-end's memory table with ``regions`` (at most 8), each region's
        descriptor riding along, in order."""
        if not 1 <= len(regions) <= MEM_TABLE_MAX_REGIONS:
            raise VhostUserError(f"{self.path}: a memory table has 1 to {MEM_TABLE_MAX_REGIONS} "
                                 f"regions, not {len(regions)}")
        payload = MEM_TABLE_HEADER.pack(len(regions), 0) + b"".join(r.pack() for r in regions)
        self._send_request(Request.SET_MEM_TABLE, payload, [r.fd for r in regions])

    def add_mem_reg(self, region: MemoryRegionInfo) -> None:
        """Map one more region (needs CONFIGURE_MEM_SLOTS)."""
        self._send_request(Request.ADD_MEM_REG, _single_region(region), [region.fd])

    def rem_mem_reg(self, region: MemoryRegionInfo) -> None:
        """Unmap a region added before (needs CONFIGURE_MEM_SLOTS); no descriptor is sent."""
        self._send_request(Request.REM_MEM_REG, _single_region(region))

    def get_config(self, size: int, offset: int = 0) -> bytes:
        """``size`` bytes of the device's configuration space from ``offset`` (needs the
        protocol feature CONFIG)."""
        if not 0 < size <= MAX_CONFIG_SIZE:
            raise VhostUserError(f"{self.path}: cannot ask for {size} bytes of configuration")
        payload = self._transact(Request.GET_CONFIG,
                                 CONFIG_HEADER.pack(offset, size, 0) + bytes(size), reply=True)
        if len(payload) != CONFIG_HEADER.size + size:
            self._fail(f"answered GET_CONFIG with {len(payload)} bytes instead of "
                       f"{CONFIG_HEADER.size + size}")
        got_offset, got_size, _ = CONFIG_HEADER.unpack_from(payload)
        if (got_offset, got_size) != (offset, size):
            self._fail(f"answered GET_CONFIG for {size} bytes at {offset} with {got_size} "
                       f"bytes at {got_offset}")
        return payload[CONFIG_HEADER.size:]

    def get_inflight_fd(self, num_queues: int, queue_size: int) -> tuple[int, int, int]:
        """Ask the back-end for its in-flight tracking region (needs INFLIGHT_SHMFD): a
        shared memory fd, its size and offset, now the caller's to close."""
        payload, fds = self._transact(Request.GET_INFLIGHT_FD,
                                      INFLIGHT.pack(0, 0, num_queues, queue_size),
                                      reply=True, with_fds=True)
        if len(payload) < INFLIGHT.size or len(fds) != 1:
            for fd in fds:
                os.close(fd)
            self._fail(f"answered GET_INFLIGHT_FD with {len(payload)} bytes and "
                       f"{len(fds)} descriptors")
        size, offset, _, _ = INFLIGHT.unpack_from(payload)
        return fds[0], size, offset

    def set_inflight_fd(self, fd: int, size: int, offset: int, num_queues: int,
                        queue_size: int) -> None:
        """Hand the in-flight tracking region back (the back-end starts tracking in it)."""
        self._send_request(Request.SET_INFLIGHT_FD,
                           INFLIGHT.pack(size, offset, num_queues, queue_size), [fd])

    def set_vring_num(self, index: int, size: int) -> None:
        self._send_request(Request.SET_VRING_NUM, VRING_STATE.pack(index, size))

    def set_vring_addr(self, index: int, *, desc: int, used: int, avail: int,
                       flags: int = 0, log_addr: int = 0) -> None:
        """The ring's three parts, as user addresses (pych's mappings of guest memory)."""
        self._send_request(Request.SET_VRING_ADDR,
                           VRING_ADDR.pack(index, flags, desc, used, avail, log_addr))
        self.ring_addrs[index] = (desc, used, avail)

    def set_vring_base(self, index: int, base: int) -> None:
        """Where the back-end starts reading the available ring."""
        self._send_request(Request.SET_VRING_BASE, VRING_STATE.pack(index, base))

    def get_vring_base(self, index: int) -> int:
        """Stop the ring; returns the next available index the back-end would have used."""
        payload = self._transact(Request.GET_VRING_BASE, VRING_STATE.pack(index, 0), reply=True)
        if len(payload) != VRING_STATE.size:
            self._fail(f"answered GET_VRING_BASE with {len(payload)} bytes instead of "
                       f"{VRING_STATE.size}")
        got_index, base = VRING_STATE.unpack(payload)
        if got_index != index:
            self._fail(f"answered GET_VRING_BASE for ring {index} about ring {got_index}")
        return base

    def set_vring_kick(self, index: int, fd: int | None) -> None:
        """The eventfd the guest's notifications for ring ``index`` arrive in (None: the
        back-end polls the ring instead).  Receiving it starts the ring."""
        self._vring_fd(Request.SET_VRING_KICK, index, fd)

    def set_vring_call(self, index: int, fd: int | None) -> None:
        """The eventfd the back-end writes to interrupt the guest for ring ``index``."""
        self._vring_fd(Request.SET_VRING_CALL, index, fd)

    def set_vring_enable(self, index: int, enable: bool) -> None:
        self._send_request(Request.SET_VRING_ENABLE, VRING_STATE.pack(index, int(enable)))

    def _vring_fd(self, request: Request, index: int, fd: int | None) -> None:
        if not 0 <= index <= VRING_INDEX_MASK:
            raise VhostUserError(f"{self.path}: no vring {index}")
        if fd is None:
            self._send_request(request, U64.pack(index | VRING_NOFD))
        else:
            self._send_request(request, U64.pack(index), [fd])

    # --- the exchange ------------------------------------------------------------------------
    def _get_u64(self, request: Request) -> int:
        payload = self._transact(request, reply=True)
        if len(payload) != U64.size:
            self._fail(f"answered {request.name} with {len(payload)} bytes instead of 8")
        return U64.unpack(payload)[0]

    def _send_request(self, request: Request, payload: bytes = b"",
                      fds: Sequence[int] = ()) -> None:
        """A request without a reply of its own: acknowledged when REPLY_ACK is on."""
        if not self.reply_ack:
            self._transact(request, payload, fds)
            return
        ack = self._transact(request, payload, fds, reply=True, need_reply=True)
        if len(ack) != U64.size:
            self._fail(f"acknowledged {request.name} with {len(ack)} bytes instead of 8")
        status = U64.unpack(ack)[0]
        if status:
            raise VhostUserError(f"the vhost-user backend at {self.path} refused "
                                 f"{request.name} (status {status})")

    def _transact(self, request: Request, payload: bytes = b"", fds: Sequence[int] = (), *,
                  reply: bool = False, need_reply: bool = False, with_fds: bool = False):
        """Send one message; its reply's payload if ``reply`` (with ``with_fds``: and the
        descriptors that came with it)."""
        with self._lock:
            sock = self._sock
            if sock is None:
                raise VhostUserError(f"the vhost-user backend at {self.path} is not connected "
                                     "(the connection was closed)")
            flags = VHOST_USER_VERSION | (FLAG_NEED_REPLY if need_reply else 0)
            message = HEADER.pack(request, flags, len(payload)) + payload
            try:
                self._send(sock, message, fds)
                if not reply:
                    return b""
                received: list[int] = []
                answer = self._receive_reply(sock, request, received)
                if with_fds:
                    return answer, received
                for fd in received:
                    os.close(fd)
                return answer
            except VhostUserError:
                self._break(sock)
                raise
            except (TimeoutError, socket.timeout):
                self._break(sock)
                raise VhostUserError(f"the vhost-user backend at {self.path} did not answer "
                                     f"{request.name} within {sock.gettimeout():g} s") from None
            except OSError as e:
                self._break(sock)
                raise VhostUserError(f"lost the vhost-user backend at {self.path} "
                                     f"during {request.name}: {e.strerror or e}") from None

    @staticmethod
    def _send(sock: socket.socket, message: bytes, fds: Sequence[int]) -> None:
        ancillary = [(socket.SOL_SOCKET, socket.SCM_RIGHTS, array.array("i", fds))] if fds else []
        sent = sock.sendmsg([message], ancillary, socket.MSG_NOSIGNAL)
        if sent < len(message):                     # the descriptors went with the first part
            sock.sendall(message[sent:], socket.MSG_NOSIGNAL)

    def _receive_reply(self, sock: socket.socket, request: Request,
                       fds: list[int] | None = None) -> bytes:
        """One reply; descriptors that come with its header are appended to ``fds``."""
        first, ancillary, _, _ = sock.recvmsg(HEADER.size, socket.CMSG_SPACE(4 * 8))
        for level, kind, data in ancillary:
            if level == socket.SOL_SOCKET and kind == socket.SCM_RIGHTS:
                received = array.array("i")
                received.frombytes(data[:len(data) - len(data) % 4])
                if fds is None:
                    for fd in received:
                        os.close(fd)
                else:
                    fds.extend(received)
        if not first:
            raise VhostUserError(f"the vhost-user backend at {self.path} closed the "
                                 f"connection (waiting for its reply to {request.name})")
        header = first + self._receive_exactly(sock, HEADER.size - len(first), request)
        got, flags, size = HEADER.unpack(header)
        if flags & FLAG_VERSION_MASK != VHOST_USER_VERSION or not flags & FLAG_REPLY:
            raise VhostUserError(f"the vhost-user backend at {self.path} answered "
                                 f"{request.name} with flags {flags:#x} (not a version-1 reply)")
        if got != request:
            raise VhostUserError(f"the vhost-user backend at {self.path} answered "
                                 f"{request.name} with a reply to request {got}")
        if size > _MAX_REPLY_PAYLOAD:
            raise VhostUserError(f"the vhost-user backend at {self.path} announced a "
                                 f"{size}-byte reply to {request.name}")
        return self._receive_exactly(sock, size, request)

    def _receive_exactly(self, sock: socket.socket, size: int, request: Request) -> bytes:
        data = bytearray()
        while len(data) < size:
            chunk = sock.recv(size - len(data))
            if not chunk:
                raise VhostUserError(f"the vhost-user backend at {self.path} closed the "
                                     f"connection (waiting for its reply to {request.name})")
            data += chunk
        return bytes(data)

    def _fail(self, what: str) -> None:
        with self._lock:
            if self._sock is not None:
                self._break(self._sock)
        raise VhostUserError(f"the vhost-user backend at {self.path} {what}")

    def _break(self, sock: socket.socket) -> None:
        """After a failed exchange the stream is out of step: hang up (with the lock held)."""
        if self._sock is sock:
            self._sock = None
            sock.close()
            log.debug("vhost-user: closed the connection to %s after an error", self.path)


class VhostUserConnections:
    """Connections to vhost-user back-ends kept open while pych rebuilds a VM (a reboot).

    A back-end such as virtiofsd serves one front-end connection and exits when it closes,
    so a device whose VM is rebuilt must not hang up. The VMM, which outlives each boot,
    owns one of these: tearing a VM down for a reboot parks each vhost-user device's
    connection (its rings stopped, guest memory unmapped) under the device's id and socket
    path (:meth:`park`), and building the next VM takes it back for the device of the same
    id and socket (:meth:`take`). Whatever the new VM did not take back (its boot failed, or
    its configuration lacks the device) is hung up by :meth:`close`, which the VMM calls
    once the new VM is built.
    """

    def __init__(self) -> None:
        self._parked: dict[tuple[str, str], VhostUserFrontend] = {}
        self._lock = threading.Lock()

    def park(self, dev_id: str, path: str, connection: VhostUserFrontend | None) -> None:
        """Keep ``connection`` for the next boot's device ``dev_id`` at ``path``. A broken
        connection, or one the back-end hung up, is closed instead (and None ignored): the
        next boot connects anew."""
        if connection is None:
            return
        if connection.hung_up():
            connection.close()
            return
        with self._lock:
            previous = self._parked.pop((dev_id, path), None)
            self._parked[(dev_id, path)] = connection
        if previous is not None:
            previous.close()
        log.info("vhost-user: kept the connection to %s for %s across the VM rebuild",
                 path, dev_id)

    def take(self, dev_id: str, path: str) -> VhostUserFrontend | None:
        """The connection parked for ``dev_id`` at ``path``, now the caller's; None if none."""
        with self._lock:
            return self._parked.pop((dev_id, path), None)

    def __len__(self) -> int:
        with self._lock:
            return len(self._parked)

    def close(self) -> None:
        """Hang up every connection still parked."""
        with self._lock:
            parked, self._parked = self._parked, {}
        for (dev_id, path), connection in parked.items():
            log.info("vhost-user: %s did not come back; hanging up on %s", dev_id, path)
            connection.close()


def _region_info(region: MemoryRegion) -> MemoryRegionInfo:
    return MemoryRegionInfo(region.gpa, region.size, region.host_addr, region.fd_offset,
                            region.fd)


def _single_region(region: MemoryRegionInfo) -> bytes:
    return SINGLE_MEM_REGION.pack(0, region.guest_addr, region.size, region.user_addr,
                                  region.mmap_offset)

