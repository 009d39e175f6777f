"""Split virtqueues (virtio 1.x §2.7) over :class:`~pych.memory.guest_memory.GuestMemory`.

The device side of one queue: :meth:`Virtqueue.pop` walks the next available descriptor
chain (direct or indirect) into a :class:`DescriptorChain` of guest buffers,
:meth:`Virtqueue.add_used` returns it, and ``enable_notification``/``disable_notification``/
``needs_notification`` implement both notification-suppression schemes (ring flags, and
``VIRTIO_F_EVENT_IDX``'s ``used_event``/``avail_event``).

The guest is untrusted.  Every way a driver can break the ring contract has a name in
:class:`QueueError`; a malformed chain is counted, reported once per kind, handed back to
the driver as used with length 0 (so its descriptors are not leaked) and skipped.  Nothing
a guest writes makes ``pop`` raise.

Memory ordering.  The rings are shared with vCPUs running guest code.  Indices are read
and written through ``memoryview.cast("H")`` items, which CPython copies with one aligned
16-bit load/store, so neither side ever sees a torn index.  x86 keeps loads ordered with
loads and stores with stores (TSO), which covers "read avail.idx, then the ring" and
"write the used element, then used.idx".  The one reordering x86 does allow is a later
load passing an earlier store; the event-index handshake depends on exactly that pair
("publish avail_event, then re-read avail.idx" and "publish used.idx, then read
used_event"), so those go through :func:`memory_fence`.
"""

from __future__ import annotations

import collections
import enum
import logging
import struct
import sys
import threading
from collections.abc import Callable, Iterator
from typing import NamedTuple

from pych.guest_log import GuestLog
from pych.memory.guest_memory import GuestMemory, GuestMemoryError

if sys.byteorder != "little":           # pragma: no cover - the rings are little-endian
    raise ImportError("pych.devices.virtio.queue assumes a little-endian host")

log = logging.getLogger(__name__)
_guest_log = GuestLog(log)       # what the guest can repeat at will is rate-limited

VIRTQ_DESC_F_NEXT = 1
VIRTQ_DESC_F_WRITE = 2
VIRTQ_DESC_F_INDIRECT = 4
VIRTQ_AVAIL_F_NO_INTERRUPT = 1
VIRTQ_USED_F_NO_NOTIFY = 1

MAX_QUEUE_SIZE = 32768
DESCRIPTOR_SIZE = 16
MAX_CHAIN_BYTES = 1 << 32

_DESCRIPTOR = struct.Struct("<QIHH")     # addr, len, flags, next


def desc_table_size(size: int) -> int:
    return DESCRIPTOR_SIZE * size


def avail_ring_size(size: int) -> int:
    return 6 + 2 * size                  # flags, idx, ring[size], used_event


def used_ring_size(size: int) -> int:
    return 6 + 8 * size                  # flags, idx, ring[size] of (id, len), avail_event


_FENCE = threading.Lock()


def memory_fence() -> None:
    """A full barrier: acquiring a lock is a locked read-modify-write, which drains the
    store buffer before any later load (x86 has no cheaper store-load fence)."""
    with _FENCE:
        pass


class QueueError(enum.Enum):
    """Each way a driver can break the split-ring contract."""

    # Queue setup (reported when the driver enables the queue).
    INVALID_SIZE = "queue size is not a power of two in 1..32768"
    RING_MISALIGNED = "a ring is not aligned as the spec requires (16/2/4)"
    RING_OUT_OF_MEMORY = "a ring does not lie in guest RAM"
    # The available ring.
    AVAIL_INDEX_JUMP = "avail.idx moved ahead by more than the queue size"
    HEAD_OUT_OF_RANGE = "the avail ring names a descriptor past the table"
    # Descriptor chains.
    DESCRIPTOR_OUT_OF_RANGE = "a next index points past the descriptor table"
    CHAIN_TOO_LONG = "the chain is longer than its table: it loops"
    CHAIN_TOO_LARGE = "the chain's buffers add up to more than 4 GiB"
    BUFFER_OUT_OF_MEMORY = "a buffer does not lie in guest RAM"
    WRITABLE_BEFORE_READABLE = "a device-readable buffer follows a device-writable one"
    INDIRECT_NOT_NEGOTIATED = "an indirect descriptor without VIRTIO_F_INDIRECT_DESC"
    INDIRECT_IN_INDIRECT = "an indirect table contains an indirect descriptor"
    INDIRECT_WITH_NEXT = "a descriptor sets both INDIRECT and NEXT"
    INDIRECT_TABLE_INVALID = "an indirect table's length is 0 or not a multiple of 16"
    INDIRECT_TABLE_OUT_OF_MEMORY = "an indirect table does not lie in guest RAM"


