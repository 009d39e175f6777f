"""A client for the ``/api/v1`` REST API on a UNIX socket (keep-alive, SCM_RIGHTS)."""

from __future__ import annotations

import array
import http.client
import json
import os
import socket
from collections.abc import Sequence
from typing import Any


API_ROOT = "/api/v1"

# Failures of a reused keep-alive connection that the server may have closed
# while it sat idle: the request never reached it, so sending it again is safe.
_STALE_CONNECTION_ERRORS = (
    http.client.RemoteDisconnected,
    BrokenPipeError,
    ConnectionResetError,
)


class _UnixHTTPConnection(http.client.HTTPConnection):
    """``HTTPConnection`` over AF_UNIX whose next request can carry fds.

    The fds ride as SCM_RIGHTS on the first ``send`` of the request, the one
    holding its request line and headers (as ch-remote sends them)."""

    def __init__(self, socket_path: str, timeout: float | None) -> None:
        super().__init__("localhost", timeout=timeout)
        self.socket_path = socket_path
        self.fds_to_send: Sequence[int] = ()
        self.answered = 0  # responses received on the current socket

    def connect(self) -> None:
        sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        try:
            sock.settimeout(self.timeout)
            sock.connect(self.socket_path)
        except BaseException:
            sock.close()
            raise
        self.sock = sock
        self.answered = 0

    def send(self, data: Any) -> None:
        fds, self.fds_to_send = self.fds_to_send, ()
        if not fds:
            super().send(data)
            return
        if self.sock is None:
            self.connect()
        data = memoryview(bytes(data))
        rights = [(socket.SOL_SOCKET, socket.SCM_RIGHTS, array.array("i", fds))]
        sent = self.sock.sendmsg([data], rights)
        self.sock.sendall(data[sent:])


class ApiClient:
    """Requests to a pych (or Cloud Hypervisor) API socket over one keep-alive
    connection, opened on first use and re-opened if the server dropped it.

    ``path`` arguments are either full request targets (``/api/v1/vm.info``) or
    endpoint names (``vm.info``).  Bodies may be ``bytes``/``str`` (sent as is),
    a pydantic model or any JSON-serialisable value.  Not thread-safe: use one
    client per thread.
    """

    def __init__(self, socket_path: str | os.PathLike[str], timeout: float | None = None) -> None:
        self._connection = _UnixHTTPConnection(os.fspath(socket_path), timeout)

    def connect(self) -> None:
        """Open the connection now (otherwise the first request does); raises
        ``OSError`` (e.g. ``FileNotFoundError``) if the socket is unreachable."""
        if self._connection.sock is None:
            self._connection.connect()

    def request(
        self, method: str, path: str, body: Any = None, fds: Sequence[int] = ()
    ) -> tuple[int, bytes]:
        """Send one request, return ``(status, response body)``.

        ``fds`` are passed to the server with SCM_RIGHTS (they stay open here)."""
        target = path if path.startswith("/") else f"{API_ROOT}/{path}"
        payload = _encode(body)
        headers = {"Accept": "*/*"}
        if payload is not None:
            headers["Content-Type"] = "application/json"
        # Only a connection that has served before may have been closed by the
        # server while idle; any other failure is reported, never retried.
        reused = self._connection.sock is not None and self._connection.answered > 0
        try:
            return self._exchange(method, target, payload, headers, fds)
        except _STALE_CONNECTION_ERRORS:
            if not reused:
                raise
            return self._exchange(method, target, payload, headers, fds)  # on a new connection

    def put(self, path: str, body: Any = None, fds: Sequence[int] = ()) -> tuple[int, bytes]:
        return self.request("PUT", path, body, fds)

    def get(self, path: str) -> tuple[int, bytes]:
        return self.request("GET", path)

    def close(self) -> None:
        self._connection.close()

    def __enter__(self) -> ApiClient:
        return self

    def __exit__(self, *exc_info: object) -> None:
        self.close()

    def _exchange(
        self,
        method: str,
        target: str,
        payload: bytes | None,
        headers: dict[str, str],
        fds: Sequence[int],
    ) -> tuple[int, bytes]:
        self._connection.fds_to_send = tuple(fds)
        try:
            self._connection.request(method, target, body=payload, headers=headers)
            response = self._connection.getresponse()
            body = response.read()
            self._connection.answered += 1
            return response.status, body
        except BaseException:
            self._connection.close()  # its state is unknown: start afresh next time
            raise
        finally:
            self._connection.fds_to_send = ()


def _encode(body: Any) -> bytes | None:
    if body is None or isinstance(body, bytes):
        return body
    if isinstance(body, str):
        return body.encode()
    if hasattr(type(body), "model_dump_json"):
        # A pydantic model, recognised without importing pydantic.BaseModel: that import
        # took ~40 ms of a client's first request when nothing else had made it.
        return body.model_dump_json(exclude_none=True).encode()
    return json.dumps(body, separators=(",", ":")).encode()
