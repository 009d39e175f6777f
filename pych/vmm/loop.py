"""The control loop: one thread that runs every request and guest event, one at a time.

Requests arrive from the HTTP server thread (or from Python callers) as callables run on the
loop through :meth:`ControlLoop.call`; guest-initiated events (poweroff, reset, fatal errors)
arrive from vCPU threads through :meth:`ControlLoop.post`. Both wake the loop with an
eventfd, so nothing ever races the VM's own state.
"""

from __future__ import annotations

import logging
import os
import queue
import select
import threading
from concurrent.futures import Future
from typing import Any, Callable, Self, TypeVar

log = logging.getLogger(__name__)
T = TypeVar("T")
IDLE_POLL_MS = 1000


class ControlLoop:
    """Serialises work onto the thread that runs :meth:`run_loop`. Before the loop runs (or
    when the caller is the loop's own thread) :meth:`call` runs its function at once."""

    def __init__(self) -> None:
        self.exit_code: int | None = None
        self._tasks: queue.SimpleQueue = queue.SimpleQueue()
        self._wake = os.eventfd(0, os.EFD_CLOEXEC | os.EFD_NONBLOCK)
        self._loop_thread: threading.Thread | None = None
        self._when_idle: list[Callable[[Self], Any]] = []

    def _in_loop(self) -> bool:
        return self._loop_thread is None or threading.current_thread() is self._loop_thread

    def call(self, fn: Callable[[Self], T]) -> T:
        """Run ``fn(self)`` on the control loop and return its result (or raise its error)."""
        if self._in_loop():
            return fn(self)
        fut: Future = Future()
        self._tasks.put((fn, fut))
        os.eventfd_write(self._wake, 1)
        return fut.result()

    def post(self, fn: Callable[[Self], Any]) -> None:
        """Queue ``fn(self)`` on the control loop without waiting (from any thread)."""
        self._tasks.put((fn, None))
        try:
            os.eventfd_write(self._wake, 1)
        except OSError:
            pass

    def when_idle(self, fn: Callable[[Self], Any]) -> None:
        """Run ``fn(self)`` once on the loop when it next has nothing to do for a whole
        poll interval (a second): work that can wait for a quiet moment (from the loop's
        thread, or before the loop runs)."""
        self._when_idle.append(fn)

    def run_idle_work(self) -> None:
        """Run the queued idle work now, on the calling thread: for a caller that runs no
        loop (a benchmark driving the VMM in process) and wants the VMM as a quiet loop
        leaves it."""
        while self._when_idle:
            self._run_task(self._when_idle.pop(0))

    def run_loop(self) -> int:
        """Serve requests and guest events until the VMM is asked to exit; the exit code."""
        self._loop_thread = threading.current_thread()
        poller = select.poll()
        poller.register(self._wake, select.POLLIN)
        while self.exit_code is None:
            try:
                idle = not poller.poll(IDLE_POLL_MS)
            except InterruptedError:
                idle = False
            if idle and self._when_idle:
                self._run_task(self._when_idle.pop(0))
            try:
                os.eventfd_read(self._wake)
            except BlockingIOError:
                pass
            self._drain()
        self._drain()
        return self.exit_code

    def _drain(self) -> None:
        while True:
            try:
                fn, fut = self._tasks.get_nowait()
            except queue.Empty:
                return
            if fut is None:
                self._run_task(fn)
                continue
            if not fut.set_running_or_notify_cancel():
                continue
            try:
                fut.set_result(fn(self))
            except BaseException as e:  # noqa: BLE001 - handed to the caller
                fut.set_exception(e)

    def _run_task(self, fn: Callable[[Self], Any]) -> None:
        try:
            fn(self)
        except Exception:  # noqa: BLE001
            log.exception("VMM task failed")

    def request_exit(self, code: int) -> None:
        """Make :meth:`run_loop` return ``code`` once the queued work is done (the first
        code asked for wins)."""
        if self.exit_code is None:
            self.exit_code = code
        try:
            os.eventfd_write(self._wake, 1)
        except OSError:
            pass
