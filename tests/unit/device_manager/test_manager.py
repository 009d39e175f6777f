"""PCI device hot plug without KVM: the device manager's add / remove / eject flows
(reference §5; the PHPR register block itself: test_hotplug.py), and the VMM's add-disk /
remove-device endpoints.

The guest side is played through the MMIO bus exactly as the AML does it: ``PCNT`` reads
PCIU and PCID, ``PCEJ`` writes PSEG then B0EJ.
"""

from __future__ import annotations

import os

import pytest

from pych.api import ApiServer
from pych.api.errors import status_of
from pych.api.handler import RequestHandler
from pych.errors import VmmError
from pych.cli.remote import main as remote_main
from pych.config import ConfigConflict, DiskConfig, NetConfig, VmRemoveDevice, VsockConfig
from pych.config.kinds import BY_NAME
from pych.device_manager.manager import (
    DeviceBackendError, DeviceIdInUse, DeviceManagerError, RemovalNotAllowed, UnknownDeviceId,
)
from pych.devices.acpi import AcpiNotification
from pych.vmm import Vmm

from tests.support.fakes import RecordingEvents
from tests.support.host import lock_is_free
from tests.support.machines import MMIO64, DeviceManagerMachine, boot_fake, vm_config

DISK = BY_NAME["disk"]


# --- the device manager ----------------------------------------------------------------------
@pytest.fixture
def image(tmp_path):
    path = tmp_path / "disk.raw"
    path.write_bytes(bytes(range(256)) * 4096)                 # 1 MiB
    return str(path)


@pytest.fixture
def machine():
    m = DeviceManagerMachine(vm_config())
    yield m
    m.close()


def open_fds() -> set[str]:
    return set(os.listdir("/proc/self/fd"))


def test_add_disk_builds_the_device_then_announces_it(machine, image):
    config = DiskConfig(path=image)
    added = machine.dm.hotplug(DISK, config)
    assert (added.id, added.bdf) == ("_disk0", "0000:00:02.0")   # rng holds slot 1
    assert added.config.path == image and config.id is None       # the request is untouched
    device = machine.dm.pci.device(2)
    assert device.config_read(0, 4) == 0x1042_1AF4             # virtio-blk, modern
    assert machine.notified == [AcpiNotification.PCI]
    assert machine.scan() == (1 << 2, 0)
    assert machine.scan() == (0, 0)
    tree = machine.dm.device_tree()
    assert tree["_virtio-pci-_disk0"]["pci_bdf"] == "0000:00:02.0"
    assert tree["_disk0"]["parent"] == "_virtio-pci-_disk0"
    assert not lock_is_free(image)
    assert device.config.bars[0].is_64bit                         # hot-plugged: 64-bit BAR
    assert MMIO64[0] <= device.config.bar_address(0) < sum(MMIO64)


def test_a_failed_add_leaves_nothing_behind(machine, image, tmp_path):
    fds = open_fds()
    with pytest.raises(DeviceBackendError, match="No such file"):
        machine.dm.hotplug(DISK, DiskConfig(path=str(tmp_path / "missing.raw")))
    with pytest.raises(DeviceManagerError, match="already used: 1"):
        machine.dm.hotplug(DISK, DiskConfig(path=image, pci_device_id=1))    # the rng's slot
    assert open_fds() == fds
    assert lock_is_free(image)
    assert all(group.released for group in machine.msi.groups[1:])       # [0] is the rng
    assert machine.notified == []
    assert machine.scan() == (0, 0)
    added = machine.dm.hotplug(DISK, DiskConfig(path=image))
    assert (added.id, added.bdf) == ("_disk0", "0000:00:02.0")


