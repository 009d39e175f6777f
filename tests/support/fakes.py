"""Test doubles for what pych's devices and managers are handed: interrupt lines, MSI-X
vectors, ioeventfds, virtio interrupts, KVM memory slots and the event monitor.

Each records what it was asked to do (and enforces the rules of the real thing where a test
relies on them) instead of reaching KVM, so device and manager tests run without /dev/kvm.
"""

from __future__ import annotations

import threading
from collections.abc import Callable
from dataclasses import dataclass, field


# --- interrupts --------------------------------------------------------------------------------
class RecordingIrq:
    """An :class:`~pych.devices.interrupt.IrqLine` that remembers its level and every edge."""

    def __init__(self) -> None:
        self.level = False
        self.pulses = 0
        self.history: list[bool] = []

    def set_level(self, level: bool) -> None:
        level = bool(level)
        if level and not self.level:
            self.pulses += 1
        self.level = level
        self.history.append(level)

    def pulse(self) -> None:
        self.pulses += 1
        self.history.extend([True, False])
        self.level = False


class RecordingMsiVector:
    """A :class:`~pych.devices.pci.interrupts.MsiVector` that remembers its programming and
    counts deliveries."""

    def __init__(self) -> None:
        self.address = 0
        self.data = 0
        self.masked = True
        self.updates: list[tuple[int, int, bool]] = []
        self._triggers = 0
        self._cond = threading.Condition()

    def update(self, address: int, data: int, masked: bool) -> None:
        self.address, self.data, self.masked = address, data, masked
        self.updates.append((address, data, masked))

    def trigger(self) -> None:
        with self._cond:
            self._triggers += 1
            self._cond.notify_all()

    @property
    def triggers(self) -> int:
        return self._triggers

    def wait_for_triggers(self, count: int, timeout: float = 5.0) -> bool:
        with self._cond:
            return self._cond.wait_for(lambda: self._triggers >= count, timeout)


@dataclass
class RecordingMsiGroup:
    """An :class:`~pych.devices.pci.interrupts.MsiVectorGroup` of recording vectors; releasing
    it twice is an error."""

    vectors: list[RecordingMsiVector]
    released: bool = False

    def release(self) -> None:
        if self.released:
            raise AssertionError("MSI vector group released twice")
        self.released = True


@dataclass
class FakeMsiInterruptManager:
    """An :class:`~pych.devices.pci.interrupts.MsiInterruptManager` that keeps every group it
    handed out."""

    groups: list[RecordingMsiGroup] = field(default_factory=list)

    def create_msix_group(self, count: int) -> RecordingMsiGroup:
        group = RecordingMsiGroup([RecordingMsiVector() for _ in range(count)])
        self.groups.append(group)
        return group


class RecordingIoEvents:
    """A :class:`~pych.devices.pci.interrupts.IoEventRegistrar` that enforces KVM's rules:
    registering the same (addr, length, datamatch) twice and removing an unknown one are
    errors."""

    def __init__(self) -> None:
        self.registered: dict[tuple[int, int, int | None], int] = {}
        self.log: list[tuple[str, int, int, int, int | None]] = []

    def register_ioeventfd(self, fd: int, addr: int, length: int,
                           datamatch: int | None = None) -> None:
        key = (addr, length, datamatch)
        if key in self.registered:
            raise FileExistsError(f"ioeventfd already registered at {addr:#x}")
        self.registered[key] = fd
        self.log.append(("register", fd, addr, length, datamatch))

    def unregister_ioeventfd(self, fd: int, addr: int, length: int,
                             datamatch: int | None = None) -> None:
        key = (addr, length, datamatch)
        if self.registered.get(key) != fd:
            raise FileNotFoundError(f"no ioeventfd for fd {fd} at {addr:#x}")
        del self.registered[key]
        self.log.append(("unregister", fd, addr, length, datamatch))

    def fd_at(self, addr: int) -> int | None:
        for (a, _, _), fd in self.registered.items():
            if a == addr:
                return fd
        return None


class RecordingInterrupt:
    """A :class:`~pych.devices.virtio.device.VirtioInterrupt` that counts signals."""

    def __init__(self) -> None:
        self.queue_notifications: dict[int, int] = {}
        self.config_notifications = 0
        self.reset_requested = False
        self._cond = threading.Condition()

    def notify_queue(self, index: int) -> None:
        with self._cond:
            self.queue_notifications[index] = self.queue_notifications.get(index, 0) + 1
            self._cond.notify_all()

    def notify_config(self) -> None:
        with self._cond:
            self.config_notifications += 1
            self._cond.notify_all()

    def needs_reset(self) -> None:
        with self._cond:
            self.reset_requested = True
            self._cond.notify_all()

    def wait(self, predicate: Callable[[RecordingInterrupt], bool], timeout: float = 5.0) -> bool:
        with self._cond:
            return self._cond.wait_for(lambda: predicate(self), timeout)


# --- KVM memory slots ------------------------------------------------------------------------
class RecordingMemslots:
    """KVM's memory slots (``add_memory``/``remove_memory`` of ``pych.hypervisor.kvm.Vm``),
    recorded instead of registered: ``slots`` maps each slot in use to its
    (gpa, size, host_addr). Removing a slot at another gpa than it was added at is an error.
    Slot numbers are not reused (KVM's are; pych only hands them back)."""

    def __init__(self) -> None:
        self.slots: dict[int, tuple[int, int, int]] = {}
        self._next = 0

    def add_memory(self, gpa: int, size: int, host_addr: int) -> int:
        slot, self._next = self._next, self._next + 1
        self.slots[slot] = (gpa, size, host_addr)
        return slot

    def remove_memory(self, slot: int, gpa: int) -> None:
        assert self.slots.pop(slot)[0] == gpa

    def ranges(self) -> list[tuple[int, int]]:
        """(gpa, size) of every slot in use, in the order they were added."""
        return [(gpa, size) for gpa, size, _ in self.slots.values()]


# --- the event monitor -------------------------------------------------------------------------
class RecordingEvents:
    """An event monitor (``pych.event_monitor.EventMonitor``) that keeps every event as
    (source, event, properties) in ``events``."""

    def __init__(self) -> None:
        self.events: list[tuple[str, str, dict | None]] = []

    def emit(self, source: str, event: str, properties: dict | None = None) -> None:
        self.events.append((source, event, properties))

    def close(self) -> None:
        pass
