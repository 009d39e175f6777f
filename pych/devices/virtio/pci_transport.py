"""The virtio 1.x PCI transport, modern only (virtio 1.x §4.1).

The device is a PCI function 1af4:(1040 + virtio id), revision 1, with one memory BAR
(64-bit unless asked otherwise) laid out as::

    0x0000  common configuration      (VIRTIO_PCI_CAP_COMMON_CFG)
    0x1000  ISR status                (VIRTIO_PCI_CAP_ISR_CFG)
    0x2000  device configuration      (VIRTIO_PCI_CAP_DEVICE_CFG, if the device has one)
    0x3000  queue notifications       (VIRTIO_PCI_CAP_NOTIFY_CFG, queue i at 4 * i)
    0x4000  MSI-X table               (vector 0..n-1 for queues or config, as the driver maps them)
    0x5000  MSI-X pending-bit array

plus a VIRTIO_PCI_CAP_PCI_CFG window into the BAR through config space.  Every
structure sits in its own page, so the MSI-X table never shares one with registers.

Queue notifications bypass the vCPU: while the BAR decodes, each queue's notify address
is an ioeventfd bound to the queue's kick eventfd, which the device's worker polls.
When no registrar is given (tests) or registration fails, a guest write to the notify
address arrives here as MMIO and signals the same eventfd.

Locking: guest register accesses (vCPU threads) serialise on ``_lock``.  Device worker
threads only ever take ``_isr_lock`` (and the MSI-X controller's lock), never ``_lock``:
a device reset joins the worker while holding ``_lock``.
"""

from __future__ import annotations

import enum
import logging
import os
import struct
import threading
from dataclasses import dataclass

from pych.devices.interrupt import IrqLine
from pych.devices.pci.config import STATUS, CapabilityId, Command, PciConfiguration, Status
from pych.devices.pci.device import PciDevice
from pych.devices.pci.interrupts import IoEventRegistrar, MsiInterruptManager
from pych.devices.pci.msix import MsixController
from pych.guest_log import GuestLog
from pych.memory.guest_memory import GuestMemory
from pych.snapshot import state as snap

from .device import (VIRTIO_F_EVENT_IDX, VIRTIO_F_INDIRECT_DESC, VIRTIO_F_VERSION_1,
                     ActivationError, ActiveQueue, DeviceStatus, VirtioDevice, VirtioDeviceType,
                     drain_eventfd)
from .queue import Virtqueue, VirtqueueError

log = logging.getLogger(__name__)
_guest_log = GuestLog(log)       # what the guest can repeat at will is rate-limited

VIRTIO_PCI_VENDOR_ID = 0x1AF4
VIRTIO_PCI_DEVICE_ID_BASE = 0x1040
VIRTIO_PCI_REVISION = 1
VIRTIO_MSI_NO_VECTOR = 0xFFFF

ISR_QUEUE = 1
ISR_CONFIG = 2


class VirtioPciCapType(enum.IntEnum):
    COMMON_CFG = 1
    NOTIFY_CFG = 2
    ISR_CFG = 3
    DEVICE_CFG = 4
    PCI_CFG = 5


class CommonCfg(enum.IntEnum):
    """Offsets in ``struct virtio_pci_common_cfg``."""
    DEVICE_FEATURE_SELECT = 0x00
    DEVICE_FEATURE = 0x04
    DRIVER_FEATURE_SELECT = 0x08
    DRIVER_FEATURE = 0x0C
    CONFIG_MSIX_VECTOR = 0x10
    NUM_QUEUES = 0x12
    DEVICE_STATUS = 0x14
    CONFIG_GENERATION = 0x15
    QUEUE_SELECT = 0x16
    QUEUE_SIZE = 0x18
    QUEUE_MSIX_VECTOR = 0x1A
    QUEUE_ENABLE = 0x1C
    QUEUE_NOTIFY_OFF = 0x1E
    QUEUE_DESC = 0x20
    QUEUE_DRIVER = 0x28
    QUEUE_DEVICE = 0x30


