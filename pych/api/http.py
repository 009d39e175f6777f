"""Cloud Hypervisor's REST API (``/api/v1``) over a UNIX stream socket.

Three layers, each ignorant of the others' concerns:

* :class:`~pych.api.dispatch.Dispatcher` (its own module): from method, path, body and
  fds to a response, through the route table (:mod:`pych.api.routes`) and the status
  table (:mod:`pych.api.errors`).  It never touches a socket.
* :class:`_Connection`: HTTP/1.1 framing on one keep-alive connection (pych's own, as
  the reference has its own ``micro_http``), reading through
  :class:`_ScmRightsReader` so that file descriptors passed with SCM_RIGHTS are
  kept rather than dropped by the kernel.
* :class:`ApiServer`: the listening socket's life cycle (safe creation,
  stale-socket replacement, removal) and the serving thread.

Server threads only parse and route: every handler method runs inside
``handler_call``, which the VMM implements by running the call on the connection's
thread under its control loop's lock (``ControlLoop.call``).

Framing answers of its own, before the dispatcher sees a request: a body over 4 MiB is
413 (refused from its ``Content-Length`` before a byte of it is read),
``Transfer-Encoding`` is 411, an unparsable request 400.  Error bodies are always a JSON
array of strings, the error chain outermost first.  Responses carry ``Server: pych API``;
every response but 204 carries ``Content-Length`` (RFC 9110 forbids it on 204, and the
reference omits it there too).
"""

from __future__ import annotations

import array
import contextlib
import json
import logging
import os
import socket
import socketserver
import stat
import threading
import time
from collections.abc import Callable
from http import HTTPStatus
from typing import Any, NamedTuple

from pych.api.dispatch import Dispatcher, HandlerCall, Rejection, Response, error_response
from pych.fds import close_fds
from pych.guest_log import GuestLog
from pych.threads import NamedThread, ThreadStarter

logger = logging.getLogger(__name__)
_busy_log = GuestLog(logger)      # a client can repeat connecting at will

SERVER_NAME = "pych API"
MAX_BODY_SIZE = 4 << 20  # bytes; the reference's limit
MAX_FDS_PER_REQUEST = 64
_MAX_REQUEST_LINE = 64 * 1024
_MAX_HEADER_LINE = 64 * 1024
_MAX_HEADERS = 100
_SOCKET_MODE = 0o600
_CLOSE_GRACE = 1.0  # seconds close() lets requests in flight finish
HTTP_THREAD = "http-server"  # the reference's name for its API threads
MAX_CONNECTIONS = 256
"""Connections served at once (a thread each); one more is answered 503 and closed, so idle or
slow clients cannot exhaust pych's threads."""
IDLE_TIMEOUT = 300.0
"""Seconds a connection may wait for the client's next bytes before pych closes it. Longer
than HTTP clients keep idle pooled connections themselves (Go's default is 90 s), so a client
that comes back to a pooled connection finds it open."""


# --------------------------------------------------------------------------
# HTTP framing on one connection
# --------------------------------------------------------------------------


class _ReceivedFds(NamedTuple):
    last_byte: int  # stream offset of the last byte of the read that brought them
    fds: list[int]
    truncated: bool  # the kernel dropped some: more than the ancillary buffer holds


