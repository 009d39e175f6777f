"""``pci_device_id``: a device asks for its PCI slot (reference §5.3), at boot and on hot plug.

Rules checked here, with the reference's messages: 0..31 only ("Given PCI device ID (N) is
out of the supported range of 0..32"), slot 0 of segment 0 is the host bridge ("Given PCI
device ID (0) is reserved"), a taken slot is refused ("Valid PCI device identifier but already
used: N"); at boot the requested slots are reserved before any device is placed, so devices
without a request go around them. A refused request leaves nothing behind: no slot, no id,
no fd, no lock, nothing in the configuration.
"""

from __future__ import annotations

import json
import os

import pytest

from pych.api import ApiServer
from pych.api.client import ApiClient
from pych.api.errors import status_of
from pych.config import ConfigError
from pych.device_manager.manager import DeviceBackendError
from pych.devices.pci.bus import PciDeviceIdInUse
from pych.errors import VmmError
from pych.vmm import Vmm

from tests.support.fakes import RecordingEvents
from tests.support.host import lock_is_free
from tests.support.machines import DeviceManagerMachine, boot_fake, vm_config

MiB = 1 << 20


@pytest.fixture
def images(tmp_path):
    paths = []
    for name in ("a.raw", "b.raw", "c.raw"):
        path = tmp_path / name
        path.write_bytes(bytes(MiB))
        paths.append(str(path))
    return paths


def open_files() -> list[str]:
    """What this process's descriptors point to, sockets (the API connections, which the
    server closes on its own threads) left out."""
    targets = (_readlink(f"/proc/self/fd/{fd}") for fd in os.listdir("/proc/self/fd"))
    return sorted(t for t in targets if t and not t.startswith("socket:"))


def _readlink(path: str) -> str:
    try:
        return os.readlink(path)
    except OSError:
        return ""


def bdfs(machine: DeviceManagerMachine) -> dict[str, str]:
    """device id -> BDF, from the device tree."""
    return {node["children"][0]: node["pci_bdf"] for node in machine.dm.device_tree().values()
            if "pci_bdf" in node}


# --- at boot ------------------------------------------------------------------------------------
def test_requested_slots_are_reserved_before_any_device_is_placed(images):
    """Without the reservation the first disk would take slot 1 and the second disk's
    request for slot 1 would fail."""
    m = DeviceManagerMachine(vm_config(disks=[{"path": images[0]},
                                              {"path": images[1], "pci_device_id": 1}],
                                       rng={"src": "/dev/urandom", "pci_device_id": 0x1f}))
    try:
        assert bdfs(m) == {"_disk0": "0000:00:02.0", "_disk1": "0000:00:01.0",
                           "__rng": "0000:00:1f.0"}
        assert m.dm.pci.device(1).config_read(0, 4) == 0x1042_1AF4     # virtio-blk at 00:01.0
        assert m.dm.pci.device(0x1f).config_read(0, 4) == 0x1044_1AF4  # virtio-rng at 00:1f.0
    finally:
        m.close()


def boot_fails(config, error: type[Exception], match: str) -> None:
    """Boot ``config``, which must fail with ``error``; then close what the boot made, as
    the VM's teardown does."""
    m = DeviceManagerMachine.__new__(DeviceManagerMachine)
    with pytest.raises(error, match=match):
        DeviceManagerMachine.__init__(m, config)
    m.close()


def test_a_slot_requested_twice_at_boot_is_refused_and_leaves_nothing(images):
    fds = open_files()
    config = vm_config(disks=[{"path": images[0]}, {"path": images[1], "pci_device_id": 5},
                              {"path": images[2], "pci_device_id": 5}])
    boot_fails(config, PciDeviceIdInUse, r"^Valid PCI device identifier but already used: 5$")
    assert [d.id for d in config.disks] == [None, None, None]   # generated ids taken back
    assert open_files() == fds and all(lock_is_free(p) for p in images)


def test_a_boot_device_with_an_unusable_backend_is_a_backend_error(images, tmp_path):
    """DeviceBackendError is what vm.boot answers with 400."""
    fds = open_files()
    config = vm_config(disks=[{"path": images[0]}, {"path": str(tmp_path / "missing.raw")}])
    boot_fails(config, DeviceBackendError, "missing.raw.*No such file")
    assert [d.id for d in config.disks] == [None, None]
    assert open_files() == fds and lock_is_free(images[0])


