"""pych's live migration stream, version 2: framed messages on one stream socket.

Every message is a 16-byte header, ``magic "PYMG" | type u32 | length u64`` (little endian),
then ``length`` bytes of payload: JSON for the control messages, ``gpa u64`` then the bytes
for :attr:`Msg.MEMORY`. With ``local`` (Unix sockets only) :attr:`Msg.CONFIG` carries guest RAM's
file descriptors with SCM_RIGHTS on its first bytes, and no memory is sent. The sender speaks first; the
receiver answers :attr:`Msg.OK` or :attr:`Msg.ERROR` to each message that asks for an answer
(:data:`ANSWERED`). docs/snapshot.md ("Live migration") has the whole exchange.

Nothing here knows a VM: the sender and receiver (:mod:`pych.migration.sender`,
:mod:`pych.migration.receiver`) drive a :class:`Channel` over whatever socket they were
given, so unit tests run them over a socketpair with fakes.
"""

from __future__ import annotations

import array
import enum
import json
import os
import socket
import struct
import zlib
from dataclasses import dataclass
from typing import Any

FORMAT = "pych-migration"
VERSION = 2
MAGIC = b"PYMG"
HEADER = struct.Struct("<4sIQ")
GPA = struct.Struct("<Q")
MAX_CONTROL = 64 << 20          # a JSON message (the configuration, the device state)
MAX_MEMORY = 64 << 20           # one MEMORY message's bytes
MAX_FDS = 253                   # SCM_MAX_FD


class MigrationError(Exception):
    """A migration that cannot go on: a bad URL, a peer that went away or broke the
    protocol, a peer that refused (its message is this error's)."""


class PeerRefused(MigrationError):
    """The peer answered :attr:`Msg.ERROR`: it refused what was sent (its reason)."""


class Msg(enum.IntEnum):
    HELLO = 1          # S->R {format, version, pych_version, local}
    CONFIG = 2         # S->R {config, layout, shared}: the receiver maps guest RAM (local:
    #                    the sender's memfds, which come with it by SCM_RIGHTS)
    MEMORY = 3         # S->R gpa u64 + bytes: guest RAM at gpa (not answered)
    STATE = 5          # S->R {state}: the receiver builds the devices and vCPUs, paused
    COMPLETE = 6       # S->R {}: the receiver resumes the guest; the sender then ends its VM
    ABANDON = 7        # S->R {reason}: the sender gives up; the receiver drops what it built
    OK = 8             # R->S {...}
    ERROR = 9          # R->S {error}
    VERIFY = 10        # S->R {blocks: [[gpa, length], ...]} (paused): the receiver answers
    #                    {sums: [crc32, ...]} of its bytes; the sender sends again what differs


def block_sums(blocks, view_of) -> list[list[int]]:
    """``[[gpa, length, crc32], ...]`` of ``blocks`` (``(gpa, length)`` pairs) as
    ``view_of(gpa, length)`` holds them."""
    return [[gpa, length, zlib.crc32(view_of(gpa, length))] for gpa, length in blocks]


ANSWERED = frozenset({Msg.HELLO, Msg.CONFIG, Msg.VERIFY, Msg.STATE, Msg.COMPLETE})


@dataclass(frozen=True)
class Endpoint:
    """A parsed ``unix:/path`` or ``tcp:host:port`` URL."""

    kind: str                   # "unix" or "tcp"
    path: str = ""
    host: str = ""
    port: int = 0

    def __str__(self) -> str:
        return f"unix:{self.path}" if self.kind == "unix" else f"tcp:{self.host}:{self.port}"


def parse_url(url: str) -> Endpoint:
    """``unix:/path`` (also ``unix:///path``) or ``tcp:host:port`` (the reference's forms)."""
    if url.startswith("unix:"):
        path = url[len("unix:"):]
        if path.startswith("//"):
            path = path[2:]
        if not path:
            raise MigrationError(f"{url}: a unix: URL needs a socket path")
        return Endpoint("unix", path=path)
    if url.startswith("tcp:"):
        host, sep, port = url[len("tcp:"):].rpartition(":")
        host = host.strip("[]")
        if not sep or not host or not port.isdigit() or not 0 < int(port) < 65536:
            raise MigrationError(f"{url}: a tcp: URL is tcp:<host>:<port>")
        return Endpoint("tcp", host=host, port=int(port))
    raise MigrationError(f"{url}: pych migrates over unix:<path> or tcp:<host>:<port> URLs")


