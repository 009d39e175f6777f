"""VFIO ABI: ioctl numbers, constants and ctypes structures (from <linux/vfio.h>).

Unlike KVM's, VFIO's ioctls are ``_IO(';', 100 + n)``: no size is encoded in the request
number; every structure starts with ``argsz``, which the caller sets to the size it
passes. ``tests/unit/devices/vfio/test_vfio.py`` checks each structure's size against the kernel's
(``KERNEL_STRUCT_SIZES``) and each request number against the header's value.
"""

from __future__ import annotations

import ctypes
from ctypes import c_uint32, c_uint64

VFIO_TYPE = ord(";")
VFIO_BASE = 100


def _IO(nr: int) -> int:
    """``_IO(VFIO_TYPE, VFIO_BASE + nr)``: direction none, size 0."""
    return (VFIO_TYPE << 8) | (VFIO_BASE + nr)


VFIO_API_VERSION = 0
VFIO_TYPE1v2_IOMMU = 3

# /dev/vfio/vfio (the container)
VFIO_GET_API_VERSION = _IO(0)
VFIO_CHECK_EXTENSION = _IO(1)
VFIO_SET_IOMMU = _IO(2)
# /dev/vfio/<group>
VFIO_GROUP_GET_STATUS = _IO(3)
VFIO_GROUP_SET_CONTAINER = _IO(4)
VFIO_GROUP_UNSET_CONTAINER = _IO(5)
VFIO_GROUP_GET_DEVICE_FD = _IO(6)
# the device fd
VFIO_DEVICE_GET_INFO = _IO(7)
VFIO_DEVICE_GET_REGION_INFO = _IO(8)
VFIO_DEVICE_GET_IRQ_INFO = _IO(9)
VFIO_DEVICE_SET_IRQS = _IO(10)
VFIO_DEVICE_RESET = _IO(11)
# the container, once an IOMMU is set
VFIO_IOMMU_MAP_DMA = _IO(13)
VFIO_IOMMU_UNMAP_DMA = _IO(14)

VFIO_GROUP_FLAGS_VIABLE = 1 << 0

VFIO_DEVICE_FLAGS_RESET = 1 << 0
VFIO_DEVICE_FLAGS_PCI = 1 << 1

VFIO_REGION_INFO_FLAG_READ = 1 << 0
VFIO_REGION_INFO_FLAG_WRITE = 1 << 1
VFIO_REGION_INFO_FLAG_MMAP = 1 << 2

VFIO_IRQ_INFO_EVENTFD = 1 << 0

VFIO_IRQ_SET_DATA_NONE = 1 << 0
VFIO_IRQ_SET_DATA_EVENTFD = 1 << 2
VFIO_IRQ_SET_ACTION_TRIGGER = 1 << 5

VFIO_DMA_MAP_FLAG_READ = 1 << 0
VFIO_DMA_MAP_FLAG_WRITE = 1 << 1

# vfio-pci's fixed region and IRQ indexes
VFIO_PCI_CONFIG_REGION_INDEX = 7
VFIO_PCI_NUM_REGIONS = 9
VFIO_PCI_MSIX_IRQ_INDEX = 2


class Struct(ctypes.Structure):
    """A VFIO argument structure; ``new()`` sets ``argsz`` to the structure's size."""

    @classmethod
    def new(cls, **fields):
        return cls(argsz=ctypes.sizeof(cls), **fields)


class vfio_group_status(Struct):
    _fields_ = [("argsz", c_uint32), ("flags", c_uint32)]


class vfio_device_info(Struct):
    _fields_ = [("argsz", c_uint32), ("flags", c_uint32), ("num_regions", c_uint32),
                ("num_irqs", c_uint32), ("cap_offset", c_uint32)]


class vfio_region_info(Struct):
    _fields_ = [("argsz", c_uint32), ("flags", c_uint32), ("index", c_uint32),
                ("cap_offset", c_uint32), ("size", c_uint64), ("offset", c_uint64)]


class vfio_irq_info(Struct):
    _fields_ = [("argsz", c_uint32), ("flags", c_uint32), ("index", c_uint32),
                ("count", c_uint32)]


class vfio_irq_set(Struct):
    """The header; ``data[]`` (here: one s32 eventfd per IRQ) follows it."""
    _fields_ = [("argsz", c_uint32), ("flags", c_uint32), ("index", c_uint32),
                ("start", c_uint32), ("count", c_uint32)]


class vfio_iommu_type1_dma_map(Struct):
    _fields_ = [("argsz", c_uint32), ("flags", c_uint32), ("vaddr", c_uint64),
                ("iova", c_uint64), ("size", c_uint64)]


class vfio_iommu_type1_dma_unmap(Struct):
    _fields_ = [("argsz", c_uint32), ("flags", c_uint32), ("iova", c_uint64),
                ("size", c_uint64)]


#: ``sizeof`` of each structure as the kernel's header defines it (gcc, x86_64).
KERNEL_STRUCT_SIZES: dict[type, int] = {
    vfio_group_status: 8,
    vfio_device_info: 20,
    vfio_region_info: 32,
    vfio_irq_info: 16,
    vfio_irq_set: 20,
    vfio_iommu_type1_dma_map: 32,
    vfio_iommu_type1_dma_unmap: 24,
}

#: Request numbers as computed here and as the header's macros expand (gcc, x86_64).
KNOWN_REQUEST_VALUES: dict[str, tuple[int, int]] = {
    name: (globals()[name], value) for name, value in {
        "VFIO_GET_API_VERSION": 0x3B64, "VFIO_CHECK_EXTENSION": 0x3B65,
        "VFIO_SET_IOMMU": 0x3B66, "VFIO_GROUP_GET_STATUS": 0x3B67,
        "VFIO_GROUP_SET_CONTAINER": 0x3B68, "VFIO_GROUP_UNSET_CONTAINER": 0x3B69,
        "VFIO_GROUP_GET_DEVICE_FD": 0x3B6A, "VFIO_DEVICE_GET_INFO": 0x3B6B,
        "VFIO_DEVICE_GET_REGION_INFO": 0x3B6C, "VFIO_DEVICE_GET_IRQ_INFO": 0x3B6D,
        "VFIO_DEVICE_SET_IRQS": 0x3B6E, "VFIO_DEVICE_RESET": 0x3B6F,
        "VFIO_IOMMU_MAP_DMA": 0x3B71, "VFIO_IOMMU_UNMAP_DMA": 0x3B72,
    }.items()
}
