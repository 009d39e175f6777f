"""The vhost-user front end against a fake back-end on a Unix socket: message encoding,
descriptors passed with SCM_RIGHTS, feature negotiation, REPLY_ACK, the memory table, and
every way a back-end can fail (missing, refusing, hanging up, answering nonsense, silent).

:class:`FakeBackend` answers like libvhost-user (virtiofsd's library) and records every
message; ``tests/unit/devices/virtio/test_fs.py`` uses it too.
"""

from __future__ import annotations

import array
import mmap
import os
import socket
import struct
import threading
import time
from dataclasses import dataclass, field
from pathlib import Path

import pytest

from pych.devices.vhost_user import (CONFIG_HEADER, FLAG_NEED_REPLY, FLAG_REPLY, HEADER,
                                     INFLIGHT, MEM_REGION,
                                     MEM_TABLE_HEADER, SINGLE_MEM_REGION, U64,
                                     VHOST_USER_F_PROTOCOL_FEATURES, VRING_ADDR, VRING_NOFD,
                                     VRING_STATE, MemoryRegionInfo, ProtocolFeature, Request,
                                     VhostUserConnections, VhostUserError, VhostUserFrontend)
from pych.memory.guest_memory import GuestMemory

MiB = 1 << 20
VERSION_1 = 1 << 32
#: What virtiofsd (QEMU 7.2's, on libvhost-user) offers, as measured on this host.
VIRTIOFSD_FEATURES = 0x1_7500_0000
VIRTIOFSD_PROTOCOL_FEATURES = 0x8C2B

_MAX_FDS = 8


@dataclass
class Message:
    request: int
    flags: int
    payload: bytes
    fds: list[int] = field(default_factory=list)

    @property
    def name(self) -> str:
        try:
            return Request(self.request).name
        except ValueError:
            return str(self.request)

    def u64(self) -> int:
        return U64.unpack(self.payload)[0]

    def state(self) -> tuple[int, int]:
        return VRING_STATE.unpack(self.payload)


