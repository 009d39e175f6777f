"""virtio-fs in a real guest, served by Debian's virtiofsd (QEMU 7.2's C back-end,
``/usr/lib/qemu/virtiofsd`` from qemu-system-common): a share given at boot with ``--fs``,
then a second one hot plugged with ``vm.add-fs`` and removed with ``vm.remove-device``,
both driven with curl as in ../shared/spec/hotplug.md; then a guest reboot, which the boot
share and a share hot added just before it survive (virtiofsd exits when its connection
closes, so pych hands the same connections to the rebuilt VM).

One guest (``--console off``: the rng holds slot 1, the boot share slot 2) is shared by the
module; the tests run in order. The guest's acpiphp needs tens of seconds here to probe a
hot-added device, so waits poll with generous limits and nothing is timed. Data sizes stay
small (this guest moves ~1-2 MB/s through its kernel).
"""

from __future__ import annotations

import hashlib
import json
import os
import time
from pathlib import Path

import pytest

from tests.support.guest import vm_info
from tests.support.host import settled_resources
from tests.support.hotplug import curl, events, wait_in_guest
from tests.support.virtiofsd import VIRTIOFSD, Virtiofsd

HOST_FILE_SIZE = 256 * 1024


def pattern(size: int, seed: int = 0) -> bytes:
    return b"".join(hashlib.sha256(f"{seed}:{i}".encode()).digest() for i in range(size // 32))


@pytest.fixture(scope="module")
def workdir(tmp_path_factory) -> Path:
    if not os.path.exists(VIRTIOFSD):
        pytest.fail(f"{VIRTIOFSD} is missing: scripts/install-deps.sh installs it "
                    "(qemu-system-common)")
    return tmp_path_factory.mktemp("virtio-fs")


@pytest.fixture(scope="module")
def daemons(workdir):
    started: list[Virtiofsd] = []

    def start(name: str) -> Virtiofsd:
        d = Virtiofsd(workdir, name)
        started.append(d)
        return d

    yield start
    for d in started:
        d.stop()


@pytest.fixture(scope="module")
def boot_share(daemons) -> Virtiofsd:
    d = daemons("boot")
    (d.source / "host.bin").write_bytes(pattern(HOST_FILE_SIZE))
    return d


@pytest.fixture(scope="module")
def guest(workdir, boot_share, guest_factory):          # pych stops before the daemons
    g = guest_factory("fs", memory="size=256M",
                      extra_args=["--fs", f"tag=hostfs,socket={boot_share.socket}",
                                  "--event-monitor", f"path={workdir / 'events'}"])
    g.events_path = workdir / "events"
    return g



def pych_resources(guest, expected: tuple[int, int] | None = None) -> tuple[int, int]:
    """pych's (open fds, threads) once settled: the connection that carried an answer may
    still be open for a moment after curl has read it and exited."""
    return settled_resources(guest.proc.pid, expected)


def wait_until(predicate, limit: float) -> bool:
    deadline = time.monotonic() + limit
    while not predicate():
        if time.monotonic() > deadline:
            return False
        time.sleep(0.5)
    return True


VIRTIOFS_DEVICES = "ls /sys/bus/virtio/drivers/virtiofs | grep -c virtio"


def test_boot_share_reads_and_writes_host_files(guest, boot_share):
    rc, out = guest.run(
        "lspci -n | grep -c 1af4:105a; mkdir -p /mnt/boot && mount -t virtiofs hostfs /mnt/boot "
        "&& md5sum /mnt/boot/host.bin && echo written-by-the-guest > /mnt/boot/from-guest.txt "
        "&& dd if=/mnt/boot/host.bin of=/mnt/boot/copy.bin bs=64k 2>/dev/null && sync",
        timeout=300)
    assert rc == 0, f"{out}\nvirtiofsd: {boot_share.log_text()}\npych: {guest.pych_log()}"
    count, md5 = out.splitlines()[:2]
    assert count == "1"                                              # virtio-fs: 1af4:1040+26
    assert md5.split()[0] == hashlib.md5(pattern(HOST_FILE_SIZE)).hexdigest()
    assert (boot_share.source / "from-guest.txt").read_text() == "written-by-the-guest\n"
    assert (boot_share.source / "copy.bin").read_bytes() == pattern(HOST_FILE_SIZE)
    info = vm_info(guest)
    assert [(f["id"], f["tag"]) for f in info["config"]["fs"]] == [("_fs0", "hostfs")]
    assert info["device_tree"]["_virtio-pci-_fs0"]["pci_bdf"] == "0000:00:02.0"


def test_hot_plugged_share_works_and_its_removal_releases_everything(guest, daemons):
    hot = daemons("hot")
    (hot.source / "hot.txt").write_text("from the host, hot plugged\n")
    before = pych_resources(guest)

    # a failed add (nobody listens there) answers 400, names the socket, leaves nothing
    missing = str(Path(hot.socket).with_name("nobody.sock"))
    status, body = curl(guest, "vm.add-fs", {"tag": "nope", "socket": missing})
    assert status == 400 and missing in body and "No such file or directory" in body, body
    assert pych_resources(guest, before) == before
    assert len(vm_info(guest)["config"]["fs"]) == 1

    status, body = curl(guest, "vm.add-fs", {"tag": "hot", "socket": hot.socket})
    assert status == 200, body
    assert json.loads(body) == {"id": "_fs1", "bdf": "0000:00:03.0"}

    rc, out = wait_in_guest(guest, f'[ "$({VIRTIOFS_DEVICES})" = 2 ]')
    assert rc == 0, f"the hot-added share never showed up: {guest.run('dmesg | tail')}"
    rc, out = guest.run(
        "mkdir -p /mnt/hot && mount -t virtiofs hot /mnt/hot && cat /mnt/hot/hot.txt "
        "&& echo hot-written > /mnt/hot/back.txt && sync && umount /mnt/hot", timeout=300)
    assert rc == 0, f"{out}\nvirtiofsd: {hot.log_text()}\npych: {guest.pych_log()}"
    assert out.splitlines()[0] == "from the host, hot plugged"
    assert (hot.source / "back.txt").read_text() == "hot-written\n"

    status, body = curl(guest, "vm.remove-device", {"id": "_fs1"})
    assert (status, body) == (204, "")
    assert wait_until(lambda: events(guest, "device-removed"), 300), \
        f"the guest never ejected _fs1: {guest.pych_log()}"
    assert [e["properties"] for e in events(guest, "device-removed")] == [
        {"id": "_fs1", "bdf": "0000:00:03.0"}]
    info = vm_info(guest)
    assert "_fs1" not in info["device_tree"] and info["devices_pending_removal"] == []
    assert [f["id"] for f in info["config"]["fs"]] == ["_fs0"]
    # pych hung up (virtiofsd exits when its front end goes) and closed every descriptor
    # the share had: the socket, the kick and vector eventfds, the relay eventfds
    hot.proc.wait(30)
    assert pych_resources(guest, before) == before, os.listdir(f"/proc/{guest.proc.pid}/fd")
    rc, out = guest.run(f"{VIRTIOFS_DEVICES}; lspci -n | grep -c 1af4:105a; "
                        "cat /mnt/boot/from-guest.txt")
    assert out.splitlines() == ["1", "1", "written-by-the-guest"]   # the boot share still works


def test_shares_survive_a_guest_reboot(guest, boot_share, daemons):
    kept = daemons("kept")
    (kept.source / "kept.txt").write_text("hot added before the reboot\n")
    status, body = curl(guest, "vm.add-fs", {"tag": "kept", "socket": kept.socket})
    assert status == 200, body
    kept_id = json.loads(body)["id"]

    start = len(guest.console.buf)
    guest.console.send("reboot -f\n")
    guest.wait_ready(start=start)
    # both virtiofsd processes still run: pych kept their connections across the rebuild
    assert boot_share.proc.poll() is None, boot_share.log_text()
    assert kept.proc.poll() is None, kept.log_text()
    assert [e["event"] for e in events(guest, "rebooted")] == ["rebooted"], guest.pych_log()
    rc, out = guest.run(
        f"{VIRTIOFS_DEVICES}; mkdir -p /mnt/boot /mnt/kept && mount -t virtiofs hostfs /mnt/boot "
        "&& mount -t virtiofs kept /mnt/kept && cat /mnt/boot/from-guest.txt /mnt/kept/kept.txt "
        "&& md5sum /mnt/boot/host.bin && echo after-the-reboot > /mnt/kept/back.txt && sync",
        timeout=300)
    assert rc == 0, (f"{out}\nvirtiofsd: {boot_share.log_text()}\n{kept.log_text()}\n"
                     f"pych: {guest.pych_log()}")
    count, boot_file, kept_file, md5 = out.splitlines()[:4]
    assert (count, boot_file, kept_file) == ("2", "written-by-the-guest",
                                             "hot added before the reboot")
    assert md5.split()[0] == hashlib.md5(pattern(HOST_FILE_SIZE)).hexdigest()
    assert (kept.source / "back.txt").read_text() == "after-the-reboot\n"
    info = vm_info(guest)
    assert [f["id"] for f in info["config"]["fs"]] == ["_fs0", kept_id]
    # the hot-added share is a boot device now, in the next free slot
    assert info["device_tree"][f"_virtio-pci-{kept_id}"]["pci_bdf"] == "0000:00:03.0"
