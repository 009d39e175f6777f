"""Cloud Hypervisor's REST API (``/api/v1``) over a UNIX stream socket.

Three layers, each ignorant of the others' concerns:

* :data:`ROUTES` and :class:`_Router`: path -> (HTTP method, body model,
  :class:`~pych.api.handler.RequestHandler` method).  The router validates the
  body into a :mod:`pych.config` model, runs the handler method through the
  injected ``handler_call`` and maps the outcome onto a status code and a JSON
  body.  It never touches a socket.
* :class:`_Connection`: HTTP/1.1 framing on one keep-alive connection, built on
  :class:`http.server.BaseHTTPRequestHandler`, reading through
  :class:`_ScmRightsReader` so that file descriptors passed with SCM_RIGHTS are
  kept rather than dropped by the kernel.
* :class:`ApiServer`: the listening socket's life cycle (safe creation,
  stale-socket replacement, removal) and the serving thread.

Server threads only parse and route: every handler method runs inside
``handler_call``, which the VMM implements by queueing the call onto its control
loop and waiting for the result.

Status codes follow Cloud Hypervisor (see ``ch-hotplug-reference.md`` §6.3):
200 with a body, 204 without one (``vmm.shutdown``: 200 with an empty body, as
the reference does); 400 for malformed or invalid bodies, a body sent to an
endpoint that takes none or none sent to one that needs it; 404 for unknown
paths; 409 for ``ConfigConflict``; 500 for everything else.  Deliberate
departures: a wrong method is 405 with an ``Allow`` header (the reference says
400), a body over 4 MiB is 413 (refused from its ``Content-Length`` before a
byte of it is read), ``Transfer-Encoding`` is 411.  Error bodies are always a
JSON array of strings, the error chain outermost first.  Responses carry
``Server: pych API``; every response but 204 carries ``Content-Length`` (RFC
9110 forbids it on 204, and the reference omits it there too).
"""

from __future__ import annotations

import array
import contextlib
import importlib
import json
import logging
import os
import socket
import socketserver
import stat
import threading
import time
from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass
from http import HTTPStatus
from http.server import BaseHTTPRequestHandler
from typing import Any, NamedTuple, TypeVar
from urllib.parse import urlsplit

import pydantic
from pydantic_core import PydanticSerializationError

from pych import errors
from pych.api.handler import ApiError, RequestHandler

logger = logging.getLogger(__name__)

T = TypeVar("T")
HandlerCall = Callable[[Callable[[RequestHandler], T]], T]

API_ROOT = "/api/v1"
SERVER_NAME = "pych API"
MAX_BODY_SIZE = 4 << 20  # bytes; the reference's limit
MAX_FDS_PER_REQUEST = 64
_MAX_REQUEST_LINE = 64 * 1024
_SOCKET_MODE = 0o600
_CLOSE_GRACE = 1.0  # seconds close() lets requests in flight finish


# --------------------------------------------------------------------------
# Route table
# --------------------------------------------------------------------------


@dataclass(frozen=True)
class Route:
    """One endpoint: how it is called and which handler method serves it."""

    method: str
    handler: str
    """Name of the :class:`RequestHandler` method."""
    body: str | None = None
    """Name of the :mod:`pych.config` model the (required) body must validate as;
    ``None``: the endpoint takes no body."""
    fds: bool = False
    """The handler method also receives the request's SCM_RIGHTS fds."""
    empty_status: int = HTTPStatus.NO_CONTENT
    """Status when the handler returns ``None``."""


