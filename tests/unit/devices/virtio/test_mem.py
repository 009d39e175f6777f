"""virtio-mem without KVM: config space, requested size, and the driver's requests on a mock
queue over fake guest memory (the region is a real memfd, so discards are observable)."""

from __future__ import annotations

import struct

import pytest
from hypothesis import given
from hypothesis import strategies as st

from pych.devices.virtio.device import VirtioDeviceType
from pych.devices.virtio.mem import (BLOCK_SIZE, BlockState, Request, Response, VirtioMem,
                                     VirtioMemResizeError, _runs)
from pych.memory.guest_memory import GuestMemory

from tests.support.virtio import DeviceHarness

MiB = 1 << 20
BASE = 1 << 32                   # the region: 4 GiB, 256 MiB (128 blocks)
SIZE = 256 * MiB


@pytest.fixture
def region():
    mem = GuestMemory()
    yield mem.add_region(BASE, SIZE, name="virtio-mem0")
    mem.close()


def config(device) -> dict:
    names = ("block_size", "node_id", "addr", "region_size", "usable_region_size",
             "plugged_size", "requested_size")
    return dict(zip(names, struct.unpack("<QH6xQQQQQ", device.config_bytes())))


def send(h, kind, addr=0, nb_blocks=0) -> tuple[int, int]:
    """One request through the queue; returns (response type, state)."""
    mq = h.queue(0)
    head = mq.add_chain([struct.pack("<H6xQH6x", kind, addr, nb_blocks)], [16])
    response = mq.writable_buffers(head)
    h.kick(0)
    assert h.wait_used(0) == [(head, 10)]
    return struct.unpack("<H6xH", mq.read_writable(response)[:10])


def test_config_space_describes_the_region(region):
    device = VirtioMem(region, requested_size=64 * MiB)
    assert device.device_type == VirtioDeviceType.MEM
    assert config(device) == {"block_size": BLOCK_SIZE, "node_id": 0, "addr": BASE,
                              "region_size": SIZE, "usable_region_size": SIZE,
                              "plugged_size": 0, "requested_size": 64 * MiB}
    assert len(device.queue_max_sizes) == 1


def test_resize_validates_and_raises_a_config_interrupt(region):
    with DeviceHarness(VirtioMem(region)) as h:
        assert h.device.resize(128 * MiB)
        assert config(h.device)["requested_size"] == 128 * MiB
        assert h.interrupt.config_notifications == 1
        assert not h.device.resize(128 * MiB)           # already requested: no interrupt
        with pytest.raises(VirtioMemResizeError, match="more than the virtio-mem region"):
            h.device.resize(SIZE + BLOCK_SIZE)
        with pytest.raises(VirtioMemResizeError, match="block size"):
            h.device.resize(MiB)
        assert h.interrupt.config_notifications == 1
        assert h.device.requested_size == 128 * MiB


def test_misaligned_regions_are_refused():
    mem = GuestMemory()
    try:
        with pytest.raises(ValueError, match="aligned to 128 MiB"):
            VirtioMem(mem.add_region(BASE + 2 * MiB, 128 * MiB))
    finally:
        mem.close()


def test_plug_up_to_the_requested_size(region):
    with DeviceHarness(VirtioMem(region, requested_size=8 * MiB)) as h:
        assert send(h, Request.PLUG, BASE, 2) == (Response.ACK, 0)
        assert send(h, Request.PLUG, BASE, 1) == (Response.ERROR, 0)        # already plugged
        assert send(h, Request.PLUG, BASE + 4 * MiB, 3) == (Response.NACK, 0)   # > requested
        assert send(h, Request.PLUG, BASE + 4 * MiB, 2) == (Response.ACK, 0)
        assert h.device.plugged_size == 8 * MiB == config(h.device)["plugged_size"]
        assert h.device.plugged_ranges() == [(BASE, 8 * MiB)]


@pytest.mark.parametrize("addr, nb_blocks", [
    (BASE + MiB, 1),                    # not block aligned
    (BASE - BLOCK_SIZE, 1),             # before the region
    (BASE + SIZE - BLOCK_SIZE, 2),      # runs past its end
    (BASE, 0),                          # no blocks
])
def test_invalid_ranges_are_errors(region, addr, nb_blocks):
    with DeviceHarness(VirtioMem(region, requested_size=SIZE)) as h:
        for kind in (Request.PLUG, Request.UNPLUG, Request.STATE):
            assert send(h, kind, addr, nb_blocks) == (Response.ERROR, 0)
        assert send(h, 7, BASE, 1) == (Response.ERROR, 0)                    # unknown type
        assert h.device.plugged_size == 0


def test_state_reports_plugged_unplugged_and_mixed(region):
    with DeviceHarness(VirtioMem(region, requested_size=SIZE)) as h:
        send(h, Request.PLUG, BASE + 2 * BLOCK_SIZE, 2)
        assert send(h, Request.STATE, BASE + 2 * BLOCK_SIZE, 2) == (Response.ACK,
                                                                     BlockState.PLUGGED)
        assert send(h, Request.STATE, BASE, 2) == (Response.ACK, BlockState.UNPLUGGED)
        assert send(h, Request.STATE, BASE, 3) == (Response.ACK, BlockState.MIXED)


