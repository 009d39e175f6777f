"""Host ends of the serial port: what ``--serial`` connects the guest's COM1 to.

===============  =========================================================================
``off``          No UART at all: the caller creates neither the device nor a backend.
``null``         Output dropped, no input (the default, as in Cloud Hypervisor).
``tty``          Output to pych's stdout.  Input from stdin only when stdin is a terminal;
                 that terminal is put in raw input mode (no echo, no line editing, no
                 signal keys: Ctrl-C goes to the guest) and restored on close or at exit.
                 Output post-processing stays on, so pych's own log lines stay readable.
``pty``          A new pseudo-terminal pair.  The slave path is logged and kept in
                 :attr:`SerialBackend.path` (for ``vm.info``); whatever opens it talks to
                 the guest.  pych holds the slave open itself, so clients may come and go.
``file=PATH``    Output appended to PATH (created 0644 if missing); no input.
``socket=PATH``  A listening Unix stream socket at PATH, see below.
===============  =========================================================================

**Socket mode.**  One client at a time: a new connection replaces the current one, as in
Cloud Hypervisor.  A client that connects first receives the last :data:`HISTORY_SIZE`
(64 KiB) bytes of output, then the live stream, so a test that connects after boot still
sees the boot messages; bytes it sends go to the guest.  End-of-file from the client ends
its session; connect again to resume.  A stale socket file left by a dead pych is
replaced; a live one is an error.  :meth:`close` removes the socket file.

Lifecycle::

    backend = open_serial_backend("socket", "/run/vm/serial.sock")
    uart = Serial(irq, backend.write)
    backend.start(uart)     # input now flows to uart.enqueue_input
    ...
    backend.close()         # drains output (for up to a second), frees fds, threads, tty mode

**Threading.**  The UART calls :meth:`SerialBackend.write` from vCPU threads, a byte at a
time, holding its own lock, so ``write`` never touches a file descriptor: it appends to an
in-memory buffer and, if the I/O thread may be asleep, pokes an eventfd.  Each backend
that does I/O has one daemon thread that owns all of its descriptors.  It sleeps in
``poll()`` (a blocking system call, so the GIL is free meanwhile), writes buffered output
as the sink becomes writable, and hands input to ``uart.enqueue_input``.  No vCPU ever
waits for a slow or absent reader.  The one blocking write is to stdout in ``tty`` mode,
which is not ours to make non-blocking; a stalled stdout holds up only the I/O thread.

Output is never reordered.  Bytes are lost only if a reader falls more than
:data:`BACKLOG_LIMIT` bytes behind: the oldest are dropped and a warning is logged,
which is the price of never stalling the guest.
"""

from __future__ import annotations

import atexit
import logging
import os
import select
import socket
import termios
import threading
import time
import tty
from collections.abc import Callable, Iterable
from typing import Protocol

from pych.threads import NamedThread
from pych.unix_socket import listen_unix

log = logging.getLogger(__name__)

HISTORY_SIZE = 64 * 1024        # output replayed to a newly connected socket client
BACKLOG_LIMIT = 1024 * 1024     # output held for a reader that is not keeping up
CLOSE_DRAIN_SECONDS = 1.0       # how long close() keeps writing out buffered output
_IO_CHUNK = 4096


class InputSink(Protocol):
    """Where a backend delivers host input: the UART."""

    def enqueue_input(self, data: bytes) -> None: ...


class SerialBackendError(Exception):
    """A backend could not be opened (bad path, socket in use, no pty...)."""


class SerialBackend:
    """The host end of the serial port.

    :meth:`write` is the UART's output sink and may be handed out before :meth:`start`;
    :meth:`start` begins feeding input to the UART and returns the output sink again.
    """

    mode: str
    path: str | None = None     # pty: the slave device; file, socket: the given path

    def write(self, data: bytes) -> None:
        raise NotImplementedError

    def start(self, uart: InputSink) -> Callable[[bytes], None]:
        return self.write

    def close(self) -> None:
        pass

    def __enter__(self) -> SerialBackend:
        return self

    def __exit__(self, *exc_info) -> None:
        self.close()


