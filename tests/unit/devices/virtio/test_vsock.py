"""virtio-vsock's hybrid host side: Unix sockets on one end, vsock packets on the other."""

import socket
import struct

import pytest

from pych.devices.virtio.vsock import (FIRST_HOST_PORT, HEADER_SIZE, RXQ, TXQ, Op, VirtioVsock,
                                       VsockError)

from tests.support.virtio import DeviceHarness

HEADER = struct.Struct("<QQIIIHHIII")
GUEST_CID = 3


class Guest:
    """The driver side: posts rx buffers, sends packets, reads what the device sent."""

    def __init__(self, h):
        self.h = h
        self.rx = h.queue(RXQ)
        self.buffers = {}
        for _ in range(8):
            self.post()
        h.kick(RXQ)

    def post(self):
        head = self.rx.add_chain(writable=[HEADER_SIZE + 4096])
        self.buffers[head] = self.rx.writable_buffers(head)

    def receive(self, count=1):
        """The next ``count`` packets as (fields dict, payload); each buffer is re-posted."""
        packets = []
        for head, length in self.h.wait_used(RXQ, count):
            data = self.rx.read_writable(self.buffers.pop(head))[:length]
            f = dict(zip(("src_cid", "dst_cid", "src_port", "dst_port", "len", "type", "op",
                          "flags", "buf_alloc", "fwd_cnt"), HEADER.unpack(data[:HEADER_SIZE])))
            assert f["len"] == length - HEADER_SIZE
            packets.append((f, data[HEADER_SIZE:]))
            self.post()
        self.h.kick(RXQ)
        return packets

    def send(self, op, guest_port, host_port, payload=b"", flags=0, buf_alloc=65536, fwd_cnt=0):
        header = HEADER.pack(GUEST_CID, 2, guest_port, host_port, len(payload), 1, op, flags,
                             buf_alloc, fwd_cnt)
        head = self.h.queue(TXQ).add_chain([header, payload] if payload else [header])
        self.h.kick(TXQ)
        assert self.h.wait_used(TXQ) == [(head, 0)]


@pytest.fixture
def vsock(tmp_path):
    path = str(tmp_path / "vsock.sock")
    with DeviceHarness(VirtioVsock(GUEST_CID, path), queue_size=32) as h:
        yield path, Guest(h)


def recv_exactly(sock, n):
    data = b""
    while len(data) < n:
        chunk = sock.recv(n - len(data))
        assert chunk, f"EOF after {data!r}"
        data += chunk
    return data


def test_config_space_holds_the_cid(tmp_path):
    device = VirtioVsock(7, tmp_path / "v.sock")
    assert device.config_bytes() == struct.pack("<Q", 7)
    device.shutdown()
    assert not (tmp_path / "v.sock").exists()


def test_host_initiated_stream(vsock):
    path, guest = vsock
    client = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    client.settimeout(5)
    client.connect(path)
    client.sendall(b"CONNECT 1234\n")
    (request, _), = guest.receive()
    assert (request["op"], request["src_cid"], request["dst_cid"], request["dst_port"]) == \
        (Op.REQUEST, 2, GUEST_CID, 1234)
    host_port = request["src_port"]
    assert host_port == FIRST_HOST_PORT
    guest.send(Op.RESPONSE, 1234, host_port)
    assert client.recv(64) == f"OK {host_port}\n".encode()

    client.sendall(b"to the guest")
    (rw, payload), = guest.receive()
    assert (rw["op"], payload) == (Op.RW, b"to the guest")
    guest.send(Op.RW, 1234, host_port, b"to the host")
    assert recv_exactly(client, 11) == b"to the host"

    client.close()                                   # host EOF -> SHUTDOWN, guest RSTs
    (shutdown, _), = guest.receive()
    assert (shutdown["op"], shutdown["flags"]) == (Op.SHUTDOWN, 3)
    guest.send(Op.RST, 1234, host_port)
    assert guest.h.device._streams == {}


def test_a_refused_host_connection_is_closed(vsock):
    path, guest = vsock
    client = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    client.settimeout(5)
    client.connect(path)
    client.sendall(b"CONNECT 99\n")
    (request, _), = guest.receive()
    guest.send(Op.RST, 99, request["src_port"])
    assert client.recv(64) == b""


