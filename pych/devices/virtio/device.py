"""The transport-independent virtio device model.

A :class:`VirtioDevice` declares its type, queue sizes, feature bits and config space.
A transport (``pci_transport``) negotiates features with the driver, then hands the
device its queues with :meth:`VirtioDevice.activate`.  From then on one worker thread
per device (or per queue group: :meth:`VirtioDevice.worker_plans`) waits in ``poll()``
on the queues' kick eventfds (and any extra event sources the device declares) and
processes requests; the wait is a blocking system
call, so an idle device costs no GIL time.  :meth:`VirtioDevice.reset` stops the worker
and drops what activation created; :meth:`VirtioDevice.shutdown` also releases the
backend (files, locks).

Devices complete requests through the injected :class:`VirtioInterrupt`; they never see
the transport, the bus or the VM.
"""

from __future__ import annotations

import enum
import functools
import logging
import os
import select
import threading
import time
from collections.abc import Callable, Sequence
from typing import ClassVar, NamedTuple, Protocol

from pych.memory.guest_memory import GuestMemory
from pych.threads import NamedThread

from .queue import DescriptorChain, Virtqueue

log = logging.getLogger(__name__)


class VirtioDeviceType(enum.IntEnum):
    NET = 1
    BLOCK = 2
    CONSOLE = 3
    RNG = 4
    BALLOON = 5
    SCSI = 8
    P9 = 9
    GPU = 16
    INPUT = 18
    VSOCK = 19
    IOMMU = 23
    MEM = 24
    FS = 26
    PMEM = 27
    WATCHDOG = 35


class DeviceStatus(enum.IntFlag):
    ACKNOWLEDGE = 1
    DRIVER = 2
    DRIVER_OK = 4
    FEATURES_OK = 8
    DEVICE_NEEDS_RESET = 64
    FAILED = 128


# Device-independent feature bits (masks).
VIRTIO_F_INDIRECT_DESC = 1 << 28
VIRTIO_F_EVENT_IDX = 1 << 29
VIRTIO_F_VERSION_1 = 1 << 32
VIRTIO_F_ACCESS_PLATFORM = 1 << 33
VIRTIO_F_RING_PACKED = 1 << 34
VIRTIO_F_IN_ORDER = 1 << 35
VIRTIO_F_RING_RESET = 1 << 40

#: What every device offers on top of its own bits: the split-ring features
#: :class:`~pych.devices.virtio.queue.Virtqueue` implements, and virtio 1.x.
RING_FEATURES = VIRTIO_F_VERSION_1 | VIRTIO_F_INDIRECT_DESC | VIRTIO_F_EVENT_IDX


class ActivationError(Exception):
    """The driver's setup cannot run this device (the transport sets NEEDS_RESET)."""


class ActiveQueue(NamedTuple):
    index: int            # the queue's index in the device
    queue: Virtqueue
    kick_fd: int          # eventfd the driver's notifications land in


class WorkerPlan(NamedTuple):
    """One worker thread of a device: its name, the queues whose kicks it serves, the extra
    event sources it polls, and what it calls when its :meth:`VirtioDevice.wake_after`
    time comes."""
    name: str
    queues: tuple[int, ...]
    sources: list[tuple[int, Callable[[], None]]]
    woken: Callable[[], None]


class VirtioInterrupt(Protocol):
    """How a device signals the driver; implemented by the transport."""

    def notify_queue(self, index: int) -> None:
        """Used buffers were added to queue ``index``."""

    def notify_config(self) -> None:
        """The device configuration space changed."""

    def needs_reset(self) -> None:
        """The device hit an internal error and stopped; set DEVICE_NEEDS_RESET."""


