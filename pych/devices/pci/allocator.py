"""A first-fit allocator for guest physical address windows (PCI BAR placement).

Each PCI segment owns one allocator for its share of the 32-bit device hole and one for
its 64-bit MMIO window.  BARs are naturally aligned (alignment = size, a power of two),
which is what the PCI spec requires and what lets the guest keep our placement.
"""

from __future__ import annotations

import bisect
import threading


class AllocationError(Exception):
    pass


class AddressAllocator:
    """Hands out aligned, non-overlapping ranges of ``[base, base + size)``."""

    def __init__(self, base: int, size: int, name: str = "mmio") -> None:
        if size <= 0:
            raise ValueError(f"{name}: empty window")
        self.base = base
        self.size = size
        self.name = name
        self._starts: list[int] = []          # sorted
        self._sizes: dict[int, int] = {}
        self._lock = threading.Lock()

    @property
    def end(self) -> int:
        return self.base + self.size

    def contains(self, address: int, size: int) -> bool:
        return self.base <= address and address + size <= self.end

    def allocate(self, size: int, alignment: int | None = None) -> int:
        """Lowest free range of ``size`` bytes aligned to ``alignment`` (default: size)."""
        alignment = alignment or size
        if size <= 0 or alignment & (alignment - 1):
            raise AllocationError(f"{self.name}: bad request size={size:#x} align={alignment:#x}")
        with self._lock:
            candidate = _align_up(self.base, alignment)
            for start in self._starts:
                if candidate + size <= start:
                    break
                candidate = max(candidate, _align_up(start + self._sizes[start], alignment))
            if candidate + size > self.end:
                raise AllocationError(
                    f"{self.name}: no room for {size:#x} bytes in {self.base:#x}..{self.end:#x}")
            self._insert(candidate, size)
            return candidate

    def claim(self, address: int, size: int) -> None:
        """Take a specific range (a guest-chosen BAR address)."""
        with self._lock:
            if not self.contains(address, size):
                raise AllocationError(f"{self.name}: {address:#x}+{size:#x} is outside the window")
            i = bisect.bisect_right(self._starts, address)
            if i > 0 and self._starts[i - 1] + self._sizes[self._starts[i - 1]] > address:
                raise AllocationError(f"{self.name}: {address:#x}+{size:#x} is in use")
            if i < len(self._starts) and self._starts[i] < address + size:
                raise AllocationError(f"{self.name}: {address:#x}+{size:#x} is in use")
            self._insert(address, size)

    def free(self, address: int) -> None:
        with self._lock:
            if address not in self._sizes:
                raise AllocationError(f"{self.name}: nothing allocated at {address:#x}")
            del self._sizes[address]
            self._starts.remove(address)

    def _insert(self, address: int, size: int) -> None:
        bisect.insort(self._starts, address)
        self._sizes[address] = size

    @property
    def allocations(self) -> list[tuple[int, int]]:
        with self._lock:
            return [(s, self._sizes[s]) for s in self._starts]


def _align_up(value: int, alignment: int) -> int:
    return (value + alignment - 1) & ~(alignment - 1)
