"""vhost-user-blk: a virtio-blk device whose queues a vhost-user back-end serves
(qemu-storage-daemon's ``--export type=vhost-user-blk``, or any other), so no byte of the
guest's I/O passes through pych (see :mod:`pych.devices.virtio.vhost_user_device`).

The configuration space (capacity, seg_max, blk_size, topology, num_queues ...) is the
back-end's: read with GET_CONFIG (protocol feature CONFIG) at creation and again when the
disk is resized (:meth:`VhostUserBlock.refresh_config`, then the configuration change
interrupt). pych shows its own ``num_queues`` there (the queues it offers the driver; the
back-end must serve at least as many) and passes on the back-end's block feature bits
except CONFIG_WCE (the guest's writes to the configuration space are not forwarded).

When the back-end goes away while the device runs, pych takes the rings over so that the
guest's I/O ends instead of waiting forever (a Linux guest cannot even remove a disk with
requests in flight): the back-end tracks its in-flight requests in a shared region pych
asked for (protocol feature INFLIGHT_SHMFD: GET_INFLIGHT_FD, SET_INFLIGHT_FD, as QEMU's
vhost-user-blk does for reconnection), so pych completes exactly those with
VIRTIO_BLK_S_IOERR, and every later request too, on the device's own worker. The device
stays failed (``vm.info`` shows it); ``vm.remove-device`` removes it as any other disk.
"""

from __future__ import annotations

import logging
import mmap
import os
import struct
import subprocess
from collections.abc import Callable
from typing import ClassVar

from pych.devices.storage_daemon import StorageDaemon
from pych.devices.vhost_user import ProtocolFeature, VhostUserError, VhostUserFrontend

from .block import (_CONFIG_SIZE, SECTOR_SHIFT, VIRTIO_BLK_F_BLK_SIZE, VIRTIO_BLK_F_DISCARD,
                    VIRTIO_BLK_F_FLUSH, VIRTIO_BLK_F_GEOMETRY, VIRTIO_BLK_F_MQ, VIRTIO_BLK_F_RO,
                    VIRTIO_BLK_F_SEG_MAX, VIRTIO_BLK_F_SIZE_MAX, VIRTIO_BLK_F_TOPOLOGY,
                    VIRTIO_BLK_F_WRITE_ZEROES, BlockStatus)
from .device import VirtioDeviceType, VirtioInterrupt
from .queue import MAX_QUEUE_SIZE, DescriptorChain
from .vhost_user_device import AdoptedBackend, VhostUserDevice

log = logging.getLogger(__name__)

DEFAULT_QUEUE_SIZE = 128
#: How long the monitor waits for a daemon that hung up to have exited, to say how it ended.
LOST_DAEMON_WAIT = 5.0

_CAPACITY = struct.Struct("<Q")
_NUM_QUEUES_OFFSET = 34                 # le16 num_queues in struct virtio_blk_config
_INFLIGHT_HEADER = 16                   # features u64, version, desc_num, last_batch_head,
_USED_IDX_OFFSET = 14                   # used_idx (u16 each), then one 16-byte state per desc
_LAST_BATCH_HEAD_OFFSET = 12
_DESC_STATE = 16                        # inflight u8, padding, next u16, counter u64


