"""Host-side checks of what pych holds."""

from __future__ import annotations

import fcntl
import os
import struct

_FLOCK = struct.Struct("=hh4xqqi4x")           # struct flock


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
