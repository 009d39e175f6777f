"""Memory zones: the user's ``--memory-zone`` options, or the one default zone ``mem0`` made of
``--memory``. Each zone's boot RAM is one memfd (or its ``file``) that the memory manager maps
where :func:`~pych.memory.layout.boot_ram_layout` places it; a zone with a ``hotplug_size``
under virtio-mem also gets a :class:`VirtioMemZone`.
"""

from __future__ import annotations

import mmap
import os
from dataclasses import dataclass

from pych.devices.virtio.mem import VirtioMem
from pych.memory import hugepages
from pych.memory.guest_memory import MemoryRegion

DEFAULT_MEMORY_ZONE = "mem0"
"""The zone (and virtio-mem device id) of ``--memory`` RAM without user-defined zones."""


@dataclass(frozen=True)
class ZoneSpec:
    """One memory zone as the memory manager builds it: a ``--memory-zone``, or the default
    zone ``mem0`` made of ``--memory`` (the reference's single default zone)."""

    id: str
    size: int
    hotplug_size: int | None = None       # virtio-mem only (ACPI DIMMs are not zone RAM)
    hotplugged_size: int | None = None
    file: str | None = None
    shared: bool = False
    hugepages: bool = False
    host_numa_node: int | None = None
    prefault: bool = False
    option: str = "--memory"            # what the user wrote, for error messages
    thp: bool = True                    # --memory thp: MADV_HUGEPAGE on its RAM
    hugepage_size: int | None = None    # hugepages=on: None is the host's default size
    mergeable: bool = False             # MADV_MERGEABLE (KSM) on its RAM


def zone_specs(memory) -> list[ZoneSpec]:
    """The zones of the ``MemoryConfig`` ``memory``, in order."""
    if memory.zones:
        return [ZoneSpec(z.id, z.size, z.hotplug_size, z.hotplugged_size, z.file, z.shared,
                         z.hugepages, z.host_numa_node, z.prefault, f"--memory-zone {z.id}",
                         thp=memory.thp and z.file is None and not z.hugepages,
                         hugepage_size=z.hugepage_size, mergeable=z.mergeable)
                for z in memory.zones]
    virtio_mem = memory.hotplug_method == "VirtioMem"
    return [ZoneSpec(DEFAULT_MEMORY_ZONE, memory.size,
                     memory.hotplug_size if virtio_mem else None,
                     memory.hotplugged_size if virtio_mem else None,
                     shared=memory.shared, hugepages=memory.hugepages, prefault=memory.prefault,
                     thp=memory.thp and not memory.hugepages,
                     hugepage_size=memory.hugepage_size, mergeable=memory.mergeable)]


def hugepage_needs(memory) -> list[tuple[str, int, int]]:
    """``(option, huge page size, bytes)`` of each zone's boot RAM backed by huge pages
    (:func:`pych.memory.hugepages.check_available` checks the host has them); raises
    :class:`~pych.memory.hugepages.HugePageError` for a size the host does not offer."""
    return [(spec.option, hugepages.page_size(spec.hugepage_size, spec.option), spec.size)
            for spec in zone_specs(memory) if spec.hugepages and spec.size]


def dimm_hugepage_size(memory) -> int | None:
    """The huge page size of ACPI DIMMs (``--memory hugepages=on``), else None."""
    if not memory.hugepages:
        return None
    return hugepages.page_size(memory.hugepage_size, "--memory")


@dataclass
class VirtioMemZone:
    """A zone's virtio-mem region: guest RAM mapped at boot, of which ``device`` plugs
    blocks (the device manager puts it on the PCI bus). ``initial_size`` is what the device
    asks for at boot (the zone's ``hotplugged_size``)."""

    id: str
    region: MemoryRegion
    initial_size: int
    device: VirtioMem



