"""A PCI bus: bus 0 of one segment, 32 single-function device slots.

On segment 0 slot 0 holds the host bridge; the other segments have none (as the
reference's), so their first device takes slot 0 (``000f:00:00.0``).  Devices get the
lowest free slot unless the caller asks for one (``pci_device_id``), with the reference's
validation messages.  Adding a device
places its BARs (naturally aligned, 64-bit BARs in the 64-bit window); the device is
published to config space only once that is done, so a guest rescan never sees a
half-built device.

The bus also owns BAR decoding: after any guest write to COMMAND or a BAR register it
compares where each BAR decodes with where it is mapped, moves the
:class:`~pych.devices.pci.device.BarRegion` on the MMIO bus, tells the device (which
moves its ioeventfds) and calls the optional ``on_bar_moved`` hook.

Config reads are lock-free (the slot table is an immutable tuple replaced on change);
config writes, adds and removes serialise on one lock.
"""

from __future__ import annotations

import logging
import threading
from collections.abc import Callable, Iterator
from dataclasses import dataclass

from pych.arch.x86_64.layout import pci_intx_irq
from pych.devices.bus import Bus, BusError

from .allocator import AddressAllocator, AllocationError
from .config import BAR0, COMMAND, NUM_BARS, Bar
from .device import BarRegion, PciDevice, PciHostBridge

log = logging.getLogger(__name__)

NUM_DEVICE_SLOTS = 32
HOST_BRIDGE_SLOT = 0


class PciBusError(Exception):
    pass


class PciDeviceIdOutOfRange(PciBusError):
    def __init__(self, slot: int) -> None:
        super().__init__(f"Given PCI device ID ({slot}) is out of the supported range of "
                         f"0..{NUM_DEVICE_SLOTS}")


class PciDeviceIdReserved(PciBusError):
    def __init__(self, slot: int) -> None:
        super().__init__(f"Given PCI device ID ({slot}) is reserved")


class PciDeviceIdInUse(PciBusError):
    def __init__(self, slot: int) -> None:
        super().__init__(f"Valid PCI device identifier but already used: {slot}")


class NoPciSlotAvailable(PciBusError):
    def __init__(self) -> None:
        super().__init__("Could not find an available device slot on the PCI bus")


class BarAllocationError(PciBusError):
    pass


def bdf(segment: int, slot: int, function: int = 0) -> str:
    """The reference's BDF string, e.g. ``0000:00:06.0``."""
    return f"{segment:04x}:00:{slot:02x}.{function:x}"


@dataclass(frozen=True)
class BarMove:
    """BAR ``index`` of the device in ``slot`` stopped decoding at ``old`` and/or started
    decoding at ``new`` (None: not decoding)."""
    segment: int
    slot: int
    index: int
    size: int
    old: int | None
    new: int | None


BarMoveHook = Callable[[PciDevice, BarMove], None]


@dataclass
class _BarState:
    bar: Bar
    allocator: AddressAllocator | None = None
    allocated: int | None = None          # address held in ``allocator``
    mapped: int | None = None             # address of the BarRegion on the MMIO bus


