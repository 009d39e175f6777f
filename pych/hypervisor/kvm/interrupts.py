"""Interrupts on KVM: IOAPIC pins of the in-kernel irqchip (:class:`KvmIrqLine`, the
``pych.devices.interrupt.IrqLine`` protocol) and MSI routes for PCI devices, one GSI route
plus one irqfd per vector (:class:`KvmMsiInterruptManager`, the protocols of
``pych.devices.pci.interrupts``): a device worker raises an MSI with a single eventfd write,
which KVM turns into the MSI the guest programmed, without calling into Python VM code or
waking a vCPU thread.
"""

from __future__ import annotations

import errno
import os
import threading
import time

from .kvm import Vm

FIRST_MSI_GSI = 24          # 0..23 are the IOAPIC pins


class KvmIrqLine:
    """An IOAPIC pin of the in-kernel irqchip."""

    def __init__(self, vm: Vm, gsi: int):
        self._vm = vm
        self.gsi = gsi

    def set_level(self, level: bool) -> None:
        self._vm.irq_line(self.gsi, level)

    def pulse(self) -> None:
        self._vm.irq_line(self.gsi, True)
        self._vm.irq_line(self.gsi, False)


class GsiAllocator:
    def __init__(self, first: int = FIRST_MSI_GSI, limit: int = 4096):
        self._free: list[int] = []
        self._next = first
        self._limit = limit
        self._lock = threading.Lock()

    def allocate(self) -> int:
        with self._lock:
            if self._free:
                return self._free.pop()
            if self._next >= self._limit:
                raise RuntimeError("out of GSIs for MSI routes")
            self._next += 1
            return self._next - 1

    def free(self, gsi: int) -> None:
        with self._lock:
            self._free.append(gsi)

    @property
    def in_use(self) -> int:
        return self._next - FIRST_MSI_GSI - len(self._free)


class KvmMsiVector:
    def __init__(self, vm: Vm, gsi: int):
        self._vm = vm
        self.gsi = gsi
        self.fd = os.eventfd(0, os.EFD_CLOEXEC | os.EFD_NONBLOCK)
        self._routed = False
        self._irqfd = False
        self._detached = False      # the irqfd is another VM's meanwhile (detach_irqfd)

    def update(self, address: int, data: int, masked: bool) -> None:
        if masked:
            return          # the device does not trigger while masked; keep the old route
        self._vm.set_msi_route(self.gsi, address, data)
        self._routed = True
        if not self._irqfd and not self._detached:
            self._vm.register_irqfd(self.fd, self.gsi)
            self._irqfd = True

    def detach_irqfd(self) -> None:
        """Unregister the irqfd, keeping the route and the eventfd: a local migration's
        receiver registers the same eventfd (a vhost-user back-end's call eventfd) in its
        VM, and a kernel takes an eventfd as the irqfd of one VM at a time (6.16 and later
        answer EBUSY otherwise). Writes meanwhile stay counted in the eventfd: whoever
        registers it next is interrupted at once."""
        if self._irqfd:
            self._vm.unregister_irqfd(self.fd, self.gsi)
            self._irqfd = False
        self._detached = True

    def attach_irqfd(self, wait: float = 5.0) -> None:
        """Register the irqfd again (the migration failed). The receiver that took the
        eventfd may still be letting go of it: EBUSY is retried for ``wait`` seconds."""
        if not self._detached:
            return
        self._detached = False
        if not self._routed or self._irqfd:
            return
        deadline = time.monotonic() + wait
        while True:
            try:
                self._vm.register_irqfd(self.fd, self.gsi)
                break
            except Exception as e:  # noqa: BLE001 - KvmError, its cause the OSError
                cause = e.__cause__ if e.__cause__ is not None else e
                if getattr(cause, "errno", None) != errno.EBUSY or time.monotonic() > deadline:
                    raise
                time.sleep(0.02)
        self._irqfd = True

    def trigger(self) -> None:
        os.eventfd_write(self.fd, 1)

    def adopt_fd(self, fd: int) -> None:
        """Use the eventfd ``fd`` (now this vector's) as the irqfd instead of its own: a
        vhost-user back-end a local live migration handed over writes it (the sender
        detached its irqfd from it first, see :meth:`detach_irqfd`)."""
        if self._irqfd:
            self._vm.unregister_irqfd(self.fd, self.gsi)
            self._irqfd = False
        os.close(self.fd)
        self.fd = fd
        if self._routed:
            self._vm.register_irqfd(self.fd, self.gsi)
            self._irqfd = True

    def release(self) -> None:
        if self._irqfd:
            self._vm.unregister_irqfd(self.fd, self.gsi)
            self._irqfd = False
        if self._routed:
            self._vm.remove_route(self.gsi)
            self._routed = False
        os.close(self.fd)


class KvmMsiVectorGroup:
    def __init__(self, manager: "KvmMsiInterruptManager", vectors: list[KvmMsiVector]):
        self._manager = manager
        self.vectors = vectors
        self._released = False

    def release(self) -> None:
        if self._released:
            return
        self._released = True
        for v in self.vectors:
            v.release()
            self._manager.gsis.free(v.gsi)


class KvmMsiInterruptManager:
    def __init__(self, vm: Vm):
        self.vm = vm
        self.gsis = GsiAllocator()

    def create_msix_group(self, count: int) -> KvmMsiVectorGroup:
        vectors: list[KvmMsiVector] = []
        try:
            for _ in range(count):
                vectors.append(KvmMsiVector(self.vm, self.gsis.allocate()))
        except Exception:
            for v in vectors:
                v.release()
                self.gsis.free(v.gsi)
            raise
        return KvmMsiVectorGroup(self, vectors)
