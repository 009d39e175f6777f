"""virtio-fs (virtio 1.x §5.11) as a vhost-user front end: a host directory shared with
the guest, served by a separate back-end process (virtiofsd) straight from guest memory.

pych owns the device's PCI side (the transport, the configuration space, the queue
registers) and hands everything on the data path to the back-end at ``socket``:

* at creation, it connects and negotiates (SET_OWNER, features, protocol features REPLY_ACK,
  MQ and CONFIGURE_MEM_SLOTS when offered; with MQ it checks that the back-end serves the
  hiprio queue plus ``num_request_queues``), so a missing or dead back-end fails the boot or
  the ``vm.add-fs`` request at once, with the socket path in the message;
* when the driver sets DRIVER_OK (:meth:`VirtioFs.activate`), it sends the features the
  driver accepted, maps every guest RAM region into the back-end (its memfd descriptor,
  guest address, size and pych's address of it), and starts each enabled queue: size, base,
  ring addresses (as pych's user addresses, as the protocol requires), the *call* eventfd and
  the *kick* eventfd. The kick eventfd is the transport's KVM ioeventfd for that queue's
  notify address, so a guest notification wakes virtiofsd without a VM exit; the call
  eventfd is the KVM irqfd of the queue's MSI-X vector, so virtiofsd interrupts the guest
  directly. Without MSI-X (or a vector) pych relays: the back-end writes a pych eventfd and
  pych raises the interrupt the transport's way (INTx);
* a driver reset (status 0) stops every ring with GET_VRING_BASE; removal also hangs up,
  which makes virtiofsd exit;
* guest RAM hot plug while the device runs updates the back-end's memory table
  (ADD_MEM_REG / REM_MEM_REG with CONFIGURE_MEM_SLOTS, else a new SET_MEM_TABLE).

If the back-end hangs up while the device runs (virtiofsd killed), pych logs it once,
records the failure (``vm.info`` ``devices_failed``, a ``device-failed`` event), sets
DEVICE_NEEDS_RESET and takes the rings over: the FUSE requests virtiofsd left unanswered
(those between the used and the available index: virtiofsd keeps no in-flight record) and
every later one are answered ``-EIO`` (a ``fuse_out_header`` with the request's
``unique``; FORGETs, which have no reply, are just returned), so a guest process reading or
writing the share gets ``Input/output error`` instead of waiting forever. The reference
leaves them unanswered (the guest's I/O hangs). Removal works as for a healthy share.

Reboot. pych rebuilds the whole VM on a guest reboot or ``vm.reboot`` (``pych/vmm/vmm.py``),
but virtiofsd serves one front-end connection and exits when it closes, so the device must
not hang up then. The VMM keeps a :class:`~pych.devices.vhost_user.VhostUserConnections`
across boots. Tearing the old VM down for a reboot, each virtio-fs device still in the
configuration (:meth:`VirtioFs.detach_backend`):

1. stops its rings as a driver reset does (SET_VRING_ENABLE 0, GET_VRING_BASE);
2. points every ring the connection has given an address at the connection's parking page
   (one page of pych's memory at a guest address beyond 52 bits, mapped in the back-end
   and kept as long as the connection): a back-end keeps a stopped ring's addresses, and
   libvhost-user (QEMU 7.2's virtiofsd) checks at every memory-table change that they are
   still mapped and drops the connection otherwise, so without it the new VM's first
   ADD_MEM_REG would lose the back-end (the old RAM is gone, the new RAM mapped elsewhere);
3. unmaps the old guest RAM from the back-end (REM_MEM_REG, or a table of the parking page
   alone), so virtiofsd holds no memory of the old VM;
4. parks the connection under its id and socket path.

The new VM's device of the same id and socket takes it back. The session carries over
(SET_OWNER is sent once per connection; the protocol features stay as negotiated): the new
device only reads the back-end's features, queue count and memory slots again, and its
activation sends the features its driver accepted, the new VM's RAM (new memfds) and the
rings, as after any driver reset. The guest's driver starts a new FUSE session with
FUSE_INIT, which virtiofsd treats as the re-initialisation after a hard reboot.

A device pending removal is not parked, and whatever the new VM did not take back (or all
of it, if the new VM failed to boot) is hung up once it is built; ``vm.shutdown``,
``vm.delete``, the VMM's exit and the guest ejecting a removed device hang up for real. A
share hot added with ``vm.add-fs`` is in the configuration, so it comes back after a reboot
the same way. If the connection broke before the reboot (virtiofsd died), the new VM
connects anew: a restarted virtiofsd is picked up, and a missing one fails the reboot with
the socket named.

The reference instead drops the device, and with it the connection, when it rebuilds the
VM, and the new device connects to the socket again (retrying every 100 ms for up to
60 s): with a back-end that exits when its front end goes, the user must start a new one
for each reboot. pych keeps the connection, as QEMU does across a system reset (which never
recreates devices), so ``--fs`` with Debian's virtiofsd survives reboots.

Queue 0 is the high-priority queue (FUSE_INTERRUPT, FORGET), queues 1..n the request queues.
The configuration space is ``char tag[36]`` (UTF-8, NUL-padded) and ``le32
num_request_queues``.

Deviation from the reference: Cloud Hypervisor refuses ``--fs`` unless guest memory is shared
(``--memory shared=on``), because its default RAM is private anonymous memory a back-end
cannot map. pych's guest RAM is always memfd-backed and mapped shared, so it is always
shareable: ``--fs`` needs no memory option.
"""

