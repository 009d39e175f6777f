"""The 16550A UART, driven the way Linux's 8250 driver drives it."""

import random
import threading

from hypothesis import given, settings
from hypothesis import strategies as st

from pych.devices.legacy.serial import (
    DLL, DLM, FCR, FCR_CLEAR_RCVR, FCR_ENABLE_FIFO, FIFO_SIZE, IER, IER_MSI, IER_RDI,
    IER_RLSI, IER_THRI, IIR, IIR_FIFO_ENABLED, IIR_MSI, IIR_NO_INT, IIR_RDI, IIR_RLSI,
    IIR_RX_TIMEOUT, IIR_THRI, LCR, LCR_DLAB, LSR, LSR_DR, LSR_OE, LSR_TEMT, LSR_THRE, MCR,
    MCR_DTR, MCR_LOOP, MCR_OUT1, MCR_OUT2, MCR_RTS, MSR, MSR_CTS, MSR_DCD, MSR_DCTS,
    MSR_DDCD, MSR_DDSR, MSR_DSR, MSR_RI, MSR_TERI, RBR, SCR, THR, Serial,
)

from tests.support.fakes import RecordingIrq

UART_LCR_CONF_MODE_A = 0x80     # Linux's names for the LCR values its probe writes
UART_LCR_CONF_MODE_B = 0xBF
UART_LCR_WLEN8 = 0x03
UART_EFR = 2
UART_FCR7_64BYTE = 0x20
UART_IER_UUE = 0x40


class Uart:
    """A Serial with its interrupt line and output captured, and byte-wide accessors."""

    def __init__(self):
        self.irq = RecordingIrq()
        self.output = bytearray()
        self.dev = Serial(self.irq, self.output.extend)

    def inb(self, reg):
        return self.dev.read(reg, 1)

    def outb(self, reg, value):
        self.dev.write(reg, 1, value)

    def iir_id(self):
        return self.inb(IIR) & 0x0F


def test_reset_state():
    u = Uart()
    assert u.inb(LSR) == LSR_THRE | LSR_TEMT
    assert u.inb(IIR) == IIR_NO_INT
    assert u.inb(IER) == 0
    assert u.inb(LCR) == 0
    assert u.inb(MCR) == 0
    assert u.inb(MSR) == MSR_DCD | MSR_DSR | MSR_CTS
    assert not u.irq.level and u.irq.history == []


def test_divisor_latch_shadows_rbr_thr_and_ier():
    u = Uart()
    u.outb(IER, IER_RDI)
    u.outb(LCR, LCR_DLAB | UART_LCR_WLEN8)
    assert (u.inb(DLL), u.inb(DLM)) == (12, 0)          # 9600 baud at reset
    u.outb(DLL, 0x01)
    u.outb(DLM, 0x00)
    assert u.dev.read(DLL, 2) == 0x0001                 # a word access spans DLL and DLM
    assert u.output == b""                              # a DLL write is not a transmit
    u.outb(LCR, UART_LCR_WLEN8)
    assert u.inb(IER) == IER_RDI                        # IER kept its own value
    u.outb(THR, ord("x"))
    assert u.output == b"x"


def test_scratch_register_and_reserved_ier_bits():
    u = Uart()
    for value in (0xA5, 0x5A, 0x00, 0xFF):
        u.outb(SCR, value)
        assert u.inb(SCR) == value
    u.outb(IER, 0xFF)
    assert u.inb(IER) == 0x0F                           # bits 4-7 read 0 on a 16550A


def linux_size_fifo(u):
    """drivers/tty/serial/8250/8250_port.c: size_fifo()."""
    old_lcr = u.inb(LCR)
    u.outb(LCR, 0)
    old_fcr = u.inb(FCR)                                # reads IIR, as the driver does
    old_mcr = u.inb(MCR)
    u.outb(FCR, FCR_ENABLE_FIFO | FCR_CLEAR_RCVR | 0x04)
    u.outb(MCR, MCR_LOOP)
    u.outb(LCR, UART_LCR_CONF_MODE_A)
    old_dl = u.inb(DLL) | u.inb(DLM) << 8
    u.outb(DLL, 1)
    u.outb(DLM, 0)
    u.outb(LCR, UART_LCR_WLEN8)
    for count in range(256):
        u.outb(THR, count)
    count = 0
    while u.inb(LSR) & LSR_DR and count < 256:
        u.inb(RBR)
        count += 1
    u.outb(FCR, old_fcr)
    u.outb(MCR, old_mcr)
    u.outb(LCR, UART_LCR_CONF_MODE_A)
    u.outb(DLL, old_dl & 0xFF)
    u.outb(DLM, old_dl >> 8)
    u.outb(LCR, old_lcr)
    return count