class _ScmRightsReader:
    """The ``rfile`` of a connection: a buffered reader that keeps SCM_RIGHTS fds.

    Reading through :meth:`socket.socket.makefile` would silently drop passed
    fds (the kernel closes fds sent to a ``recv`` without ancillary buffer), so
    every read here is a ``recvmsg``.  Fds are remembered together with the
    stream offset of the last byte of the read that brought them: the kernel
    ends a read right after the segment carrying fds, and clients send the fds
    with the first bytes of their request (ch-remote: with the request line), so
    that byte belongs to the request that owns the fds.  After a request has
    been read in full, :meth:`take_fds` claims exactly its fds even if the
    client pipelines further requests behind it.

    Implements just what :class:`_Connection` uses: ``readline``, ``read`` and ``close``.
    """

    _CHUNK = 64 * 1024

    def __init__(self, sock: socket.socket, max_fds: int = MAX_FDS_PER_REQUEST) -> None:
        self._sock = sock
        self._ancbufsize = socket.CMSG_SPACE(max_fds * array.array("i").itemsize)
        self._buffer = bytearray()
        self._offset = 0  # stream offset of _buffer[0]: bytes handed out so far
        self._eof = False
        self._received: list[_ReceivedFds] = []

    def readline(self, limit: int = -1) -> bytes:
        searched = 0
        while True:
            newline = self._buffer.find(b"\n", searched)
            if newline >= 0:
                size = newline + 1
                break
            searched = len(self._buffer)
            if 0 <= limit <= searched or not self._fill():
                size = searched
                break
        return self._take(size if limit < 0 else min(size, limit))

    def read(self, size: int) -> bytes:
        while len(self._buffer) < size and self._fill():
            pass
        return self._take(min(size, len(self._buffer)))

    def take_fds(self) -> tuple[list[int], bool]:
        """Claim the fds that came with the bytes read so far.

        Returns the fds (the caller now owns them) and whether the kernel had
        to drop some because more than ``max_fds`` were sent at once."""
        mine = [entry for entry in self._received if entry.last_byte < self._offset]
        self._received = [entry for entry in self._received if entry.last_byte >= self._offset]
        fds = [fd for entry in mine for fd in entry.fds]
        return fds, any(entry.truncated for entry in mine)

    def close(self) -> None:
        """Close the fds nobody claimed; the socket belongs to the server."""
        for entry in self._received:
            close_fds(entry.fds)
        self._received.clear()

    def _take(self, size: int) -> bytes:
        data = bytes(self._buffer[:size])
        del self._buffer[:size]
        self._offset += size
        return data

    def _fill(self) -> bool:
        if self._eof:
            return False
        data, ancdata, flags, _ = self._sock.recvmsg(
            self._CHUNK, self._ancbufsize, socket.MSG_CMSG_CLOEXEC
        )
        fds = array.array("i")
        for level, kind, payload in ancdata:
            if level == socket.SOL_SOCKET and kind == socket.SCM_RIGHTS:
                fds.frombytes(payload[: len(payload) - len(payload) % fds.itemsize])
        truncated = bool(flags & socket.MSG_CTRUNC)
        if not data:
            self._eof = True
            close_fds(fds)
            return False
        self._buffer += data
        if fds or truncated:
            last_byte = self._offset + len(self._buffer) - 1
            self._received.append(_ReceivedFds(last_byte, fds.tolist(), truncated))
        return True


class _BadRequest(Exception):
    """A request line or header block the framing refuses: its status and what was wrong."""

    def __init__(self, status: HTTPStatus, detail: str | None = None) -> None:
        super().__init__(status)
        self.status, self.detail = status, detail


def _http_date(now: float) -> str:
    """RFC 9110's IMF-fixdate, ``Sun, 06 Nov 1994 08:49:37 GMT`` (no locale involved)."""
    t = time.gmtime(now)
    return (f"{_WEEKDAYS[t.tm_wday]}, {t.tm_mday:02d} {_MONTHS[t.tm_mon - 1]} {t.tm_year:04d} "
            f"{t.tm_hour:02d}:{t.tm_min:02d}:{t.tm_sec:02d} GMT")


_WEEKDAYS = ("Mon", "Tue", "Wed", "Thu", "Fri", "Sat", "Sun")
_MONTHS = ("Jan", "Feb", "Mar", "Apr", "May", "Jun", "Jul", "Aug", "Sep", "Oct", "Nov", "Dec")