class VirtqueueError(Exception):
    def __init__(self, kind: QueueError, detail: str = "") -> None:
        super().__init__(f"{kind.value}{': ' + detail if detail else ''}")
        self.kind = kind
        self.detail = detail


class Buffer(NamedTuple):
    """A guest buffer lying within one memory region."""
    gpa: int
    length: int


class UsedElement(NamedTuple):
    id: int
    length: int


class _Cursor:
    """Consumes a list of memoryviews front to back."""

    def __init__(self, views: list[memoryview]) -> None:
        self._views = collections.deque(v for v in views if len(v))
        self._remaining = sum(len(v) for v in self._views)
        self._consumed = 0

    @property
    def remaining(self) -> int:
        return self._remaining

    def take(self, n: int) -> list[memoryview]:
        """Up to ``n`` bytes as zero-copy views of guest memory (for readv/preadv/pwritev)."""
        out: list[memoryview] = []
        while n > 0 and self._views:
            view = self._views[0]
            if len(view) <= n:
                out.append(self._views.popleft())
            else:
                out.append(view[:n])
                self._views[0] = view[n:]
            n -= len(out[-1])
        taken = sum(len(v) for v in out)
        self._remaining -= taken
        self._consumed += taken
        return out


class ChainReader(_Cursor):
    """The device-readable bytes of a chain, as a stream."""

    def read(self, n: int) -> bytes:
        """Copy up to ``n`` bytes (headers and other small structures)."""
        return b"".join(self.take(n))


class ChainWriter(_Cursor):
    """The device-writable bytes of a chain, as a stream.

    ``written`` is the used length to report: bytes copied by :meth:`write` plus the
    views handed out by ``take`` (the caller fills those, e.g. with ``os.preadv``).
    """

    @property
    def written(self) -> int:
        return self._consumed

    def write(self, data: bytes | bytearray | memoryview) -> int:
        """Copy as much of ``data`` as fits; returns the byte count."""
        data = memoryview(data).cast("B")
        done = 0
        for view in self.take(len(data)):
            view[:] = data[done:done + len(view)]
            done += len(view)
        return done


class DescriptorChain:
    """One request from the driver: device-readable buffers, then device-writable ones."""

    __slots__ = ("head", "readable", "writable", "_mem")

    def __init__(self, mem: GuestMemory, head: int, readable: tuple[Buffer, ...],
                 writable: tuple[Buffer, ...]) -> None:
        self._mem = mem
        self.head = head
        self.readable = readable
        self.writable = writable

    def __repr__(self) -> str:
        return f"DescriptorChain(head={self.head}, readable={self.readable}, writable={self.writable})"

    @property
    def readable_len(self) -> int:
        return sum(b.length for b in self.readable)

    @property
    def writable_len(self) -> int:
        return sum(b.length for b in self.writable)

    def readable_views(self) -> list[memoryview]:
        return [self._mem.view(b.gpa, b.length) for b in self.readable]

    def writable_views(self) -> list[memoryview]:
        return [self._mem.view(b.gpa, b.length) for b in self.writable]

    def reader(self) -> ChainReader:
        return ChainReader(self.readable_views())

    def writer(self) -> ChainWriter:
        return ChainWriter(self.writable_views())