def test_guest_initiated_stream_and_guest_credit(vsock):
    path, guest = vsock
    listener = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    listener.bind(f"{path}_5678")
    listener.listen(1)
    listener.settimeout(5)
    guest.send(Op.REQUEST, 40000, 5678, buf_alloc=4)          # the guest can take 4 bytes
    (response, _), = guest.receive()
    assert (response["op"], response["src_port"], response["dst_port"]) == (Op.RESPONSE, 5678, 40000)
    conn, _ = listener.accept()
    conn.settimeout(5)
    guest.send(Op.RW, 40000, 5678, b"hello host", buf_alloc=4)
    assert recv_exactly(conn, 10) == b"hello host"

    conn.sendall(b"0123456789")
    (rw, payload), = guest.receive()
    assert payload == b"0123"                                   # no more than its credit
    guest.send(Op.CREDIT_UPDATE, 40000, 5678, buf_alloc=4, fwd_cnt=4)
    (rw, payload), = guest.receive()
    assert payload == b"4567"

    guest.send(Op.SHUTDOWN, 40000, 5678, flags=3, buf_alloc=4, fwd_cnt=8)
    packets = guest.receive()
    assert packets[0][0]["op"] == Op.RST
    with pytest.raises(ConnectionResetError):                  # closed, "89" unread
        conn.recv(64)
    listener.close()


def test_guest_connection_without_a_host_listener_is_reset(vsock):
    _, guest = vsock
    guest.send(Op.REQUEST, 40001, 4321)
    (reset, _), = guest.receive()
    assert (reset["op"], reset["src_port"], reset["dst_port"]) == (Op.RST, 4321, 40001)


def test_packets_for_unknown_streams_are_reset(vsock):
    _, guest = vsock
    guest.send(Op.RW, 40002, 1111, b"stray")
    (reset, _), = guest.receive()
    assert reset["op"] == Op.RST


def test_a_live_socket_path_is_refused(tmp_path):
    path = tmp_path / "v.sock"
    first = VirtioVsock(3, path)
    with pytest.raises(VsockError, match="v.sock"):
        VirtioVsock(3, path)
    first.shutdown()
    with pytest.raises(VsockError, match="reserved"):
        VirtioVsock(2, tmp_path / "w.sock")


def test_a_host_half_close_still_lets_the_guest_answer(vsock):
    path, guest = vsock
    client = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    client.settimeout(5)
    client.connect(path)
    client.sendall(b"CONNECT 1234\n")
    (request, _), = guest.receive()
    host_port = request["src_port"]
    guest.send(Op.RESPONSE, 1234, host_port)
    assert client.recv(64) == f"OK {host_port}\n".encode()
    client.shutdown(socket.SHUT_WR)                  # the host sends no more, still reads
    (shutdown, _), = guest.receive()
    assert (shutdown["op"], shutdown["flags"]) == (Op.SHUTDOWN, 2)
    guest.send(Op.RW, 1234, host_port, b"pong")
    guest.send(Op.SHUTDOWN, 1234, host_port, flags=3)
    assert recv_exactly(client, 4) == b"pong"
    assert client.recv(64) == b""
    (reset, _), = guest.receive()
    assert reset["op"] == Op.RST


def test_a_guest_that_posts_no_rx_buffers_cannot_grow_the_control_queue(tmp_path):
    """Every packet for an unknown stream queues a RST for the guest's rx queue; a guest
    that never posts rx buffers gets at most MAX_CONTROL of them queued, the rest dropped
    and counted."""
    from pych.devices.virtio.vsock import MAX_CONTROL

    with DeviceHarness(VirtioVsock(GUEST_CID, str(tmp_path / "v.sock")), queue_size=32) as h:
        device = h.device
        for i in range(MAX_CONTROL + 100):
            device._push_control((1111, 40000 + i % 1000, Op.RST, 0, None))
        assert len(device._control) == MAX_CONTROL
        assert device.dropped_control == 100
        header = HEADER.pack(GUEST_CID, 99, 40001, 1111, 0, 1, Op.RW, 0, 0, 0)   # wrong cid
        for _ in range(20):
            head = h.queue(TXQ).add_chain([header])
            h.kick(TXQ)
            assert h.wait_used(TXQ) == [(head, 0)]
        assert len(device._control) == MAX_CONTROL and device.dropped_control == 120
