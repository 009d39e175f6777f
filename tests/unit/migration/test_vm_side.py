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
from tests.support.host import fd_is_open


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


def test_the_receiver_takes_named_taps_from_their_fds_and_gives_fd_nets_new_ones():
    fds = [os.eventfd(0) for _ in range(3)]
    vm = _Vm([_Net("_net1"), _Net("_net2", fds=[97])])
    target = VmTarget(vm)
    target.finish({}, {"taps": {"_net1": [0, 1], "_net2": [2]}, "persisted": []}, fds)
    assert vm.taken == {"_net1": fds[:2]}                  # adopted, not opened by name
    assert vm.config.net[1].fds == [fds[2]]                # the fd net's new fd (the VMM's)
    assert [fd_is_open(fd) for fd in fds] == [False, False, True]
    os.close(fds[2])


def test_a_failed_finish_closes_every_tap_fd_not_taken_and_fd_nets_need_theirs():
    fds = [os.eventfd(0) for _ in range(3)]
    vm = _Vm([_Net("_net1"), _Net("_net2"), _Net("_net3", fds=[5])], fail=True)
    with pytest.raises(ValueError, match="cannot restore"):
        VmTarget(vm).finish({}, {"taps": {"_net1": [0], "_net2": [1], "_net3": [2]}}, fds)
    assert not any(fd_is_open(fd) for fd in fds)
    fds = [os.eventfd(0)]
    vm = _Vm([_Net("_net1"), _Net("_net3", fds=[5])])
    with pytest.raises(MigrationError, match="_net3 was given tap fds and none came"):
        VmTarget(vm).finish({}, {"taps": {"_net1": [0]}}, fds)
    assert not fd_is_open(fds[0])
    with pytest.raises(MigrationError, match="not the ones passed"):
        VmTarget(_Vm([_Net("_net1")])).finish({}, {"taps": {"_net1": [1]}}, [])


# --- a virtio-fs connection handed over by a local migration (VmSource/VmTarget) -----------------
class _SourceVm:
    """What VmSource uses of a Vm whose one device is a virtio-fs ``fs`` on ``transport``:
    its RAM is ``machine``'s (one memfd, passed with CONFIG)."""

    def __init__(self, machine, fs, transport):
        from types import SimpleNamespace
        self.machine, self.fs, self.transport = machine, fs, transport
        self.memory = SimpleNamespace(
            saved_regions=lambda: [], save_state=lambda: {"ram": machine.mem.regions[0].size},
            shared_fds=lambda: ({"zone:ram": 0}, [machine.mem.regions[0].fd]))
        self.devices = SimpleNamespace(slots=lambda: {"_fs0": {"slot": 1}},
                                       disk_images=lambda: [], tap_nets=lambda: {},
                                       vhost_user_devices=lambda: {"_fs0": fs})
        self.calls: list[str] = []

    def pause(self):
        self.calls.append("pause")

    def resume(self):
        self.calls.append("resume")

    def save_state(self, *, local_migration=False):
        self.calls.append(f"save local={local_migration}")
        return {"_fs0": self.transport.save_state()}


class _TargetVm:
    """What VmTarget uses of a Vm: finish_incoming builds the virtio-fs device on a
    receiver machine mapping the sender's memfd, as DeviceManager does with an adopted
    connection (``fail``: then fails, as a device restoring its state may)."""

    def __init__(self, memfd: int, socket_path: str, fail: bool = False):
        from types import SimpleNamespace
        from tests.unit.devices.virtio.test_vhost_user_device import AdoptingMsiManager
        from tests.unit.devices.virtio.test_pci import Machine
        self.config = SimpleNamespace(net=[], fs=[SimpleNamespace(id="_fs0",
                                                                  socket=socket_path)])
        self.machine = Machine()
        size = self.machine.mem.regions[0].size
        self.machine.mem.close()
        self.machine.mem = GuestMemory()
        self.machine.mem.add_region(0, size, fd=memfd)
        self.machine.msi = AdoptingMsiManager()
        self.fs = None
        self.fail = fail
        self.resumed = False
        from types import SimpleNamespace as NS
        self.devices = NS(vhost_user_devices=lambda: {"_fs0": self.fs} if self.fs else {},
                          tap_nets=lambda: {})
        self.closed = False

    def finish_incoming(self, state, taps, vhost_user=None):
        from pych.devices.virtio.fs import VirtioFs
        from pych.devices.virtio.pci_transport import VirtioPciDevice
        try:
            self.fs = VirtioFs("hostfs", "fake.sock", name="_fs0",
                               adopted=vhost_user.pop("_fs0"))
            transport = VirtioPciDevice(self.fs, self.machine.mem, self.machine.msi,
                                        self.machine.ioevents)
            transport.adopt_notifiers(*self.fs.take_adopted_notifiers())
            self.machine.pci.add_device(transport)
            transport.restore_state(state["_fs0"])
            self.machine.pci.restore_bars()
            if self.fail:
                raise ValueError("device _disk0: cannot restore")
        except BaseException:
            self.close()
            raise

    def resume(self):
        self.resumed = True

    def close(self):
        if not self.closed:
            self.closed = True
            self.machine.close()
            self.machine.msi.close()


