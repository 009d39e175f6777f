"""Threads whose names the host sees.

Python names a thread for itself only; the kernel's name (``/proc/<pid>/task/<tid>/comm``,
what ``top -H``, ``ps -L`` and Kata Containers read) stays the process's.  Kata finds the
vCPU threads of a sandbox by matching ``^vcpu\\d+$`` in those names to move them into the
sandbox's cgroup and pin them, as it does with Cloud Hypervisor, so every thread pych
starts is a :class:`NamedThread` that gives the kernel its name (at most 15 bytes).
"""

from __future__ import annotations

import ctypes
import queue
import threading
from typing import Callable

_PR_SET_NAME = 15
COMM_LENGTH = 15                        # TASK_COMM_LEN less the terminating NUL

_libc = ctypes.CDLL(None, use_errno=True)


def set_native_name(name: str) -> None:
    """Name the calling thread for the kernel (truncated to 15 bytes)."""
    _libc.prctl(_PR_SET_NAME, ctypes.c_char_p(name.encode()[:COMM_LENGTH]), 0, 0, 0)


class NamedThread(threading.Thread):
    """A :class:`threading.Thread` that, once running, gives the kernel its name."""

    def run(self) -> None:
        set_native_name(self.name)
        super().run()


class ThreadStarter:
    """Starts named threads without waiting for the host to schedule a new one.

    ``threading.Thread.start()`` returns once the new thread runs; on a loaded host that
    takes milliseconds (4-6 ms measured here), which a request would spend before it is
    answered: a vCPU hot plug (the reference answers once the vCPU's thread is spawned and
    the guest notified) and each API connection (a thread per connection). So the starter
    keeps one idle thread ready (:meth:`ready`): :meth:`start` hands it the job and
    returns at once; the thread renames itself and runs the job. Someone then readies the
    next one: with ``replace_first`` the thread itself, before its job (a vCPU thread, which
    its job pins and filters: the new thread inherits neither); otherwise whoever calls
    :meth:`start`, by calling :meth:`ready` once the job is handed over (the API's accept
    loop). Without a ready thread (none yet, or a start before the replacement is up)
    :meth:`start` starts a thread the ordinary way. The idle thread is named
    ``spare_name`` until it takes a job.
    """

    def __init__(self, spare_name: str, *, replace_first: bool = False):
        self._spare_name = spare_name
        self._replace_first = replace_first
        self._lock = threading.Lock()
        self._spare: tuple[threading.Thread, queue.SimpleQueue] | None = None
        self._closed = False

    def ready(self) -> None:
        """Start an idle thread unless one is ready (or the starter is closed)."""
        with self._lock:
            if self._closed or self._spare is not None:
                return
        jobs: queue.SimpleQueue | None = queue.SimpleQueue()
        thread = NamedThread(target=self._idle, args=(jobs,), name=self._spare_name,
                             daemon=True)
        try:
            thread.start()
        except RuntimeError:            # no thread now: start() will try the ordinary way
            return
        with self._lock:
            if not self._closed and self._spare is None:
                self._spare, jobs = (thread, jobs), None
        if jobs is not None:            # closed meanwhile, or another one was readied
            jobs.put(None)

    def _idle(self, jobs: queue.SimpleQueue) -> None:
        job = jobs.get()
        if job is None:
            return
        name, target = job
        set_native_name(name)
        if self._replace_first:
            self.ready()
        target()

    def start(self, name: str, target: Callable[[], None]) -> threading.Thread:
        """Run ``target`` on a thread named ``name``; returns that thread (alive)."""
        with self._lock:
            spare, self._spare = self._spare, None
        if spare is None:
            thread = NamedThread(target=target, name=name, daemon=True)
            thread.start()
            return thread
        thread, jobs = spare
        thread.name = name
        jobs.put((name, target))
        return thread

    def close(self) -> None:
        """End the idle thread, if any; later starts are ordinary ones."""
        with self._lock:
            self._closed = True
            spare, self._spare = self._spare, None
        if spare is not None:
            spare[1].put(None)
