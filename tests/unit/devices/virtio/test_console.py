import struct

from pych.devices.virtio.console import (RECEIVEQ, TRANSMITQ, VIRTIO_CONSOLE_F_EMERG_WRITE,
                                         VIRTIO_CONSOLE_F_SIZE, VirtioConsole)

from tests.support.virtio import DeviceHarness, wait_until


class Sink:
    def __init__(self):
        self.data = bytearray()

    def write(self, data):
        self.data += data


def test_output_goes_to_the_sink():
    sink = Sink()
    with DeviceHarness(VirtioConsole(sink)) as h:
        mq = h.queue(TRANSMITQ)
        heads = [mq.add_chain([b"hello, "]), mq.add_chain([b"wor", b"ld\n"])]
        h.kick(TRANSMITQ)
        assert h.wait_used(TRANSMITQ, 2) == [(heads[0], 0), (heads[1], 0)]
        assert bytes(sink.data) == b"hello, world\n"


def test_input_fills_receive_buffers():
    with DeviceHarness(VirtioConsole(Sink())) as h:
        mq = h.queue(RECEIVEQ)
        head = mq.add_chain(writable=[8])
        buffers = mq.writable_buffers(head)
        h.kick(RECEIVEQ)                                  # buffers but no input yet
        assert h.device.enqueue_input(b"ls\n") == 3
        assert h.wait_used(RECEIVEQ) == [(head, 3)]
        assert mq.read_writable(buffers)[:3] == b"ls\n"
        assert h.interrupt.wait(lambda i: i.queue_notifications.get(RECEIVEQ, 0) >= 1)


def test_input_waits_for_buffers_and_is_split_across_them():
    with DeviceHarness(VirtioConsole(Sink()), event_idx=True) as h:
        h.device.enqueue_input(b"0123456789")             # no receive buffers posted yet
        mq = h.queue(RECEIVEQ)
        first = mq.add_chain(writable=[4])
        first_buf = mq.writable_buffers(first)
        second = mq.add_chain(writable=[4])
        second_buf = mq.writable_buffers(second)
        h.kick(RECEIVEQ)
        assert h.wait_used(RECEIVEQ, 2) == [(first, 4), (second, 4)]
        assert mq.read_writable(first_buf) + mq.read_writable(second_buf) == b"01234567"
        assert wait_until(lambda: mq.avail_event == 2)    # asks for a kick on the next buffer
        third = mq.add_chain(writable=[16])
        h.kick(RECEIVEQ)
        assert h.wait_used(RECEIVEQ) == [(third, 2)]


def test_input_limit():
    console = VirtioConsole(input_limit=4)
    assert console.enqueue_input(b"abcdef") == 4
    assert console.dropped_input == 2
    console.shutdown()


def test_config_size_and_resize():
    console = VirtioConsole(cols=80, rows=25)
    assert console.avail_features & VIRTIO_CONSOLE_F_SIZE
    assert struct.unpack("<HHII", console.config_bytes()) == (80, 25, 1, 0)
    with DeviceHarness(console) as h:
        generation = console.config_generation
        console.resize(132, 43)
        assert console.read_config(0, 4) == 43 << 16 | 132
        assert console.config_generation == generation + 1
        assert h.interrupt.config_notifications == 1
    assert not VirtioConsole().avail_features & VIRTIO_CONSOLE_F_SIZE


def test_emergency_write():
    sink = Sink()
    console = VirtioConsole(sink)
    console.write_config(8, 4, ord("!"))                 # not negotiated yet: ignored
    console.ack_features(VIRTIO_CONSOLE_F_EMERG_WRITE)
    console.write_config(8, 4, ord("!"))
    assert bytes(sink.data) == b"!"
    console.shutdown()
