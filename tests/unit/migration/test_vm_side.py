"""pych.migration.vm_side's page arithmetic and GuestMemory's device-write tracking (the
KVM side, dirty logging on a real memslot: scripts/kvm_dirty_log_probe.py and
tests/guest/test_migration.py)."""

from __future__ import annotations

import os
import struct

import pytest

from pych.memory.guest_memory import GuestMemory
from pych.migration.protocol import MigrationError
from pych.migration.vm_side import VmTarget, bitmap_pages, page_runs


def test_bitmap_pages_reads_kvm_words_little_endian():
    bitmap = struct.pack("<QQ", (1 << 0) | (1 << 63), 1 << 5)
    assert bitmap_pages(bitmap, 0x100) == [0x100, 0x100 + 63, 0x100 + 64 + 5]
    assert bitmap_pages(bytes(16), 0) == []


def test_page_runs_coalesce_contiguous_pages_up_to_a_limit():
    assert page_runs({1, 2, 3, 7}) == [(0x1000, 0x3000), (0x7000, 0x1000)]
    assert page_runs(range(4), limit=0x2000) == [(0, 0x2000), (0x2000, 0x2000)]
    assert page_runs([]) == []


def test_guest_memory_tracks_device_writes_only_while_asked():
    mem = GuestMemory.from_ranges([(0, 1 << 20)])
    try:
        mem.write(0x3000, b"x")
        assert mem.take_written() == set()              # not tracking
        mem.track_writes(True)
        mem.write_u32(0x5ffe, 1)                        # straddles pages 5 and 6
        view = mem.view(0x8000, 0x2000)                 # a buffer a device may fill
        assert mem.take_written() == {5, 6, 8, 9}
        assert mem.take_written() == set()              # taken: a new round starts empty
        view[0:1] = b"y"                                # written after its page was sent
        mem.write_u16(0x1000, 2)
        # the final round (VM paused) sends every page viewed since tracking began again
        assert mem.take_written(final=True) == {1, 8, 9}
        mem.track_writes(False)
        mem.write(0x3000, b"z")
        assert mem.take_written() == set()
        del view
    finally:
        mem.close()


# --- the taps handed over with STATE (VmTarget.finish) -------------------------------------------
class _Net:
    def __init__(self, net_id, fds=None):
        self.id, self.fds = net_id, fds


class _Vm:
    """What VmTarget.finish uses of a Vm: its configuration's nets and finish_incoming
    (which, as make_net does, takes and closes the adopted fds of the nets it builds)."""

    def __init__(self, nets, fail=False):
        self.config = type("Config", (), {"net": nets})()
        self.fail = fail
        self.taken: dict = {}

    def finish_incoming(self, state, taps, vhost_user=None):
        net_id, fds = next(iter(taps.items()))
        self.taken[net_id] = taps.pop(net_id)
        for fd in fds:
            os.close(fd)
        if self.fail:
            raise ValueError("device _net2: cannot restore")


def _is_open(fd: int) -> bool:
    try:
        os.fstat(fd)
    except OSError:
        return False
    return True


def test_the_receiver_takes_named_taps_from_their_fds_and_gives_fd_nets_new_ones():
    fds = [os.eventfd(0) for _ in range(3)]
    vm = _Vm([_Net("_net1"), _Net("_net2", fds=[97])])
    target = VmTarget(vm)
    target.finish({}, {"taps": {"_net1": [0, 1], "_net2": [2]}, "persisted": []}, fds)
    assert vm.taken == {"_net1": fds[:2]}                  # adopted, not opened by name
    assert vm.config.net[1].fds == [fds[2]]                # the fd net's new fd (the VMM's)
    assert [_is_open(fd) for fd in fds] == [False, False, True]
    os.close(fds[2])


def test_a_failed_finish_closes_every_tap_fd_not_taken_and_fd_nets_need_theirs():
    fds = [os.eventfd(0) for _ in range(3)]
    vm = _Vm([_Net("_net1"), _Net("_net2"), _Net("_net3", fds=[5])], fail=True)
    with pytest.raises(ValueError, match="cannot restore"):
        VmTarget(vm).finish({}, {"taps": {"_net1": [0], "_net2": [1], "_net3": [2]}}, fds)
    assert not any(_is_open(fd) for fd in fds)
    fds = [os.eventfd(0)]
    vm = _Vm([_Net("_net1"), _Net("_net3", fds=[5])])
    with pytest.raises(MigrationError, match="_net3 was given tap fds and none came"):
        VmTarget(vm).finish({}, {"taps": {"_net1": [0]}}, fds)
    assert not _is_open(fds[0])
    with pytest.raises(MigrationError, match="not the ones passed"):
        VmTarget(_Vm([_Net("_net1")])).finish({}, {"taps": {"_net1": [1]}}, [])
