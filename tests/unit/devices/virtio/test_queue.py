import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from pych.devices.virtio.queue import (VIRTQ_AVAIL_F_NO_INTERRUPT, VIRTQ_DESC_F_INDIRECT,
                                       VIRTQ_DESC_F_NEXT, VIRTQ_DESC_F_WRITE,
                                       VIRTQ_USED_F_NO_NOTIFY, Buffer, QueueError, UsedElement,
                                       Virtqueue, VirtqueueError)
from pych.memory.guest_memory import GuestMemory

from tests.support.virtio import MockQueue

MEM_SIZE = 1 << 20
OUTSIDE = MEM_SIZE + 0x1000                  # not guest RAM


@pytest.fixture(scope="module")
def mem():
    m = GuestMemory.from_ranges([(0, MEM_SIZE)])
    yield m
    m.close()


def make(mem, size=16, **kw):
    mq = MockQueue(mem, size, base=0x1000, data_size=0x40000)
    return mq, mq.create_queue(**kw)


def test_direct_chain_round_trip(mem):
    mq, q = make(mem)
    head = mq.add_chain([b"hello ", b"world"], [4, 8])
    chain = q.pop()
    assert chain.head == head
    assert [b.length for b in chain.readable] == [6, 5]
    assert [b.length for b in chain.writable] == [4, 8]
    assert (chain.readable_len, chain.writable_len) == (11, 12)
    reader = chain.reader()
    assert reader.read(3) == b"hel" and reader.read(100) == b"lo world" and reader.remaining == 0
    writer = chain.writer()
    assert writer.write(b"0123456789abcdef") == 12 and writer.written == 12
    q.add_used(chain.head, writer.written)
    assert q.pop() is None
    assert mq.used() == [UsedElement(head, 12)]
    assert mq.read_writable([(b.gpa, b.length) for b in chain.writable]) == b"0123456789ab"


def test_zero_copy_views_alias_guest_memory(mem):
    mq, q = make(mem)
    mq.add_chain([b"abc"], [4])
    chain = q.pop()
    views = chain.writer().take(4)
    views[0][:] = b"WXYZ"
    assert mem.read(chain.writable[0].gpa, 4) == b"WXYZ"
    assert bytes(chain.readable_views()[0]) == b"abc"


def test_indirect_chain(mem):
    mq, q = make(mem)
    head = mq.add_chain([b"hdr", b"payload"], [1], indirect=True)
    chain = q.pop()
    assert chain.head == head
    assert chain.reader().read(100) == b"hdrpayload"
    assert chain.writable_len == 1


def test_buffer_spanning_two_regions_is_split():
    mem = GuestMemory.from_ranges([(0, 0x10000), (0x10000, 0x10000)])
    try:
        mq, q = make(mem)
        mq.set_descriptor(0, 0xFFF0, 0x20, VIRTQ_DESC_F_WRITE)
        mq.publish(0)
        chain = q.pop()
        assert chain.writable == (Buffer(0xFFF0, 0x10), Buffer(0x10000, 0x10))
        assert chain.writer().write(bytes(range(32))) == 32
        assert mem.read(0xFFF0, 16) + mem.read(0x10000, 16) == bytes(range(32))
    finally:
        mem.close()


# --- setup errors --------------------------------------------------------------------------------
@pytest.mark.parametrize("size", [0, 3, 65536])
def test_invalid_size(mem, size):
    with pytest.raises(VirtqueueError) as e:
        Virtqueue(mem, size, 0x1000, 0x2000, 0x3000)
    assert e.value.kind is QueueError.INVALID_SIZE


@pytest.mark.parametrize("desc, avail, used", [(0x1008, 0x2000, 0x3000), (0x1000, 0x2001, 0x3000),
                                               (0x1000, 0x2000, 0x3002)])
def test_misaligned_rings(mem, desc, avail, used):
    with pytest.raises(VirtqueueError) as e:
        Virtqueue(mem, 16, desc, avail, used)
    assert e.value.kind is QueueError.RING_MISALIGNED


def test_rings_outside_memory(mem):
    with pytest.raises(VirtqueueError) as e:
        Virtqueue(mem, 16, 0x1000, 0x2000, MEM_SIZE - 8)
    assert e.value.kind is QueueError.RING_OUT_OF_MEMORY


