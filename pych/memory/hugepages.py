"""Huge pages for guest RAM (``hugepages=on``, ``hugepage_size=``): what the host offers and
how many are free, and the hugetlbfs memfd that backs a zone or a DIMM.

The host reserves huge pages up front (``/proc/sys/vm/nr_hugepages``, or per size
``/sys/kernel/mm/hugepages/hugepages-<kB>kB/nr_hugepages``); pych takes them from that pool.
A shared mapping of a hugetlbfs memfd reserves every page it covers when it is mapped
(``HugePages_Rsvd``), so a pool too small makes the mapping fail at once, not a guest access
later; :func:`check_available` says so earlier still, at ``vm.create`` (and before a DIMM is
plugged), naming the option.
"""

from __future__ import annotations

import os
from collections.abc import Iterable
from pathlib import Path

from pych.config import ConfigError

__all__ = ["HugePageError", "check_available", "default_size", "host_sizes", "memfd",
           "page_size", "pool"]

SYSFS = Path("/sys/kernel/mm/hugepages")
MEMINFO = Path("/proc/meminfo")
MFD_HUGETLB = 0x0004
MFD_HUGE_SHIFT = 26
KiB, MiB, GiB = 1 << 10, 1 << 20, 1 << 30


class HugePageError(ConfigError):
    """The host cannot give the huge pages a configuration asks for (HTTP 400)."""


def _size_text(size: int) -> str:
    return f"{size // GiB} GiB" if size >= GiB else f"{size // MiB} MiB"


def host_sizes(sysfs: Path | None = None) -> list[int]:
    """The huge page sizes the host's kernel offers (bytes), smallest first."""
    sysfs = sysfs or SYSFS
    try:
        names = os.listdir(sysfs)
    except OSError:
        return []
    sizes = [int(name[len("hugepages-"):-len("kB")]) * KiB for name in names
             if name.startswith("hugepages-") and name.endswith("kB")]
    return sorted(sizes)


def default_size(meminfo: Path | None = None) -> int | None:
    """The host's default huge page size (``Hugepagesize`` in /proc/meminfo), or None."""
    meminfo = meminfo or MEMINFO
    try:
        for line in meminfo.read_text().splitlines():
            if line.startswith("Hugepagesize:"):
                return int(line.split()[1]) * KiB
    except (OSError, ValueError, IndexError):
        pass
    return None


def page_size(hugepage_size: int | None, what: str) -> int:
    """The huge page size a zone with ``hugepages=on`` gets: ``hugepage_size``, or the host's
    default; :class:`HugePageError` naming ``what`` if the host offers no such size."""
    sizes = host_sizes()
    size = hugepage_size if hugepage_size is not None else default_size()
    if size is None or not sizes:
        raise HugePageError(f"{what} hugepages=on: the host offers no huge pages "
                            f"({SYSFS} is missing: a kernel without hugetlbfs)")
    if size not in sizes:
        raise HugePageError(
            f"{what} hugepage_size={size}: the host offers huge pages of "
            f"{', '.join(_size_text(s) for s in sizes)} only")
    return size


def pool(size: int, sysfs: Path | None = None) -> tuple[int, int, int]:
    """``(total, free, reserved)`` huge pages of ``size`` bytes on the host; free pages that
    are reserved (by a mapping not yet touched) are not available."""
    d = (sysfs or SYSFS) / f"hugepages-{size // KiB}kB"
    try:
        return tuple(int((d / name).read_text()) for name in (   # type: ignore[return-value]
            "nr_hugepages", "free_hugepages", "resv_hugepages"))
    except (OSError, ValueError):
        return 0, 0, 0


def check_available(needs: Iterable[tuple[str, int, int]]) -> None:
    """``needs``: ``(what, hugepage_size, bytes)`` for each piece of RAM to back with huge
    pages.  Raises :class:`HugePageError` naming the first size whose free (unreserved)
    pages are fewer than the pieces of that size need together."""
    by_size: dict[int, list[tuple[str, int]]] = {}
    for what, size, length in needs:
        by_size.setdefault(size, []).append((what, length))
    for size, pieces in by_size.items():
        wanted = sum(-(-length // size) for _, length in pieces)
        total, free, reserved = pool(size)
        available = free - reserved
        if wanted > available:
            names = ", ".join(dict.fromkeys(what for what, _ in pieces))
            raise HugePageError(
                f"{names} hugepages=on: the guest RAM needs {wanted} huge pages of "
                f"{_size_text(size)}, the host has {max(available, 0)} free (of {total}; "
                f"HugePages_Free less HugePages_Rsvd): reserve more with "
                f"/sys/kernel/mm/hugepages/hugepages-{size // KiB}kB/nr_hugepages "
                f"(/proc/sys/vm/nr_hugepages for the default size)")


def memfd(name: str, size: int, hugepage_size: int) -> int:
    """A hugetlbfs memfd of ``size`` bytes in pages of ``hugepage_size`` (close-on-exec)."""
    shift = hugepage_size.bit_length() - 1
    fd = os.memfd_create(name, os.MFD_CLOEXEC | MFD_HUGETLB | (shift << MFD_HUGE_SHIFT))
    try:
        os.ftruncate(fd, size)
    except OSError:
        os.close(fd)
        raise
    return fd