def test_unplug_discards_the_host_memory(region):
    with DeviceHarness(VirtioMem(region, requested_size=SIZE)) as h:
        send(h, Request.PLUG, BASE, 4)
        region.mmap[:4 * BLOCK_SIZE] = b"\xaa" * (4 * BLOCK_SIZE)          # the guest used it
        assert send(h, Request.UNPLUG, BASE + BLOCK_SIZE, 3) == (Response.ACK, 0)
        assert send(h, Request.UNPLUG, BASE + BLOCK_SIZE, 1) == (Response.ERROR, 0)
        assert region.mmap[:BLOCK_SIZE] == b"\xaa" * BLOCK_SIZE              # still plugged
        assert region.mmap[BLOCK_SIZE:4 * BLOCK_SIZE] == bytes(3 * BLOCK_SIZE)
        assert h.device.plugged_ranges() == [(BASE, BLOCK_SIZE)]
        assert h.device.plugged_size == BLOCK_SIZE


def test_unplug_all_empties_the_region(region):
    with DeviceHarness(VirtioMem(region, requested_size=16 * MiB)) as h:
        send(h, Request.PLUG, BASE, 1)
        send(h, Request.PLUG, BASE + 10 * BLOCK_SIZE, 2)
        region.mmap[:BLOCK_SIZE] = b"\x55" * BLOCK_SIZE
        assert send(h, Request.UNPLUG_ALL) == (Response.ACK, 0)
        assert h.device.plugged_size == 0 and h.device.plugged_ranges() == []
        assert region.mmap[:BLOCK_SIZE] == bytes(BLOCK_SIZE)


def test_plugged_state_survives_a_device_reset(region):
    device = VirtioMem(region, requested_size=SIZE)
    with DeviceHarness(device) as h:
        send(h, Request.PLUG, BASE, 3)
    assert device.plugged_size == 3 * BLOCK_SIZE      # the harness reset and shut it down


def test_short_requests_get_an_error(region):
    with DeviceHarness(VirtioMem(region)) as h:
        mq = h.queue(0)
        head = mq.add_chain([b"\x00" * 8], [16])
        response = mq.writable_buffers(head)
        h.kick(0)
        assert h.wait_used(0) == [(head, 10)]
        assert struct.unpack("<H", mq.read_writable(response)[:2]) == (Response.ERROR,)


@given(st.integers(0, (1 << 64) - 1))
def test_runs_cover_exactly_the_set_bits(mask):
    rebuilt = 0
    previous_end = -1
    for first, length in _runs(mask):
        assert length > 0 and first > previous_end
        rebuilt |= ((1 << length) - 1) << first
        previous_end = first + length
    assert rebuilt == mask


# --- snapshot / migration state ----------------------------------------------------------------
def test_plugged_blocks_and_sizes_survive_save_and_restore(region):
    with DeviceHarness(VirtioMem(region, requested_size=64 * MiB)) as h:
        assert send(h, Request.PLUG, BASE + 2 * BLOCK_SIZE, 3) == (Response.ACK, 0)
        assert send(h, Request.PLUG, BASE + 10 * BLOCK_SIZE, 1) == (Response.ACK, 0)
        saved = h.device.save_state()
    assert saved["plugged_blocks"] == 4 and saved["requested"] == 64 * MiB
    other = GuestMemory()
    try:
        fresh = VirtioMem(other.add_region(BASE, SIZE, name="virtio-mem0"))
        fresh.restore_state(saved)
        assert (fresh.plugged_size, fresh.requested_size) == (4 * BLOCK_SIZE, 64 * MiB)
        assert fresh.plugged_ranges() == [(BASE + 2 * BLOCK_SIZE, 3 * BLOCK_SIZE),
                                          (BASE + 10 * BLOCK_SIZE, BLOCK_SIZE)]
        assert fresh.plugged_offsets() == [(2 * BLOCK_SIZE, 3 * BLOCK_SIZE),
                                           (10 * BLOCK_SIZE, BLOCK_SIZE)]
        assert config(fresh)["plugged_size"] == 4 * BLOCK_SIZE
        assert fresh.config_generation == h.device.config_generation
        # the restored device carries on: an unplug of what was plugged is acknowledged
        assert fresh.request(Request.UNPLUG, BASE + 10 * BLOCK_SIZE, 1) == (Response.ACK, 0)
        assert fresh.plugged_size == 3 * BLOCK_SIZE
    finally:
        other.close()


@pytest.mark.parametrize(("change", "words"), [
    ({"block_count": 64}, "has 64 blocks, this region 128"),
    ({"plugged": "3"}, "inconsistent"),
    ({"requested": BLOCK_SIZE + 1}, "inconsistent"),
    ({"plugged": f"{1 << 130:x}", "plugged_blocks": 1}, "has 128 blocks"),
])
def test_a_state_that_does_not_fit_the_region_is_refused(region, change, words):
    device = VirtioMem(region)
    device.request(Request.PLUG, BASE, 0)
    saved = {**device.save_state(), "plugged": "1", "plugged_blocks": 1, **change}
    with pytest.raises(ValueError, match=words):
        device.restore_state(saved)
    assert device.plugged_size == 0
