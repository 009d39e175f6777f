"""vhost-user-blk and images in other formats in a real guest, served by Debian's
qemu-storage-daemon (QEMU 7.2), plus live ``vm.resize-disk``.

One guest (``--console off``) is shared by the module; the tests run in order:

* ``_disk0`` (/dev/vda): ``--disk vhost_user=on,socket=`` on a raw image a qemu-storage-daemon
  the test started exports;
* ``_disk1`` (/dev/vdb): ``--disk path=top.qcow2``, a qcow2 image whose backing file holds
  the data, served by the qemu-storage-daemon pych starts and owns;
* ``_disk2`` (/dev/vdc): a raw image served in-process.

Then: live resize of the qcow2 and the raw disk; a vhost-user disk hot added, read and
written, its back-end killed while the guest writes (pych answers its API, the device is
reported failed, the guest's writes end with errors) and removed; finally pych exits (and
stops the daemon it owns) and ``qemu-img check`` finds the qcow2 clean with the guest's data
in it. (A pych-owned daemon's death and a qcow2 hot plug are in
tests/unit/devices/test_storage_daemon.py: one hot plug cycle here keeps the module short.)
Data sizes stay small (this guest moves ~1-2 MB/s through its kernel); waits poll.
"""

from __future__ import annotations

import hashlib
import json
import os
import subprocess
import time
from pathlib import Path

import pytest

from tests.support.guest import vm_info
from tests.support.hotplug import curl, events, wait_in_guest

QSD = "/usr/bin/qemu-storage-daemon"
MiB = 1 << 20
DATA = 256 * 1024                  # what the guest reads and writes each time
WRITE_AT = 1 * MiB                 # where the guest writes (offset in the disk)


