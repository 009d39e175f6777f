"""vCPU threads: one Python thread per vCPU around ``KVM_RUN``.

The thread decodes each exit and dispatches port I/O and MMIO to the buses; an instruction
KVM reports it could not emulate (a nested KVM, as on PVM hosts, leaves a few to userspace)
goes to ``pych.arch.x86_64.emulate``.
Control (pause, stop) reaches a running vCPU by setting ``immediate_exit`` and sending
it a signal, so ``KVM_RUN`` returns at once with EINTR.
"""

from __future__ import annotations

import logging
import os
import signal
import threading
from typing import Callable

from pych import seccomp
from pych.arch.x86_64 import emulate as emu
from pych.cpu.kick import KICK_SIGNAL, install_kick_handler  # noqa: F401 - re-exported
from pych.devices.bus import Bus
from pych.hypervisor.kvm import KvmError, Vcpu
from pych.hypervisor.kvm import bindings as kb
from pych.threads import NamedThread, ThreadStarter

log = logging.getLogger(__name__)


class VcpuExit(Exception):
    """Raised inside a vCPU thread to stop the VM: ``kind`` is poweroff, reset or error."""

    def __init__(self, kind: str, detail: str = ""):
        super().__init__(detail or kind)
        self.kind = kind
        self.detail = detail


