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
"""

from __future__ import annotations

from collections.abc import Sequence
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
