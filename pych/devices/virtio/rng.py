"""virtio-rng (virtio 1.x §5.4): fills the driver's buffers from a host entropy source.

``os.readv`` reads the source straight into guest memory views.
"""

from __future__ import annotations

import os

IOV_MAX = os.sysconf("SC_IOV_MAX")

from .device import VirtioDevice, VirtioDeviceType
from .queue import DescriptorChain

DEFAULT_SOURCE = "/dev/urandom"


class VirtioRng(VirtioDevice):
    device_type = VirtioDeviceType.RNG

    def __init__(self, source: str | os.PathLike = DEFAULT_SOURCE, *, queue_size: int = 256,
                 name: str = "rng") -> None:
        super().__init__(name=name, queue_sizes=[queue_size])
        self.source = os.fspath(source)
        self._fd = os.open(self.source, os.O_RDONLY | os.O_CLOEXEC)

    def handle_chain(self, index: int, chain: DescriptorChain) -> int:
        views = chain.writable_views()
        filled = 0
        while views:
            try:
                n = os.readv(self._fd, views[:IOV_MAX])
            except InterruptedError:
                continue
            if n == 0:                        # a finite source ran dry: return what we have
                break
            filled += n
            while views and n >= len(views[0]):
                n -= len(views.pop(0))
            if n:
                views[0] = views[0][n:]
        return filled

    def close_backend(self) -> None:
        if self._fd >= 0:
            os.close(self._fd)
            self._fd = -1