# --- guest misbehaviour: reported, skipped, the queue keeps going ------------------------------
def expect_error_then_recovery(mq, q, kind, *, returned=True):
    """The bad chain is skipped (and given back with length 0), the next good one works."""
    chain = q.pop()
    assert chain is None
    assert q.errors[kind] == 1
    bad = mq.used()
    if returned:
        assert [u.length for u in bad] == [0]
    else:
        assert bad == []
    head = mq.add_chain([b"ok"], [1])
    chain = q.pop()
    assert chain is not None and chain.head == head and chain.reader().read(2) == b"ok"


def test_head_out_of_range(mem):
    mq, q = make(mem)
    mq.publish(40)
    expect_error_then_recovery(mq, q, QueueError.HEAD_OUT_OF_RANGE, returned=False)


def test_next_out_of_range(mem):
    mq, q = make(mem)
    mq.set_descriptor(15, 0x80000, 4, VIRTQ_DESC_F_NEXT, next=16)
    mq.publish(15)
    expect_error_then_recovery(mq, q, QueueError.DESCRIPTOR_OUT_OF_RANGE)


def test_descriptor_loop(mem):
    mq, q = make(mem)
    mq.set_descriptor(14, 0x80000, 4, VIRTQ_DESC_F_NEXT, next=15)
    mq.set_descriptor(15, 0x80000, 4, VIRTQ_DESC_F_NEXT, next=14)
    mq.publish(14)
    expect_error_then_recovery(mq, q, QueueError.CHAIN_TOO_LONG)


def test_buffer_outside_memory(mem):
    mq, q = make(mem)
    mq.set_descriptor(15, MEM_SIZE - 2, 4)
    mq.publish(15)
    expect_error_then_recovery(mq, q, QueueError.BUFFER_OUT_OF_MEMORY)


def test_readable_after_writable(mem):
    mq, q = make(mem)
    mq.set_descriptor(14, 0x80000, 4, VIRTQ_DESC_F_WRITE | VIRTQ_DESC_F_NEXT, next=15)
    mq.set_descriptor(15, 0x80010, 4)
    mq.publish(14)
    expect_error_then_recovery(mq, q, QueueError.WRITABLE_BEFORE_READABLE)


def test_indirect_not_negotiated(mem):
    mq, q = make(mem, indirect_desc=False)
    mq.add_chain([b"x"], indirect=True)
    expect_error_then_recovery(mq, q, QueueError.INDIRECT_NOT_NEGOTIATED)


def test_indirect_in_indirect(mem):
    mq, q = make(mem)
    inner = mq.alloc(16, alignment=16)
    mq.set_descriptor(0, 0x80000, 4, table=inner)
    outer = mq.alloc(16, alignment=16)
    mq.set_descriptor(0, inner, 16, VIRTQ_DESC_F_INDIRECT, table=outer)
    mq.set_descriptor(15, outer, 16, VIRTQ_DESC_F_INDIRECT)
    mq.publish(15)
    expect_error_then_recovery(mq, q, QueueError.INDIRECT_IN_INDIRECT)


def test_indirect_with_next(mem):
    mq, q = make(mem)
    table = mq.alloc(16, alignment=16)
    mq.set_descriptor(0, 0x80000, 4, table=table)
    mq.set_descriptor(14, table, 16, VIRTQ_DESC_F_INDIRECT | VIRTQ_DESC_F_NEXT, next=15)
    mq.publish(14)
    expect_error_then_recovery(mq, q, QueueError.INDIRECT_WITH_NEXT)


@pytest.mark.parametrize("length", [0, 20])
def test_indirect_table_bad_length(mem, length):
    mq, q = make(mem)
    mq.set_descriptor(15, mq.alloc(32, alignment=16), length, VIRTQ_DESC_F_INDIRECT)
    mq.publish(15)
    expect_error_then_recovery(mq, q, QueueError.INDIRECT_TABLE_INVALID)


def test_indirect_table_outside_memory(mem):
    mq, q = make(mem)
    mq.set_descriptor(15, OUTSIDE, 32, VIRTQ_DESC_F_INDIRECT)
    mq.publish(15)
    expect_error_then_recovery(mq, q, QueueError.INDIRECT_TABLE_OUT_OF_MEMORY)


def test_loop_inside_indirect_table(mem):
    mq, q = make(mem)
    table = mq.alloc(32, alignment=16)
    mq.set_descriptor(0, 0x80000, 4, VIRTQ_DESC_F_NEXT, next=1, table=table)
    mq.set_descriptor(1, 0x80000, 4, VIRTQ_DESC_F_NEXT, next=0, table=table)
    mq.set_descriptor(15, table, 32, VIRTQ_DESC_F_INDIRECT)
    mq.publish(15)
    expect_error_then_recovery(mq, q, QueueError.CHAIN_TOO_LONG)