def test_remove_marks_pcid_and_the_guest_eject_tears_everything_down(machine, image):
    fds = open_fds()
    machine.dm.hotplug(DISK, DiskConfig(path=image))
    machine.enable_decoding(2)
    assert machine.ioevents.registered
    bar = machine.dm.pci.mapped_bar(2, 0)                 # where the guest's decoding put BAR0
    assert bar is not None and machine.mmio.find(bar) is not None
    machine.scan()
    ejected = []
    assert machine.dm.remove_device("_disk0", on_ejected=lambda *a: ejected.append(a)) == "_disk0"
    assert machine.scan() == (0, 1 << 2)
    assert machine.dm.pending_removal() == ["_disk0"]
    assert "_disk0" in machine.dm.device_tree()                          # until the guest ejects
    machine.dm.remove_device("_disk0", on_ejected=lambda *a: ejected.append(a))
    assert machine.scan() == (0, 1 << 2)                                 # re-signalled
    assert machine.notified == [AcpiNotification.PCI] * 3
    assert ejected == []

    machine.eject(2)
    assert ejected == [("_disk0", "0000:00:02.0")]
    assert machine.dm.pci.device(2) is None
    assert machine.dm.pending_removal() == []
    assert set(machine.dm.device_tree()) == {"__rng", "_virtio-pci-__rng"}
    assert machine.ioevents.registered == {}
    assert machine.msi.groups[-1].released
    assert machine.dm.pci.mapped_bar(2, 0) is None
    assert machine.mmio.find(bar) is None                 # its BAR left the MMIO bus
    assert lock_is_free(image)
    assert open_fds() == fds
    # slot and id are free again
    again = machine.dm.hotplug(DISK, DiskConfig(path=image, id="_disk0"))
    assert (again.id, again.bdf) == ("_disk0", "0000:00:02.0")


def test_remove_refuses_unknown_and_machine_devices(machine, image):
    with pytest.raises(UnknownDeviceId):
        machine.dm.remove_device("_disk7")
    with pytest.raises(RemovalNotAllowed, match="rng"):
        machine.dm.remove_device("__rng")
    assert machine.notified == []


def test_the_pci_node_id_removes_its_device(machine, image):
    machine.dm.hotplug(DISK, DiskConfig(path=image))
    assert machine.dm.remove_device("_virtio-pci-_disk0") == "_disk0"


def test_an_id_pending_removal_is_not_reusable_yet(machine, image, tmp_path):
    machine.dm.hotplug(DISK, DiskConfig(path=image))
    machine.dm.remove_device("_disk0")
    other = tmp_path / "other.raw"
    other.write_bytes(bytes(4096))
    with pytest.raises(DeviceIdInUse, match="removal is pending"):      # 409
        machine.dm.hotplug(DISK, DiskConfig(path=str(other), id="_disk0"))
    assert lock_is_free(str(other))


def test_the_guest_cannot_eject_a_device_not_pending_removal(machine, image):
    machine.dm.hotplug(DISK, DiskConfig(path=image))
    machine.eject(2)
    machine.eject(1)
    assert machine.dm.pci.device(2) is not None and machine.dm.pci.device(1) is not None


# --- the VMM endpoints -------------------------------------------------------------------------
@pytest.fixture
def vmm():
    vmm = Vmm(event_monitor=RecordingEvents())
    vmm.vm_create(vm_config())
    yield vmm
    if vmm.vm is not None:
        vmm.vm.devices.close()
        vmm.vm.guest_memory.close()


def test_cold_add_and_remove_only_edit_the_config(vmm, image):
    assert vmm.vm_add_disk(DiskConfig(path=image)) is None
    assert [d.path for d in vmm.config.disks] == [image]
    with pytest.raises(VmmError) as e:
        vmm.vm_remove_device(VmRemoveDevice(id="_disk0"))             # ids come at boot
    assert status_of(e.value) == 404
    vmm.vm_add_disk(DiskConfig(path=image + ".2", id="mine"))
    assert vmm.vm_remove_device(VmRemoveDevice(id="mine")) is None
    assert [d.path for d in vmm.config.disks] == [image]


def test_hot_add_answers_id_and_bdf_and_the_config_follows(vmm, image):
    m = boot_fake(vmm)
    info = vmm.vm_add_disk(DiskConfig(path=image))
    assert info.model_dump() == {"id": "_disk0", "bdf": "0000:00:02.0"}
    assert [(d.id, d.path) for d in vmm.config.disks] == [("_disk0", image)]
    with pytest.raises(ConfigConflict):                                # 409: same id again
        vmm.vm_add_disk(DiskConfig(path=image + ".2", id="_disk0"))

    assert vmm.vm_remove_device(VmRemoveDevice(id="_disk0")) is None
    assert vmm.config.disks is None                                    # at request time
    assert vmm.vm_info()["devices_pending_removal"] == ["_disk0"]
    assert vmm.events.events == []
    m.eject(2)
    assert vmm.events.events == [("vm", "device-removed", {"id": "_disk0", "bdf": "0000:00:02.0"})]
    assert vmm.vm_info()["devices_pending_removal"] == []