COMMON_CFG_OFFSET = 0x0000
COMMON_CFG_SIZE = 0x38
ISR_CFG_OFFSET = 0x1000
ISR_CFG_SIZE = 1
DEVICE_CFG_OFFSET = 0x2000
DEVICE_CFG_MAX_SIZE = 0x1000
NOTIFY_CFG_OFFSET = 0x3000
NOTIFY_OFF_MULTIPLIER = 4
MSIX_TABLE_OFFSET = 0x4000
MSIX_PBA_OFFSET = 0x5000
BAR_SIZE = 0x8000
BAR_INDEX = 0

MAX_QUEUES = 255                     # + 1 config vector = a one-page MSI-X table
#: ioeventfd width: 0 = any (KVM's fast-MMIO path, no instruction decode on notify).
NOTIFY_IOEVENT_LENGTH = 0

# PCI class per device type (what the reference exposes); others are "other" (0xff).
_PCI_CLASS = {
    VirtioDeviceType.NET: (0x02, 0x00),       # network, Ethernet
    VirtioDeviceType.BLOCK: (0x01, 0x80),     # mass storage, other
}

_VIRTIO_CAP = struct.Struct("<BBBBxxII")      # cap_len, cfg_type, bar, id, pad, offset, length


def _virtio_cap_body(cfg_type: int, offset: int, length: int, extra: bytes = b"") -> bytes:
    cap_len = 2 + _VIRTIO_CAP.size + len(extra)
    return _VIRTIO_CAP.pack(cap_len, cfg_type, BAR_INDEX, 0, offset, length) + extra


@dataclass
class _QueueRegisters:
    max_size: int
    size: int = 0
    enabled: bool = False
    msix_vector: int = VIRTIO_MSI_NO_VECTOR
    desc: int = 0
    driver: int = 0
    device: int = 0

    def reset(self) -> None:
        self.size = self.max_size
        self.enabled = False
        self.msix_vector = VIRTIO_MSI_NO_VECTOR
        self.desc = self.driver = self.device = 0