ROUTES: Mapping[str, Route] = {
    f"{API_ROOT}/{name}": route
    for name, route in {
        "vmm.ping": Route("GET", "vmm_ping"),
        "vmm.shutdown": Route("PUT", "vmm_shutdown", empty_status=HTTPStatus.OK),
        "vm.create": Route("PUT", "vm_create", "VmConfig"),
        "vm.boot": Route("PUT", "vm_boot"),
        "vm.delete": Route("PUT", "vm_delete"),
        "vm.shutdown": Route("PUT", "vm_shutdown"),
        "vm.reboot": Route("PUT", "vm_reboot"),
        "vm.pause": Route("PUT", "vm_pause"),
        "vm.resume": Route("PUT", "vm_resume"),
        "vm.power-button": Route("PUT", "vm_power_button"),
        "vm.nmi": Route("PUT", "vm_nmi"),
        "vm.info": Route("GET", "vm_info"),
        "vm.counters": Route("GET", "vm_counters"),
        "vm.resize": Route("PUT", "vm_resize", "VmResize"),
        "vm.resize-zone": Route("PUT", "vm_resize_zone", "VmResizeZone"),
        "vm.resize-disk": Route("PUT", "vm_resize_disk", "VmResizeDisk"),
        "vm.add-disk": Route("PUT", "vm_add_disk", "DiskConfig"),
        "vm.add-net": Route("PUT", "vm_add_net", "NetConfig", fds=True),
        "vm.add-fs": Route("PUT", "vm_add_fs", "FsConfig"),
        "vm.add-pmem": Route("PUT", "vm_add_pmem", "PmemConfig"),
        "vm.add-vsock": Route("PUT", "vm_add_vsock", "VsockConfig"),
        "vm.add-device": Route("PUT", "vm_add_device", "DeviceConfig", fds=True),
        "vm.add-vdpa": Route("PUT", "vm_add_vdpa", "VdpaConfig"),
        "vm.add-user-device": Route("PUT", "vm_add_user_device", "UserDeviceConfig"),
        "vm.add-generic-vhost-user": Route(
            "PUT", "vm_add_generic_vhost_user", "GenericVhostUserConfig"
        ),
        "vm.remove-device": Route("PUT", "vm_remove_device", "VmRemoveDevice"),
        "vm.snapshot": Route("PUT", "vm_snapshot", "VmSnapshotConfig"),
        "vm.restore": Route("PUT", "vm_restore", "RestoreConfig", fds=True),
        "vm.coredump": Route("PUT", "vm_coredump", "VmCoredumpData"),
        "vm.send-migration": Route("PUT", "vm_send_migration", "SendMigrationData"),
        "vm.receive-migration": Route(
            "PUT", "vm_receive_migration", "ReceiveMigrationData", fds=True
        ),
    }.items()
}


# --------------------------------------------------------------------------
# Routing and status mapping (no sockets here)
# --------------------------------------------------------------------------


@dataclass(frozen=True)
class Response:
    status: int
    body: bytes = b""
    headers: tuple[tuple[str, str], ...] = ()


def _compact_json(value: Any) -> bytes:
    return json.dumps(value, separators=(",", ":")).encode()  # as serde_json writes it


def error_response(
    status: int, messages: Iterable[str], headers: tuple[tuple[str, str], ...] = ()
) -> Response:
    """A response whose body is the error chain as a JSON array of strings."""
    return Response(status, _compact_json(list(messages)), headers)


class _Rejection(Exception):
    """A request refused before any handler runs; carries the error response."""

    def __init__(
        self, status: int, messages: Iterable[str], headers: tuple[tuple[str, str], ...] = ()
    ) -> None:
        self.response = error_response(status, messages, headers)
        super().__init__(self.response.status)


# LEAD(merge): the API branch's one status table (pych/api/errors.py) replaces this.
_DOMAIN_ERROR_STATUS: dict[type[errors.VmmError], int] = {
    errors.VmNotCreated: HTTPStatus.NOT_FOUND,
    errors.VmAlreadyCreated: HTTPStatus.CONFLICT,
    errors.InvalidState: HTTPStatus.METHOD_NOT_ALLOWED,
    errors.InvalidRequest: HTTPStatus.BAD_REQUEST,
    errors.NotFound: HTTPStatus.NOT_FOUND,
    errors.Conflict: HTTPStatus.CONFLICT,
    errors.RetryLater: HTTPStatus.TOO_MANY_REQUESTS,
    errors.BackendError: HTTPStatus.BAD_REQUEST,
    errors.Unsupported: HTTPStatus.INTERNAL_SERVER_ERROR,
    errors.InternalError: HTTPStatus.INTERNAL_SERVER_ERROR,
}