class NullBackend(SerialBackend):
    """``--serial null``: output vanishes, input never comes."""

    mode = "null"

    def write(self, data: bytes) -> None:
        pass


class _OutputBuffer:
    """Output in stream order, as the window [start, end) of absolute stream offsets.

    One reader at a time drains it through a cursor.  Bytes stay while the reader still
    needs them or while they are among the last ``history``; past ``limit`` the oldest
    go regardless, and the bytes skipped under the cursor are counted in ``dropped``.
    Not thread-safe: the backend's lock guards it.
    """

    def __init__(self, history: int, limit: int):
        assert 2 * history < limit
        self._buf = bytearray()
        self._start = 0
        self._cursor: int | None = None
        self._history = history
        self._limit = limit
        self.dropped = 0

    @property
    def end(self) -> int:
        return self._start + len(self._buf)

    @property
    def has_reader(self) -> bool:
        return self._cursor is not None

    def append(self, data: bytes) -> None:
        self._buf += data
        self._trim()

    def attach(self, replay: int = 0) -> None:
        """Start a reader at the last ``replay`` bytes still held."""
        self._cursor = max(self._start, self.end - replay)

    def detach(self) -> None:
        self._cursor = None
        self._trim()

    def pending(self) -> int:
        return 0 if self._cursor is None else self.end - self._cursor

    def peek(self, size: int) -> tuple[int, bytes]:
        """Up to ``size`` bytes for the reader, and the stream offset they start at."""
        if self._cursor is None:
            return self.end, b""
        i = self._cursor - self._start
        return self._cursor, bytes(self._buf[i:i + size])

    def consume(self, upto: int) -> None:
        """The reader is done with the stream up to offset ``upto``.

        The cursor never moves back: if an overflow pushed it past ``upto`` while the
        reader was busy writing, it stays where the overflow put it.
        """
        assert self._cursor is not None and upto <= self.end
        self._cursor = max(self._cursor, upto)
        self._trim()

    def _trim(self) -> None:
        keep = self.end - self._history
        if self._cursor is not None:
            keep = min(keep, self._cursor)
        overflowing = len(self._buf) > self._limit
        if overflowing:
            floor = self.end - self._limit // 2
            if self._cursor is not None and self._cursor < floor:
                self.dropped += floor - self._cursor
                self._cursor = floor
            keep = max(keep, floor)
        count = keep - self._start
        # Move memory only when that at least halves the buffer, so appends stay O(1).
        if count > 0 and (overflowing or 2 * count >= len(self._buf)):
            del self._buf[:count]
            self._start = keep