class MemoryZone:
    """A zone's memory in one boot: the memfd (or ``file``) behind its boot RAM, the pieces
    of boot RAM mapped from it, and its virtio-mem region, if any. Raises ValueError when
    the zone asks for a backing pych cannot give."""

    def __init__(self, spec: ZoneSpec, fd: int | None = None):
        """``fd``: back the zone with this memfd (taken over; a local migration's), not a
        new one."""
        self.spec = spec
        self.id = spec.id
        self.regions: list[MemoryRegion] = []
        self.virtio_mem: VirtioMemZone | None = None
        what = spec.option
        # Refused at the request (pych.config.support); kept so a zone is never backed other
        # than it asks.
        if spec.host_numa_node is not None:
            raise ValueError(f"{what}: host_numa_node is not supported by pych yet")
        self.shared_mapping = True          # a memfd is always mapped shared
        self.fd = -1                        # with a size: anonymous memory (mergeable=on)
        self.hugepage_size: int | None = None
        if spec.hugepages:
            self.hugepage_size = hugepages.page_size(spec.hugepage_size, what)
        if fd is not None:                  # passed by a local migration's sender
            self.fd = fd
            if spec.file is not None:
                self.shared_mapping = spec.shared
        elif spec.file is not None:
            self.fd = _open_backing_file(what, spec.file, spec.size, spec.shared)
            self.shared_mapping = spec.shared
        elif spec.hugepages:
            if spec.size:
                self.fd = hugepages.memfd(f"pych-{spec.id}", spec.size, self.hugepage_size)
        elif spec.mergeable:
            # KSM merges only private anonymous pages: this zone's RAM is private to pych
            # (no vhost-user back-end can map it; refused at the request).
            self.shared_mapping = False
        elif spec.size:
            self.fd = os.memfd_create(f"pych-{spec.id}", os.MFD_CLOEXEC)
            try:
                os.ftruncate(self.fd, spec.size)
            except OSError:
                self.close()
                raise

    def close(self) -> None:
        if self.fd >= 0:
            os.close(self.fd)
            self.fd = -1


def _open_backing_file(what: str, path: str, size: int, shared: bool) -> int:
    """``path`` opened to back ``size`` bytes (read-write when ``shared``: guest writes go
    to the file; else read-only, mapped private)."""
    if os.path.isdir(path):
        raise ValueError(f"{what}: the backing file {path} is a directory (give a file)")
    try:
        fd = os.open(path, (os.O_RDWR if shared else os.O_RDONLY) | os.O_CLOEXEC)
    except OSError as e:
        raise ValueError(f"{what}: cannot open the backing file {path}: {e.strerror}") from None
    length = os.fstat(fd).st_size
    if length < size:
        os.close(fd)
        raise ValueError(f"{what}: the backing file {path} has {length} bytes, fewer than the "
                         f"{size} bytes of memory it backs")
    return fd


MADV_POPULATE_WRITE = 23        # Linux 5.14; not in Python 3.11's mmap module


def transparent_huge_pages(region: MemoryRegion, what: str) -> None:
    """``thp=on`` (the default): ask for transparent huge pages on ``region``
    (``MADV_HUGEPAGE``, as the reference does).  pych's RAM is a memfd (shmem), so whether
    the guest then gets huge pages is the host's ``shmem_enabled`` setting (``advise`` or
    ``within_size`` honours it; ``never``, a common default, does not); the mapping carries
    the advice (``hg`` in ``/proc/<pid>/smaps``) either way."""
    try:
        region.mmap.madvise(mmap.MADV_HUGEPAGE)
    except OSError as e:
        raise ValueError(f"{what}: cannot ask for transparent huge pages (thp=on): "
                         f"{e.strerror}") from None


def mergeable(region: MemoryRegion, what: str) -> None:
    """``mergeable=on``: let KSM merge identical pages of ``region`` (``MADV_MERGEABLE``; the
    mapping then carries ``mg`` in ``/proc/<pid>/smaps``; KSM itself runs when the host's
    ``/sys/kernel/mm/ksm/run`` is 1)."""
    try:
        region.mmap.madvise(mmap.MADV_MERGEABLE)
    except OSError as e:
        raise ValueError(f"{what}: cannot mark guest RAM mergeable (mergeable=on): "
                         f"{e.strerror}") from None


def map_error(e: OSError, what: str, hugepage_size: int | None, size: int) -> ValueError:
    """The error of mapping ``size`` bytes of RAM for ``what`` that failed with ``e``: with
    huge pages, ENOMEM means the host's pool ran short (reserved at mmap)."""
    if hugepage_size and e.errno in (12, 28):                  # ENOMEM, ENOSPC
        return ValueError(f"{what} hugepages=on: the host has too few free huge pages of "
                          f"{hugepage_size >> 20} MiB for {size >> 20} MiB of guest RAM "
                          f"({e.strerror}; see HugePages_Free in /proc/meminfo)")
    return ValueError(f"{what}: cannot map {size >> 20} MiB of guest RAM: {e.strerror}")


def prefault(region: MemoryRegion, what: str) -> None:
    """``prefault=on``: fault in every page of ``region`` now; of a region only partly RAM
    (virtio-mem's, ``region.in_use``), only the parts in use (its plugged blocks)."""
    try:
        if region.in_use is None:
            region.mmap.madvise(MADV_POPULATE_WRITE)
        else:
            for offset, length in region.in_use():
                region.mmap.madvise(MADV_POPULATE_WRITE, offset, length)
    except OSError as e:
        raise ValueError(f"{what}: cannot prefault {region.size} bytes: {e.strerror}") from None