def domain_error_status(error: errors.VmmError) -> int:
    """The HTTP status of a domain error (of its nearest class in the table)."""
    for cls in type(error).__mro__:
        if cls in _DOMAIN_ERROR_STATUS:
            return _DOMAIN_ERROR_STATUS[cls]
    return HTTPStatus.INTERNAL_SERVER_ERROR


def _close_fds(fds: Iterable[int]) -> None:
    for fd in fds:
        with contextlib.suppress(OSError):
            os.close(fd)


def _cause_chain(exc: BaseException) -> list[str]:
    """``str()`` of every explicit ``__cause__`` below ``exc``, outermost first."""
    chain, seen = [], {id(exc)}
    cause = exc.__cause__
    while cause is not None and id(cause) not in seen:
        seen.add(id(cause))
        chain.append(str(cause) or type(cause).__name__)
        cause = cause.__cause__
    return chain


def _validation_messages(error: pydantic.ValidationError) -> list[str]:
    """One readable line per pydantic error: ``desired_vcpus: Input should be ...``."""
    lines = []
    for detail in error.errors(include_url=False):
        location = ".".join(str(part) for part in detail["loc"])
        lines.append(f"{location}: {detail['msg']}" if location else detail["msg"])
    return lines


class _Router:
    """Turns (method, path, body, fds) into a :class:`Response`.

    Models and the config error types come from :mod:`pych.config`; they are
    resolved once, at construction, so a route naming a missing model fails
    when the server is built rather than on the first request.
    """

    def __init__(self, handler_call: HandlerCall) -> None:
        config = importlib.import_module("pych.config")
        self._handler_call = handler_call
        self._models: dict[str, type[pydantic.BaseModel]] = {
            route.body: getattr(config, route.body) for route in ROUTES.values() if route.body
        }
        self._config_error: type[Exception] = config.ConfigError
        self._config_conflict: type[Exception] = config.ConfigConflict

    def respond(self, method: str, target: str, body: bytes | None, fds: list[int]) -> Response:
        """Serve one request.  Always answers, and always disposes of ``fds``:
        they go to the handler method if it takes them, or are closed."""
        try:
            route, args = self._prepare(method, target, body)
        except _Rejection as rejection:
            _close_fds(fds)
            return rejection.response
        if route.fds:
            return self._invoke(route, [*args, fds], fds)
        if fds:
            logger.debug("closing %d fds sent to %s, which takes none", len(fds), route.handler)
            _close_fds(fds)
        return self._invoke(route, args, ())

    def _prepare(self, method: str, target: str, body: bytes | None) -> tuple[Route, list[Any]]:
        """The route and the handler's arguments decoded from the body."""
        path = urlsplit(target).path
        route = ROUTES.get(path)
        if route is None:
            raise _Rejection(HTTPStatus.NOT_FOUND, ["Not Found", f"No endpoint {path}"])
        if method != route.method:
            raise _Rejection(
                HTTPStatus.METHOD_NOT_ALLOWED,
                ["Method Not Allowed", f"{path} only accepts {route.method}"],
                headers=(("Allow", route.method),),
            )
        if route.body is None:
            if body is not None:
                raise _Rejection(HTTPStatus.BAD_REQUEST, ["Bad Request", f"{path} takes no body"])
            return route, []
        if body is None:
            raise _Rejection(
                HTTPStatus.BAD_REQUEST,
                ["Bad Request", f"{path} requires a JSON body ({route.body})"],
            )
        try:
            return route, [self._models[route.body].model_validate_json(body)]
        except pydantic.ValidationError as error:
            status, messages = HTTPStatus.BAD_REQUEST, _validation_messages(error)
        except self._config_conflict as error:
            status, messages = HTTPStatus.CONFLICT, [str(error), *_cause_chain(error)]
        except self._config_error as error:
            status, messages = HTTPStatus.BAD_REQUEST, [str(error), *_cause_chain(error)]
        raise _Rejection(status, ["Failed to deserialize JSON", *messages])

    def _invoke(self, route: Route, args: list[Any], fds: Iterable[int]) -> Response:
        entered = False

        def call(handler: RequestHandler) -> Any:
            nonlocal entered
            entered = True  # from here on the handler method owns the fds
            return getattr(handler, route.handler)(*args)

        try:
            result = self._handler_call(call)
        except Exception as error:  # every failure becomes a response
            return self._failure(route, error)
        finally:
            if not entered:
                _close_fds(fds)

        if result is None:
            return Response(route.empty_status)
        try:
            if isinstance(result, pydantic.BaseModel):
                payload = result.model_dump_json(exclude_none=True).encode()
            else:
                payload = _compact_json(result)
        except (TypeError, ValueError, PydanticSerializationError) as error:
            logger.exception("%s returned a value that is not JSON-serialisable", route.handler)
            return error_response(
                HTTPStatus.INTERNAL_SERVER_ERROR,
                ["Error from API", f"{route.handler} returned an unserialisable result: {error}"],
            )
        return Response(HTTPStatus.OK, payload)

    def _failure(self, route: Route, error: Exception) -> Response:
        if isinstance(error, ApiError):
            status, messages = error.status, error.messages
        elif isinstance(error, errors.VmmError):
            status, messages = domain_error_status(error), error.messages
        elif isinstance(error, self._config_conflict):
            status, messages = HTTPStatus.CONFLICT, [str(error)]
        elif isinstance(error, self._config_error):
            status, messages = HTTPStatus.BAD_REQUEST, [str(error)]
        elif isinstance(error, pydantic.ValidationError):
            status, messages = HTTPStatus.BAD_REQUEST, _validation_messages(error)
        else:
            logger.exception("unexpected error in %s", route.handler)
            status = HTTPStatus.INTERNAL_SERVER_ERROR
            messages = [f"{type(error).__name__}: {error}" if str(error) else type(error).__name__]
        return error_response(status, ["Error from API", *messages, *_cause_chain(error)])


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

    Implements just what :class:`BaseHTTPRequestHandler` uses: ``readline``,
    ``read`` and ``close``.
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
            _close_fds(entry.fds)
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
            _close_fds(fds)
            return False
        self._buffer += data
        if fds or truncated:
            last_byte = self._offset + len(self._buffer) - 1
            self._received.append(_ReceivedFds(last_byte, fds.tolist(), truncated))
        return True