@pytest.mark.parametrize(("device_id", "message"), [
    (32, "Given PCI device ID (32) is out of the supported range of 0..32"),
    (255, "Given PCI device ID (255) is out of the supported range of 0..32"),
    (0, "Given PCI device ID (0) is reserved"),
])
def test_out_of_range_and_host_bridge_ids_fail_validation(device_id, message, images):
    config = vm_config(disks=[{"path": images[0], "pci_device_id": device_id}])
    with pytest.raises(ConfigError) as e:
        config.validate()
    assert str(e.value) == message


def test_vm_boot_answers_400_for_a_device_backend_error(monkeypatch):
    vmm = Vmm(event_monitor=RecordingEvents())
    vmm.vm_create(vm_config())

    def fail():
        raise DeviceBackendError("cannot open or create tap 'lo': an interface of that name "
                                 "exists and is not a tap")
    monkeypatch.setattr(vmm, "_start_vm", fail)
    with pytest.raises(VmmError) as e:
        vmm.vm_boot()
    assert status_of(e.value) == 400
    assert e.value.messages == ["Error booting VM", "cannot open or create tap 'lo': an interface "
                                "of that name exists and is not a tap"]
    assert vmm.vm is None


# --- on hot plug, over HTTP ---------------------------------------------------------------------
@pytest.fixture
def running(tmp_path):
    """A VMM whose 'booted' VM is a DeviceManager on fake KVM objects (rng in slot 1), served
    on a Unix socket the way pych serves it."""
    vmm = Vmm(event_monitor=RecordingEvents())
    vmm.vm_create(vm_config())
    m = boot_fake(vmm)
    server = ApiServer(lambda fn: fn(vmm), path=tmp_path / "api.sock")
    server.start()
    yield vmm, m, ApiClient(str(tmp_path / "api.sock"))
    server.close()
    m.close()


@pytest.mark.parametrize(("device_id", "status", "last_message"), [
    (32, 400, "Given PCI device ID (32) is out of the supported range of 0..32"),
    (0, 400, "Given PCI device ID (0) is reserved"),
    # the reference's status for a taken slot (a device-manager error): 500
    (1, 500, "Valid PCI device identifier but already used: 1"),
])
def test_hot_plug_refuses_a_bad_pci_device_id_and_leaves_nothing(running, images, device_id,
                                                                 status, last_message):
    vmm, m, client = running
    fds = open_files()
    got, body = client.put("vm.add-disk", {"path": images[0], "pci_device_id": device_id})
    assert got == status, body
    messages = json.loads(body)
    assert messages[0] == "Error from API" and messages[-1] == last_message, messages
    assert vmm.config.disks is None
    assert m.scan() == (0, 0) and m.notified == []
    assert open_files() == fds and lock_is_free(images[0])
    # no slot and no id was consumed: the next disk is the first one
    got, body = client.put("vm.add-disk", {"path": images[0]})
    assert (got, json.loads(body)) == (200, {"id": "_disk0", "bdf": "0000:00:02.0"})


def test_hot_plug_a_u8_overflow_is_a_400(running, images):
    vmm, _, client = running
    status, body = client.put("vm.add-disk", {"path": images[0], "pci_device_id": 256})
    assert status == 400, body
    assert vmm.config.disks is None


def test_hot_plug_at_a_requested_slot(running, images):
    vmm, m, client = running
    status, body = client.put("vm.add-disk", {"path": images[0], "pci_device_id": 9})
    assert (status, json.loads(body)) == (200, {"id": "_disk0", "bdf": "0000:00:09.0"})
    assert m.scan() == (1 << 9, 0)
    assert m.dm.pci.device(9).config_read(0, 4) == 0x1042_1AF4
    assert [(d.id, d.pci_device_id) for d in vmm.config.disks] == [("_disk0", 9)]
    # the next dynamic device still takes the lowest free slot
    status, body = client.put("vm.add-disk", {"path": images[1]})
    assert (status, json.loads(body)) == (200, {"id": "_disk1", "bdf": "0000:00:02.0"})
    status, body = client.put("vm.add-disk", {"path": images[2], "pci_device_id": 9})
    assert status == 500 and json.loads(body)[-1] == "Valid PCI device identifier but already used: 9"