def pattern(size: int, seed: int = 0) -> bytes:
    return b"".join(hashlib.sha256(f"{seed}:{i}".encode()).digest() for i in range(size // 32))


def md5(data: bytes) -> str:
    return hashlib.md5(data).hexdigest()


class ExportedImage:
    """A qemu-storage-daemon the test runs: ``image`` (raw) exported as vhost-user-blk."""

    def __init__(self, workdir: Path, name: str, size: int) -> None:
        self.image = workdir / f"{name}.raw"
        self.image.write_bytes(pattern(DATA, seed=len(name)) + bytes(size - DATA))
        self.socket = str(workdir / f"{name}.sock")
        self.log = open(workdir / f"{name}.log", "wb")
        self.proc = subprocess.Popen(
            [QSD, "--blockdev", f"driver=file,node-name=f,filename={self.image}",
             "--export", f"type=vhost-user-blk,id=e,node-name=f,addr.type=unix,"
                         f"addr.path={self.socket},writable=on"],
            stdin=subprocess.DEVNULL, stdout=self.log, stderr=subprocess.STDOUT)
        deadline = time.monotonic() + 30
        while not os.path.exists(self.socket):
            if self.proc.poll() is not None or time.monotonic() > deadline:
                raise RuntimeError(f"qemu-storage-daemon did not start: {self.log_text()}")
            time.sleep(0.05)

    def log_text(self) -> str:
        self.log.flush()
        return Path(self.log.name).read_text(errors="replace")[-2000:]

    def stop(self) -> None:
        if self.proc.poll() is None:
            self.proc.terminate()
        self.proc.wait(30)
        self.log.close()


@pytest.fixture(scope="module")
def workdir(tmp_path_factory) -> Path:
    if not os.path.exists(QSD):
        pytest.fail(f"{QSD} is missing: scripts/install-deps.sh installs it (qemu-system-common)")
    return tmp_path_factory.mktemp("vhost-user-blk")


@pytest.fixture(scope="module")
def exports(workdir):
    started: list[ExportedImage] = []

    def start(name: str, size: int = 4 * MiB) -> ExportedImage:
        e = ExportedImage(workdir, name, size)
        started.append(e)
        return e

    yield start
    for e in started:
        e.stop()


def qcow2_with_backing(workdir: Path, name: str, size: int = 32 * MiB) -> Path:
    """``<name>.qcow2`` over ``<name>-base.qcow2``, whose first DATA bytes are the pattern."""
    base, top, data = (workdir / f"{name}-base.qcow2", workdir / f"{name}.qcow2",
                       workdir / f"{name}-data.bin")
    data.write_bytes(pattern(DATA, seed=7))
    subprocess.run(["qemu-img", "create", "-q", "-f", "qcow2", str(base), str(size)], check=True)
    subprocess.run(["qemu-io", "-f", "qcow2", "-c", f"write -s {data} 0 {DATA}", str(base)],
                   check=True, capture_output=True)
    subprocess.run(["qemu-img", "create", "-q", "-f", "qcow2", "-b", str(base), "-F", "qcow2",
                    str(top)], check=True)
    return top


@pytest.fixture(scope="module")
def images(workdir, exports):
    boot = exports("boot")
    top = qcow2_with_backing(workdir, "top")
    raw = workdir / "inproc.raw"
    raw.write_bytes(bytes(4 * MiB))
    return {"boot": boot, "qcow2": top, "raw": raw}


@pytest.fixture(scope="module")
def guest(workdir, images, guest_factory):
    g = guest_factory("vublk", memory="size=256M",
                      extra_args=["--disk", f"vhost_user=on,socket={images['boot'].socket}",
                                  "--disk", f"path={images['qcow2']}",
                                  "--disk", f"path={images['raw']}",
                                  "--event-monitor", f"path={workdir / 'events'}"])
    g.events_path = workdir / "events"
    return g



def wait_until(predicate, limit: float) -> bool:
    deadline = time.monotonic() + limit
    while not predicate():
        if time.monotonic() > deadline:
            return False
        time.sleep(0.5)
    return True


def guest_write(dev: str) -> str:
    """Shell: write DATA bytes of fresh data at WRITE_AT of ``dev``, print its md5."""
    return (f"dd if=/dev/urandom of=/tmp/w.bin bs={DATA} count=1 2>/dev/null && "
            f"md5sum /tmp/w.bin && dd if=/tmp/w.bin of={dev} bs={DATA} seek={WRITE_AT // DATA} "
            f"oflag=direct conv=fsync 2>/dev/null")


def guest_read(dev: str) -> str:
    return f"dd if={dev} bs={DATA} count=1 iflag=direct 2>/dev/null | md5sum"


def test_boot_disks_read_and_write(guest, images):
    rc, out = guest.run(
        f"{guest_read('/dev/vda')}; {guest_read('/dev/vdb')}; "
        f"{guest_write('/dev/vda')}; cat /sys/block/vda/size /sys/block/vdb/size", timeout=300)
    assert rc == 0, f"{out}\npych: {guest.pych_log()}"
    boot_md5, qcow2_md5, written_md5, vda_size, vdb_size = [
        line.split()[0] for line in out.splitlines()[:5]]
    assert boot_md5 == md5(pattern(DATA, seed=len("boot")))       # the daemon's raw image
    assert qcow2_md5 == md5(pattern(DATA, seed=7))                 # from the backing file
    data = images["boot"].image.read_bytes()[WRITE_AT:WRITE_AT + DATA]
    assert md5(data) == written_md5                                # the guest's write landed
    assert (int(vda_size), int(vdb_size)) == (4 * MiB // 512, 32 * MiB // 512)
    info = vm_info(guest)
    assert [d["id"] for d in info["config"]["disks"]] == ["_disk0", "_disk1", "_disk2"]
    assert info["devices_failed"] == []


def test_qcow2_guest_write(guest):
    rc, out = guest.run(guest_write("/dev/vdb"), timeout=300)
    assert rc == 0, f"{out}\npych: {guest.pych_log()}"
    guest.qcow2_written = out.split()[0]


def test_live_resize_seen_by_the_guest(guest, images):
    status, body = curl(guest, "vm.resize-disk", {"id": "_disk1", "desired_size": 48 * MiB})
    assert status == 204, body
    status, body = curl(guest, "vm.resize-disk", {"id": "_disk2", "desired_size": 6 * MiB})
    assert status == 204, body
    assert images["raw"].stat().st_size == 6 * MiB
    rc, out = wait_in_guest(guest, f'[ "$(cat /sys/block/vdb/size)" = {48 * MiB // 512} ] && '
                                   f'[ "$(cat /sys/block/vdc/size)" = {6 * MiB // 512} ]')
    assert rc == 0, f"{out}\n{guest.run('dmesg | tail')}"
    # the guest uses the new space: a write past the old end of the raw disk
    rc, out = guest.run(f"dd if=/dev/urandom of=/dev/vdc bs=4096 seek={5 * MiB // 4096} "
                        f"count=1 oflag=direct 2>/dev/null && echo ok", timeout=120)
    assert out.strip().endswith("ok"), out
    # shrinking is refused, as is a size that is not whole sectors, and an unknown disk
    status, body = curl(guest, "vm.resize-disk", {"id": "_disk2", "desired_size": 2 * MiB})
    assert status == 400 and "shrinking" in body, body
    status, body = curl(guest, "vm.resize-disk", {"id": "_disk2", "desired_size": 7 * MiB + 1})
    assert status == 400 and "not a multiple of 512" in body, body
    status, body = curl(guest, "vm.resize-disk", {"id": "nope", "desired_size": 8 * MiB})
    assert status == 404, body
    status, body = curl(guest, "vm.resize-disk", {"id": "_disk0", "desired_size": 8 * MiB})
    assert status == 400 and "does not own" in body, body


def daemons_of(pid: int) -> list[int]:
    found = []
    for entry in os.listdir("/proc"):
        if entry.isdigit():
            try:
                stat = Path(f"/proc/{entry}/stat").read_text()
            except OSError:
                continue
            fields = stat.rsplit(")", 1)[1].split()
            if int(fields[1]) == pid and "qemu-storage" in stat.split(")")[0]:
                found.append(int(entry))
    return found


def test_hot_added_vhost_user_disk_its_backend_killed_mid_io_then_removed(guest, exports):
    hot = exports("hot")
    missing = str(Path(hot.socket).with_name("nobody.sock"))
    status, body = curl(guest, "vm.add-disk", {"vhost_user": True, "vhost_socket": missing})
    assert status == 400 and missing in body, body
    assert len(vm_info(guest)["config"]["disks"]) == 3

    status, body = curl(guest, "vm.add-disk", {"vhost_user": True, "vhost_socket": hot.socket})
    assert status == 200, body
    dev_id = json.loads(body)["id"]
    rc, out = wait_in_guest(guest, "[ -e /sys/block/vdd ]")
    assert rc == 0, f"the hot-added disk never showed up: {guest.run('dmesg | tail')}"
    rc, out = guest.run(f"{guest_read('/dev/vdd')}; {guest_write('/dev/vdd')}", timeout=300)
    assert rc == 0, f"{out}\n{hot.log_text()}\npych: {guest.pych_log()}"
    read_md5, written_md5 = [line.split()[0] for line in out.splitlines()[:2]]
    assert read_md5 == md5(pattern(DATA, seed=len("hot")))
    assert md5(hot.image.read_bytes()[WRITE_AT:WRITE_AT + DATA]) == written_md5

    # the guest writes (direct, 4 KiB at a time) in the background; the back-end dies
    guest.run("setsid sh -c 'dd if=/dev/zero of=/dev/vdd bs=4096 count=4000 oflag=direct; "
              "echo $? > /tmp/dd.rc' </dev/null >/dev/null 2>&1 &", timeout=60)
    time.sleep(2)
    hot.proc.kill()
    assert wait_until(lambda: events(guest, "device-failed"), 60), guest.pych_log()
    (event,) = events(guest, "device-failed")
    assert event["properties"]["id"] == dev_id
    assert f"the vhost-user backend at {hot.socket} hung up" in event["properties"]["error"]
    status, body = curl(guest, "vmm.ping", method="GET")     # pych answers its API
    assert status == 200, body
    failed = vm_info(guest)["devices_failed"]
    assert failed == [{"id": dev_id, "error": event["properties"]["error"]}]
    # the guest's writes end with an error instead of hanging
    rc, out = wait_in_guest(guest, "[ -s /tmp/dd.rc ]", limit=120)
    assert rc == 0, guest.run("dmesg | tail")[1]
    rc, out = guest.run("cat /tmp/dd.rc; dmesg | grep -c 'I/O error, dev vdd'")
    dd_rc, io_errors = out.split()[:2]
    assert dd_rc != "0" and int(io_errors) >= 1, out

    status, body = curl(guest, "vm.remove-device", {"id": dev_id})
    assert (status, body) == (204, "")
    assert wait_until(lambda: any(e["properties"]["id"] == dev_id
                                  for e in events(guest, "device-removed")), 300), \
        guest.pych_log()
    info = vm_info(guest)
    assert dev_id not in info["device_tree"] and info["devices_failed"] == []
    assert [d["id"] for d in info["config"]["disks"]] == ["_disk0", "_disk1", "_disk2"]
    rc, out = guest.run("[ -e /sys/block/vdd ] || echo gone")
    assert "gone" in out.split(), out


def test_qcow2_clean_and_holds_the_guest_data_after_pych_exits(guest, images, workdir):
    pid = guest.proc.pid
    owned = daemons_of(pid)
    assert len(owned) == 1                     # _disk1's; the other disks have none
    guest.stop()
    assert wait_until(lambda: not os.path.exists(f"/proc/{owned[0]}"), 30)   # pych stopped it
    top = images["qcow2"]
    check = subprocess.run(["qemu-img", "check", str(top)], capture_output=True, text=True)
    assert check.returncode == 0 and "No errors were found" in check.stdout, check.stdout
    out = workdir / "converted.raw"
    subprocess.run(["qemu-img", "convert", "-O", "raw", str(top), str(out)], check=True)
    data = out.read_bytes()
    assert len(data) == 48 * MiB                                   # the live resize stuck
    assert md5(data[:DATA]) == md5(pattern(DATA, seed=7))          # the backing file's data
    assert md5(data[WRITE_AT:WRITE_AT + DATA]) == guest.qcow2_written  # the guest's write
    # the guest's data went into the top image, not the backing file
    base = subprocess.run(["qemu-io", "-f", "qcow2", "-c", f"read -P 0 {WRITE_AT} {DATA}",
                           str(workdir / "top-base.qcow2")], capture_output=True, text=True)
    assert "Pattern verification failed" not in base.stdout and base.returncode == 0, base.stdout
