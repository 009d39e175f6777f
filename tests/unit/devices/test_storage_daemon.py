"""The qemu-storage-daemon pych owns for an image in a format it does not serve in-process,
against Debian's real daemon (no guest needed): the disk factory starts it (qcow2 with a
backing file, readonly), the vhost-user-blk device reads its configuration space from it,
``vm.resize-disk`` grows it through QMP, its death is described, removal and a failed
start leave nothing behind; raw images stay in-process and ``image_type`` must agree.
Also ``vm.resize-disk`` of an in-process raw disk through the device manager."""

from __future__ import annotations

import os
import signal
import subprocess
from pathlib import Path

import pytest

from pych.config import DiskConfig
from pych.config.kinds import BY_NAME
from pych.device_manager.manager import (DeviceBackendError, InvalidDiskResize,
                                         UnknownDeviceId)
from pych.devices.disk_format import ImageFormatError, image_format
from pych.devices.storage_daemon import (QEMU_STORAGE_DAEMON, StorageDaemon, StorageDaemonError,
                                         connect_when_listening, qemu_driver)
from pych.devices.virtio.block import VIRTIO_BLK_F_RO, VirtioBlock
from pych.devices.virtio.vhost_user_blk import VhostUserBlock

from tests.support.machines import DeviceManagerMachine as Machine, vm_config

MiB = 1 << 20

pytestmark = pytest.mark.skipif(not os.path.exists(QEMU_STORAGE_DAEMON),
                                reason="qemu-storage-daemon is missing (scripts/install-deps.sh)")


def qcow2(tmp_path: Path, size: int = 16 * MiB, backing: bool = True) -> Path:
    top = tmp_path / "top.qcow2"
    if backing:
        base = tmp_path / "base.qcow2"
        subprocess.run(["qemu-img", "create", "-q", "-f", "qcow2", str(base), str(size)],
                       check=True)
        subprocess.run(["qemu-io", "-f", "qcow2", "-c", "write -P 0x5a 0 65536", str(base)],
                       check=True, capture_output=True)
        subprocess.run(["qemu-img", "create", "-q", "-f", "qcow2", "-b", str(base), "-F",
                        "qcow2", str(top)], check=True)
    else:
        subprocess.run(["qemu-img", "create", "-q", "-f", "qcow2", str(top), str(size)],
                       check=True)
    return top


def children() -> set[int]:
    return {int(t) for t in os.listdir("/proc") if t.isdigit()
            and _ppid(t) == os.getpid()}


def _ppid(pid: str) -> int:
    try:
        return int(Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[1])
    except (OSError, IndexError, ValueError):
        return -1


def test_image_format_and_drivers(tmp_path):
    top = qcow2(tmp_path)
    raw = tmp_path / "disk.raw"
    raw.write_bytes(bytes(MiB))
    assert image_format(top) == "Qcow2" and image_format(raw) == "Raw"
    assert image_format(top, "Raw") == "Raw"                # taken at its word, as QEMU's
    with pytest.raises(ImageFormatError, match="image_type=Vhdx does not match the file, "
                                               "which is a Qcow2 image"):
        image_format(top, "Vhdx")
    assert qemu_driver("Qcow2") == "qcow2" and qemu_driver("QCOW (version 1)") == "qcow"
    assert qemu_driver("VDI") == "vdi" and qemu_driver("nonsense") is None


def test_daemon_serves_the_qcow2_and_resizes_and_stops(tmp_path):
    top = qcow2(tmp_path)
    daemon = StorageDaemon(str(top), "qcow2", name="d0")
    daemon.start()
    directory = daemon.directory
    try:
        assert daemon.running() and os.path.exists(daemon.socket_path)
        blk = VhostUserBlock(daemon.socket_path, connection=connect_when_listening(
            daemon.socket_path), daemon=daemon, name="d0")
        assert blk.capacity == 16 * MiB // 512
        blk.resize(24 * MiB)
        assert blk.capacity == 24 * MiB // 512
        with pytest.raises(StorageDaemonError, match="refused block_resize"):
            daemon.qmp("block_resize", {"node-name": "nope", "size": MiB})
        blk.shutdown()                                   # hangs up and stops its daemon
        assert not daemon.running() and not os.path.exists(directory)
    finally:
        daemon.stop()
    info = subprocess.run(["qemu-img", "info", "--output=json", str(top)], check=True,
                          capture_output=True, text=True).stdout
    assert '"virtual-size": 25165824' in info
    check = subprocess.run(["qemu-img", "check", str(top)], capture_output=True, text=True)
    assert check.returncode == 0, check.stdout


