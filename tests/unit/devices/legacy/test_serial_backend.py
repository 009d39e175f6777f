"""The --serial backends, exercised through real fds, sockets and pseudo-terminals."""

import logging
import os
import socket
import termios
import threading
import time

import pytest

from pych.devices.legacy import serial_backend
from pych.devices.legacy.serial import IER, IER_RDI, LSR, LSR_DR, RBR, THR, Serial
from pych.devices.legacy.serial_backend import (
    HISTORY_SIZE, FileBackend, NullBackend, PtyBackend, SerialBackendError, SocketBackend,
    TtyBackend, _OutputBuffer, open_serial_backend,
)

from tests.support.fakes import RecordingIrq

TIMEOUT = 3.0


class FakeUart:
    """Stands in for Serial.enqueue_input and lets a test wait for input to arrive."""

    def __init__(self):
        self.received = bytearray()
        self._cond = threading.Condition()

    def enqueue_input(self, data):
        with self._cond:
            self.received += data
            self._cond.notify_all()

    def wait_for(self, expected):
        with self._cond:
            assert self._cond.wait_for(lambda: len(self.received) >= len(expected), TIMEOUT), \
                f"only got {bytes(self.received)!r}"
            return bytes(self.received)


def recv_exactly(sock, count):
    data = bytearray()
    while len(data) < count:
        chunk = sock.recv(count - len(data))
        assert chunk, f"EOF after {len(data)} of {count} bytes"
        data += chunk
    return bytes(data)


def read_exactly(fd, count):
    data = bytearray()
    deadline = time.monotonic() + TIMEOUT
    while len(data) < count:
        assert time.monotonic() < deadline, f"only got {bytes(data)!r}"
        try:
            data += os.read(fd, count - len(data))
        except BlockingIOError:
            time.sleep(0.005)
    return bytes(data)


def connect(path):
    client = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    client.settimeout(TIMEOUT)
    client.connect(str(path))
    return client


def wait_until(predicate):
    deadline = time.monotonic() + TIMEOUT
    while not predicate():
        assert time.monotonic() < deadline
        time.sleep(0.005)


# --- The output buffer ------------------------------------------------------------------------

def test_output_buffer_keeps_order_and_drops_oldest_past_its_limit():
    buf = _OutputBuffer(history=0, limit=64)
    buf.attach()
    for i in range(100):
        buf.append(bytes([i]))
    position, kept = buf.peek(1000)
    assert position == buf.dropped and buf.dropped + len(kept) == 100
    assert kept == bytes(range(buf.dropped, 100))       # newest kept, in order
    buf.consume(position + len(kept))
    assert buf.pending() == 0 and buf.peek(10) == (100, b"")


def test_output_buffer_overflow_while_the_reader_is_writing():
    buf = _OutputBuffer(history=0, limit=64)
    buf.attach()
    buf.append(bytes(range(10)))
    position, chunk = buf.peek(4)                       # the I/O thread takes 0..3 ...
    buf.append(bytes(range(10, 100)))                   # ... a vCPU overflows the buffer ...
    buf.consume(position + len(chunk))                  # ... and the write completes
    position, rest = buf.peek(1000)
    assert position == buf.dropped > 4
    assert rest == bytes(range(position, 100))


def test_output_buffer_history_for_late_readers():
    buf = _OutputBuffer(history=10, limit=64)
    for i in range(50):                                 # no reader: only the history stays
        buf.append(bytes([i]))
    buf.attach(replay=10)
    assert buf.peek(100) == (40, bytes(range(40, 50))) and buf.dropped == 0
    buf.consume(44)
    buf.detach()
    buf.attach(replay=10)                               # a new reader replays it again
    assert buf.peek(100) == (40, bytes(range(40, 50)))


# --- null and file ----------------------------------------------------------------------------

def test_null_backend():
    with open_serial_backend("Null") as backend:        # SerialConfig.mode spelling
        assert isinstance(backend, NullBackend)
        out = backend.start(FakeUart())
        out(b"gone")


def test_file_backend_appends_everything_in_order(tmp_path):
    path = tmp_path / "serial.log"
    path.write_bytes(b"previous run\n")
    backend = open_serial_backend("file", str(path))
    assert isinstance(backend, FileBackend)
    backend.write(b"before start\n")
    uart = Serial(RecordingIrq(), backend.write)
    backend.start(uart)
    for byte in b"Linux version 6.1\r\n":
        uart.write(THR, 1, byte)
    backend.close()
    assert path.read_bytes() == b"previous run\nbefore start\nLinux version 6.1\r\n"
    backend.close()                                     # idempotent