class _IoThreadBackend(SerialBackend):
    """A backend whose descriptors are all owned by one I/O thread (see the module doc).

    Subclasses say which descriptors to wait on (:meth:`_interest`), handle what
    ``poll()`` reports (:meth:`_handle`), name the descriptor output goes to
    (:meth:`_output_fd`, :meth:`_send`), and free their resources in :meth:`_release`.
    """

    def __init__(self, *, history: int = 0, reader: bool = True):
        self._lock = threading.Lock()       # guards _output, _wake_posted, _closed
        self._output = _OutputBuffer(history, BACKLOG_LIMIT)
        if reader:
            self._output.attach()
        self._wake = os.eventfd(0, os.EFD_CLOEXEC | os.EFD_NONBLOCK)
        self._wake_posted = False
        self._closed = False
        self._dropped_reported = 0
        self._uart: InputSink | None = None
        self._thread: threading.Thread | None = None

    # --- Public API --------------------------------------------------------------------------

    def write(self, data: bytes) -> None:
        with self._lock:
            if self._closed:
                return
            self._output.append(data)
            if self._output.has_reader and not self._wake_posted:
                self._wake_posted = True
                os.eventfd_write(self._wake, 1)     # never blocks: the counter is nowhere near full

    def start(self, uart: InputSink) -> Callable[[bytes], None]:
        with self._lock:
            if self._thread is not None or self._closed:
                raise RuntimeError(f"serial {self.mode} backend already started or closed")
            self._uart = uart
            self._thread = NamedThread(target=self._run, name=f"serial-{self.mode}",
                                       daemon=True)
        self._thread.start()
        return self.write

    def close(self) -> None:
        with self._lock:
            if self._closed:
                return
            self._closed = True
            os.eventfd_write(self._wake, 1)
        thread = self._thread
        if thread is None:
            self._drain_output()
        else:
            thread.join(CLOSE_DRAIN_SECONDS + 1.0)
            if thread.is_alive():
                # Stuck writing to a stdout nobody reads.  Leave it every fd it might
                # still touch rather than let it scribble on a reused descriptor number.
                log.warning("serial %s: I/O thread did not stop; leaving it behind", self.mode)
                return
        self._release()
        os.close(self._wake)

    # --- Subclass hooks ----------------------------------------------------------------------

    def _interest(self) -> dict[int, int]:
        raise NotImplementedError

    def _handle(self, events: list[tuple[int, int]]) -> None:
        raise NotImplementedError

    def _output_fd(self) -> int | None:
        raise NotImplementedError

    def _send(self, chunk: bytes) -> int:
        fd = self._output_fd()
        assert fd is not None
        return os.write(fd, chunk)

    def _on_output_error(self, error: OSError) -> None:
        raise NotImplementedError

    def _release(self) -> None:
        pass

    # --- The I/O thread ----------------------------------------------------------------------

    def _run(self) -> None:
        try:
            while True:
                poller = select.poll()
                poller.register(self._wake, select.POLLIN)
                for fd, mask in self._interest().items():
                    poller.register(fd, mask)
                events = poller.poll()
                if any(fd == self._wake for fd, _ in events):
                    self._consume_wake()
                self._handle([(fd, ev) for fd, ev in events if fd != self._wake])
                with self._lock:
                    if self._closed:
                        break
            self._drain_output()
        except Exception:
            log.exception("serial %s: I/O thread failed; the serial port is now disconnected",
                          self.mode)

    def _consume_wake(self) -> None:
        with self._lock:
            self._wake_posted = False
            try:
                os.eventfd_read(self._wake)
            except BlockingIOError:
                pass

    def _output_pending(self) -> bool:
        with self._lock:
            return self._output.pending() > 0

    def _flush_output(self) -> None:
        """Write as much buffered output as the sink takes without blocking."""
        while True:
            with self._lock:
                position, chunk = self._output.peek(_IO_CHUNK)
                dropped = self._output.dropped
            if dropped != self._dropped_reported:
                log.warning("serial %s: output reader fell behind; %d bytes dropped",
                            self.mode, dropped - self._dropped_reported)
                self._dropped_reported = dropped
            if not chunk:
                return
            try:
                sent = self._send(chunk)
            except BlockingIOError:
                return
            except OSError as e:
                self._on_output_error(e)
                return
            with self._lock:
                self._output.consume(position + sent)
            if sent < len(chunk):
                return

    def _drain_output(self) -> None:
        """Write out what is buffered, waiting up to CLOSE_DRAIN_SECONDS for the reader."""
        deadline = time.monotonic() + CLOSE_DRAIN_SECONDS
        while self._output_pending():
            fd = self._output_fd()
            remaining = deadline - time.monotonic()
            if fd is None or remaining <= 0:
                return
            poller = select.poll()
            poller.register(fd, select.POLLOUT)
            if not poller.poll(remaining * 1000):
                return
            self._flush_output()

    def _deliver_input(self, data: bytes) -> None:
        assert self._uart is not None
        self._uart.enqueue_input(data)


