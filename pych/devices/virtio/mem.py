"""virtio-mem (virtio 1.2 §5.15): guest RAM that grows and shrinks in 2 MiB blocks.

The device owns one region of guest physical memory, mapped (and registered as a KVM
memslot) in full when the VM boots; nothing backs it on the host until the guest touches
it. The host asks for an amount of plugged memory by setting ``requested_size``
(:meth:`VirtioMem.resize`) and raising a configuration-change interrupt; the guest's
driver then sends requests on the one queue:

=============  ============================================================================
PLUG           plug ``nb_blocks`` blocks at ``addr``: NACK if ``plugged_size`` would exceed
               ``requested_size``, ERROR if the range is invalid or any block is plugged
UNPLUG         unplug them: ERROR if the range is invalid or any block is not plugged;
               their host memory is discarded (``MADV_REMOVE``), so host RSS really drops
UNPLUG_ALL     unplug every block (the driver's start-up after a reboot of its own)
STATE          PLUGGED / UNPLUGGED / MIXED for a range (ERROR if the range is invalid)
=============  ============================================================================

A range is valid when ``addr`` is block aligned, ``nb_blocks`` > 0 and every block lies
in the usable region (here the whole region). The plugged state survives a device reset,
as the specification requires: a re-probing driver finds ``plugged_size`` and unplugs all.

Plug listeners (:meth:`VirtioMem.add_plug_listener`) learn of every change on the device's
worker thread: blocks just plugged before the driver's request is acknowledged (so a VFIO
container can DMA-map them before the guest uses them), blocks just unplugged before their
host memory is discarded (so the DMA mapping goes first).
"""

from __future__ import annotations

import enum
import logging
import mmap
import struct
import threading
from typing import Callable

from pych.guest_log import GuestLog
from pych.memory.guest_memory import MemoryRegion

from .device import VirtioDevice, VirtioDeviceType
from .queue import DescriptorChain

log = logging.getLogger(__name__)
_guest_log = GuestLog(log)       # what the guest can repeat at will is rate-limited

BLOCK_SIZE = 2 << 20
"""Plug granularity: 2 MiB, so the host can back plugged blocks with transparent huge pages."""

REGION_ALIGNMENT = 128 << 20
"""The region's start and size are multiples of Linux's memory block size."""

QUEUE_SIZE = 128


class Request(enum.IntEnum):
    PLUG = 0
    UNPLUG = 1
    UNPLUG_ALL = 2
    STATE = 3


class Response(enum.IntEnum):
    ACK = 0
    NACK = 1
    BUSY = 2
    ERROR = 3


class BlockState(enum.IntEnum):
    PLUGGED = 0
    UNPLUGGED = 1
    MIXED = 2


# block_size, node_id, padding, addr, region_size, usable_region_size, plugged_size,
# requested_size
_CONFIG = struct.Struct("<QH6xQQQQQ")
_REQUEST = struct.Struct("<H6xQH6x")        # type, padding, addr, nb_blocks, padding
_RESPONSE = struct.Struct("<H6xH")          # type, padding, state (STATE requests only)


PlugListener = Callable[[int, int], None]
"""``listener(gpa, size)``: a run of blocks changed state (see VirtioMem.add_plug_listener)."""


class VirtioMemResizeError(ValueError):
    """A requested size the device cannot take; the message says why."""


