"""Host-side checks of what pych holds."""

from __future__ import annotations

import fcntl
import os
import struct
import time

_FLOCK = struct.Struct("=hh4xqqi4x")           # struct flock


def fd_is_open(fd: int) -> bool:
    """Whether ``fd`` is an open file descriptor of this process."""
    try:
        os.fstat(fd)
    except OSError:
        return False
    return True


def lock_is_free(path: str | os.PathLike) -> bool:
    """Whether nobody (pych) holds an OFD lock on the file at ``path``: a write lock on the
    whole file can be taken."""
    fd = os.open(path, os.O_RDWR)
    try:
        fcntl.fcntl(fd, fcntl.F_OFD_SETLK, _FLOCK.pack(fcntl.F_WRLCK, os.SEEK_SET, 0, 0, 0))
        return True
    except OSError:
        return False
    finally:
        os.close(fd)


_SO_ACCEPTCON = 0x10000                        # /proc/net/unix Flags of a listening socket


def unix_socket_listening(path: str | os.PathLike) -> bool:
    """Whether a Unix socket bound at ``path`` is listening, from ``/proc/net/unix``.

    A server (virtiofsd) creates the socket file before it calls listen(); waiting for the
    file alone races with that.  Probing with connect() is no way out for a server that
    serves one connection only: the probe would be that connection."""
    target = os.fspath(path)
    with open("/proc/net/unix") as table:
        next(table)                              # the header line
        for line in table:
            fields = line.split()
            if len(fields) >= 8 and fields[7] == target and int(fields[3], 16) & _SO_ACCEPTCON:
                return True
    return False


def process_resources(pid: int) -> tuple[int, int]:
    """(open fds, threads) of process ``pid`` right now."""
    return len(os.listdir(f"/proc/{pid}/fd")), len(os.listdir(f"/proc/{pid}/task"))


def settled_resources(pid: int, expected: tuple[int, int] | None = None, limit: float = 60,
                      interval: float = 0.2) -> tuple[int, int]:
    """(open fds, threads) of process ``pid`` once they have settled, polled every
    ``interval`` s for up to ``limit`` s (a device's worker or an API connection thread may
    still be finishing after the request that ended it has been answered).

    With ``expected``: as soon as they equal it, else the last reading after ``limit`` (so
    the caller's comparison shows what was left). Without: once five readings in a row
    agree."""
    deadline = time.monotonic() + limit
    last, same = process_resources(pid), 0
    while time.monotonic() < deadline:
        if expected is not None and last == expected:
            return last
        if expected is None and same >= 4:
            return last
        time.sleep(interval)
        now = process_resources(pid)
        same = same + 1 if now == last else 0
        last = now
    return last
