"""virtio 1.x: split virtqueues, the device model, the modern PCI transport and devices.

* :mod:`.queue`: :class:`Virtqueue` and the guest-error taxonomy :class:`QueueError`;
* :mod:`.device`: :class:`VirtioDevice` (worker thread, lifecycle), feature and status bits;
* :mod:`.pci_transport`: :class:`VirtioPciDevice`;
* :mod:`.balloon`, :mod:`.block`, :mod:`.console`, :mod:`.fs`, :mod:`.mem`, :mod:`.net`,
  :mod:`.pmem`, :mod:`.rng`, :mod:`.vsock`: the devices.
"""

from .block import DiskError, DiskLockError, VirtioBlock
from .console import VirtioConsole
from .device import (ActivationError, ActiveQueue, DeviceStatus, VirtioDevice, VirtioDeviceType,
                     VirtioInterrupt)
from .pci_transport import VirtioPciDevice
from .queue import DescriptorChain, QueueError, Virtqueue, VirtqueueError
from .rng import VirtioRng

__all__ = [
    "ActivationError", "ActiveQueue", "DescriptorChain", "DeviceStatus", "DiskError",
    "DiskLockError", "QueueError", "VirtioBlock", "VirtioConsole", "VirtioDevice",
    "VirtioDeviceType", "VirtioInterrupt", "VirtioPciDevice", "VirtioRng", "Virtqueue",
    "VirtqueueError",
]