def test_a_killed_daemon_is_described(tmp_path):
    daemon = StorageDaemon(str(qcow2(tmp_path, backing=False)), "qcow2", name="d1")
    daemon.start()
    try:
        os.kill(daemon.pid, signal.SIGKILL)
        daemon.process.wait(10)
        assert daemon.exit_description().endswith("was killed by signal 9")
        with pytest.raises(StorageDaemonError, match="was killed by signal 9"):
            daemon.resize(32 * MiB)
    finally:
        daemon.stop()


def test_a_daemon_that_cannot_start_says_why_and_leaves_nothing(tmp_path):
    broken = tmp_path / "broken.qcow2"
    broken.write_bytes(b"QFI\xfb" + bytes(508))             # a qcow2 header with nothing in it
    before = children()
    daemon = StorageDaemon(str(broken), "qcow2", name="d2")
    with pytest.raises(StorageDaemonError, match=r"exited with status 1: .*qemu-storage-daemon"):
        daemon.start()
    assert not daemon.running() and children() == before
    assert not list(Path("/tmp").glob("pych-qsd-d2-*"))


def test_factory_serves_qcow2_through_a_daemon_and_raw_in_process(tmp_path):
    top = qcow2(tmp_path)
    raw = tmp_path / "disk.raw"
    raw.write_bytes(bytes(MiB))
    m = Machine(vm_config(disks=[{"path": str(top), "readonly": True}, {"path": str(raw)}]))
    try:
        qcow, inproc = (m.dm.devices[i].device for i in ("_disk0", "_disk1"))
        assert isinstance(qcow, VhostUserBlock) and qcow.daemon is not None
        assert qcow.avail_features & VIRTIO_BLK_F_RO               # readonly=on honoured
        assert qcow.capacity == 16 * MiB // 512
        assert isinstance(inproc, VirtioBlock)
        pid = qcow.daemon.pid
        assert pid in children()
        # hot plug of a qcow2 too; an image_type that disagrees is refused, nothing left
        before = children()
        with pytest.raises(DeviceBackendError, match="image_type=Raw|does not match"):
            m.dm.hotplug(BY_NAME["disk"], DiskConfig(path=str(top), image_type="Vhdx"))
        assert children() == before
    finally:
        m.close()
    assert pid not in children()                                # stopped with the VM


def test_resize_disk_through_the_device_manager(tmp_path):
    raw = tmp_path / "disk.raw"
    raw.write_bytes(bytes(MiB))
    m = Machine(vm_config(disks=[{"path": str(raw)}]))
    try:
        disk = m.dm.devices["_disk0"].device
        generation = disk.config_generation
        m.dm.resize_disk("_disk0", 2 * MiB)
        assert raw.stat().st_size == 2 * MiB and disk.capacity == 2 * MiB // 512
        assert disk.config_generation == generation + 1            # the guest is told
        with pytest.raises(InvalidDiskResize, match="shrinking disks is not supported"):
            m.dm.resize_disk("_disk0", MiB)
        with pytest.raises(InvalidDiskResize, match="not a multiple of 512"):
            m.dm.resize_disk("_disk0", 3 * MiB + 7)
        with pytest.raises(UnknownDeviceId):
            m.dm.resize_disk("__rng", 3 * MiB)
        with pytest.raises(UnknownDeviceId):
            m.dm.resize_disk("nope", 3 * MiB)
        assert raw.stat().st_size == 2 * MiB                        # refusals change nothing
    finally:
        m.close()
