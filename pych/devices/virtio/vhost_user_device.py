"""What every vhost-user device shares: the PCI side is pych's, the queues a back-end's.

A :class:`VhostUserDevice` is a virtio device whose virtqueues a separate process serves
(virtiofsd for virtio-fs, qemu-storage-daemon for vhost-user-blk) straight in guest
memory, through one :class:`~pych.devices.vhost_user.VhostUserFrontend` connection:

* at creation it connects and negotiates (SET_OWNER, features, the protocol features the
  device wants among REPLY_ACK, MQ, CONFIGURE_MEM_SLOTS, CONFIG; with MQ it checks that the
  back-end serves enough queues), so a missing or dead back-end fails the boot or the
  ``vm.add-*`` request at once, with the socket path in the message; a subclass reads what
  else it needs (:meth:`VhostUserDevice._negotiate_device`: the block device's
  configuration space);
* when the driver sets DRIVER_OK (:meth:`VhostUserDevice.activate`), it sends the features
  the driver accepted, maps every guest RAM region into the back-end (its memfd descriptor,
  guest address, size and pych's address of it), and starts each enabled queue: size,
  base, ring addresses (as pych's user addresses, as the protocol requires), the *call*
  eventfd and the *kick* eventfd. The kick eventfd is the transport's KVM ioeventfd for
  that queue's notify address, so a guest notification wakes the back-end without a VM
  exit; the call eventfd is the KVM irqfd of the queue's MSI-X vector, so the back-end
  interrupts the guest directly. Without MSI-X (or a vector) pych relays: the back-end
  writes a pych eventfd and pych raises the interrupt the transport's way (INTx);
* a queue the device serves itself (:meth:`VhostUserDevice.serves_queue`: virtio-net's
  control queue, as in the reference) is not handed over; its kicks are served on the
  device's monitor thread;
* a driver reset (status 0) stops every ring with GET_VRING_BASE; removal also hangs up;
* guest RAM hot plug while the device runs updates the back-end's memory table
  (ADD_MEM_REG / REM_MEM_REG with CONFIGURE_MEM_SLOTS, else a new SET_MEM_TABLE);
* a reboot keeps the connection (:meth:`VhostUserDevice.detach_backend`; see
  ``pych/devices/virtio/fs.py``, "Reboot").

If the back-end hangs up while the device runs, pych logs it once, records the failure
(:attr:`VhostUserDevice.failure`, which ``vm.info`` shows), tells ``on_failure`` (the VMM
emits an event) and sets DEVICE_NEEDS_RESET; a subclass may do more
(:meth:`VhostUserDevice._backend_lost`: the block and fs devices take the rings over with
:meth:`VhostUserDevice._take_over_rings` and fail the guest's requests themselves, so the
guest's I/O ends with errors instead of waiting forever). A failed device is not activated
again (a driver reset and DRIVER_OK set NEEDS_RESET); removing it works as for any device. The VMM stays as it was:
nothing on its control loop waits for a back-end except a request, which times out.
"""

from __future__ import annotations

import functools
import logging
import os
import select
import threading
from collections.abc import Callable, Sequence
from typing import ClassVar, NamedTuple

from pych.devices.vhost_user import (MEM_TABLE_MAX_REGIONS, PARKING_GPA,
                                     VHOST_USER_F_PROTOCOL_FEATURES,
                                     MemoryRegionInfo, ProtocolFeature, VhostUserError,
                                     VhostUserFrontend)
from pych.memory.guest_memory import PAGE_SIZE, GuestMemory, MemoryRegion
from pych.threads import NamedThread

from .device import (RING_FEATURES, VIRTIO_F_VERSION_1, ActivationError, ActiveQueue,
                     VirtioDevice, VirtioInterrupt, drain_eventfd)
from .queue import (DescriptorChain, Virtqueue, VirtqueueError, avail_ring_size,
                    desc_table_size, used_ring_size)

log = logging.getLogger(__name__)


class AdoptedRing(NamedTuple):
    """One running ring of a connection a local live migration hands over: the eventfd the
    back-end waits on for the guest's notifications (the sender's ioeventfd) and the one
    it writes to interrupt the guest: the irqfd of MSI-X ``vector``, or (``vector`` None)
    the sender's relay eventfd."""
    kick_fd: int
    call_fd: int
    vector: int | None