def test_file_backend_without_start_still_writes_on_close(tmp_path):
    path = tmp_path / "serial.log"
    backend = FileBackend(str(path))
    backend.write(b"early")
    backend.close()
    assert path.read_bytes() == b"early"


# --- socket -----------------------------------------------------------------------------------

def test_socket_replays_history_then_streams_and_forwards_input(tmp_path):
    path = tmp_path / "serial.sock"
    uart = FakeUart()
    backend = open_serial_backend("socket", str(path))
    assert isinstance(backend, SocketBackend)
    try:
        backend.start(uart)
        backend.write(b"boot messages\r\n")             # nobody connected yet
        with connect(path) as client:
            assert recv_exactly(client, 15) == b"boot messages\r\n"
            backend.write(b"login: ")
            assert recv_exactly(client, 7) == b"login: "
            client.sendall(b"root\n")
            assert uart.wait_for(b"root\n") == b"root\n"
    finally:
        backend.close()
    assert not path.exists()


def test_socket_reconnect_and_replacement(tmp_path):
    path = tmp_path / "serial.sock"
    uart = FakeUart()
    backend = SocketBackend(str(path))
    try:
        backend.start(uart)
        with connect(path) as first:
            backend.write(b"one ")
            assert recv_exactly(first, 4) == b"one "
        backend.write(b"two ")                          # written while nobody listens
        second = connect(path)
        assert recv_exactly(second, 8) == b"one two "   # a new client gets the history
        second.sendall(b"a")
        uart.wait_for(b"a")
        with connect(path) as third:                    # replaces the second client
            assert recv_exactly(third, 8) == b"one two "
            assert second.recv(100) == b""
            second.close()
            third.sendall(b"b")
            assert uart.wait_for(b"ab") == b"ab"
            backend.write(b"three")
            assert recv_exactly(third, 5) == b"three"
    finally:
        backend.close()


def test_socket_client_that_stops_reading_never_blocks_the_guest(tmp_path, caplog):
    """A client connects and never reads: the guest's output (the UART's writes) goes on
    at once, the oldest beyond the backlog limit is dropped and logged, and a new client
    replaces the stalled one and gets the live output."""
    caplog.set_level(logging.WARNING, logger="pych.devices.legacy.serial_backend")
    path = tmp_path / "serial.sock"
    backend = SocketBackend(str(path))
    try:
        backend.start(FakeUart())
        stalled = connect(path)
        backend.write(b"hello")
        assert recv_exactly(stalled, 5) == b"hello"      # attached; it reads no more
        chunk = b"x" * 4095 + b"\n"
        start = time.monotonic()
        for _ in range(1024):                           # 4 MiB, 4x the backlog limit
            backend.write(chunk)
        assert time.monotonic() - start < TIMEOUT
        with connect(path) as fresh:
            backend.write(b"live")
            data = b""
            while not data.endswith(b"live"):
                data += fresh.recv(65536)
        stalled.close()
        assert "output reader fell behind" in caplog.text
    finally:
        backend.close()


def test_socket_history_is_the_last_64k(tmp_path):
    path = tmp_path / "serial.sock"
    backend = SocketBackend(str(path))
    try:
        backend.start(FakeUart())
        output = bytes(i % 251 for i in range(3 * HISTORY_SIZE))
        for i in range(0, len(output), 1000):
            backend.write(output[i:i + 1000])
        with connect(path) as client:
            assert recv_exactly(client, HISTORY_SIZE) == output[-HISTORY_SIZE:]
            client.settimeout(0.05)
            with pytest.raises(TimeoutError):
                client.recv(1)
    finally:
        backend.close()


def test_socket_file_rules(tmp_path):
    path = tmp_path / "serial.sock"
    stale = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    stale.bind(str(path))
    stale.close()                                       # a socket file nothing listens on
    backend = SocketBackend(str(path))
    try:
        with pytest.raises(SerialBackendError):         # a live one is not taken over
            open_serial_backend("socket", str(path))
        assert path.exists()
    finally:
        backend.close()
    assert not path.exists()
    with pytest.raises(SerialBackendError):
        open_serial_backend("socket", str(tmp_path / "missing-dir" / "s.sock"))


# --- pty --------------------------------------------------------------------------------------

