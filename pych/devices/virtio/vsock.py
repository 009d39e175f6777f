"""virtio-vsock (virtio 1.x §5.10) with the reference's hybrid host side on Unix sockets.

The guest sees a vsock device with context id ``cid``; the host end of every stream is
a Unix socket connection:

* **Host to guest.**  A host program connects to the listening socket at ``socket`` and
  sends ``CONNECT <port>\\n``.  The device picks a free host port, asks the guest to
  accept a connection on ``<port>`` (REQUEST) and, when the guest answers (RESPONSE),
  sends ``OK <host port>\\n`` on the Unix connection; from then on it carries the
  stream.  If the guest refuses (RST), the Unix connection is closed.
* **Guest to host.**  A guest ``connect(VMADDR_CID_HOST, <port>)`` becomes a Unix
  connection to ``<socket>_<port>``; the guest is answered RESPONSE or, if nothing
  listens there, RST.

Queues: 0 (rx) carries packets to the guest, 1 (tx) packets from it, 2 (event) is
never used (no transport resets).  Flow control is vsock's credit scheme: each side
advertises its buffer (``buf_alloc``) and the bytes it has consumed (``fwd_cnt``).
pych never buffers more than :data:`BUFFER_SIZE` bytes per stream toward the host and
sends the guest data only within the guest's credit.

Data moves without copies through Python bytes: ``sendmsg`` straight from the guest's
tx buffers into the Unix socket, ``recvmsg_into`` straight from the socket into rx
buffers.  Only what a slow host reader leaves unsent is kept (in the stream's buffer).

All sockets sit in a private epoll set that the device's worker polls, so the worker
sleeps in one system call whatever the number of streams.
"""

from __future__ import annotations

import collections
import enum
import itertools
import logging
import os
import select
import socket
import struct
from collections.abc import Callable
from dataclasses import dataclass, field

from pych.guest_log import GuestLog
from pych.unix_socket import listen_unix

from .device import VirtioDevice, VirtioDeviceType
from .queue import DescriptorChain

log = logging.getLogger(__name__)
_guest_log = GuestLog(log)       # what the guest can repeat at will is rate-limited

HOST_CID = 2
RXQ, TXQ, EVENTQ = 0, 1, 2
DEFAULT_QUEUE_SIZE = 256
#: The receive buffer pych advertises per stream (``buf_alloc``).
BUFFER_SIZE = 256 * 1024
#: First host port handed to host-initiated streams (as the reference).
FIRST_HOST_PORT = 1 << 30
CONNECT_LINE_MAX = 64
MAX_CONTROL = 4096                # control packets queued for a guest that does not read

_HEADER = struct.Struct("<QQIIIHHIII")    # src_cid dst_cid src_port dst_port len type op flags buf_alloc fwd_cnt
HEADER_SIZE = _HEADER.size                # 44
VSOCK_TYPE_STREAM = 1
SHUTDOWN_RCV = 1
SHUTDOWN_SEND = 2


class Op(enum.IntEnum):
    REQUEST = 1
    RESPONSE = 2
    RST = 3
    SHUTDOWN = 4
    RW = 5
    CREDIT_UPDATE = 6
    CREDIT_REQUEST = 7


class VsockError(OSError):
    """The host socket cannot be set up; the message says why."""


@dataclass(eq=False)
class _Stream:
    """One connection: ``host_port`` on our side (CID 2), ``guest_port`` on the guest's."""
    sock: socket.socket
    host_port: int
    guest_port: int
    established: bool = False
    to_host: bytearray = field(default_factory=bytearray)  # guest data the socket did not take
    fwd_cnt: int = 0                # guest bytes handed to the host socket
    fwd_cnt_sent: int = 0           # the fwd_cnt the guest last heard of
    rx_cnt: int = 0                 # bytes sent to the guest
    peer_buf_alloc: int = 0
    peer_fwd_cnt: int = 0
    host_eof: bool = False          # the host side will send no more
    hung_up: bool = False           # the host closed: no longer polled, read to the end
    guest_shut_send: bool = False   # the guest will send no more
    guest_closed: bool = False      # the guest closed: reset once to_host is delivered

    @property
    def key(self) -> tuple[int, int]:
        return self.host_port, self.guest_port

    @property
    def peer_credit(self) -> int:
        return max(0, self.peer_buf_alloc - (self.rx_cnt - self.peer_fwd_cnt))