class AdoptedBackend(NamedTuple):
    """A vhost-user connection a local live migration's sender handed over (its descriptors
    passed with STATE), for the receiver's device of the same id to take over without a
    word to the back-end: ``session`` is :meth:`VhostUserDevice.release_backend`'s record
    (the negotiation and the back-end's memory table), ``rings`` the running rings."""
    connection: VhostUserFrontend
    session: dict
    rings: dict[int, AdoptedRing]

    @staticmethod
    def rings_of(spec: dict, fds: Sequence[int]) -> dict[int, AdoptedRing]:
        """The rings of a hand-over ``spec`` (:meth:`VhostUserDevice.release_backend`'s
        answer, its fd indices into ``fds``: the descriptors passed)."""
        return {int(index): AdoptedRing(fds[ring["kick"]], fds[ring["call"]],
                                        None if ring.get("vector") is None
                                        else int(ring["vector"]))
                for index, ring in spec["rings"].items()}

    @classmethod
    def from_handover(cls, spec: dict, fds: Sequence[int], path: str) -> "AdoptedBackend":
        """The receiver's side of :meth:`VhostUserDevice.release_backend`: ``spec`` as it
        answered, ``fds`` the descriptors passed with it, ``path`` the back-end's socket.
        The socket's and the rings' descriptors are the result's (the socket's is closed
        even when this fails; the rings' are not taken then)."""
        rings = cls.rings_of(spec, fds)
        session = spec["session"]
        connection = VhostUserFrontend.adopt(fds[spec["socket"]], path, session["connection"])
        return cls(connection, session, rings)

    def fds(self, *, notifiers: bool = True) -> list[int]:
        """The rings' descriptors; without ``notifiers``: only the relay eventfds (the
        kick and irqfd ones a transport took over are its own)."""
        return sorted({fd for ring in self.rings.values()
                       for fd in ((ring.kick_fd, ring.call_fd) if notifiers
                                  else (() if ring.vector is not None else (ring.call_fd,)))})

    def close(self, *, notifiers: bool = True) -> None:
        """Close this process's descriptors (the back-end sees nothing: the sender holds
        its own); ``notifiers`` False: not those a transport took over."""
        self.connection.release()
        for fd in self.fds(notifiers=notifiers):
            try:
                os.close(fd)
            except OSError:
                pass


