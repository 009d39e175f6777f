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

If the back-end hangs up while the device runs, pych logs it once and sets
DEVICE_NEEDS_RESET; requests already queued stay unanswered, as under the reference.

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

import logging
import os
import select
import struct
import threading
from collections.abc import Callable, Sequence

from pych.devices.vhost_user import (MEM_TABLE_MAX_REGIONS, VHOST_USER_F_PROTOCOL_FEATURES,
                                     MemoryRegionInfo, ProtocolFeature, VhostUserError,
                                     VhostUserFrontend)
from pych.memory.guest_memory import GuestMemory, MemoryRegion
from pych.threads import NamedThread

from .device import (RING_FEATURES, VIRTIO_F_VERSION_1, ActivationError, ActiveQueue,
                     VirtioDevice, VirtioDeviceType, VirtioInterrupt, drain_eventfd)
from .queue import MAX_QUEUE_SIZE, avail_ring_size, desc_table_size, used_ring_size

log = logging.getLogger(__name__)

TAG_LEN = 36
HIPRIO_QUEUE = 0
DEFAULT_QUEUE_SIZE = 1024

#: The protocol features pych uses when the back-end offers them.
WANTED_PROTOCOL_FEATURES = (ProtocolFeature.MQ | ProtocolFeature.REPLY_ACK
                            | ProtocolFeature.CONFIGURE_MEM_SLOTS)

_CONFIG = struct.Struct(f"<{TAG_LEN}sI")       # tag, num_request_queues


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