def test_chain_larger_than_4gib():
    mem = GuestMemory.from_ranges([(0, (1 << 32) + 0x100000)])    # sparse memfd: costs nothing
    try:
        mq = MockQueue(mem, 16, base=1 << 32)
        q = mq.create_queue()
        mq.set_descriptor(14, 0, 0xFFFF_FFFF, VIRTQ_DESC_F_NEXT, next=15)
        mq.set_descriptor(15, 0, 2)
        mq.publish(14)
        expect_error_then_recovery(mq, q, QueueError.CHAIN_TOO_LARGE)
    finally:
        mem.close()


def test_avail_index_jump(mem):
    mq, q = make(mem, size=8)
    seen = []
    q2 = mq.create_queue(on_error=lambda queue, err: seen.append(err.kind))
    mq.set_avail_idx(9)
    assert q2.pop() is None and q2.pop() is None
    assert seen == [QueueError.AVAIL_INDEX_JUMP]             # reported once, not per poll
    assert q2.next_avail == 0
    mq.set_avail_idx(0)                                      # the driver repairs it
    head = mq.add_chain([b"fine"])
    assert q2.pop().head == head


# --- notification suppression -----------------------------------------------------------------
def test_ring_flags_notifications(mem):
    mq, q = make(mem)
    q.disable_notification()
    assert mq.used_flags == VIRTQ_USED_F_NO_NOTIFY
    assert q.enable_notification() is False and mq.used_flags == 0
    head = mq.add_chain([b"a"])
    q.disable_notification()
    assert q.enable_notification() is True                 # work arrived while disabled
    assert q.needs_notification() is False                 # nothing used yet
    q.add_used(q.pop().head, 0)
    assert q.needs_notification() is True
    assert q.needs_notification() is False                 # already signalled
    mq.set_avail_flags(VIRTQ_AVAIL_F_NO_INTERRUPT)
    mq.add_chain([b"b"])
    q.add_used(q.pop().head, 0)
    assert q.needs_notification() is False
    assert [u.id for u in mq.used()][0] == head


def test_event_idx_notifications(mem):
    mq, q = make(mem, event_idx=True)
    q.disable_notification()
    assert mq.used_flags == 0                              # event idx does not use the flag
    for _ in range(3):
        mq.add_chain([b"x"])
    for chain in q:
        q.add_used(chain.head, 0)
    assert q.enable_notification() is False
    assert mq.avail_event == 3                             # kick me when you pass 3
    mq.set_used_event(5)                                   # driver: interrupt me after entry 5
    assert q.needs_notification() is False                 # used went 0 -> 3
    for _ in range(3):
        mq.add_chain([b"y"])
    for chain in q:
        q.add_used(chain.head, 0)
    assert q.needs_notification() is True                  # used went 3 -> 6, crossing 5


def test_indices_wrap_at_16_bits(mem):
    mq, q = make(mem, size=4, event_idx=True)
    start = 0xFFFE
    mq.set_avail_idx(start)
    mem.write_u16(mq.used_ring + 2, start)
    mq._last_used = start
    q._next_avail = q._next_used = q._signalled_used = start
    heads = [mq.add_chain([bytes([i])]) for i in range(3)]
    got = []
    for chain in q:
        got.append(chain.head)
        q.add_used(chain.head, 1)
    assert got == heads
    assert q.next_avail == q.next_used == 1 and mq.used_idx == 1
    mq.set_used_event(0xFFFF)
    assert q.needs_notification() is True
    assert [u.id for u in mq.used()] == heads


# --- property tests -----------------------------------------------------------------------------
payloads = st.lists(st.binary(min_size=1, max_size=64), max_size=3)
writables = st.lists(st.integers(1, 64), max_size=3)


