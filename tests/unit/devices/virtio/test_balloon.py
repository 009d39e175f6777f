"""virtio-balloon: target in the config space, inflated and reported pages discarded."""

import struct

from pych.devices.virtio.balloon import (DEFLATEQ, INFLATEQ, REPORTINGQ,
                                         VIRTIO_BALLOON_F_DEFLATE_ON_OOM,
                                         VIRTIO_BALLOON_F_REPORTING, VirtioBalloon)

from tests.support.virtio import DeviceHarness

MiB = 1 << 20
PAGE = 4096
FREE_AREA = 12 * MiB            # untouched by the harness (queue 1 of 8 MiB strides: its tail)


def fill(h, gpa, pages):
    h.mem.write(gpa, b"\xaa" * (pages * PAGE))


def test_resize_sets_the_target_and_raises_a_config_interrupt():
    with DeviceHarness(VirtioBalloon(16 * MiB)) as h:
        assert struct.unpack("<II", h.device.config_bytes()) == (4096, 0)
        h.device.resize(64 * MiB + 100)
        assert struct.unpack("<II", h.device.config_bytes()) == (16384, 0)
        assert h.interrupt.config_notifications == 1
        h.device.write_config(4, 4, 16384)                # the driver reports its size
        assert h.device.actual_size == 64 * MiB


def test_inflated_pages_are_discarded_and_deflate_needs_nothing():
    with DeviceHarness(VirtioBalloon(), stride=8 * MiB) as h:
        fill(h, FREE_AREA, 4)
        pfns = [FREE_AREA // PAGE + i for i in (0, 1, 3)]     # two runs
        head = h.queue(INFLATEQ).add_chain([struct.pack("<3I", *pfns)])
        h.kick(INFLATEQ)
        assert h.wait_used(INFLATEQ) == [(head, 0)]
        data = h.mem.read(FREE_AREA, 4 * PAGE)
        assert data[:2 * PAGE] == bytes(2 * PAGE)               # freed: reads back zero
        assert data[2 * PAGE:3 * PAGE] == b"\xaa" * PAGE        # not listed: kept
        assert data[3 * PAGE:] == bytes(PAGE)
        assert h.device.discarded_pages == 3
        head = h.queue(DEFLATEQ).add_chain([struct.pack("<I", pfns[0])])
        h.kick(DEFLATEQ)
        assert h.wait_used(DEFLATEQ) == [(head, 0)]


def test_pages_outside_ram_are_ignored():
    with DeviceHarness(VirtioBalloon()) as h:
        head = h.queue(INFLATEQ).add_chain([struct.pack("<I", 0xFFFF_FF00)])
        h.kick(INFLATEQ)
        assert h.wait_used(INFLATEQ) == [(head, 0)]
        assert h.device.discarded_pages == 0


def test_free_page_reporting_adds_a_queue_whose_buffers_are_discarded():
    balloon = VirtioBalloon(free_page_reporting=True, deflate_on_oom=True)
    assert len(balloon.queue_max_sizes) == 3
    assert balloon.avail_features & VIRTIO_BALLOON_F_REPORTING
    assert balloon.avail_features & VIRTIO_BALLOON_F_DEFLATE_ON_OOM
    with DeviceHarness(balloon, stride=8 * MiB) as h:
        mq = h.queue(REPORTINGQ)
        head = mq.add_chain(writable=[8 * PAGE])
        (gpa, length), = mq.writable_buffers(head)
        fill(h, gpa, 8)
        h.kick(REPORTINGQ)
        assert h.wait_used(REPORTINGQ) == [(head, 0)]
        assert h.mem.read(gpa, length) == bytes(length)
        assert h.device.discarded_pages == 8
    assert len(VirtioBalloon().queue_max_sizes) == 2


def test_a_huge_inflate_chain_is_read_in_bounded_pieces():
    """An inflate chain may name the same buffer many times (up to 4 GiB in all): the
    device reads frame numbers PFN_BATCH at a time, never the whole chain at once."""
    import tracemalloc

    with DeviceHarness(VirtioBalloon(), stride=8 * MiB) as h:
        mq = h.queue(INFLATEQ)
        buf = mq.buffer(struct.pack("<I", 0xFFFF_FF00) * (128 << 10 >> 2))   # 128 KiB
        for i in range(15):                                  # 15 times: 1.9 MiB in all
            mq.set_descriptor(i, buf, 128 << 10, 0 if i == 14 else 1, i + 1)
        head = 0
        mq.publish(head)
        tracemalloc.start()
        h.kick(INFLATEQ)
        # tracemalloc slows the device's reads many times over: a wide bound on a busy host
        assert h.wait_used(INFLATEQ, timeout=120) == [(head, 0)]
        peak = tracemalloc.get_traced_memory()[1]
        tracemalloc.stop()
        assert peak < 1 << 20, peak          # the chain alone is 1.9 MiB (and 500,000 ints)
        assert h.device.discarded_pages == 0
