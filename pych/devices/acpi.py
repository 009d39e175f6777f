"""ACPI platform devices (GED, shutdown/reset register, PM timer) and the fixed DSDT pieces.

Each device is a :class:`~pych.devices.bus.BusDevice`; the ones the guest finds through the
DSDT also produce their AML with ``to_aml()``, so the register block and the AML that drives
it stay side by side. The free functions return the rest of the DSDT that the reference emits
(../shared/notes/ch-hotplug-reference.md §1.3, §2, §5.2): COM1, ``_S5_``, the power button, a PCI
segment's host bridge and the ECAM reservation. The hot plug controllers ``\\_SB_.GEC_.ESCN``
calls are the managers' (``pych.cpu.hotplug``, ``pych.memory.hotplug``,
``pych.device_manager.hotplug``).
"""

from __future__ import annotations

import enum
import logging
import threading
import time
from collections.abc import Callable
from typing import NamedTuple

from pych.acpi.aml import (
    Aml, AddressSpace, And, Device, EISAName, Else, Equal, ExtendedInterrupt, Field, FieldAccess,
    FieldUpdate, If, IO, Local, Memory32Fixed, Method, MethodCall, Name, Named, Notify,
    OpRegion, Package, Path, RegionSpace, ResourceTemplate, Store, String,
)
from pych.arch.x86_64 import layout
from pych.devices.interrupt import IrqLine
from pych.devices.pci.bus import NUM_DEVICE_SLOTS
from pych.guest_log import GuestLog
from pych.snapshot import state as snap

log = logging.getLogger(__name__)
_guest_log = GuestLog(log)       # what the guest can repeat at will is rate-limited


class AcpiNotification(enum.IntFlag):
    """Bits of the GED event register: which scan method ``ESCN`` runs."""

    CPU = 1 << 0            # \_SB_.CPUS.CSCN
    MEMORY = 1 << 1         # \_SB_.MHPC.MSCN
    PCI = 1 << 2            # \_SB_.PHPR.PSCN
    POWER_BUTTON = 1 << 3   # Notify(\_SB_.PWRB, 0x80)


class AcpiGedDevice:
    """The Generic Event Device's 1-byte MMIO event register (read-to-clear).

    :meth:`notify` ORs events into a latch and pulses the GED interrupt (edge, active high);
    the guest's ``_EVT`` runs ``\\_SB_.GEC_.ESCN``, whose single 1-byte read returns and clears
    everything latched so far, so events raised before that read coalesce into one scan.
    Other accesses read 0 and writes are ignored. Safe to call from any thread.
    """

    SIZE = 1

    def __init__(self, irq: IrqLine, mmio_base: int, *, gsi: int = layout.GED_IRQ):
        self._irq = irq
        self.mmio_base = mmio_base
        self.gsi = gsi
        self._pending = AcpiNotification(0)
        self._lock = threading.Lock()

    def notify(self, events: AcpiNotification) -> None:
        """Latch ``events`` and interrupt the guest (nothing happens for no events)."""
        if not events:
            return
        with self._lock:
            self._pending |= events
        self._irq.pulse()

    def save_state(self) -> dict:
        """The events latched and not yet read by the guest."""
        with self._lock:
            return snap.save(self, ("_pending",))

    def restore_state(self, saved: dict) -> None:
        with self._lock:
            snap.load(self, ("_pending",), saved)

    def read(self, offset: int, size: int) -> int:
        if offset != 0 or size != 1:
            _guest_log.warning("GED: ignoring %d-byte read at offset %d", size, offset)
            return 0
        with self._lock:
            pending, self._pending = self._pending, AcpiNotification(0)
        return int(pending)

    def write(self, offset: int, size: int, value: int) -> None:
        _guest_log.warning("GED: ignoring %d-byte write of %#x at offset %d", size, value, offset)

    def to_aml(self) -> bytes:
        """``\\_SB_.GEC_`` (register block and ``ESCN``) and ``\\_SB_.GED_`` (ACPI0013)."""
        dispatch = {
            AcpiNotification.CPU: MethodCall("\\_SB_.CPUS.CSCN"),
            AcpiNotification.MEMORY: MethodCall("\\_SB_.MHPC.MSCN"),
            AcpiNotification.PCI: MethodCall("\\_SB_.PHPR.PSCN"),
            AcpiNotification.POWER_BUTTON: Notify("\\_SB_.PWRB", 0x80),
        }
        # Every AML operation costs the guest's interpreter as much as any kernel code (here
        # ~5-10 ms each, emulated), and nothing the event's Notify queues runs before _EVT
        # returns (the GED's interrupt thread outranks the workers). So a PCI event alone,
        # the one a user waits on, goes straight to PSCN; any other mix tests each bit.
        escn = [Store(Path("GDAT"), Local(0)),
                If(Equal(Local(0), int(AcpiNotification.PCI)), dispatch[AcpiNotification.PCI]),
                Else(*(If(And(Local(0), int(bit)), action) for bit, action in dispatch.items()))]
        gec = Device(
            "\\_SB_.GEC_",
            Name("_HID", EISAName("PNP0A06")),
            Name("_UID", String("Generic Event Controller")),
            Name("_CRS", ResourceTemplate(_mmio_window(self.mmio_base, self.SIZE))),
            OpRegion("GDST", RegionSpace.SYSTEM_MEMORY, self.mmio_base, self.SIZE),
            Field("GDST", Named("GDAT", 8), access=FieldAccess.BYTE,
                  update=FieldUpdate.WRITE_AS_ZEROS),
            Method("ESCN", 0, *escn, serialized=True),
        )
        ged = Device(
            "\\_SB_.GED_",
            Name("_HID", String("ACPI0013")),
            Name("_UID", 0),
            Name("_CRS", ResourceTemplate(ExtendedInterrupt(self.gsi))),
            Method("_EVT", 1, MethodCall("\\_SB_.GEC_.ESCN"), serialized=True),
        )
        return gec.to_aml() + ged.to_aml()