def connect(endpoint: Endpoint, timeout: float = 30.0) -> socket.socket:
    """A stream socket connected to ``endpoint``."""
    try:
        if endpoint.kind == "unix":
            sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM | socket.SOCK_CLOEXEC)
            sock.settimeout(timeout)
            sock.connect(endpoint.path)
        else:
            sock = socket.create_connection((endpoint.host, endpoint.port), timeout=timeout)
            sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
    except OSError as e:
        raise MigrationError(f"cannot connect to {endpoint}: {e.strerror or e}") from None
    return sock


def listen(endpoint: Endpoint) -> socket.socket:
    """A listening socket on ``endpoint`` (a Unix socket path must not exist yet)."""
    try:
        if endpoint.kind == "unix":
            sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM | socket.SOCK_CLOEXEC)
            try:
                sock.bind(endpoint.path)
            except OSError:
                sock.close()
                raise
        else:
            sock = socket.socket(socket.AF_INET6 if ":" in endpoint.host else socket.AF_INET,
                                 socket.SOCK_STREAM | socket.SOCK_CLOEXEC)
            sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
            try:
                sock.bind((endpoint.host, endpoint.port))
            except OSError:
                sock.close()
                raise
        sock.listen(1)
    except OSError as e:
        raise MigrationError(f"cannot listen on {endpoint}: {e.strerror or e}") from None
    return sock


