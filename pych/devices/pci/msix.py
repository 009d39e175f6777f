"""MSI-X: the capability, the vector table and the pending-bit array (PBA).

The table and PBA live in one of the device's memory BARs; the owning device forwards
accesses to :meth:`MsixController.read_table` & co. and calls
:meth:`MsixController.config_written` after every config-space write so that the enable
and function-mask bits take effect.

Each table entry drives one injected :class:`~pych.devices.pci.interrupts.MsiVector`:
the controller calls ``update(address, data, masked)`` whenever the entry or its
effective mask changes, and ``trigger()`` only while the vector is unmasked.  A vector
signalled while masked sets its pending bit instead, and is delivered when unmasked
(PCI Local Bus 3.0 §6.8.3.4).  ``trigger`` comes from device worker threads and mask
changes from vCPU threads, so both go through one lock.
"""

from __future__ import annotations

import logging
import struct
import threading
from collections.abc import Sequence

from .config import CapabilityId, PciConfiguration
from .interrupts import MsiVector

log = logging.getLogger(__name__)

MSIX_ENTRY_SIZE = 16
MSIX_MAX_VECTORS = 2048

MSIX_CONTROL_ENABLE = 1 << 15
MSIX_CONTROL_FUNCTION_MASK = 1 << 14
MSIX_CONTROL_TABLE_SIZE = 0x7FF

_ENTRY_VECTOR_CONTROL = 12
_ENTRY_MASKED = 1
_ENTRY = struct.Struct("<QII")            # message address, message data, vector control
_CAPABILITY_LENGTH = 12


