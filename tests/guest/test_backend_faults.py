"""Back-ends failing under a running guest (issue 17, "back-end faults"): one guest, booted
in a network namespace of the module's own with

* ``_disk0`` (/dev/vda): a raw image on a 1 MiB tmpfs, so the guest fills it (ENOSPC);
* ``_disk1`` (/dev/vdb): a raw image on a loop-mounted ext4 the test shuts down
  (``FS_IOC_SHUTDOWN``: every read and write of it answers EIO from then on);
* a NIC on a tap pych creates, which the test deletes (``ip link del``);
* a virtio-fs share served by Debian's virtiofsd, which the test kills mid-read;
* ``--console socket=`` (hvc0), whose clients come, go and stall, and the serial socket
  the test drives the guest through, which it drops and reconnects;
* ``--event-monitor path=`` a FIFO whose reader (a thread here, the pipe shrunk to 4 KiB)
  the test stalls.

For each: the guest sees an I/O error or a link change (not a hang), pych answers its API,
``vm.info`` shows what failed (a disk answering I/O errors is not failed: the request fails
and the disk stays, as with the reference), a ``device-failed`` event is emitted where a
device fails, and removal still works. The tests run in order on the one guest; waits poll.
docs/failures.md says what each fault does.
"""

from __future__ import annotations

import fcntl
import hashlib
import json
import os
import select
import socket
import struct
import subprocess
import threading
import time
from pathlib import Path

import pytest

from pych.api.client import ApiClient
from tests.support.guest import PychGuest, vm_info
from tests.support.hotplug import events, wait_in_guest
from tests.support.virtiofsd import VIRTIOFSD, Virtiofsd

NETNS = f"pych-faults-{os.getpid()}"
TAP = "pychflt0"
HOST_IP, GUEST_IP = "192.168.231.1", "192.168.231.2"
MiB = 1 << 20
FS_IOC_SHUTDOWN = 0x8004587D          # _IOR('X', 125, __u32)
FS_GOING_NOLOGFLUSH = 2
SHARE_FILE_SIZE = 1 * MiB


