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
