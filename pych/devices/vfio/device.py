"""A host PCI device passed through to the guest with VFIO.

Config space is the device's own, read and written through the VFIO config region,
except what pych emulates:

* the BARs (0x10-0x27) and the expansion ROM (0x30, none exposed): the guest sees BARs of
  the device's sizes and types, placed by pych's allocators; moving one moves its mapping;
* the interrupt pin and line: no INTx, interrupts are MSI-X only;
* the capability chain: the MSI capability is unlinked (the guest driver uses MSI-X), and
  the MSI-X capability is an emulated copy driven by a
  :class:`~pych.devices.pci.msix.MsixController`; every other capability passes through;
* extended config space (offset 256 and up) reads as zero: no extended capabilities.

Writes to COMMAND reach the device (memory decoding, bus mastering) and the emulated copy
the PCI bus decodes BARs from.

MMIO BARs the kernel lets us mmap (and that are at least a page and do not hold the MSI-X
table) become KVM memslots at the BAR's guest address: the guest reaches the device
without exits. Other BARs, and the one holding the MSI-X table, are trapped: each access is
a ``pread``/``pwrite`` of the region, with the table and PBA emulated. I/O port BARs are
not exposed.

MSI-X: every table entry has a KVM route and irqfd (the injected MSI manager); when the
guest enables MSI-X the vectors' eventfds are handed to the kernel with
``VFIO_DEVICE_SET_IRQS``, so a device interrupt signals the irqfd directly.
"""

from __future__ import annotations

import ctypes
import logging
import mmap
import os
import struct
from contextlib import ExitStack
from typing import Protocol, Sequence

from pych.devices.pci.config import (
    BAR0, CAPABILITIES_POINTER, CONFIG_SPACE_SIZE, EXPANSION_ROM, HEADER_TYPE, INTERRUPT_LINE,
    INTERRUPT_PIN, NUM_BARS, STATUS, CapabilityId, PciConfiguration, Status,
)
from pych.devices.pci.device import PciDevice
from pych.devices.pci.msix import MSIX_CONTROL_TABLE_SIZE, MsixController

from . import bindings as b
from .container import VfioContainer, VfioError, pci_device_dir, vfio_group_of

log = logging.getLogger(__name__)

PAGE_SIZE = mmap.PAGESIZE
_MSIX_CAP_SIZE = 12
_BAR_IO = 0x1
_BAR_MEM_TYPE_64 = 0x4
_BAR_PREFETCHABLE = 0x8

# Where a config-space byte comes from.
_DEVICE, _EMULATED, _CHAIN, _MSIX = range(4)


class EventfdVector(Protocol):
    """An MSI vector backed by an eventfd wired into the guest (KVM irqfd)."""

    fd: int

    def update(self, address: int, data: int, masked: bool) -> None: ...

    def trigger(self) -> None: ...


class EventfdVectorGroup(Protocol):
    @property
    def vectors(self) -> Sequence[EventfdVector]: ...

    def release(self) -> None: ...


class EventfdMsiManager(Protocol):
    def create_msix_group(self, count: int) -> EventfdVectorGroup: ...


class Memslots(Protocol):
    def add_memory(self, gpa: int, size: int, host_addr: int) -> int: ...

    def remove_memory(self, slot: int, gpa: int) -> None: ...


class _MappedBar:
    """An mmapped BAR and, while it decodes, its memslot."""

    def __init__(self, mapping: mmap.mmap, size: int) -> None:
        self.mapping = mapping
        self.size = size
        buf = ctypes.c_char.from_buffer(mapping)
        self.host_addr = ctypes.addressof(buf)
        del buf
        self.memslot: tuple[int, int] | None = None      # (slot, gpa)