class VirtioVsock(VirtioDevice):
    device_type = VirtioDeviceType.VSOCK

    def __init__(self, cid: int, socket_path: str | os.PathLike, *,
                 queue_size: int = DEFAULT_QUEUE_SIZE, name: str = "vsock") -> None:
        """Listen on ``socket_path`` (a stale socket file is replaced).  Raises
        :class:`VsockError`."""
        if cid < 3 or cid >= 0xFFFF_FFFF:
            raise VsockError(f"vsock cid {cid} is reserved; use 3 or more")
        super().__init__(name=name, queue_sizes=[queue_size] * 3)
        self.cid = cid
        self.socket_path = os.fspath(socket_path)
        self._listener = _listen(self.socket_path)
        self._events = select.epoll()
        self._events.register(self._listener.fileno(), select.EPOLLIN)
        self._handlers: dict[int, Callable[[int], None]] = {self._listener.fileno(): self._accept}
        self._connecting: dict[int, tuple[socket.socket, bytearray]] = {}
        self._streams: dict[tuple[int, int], _Stream] = {}
        self._control: collections.deque[tuple[int, int, int, int, _Stream | None]] = collections.deque()
        self._readable: dict[tuple[int, int], _Stream] = {}   # streams with host data to send
        self._rx_chain: DescriptorChain | None = None
        self.dropped_control = 0
        self._ports = itertools.count(FIRST_HOST_PORT)

    def config_bytes(self) -> bytes:
        return struct.pack("<Q", self.cid)

    # --- lifecycle ----------------------------------------------------------------------------
    def reset(self) -> None:
        """The driver reset the device: every stream is gone."""
        super().reset()
        for stream in list(self._streams.values()):
            self._close(stream)
        self._control.clear()
        self._rx_chain = None

    def close_backend(self) -> None:
        for sock, _ in list(self._connecting.values()):
            self._forget(sock)
        if self._listener.fileno() >= 0:
            self._forget(self._listener)
            _unlink_socket(self.socket_path)
        self._events.close()

    # --- worker -------------------------------------------------------------------------------
    def event_sources(self) -> list[tuple[int, Callable[[], None]]]:
        return [(self._events.fileno(), self._host_events)]

    def _host_events(self) -> None:
        for fd, events in self._events.poll(0):
            handler = self._handlers.get(fd)
            if handler is not None:
                handler(events)
        self._send_to_guest()

    def process_queue(self, index: int) -> None:
        if index == TXQ:
            super().process_queue(index)
        # RXQ: new buffers; EVENTQ: kept for a transport reset that never comes.
        self._send_to_guest()

    # --- host side ----------------------------------------------------------------------------
    def _watch(self, sock: socket.socket, handler: Callable[[int], None], events: int) -> None:
        self._handlers[sock.fileno()] = handler
        self._events.register(sock.fileno(), events)

    def _forget(self, sock: socket.socket) -> None:
        fd = sock.fileno()
        if fd >= 0 and self._handlers.pop(fd, None) is not None:
            self._events.unregister(fd)
        self._connecting.pop(fd, None)
        sock.close()

    def _accept(self, _events: int) -> None:
        try:
            sock, _ = self._listener.accept()
        except BlockingIOError:
            return
        sock.setblocking(False)
        self._connecting[sock.fileno()] = (sock, bytearray())
        self._watch(sock, lambda ev, s=sock: self._connect_line(s), select.EPOLLIN)

    def _connect_line(self, sock: socket.socket) -> None:
        """Read ``CONNECT <port>\\n`` (and not a byte more) from a new host client."""
        _, line = self._connecting[sock.fileno()]
        try:
            peek = sock.recv(CONNECT_LINE_MAX - len(line), socket.MSG_PEEK)
        except BlockingIOError:
            return
        except OSError:
            peek = b""
        end = peek.find(b"\n")
        line += sock.recv(end + 1 if end >= 0 else len(peek)) if peek else b""
        if end < 0:
            if not peek or len(line) >= CONNECT_LINE_MAX:
                self._forget(sock)                 # closed, or not our protocol
            return
        words = line.decode(errors="replace").split()
        if len(words) != 2 or words[0] != "CONNECT" or not words[1].isdigit():
            log.warning("%s: host client sent %r, not CONNECT <port>", self.name, bytes(line))
            self._forget(sock)
            return
        self._handlers.pop(sock.fileno())
        self._events.unregister(sock.fileno())
        del self._connecting[sock.fileno()]
        stream = _Stream(sock, self._free_host_port(), int(words[1]))
        self._add_stream(stream)
        self._queue(stream, Op.REQUEST)

    def _free_host_port(self) -> int:
        used = {port for port, _ in self._streams}
        return next(port for port in self._ports if port not in used)

    def _add_stream(self, stream: _Stream) -> None:
        self._streams[stream.key] = stream
        self._watch(stream.sock, lambda ev, s=stream: self._stream_event(s, ev), 0)

    def _stream_event(self, stream: _Stream, events: int) -> None:
        if events & select.EPOLLOUT:
            self._flush_to_host(stream)
        if stream.key not in self._streams:
            return                                 # the flush failed and reset it
        if events & (select.EPOLLHUP | select.EPOLLERR):
            # Reported whatever the interest: stop polling, read what is left to its end.
            stream.hung_up = True
            self._handlers.pop(stream.sock.fileno())
            self._events.unregister(stream.sock.fileno())
        if events & (select.EPOLLIN | select.EPOLLHUP | select.EPOLLERR):
            self._readable[stream.key] = stream
            self._update_interest(stream)

    def _update_interest(self, stream: _Stream) -> None:
        """Poll for input only while the guest is not already being fed from this stream,
        and for output only while data waits for the host reader."""
        if stream.hung_up or stream.sock.fileno() < 0:
            return
        events = 0
        if stream.established and not stream.host_eof and stream.key not in self._readable:
            events |= select.EPOLLIN
        if stream.to_host:
            events |= select.EPOLLOUT
        self._events.modify(stream.sock.fileno(), events)

    def _flush_to_host(self, stream: _Stream) -> None:
        try:
            n = stream.sock.send(stream.to_host)
        except BlockingIOError:
            return
        except OSError:
            self._reset(stream)
            return
        del stream.to_host[:n]
        self._forwarded(stream, n)
        if stream.guest_closed and not stream.to_host:
            self._reset(stream)
            return
        self._update_interest(stream)
        self._shutdown_host_write(stream)

    def _forwarded(self, stream: _Stream, n: int) -> None:
        stream.fwd_cnt += n
        if stream.fwd_cnt - stream.fwd_cnt_sent >= BUFFER_SIZE // 4:
            self._queue(stream, Op.CREDIT_UPDATE)

    def _shutdown_host_write(self, stream: _Stream) -> None:
        if stream.guest_shut_send and not stream.to_host:
            try:
                stream.sock.shutdown(socket.SHUT_WR)
            except OSError:
                pass

    # --- packets from the guest ---------------------------------------------------------------
    def handle_chain(self, index: int, chain: DescriptorChain) -> int:
        reader = chain.reader()
        raw = reader.read(HEADER_SIZE)
        if len(raw) < HEADER_SIZE:
            _guest_log.warning("%s: tx packet without a header (head %d)", self.name, chain.head)
            return 0
        (src_cid, dst_cid, src_port, dst_port, length, type_, op, flags, buf_alloc,
         fwd_cnt) = _HEADER.unpack(raw)
        if dst_cid != HOST_CID or type_ != VSOCK_TYPE_STREAM:
            if op != Op.RST:
                self._push_control((dst_port, src_port, Op.RST, 0, None))
            return 0
        stream = self._streams.get((dst_port, src_port))
        if stream is not None:
            stream.peer_buf_alloc, stream.peer_fwd_cnt = buf_alloc, fwd_cnt
            if stream.peer_credit and stream.established and not stream.host_eof:
                self._readable[stream.key] = stream       # credit may have unblocked it
        match op:
            case Op.REQUEST if stream is None:
                self._guest_connects(dst_port, src_port, buf_alloc, fwd_cnt)
            case Op.RESPONSE if stream is not None and not stream.established:
                self._guest_accepted(stream)
            case Op.RW if stream is not None and stream.established:
                self._guest_data(stream, reader.take(min(length, reader.remaining)))
            case Op.CREDIT_REQUEST if stream is not None:
                self._queue(stream, Op.CREDIT_UPDATE)
            case Op.CREDIT_UPDATE if stream is not None:
                pass
            case Op.SHUTDOWN if stream is not None:
                self._guest_shutdown(stream, flags)
            case Op.RST:
                if stream is not None:
                    self._close(stream)
            case _:
                self._push_control((dst_port, src_port, Op.RST, 0, None))
                if stream is not None:
                    self._close(stream)
        return 0

    def _guest_connects(self, host_port: int, guest_port: int, buf_alloc: int, fwd_cnt: int) -> None:
        sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM | socket.SOCK_CLOEXEC)
        try:
            sock.connect(f"{self.socket_path}_{host_port}")
        except OSError as e:
            log.info("%s: guest connection to port %d refused: %s", self.name, host_port, e.strerror)
            sock.close()
            self._push_control((host_port, guest_port, Op.RST, 0, None))
            return
        sock.setblocking(False)
        stream = _Stream(sock, host_port, guest_port, established=True,
                         peer_buf_alloc=buf_alloc, peer_fwd_cnt=fwd_cnt)
        self._add_stream(stream)
        self._update_interest(stream)
        self._queue(stream, Op.RESPONSE)

    def _guest_accepted(self, stream: _Stream) -> None:
        """Tell the host client its stream is up.  The line is short and the socket's
        buffer still empty, so one send takes it all."""
        stream.established = True
        try:
            if stream.sock.send(f"OK {stream.host_port}\n".encode()) == 0:
                raise BrokenPipeError
        except OSError:
            self._reset(stream)
            return
        self._update_interest(stream)

    def _guest_data(self, stream: _Stream, views: list[memoryview]) -> None:
        size = sum(len(v) for v in views)
        if len(stream.to_host) + size > BUFFER_SIZE:
            _guest_log.warning("%s: guest port %d overran its credit; resetting the stream",
                               self.name, stream.guest_port)
            self._reset(stream)
            return
        sent = 0
        if not stream.to_host:
            try:
                sent = stream.sock.sendmsg(views)
            except BlockingIOError:
                sent = 0
            except OSError:
                self._reset(stream)
                return
            self._forwarded(stream, sent)
        if sent < size:
            stream.to_host += b"".join(views)[sent:]
            self._update_interest(stream)

    def _guest_shutdown(self, stream: _Stream, flags: int) -> None:
        if flags & SHUTDOWN_SEND:
            stream.guest_shut_send = True
            self._shutdown_host_write(stream)
        if flags & SHUTDOWN_RCV and flags & SHUTDOWN_SEND:
            # The guest closed: confirm with RST once the host has all it sent.
            stream.guest_closed = True
            if not stream.to_host:
                self._reset(stream)

    def _push_control(self, packet: tuple[int, int, int, int, _Stream | None]) -> None:
        """Queue a control packet for the guest's rx queue. A guest that sends and never
        posts rx buffers would grow this queue without end, so it holds at most
        ``MAX_CONTROL`` packets; beyond that new ones are dropped (and counted): only such a
        guest's own connections suffer."""
        if len(self._control) >= MAX_CONTROL:
            self.dropped_control += 1
            _guest_log.warning("%s: guest posts no rx buffers; control packets dropped",
                               self.name)
            return
        self._control.append(packet)

    def _reset(self, stream: _Stream) -> None:
        self._push_control((stream.host_port, stream.guest_port, Op.RST, 0, None))
        self._close(stream)

    def _close(self, stream: _Stream) -> None:
        self._streams.pop(stream.key, None)
        self._readable.pop(stream.key, None)
        self._forget(stream.sock)

    # --- packets to the guest -----------------------------------------------------------------
    def _queue(self, stream: _Stream, op: Op, flags: int = 0) -> None:
        self._push_control((stream.host_port, stream.guest_port, op, flags, stream))

    def _header(self, host_port: int, guest_port: int, op: int, flags: int, length: int,
                stream: _Stream | None) -> bytes:
        fwd_cnt = 0
        if stream is not None:
            fwd_cnt = stream.fwd_cnt_sent = stream.fwd_cnt
        return _HEADER.pack(HOST_CID, self.cid, host_port, guest_port, length, VSOCK_TYPE_STREAM,
                            op, flags, BUFFER_SIZE, fwd_cnt)

    def _send_to_guest(self) -> None:
        """Fill rx buffers: control packets first, then data from readable streams."""
        active = self.queues.get(RXQ)
        if active is None:
            return
        queue = active.queue
        sent = False
        while self._control or self._readable:
            chain = self._rx_chain or self._next_rx_chain(queue)
            if chain is None:
                break
            self._rx_chain = None
            if self._control:
                writer = chain.writer()
                if writer.remaining < HEADER_SIZE:
                    queue.add_used(chain.head, 0)
                    continue
                host_port, guest_port, op, flags, stream = self._control.popleft()
                writer.write(self._header(host_port, guest_port, op, flags, 0, stream))
                queue.add_used(chain.head, writer.written)
                sent = True
                continue
            used = self._stream_data(chain)
            if used is None:
                self._rx_chain = chain             # no stream had anything after all
                break
            queue.add_used(chain.head, used)
            sent = True
        if sent:
            self.signal_used(RXQ)

    def _stream_data(self, chain: DescriptorChain) -> int | None:
        """One RW (or, at end of stream, SHUTDOWN) packet from the first readable stream
        with guest credit into ``chain``; None when no stream produced one."""
        if chain.writable_len <= HEADER_SIZE:
            return 0                               # too small for any data: hand it back
        for key, stream in list(self._readable.items()):
            credit = stream.peer_credit
            if not credit:
                continue                           # wait for the guest's credit update
            writer = chain.writer()
            header_views = writer.take(HEADER_SIZE)
            try:
                n = stream.sock.recvmsg_into(writer.take(min(credit, writer.remaining)))[0]
            except BlockingIOError:
                del self._readable[key]
                self._update_interest(stream)
                continue
            except OSError:
                n = 0
            if n == 0:
                # End of the host's stream: it sends no more; after a hang-up (a close,
                # not a half-close) it receives no more either.
                del self._readable[key]
                stream.host_eof = True
                self._update_interest(stream)
                flags = SHUTDOWN_SEND | (SHUTDOWN_RCV if stream.hung_up else 0)
                _fill(header_views, self._header(stream.host_port, stream.guest_port, Op.SHUTDOWN,
                                                 flags, 0, stream))
                return HEADER_SIZE
            stream.rx_cnt += n
            _fill(header_views, self._header(stream.host_port, stream.guest_port, Op.RW, 0, n, stream))
            return HEADER_SIZE + n
        return None

    def _next_rx_chain(self, queue) -> DescriptorChain | None:
        while True:
            chain = queue.pop()
            if chain is not None or not queue.enable_notification():
                return chain


def _fill(views: list[memoryview], data: bytes) -> None:
    done = 0
    for view in views:
        view[:] = data[done:done + len(view)]
        done += len(view)


def _listen(path: str) -> socket.socket:
    """A non-blocking listening Unix socket at ``path``; a stale socket file (nothing
    listening) is replaced, anything else there is an error."""
    try:
        return listen_unix(path, backlog=16)
    except OSError as e:
        raise VsockError(f"cannot listen on vsock socket {path}: {e.strerror}") from e


def _unlink_socket(path: str) -> None:
    try:
        os.unlink(path)
    except FileNotFoundError:
        pass
