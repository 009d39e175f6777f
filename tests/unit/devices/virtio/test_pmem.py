"""virtio-pmem: the file mapping, its placement through the injected mapper, flush."""

import ctypes
import os
import struct

import pytest

from pych.devices.virtio.pmem import ALIGNMENT, PmemError, VirtioPmem

from tests.support.virtio import DeviceHarness

MiB = 1 << 20


class FakeMapper:
    def __init__(self, gpa=0x1_0000_0000, fail=False):
        self.gpa, self.fail = gpa, fail
        self.mapped = {}

    def map(self, host_addr, size, alignment):
        if self.fail:
            raise RuntimeError("window full")
        assert alignment == ALIGNMENT
        self.mapped[self.gpa] = (host_addr, size)
        return self.gpa

    def unmap(self, gpa):
        del self.mapped[gpa]


def open_fds():
    return len(os.listdir("/proc/self/fd"))


def test_file_is_mapped_and_config_names_the_guest_range(tmp_path):
    path = tmp_path / "pmem.img"
    path.write_bytes(bytes(4 * MiB))
    mapper = FakeMapper()
    device = VirtioPmem(path, mapper)
    host_addr, size = mapper.mapped[0x1_0000_0000]
    assert size == 4 * MiB
    assert device.config_bytes() == struct.pack("<QQ", 0x1_0000_0000, 4 * MiB)
    # What the guest stores through the mapping is the file's content.
    ctypes.memmove(host_addr + 4096, b"stored by the guest", 19)
    assert path.read_bytes()[4096:4096 + 19] == b"stored by the guest"
    device.shutdown()
    assert mapper.mapped == {}


def test_discard_writes_keeps_the_file_unchanged(tmp_path):
    path = tmp_path / "pmem.img"
    path.write_bytes(bytes(2 * MiB))
    mapper = FakeMapper()
    device = VirtioPmem(path, mapper, discard_writes=True)
    ctypes.memmove(mapper.mapped[0x1_0000_0000][0], b"scratch", 7)
    assert path.read_bytes()[:7] == bytes(7)
    device.shutdown()


def test_flush_request_is_answered_after_fsync(tmp_path):
    path = tmp_path / "pmem.img"
    path.write_bytes(bytes(2 * MiB))
    with DeviceHarness(VirtioPmem(path, FakeMapper())) as h:
        mq = h.queue(0)
        head = mq.add_chain([struct.pack("<I", 0)], writable=[4])
        bogus = mq.add_chain([struct.pack("<I", 7)], writable=[4])
        bufs = mq.writable_buffers(head), mq.writable_buffers(bogus)
        h.kick(0)
        assert h.wait_used(0, 2) == [(head, 4), (bogus, 4)]
        assert [struct.unpack("<I", mq.read_writable(b))[0] for b in bufs] == [0, 1]
        assert h.device.flushes == 1


def test_a_directory_gives_an_unnamed_file_of_the_given_size(tmp_path):
    mapper = FakeMapper()
    device = VirtioPmem(tmp_path, mapper, size=2 * MiB)
    assert device.size == 2 * MiB and os.listdir(tmp_path) == []
    device.shutdown()


@pytest.mark.parametrize("size, setup, message", [
    (None, lambda p: None, "No such file"),
    (None, lambda p: p.write_bytes(bytes(3 * MiB)), "multiple of 2 MiB"),
    (None, lambda p: p.write_bytes(b""), "multiple of 2 MiB"),
    (4 * MiB, lambda p: p.write_bytes(bytes(2 * MiB)), "larger than the file"),
])
def test_bad_files_are_refused_and_nothing_is_held(tmp_path, size, setup, message):
    path = tmp_path / "pmem.img"
    setup(path)
    before = open_fds()
    with pytest.raises(PmemError, match=message):
        VirtioPmem(path, FakeMapper(), size=size)
    assert open_fds() == before


def test_no_guest_range_is_an_error_that_holds_nothing(tmp_path):
    path = tmp_path / "pmem.img"
    path.write_bytes(bytes(2 * MiB))
    before = open_fds()
    with pytest.raises(PmemError, match="window full"):
        VirtioPmem(path, FakeMapper(fail=True))
    assert open_fds() == before