class _Connection(socketserver.BaseRequestHandler):
    """One client connection: a loop of keep-alive HTTP/1.1 requests.

    The framing is pych's own, as Cloud Hypervisor's is (its ``micro_http``): the request line
    (HTTP/1.0 and 1.1; 0.9 and 2 and later are refused), at most 100 header lines of at most
    64 KiB each, ``Connection`` and ``Expect: 100-continue``, a body by ``Content-Length``.
    The standard library's ``http.server`` would do the same but imports ``http.client``,
    ``ssl`` and ``email`` with it, a sixth of pych's start-up (docs/benchmarks.md)."""

    server: _Server

    def setup(self) -> None:
        self.connection = self.request
        self.connection.settimeout(self.server.idle_timeout)   # a recv waiting longer ends it
        self.rfile = _ScmRightsReader(self.connection)
        self.wfile = self.connection.makefile("wb")  # buffered: one write per response
        self.close_connection = True
        self.server.track(self.connection)

    def finish(self) -> None:
        try:
            self.wfile.close()
        except OSError:
            pass  # the client is gone; so is whatever we had left to say
        self.rfile.close()
        self.server.untrack(self.connection)

    def handle(self) -> None:
        try:
            self._handle_one_request()
            while not self.close_connection:
                self._handle_one_request()
        except OSError as error:
            logger.debug("API connection dropped: %s", error)

    def _handle_one_request(self) -> None:
        self.close_connection = True              # until the request line says otherwise
        raw_requestline = self.rfile.readline(_MAX_REQUEST_LINE + 1)
        if not raw_requestline:
            return
        if len(raw_requestline) > _MAX_REQUEST_LINE:
            self._send_error(HTTPStatus.REQUEST_URI_TOO_LONG)
            return
        try:
            if not self._parse_request(raw_requestline):
                return                            # a blank line: nothing to answer
            if not self._expect_100():
                return
        except _BadRequest as bad:
            self._send_error(bad.status, bad.detail)
            return
        response = self._serve()
        logger.debug('"%s" %d', self.requestline, response.status)
        try:
            self._send(response)
        finally:
            if self.server.after_response is not None:
                self.server.after_response()

    def _parse_request(self, raw_requestline: bytes) -> bool:
        """The request line and headers into :attr:`command`, :attr:`path`, :attr:`headers`
        (lower-case name → values) and :attr:`close_connection`; False for a blank line."""
        self.requestline = str(raw_requestline, "iso-8859-1").rstrip("\r\n")
        words = self.requestline.split()
        if not words:
            return False
        self.version = (1, 0)
        if len(words) >= 3:
            self.version = _http_version(words[-1])
            self.close_connection = self.version < (1, 1)
        if not 2 <= len(words) <= 3:
            raise _BadRequest(HTTPStatus.BAD_REQUEST, f"Bad request syntax ({self.requestline!r})")
        if len(words) == 2:
            raise _BadRequest(HTTPStatus.BAD_REQUEST, "HTTP/0.9 is not supported")
        self.command, self.path = words[:2]
        if self.path.startswith("//"):        # not an absolute URI without a scheme
            self.path = "/" + self.path.lstrip("/")
        self.headers = self._read_headers()
        connection = self._header("connection").lower()
        if connection == "close":
            self.close_connection = True
        elif connection == "keep-alive":
            self.close_connection = False
        return True

    def _read_headers(self) -> dict[str, list[str]]:
        """The header block up to its blank line; a line folded onto the next (obsolete, RFC
        9112 5.2) is joined to it. A line that is no header is refused (400)."""
        lines: list[str] = []
        while True:
            line = self.rfile.readline(_MAX_HEADER_LINE + 1)
            if len(line) > _MAX_HEADER_LINE:
                raise _BadRequest(HTTPStatus.REQUEST_HEADER_FIELDS_TOO_LARGE, "Line too long")
            if line in (b"\r\n", b"\n", b""):
                break
            text = str(line, "iso-8859-1").rstrip("\r\n")
            if text[:1] in (" ", "\t") and lines:
                lines[-1] += " " + text.strip()
            else:
                lines.append(text)
            if len(lines) > _MAX_HEADERS:
                raise _BadRequest(HTTPStatus.REQUEST_HEADER_FIELDS_TOO_LARGE,
                                  f"Too many headers (more than {_MAX_HEADERS})")
        headers: dict[str, list[str]] = {}
        for text in lines:
            name, colon, value = text.partition(":")
            if not colon or not name or name != name.strip():
                raise _BadRequest(HTTPStatus.BAD_REQUEST, f"Bad header line ({text[:80]!r})")
            headers.setdefault(name.lower(), []).append(value.strip())
        return headers

    def _header(self, name: str) -> str:
        """The first value of header ``name`` (lower case), or ``""``."""
        return next(iter(self.headers.get(name, ())), "")

    def _expect_100(self) -> bool:
        """``Expect: 100-continue``: the client waits for a go-ahead before sending the body.
        Refuse an oversized one now (False: answered), else send ``100 Continue``."""
        if self._header("expect").lower() != "100-continue" or self.version < (1, 1):
            return True
        try:
            size = self._content_length()
        except Rejection as error:
            self.close_connection = True
            self._send(error.response)
            return False
        if size is not None and size > MAX_BODY_SIZE:
            self.close_connection = True
            self._send(self._too_large(size).response)
            return False
        self.wfile.write(b"HTTP/1.1 100 Continue\r\n\r\n")
        self.wfile.flush()
        return True

    def _serve(self) -> Response:
        try:
            body = self._read_body()
        except Rejection as error:
            self.close_connection = True
            return error.response
        fds, truncated = self.rfile.take_fds()
        if truncated:
            close_fds(fds)
            return error_response(
                HTTPStatus.BAD_REQUEST,
                ["Bad Request", f"More than {MAX_FDS_PER_REQUEST} file descriptors were sent"],
            )
        return self.server.dispatcher.respond(self.command, self.path, body, fds)

    def _read_body(self) -> bytes | None:
        """The request body, or None if there is none (no or zero Content-Length)."""
        if "transfer-encoding" in self.headers:
            raise Rejection(
                HTTPStatus.LENGTH_REQUIRED,
                ["Length Required", "Transfer-Encoding is not supported; send Content-Length"],
            )
        size = self._content_length()
        if size is None or size == 0:
            return None
        if size > MAX_BODY_SIZE:
            raise self._too_large(size)
        body = self.rfile.read(size)
        if len(body) < size:
            raise ConnectionResetError("client disconnected in the middle of a request body")
        return body

    def _content_length(self) -> int | None:
        values = set(self.headers.get("content-length", ()))
        if not values:
            return None
        value = values.pop()
        if values or not (value.isascii() and value.isdigit()):
            raise Rejection(HTTPStatus.BAD_REQUEST, ["Bad Request", "Invalid Content-Length"])
        return int(value)

    @staticmethod
    def _too_large(size: int) -> Rejection:
        return Rejection(
            HTTPStatus.REQUEST_ENTITY_TOO_LARGE,
            ["Payload Too Large", f"Request body of {size} bytes exceeds {MAX_BODY_SIZE} bytes"],
        )

    def _send_error(self, status: HTTPStatus, detail: str | None = None) -> None:
        """A request the framing refuses: its status, as JSON, and the connection closed."""
        self.close_connection = True
        self._send(error_response(status, [status.phrase, *([detail] if detail else [])]))

    def _send(self, response: Response) -> None:
        status = HTTPStatus(response.status)
        head = [f"HTTP/1.1 {status.value} {status.phrase}", f"Server: {SERVER_NAME}",
                f"Date: {_http_date(time.time())}"]
        head += [f"{name}: {value}" for name, value in response.headers]
        if status != HTTPStatus.NO_CONTENT:
            head += ["Content-Type: application/json", f"Content-Length: {len(response.body)}"]
        if self.close_connection or self.server.closing:
            self.close_connection = True
            head.append("Connection: close")
        self.wfile.write("\r\n".join(head).encode("latin-1") + b"\r\n\r\n" + response.body)
        self.wfile.flush()


