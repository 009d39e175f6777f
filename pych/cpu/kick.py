"""The signal that kicks a vCPU thread out of ``KVM_RUN``, apart from the vCPU code so the
process can install its handler at start without loading KVM and the devices."""

from __future__ import annotations

import signal

KICK_SIGNAL = signal.SIGRTMIN


def install_kick_handler() -> None:
    """A no-op handler, so the kick signal interrupts KVM_RUN instead of killing us.
    Must be called from the main thread before any vCPU thread starts."""
    signal.signal(KICK_SIGNAL, lambda *_: None)