class Virtqueue:
    """The device side of one split virtqueue.

    Not thread-safe: one worker thread owns a queue between activation and reset.
    """

    def __init__(self, mem: GuestMemory, size: int, desc_table: int, avail_ring: int,
                 used_ring: int, *, event_idx: bool = False, indirect_desc: bool = True,
                 name: str = "virtqueue",
                 on_error: Callable[[Virtqueue, VirtqueueError], None] | None = None) -> None:
        """Raises :class:`VirtqueueError` (setup kinds) if the driver's layout is unusable."""
        if not 1 <= size <= MAX_QUEUE_SIZE or size & (size - 1):
            raise VirtqueueError(QueueError.INVALID_SIZE, f"size {size}")
        if desc_table % 16 or avail_ring % 2 or used_ring % 4:
            raise VirtqueueError(QueueError.RING_MISALIGNED, f"desc={desc_table:#x} "
                                 f"avail={avail_ring:#x} used={used_ring:#x}")
        try:
            self._desc = mem.view(desc_table, desc_table_size(size))
            self._avail = mem.view(avail_ring, avail_ring_size(size)).cast("H")
            self._used = mem.view(used_ring, used_ring_size(size)).cast("H")
            self._used_elems = mem.view(used_ring + 4, 8 * size).cast("I")
        except GuestMemoryError as e:
            raise VirtqueueError(QueueError.RING_OUT_OF_MEMORY, str(e)) from None
        self.mem = mem
        self.size = size
        # The driver's layout, for a back-end outside pych that serves the ring (vhost-user).
        self.desc_table, self.avail_ring, self.used_ring = desc_table, avail_ring, used_ring
        self.name = name
        self.event_idx = event_idx
        self.indirect_desc = indirect_desc
        self.errors: collections.Counter[QueueError] = collections.Counter()
        self._on_error = on_error
        self._next_avail = 0
        self._next_used = 0
        self._signalled_used = 0
        self._bad_avail_idx: int | None = None
        # u16 indices into the cast rings.
        self._used_event = 2 + size            # in the avail ring
        self._avail_event = 2 + 4 * size       # in the used ring

    def close(self) -> None:
        """Drop the views into guest memory (the device was reset)."""
        for view in (self._desc, self._avail, self._used, self._used_elems):
            view.release()

    @property
    def next_avail(self) -> int:
        return self._next_avail

    def save_state(self) -> dict:
        return {"next_avail": self._next_avail, "next_used": self._next_used,
                "signalled_used": self._signalled_used}

    def resume_from_ring(self) -> None:
        """A restored queue: carry on from the used ring's index in guest memory (restored
        with the rest of RAM, so the positions cannot disagree with it). Chains the device
        had taken but not completed when the snapshot was taken are taken again: pych's
        devices complete a queue's chains in order, so they are the ones after it."""
        used = self._used[1]
        self._next_avail = self._next_used = self._signalled_used = used

    @property
    def next_used(self) -> int:
        return self._next_used

    def avail_idx(self) -> int:
        return self._avail[1]

    def used_idx(self) -> int:
        """``used.idx`` as the guest sees it (another process may have served the ring)."""
        return self._used[1]

    def avail_entry(self, position: int) -> int:
        """The head the driver put at ``position`` (a free-running index) of the avail ring."""
        return self._avail[2 + (position & (self.size - 1))]

    def take_over(self, next_avail: int) -> None:
        """Continue a ring someone else served (a vhost-user back-end that went away): the
        used ring goes on from the guest's ``used.idx``, and :meth:`pop` from
        ``next_avail``, the first entry the other side never consumed."""
        self._next_used = self._signalled_used = self._used[1]
        self._next_avail = next_avail & 0xFFFF

    def chain(self, head: int) -> DescriptorChain:
        """The descriptor chain at ``head`` (one the device consumed before: an in-flight
        request being completed). Raises VirtqueueError for a malformed chain."""
        return self._walk(head)

    def has_available(self) -> bool:
        """Whether :meth:`pop` has a chain to look at: ``avail.idx`` is ahead, by no more
        than the queue size (beyond that the index is garbage until the driver repairs it
        or resets the device, and there is nothing to consume)."""
        return 0 < (self._avail[1] - self._next_avail) & 0xFFFF <= self.size

    # --- consuming --------------------------------------------------------------------------
    def pop(self) -> DescriptorChain | None:
        """The next well-formed available chain, or None when there is none."""
        while True:
            avail_idx = self._avail[1]
            pending = (avail_idx - self._next_avail) & 0xFFFF
            if pending == 0:
                return None
            if pending > self.size:
                # Nothing sensible to consume until the driver repairs the index or resets.
                if avail_idx != self._bad_avail_idx:
                    self._bad_avail_idx = avail_idx
                    self._report(VirtqueueError(QueueError.AVAIL_INDEX_JUMP,
                                                f"avail.idx={avail_idx}, next={self._next_avail}"))
                return None
            head = self._avail[2 + (self._next_avail & (self.size - 1))]
            self._next_avail = (self._next_avail + 1) & 0xFFFF
            try:
                return self._walk(head)
            except VirtqueueError as e:
                self._report(e)
                if head < self.size:
                    self.add_used(head, 0)

    def __iter__(self) -> Iterator[DescriptorChain]:
        while (chain := self.pop()) is not None:
            yield chain

    def _walk(self, head: int) -> DescriptorChain:
        if head >= self.size:
            raise VirtqueueError(QueueError.HEAD_OUT_OF_RANGE, f"head {head}, size {self.size}")
        readable: list[Buffer] = []
        writable: list[Buffer] = []
        table, table_len = self._desc, self.size
        in_indirect = seen_writable = False
        index, visited, total = head, 0, 0
        while True:
            if index >= table_len:
                raise VirtqueueError(QueueError.DESCRIPTOR_OUT_OF_RANGE,
                                     f"index {index} in a table of {table_len}")
            visited += 1
            if visited > table_len:
                raise VirtqueueError(QueueError.CHAIN_TOO_LONG, f"more than {table_len} descriptors")
            addr, length, flags, next_index = _DESCRIPTOR.unpack_from(table, DESCRIPTOR_SIZE * index)

            if flags & VIRTQ_DESC_F_INDIRECT:
                table, table_len = self._indirect_table(addr, length, flags, in_indirect)
                in_indirect = True
                index, visited = 0, 0
                continue

            total += length
            if total > MAX_CHAIN_BYTES:
                raise VirtqueueError(QueueError.CHAIN_TOO_LARGE, f"{total} bytes")
            buffers = self._segments(addr, length)
            if flags & VIRTQ_DESC_F_WRITE:
                writable += buffers
                seen_writable = True
            elif seen_writable:
                raise VirtqueueError(QueueError.WRITABLE_BEFORE_READABLE, f"descriptor {index}")
            else:
                readable += buffers
            if not flags & VIRTQ_DESC_F_NEXT:
                return DescriptorChain(self.mem, head, tuple(readable), tuple(writable))
            index = next_index

    def _indirect_table(self, addr: int, length: int, flags: int,
                        in_indirect: bool) -> tuple[memoryview, int]:
        if not self.indirect_desc:
            raise VirtqueueError(QueueError.INDIRECT_NOT_NEGOTIATED)
        if in_indirect:
            raise VirtqueueError(QueueError.INDIRECT_IN_INDIRECT)
        if flags & VIRTQ_DESC_F_NEXT:
            raise VirtqueueError(QueueError.INDIRECT_WITH_NEXT)
        if length == 0 or length % DESCRIPTOR_SIZE:
            raise VirtqueueError(QueueError.INDIRECT_TABLE_INVALID, f"length {length}")
        if length > desc_table_size(MAX_QUEUE_SIZE):
            # Bounds the work and memory one request can cost: no chain has more entries
            # than the largest queue has descriptors.
            raise VirtqueueError(QueueError.INDIRECT_TABLE_INVALID,
                                 f"{length // DESCRIPTOR_SIZE} entries, more than "
                                 f"{MAX_QUEUE_SIZE}")
        try:
            return self.mem.view(addr, length), length // DESCRIPTOR_SIZE
        except GuestMemoryError as e:
            raise VirtqueueError(QueueError.INDIRECT_TABLE_OUT_OF_MEMORY, str(e)) from None

    def _segments(self, gpa: int, length: int) -> list[Buffer]:
        """Split ``[gpa, gpa + length)`` at memory-region boundaries (a buffer may span
        adjacent hot-plugged regions); raise if any byte is not guest RAM."""
        out: list[Buffer] = []
        end = gpa + length
        while gpa < end:
            try:
                region = self.mem.region_for(gpa)
            except GuestMemoryError:
                raise VirtqueueError(QueueError.BUFFER_OUT_OF_MEMORY,
                                     f"{gpa:#x}+{end - gpa:#x}") from None
            n = min(end, region.end) - gpa
            out.append(Buffer(gpa, n))
            gpa += n
        return out

    def _report(self, error: VirtqueueError) -> None:
        self.errors[error.kind] += 1
        if self._on_error is not None:
            self._on_error(self, error)
        elif self.errors[error.kind] == 1:
            # once per queue and kind, and across queues (a reset makes a new queue, and a
            # guest can reset at will) at most once per interval per device queue and kind
            _guest_log.warning("%s: guest error (further ones of this kind are only counted): "
                               "%s", self.name, error, kind=(self.name, error.kind))

    # --- producing ----------------------------------------------------------------------------
    def add_used(self, head: int, length: int) -> None:
        """Return chain ``head`` to the driver with ``length`` bytes written."""
        if not 0 <= head < self.size:
            raise ValueError(f"{self.name}: head {head} out of range")
        slot = self._next_used & (self.size - 1)
        self._used_elems[2 * slot] = head
        self._used_elems[2 * slot + 1] = length
        self._next_used = (self._next_used + 1) & 0xFFFF
        self._used[1] = self._next_used                   # publishes the element (TSO)

    def add_used_batch(self, elements: list[tuple[int, int]]) -> None:
        """Return several chains (``(head, length)`` each) and publish them at once: the
        driver sees all or none of them (one received frame in mergeable buffers)."""
        for head, _ in elements:
            if not 0 <= head < self.size:
                raise ValueError(f"{self.name}: head {head} out of range")
        used = self._next_used
        for head, length in elements:
            slot = used & (self.size - 1)
            self._used_elems[2 * slot] = head
            self._used_elems[2 * slot + 1] = length
            used = (used + 1) & 0xFFFF
        self._next_used = used
        self._used[1] = used                              # publishes them all (TSO)

    # --- notifications ----------------------------------------------------------------------
    def disable_notification(self) -> None:
        """Ask the driver not to kick while the device is draining the queue."""
        if not self.event_idx:
            self._used[0] = VIRTQ_USED_F_NO_NOTIFY
        # With EVENT_IDX, a stale avail_event already suppresses kicks.

    def enable_notification(self) -> bool:
        """Ask the driver to kick on its next buffer.  Returns True if buffers arrived
        in the meantime: the caller must process them (or it would wait forever).  An
        index moved ahead by more than the queue size is no buffer: answering True for it
        would make every drain loop spin."""
        if self.event_idx:
            self._used[self._avail_event] = self._next_avail
        else:
            self._used[0] = 0
        memory_fence()
        return self.has_available()

    def needs_notification(self) -> bool:
        """Whether the driver wants an interrupt for what was used since the last call."""
        memory_fence()
        used, old = self._next_used, self._signalled_used
        self._signalled_used = used
        if used == old:
            return False
        if self.event_idx:
            used_event = self._avail[self._used_event]
            return (used - used_event - 1) & 0xFFFF < (used - old) & 0xFFFF
        return not self._avail[0] & VIRTQ_AVAIL_F_NO_INTERRUPT