class _FdBackend(_IoThreadBackend):
    """Output to one descriptor, input (optionally) from another, or from the same one."""

    def __init__(self, *, in_fd: int | None, out_fd: int, owned: Iterable[int]):
        super().__init__()
        self._in_fd = in_fd
        self._out_fd: int | None = out_fd
        self._owned = tuple(owned)

    def _interest(self) -> dict[int, int]:
        interest: dict[int, int] = {}
        if self._in_fd is not None:
            interest[self._in_fd] = select.POLLIN
        if self._out_fd is not None and self._output_pending():
            interest[self._out_fd] = interest.get(self._out_fd, 0) | select.POLLOUT
        return interest

    def _handle(self, events: list[tuple[int, int]]) -> None:
        for fd, revents in events:
            if fd == self._in_fd and revents & (select.POLLIN | select.POLLHUP | select.POLLERR):
                self._read_input()
            if fd == self._out_fd and revents & (select.POLLOUT | select.POLLHUP | select.POLLERR):
                self._flush_output()

    def _read_input(self) -> None:
        assert self._in_fd is not None
        try:
            data = os.read(self._in_fd, _IO_CHUNK)
        except BlockingIOError:
            return
        except OSError as e:
            log.warning("serial %s: input failed (%s); no more input", self.mode, e)
            data = b""
        if not data:
            log.debug("serial %s: end of input", self.mode)
            self._in_fd = None
            return
        self._deliver_input(data)

    def _output_fd(self) -> int | None:
        return self._out_fd

    def _on_output_error(self, error: OSError) -> None:
        log.warning("serial %s: output failed (%s); discarding further output", self.mode, error)
        self._out_fd = None
        with self._lock:
            self._output.detach()

    def _release(self) -> None:
        for fd in self._owned:
            os.close(fd)
        self._owned = ()


class TtyBackend(_FdBackend):
    """``--serial tty``: stdout, and stdin when it is a terminal."""

    mode = "tty"

    def __init__(self, stdin_fd: int = 0, stdout_fd: int = 1):
        self._terminal = stdin_fd if os.isatty(stdin_fd) else None
        super().__init__(in_fd=self._terminal, out_fd=stdout_fd, owned=())
        self._saved_mode: list | None = None

    def start(self, uart: InputSink) -> Callable[[bytes], None]:
        if self._terminal is not None:
            self._saved_mode = termios.tcgetattr(self._terminal)
            atexit.register(self._restore_terminal)
            termios.tcsetattr(self._terminal, termios.TCSANOW, _raw_input_mode(self._saved_mode))
        return super().start(uart)

    def close(self) -> None:
        try:
            super().close()
        finally:
            self._restore_terminal()

    def _restore_terminal(self) -> None:
        if self._saved_mode is None:
            return
        atexit.unregister(self._restore_terminal)
        try:
            termios.tcsetattr(self._terminal, termios.TCSADRAIN, self._saved_mode)
        except termios.error as e:
            log.warning("serial tty: cannot restore the terminal mode: %s", e)
        self._saved_mode = None


def _raw_input_mode(mode: list) -> list:
    """``mode`` with input made raw (cfmakeraw's input, local and control flags).

    The output flags are untouched: post-processing stays on, as QEMU's stdio does, so
    lines that pych itself logs to the same terminal still start at column 0.
    """
    iflag, oflag, cflag, lflag, ispeed, ospeed, cc = mode
    iflag &= ~(termios.IGNBRK | termios.BRKINT | termios.PARMRK | termios.ISTRIP
               | termios.INLCR | termios.IGNCR | termios.ICRNL | termios.IXON)
    lflag &= ~(termios.ECHO | termios.ECHONL | termios.ICANON | termios.ISIG | termios.IEXTEN)
    cflag = (cflag & ~(termios.CSIZE | termios.PARENB)) | termios.CS8
    cc = list(cc)
    cc[termios.VMIN] = 1
    cc[termios.VTIME] = 0
    return [iflag, oflag, cflag, lflag, ispeed, ospeed, cc]


class PtyBackend(_FdBackend):
    """``--serial pty``: a fresh pseudo-terminal; :attr:`path` is the slave to open."""

    mode = "pty"

    def __init__(self):
        master, slave = os.openpty()
        try:
            tty.setraw(slave)           # bytes pass untouched, and guest output is not echoed back
            os.set_blocking(master, False)
            path = os.ttyname(slave)
        except BaseException:
            os.close(master)
            os.close(slave)
            raise
        # Holding the slave open means the master never reports a hangup between clients.
        super().__init__(in_fd=master, out_fd=master, owned=(master, slave))
        self.path = path
        log.info("serial: pty at %s", path)


class FileBackend(_FdBackend):
    """``--serial file=PATH``: output appended to PATH."""

    mode = "file"

    def __init__(self, path: str):
        fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_APPEND | os.O_CLOEXEC, 0o644)
        super().__init__(in_fd=None, out_fd=fd, owned=(fd,))
        self.path = path