def linux_autoconfig(u):
    """autoconfig() and autoconfig_16550a() of Linux 6.x's 8250 driver, with the loopback
    test on (no UPF_SKIP_TEST) and the 16550A-variant probes on (UPF_FULL_PROBE)."""
    # IER existence test.
    scratch = u.inb(IER)
    u.outb(IER, 0)
    scratch2 = u.inb(IER) & 0x0F
    u.outb(IER, 0x0F)
    scratch3 = u.inb(IER) & 0x0F
    u.outb(IER, scratch)
    if scratch2 != 0 or scratch3 != 0x0F:
        return "IER test failed"

    save_mcr = u.inb(MCR)
    save_lcr = u.inb(LCR)
    u.outb(MCR, MCR_LOOP | MCR_OUT2 | MCR_RTS)
    status1 = u.inb(MSR) & 0xF0
    u.outb(MCR, save_mcr)
    if status1 != MSR_DCD | MSR_CTS:
        return "LOOP test failed"

    u.outb(LCR, UART_LCR_CONF_MODE_B)
    u.outb(UART_EFR, 0)
    u.outb(LCR, 0)
    u.outb(FCR, FCR_ENABLE_FIFO)
    kind = {0: "8250", 1: "unknown", 2: "16550", 3: "16550A"}[u.inb(IIR) >> 6]
    if kind == "16550A":
        kind = linux_autoconfig_16550a(u)
    u.outb(LCR, save_lcr)

    # Reset the UART.
    u.outb(MCR, save_mcr)
    u.outb(FCR, FCR_ENABLE_FIFO)                        # serial8250_clear_fifos()
    u.outb(FCR, FCR_ENABLE_FIFO | FCR_CLEAR_RCVR | 0x04)
    u.outb(FCR, 0)
    u.inb(RBR)
    u.outb(IER, 0)
    return kind


def linux_autoconfig_16550a(u):
    u.outb(LCR, UART_LCR_CONF_MODE_A)
    if u.inb(UART_EFR) == 0:
        return "16650 or Motorola"
    u.outb(LCR, UART_LCR_CONF_MODE_B)
    if u.inb(UART_EFR) == 0:
        return "EFRv2"

    # National Semiconductor SuperIO: does bank 2's EXCR1 mirror MCR.LOOP?
    u.outb(LCR, 0)
    status1 = u.inb(MCR)
    u.outb(LCR, 0xE0)
    status2 = u.inb(0x02)
    if not (status2 ^ status1) & MCR_LOOP:
        u.outb(LCR, 0)
        u.outb(MCR, status1 ^ MCR_LOOP)
        u.outb(LCR, 0xE0)
        status2 = u.inb(0x02)
        u.outb(LCR, 0)
        u.outb(MCR, status1)
        if (status2 ^ status1) & MCR_LOOP:
            return "NS16550A"

    # TI16750: IIR bit 5 only with DLAB set.
    u.outb(LCR, 0)
    u.outb(FCR, FCR_ENABLE_FIFO | UART_FCR7_64BYTE)
    status1 = u.inb(IIR) & (0x20 | IIR_FIFO_ENABLED)
    u.outb(FCR, FCR_ENABLE_FIFO)
    u.outb(LCR, UART_LCR_CONF_MODE_A)
    u.outb(FCR, FCR_ENABLE_FIFO | UART_FCR7_64BYTE)
    status2 = u.inb(IIR) & (0x20 | IIR_FIFO_ENABLED)
    u.outb(FCR, FCR_ENABLE_FIFO)
    u.outb(LCR, 0)
    if status1 == IIR_FIFO_ENABLED and status2 == 0x20 | IIR_FIFO_ENABLED:
        return "16750"

    # XScale: a writable IER.UUE.
    iersave = u.inb(IER)
    u.outb(IER, iersave & ~UART_IER_UUE)
    if not u.inb(IER) & UART_IER_UUE:
        u.outb(IER, iersave | UART_IER_UUE)
        if u.inb(IER) & UART_IER_UUE:
            return "XScale"
    u.outb(IER, iersave)

    if size_fifo := linux_size_fifo(u):
        if size_fifo == 64:
            return "U6_16550A"
    assert size_fifo == FIFO_SIZE
    return "16550A"