class MsixController:
    def __init__(self, vectors: Sequence[MsiVector], *, bar: int, table_offset: int,
                 pba_offset: int) -> None:
        if not 1 <= len(vectors) <= MSIX_MAX_VECTORS:
            raise ValueError(f"MSI-X supports 1..{MSIX_MAX_VECTORS} vectors, not {len(vectors)}")
        if table_offset & 7 or pba_offset & 7:
            raise ValueError("MSI-X table and PBA offsets must be 8-byte aligned")
        self._vectors = list(vectors)
        self.bar = bar
        self.table_offset = table_offset
        self.pba_offset = pba_offset
        self._table = bytearray(MSIX_ENTRY_SIZE * len(vectors))
        for i in range(len(vectors)):                      # entries come out of reset masked
            self._table[i * MSIX_ENTRY_SIZE + _ENTRY_VECTOR_CONTROL] = _ENTRY_MASKED
        self._pending = 0
        self._enabled = False
        self._function_masked = False
        self._effective_mask = [True] * len(vectors)
        self._pushed: list[tuple[int, int, bool] | None] = [None] * len(vectors)
        self._cap_offset: int | None = None
        self._lock = threading.Lock()

    @property
    def num_vectors(self) -> int:
        return len(self._vectors)

    @property
    def table_size(self) -> int:
        return len(self._table)

    @property
    def pba_size(self) -> int:
        return 8 * ((self.num_vectors + 63) // 64)

    @property
    def enabled(self) -> bool:
        return self._enabled

    @property
    def function_masked(self) -> bool:
        return self._function_masked

    # --- capability -----------------------------------------------------------------------
    def install(self, config: PciConfiguration) -> int:
        """Add the MSI-X capability to ``config``; returns its offset."""
        control = self.num_vectors - 1
        body = struct.pack("<HII", control, self.table_offset | self.bar, self.pba_offset | self.bar)
        writable = struct.pack("<HII", MSIX_CONTROL_ENABLE | MSIX_CONTROL_FUNCTION_MASK, 0, 0)
        self._cap_offset = config.add_capability(CapabilityId.MSIX, body, writable)
        return self._cap_offset

    def config_written(self, config: PciConfiguration, offset: int, size: int) -> None:
        """Apply the control register after a config write that may have touched it."""
        cap = self._cap_offset
        if cap is None or offset + size <= cap + 2 or offset >= cap + 4:
            return
        control = config.read(cap + 2, 2)
        with self._lock:
            self._enabled = bool(control & MSIX_CONTROL_ENABLE)
            self._function_masked = bool(control & MSIX_CONTROL_FUNCTION_MASK)
            for vector in range(self.num_vectors):
                self._refresh(vector)

    # --- snapshot --------------------------------------------------------------------------
    def save_state(self) -> dict:
        with self._lock:
            return {"table": self._table.hex(), "pending": self._pending}

    def restore_state(self, saved: dict, config: PciConfiguration) -> None:
        """The table and pending bits as saved, and the enable and function-mask bits from
        ``config`` (restored first): every vector's route is pushed to the hypervisor."""
        table = bytes.fromhex(saved["table"])
        if len(table) != len(self._table):
            raise ValueError(f"MSI-X table of {len(table)} bytes saved, the device has "
                             f"{len(self._table)}")
        with self._lock:
            self._table[:] = table
            self._pending = saved["pending"]
            self._pushed = [None] * self.num_vectors
        self.config_written(config, self._cap_offset, 4)

    # --- table and PBA (BAR accesses) -----------------------------------------------------
    def read_table(self, offset: int, size: int) -> int:
        if offset < 0 or offset + size > len(self._table):
            return 0
        with self._lock:
            return int.from_bytes(self._table[offset:offset + size], "little")

    def write_table(self, offset: int, size: int, value: int) -> None:
        if offset < 0 or offset + size > len(self._table):
            return
        first = offset // MSIX_ENTRY_SIZE
        last = (offset + size - 1) // MSIX_ENTRY_SIZE
        with self._lock:
            self._table[offset:offset + size] = value.to_bytes(size, "little")
            for vector in range(first, last + 1):
                self._refresh(vector)

    def read_pba(self, offset: int, size: int) -> int:
        if offset < 0 or offset + size > self.pba_size:
            return 0
        with self._lock:
            return (self._pending >> (8 * offset)) & ((1 << (8 * size)) - 1)

    def write_pba(self, offset: int, size: int, value: int) -> None:
        """The PBA is read-only."""

    # --- delivery -------------------------------------------------------------------------
    def trigger(self, vector: int) -> None:
        """Signal ``vector``: deliver it, or latch it pending while it is masked.

        Does nothing while MSI-X is disabled: the device then uses INTx instead.
        """
        if not 0 <= vector < self.num_vectors:
            return
        with self._lock:
            if not self._enabled:
                return
            if self._effective_mask[vector]:
                self._pending |= 1 << vector
            else:
                self._vectors[vector].trigger()

    def is_masked(self, vector: int) -> bool:
        return self._effective_mask[vector]

    def is_pending(self, vector: int) -> bool:
        return bool(self._pending >> vector & 1)

    def entry(self, vector: int) -> tuple[int, int, bool]:
        """(address, data, entry mask bit) of table entry ``vector``."""
        address, data, control = _ENTRY.unpack_from(self._table, vector * MSIX_ENTRY_SIZE)
        return address, data, bool(control & _ENTRY_MASKED)

    def _refresh(self, vector: int) -> None:
        """Push entry ``vector`` to its route if anything changed; deliver it if it was
        pending and is now unmasked.  Called with the lock held."""
        address, data, entry_masked = self.entry(vector)
        masked = entry_masked or self._function_masked or not self._enabled
        self._effective_mask[vector] = masked
        state = (address, data, masked)
        if state != self._pushed[vector]:
            try:
                self._vectors[vector].update(address, data, masked)
            except Exception:
                # A guest write must not take down the vCPU thread; the route is retried
                # on the next change of this entry.
                log.exception("MSI-X vector %d: cannot update the route", vector)
            else:
                self._pushed[vector] = state
        if not masked and self._pending >> vector & 1:
            self._pending &= ~(1 << vector)
            self._vectors[vector].trigger()