class FakeBackend:
    """A vhost-user back-end in a thread: listens at ``path`` (or is one end of a
    socketpair: :meth:`frontend`), records every :class:`Message` (received descriptors
    stay open until :meth:`close`) and answers like libvhost-user: GET_* with their value,
    anything else with an acknowledgement when NEED_REPLY is set.

    Misbehaviour on demand: ``refuse`` (NACK these requests), ``hang_up_on`` (close the
    connection when this request arrives), ``silent_on`` (never answer it),
    ``raw_replies`` (send these bytes instead of the proper reply).

    ``check_rings``: as libvhost-user does (QEMU 7.2's virtiofsd), keep the memory table
    and every ring address it was given (a stopped ring keeps its addresses), and give up
    the connection (``panic`` says why) when a ring address is not in mapped memory, at
    SET_VRING_ADDR and at every SET_MEM_TABLE or ADD_MEM_REG."""

    def __init__(self, path: str | os.PathLike | None = None, *,
                 features: int = VIRTIOFSD_FEATURES,
                 protocol_features: int = VIRTIOFSD_PROTOCOL_FEATURES,
                 queue_num: int = 2, max_mem_slots: int = 32, vring_base: int = 0,
                 check_rings: bool = False) -> None:
        self.check_rings = check_rings
        self.regions: list[tuple[int, int, int]] = []       # (guest address, size, user address)
        self.rings: dict[int, tuple[int, int, int]] = {}    # index: (desc, used, avail)
        self.panic: str | None = None
        self.features = features
        self.protocol_features = protocol_features
        self.queue_num = queue_num
        self.max_mem_slots = max_mem_slots
        self.vring_base = vring_base
        self.config = bytes(60)          # GET_CONFIG's answer (a virtio-blk config space)
        self.inflight: mmap.mmap | None = None   # GET_INFLIGHT_FD's region, once asked
        self.refuse: set[Request] = set()
        self.hang_up_on: Request | None = None
        self.silent_on: Request | None = None
        self.raw_replies: dict[Request, bytes] = {}
        self.messages: list[Message] = []
        self.connections = 0
        self.eof = False
        self._cond = threading.Condition()
        self._closing = False
        self.sock: socket.socket | None = None
        self._listener: socket.socket | None = None
        self._client: socket.socket | None = None
        if path is None:
            self._client, self.sock = socket.socketpair(socket.AF_UNIX, socket.SOCK_STREAM)
            target = self._serve
        else:
            self.path = str(path)
            self._listener = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
            self._listener.bind(self.path)
            self._listener.listen(1)
            target = self._accept
        self._thread = threading.Thread(target=target, daemon=True, name="fake-vhost-user")
        self._thread.start()

    def frontend(self) -> VhostUserFrontend:
        """The front end on the other end of the socketpair."""
        return VhostUserFrontend(self._client, "fake-backend")

    # --- inspection -------------------------------------------------------------------------
    def requests(self) -> list[str]:
        with self._cond:
            return [m.name for m in self.messages]

    def of(self, request: Request) -> list[Message]:
        with self._cond:
            return [m for m in self.messages if m.request == request]

    def wait_for(self, predicate, timeout: float = 5.0) -> bool:
        with self._cond:
            return self._cond.wait_for(lambda: predicate(self), timeout)

    def wait_messages(self, count: int, timeout: float = 5.0) -> list[Message]:
        """The first ``count`` messages, once they have arrived."""
        assert self.wait_for(lambda b: len(b.messages) >= count, timeout), self.requests()
        with self._cond:
            return self.messages[:count]

    def held_fds(self) -> int:
        """Descriptors received and still held (they count in this process's table)."""
        with self._cond:
            return sum(len(m.fds) for m in self.messages)

    def clear(self) -> None:
        with self._cond:
            for m in self.messages:
                for fd in m.fds:
                    os.close(fd)
            self.messages.clear()

    # --- serving ----------------------------------------------------------------------------
    def _accept(self) -> None:
        try:
            sock, _ = self._listener.accept()
        except OSError:
            return
        with self._cond:
            self.sock = sock
            self.connections += 1
            self._cond.notify_all()
        self._serve()

    def _serve(self) -> None:
        try:
            self._serve_connection(self.sock)
        finally:
            self.sock.close()              # like virtiofsd, which exits when its front end goes

    def _serve_connection(self, sock: socket.socket) -> None:
        while True:
            try:
                message = self._receive(sock)
            except OSError:
                message = None
            if message is None:
                with self._cond:
                    self.eof = True
                    self._cond.notify_all()
                return
            with self._cond:
                self.messages.append(message)
                self._cond.notify_all()
            request = message.request
            if self.check_rings and self.panic is None:
                self.panic = self._track_memory(message)
            if request == self.hang_up_on or self.panic is not None:
                sock.shutdown(socket.SHUT_RDWR)
                with self._cond:
                    self.eof = True
                    self._cond.notify_all()
                return
            if request == self.silent_on:
                continue
            reply = self._reply(message)
            if reply is not None:
                sock.sendall(reply)

    def _track_memory(self, m: Message) -> str | None:
        """libvhost-user's bookkeeping of the memory table and the rings: why it would give
        up the connection over ``m``, or None."""
        if m.request == Request.SET_MEM_TABLE:
            count, _ = MEM_TABLE_HEADER.unpack_from(m.payload)
            self.regions = [MEM_REGION.unpack_from(m.payload, MEM_TABLE_HEADER.size
                                                   + i * MEM_REGION.size)[:3]
                            for i in range(count)]
        elif m.request == Request.ADD_MEM_REG:
            self.regions.append(SINGLE_MEM_REGION.unpack(m.payload)[1:4])
        elif m.request == Request.REM_MEM_REG:
            region = SINGLE_MEM_REGION.unpack(m.payload)[1:4]
            if region not in self.regions:
                return "REM_MEM_REG of a region not mapped"
            self.regions.remove(region)
            return None
        elif m.request == Request.SET_VRING_ADDR:
            index, _, desc, used, avail, _ = VRING_ADDR.unpack(m.payload)
            self.rings[index] = (desc, used, avail)
        else:
            return None
        for index, addresses in sorted(self.rings.items()):
            if not all(any(qva <= a < qva + size for _, size, qva in self.regions)
                       for a in addresses):
                return f"ring {index} is not in mapped memory after {m.name}"
        return None

    @staticmethod
    def _receive(sock: socket.socket) -> Message | None:
        fds = array.array("i")
        header, ancillary, _, _ = sock.recvmsg(HEADER.size, socket.CMSG_SPACE(_MAX_FDS * fds.itemsize))
        if not header:
            return None
        for level, kind, data in ancillary:
            if level == socket.SOL_SOCKET and kind == socket.SCM_RIGHTS:
                fds.frombytes(data[:len(data) - len(data) % fds.itemsize])
        while len(header) < HEADER.size:
            header += sock.recv(HEADER.size - len(header))
        request, flags, size = HEADER.unpack(header)
        payload = b""
        while len(payload) < size:
            chunk = sock.recv(size - len(payload))
            if not chunk:
                return None
            payload += chunk
        return Message(request, flags, payload, list(fds))

    def _reply(self, m: Message) -> bytes | None:
        request = Request(m.request)
        if request in self.raw_replies:
            return self.raw_replies[request]
        values = {Request.GET_FEATURES: self.features,
                  Request.GET_PROTOCOL_FEATURES: self.protocol_features,
                  Request.GET_QUEUE_NUM: self.queue_num,
                  Request.GET_MAX_MEM_SLOTS: self.max_mem_slots}
        if request in values:
            payload = U64.pack(values[request])
        elif request == Request.GET_VRING_BASE:
            payload = VRING_STATE.pack(m.state()[0], self.vring_base)
        elif request == Request.GET_CONFIG:
            offset, size, _ = CONFIG_HEADER.unpack_from(m.payload)
            payload = CONFIG_HEADER.pack(offset, size, 0) + self.config[offset:offset + size]
        elif request == Request.GET_INFLIGHT_FD:
            return self._inflight_reply(m)
        elif m.flags & FLAG_NEED_REPLY:
            payload = U64.pack(1 if request in self.refuse else 0)
        else:
            return None
        return HEADER.pack(request, 1 | FLAG_REPLY, len(payload)) + payload

    def _inflight_reply(self, m: Message) -> bytes:
        """libvhost-user's GET_INFLIGHT_FD: a zeroed memfd of 64-byte aligned queue regions,
        sent with the reply (SCM_RIGHTS)."""
        _, _, queues, size = INFLIGHT.unpack_from(m.payload)
        region = -(-(16 * size + 2) // 64) * 64
        fd = os.memfd_create("fake-inflight", os.MFD_CLOEXEC)
        os.ftruncate(fd, region * queues)
        self.inflight = mmap.mmap(fd, region * queues)
        payload = INFLIGHT.pack(region * queues, 0, queues, size) + bytes(4)
        message = HEADER.pack(Request.GET_INFLIGHT_FD, 1 | FLAG_REPLY, len(payload)) + payload
        self.sock.sendmsg([message], [(socket.SOL_SOCKET, socket.SCM_RIGHTS,
                                       array.array("i", [fd]))])
        os.close(fd)
        return None

    def close(self) -> None:
        for s in (self._listener, self.sock, self._client):
            if s is not None:
                try:
                    s.shutdown(socket.SHUT_RDWR)
                except OSError:
                    pass
                s.close()
        self._thread.join(5)
        self.clear()


@pytest.fixture
def backend():
    b = FakeBackend()
    yield b
    b.close()


@pytest.fixture
def frontend(backend):
    f = backend.frontend()
    yield f
    f.close()


def fd_identity(fd: int) -> tuple[int, int]:
    """Which file a descriptor opens (tells memfds apart; every eventfd shares one inode)."""
    st = os.fstat(fd)
    return st.st_dev, st.st_ino


# --- encoding and negotiation ----------------------------------------------------------------
def test_get_requests_carry_version_1_and_read_their_reply(backend, frontend):
    assert frontend.get_features() == VIRTIOFSD_FEATURES
    assert frontend.get_protocol_features() == VIRTIOFSD_PROTOCOL_FEATURES
    assert frontend.get_queue_num() == 2
    assert frontend.get_max_mem_slots() == 32
    frontend.set_owner()
    backend.wait_messages(5)
    assert backend.requests() == ["GET_FEATURES", "GET_PROTOCOL_FEATURES", "GET_QUEUE_NUM",
                                  "GET_MAX_MEM_SLOTS", "SET_OWNER"]
    assert {m.flags for m in backend.messages} == {1}            # version 1, no NEED_REPLY
    assert all(m.payload == b"" for m in backend.messages)


def test_reply_ack_once_negotiated_acknowledges_every_plain_request(backend, frontend):
    frontend.set_features(VERSION_1 | VHOST_USER_F_PROTOCOL_FEATURES)
    assert not frontend.reply_ack
    frontend.set_protocol_features(ProtocolFeature.REPLY_ACK | ProtocolFeature.MQ)
    assert frontend.reply_ack
    frontend.set_vring_num(1, 256)                  # returns only once acknowledged
    assert frontend.get_features() == VIRTIOFSD_FEATURES
    features, protocol, vring_num, get = backend.messages
    assert (features.request, features.flags, features.u64()) == (
        Request.SET_FEATURES, 1, VERSION_1 | VHOST_USER_F_PROTOCOL_FEATURES)
    assert (protocol.flags, protocol.u64()) == (1, ProtocolFeature.REPLY_ACK | ProtocolFeature.MQ)
    assert (vring_num.flags, vring_num.state()) == (1 | FLAG_NEED_REPLY, (1, 256))
    assert get.flags == 1                            # a request with its own reply asks no ack


def test_a_refused_request_raises_with_the_request_named(backend, frontend):
    frontend.set_protocol_features(ProtocolFeature.REPLY_ACK)
    backend.refuse.add(Request.SET_VRING_ENABLE)
    with pytest.raises(VhostUserError, match="refused SET_VRING_ENABLE"):
        frontend.set_vring_enable(0, True)
    backend.refuse.clear()
    frontend.set_vring_enable(1, True)               # a refusal is not a broken connection
    assert backend.of(Request.SET_VRING_ENABLE)[-1].state() == (1, 1)


def test_vring_messages(backend, frontend):
    frontend.set_vring_num(0, 1024)
    frontend.set_vring_base(0, 7)
    frontend.set_vring_addr(0, desc=0x7F00_0000_1000, used=0x7F00_0000_5000,
                            avail=0x7F00_0000_4000)
    frontend.set_vring_enable(0, False)
    assert frontend.get_vring_base(0) == 0
    num, base, addr, enable, get = backend.wait_messages(5)
    assert backend.requests() == ["SET_VRING_NUM", "SET_VRING_BASE", "SET_VRING_ADDR",
                                  "SET_VRING_ENABLE", "GET_VRING_BASE"]
    assert num.state() == (0, 1024) and base.state() == (0, 7) and enable.state() == (0, 0)
    assert VRING_ADDR.unpack(addr.payload) == (0, 0, 0x7F00_0000_1000, 0x7F00_0000_5000,
                                               0x7F00_0000_4000, 0)
    assert get.state() == (0, 0)


def test_get_vring_base_returns_the_backends_index_and_checks_the_ring(backend, frontend):
    backend.vring_base = 0x1234
    assert frontend.get_vring_base(1) == 0x1234
    backend.raw_replies[Request.GET_VRING_BASE] = (
        HEADER.pack(Request.GET_VRING_BASE, 1 | FLAG_REPLY, 8) + VRING_STATE.pack(5, 0))
    with pytest.raises(VhostUserError, match="for ring 1 about ring 5"):
        frontend.get_vring_base(1)
    assert not frontend.connected                     # out of step: hung up


def test_kick_and_call_pass_the_eventfd_itself_or_the_nofd_flag(backend, frontend):
    kick = os.eventfd(0, os.EFD_NONBLOCK)
    call = os.eventfd(0, os.EFD_NONBLOCK)
    try:
        frontend.set_vring_call(1, call)
        frontend.set_vring_kick(1, kick)
        frontend.set_vring_call(0, None)
        got_call, got_kick, no_fd = backend.wait_messages(3)
        assert (got_call.request, got_call.u64()) == (Request.SET_VRING_CALL, 1)
        assert (got_kick.request, got_kick.u64()) == (Request.SET_VRING_KICK, 1)
        assert (no_fd.u64(), no_fd.fds) == (0 | VRING_NOFD, [])
        # The back-end holds the very same eventfds: its write is our read and vice versa.
        [backend_call], [backend_kick] = got_call.fds, got_kick.fds
        os.eventfd_write(backend_call, 3)
        assert os.eventfd_read(call) == 3
        os.eventfd_write(kick, 1)
        assert os.eventfd_read(backend_kick) == 1
    finally:
        os.close(kick)
        os.close(call)


# --- the memory table ----------------------------------------------------------------------
def regions_of(mem: GuestMemory) -> list[MemoryRegionInfo]:
    return [MemoryRegionInfo(r.gpa, r.size, r.host_addr, r.fd_offset, r.fd) for r in mem.regions]


def test_set_mem_table_describes_each_region_and_passes_its_memfd(backend, frontend):
    mem = GuestMemory.from_ranges([(0, 2 * MiB), (1 << 32, 4 * MiB)])
    try:
        mem.write(0x1000, b"low memory")
        mem.write((1 << 32) + 0x2000, b"high memory")
        regions = regions_of(mem)
        frontend.set_mem_table(regions)
        [m] = backend.wait_messages(1)
        assert m.request == Request.SET_MEM_TABLE
        assert MEM_TABLE_HEADER.unpack_from(m.payload) == (2, 0)
        assert len(m.payload) == MEM_TABLE_HEADER.size + 2 * MEM_REGION.size
        described = [MEM_REGION.unpack_from(m.payload, MEM_TABLE_HEADER.size + i * MEM_REGION.size)
                     for i in range(2)]
        assert described == [(0, 2 * MiB, mem.regions[0].host_addr, 0),
                             ((1 << 32), 4 * MiB, mem.regions[1].host_addr, 0)]
        assert [fd_identity(fd) for fd in m.fds] == [fd_identity(r.fd) for r in mem.regions]
        # What the back-end maps through the passed fd is the guest's memory, shared.
        with mmap.mmap(m.fds[1], 4 * MiB) as view:
            assert view[0x2000:0x2000 + 11] == b"high memory"
            view[0x3000:0x3005] = b"wrote"
        assert mem.read((1 << 32) + 0x3000, 5) == b"wrote"
    finally:
        mem.close()


def test_add_and_remove_one_region(backend, frontend):
    mem = GuestMemory.from_ranges([(1 << 32, 2 * MiB)])
    try:
        [region] = regions_of(mem)
        frontend.add_mem_reg(region)
        frontend.rem_mem_reg(region)
        add, rem = backend.wait_messages(2)
        assert add.request == Request.ADD_MEM_REG and rem.request == Request.REM_MEM_REG
        assert SINGLE_MEM_REGION.unpack(add.payload) == (0, 1 << 32, 2 * MiB, region.user_addr, 0)
        assert rem.payload == add.payload
        assert [fd_identity(fd) for fd in add.fds] == [fd_identity(region.fd)]
        assert rem.fds == []                        # "No file descriptors SHOULD be passed"
    finally:
        mem.close()


def test_a_memory_table_has_at_most_eight_regions(frontend):
    mem = GuestMemory.from_ranges([(i * 2 * MiB, MiB) for i in range(9)])
    try:
        with pytest.raises(VhostUserError, match="1 to 8 regions, not 9"):
            frontend.set_mem_table(regions_of(mem))
        with pytest.raises(VhostUserError, match="not 0"):
            frontend.set_mem_table([])
        assert frontend.connected                    # refused before anything was sent
    finally:
        mem.close()


# --- a back-end that goes wrong ----------------------------------------------------------------
def test_connecting_to_a_missing_socket_names_it(tmp_path):
    path = tmp_path / "virtiofsd.sock"
    with pytest.raises(VhostUserError, match=f"cannot connect to the vhost-user backend at "
                                             f"{path}: No such file or directory"):
        VhostUserFrontend.connect(str(path))
    path.write_text("not a socket")
    with pytest.raises(VhostUserError, match="Connection refused"):
        VhostUserFrontend.connect(str(path))


def test_connecting_to_a_listening_backend(tmp_path):
    path = tmp_path / "virtiofsd.sock"
    backend = FakeBackend(path)
    try:
        with VhostUserFrontend.connect(str(path)) as frontend:
            assert frontend.path == str(path) and frontend.fileno() >= 0
            assert frontend.get_features() == VIRTIOFSD_FEATURES
        assert frontend.fileno() == -1
        assert backend.wait_for(lambda b: b.eof)      # closing the front end hangs up
        assert backend.connections == 1
    finally:
        backend.close()


def test_a_backend_hanging_up_mid_request(backend, frontend):
    backend.hang_up_on = Request.GET_FEATURES
    with pytest.raises(VhostUserError, match="closed the connection .*reply to GET_FEATURES"):
        frontend.get_features()
    assert not frontend.connected
    with pytest.raises(VhostUserError, match="not connected"):
        frontend.set_owner()


def test_sending_to_a_backend_that_is_gone(backend, frontend):
    backend.hang_up_on = Request.SET_OWNER
    frontend.set_owner()
    assert backend.wait_for(lambda b: b.eof)
    backend.sock.close()                              # the process is gone: nobody reads
    with pytest.raises(VhostUserError, match="lost the vhost-user backend at fake-backend "
                                             "during SET_FEATURES"):
        for _ in range(100):                          # the first sends may still be buffered
            frontend.set_features(VERSION_1)
            time.sleep(0.01)


@pytest.mark.parametrize(("reply", "message"), [
    (HEADER.pack(Request.GET_FEATURES, 1, 8) + U64.pack(1), "not a version-1 reply"),
    (HEADER.pack(Request.GET_FEATURES, 2 | FLAG_REPLY, 8) + U64.pack(1), "not a version-1 reply"),
    (HEADER.pack(Request.GET_QUEUE_NUM, 1 | FLAG_REPLY, 8) + U64.pack(1),
     "with a reply to request 17"),
    (HEADER.pack(Request.GET_FEATURES, 1 | FLAG_REPLY, 4) + b"\0" * 4, "4 bytes instead of 8"),
    (HEADER.pack(Request.GET_FEATURES, 1 | FLAG_REPLY, 1 << 20), "announced a 1048576-byte reply"),
])
def test_nonsense_replies_are_protocol_errors(backend, frontend, reply, message):
    backend.raw_replies[Request.GET_FEATURES] = reply
    with pytest.raises(VhostUserError, match=message):
        frontend.get_features()
    assert not frontend.connected


def test_a_silent_backend_times_out(backend):
    backend.silent_on = Request.GET_FEATURES
    backend._client.settimeout(0.2)
    frontend = backend.frontend()
    with pytest.raises(VhostUserError, match="did not answer GET_FEATURES within 0.2 s"):
        frontend.get_features()
    assert not frontend.connected


def test_one_exchange_at_a_time_from_many_threads(backend, frontend):
    errors = []

    def ask():
        try:
            for _ in range(50):
                assert frontend.get_features() == VIRTIOFSD_FEATURES
                assert frontend.get_vring_base(3) == 0
        except Exception as e:  # noqa: BLE001
            errors.append(e)

    threads = [threading.Thread(target=ask) for _ in range(4)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert errors == []
    assert len(backend.messages) == 400


def test_no_descriptor_leaks(tmp_path):
    before = len(os.listdir("/proc/self/fd"))
    backend = FakeBackend(tmp_path / "s")
    with VhostUserFrontend.connect(str(tmp_path / "s")) as frontend:
        frontend.get_features()
    backend.close()
    with pytest.raises(VhostUserError):
        VhostUserFrontend.connect(str(Path(tmp_path) / "missing"))
    assert len(os.listdir("/proc/self/fd")) == before
    assert struct.calcsize("<QQQQ") == MEM_REGION.size


# --- the session state a connection carries, and connections kept across a VM rebuild -----------
def test_a_connection_remembers_its_owner_and_protocol_features(backend, frontend):
    assert (frontend.owned, frontend.protocol_features, frontend.reply_ack) == (False, None, False)
    frontend.set_owner()
    frontend.set_protocol_features(ProtocolFeature.MQ | ProtocolFeature.REPLY_ACK)
    assert frontend.owned and frontend.reply_ack
    assert frontend.protocol_features == ProtocolFeature.MQ | ProtocolFeature.REPLY_ACK


def test_parked_connections_are_taken_back_by_id_and_socket_or_hung_up(tmp_path):
    backends = [FakeBackend(tmp_path / f"b{i}.sock") for i in range(3)]
    connections = VhostUserConnections()
    try:
        kept, other, broken = (VhostUserFrontend.connect(b.path) for b in backends)
        connections.park("_fs0", backends[0].path, kept)
        connections.park("_fs1", backends[1].path, other)
        backends[2].hang_up_on = Request.GET_FEATURES
        with pytest.raises(VhostUserError):
            broken.get_features()
        connections.park("_fs2", backends[2].path, broken)       # broken: not kept
        connections.park("_fs3", "nowhere", None)                # nothing to keep
        gone = FakeBackend(tmp_path / "gone.sock")
        quiet = VhostUserFrontend.connect(gone.path)
        assert gone.wait_for(lambda b: b.connections == 1)
        gone.close()                                             # virtiofsd died meanwhile
        assert quiet.connected and quiet.hung_up()
        connections.park("_fs4", gone.path, quiet)               # not kept either
        assert not quiet.connected
        assert len(connections) == 2
        assert connections.take("_fs0", "elsewhere.sock") is None   # same id, another socket
        assert connections.take("_fs0", backends[0].path) is kept
        assert connections.take("_fs0", backends[0].path) is None   # taken once
        assert kept.connected and not kept.hung_up() and not backends[0].eof
        connections.close()                                      # what nobody took back
        assert backends[1].wait_for(lambda b: b.eof) and not other.connected
        assert len(connections) == 0
        connections.park("_fs0", backends[0].path, kept)
        again = VhostUserFrontend.connect(backends[1].path)       # nobody accepts it: fine
        connections.park("_fs0", backends[0].path, again)        # a second one replaces it
        assert not kept.connected and connections.take("_fs0", backends[0].path) is again
        again.close()
    finally:
        for b in backends:
            b.close()


# --- configuration space and in-flight tracking (vhost-user-blk) -----------------------------
def test_get_config_reads_the_asked_bytes(backend, frontend):
    backend.config = bytes(range(60))
    assert frontend.get_config(60) == bytes(range(60))
    assert frontend.get_config(8, offset=4) == bytes(range(4, 12))
    first, second = backend.of(Request.GET_CONFIG)
    assert CONFIG_HEADER.unpack_from(first.payload) == (0, 60, 0)
    assert len(first.payload) == CONFIG_HEADER.size + 60       # the space to fill rides along
    assert CONFIG_HEADER.unpack_from(second.payload) == (4, 8, 0)
    with pytest.raises(VhostUserError, match="cannot ask for 0 bytes"):
        frontend.get_config(0)


def test_a_short_or_misplaced_config_answer_breaks_the_connection(backend, frontend):
    # libvhost-user answers a GET_CONFIG it cannot serve with an empty payload
    backend.raw_replies[Request.GET_CONFIG] = HEADER.pack(Request.GET_CONFIG, 1 | FLAG_REPLY, 0)
    with pytest.raises(VhostUserError, match="answered GET_CONFIG with 0 bytes instead of 72"):
        frontend.get_config(60)
    assert not frontend.connected


def test_inflight_fd_comes_with_the_reply_and_goes_back(backend, frontend):
    fd, size, offset = frontend.get_inflight_fd(2, 128)
    try:
        assert (size, offset) == (2 * 2112, 0)       # libvhost-user's 64-byte aligned regions
        assert os.fstat(fd).st_size == size
        frontend.set_inflight_fd(fd, size, offset, 2, 128)
        (sent,) = backend.wait_for(lambda b: b.of(Request.SET_INFLIGHT_FD)) and \
            backend.of(Request.SET_INFLIGHT_FD)
        assert INFLIGHT.unpack_from(sent.payload) == (size, 0, 2, 128)
        assert fd_identity(sent.fds[0]) == fd_identity(fd)
    finally:
        os.close(fd)


def test_an_inflight_answer_without_a_descriptor_is_refused(backend, frontend):
    backend.raw_replies[Request.GET_INFLIGHT_FD] = (
        HEADER.pack(Request.GET_INFLIGHT_FD, 1 | FLAG_REPLY, INFLIGHT.size)
        + INFLIGHT.pack(4096, 0, 1, 128))
    with pytest.raises(VhostUserError, match="GET_INFLIGHT_FD with 20 bytes and 0 descriptors"):
        frontend.get_inflight_fd(1, 128)