def _http_version(word: str) -> tuple[int, int]:
    """``HTTP/1.1`` → (1, 1); 400 for anything else of that shape's misspellings, 505 for
    HTTP/2 and later (which need a connection preface, not a request line)."""
    numbers = word[5:].split(".") if word.startswith("HTTP/") else []
    if (len(numbers) != 2 or not all(n.isascii() and n.isdigit() and len(n) <= 10
                                     for n in numbers)):
        raise _BadRequest(HTTPStatus.BAD_REQUEST, f"Bad request version ({word!r})")
    version = (int(numbers[0]), int(numbers[1]))
    if version >= (2, 0):
        raise _BadRequest(HTTPStatus.HTTP_VERSION_NOT_SUPPORTED,
                          f"Invalid HTTP version ({word[5:]})")
    return version


class _Server(socketserver.ThreadingMixIn, socketserver.UnixStreamServer):
    """A thread per connection over a listening socket built by :class:`ApiServer`
    (which runs the accept loop itself, rather than the polling ``serve_forever``)."""

    daemon_threads = True

    def __init__(self, listener: socket.socket, dispatcher: Dispatcher, *,
                 max_connections: int, idle_timeout: float,
                 after_response: Callable[[], None] | None = None) -> None:
        # TCPServer.__init__ would create and bind a socket of its own.
        socketserver.BaseServer.__init__(self, listener.getsockname(), _Connection)
        self.socket = listener
        self.dispatcher = dispatcher
        self.after_response = after_response
        self.max_connections = max_connections
        self.idle_timeout = idle_timeout
        self._accepted = 0                # connections handed to a thread and not finished
        self.closing = False
        self._connections: dict[socket.socket, threading.Thread] = {}
        self._lock = threading.Lock()
        # Each connection runs on a thread readied ahead of it (ThreadStarter), so that a
        # request does not wait for the host to schedule a new thread; the accept loop
        # readies the next one after handing a connection over.
        self.starter = ThreadStarter(HTTP_THREAD)

    def ready_next(self) -> None:
        """Ready the next connection's thread, unless :attr:`max_connections` are being
        served (the threads stay within the limit)."""
        with self._lock:
            room = self._accepted < self.max_connections
        if room:
            self.starter.ready()

    def process_request(self, request: Any, client_address: Any) -> None:
        """ThreadingMixIn's, on a readied thread (see :attr:`starter`)."""
        self.starter.start(HTTP_THREAD,
                           lambda: self.process_request_thread(request, client_address))

    def track(self, connection: socket.socket) -> None:
        with self._lock:
            if self.closing:  # accepted just before the listener closed
                with contextlib.suppress(OSError):
                    connection.shutdown(socket.SHUT_RD)
            self._connections[connection] = threading.current_thread()

    def untrack(self, connection: socket.socket) -> None:
        with self._lock:
            self._connections.pop(connection, None)

    def admit(self) -> bool:
        """Count a new connection in, unless :attr:`max_connections` are being served."""
        with self._lock:
            if self._accepted >= self.max_connections:
                return False
            self._accepted += 1
            return True

    def shutdown_request(self, request: Any) -> None:
        """A served connection is done (ThreadingMixIn calls this at its thread's end)."""
        with self._lock:
            self._accepted -= 1
        super().shutdown_request(request)

    def disconnect_all(self, grace: float) -> None:
        """End every connection, letting requests in flight answer first.

        Shutting down the read side ends idle connections at once (their
        threads read EOF) while a thread busy with a request can still write its
        response, e.g. the 200 of ``vmm.shutdown``.  Threads still busy after
        ``grace`` seconds (stuck in ``handler_call``) are cut off entirely."""
        with self._lock:
            self.closing = True
            connections = dict(self._connections)
        for connection in connections:
            with contextlib.suppress(OSError):  # already closed
                connection.shutdown(socket.SHUT_RD)
        deadline = time.monotonic() + grace
        for connection, thread in connections.items():
            thread.join(max(0.0, deadline - time.monotonic()))
            if thread.is_alive():
                with contextlib.suppress(OSError):
                    connection.shutdown(socket.SHUT_RDWR)

    def handle_error(self, request: Any, client_address: Any) -> None:
        logger.exception("API connection handler failed")