class VhostUserDevice(VirtioDevice):
    """A virtio device whose queues the vhost-user back-end at ``socket_path`` serves.

    ``connect`` opens the connection (tests pass a fake back-end's); ``connection``, if
    given, is used instead: an open connection handed over from the previous boot of the
    VM, which the device owns from then on. Raises
    :class:`~pych.devices.vhost_user.VhostUserError` (an ``OSError``) when the back-end
    cannot be reached or does not fit; the connection is closed then.

    The interrupt object the transport passes to :meth:`activate` may offer
    ``queue_irqfd(index) -> int | None``: an eventfd that interrupts the driver for that
    queue by itself (the PCI transport's MSI-X vector irqfd). Without it, or when it answers
    None, pych relays the back-end's calls to ``notify_queue``.

    Subclasses set ``what`` (the device's name in messages), ``wanted_protocol_features``,
    ``device_features`` (the device-specific feature bits pych passes on when the back-end
    offers them) and implement :meth:`config_bytes`.
    """

    what: ClassVar[str] = "vhost-user device"
    wanted_protocol_features: ClassVar[int] = (ProtocolFeature.MQ | ProtocolFeature.REPLY_ACK
                                               | ProtocolFeature.CONFIGURE_MEM_SLOTS)
    device_features: ClassVar[int] = 0
    #: Whether a local live migration can hand the connection over (see
    #: :meth:`release_backend`); a subclass whose device keeps more than the connection
    #: (an owned daemon, an in-flight region, a queue pych serves) does not say so.
    adoptable: ClassVar[bool] = False

    def __init__(self, socket_path: str, *, queue_sizes: Sequence[int], name: str,
                 connect: Callable[[str], VhostUserFrontend] = VhostUserFrontend.connect,
                 connection: VhostUserFrontend | None = None,
                 adopted: AdoptedBackend | None = None) -> None:
        super().__init__(name=name, queue_sizes=queue_sizes)
        self.socket_path = socket_path
        self._lock = threading.Lock()
        #: Why the device stopped working (the back-end hung up), or None.
        self.failure: str | None = None
        #: Told ``(device name, failure)`` once, from the monitor thread, when it fails.
        self.on_failure: Callable[[str, str], None] | None = None
        # A local live migration (see release_backend and adopt): the sender's device handed
        # its connection over (it sends nothing more, and takes it back if the migration
        # fails); the receiver's adopted it and waits for the migration to complete before
        # it serves anything (_held). _inherited: the back-end's memory table as the sender
        # gave it (the sender's user addresses; the receiver's descriptors of the same
        # memfds), until this device first changes it (_rehome).
        self._released = False
        self._handed_vectors: list[int] = []
        self._held = False
        self._adoption: AdoptedBackend | None = None
        self._inherited: list[MemoryRegionInfo] = []
        self._inherited_parking: GuestMemory | None = None
        self._notifiers_taken = False
        if adopted is not None:
            self._backend = adopted.connection
            try:
                self._adopt_session(adopted.session)
            except BaseException:
                adopted.close()
                raise
            self._adoption = adopted
            self._init_activation_state()
            return
        if connection is not None:
            self._backend = connection
        else:
            try:
                self._backend = connect(socket_path)
            except VhostUserError as e:
                raise VhostUserError(f"{self.what} {name}: {e}") from None
        try:
            self._negotiate()
            self._negotiate_device()
        except VhostUserError as e:
            self._backend.close()
            raise VhostUserError(f"{self.what} {name}: {e}") from None
        except BaseException:
            self._backend.close()
            raise
        self._init_activation_state()

    def _init_activation_state(self) -> None:
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
                                              & self.wanted_protocol_features)
            self.protocol_features = backend.protocol_features
        wanted = self.backend_queue_count()
        if self.protocol_features & ProtocolFeature.MQ:
            served = backend.get_queue_num()
            if served < wanted:
                raise VhostUserError(self._too_few_queues(served))
        if self.protocol_features & ProtocolFeature.CONFIGURE_MEM_SLOTS:
            self.max_regions = backend.get_max_mem_slots()
        else:
            self.max_regions = MEM_TABLE_MAX_REGIONS
        # What the guest is offered: the ring features both pych's transport and the back-end
        # implement and the device's own bits pych passes on (the back-end's own bits such as
        # VHOST_F_LOG_ALL stay between us).
        self.avail_features = features & (RING_FEATURES | self.device_features)

    def _too_few_queues(self, served: int) -> str:
        return (f"the vhost-user backend at {self.socket_path} serves {served} queues, but "
                f"this device needs {self.backend_queue_count()}")

    def backend_queue_count(self) -> int:
        """How many queues the back-end must serve (GET_QUEUE_NUM); all of them by
        default. A device that serves some queues itself (:meth:`serves_queue`: the net
        device's control queue) counts the others."""
        return len(self.queue_max_sizes)

    def serves_queue(self, index: int) -> bool:
        """True for a queue pych serves itself rather than the back-end (none by
        default); its kicks go to :meth:`queue_kicked` on the monitor thread."""
        return False

    def queue_kicked(self, index: int) -> None:
        """The driver notified queue ``index``, one pych serves itself (monitor thread)."""
        raise NotImplementedError

    def _negotiate_device(self) -> None:
        """Read what the device needs beyond the common negotiation (a subclass's hook)."""

    @property
    def backend(self) -> VhostUserFrontend:
        return self._backend

    # --- lifecycle --------------------------------------------------------------------------
    @property
    def active(self) -> bool:
        return self._monitor is not None or self._held

    def activate(self, mem: GuestMemory, queues: Sequence[ActiveQueue],
                 interrupt: VirtioInterrupt) -> None:
        """Hand the enabled queues to the back-end (the driver set DRIVER_OK); a device that
        adopted a migrated connection takes its running rings over instead (:meth:`_adopt_rings`)."""
        with self._lock:
            if self.failure is not None:
                raise ActivationError(f"{self.name}: {self.failure}")
            if self.active:
                raise ActivationError(f"{self.name}: already active")
            if not queues:
                raise ActivationError(f"{self.name}: the driver enabled no queue")
            for q in queues:
                if not 0 <= q.index < len(self.queue_max_sizes):
                    raise ActivationError(f"{self.name}: no queue {q.index}")
            self.mem, self.interrupt = mem, interrupt
            self.queues = {q.index: q for q in queues}
            self._relay_fds = {q.index: os.eventfd(0, os.EFD_CLOEXEC | os.EFD_NONBLOCK)
                               for q in queues if not self.serves_queue(q.index)}
            if self._adoption is not None:
                try:
                    self._adopt_rings(self._adoption)
                except BaseException:
                    self._release_activation()
                    raise
                self._adoption = None
                self._held = True
                log.info("%s: took over the vhost-user backend at %s serving queues %s "
                         "(local migration)", self.name, self.socket_path, sorted(self.queues))
                return
            try:
                self._start_backend()
            except BaseException as e:
                self._stop_rings()
                self._release_activation()
                if isinstance(e, VhostUserError):
                    raise ActivationError(f"{self.name}: {e}") from None
                raise
            self._start_monitor()
        log.info("%s: the vhost-user backend at %s serves queues %s", self.name,
                 self.socket_path, sorted(self.queues))

    def _start_monitor(self) -> None:
        """(``_lock`` held, the device active) The thread that relays, serves pych's own
        queues and watches the back-end."""
        self._stop_fd = os.eventfd(0, os.EFD_CLOEXEC | os.EFD_NONBLOCK)
        own = {q.kick_fd: functools.partial(self._own_queue_kicked, q.kick_fd, q.index)
               for q in self.queues.values() if self.serves_queue(q.index)}
        self._monitor = NamedThread(
            target=self._watch, name=self.name, daemon=True,
            args=(self._stop_fd, dict(self._relay_fds), self._backend.fileno(), self.interrupt,
                  own))
        self._monitor.start()

    def _stop_monitor(self) -> None:
        """(``_lock`` held) Stop the monitor thread, if it runs."""
        monitor, self._monitor = self._monitor, None
        if monitor is not None:
            os.eventfd_write(self._stop_fd, 1)
            if monitor is not threading.current_thread():
                monitor.join()
            os.close(self._stop_fd)
            self._stop_fd = -1

    def reset(self) -> None:
        """The driver reset the device: stop every ring (GET_VRING_BASE) and the relay. A
        device that handed its connection to a migration's receiver, or adopted one from a
        sender and was not told the migration completed, sends nothing: the other side
        holds the rings."""
        with self._lock:
            self._stop_monitor()
            if self._released or self._held:
                self._started, self._call_fds = [], {}
                self._held = False
            else:
                self._stop_rings()
            self._release_activation()
        super().reset()                 # the base device's worker never ran: forgets features

    def close_backend(self) -> None:
        """Hang up on the back-end (virtiofsd exits when its front end goes); a device whose
        connection another process holds now (a migration) only closes its descriptors."""
        if self._released:
            self._backend.release()
        else:
            self._backend.close()
        self._mapped.clear()
        self._inherited = []
        self._drop_inherited_parking()
        adoption, self._adoption = self._adoption, None
        if adoption is not None:        # adopted, never activated
            adoption.close(notifiers=not self._notifiers_taken)

    # --- a local live migration: the connection handed over ---------------------------------
    def can_hand_over(self) -> str | None:
        """Why a local live migration cannot hand this device's connection over (None: it
        can)."""
        if not self.adoptable:
            return (f"pych cannot hand a {self.what} connection over to a live migration's "
                    "receiver")
        if self.failure is not None:
            return f"the device has failed ({self.failure})"
        return None

    def release_backend(self, take_fd: Callable[[int], int]) -> dict:
        """A local live migration hands the connection over (the VM is paused): the monitor
        thread stops and from now on the device sends the back-end nothing; the back-end's
        rings keep running (on the paused guest's memory, which the receiver maps too).
        ``take_fd(fd)`` enlists a descriptor to pass with STATE and answers its index.
        Returns what the receiver's device needs to adopt the connection
        (:meth:`adopt_spec`): the socket, each running ring's kick and call eventfds, and
        the session (negotiated features, protocol features, memory table, ring
        addresses). :meth:`retake_backend` undoes it; a device that was not retaken only
        closes its descriptors when the VM ends."""
        with self._lock:
            why = self.can_hand_over()
            if why is not None:
                raise VhostUserError(f"{self.name}: {why}")
            rings = {}
            for index in self._started:
                vector = None
                call = self._call_fds[index]
                if call != self._relay_fds.get(index):
                    vector = self._vector_of(index)
                rings[str(index)] = {"kick": take_fd(self.queues[index].kick_fd),
                                     "call": take_fd(call), "vector": vector}
            session = self._session()
            self._stop_monitor()
            self._released = True
            # the receiver registers the call eventfds as its VM's irqfds: this VM lets go
            self._handed_vectors = sorted({r["vector"] for r in rings.values()
                                           if r["vector"] is not None})
            detach = getattr(self.interrupt, "detach_irqfds", None)
            if detach is not None:
                detach(self._handed_vectors)
            return {"socket": take_fd(self._backend.fileno()), "rings": rings,
                    "session": session}

    def _vector_of(self, index: int) -> int:
        vector_of = getattr(self.interrupt, "queue_vector", None)
        if vector_of is None:
            raise VhostUserError(f"{self.name}: queue {index}'s interrupt route cannot be "
                                 "handed over")
        return vector_of(index)

    def retake_backend(self) -> None:
        """The migration failed: serve the connection again (the monitor thread restarts)
        and interrupt each running queue once, in case the back-end completed a request
        while no one relayed its call (a spurious interrupt is harmless)."""
        with self._lock:
            if not self._released:
                return
            self._released = False
            vectors, self._handed_vectors = self._handed_vectors, []
            attach = getattr(self.interrupt, "attach_irqfds", None)
            if vectors and attach is not None:
                attach(vectors)
            if self.queues and self.failure is None:
                self._start_monitor()
                for index in self._started:
                    self.interrupt.notify_queue(index)

    def commit_adoption(self) -> None:
        """The migration completed (the receiver runs the guest): serve the adopted
        connection (the monitor thread starts), and interrupt each queue once: a request
        the back-end completed after the sender saved its interrupt controller, while the
        sender's irqfd still took the call, would otherwise wait for the queue's next
        interrupt (a spurious one is harmless)."""
        with self._lock:
            if not self._held:
                return
            self._held = False
            self._start_monitor()
            for index in self._started:
                self.interrupt.notify_queue(index)

    def _session(self) -> dict:
        table = [*self._mapped.values(), *self._inherited]
        parking = self._backend.parking
        if parking is not None:
            table.append(parking)
        return {"backend_features": self.backend_features,
                "protocol_features": self.protocol_features,
                "max_regions": self.max_regions,
                "avail_features": self.avail_features,
                "connection": self._backend.session(),
                "table": [[r.guest_addr, r.size, r.user_addr, r.mmap_offset] for r in table],
                "device": self._session_device()}

    def _session_device(self) -> dict:
        """What a subclass negotiated beyond the common session (its hook)."""
        return {}

    def _adopt_session(self, session: dict) -> None:
        """The negotiation a sender's device recorded (:meth:`_session`), instead of
        negotiating: nothing is asked of the back-end."""
        self.backend_features = int(session["backend_features"])
        self.protocol_features = int(session["protocol_features"])
        self.max_regions = int(session["max_regions"])
        self.avail_features = int(session["avail_features"])
        self._adopted_table = [tuple(int(v) for v in entry) for entry in session["table"]]
        self._adopt_session_device(session.get("device") or {})

    def _adopt_session_device(self, saved: dict) -> None:
        """A subclass's part of :meth:`_adopt_session`."""

    def take_adopted_notifiers(self) -> tuple[dict[int, int], dict[int, int]] | None:
        """For the transport of a device that adopted a connection, before its state is
        restored: the kick eventfds to take as its queues' ioeventfds (queue -> fd) and the
        call eventfds to take as its MSI-X vectors' irqfds (vector -> fd), both the
        transport's from now on; None otherwise (or once taken)."""
        adoption = self._adoption
        if adoption is None or self._notifiers_taken:
            return None
        self._notifiers_taken = True
        kicks = {index: ring.kick_fd for index, ring in adoption.rings.items()}
        vectors = {ring.vector: ring.call_fd for ring in adoption.rings.values()
                   if ring.vector is not None}
        return kicks, vectors

    def _adopt_rings(self, adoption: AdoptedBackend) -> None:
        """(``_lock`` held, activating) The rings the sender's device had running are the
        driver's enabled queues, on the same eventfds: take them as they are. Raises
        :class:`VhostUserError` (not an activation error: the migration fails) when the
        restored device does not match."""
        served = sorted(i for i in self.queues if not self.serves_queue(i))
        if served != sorted(adoption.rings):
            raise VhostUserError(f"{self.name}: the back-end runs rings {sorted(adoption.rings)}"
                                 f" but the driver enabled queues {served}")
        for index, ring in adoption.rings.items():
            if self.queues[index].kick_fd != ring.kick_fd:
                raise VhostUserError(f"{self.name}: queue {index} does not notify the "
                                     "back-end's kick eventfd")
            if ring.vector is not None and self._call_fd(index) != ring.call_fd:
                raise VhostUserError(f"{self.name}: queue {index}'s interrupt is not the "
                                     "back-end's call eventfd")
        # the back-end's table: each region with this VM's descriptor of the same memfd
        inherited = []
        for gpa, size, user_addr, offset in self._adopted_table:
            if gpa == PARKING_GPA:
                if self._inherited_parking is None:
                    self._inherited_parking = GuestMemory.from_ranges(
                        [(PARKING_GPA, PAGE_SIZE)], name="vhost-user-parking")
                fd = self._inherited_parking.regions[0].fd
            else:
                region = next((r for r in self.mem.regions if r.gpa == gpa and r.size == size),
                              None)
                if region is None or region.fd < 0:
                    raise VhostUserError(f"{self.name}: the back-end maps guest memory at "
                                         f"{gpa:#x}+{size:#x}, which this VM does not have")
                fd = region.fd
            inherited.append(MemoryRegionInfo(gpa, size, user_addr, offset, fd))
        for index, ring in adoption.rings.items():
            if ring.vector is None:             # the sender's relay eventfd: ours now
                os.close(self._relay_fds[index])
                self._relay_fds[index] = ring.call_fd
            self._call_fds[index] = ring.call_fd
        self._started = sorted(adoption.rings)
        self._inherited = inherited
        self._mapped = {}

    def _drop_inherited_parking(self) -> None:
        parking, self._inherited_parking = self._inherited_parking, None
        if parking is not None:
            parking.close()

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
            mapped, self._mapped = [*self._mapped.values(), *self._inherited], {}
            self._inherited = []
        try:
            self._park_rings(backend, mapped)
        except VhostUserError as e:
            log.warning("%s: cannot keep the vhost-user backend's connection across the "
                        "reboot: %s; hanging up", self.name, e)
            backend.close()
        self._drop_inherited_parking()
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
        backend.set_features(self.backend_features_to_set())
        self._sync_memory()
        for index, q in sorted(self.queues.items()):
            if self.serves_queue(index):
                continue
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

    def backend_features_to_set(self) -> int:
        """What SET_FEATURES tells the back-end: the features the driver accepted, and
        protocol features if the back-end offered them. A device that offers bits of its
        own (virtio-net's MAC) keeps those from the back-end."""
        return self.acked_features | (self.backend_features & VHOST_USER_F_PROTOCOL_FEATURES)

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
        if self._inherited:
            self._rehome(going)
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

    def _rehome(self, going: MemoryRegion | None = None) -> None:
        """Make the back-end's memory table and ring addresses this process's, the first
        time a device that adopted a migrated connection changes the table (a DIMM, a
        driver reset, a reboot's parking). The back-end still holds the sender's user
        addresses: its table maps the same memfds at the sender's addresses, and its rings
        (started or stopped: a back-end keeps a stopped ring's addresses) were given in
        them. libvhost-user translates ring addresses through the table and gives up the
        connection when a table change leaves a ring unmapped, so at every step each ring
        address is mapped: this process's regions are added beside the sender's (the same
        memfds, so either translation reaches the same memory), every ring is given its
        address here (SET_VRING_ADDR on a running ring only re-translates it), and the
        sender's entries go. Without CONFIGURE_MEM_SLOTS: a table of both, then of ours.
        The guest's RAM as it is now (less ``going``) is what is mapped afterwards."""
        backend = self._backend
        inherited = self._inherited
        ours = [MemoryRegionInfo(r.gpa, r.size, r.host_addr, r.fd_offset, r.fd)
                for r in self.mem.regions if r.fd >= 0 and r is not going]

        def translate(addr: int) -> int:
            for entry in inherited:
                if entry.user_addr <= addr < entry.user_addr + entry.size:
                    gpa = entry.guest_addr + (addr - entry.user_addr)
                    break
            else:
                raise VhostUserError(f"a ring address {addr:#x} the back-end holds is in "
                                     "none of the memory the migration handed over")
            if PARKING_GPA <= gpa < PARKING_GPA + PAGE_SIZE:
                parking = backend.parking_region()
                return parking.user_addr + (gpa - PARKING_GPA)
            try:
                region = self.mem.region_for(gpa)
            except Exception:  # noqa: BLE001 - GuestMemoryError: the message says it
                raise VhostUserError(f"a ring at guest address {gpa:#x} is not in this VM's "
                                     "RAM") from None
            return region.host_addr + (gpa - region.gpa)

        known = backend.parking is not None
        addrs = {index: tuple(translate(a) for a in ring)
                 for index, ring in sorted(backend.ring_addrs.items())}
        if not known and backend.parking is not None:
            ours.append(backend.parking)
        slots = self.protocol_features & ProtocolFeature.CONFIGURE_MEM_SLOTS
        limit = self.max_regions if slots else MEM_TABLE_MAX_REGIONS
        if len(inherited) + len(ours) > limit:
            raise VhostUserError(f"cannot move the back-end's memory table to this process "
                                 f"after the migration: it would need {len(inherited)} + "
                                 f"{len(ours)} regions at once and the back-end maps at most "
                                 f"{limit}")
        # an entry this process would describe exactly as the sender did (the same
        # address here) stays as it is: it is neither added twice nor removed
        same = {info.key for info in inherited} & {info.key for info in ours}
        if slots:
            for info in ours:
                if info.key not in same:
                    backend.add_mem_reg(info)
        else:
            backend.set_mem_table([*[i for i in inherited if i.key not in same], *ours])
        for index, (desc, used, avail) in addrs.items():
            backend.set_vring_addr(index, desc=desc, used=used, avail=avail)
        if slots:
            for info in inherited:
                if info.key not in same:
                    backend.rem_mem_reg(info)
        else:
            backend.set_mem_table(ours)
        self._inherited = []
        self._drop_inherited_parking()
        self._mapped = {r: info for r in self.mem.regions for info in ours
                        if info.guest_addr == r.gpa and info.user_addr == r.host_addr}
        log.info("%s: the vhost-user backend at %s now maps this process's memory "
                 "(was the migration sender's)", self.name, self.socket_path)

    # --- the monitor thread -------------------------------------------------------------------
    def _own_queue_kicked(self, kick_fd: int, index: int) -> None:
        drain_eventfd(kick_fd)
        self.queue_kicked(index)

    def _watch(self, stop_fd: int, relays: dict[int, int], backend_fd: int,
               interrupt: VirtioInterrupt,
               own: dict[int, Callable[[], None]] | None = None) -> None:
        """Relay the back-end's calls that have no irqfd, serve the queues pych serves
        itself (``own``: kick fd → handler), and notice the back-end hanging up."""
        poller = select.poll()
        poller.register(stop_fd, select.POLLIN)
        by_fd = {fd: index for index, fd in relays.items()}
        handlers: dict[int, Callable[[], None]] = dict(own or {})
        for fd in handlers:
            poller.register(fd, select.POLLIN)
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
                    self._fail(self._lost_reason())
                    for source, handler in self._backend_lost(interrupt).items():
                        poller.register(source, select.POLLIN)
                        handlers[source] = handler
                elif fd in handlers:
                    try:
                        handlers[fd]()
                    except Exception:  # noqa: BLE001 - a guest's bad ring must not end pych
                        log.exception("%s: serving a queue pych serves itself; it is "
                                      "served no more", self.name)
                        poller.unregister(fd)
                elif drain_eventfd(fd):
                    interrupt.notify_queue(by_fd[fd])

    def describe_failure(self) -> str | None:
        """Why the device failed (None: it works), as fully as can be told; may wait a
        little, so only for the VMM's control loop."""
        return self.failure

    def _lost_reason(self) -> str:
        """Why the back-end went away, in one sentence."""
        return f"the vhost-user backend at {self.socket_path} hung up"

    def _fail(self, why: str) -> None:
        """Record the device's failure once: logged, kept for ``vm.info``, reported."""
        if self.failure is not None:
            return
        self.failure = why
        log.error("%s: %s; the device has failed", self.name, why)
        on_failure = self.on_failure
        if on_failure is not None:
            try:
                on_failure(self.name, why)
            except Exception:  # noqa: BLE001 - a reporting problem must not stop the monitor
                log.exception("%s: reporting the failure", self.name)

    def _backend_lost(self, interrupt: VirtioInterrupt) -> dict[int, Callable[[], None]]:
        """The back-end hung up while the device runs (on the monitor thread): set
        DEVICE_NEEDS_RESET. A subclass may serve the queues itself from now on: it returns
        the event sources (fd: handler) the monitor thread then polls too."""
        interrupt.needs_reset()
        return {}

    # --- serving the rings of a failed device (for subclasses that answer with errors) -----
    def _fail_request(self, chain: DescriptorChain) -> int:
        """Answer one request of the failed device with the device type's error; returns
        the used length. Subclasses that take the rings over implement it."""
        raise NotImplementedError

    def _take_over_rings(self, pending: Callable[[int, Virtqueue, int], list[int]]
                         ) -> dict[int, Callable[[], None]]:
        """Take the rings over from a back-end that hung up (on the monitor thread, which
        becomes the device's worker): complete the requests it left unanswered —
        ``pending(index, queue, used_idx)`` names their heads, oldest first — and everything
        the guest sends from now on with :meth:`_fail_request`, so the guest's I/O ends
        with errors instead of waiting forever. Returns the kick eventfds to poll."""
        for index, q in sorted(self.queues.items()):
            vq = q.queue
            used_idx = vq.used_idx()
            heads = pending(index, vq, used_idx)
            vq.take_over(used_idx + len(heads))
            for head in heads:
                try:
                    chain = vq.chain(head)
                except VirtqueueError as e:
                    log.warning("%s: in-flight request %d: %s", self.name, head, e)
                    vq.add_used(head, 0)
                    continue
                vq.add_used(head, self._fail_request(chain))
            self._fail_queue(index)
        return {q.kick_fd: functools.partial(self._kicked_failed, q.kick_fd, index)
                for index, q in self.queues.items()}

    def _kicked_failed(self, fd: int, index: int) -> None:
        drain_eventfd(fd)
        self._fail_queue(index)

    def _guess_inflight(self, index: int, vq: Virtqueue, used_idx: int) -> list[int]:
        """Without the back-end's in-flight record: the requests between the used and the
        available index, which are exactly the unanswered ones when the back-end answered
        in order (it took every available request, as libvhost-user back-ends do on each
        kick). A back-end that answered out of order (qemu-storage-daemon 7.2 does, with
        several requests in flight, and keeps no record: it does not offer INFLIGHT_SHMFD)
        makes this guess wrong: a request it left is not answered (that I/O waits until a
        reset), and one it answered is answered again, which Linux takes for a broken ring.
        With one request in flight at a time the guess is exact. The rings alone cannot
        tell: a head in the used ring may be an earlier use of the same head."""
        avail_idx = vq.avail_idx()
        count = (avail_idx - used_idx) & 0xFFFF
        if count > vq.size:
            return []
        heads = [vq.avail_entry(used_idx + i) for i in range(count)]
        if len(set(heads)) != len(heads):
            log.error("%s: cannot tell which requests the back-end left unanswered",
                      self.name)
            return []
        if count:
            log.warning("%s: the back-end kept no in-flight record; failing the %d requests "
                        "it had not answered, assuming it answered in order", self.name, count)
        return heads

    def _fail_queue(self, index: int) -> None:
        """Answer whatever is available on queue ``index`` as failed, then interrupt."""
        vq = self.queues[index].queue
        while True:
            vq.disable_notification()
            for chain in vq:
                vq.add_used(chain.head, self._fail_request(chain))
            if not vq.enable_notification():
                break
        self.interrupt.notify_queue(index)