def _migrate(fail_receiver: bool):
    """A local migration of a VM with one virtio-fs device served by the recording fake
    back-end, over a socketpair: (back-end, sender outcome, receiver outcome, source VM,
    target VM, messages the back-end had before)."""
    import socket
    import threading
    from pych.migration import receiver, sender
    from pych.migration.protocol import Channel
    from pych.migration.vm_side import VmSource
    from tests.unit.devices.test_vhost_user import FakeBackend
    from tests.unit.devices.virtio.test_fs import EventfdMsiManager, make_fs
    from tests.unit.devices.virtio.test_pci import Machine, bring_up
    backend = FakeBackend(check_rings=True)
    backend._client.settimeout(30)
    machine = Machine()
    machine.msi = EventfdMsiManager()
    fs = make_fs(backend, name="_fs0")
    transport, driver, _ = bring_up(machine, fs, queue_size=64)
    source_vm = _SourceVm(machine, fs, transport)
    config = type("Config", (), {"model_dump": lambda self, mode: {"fs": [{"id": "_fs0"}]}})()
    source = VmSource(source_vm, config, local=True)
    sent = len(backend.messages)
    a, b = socket.socketpair()
    out: dict = {}

    def build(body, fds):
        [memfd] = fds
        out["vm"] = _TargetVm(memfd, "fake.sock", fail=fail_receiver)
        return VmTarget(out["vm"])

    def run():
        try:
            out["result"] = receiver.receive(Channel(b, timeout=10), build)
        except BaseException as e:  # noqa: BLE001
            out["error"] = e
    thread = threading.Thread(target=run, daemon=True)
    thread.start()
    try:
        stats = sender.send(Channel(a, timeout=10), source, local=True)
    except BaseException as e:  # noqa: BLE001
        stats = e
    thread.join(10)
    a.close()
    b.close()
    return backend, stats, out, source_vm, sent, driver


def test_a_local_migration_passes_the_virtio_fs_connection_with_state():
    backend, stats, out, source_vm, sent, _ = _migrate(fail_receiver=False)
    target = out["vm"]
    try:
        assert "error" not in out and stats.local, (stats, out.get("error"))
        assert source_vm.calls == ["pause", "save local=True"]
        assert target.resumed and target.fs.active and not target.fs._held   # committed
        assert len(backend.messages) == sent                # neither side said a word
        source_vm.machine.close()                           # the sender's VM ends
        source_vm.machine.msi.close()
        assert not backend.eof                              # virtiofsd would go on
        # the receiver serves: its driver's reset stops the back-end's rings
        target.fs.reset()
        assert backend.requests()[sent:] == ["SET_VRING_ENABLE", "GET_VRING_BASE"] * 2
    finally:
        target.close()
        backend.close()


def test_a_receiver_that_refuses_the_state_gives_the_sender_its_connection_back():
    backend, stats, out, source_vm, sent, driver = _migrate(fail_receiver=True)
    try:
        assert isinstance(stats, MigrationError) and "cannot restore" in str(stats)
        assert "error" in out and out["vm"].fs is not None
        assert source_vm.calls == ["pause", "save local=True", "resume"]
        assert len(backend.messages) == sent and not backend.eof    # nothing sent, no hang-up
        fs = source_vm.fs
        assert fs.active and fs._monitor is not None               # served again
        fs.reset()
        assert backend.requests()[sent:] == ["SET_VRING_ENABLE", "GET_VRING_BASE"] * 2
    finally:
        source_vm.machine.close()
        source_vm.machine.msi.close()
        backend.close()


def test_vhost_user_fds_for_a_device_the_vm_lacks_are_refused_and_closed():
    fds = [os.eventfd(0) for _ in range(3)]
    vm = _Vm([])
    vm.config.fs = []
    spec = {"_fs9": {"socket": 0, "rings": {"0": {"kick": 1, "call": 2, "vector": 1}},
                     "session": {"connection": {}}}}
    with pytest.raises(MigrationError, match="_fs9, which is not a virtio-fs or vhost-user-blk device"):
        VmTarget(vm).finish({}, {"taps": {}, "vhost_user": spec}, fds)
    assert not any(fd_is_open(fd) for fd in fds)
    fds = [os.eventfd(0) for _ in range(2)]
    with pytest.raises(MigrationError, match="not the ones passed"):
        VmTarget(vm).finish({}, {"taps": {}, "vhost_user": spec}, fds)
    assert not any(fd_is_open(fd) for fd in fds)
    fds = [os.eventfd(0)]
    with pytest.raises(MigrationError, match="malformed vhost-user hand-over"):
        VmTarget(vm).finish({}, {"taps": {}, "vhost_user": {"_fs0": {"rings": {}}}}, fds)
    for fd in fds:                                  # nothing named: the generic check's
        assert not fd_is_open(fd)