# --------------------------------------------------------------------------
# The listening socket and its server
# --------------------------------------------------------------------------


class ApiSocketError(OSError):
    """The API socket cannot be created or adopted; ``str()`` says why, in one line."""


def _remove_stale_socket(path: str) -> None:
    """Make way for binding ``path``, refusing anything but a dead socket.

    Never follows a symlink: the path is examined with ``lstat``."""
    try:
        st = os.lstat(path)
    except FileNotFoundError:
        return
    if stat.S_ISLNK(st.st_mode):
        raise ApiSocketError(f"API socket path {path} is a symbolic link; refusing to follow it")
    if not stat.S_ISSOCK(st.st_mode):
        raise ApiSocketError(f"API socket path {path} exists and is not a socket")
    with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as probe:
        probe.settimeout(1.0)
        try:
            probe.connect(path)
        except ConnectionRefusedError:
            pass  # nobody listens: a leftover of a dead process
        except FileNotFoundError:
            return
        except OSError as error:  # TimeoutError, EAGAIN (full backlog), ...
            raise ApiSocketError(
                f"API socket {path} is busy or unreachable ({error}); is another VMM using it?"
            ) from error
        else:
            raise ApiSocketError(f"API socket {path} is in use by another process")
    logger.info("replacing stale API socket %s", path)
    os.unlink(path)


