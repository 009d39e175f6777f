"""Test doubles for virtio devices: the driver side of a queue in fake guest memory.

:class:`MockQueue` lays out a split virtqueue in a :class:`~pych.memory.guest_memory.GuestMemory` the
way a driver does, pushes descriptor chains (direct, indirect, or raw malformed ones)
and reads back used elements.  :class:`DeviceHarness` activates a device on mock
queues with kick eventfds and a :class:`~tests.support.fakes.RecordingInterrupt`, so device
tests run without KVM or a transport::

    with DeviceHarness(VirtioRng()) as h:
        head = h.queue(0).add_chain(writable=[64])
        h.kick(0)
        assert h.wait_used(0) == [UsedElement(head, 64)]
"""

from __future__ import annotations

import os
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass

from pych.devices.virtio.device import (VIRTIO_F_EVENT_IDX, VIRTIO_F_INDIRECT_DESC, ActiveQueue,
                                        VirtioDevice)
from pych.devices.virtio.queue import (DESCRIPTOR_SIZE, VIRTQ_DESC_F_INDIRECT, VIRTQ_DESC_F_NEXT,
                                       VIRTQ_DESC_F_WRITE, UsedElement, Virtqueue,
                                       avail_ring_size, desc_table_size, used_ring_size)
from pych.memory.guest_memory import GuestMemory

from tests.support.fakes import RecordingInterrupt

MiB = 1 << 20


def _align(value: int, alignment: int) -> int:
    return (value + alignment - 1) & ~(alignment - 1)


@dataclass
class _MockChain:
    descriptors: list[int]
    readable: list[tuple[int, int]]
    writable: list[tuple[int, int]]


class MockQueue:
    """The driver side of one split virtqueue at ``base`` in ``mem``; buffers come from
    a bump allocator over the ``data_size`` bytes after the rings."""

    def __init__(self, mem: GuestMemory, size: int = 16, *, base: int = 0x1000,
                 data_size: int = 256 * 1024) -> None:
        self.mem = mem
        self.size = size
        self.desc_table = _align(base, 16)
        self.avail_ring = self.desc_table + desc_table_size(size)
        self.used_ring = _align(self.avail_ring + avail_ring_size(size), 4)
        self.data_start = _align(self.used_ring + used_ring_size(size), 4096)
        self.data_end = self.data_start + data_size
        mem.write(self.desc_table, bytes(self.data_start - self.desc_table))
        self._data_next = self.data_start
        self._free = list(range(size))
        self._chains: dict[int, _MockChain] = {}
        self._avail_idx = 0
        self._last_used = 0

    def create_queue(self, **kwargs) -> Virtqueue:
        """The device-side :class:`Virtqueue` over this layout."""
        return Virtqueue(self.mem, self.size, self.desc_table, self.avail_ring, self.used_ring, **kwargs)

    # --- buffers ------------------------------------------------------------------------------
    def alloc(self, length: int, alignment: int = 8) -> int:
        address = _align(self._data_next, alignment)
        if address + length > self.data_end:
            raise MemoryError("mock queue data area exhausted")
        self._data_next = address + length
        return address

    def buffer(self, data: bytes) -> int:
        address = self.alloc(max(len(data), 1))
        self.mem.write(address, data)
        return address

    # --- descriptors --------------------------------------------------------------------------
    def set_descriptor(self, index: int, addr: int, length: int, flags: int = 0, next: int = 0,
                       table: int | None = None) -> None:
        table = self.desc_table if table is None else table
        base = table + DESCRIPTOR_SIZE * index
        self.mem.write_u64(base, addr)
        self.mem.write_u32(base + 8, length)
        self.mem.write_u16(base + 12, flags)
        self.mem.write_u16(base + 14, next)

    def add_chain(self, readable: Sequence[bytes] = (), writable: Sequence[int] = (), *,
                  indirect: bool = False) -> int:
        """Lay out a well-formed chain, publish it, and return its head."""
        readable_bufs = [(self.buffer(data), len(data)) for data in readable]
        writable_bufs = [(self.alloc(n), n) for n in writable]
        for address, n in writable_bufs:
            self.mem.write(address, bytes(n))
        entries = ([(a, n, 0) for a, n in readable_bufs]
                   + [(a, n, VIRTQ_DESC_F_WRITE) for a, n in writable_bufs])
        if not entries:
            raise ValueError("a chain needs at least one buffer")
        if indirect:
            table = self.alloc(DESCRIPTOR_SIZE * len(entries), alignment=16)
            for i, (a, n, flags) in enumerate(entries):
                last = i == len(entries) - 1
                self.set_descriptor(i, a, n, flags | (0 if last else VIRTQ_DESC_F_NEXT),
                                    0 if last else i + 1, table=table)
            descriptors = self._take_descriptors(1)
            self.set_descriptor(descriptors[0], table, DESCRIPTOR_SIZE * len(entries),
                                VIRTQ_DESC_F_INDIRECT)
        else:
            descriptors = self._take_descriptors(len(entries))
            for i, (a, n, flags) in enumerate(entries):
                last = i == len(entries) - 1
                self.set_descriptor(descriptors[i], a, n, flags | (0 if last else VIRTQ_DESC_F_NEXT),
                                    0 if last else descriptors[i + 1])
        head = descriptors[0]
        self._chains[head] = _MockChain(descriptors, readable_bufs, writable_bufs)
        self.publish(head)
        return head

    def _take_descriptors(self, n: int) -> list[int]:
        if n > len(self._free):
            raise MemoryError(f"mock queue has {len(self._free)} free descriptors, need {n}")
        taken, self._free = self._free[:n], self._free[n:]
        return taken

    # --- rings --------------------------------------------------------------------------------
    def publish(self, head: int) -> None:
        """Put ``head`` on the avail ring and bump avail.idx (any index, even a bad one)."""
        self.mem.write_u16(self.avail_ring + 4 + 2 * (self._avail_idx % self.size), head)
        self.set_avail_idx(self._avail_idx + 1)

    def set_avail_idx(self, value: int) -> None:
        self._avail_idx = value & 0xFFFF
        self.mem.write_u16(self.avail_ring + 2, self._avail_idx)

    def set_avail_flags(self, flags: int) -> None:
        self.mem.write_u16(self.avail_ring, flags)

    def set_used_event(self, value: int) -> None:
        self.mem.write_u16(self.avail_ring + 4 + 2 * self.size, value)

    @property
    def avail_idx(self) -> int:
        return self._avail_idx

    @property
    def used_idx(self) -> int:
        return self.mem.read_u16(self.used_ring + 2)

    @property
    def used_flags(self) -> int:
        return self.mem.read_u16(self.used_ring)

    @property
    def avail_event(self) -> int:
        return self.mem.read_u16(self.used_ring + 4 + 8 * self.size)

    def used(self) -> list[UsedElement]:
        """Used elements added since the last call; their descriptors become free again."""
        out = []
        while self._last_used != self.used_idx:
            slot = self.used_ring + 4 + 8 * (self._last_used % self.size)
            element = UsedElement(self.mem.read_u32(slot), self.mem.read_u32(slot + 4))
            chain = self._chains.pop(element.id, None)
            if chain is not None:
                self._free += chain.descriptors
            out.append(element)
            self._last_used = (self._last_used + 1) & 0xFFFF
        return out

    def writable_buffers(self, head: int) -> list[tuple[int, int]]:
        return list(self._chains[head].writable) if head in self._chains else []

    def read_writable(self, buffers: list[tuple[int, int]]) -> bytes:
        return b"".join(self.mem.read(a, n) for a, n in buffers)