def test_hot_add_errors_map_to_status_codes_and_leave_the_config(vmm, image, tmp_path):
    boot_fake(vmm)
    with pytest.raises(VmmError) as e:
        vmm.vm_add_disk(DiskConfig(path=str(tmp_path / "missing.raw")))
    assert status_of(e.value) == 400 and "missing.raw" in e.value.messages[-1]
    with pytest.raises(VmmError) as e:
        vmm.vm_add_disk(DiskConfig(path=image, pci_device_id=1))
    assert status_of(e.value) == 500 and "already used: 1" in e.value.messages[-1]
    for dev_id, status in (("nope", 404), ("__rng", 500)):
        with pytest.raises(VmmError) as e:
            vmm.vm_remove_device(VmRemoveDevice(id=dev_id))
        assert status_of(e.value) == status
    assert vmm.config.disks is None


# --- pych-remote remove-device --wait ----------------------------------------------------------
class EjectingHandler(RequestHandler):
    """A running VM whose guest ejects the removed device after ``polls`` vm.info calls
    (never, if None)."""

    def __init__(self, polls: int | None):
        self.polls = polls
        self.removed: list[str] = []

    def vm_remove_device(self, request):
        self.removed.append(request.id)

    def vm_info(self):
        tree = {"_disk0": {"id": "_disk0"}, "_virtio-pci-_disk0": {"id": "_virtio-pci-_disk0"}}
        if self.polls is not None:
            if self.polls <= 0:
                tree = {}
            self.polls -= 1
        return {"config": {}, "state": "Running", "device_tree": tree}


@pytest.fixture
def api(tmp_path):
    def serve(handler):
        server = ApiServer(lambda fn: fn(handler), path=tmp_path / "api.sock")
        server.start()
        servers.append(server)
        return str(tmp_path / "api.sock")
    servers = []
    yield serve
    for server in servers:
        server.close()


def test_remove_device_wait_returns_once_the_guest_ejected(api, capsys):
    handler = EjectingHandler(polls=2)
    assert remote_main(["--api-socket", api(handler), "remove-device", "_disk0", "--wait=30"]) == 0
    assert handler.removed == ["_disk0"] and handler.polls < 0
    assert capsys.readouterr() == ("", "")


def test_remove_device_wait_times_out_with_one_clear_error(api, capsys):
    handler = EjectingHandler(polls=None)
    assert remote_main(["--api-socket", api(handler), "remove-device", "_disk0",
                        "--wait=0.3"]) == 1
    err = capsys.readouterr().err
    assert "timed out after 0.3 s waiting for the guest to eject device _disk0" in err


def test_add_net_refuses_fds_that_are_not_taps_and_closes_them(vmm):
    boot_fake(vmm)
    r, w = os.pipe()
    with pytest.raises(VmmError) as e:
        vmm.vm_add_net(NetConfig(), [r, w])
    assert status_of(e.value) == 400 and f"fd {r} is not a tap" in e.value.messages[-1]
    for fd in (r, w):
        with pytest.raises(OSError):
            os.fstat(fd)


def test_a_second_vsock_is_refused(vmm, tmp_path):
    vmm.vm_add_vsock(VsockConfig(cid=3, socket=str(tmp_path / "v.sock")))   # cold add
    with pytest.raises(VmmError) as e:
        vmm.vm_add_vsock(VsockConfig(cid=4, socket=str(tmp_path / "w.sock")))
    assert status_of(e.value) == 500 and "Too many vsock devices" in e.value.messages[-1]
    assert vmm.config.vsock.cid == 3


def test_counters_are_each_counting_devices_by_id(image):
    m = DeviceManagerMachine(vm_config(disks=[{"path": image}]))
    try:
        counters = m.dm.counters()
        assert set(counters) == {"_disk0"}                 # the rng keeps none
        assert counters["_disk0"]["read_ops"] == 0 and counters["_disk0"]["write_bytes"] == 0
    finally:
        m.close()


def test_pvpanic_is_placed_after_the_devices_and_reports_to_the_vm():
    from pych.devices.pvpanic import PVPANIC_PANICKED, PvPanicDevice

    config = vm_config()
    config.pvpanic = True
    m = DeviceManagerMachine(config)
    try:
        device = m.dm.pvpanic
        assert isinstance(device, PvPanicDevice) and "__pvpanic" in m.dm.tree
        slots = {m.dm.pci.slot_of(d) for d in m.dm.devices.values()}
        assert m.dm.pci.slot_of(device) > max(slots)
        assert device.config.bar_address(0)                 # placed in the 32-bit window
        events = []
        device.on_event = events.append
        device.bar_write(0, 0, 1, PVPANIC_PANICKED)
        assert events == ["panic"]
    finally:
        m.close()
    without = DeviceManagerMachine(vm_config())
    try:
        assert without.dm.pvpanic is None
    finally:
        without.close()