class VirtioFs(VirtioDevice):
    """A virtio-fs device whose queues the vhost-user back-end at ``socket_path`` serves.

    ``connect`` opens the connection (tests pass a fake back-end's); ``connection``, if
    given, is used instead: an open connection handed over from the previous boot of the
    VM (see the module's "Reboot"), which the device owns from then on. Raises
    :class:`~pych.devices.vhost_user.VhostUserError` (an ``OSError``) when the back-end
    cannot be reached or does not fit, ``ValueError`` for a bad tag or queue geometry.

    The interrupt object the transport passes to :meth:`activate` may offer
    ``queue_irqfd(index) -> int | None``: an eventfd that interrupts the driver for that
    queue by itself (the PCI transport's MSI-X vector irqfd). Without it, or when it answers
    None, pych relays the back-end's calls to ``notify_queue``.
    """

    device_type = VirtioDeviceType.FS

    def __init__(self, tag: str, socket_path: str, *, num_request_queues: int = 1,
                 queue_size: int = DEFAULT_QUEUE_SIZE, name: str = "fs",
                 connect: Callable[[str], VhostUserFrontend] = VhostUserFrontend.connect,
                 connection: VhostUserFrontend | None = None) -> None:
        try:
            _check_parameters(tag, num_request_queues, queue_size, name)
        except ValueError:
            if connection is not None:
                connection.close()
            raise
        super().__init__(name=name, queue_sizes=[queue_size] * (1 + num_request_queues))
        self.tag = tag
        self.socket_path = socket_path
        self.num_request_queues = num_request_queues
        self._lock = threading.Lock()
        if connection is not None:
            self._backend = connection
        else:
            try:
                self._backend = connect(socket_path)
            except VhostUserError as e:
                raise VhostUserError(f"virtio-fs {name}: {e}") from None
        try:
            self._negotiate()
        except VhostUserError as e:
            self._backend.close()
            raise VhostUserError(f"virtio-fs {name}: {e}") from None
        except BaseException:
            self._backend.close()
            raise
        # While active: the rings the back-end serves, the call eventfd each was given, pych's
        # relay eventfds (one per queue), the monitor thread and its stop eventfd.
        self._started: list[int] = []
        self._call_fds: dict[int, int] = {}
        self._relay_fds: dict[int, int] = {}
        self._monitor: threading.Thread | None = None
        self._stop_fd = -1
        # The guest RAM regions the back-end has mapped (kept across driver resets).
        self._mapped: dict[MemoryRegion, MemoryRegionInfo] = {}

    def _negotiate(self) -> None:
        """Settle the connection's session (once per connection: a connection handed over
        from the previous boot is already owned and has its protocol features), then read
        what the back-end offers and check it fits this device."""
        backend = self._backend
        if not backend.owned:
            backend.set_owner()
        features = backend.get_features()
        if not features & VIRTIO_F_VERSION_1:
            raise VhostUserError(f"the vhost-user backend at {self.socket_path} does not offer "
                                 "VIRTIO_F_VERSION_1 (legacy back-ends are not supported)")
        self.backend_features = features
        self.protocol_features = 0
        if features & VHOST_USER_F_PROTOCOL_FEATURES:
            if backend.protocol_features is None:
                backend.set_protocol_features(backend.get_protocol_features()
                                              & WANTED_PROTOCOL_FEATURES)
            self.protocol_features = backend.protocol_features
        wanted = len(self.queue_max_sizes)
        if self.protocol_features & ProtocolFeature.MQ:
            served = backend.get_queue_num()
            if served < wanted:
                raise VhostUserError(
                    f"the vhost-user backend at {self.socket_path} serves {served} queues "
                    f"(1 high-priority + {max(served - 1, 0)} request queues), but "
                    f"num_queues={self.num_request_queues} needs {wanted}")
        if self.protocol_features & ProtocolFeature.CONFIGURE_MEM_SLOTS:
            self.max_regions = backend.get_max_mem_slots()
        else:
            self.max_regions = MEM_TABLE_MAX_REGIONS
        # What the guest is offered: the ring features both pych's transport and the back-end
        # implement (the back-end's own bits such as VHOST_F_LOG_ALL stay between us).
        self.avail_features = features & RING_FEATURES

    def __repr__(self) -> str:
        return f"<VirtioFs {self.name} tag={self.tag!r} socket={self.socket_path}>"

    # --- configuration space ----------------------------------------------------------------
    def config_bytes(self) -> bytes:
        return _CONFIG.pack(self.tag.encode(), self.num_request_queues)

    # --- lifecycle --------------------------------------------------------------------------
    @property
    def active(self) -> bool:
        return self._monitor is not None

    def activate(self, mem: GuestMemory, queues: Sequence[ActiveQueue],
                 interrupt: VirtioInterrupt) -> None:
        """Hand the enabled queues to the back-end (the driver set DRIVER_OK)."""
        with self._lock:
            if self._monitor is not None:
                raise ActivationError(f"{self.name}: already active")
            if not queues:
                raise ActivationError(f"{self.name}: the driver enabled no queue")
            for q in queues:
                if not 0 <= q.index < len(self.queue_max_sizes):
                    raise ActivationError(f"{self.name}: no queue {q.index}")
            self.mem, self.interrupt = mem, interrupt
            self.queues = {q.index: q for q in queues}
            self._relay_fds = {q.index: os.eventfd(0, os.EFD_CLOEXEC | os.EFD_NONBLOCK)
                               for q in queues}
            try:
                self._start_backend()
            except BaseException as e:
                self._stop_rings()
                self._release_activation()
                if isinstance(e, VhostUserError):
                    raise ActivationError(f"{self.name}: {e}") from None
                raise
            self._stop_fd = os.eventfd(0, os.EFD_CLOEXEC | os.EFD_NONBLOCK)
            self._monitor = NamedThread(
                target=self._watch, name=self.name, daemon=True,
                args=(self._stop_fd, dict(self._relay_fds), self._backend.fileno(), interrupt))
            self._monitor.start()
        log.info("%s: the vhost-user backend at %s serves queues %s", self.name,
                 self.socket_path, sorted(self.queues))

    def reset(self) -> None:
        """The driver reset the device: stop every ring (GET_VRING_BASE) and the relay."""
        with self._lock:
            monitor, self._monitor = self._monitor, None
            if monitor is not None:
                os.eventfd_write(self._stop_fd, 1)
                if monitor is not threading.current_thread():
                    monitor.join()
                os.close(self._stop_fd)
                self._stop_fd = -1
            self._stop_rings()
            self._release_activation()
        super().reset()                 # the base device's worker never ran: forgets features

    def close_backend(self) -> None:
        """Hang up on the back-end (virtiofsd exits when its front end goes)."""
        self._backend.close()
        self._mapped.clear()

    def detach_backend(self) -> VhostUserFrontend | None:
        """The VM is being rebuilt (a reboot): stop every ring as a driver reset does
        (GET_VRING_BASE), point the rings at the connection's parking page and unmap this
        VM's RAM from the back-end (:meth:`_park_rings`), and give up the connection, still
        open, instead of hanging up. Returns None, having hung up, if any of it failed (the
        next boot then connects anew). The device is done afterwards: it holds a closed
        connection, so anything else it is asked fails."""
        self.reset()
        with self._lock:
            backend, self._backend = self._backend, VhostUserFrontend(None, self.socket_path)
            mapped, self._mapped = list(self._mapped.values()), {}
        try:
            self._park_rings(backend, mapped)
        except VhostUserError as e:
            log.warning("%s: cannot keep the vhost-user backend's connection across the "
                        "reboot: %s; hanging up", self.name, e)
            backend.close()
        if not backend.connected:
            backend.close()
            return None
        return backend

    def _park_rings(self, backend: VhostUserFrontend, mapped: list[MemoryRegionInfo]) -> None:
        """Leave the back-end no address in this VM's RAM: every ring the connection has
        given an address points at its parking page, then the RAM is unmapped (REM_MEM_REG,
        or a table of the parking page alone). libvhost-user keeps a stopped ring's
        addresses and, at the next boot's first memory change, drops the connection if they
        are not mapped; the parking page stays mapped as long as the connection."""
        slots = self.protocol_features & ProtocolFeature.CONFIGURE_MEM_SLOTS
        if backend.addressed_rings:
            known = backend.parking is not None       # then the back-end maps it already
            parking = backend.parking_region()
            if not known and slots:
                backend.add_mem_reg(parking)
            elif not known:
                backend.set_mem_table([*mapped, parking])
            for index in sorted(backend.addressed_rings):
                backend.set_vring_addr(index, desc=parking.user_addr, used=parking.user_addr,
                                       avail=parking.user_addr)
        if slots:
            for info in mapped:
                backend.rem_mem_reg(info)
        elif backend.parking is not None:
            backend.set_mem_table([backend.parking])

    def interrupt_routes_changed(self) -> None:
        """The driver switched MSI-X or remapped a queue's vector while the device runs:
        give the back-end each changed call eventfd."""
        with self._lock:
            if self._monitor is None:
                return
            for index in self._started:
                fd = self._call_fd(index)
                if fd == self._call_fds.get(index):
                    continue
                try:
                    self._backend.set_vring_call(index, fd)
                except VhostUserError as e:
                    log.error("%s: cannot route queue %d's interrupts: %s", self.name, index, e)
                    self.interrupt.needs_reset()
                    return
                self._call_fds[index] = fd

    def memory_changed(self, going: MemoryRegion | None = None) -> None:
        """Guest RAM changed (a DIMM was plugged, or ``going`` is about to be unplugged):
        update the back-end's memory table if the device runs (otherwise the next activation
        sends it). Logs a failure."""
        with self._lock:
            if self._monitor is None:
                return
            try:
                self._sync_memory(going)
            except VhostUserError as e:
                log.error("%s: cannot share the new guest memory with the vhost-user backend: "
                          "%s; the guest's requests there will fail", self.name, e)

    # --- the back-end -----------------------------------------------------------------------
    def _start_backend(self) -> None:
        backend = self._backend
        backend.set_features(self.acked_features
                             | (self.backend_features & VHOST_USER_F_PROTOCOL_FEATURES))
        self._sync_memory()
        for index, q in sorted(self.queues.items()):
            vq = q.queue
            backend.set_vring_num(index, vq.size)
            backend.set_vring_base(index, vq.next_avail)
            backend.set_vring_addr(index,
                                   desc=self._user_addr(vq.desc_table, desc_table_size(vq.size)),
                                   used=self._user_addr(vq.used_ring, used_ring_size(vq.size)),
                                   avail=self._user_addr(vq.avail_ring, avail_ring_size(vq.size)))
            self._call_fds[index] = self._call_fd(index)
            backend.set_vring_call(index, self._call_fds[index])
            self._started.append(index)
            backend.set_vring_kick(index, q.kick_fd)        # this starts the ring
        if self.backend_features & VHOST_USER_F_PROTOCOL_FEATURES:
            for index in self._started:                     # rings start disabled then
                backend.set_vring_enable(index, True)

    def _stop_rings(self) -> None:
        """Stop every started ring; a back-end already gone is logged once, not raised."""
        started, self._started = self._started, []
        self._call_fds = {}
        try:
            for index in started:
                if self.backend_features & VHOST_USER_F_PROTOCOL_FEATURES:
                    self._backend.set_vring_enable(index, False)
                self._backend.get_vring_base(index)
        except VhostUserError as e:
            log.warning("%s: cannot stop the vhost-user backend's rings: %s", self.name, e)

    def _release_activation(self) -> None:
        for fd in self._relay_fds.values():
            os.close(fd)
        self._relay_fds = {}
        for q in self.queues.values():
            q.queue.close()
        self.queues = {}
        self.mem = None
        self.interrupt = None

    def _call_fd(self, index: int) -> int:
        """The eventfd the back-end writes to interrupt the driver for queue ``index``."""
        queue_irqfd = getattr(self.interrupt, "queue_irqfd", None)
        fd = queue_irqfd(index) if queue_irqfd is not None else None
        return self._relay_fds[index] if fd is None else fd

    def _user_addr(self, gpa: int, length: int) -> int:
        region = self.mem.region_for(gpa, length)
        return region.host_addr + (gpa - region.gpa)

    def _sync_memory(self, going: MemoryRegion | None = None) -> None:
        """Make the back-end's memory table the guest's RAM regions (less ``going``), and
        the connection's parking page if a previous boot parked the rings there (it stays:
        a ring the driver does not set up again still points at it)."""
        wanted: dict[MemoryRegion, MemoryRegionInfo] = {}
        for r in self.mem.regions:
            if r is going:
                continue
            if r.fd < 0:
                raise VhostUserError(f"guest memory at {r.gpa:#x} has no file descriptor to "
                                     "share with the back-end")
            wanted[r] = MemoryRegionInfo(r.gpa, r.size, r.host_addr, r.fd_offset, r.fd)
        parking = self._backend.parking
        extra = [parking] if parking is not None else []
        if len(wanted) + len(extra) > self.max_regions:
            raise VhostUserError(f"the guest has {len(wanted)} memory regions; the vhost-user "
                                 f"backend at {self.socket_path} maps at most "
                                 f"{self.max_regions - len(extra)}")
        if self.protocol_features & ProtocolFeature.CONFIGURE_MEM_SLOTS:
            for region in [r for r in self._mapped if r not in wanted]:
                self._backend.rem_mem_reg(self._mapped.pop(region))
            for region, info in wanted.items():
                if region not in self._mapped:
                    self._backend.add_mem_reg(info)
                    self._mapped[region] = info
        elif wanted.keys() != self._mapped.keys():
            self._backend.set_mem_table([*wanted.values(), *extra])
            self._mapped = wanted

    # --- the monitor thread -------------------------------------------------------------------
    def _watch(self, stop_fd: int, relays: dict[int, int], backend_fd: int,
               interrupt: VirtioInterrupt) -> None:
        """Relay the back-end's calls that have no irqfd, and notice it hanging up."""
        poller = select.poll()
        poller.register(stop_fd, select.POLLIN)
        by_fd = {fd: index for index, fd in relays.items()}
        for fd in by_fd:
            poller.register(fd, select.POLLIN)
        if backend_fd >= 0:
            # Only the hang-up: replies to requests are for the thread that sent them.
            poller.register(backend_fd, select.POLLRDHUP)
        while True:
            for fd, _ in poller.poll():
                if fd == stop_fd:
                    return
                if fd == backend_fd:
                    poller.unregister(backend_fd)
                    log.error("%s: the vhost-user backend at %s hung up; the device stops "
                              "until the guest resets it", self.name, self.socket_path)
                    interrupt.needs_reset()
                elif drain_eventfd(fd):
                    interrupt.notify_queue(by_fd[fd])
