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
        self._answer_hooks: list[Callable[[Self], Any]] | None = None   # see after_answer
        self._answered: list[Callable[[Self], Any]] = []   # hooks of requests served

    def _in_loop(self) -> bool:
        return self._loop_thread is None or threading.current_thread() is self._loop_thread

    def call(self, fn: Callable[[Self], T]) -> T:
        """Run ``fn(self)`` on the control loop and return its result (or raise its error).
        What ``fn`` left for :meth:`after_answer` runs on the loop once this returned, or
        before the loop's next task if that comes first."""
        if self._in_loop():
            return fn(self)
        fut: Future = Future()
        self._tasks.put((fn, fut))
        os.eventfd_write(self._wake, 1)
        try:
            return fut.result()
        finally:
            if getattr(fut, "answer_hooks", None):
                self.post(ControlLoop._run_answer_hooks)

    def after_answer(self, fn: Callable[[Self], Any]) -> None:
        """Run ``fn(self)`` on the loop once the request being served has its answer (from
        the loop's thread, while serving a :meth:`call`): work the request sets going but
        its caller need not wait for, such as starting a hot-added vCPU's thread, which
        would otherwise compete for the GIL with the thread writing the answer. Outside a
        request (a Python caller on the loop's thread, before the loop runs) it runs now."""
        if self._answer_hooks is None:
            self._run_task(fn)
        else:
            self._answer_hooks.append(fn)

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
            self._run_answer_hooks()
            if fut is None:
                self._run_task(fn)
                continue
            if not fut.set_running_or_notify_cancel():
                continue
            self._answer_hooks = hooks = []
            try:
                result = fn(self)
            except BaseException as e:  # noqa: BLE001 - handed to the caller
                error = e
            else:
                error = None
            self._answer_hooks = None
            self._answered += hooks
            fut.answer_hooks = bool(hooks)      # the caller then wakes the loop to run them
            if error is None:
                fut.set_result(result)
            else:
                fut.set_exception(error)

    def _run_answer_hooks(self) -> None:
        while self._answered:
            self._run_task(self._answered.pop(0))

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
