"""The host end of ``--serial``: it outlives the VM, so a reboot keeps the same pty, file or
socket; each boot's 16550 UART attaches to it."""

from __future__ import annotations

from pych.devices.legacy.serial_backend import SerialBackend


class SerialPort:
    """Joins a :class:`SerialBackend` (the host side) to the current boot's UART: input from
    the host goes to the attached UART (dropped while none is attached), output from the UART
    goes to the backend."""

    def __init__(self, backend: SerialBackend):
        self.backend = backend
        self._uart = None
        backend.start(self)

    def enqueue_input(self, data: bytes) -> None:
        uart = self._uart
        if uart is not None:
            uart.enqueue_input(data)

    def write(self, data: bytes) -> None:
        self.backend.write(data)

    def attach(self, uart) -> None:
        self._uart = uart

    def detach(self) -> None:
        self._uart = None

    def release(self) -> None:
        """Close the host end, the UART staying attached (a live migration hands the host
        end to the receiver: its socket path, file or terminal)."""
        self.backend.close()

    def reopen(self, backend: SerialBackend) -> None:
        """Carry on with ``backend`` as the host end (after :meth:`release`, or for a VM
        received by migration, which opens the host end when it takes over)."""
        self.backend = backend
        backend.start(self)

    def close(self) -> None:
        self._uart = None
        self.backend.close()