def wait_until(predicate: Callable[[], bool], timeout: float = 5.0, interval: float = 0.002) -> bool:
    deadline = time.monotonic() + timeout
    while not predicate():
        if time.monotonic() > deadline:
            return False
        time.sleep(interval)
    return True


class DeviceHarness:
    """A device activated on :class:`MockQueue` s in its own fake guest memory."""

    def __init__(self, device: VirtioDevice, *, queue_size: int = 16, event_idx: bool = False,
                 features: int | None = None, queues: Sequence[int] | None = None,
                 stride: int = 2 * MiB) -> None:
        indices = list(range(len(device.queue_max_sizes)) if queues is None else queues)
        self.device = device
        self.mem = GuestMemory.from_ranges([(0, stride * (max(indices) + 1))])
        self.interrupt = RecordingInterrupt()
        self._queues = {i: MockQueue(self.mem, queue_size, base=i * stride + 0x1000,
                                     data_size=stride - 0x10000) for i in indices}
        self._kick_fds = {i: os.eventfd(0, os.EFD_CLOEXEC | os.EFD_NONBLOCK) for i in indices}
        if features is None:
            features = device.avail_features & ~(0 if event_idx else VIRTIO_F_EVENT_IDX)
        device.ack_features(features)
        active = [ActiveQueue(i, mq.create_queue(event_idx=bool(features & VIRTIO_F_EVENT_IDX),
                                                 indirect_desc=bool(features & VIRTIO_F_INDIRECT_DESC),
                                                 name=f"{device.name}-q{i}"),
                              self._kick_fds[i])
                  for i, mq in self._queues.items()]
        device.activate(self.mem, active, self.interrupt)

    def queue(self, index: int) -> MockQueue:
        return self._queues[index]

    def device_queue(self, index: int) -> Virtqueue:
        return self.device.queues[index].queue

    def kick(self, index: int) -> None:
        os.eventfd_write(self._kick_fds[index], 1)

    def wait_used(self, index: int, count: int = 1, timeout: float = 5.0) -> list[UsedElement]:
        """Wait until ``count`` used elements arrived on queue ``index``; return them."""
        queue, got = self._queues[index], []
        deadline = time.monotonic() + timeout
        while len(got) < count:
            got += queue.used()
            if len(got) >= count:
                break
            if time.monotonic() > deadline:
                raise TimeoutError(f"queue {index}: {len(got)} of {count} used elements")
            time.sleep(0.001)
        return got

    def close(self) -> None:
        """Shut the device down (worker, backend) and free the harness."""
        self.device.shutdown()
        for fd in self._kick_fds.values():
            os.close(fd)
        self._kick_fds.clear()
        self.mem.close()

    def __enter__(self) -> DeviceHarness:
        return self

    def __exit__(self, *exc) -> None:
        self.close()
