"""Guest memory: memfd-backed shared mappings and bounds-checked access.

Every guest physical address in pych goes through :class:`GuestMemory`; devices get this
object (never the VM) and use ``view()`` for zero-copy I/O (``os.preadv`` straight into
guest RAM) and ``read_*``/``write_*`` for descriptors and rings. The same class backs the
fake guest memory used by device unit tests: it needs no KVM.
"""

from __future__ import annotations

import ctypes
import mmap
import os
import struct
import threading
from dataclasses import dataclass, field
from typing import Callable

PAGE_SIZE = 4096


class GuestMemoryError(Exception):
    """A guest address (range) that is not backed by guest RAM."""


@dataclass(eq=False)
class MemoryRegion:
    gpa: int
    size: int
    fd: int                 # memfd (or file) backing the region; -1 for anonymous
    mmap: mmap.mmap
    host_addr: int
    fd_offset: int = 0
    owns_fd: bool = True
    name: str = ""
    slot: int | None = field(default=None)   # KVM memslot, set by the hypervisor layer
    #: For a region of which only parts are guest RAM (virtio-mem's): returns those parts
    #: as ``(offset, length)`` runs in the region; a snapshot or migration copies only
    #: them. None: the whole region is RAM.
    in_use: Callable[[], list[tuple[int, int]]] | None = field(default=None, repr=False)

    @property
    def end(self) -> int:
        return self.gpa + self.size

    def close(self) -> None:
        try:
            self.mmap.close()
        except BufferError:
            # A memoryview into this region is still alive somewhere; the mapping is
            # released when that view goes away.
            pass
        if self.owns_fd and self.fd >= 0:
            os.close(self.fd)
            self.fd = -1


def _host_address(mm: mmap.mmap) -> int:
    buf = ctypes.c_char.from_buffer(mm)
    addr = ctypes.addressof(buf)
    del buf
    return addr