class VirtioPciDevice(PciDevice):
    """A :class:`VirtioDevice` behind the modern virtio-pci interface.

    It implements :class:`~pych.devices.virtio.device.VirtioInterrupt` for its device.
    ``intx`` (settable after the slot is known) is used only while MSI-X is disabled.
    """

    def __init__(self, device: VirtioDevice, memory: GuestMemory,
                 interrupts: MsiInterruptManager, ioevents: IoEventRegistrar | None = None, *,
                 use_64bit_bar: bool = True, intx: IrqLine | None = None) -> None:
        num_queues = len(device.queue_max_sizes)
        if num_queues > MAX_QUEUES:
            raise ValueError(f"{device.name}: {num_queues} queues, at most {MAX_QUEUES}")
        pci_device_id = VIRTIO_PCI_DEVICE_ID_BASE + device.device_type
        class_code, subclass = _PCI_CLASS.get(device.device_type, (0xFF, 0xFF))
        super().__init__(PciConfiguration(
            vendor_id=VIRTIO_PCI_VENDOR_ID, device_id=pci_device_id, revision=VIRTIO_PCI_REVISION,
            class_code=class_code, subclass=subclass, subsystem_vendor_id=VIRTIO_PCI_VENDOR_ID,
            subsystem_id=pci_device_id, interrupt_pin=1))
        self.device = device
        self.intx = intx
        self._mem = memory
        self._ioevents = ioevents
        self._lock = threading.RLock()
        self._isr_lock = threading.Lock()

        config = self.config
        config.add_bar(BAR_INDEX, BAR_SIZE, is_64bit=use_64bit_bar)
        config.add_capability(CapabilityId.VENDOR_SPECIFIC, _virtio_cap_body(
            VirtioPciCapType.COMMON_CFG, COMMON_CFG_OFFSET, COMMON_CFG_SIZE))
        config.add_capability(CapabilityId.VENDOR_SPECIFIC, _virtio_cap_body(
            VirtioPciCapType.ISR_CFG, ISR_CFG_OFFSET, ISR_CFG_SIZE))
        config.add_capability(CapabilityId.VENDOR_SPECIFIC, _virtio_cap_body(
            VirtioPciCapType.NOTIFY_CFG, NOTIFY_CFG_OFFSET, NOTIFY_OFF_MULTIPLIER * num_queues,
            struct.pack("<I", NOTIFY_OFF_MULTIPLIER)))
        device_cfg_size = min(len(device.config_bytes()), DEVICE_CFG_MAX_SIZE)
        if device_cfg_size:
            config.add_capability(CapabilityId.VENDOR_SPECIFIC, _virtio_cap_body(
                VirtioPciCapType.DEVICE_CFG, DEVICE_CFG_OFFSET, device_cfg_size))
        # The PCI-config access window: bar, offset and length are writable, the data
        # dword is intercepted in config_read/config_write.
        body = _virtio_cap_body(VirtioPciCapType.PCI_CFG, 0, 0, bytes(4))
        writable = bytearray(len(body))
        writable[2] = 0xFF                                 # bar
        writable[6:14] = b"\xff" * 8                       # offset, length
        self._pci_cfg_cap = config.add_capability(CapabilityId.VENDOR_SPECIFIC, body, bytes(writable))

        self._msi_group = interrupts.create_msix_group(num_queues + 1)
        self.msix = MsixController(self._msi_group.vectors, bar=BAR_INDEX,
                                   table_offset=MSIX_TABLE_OFFSET, pba_offset=MSIX_PBA_OFFSET)
        self.msix.install(config)

        self._kick_fds = [os.eventfd(0, os.EFD_CLOEXEC | os.EFD_NONBLOCK) for _ in range(num_queues)]
        self._ioevent_addresses: list[tuple[int, int]] = []      # (fd, address) registered
        self._queues = [_QueueRegisters(size) for size in device.queue_max_sizes]
        self._isr = 0
        self._intx_asserted = False
        self._needs_reset = False
        self._reset_registers()

    def __repr__(self) -> str:
        return f"<VirtioPciDevice {self.device.name}>"

    # --- PCI config space ---------------------------------------------------------------------
    def _in_pci_cfg_data(self, offset: int, size: int) -> bool:
        data = self._pci_cfg_cap + 16
        return data <= offset and offset + size <= data + 4

    def config_read(self, offset: int, size: int) -> int:
        if self._in_pci_cfg_data(offset, size):
            # pci_cfg_data holds the window's bytes; the access may read any part of it.
            window = self._pci_cfg_window()
            value = self.bar_read(BAR_INDEX, *window) if window else 0
            shift = 8 * (offset - self._pci_cfg_cap - 16)
            return (value >> shift) & ((1 << (8 * size)) - 1)
        value = self.config.read(offset, size)
        if self._intx_asserted and offset <= STATUS < offset + size:
            # Computed here rather than stored, so worker threads never write config space.
            value |= Status.INTERRUPT << (8 * (STATUS - offset))
        return value

    def config_write(self, offset: int, size: int, value: int) -> None:
        if self._in_pci_cfg_data(offset, size):
            window = self._pci_cfg_window()
            # A write reaches the BAR only when it covers the window from its first byte.
            if window and offset == self._pci_cfg_cap + 16 and size >= window[1]:
                bar_offset, length = window
                self.bar_write(BAR_INDEX, bar_offset, length, value & ((1 << (8 * length)) - 1))
            return
        msix_was_enabled = self.msix.enabled
        self.config.write(offset, size, value)
        self.msix.config_written(self.config, offset, size)
        if self.msix.enabled != msix_was_enabled and self._status & DeviceStatus.DRIVER_OK:
            self.device.interrupt_routes_changed()

    def _pci_cfg_window(self) -> tuple[int, int] | None:
        cap = self._pci_cfg_cap
        bar = self.config.read(cap + 4, 1)
        offset = self.config.read(cap + 8, 4)
        length = self.config.read(cap + 12, 4)
        if bar != BAR_INDEX or length not in (1, 2, 4) or offset % length or offset + length > BAR_SIZE:
            return None
        return offset, length

    # --- BAR 0 --------------------------------------------------------------------------------
    def bar_read(self, index: int, offset: int, size: int) -> int:
        if index != BAR_INDEX:
            return (1 << (8 * size)) - 1
        if offset < COMMON_CFG_OFFSET + COMMON_CFG_SIZE:
            with self._lock:
                return self._read_common(offset, size)
        if ISR_CFG_OFFSET <= offset < ISR_CFG_OFFSET + ISR_CFG_SIZE:
            return self._read_isr()
        if DEVICE_CFG_OFFSET <= offset < DEVICE_CFG_OFFSET + DEVICE_CFG_MAX_SIZE:
            return self.device.read_config(offset - DEVICE_CFG_OFFSET, size)
        if MSIX_TABLE_OFFSET <= offset < MSIX_TABLE_OFFSET + self.msix.table_size:
            return self.msix.read_table(offset - MSIX_TABLE_OFFSET, size)
        if MSIX_PBA_OFFSET <= offset < MSIX_PBA_OFFSET + self.msix.pba_size:
            return self.msix.read_pba(offset - MSIX_PBA_OFFSET, size)
        return 0

    def bar_write(self, index: int, offset: int, size: int, value: int) -> None:
        if index != BAR_INDEX:
            return
        if offset < COMMON_CFG_OFFSET + COMMON_CFG_SIZE:
            with self._lock:
                self._write_common(offset, size, value)
        elif DEVICE_CFG_OFFSET <= offset < DEVICE_CFG_OFFSET + DEVICE_CFG_MAX_SIZE:
            self.device.write_config(offset - DEVICE_CFG_OFFSET, size, value)
        elif NOTIFY_CFG_OFFSET <= offset < NOTIFY_CFG_OFFSET + NOTIFY_OFF_MULTIPLIER * len(self._queues):
            self._notify(offset - NOTIFY_CFG_OFFSET)
        elif MSIX_TABLE_OFFSET <= offset < MSIX_TABLE_OFFSET + self.msix.table_size:
            self.msix.write_table(offset - MSIX_TABLE_OFFSET, size, value)

    def _notify(self, offset: int) -> None:
        """The MMIO path of a queue notification (no ioeventfd caught it)."""
        index, rest = divmod(offset, NOTIFY_OFF_MULTIPLIER)
        if not rest and index < len(self._kick_fds):
            os.eventfd_write(self._kick_fds[index], 1)

    # --- common configuration -----------------------------------------------------------------
    def _selected_queue(self) -> _QueueRegisters | None:
        return self._queues[self._queue_select] if self._queue_select < len(self._queues) else None

    def _read_common(self, offset: int, size: int) -> int:
        q = self._selected_queue()
        match offset, size:
            case CommonCfg.DEVICE_FEATURE_SELECT, 4:
                return self._device_feature_select
            case CommonCfg.DEVICE_FEATURE, 4:
                return _feature_word(self.device.avail_features, self._device_feature_select)
            case CommonCfg.DRIVER_FEATURE_SELECT, 4:
                return self._driver_feature_select
            case CommonCfg.DRIVER_FEATURE, 4:
                return _feature_word(self._driver_features, self._driver_feature_select)
            case CommonCfg.CONFIG_MSIX_VECTOR, 2:
                return self._config_vector
            case CommonCfg.NUM_QUEUES, 2:
                return len(self._queues)
            case CommonCfg.DEVICE_STATUS, 1:
                return self.status
            case CommonCfg.CONFIG_GENERATION, 1:
                return self.device.config_generation & 0xFF
            case CommonCfg.QUEUE_SELECT, 2:
                return self._queue_select
            case CommonCfg.QUEUE_SIZE, 2:
                return q.size if q else 0
            case CommonCfg.QUEUE_MSIX_VECTOR, 2:
                return q.msix_vector if q else VIRTIO_MSI_NO_VECTOR
            case CommonCfg.QUEUE_ENABLE, 2:
                return int(q.enabled) if q else 0
            case CommonCfg.QUEUE_NOTIFY_OFF, 2:
                return self._queue_select if q else 0
        field, shift = _address_field(offset, size)
        if field is not None:
            return (getattr(q, field) >> shift) & ((1 << (8 * size)) - 1) if q else 0
        log.debug("%s: unsupported common config read %#x/%d", self.device.name, offset, size)
        return 0

    def _write_common(self, offset: int, size: int, value: int) -> None:
        q = self._selected_queue()
        match offset, size:
            case CommonCfg.DEVICE_FEATURE_SELECT, 4:
                self._device_feature_select = value
            case CommonCfg.DRIVER_FEATURE_SELECT, 4:
                self._driver_feature_select = value
            case CommonCfg.DRIVER_FEATURE, 4:
                if self._status & DeviceStatus.FEATURES_OK or self._driver_feature_select > 1:
                    return                     # features are frozen once FEATURES_OK is set
                shift = 32 * self._driver_feature_select
                self._driver_features = (self._driver_features & ~(0xFFFF_FFFF << shift)) | (value << shift)
            case CommonCfg.CONFIG_MSIX_VECTOR, 2:
                self._config_vector = self._valid_vector(value)
            case CommonCfg.DEVICE_STATUS, 1:
                self._write_status(value)
            case CommonCfg.QUEUE_SELECT, 2:
                self._queue_select = value
            case CommonCfg.QUEUE_SIZE, 2 if q and not q.enabled:
                q.size = value
            case CommonCfg.QUEUE_MSIX_VECTOR, 2 if q:
                q.msix_vector = self._valid_vector(value)
                if self._status & DeviceStatus.DRIVER_OK:
                    self.device.interrupt_routes_changed()
            case CommonCfg.QUEUE_ENABLE, 2 if q:
                if value == 1 and not self._status & DeviceStatus.DRIVER_OK:
                    q.enabled = True
            case _:
                field, shift = _address_field(offset, size)
                if field is None:
                    log.debug("%s: ignoring common config write %#x/%d", self.device.name, offset, size)
                elif q and not q.enabled:
                    mask = ((1 << (8 * size)) - 1) << shift
                    setattr(q, field, (getattr(q, field) & ~mask) | (value << shift & mask))

    def _valid_vector(self, vector: int) -> int:
        """The vector if the table has it; else NO_VECTOR, which the driver reads back as
        the spec's "mapping failed"."""
        return vector if vector < self.msix.num_vectors else VIRTIO_MSI_NO_VECTOR

    # --- device status ------------------------------------------------------------------------
    @property
    def status(self) -> int:
        return self._status | (DeviceStatus.DEVICE_NEEDS_RESET if self._needs_reset else 0)

    def _write_status(self, value: int) -> None:
        if value == 0:
            self._reset_device()
            return
        old = self._status
        if old & ~value:
            _guest_log.warning("%s: driver cleared status bits %#x without a reset; ignored",
                               self.device.name, old & ~value)
            return
        added = value & ~old
        if added & DeviceStatus.FEATURES_OK and not self._accept_features():
            value &= ~DeviceStatus.FEATURES_OK
        if added & DeviceStatus.DRIVER_OK:
            if not value & DeviceStatus.FEATURES_OK:
                _guest_log.warning("%s: DRIVER_OK before FEATURES_OK; ignored", self.device.name)
                value &= ~DeviceStatus.DRIVER_OK
            else:
                self._status = value
                self._activate()
                return
        self._status = value

    def _accept_features(self) -> bool:
        features, offered = self._driver_features, self.device.avail_features
        if features & ~offered:
            _guest_log.warning("%s: driver accepted features %#x that were not offered",
                               self.device.name, features & ~offered)
            return False
        if not features & VIRTIO_F_VERSION_1:
            _guest_log.warning("%s: driver did not accept VIRTIO_F_VERSION_1 (legacy drivers "
                               "are not supported)", self.device.name)
            return False
        self.device.ack_features(features)
        return True

    def _activate(self, *, restoring: bool = False) -> None:
        device = self.device
        queues: list[ActiveQueue] = []
        try:
            for index, regs in enumerate(self._queues):
                if not regs.enabled:
                    continue
                if regs.size > regs.max_size:
                    raise ActivationError(f"queue {index}: size {regs.size} > {regs.max_size}")
                queue = Virtqueue(self._mem, regs.size, regs.desc, regs.driver, regs.device,
                                  event_idx=device.has_feature(VIRTIO_F_EVENT_IDX),
                                  indirect_desc=device.has_feature(VIRTIO_F_INDIRECT_DESC),
                                  name=f"{device.name}-q{index}")
                if restoring:
                    queue.resume_from_ring()
                queues.append(ActiveQueue(index, queue, self._kick_fds[index]))
            device.activate(self._mem, queues, self)
        except (ActivationError, VirtqueueError) as e:
            for q in queues:
                q.queue.close()
            _guest_log.warning("%s: cannot activate: %s", device.name, e)
            self.needs_reset()

    def _reset_device(self) -> None:
        self.device.reset()
        for fd in self._kick_fds:
            drain_eventfd(fd)
        self._reset_registers()
        with self._isr_lock:
            self._isr = 0
            self._set_intx(False)

    def _reset_registers(self) -> None:
        self._status = 0
        self._needs_reset = False
        self._device_feature_select = 0
        self._driver_feature_select = 0
        self._driver_features = 0
        self._config_vector = VIRTIO_MSI_NO_VECTOR
        self._queue_select = 0
        for q in self._queues:
            q.reset()

    # --- snapshot ------------------------------------------------------------------------------
    _STATE = ("_status", "_needs_reset", "_device_feature_select", "_driver_feature_select",
              "_driver_features", "_config_vector", "_queue_select", "_queues", "_isr",
              "_intx_asserted")

    def save_state(self) -> dict:
        """Config space (BARs, command, MSI-X control), the MSI-X table, the common
        configuration (status, features, queue sizes, vectors and addresses), the queues'
        positions and the device's own state. Taken with the VM paused."""
        with self._lock:
            with self._isr_lock:
                saved = snap.save(self, self._STATE)
            saved["config"] = self.config.save_state()
            saved["msix"] = self.msix.save_state()
            saved["positions"] = {q.index: q.queue.save_state() for q in self.device.queues.values()}
            saved["device"] = self.device.save_state()
        return saved

    def restore_state(self, saved: dict) -> None:
        """Put the device back as saved, on a new VM before it runs: config space and MSI-X
        routes first, then the registers; a device the driver had started (DRIVER_OK) is
        activated on its queues, which carry on from the used rings in guest memory (see
        :meth:`Virtqueue.resume_from_ring`), and each queue is checked once for requests
        the driver posted just before the snapshot. BAR mappings follow from config space
        (the PCI bus re-maps them, :meth:`PciBus.restore_bars`)."""
        with self._lock:
            self.config.restore_state(saved["config"])
            self.msix.restore_state(saved["msix"], self.config)
            with self._isr_lock:
                snap.load(self, self._STATE, saved)
                if self.intx is not None and self._intx_asserted:
                    self.intx.set_level(True)
            self.device.restore_state(saved["device"])
            if not self._status & DeviceStatus.DRIVER_OK or self._needs_reset:
                if self._status & DeviceStatus.FEATURES_OK:
                    self.device.ack_features(self._driver_features)
                return
            self.device.ack_features(self._driver_features)
            self._activate(restoring=True)
            for active in self.device.queues.values():
                os.eventfd_write(active.kick_fd, 1)

    # --- VirtioInterrupt (called from the device's worker thread) ------------------------------
    def notify_queue(self, index: int) -> None:
        self._signal(ISR_QUEUE, self._queues[index].msix_vector)

    def notify_config(self) -> None:
        self._signal(ISR_CONFIG, self._config_vector)

    def needs_reset(self) -> None:
        self._needs_reset = True
        self.notify_config()

    def queue_irqfd(self, index: int) -> int | None:
        """An eventfd whose every write interrupts the driver for queue ``index`` with no
        pych code involved: the KVM irqfd of the MSI-X vector the queue is mapped to. None
        while MSI-X is off or the queue has no vector (or the vector no irqfd): interrupts
        then need :meth:`notify_queue`. For a back-end outside pych serving the queue
        (vhost-user); as with the reference, the vector's mask bit does not hold its writes
        back. The device hears of changes through ``interrupt_routes_changed``."""
        vector = self._queues[index].msix_vector
        if not self.msix.enabled or vector == VIRTIO_MSI_NO_VECTOR:
            return None
        return getattr(self._msi_group.vectors[vector], "fd", None)

    def queue_vector(self, index: int) -> int:
        """The MSI-X vector queue ``index`` is mapped to (whose irqfd :meth:`queue_irqfd`
        gives)."""
        return self._queues[index].msix_vector

    def detach_irqfds(self, vectors) -> None:
        """A local live migration hands these MSI-X vectors' irqfd eventfds to the receiver
        (a vhost-user back-end writes them): unregister them from this VM, keeping the
        routes (one VM at a time may have an eventfd as its irqfd)."""
        for vector in vectors:
            detach = getattr(self._msi_group.vectors[vector], "detach_irqfd", None)
            if detach is not None:
                detach()

    def attach_irqfds(self, vectors) -> None:
        """The migration failed: register the irqfds :meth:`detach_irqfds` let go again."""
        for vector in vectors:
            attach = getattr(self._msi_group.vectors[vector], "attach_irqfd", None)
            if attach is not None:
                attach()

    def adopt_notifiers(self, kicks: dict[int, int], vectors: dict[int, int]) -> None:
        """A local live migration's receiver: the sender's eventfds a vhost-user back-end
        keeps using become this transport's: ``kicks`` (queue -> fd) its queues' notify
        eventfds (registered as their ioeventfds), ``vectors`` (MSI-X vector -> fd) the
        irqfds of those vectors. Called before the state is restored; the fds are the
        transport's from now on (closed with it)."""
        with self._lock:
            for index, fd in kicks.items():
                if not 0 <= index < len(self._kick_fds):
                    raise ValueError(f"{self.device.name}: no queue {index}")
            for vector in vectors:
                if not 0 <= vector < len(self._msi_group.vectors):
                    raise ValueError(f"{self.device.name}: no MSI-X vector {vector}")
            registered = bool(self._ioevent_addresses)
            bar = self.config.bar_address(BAR_INDEX) if registered else None
            if registered:
                self._unregister_ioevents()
            for index, fd in kicks.items():
                os.close(self._kick_fds[index])
                self._kick_fds[index] = fd
            if bar is not None:
                self._register_ioevents(bar)
            for vector, fd in vectors.items():
                self._msi_group.vectors[vector].adopt_fd(fd)

    def _signal(self, isr_bit: int, vector: int) -> None:
        if self.msix.enabled:
            if vector != VIRTIO_MSI_NO_VECTOR:
                self.msix.trigger(vector)
            return
        with self._isr_lock:
            self._isr |= isr_bit
            self._set_intx(True)

    def _read_isr(self) -> int:
        with self._isr_lock:
            value, self._isr = self._isr, 0
            self._set_intx(False)
        return value

    def _set_intx(self, level: bool) -> None:
        """Drive INTA# (with ``_isr_lock`` held)."""
        if level and self.config.command & Command.INTX_DISABLE:
            return
        if level != self._intx_asserted:
            self._intx_asserted = level
            if self.intx is not None:
                self.intx.set_level(level)

    # --- BAR relocation and removal -------------------------------------------------------------
    def bar_moved(self, index: int, old: int | None, new: int | None) -> None:
        if index != BAR_INDEX or self._ioevents is None:
            return
        with self._lock:
            self._unregister_ioevents()
            if new is not None:
                self._register_ioevents(new)

    def _register_ioevents(self, bar_address: int) -> None:
        for index, fd in enumerate(self._kick_fds):
            address = bar_address + NOTIFY_CFG_OFFSET + NOTIFY_OFF_MULTIPLIER * index
            try:
                self._ioevents.register_ioeventfd(fd, address, NOTIFY_IOEVENT_LENGTH, None)
            except Exception as e:              # the registrar's error type is its own
                log.warning("%s: no ioeventfd for queue %d at %#x (%s); notifications take "
                            "the MMIO exit path", self.device.name, index, address, e)
                continue
            self._ioevent_addresses.append((fd, address))

    def _unregister_ioevents(self) -> None:
        for fd, address in self._ioevent_addresses:
            try:
                self._ioevents.unregister_ioeventfd(fd, address, NOTIFY_IOEVENT_LENGTH, None)
            except Exception as e:
                log.warning("%s: cannot unregister ioeventfd at %#x: %s", self.device.name, address, e)
        self._ioevent_addresses.clear()

    def shutdown(self) -> None:
        """Stop the device and release everything: call after removal from the bus."""
        self.device.shutdown()
        with self._lock:
            if self._ioevents is not None:
                self._unregister_ioevents()
            for fd in self._kick_fds:
                os.close(fd)
            self._kick_fds = []
        self._msi_group.release()


def _feature_word(features: int, select: int) -> int:
    return (features >> (32 * select)) & 0xFFFF_FFFF if select < 2 else 0


def _address_field(offset: int, size: int) -> tuple[str | None, int]:
    """Which queue address a 64-bit access or 32-bit half-access hits: (field, shift)."""
    for base, field in ((CommonCfg.QUEUE_DESC, "desc"), (CommonCfg.QUEUE_DRIVER, "driver"),
                        (CommonCfg.QUEUE_DEVICE, "device")):
        if (offset, size) == (base, 8):
            return field, 0
        if size == 4 and offset in (base, base + 4):
            return field, 8 * (offset - base)
    return None, 0