class Channel:
    """Framed messages over a connected stream socket. Every failure of the socket, and
    every message that is not what the protocol allows, is a :class:`MigrationError`."""

    def __init__(self, sock: socket.socket, *, timeout: float | None = 60.0):
        self.sock = sock
        self.sock.settimeout(timeout)
        self.unix = sock.family == socket.AF_UNIX
        self.sent_bytes = 0

    def close(self) -> None:
        try:
            self.sock.close()
        except OSError:
            pass

    # --- sending -------------------------------------------------------------------------
    def send(self, kind: Msg, body: Any = None, fds: list[int] | None = None) -> None:
        """A control message (``body`` as JSON), with ``fds`` by SCM_RIGHTS if given."""
        payload = json.dumps(body if body is not None else {}, separators=(",", ":")).encode()
        header = HEADER.pack(MAGIC, kind, len(payload))
        try:
            if fds:
                if not self.unix:
                    raise MigrationError("file descriptors can only be passed over a unix: "
                                         "socket")
                data = header + payload
                sent = self.sock.sendmsg([data[:HEADER.size]], [(
                    socket.SOL_SOCKET, socket.SCM_RIGHTS, array.array("i", fds))])
                self.sock.sendall(data[sent:])
            else:
                self.sock.sendall(header + payload)
        except OSError as e:
            raise MigrationError(f"the receiver went away ({e.strerror or e})") from None
        self.sent_bytes += HEADER.size + len(payload)

    def send_memory(self, gpa: int, data) -> None:
        """Guest RAM at ``gpa``: ``data`` (a buffer; not copied)."""
        n = len(data)
        try:
            self.sock.sendall(HEADER.pack(MAGIC, Msg.MEMORY, GPA.size + n) + GPA.pack(gpa))
            self.sock.sendall(data)
        except OSError as e:
            raise MigrationError(f"the receiver went away ({e.strerror or e})") from None
        self.sent_bytes += HEADER.size + GPA.size + n

    def request(self, kind: Msg, body: Any = None, fds: list[int] | None = None) -> dict:
        """Send a message the receiver answers; its OK body, or :class:`PeerRefused`."""
        self.send(kind, body, fds)
        answer, payload, got = self.receive()
        _close(got)
        if answer is Msg.ERROR:
            raise PeerRefused(str(payload.get("error", "the receiver refused")))
        if answer is not Msg.OK:
            raise MigrationError(f"the receiver answered {answer.name} to {kind.name}")
        return payload

    # --- receiving -----------------------------------------------------------------------
    def _recv_exact(self, n: int, into=None, what: str = "message") -> bytes | None:
        """``n`` bytes (into the writable buffer ``into``, if given)."""
        view = memoryview(into) if into is not None else memoryview(bytearray(n))
        got = 0
        while got < n:
            try:
                k = self.sock.recv_into(view[got:], n - got)
            except OSError as e:
                raise MigrationError(f"the migration stream broke off in a {what} "
                                     f"({e.strerror or e})") from None
            if k == 0:
                raise MigrationError(f"the migration stream was truncated: the peer closed "
                                     f"the connection in a {what} ({got} of {n} bytes)")
            got += k
        return None if into is not None else bytes(view)

    def receive_header(self) -> tuple[Msg, int, list[int]]:
        """The next message's type and payload length, and any fds that came with it."""
        fds: list[int] = []
        try:
            data, ancdata, _, _ = self.sock.recvmsg(HEADER.size, socket.CMSG_SPACE(
                MAX_FDS * array.array("i").itemsize) if self.unix else 0)
        except OSError as e:
            raise MigrationError(f"the migration stream broke off ({e.strerror or e})") from None
        for level, kind, cdata in ancdata:
            if level == socket.SOL_SOCKET and kind == socket.SCM_RIGHTS:
                arr = array.array("i")
                arr.frombytes(cdata[:len(cdata) - len(cdata) % arr.itemsize])
                fds += list(arr)
        if not data:
            _close(fds)
            raise MigrationError("the migration stream was truncated: the peer closed the "
                                 "connection between messages")
        if len(data) < HEADER.size:
            try:
                data += self._recv_exact(HEADER.size - len(data), what="message header")
            except MigrationError:
                _close(fds)
                raise
        magic, kind, length = HEADER.unpack(data)
        try:
            if magic != MAGIC:
                raise MigrationError("the peer does not speak pych's migration protocol "
                                     f"(header {data[:4]!r})")
            try:
                msg = Msg(kind)
            except ValueError:
                raise MigrationError(f"unknown migration message type {kind}") from None
            limit = MAX_MEMORY + GPA.size if msg is Msg.MEMORY else MAX_CONTROL
            if length > limit:
                raise MigrationError(f"{msg.name} message of {length} bytes: more than the "
                                     f"{limit} allowed")
        except MigrationError:
            _close(fds)
            raise
        return msg, length, fds

    def receive_json(self, length: int, kind: Msg) -> dict:
        data = self._recv_exact(length, what=f"{kind.name} message") if length else b"{}"
        try:
            body = json.loads(data)
        except ValueError as e:
            raise MigrationError(f"{kind.name} message is not valid JSON: {e}") from None
        if not isinstance(body, dict):
            raise MigrationError(f"{kind.name} message is not a JSON object")
        return body

    def receive(self) -> tuple[Msg, dict, list[int]]:
        """The next control message: type, JSON body, fds."""
        kind, length, fds = self.receive_header()
        if kind is Msg.MEMORY:
            _close(fds)
            raise MigrationError("a MEMORY message where a control message was expected")
        try:
            return kind, self.receive_json(length, kind), fds
        except MigrationError:
            _close(fds)
            raise

    def receive_memory(self, length: int, view_of) -> int:
        """The rest of a MEMORY message of ``length`` bytes, read straight into guest RAM:
        ``view_of(gpa, n)`` gives the writable view of ``n`` bytes at ``gpa`` (raising
        :class:`MigrationError` for a range outside it). Returns the bytes of RAM."""
        if length < GPA.size:
            raise MigrationError(f"MEMORY message of {length} bytes has no address")
        (gpa,) = GPA.unpack(self._recv_exact(GPA.size, what="MEMORY message"))
        n = length - GPA.size
        self._recv_exact(n, into=view_of(gpa, n), what="MEMORY message")
        return n

    def answer_ok(self, body: Any = None) -> None:
        self.send(Msg.OK, body)

    def answer_error(self, error: str) -> None:
        """Tell the sender why; the connection may already be gone (then nothing to say)."""
        try:
            self.send(Msg.ERROR, {"error": error})
        except MigrationError:
            pass


def _close(fds: list[int]) -> None:
    for fd in fds:
        try:
            os.close(fd)
        except OSError:
            pass


def hello(local: bool) -> dict:
    import pych
    return {"format": FORMAT, "version": VERSION, "pych_version": pych.__version__,
            "local": local}


def check_hello(body: dict) -> None:
    """The sender's HELLO: pych's migration format, this version (else MigrationError)."""
    if body.get("format") != FORMAT:
        raise MigrationError("the sender does not speak pych's migration protocol")
    if body.get("version") != VERSION:
        raise MigrationError(f"migration format version {body.get('version')!r} (sent by pych "
                             f"{body.get('pych_version')}) is not supported: this pych "
                             f"receives version {VERSION}")