def test_linux_autoconfig_finds_a_16550a_and_leaves_it_quiet():
    u = Uart()
    assert linux_autoconfig(u) == "16550A"
    assert u.output == b""                              # loopback traffic never left the UART
    assert u.inb(LSR) == LSR_THRE | LSR_TEMT
    assert u.inb(IER) == 0 and not u.irq.level
    assert u.inb(MCR) == 0 and u.inb(LCR) == 0
    u.dev.enqueue_input(b"ok")
    assert bytes(u.inb(RBR) for _ in range(2)) == b"ok"


def test_fifo_resets_discard_only_what_is_in_the_fifo():
    """As on hardware (and QEMU), the guest's FIFO resets drop what the FIFO holds; input
    that has not reached the FIFO yet survives them."""
    u = Uart()
    u.outb(FCR, FCR_ENABLE_FIFO)
    u.dev.enqueue_input(bytes(range(40)))
    u.outb(FCR, FCR_ENABLE_FIFO | FCR_CLEAR_RCVR)
    rest = bytearray()
    while u.inb(LSR) & LSR_DR:
        rest.append(u.inb(RBR))
    assert rest == bytes(range(FIFO_SIZE, 40))


def test_linux_startup_thre_and_txen_tests_pass():
    """serial8250_do_startup(): a UART that fails these gets UART_BUG_THRE/TXEN workarounds
    (a polling timer), the classic reason for a stalling or crawling console."""
    u = Uart()
    u.outb(IER, IER_THRI)
    iir1 = u.inb(IIR)
    u.outb(IER, 0)
    u.outb(IER, IER_THRI)
    iir = u.inb(IIR)
    u.outb(IER, 0)
    assert not (not iir1 & IIR_NO_INT and iir & IIR_NO_INT)   # no UART_BUG_THRE
    assert iir1 == iir == IIR_THRI

    u.outb(IER, IER_THRI)
    lsr = u.inb(LSR)
    iir = u.inb(IIR)
    u.outb(IER, 0)
    assert not (lsr & LSR_TEMT and iir & IIR_NO_INT)           # no UART_BUG_TXEN


def test_thre_interrupt_on_enable_and_after_every_transmit():
    u = Uart()
    u.outb(IER, IER_THRI)
    assert u.irq.level and u.iir_id() == IIR_THRI
    assert not u.irq.level                              # the IIR read acknowledged it
    assert u.iir_id() == IIR_NO_INT
    u.outb(THR, ord("a"))
    assert u.irq.level and u.iir_id() == IIR_THRI      # THR drained: interrupt again
    u.outb(IER, IER_THRI)                               # rewriting the same IER changes nothing
    assert not u.irq.level
    u.outb(IER, 0)
    u.outb(THR, ord("b"))
    assert not u.irq.level and u.iir_id() == IIR_NO_INT
    assert u.output == b"ab"


def test_console_write_restoring_ier_rearms_thre():
    """serial8250_console_write(): save IER, clear it, poll LSR while writing, restore IER."""
    u = Uart()
    u.outb(IER, IER_RDI | IER_RLSI | IER_THRI)          # the tty layer is mid-transmit
    assert u.iir_id() == IIR_THRI                       # its ISR took the interrupt ...
    ier = u.inb(IER)                                    # ... when printk cut in
    u.outb(IER, 0)
    for byte in b"printk\r\n":
        while not u.inb(LSR) & LSR_THRE:
            pass
        u.outb(THR, byte)
    assert u.inb(LSR) & (LSR_THRE | LSR_TEMT) == LSR_THRE | LSR_TEMT
    u.outb(IER, ier)
    assert u.irq.level and u.iir_id() == IIR_THRI      # the tty transmit resumes
    assert u.output == b"printk\r\n"