class VcpuThread:
    """Runs one vCPU until told to stop. ``on_exit(kind, detail)`` reports guest-initiated
    ends (poweroff, reset, error) from the vCPU thread."""

    def __init__(self, vcpu: Vcpu, pio: Bus, mmio: Bus, on_exit: Callable[[str, str], None],
                 *, host_cpus: frozenset[int] | None = None):
        self.vcpu = vcpu
        self.host_cpus = host_cpus      # --cpus affinity: the host CPUs this thread may use
        self.pio = pio
        self.mmio = mmio
        self.on_exit = on_exit
        self._cond = threading.Condition()
        self._paused = False
        self._parked = False          # the thread is waiting while paused
        self._stop = False
        self.thread: threading.Thread | None = None
        self.emulated: dict[str, int] = {}

    @property
    def index(self) -> int:
        return self.vcpu.index

    # --- control (any thread) --------------------------------------------------------------
    def start(self, *, paused: bool = False, starter: ThreadStarter | None = None) -> None:
        """Start the thread; with ``paused`` it parks before its first KVM_RUN until
        :meth:`resume` (a vCPU hot plugged while the VM is paused). With ``starter``, its
        spare thread runs the vCPU and this returns without waiting for the host to
        schedule a new thread (a hot plug's answer)."""
        self._paused = paused
        name = f"vcpu{self.index}"
        if starter is not None:
            self.thread = starter.start(name, self._run)
        else:
            self.thread = NamedThread(target=self._run, name=name, daemon=True)
            self.thread.start()

    def kick(self) -> None:
        self.vcpu.set_immediate_exit(True)
        t = self.thread
        if t is not None and t.ident is not None and t.is_alive():
            try:
                signal.pthread_kill(t.ident, KICK_SIGNAL)
            except ProcessLookupError:
                pass

    def pause(self, timeout: float = 5.0) -> bool:
        with self._cond:
            self._paused = True
        self.kick()
        with self._cond:
            return self._cond.wait_for(lambda: self._parked or not self._alive(), timeout)

    def resume(self) -> None:
        with self._cond:
            self._paused = False
            self._cond.notify_all()

    def stop(self, timeout: float = 5.0) -> bool:
        """Stop the thread and wait for it to end; returns whether it did within ``timeout``.
        Must not be called from the thread itself."""
        with self._cond:
            self._stop = True
            self._cond.notify_all()
        deadline_step = 0.05
        waited = 0.0
        while self._alive() and waited < timeout:
            self.kick()
            self.thread.join(deadline_step)
            waited += deadline_step
        if self._alive():
            log.warning("vCPU %d did not stop within %.1f s", self.index, timeout)
            return False
        return True

    def _alive(self) -> bool:
        return self.thread is not None and self.thread.is_alive()

    # --- the vCPU thread ------------------------------------------------------------------
    def _run(self) -> None:
        if self.host_cpus is not None:
            try:
                os.sched_setaffinity(0, self.host_cpus)    # this thread only
            except OSError as e:
                self.on_exit("error", f"vCPU {self.index}: cannot pin to host CPUs "
                             f"{sorted(self.host_cpus)}: {e.strerror}")
                return
        try:
            seccomp.apply_vcpu_filter()         # --seccomp: before the first KVM_RUN
        except seccomp.SeccompError as e:
            self.on_exit("error", f"vCPU {self.index}: {e}")
            return
        try:
            self._loop()
        except VcpuExit as e:
            self.on_exit(e.kind, e.detail)
        except Exception as e:  # noqa: BLE001 - one clear line, never a silent dead vCPU
            log.exception("vCPU %d failed", self.index)
            self.on_exit("error", f"vCPU {self.index}: {e}")

    def _control(self) -> bool:
        """Handle pause/stop after an interrupted KVM_RUN. Returns False to end the loop."""
        self.vcpu.set_immediate_exit(False)
        with self._cond:
            while self._paused and not self._stop:
                self._parked = True
                self._cond.notify_all()
                self._cond.wait()
            self._parked = False
            return not self._stop

    def _loop(self) -> None:
        vcpu, pio, mmio = self.vcpu, self.pio, self.mmio
        run_map = vcpu.run_map
        while True:
            if self._stop or self._paused:
                if not self._control():
                    return
            reason = vcpu.run()
            if reason == kb.KVM_EXIT_IO:
                e = vcpu.io_exit()
                off = e.data_offset
                for _ in range(e.count):
                    if e.write:
                        pio.write(e.port, e.size, int.from_bytes(run_map[off:off + e.size], "little"))
                    else:
                        run_map[off:off + e.size] = pio.read(e.port, e.size).to_bytes(e.size, "little")
                    off += e.size
            elif reason == kb.KVM_EXIT_MMIO:
                e = vcpu.mmio_exit()
                if e.write:
                    mmio.write(e.address, e.size, int.from_bytes(e.data, "little"))
                else:
                    vcpu.set_mmio_read_data(mmio.read(e.address, e.size).to_bytes(e.size, "little"))
            elif reason == kb.KVM_EXIT_INTR:
                if not self._control():
                    return
            elif reason == kb.KVM_EXIT_HLT:
                continue
            elif reason == kb.KVM_EXIT_SYSTEM_EVENT:
                ev = vcpu.system_event()
                if ev.type == kb.KVM_SYSTEM_EVENT_RESET:
                    raise VcpuExit("reset")
                if ev.type == kb.KVM_SYSTEM_EVENT_SHUTDOWN:
                    raise VcpuExit("poweroff")
                raise VcpuExit("error", f"vCPU {self.index}: guest crashed (system event {ev.type})")
            elif reason == kb.KVM_EXIT_SHUTDOWN:
                # A triple fault: what real hardware does is reset.
                log.warning("vCPU %d: triple fault, resetting the VM", self.index)
                raise VcpuExit("reset")
            elif reason == kb.KVM_EXIT_INTERNAL_ERROR:
                self._emulation_failure()
            else:
                raise VcpuExit("error", f"vCPU {self.index}: unhandled KVM exit reason {reason}")

    def _emulation_failure(self) -> None:
        vcpu = self.vcpu
        failure = vcpu.emulation_failure()
        regs = vcpu.get_regs()
        if failure.suberror != kb.KVM_INTERNAL_ERROR_EMULATION:
            sub, data = vcpu.internal_error_data()
            raise VcpuExit("error", f"vCPU {self.index}: KVM internal error suberror {sub} "
                                    f"data {[hex(d) for d in data]} rip={regs.rip:#x}")
        try:
            done = emu.emulate(failure.insn, regs)
        except emu.CannotEmulate as e:
            raise VcpuExit("error", f"vCPU {self.index}: emulation failure at rip={regs.rip:#x} "
                                    f"bytes [{failure.insn.hex(' ')}]: {e}; rax={regs.rax:#x} "
                                    f"rbx={regs.rbx:#x} rcx={regs.rcx:#x} rdx={regs.rdx:#x} "
                                    f"rsp={regs.rsp:#x} rflags={regs.rflags:#x}") from None
        vcpu.set_regs(done.regs)
        if done.inject_exception is not None:
            events = vcpu.get_vcpu_events()
            events.exception_injected = 1
            events.exception_nr = done.inject_exception
            events.exception_has_error_code = 0
            events.flags = 0
            vcpu.set_vcpu_events(events)
        self.emulated[done.name] = self.emulated.get(done.name, 0) + 1
        if self.emulated[done.name] in (1, 1000, 100000):
            log.info("vCPU %d: emulated %s (%d so far)", self.index, done.name, self.emulated[done.name])


__all__ = ["KvmError", "VcpuExit", "VcpuThread", "install_kick_handler"]
