"""Listening Unix sockets that host-side endpoints (serial, vsock) create at a user's path.

A socket file left behind by a dead process is replaced; a live one, or any other kind of
file, is an error for the caller to report.
"""

from __future__ import annotations

import errno
import os
import socket
import stat


def is_stale_socket(path: str) -> bool:
    """Whether ``path`` is a socket file that nothing listens on any more."""
    try:
        if not stat.S_ISSOCK(os.stat(path).st_mode):
            return False
    except FileNotFoundError:
        return False
    probe = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM | socket.SOCK_CLOEXEC)
    try:
        probe.connect(path)
    except ConnectionRefusedError:
        return True
    except OSError:
        return False
    finally:
        probe.close()
    return False


def listen_unix(path: str, backlog: int = 1) -> socket.socket:
    """A non-blocking listening socket at ``path``, replacing a stale socket file there.
    Raises ``OSError`` (EADDRINUSE when someone else listens or another file is there)."""
    sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM | socket.SOCK_CLOEXEC)
    try:
        try:
            sock.bind(path)
        except OSError as e:
            if e.errno != errno.EADDRINUSE or not is_stale_socket(path):
                raise
            os.unlink(path)
            sock.bind(path)
        sock.listen(backlog)
        sock.setblocking(False)
    except BaseException:
        sock.close()
        raise
    return sock