@settings(max_examples=60, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(st.lists(st.tuples(payloads, writables, st.booleans()), min_size=1, max_size=6))
def test_well_formed_chains_round_trip(mem, chains):
    mq, q = make(mem, size=64)
    pushed = []
    for readable, writable, indirect in chains:
        if not readable and not writable:
            readable = [b"-"]
        pushed.append((mq.add_chain(readable, writable, indirect=indirect), readable, writable))
    for head, readable, writable in pushed:
        chain = q.pop()
        assert chain.head == head
        assert chain.reader().read(1 << 16) == b"".join(readable)
        assert chain.writable_len == sum(writable)
        q.add_used(chain.head, chain.writer().write(b"\xAA" * 1000))
    assert q.pop() is None and sum(q.errors.values()) == 0
    assert mq.used() == [UsedElement(h, sum(w)) for h, _, w in pushed]


addresses = st.one_of(st.integers(0x60000, 0x70000), st.sampled_from([0, MEM_SIZE - 8, OUTSIDE]),
                      st.integers(0, (1 << 64) - 1))
descriptors = st.tuples(addresses, st.sampled_from([0, 1, 16, 32, 48, 4096, 0xFFFF_FFFF]),
                        st.integers(0, 7), st.integers(0, 20))


@settings(max_examples=100, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(size=st.sampled_from([1, 2, 4, 8, 16]), table=st.lists(descriptors, min_size=16, max_size=16),
       indirect=st.lists(descriptors, min_size=4, max_size=4),
       heads=st.lists(st.integers(0, 20), max_size=20), avail_idx=st.integers(0, 0xFFFF),
       indirect_ok=st.booleans(), event_idx=st.booleans())
def test_malformed_chains_never_break_the_queue(mem, size, table, indirect, heads, avail_idx,
                                                indirect_ok, event_idx):
    mq, q = make(mem, size=size, indirect_desc=indirect_ok, event_idx=event_idx)
    indirect_table = 0x60000                   # where half the random addresses point
    for i, (addr, length, flags, nxt) in enumerate(indirect):
        mq.set_descriptor(i, addr, length, flags, nxt, table=indirect_table)
    for i, (addr, length, flags, nxt) in enumerate(table[:size]):
        mq.set_descriptor(i, addr, length, flags, nxt)
    for slot, head in enumerate(heads[:size]):
        mem.write_u16(mq.avail_ring + 4 + 2 * slot, head)
    mq.set_avail_idx(avail_idx)

    popped = 0
    while (chain := q.pop()) is not None:
        popped += 1
        assert popped <= size
        assert 0 <= chain.head < size
        for buf in chain.readable + chain.writable:
            assert buf.length > 0 and mem.is_valid(buf.gpa, buf.length)
        assert chain.readable_len + chain.writable_len <= 1 << 32
        q.add_used(chain.head, 0)
        q.needs_notification()

    consumed = avail_idx if avail_idx <= size else 0
    assert q.next_avail == consumed
    bad_heads = q.errors[QueueError.HEAD_OUT_OF_RANGE]
    assert mq.used_idx == consumed - bad_heads
    assert popped + sum(n for k, n in q.errors.items() if k is not QueueError.AVAIL_INDEX_JUMP) == consumed

    # The driver repairs its ring: the queue serves it as if nothing happened.
    mq.set_descriptor(0, 0x50000, 8)
    mem.write_u16(mq.avail_ring + 4 + 2 * (q.next_avail % size), 0)
    mq.set_avail_idx(q.next_avail + 1)
    chain = q.pop()
    assert chain.head == 0 and chain.readable == (Buffer(0x50000, 8),) and chain.writable == ()


def test_a_guest_resetting_in_a_loop_cannot_flood_the_log(mem, caplog):
    """Each queue logs a kind of guest error once; a reset makes a new queue, so without a
    limit across queues a guest resetting in a loop writes a line per reset (the fuzz
    guest's logs showed it). 100 new queues with the same bad chain: one line."""
    import logging

    caplog.set_level(logging.WARNING)
    for _ in range(100):
        mq = MockQueue(mem, 16, base=0x1000, data_size=0x40000)
        q = mq.create_queue(name="flood-q0")
        mq.set_descriptor(0, 0x80000, 4, VIRTQ_DESC_F_NEXT, next=99)    # next past the table
        mq.publish(0)
        assert q.pop() is None
        assert q.errors[QueueError.DESCRIPTOR_OUT_OF_RANGE] == 1
    lines = [r for r in caplog.records if "flood-q0" in r.getMessage()]
    assert len(lines) == 1


def test_add_used_batch_publishes_every_element_with_one_index_store(mem):
    mq, q = make(mem)
    heads = [mq.add_chain(writable=[8]) for _ in range(3)]
    chains = [q.pop() for _ in heads]
    stores = []

    class Spy:
        def __init__(self, ring):
            self.ring = ring

        def __getitem__(self, i):
            return self.ring[i]

        def __setitem__(self, i, value):
            stores.append((i, value))
            self.ring[i] = value

    q._used = Spy(q._used)
    q.add_used_batch([(c.head, 8) for c in chains])
    assert stores == [(1, 3)]                   # used.idx written once, after the elements
    assert mq.used() == [UsedElement(h, 8) for h in heads]
    with pytest.raises(ValueError):
        q.add_used_batch([(16, 0)])
