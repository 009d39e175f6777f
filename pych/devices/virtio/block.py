"""virtio-blk (virtio 1.x §5.2) over a raw image file or a host block device.

Requests are served on the device's worker thread with ``os.preadv``/``os.pwritev``
straight into and out of guest memory views: no data is copied through Python bytes.
The image is locked with an open-file-description lock (``F_OFD_SETLK``) as soon as it
is opened, exclusive for read-write and shared for read-only, so two VMs (or two disks
of one VM) cannot write the same image.  A read-only disk offers ``VIRTIO_BLK_F_RO`` and
fails every write with ``VIRTIO_BLK_S_IOERR``.

A host I/O error (``ENOSPC`` from an image on a full filesystem, ``EIO`` from a failing
device) fails that request with ``VIRTIO_BLK_S_IOERR`` (counted in ``io_errors``, logged at
most once per 10 s per kind), and the disk stays as it is: it is not marked failed in
``vm.info`` and no event is emitted, since the next request may well succeed (space freed,
a transient error), as with the reference, which completes the request with IOERR and
keeps the device. Only a back-end that is gone for good fails a device (vhost-user disks).
"""

from __future__ import annotations

import ctypes
import enum
import errno
import fcntl
import logging
import mmap
import os
import stat
import struct
import time
from collections.abc import Callable

from pych.devices.disk_format import UNKNOWN, check_image
from pych.devices.rate_limiter import RateLimiter
from pych.guest_log import GuestLog

from .device import VirtioDevice, VirtioDeviceType
from .queue import ChainReader, ChainWriter, DescriptorChain

log = logging.getLogger(__name__)
_guest_log = GuestLog(log)       # what the guest can repeat at will is rate-limited

VIRTIO_BLK_F_SIZE_MAX = 1 << 1
VIRTIO_BLK_F_SEG_MAX = 1 << 2
VIRTIO_BLK_F_GEOMETRY = 1 << 4
VIRTIO_BLK_F_RO = 1 << 5
VIRTIO_BLK_F_BLK_SIZE = 1 << 6
VIRTIO_BLK_F_FLUSH = 1 << 9
VIRTIO_BLK_F_TOPOLOGY = 1 << 10
VIRTIO_BLK_F_CONFIG_WCE = 1 << 11
VIRTIO_BLK_F_MQ = 1 << 12
VIRTIO_BLK_F_DISCARD = 1 << 13
VIRTIO_BLK_F_WRITE_ZEROES = 1 << 14

SECTOR_SHIFT = 9
SECTOR_SIZE = 1 << SECTOR_SHIFT
VIRTIO_BLK_ID_BYTES = 20
DEFAULT_QUEUE_SIZE = 128


class RequestType(enum.IntEnum):
    IN = 0
    OUT = 1
    FLUSH = 4
    GET_ID = 8
    GET_LIFETIME = 10
    DISCARD = 11
    WRITE_ZEROES = 13
    SECURE_ERASE = 14


class BlockStatus(enum.IntEnum):
    OK = 0
    IOERR = 1
    UNSUPP = 2


_REQUEST_HEADER = struct.Struct("<IIQ")          # type, reserved (ioprio), sector
_CONFIG = struct.Struct("<QIIHBBIBBHIBBH")        # up to num_queues; discard fields follow
_CONFIG_SIZE = 60
_FLOCK = struct.Struct("=hh4xqqi4x")              # struct flock on x86_64
_IOV_MAX = os.sysconf("SC_IOV_MAX")


class DiskError(Exception):
    pass


class DiskLockError(DiskError):
    pass


