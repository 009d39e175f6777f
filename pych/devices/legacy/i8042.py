"""Just enough of an i8042 keyboard controller for a guest to reset the machine through it.

Inserted at ``layout.I8042_PORT`` (0x60) over :data:`PORT_COUNT` ports, so that it covers
both of the controller's ports and the one in between that Linux needs answered:

=====  ======  ==============================================================================
port   offset  behaviour
=====  ======  ==============================================================================
0x60   0       data: reads 0 (no keyboard, no mouse); writes ignored
0x61   1       system control port B (not the i8042's, but inside its window): reads 0x20.
               Linux's PIT-based TSC calibration spins until bit 5 (PIT channel 2 output)
               reads 1; the reference and kvmtool answer 0x20 so that the loop ends at
               once.  With KVM's in-kernel PIT, KVM answers this port itself and no
               access ever reaches here.
0x64   4       status on read: 0, i.e. output buffer empty (nothing to read) and input
               buffer empty (ready for a command); command on write: 0xFE, "pulse the
               reset line", calls ``on_reset``; every other command is ignored.
=====  ======  ==============================================================================

There is no keyboard behind it and no IRQ 1.  ``on_reset`` runs on the vCPU thread that
wrote the command and may run several times (Linux writes 0xFE up to ten times while it
waits), so it should only *request* the reset, e.g. by setting an event.
"""

from __future__ import annotations

import logging
from collections.abc import Callable

log = logging.getLogger(__name__)

PORT_COUNT = 5                  # 0x60..0x64

DATA = 0
PORT_B = 1
COMMAND = 4                     # write
STATUS = 4                      # read

CMD_PULSE_RESET = 0xFE
PORT_B_PIT2_OUTPUT = 0x20


class I8042:
    """A :class:`pych.devices.bus.BusDevice` for ports 0x60-0x64."""

    def __init__(self, on_reset: Callable[[], None]):
        self._on_reset = on_reset

    def read(self, offset: int, size: int) -> int:
        if size != 1:
            return (1 << (8 * size)) - 1
        if offset in (DATA, STATUS):
            return 0
        if offset == PORT_B:
            return PORT_B_PIT2_OUTPUT
        return 0xFF                     # 0x62, 0x63: nothing there

    def write(self, offset: int, size: int, value: int) -> None:
        if size == 1 and offset == COMMAND and value == CMD_PULSE_RESET:
            log.info("i8042: guest requested a reset")
            self._on_reset()
