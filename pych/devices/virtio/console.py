"""virtio-console (virtio 1.x §5.3) with a single port and no control queues.

Queue 0 (receiveq) carries input to the guest, queue 1 (transmitq) its output.  Output
goes to an injected sink (anything with ``write(bytes)``: a file, a pty, a log);
input arrives through :meth:`VirtioConsole.enqueue_input` from any thread, is buffered
(up to ``input_limit`` bytes) and copied into receive buffers as the driver posts them.
"""

from __future__ import annotations

import logging
import os
import struct
import threading
from collections.abc import Callable
from typing import Protocol

from .device import VirtioDevice, VirtioDeviceType, drain_eventfd
from .queue import DescriptorChain

log = logging.getLogger(__name__)

VIRTIO_CONSOLE_F_SIZE = 1 << 0
VIRTIO_CONSOLE_F_MULTIPORT = 1 << 1
VIRTIO_CONSOLE_F_EMERG_WRITE = 1 << 2

RECEIVEQ = 0
TRANSMITQ = 1
DEFAULT_QUEUE_SIZE = 256
DEFAULT_INPUT_LIMIT = 1 << 20
OUTPUT_CHUNK = 64 << 10                   # bytes handed to the sink at a time

_CONFIG = struct.Struct("<HHII")            # cols, rows, max_nr_ports, emerg_wr
_EMERG_WR = 8


class ConsoleSink(Protocol):
    def write(self, data: bytes) -> object: ...


class VirtioConsole(VirtioDevice):
    device_type = VirtioDeviceType.CONSOLE

    def __init__(self, sink: ConsoleSink | None = None, *, cols: int = 0, rows: int = 0,
                 queue_size: int = DEFAULT_QUEUE_SIZE, input_limit: int = DEFAULT_INPUT_LIMIT,
                 owns_sink: bool = False, name: str = "console") -> None:
        features = VIRTIO_CONSOLE_F_EMERG_WRITE | (VIRTIO_CONSOLE_F_SIZE if cols and rows else 0)
        super().__init__(name=name, queue_sizes=[queue_size, queue_size], features=features)
        self.sink = sink
        self.owns_sink = owns_sink
        self.cols, self.rows = cols, rows
        self.input_limit = input_limit
        self.dropped_input = 0
        self._input = bytearray()
        self._input_lock = threading.Lock()
        self._input_fd = os.eventfd(0, os.EFD_CLOEXEC | os.EFD_NONBLOCK)

    # --- host side ----------------------------------------------------------------------------
    def enqueue_input(self, data: bytes) -> int:
        """Queue bytes for the guest; returns how many fitted in the input buffer."""
        with self._input_lock:
            accepted = max(0, min(len(data), self.input_limit - len(self._input)))
            self._input += data[:accepted]
            self.dropped_input += len(data) - accepted
        if accepted:
            os.eventfd_write(self._input_fd, 1)
        return accepted

    def resize(self, cols: int, rows: int) -> None:
        """New terminal size: a config-change interrupt tells the driver."""
        if (cols, rows) != (self.cols, self.rows):
            self.cols, self.rows = cols, rows
            if self.avail_features & VIRTIO_CONSOLE_F_SIZE:
                self.config_changed()

    # --- config space -------------------------------------------------------------------------
    def config_bytes(self) -> bytes:
        return _CONFIG.pack(self.cols, self.rows, 1, 0)

    def write_config(self, offset: int, size: int, value: int) -> None:
        if offset == _EMERG_WR and self.has_feature(VIRTIO_CONSOLE_F_EMERG_WRITE):
            self._output(bytes((value & 0xFF,)))

    # --- worker -------------------------------------------------------------------------------
    def event_sources(self) -> list[tuple[int, Callable[[], None]]]:
        return [(self._input_fd, self._input_ready)]

    def process_queue(self, index: int) -> None:
        if index == RECEIVEQ:
            self._fill_receive_buffers()
        else:
            super().process_queue(index)

    def handle_chain(self, index: int, chain: DescriptorChain) -> int:
        # Piece by piece: a chain may name the same large buffer many times over, and
        # joining it would cost pych many times the guest's memory.
        for view in chain.readable_views():
            for start in range(0, len(view), OUTPUT_CHUNK):
                self._output(bytes(view[start:start + OUTPUT_CHUNK]))
        return 0

    def _input_ready(self) -> None:
        drain_eventfd(self._input_fd)
        self._fill_receive_buffers()

    def _fill_receive_buffers(self) -> None:
        active = self.queues.get(RECEIVEQ)
        if active is None:
            return                               # the driver did not enable input: keep it
        queue = active.queue
        with self._input_lock:
            while self._input:
                chain = queue.pop()
                if chain is None:
                    if queue.enable_notification():
                        continue                 # buffers arrived while re-arming
                    break                        # the driver kicks when it posts more
                n = chain.writer().write(bytes(self._input[:chain.writable_len]))
                del self._input[:n]
                queue.add_used(chain.head, n)
        self.signal_used(RECEIVEQ)

    def _output(self, data: bytes) -> None:
        if self.sink is None or not data:
            return
        try:
            self.sink.write(data)
        except OSError as e:
            log.warning("%s: console output dropped: %s", self.name, e)

    def close_backend(self) -> None:
        if self._input_fd >= 0:
            os.close(self._input_fd)
            self._input_fd = -1
        if self.owns_sink and self.sink is not None:
            self.sink.close()
            self.sink = None