class GuestMemory:
    """A set of non-overlapping regions of guest physical memory."""

    def __init__(self) -> None:
        self._regions: tuple[MemoryRegion, ...] = ()
        self._lock = threading.Lock()
        self._written: set[int] | None = None      # page numbers, while tracking writes
        self._written_lock = threading.Lock()

    # --- device writes (live migration) -----------------------------------------------
    def track_writes(self, enabled: bool) -> None:
        """Record the pages devices may write through this object, for a live migration
        (KVM's dirty log sees only the vCPUs' writes): every :meth:`write`, and every
        :meth:`view` (which may be written through later: its pages are also kept until the
        end, see :meth:`take_written`)."""
        with self._written_lock:
            self._written = set() if enabled else None
            self._viewed: set[int] = set()

    def take_written(self, *, final: bool = False) -> set[int]:
        """The page numbers (``gpa >> 12``) written or viewed since the last call; ``final``
        (the VM paused): also every page viewed since tracking began, so a buffer a device
        filled through a view after its page was sent is sent again, before (or with) the
        used ring entry that completes it."""
        with self._written_lock:
            taken = self._written or set()
            if self._written is not None:
                self._written = set()
                if final:
                    taken |= self._viewed
        return taken

    def _mark(self, gpa: int, length: int, viewed: bool) -> None:
        pages = range(gpa >> 12, ((gpa + max(length, 1) - 1) >> 12) + 1)
        with self._written_lock:
            if self._written is not None:
                self._written.update(pages)
                if viewed:
                    self._viewed.update(pages)

    # --- construction -----------------------------------------------------------------
    @classmethod
    def from_ranges(cls, ranges: list[tuple[int, int]], name: str = "ram") -> "GuestMemory":
        mem = cls()
        for i, (gpa, size) in enumerate(ranges):
            mem.add_region(gpa, size, name=f"{name}{i}")
        return mem

    def add_region(self, gpa: int, size: int, *, fd: int | None = None, fd_offset: int = 0,
                   name: str = "ram", readonly: bool = False, shared: bool = True,
                   hugepage_size: int | None = None, adopt: bool = False) -> MemoryRegion:
        """Map ``size`` bytes at ``gpa``: from ``fd`` (at ``fd_offset``); from a new memfd of
        its own when ``fd`` is None (a hugetlbfs one in pages of ``hugepage_size`` if
        given); private anonymous memory when ``fd`` is -1 (``shared`` is then ignored).
        ``adopt``: ``fd`` is handed over (a local migration's memfd): the region closes it,
        and so does a failure here. Raises OSError if the mapping fails (ENOMEM: a huge page
        pool too small)."""
        if size <= 0 or size % PAGE_SIZE or gpa % PAGE_SIZE:
            if adopt and fd is not None and fd >= 0:
                os.close(fd)
            raise GuestMemoryError(f"region {gpa:#x}+{size:#x} is not page aligned")
        owns_fd = fd is None or (adopt and fd >= 0)
        if fd is None:
            if hugepage_size:
                from pych.memory.hugepages import memfd
                fd = memfd(f"pych-{name}", size, hugepage_size)
            else:
                fd = os.memfd_create(f"pych-{name}", os.MFD_CLOEXEC)
                os.ftruncate(fd, size)
        prot = mmap.PROT_READ | (0 if readonly else mmap.PROT_WRITE)
        flags = mmap.MAP_SHARED if shared and fd >= 0 else mmap.MAP_PRIVATE
        try:
            if fd < 0:
                mm = mmap.mmap(-1, size, flags=flags, prot=prot)
            else:
                mm = mmap.mmap(fd, size, flags=flags, prot=prot, offset=fd_offset)
        except Exception:
            if owns_fd:
                os.close(fd)
            raise
        region = MemoryRegion(gpa, size, fd, mm, _host_address(mm), fd_offset, owns_fd, name)
        with self._lock:
            for r in self._regions:
                if gpa < r.end and r.gpa < gpa + size:
                    region.close()
                    raise GuestMemoryError(
                        f"region {gpa:#x}+{size:#x} overlaps {r.gpa:#x}+{r.size:#x}")
            self._regions = tuple(sorted(self._regions + (region,), key=lambda r: r.gpa))
        return region

    def remove_region(self, region: MemoryRegion) -> None:
        with self._lock:
            self._regions = tuple(r for r in self._regions if r is not region)
        region.close()

    def close(self) -> None:
        with self._lock:
            regions, self._regions = self._regions, ()
        for r in regions:
            r.close()

    # --- queries ----------------------------------------------------------------------
    @property
    def regions(self) -> tuple[MemoryRegion, ...]:
        return self._regions

    @property
    def total_size(self) -> int:
        return sum(r.size for r in self._regions)

    @property
    def end(self) -> int:
        """One past the highest guest physical address backed by RAM."""
        return max((r.end for r in self._regions), default=0)

    def region_for(self, gpa: int, length: int = 1) -> MemoryRegion:
        for r in self._regions:
            if r.gpa <= gpa and gpa + length <= r.end:
                return r
        raise GuestMemoryError(f"guest range {gpa:#x}+{length:#x} is not in guest RAM")

    def is_valid(self, gpa: int, length: int = 1) -> bool:
        try:
            self.region_for(gpa, length)
            return True
        except GuestMemoryError:
            return False

    # --- access -----------------------------------------------------------------------
    def view(self, gpa: int, length: int) -> memoryview:
        """A writable zero-copy view of ``length`` bytes at ``gpa`` (within one region)."""
        if length < 0:
            raise GuestMemoryError(f"negative length at {gpa:#x}")
        r = self.region_for(gpa, max(length, 1))
        off = gpa - r.gpa
        if self._written is not None:
            self._mark(gpa, length, True)
        return memoryview(r.mmap)[off:off + length]

    def read(self, gpa: int, length: int) -> bytes:
        r = self.region_for(gpa, max(length, 1))
        off = gpa - r.gpa
        return r.mmap[off:off + length]

    def write(self, gpa: int, data: bytes | bytearray | memoryview) -> None:
        n = len(data)
        r = self.region_for(gpa, max(n, 1))
        off = gpa - r.gpa
        r.mmap[off:off + n] = data
        if self._written is not None:
            self._mark(gpa, n, False)

    def read_u8(self, gpa: int) -> int:
        return self.read(gpa, 1)[0]

    def read_u16(self, gpa: int) -> int:
        return struct.unpack("<H", self.read(gpa, 2))[0]

    def read_u32(self, gpa: int) -> int:
        return struct.unpack("<I", self.read(gpa, 4))[0]

    def read_u64(self, gpa: int) -> int:
        return struct.unpack("<Q", self.read(gpa, 8))[0]

    def write_u8(self, gpa: int, v: int) -> None:
        self.write(gpa, bytes((v & 0xFF,)))

    def write_u16(self, gpa: int, v: int) -> None:
        self.write(gpa, struct.pack("<H", v & 0xFFFF))

    def write_u32(self, gpa: int, v: int) -> None:
        self.write(gpa, struct.pack("<I", v & 0xFFFF_FFFF))

    def write_u64(self, gpa: int, v: int) -> None:
        self.write(gpa, struct.pack("<Q", v & 0xFFFF_FFFF_FFFF_FFFF))

    def read_obj(self, gpa: int, ctype):
        return ctype.from_buffer_copy(self.read(gpa, ctypes.sizeof(ctype)))

    def write_obj(self, gpa: int, obj) -> None:
        self.write(gpa, bytes(obj))
