"""Address buses (port I/O and MMIO) that route guest accesses to devices.

A device on a bus implements :class:`BusDevice`: ``read(offset, size) -> int`` and
``write(offset, size, value)``, where ``offset`` is relative to the base the device was
inserted at and values are little-endian integers of ``size`` bytes (1, 2, 4 or 8).
Devices never see the bus or the VM; the bus never knows what a device is.
"""

from __future__ import annotations

import bisect
import logging
import threading
from dataclasses import dataclass
from typing import Protocol

from pych.guest_log import GuestLog

log = logging.getLogger(__name__)
_guest_log = GuestLog(log)


class BusDevice(Protocol):
    def read(self, offset: int, size: int) -> int: ...

    def write(self, offset: int, size: int, value: int) -> None: ...


class BusError(Exception):
    pass


@dataclass(frozen=True)
class _Range:
    base: int
    length: int
    device: BusDevice

    @property
    def end(self) -> int:
        return self.base + self.length


class Bus:
    """A sorted set of non-overlapping ranges.

    Lookups run on vCPU threads without taking a lock: insert/remove publish a new
    immutable list (copy-on-write), which is atomic under the GIL.
    """

    def __init__(self, name: str):
        self.name = name
        self._ranges: tuple[_Range, ...] = ()
        self._bases: tuple[int, ...] = ()
        self._lock = threading.Lock()

    def insert(self, base: int, length: int, device: BusDevice) -> None:
        if length <= 0:
            raise BusError(f"{self.name}: zero-length range at {base:#x}")
        with self._lock:
            for r in self._ranges:
                if base < r.end and r.base < base + length:
                    raise BusError(
                        f"{self.name}: range {base:#x}+{length:#x} overlaps {r.base:#x}+{r.length:#x}")
            ranges = sorted(self._ranges + (_Range(base, length, device),), key=lambda r: r.base)
            self._ranges = tuple(ranges)
            self._bases = tuple(r.base for r in ranges)

    def remove(self, base: int) -> BusDevice:
        with self._lock:
            for i, r in enumerate(self._ranges):
                if r.base == base:
                    self._ranges = self._ranges[:i] + self._ranges[i + 1:]
                    self._bases = tuple(x.base for x in self._ranges)
                    return r.device
        raise BusError(f"{self.name}: nothing at {base:#x}")

    def find(self, addr: int) -> tuple[int, BusDevice] | None:
        ranges, bases = self._ranges, self._bases
        i = bisect.bisect_right(bases, addr) - 1
        if i >= 0:
            r = ranges[i]
            if addr < r.end:
                return r.base, r.device
        return None

    def read(self, addr: int, size: int) -> int:
        """The device's answer, cut to ``size`` bytes.  Whatever the guest asks, a read
        answers: a device that fails is logged (rate-limited) and reads as all ones, like
        an open bus, so no guest access can raise into the vCPU loop."""
        mask = (1 << (8 * size)) - 1
        hit = self.find(addr)
        if hit is None:
            return mask                         # open bus reads as all ones
        base, dev = hit
        try:
            return dev.read(addr - base, size) & mask
        except Exception as e:  # noqa: BLE001 - the guest must not crash the VMM
            self._device_failed(dev, "read", addr, size, e)
            return mask

    def write(self, addr: int, size: int, value: int) -> bool:
        """Hand the write to the device; False if nothing is mapped at ``addr``.  A device
        that fails is logged (rate-limited) and the write is dropped."""
        hit = self.find(addr)
        if hit is None:
            return False
        base, dev = hit
        try:
            dev.write(addr - base, size, value)
        except Exception as e:  # noqa: BLE001 - the guest must not crash the VMM
            self._device_failed(dev, "write", addr, size, e)
        return True

    def _device_failed(self, dev: BusDevice, what: str, addr: int, size: int,
                       error: Exception) -> None:
        _guest_log.warning("%s: %d-byte %s at %#x failed in %s: %s: %s", self.name, size, what,
                           addr, type(dev).__name__, type(error).__name__, error,
                           kind=(self.name, type(dev).__name__, what))

    def __iter__(self):
        return iter((r.base, r.length, r.device) for r in self._ranges)
