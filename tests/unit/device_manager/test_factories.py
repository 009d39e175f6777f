"""The device factories and the device-kind registry: which kinds pych builds, at boot and on
hot plug, and what it refuses."""

from __future__ import annotations

import pytest

from pych.config import DiskConfig
from pych.config.kinds import BY_NAME, DEVICE_KINDS
from pych.device_manager.factories import FACTORIES
from pych.device_manager.manager import DeviceManagerError

from tests.support.machines import DeviceManagerMachine as Machine, vm_config


def test_every_factory_is_for_a_kind_of_the_registry():
    assert set(FACTORIES) <= {kind.name for kind in DEVICE_KINDS}
    assert {"console", "disk", "net", "rng", "fs", "pmem", "vsock", "balloon"} == set(FACTORIES)


def test_a_console_that_is_off_is_not_created():
    m = Machine(vm_config())                      # --console off: the rng is in slot 1
    try:
        assert set(m.dm.device_tree()) == {"__rng", "_virtio-pci-__rng"}
    finally:
        m.close()
    assert not FACTORIES["console"].wanted(vm_config().console)


def test_single_kinds_take_the_id_they_are_given():
    """The console, the rng and the balloon are ``__console``, ``__rng`` and ``__balloon``
    unless their configuration names them, as in the reference."""
    m = Machine(vm_config(rng={"src": "/dev/urandom", "id": "entropy"},
                          balloon={"size": 0, "id": "b0"}))
    try:
        assert set(m.dm.device_tree()) == {"entropy", "_virtio-pci-entropy",
                                           "b0", "_virtio-pci-b0"}
        assert m.dm.balloon is not None
    finally:
        m.close()


@pytest.mark.parametrize("kind", ["console", "rng", "balloon", "vdpa"])
def test_kinds_pych_cannot_hot_plug_are_refused_and_leave_nothing(kind):
    m = Machine(vm_config())
    try:
        with pytest.raises(DeviceManagerError, match=f"{kind} devices cannot be hot plugged"):
            m.dm.hotplug(BY_NAME[kind], DiskConfig(path="/nonexistent"))
        assert m.notified == [] and m.scan() == (0, 0)
        assert set(m.dm.device_tree()) == {"__rng", "_virtio-pci-__rng"}
    finally:
        m.close()


@pytest.mark.skipif(__import__("os").geteuid() != 0, reason="TAP TESTS NOT RUN: need root")
def test_a_net_with_two_pairs_gets_two_tap_queues_by_name_and_by_fd():
    """``num_queues=4``: two queues of one IFF_MULTI_QUEUE tap, created by pych or passed as
    ``fd=[a,b]`` (duplicated: the caller's fds stay open)."""
    import os

    from pych.config import NetConfig
    from pych.device_manager.factories import FactoryContext, make_net
    from pych.devices.net.tap import open_queues

    from tests.unit.devices.net.test_tap import in_new_netns

    def run():
        created = make_net(NetConfig(num_queues=4), "_net0", FactoryContext(mmio64=None))
        try:
            by_name = [t.name for t in created.taps]
        finally:
            created.shutdown()
        caller = open_queues("mq0", 2)
        try:
            given = make_net(NetConfig(num_queues=4, fds=[t.fd for t in caller]), "_net1",
                             FactoryContext(mmio64=None))
            by_fd = ([t.name for t in given.taps], [t.fd for t in given.taps])
            given.shutdown()
            still_open = all(os.fstat(t.fd) for t in caller)
        finally:
            for t in caller:
                t.close()
        return by_name, by_fd, [t.fd for t in caller], still_open

    by_name, (names, fds), caller_fds, still_open = in_new_netns(run)
    assert len(by_name) == 2 and by_name[0] == by_name[1]
    assert names == ["mq0", "mq0"] and set(fds).isdisjoint(caller_fds) and still_open


@pytest.mark.skipif(__import__("os").geteuid() != 0, reason="TAP TESTS NOT RUN: need root")
def test_a_local_migrations_receiver_takes_the_tap_queues_it_was_passed():
    """``adopt_taps``: the sender's tap queue fds (SCM_RIGHTS) are taken, not opened by
    name, and closed once the device has its own."""
    import os

    from pych.config import NetConfig
    from pych.device_manager.factories import FactoryContext, make_net
    from pych.devices.net.tap import open_queues

    from tests.unit.devices.net.test_tap import in_new_netns

    def run():
        sender = open_queues("mig0", 2)
        passed = [os.dup(t.fd) for t in sender]
        try:
            device = make_net(NetConfig(num_queues=4, tap="other0"), "_net0",
                              FactoryContext(mmio64=None, adopt_taps={"_net0": passed}))
            names = [t.name for t in device.taps]
            device.shutdown()
            closed = []
            for fd in passed:
                try:
                    os.fstat(fd)
                    closed.append(False)
                except OSError:
                    closed.append(True)
        finally:
            for t in sender:
                t.close()
        return names, closed

    names, closed = in_new_netns(run)
    assert names == ["mig0", "mig0"] and closed == [True, True]
