"""virtio-balloon (virtio 1.x §5.5): take guest RAM back on request.

The host sets the target (:meth:`VirtioBalloon.resize`, from ``vm.resize``'s
``desired_balloon``) in the config space's ``num_pages`` and raises a config interrupt;
the guest driver allocates that many 4 KiB pages and lists their frame numbers on the
inflate queue, and the device discards them (``MADV_REMOVE`` on the memfd-backed
mapping frees the host memory; the next guest access reads zeros).  Deflating lists
pages the guest takes back: nothing to do, they fault in again.  The driver reports
what it holds in ``actual``.

``deflate_on_oom`` offers VIRTIO_BALLOON_F_DEFLATE_ON_OOM (the guest may shrink the
balloon under memory pressure); ``free_page_reporting`` adds the reporting queue, on
which the guest lends free pages that the device discards the same way.
"""

from __future__ import annotations

import logging
import mmap
import struct

from pych.guest_log import GuestLog
from pych.memory.guest_memory import PAGE_SIZE, GuestMemory, GuestMemoryError

from .device import VirtioDevice, VirtioDeviceType
from .queue import DescriptorChain

log = logging.getLogger(__name__)
_guest_log = GuestLog(log)       # what the guest can repeat at will is rate-limited

# Frame numbers are read from an inflate chain this many at a time: a chain may be up to
# 4 GiB long (the same buffer many times), and is never copied whole.
PFN_BATCH = 4096

VIRTIO_BALLOON_F_DEFLATE_ON_OOM = 1 << 2
VIRTIO_BALLOON_F_REPORTING = 1 << 5

INFLATEQ = 0
DEFLATEQ = 1
REPORTINGQ = 2
DEFAULT_QUEUE_SIZE = 128
PFN_SHIFT = 12                               # balloon pages are 4 KiB whatever the guest's

_CONFIG = struct.Struct("<II")               # num_pages, actual
_ACTUAL_OFFSET = 4


class VirtioBalloon(VirtioDevice):
    device_type = VirtioDeviceType.BALLOON

    def __init__(self, size: int = 0, *, deflate_on_oom: bool = False,
                 free_page_reporting: bool = False, queue_size: int = DEFAULT_QUEUE_SIZE,
                 name: str = "balloon") -> None:
        features = ((VIRTIO_BALLOON_F_DEFLATE_ON_OOM if deflate_on_oom else 0)
                    | (VIRTIO_BALLOON_F_REPORTING if free_page_reporting else 0))
        queues = 3 if free_page_reporting else 2
        super().__init__(name=name, queue_sizes=[queue_size] * queues, features=features)
        self.num_pages = size >> PFN_SHIFT
        self.actual_pages = 0
        self.discarded_pages = 0

    @property
    def target_size(self) -> int:
        return self.num_pages << PFN_SHIFT

    @property
    def actual_size(self) -> int:
        """What the guest says the balloon holds, in bytes."""
        return self.actual_pages << PFN_SHIFT

    def resize(self, size: int) -> None:
        """Ask the guest to make the balloon ``size`` bytes (rounded down to 4 KiB)."""
        self.num_pages = size >> PFN_SHIFT
        self.config_changed()

    # --- config space -------------------------------------------------------------------------
    def config_bytes(self) -> bytes:
        return _CONFIG.pack(self.num_pages, self.actual_pages)

    def write_config(self, offset: int, size: int, value: int) -> None:
        if (offset, size) == (_ACTUAL_OFFSET, 4):
            self.actual_pages = value
        else:
            super().write_config(offset, size, value)

    # --- requests -----------------------------------------------------------------------------
    def handle_chain(self, index: int, chain: DescriptorChain) -> int:
        if index == INFLATEQ:
            reader = chain.reader()
            while reader.remaining >= 4:
                data = reader.read(min(reader.remaining, PFN_BATCH * 4) & ~3)
                pfns = struct.unpack_from(f"<{len(data) // 4}I", data)
                for gpa, length in _page_runs(pfns):
                    self._discard(gpa, length)
        elif index == REPORTINGQ:
            for buffer in chain.writable:
                self._discard(buffer.gpa, buffer.length)
        return 0                              # DEFLATEQ: the pages fault back in on use

    def _discard(self, gpa: int, length: int) -> None:
        """Give ``[gpa, gpa + length)`` back to the host (whole pages only)."""
        mem: GuestMemory = self.mem
        start = (gpa + PAGE_SIZE - 1) & ~(PAGE_SIZE - 1)
        end = (gpa + length) & ~(PAGE_SIZE - 1)
        while start < end:
            try:
                region = mem.region_for(start)
            except GuestMemoryError:
                _guest_log.warning("%s: guest asked to discard %#x+%#x, which is not RAM",
                                   self.name, start, end - start)
                return
            n = min(end, region.end) - start
            try:
                region.mmap.madvise(mmap.MADV_REMOVE, start - region.gpa, n)
            except OSError as e:
                _guest_log.warning("%s: cannot discard %#x+%#x: %s", self.name, start, n,
                                   e.strerror)
                return
            self.discarded_pages += n >> PFN_SHIFT
            start += n


def _page_runs(pfns) -> list[tuple[int, int]]:
    """Frame numbers as (guest address, length) runs of consecutive pages."""
    runs: list[tuple[int, int]] = []
    for pfn in sorted(pfns):
        gpa = pfn << PFN_SHIFT
        if runs and runs[-1][0] + runs[-1][1] == gpa:
            runs[-1] = (runs[-1][0], runs[-1][1] + PAGE_SIZE)
        elif not runs or runs[-1][0] + runs[-1][1] < gpa:
            runs.append((gpa, PAGE_SIZE))
    return runs