class EdgeTriggeredGuest:
    """A guest 8250 driver whose IRQ pin is edge-triggered: it only runs its handler on a
    rising edge of the line, and the handler loops until IIR says nothing is pending
    (serial8250_interrupt() / serial8250_handle_irq() / serial8250_tx_chars())."""

    def __init__(self, u):
        self.u = u
        self.ier = IER_RDI | IER_RLSI
        self.xmit = bytearray()
        self.received = bytearray()
        self.edges_seen = 0
        u.outb(FCR, FCR_ENABLE_FIFO)
        u.outb(IER, self.ier)

    def write(self, data):                              # uart_write() -> start_tx()
        self.xmit += data
        if not self.ier & IER_THRI:
            self.ier |= IER_THRI
            self.u.outb(IER, self.ier)
        self.deliver_interrupts()

    def deliver_interrupts(self):
        while self.u.irq.pulses > self.edges_seen:
            self.edges_seen = self.u.irq.pulses
            self.handle_irq()

    def handle_irq(self):
        u = self.u
        while not u.inb(IIR) & IIR_NO_INT:
            lsr = u.inb(LSR)
            if lsr & LSR_DR:
                for _ in range(256):
                    self.received.append(u.inb(RBR))
                    if not u.inb(LSR) & LSR_DR:
                        break
            if lsr & LSR_THRE and self.ier & IER_THRI:
                chunk, self.xmit = self.xmit[:FIFO_SIZE], self.xmit[FIFO_SIZE:]
                for byte in chunk:
                    u.outb(THR, byte)
                if not self.xmit:                       # __stop_tx()
                    self.ier &= ~IER_THRI
                    u.outb(IER, self.ier)


def test_output_never_stalls_with_an_edge_triggered_irq():
    u = Uart()
    guest = EdgeTriggeredGuest(u)
    rng = random.Random(1)
    expected = bytearray()
    for _ in range(50):
        data = bytes(rng.randrange(256) for _ in range(rng.randrange(1, 300)))
        expected += data
        guest.write(data)
        if rng.random() < 0.3:                          # host input interleaves with output
            u.dev.enqueue_input(b"k")
            guest.deliver_interrupts()
    assert u.output == expected
    assert guest.received == b"k" * guest.received.count(b"k") and guest.received
    assert not u.irq.level                  # nothing left pending, so the next event is an edge


def test_received_data_interrupt_and_trigger_levels():
    u = Uart()
    u.outb(FCR, FCR_ENABLE_FIFO | 0xC0)                 # trigger at 14
    u.outb(IER, IER_RDI)
    u.dev.enqueue_input(b"abc")
    assert u.irq.level
    assert u.inb(IIR) == IIR_FIFO_ENABLED | IIR_RX_TIMEOUT   # below the trigger: timeout
    u.dev.enqueue_input(b"defghijklmnopqrstu")
    assert u.inb(IIR) == IIR_FIFO_ENABLED | IIR_RDI
    data = bytearray()
    while u.inb(LSR) & LSR_DR:
        data.append(u.inb(RBR))
    assert data == b"abcdefghijklmnopqrstu"
    assert u.inb(IIR) == IIR_FIFO_ENABLED | IIR_NO_INT
    assert not u.irq.level
    assert u.irq.history == [True, False]               # one level-triggered assertion


def test_large_input_arrives_in_order_through_the_16_byte_fifo():
    u = Uart()
    u.outb(FCR, FCR_ENABLE_FIFO)
    payload = random.Random(7).randbytes(20_000)

    def host():
        for i in range(0, len(payload), 997):
            u.dev.enqueue_input(payload[i:i + 997])

    producer = threading.Thread(target=host)
    producer.start()
    received = bytearray()
    while len(received) < len(payload):
        if u.inb(LSR) & LSR_DR:
            received.append(u.inb(RBR))
    producer.join()
    assert received == payload
    assert not u.inb(LSR) & LSR_DR


@settings(max_examples=50, deadline=None)
@given(st.lists(st.one_of(st.binary(min_size=1, max_size=40), st.integers(0, 40)), max_size=30),
       st.booleans())
def test_input_order_survives_any_interleaving_of_arrivals_and_reads(steps, fifo):
    u = Uart()
    if fifo:
        u.outb(FCR, FCR_ENABLE_FIFO)
    sent, received = bytearray(), bytearray()
    for step in steps:
        if isinstance(step, bytes):
            u.dev.enqueue_input(step)
            sent += step
        else:
            for _ in range(step):
                if u.inb(LSR) & LSR_DR:
                    received.append(u.inb(RBR))
    while u.inb(LSR) & LSR_DR:
        received.append(u.inb(RBR))
    assert received == sent


