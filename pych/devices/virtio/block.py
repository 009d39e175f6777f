"""virtio-blk (virtio 1.x §5.2) over a raw image file or a host block device.

Requests are served on the device's worker thread with ``os.preadv``/``os.pwritev``
straight into and out of guest memory views: no data is copied through Python bytes.
The image is locked with an open-file-description lock (``F_OFD_SETLK``) as soon as it
is opened, exclusive for read-write and shared for read-only, so two VMs (or two disks
of one VM) cannot write the same image.  A read-only disk offers ``VIRTIO_BLK_F_RO`` and
fails every write with ``VIRTIO_BLK_S_IOERR``.
"""

from __future__ import annotations

import enum
import errno
import fcntl
import logging
import os
import stat
import struct
import time
from collections.abc import Callable

from pych.devices.disk_format import UNKNOWN, check_image

from .device import VirtioDevice, VirtioDeviceType
from .queue import ChainReader, ChainWriter, DescriptorChain

log = logging.getLogger(__name__)

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
    """An open raw image (regular file or block device) holding an OFD lock."""

    def __init__(self, path: str | os.PathLike, *, readonly: bool = False, lock: bool = True) -> None:
        self.path = os.fspath(path)
        self.readonly = readonly
        flags = (os.O_RDONLY if readonly else os.O_RDWR) | os.O_CLOEXEC
        try:
            self.fd = os.open(self.path, flags)
        except OSError as e:
            raise DiskError(f"cannot open disk image {self.path}: {e.strerror}") from e
        try:
            self.size = os.lseek(self.fd, 0, os.SEEK_END)      # works for block devices too
            if lock:
                self._lock(fcntl.F_RDLCK if readonly else fcntl.F_WRLCK)
        except BaseException:
            os.close(self.fd)
            raise

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
        """Drop the lock early (the reference releases it at remove-device time)."""
        if self.fd >= 0:
            self._lock(fcntl.F_UNLCK)

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

    def read_into(self, views: list[memoryview], offset: int) -> None:
        """Fill ``views`` from ``offset``; bytes past the end of the image read as zero."""
        while views:
            n = os.preadv(self.fd, views[:_IOV_MAX], offset)
            if n == 0:
                for view in views:
                    view[:] = bytes(len(view))
                return
            offset += n
            views = _advance(views, n)

    def write_from(self, views: list[memoryview], offset: int) -> None:
        while views:
            n = os.pwritev(self.fd, views[:_IOV_MAX], offset)
            if n == 0:
                raise OSError(errno.EIO, "short write")
            offset += n
            views = _advance(views, n)

    def flush(self) -> None:
        os.fsync(self.fd)


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
                 image_type: str = UNKNOWN, name: str = "disk") -> None:
        if not 1 <= num_queues <= 0xFFFF:
            raise ValueError(f"num_queues must be 1..65535, not {num_queues}")
        if logical_block_size < SECTOR_SIZE or logical_block_size & (logical_block_size - 1):
            raise ValueError(f"logical block size {logical_block_size} is not a power of two >= 512")
        try:
            check_image(path, image_type)      # before anything opens it for writing
        except OSError as e:
            raise DiskError(f"cannot open disk image {os.fspath(path)}: {e.strerror}") from e
        self.image = DiskImage(path, readonly=readonly, lock=lock)
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
            log.warning("%s: I/O error on request type %d at sector %d: %s",
                        self.name, request, sector, e.strerror or e)
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

