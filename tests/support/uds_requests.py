"""A ``requests`` session that talks HTTP over a Unix socket (for schemathesis, whose
transport is ``requests``): ``http://localhost/...`` URLs go to the given socket path."""

from __future__ import annotations

import socket

import requests
from requests.adapters import HTTPAdapter
from urllib3.connection import HTTPConnection
from urllib3.connectionpool import HTTPConnectionPool


class _UnixConnection(HTTPConnection):
    def __init__(self, path: str, *args, **kwargs):
        super().__init__("localhost", *args, **kwargs)
        self._path = path

    def connect(self) -> None:
        s = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        s.settimeout(self.timeout if isinstance(self.timeout, (int, float)) else 60)
        s.connect(self._path)
        self.sock = s


class _UnixPool(HTTPConnectionPool):
    def __init__(self, path: str):
        super().__init__("localhost")
        self._path = path

    def _new_conn(self) -> _UnixConnection:
        return _UnixConnection(self._path, timeout=60)


class _UnixAdapter(HTTPAdapter):
    def __init__(self, path: str):
        super().__init__()
        self._pool = _UnixPool(path)

    def get_connection_with_tls_context(self, request, verify, proxies=None, cert=None):
        return self._pool

    def get_connection(self, url, proxies=None):
        return self._pool


def unix_session(path: str) -> requests.Session:
    s = requests.Session()
    s.mount("http://localhost", _UnixAdapter(path))
    return s
