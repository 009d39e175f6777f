"""The control loop: every request and guest event runs one at a time, under one lock.

Requests (from the HTTP server's connection threads, or from Python callers) go through
:meth:`ControlLoop.call`, which runs them on the calling thread while it holds the VMM's
lock: a request is served on the thread that read it, as QEMU serves QMP under its big lock,
with no hand-off to another thread and back (each hand-off is a thread wake-up the host's
scheduler may delay). Guest-initiated events (poweroff, reset, fatal errors) arrive from
vCPU threads through :meth:`ControlLoop.post`, which queues them and wakes the loop's own
thread with an eventfd; that thread runs them under the same lock, as well as work a request
leaves for after its answer (:meth:`after_answer`) and work for a quiet moment
(:meth:`when_idle`). Nothing runs beside anything else, so nothing races the VM's own state.
"""

from __future__ import annotations

import contextlib
import logging
import os
import queue
import select
import threading
import time
from typing import Any, Callable, Iterator, Self, TypeVar

from pych.errors import InternalError

log = logging.getLogger(__name__)
T = TypeVar("T")
IDLE_POLL_MS = 1000


class ControlLoop:
    """Serialises the VMM's work: :meth:`call` runs a request on the caller's thread under
    the VMM's lock; :meth:`run_loop` serves what is posted, and idle work, on its own thread
    under the same lock. Before the loop runs, :meth:`call` serves its request at once (still
    under the lock); once the loop has ended, it refuses (the VMM is shutting down)."""

    def __init__(self) -> None:
        self.exit_code: int | None = None
        self._lock = threading.Lock()       # held while any VMM work runs
        self._owner: threading.Thread | None = None     # the thread holding it
        self._closed = False
        self._tasks: queue.SimpleQueue = queue.SimpleQueue()
        self._wake = os.eventfd(0, os.EFD_CLOEXEC | os.EFD_NONBLOCK)
        self._loop_thread: threading.Thread | None = None
        self._last_request = 0.0            # time.monotonic() when the last request ended
        self._when_idle: list[Callable[[Self], Any]] = []
        self._answer_hooks: list[Callable[[Self], Any]] | None = None   # see after_answer
        self._answered: list[Callable[[Self], Any]] = []   # hooks of requests served

    @contextlib.contextmanager
    def _serving(self) -> Iterator[bool]:
        """Hold the VMM's lock; yields whether this is the outermost hold (False for work
        that a request or task runs from inside itself)."""
        me = threading.current_thread()
        if self._owner is me:               # only this thread sets it to itself
            yield False
            return
        with self._lock:
            self._owner = me
            try:
                yield True
            finally:
                self._owner = None

    def call(self, fn: Callable[[Self], T], *, answer_follows: bool = False) -> T:
        """Run ``fn(self)`` on this thread under the VMM's lock and return its result (or
        raise its error): posted events queued before it run first. What ``fn`` left for
        :meth:`after_answer` runs once this returned (``answer_follows``: once the caller
        has sent the answer and says so with :meth:`answered`): on the loop's thread, or
        before the next request if that comes first."""
        with self._serving() as outermost:
            if not outermost:
                return fn(self)
            if self._closed:
                raise InternalError("the VMM is shutting down")
            self._run_answer_hooks()
            self._drain()
            if self._loop_thread is None:            # before the loop runs: hooks at once
                return fn(self)
            self._answer_hooks = hooks = []
            try:
                return fn(self)
            finally:
                self._answer_hooks = None
                self._answered += hooks
                self._last_request = time.monotonic()
                if hooks and not answer_follows:
                    self._wake_loop()

    def answered(self) -> None:
        """The answer of a request served with ``call(fn, answer_follows=True)`` is written
        (the API server calls this after each response): what the request left for after
        its answer runs now, on the loop's thread. Until then nothing it set going
        competes for the GIL with the thread writing the answer: neither the woken loop
        thread, nor a hot-added vCPU's thread running Python up to KVM_RUN, nor vCPU 0
        taking an exit for each register the GED event's AML reads (docs/benchmarks.md,
        vCPU hot plug: the trace of ``vm.resize``)."""
        if self._answered:
            self._wake_loop()

    def after_answer(self, fn: Callable[[Self], Any]) -> None:
        """Run ``fn(self)`` once the request being served has its answer (called while
        serving a :meth:`call`): work the request sets going but its caller need not wait
        for, such as starting a hot-added vCPU's thread, which would otherwise compete for
        the GIL with the thread writing the answer. Outside a request (a Python caller
        before the loop runs, or a posted task) it runs now."""
        if self._answer_hooks is None:
            self._run_task(fn)
        else:
            self._answer_hooks.append(fn)

    def post(self, fn: Callable[[Self], Any]) -> None:
        """Queue ``fn(self)`` for the control loop without waiting (from any thread)."""
        self._tasks.put(fn)
        self._wake_loop()

    def when_idle(self, fn: Callable[[Self], Any]) -> None:
        """Run ``fn(self)`` once on the loop when no request has come for a whole poll
        interval (a second): work that can wait for a quiet moment (from a request, a
        task, or before the loop runs)."""
        self._when_idle.append(fn)

    def run_idle_work(self) -> None:
        """Run the queued idle work now, on the calling thread: for a caller that runs no
        loop (a benchmark driving the VMM in process) and wants the VMM as a quiet loop
        leaves it."""
        with self._serving():
            while self._when_idle:
                self._run_task(self._when_idle.pop(0))

    def run_loop(self) -> int:
        """Serve posted events, answered requests' hooks and idle work until the VMM is
        asked to exit; the exit code. Requests are served meanwhile by :meth:`call`."""
        self._loop_thread = threading.current_thread()
        poller = select.poll()
        poller.register(self._wake, select.POLLIN)
        while self.exit_code is None:
            try:
                woken = bool(poller.poll(IDLE_POLL_MS))
            except InterruptedError:
                woken = True
            try:
                os.eventfd_read(self._wake)
            except BlockingIOError:
                pass
            with self._serving():
                self._run_answer_hooks()
                self._drain()
                quiet = time.monotonic() - self._last_request >= IDLE_POLL_MS / 1000
                if not woken and quiet and self._when_idle and self.exit_code is None:
                    self._run_task(self._when_idle.pop(0))
        self.close_loop()
        return self.exit_code

    def close_loop(self) -> None:
        """Serve what is queued, then refuse requests from now on (the VMM is going away).
        Returns once no request is being served. Idempotent."""
        with self._serving():
            self._run_answer_hooks()
            self._drain()
            self._closed = True

    def _drain(self) -> None:
        while True:
            try:
                fn = self._tasks.get_nowait()
            except queue.Empty:
                return
            self._run_answer_hooks()
            self._run_task(fn)

    def _run_answer_hooks(self) -> None:
        while self._answered:
            self._run_task(self._answered.pop(0))

    def _run_task(self, fn: Callable[[Self], Any]) -> None:
        try:
            fn(self)
        except Exception:  # noqa: BLE001
            log.exception("VMM task failed")

    def _wake_loop(self) -> None:
        try:
            os.eventfd_write(self._wake, 1)
        except OSError:
            pass

    def request_exit(self, code: int) -> None:
        """Make :meth:`run_loop` return ``code`` once the queued work is done (the first
        code asked for wins)."""
        if self.exit_code is None:
            self.exit_code = code
        self._wake_loop()
