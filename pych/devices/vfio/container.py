"""VFIO containers and groups (the type1 IOMMU interface), and finding a device's group.

A host PCI device bound to ``vfio-pci`` belongs to an IOMMU group, ``/dev/vfio/<group>``.
The group is attached to a container (``/dev/vfio/vfio``); the first attached group lets
the container select the type1 (v2) IOMMU, and from then on the container's DMA map is
the device's view of memory: pych maps all guest RAM at its guest physical addresses
(IOVA = GPA), every DIMM plugged later and each virtio-mem block the guest plugs, and
unmaps a DIMM before it is freed and a virtio-mem block before its memory is discarded
(the type1 IOMMU pins what is mapped: memory given back to the host must be unmapped
first). One container serves every VFIO device of a VM; a group is attached once however
many of its devices are used and detached with the last of them. When the last group
leaves, the kernel drops the IOMMU and its mappings: the container starts over with the
next group.
"""

from __future__ import annotations

import errno
import logging
import os
import threading
from collections.abc import Callable, Iterable
from pathlib import Path

from pych.memory.guest_memory import GuestMemory

from . import bindings as b
from .kernel import VfioKernel

log = logging.getLogger(__name__)

DEV_VFIO = "/dev/vfio"


class VfioError(Exception):
    """A VFIO operation failed on a device that is set up for VFIO (a host or VMM problem)."""


class VfioUnavailable(VfioError):
    """The request cannot work on this host: the path is not a PCI device, the device is not
    bound to vfio-pci, or the host has no VFIO / IOMMU. One line, saying what to fix."""


def pci_device_dir(path: str) -> Path:
    """The sysfs directory of the PCI device ``path`` (``/sys/bus/pci/devices/<bdf>/``)."""
    sysfs = Path(path)
    if not (sysfs / "config").is_file() or not (sysfs / "vendor").is_file():
        raise VfioUnavailable(f"VFIO device path {path} is not a PCI device in sysfs "
                              "(expected /sys/bus/pci/devices/<domain:bus:slot.function>/)")
    return sysfs.resolve()


def vfio_group_of(sysfs: Path) -> int:
    """The IOMMU group of the PCI device at ``sysfs``, which must be bound to vfio-pci."""
    driver = sysfs / "driver"
    if not driver.exists():
        raise VfioUnavailable(f"PCI device {sysfs.name} is not bound to any driver: "
                              "bind it to vfio-pci")
    if driver.resolve().name != "vfio-pci":
        raise VfioUnavailable(f"PCI device {sysfs.name} is bound to {driver.resolve().name}, "
                              "not vfio-pci: unbind it and bind it to vfio-pci")
    group = sysfs / "iommu_group"
    if not group.exists():
        raise VfioUnavailable(f"PCI device {sysfs.name} has no IOMMU group: enable the "
                              "IOMMU (intel_iommu=on / amd_iommu=on)")
    return int(group.resolve().name)


class VfioGroup:
    """An open ``/dev/vfio/<id>`` attached to the container."""

    def __init__(self, kernel: VfioKernel, group_id: int, fd: int) -> None:
        self.kernel = kernel
        self.id = group_id
        self.fd = fd
        self.users = 0

    def device_fd(self, name: str) -> int:
        """The device fd of ``name`` (``DDDD:BB:DD.F``), a member of this group."""
        try:
            return self.kernel.ioctl(self.fd, b.VFIO_GROUP_GET_DEVICE_FD,
                                     bytearray(name.encode() + b"\0"))
        except OSError as e:
            raise VfioError(f"VFIO group {self.id}: cannot open device {name}: "
                            f"{os.strerror(e.errno) if e.errno else e}") from None


