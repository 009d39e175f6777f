"""A 16550A UART: the PC's COM1, after the National Semiconductor PC16550D datasheet.

The guest sees eight byte-wide registers at offsets 0-7 from the port base (0x3F8 for
COM1); LCR.DLAB switches offsets 0 and 1 over to the baud-rate divisor latch.  The device
knows nothing of buses or KVM: it gets an interrupt line and an output sink, and the host
feeds it input through :meth:`Serial.enqueue_input`.

How the emulation departs from silicon, and why:

* **Transmission is instantaneous.**  A byte written to THR goes to the output sink
  during the write, so LSR always reads THRE|TEMT, and the THR-empty interrupt re-arms
  after every write exactly as it would once a real transmitter drained.  Enabling
  IER.THRI while THR is empty raises the interrupt at once (Linux's startup test for
  UART_BUG_THRE and its console-write path, which saves IER, polls, then restores it,
  both depend on that re-arm).
* **Host input waits its turn.**  The 16-byte RX FIFO (one byte while FIFOs are
  disabled) is refilled from an unbounded host-side backlog as the guest drains it, so
  host input never overruns and is never reordered.  What the guest itself throws away is
  gone, as on hardware: a FIFO reset (FCR) drops what the RX FIFO holds, and Linux resets
  it while probing and opening the port, so up to 16 bytes per reset of input sent
  before the guest opens ttyS0 are lost.  A burst below the FIFO trigger level reports a
  character timeout straight away: there is no line timing to wait for.  Only loopback,
  where the guest fills the FIFO itself, can overrun (LSR.OE).
* **Modem lines.**  Outside loopback the port looks cabled to a ready modem: DCD, DSR
  and CTS asserted, RI not.  In loopback (MCR.LOOP) DTR, RTS, OUT1 and OUT2 drive DSR,
  CTS, RI and DCD, which is what Linux's 8250 probe checks, and transmitted bytes come
  back in RBR instead of leaving.  Host input waits in the backlog meanwhile.
* **The interrupt is a level.**  The line is high exactly while IIR reports a pending,
  enabled interrupt, so it is low whenever the guest reads IIR_NO_INT, and the next event
  raises it again.  That keeps output flowing whether the guest programmed the IOAPIC pin
  edge- or level-triggered.  MCR.OUT2 does not gate the line (the reference and QEMU
  ignore it too); Linux sets it before enabling interrupts anyway.

Accesses wider than a byte are split into consecutive byte accesses, as the ISA bus does.
All state is guarded by one lock: vCPU threads and the backend's input thread share it.
The output sink is called with that lock held, one byte per call, so it must not block
(the backends in :mod:`pych.devices.legacy.serial_backend` only append to a buffer).
"""

from __future__ import annotations

import threading
from collections import deque
from collections.abc import Callable

from pych.devices.interrupt import IrqLine
from pych.snapshot import state as snap

# --- Register offsets ---------------------------------------------------------------------
RBR = 0             # receive buffer (read, DLAB=0)
THR = 0             # transmit holding (write, DLAB=0)
DLL = 0             # divisor latch, low byte (DLAB=1)
IER = 1             # interrupt enable (DLAB=0)
DLM = 1             # divisor latch, high byte (DLAB=1)
IIR = 2             # interrupt identification (read)
FCR = 2             # FIFO control (write)
LCR = 3             # line control
MCR = 4             # modem control
LSR = 5             # line status
MSR = 6             # modem status
SCR = 7             # scratch
REGISTER_COUNT = 8

# --- Register bits ------------------------------------------------------------------------
IER_RDI = 0x01          # received data available
IER_THRI = 0x02         # transmit holding register empty
IER_RLSI = 0x04         # receiver line status
IER_MSI = 0x08          # modem status
IER_MASK = 0x0F         # the upper nibble is reserved on a 16550A and reads 0

IIR_NO_INT = 0x01
IIR_MSI = 0x00          # modem status changed                (priority 4, lowest)
IIR_THRI = 0x02         # THR empty                           (priority 3)
IIR_RDI = 0x04          # received data reached trigger level (priority 2)
IIR_RX_TIMEOUT = 0x0C   # received data below trigger level   (priority 2)
IIR_RLSI = 0x06         # receiver line status: OE/PE/FE/BI   (priority 1, highest)
IIR_FIFO_ENABLED = 0xC0

FCR_ENABLE_FIFO = 0x01
FCR_CLEAR_RCVR = 0x02
FCR_CLEAR_XMIT = 0x04
FCR_TRIGGER_MASK = 0xC0
FCR_TRIGGER_SHIFT = 6
RX_TRIGGER_LEVELS = (1, 4, 8, 14)

LCR_DLAB = 0x80

MCR_DTR = 0x01
MCR_RTS = 0x02
MCR_OUT1 = 0x04
MCR_OUT2 = 0x08
MCR_LOOP = 0x10
MCR_MASK = 0x1F