class VirtioMem(VirtioDevice):
    """The virtio-mem device for ``region`` (a memfd-backed :class:`MemoryRegion` already
    visible to the guest), asking at first for ``requested_size`` bytes."""

    device_type = VirtioDeviceType.MEM

    def __init__(self, region: MemoryRegion, *, requested_size: int = 0, node_id: int = 0,
                 name: str = "mem0") -> None:
        if region.gpa % REGION_ALIGNMENT or region.size % REGION_ALIGNMENT:
            raise ValueError(f"{name}: the virtio-mem region {region.gpa:#x}+{region.size:#x} "
                             f"is not aligned to {REGION_ALIGNMENT >> 20} MiB")
        super().__init__(name=name, queue_sizes=[QUEUE_SIZE])
        self.region = region
        self.node_id = node_id
        self._lock = threading.Lock()     # the bitmap, plugged and requested sizes
        self._plugged = 0                 # bit i: block i is plugged
        self._plugged_blocks = 0
        self._requested = 0
        self._listeners: list[tuple[PlugListener, PlugListener]] = []
        self.resize(requested_size)

    def add_plug_listener(self, plugged: PlugListener, unplugged: PlugListener) -> None:
        """Call ``plugged(gpa, size)`` for each run of blocks the driver plugs, before its
        request is acknowledged, and ``unplugged(gpa, size)`` for each run it unplugs, before
        their host memory is discarded. Both run on the device's worker thread, outside the
        device's lock; an exception is logged and does not fail the request."""
        self._listeners.append((plugged, unplugged))

    @property
    def block_count(self) -> int:
        return self.region.size // BLOCK_SIZE

    @property
    def plugged_size(self) -> int:
        return self._plugged_blocks * BLOCK_SIZE

    @property
    def requested_size(self) -> int:
        return self._requested

    def resize(self, size: int) -> bool:
        """Ask the driver for ``size`` plugged bytes (a config-change interrupt when it is
        active; otherwise it reads the size when it starts). Returns False, changing
        nothing, when ``size`` is what is already requested.

        Raises :class:`VirtioMemResizeError` if ``size`` exceeds the region or is not a
        multiple of the block size."""
        if size > self.region.size:
            raise VirtioMemResizeError(f"{size} bytes is more than the virtio-mem region "
                                       f"({self.region.size} bytes)")
        if size % BLOCK_SIZE:
            raise VirtioMemResizeError(f"{size} bytes is not a multiple of the virtio-mem "
                                       f"block size ({BLOCK_SIZE} bytes)")
        with self._lock:
            if size == self._requested:
                return False
            self._requested = size
        log.info("%s: requested size %d MiB", self.name, size >> 20)
        self.config_changed()
        return True

    # --- configuration space -------------------------------------------------------------------
    def config_bytes(self) -> bytes:
        with self._lock:
            return _CONFIG.pack(BLOCK_SIZE, self.node_id, self.region.gpa, self.region.size,
                                self.region.size, self.plugged_size, self._requested)

    # --- requests --------------------------------------------------------------------------------
    def handle_chain(self, index: int, chain: DescriptorChain) -> int:
        writer = chain.writer()
        if writer.remaining < _RESPONSE.size:
            _guest_log.warning("%s: request without room for a response: ignored", self.name)
            return 0
        data = chain.reader().read(_REQUEST.size)
        if len(data) < _REQUEST.size:
            _guest_log.warning("%s: %d-byte request is too short", self.name, len(data))
            writer.write(_RESPONSE.pack(Response.ERROR, 0))
            return writer.written
        kind, addr, nb_blocks = _REQUEST.unpack(data)
        response, state = self.request(kind, addr, nb_blocks)
        writer.write(_RESPONSE.pack(response, state))
        return writer.written

    def request(self, kind: int, addr: int = 0, nb_blocks: int = 0) -> tuple[Response, int]:
        """Carry out one driver request; returns the response and, for STATE, the state."""
        try:
            kind = Request(kind)
        except ValueError:
            _guest_log.warning("%s: unknown request type %d", self.name, kind)
            return Response.ERROR, 0
        with self._lock:
            if kind == Request.UNPLUG_ALL:
                unplugged = self._plugged
                self._plugged, self._plugged_blocks = 0, 0
                response = Response.ACK, 0
            else:
                mask = self._mask(addr, nb_blocks)
                if mask is None:
                    _guest_log.warning("%s: %s of %d blocks at %#x: not in the region or not aligned",
                                       self.name, kind.name, nb_blocks, addr)
                    return Response.ERROR, 0
                plugged = self._plugged & mask
                if kind == Request.STATE:
                    state = (BlockState.PLUGGED if plugged == mask else
                             BlockState.UNPLUGGED if not plugged else BlockState.MIXED)
                    return Response.ACK, state
                if kind == Request.PLUG:
                    if (self._plugged_blocks + nb_blocks) * BLOCK_SIZE > self._requested:
                        return Response.NACK, 0
                    if plugged:
                        return Response.ERROR, 0
                    self._plugged |= mask
                    self._plugged_blocks += nb_blocks
                else:                                           # UNPLUG
                    if plugged != mask:
                        return Response.ERROR, 0
                    self._plugged &= ~mask
                    self._plugged_blocks -= nb_blocks
                response = Response.ACK, 0
                unplugged = mask if kind == Request.UNPLUG else 0
        # Requests come one at a time from the worker thread, so the blocks cannot change
        # again before the listeners have run and the memory is discarded.
        if kind == Request.PLUG:
            self._tell_listeners(0, mask)
        elif unplugged:
            self._tell_listeners(1, unplugged)
            self._discard(unplugged)
        return response

    def _tell_listeners(self, which: int, mask: int) -> None:
        for listeners in self._listeners:
            for block, count in _runs(mask):
                try:
                    listeners[which](self.region.gpa + block * BLOCK_SIZE, count * BLOCK_SIZE)
                except Exception:  # noqa: BLE001 - a listener's failure is its own
                    log.exception("%s: plug listener failed", self.name)

    def _mask(self, addr: int, nb_blocks: int) -> int | None:
        """The bitmap of blocks ``[addr, addr + nb_blocks blocks)``, None if not valid."""
        offset = addr - self.region.gpa
        if offset < 0 or offset % BLOCK_SIZE or nb_blocks <= 0:
            return None
        first = offset // BLOCK_SIZE
        if first + nb_blocks > self.block_count:
            return None
        return ((1 << nb_blocks) - 1) << first

    def _discard(self, mask: int) -> None:
        """Free the host memory behind the blocks of ``mask``, one ``madvise`` per run."""
        for block, count in _runs(mask):
            try:
                self.region.mmap.madvise(mmap.MADV_REMOVE, block * BLOCK_SIZE,
                                         count * BLOCK_SIZE)
            except OSError as e:
                _guest_log.warning("%s: cannot discard %d blocks at block %d: %s", self.name, count,
                                   block, e.strerror)

    # --- snapshot ------------------------------------------------------------------------------
    def save_state(self) -> dict:
        """The plugged-block bitmap (hex, bit i for block i), how many blocks are plugged,
        the requested size and the config generation (the queue is the transport's)."""
        with self._lock:
            return {"config_generation": self.config_generation,
                    "block_count": self.block_count, "plugged": f"{self._plugged:x}",
                    "plugged_blocks": self._plugged_blocks, "requested": self._requested}

    def restore_state(self, saved: dict) -> None:
        """Put the plugged blocks and sizes back as saved (on a new VM, before it runs);
        ValueError for a state that does not fit this device's region."""
        plugged = int(saved["plugged"], 16)
        blocks, requested = int(saved["plugged_blocks"]), int(saved["requested"])
        if saved["block_count"] != self.block_count or plugged >> self.block_count:
            raise ValueError(f"{self.name}: the saved virtio-mem state has "
                             f"{saved['block_count']} blocks, this region "
                             f"{self.block_count}")
        if plugged.bit_count() != blocks or requested > self.region.size \
                or requested % BLOCK_SIZE:
            raise ValueError(f"{self.name}: the saved virtio-mem state is inconsistent "
                             f"({blocks} plugged blocks, bitmap of {plugged.bit_count()}, "
                             f"requested {requested} bytes)")
        with self._lock:
            self._plugged, self._plugged_blocks, self._requested = plugged, blocks, requested
        super().restore_state(saved)

    def plugged_offsets(self) -> list[tuple[int, int]]:
        """The plugged memory as ``(offset in the region, size)`` runs, lowest first (what a
        snapshot or migration copies of the region)."""
        with self._lock:
            mask = self._plugged
        return [(block * BLOCK_SIZE, count * BLOCK_SIZE) for block, count in _runs(mask)]

    def plugged_ranges(self) -> list[tuple[int, int]]:
        """The plugged memory as ``(guest address, size)`` runs, lowest first."""
        with self._lock:
            mask = self._plugged
        return [(self.region.gpa + block * BLOCK_SIZE, count * BLOCK_SIZE)
                for block, count in _runs(mask)]


def _runs(mask: int):
    """The runs of set bits of ``mask`` as ``(first bit, length)``, lowest first."""
    bit = 0
    while mask:
        skip = (mask & -mask).bit_length() - 1
        mask >>= skip
        bit += skip
        length = (~mask & (mask + 1)).bit_length() - 1
        yield bit, length
        mask >>= length
        bit += length