class VirtioDevice:
    """Base class: subclasses set ``device_type`` and implement :meth:`handle_chain`
    (or override :meth:`process_queue`) plus, if they have one, :meth:`config_bytes`."""

    device_type: ClassVar[VirtioDeviceType]

    def __init__(self, *, name: str, queue_sizes: Sequence[int], features: int = 0) -> None:
        if not queue_sizes:
            raise ValueError("a virtio device needs at least one queue")
        self.name = name
        self.queue_max_sizes = tuple(queue_sizes)
        self.avail_features = features | RING_FEATURES
        self.acked_features = 0
        self.mem: GuestMemory | None = None
        self.queues: dict[int, ActiveQueue] = {}
        self.interrupt: VirtioInterrupt | None = None
        self._config_generation = 0
        self._lifecycle = threading.Lock()
        self._worker: threading.Thread | None = None       # the first of _workers
        self._workers: list[threading.Thread] = []
        self._stop_fd = -1
        self._quiesced = False                  # workers stopped by quiesce()
        self._worker_state = threading.local()  # wake_at per worker thread: see wake_after

    def __repr__(self) -> str:
        return f"<{type(self).__name__} {self.name}>"

    # --- features ---------------------------------------------------------------------------
    def ack_features(self, features: int) -> None:
        """Record what the driver accepted (the transport already checked it is a subset)."""
        self.acked_features = features & self.avail_features

    def has_feature(self, feature: int) -> bool:
        return self.acked_features & feature == feature

    # --- configuration space ----------------------------------------------------------------
    def config_bytes(self) -> bytes:
        """The device-specific configuration structure, little-endian."""
        return b""

    def read_config(self, offset: int, size: int) -> int:
        data = self.config_bytes()
        if offset < 0 or offset + size > len(data):
            return 0
        return int.from_bytes(data[offset:offset + size], "little")

    def write_config(self, offset: int, size: int, value: int) -> None:
        log.debug("%s: ignoring config write at %#x", self.name, offset)

    @property
    def config_generation(self) -> int:
        return self._config_generation

    def config_changed(self) -> None:
        """Bump the generation and tell an active driver to re-read the config."""
        self._config_generation = (self._config_generation + 1) & 0xFF
        interrupt = self.interrupt
        if interrupt is not None:
            interrupt.notify_config()

    # --- snapshot ------------------------------------------------------------------------------
    def save_state(self) -> dict:
        """What the device keeps beyond its queues and features (the transport saves
        those): the config generation; a device with more overrides both methods."""
        return {"config_generation": self._config_generation}

    def restore_state(self, saved: dict) -> None:
        self._config_generation = saved["config_generation"]

    # --- lifecycle --------------------------------------------------------------------------
    @property
    def active(self) -> bool:
        return self._worker is not None

    def activate(self, mem: GuestMemory, queues: Sequence[ActiveQueue],
                 interrupt: VirtioInterrupt) -> None:
        """Start serving ``queues`` (the ones the driver enabled)."""
        with self._lifecycle:
            if self._worker is not None:
                raise ActivationError(f"{self.name}: already active")
            for q in queues:
                if not 0 <= q.index < len(self.queue_max_sizes):
                    raise ActivationError(f"{self.name}: no queue {q.index}")
            self.check_queues({q.index for q in queues})
            self.mem = mem
            self.queues = {q.index: q for q in queues}
            self.interrupt = interrupt
            self._stop_fd = os.eventfd(0, os.EFD_CLOEXEC | os.EFD_NONBLOCK)
            self._start_workers()

    def _start_workers(self) -> None:
        """One named thread per :meth:`worker_plans` entry, started (under the lifecycle
        lock: activation, or running again after :meth:`quiesce`)."""
        self._workers = [NamedThread(target=self._run, args=(plan,), name=plan.name,
                                     daemon=True)
                         for plan in self.worker_plans()]
        self._worker = self._workers[0]
        for worker in self._workers:
            worker.start()

    def reset(self) -> None:
        """Stop the worker and forget the queues; the device can be activated again."""
        with self._lifecycle:
            workers, self._workers, self._worker = self._workers, [], None
            self._quiesced = False
            if workers:
                os.eventfd_write(self._stop_fd, 1)      # stays readable: every worker sees it
                for worker in workers:
                    if worker is not threading.current_thread():
                        worker.join()
                os.close(self._stop_fd)
                self._stop_fd = -1
                for q in self.queues.values():
                    q.queue.close()
                self.queues = {}
                self.mem = None
                self.interrupt = None
            self.acked_features = 0

    def quiesce(self) -> None:
        """Stop the worker threads and keep everything else (queues, their positions, the
        interrupt): the device takes nothing from its queues or back-end until
        :meth:`unquiesce`. A live migration hands the back-end over meanwhile."""
        with self._lifecycle:
            if not self._workers or self._quiesced:
                return
            os.eventfd_write(self._stop_fd, 1)
            for worker in self._workers:
                if worker is not threading.current_thread():
                    worker.join()
            self._quiesced = True

    def unquiesce(self) -> None:
        """Start the workers :meth:`quiesce` stopped again (the migration failed)."""
        with self._lifecycle:
            if not self._quiesced:
                return
            self._quiesced = False
            drain_eventfd(self._stop_fd)
            self._start_workers()

    def shutdown(self) -> None:
        """Reset, then release the backend: the device is being removed."""
        self.reset()
        self.close_backend()

    # --- hooks for subclasses ---------------------------------------------------------------
    def check_queues(self, indices: set[int]) -> None:
        """Raise :class:`ActivationError` if the device cannot run with these queues."""
        if not indices:
            raise ActivationError(f"{self.name}: the driver enabled no queue")

    def close_backend(self) -> None:
        """Release host resources for good (files, locks, sockets)."""

    def counters(self) -> dict[str, int] | None:
        """What ``vm.counters`` shows for this device (the reference's keys), or None for a
        device that keeps no counters."""
        return None

    def interrupt_routes_changed(self) -> None:
        """While the device is active, the driver switched MSI-X on or off or mapped a queue
        to another vector. Only a device that handed a queue's interrupt eventfd to a
        back-end outside pych (vhost-user) has anything to do."""

    def worker_plans(self) -> list[WorkerPlan]:
        """The worker threads to start at activation (called with :attr:`queues` set): by
        default one, named as the device, serving every queue. A device with independent
        queue groups (virtio-net's queue pairs) returns one plan per group."""
        return [WorkerPlan(self.name, tuple(self.queues), self.event_sources(), self.woken)]

    def event_sources(self) -> list[tuple[int, Callable[[], None]]]:
        """Extra (fd, handler) pairs the worker polls besides the queue kicks; each handler
        runs on the worker thread when its fd is readable and must consume the event."""
        return []

    def wake_after(self, seconds: float) -> None:
        """Worker thread only: call :meth:`woken` once ``seconds`` have passed (or sooner,
        if an earlier wake-up is already due).  A rate-limited device uses it to retry a
        request its limiter held back: the worker sleeps in ``poll()`` until then."""
        at = time.monotonic() + seconds
        state = self._worker_state
        if getattr(state, "wake_at", None) is None or at < state.wake_at:
            state.wake_at = at

    def woken(self) -> None:
        """The time asked for with :meth:`wake_after` has come (on the worker thread)."""

    def handle_chain(self, index: int, chain: DescriptorChain) -> int:
        """Serve one request from queue ``index``; return the bytes written to its
        device-writable buffers (the used length)."""
        raise NotImplementedError

    def process_queue(self, index: int) -> None:
        """Complete every available chain of queue ``index`` with :meth:`handle_chain`,
        then interrupt the driver once if it asked for it."""
        queue = self.queues[index].queue
        while True:
            queue.disable_notification()
            for chain in queue:
                queue.add_used(chain.head, self.handle_chain(index, chain))
            if not queue.enable_notification():
                break
        self.signal_used(index)

    def signal_used(self, index: int) -> None:
        if self.queues[index].queue.needs_notification():
            self.interrupt.notify_queue(index)

    # --- worker -------------------------------------------------------------------------------
    def _run(self, plan: WorkerPlan) -> None:
        poller = select.poll()
        handlers: dict[int, Callable[[], None]] = {}
        for index in plan.queues:
            q = self.queues[index]
            handlers[q.kick_fd] = functools.partial(self._kicked, q.kick_fd, q.index)
        handlers.update(plan.sources)
        state = self._worker_state
        state.wake_at = None
        stop_fd = self._stop_fd
        poller.register(stop_fd, select.POLLIN)
        for fd in handlers:
            poller.register(fd, select.POLLIN)
        while True:
            timeout = None
            if state.wake_at is not None:          # only ever set by a rate-limited device
                timeout = max(0.0, (state.wake_at - time.monotonic()) * 1000.0)
            events = poller.poll(timeout)
            try:
                for fd, _ in events:
                    if fd == stop_fd:
                        return
                    handlers[fd]()
                if state.wake_at is not None and time.monotonic() >= state.wake_at:
                    state.wake_at = None
                    plan.woken()
            except Exception:
                log.exception("%s: device error; stopping until the driver resets it", self.name)
                self.interrupt.needs_reset()
                return

    def _kicked(self, fd: int, index: int) -> None:
        drain_eventfd(fd)
        self.process_queue(index)


def drain_eventfd(fd: int) -> int:
    """Consume a non-blocking eventfd's count (0 if it was not signalled)."""
    try:
        return os.eventfd_read(fd)
    except BlockingIOError:
        return 0