LSR_DR = 0x01           # data ready
LSR_OE = 0x02           # overrun error
LSR_PE = 0x04           # parity error
LSR_FE = 0x08           # framing error
LSR_BI = 0x10           # break interrupt
LSR_THRE = 0x20         # THR empty
LSR_TEMT = 0x40         # transmitter empty
LSR_FIFOE = 0x80        # error in RX FIFO
LSR_ERRORS = LSR_OE | LSR_PE | LSR_FE | LSR_BI

MSR_DCTS = 0x01         # delta CTS
MSR_DDSR = 0x02         # delta DSR
MSR_TERI = 0x04         # trailing edge of RI
MSR_DDCD = 0x08         # delta DCD
MSR_CTS = 0x10
MSR_DSR = 0x20
MSR_RI = 0x40
MSR_DCD = 0x80
MSR_DELTAS = 0x0F

FIFO_SIZE = 16
DEFAULT_DIVISOR = 12            # 9600 baud from the 1.8432 MHz reference clock

_READY_MODEM = MSR_DCD | MSR_DSR | MSR_CTS
_BYTE = [bytes((b,)) for b in range(256)]


class Serial:
    """A 16550A UART; a :class:`pych.devices.bus.BusDevice` spanning 8 I/O ports."""

    def __init__(self, irq: IrqLine, out: Callable[[bytes], None] | None = None):
        self._irq = irq
        self._out = out
        self._lock = threading.Lock()

        self._ier = 0
        self._lcr = 0
        self._mcr = 0
        self._scr = 0
        self._divisor = DEFAULT_DIVISOR
        self._fifo_enabled = False
        self._rx_trigger = RX_TRIGGER_LEVELS[0]
        self._lsr_errors = 0                # latched LSR error bits, cleared by reading LSR
        self._modem_lines = _READY_MODEM    # MSR status bits (upper nibble)
        self._msr_deltas = 0                # MSR delta bits (lower nibble), cleared by reading MSR
        self._thr_pending = False           # THR-empty interrupt latched, cleared by IIR/THR
        self._rx: deque[int] = deque()      # the guest-visible RX FIFO
        self._backlog: deque[int] = deque() # host input not yet in the FIFO
        self._irq_level = False

    # --- snapshot ----------------------------------------------------------------------------
    _STATE = ("_ier", "_lcr", "_mcr", "_scr", "_divisor", "_fifo_enabled", "_rx_trigger",
              "_lsr_errors", "_modem_lines", "_msr_deltas", "_thr_pending", "_rx", "_backlog",
              "_irq_level")

    def save_state(self) -> dict:
        with self._lock:
            return snap.save(self, self._STATE)

    def restore_state(self, saved: dict) -> None:
        """The registers and FIFOs as saved; the IRQ line's level is the in-kernel
        irqchip's, restored with it."""
        with self._lock:
            snap.load(self, self._STATE, saved)

    # --- BusDevice ---------------------------------------------------------------------------

    def read(self, offset: int, size: int) -> int:
        with self._lock:
            value = 0
            for i in range(size):
                value |= self._read_register(offset + i) << (8 * i)
            self._update_irq()
            return value

    def write(self, offset: int, size: int, value: int) -> None:
        with self._lock:
            for i in range(size):
                self._write_register(offset + i, (value >> (8 * i)) & 0xFF)
            self._update_irq()

    # --- Host side ---------------------------------------------------------------------------

    def enqueue_input(self, data: bytes) -> None:
        """Queue bytes that arrived from the host; safe to call from any thread."""
        if not data:
            return
        with self._lock:
            self._backlog.extend(data)
            self._refill_rx()
            self._update_irq()

    # --- Registers -----------------------------------------------------------------------------

    def _read_register(self, reg: int) -> int:
        dlab = self._lcr & LCR_DLAB
        if reg == RBR:
            return self._divisor & 0xFF if dlab else self._pop_rx()
        if reg == IER:
            return self._divisor >> 8 if dlab else self._ier
        if reg == IIR:
            iir = self._pending_interrupt()
            if iir == IIR_THRI:             # reading IIR acknowledges THR-empty, and only that
                self._thr_pending = False
            return iir | (IIR_FIFO_ENABLED if self._fifo_enabled else 0)
        if reg == LCR:
            return self._lcr
        if reg == MCR:
            return self._mcr
        if reg == LSR:
            lsr = LSR_THRE | LSR_TEMT | self._lsr_errors | (LSR_DR if self._rx else 0)
            self._lsr_errors = 0
            return lsr
        if reg == MSR:
            msr = self._modem_lines | self._msr_deltas
            self._msr_deltas = 0
            return msr
        if reg == SCR:
            return self._scr
        return 0xFF                         # past the 8 registers: open bus

    def _write_register(self, reg: int, value: int) -> None:
        dlab = self._lcr & LCR_DLAB
        if reg == THR:
            if dlab:
                self._divisor = (self._divisor & 0xFF00) | value
            else:
                self._transmit(value)
        elif reg == IER:
            if dlab:
                self._divisor = (self._divisor & 0x00FF) | (value << 8)
            else:
                self._set_ier(value)
        elif reg == FCR:
            self._set_fcr(value)
        elif reg == LCR:
            self._lcr = value
        elif reg == MCR:
            self._set_mcr(value)
        elif reg == SCR:
            self._scr = value
        # LSR and MSR are read-only; writes there (factory test on real parts) are dropped.

    def _transmit(self, byte: int) -> None:
        if self._mcr & MCR_LOOP:
            self._receive_looped(byte)
        elif self._out is not None:
            self._out(_BYTE[byte])
        # The byte has left: THR is empty again, which re-arms the THR-empty interrupt.
        self._thr_pending = True

    def _set_ier(self, value: int) -> None:
        value &= IER_MASK
        if (value ^ self._ier) & IER_THRI:
            # THR is always empty, so enabling THRI raises the interrupt at once; disabling
            # it drops the latch so that it cannot fire stale on a later enable.
            self._thr_pending = bool(value & IER_THRI)
        self._ier = value

    def _set_fcr(self, value: int) -> None:
        enable = bool(value & FCR_ENABLE_FIFO)
        if enable != self._fifo_enabled:
            self._rx.clear()                # switching FIFO mode empties both FIFOs
        self._fifo_enabled = enable
        if enable:                          # the other bits only take with FCR0 set
            if value & FCR_CLEAR_RCVR:
                self._rx.clear()
            self._rx_trigger = RX_TRIGGER_LEVELS[(value & FCR_TRIGGER_MASK) >> FCR_TRIGGER_SHIFT]
        else:
            self._rx_trigger = RX_TRIGGER_LEVELS[0]
        self._refill_rx()

    def _set_mcr(self, value: int) -> None:
        self._mcr = value & MCR_MASK
        lines = self._loopback_lines() if self._mcr & MCR_LOOP else _READY_MODEM
        changed = lines ^ self._modem_lines
        if changed & MSR_CTS:
            self._msr_deltas |= MSR_DCTS
        if changed & MSR_DSR:
            self._msr_deltas |= MSR_DDSR
        if changed & MSR_DCD:
            self._msr_deltas |= MSR_DDCD
        if changed & MSR_RI and not lines & MSR_RI:
            self._msr_deltas |= MSR_TERI
        self._modem_lines = lines
        self._refill_rx()                   # leaving loopback reconnects the receiver

    def _loopback_lines(self) -> int:
        mcr, lines = self._mcr, 0
        if mcr & MCR_DTR:
            lines |= MSR_DSR
        if mcr & MCR_RTS:
            lines |= MSR_CTS
        if mcr & MCR_OUT1:
            lines |= MSR_RI
        if mcr & MCR_OUT2:
            lines |= MSR_DCD
        return lines

    # --- Receiver ------------------------------------------------------------------------------

    def _rx_capacity(self) -> int:
        return FIFO_SIZE if self._fifo_enabled else 1

    def _refill_rx(self) -> None:
        if self._mcr & MCR_LOOP:
            return                          # loopback disconnects the receiver from the line
        rx, backlog, capacity = self._rx, self._backlog, self._rx_capacity()
        while backlog and len(rx) < capacity:
            rx.append(backlog.popleft())

    def _pop_rx(self) -> int:
        if not self._rx:
            return 0
        byte = self._rx.popleft()
        self._refill_rx()
        return byte

    def _receive_looped(self, byte: int) -> None:
        if len(self._rx) < self._rx_capacity():
            self._rx.append(byte)
        else:
            self._lsr_errors |= LSR_OE      # the FIFO keeps its bytes; the new one is lost

    # --- Interrupt -----------------------------------------------------------------------------

    def _pending_interrupt(self) -> int:
        """The IIR interrupt identification (low nibble), by the datasheet's priorities."""
        ier = self._ier
        if ier & IER_RLSI and self._lsr_errors:
            return IIR_RLSI
        if ier & IER_RDI and self._rx:
            if self._fifo_enabled and len(self._rx) < self._rx_trigger:
                return IIR_RX_TIMEOUT
            return IIR_RDI
        if ier & IER_THRI and self._thr_pending:
            return IIR_THRI
        if ier & IER_MSI and self._msr_deltas:
            return IIR_MSI
        return IIR_NO_INT

    def _update_irq(self) -> None:
        level = self._pending_interrupt() != IIR_NO_INT
        if level != self._irq_level:
            self._irq_level = level
            self._irq.set_level(level)