def test_fifo_control():
    u = Uart()
    u.dev.enqueue_input(b"xyz")
    assert u.inb(RBR) == ord("x")                       # FIFOs off: one byte at a time, none lost
    u.outb(FCR, FCR_ENABLE_FIFO)                        # switching FIFO mode empties the FIFO
    assert u.inb(RBR) == ord("z")                       # ("y" was in it); the line refills it
    u.outb(FCR, FCR_CLEAR_RCVR)                         # without FCR0 nothing else takes
    assert u.inb(IIR) & IIR_FIFO_ENABLED == 0


def test_iir_priorities():
    u = Uart()
    u.outb(FCR, FCR_ENABLE_FIFO)
    u.outb(MCR, MCR_LOOP)                               # modem lines drop: MSR deltas
    for byte in range(FIFO_SIZE + 1):                   # one too many: overrun
        u.outb(THR, byte)
    u.outb(IER, IER_RDI | IER_THRI | IER_RLSI | IER_MSI)
    assert u.iir_id() == IIR_RLSI
    assert u.inb(LSR) & LSR_OE
    assert u.iir_id() == IIR_RDI
    assert bytes(u.inb(RBR) for _ in range(FIFO_SIZE)) == bytes(range(FIFO_SIZE))
    assert u.irq.level
    assert u.iir_id() == IIR_THRI                       # reported, hence acknowledged
    assert u.iir_id() == IIR_MSI
    assert u.inb(MSR) & 0x0F == MSR_DCTS | MSR_DDSR | MSR_DDCD
    assert u.iir_id() == IIR_NO_INT
    assert not u.irq.level


def test_loopback_modem_lines_and_data():
    u = Uart()
    u.inb(MSR)
    u.outb(MCR, MCR_LOOP | MCR_DTR | MCR_RTS | MCR_OUT1 | MCR_OUT2)
    assert u.inb(MSR) & 0xF0 == MSR_DSR | MSR_CTS | MSR_RI | MSR_DCD
    u.outb(MCR, MCR_LOOP | MCR_DTR)
    assert u.inb(MSR) == MSR_DSR | MSR_DCTS | MSR_TERI | MSR_DDCD
    u.outb(MCR, MCR_LOOP | MCR_OUT1)
    assert u.inb(MSR) == MSR_RI | MSR_DDSR                 # RI rising is no TERI
    u.outb(MCR, MCR_LOOP | MCR_RTS)
    assert u.inb(MSR) == MSR_CTS | MSR_DCTS | MSR_TERI

    u.dev.enqueue_input(b"host")                        # the line is cut in loopback
    u.outb(THR, ord("L"))
    assert u.inb(RBR) == ord("L")
    assert not u.inb(LSR) & LSR_DR
    assert u.output == b""
    u.outb(MCR, 0)                                      # back on the line
    assert u.inb(MSR) & 0xF0 == MSR_DCD | MSR_DSR | MSR_CTS
    assert bytes(u.inb(RBR) for _ in range(4)) == b"host"


def test_level_irq_follows_pending_state_only_on_changes():
    u = Uart()
    u.outb(IER, IER_RDI)
    u.dev.enqueue_input(b"a")
    u.dev.enqueue_input(b"b")
    assert u.irq.history == [True]
    u.inb(RBR)
    assert u.irq.level
    u.inb(RBR)
    assert u.irq.history == [True, False]
    u.dev.enqueue_input(b"c")
    u.outb(IER, 0)                                      # masking drops the line too
    assert u.irq.history == [True, False, True, False]


def test_accesses_past_the_registers_and_wide_accesses():
    u = Uart()
    assert u.dev.read(8, 1) == 0xFF
    u.outb(SCR, 0x42)
    assert u.dev.read(6, 2) == 0x42 << 8 | (MSR_DCD | MSR_DSR | MSR_CTS)
    u.dev.write(3, 2, 0x0B03)                           # LCR=0x03, MCR=0x0B
    assert (u.inb(LCR), u.inb(MCR)) == (0x03, 0x0B)