def test_pty_forwards_both_ways():
    uart = FakeUart()
    backend = open_serial_backend("pty")
    assert isinstance(backend, PtyBackend) and backend.path.startswith("/dev/pts/")
    try:
        backend.write(b"before anyone opened it\r\n")
        backend.start(uart)
        fd = os.open(backend.path, os.O_RDWR | os.O_NOCTTY | os.O_NONBLOCK)
        try:
            assert read_exactly(fd, 25) == b"before anyone opened it\r\n"
            backend.write(b"\x00\xff\r\n")             # raw: bytes pass untouched
            assert read_exactly(fd, 4) == b"\x00\xff\r\n"
            os.write(fd, b"\x03ls\n")
            assert uart.wait_for(b"\x03ls\n") == b"\x03ls\n"
        finally:
            os.close(fd)
        fd = os.open(backend.path, os.O_RDWR | os.O_NOCTTY | os.O_NONBLOCK)   # reopen
        try:
            os.write(fd, b"x")
            assert uart.wait_for(b"\x03ls\nx").endswith(b"x")
        finally:
            os.close(fd)
    finally:
        backend.close()


# --- tty --------------------------------------------------------------------------------------

def test_tty_raw_input_from_a_terminal_and_restores_it(tmp_path):
    master, terminal = os.openpty()                     # the terminal pych runs in
    out_r, out_w = os.pipe()
    before = termios.tcgetattr(terminal)
    uart = FakeUart()
    backend = TtyBackend(stdin_fd=terminal, stdout_fd=out_w)
    try:
        backend.start(uart)
        raw = termios.tcgetattr(terminal)
        assert not raw[3] & (termios.ICANON | termios.ECHO | termios.ISIG)
        assert raw[1] == before[1]                      # output processing untouched
        os.write(master, b"\x03q")                      # Ctrl-C goes to the guest, unbuffered
        assert uart.wait_for(b"\x03q") == b"\x03q"
        backend.write(b"guest says hi\r\n")
        assert read_exactly(out_r, 15) == b"guest says hi\r\n"
    finally:
        backend.close()
        assert termios.tcgetattr(terminal) == before
        for fd in (master, terminal, out_r, out_w):
            os.close(fd)


def test_tty_does_not_read_stdin_that_is_not_a_terminal():
    in_r, in_w = os.pipe()
    out_r, out_w = os.pipe()
    uart = FakeUart()
    backend = TtyBackend(stdin_fd=in_r, stdout_fd=out_w)
    try:
        backend.start(uart)
        os.write(in_w, b"ignored")
        backend.write(b"out")
        assert read_exactly(out_r, 3) == b"out"
        assert uart.received == b""
        assert os.read(in_r, 100) == b"ignored"         # still unread
    finally:
        backend.close()
        for fd in (in_r, in_w, out_r, out_w):
            os.close(fd)


# --- the factory, and a UART end to end -------------------------------------------------------

def test_factory_rejects_bad_modes(tmp_path):
    with pytest.raises(ValueError):
        open_serial_backend("off")
    with pytest.raises(ValueError):
        open_serial_backend("file")
    with pytest.raises(ValueError):
        open_serial_backend("telnet")
    with pytest.raises(SerialBackendError):
        open_serial_backend("file", str(tmp_path / "no" / "such" / "dir"))


def test_uart_over_a_socket_end_to_end(tmp_path):
    path = tmp_path / "serial.sock"
    irq = RecordingIrq()
    backend = open_serial_backend("socket", str(path))
    uart = Serial(irq, backend.write)
    backend.start(uart)
    try:
        uart.write(IER, 1, IER_RDI)
        for byte in b"# ":
            uart.write(THR, 1, byte)
        with connect(path) as client:
            assert recv_exactly(client, 2) == b"# "
            client.sendall(b"uname\n")
            wait_until(lambda: irq.level)
            typed = bytearray()
            while len(typed) < 6:
                if uart.read(LSR, 1) & LSR_DR:
                    typed.append(uart.read(RBR, 1))
            assert typed == b"uname\n"
    finally:
        backend.close()


def test_close_stops_the_io_thread(tmp_path):
    before = {t.name for t in threading.enumerate()}
    backend = serial_backend.SocketBackend(str(tmp_path / "s.sock"))
    backend.start(FakeUart())
    assert "serial-socket" in {t.name for t in threading.enumerate()} - before
    backend.close()
    assert "serial-socket" not in {t.name for t in threading.enumerate()} - before
    backend.write(b"after close is dropped")
