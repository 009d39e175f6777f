"""VFIO PCI passthrough: host PCI devices bound to vfio-pci given to the guest (docs/vfio.md)."""

from .container import VfioContainer, VfioError, VfioUnavailable
from .device import VfioPciDevice
from .kernel import HostVfioKernel, VfioKernel

__all__ = ["HostVfioKernel", "VfioContainer", "VfioError", "VfioKernel", "VfioPciDevice",
           "VfioUnavailable"]
