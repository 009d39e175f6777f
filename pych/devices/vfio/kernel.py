"""The boundary between pych's VFIO code and the host kernel.

Everything VFIO does to the host goes through one :class:`VfioKernel`: opening the
``/dev/vfio`` nodes, the ioctls (argument structures passed as mutable buffers, so the
kernel's answers land in them), reads and writes of device regions and their mmaps. The
host implementation is a thin layer over ``os``, ``fcntl`` and ``mmap``; the unit tests
put a fake kernel that answers the ioctls in its place.
"""

from __future__ import annotations

import fcntl
import mmap
import os
from typing import Protocol


class VfioKernel(Protocol):
    def open(self, path: str) -> int: ...

    def close(self, fd: int) -> None: ...

    def ioctl(self, fd: int, request: int, arg: int | bytearray = 0) -> int:
        """The ioctl's return value; a ``bytearray`` argument is updated in place.
        Raises ``OSError`` as the kernel answered."""

    def pread(self, fd: int, size: int, offset: int) -> bytes: ...

    def pwrite(self, fd: int, data: bytes, offset: int) -> None: ...

    def mmap(self, fd: int, size: int, offset: int) -> mmap.mmap: ...


class HostVfioKernel:
    """The real kernel."""

    def open(self, path: str) -> int:
        return os.open(path, os.O_RDWR | os.O_CLOEXEC)

    def close(self, fd: int) -> None:
        os.close(fd)

    def ioctl(self, fd: int, request: int, arg: int | bytearray = 0) -> int:
        if isinstance(arg, bytearray):
            return fcntl.ioctl(fd, request, arg, True)
        return fcntl.ioctl(fd, request, arg)

    def pread(self, fd: int, size: int, offset: int) -> bytes:
        data = os.pread(fd, size, offset)
        if len(data) != size:
            raise OSError(f"short read of {len(data)} of {size} bytes at {offset:#x}")
        return data

    def pwrite(self, fd: int, data: bytes, offset: int) -> None:
        written = os.pwrite(fd, data, offset)
        if written != len(data):
            raise OSError(f"short write of {written} of {len(data)} bytes at {offset:#x}")

    def mmap(self, fd: int, size: int, offset: int) -> mmap.mmap:
        return mmap.mmap(fd, size, flags=mmap.MAP_SHARED,
                         prot=mmap.PROT_READ | mmap.PROT_WRITE, offset=offset)