def _mmio_window(base: int, size: int) -> AddressSpace:
    return AddressSpace.memory(base, base + size - 1)


class AcpiShutdownDevice:
    """The FADT's reset and sleep control/status register (1 byte at ``ACPI_SHUTDOWN_PORT``).

    Writing ``RESET_VALUE`` calls ``on_reset``; writing S5 with SLP_EN (``POWEROFF_VALUE``)
    calls ``on_poweroff``. Every other write (e.g. the WAK_STS clear Linux writes before
    sleeping) is ignored, and reads return 0. The callbacks run on the vCPU thread that wrote
    the register; they must arrange for the vCPUs to stop before that vCPU re-enters the
    guest.
    """

    SIZE = 4
    RESET_VALUE = 1
    SLEEP_TYPE_SHIFT = 2
    SLEEP_ENABLE = 1 << 5
    S5_SLEEP_TYPE = 5                     # must match the _S5_ package
    POWEROFF_VALUE = S5_SLEEP_TYPE << SLEEP_TYPE_SHIFT | SLEEP_ENABLE

    def __init__(self, on_reset: Callable[[], None], on_poweroff: Callable[[], None]):
        self._on_reset = on_reset
        self._on_poweroff = on_poweroff

    def read(self, offset: int, size: int) -> int:
        return 0

    def write(self, offset: int, size: int, value: int) -> None:
        if offset != 0 or size != 1:
            _guest_log.warning("ACPI shutdown: ignoring %d-byte write at offset %d", size, offset)
        elif value == self.RESET_VALUE:
            log.info("ACPI reset requested by the guest")
            self._on_reset()
        elif value == self.POWEROFF_VALUE:
            log.info("ACPI power off (S5) requested by the guest")
            self._on_poweroff()


class AcpiPmTimer:
    """The ACPI PM timer at ``ACPI_PM_TIMER_PORT``: a free-running 32-bit counter at
    3.579545 MHz, zero when the device is created (the FADT sets TMR_VAL_EXT).

    It wraps modulo 2**32, so its low 24 bits (all a guest assuming a 24-bit timer uses)
    wrap consistently modulo 2**24. Reads narrower than 4 bytes return the addressed bytes
    of the counter; writes are ignored. ``clock_ns`` is a monotonic nanosecond clock.
    """

    SIZE = 4
    FREQUENCY_HZ = 3_579_545

    def __init__(self, clock_ns: Callable[[], int] = time.monotonic_ns):
        self._clock_ns = clock_ns
        self._start_ns = clock_ns()

    def counter(self) -> int:
        elapsed = self._clock_ns() - self._start_ns
        return elapsed * self.FREQUENCY_HZ // 1_000_000_000 & 0xFFFF_FFFF

    def read(self, offset: int, size: int) -> int:
        if offset + size > self.SIZE:
            _guest_log.warning("PM timer: ignoring %d-byte read at offset %d", size, offset)
            return 0
        return self.counter() >> 8 * offset & (1 << 8 * size) - 1

    def write(self, offset: int, size: int, value: int) -> None:
        _guest_log.warning("PM timer: ignoring %d-byte write at offset %d", size, offset)


