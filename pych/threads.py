"""Threads whose names the host sees.

Python names a thread for itself only; the kernel's name (``/proc/<pid>/task/<tid>/comm``,
what ``top -H``, ``ps -L`` and Kata Containers read) stays the process's.  Kata finds the
vCPU threads of a sandbox by matching ``^vcpu\\d+$`` in those names to move them into the
sandbox's cgroup and pin them, as it does with Cloud Hypervisor, so every thread pych
starts is a :class:`NamedThread` that gives the kernel its name (at most 15 bytes).
"""

from __future__ import annotations

import ctypes
import threading

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