from __future__ import annotations

import errno
import logging
import struct
from collections.abc import Callable

from pych.devices.vhost_user import ProtocolFeature, VhostUserFrontend

from .device import VirtioDeviceType, VirtioInterrupt
from .queue import MAX_QUEUE_SIZE, DescriptorChain
from .vhost_user_device import AdoptedBackend, VhostUserDevice

log = logging.getLogger(__name__)

TAG_LEN = 36
HIPRIO_QUEUE = 0
DEFAULT_QUEUE_SIZE = 1024

#: The protocol features pych uses when the back-end offers them.
WANTED_PROTOCOL_FEATURES = (ProtocolFeature.MQ | ProtocolFeature.REPLY_ACK
                            | ProtocolFeature.CONFIGURE_MEM_SLOTS)

_CONFIG = struct.Struct(f"<{TAG_LEN}sI")       # tag, num_request_queues
_FUSE_IN_HEADER = struct.Struct("<IIQ")        # len, opcode, unique (then nodeid, uid, ...)
_FUSE_OUT_HEADER = struct.Struct("<IiQ")       # len, error (-errno), unique


def _check_parameters(tag: str, num_request_queues: int, queue_size: int, name: str) -> None:
    tag_bytes = tag.encode()
    if not 0 < len(tag_bytes) <= TAG_LEN:
        raise ValueError(f"virtio-fs {name}: the tag must be 1 to {TAG_LEN} bytes, "
                         f"not {len(tag_bytes)} ({tag!r})")
    if num_request_queues < 1:
        raise ValueError(f"virtio-fs {name}: num_queues must be at least 1")
    if not 1 <= queue_size <= MAX_QUEUE_SIZE or queue_size & (queue_size - 1):
        raise ValueError(f"virtio-fs {name}: queue_size {queue_size} is not a power of 2 "
                         f"up to {MAX_QUEUE_SIZE}")


class VirtioFs(VhostUserDevice):
    """A virtio-fs device whose queues the vhost-user back-end at ``socket_path`` serves
    (see :class:`~pych.devices.virtio.vhost_user_device.VhostUserDevice` for ``connect``,
    ``connection`` and the interrupt). Raises
    :class:`~pych.devices.vhost_user.VhostUserError` (an ``OSError``) when the back-end
    cannot be reached or does not fit, ``ValueError`` for a bad tag or queue geometry."""

    device_type = VirtioDeviceType.FS
    what = "virtio-fs"
    wanted_protocol_features = WANTED_PROTOCOL_FEATURES
    adoptable = True

    def __init__(self, tag: str, socket_path: str, *, num_request_queues: int = 1,
                 queue_size: int = DEFAULT_QUEUE_SIZE, name: str = "fs",
                 connect: Callable[[str], VhostUserFrontend] = VhostUserFrontend.connect,
                 connection: VhostUserFrontend | None = None,
                 adopted: AdoptedBackend | None = None) -> None:
        try:
            _check_parameters(tag, num_request_queues, queue_size, name)
        except ValueError:
            if connection is not None:
                connection.close()
            if adopted is not None:
                adopted.close()
            raise
        self.tag = tag
        self.num_request_queues = num_request_queues
        self.failed_requests = 0           # FUSE requests answered -EIO after a failure
        super().__init__(socket_path, queue_sizes=[queue_size] * (1 + num_request_queues),
                         name=name, connect=connect, connection=connection, adopted=adopted)

    def _too_few_queues(self, served: int) -> str:
        return (f"the vhost-user backend at {self.socket_path} serves {served} queues "
                f"(1 high-priority + {max(served - 1, 0)} request queues), but "
                f"num_queues={self.num_request_queues} needs {len(self.queue_max_sizes)}")

    def __repr__(self) -> str:
        return f"<VirtioFs {self.name} tag={self.tag!r} socket={self.socket_path}>"

    # --- configuration space ----------------------------------------------------------------
    def config_bytes(self) -> bytes:
        return _CONFIG.pack(self.tag.encode(), self.num_request_queues)

    # --- the back-end is gone ---------------------------------------------------------------
    def _backend_lost(self, interrupt: VirtioInterrupt) -> dict[int, Callable[[], None]]:
        """virtiofsd hung up: answer what it left and everything after with -EIO."""
        interrupt.needs_reset()
        return self._take_over_rings(self._guess_inflight)

    def _fail_request(self, chain: DescriptorChain) -> int:
        """Answer one FUSE request ``-EIO``; returns the used length (0 for a request
        without a reply, such as FORGET, or one too short to answer)."""
        self.failed_requests += 1
        header = chain.reader().read(_FUSE_IN_HEADER.size)
        writer = chain.writer()
        if len(header) < _FUSE_IN_HEADER.size or writer.remaining < _FUSE_OUT_HEADER.size:
            return 0
        _, _, unique = _FUSE_IN_HEADER.unpack(header)
        return writer.write(_FUSE_OUT_HEADER.pack(_FUSE_OUT_HEADER.size, -errno.EIO, unique))