# --- fixed DSDT pieces ----------------------------------------------------------------------
def com1_aml() -> Aml:
    """``\\_SB_.COM1``: the 16550 at ``COM1_PORT`` (8 ports) on ``SERIAL_IRQ`` (edge, high)."""
    return Device(
        "\\_SB_.COM1",
        Name("_HID", EISAName("PNP0501")),
        Name("_UID", 0),
        Name("_DDN", String("COM1")),
        Name("_CRS", ResourceTemplate(
            ExtendedInterrupt(layout.SERIAL_IRQ),
            IO(layout.COM1_PORT, layout.COM1_PORT, 0, 8),
        )),
    )


def s5_aml() -> Aml:
    """``_S5_``: soft-off with SLP_TYP 5 (what :class:`AcpiShutdownDevice` expects)."""
    s5 = AcpiShutdownDevice.S5_SLEEP_TYPE
    return Name("_S5_", Package(s5, s5, 0, 0))


def power_button_aml() -> Aml:
    """``\\_SB_.PWRB``: the power button device (PNP0C0C) that ``ESCN`` notifies with 0x80."""
    return Device("\\_SB_.PWRB", Name("_HID", EISAName("PNP0C0C")), Name("_UID", 0))


class MmioWindow(NamedTuple):
    """A guest physical address range ``[base, base + size)``."""

    base: int
    size: int

    @property
    def last(self) -> int:
        return self.base + self.size - 1


def pci_segment_aml(segment: int, mmio32: MmioWindow, mmio64: MmioWindow,
                    *children: Aml) -> Device:
    """``\\_SB_.PCxx``, the host bridge of PCI segment ``segment`` (bus 0 only: ``_BBN`` 0).

    ``_CRS`` lists bus 0, on segment 0 the legacy config ports and I/O windows, the segment's
    ECAM window, and the 32- and 64-bit MMIO windows; ``_PRT`` routes INTA..INTD of slot ``s``
    to GSI :func:`~pych.arch.x86_64.layout.pci_intx_irq` ``(s)``, as the device manager wires
    them. There is no ``_OSC``, so Linux leaves hot plug to acpiphp.
    ``children`` (the hot plug slot objects and methods) follow inside the device.
    """
    resources: list[Aml] = [AddressSpace.bus_number(0, 0)]
    if segment == 0:
        resources.append(IO(layout.PCI_CONFIG_IO_PORT, layout.PCI_CONFIG_IO_PORT, 1,
                            layout.PCI_CONFIG_IO_PORT_SIZE))
    resources += [
        Memory32Fixed(layout.ecam_base(segment), layout.PCI_MMIO_CONFIG_SIZE_PER_SEGMENT),
        AddressSpace.memory(mmio32.base, mmio32.last, width=32),
        AddressSpace.memory(mmio64.base, mmio64.last, width=64),
    ]
    if segment == 0:
        resources += [AddressSpace.io(0, layout.PCI_CONFIG_IO_PORT - 1),
                      AddressSpace.io(0x0D00, 0xFFFF)]
    prt = Package(*(Package(slot << 16 | 0xFFFF, 0, 0, layout.pci_intx_irq(slot))
                    for slot in range(NUM_DEVICE_SLOTS)))
    return Device(
        f"\\_SB_.PC{segment:02X}",
        Name("_HID", EISAName("PNP0A08")),
        Name("_CID", EISAName("PNP0A03")),
        Name("_SEG", segment),
        Name("_BBN", 0),
        Name("_UID", segment),
        Name("_CRS", ResourceTemplate(*resources)),
        Name("_PRT", prt),
        *children,
    )


def pci_ecam_reservation_aml(pci_segments: int = 1) -> Aml:
    """``\\_SB_.MBRD`` (PNP0C02 motherboard resources) reserving every segment's ECAM window."""
    return Device(
        "\\_SB_.MBRD",
        Name("_HID", EISAName("PNP0C02")),
        Name("_UID", 0),
        Name("_CRS", ResourceTemplate(*(
            Memory32Fixed(layout.ecam_base(s), layout.PCI_MMIO_CONFIG_SIZE_PER_SEGMENT)
            for s in range(pci_segments)))),
    )


def build_dsdt_body(*pieces: Aml) -> bytes:
    """The DSDT's AML body: the pieces' encodings, in order."""
    return b"".join(piece.to_aml() for piece in pieces)

