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