class VfioPciDevice(PciDevice):
    """The host PCI device at sysfs ``path``, opened through ``container``, reset and ready
    to be put on the bus. Raises :class:`~pych.devices.vfio.container.VfioUnavailable`
    (a path or host the request cannot work with) or :class:`VfioError`, holding nothing."""

    def __init__(self, path: str, container: VfioContainer, *, msi: EventfdMsiManager,
                 memslots: Memslots, exclude_mmap_bars: Sequence[int] = (), name: str = "") -> None:
        self._kernel = container.kernel
        self._memslots = memslots
        self._irqs_enabled = False
        with ExitStack() as stack:
            sysfs = pci_device_dir(path)
            self.name = name or sysfs.name
            container.open()
            group = container.attach_group(vfio_group_of(sysfs))
            stack.callback(container.release_group, group)
            self._fd = group.device_fd(sysfs.name)
            stack.callback(self._kernel.close, self._fd)
            info = self._device_info()
            self._regions = [self._region_info(i) for i in range(b.VFIO_PCI_NUM_REGIONS)]
            self._can_reset = bool(info.flags & b.VFIO_DEVICE_FLAGS_RESET)
            if self._can_reset:
                self._ioctl(b.VFIO_DEVICE_RESET, what="reset")
                stack.callback(self._reset_quietly)
            raw = self._kernel.pread(self._fd, CONFIG_SPACE_SIZE,
                                     self._regions[b.VFIO_PCI_CONFIG_REGION_INDEX].offset)
            if raw[HEADER_TYPE] & 0x7F:
                raise VfioError(f"{self.name}: only type-0 (endpoint) PCI devices can be "
                                "passed through")
            config = PciConfiguration(
                vendor_id=_u(raw, 0x00, 2), device_id=_u(raw, 0x02, 2),
                class_code=raw[0x0B], subclass=raw[0x0A], prog_if=raw[0x09], revision=raw[0x08],
                subsystem_vendor_id=_u(raw, 0x2C, 2), subsystem_id=_u(raw, 0x2E, 2))
            self._add_bars(config, raw)
            super().__init__(config)
            caps = _capabilities(raw)
            self._msix: MsixController | None = None
            self._msix_cap: int | None = None
            msix_cap = next((off for cid, off in caps if cid == CapabilityId.MSIX), None)
            if msix_cap is not None:
                self._setup_msix(raw, msix_cap, msi, stack)
            else:
                log.warning("%s: no MSI-X capability: the guest gets no interrupts from it",
                            self.name)
            kept = [off for cid, off in caps if cid != CapabilityId.MSI]
            self._chain = {CAPABILITIES_POINTER: kept[0] if kept else 0}
            self._chain.update({off + 1: nxt for off, nxt in zip(kept, [*kept[1:], 0])})
            self._mapped: dict[int, _MappedBar] = {}
            for bar in config.bars:
                if self._mappable(bar.index, bar.size, exclude_mmap_bars):
                    region = self._regions[bar.index]
                    mapping = self._kernel.mmap(self._fd, bar.size, region.offset)
                    stack.callback(mapping.close)
                    self._mapped[bar.index] = _MappedBar(mapping, bar.size)
            self._resources = stack.pop_all()
        log.info("%s: VFIO device %s (%04x:%04x), BARs %s, %s MSI-X vectors", self.name,
                 sysfs.name, config.vendor_id, config.device_id,
                 ", ".join(f"{bar.index}:{bar.size:#x}{' mmap' if bar.index in self._mapped else ''}"
                           for bar in config.bars) or "none",
                 self._msix.num_vectors if self._msix else "no")

    # --- setup -------------------------------------------------------------------------------
    def _ioctl(self, request: int, arg: int | bytearray = 0, *, what: str) -> int:
        try:
            return self._kernel.ioctl(self._fd, request, arg)
        except OSError as e:
            raise VfioError(f"{self.name}: VFIO {what} failed: {os.strerror(e.errno)}") from None

    def _device_info(self) -> b.vfio_device_info:
        buf = bytearray(b.vfio_device_info.new())
        self._ioctl(b.VFIO_DEVICE_GET_INFO, buf, what="device info")
        info = b.vfio_device_info.from_buffer(buf)
        if not info.flags & b.VFIO_DEVICE_FLAGS_PCI or info.num_regions < b.VFIO_PCI_NUM_REGIONS:
            raise VfioError(f"{self.name}: not a vfio-pci device")
        return info

    def _region_info(self, index: int) -> b.vfio_region_info:
        buf = bytearray(b.vfio_region_info.new(index=index))
        self._ioctl(b.VFIO_DEVICE_GET_REGION_INFO, buf, what=f"region {index} info")
        return b.vfio_region_info.from_buffer(buf)

    def _add_bars(self, config: PciConfiguration, raw: bytes) -> None:
        index = 0
        while index < NUM_BARS:
            low = _u(raw, BAR0 + 4 * index, 4)
            size = self._regions[index].size
            is_64bit = not low & _BAR_IO and bool(low & _BAR_MEM_TYPE_64)
            if size and low & _BAR_IO:
                log.warning("%s: I/O port BAR %d is not exposed to the guest", self.name, index)
            elif size:
                if size & (size - 1):
                    raise VfioError(f"{self.name}: BAR {index} size {size:#x} is not a power of two")
                config.add_bar(index, max(size, 16), is_64bit=is_64bit,
                               prefetchable=bool(low & _BAR_PREFETCHABLE))
            index += 2 if is_64bit else 1

    def _setup_msix(self, raw: bytes, cap: int, msi: EventfdMsiManager, stack: ExitStack) -> None:
        control, table, pba = struct.unpack_from("<HII", raw, cap + 2)
        count = (control & MSIX_CONTROL_TABLE_SIZE) + 1
        if table & 7 != pba & 7:
            raise VfioError(f"{self.name}: the MSI-X table and PBA are in different BARs "
                            "(not supported)")
        buf = bytearray(b.vfio_irq_info.new(index=b.VFIO_PCI_MSIX_IRQ_INDEX))
        self._ioctl(b.VFIO_DEVICE_GET_IRQ_INFO, buf, what="MSI-X IRQ info")
        irq = b.vfio_irq_info.from_buffer(buf)
        if irq.count < count or not irq.flags & b.VFIO_IRQ_INFO_EVENTFD:
            raise VfioError(f"{self.name}: VFIO offers {irq.count} MSI-X eventfds, the device "
                            f"has {count} vectors")
        group = msi.create_msix_group(count)
        stack.callback(group.release)
        self._vectors = group
        self._msix = MsixController(group.vectors, bar=table & 7, table_offset=table & ~7,
                                    pba_offset=pba & ~7)
        # The emulated capability lives in a scratch config space; the guest sees it at
        # the device's own offset.
        self._msix_config = PciConfiguration(vendor_id=0, device_id=0, class_code=0, subclass=0)
        self._msix_shadow = self._msix.install(self._msix_config)
        self._msix_cap = cap

    def _mappable(self, index: int, size: int, excluded: Sequence[int]) -> bool:
        region = self._regions[index]
        return (bool(region.flags & b.VFIO_REGION_INFO_FLAG_MMAP) and size >= PAGE_SIZE
                and index not in excluded and (self._msix is None or index != self._msix.bar))

    # --- config space ------------------------------------------------------------------------
    def _source(self, offset: int) -> int:
        if (BAR0 <= offset < BAR0 + 4 * NUM_BARS or EXPANSION_ROM <= offset < EXPANSION_ROM + 4
                or offset in (INTERRUPT_LINE, INTERRUPT_PIN)):
            return _EMULATED
        if offset in self._chain:
            return _CHAIN
        if self._msix_cap is not None and self._msix_cap <= offset < self._msix_cap + _MSIX_CAP_SIZE:
            return _MSIX
        return _DEVICE

    def _runs(self, offset: int, size: int):
        """Split an access into runs of bytes with the same source: (source, offset, size)."""
        start, kind = offset, self._source(offset)
        for o in range(offset + 1, offset + size):
            if (k := self._source(o)) != kind:
                yield kind, start, o - start
                start, kind = o, k
        yield kind, start, offset + size - start

    def config_read(self, offset: int, size: int) -> int:
        if offset < 0 or offset + size > CONFIG_SPACE_SIZE:
            return 0
        data = bytearray()
        for kind, start, n in self._runs(offset, size):
            if kind == _DEVICE:
                data += self._kernel.pread(self._fd, n, self._config_offset + start)
            elif kind == _EMULATED:
                data += self.config.read(start, n).to_bytes(n, "little")
            elif kind == _CHAIN:
                data.append(self._chain[start])
            else:
                value = self._msix_config.read(self._msix_shadow + start - self._msix_cap, n)
                data += value.to_bytes(n, "little")
        return int.from_bytes(data, "little")

    def config_write(self, offset: int, size: int, value: int) -> None:
        if offset < 0 or offset + size > CONFIG_SPACE_SIZE:
            return
        data = value.to_bytes(size, "little")
        msix_touched = False
        for kind, start, n in self._runs(offset, size):
            chunk = data[start - offset:start - offset + n]
            part = int.from_bytes(chunk, "little")
            if kind == _DEVICE:
                self._kernel.pwrite(self._fd, chunk, self._config_offset + start)
                self.config.write(start, n, part)       # COMMAND: the bus decodes BARs from it
            elif kind == _EMULATED:
                self.config.write(start, n, part)
            elif kind == _MSIX:
                shadow = self._msix_shadow + start - self._msix_cap
                self._msix_config.write(shadow, n, part)
                self._msix.config_written(self._msix_config, shadow, n)
                msix_touched = True
        if msix_touched:
            self._sync_msix_irqs()

    @property
    def _config_offset(self) -> int:
        return self._regions[b.VFIO_PCI_CONFIG_REGION_INDEX].offset

    # --- interrupts --------------------------------------------------------------------------
    def _sync_msix_irqs(self) -> None:
        """Hand the vectors' eventfds to VFIO when the guest enables MSI-X; take them back
        when it disables it."""
        enabled = self._msix.enabled
        if enabled == self._irqs_enabled:
            return
        if enabled:
            fds = [vector.fd for vector in self._vectors.vectors]
            self._set_irqs(b.VFIO_IRQ_SET_DATA_EVENTFD | b.VFIO_IRQ_SET_ACTION_TRIGGER, fds)
        else:
            self._set_irqs(b.VFIO_IRQ_SET_DATA_NONE | b.VFIO_IRQ_SET_ACTION_TRIGGER, [])
        self._irqs_enabled = enabled

    def _set_irqs(self, flags: int, fds: list[int]) -> None:
        header = b.vfio_irq_set(argsz=ctypes.sizeof(b.vfio_irq_set) + 4 * len(fds), flags=flags,
                                index=b.VFIO_PCI_MSIX_IRQ_INDEX, start=0, count=len(fds))
        arg = bytearray(header) + struct.pack(f"<{len(fds)}i", *fds)
        self._ioctl(b.VFIO_DEVICE_SET_IRQS, arg, what="MSI-X setup")

    # --- BARs --------------------------------------------------------------------------------
    def _msix_part(self, index: int, offset: int, size: int):
        """('table' | 'pba', offset within it) for an access to the MSI-X structures."""
        msix = self._msix
        if msix is None or index != msix.bar:
            return None
        if msix.table_offset <= offset and offset + size <= msix.table_offset + msix.table_size:
            return "table", offset - msix.table_offset
        if msix.pba_offset <= offset and offset + size <= msix.pba_offset + msix.pba_size:
            return "pba", offset - msix.pba_offset
        return None

    def bar_read(self, index: int, offset: int, size: int) -> int:
        part = self._msix_part(index, offset, size)
        if part is not None:
            kind, at = part
            return self._msix.read_table(at, size) if kind == "table" else self._msix.read_pba(at, size)
        data = self._kernel.pread(self._fd, size, self._regions[index].offset + offset)
        return int.from_bytes(data, "little")

    def bar_write(self, index: int, offset: int, size: int, value: int) -> None:
        part = self._msix_part(index, offset, size)
        if part is not None:
            if part[0] == "table":
                self._msix.write_table(part[1], size, value)
            return
        self._kernel.pwrite(self._fd, value.to_bytes(size, "little"),
                            self._regions[index].offset + offset)

    def bar_moved(self, index: int, old: int | None, new: int | None) -> None:
        bar = self._mapped.get(index)
        if bar is None:
            return
        if bar.memslot is not None:
            self._memslots.remove_memory(*bar.memslot)
            bar.memslot = None
        if new is not None:
            bar.memslot = (self._memslots.add_memory(new, bar.size, bar.host_addr), new)

    # --- teardown ----------------------------------------------------------------------------
    def _reset_quietly(self) -> None:
        try:
            self._kernel.ioctl(self._fd, b.VFIO_DEVICE_RESET)
        except OSError as e:
            log.warning("%s: VFIO reset on release failed: %s", self.name, os.strerror(e.errno))

    def shutdown(self) -> None:
        """Disable its interrupts, drop BAR memslots and mappings, reset the device and
        release it (device fd, then its group)."""
        if self._irqs_enabled:
            try:
                self._set_irqs(b.VFIO_IRQ_SET_DATA_NONE | b.VFIO_IRQ_SET_ACTION_TRIGGER, [])
            except VfioError as e:
                log.warning("%s", e)
            self._irqs_enabled = False
        for index in self._mapped:
            self.bar_moved(index, None, None)
        self._resources.close()


def _u(raw: bytes, offset: int, size: int) -> int:
    return int.from_bytes(raw[offset:offset + size], "little")


def _capabilities(raw: bytes) -> list[tuple[int, int]]:
    """(capability id, offset) along the device's chain, in order."""
    caps: list[tuple[int, int]] = []
    if not _u(raw, STATUS, 2) & Status.CAPABILITIES_LIST:
        return caps
    offset = raw[CAPABILITIES_POINTER] & ~3
    while offset >= 0x40 and offset + 2 <= CONFIG_SPACE_SIZE and all(o != offset for _, o in caps):
        caps.append((raw[offset], offset))
        offset = raw[offset + 1] & ~3
    return caps