# --- vhost-user devices in a snapshot or a migration: what is refused, and why ------------------
def test_virtio_fs_is_refused_for_a_snapshot_with_the_reason_and_kept_by_a_local_migration(tmp_path):
    from pych.config import FsConfig
    from pych.config.kinds import BY_NAME
    from pych.snapshot.state import NotSnapshottable
    from tests.unit.devices.test_vhost_user import FakeBackend
    backend = FakeBackend(tmp_path / "virtiofsd.sock")
    m = DeviceManagerMachine(vm_config())
    try:
        m.dm.hotplug(BY_NAME["fs"], FsConfig(tag="share", socket=backend.path))
        with pytest.raises(NotSnapshottable) as e:
            m.dm.check_saveable()                   # a snapshot, or a migration to elsewhere
        words = str(e.value)
        assert words.startswith(f"device _fs0: the state of virtio-fs _fs0 lives in its "
                                f"back-end at {backend.path}")
        assert "virtiofsd cannot save it or hand it to another virtiofsd" in words
        assert 'a local migration (vm.send-migration with "local": true' in words
        m.dm.check_saveable(local_migration=True)   # handed over instead
        # a share whose back-end died cannot be handed over either: said so
        m.dm.devices["_fs0"].device.failure = f"the vhost-user backend at {backend.path} hung up"
        with pytest.raises(NotSnapshottable, match="device _fs0: its vhost-user connection "
                                                   "cannot be handed over: the device has failed"):
            m.dm.check_saveable(local_migration=True)
    finally:
        m.close()
        backend.close()


def _bare(cls, **attrs):
    """A device of ``cls`` with only the attributes the refusal reads (no back-end)."""
    device = cls.__new__(cls)
    device.socket_path, device.failure = "/run/backend.sock", None
    for name, value in attrs.items():
        setattr(device, name, value)
    return device


def test_vhost_user_net_is_refused_by_name_even_locally():
    from pych.device_manager.manager import vhost_user_refusal
    from pych.devices.virtio.vhost_user_net import VhostUserNet
    device = _bare(VhostUserNet)
    assert vhost_user_refusal("_net0", device, local_migration=True) == (
        "device _net0: pych cannot migrate vhost-user-net devices yet, not even locally: only "
        "virtio-fs and vhost-user-blk connections are handed over to the receiver; remove the "
        "device before migrating")
    assert vhost_user_refusal("_net0", device, local_migration=False) == (
        "device _net0: the state of vhost-user-net _net0 lives in its back-end at "
        "/run/backend.sock (its rings and the requests in flight), which pych cannot save or "
        "move to another host; remove the device first")


def test_vhost_user_blk_moves_locally_unless_pych_owns_its_daemon_or_inflight_region():
    from pych.device_manager.manager import vhost_user_refusal
    from pych.devices.virtio.vhost_user_blk import VhostUserBlock
    theirs = _bare(VhostUserBlock, daemon=None, _inflight=None)
    assert vhost_user_refusal("_disk0", theirs, local_migration=True) is None
    assert vhost_user_refusal("_disk0", theirs, local_migration=False) == (
        "device _disk0: the state of vhost-user-blk _disk0 lives in its back-end at "
        "/run/backend.sock (its rings and the requests in flight), which pych cannot save or "
        "move to another host (a local migration, vm.send-migration with \"local\": true, "
        "hands the same connection over); remove the device first")
    owned = _bare(VhostUserBlock, daemon=object(), _inflight=None)
    assert vhost_user_refusal("_disk0", owned, local_migration=True) == (
        "device _disk0: its vhost-user connection cannot be handed over: its back-end is the "
        "qemu-storage-daemon pych started for the image, a process pych cannot hand over to "
        "the receiver yet")
    tracked = _bare(VhostUserBlock, daemon=None, _inflight=(None, -1, 0))
    assert "(INFLIGHT_SHMFD), which pych does not hand over yet" in vhost_user_refusal(
        "_disk0", tracked, local_migration=True)