class VhostUserBlock(VhostUserDevice):
    """A virtio-blk device (``num_queues`` queues of ``queue_size``) served by the
    vhost-user back-end at ``socket_path``. ``readonly``: the back-end must offer
    VIRTIO_BLK_F_RO (a read-only export), otherwise the device is refused."""

    device_type = VirtioDeviceType.BLOCK
    what = "vhost-user-blk"
    wanted_protocol_features: ClassVar[int] = (
        ProtocolFeature.MQ | ProtocolFeature.REPLY_ACK | ProtocolFeature.CONFIGURE_MEM_SLOTS
        | ProtocolFeature.CONFIG | ProtocolFeature.INFLIGHT_SHMFD)
    device_features: ClassVar[int] = (
        VIRTIO_BLK_F_SIZE_MAX | VIRTIO_BLK_F_SEG_MAX | VIRTIO_BLK_F_GEOMETRY | VIRTIO_BLK_F_RO
        | VIRTIO_BLK_F_BLK_SIZE | VIRTIO_BLK_F_FLUSH | VIRTIO_BLK_F_TOPOLOGY | VIRTIO_BLK_F_MQ
        | VIRTIO_BLK_F_DISCARD | VIRTIO_BLK_F_WRITE_ZEROES)

    def __init__(self, socket_path: str, *, num_queues: int = 1,
                 queue_size: int = DEFAULT_QUEUE_SIZE, readonly: bool = False,
                 name: str = "disk",
                 connect: Callable[[str], VhostUserFrontend] = VhostUserFrontend.connect,
                 connection: VhostUserFrontend | None = None,
                 daemon: StorageDaemon | None = None,
                 adopted: AdoptedBackend | None = None) -> None:
        if not 1 <= num_queues <= 0xFFFF:
            raise ValueError(f"{name}: num_queues must be 1..65535, not {num_queues}")
        if not 1 <= queue_size <= MAX_QUEUE_SIZE or queue_size & (queue_size - 1):
            raise ValueError(f"{name}: queue_size {queue_size} is not a power of 2 up to "
                             f"{MAX_QUEUE_SIZE}")
        self.readonly = readonly
        #: The qemu-storage-daemon pych started for this disk (stopped with the device), or
        #: None: the back-end is someone else's.
        self.daemon = daemon
        self._config = bytes(_CONFIG_SIZE)
        # The in-flight region of the current activation: (mmap, fd, size) or None.
        self._inflight: tuple[mmap.mmap, int, int] | None = None
        super().__init__(socket_path, queue_sizes=[queue_size] * num_queues, name=name,
                         connect=connect, connection=connection, adopted=adopted)
        if num_queues == 1:
            self.avail_features &= ~VIRTIO_BLK_F_MQ
        self.failed_requests = 0

    def __repr__(self) -> str:
        return f"<VhostUserBlock {self.name} socket={self.socket_path}>"

    # --- a local live migration (VhostUserDevice.release_backend) -----------------------------
    @property
    def adoptable(self) -> bool:          # type: ignore[override]
        """A back-end someone else runs can be handed over; the qemu-storage-daemon pych
        owns for an image cannot (yet): the process is this pych's child."""
        return self.daemon is None

    def can_hand_over(self) -> str | None:
        if self.daemon is not None:
            return ("its back-end is the qemu-storage-daemon pych started for the image, a "
                    "process pych cannot hand over to the receiver yet")
        if self._inflight is not None:
            return ("its back-end tracks the requests in flight in a shared region "
                    "(INFLIGHT_SHMFD), which pych does not hand over yet")
        return super().can_hand_over()

    def _session_device(self) -> dict:
        return {"config": self._config.hex()}

    def _adopt_session_device(self, saved: dict) -> None:
        self._config = bytes.fromhex(saved["config"])

    def _negotiate_device(self) -> None:
        if not self.protocol_features & ProtocolFeature.CONFIG:
            raise VhostUserError(f"the vhost-user backend at {self.socket_path} does not "
                                 "offer its configuration space (protocol feature CONFIG)")
        if self.readonly and not self.backend_features & VIRTIO_BLK_F_RO:
            raise VhostUserError(f"readonly=on, but the vhost-user backend at "
                                 f"{self.socket_path} serves the disk writable")
        config = self._backend.get_config(_CONFIG_SIZE)
        served = len(self.queue_max_sizes)
        if self.backend_features & VIRTIO_BLK_F_MQ:
            served = int.from_bytes(config[_NUM_QUEUES_OFFSET:_NUM_QUEUES_OFFSET + 2], "little")
        elif not self.protocol_features & ProtocolFeature.MQ:
            served = 1
        if served < len(self.queue_max_sizes):
            raise VhostUserError(self._too_few_queues(served))
        self._config = self._with_our_queues(config)

    def _too_few_queues(self, served: int) -> str:
        return (f"the vhost-user backend at {self.socket_path} serves {served} queues, but "
                f"num_queues={len(self.queue_max_sizes)}")

    def _read_config(self) -> bytes:
        """The back-end's configuration space, with pych's queue count."""
        return self._with_our_queues(self._backend.get_config(_CONFIG_SIZE))

    def _with_our_queues(self, config: bytes) -> bytes:
        return (config[:_NUM_QUEUES_OFFSET] + len(self.queue_max_sizes).to_bytes(2, "little")
                + config[_NUM_QUEUES_OFFSET + 2:])

    # --- configuration space ----------------------------------------------------------------
    @property
    def capacity(self) -> int:
        """The disk's size in 512-byte sectors, as the back-end last said."""
        return _CAPACITY.unpack_from(self._config)[0]

    def config_bytes(self) -> bytes:
        return self._config

    def refresh_config(self, capacity: int | None = None) -> None:
        """Read the configuration space again (the disk was resized) and, if it changed,
        tell the driver (configuration change interrupt). ``capacity`` (sectors): what the
        disk now holds, for a back-end that does not update its configuration space on a
        resize (qemu-storage-daemon 7.2 serves the new size but keeps announcing the old
        one). Raises VhostUserError."""
        config = self._read_config()
        if capacity is not None:
            config = _CAPACITY.pack(capacity) + config[_CAPACITY.size:]
        if config != self._config:
            self._config = config
            self.config_changed()

    def resize(self, size: int) -> None:
        """``vm.resize-disk``: only a disk whose daemon pych owns (its image grows with QMP
        ``block_resize``); the guest is told. Raises ValueError for a back-end pych does not
        own, StorageDaemonError or VhostUserError when the daemon fails."""
        if self.daemon is None:
            raise ValueError(f"disk {self.name} is served by the vhost-user backend at "
                             f"{self.socket_path}, which pych does not own: resize it there")
        self.daemon.resize(size)
        self.refresh_config(capacity=size >> SECTOR_SHIFT)

    def close_backend(self) -> None:
        super().close_backend()
        if self.daemon is not None:
            self.daemon.stop()

    def _lost_reason(self) -> str:
        if self.daemon is None:
            return super()._lost_reason()
        return (f"qemu-storage-daemon for disk {self.name} ({self.daemon.image}) hung up on "
                "pych")

    def describe_failure(self) -> str | None:
        """Why the device failed, with how its daemon ended if pych owns it (waits up to a
        few seconds for the daemon's exit status: the socket closes as the daemon dies,
        before its status is there). Not for the device's own threads (they may not wait
        for processes: the vCPU seccomp filter they inherit forbids it)."""
        daemon, failure = self.daemon, self.failure
        if failure is None or daemon is None:
            return failure
        process = daemon.process
        if process is not None:
            try:
                process.wait(LOST_DAEMON_WAIT)
            except subprocess.TimeoutExpired:
                return failure + f" (pid {process.pid}, still running)"
        self.failure = daemon.exit_description()
        return self.failure

    # --- in-flight tracking -----------------------------------------------------------------
    def _start_backend(self) -> None:
        if self.protocol_features & ProtocolFeature.INFLIGHT_SHMFD:
            self._set_up_inflight()
        super()._start_backend()

    def _set_up_inflight(self) -> None:
        count, size = len(self.queue_max_sizes), self.queue_max_sizes[0]
        fd, length, offset = self._backend.get_inflight_fd(count, size)
        try:
            region = mmap.mmap(fd, length, mmap.MAP_SHARED, mmap.PROT_READ | mmap.PROT_WRITE,
                               offset=offset)
        except (OSError, ValueError) as e:
            os.close(fd)
            raise VhostUserError(f"cannot map the in-flight region of the vhost-user "
                                 f"backend at {self.socket_path}: {e}") from None
        self._backend.set_inflight_fd(fd, length, offset, count, size)
        self._drop_inflight()
        self._inflight = (region, fd, length)

    def _drop_inflight(self) -> None:
        inflight, self._inflight = self._inflight, None
        if inflight is not None:
            inflight[0].close()
            os.close(inflight[1])

    def _release_activation(self) -> None:
        self._drop_inflight()
        super()._release_activation()

    # --- the back-end is gone -----------------------------------------------------------------
    def _backend_lost(self, interrupt: VirtioInterrupt) -> dict[int, Callable[[], None]]:
        """Take the rings over (:meth:`VhostUserDevice._take_over_rings`): complete what the
        back-end had in flight (from its in-flight record when it keeps one, else guessed
        in order), and everything the guest sends from now on, with IOERR."""
        inflight = self._inflight
        if inflight is None:
            return self._take_over_rings(self._guess_inflight)
        region = inflight[0]
        queue_region = inflight[2] // len(self.queue_max_sizes)
        return self._take_over_rings(
            lambda index, vq, used_idx: self._inflight_heads(region, index * queue_region,
                                                             used_idx, vq.size))

    @staticmethod
    def _inflight_heads(region: mmap.mmap, base: int, used_idx: int, size: int) -> list[int]:
        """The heads the back-end popped and never completed, oldest first (libvhost-user's
        ``vu_check_queue_inflights``: a last batch already in the used ring counts as done)."""
        done_batch = None
        recorded_used = struct.unpack_from("<H", region, base + _USED_IDX_OFFSET)[0]
        if recorded_used != used_idx:
            done_batch = struct.unpack_from("<H", region, base + _LAST_BATCH_HEAD_OFFSET)[0]
        heads = []
        for head in range(size):
            state = base + _INFLIGHT_HEADER + head * _DESC_STATE
            if region[state] == 1 and head != done_batch:
                heads.append((struct.unpack_from("<Q", region, state + 8)[0], head))
        return [head for _, head in sorted(heads)]

    def _fail_request(self, chain: DescriptorChain) -> int:
        """Answer one request VIRTIO_BLK_S_IOERR; returns the used length."""
        writable = chain.writable_views()
        self.failed_requests += 1
        if not writable or not len(writable[-1]):
            return 0
        writable[-1][-1:][0] = BlockStatus.IOERR
        return 1