def _listen_at(path: str) -> socket.socket:
    _remove_stale_socket(path)
    listener = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    try:
        # bind() creates the node with the socket inode's mode (minus umask):
        # setting it first leaves no window in which others may connect.
        os.fchmod(listener.fileno(), _SOCKET_MODE)
        listener.bind(path)
        listener.listen(socket.SOMAXCONN)
    except OSError as error:
        listener.close()
        raise ApiSocketError(f"Cannot create API socket {path}: {error.strerror}") from error
    return listener


def _adopt_listening_fd(fd: int) -> socket.socket:
    try:
        listener = socket.socket(fileno=fd)
    except OSError as error:
        raise ApiSocketError(f"API socket fd {fd} is not a socket: {error.strerror}") from error
    if listener.family != socket.AF_UNIX or listener.type != socket.SOCK_STREAM:
        listener.detach()
        raise ApiSocketError(f"API socket fd {fd} is not a UNIX stream socket")
    if not listener.getsockopt(socket.SOL_SOCKET, socket.SO_ACCEPTCONN):
        listener.detach()
        raise ApiSocketError(f"API socket fd {fd} is not listening")
    return listener


def _turn_away(connection: socket.socket, limit: int) -> None:
    """Answer 503 on a connection over the limit, without waiting for its request, and close
    it; a client that does not read is not waited for either."""
    body = json.dumps(["Service Unavailable",
                       f"pych serves at most {limit} API connections at once"],
                      separators=(",", ":")).encode()          # as every other answer
    head = (f"HTTP/1.1 503 Service Unavailable\r\nServer: {SERVER_NAME}\r\n"
            f"Content-Type: application/json\r\nContent-Length: {len(body)}\r\n"
            "Connection: close\r\n\r\n").encode()
    with contextlib.suppress(OSError):
        connection.setblocking(False)
        connection.send(head + body)
    connection.close()
    _busy_log.warning("API connection refused: %d connections are being served", limit)