def pattern(size: int, seed: int = 0) -> bytes:
    return b"".join(hashlib.sha256(f"{seed}:{i}".encode()).digest() for i in range(size // 32))


def md5(data: bytes) -> str:
    return hashlib.md5(data).hexdigest()


def api(guest: PychGuest, method: str, endpoint: str, body=None) -> tuple[int, str]:
    with ApiClient(guest.api_path, timeout=30) as client:
        if method == "GET":
            status, data = client.get(endpoint)
        else:
            status, data = client.put(endpoint, body)
    return status, data.decode(errors="replace")


def wait_until(predicate, limit: float, interval: float = 0.2) -> bool:
    deadline = time.monotonic() + limit
    while not predicate():
        if time.monotonic() > deadline:
            return False
        time.sleep(interval)
    return True


def full_log(guest: PychGuest) -> str:
    return guest.log_path.read_text(errors="replace")


def sh(*args: str) -> str:
    return subprocess.run(args, check=True, capture_output=True, text=True).stdout


class EventReader:
    """Reads the event monitor's FIFO on a thread into ``out`` (what ``events()`` reads);
    :meth:`stall` stops reading (the 4 KiB pipe then fills), :meth:`resume` goes on."""

    def __init__(self, fifo: Path, out: Path) -> None:
        os.mkfifo(fifo)
        self.fd = os.open(fifo, os.O_RDONLY | os.O_NONBLOCK | os.O_CLOEXEC)
        fcntl.fcntl(self.fd, fcntl.F_SETPIPE_SZ, 4096)
        self.out = open(out, "ab", buffering=0)
        self.reading = threading.Event()
        self.reading.set()
        self.idle = threading.Event()        # set while stalled and not inside a read
        self.stopped = False
        self.thread = threading.Thread(target=self._run, daemon=True)
        self.thread.start()

    def _run(self) -> None:
        while not self.stopped:
            if not self.reading.is_set():
                self.idle.set()
                self.reading.wait(0.2)
                continue
            self.idle.clear()
            r, _, _ = select.select([self.fd], [], [], 0.2)
            if not r:
                continue
            try:
                data = os.read(self.fd, 65536)
            except BlockingIOError:
                continue
            if data:
                self.out.write(data)
            else:
                time.sleep(0.1)              # no writer (yet, or any more)

    def stall(self) -> None:
        self.reading.clear()
        assert self.idle.wait(10)

    def resume(self) -> None:
        self.reading.set()

    def close(self) -> None:
        self.stopped = True
        self.reading.set()
        self.thread.join(5)
        os.close(self.fd)
        self.out.close()


@pytest.fixture(scope="module")
def workdir(tmp_path_factory) -> Path:
    if not os.path.exists(VIRTIOFSD):
        pytest.fail(f"{VIRTIOFSD} is missing: scripts/install-deps.sh installs it "
                    "(qemu-system-common)")
    return tmp_path_factory.mktemp("backend-faults")


@pytest.fixture(scope="module")
def mounts(workdir):
    """A 1 MiB tmpfs holding an 8 MiB sparse image, and a loop-mounted ext4 holding a 4 MiB
    image of a known pattern; unmounted at the end (after the guest stopped)."""
    full, eio = workdir / "full", workdir / "eio"
    full.mkdir()
    eio.mkdir()
    mounted = []
    try:
        sh("mount", "-t", "tmpfs", "-o", "size=1M", "tmpfs", str(full))
        mounted.append(full)
        (full / "disk.raw").touch()
        os.truncate(full / "disk.raw", 8 * MiB)
        fs_image = workdir / "eio.ext4"
        fs_image.touch()
        os.truncate(fs_image, 32 * MiB)
        sh("mkfs.ext4", "-q", "-F", str(fs_image))
        sh("mount", "-o", "loop", str(fs_image), str(eio))
        mounted.append(eio)
        (eio / "disk.raw").write_bytes(pattern(4 * MiB, seed=3))
        yield {"full": full, "full_image": full / "disk.raw", "eio": eio,
               "eio_image": eio / "disk.raw"}
    finally:
        for path in reversed(mounted):
            subprocess.run(["umount", str(path)], check=False)


@pytest.fixture(scope="module")
def share(workdir):
    d = Virtiofsd(workdir, "share")
    (d.source / "big.bin").write_bytes(pattern(SHARE_FILE_SIZE, seed=5))
    yield d
    d.stop()


@pytest.fixture(scope="module")
def guest(netns, workdir, mounts, share):
    d = workdir / "vm"
    console_path = str(workdir / "console.sock")
    reader = EventReader(workdir / "events.fifo", workdir / "events")
    g = PychGuest(d, extra_args=[
        "--disk", f"path={mounts['full_image']}", f"path={mounts['eio_image']}",
        "--net", f"tap={TAP},ip={HOST_IP},mask=255.255.255.0",
        "--fs", f"tag=share,socket={share.socket}",
        "--event-monitor", f"path={workdir / 'events.fifo'}"])
    g.args[g.args.index("--console") + 1] = f"socket={console_path}"
    g.args = ["ip", "netns", "exec", netns, *g.args]
    g.events_path = workdir / "events"
    g.event_reader = reader
    g.console_path = console_path
    try:
        g.start()
        g.wait_ready()
        yield g
    finally:
        g.stop()
        reader.close()


def device_ids(guest) -> dict[str, str]:
    """kind → id of the boot devices, read from vm.info's configuration once (before any
    of them is removed)."""
    if not hasattr(guest, "ids"):
        config = vm_info(guest)["config"]
        guest.ids = {"full": config["disks"][0]["id"], "eio": config["disks"][1]["id"],
                     "net": config["net"][0]["id"], "fs": config["fs"][0]["id"]}
    return guest.ids


class ConsoleClient:
    """A client of ``--console socket=``: reads whatever comes into ``buf`` when asked."""

    def __init__(self, path: str) -> None:
        self.sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        self.sock.connect(path)
        self.buf = b""

    def wait_for(self, text: bytes, limit: float = 120) -> bool:
        deadline = time.monotonic() + limit
        while text not in self.buf:
            left = deadline - time.monotonic()
            if left <= 0:
                return False
            r, _, _ = select.select([self.sock], [], [], min(left, 1))
            if r:
                data = self.sock.recv(65536)
                if not data:
                    return False
                self.buf += data
        return True

    def read_to_eof(self, limit: float = 60) -> bool:
        """Read until pych closes this connection; False if it is still open after ``limit``."""
        deadline = time.monotonic() + limit
        while (left := deadline - time.monotonic()) > 0:
            r, _, _ = select.select([self.sock], [], [], min(left, 1))
            if r:
                try:
                    data = self.sock.recv(65536)
                except ConnectionResetError:
                    return True
                if not data:
                    return True
                self.buf += data
        return False

    def close(self) -> None:
        self.sock.close()


def wait_for_event(guest, name: str, dev_id: str, limit: float = 120) -> dict | None:
    found: list[dict] = []

    def seen() -> bool:
        found[:] = [e for e in events(guest, name) if (e["properties"] or {}).get("id") == dev_id]
        return bool(found)

    return found[0] if wait_until(seen, limit) else None


def remove(guest, dev_id: str) -> None:
    """vm.remove-device, then the guest ejects it: a device-removed event, gone from
    vm.info (and from its failed devices)."""
    status, body = api(guest, "PUT", "vm.remove-device", {"id": dev_id})
    assert status == 204, body
    assert wait_for_event(guest, "device-removed", dev_id, 300), guest.pych_log()
    info = vm_info(guest)
    assert dev_id not in info["device_tree"], info["device_tree"].keys()
    assert all(f["id"] != dev_id for f in info["devices_failed"])


def test_every_device_works_before_the_faults(guest, share):
    assert len(set(device_ids(guest).values())) == 4
    client = ConsoleClient(guest.console_path)
    guest.console_client = client
    rc, out = guest.run(
        "cat /sys/block/vda/size /sys/block/vdb/size; "
        "dd if=/dev/vdb bs=65536 count=1 iflag=direct 2>/dev/null | md5sum; "
        "mkdir -p /mnt/share && mount -t virtiofs share /mnt/share && "
        "md5sum /mnt/share/big.bin; "
        f"ip addr add {GUEST_IP}/24 dev eth0 && ip link set eth0 up && "
        f"ping -c 2 -W 10 {HOST_IP} >/dev/null && echo ping-ok; "
        "echo console-hello > /dev/hvc0", timeout=300)
    assert rc == 0, f"{out}\nvirtiofsd: {share.log_text()}\npych: {guest.pych_log()}"
    lines = out.splitlines()
    assert (int(lines[0]), int(lines[1])) == (8 * MiB // 512, 4 * MiB // 512), out
    assert lines[2].split()[0] == md5(pattern(4 * MiB, seed=3)[:65536])
    assert lines[3].split()[0] == md5(pattern(SHARE_FILE_SIZE, seed=5))
    assert "ping-ok" in lines, out
    assert client.wait_for(b"console-hello"), client.buf[-500:]
    assert vm_info(guest)["devices_failed"] == []


def test_a_disk_on_a_full_filesystem_fails_the_write_and_stays(guest, mounts):
    image = mounts["full_image"]
    # 64 KiB fit; 2 MiB more do not fit the 1 MiB tmpfs: ENOSPC for pych, IOERR for the guest
    rc, out = guest.run(
        "dd if=/dev/urandom of=/tmp/small.bin bs=65536 count=1 2>/dev/null; md5sum /tmp/small.bin; "
        "dd if=/tmp/small.bin of=/dev/vda bs=65536 oflag=direct conv=fsync 2>/dev/null && "
        "echo small-ok; dmesg -c >/dev/null; "
        "dd if=/dev/zero of=/dev/vda bs=65536 count=32 seek=16 oflag=direct 2>&1; echo dd-rc=$?; "
        "dmesg | grep -c 'I/O error, dev vda'", timeout=300)
    small_md5 = out.split()[0]
    assert "small-ok" in out, f"{out}\npych: {guest.pych_log()}"
    assert md5(image.read_bytes()[:65536]) == small_md5             # the first write landed
    assert "dd-rc=0" not in out and "dd-rc=" in out, out
    assert int(out.splitlines()[-1]) >= 1, out                       # the guest saw IOERR
    assert "No space left on device" in full_log(guest)
    status, body = api(guest, "GET", "vmm.ping")                     # pych answers
    assert status == 200, body
    info = vm_info(guest)
    assert info["state"] == "Running" and info["devices_failed"] == []   # the disk stays
    # space is freed: the same disk takes the write again
    sh("mount", "-o", "remount,size=16M", str(mounts["full"]))
    rc, out = guest.run("dd if=/tmp/small.bin of=/dev/vda bs=65536 seek=32 oflag=direct "
                        "conv=fsync 2>/dev/null && echo again-ok", timeout=300)
    assert "again-ok" in out, out
    assert md5(image.read_bytes()[32 * 65536:33 * 65536]) == small_md5


def test_a_disk_on_a_device_returning_eio_fails_the_read_and_is_removable(guest, mounts):
    ids = device_ids(guest)
    fd = os.open(mounts["eio"], os.O_RDONLY)
    try:
        fcntl.ioctl(fd, FS_IOC_SHUTDOWN, struct.pack("I", FS_GOING_NOLOGFLUSH))
    finally:
        os.close(fd)
    with pytest.raises(OSError):                                     # the host sees EIO too
        mounts["eio_image"].read_bytes()
    rc, out = guest.run("dmesg -c >/dev/null; dd if=/dev/vdb of=/dev/null bs=4096 count=1 "
                        "skip=100 iflag=direct 2>&1; echo dd-rc=$?; "
                        "dmesg | grep -c 'I/O error, dev vdb'", timeout=300)
    assert "dd-rc=0" not in out and "dd-rc=" in out, out
    assert int(out.splitlines()[-1]) >= 1, out
    assert "Input/output error" in full_log(guest)
    status, body = api(guest, "GET", "vmm.ping")
    assert status == 200, body
    info = vm_info(guest)
    assert info["state"] == "Running" and info["devices_failed"] == []
    remove(guest, ids["eio"])
    rc, out = wait_in_guest(guest, "[ ! -e /sys/block/vdb ]")
    assert rc == 0, out


def test_virtiofsd_killed_mid_read(guest, share):
    ids = device_ids(guest)
    fs_id = ids["fs"]
    # the guest reads the share over and over (cache=none: every read reaches virtiofsd)
    guest.run("setsid sh -c 'while :; do cat /mnt/share/big.bin > /dev/null || "
              "{ echo $? > /tmp/fs.rc; break; }; done' </dev/null >/dev/null 2>&1 &")
    time.sleep(2)
    share.proc.kill()
    event = wait_for_event(guest, "device-failed", fs_id)
    assert event is not None, guest.pych_log()
    assert f"the vhost-user backend at {share.socket} hung up" in event["properties"]["error"]
    status, body = api(guest, "GET", "vmm.ping")
    assert status == 200, body
    failed = vm_info(guest)["devices_failed"]
    assert failed == [{"id": fs_id, "error": event["properties"]["error"]}]
    # the reader's loop ends with an error, and so does any new access
    rc, out = wait_in_guest(guest, "[ -s /tmp/fs.rc ]", limit=120)
    assert rc == 0, guest.run("dmesg | tail")[1]
    rc, out = guest.run("echo fs-rc=$(cat /tmp/fs.rc); cat /mnt/share/big.bin > /dev/null; "
                        "echo cat-rc=$?; umount /mnt/share; echo umount-rc=$?", timeout=120)
    assert "fs-rc=" in out and "fs-rc=0" not in out, out             # the reader's cat failed
    assert "cat-rc=0" not in out and "Input/output error" in out, out
    remove(guest, fs_id)
    rc, out = wait_in_guest(guest, "! ls /sys/bus/virtio/drivers/virtiofs | grep -q virtio")
    assert rc == 0, out


def test_tap_deleted_under_the_nic(guest, netns):
    net_id = device_ids(guest)["net"]
    subprocess.run(["ip", "netns", "exec", netns, "ip", "link", "del", TAP], check=True)
    event = wait_for_event(guest, "device-failed", net_id)
    assert event is not None, guest.pych_log()
    assert event["properties"]["error"].startswith(f"the tap {TAP} is gone")
    status, body = api(guest, "GET", "vmm.ping")
    assert status == 200, body
    assert vm_info(guest)["devices_failed"] == [{"id": net_id,
                                                  "error": event["properties"]["error"]}]
    # the guest sees the link go down; its traffic fails at once instead of hanging
    rc, out = wait_in_guest(guest, '[ "$(cat /sys/class/net/eth0/carrier)" = 0 ]', limit=60)
    assert rc == 0, guest.run("ip link show eth0; dmesg | tail")[1]
    rc, out = guest.run(f"ping -c 1 -W 2 {HOST_IP} >/dev/null 2>&1; echo ping-rc=$?", timeout=60)
    assert "ping-rc=0" not in out and "ping-rc=" in out, out
    remove(guest, net_id)
    rc, out = wait_in_guest(guest, "[ ! -e /sys/class/net/eth0 ]")
    assert rc == 0, out


def test_event_monitor_reader_stalls(guest):
    reader = guest.event_reader
    reader.stall()
    took = []
    for _ in range(40):                  # ~130 bytes each: far more than the 4 KiB pipe holds
        for endpoint in ("vm.pause", "vm.resume"):
            start = time.monotonic()
            status, body = api(guest, "PUT", endpoint)
            took.append(time.monotonic() - start)
            assert status == 204, body
    assert max(took) < 10, took
    rc, out = guest.run("echo vcpus-run")                # the guest runs meanwhile
    assert "vcpus-run" in out
    log = full_log(guest)
    assert log.count("event monitor: the reader is not reading") == 1, log
    reader.resume()
    # the pipe drains; the next events arrive whole, and the drop count is logged once
    assert wait_until(lambda: len(events(guest, "resumed")) >= 1, 30)
    before = len(events(guest, "resumed"))
    assert api(guest, "PUT", "vm.pause")[0] == 204
    assert api(guest, "PUT", "vm.resume")[0] == 204
    assert wait_until(lambda: len(events(guest, "resumed")) == before + 1, 30)
    for line in guest.events_path.read_text().splitlines():
        json.loads(line)                                 # no line was cut
    assert "the reader is reading again" in full_log(guest)
    assert len(events(guest, "paused")) < 41             # some were dropped, not queued


def console_lines(tag: str, count: int) -> str:
    """A guest command printing ``count`` numbered lines ``TAG-NNNNN`` (one awk process)."""
    return f"awk 'BEGIN {{ for (i = 0; i < {count}; i++) printf \"{tag}-%05d\\n\", i }}'"


def test_console_socket_clients_stall_and_vanish(guest):
    """``--console socket=`` (hvc0), whose client the first test connected and has not read
    since. The guest writes past that stalled client (here its socket fills after ~0.5 KB:
    hvc0 sends a byte or two at a time; pych keeps the rest); a new client replaces it, then
    vanishes (closed with output unread: pych's next send fails) while the guest writes; the
    guest's writes end, its shell answers, pych answers its API, and the next client gets
    what was written meanwhile (the history, the last 64 KiB) and then the live stream.
    Sizes are small (hvc0 moves well under 1 KB/s here): a client falling more than 1 MiB
    behind is tests/unit/devices/legacy/test_serial_backend.py's."""
    stalled = guest.console_client
    start = time.monotonic()
    rc, out = guest.run(f"{console_lines('stalled', 200)} > /dev/hvc0; echo written", timeout=300)
    assert rc == 0 and out.splitlines()[-1] == "written", out
    print(f"3 KB to hvc0 in {time.monotonic() - start:.1f} s")

    client = ConsoleClient(guest.console_path)       # replaces the stalled client
    assert client.wait_for(b"stalled-00199"), client.buf[-300:]
    assert stalled.read_to_eof(), stalled.buf[-300:]  # pych hung up on the replaced one
    # what the stalled client got is the start of the stream, in order, nothing lost
    assert stalled.buf and client.buf.startswith(stalled.buf), (stalled.buf[-200:],
                                                                client.buf[:200])
    print(f"the stalled client got {len(stalled.buf)} of {len(client.buf)} bytes")
    stalled.close()

    # the guest writes (a background job) while the client vanishes mid-stream
    guest.run(f"({console_lines('gone', 400)} > /dev/hvc0; echo $? > /tmp/hvc.rc; "
              "echo no-client-marker > /dev/hvc0) </dev/null >/dev/null 2>&1 &")
    assert client.wait_for(b"gone-00050"), client.buf[-300:]
    time.sleep(0.5)                                   # more arrives, unread
    client.close()
    status, body = api(guest, "GET", "vmm.ping")      # pych answers
    assert status == 200, body
    rc, out = guest.run("echo shell-answers")         # and so does the guest's shell
    assert out.splitlines()[-1] == "shell-answers", out
    rc, out = wait_in_guest(guest, "[ -s /tmp/hvc.rc ]", limit=300)
    assert rc == 0, guest.run("ps; dmesg | tail")[1]
    rc, out = guest.run("cat /tmp/hvc.rc")
    assert out.splitlines()[-1] == "0", out           # every write of the guest succeeded
    assert vm_info(guest)["state"] == "Running"

    later = ConsoleClient(guest.console_path)
    assert later.wait_for(b"no-client-marker"), later.buf[-300:]
    assert b"gone-00399" in later.buf                  # written after the client vanished
    guest.run("echo live-after-reconnect > /dev/hvc0")
    assert later.wait_for(b"live-after-reconnect"), later.buf[-300:]
    later.close()
    assert "Traceback" not in full_log(guest), guest.pych_log()
