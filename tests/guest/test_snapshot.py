"""Snapshot and restore of a hot plugged guest (issue 15; docs/snapshot.md).

One guest, booted with 1 vCPU (max 2), 256 MiB (+512 MiB ACPI hot plug space) and a boot
disk, is hot plugged: a vCPU added and onlined, a 256 MiB DIMM added and onlined, a disk
added, the boot disk removed. The guest then writes a shell variable, a tmpfs file and a
block of the added disk; the VM is paused and snapshotted, the pych process ends, and a new
pych restores the snapshot (``--restore``) and resumes it: the shell, its variable, the tmpfs
file, the disk's contents, ``nproc``, ``MemTotal`` and ``lspci`` are as before, and the guest
keeps hot plugging (a vCPU removed, a disk added). Bad snapshots (altered manifest, another
format version, a truncated memory file) are refused by a third pych with a clear 400.

The tests run in order and share the guest; the module boots once.
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import subprocess
import sys
import time
from pathlib import Path

import pytest

from pych.api.client import ApiClient
from pych.cli.remote import wait_for_vcpus
from tests.support.guest import REPO, Console, PychGuest, Shell
from tests.support.hotplug import wait_in_guest

MiB = 1 << 20
DISK_SIZE = 4 * MiB
GUEST_WAIT = 600
NPROC_2 = "for i in $(seq 120); do [ $(nproc) = 2 ] && break; sleep 1; done; nproc"
# What must read the same before the snapshot and after the restore, in one guest command.
PROBE = ("echo var=$SNAPVAR; cat /mnt/snap/file; nproc; grep MemTotal /proc/meminfo; "
         "lspci -n | sort; dd if=/dev/vdb bs=4k count=2 2>/dev/null | md5sum")


def pattern(size: int, seed: int) -> bytes:
    return b"".join(hashlib.sha256(bytes([seed]) + i.to_bytes(4, "little")).digest()
                    for i in range(size // 32))


@pytest.fixture(scope="module")
def workdir(tmp_path_factory) -> Path:
    return tmp_path_factory.mktemp("snapshot")


@pytest.fixture(scope="module")
def disks(workdir) -> list[Path]:
    paths = [workdir / f"disk{i}.raw" for i in range(3)]
    for i, path in enumerate(paths):
        path.write_bytes(pattern(DISK_SIZE, i))
    return paths


@pytest.fixture(scope="module")
def guest(guest_factory, disks):
    g = guest_factory("snap", cpus="boot=1,max=2", memory="size=256M,hotplug_size=512M",
                      extra_args=["--disk", f"path={disks[0]}"])
    rc, out = g.run("echo online > /sys/devices/system/memory/auto_online_blocks; "
                    "mkdir -p /mnt/snap && mount -t tmpfs tmpfs /mnt/snap && echo ok")
    assert (rc, out) == (0, "ok"), out
    yield g
    if getattr(g, "restored", None) is not None:
        g.restored.stop()                           # the second pych, not the factory's


def api(path: str, endpoint: str, body=None) -> tuple[int, str]:
    with ApiClient(path) as client:
        status, text = client.put(endpoint, body)
    return status, text.decode()


def info(path: str) -> dict:
    with ApiClient(path) as client:
        status, body = client.get("vm.info")
    assert status == 200, body
    return json.loads(body)


def wait_for_vm(path: str, timeout: float = 300) -> dict:
    deadline = time.monotonic() + timeout
    while True:
        try:
            with ApiClient(path) as client:
                status, body = client.get("vm.info")
            if status == 200:
                return json.loads(body)
        except OSError:
            pass                                    # the socket is not there yet
        assert time.monotonic() < deadline, f"no VM after {timeout} s"
        time.sleep(0.5)


def remote(path: str, *args: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "pych.cli.remote", "--api-socket", path, *args],
                          capture_output=True, text=True, timeout=GUEST_WAIT, cwd=REPO)


class Restored(PychGuest):
    """A pych started with ``--restore`` (and an API socket): the guest's serial socket is
    the snapshot's configuration's, the one the first pych had."""

    def __init__(self, workdir: Path, snapshot: Path, serial_path: str, *extra: str):
        super().__init__(workdir)
        self.serial_path = serial_path
        self.args = [str(REPO / ".venv" / "bin" / "pych"), "--api-socket", self.api_path,
                     "--restore", f"source_url=file://{snapshot}", *extra]


def test_hot_plugged_guest_is_snapshotted_only_when_paused(guest, disks, workdir):
    # Hot plug: a vCPU (onlined), a 256 MiB DIMM (auto-onlined), a disk; the boot disk goes.
    assert api(guest.api_path, "vm.resize", {"desired_vcpus": 2})[0] == 204
    with ApiClient(guest.api_path) as client:
        wait_for_vcpus(client, 2, GUEST_WAIT)
    assert api(guest.api_path, "vm.resize", {"desired_ram": 512 * MiB})[0] == 204
    status, body = api(guest.api_path, "vm.add-disk", {"path": str(disks[1])})
    assert status == 200, body
    rc, out = wait_in_guest(guest, "[ -e /sys/block/vdb ]", GUEST_WAIT)
    assert rc == 0, out
    assert remote(guest.api_path, "remove-device", "_disk0", "--wait").returncode == 0
    rc, out = guest.run(
        "until [ -e /sys/devices/system/cpu/cpu1/online ]; do sleep 0.5; done; "
        "echo 1 > /sys/devices/system/cpu/cpu1/online; " + NPROC_2, timeout=GUEST_WAIT)
    assert out.splitlines()[-1] == "2", out
    rc, out = wait_in_guest(guest, "[ $(awk '/MemTotal/ {print $2}' /proc/meminfo) -gt 400000 ]",
                            GUEST_WAIT)
    assert rc == 0, out
    # The guest's state: a shell variable, a tmpfs file, a block written to the added disk
    # (vdb: the guest does not rename it when vda goes).
    rc, out = guest.run("export SNAPVAR=kept-$$; echo tmpfs-kept > /mnt/snap/file; "
                        "dd if=/dev/urandom of=/dev/vdb bs=4k count=1 seek=1 conv=fsync "
                        "2>/dev/null; echo done")
    assert (rc, out) == (0, "done"), out
    rc, before = guest.run(PROBE)
    assert rc == 0 and "var=kept-" in before and "tmpfs-kept" in before, before
    assert before.splitlines()[2] == "2", before
    guest.before = before

    snapshot = workdir / "snap"
    # A running VM is refused with the reference's words (405, the spec's status).
    status, body = api(guest.api_path, "vm.snapshot", {"destination_url": f"file://{snapshot}"})
    assert status == 405 and "Trying to snapshot while VM is running" in body, body
    assert not snapshot.exists()
    assert api(guest.api_path, "vm.pause")[0] == 204
    r = remote(guest.api_path, "snapshot", f"file://{snapshot}")
    assert r.returncode == 0, r.stderr
    manifest = json.loads((snapshot / "manifest.json").read_text())
    assert manifest["format"] == "pych-snapshot" and manifest["version"] == 2
    regions = {m["name"]: m for m in manifest["memory"]}
    assert "dimm0" in regions and regions["dimm0"]["size"] == 256 * MiB, regions.keys()
    config = manifest["config"]
    assert config["cpus"]["boot_vcpus"] == 2 and config["memory"]["size"] == 512 * MiB
    assert [d["path"] for d in config["disks"]] == [str(disks[1])]
    # Sparse: the files hold what the guest touched, not all of its 512 MiB.
    used = sum(os.stat(snapshot / m["file"]).st_blocks * 512 for m in manifest["memory"])
    assert used < 400 * MiB, used
    # A destination that holds a snapshot is refused; nothing is written to it.
    status, body = api(guest.api_path, "vm.snapshot", {"destination_url": f"file://{snapshot}"})
    assert status == 400 and "already holds a snapshot" in body, body
    assert not [p for p in workdir.iterdir() if p.name.startswith(".snap")]
    assert info(guest.api_path)["state"] == "Paused"
    guest.snapshot = snapshot


def test_restored_guest_continues_where_it_stopped(guest, workdir):
    serial = guest.serial_path
    guest.stop()                                     # the first pych process ends
    assert guest.proc.returncode is not None
    restored = Restored(workdir / "restored", guest.snapshot, serial).start()
    guest.restored = restored
    # The restored VM comes up paused, with every hot plug in its configuration (the API
    # answers while the restore runs: poll until there is a VM).
    vm = wait_for_vm(restored.api_path)
    assert vm["state"] == "Paused", vm
    assert [c["state"] for c in vm["cpus"]] == ["present", "present"], vm["cpus"]
    assert vm["memory_actual_size"] == 512 * MiB, vm
    assert api(restored.api_path, "vm.resume")[0] == 204
    rc, after = restored.run(PROBE, timeout=GUEST_WAIT)
    assert rc == 0, after
    assert after == guest.before


def test_restored_guest_keeps_hot_plugging(guest, disks):
    restored = guest.restored
    assert api(restored.api_path, "vm.resize", {"desired_vcpus": 1})[0] == 204
    with ApiClient(restored.api_path) as client:
        wait_for_vcpus(client, 1, GUEST_WAIT)
    status, body = api(restored.api_path, "vm.add-disk", {"path": str(disks[2])})
    assert status == 200, body
    rc, out = wait_in_guest(restored, "[ -e /sys/block/vda ]", GUEST_WAIT)
    assert rc == 0, out
    rc, out = restored.run("cat /sys/devices/system/cpu/online; "
                           "dd if=/dev/vda bs=64k count=1 2>/dev/null | md5sum")
    assert rc == 0, out
    online, md5 = out.splitlines()
    assert online == "0"
    assert md5.split()[0] == hashlib.md5(pattern(DISK_SIZE, 2)[:65536]).hexdigest()


@pytest.mark.parametrize("damage", ["altered", "version", "truncated", "running"])
def test_bad_snapshots_are_refused_and_leave_no_vm(guest, workdir, damage):
    if damage == "running":
        # A restore on a pych that has a VM is refused (the restored one is running).
        status, body = api(guest.restored.api_path, "vm.restore",
                           {"source_url": f"file://{guest.snapshot}"})
        assert status == 409 and "already created" in body, body
        return
    copy = workdir / f"bad-{damage}"
    shutil.copytree(guest.snapshot, copy)
    manifest_path = copy / "manifest.json"
    manifest = json.loads(manifest_path.read_text())
    if damage == "altered":
        manifest["config"]["cpus"]["boot_vcpus"] = 1
        manifest_path.write_text(json.dumps(manifest))
        words = "was altered or damaged"
    elif damage == "version":
        manifest["version"] = 99
        manifest_path.write_text(json.dumps(manifest))
        words = "format version 99"
    else:
        big = max(manifest["memory"], key=lambda m: m["size"] if m["file"] else 0)
        os.truncate(copy / big["file"], big["size"] // 2)
        words = "truncated"
    pych = PychGuest(workdir / f"empty-{damage}")
    pych.args = [str(REPO / ".venv" / "bin" / "pych"), "--api-socket", pych.api_path]
    pych.proc = subprocess.Popen(pych.args, stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL,
                                 stderr=subprocess.DEVNULL)
    try:
        deadline = time.monotonic() + 60
        while not os.path.exists(pych.api_path) and time.monotonic() < deadline:
            time.sleep(0.1)
        status, body = api(pych.api_path, "vm.restore", {"source_url": f"file://{copy}"})
        assert status == 400 and words in body, body
        with ApiClient(pych.api_path) as client:
            status, _ = client.get("vm.info")
        assert status == 404                        # no VM was left behind
    finally:
        pych.proc.terminate()
        pych.proc.wait(30)


def test_restore_of_what_is_not_a_snapshot_is_refused_on_the_command_line(workdir):
    r = subprocess.run([str(REPO / ".venv" / "bin" / "pych"), "--restore",
                        f"source_url=file://{workdir / 'nothing'}"],
                       capture_output=True, text=True, timeout=60)
    assert r.returncode == 1
    assert r.stderr.strip().endswith("holds no snapshot (manifest.json is missing)"), r.stderr
