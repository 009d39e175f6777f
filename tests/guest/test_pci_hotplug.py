"""PCI device hot plug of a disk in a real guest, driven with curl as in the user's document
(../shared/spec/hotplug.md, "PCI Device Hot Plug"): add, use, remove, reuse, errors, reboot.

One guest (--console off, so the rng holds slot 1 and the first hot-added device gets
0000:00:02.0) is shared by the module; the tests run in order and each leaves the guest in
the state the next one expects. The guest's acpiphp needs tens of seconds here to probe a
new device, so every wait polls with a generous limit and nothing is timed.
"""

from __future__ import annotations

import hashlib
import json
import os
import subprocess
from pathlib import Path

import pytest

from tests.support.guest import REPO, vm_info
from tests.support.hotplug import curl, wait_for_events, wait_in_guest
from tests.support.host import lock_is_free

DISK_SIZE = 4 << 20
BLOCK = 4096
COPY_TO_BLOCK = 1000          # the guest copies block 0 of the disk here


def pattern(size: int) -> bytes:
    """A known, non-repeating pattern (SHA-256 counter stream)."""
    return b"".join(hashlib.sha256(i.to_bytes(4, "little")).digest() for i in range(size // 32))


@pytest.fixture(scope="module")
def workdir(tmp_path_factory) -> Path:
    return tmp_path_factory.mktemp("pci-hotplug")


@pytest.fixture(scope="module")
def disk(workdir) -> Path:
    path = workdir / "disk.raw"
    path.write_bytes(pattern(DISK_SIZE))
    return path


@pytest.fixture(scope="module")
def guest(guest_factory, workdir):
    g = guest_factory("hotplug", memory="size=256M",
                      extra_args=["--event-monitor", f"path={workdir / 'events'}"])
    g.events_path = workdir / "events"
    return g



def pych_holds(guest, path: Path) -> bool:
    fd_dir = f"/proc/{guest.proc.pid}/fd"
    return any(os.readlink(os.path.join(fd_dir, fd)) == str(path)
               for fd in os.listdir(fd_dir) if os.path.exists(os.path.join(fd_dir, fd)))


def test_added_disk_shows_at_its_bdf_and_reads_and_writes(guest, disk):
    status, body = curl(guest, "vm.add-disk", {"path": str(disk)})
    assert status == 200, body
    assert json.loads(body) == {"id": "_disk0", "bdf": "0000:00:02.0"}
    assert [d["id"] for d in vm_info(guest)["config"]["disks"]] == ["_disk0"]

    rc, out = wait_in_guest(guest, "[ -e /sys/block/vda ]")
    assert rc == 0, f"the hot-added disk never showed up in the guest: {guest.run('dmesg | tail')}"
    rc, out = guest.run(
        "lspci -n -s 00:02.0; dd if=/dev/vda bs=64k 2>/dev/null | md5sum; "
        f"dd if=/dev/vda of=/dev/vda bs={BLOCK} count=1 seek={COPY_TO_BLOCK} conv=notrunc,fsync "
        "2>/dev/null; sync")
    assert rc == 0, out
    lspci, md5 = out.splitlines()[:2]
    assert "1af4:1042" in lspci
    assert md5.split()[0] == hashlib.md5(pattern(DISK_SIZE)).hexdigest()
    data = disk.read_bytes()
    assert data[COPY_TO_BLOCK * BLOCK:(COPY_TO_BLOCK + 1) * BLOCK] == data[:BLOCK]


def test_removed_disk_leaves_the_guest_and_releases_everything(guest, disk):
    status, body = curl(guest, "vm.remove-device", {"id": "_disk0"})
    assert (status, body) == (204, "")
    assert "disks" not in vm_info(guest)["config"]                  # at request time

    rc, _ = wait_in_guest(guest, "[ ! -e /sys/block/vda ]")
    assert rc == 0, "the guest never let go of the removed disk"
    removed = wait_for_events(guest, "device-removed", 1)
    assert [e["properties"] for e in removed] == [{"id": "_disk0", "bdf": "0000:00:02.0"}]
    rc, out = guest.run("lspci -n")
    assert "00:02.0" not in out
    info = vm_info(guest)
    assert "_disk0" not in info["device_tree"] and info["devices_pending_removal"] == []
    assert lock_is_free(disk) and not pych_holds(guest, disk)
    # the data the guest wrote is on the host file
    data = disk.read_bytes()
    assert data[COPY_TO_BLOCK * BLOCK:(COPY_TO_BLOCK + 1) * BLOCK] == data[:BLOCK]


def test_slot_and_id_are_reusable_and_remove_wait_returns_after_the_eject(guest, disk):
    status, body = curl(guest, "vm.add-disk", {"path": str(disk), "id": "_disk0"})
    assert status == 200, body
    assert json.loads(body) == {"id": "_disk0", "bdf": "0000:00:02.0"}
    rc, _ = wait_in_guest(guest, "[ -e /sys/block/vda ]")
    assert rc == 0
    remote = subprocess.run(
        [str(REPO / ".venv" / "bin" / "pych-remote"), "--api-socket", guest.api_path,
         "remove-device", "_disk0", "--wait=300"], capture_output=True, text=True, timeout=400)
    assert remote.returncode == 0, remote.stderr
    assert "_disk0" not in vm_info(guest)["device_tree"]
    assert len(wait_for_events(guest, "device-removed", 2)) == 2
    rc, _ = guest.run("[ ! -e /sys/block/vda ]")
    assert rc == 0


def test_bad_requests_answer_clearly_and_leave_nothing_behind(guest, disk, workdir):
    status, body = curl(guest, "vm.remove-device", {"id": "_disk9"})
    assert status == 404, body
    status, body = curl(guest, "vm.remove-device", {"id": "__rng"})
    assert status == 500 and "not allowed" in body
    missing = workdir / "missing.raw"
    status, body = curl(guest, "vm.add-disk", {"path": str(missing)})
    assert status == 400 and str(missing) in body
    info = vm_info(guest)
    assert "disks" not in info["config"]
    assert set(info["device_tree"]) == {"__rng", "_virtio-pci-__rng"}
    status, body = curl(guest, "vm.add-disk", {"path": str(disk)})
    assert status == 200, body
    assert json.loads(body)["bdf"] == "0000:00:02.0"                 # still the lowest slot


def test_added_disk_survives_a_guest_reboot(guest, disk):
    dev_id = vm_info(guest)["config"]["disks"][0]["id"]
    start = len(guest.console.buf)
    guest.console.send("reboot -f\n")
    guest.wait_ready(start=start)
    info = vm_info(guest)
    assert [d["id"] for d in info["config"]["disks"]] == [dev_id]
    # now a boot device, created before the rng (the reference's boot order)
    assert info["device_tree"][f"_virtio-pci-{dev_id}"]["pci_bdf"] == "0000:00:01.0"
    rc, out = guest.run("dd if=/dev/vda bs=4k count=1 2>/dev/null | md5sum")
    assert rc == 0, out
    assert out.split()[0] == hashlib.md5(disk.read_bytes()[:BLOCK]).hexdigest()