class ApiServer:
    """Serves ``/api/v1`` on a UNIX socket, one thread per connection.

    ``handler_call(fn)`` must run ``fn(request_handler)`` and return its result
    or raise its exception; the VMM runs it under its control loop's lock
    (``ControlLoop.call``), tests may call it directly.  It must not return before ``fn`` has
    either run or been definitely dropped (fds handed to ``fn`` are closed if it
    was never entered).  ``after_response()``, if given, is called once each
    response is written (or could not be).

    Exactly one of ``path`` (create a socket there, mode 0600, replacing a stale
    socket but never a live one, a symlink or another kind of file; removed
    again by :meth:`close`) or ``fd`` (an already listening UNIX stream socket,
    whose ownership passes to the server) must be given.
    """

    def __init__(
        self,
        handler_call: HandlerCall,
        path: str | os.PathLike[str] | None = None,
        fd: int | None = None,
        *,
        max_connections: int = MAX_CONNECTIONS,
        idle_timeout: float = IDLE_TIMEOUT,
        after_response: Callable[[], None] | None = None,
    ) -> None:
        if (path is None) == (fd is None):
            raise ValueError("ApiServer needs exactly one of path= or fd=")
        self._dispatcher = Dispatcher(handler_call)
        self._after_response = after_response
        self._max_connections = max_connections
        self._idle_timeout = idle_timeout
        self._path = None if path is None else os.fspath(path)
        self._fd = fd
        self._server: _Server | None = None
        self._thread: threading.Thread | None = None
        self._inode: tuple[int, int] | None = None
        self._started = False
        self._closing = False

    @property
    def path(self) -> str | None:
        return self._path

    def start(self) -> None:
        """Create (or adopt) the listening socket and serve it in a thread.

        Raises :class:`ApiSocketError` with a one-line reason on failure."""
        if self._started:
            raise RuntimeError("an ApiServer starts once (an adopted fd is gone after close)")
        if self._path is not None:
            listener = _listen_at(self._path)
            st = os.lstat(self._path)
            self._inode = (st.st_dev, st.st_ino)
        else:
            assert self._fd is not None  # one of the two, checked by __init__
            listener = _adopt_listening_fd(self._fd)
        server = _Server(listener, self._dispatcher, max_connections=self._max_connections,
                         idle_timeout=self._idle_timeout, after_response=self._after_response)
        # The reference's name, that of the threads serving connections too.
        thread = NamedThread(target=self._accept_loop, args=(server,), name=HTTP_THREAD,
                             daemon=True)
        thread.start()
        self._server, self._thread, self._started = server, thread, True

    def close(self) -> None:
        """Stop serving, drop open connections and remove our socket file.

        Requests in flight get up to a second to answer (the response to
        ``vmm.shutdown`` must reach its client); a handler still running after
        that finishes on its own, unheard.  Idempotent."""
        server, thread = self._server, self._thread
        if server is None or thread is None:
            return
        self._server = self._thread = None
        self._unlink_own_socket()
        self._closing = True
        with contextlib.suppress(OSError):
            server.socket.shutdown(socket.SHUT_RDWR)  # wakes accept() with EINVAL
        thread.join()
        server.server_close()
        server.disconnect_all(grace=_CLOSE_GRACE)

    def _accept_loop(self, server: _Server) -> None:
        while True:
            server.ready_next()         # the next connection's thread
            try:
                connection, address = server.socket.accept()
            except OSError as error:
                if self._closing:
                    server.starter.close()
                    return
                logger.warning("accept() on the API socket failed: %s", error)
                time.sleep(0.1)  # e.g. out of fds: let the VMM breathe, don't spin
                continue
            if not server.admit():
                _turn_away(connection, server.max_connections)
                continue
            try:
                server.process_request(connection, address)  # a thread per connection
            except Exception:  # e.g. no thread could be started
                logger.exception("cannot serve an API connection")
                server.shutdown_request(connection)

    def _unlink_own_socket(self) -> None:
        if self._path is None or self._inode is None:
            return
        try:
            st = os.lstat(self._path)
            if (st.st_dev, st.st_ino) == self._inode:  # not someone else's by now
                os.unlink(self._path)
        except FileNotFoundError:
            pass
        self._inode = None

    def __enter__(self) -> ApiServer:
        self.start()
        return self

    def __exit__(self, *exc_info: object) -> None:
        self.close()