class DiskImage:
    """An open raw image (regular file or block device) holding an OFD lock.

    ``direct`` (``direct=on``) opens it with ``O_DIRECT``: the host's page cache is
    bypassed, so every transfer must be aligned (offset, length and memory) to 512 bytes.
    Guest requests always have sector-aligned offsets and lengths; a request whose guest
    buffers are not 512-byte aligned in memory goes through an aligned bounce buffer.  A
    filesystem that refuses ``O_DIRECT`` (tmpfs) or needs larger units is refused at open,
    with the reason.
    """

    def __init__(self, path: str | os.PathLike, *, readonly: bool = False, lock: bool = True,
                 direct: bool = False) -> None:
        self.path = os.fspath(path)
        self.readonly = readonly
        self.direct = direct
        self._bounce: mmap.mmap | None = None
        flags = (os.O_RDONLY if readonly else os.O_RDWR) | os.O_CLOEXEC
        if direct:
            flags |= os.O_DIRECT
        try:
            self.fd = os.open(self.path, flags)
        except OSError as e:
            if direct and e.errno == errno.EINVAL:
                raise DiskError(
                    f"cannot open disk image {self.path} with O_DIRECT (direct=on): its "
                    "filesystem does not support direct I/O (tmpfs before Linux 6.6 does not); "
                    "use direct=off"
                ) from e
            raise DiskError(f"cannot open disk image {self.path}: {e.strerror}") from e
        try:
            self.size = os.lseek(self.fd, 0, os.SEEK_END)      # works for block devices too
            if direct:
                self._probe_direct()
            self._lock_type = (fcntl.F_RDLCK if readonly else fcntl.F_WRLCK) if lock else None
            if self._lock_type is not None:
                self._lock(self._lock_type)
        except BaseException:
            os.close(self.fd)
            raise

    def _probe_direct(self) -> None:
        """One aligned 512-byte read: the file takes direct I/O in sectors."""
        if self.size < SECTOR_SIZE:
            return
        buf = mmap.mmap(-1, mmap.PAGESIZE)
        try:
            os.preadv(self.fd, [memoryview(buf)[:SECTOR_SIZE]], 0)
        except OSError as e:
            raise DiskError(
                f"disk image {self.path} opened with O_DIRECT (direct=on) refuses a "
                f"512-byte aligned read ({e.strerror}): its device needs larger direct I/O "
                "units than the guest's sectors; use direct=off") from e
        finally:
            buf.close()

    def _lock(self, lock_type: int) -> None:
        request = _FLOCK.pack(lock_type, os.SEEK_SET, 0, 0, 0)   # whole file, l_pid must be 0
        try:
            fcntl.fcntl(self.fd, fcntl.F_OFD_SETLK, request)
        except OSError as e:
            if e.errno in (errno.EAGAIN, errno.EACCES):
                kind = "shared (read-only)" if lock_type == fcntl.F_RDLCK else "exclusive (read-write)"
                raise DiskLockError(
                    f"disk image {self.path} is locked by another process or disk; "
                    f"cannot take a {kind} lock on it") from e
            if lock_type != fcntl.F_UNLCK:
                log.warning("cannot lock disk image %s (%s); continuing without a lock",
                            self.path, e.strerror)

    def unlock(self) -> None:
        """Drop the lock early (the reference releases it at remove-device time; a live
        migration hands it to the receiver)."""
        if self.fd >= 0:
            self._lock(fcntl.F_UNLCK)

    def relock(self) -> None:
        """Take the lock again after :meth:`unlock` (a migration that failed): DiskLockError
        if another process took it meanwhile."""
        if self.fd >= 0 and getattr(self, "_lock_type", None) is not None:
            self._lock(self._lock_type)

    def close(self) -> None:
        """Flush a writable image to stable storage, then close it (and so drop its lock):
        whatever ends the disk (remove-device, VM shutdown, SIGTERM) leaves the guest's
        writes on the host's disk, not only in its page cache."""
        if self.fd >= 0:
            if not self.readonly:
                try:
                    os.fsync(self.fd)
                except OSError as e:
                    log.warning("flushing disk image %s on close failed: %s", self.path,
                                e.strerror)
            os.close(self.fd)                 # also releases the OFD lock
            self.fd = -1
        if self._bounce is not None:
            self._bounce.close()
            self._bounce = None

    def read_into(self, views: list[memoryview], offset: int) -> None:
        """Fill ``views`` from ``offset``; bytes past the end of the image read as zero."""
        if self.direct and not _aligned(views):
            bounce = self._bounce_buffer(sum(len(v) for v in views))
            self._read_views([bounce], offset)
            done = 0
            for view in views:
                view[:] = bounce[done:done + len(view)]
                done += len(view)
            return
        self._read_views(views, offset)

    def _read_views(self, views: list[memoryview], offset: int) -> None:
        while views:
            n = os.preadv(self.fd, views[:_IOV_MAX], offset)
            if n == 0:
                for view in views:
                    view[:] = bytes(len(view))
                return
            offset += n
            views = _advance(views, n)

    def write_from(self, views: list[memoryview], offset: int) -> None:
        if self.direct and not _aligned(views):
            bounce = self._bounce_buffer(sum(len(v) for v in views))
            done = 0
            for view in views:
                bounce[done:done + len(view)] = view
                done += len(view)
            views = [bounce]
        while views:
            n = os.pwritev(self.fd, views[:_IOV_MAX], offset)
            if n == 0:
                raise OSError(errno.EIO, "short write")
            offset += n
            views = _advance(views, n)

    def flush(self) -> None:
        os.fsync(self.fd)

    def _bounce_buffer(self, length: int) -> memoryview:
        """A page-aligned buffer of ``length`` bytes (kept and grown; one worker uses it)."""
        if self._bounce is None or len(self._bounce) < length:
            if self._bounce is not None:
                self._bounce.close()
            self._bounce = mmap.mmap(-1, -(-length // mmap.PAGESIZE) * mmap.PAGESIZE)
        return memoryview(self._bounce)[:length]


def _aligned(views: list[memoryview]) -> bool:
    """Whether every view starts and ends on a 512-byte boundary in host memory (what
    ``O_DIRECT`` asks of the buffers)."""
    for view in views:
        if len(view) % SECTOR_SIZE:
            return False
        try:
            address = ctypes.addressof(ctypes.c_char.from_buffer(view))
        except TypeError:                       # a read-only view: check through a copy
            return False
        if address % SECTOR_SIZE:
            return False
    return True


class _OpStats:
    """One direction's totals; updated by the device's worker, read by the VMM (each field
    is one Python int store, atomic under the GIL)."""

    def __init__(self) -> None:
        self.bytes = self.ops = 0
        self.latency_min = self.latency_max = self.latency_total = 0      # ns

    def add(self, length: int, latency_ns: int) -> None:
        if not self.ops or latency_ns < self.latency_min:
            self.latency_min = latency_ns
        self.latency_max = max(self.latency_max, latency_ns)
        self.latency_total += latency_ns
        self.bytes += length
        self.ops += 1

    def counters(self, what: str) -> dict[str, int]:
        ops = self.ops
        return {f"{what}_bytes": self.bytes, f"{what}_ops": ops,
                f"{what}_latency_min": self.latency_min // 1000,
                f"{what}_latency_max": self.latency_max // 1000,
                f"{what}_latency_avg": self.latency_total // ops // 1000 if ops else 0}


def _advance(views: list[memoryview], n: int) -> list[memoryview]:
    """Drop the first ``n`` bytes of a scatter list."""
    i = 0
    while i < len(views) and n >= len(views[i]):
        n -= len(views[i])
        i += 1
    rest = views[i:]
    if rest and n:
        rest[0] = rest[0][n:]
    return rest


def _data_length(chain: DescriptorChain) -> int:
    """The bytes a request moves (what the bandwidth bucket counts): a read's
    device-writable data, a write's readable data; 0 for the other requests."""
    header = chain.reader().read(_REQUEST_HEADER.size)
    if len(header) < _REQUEST_HEADER.size:
        return 0
    request = _REQUEST_HEADER.unpack(header)[0]
    if request == RequestType.IN:
        return max(0, chain.writable_len - 1)
    if request == RequestType.OUT:
        return max(0, chain.readable_len - _REQUEST_HEADER.size)
    return 0


def default_serial(path: str) -> bytes:
    """The reference's default GET_ID answer: st_dev, st_rdev and st_ino in decimal."""
    try:
        st = os.stat(path)
    except OSError:
        return bytes(VIRTIO_BLK_ID_BYTES)
    return f"{st.st_dev}{st.st_rdev}{st.st_ino}".encode()[:VIRTIO_BLK_ID_BYTES]


class VirtioBlock(VirtioDevice):
    device_type = VirtioDeviceType.BLOCK

    def __init__(self, path: str | os.PathLike, *, readonly: bool = False,
                 serial: str | bytes | None = None, num_queues: int = 1,
                 queue_size: int = DEFAULT_QUEUE_SIZE, logical_block_size: int = SECTOR_SIZE,
                 size_max: int | None = None, seg_max: int | None = None, lock: bool = True,
                 image_type: str = UNKNOWN, name: str = "disk",
                 rate_limiter: RateLimiter | None = None, direct: bool = False) -> None:
        if not 1 <= num_queues <= 0xFFFF:
            raise ValueError(f"num_queues must be 1..65535, not {num_queues}")
        if logical_block_size < SECTOR_SIZE or logical_block_size & (logical_block_size - 1):
            raise ValueError(f"logical block size {logical_block_size} is not a power of two >= 512")
        try:
            check_image(path, image_type)      # before anything opens it for writing
        except OSError as e:
            raise DiskError(f"cannot open disk image {os.fspath(path)}: {e.strerror}") from e
        self.image = DiskImage(path, readonly=readonly, lock=lock, direct=direct)
        self.readonly = readonly
        self.logical_block_size = logical_block_size
        self.size_max = size_max
        self.seg_max = seg_max if seg_max is not None else queue_size - 2
        features = VIRTIO_BLK_F_FLUSH | VIRTIO_BLK_F_BLK_SIZE | VIRTIO_BLK_F_SEG_MAX
        if readonly:
            features |= VIRTIO_BLK_F_RO
        if num_queues > 1:
            features |= VIRTIO_BLK_F_MQ
        if size_max is not None:
            features |= VIRTIO_BLK_F_SIZE_MAX
        super().__init__(name=name, queue_sizes=[queue_size] * num_queues, features=features)
        if serial is None:
            serial = default_serial(self.image.path)
        elif isinstance(serial, str):
            serial = serial.encode()
        self.serial = serial[:VIRTIO_BLK_ID_BYTES].ljust(VIRTIO_BLK_ID_BYTES, b"\0")
        self.io_errors = 0
        self.malformed_requests = 0
        self.stats = {"read": _OpStats(), "write": _OpStats()}
        self.rate_limiter = rate_limiter          # None: no check per request at all
        self._held: dict[int, DescriptorChain] = {}   # queue -> a request waiting for tokens

    @property
    def capacity(self) -> int:
        """Size in 512-byte sectors (a partial trailing sector is not exposed)."""
        return self.image.size >> SECTOR_SHIFT

    def config_bytes(self) -> bytes:
        head = _CONFIG.pack(self.capacity, self.size_max or 0, self.seg_max,
                            0, 0, 0,                          # geometry
                            self.logical_block_size,
                            0, 0, 0, 0,                       # topology
                            0, 0,                             # writeback, unused
                            len(self.queue_max_sizes))
        return head.ljust(_CONFIG_SIZE, b"\0")

    def resize(self, size: int) -> None:
        """``vm.resize-disk``: the image becomes ``size`` bytes (a regular file grows with
        ``ftruncate``; a block device is resized by its owner, so its size must already be
        ``size``), then the driver is told (configuration change interrupt). The device
        manager refuses shrinking and sizes that are not whole sectors first."""
        if self.readonly:
            raise ValueError(f"disk {self.name} is read-only")
        image = self.image
        if stat.S_ISBLK(os.fstat(image.fd).st_mode):
            actual = os.lseek(image.fd, 0, os.SEEK_END)
            if actual != size:
                raise ValueError(f"Block device size {actual} does not match requested "
                                 f"size {size}")
        else:
            os.ftruncate(image.fd, size)
        image.size = size
        self.config_changed()

    def close_backend(self) -> None:
        self.image.close()

    def counters(self) -> dict[str, int]:
        """The reference's block counters: bytes and requests read and written, and each
        direction's latency in microseconds (0 until the first request; the reference
        shows 2^64-1 there)."""
        out = {}
        for what, stats in self.stats.items():
            out.update(stats.counters(what))
        return out

    def reset(self) -> None:
        super().reset()
        self._held.clear()

    # --- rate limiting ------------------------------------------------------------------------
    def process_queue(self, index: int) -> None:
        if self.rate_limiter is None:
            super().process_queue(index)
        elif index not in self._held:          # a held queue waits for its wake-up, not kicks
            self._process_limited(index)

    def _process_limited(self, index: int) -> None:
        """:meth:`process_queue` through the rate limiter: a request the limiter holds back
        is kept, the queue is left with notifications off, and the worker retries it when
        the limiter says the tokens are there (:meth:`woken`)."""
        queue = self.queues[index].queue
        limiter = self.rate_limiter
        while True:
            queue.disable_notification()
            while (chain := self._held.pop(index, None) or queue.pop()) is not None:
                wait = limiter.consume(_data_length(chain), 1)
                if wait:
                    self._held[index] = chain
                    self.wake_after(wait)
                    self.signal_used(index)
                    return
                queue.add_used(chain.head, self.handle_chain(index, chain))
            if not queue.enable_notification():
                break
        self.signal_used(index)

    def woken(self) -> None:
        for index in list(self._held):
            if index in self.queues:
                self._process_limited(index)

    # --- requests ---------------------------------------------------------------------------
    def handle_chain(self, index: int, chain: DescriptorChain) -> int:
        reader = chain.reader()
        header = reader.read(_REQUEST_HEADER.size)
        writable = chain.writable_views()
        if len(header) < _REQUEST_HEADER.size or not writable or not len(writable[-1]):
            self._malformed(chain, "no request header or no status byte")
            return 0
        # The status byte is the last device-writable byte; data (if any) comes before it.
        status_view = writable[-1][-1:]
        writable[-1] = writable[-1][:-1]
        data = ChainWriter(writable)
        request, _, sector = _REQUEST_HEADER.unpack(header)
        try:
            status = self._execute(request, sector, reader, data)
        except OSError as e:
            self.io_errors += 1
            _guest_log.warning("%s: I/O error on request type %d at sector %d: %s",
                               self.name, request, sector, e.strerror or e,
                               kind=(self.name, e.errno))
            status = BlockStatus.IOERR
        status_view[0] = status
        return data.written + 1

    def _execute(self, request: int, sector: int, reader: ChainReader,
                 data: ChainWriter) -> BlockStatus:
        match request:
            case RequestType.IN:
                return self._transfer("read", data.take(data.remaining), sector,
                                      self.image.read_into)
            case RequestType.OUT:
                if self.readonly:
                    return BlockStatus.IOERR
                return self._transfer("write", reader.take(reader.remaining), sector,
                                      self.image.write_from)
            case RequestType.FLUSH:
                self.image.flush()
            case RequestType.GET_ID:
                data.write(self.serial[:data.remaining])
            case _:
                return BlockStatus.UNSUPP
        return BlockStatus.OK

    def _transfer(self, direction: str, views: list[memoryview], sector: int,
                  io: Callable[[list[memoryview], int], None]) -> BlockStatus:
        """Read or write ``views`` at ``sector`` with ``io``, counted in ``stats``."""
        length = sum(len(v) for v in views)
        offset = self._range(sector, length)
        if offset is None:
            return BlockStatus.IOERR
        start = time.monotonic_ns()
        io(views, offset)
        self.stats[direction].add(length, time.monotonic_ns() - start)
        return BlockStatus.OK

    def _range(self, sector: int, length: int) -> int | None:
        """Byte offset of a data transfer, or None if it is misaligned or past the end."""
        if length % SECTOR_SIZE or sector + (length >> SECTOR_SHIFT) > self.capacity:
            return None
        return sector << SECTOR_SHIFT

    def _malformed(self, chain: DescriptorChain, why: str) -> None:
        self.malformed_requests += 1
        if self.malformed_requests == 1:
            log.warning("%s: malformed request (head %d): %s; further ones are only counted",
                        self.name, chain.head, why)

