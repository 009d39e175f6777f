"""pych.migration.protocol: URLs, the framing of messages over a socket, fds by SCM_RIGHTS,
and every way a stream can be wrong (the peer's or the network's)."""

from __future__ import annotations

import os
import socket

import pytest

from pych.migration import protocol
from pych.migration.protocol import (GPA, HEADER, MAGIC, Channel, MigrationError, Msg,
                                     PeerRefused, parse_url)


@pytest.fixture
def pair():
    a, b = socket.socketpair(socket.AF_UNIX, socket.SOCK_STREAM)
    left, right = Channel(a, timeout=5), Channel(b, timeout=5)
    yield left, right
    left.close()
    right.close()


@pytest.mark.parametrize(("url", "parsed"), [
    ("unix:/run/m.sock", protocol.Endpoint("unix", path="/run/m.sock")),
    ("unix:///run/m.sock", protocol.Endpoint("unix", path="/run/m.sock")),
    ("tcp:127.0.0.1:6000", protocol.Endpoint("tcp", host="127.0.0.1", port=6000)),
    ("tcp:[::1]:6000", protocol.Endpoint("tcp", host="::1", port=6000)),
])
def test_urls(url, parsed):
    assert parse_url(url) == parsed


@pytest.mark.parametrize("url", ["file:///x", "unix:", "tcp:host", "tcp:h:0", "tcp:h:70000",
                                 "tcp::5", "/run/m.sock"])
def test_bad_urls_are_refused_with_the_url(url):
    with pytest.raises(MigrationError, match="URL|needs a socket path") as e:
        parse_url(url)
    assert url in str(e.value)


def test_control_messages_and_memory_round_trip(pair):
    left, right = pair
    left.send(Msg.HELLO, protocol.hello(local=False))
    kind, body, fds = right.receive()
    assert (kind, fds) == (Msg.HELLO, [])
    protocol.check_hello(body)
    assert body["local"] is False
    ram = bytearray(64 * 1024)
    left.send_memory(0x2000, b"\xab" * 8192)
    kind, length, fds = right.receive_header()
    assert kind is Msg.MEMORY
    n = right.receive_memory(length, lambda gpa, n: memoryview(ram)[gpa:gpa + n])
    assert n == 8192 and ram[0x2000:0x4000] == b"\xab" * 8192 and not any(ram[:0x2000])
    assert left.sent_bytes == 2 * HEADER.size + GPA.size + 8192 + len(
        __import__("json").dumps(protocol.hello(False), separators=(",", ":")))


def test_fds_travel_with_a_message_over_a_unix_socket(pair):
    left, right = pair
    r, w = os.pipe()
    try:
        left.send(Msg.CONFIG, {"shared": {"fds": {"zone:mem0": 0}}}, [w])
        kind, body, fds = right.receive()
        assert kind is Msg.CONFIG and body["shared"]["fds"] == {"zone:mem0": 0}
        assert len(fds) == 1 and fds[0] != w
        os.write(fds[0], b"x")                       # the same pipe, another descriptor
        assert os.read(r, 1) == b"x"
        os.close(fds[0])
    finally:
        os.close(r)
        os.close(w)


def test_fds_are_refused_over_tcp():
    server = socket.socket()
    server.bind(("127.0.0.1", 0))
    server.listen(1)
    client = Channel(socket.create_connection(server.getsockname()))
    try:
        with pytest.raises(MigrationError, match="only be passed over a unix: socket"):
            client.send(Msg.CONFIG, {}, [0])
    finally:
        client.close()
        server.close()


def test_an_error_answer_is_the_peers_refusal(pair):
    left, right = pair
    right.send(Msg.ERROR, {"error": "version 9 is not supported"})
    with pytest.raises(PeerRefused, match="version 9 is not supported"):
        left.request(Msg.HELLO, {})
    right.receive()                                   # the HELLO it was sent


def _raw(sock: socket.socket, data: bytes, close: bool = True) -> None:
    sock.sendall(data)
    if close:
        sock.shutdown(socket.SHUT_WR)


@pytest.mark.parametrize(("data", "words"), [
    (b"", "closed the connection between messages"),
    (HEADER.pack(MAGIC, Msg.HELLO, 10)[:7], "truncated"),
    (HEADER.pack(b"QEMU", Msg.HELLO, 2) + b"{}", "does not speak pych's migration protocol"),
    (HEADER.pack(MAGIC, 99, 2) + b"{}", "unknown migration message type 99"),
    (HEADER.pack(MAGIC, Msg.STATE, 1 << 40), "more than the"),
    (HEADER.pack(MAGIC, Msg.STATE, 100) + b'{"state":', "truncated"),
    (HEADER.pack(MAGIC, Msg.STATE, 3) + b"{{{", "not valid JSON"),
    (HEADER.pack(MAGIC, Msg.STATE, 2) + b"[]", "not a JSON object"),
    (HEADER.pack(MAGIC, Msg.MEMORY, 8) + GPA.pack(0), "MEMORY message where a control"),
])
def test_a_broken_stream_is_a_clear_error(pair, data, words):
    left, right = pair
    _raw(left.sock, data)
    with pytest.raises(MigrationError, match=words):
        right.receive()


def test_memory_cut_short_is_truncated_and_names_what_came(pair):
    left, right = pair
    _raw(left.sock, HEADER.pack(MAGIC, Msg.MEMORY, GPA.size + 8192) + GPA.pack(0) + bytes(100))
    kind, length, _ = right.receive_header()
    ram = bytearray(8192)
    with pytest.raises(MigrationError, match=r"truncated.*100 of 8192 bytes"):
        right.receive_memory(length, lambda gpa, n: memoryview(ram)[gpa:gpa + n])


def test_a_hello_of_another_version_is_refused_by_name():
    with pytest.raises(MigrationError, match="version 1 .*pych 9.9.*receives version 2"):
        protocol.check_hello({"format": protocol.FORMAT, "version": 1, "pych_version": "9.9"})
    with pytest.raises(MigrationError, match="does not speak"):
        protocol.check_hello({"format": "qemu"})


def test_listen_refuses_a_path_in_use(tmp_path):
    path = tmp_path / "m.sock"
    path.write_text("")
    with pytest.raises(MigrationError, match="cannot listen on unix:"):
        protocol.listen(parse_url(f"unix:{path}"))


def test_connect_to_nobody_names_the_endpoint(tmp_path):
    with pytest.raises(MigrationError, match=f"cannot connect to unix:{tmp_path}/none"):
        protocol.connect(parse_url(f"unix:{tmp_path}/none"))