class PciBus:
    def __init__(self, segment: int = 0, *, mmio_bus: Bus | None = None,
                 mem32: AddressAllocator | None = None, mem64: AddressAllocator | None = None,
                 on_bar_moved: BarMoveHook | None = None) -> None:
        self.segment = segment
        self._mmio_bus = mmio_bus
        self._mem32 = mem32
        self._mem64 = mem64
        self._on_bar_moved = on_bar_moved
        self._lock = threading.RLock()
        self._slots: tuple[PciDevice | None, ...] = (
            (PciHostBridge() if segment == 0 else None),) + (None,) * (NUM_DEVICE_SLOTS - 1)
        self._reserved: set[int] = set()
        self._bar_states: dict[int, list[_BarState]] = {}

    # --- topology -------------------------------------------------------------------------
    def device(self, slot: int) -> PciDevice | None:
        return self._slots[slot] if 0 <= slot < NUM_DEVICE_SLOTS else None

    def devices(self) -> Iterator[tuple[int, PciDevice]]:
        """(slot, device) for every device except the host bridge."""
        for slot, dev in enumerate(self._slots):
            if dev is not None and not self._is_host_bridge(slot):
                yield slot, dev

    def slot_of(self, device: PciDevice) -> int | None:
        for slot, dev in enumerate(self._slots):
            if dev is device:
                return slot
        return None

    def bdf(self, slot: int) -> str:
        return bdf(self.segment, slot)

    def reserve_slot(self, slot: int) -> None:
        """Hold an explicitly requested slot so dynamic allocation skips it (boot-time
        devices with ``pci_device_id`` are reserved before any device is created)."""
        with self._lock:
            self._check_explicit_slot(slot)
            self._reserved.add(slot)

    def add_device(self, device: PciDevice, slot: int | None = None) -> int:
        """Place the device's BARs and publish it at ``slot`` (lowest free if None)."""
        with self._lock:
            if slot is None:
                slot = self._lowest_free_slot()
            elif slot in self._reserved:
                self._reserved.discard(slot)
            else:
                self._check_explicit_slot(slot)
            states = [_BarState(bar) for bar in device.config.bars]
            try:
                for state in states:
                    self._place_bar(device, state)
            except AllocationError as e:
                for state in states:
                    self._free_bar(state)
                raise BarAllocationError(f"cannot place the BARs of {bdf(self.segment, slot)}: {e}") from e
            if device.config.interrupt_pin:
                device.config.set_interrupt_line(pci_intx_irq(slot))
            self._bar_states[slot] = states
            self._publish(slot, device)
        return slot

    def remove_device(self, slot: int) -> PciDevice:
        """Unpublish the device, unmap and free its BARs and its slot; the caller then
        shuts the device down."""
        with self._lock:
            device = self.device(slot)
            if device is None or self._is_host_bridge(slot):
                raise PciBusError(f"no removable device at {bdf(self.segment, slot)}")
            self._publish(slot, None)
            for state in self._bar_states.pop(slot):
                self._map(slot, device, state, None)
                self._free_bar(state)
        return device

    def _check_explicit_slot(self, slot: int) -> None:
        if not 0 <= slot < NUM_DEVICE_SLOTS:
            raise PciDeviceIdOutOfRange(slot)
        if self._is_host_bridge(slot):
            raise PciDeviceIdReserved(slot)
        if self._slots[slot] is not None or slot in self._reserved:
            raise PciDeviceIdInUse(slot)

    def _is_host_bridge(self, slot: int) -> bool:
        return slot == HOST_BRIDGE_SLOT and self.segment == 0

    def _lowest_free_slot(self) -> int:
        for slot, dev in enumerate(self._slots):
            if dev is None and slot not in self._reserved:
                return slot
        raise NoPciSlotAvailable()

    def _publish(self, slot: int, device: PciDevice | None) -> None:
        slots = list(self._slots)
        slots[slot] = device
        self._slots = tuple(slots)

    # --- BAR placement ----------------------------------------------------------------------
    def _allocator_for(self, bar: Bar) -> AddressAllocator | None:
        if bar.is_64bit and self._mem64 is not None:
            return self._mem64
        return self._mem32

    def _place_bar(self, device: PciDevice, state: _BarState) -> None:
        allocator = self._allocator_for(state.bar)
        if allocator is None:
            return                          # left at 0: the guest assigns it
        address = allocator.allocate(state.bar.size)
        state.allocator, state.allocated = allocator, address
        device.config.set_bar_address(state.bar.index, address)

    def _free_bar(self, state: _BarState) -> None:
        if state.allocator is not None and state.allocated is not None:
            state.allocator.free(state.allocated)
        state.allocator = state.allocated = None

    def _follow_guest_placement(self, state: _BarState, address: int) -> None:
        """Keep the allocators in step with where the guest put a BAR, so later hot-plugged
        devices are not placed on top of it."""
        if address == state.allocated:
            return
        for allocator in (self._mem32, self._mem64):
            if allocator is not None and allocator.contains(address, state.bar.size):
                try:
                    allocator.claim(address, state.bar.size)
                except AllocationError as e:
                    log.info("PCI %s: guest placed BAR at %#x over a reserved range: %s",
                             self.segment, address, e)
                    return
                self._free_bar(state)
                state.allocator, state.allocated = allocator, address
                return

    # --- config space -----------------------------------------------------------------------
    def config_read(self, slot: int, function: int, offset: int, size: int) -> int:
        device = self.device(slot) if function == 0 else None
        if device is None:
            return (1 << (8 * size)) - 1          # no device: master abort reads all-ones
        return device.config_read(offset, size)

    def config_write(self, slot: int, function: int, offset: int, size: int, value: int) -> None:
        device = self.device(slot) if function == 0 else None
        if device is None:
            return
        with self._lock:
            if self._slots[slot] is not device:
                return                               # removed under our feet
            device.config_write(offset, size, value)
            if _touches_decoding(offset, size):
                for state in self._bar_states.get(slot, ()):
                    self._map(slot, device, state, device.config.decoded_bar_address(state.bar.index))

    def _map(self, slot: int, device: PciDevice, state: _BarState, new: int | None) -> None:
        old = state.mapped
        if new == old:
            return
        bar = state.bar
        if old is not None and self._mmio_bus is not None:
            self._mmio_bus.remove(old)
        state.mapped = None
        if new is not None:
            self._follow_guest_placement(state, new)
            if self._mmio_bus is not None:
                try:
                    self._mmio_bus.insert(new, bar.size, BarRegion(device, bar.index))
                except BusError as e:
                    log.warning("PCI %s: BAR %d not mapped at %#x: %s",
                                bdf(self.segment, slot), bar.index, new, e)
                    new = None
        state.mapped = new
        if new == old:
            return
        device.bar_moved(bar.index, old, new)
        if self._on_bar_moved is not None:
            self._on_bar_moved(device, BarMove(self.segment, slot, bar.index, bar.size, old, new))

    def restore_bars(self) -> None:
        """After the devices' config spaces were restored from a snapshot: take every BAR
        off its VMM-chosen address, then claim and map each where the saved config space
        says the guest put it (two passes, so one device's new address never collides with
        another's old one)."""
        with self._lock:
            for slot, device in self.devices():
                for state in self._bar_states.get(slot, ()):
                    self._map(slot, device, state, None)
                    self._free_bar(state)
            for slot, device in self.devices():
                for state in self._bar_states.get(slot, ()):
                    address = device.config.bar_address(state.bar.index)
                    allocator = self._allocator_for(state.bar)
                    if allocator is not None and allocator.contains(address, state.bar.size):
                        allocator.claim(address, state.bar.size)
                        state.allocator, state.allocated = allocator, address
                    self._map(slot, device, state,
                              device.config.decoded_bar_address(state.bar.index))

    def mapped_bar(self, slot: int, index: int) -> int | None:
        for state in self._bar_states.get(slot, ()):
            if state.bar.index == index:
                return state.mapped
        return None


def _touches_decoding(offset: int, size: int) -> bool:
    end = offset + size
    return (offset < COMMAND + 2 and COMMAND < end) or (offset < BAR0 + 4 * NUM_BARS and BAR0 < end)
