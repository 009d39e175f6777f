"""virtio-pmem (virtio 1.x §5.19): a host file mapped straight into guest physical memory.

The file is ``mmap``ed (shared, or private with ``discard_writes`` so guest writes never
reach it) and the mapping becomes a KVM memslot at a 2 MiB aligned address of the
PCI segment's 64-bit window.  The guest's virtio_pmem driver reads that range from the
config space (``start``, ``size``) and exposes it as ``/dev/pmem0``: its loads and
stores hit the host page cache without any exit.  The one request is FLUSH, which the
device answers after ``fsync`` of the file (the shared mapping *is* the page cache).

The mapping is placed through an injected :class:`GuestMapper`, so the device never
sees the VM; :meth:`VirtioPmem.close_backend` takes it out of the guest again.
"""

from __future__ import annotations

import logging
import mmap
import os
import stat
import struct
from typing import Protocol

from pych.guest_log import GuestLog
from pych.memory.guest_memory import _host_address

from .device import VirtioDevice, VirtioDeviceType
from .queue import DescriptorChain

log = logging.getLogger(__name__)
_guest_log = GuestLog(log)       # what the guest can repeat at will is rate-limited

ALIGNMENT = 2 << 20                         # the reference's (and Linux's) section alignment
DEFAULT_QUEUE_SIZE = 256
VIRTIO_PMEM_REQ_TYPE_FLUSH = 0
RESPONSE_OK = 0
RESPONSE_ERROR = 1

_CONFIG = struct.Struct("<QQ")              # start, size
_REQUEST = struct.Struct("<I")
_RESPONSE = struct.Struct("<I")


class PmemError(OSError):
    """The backing file cannot be used; the message says why."""


class GuestMapper(Protocol):
    """Places host memory in the guest physical address space."""

    def map(self, host_addr: int, size: int, alignment: int) -> int:
        """Map ``size`` bytes at ``host_addr``; return the guest physical address."""

    def unmap(self, gpa: int) -> None:
        """Undo :meth:`map`."""


class VirtioPmem(VirtioDevice):
    device_type = VirtioDeviceType.PMEM

    def __init__(self, path: str | os.PathLike, mapper: GuestMapper, *, size: int | None = None,
                 discard_writes: bool = False, queue_size: int = DEFAULT_QUEUE_SIZE,
                 name: str = "pmem") -> None:
        """Open ``path`` (a directory: a new unnamed file of ``size`` bytes in it), map it
        and place it in the guest.  Raises :class:`PmemError` and then holds nothing."""
        super().__init__(name=name, queue_sizes=[queue_size])
        self.path = os.fspath(path)
        self.discard_writes = discard_writes
        self.fd = self._open(size)
        try:
            self.size = self._check_size(size)
            try:
                self._mmap = mmap.mmap(
                    self.fd, self.size, prot=mmap.PROT_READ | mmap.PROT_WRITE,
                    flags=mmap.MAP_PRIVATE if discard_writes else mmap.MAP_SHARED)
            except OSError as e:
                raise PmemError(f"cannot map pmem file {self.path}: {e.strerror}") from e
            try:
                self.gpa = mapper.map(_host_address(self._mmap), self.size, ALIGNMENT)
            except Exception as e:
                self._mmap.close()
                raise PmemError(f"no guest address range for pmem {self.path}: {e}") from e
        except BaseException:
            os.close(self.fd)
            raise
        self._mapper = mapper
        self.flushes = 0

    def _open(self, size: int | None) -> int:
        access = os.O_RDONLY if self.discard_writes else os.O_RDWR
        try:
            if os.path.isdir(self.path):
                if size is None:
                    raise PmemError(f"pmem {self.path} is a directory: give a size")
                fd = os.open(self.path, os.O_TMPFILE | os.O_RDWR | os.O_CLOEXEC, 0o600)
                try:
                    os.ftruncate(fd, size)
                except OSError:
                    os.close(fd)
                    raise
                return fd
            return os.open(self.path, access | os.O_CLOEXEC)
        except OSError as e:
            raise PmemError(f"cannot open pmem file {self.path}: {e.strerror}") from e

    def _check_size(self, size: int | None) -> int:
        st = os.fstat(self.fd)
        actual = st.st_size if stat.S_ISREG(st.st_mode) else os.lseek(self.fd, 0, os.SEEK_END)
        size = actual if size is None else size
        if size == 0 or size % ALIGNMENT:
            raise PmemError(f"pmem {self.path}: size {size:#x} is not a non-zero multiple of 2 MiB")
        if size > actual:
            raise PmemError(f"pmem {self.path}: size {size:#x} is larger than the file ({actual:#x})")
        return size

    # --- config space -------------------------------------------------------------------------
    def config_bytes(self) -> bytes:
        return _CONFIG.pack(self.gpa, self.size)

    # --- requests -----------------------------------------------------------------------------
    def handle_chain(self, index: int, chain: DescriptorChain) -> int:
        request = chain.reader().read(_REQUEST.size)
        writer = chain.writer()
        if len(request) < _REQUEST.size or writer.remaining < _RESPONSE.size:
            _guest_log.warning("%s: malformed request (head %d)", self.name, chain.head)
            return 0
        status = RESPONSE_ERROR
        if _REQUEST.unpack(request)[0] == VIRTIO_PMEM_REQ_TYPE_FLUSH:
            status = self._flush()
        return writer.write(_RESPONSE.pack(status))

    def _flush(self) -> int:
        if self.discard_writes:
            return RESPONSE_OK                   # nothing the guest wrote is meant to persist
        try:
            os.fsync(self.fd)
        except OSError as e:
            _guest_log.warning("%s: flush failed: %s", self.name, e.strerror)
            return RESPONSE_ERROR
        self.flushes += 1
        return RESPONSE_OK

    def close_backend(self) -> None:
        if self.fd < 0:
            return
        self._mapper.unmap(self.gpa)
        self._mmap.close()
        os.close(self.fd)
        self.fd = -1
