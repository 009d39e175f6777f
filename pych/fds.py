"""File descriptors handed to pych (tap fds with ``vm.add-net``, SCM_RIGHTS fds on the API
socket, ``--net fd=``): whoever took them must close them, on success and on failure alike."""

from __future__ import annotations

import contextlib
import os
from collections.abc import Iterable


def close_fds(fds: Iterable[int]) -> None:
    """Close every fd of ``fds``. One that is already closed (or was never valid) is skipped,
    so a failure path can close everything it may own without tracking which are still open."""
    for fd in fds:
        with contextlib.suppress(OSError):
            os.close(fd)