class _Connection(BaseHTTPRequestHandler):
    """One client connection: a loop of keep-alive HTTP/1.1 requests."""

    protocol_version = "HTTP/1.1"
    server: _Server
    rfile: _ScmRightsReader  # type: ignore[assignment]

    def setup(self) -> None:
        self.connection = self.request
        self.rfile = _ScmRightsReader(self.connection)
        self.wfile = self.connection.makefile("wb")  # buffered: one write per response
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
            super().handle()
        except OSError as error:
            logger.debug("API connection dropped: %s", error)

    def handle_one_request(self) -> None:
        self.raw_requestline = self.rfile.readline(_MAX_REQUEST_LINE + 1)
        if not self.raw_requestline:
            self.close_connection = True
            return
        if len(self.raw_requestline) > _MAX_REQUEST_LINE:
            self.requestline = self.request_version = self.command = ""
            self.send_error(HTTPStatus.REQUEST_URI_TOO_LONG)
            return
        if not self.parse_request():  # answers malformed requests itself
            return
        if self.request_version == "HTTP/0.9":
            self.send_error(HTTPStatus.BAD_REQUEST, "HTTP/0.9 is not supported")
            return
        self._send(self._serve())

    def _serve(self) -> Response:
        try:
            body = self._read_body()
        except _Rejection as error:
            self.close_connection = True
            return error.response
        fds, truncated = self.rfile.take_fds()
        if truncated:
            _close_fds(fds)
            return error_response(
                HTTPStatus.BAD_REQUEST,
                ["Bad Request", f"More than {MAX_FDS_PER_REQUEST} file descriptors were sent"],
            )
        return self.server.router.respond(self.command, self.path, body, fds)

    def _read_body(self) -> bytes | None:
        """The request body, or None if there is none (no or zero Content-Length)."""
        if "Transfer-Encoding" in self.headers:
            raise _Rejection(
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
        values = {value.strip() for value in self.headers.get_all("Content-Length", ())}
        if not values:
            return None
        value = values.pop()
        if values or not (value.isascii() and value.isdigit()):
            raise _Rejection(HTTPStatus.BAD_REQUEST, ["Bad Request", "Invalid Content-Length"])
        return int(value)

    @staticmethod
    def _too_large(size: int) -> _Rejection:
        return _Rejection(
            HTTPStatus.REQUEST_ENTITY_TOO_LARGE,
            ["Payload Too Large", f"Request body of {size} bytes exceeds {MAX_BODY_SIZE} bytes"],
        )

    def handle_expect_100(self) -> bool:
        # The client waits for our go-ahead before sending the body: refuse an
        # oversized one now, and flush the interim response through our
        # buffered wfile (the base class leaves it in the buffer).
        try:
            size = self._content_length()
        except _Rejection as error:
            self.close_connection = True
            self._send(error.response)
            return False
        if size is not None and size > MAX_BODY_SIZE:
            self.close_connection = True
            self._send(self._too_large(size).response)
            return False
        self.send_response_only(HTTPStatus.CONTINUE)
        self.end_headers()
        self.wfile.flush()
        return True

    def send_error(self, code: int, message: str | None = None, explain: str | None = None) -> None:
        """Errors raised by the base class's request parsing, as JSON."""
        self.close_connection = True
        if self.request_version == "HTTP/0.9":
            self.request_version = "HTTP/1.0"  # which has a status line to answer with
        status = HTTPStatus(code)
        self._send(error_response(status, [status.phrase, *([message] if message else [])]))

    def _send(self, response: Response) -> None:
        self.send_response(response.status)
        for name, value in response.headers:
            self.send_header(name, value)
        if response.status != HTTPStatus.NO_CONTENT:
            self.send_header("Content-Type", "application/json")
            self.send_header("Content-Length", str(len(response.body)))
        if self.close_connection or self.server.closing:
            self.send_header("Connection", "close")  # sets close_connection
        self.end_headers()
        self.wfile.write(response.body)
        self.wfile.flush()

    def version_string(self) -> str:
        return SERVER_NAME

    def address_string(self) -> str:
        return "api-socket"  # AF_UNIX peers have no address (the default indexes it)

    def log_message(self, format: str, *args: Any) -> None:
        logger.debug("%s", format % args)


class _Server(socketserver.ThreadingMixIn, socketserver.UnixStreamServer):
    """A thread per connection over a listening socket built by :class:`ApiServer`
    (which runs the accept loop itself, rather than the polling ``serve_forever``)."""

    daemon_threads = True

    def __init__(self, listener: socket.socket, router: _Router) -> None:
        # TCPServer.__init__ would create and bind a socket of its own.
        socketserver.BaseServer.__init__(self, listener.getsockname(), _Connection)
        self.socket = listener
        self.router = router
        self.closing = False
        self._connections: dict[socket.socket, threading.Thread] = {}
        self._lock = threading.Lock()

    def track(self, connection: socket.socket) -> None:
        with self._lock:
            if self.closing:  # accepted just before the listener closed
                with contextlib.suppress(OSError):
                    connection.shutdown(socket.SHUT_RD)
            self._connections[connection] = threading.current_thread()

    def untrack(self, connection: socket.socket) -> None:
        with self._lock:
            self._connections.pop(connection, None)

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


class ApiServer:
    """Serves ``/api/v1`` on a UNIX socket, one thread per connection.

    ``handler_call(fn)`` must run ``fn(request_handler)`` and return its result
    or raise its exception; the VMM queues ``fn`` onto its control loop and
    waits, tests may call it directly.  It must not return before ``fn`` has
    either run or been definitely dropped (fds handed to ``fn`` are closed if it
    was never entered).

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
    ) -> None:
        if (path is None) == (fd is None):
            raise ValueError("ApiServer needs exactly one of path= or fd=")
        self._router = _Router(handler_call)
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
        server = _Server(listener, self._router)
        thread = threading.Thread(
            target=self._accept_loop, args=(server,), name="api-http", daemon=True
        )
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
            try:
                connection, address = server.socket.accept()
            except OSError as error:
                if self._closing:
                    return
                logger.warning("accept() on the API socket failed: %s", error)
                time.sleep(0.1)  # e.g. out of fds: let the VMM breathe, don't spin
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
