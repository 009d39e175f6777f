"""What PCI and virtio devices need from the hypervisor, as small injected protocols.

Devices never see KVM.  The VM hands each device:

* an :class:`MsiInterruptManager`, from which an MSI-X capable device takes one
  :class:`MsiVectorGroup` (one :class:`MsiVector` per table entry).  The KVM
  implementation backs each vector with a GSI route plus an irqfd, so ``trigger()`` is a
  single ``eventfd`` write that a device worker thread can issue without calling into any
  VM code;
* an :class:`IoEventRegistrar` (KVM's ``KVM_IOEVENTFD``), so that a guest write to a queue
  notification address signals an eventfd inside the kernel instead of exiting to a vCPU
  thread.  ``pych.hypervisor.kvm.Vm`` already has this exact shape.

The recording fakes below implement the protocols for unit tests.
"""

from __future__ import annotations

import threading
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Protocol


class MsiVector(Protocol):
    """One MSI-X table entry's route into the guest."""

    def update(self, address: int, data: int, masked: bool) -> None:
        """The guest (re)programmed the entry, or its effective mask changed.

        ``masked`` folds together the entry's own mask bit, the function mask and the
        MSI-X enable bit: while it is true the device will not call :meth:`trigger`.
        """

    def trigger(self) -> None:
        """Deliver the message (``eventfd`` write for an irqfd-backed route)."""


class MsiVectorGroup(Protocol):
    """The vectors of one device, allocated and released together."""

    @property
    def vectors(self) -> Sequence[MsiVector]: ...

    def release(self) -> None:
        """Tear down every route and irqfd of the group (device removal)."""


class MsiInterruptManager(Protocol):
    def create_msix_group(self, count: int) -> MsiVectorGroup: ...


class IoEventRegistrar(Protocol):
    """``KVM_IOEVENTFD``: guest writes of ``length`` bytes (0 = any width) at ``addr``,
    optionally only those equal to ``datamatch``, signal ``fd`` without a VM exit.

    The caller owns ``fd``: the same eventfd is re-registered when a BAR moves, so the
    worker thread waiting on it never notices.
    """

    def register_ioeventfd(self, fd: int, addr: int, length: int,
                           datamatch: int | None = None) -> None: ...

    def unregister_ioeventfd(self, fd: int, addr: int, length: int,
                             datamatch: int | None = None) -> None: ...


# --- fakes for tests ---------------------------------------------------------------------
class RecordingMsiVector:
    """An :class:`MsiVector` that remembers its programming and counts deliveries."""

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
    vectors: list[RecordingMsiVector]
    released: bool = False

    def release(self) -> None:
        if self.released:
            raise AssertionError("MSI vector group released twice")
        self.released = True


@dataclass
class FakeMsiInterruptManager:
    groups: list[RecordingMsiGroup] = field(default_factory=list)

    def create_msix_group(self, count: int) -> RecordingMsiGroup:
        group = RecordingMsiGroup([RecordingMsiVector() for _ in range(count)])
        self.groups.append(group)
        return group


class RecordingIoEvents:
    """An :class:`IoEventRegistrar` that enforces KVM's rules: registering the same
    (addr, length, datamatch) twice and removing an unknown one are errors."""

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