class SocketBackend(_IoThreadBackend):
    """``--serial socket=PATH``: a Unix listening socket, one client at a time."""

    mode = "socket"

    def __init__(self, path: str):
        super().__init__(history=HISTORY_SIZE, reader=False)
        try:
            self._listener = listen_unix(path)
            st = os.stat(path)
        except BaseException:
            os.close(self._wake)
            raise
        self._identity = (st.st_dev, st.st_ino)
        self._client: socket.socket | None = None
        self.path = path

    def _interest(self) -> dict[int, int]:
        interest = {self._listener.fileno(): select.POLLIN}
        if self._client is not None:
            mask = select.POLLIN
            if self._output_pending():
                mask |= select.POLLOUT
            interest[self._client.fileno()] = mask
        return interest

    def _handle(self, events: list[tuple[int, int]]) -> None:
        # Serve the current client before accepting its successor: the successor may be
        # given the very descriptor number this round's client events refer to.
        listener = self._listener.fileno()
        for fd, revents in events:
            client = self._client
            if fd == listener or client is None or fd != client.fileno():
                continue
            if revents & (select.POLLIN | select.POLLHUP | select.POLLERR):
                self._receive()
            if self._client is client and revents & select.POLLOUT:
                self._flush_output()
        if any(fd == listener for fd, _ in events):
            self._accept()

    def _accept(self) -> None:
        try:
            conn, _ = self._listener.accept()
        except (BlockingIOError, ConnectionAbortedError):
            return
        conn.setblocking(False)
        if self._client is not None:
            log.info("serial socket %s: new client replaces the current one", self.path)
            self._disconnect()
        self._client = conn
        with self._lock:
            self._output.attach(replay=HISTORY_SIZE)
        log.info("serial socket %s: client connected", self.path)

    def _receive(self) -> None:
        assert self._client is not None
        try:
            data = self._client.recv(_IO_CHUNK)
        except BlockingIOError:
            return
        except OSError:
            data = b""
        if not data:
            log.info("serial socket %s: client disconnected", self.path)
            self._disconnect()
            return
        self._deliver_input(data)

    def _disconnect(self) -> None:
        assert self._client is not None
        with self._lock:
            self._output.detach()
        self._client.close()
        self._client = None

    def _output_fd(self) -> int | None:
        return None if self._client is None else self._client.fileno()

    def _send(self, chunk: bytes) -> int:
        assert self._client is not None
        return self._client.send(chunk, socket.MSG_NOSIGNAL)

    def _on_output_error(self, error: OSError) -> None:
        log.info("serial socket %s: client gone (%s)", self.path, error)
        self._disconnect()

    def _release(self) -> None:
        if self._client is not None:
            self._disconnect()
        self._listener.close()
        try:
            st = os.stat(self.path)
            if (st.st_dev, st.st_ino) == self._identity:    # still ours, not a successor's
                os.unlink(self.path)
        except FileNotFoundError:
            pass


def open_serial_backend(mode: str, path: str | None = None) -> SerialBackend:
    """Open the host end for ``--serial MODE`` (``file`` and ``socket`` take ``path``).

    ``mode`` is case-insensitive, so ``SerialConfig.mode`` ("Null", "File", ...) can be
    passed as it is.  ``off`` is refused: there is no UART, so nothing to connect.
    """
    mode = mode.lower()
    if mode == "off":
        raise ValueError("--serial off: create neither the UART nor a backend")
    if mode in ("file", "socket") and not path:
        raise ValueError(f"--serial {mode} needs a path ({mode}=PATH)")
    spec = f"{mode}={path}" if mode in ("file", "socket") else mode
    try:
        if mode == "null":
            return NullBackend()
        if mode == "tty":
            return TtyBackend()
        if mode == "pty":
            return PtyBackend()
        if mode == "file":
            return FileBackend(path)
        if mode == "socket":
            return SocketBackend(path)
    except OSError as e:
        raise SerialBackendError(f"--serial {spec}: {e}") from e
    raise ValueError(f"unknown --serial mode {mode!r}")