class VfioContainer:
    """``/dev/vfio/vfio`` with the type1 IOMMU: the groups in use and the DMA map of guest
    memory. Opened on first use; the device manager closes it with the VM.

    ``ram`` says what guest memory may be DMA-mapped at any moment (ranges with ``gpa``,
    ``size``, ``host_addr`` and ``name``); it defaults to every region of ``mem``. The memory
    manager's answer leaves out the unplugged parts of virtio-mem regions. Changes arrive
    through :meth:`region_added` and :meth:`region_removed`, from the VMM thread, vCPU
    threads (a DIMM ejected) and virtio-mem's worker (blocks plugged and unplugged): one
    lock serialises them with attaching and releasing groups, and mapping what is mapped
    already, or unmapping what is not, does nothing (a change may race the first mapping).
    """

    def __init__(self, kernel: VfioKernel, mem: GuestMemory, dev_vfio: str = DEV_VFIO, *,
                 ram: Callable[[], Iterable] | None = None) -> None:
        self.kernel = kernel
        self.mem = mem
        self.dev_vfio = dev_vfio
        self.fd: int | None = None
        self._ram = ram or (lambda: mem.regions)
        self._groups: dict[int, VfioGroup] = {}
        self._mapped: dict[int, int] = {}          # iova -> size
        self._lock = threading.RLock()

    @property
    def dma_mappings(self) -> dict[int, int]:
        return dict(self._mapped)

    def open(self) -> None:
        """Open the container once; :class:`VfioUnavailable` on a host without VFIO."""
        if self.fd is not None:
            return
        path = f"{self.dev_vfio}/vfio"
        try:
            fd = self.kernel.open(path)
        except FileNotFoundError:
            raise VfioUnavailable(f"VFIO is not available on this host: {path} does not exist "
                                  "(it needs an IOMMU and the vfio-pci module)") from None
        except OSError as e:
            raise VfioUnavailable(f"cannot open {path}: {os.strerror(e.errno)}") from None
        try:
            version = self.kernel.ioctl(fd, b.VFIO_GET_API_VERSION)
            if version != b.VFIO_API_VERSION:
                raise VfioError(f"{path}: VFIO API version {version}, pych speaks "
                                f"{b.VFIO_API_VERSION}")
            if not self.kernel.ioctl(fd, b.VFIO_CHECK_EXTENSION, b.VFIO_TYPE1v2_IOMMU):
                raise VfioUnavailable(f"{path}: the host does not offer the type1v2 IOMMU")
        except OSError as e:
            self.kernel.close(fd)
            raise VfioError(f"{path}: {os.strerror(e.errno)}") from None
        except VfioError:
            self.kernel.close(fd)
            raise
        self.fd = fd

    def attach_group(self, group_id: int) -> VfioGroup:
        """The group, attached (the first group also sets the IOMMU and maps guest RAM);
        each call must be matched by :meth:`release_group`."""
        with self._lock:
            group = self._groups.get(group_id)
            if group is None:
                group = self._attach(group_id)
            group.users += 1
            return group

    def _attach(self, group_id: int) -> VfioGroup:
        path = f"{self.dev_vfio}/{group_id}"
        try:
            fd = self.kernel.open(path)
        except OSError as e:
            hint = " (is it used by another process?)" if e.errno == errno.EBUSY else ""
            raise VfioUnavailable(f"cannot open VFIO group {path}: "
                                  f"{os.strerror(e.errno)}{hint}") from None
        group = VfioGroup(self.kernel, group_id, fd)
        try:
            status = b.vfio_group_status.new()
            buf = bytearray(status)
            self.kernel.ioctl(fd, b.VFIO_GROUP_GET_STATUS, buf)
            if not b.vfio_group_status.from_buffer(buf).flags & b.VFIO_GROUP_FLAGS_VIABLE:
                raise VfioUnavailable(f"VFIO group {group_id} is not viable: bind every device "
                                      "of the group to vfio-pci (or unbind it)")
            self.kernel.ioctl(fd, b.VFIO_GROUP_SET_CONTAINER, bytearray(self.fd.to_bytes(4, "little")))
            if not self._groups:
                try:
                    self.kernel.ioctl(self.fd, b.VFIO_SET_IOMMU, b.VFIO_TYPE1v2_IOMMU)
                    for region in self._ram():
                        self.map_region(region)
                except BaseException:
                    self._unmap_all()
                    self.kernel.ioctl(fd, b.VFIO_GROUP_UNSET_CONTAINER)
                    raise
        except OSError as e:
            self.kernel.close(fd)
            raise VfioError(f"VFIO group {group_id}: {os.strerror(e.errno)}") from None
        except BaseException:
            self.kernel.close(fd)
            raise
        self._groups[group_id] = group
        log.info("VFIO group %d attached", group_id)
        return group

    def release_group(self, group: VfioGroup) -> None:
        with self._lock:
            group.users -= 1
            if group.users:
                return
            del self._groups[group.id]
            if not self._groups:
                self._unmap_all()
            try:
                self.kernel.ioctl(group.fd, b.VFIO_GROUP_UNSET_CONTAINER)
            except OSError as e:
                log.warning("VFIO group %d: unset container: %s", group.id,
                            os.strerror(e.errno))
            self.kernel.close(group.fd)
        log.info("VFIO group %d released", group.id)

    # --- DMA --------------------------------------------------------------------------------
    def map_region(self, region) -> None:
        """Let devices DMA to ``region`` at its guest physical address (nothing to do if it
        is mapped already). Raises ``OSError`` as the kernel answered."""
        with self._lock:
            if self._mapped.get(region.gpa) == region.size:
                return
            dma_map = b.vfio_iommu_type1_dma_map.new(
                flags=b.VFIO_DMA_MAP_FLAG_READ | b.VFIO_DMA_MAP_FLAG_WRITE,
                vaddr=region.host_addr, iova=region.gpa, size=region.size)
            self.kernel.ioctl(self.fd, b.VFIO_IOMMU_MAP_DMA, bytearray(dma_map))
            self._mapped[region.gpa] = region.size

    def region_added(self, region) -> None:
        """Guest RAM grew (a DIMM, a virtio-mem block): map it while any device can DMA."""
        with self._lock:
            if not self._groups:
                return
            try:
                self.map_region(region)
            except OSError as e:
                raise VfioError(f"VFIO: cannot DMA-map {region.name} at {region.gpa:#x}: "
                                f"{os.strerror(e.errno)}") from None

    def region_removed(self, region) -> None:
        """Guest RAM is about to go (a DIMM ejected, a virtio-mem block unplugged): unmap
        every mapping inside ``[gpa, gpa + size)``, so the IOMMU no longer pins it. A
        mapping only partly inside is left alone (and reported): the type1 IOMMU cannot
        unmap part of a mapping, and pych never maps across what can go alone."""
        start, end = region.gpa, region.gpa + region.size
        with self._lock:
            for iova, size in sorted(self._mapped.items()):
                if iova >= end or iova + size <= start:
                    continue
                if iova < start or iova + size > end:
                    raise VfioError(f"VFIO: {region.name} ({start:#x}-{end:#x}) covers only "
                                    f"part of the DMA mapping {iova:#x}+{size:#x}")
                self._unmap(iova, size)

    def _unmap(self, iova: int, size: int) -> None:
        unmap = b.vfio_iommu_type1_dma_unmap.new(iova=iova, size=size)
        try:
            self.kernel.ioctl(self.fd, b.VFIO_IOMMU_UNMAP_DMA, bytearray(unmap))
        except OSError as e:
            log.warning("VFIO: unmap %#x+%#x: %s", iova, size, os.strerror(e.errno))
        del self._mapped[iova]

    def _unmap_all(self) -> None:
        for iova, size in list(self._mapped.items()):
            self._unmap(iova, size)

    def close(self) -> None:
        with self._lock:
            for group in list(self._groups.values()):
                group.users = 1
                self.release_group(group)
            if self.fd is not None:
                self.kernel.close(self.fd)
                self.fd = None
