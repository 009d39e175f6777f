"""Live migration of a running, hot plugged guest (issue 15; docs/snapshot.md, "Live
migration").

One guest is booted (1 vCPU, max 2; 256 MiB shared RAM; a raw disk) and hot plugged to 2
vCPUs (onlined); a shell loop in it counts in memory (a shell variable, written to a tmpfs
file every 0.1 s). The tests run in order and share it: bad requests are refused with the
source running on; a receiver that hangs up halfway leaves the source running and counting;
a destination fed a truncated stream refuses and keeps no VM (and then receives the real
migration); the guest then migrates over a Unix socket, on over TCP on 127.0.0.1, and on
with ``local`` (memory passed by fd). After each hop the counter continues from where it
was, the vCPUs are 2, the disk reads as before, the destination answers the API, and the
source pych has exited with the downtime and total time in its log. The module boots once.

The guest also has virtio-mem (grown by 128 MiB before the first hop, a marker file in
tmpfs whose pages are in that memory) and a hot-added NIC on a tap in the module's network
namespace (every pych runs there): after each hop MemTotal, the marker, the device's
plugged size are as before and the guest pings the host end of the tap; the tap is handed
over by name (unix, tcp: persistent only while no pych holds it) or by fd (local). A
receiver that refuses the state after the source let the tap go leaves the source running
with its tap. After the last hop virtio-mem is grown and shrunk again.

Before the local hop a virtio-fs share served by Debian's virtiofsd (``cache=none``) is hot
added and mounted, and the guest's shell holds a file in it open (fd 3) that the host then
deletes: only virtiofsd's FUSE session (its open file) still reaches it. A migration to
another pych that is not local is refused naming why (virtiofsd cannot hand its session
over); a local one whose receiver refuses STATE after the source let go of the connection
leaves the source with its share. The local hop hands the connection over: the same
virtiofsd process serves the destination, the guest reads on through fd 3 and writes new
files the host sees, and the share's removal there ends virtiofsd (the destination owns the
connection). The share goes before the snapshot (which refuses virtio-fs).
"""

from __future__ import annotations

import json
import os
import re
import socket
import subprocess
import threading
import time
from pathlib import Path

import pytest

from pych.api.client import ApiClient
from pych.cli.remote import wait_for_vcpus
from pych.migration import protocol
from pych.vmm.vmm import VERIFY_ENV
from tests.support.guest import (REPO, Console, PychGuest, Shell, guest_artifacts,
                                 mem_total_kib)
from tests.support.hotplug import wait_in_guest
from tests.support.virtiofsd import VIRTIOFSD, Virtiofsd

MiB = 1 << 20
GUEST_WAIT = 600
NETNS = f"pych-migration-{os.getpid()}"
TAP, GUEST_MAC, HOST_MAC = "migtap0", "52:54:00:6d:69:67", "52:54:00:68:6f:73"
HOST_IP, GUEST_IP = "192.168.251.1", "192.168.251.2"
# replies to the two requests; a duplicate reply ("DUP!") is not counted: one run on a loaded
# host saw one right after the source took its tap back (docs/snapshot.md, "Known limits")
PING = f"ping -c 2 -W 10 {HOST_IP} | grep 'bytes from' | grep -vc DUP"
BOOT = 256 * MiB
VMEM_REGION = 256 * MiB
MARKER = "pych-migration-marker-in-virtio-mem"
MARKER_MD5 = "md5sum < /mnt/m/marker | cut -c1-32"
# The counter loop's `echo $i > counter` truncates the file before writing it: a read in
# between finds it empty (one CI run did, and the migration tests after it failed with it),
# so the read is retried until it has the number.
COUNT = ('n=; while [ -z "$n" ]; do n=$(cat /mnt/m/counter); done; echo "$n"; '
         "echo var=$MIGVAR; nproc; grep MemTotal /proc/meminfo; " + MARKER_MD5)
# the disk's first 64 KiB (the guest's kernel code is emulated here: a whole-disk md5 is slow)
DISK = "dd if=/dev/vda bs=64k count=1 2>/dev/null | md5sum | cut -c1-32"


@pytest.fixture(scope="module")
def disk(tmp_path_factory) -> Path:
    path = tmp_path_factory.mktemp("migration-disk") / "disk.raw"
    path.write_bytes(bytes(range(256)) * (4 * MiB // 256))
    return path


@pytest.fixture(scope="module")
def guest(netns, disk, tmp_path_factory):
    subprocess.run(["ip", "-n", netns, "link", "set", "lo", "up"], check=True)   # tcp: hop
    g = PychGuest(tmp_path_factory.mktemp("mig-vm"), cpus="boot=1,max=2",
                  memory=f"size=256M,shared=on,hotplug_method=virtio-mem,"
                         f"hotplug_size={VMEM_REGION >> 20}M",
                  extra_args=["--disk", f"path={disk}", "-v"],
                  cmdline_extra="memhp_default_state=online_movable",
                  # its migration checks the receiver's RAM against its own (VERIFY)
                  env={**os.environ, VERIFY_ENV: "1"})
    g.args = ["ip", "netns", "exec", netns, *g.args]        # exec()s pych: same pid
    g.receivers = []
    g.restored = None
    try:
        g.start()
        g.wait_ready()
        prepare(g)
        yield g
    finally:
        for receiver in g.receivers:
            receiver.stop()
        if g.restored is not None:
            g.restored.stop()
        g.stop()


@pytest.fixture(scope="module")
def share(tmp_path_factory):
    """Debian's virtiofsd (cache=none: every guest read is a FUSE READ), for the share the
    guest gets before the local hop."""
    if not os.path.exists(VIRTIOFSD):
        pytest.fail(f"{VIRTIOFSD} is missing: scripts/install-deps.sh installs it "
                    "(qemu-system-common)")
    d = Virtiofsd(tmp_path_factory.mktemp("mig-fs"), "share")
    d.pid = d.proc.pid
    yield d
    d.stop()


def prepare(g: PychGuest) -> None:
    """Hot plug the guest: a vCPU, virtio-mem, a NIC; start the counting loop, write the
    marker."""
    assert api(g.api_path, "vm.resize", {"desired_vcpus": 2})[0] == 204
    with ApiClient(g.api_path) as client:
        wait_for_vcpus(client, 2, GUEST_WAIT)
    # virtio-mem grown by 128 MiB, onlined movable by the guest
    g.base_kib = mem_total_kib(g)
    assert api(g.api_path, "vm.resize", {"desired_ram": BOOT + 128 * MiB})[0] == 204
    g.mem_kib = g.base_kib + 128 * 1024
    assert wait_for(lambda: mem_total_kib(g), g.mem_kib) == g.mem_kib
    rc, out = g.run(
        "until [ -e /sys/devices/system/cpu/cpu1/online ]; do sleep 0.5; done; "
        "echo 1 > /sys/devices/system/cpu/cpu1/online; "
        "mkdir -p /mnt/m && mount -t tmpfs tmpfs /mnt/m; export MIGVAR=kept-$$; "
        "(i=0; while :; do i=$((i+1)); echo $i > /mnt/m/counter; sleep 0.1; done) & "
        "sleep 1; nproc", timeout=GUEST_WAIT)
    assert rc == 0 and out.splitlines()[-1] == "2", out
    # A marker file in tmpfs: its pages are movable, so the guest takes them from the
    # virtio-mem memory first (ZONE_MOVABLE); checked below to be there on the host.
    # (144 KiB of marker lines in one write: writing tmpfs pages is slow in this guest,
    # whose kernel code is emulated; 8 MiB took more than 10 minutes)
    rc, out = g.run(f"nl=$(printf '\\nx'); nl=${{nl%x}}; s=\"{MARKER}$nl\"; "
                    "for i in 1 2 3 4 5 6 7 8 9 10 11 12; do s=\"$s$s\"; done; "
                    f"printf %s \"$s\" > /mnt/m/marker; {MARKER_MD5}", timeout=GUEST_WAIT)
    assert rc == 0 and len(out) == 32, out
    g.marker_md5 = out
    # a NIC on a tap pych creates in the namespace, its host end configured by pych
    status, text = api(g.api_path, "vm.add-net", {"tap": TAP, "ip": HOST_IP,
                                                  "mask": "255.255.255.0", "mac": GUEST_MAC,
                                                  "host_mac": HOST_MAC})
    assert status == 200, text
    rc, out = g.run("until [ -e /sys/class/net/eth0 ]; do sleep 0.5; done; "
                    f"ip addr add {GUEST_IP}/24 dev eth0 && ip link set eth0 up && {PING}",
                    timeout=GUEST_WAIT)
    assert (rc, out) == (0, "2"), out
    assert "persist off" in tap_details()


def tap_details() -> str:
    """``ip -d link show`` of the tap (``persist on|off`` among the tun details)."""
    return subprocess.run(["ip", "-n", NETNS, "-d", "link", "show", TAP], capture_output=True,
                          text=True, check=True).stdout


def wait_for(probe, expected, timeout: float = GUEST_WAIT, interval: float = 2):
    """Poll ``probe()`` until it returns ``expected``; its last value."""
    deadline = time.monotonic() + timeout
    while (value := probe()) != expected and time.monotonic() < deadline:
        time.sleep(interval)
    return value


def virtio_mem(api_path: str) -> dict:
    status, vm = info(api_path)
    assert status == 200, vm
    (device,) = vm["memory_hotplug"]["virtio_mem"]
    return device


def marker_pages_in_region(pid: int) -> int:
    """How many 4 KiB pages of the virtio-mem region's memfd (read through the pych
    process ``pid``'s fd) begin with the marker's text: the marker lives in that memory."""
    fds = Path(f"/proc/{pid}/fd")
    # the region's fd and the one Python's mmap keeps (a dup): one memfd
    found_fds = {os.stat(p).st_ino: p for p in fds.iterdir()
                 if "pych-virtio-mem-mem0" in (os.readlink(p) if p.is_symlink() else "")}
    (fd_path,) = found_fds.values()
    needle = f"{MARKER}\n".encode() * 2
    found = 0
    fd = os.open(fd_path, os.O_RDONLY)
    try:
        pos = 0
        while True:
            try:
                pos = os.lseek(fd, pos, os.SEEK_DATA)
            except OSError:
                break
            end = os.lseek(fd, pos, os.SEEK_HOLE)
            while pos < end:
                data = os.pread(fd, min(8 * MiB, end - pos), pos)
                found += data.count(needle)
                pos += len(data)
    finally:
        os.close(fd)
    return found


def api(path: str, endpoint: str, body=None, timeout: float | None = None) -> tuple[int, str]:
    with ApiClient(path, timeout=timeout) as client:
        status, text = client.put(endpoint, body)
    return status, text.decode()


def info(path: str) -> tuple[int, dict | str]:
    with ApiClient(path) as client:
        status, body = client.get("vm.info")
    return status, (json.loads(body) if status == 200 else body.decode())


def counter(shell_owner) -> tuple[int, list[str]]:
    rc, out = shell_owner.run(COUNT, timeout=GUEST_WAIT)
    assert rc == 0, out
    lines = out.splitlines()
    return int(lines[0]), lines[1:]


class Receiver:
    """A pych started with only ``--api-socket`` (and ``-v``), to receive a migration."""

    def __init__(self, workdir: Path, name: str):
        workdir.mkdir(parents=True, exist_ok=True)
        self.api_path = str(workdir / f"{name}.api")
        self.log_path = workdir / f"{name}.log"
        self._log = open(self.log_path, "ab")
        self.proc = subprocess.Popen(["ip", "netns", "exec", NETNS,
                                      str(REPO / ".venv" / "bin" / "pych"), "--api-socket",
                                      self.api_path, "-v"], stdout=self._log, stderr=self._log)
        deadline = time.monotonic() + 30
        while not Path(self.api_path).exists():
            assert self.proc.poll() is None and time.monotonic() < deadline, self.log()
            time.sleep(0.05)
        self.result: tuple[int, str] | None = None
        self.thread: threading.Thread | None = None
        # the guest's console, once it runs here
        self.console: Console | None = None
        self.shell: Shell | None = None

    def receive(self, url: str) -> None:
        """``vm.receive-migration`` in the background (it answers when the VM runs here)."""
        def call():
            self.result = api(self.api_path, "vm.receive-migration", {"receiver_url": url})
        self.thread = threading.Thread(target=call, daemon=True)
        self.thread.start()

    def received(self, timeout: float = GUEST_WAIT) -> tuple[int, str]:
        self.thread.join(timeout)
        assert self.result is not None, f"vm.receive-migration did not answer: {self.log()}"
        return self.result

    def run(self, cmd: str, timeout: float = 120, **kwargs):
        return self.shell.run(cmd, timeout, **kwargs)

    def attach_console(self, serial_path: str) -> None:
        self.console = Console.connect_unix(serial_path, 60, alive=lambda: self.proc.poll() is None)
        self.shell = Shell(self.console)
        self.shell.prepare()

    def log(self) -> str:
        return self.log_path.read_text(errors="replace")[-3000:]

    def stop(self) -> None:
        if self.proc.poll() is None:
            self.proc.terminate()
            try:
                self.proc.wait(15)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()
        if self.console is not None:
            self.console.close()
        self._log.close()


def listening(url: str, pid: int | str = "self") -> bool:
    """Someone listens on ``url`` (a Unix socket file is there; a TCP port is in LISTEN in
    the /proc/net/tcp of process ``pid``'s network namespace: connecting to find out would
    be taken for the migration itself)."""
    endpoint = protocol.parse_url(url)
    if endpoint.kind == "unix":
        return Path(endpoint.path).exists()
    with open(f"/proc/{pid}/net/tcp") as f:
        return any(fields[1].endswith(f":{endpoint.port:04X}") and fields[3] == "0A"
                   for fields in (line.split() for line in list(f)[1:]))


def wait_listening(url: str, timeout: float = 30, pid: int | str = "self") -> None:
    deadline = time.monotonic() + timeout
    while not listening(url, pid):
        assert time.monotonic() < deadline, f"nobody listens on {url}"
        time.sleep(0.05)


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def test_bad_requests_are_refused_and_the_source_runs_on(guest, tmp_path):
    cases = [
        ({"destination_url": "tcp:127.0.0.1:1", "local": True}, 400, "needs a unix: URL"),
        ({"destination_url": "ftp://x"}, 400, "unix:<path> or tcp:<host>:<port>"),
        ({"destination_url": f"unix:{tmp_path}/nobody", "tls_dir": "/tls"}, 400, "tls_dir"),
        ({"destination_url": f"unix:{tmp_path}/nobody"}, 400, "cannot connect"),
    ]
    for body, status, words in cases:
        got, text = api(guest.api_path, "vm.send-migration", body)
        assert got == status and words in text, (body, got, text)
    status, vm = info(guest.api_path)
    assert status == 200 and vm["state"] == "Running", vm


def test_a_receiver_that_hangs_up_halfway_leaves_the_source_running(guest, tmp_path):
    path = str(tmp_path / "liar.sock")
    listener = protocol.listen(protocol.parse_url(f"unix:{path}"))
    got: dict = {}

    def liar():
        conn, _ = listener.accept()
        channel = protocol.Channel(conn)
        for _ in range(2):                       # HELLO, CONFIG: accepted
            kind, body, _ = channel.receive()
            got[kind.name] = body
            channel.answer_ok()
        channel._recv_exact(8 * MiB, what="memory")   # some of the RAM, then hang up
        channel.close()

    thread = threading.Thread(target=liar, daemon=True)
    thread.start()
    before, _ = counter(guest)
    status, text = api(guest.api_path, "vm.send-migration", {"destination_url": f"unix:{path}"})
    thread.join(60)
    listener.close()
    # the receiver is gone while the RAM is sent (or, had it all fit in the socket buffers,
    # when the source asks it to take the state)
    assert status == 500 and re.search("receiver went away|truncated", text), text
    assert got["HELLO"]["format"] == "pych-migration"
    assert got["CONFIG"]["config"]["cpus"]["boot_vcpus"] == 2
    status, vm = info(guest.api_path)
    assert status == 200 and vm["state"] == "Running", vm
    after, rest = counter(guest)
    time.sleep(1)
    later, _ = counter(guest)
    assert before <= after < later, (before, after, later)    # it counts on, unharmed
    assert rest[1] == "2" and rest[0].startswith("var=kept-"), rest
    assert rest[3] == guest.marker_md5, rest


def test_a_truncated_stream_is_refused_and_leaves_no_vm(guest, tmp_path):
    receiver = Receiver(tmp_path, "dst1")
    guest.receivers.append(receiver)
    url = f"unix:{tmp_path}/dst1.mig"
    receiver.receive(url)
    wait_listening(url)
    channel = protocol.Channel(protocol.connect(protocol.parse_url(url)))
    channel.request(protocol.Msg.HELLO, protocol.hello(False))
    config = {"payload": {"kernel": str(guest_artifacts()["vmlinux"])},
              "memory": {"size": 64 * MiB}, "serial": {"mode": "Null"},
              "console": {"mode": "Off"}}
    layout = {"memory": {"zones": {"mem0": 64 * MiB}, "dimms": {}, "dimms_used": 0},
              "devices": {"slots": {}}}
    channel.request(protocol.Msg.CONFIG, {"config": config, "layout": layout, "shared": None})
    # a MEMORY message of 1 MiB of which 4 KiB come, then the sender is gone
    channel.sock.sendall(protocol.HEADER.pack(protocol.MAGIC, protocol.Msg.MEMORY,
                                              8 + MiB) + protocol.GPA.pack(0) + bytes(4096))
    channel.close()
    status, text = receiver.received(60)
    assert status == 500 and "truncated" in text, text
    status, body = info(receiver.api_path)
    assert status == 404, body                      # no VM was kept
    guest.dst1, guest.dst1_url = receiver, url


def refusing_receiver(path: str, at_state, what: str):
    """A receiver at unix:``path`` that takes everything (closing any fds that come,
    counted per message in ``got["<MSG> fds"]``; VERIFY answered with sums that cannot
    match) until STATE, calls ``at_state(got)`` there and refuses it. Returns ``got``
    (each message's first body by name), its thread (started) and the listener."""
    listener = protocol.listen(protocol.parse_url(f"unix:{path}"))
    got: dict = {}

    def refuser():
        conn, _ = listener.accept()
        channel = protocol.Channel(conn, timeout=GUEST_WAIT)
        while True:
            kind, length, fds = channel.receive_header()
            if kind is protocol.Msg.MEMORY:
                channel._recv_exact(length, what="memory")
                continue
            got[f"{kind.name} fds"] = len(fds)
            for fd in fds:                               # guest RAM, then the back-ends
                os.close(fd)
            body = channel.receive_json(length, kind)
            got.setdefault(kind.name, body)
            if kind is protocol.Msg.VERIFY:
                channel.answer_ok({"sums": [0] * len(body["blocks"])})
            elif kind is protocol.Msg.STATE:
                at_state(got)
                channel.answer_error(f"refused by the test once {what} was let go")
                break
            else:
                channel.answer_ok()
        channel.close()

    thread = threading.Thread(target=refuser, daemon=True)
    thread.start()
    return got, thread, listener


def test_a_receiver_that_refuses_the_state_leaves_the_source_running_with_its_tap(guest,
                                                                                 tmp_path):
    """The receiver refuses STATE, after the source paused, sent every page and let go of
    its tap (made persistent, closed): the source takes the tap back and runs on."""
    path = str(tmp_path / "refuser.sock")
    got, thread, listener = refusing_receiver(
        path, lambda got: got.setdefault("tap", tap_details()), "the tap")
    status, text = api(guest.api_path, "vm.send-migration", {"destination_url": f"unix:{path}"})
    thread.join(120)
    listener.close()
    assert status == 500 and "refused by the test" in text, text
    assert got["STATE"]["backends"] == {"taps": {}, "persisted": [TAP]}
    assert "persist on" in got["tap"]                    # nobody held it then
    status, vm = info(guest.api_path)
    assert status == 200 and vm["state"] == "Running", vm
    before, _ = counter(guest)
    rc, out = guest.run(PING, timeout=GUEST_WAIT)        # the source has its tap again
    assert (rc, out) == (0, "2"), out
    assert "persist off" in tap_details()
    later, rest = counter(guest)
    assert before < later and rest[1] == "2", (before, later, rest)


def hop(source_api: str, source_proc, receiver: Receiver, url: str, serial: str,
        before: int, body: dict | None = None) -> list[str]:
    """Migrate from ``source_api`` to ``receiver`` at ``url``; the checks every hop makes."""
    if receiver.thread is None or not receiver.thread.is_alive():
        receiver.result = None
        receiver.receive(url)
    wait_listening(url, pid=receiver.proc.pid)
    status, text = api(source_api, "vm.send-migration", {"destination_url": url, **(body or {})})
    assert status == 204, text
    assert receiver.received() == (204, ""), receiver.log()
    assert source_proc.wait(60) == 0                    # the source ends after success
    status, vm = info(receiver.api_path)
    assert status == 200 and vm["state"] == "Running", vm
    assert vm["config"]["cpus"]["boot_vcpus"] == 2
    assert [c["state"] for c in vm["cpus"]] == ["present", "present"], vm["cpus"]
    receiver.attach_console(serial)
    after, rest = counter(receiver)
    time.sleep(1)
    later, _ = counter(receiver)
    # the loop continued: not restarted (it would count from 1), and still counting
    assert before <= after < later, (before, after, later)
    assert rest[0].startswith("var=kept-") and rest[1] == "2", rest
    rc, md5 = receiver.run(DISK, timeout=GUEST_WAIT)
    assert rc == 0, md5
    return rest + [md5]


def check_moved(guest, receiver: Receiver, rest: list[str]) -> None:
    """After a hop: the guest's MemTotal is as before (virtio-mem's 128 MiB still plugged),
    the marker file in it reads the same, the destination's device has the blocks plugged
    and the marker's pages are in the destination's virtio-mem memory; the guest pings the
    host end of its tap, which is not persistent (it goes with the pych that holds it)."""
    rc, out = receiver.run(PING, timeout=GUEST_WAIT)
    assert (rc, out) == (0, "2"), out
    assert "persist off" in tap_details()
    assert rest[2].split()[1] == str(guest.mem_kib), rest
    assert rest[3] == guest.marker_md5, rest
    device = virtio_mem(receiver.api_path)
    assert (device["plugged_size"], device["requested_size"]) == (128 * MiB, 128 * MiB), device
    assert marker_pages_in_region(receiver.proc.pid) > 0


def source_log_figures(log: str) -> tuple[float, float]:
    m = re.findall(r"VM migrated to \S+: downtime ([\d.]+) ms, total ([\d.]+) ms", log)
    assert m, log[-2000:]
    return float(m[-1][0]), float(m[-1][1])


def test_migration_over_a_unix_socket(guest, disk):
    before, rest = counter(guest)
    rc, guest.disk_md5 = guest.run(DISK, timeout=GUEST_WAIT)
    assert rc == 0 and len(guest.disk_md5) == 32, guest.disk_md5
    url = guest.dst1_url
    # the marker written into the guest's memory is in the virtio-mem region (on the host)
    assert marker_pages_in_region(guest.proc.pid) > 0
    rest = hop(guest.api_path, guest.proc, guest.dst1, url, guest.serial_path, before)
    assert rest[4] == guest.disk_md5
    check_moved(guest, guest.dst1, rest)
    log = guest.log_path.read_text()
    downtime, total = source_log_figures(log)
    assert 0 < downtime <= total, (downtime, total)
    # VERIFY compared every allocated block of RAM: the dirty log had missed nothing
    assert "(0 KiB of it found by VERIFY, not by the dirty log)" in log, log[-2000:]
    assert "received by migration" in guest.dst1.log()


def test_migration_over_tcp(guest, tmp_path):
    source = guest.dst1
    before, _ = counter(source)
    receiver = Receiver(tmp_path, "dst2")
    guest.receivers.append(receiver)
    url = f"tcp:127.0.0.1:{free_port()}"
    rest = hop(source.api_path, source.proc, receiver, url, guest.serial_path, before)
    assert rest[4] == guest.disk_md5
    check_moved(guest, receiver, rest)
    downtime, total = source_log_figures(source.log())
    assert 0 < downtime <= total
    guest.dst2 = receiver


def test_virtio_fs_is_refused_unless_local_and_a_refused_local_state_keeps_the_share(
        guest, share, tmp_path):
    """A share hot added to the running guest and a file in it held open by the guest's
    shell (then deleted on the host). A migration that is not local is refused, naming
    virtiofsd; a local one whose receiver refuses STATE, after the source paused and let go
    of the share's connection (passed with STATE), leaves the source serving it."""
    source = guest.dst2
    status, body = api(source.api_path, "vm.add-fs", {"tag": "migfs", "socket": share.socket})
    assert status == 200, body
    guest.fs_id = json.loads(body)["id"]
    guest.held = open(share.source / "held.txt", "a")     # the host's end of the held file
    guest.held.write("one\n")
    guest.held.flush()
    (share.source / "host.txt").write_text("from the host\n")
    rc, out = wait_in_guest(source, "ls /sys/bus/virtio/drivers/virtiofs | grep -q virtio",
                            limit=GUEST_WAIT)
    assert rc == 0, f"the share never showed up: {source.log()}"
    rc, out = source.run("mkdir -p /mnt/fs && mount -t virtiofs migfs /mnt/fs && "
                         "exec 3</mnt/fs/held.txt && read -r a <&3 && echo \"$a\" && "
                         "cat /mnt/fs/host.txt", timeout=GUEST_WAIT)
    assert rc == 0 and out.splitlines() == ["one", "from the host"], \
        f"{out}\nvirtiofsd: {share.log_text()}\npych: {source.log()}"
    os.unlink(share.source / "held.txt")                 # only the FUSE session reaches it

    # not local: refused at once, saying why and what works
    status, text = api(source.api_path, "vm.send-migration",
                       {"destination_url": f"unix:{tmp_path}/nobody"})
    words = text.replace('\\"', '"')                     # the JSON body's escaped quotes
    assert status == 400 and "virtiofsd cannot save it or hand it to another virtiofsd" in words \
        and 'a local migration (vm.send-migration with "local": true' in words, text

    path = str(tmp_path / "fs-refuser.sock")
    got, thread, listener = refusing_receiver(
        path, lambda got: got.setdefault("virtiofsd", share.proc.poll()), "the share")
    status, text = api(source.api_path, "vm.send-migration",
                       {"destination_url": f"unix:{path}", "local": True})
    thread.join(120)
    listener.close()
    assert status == 500 and "refused by the test" in text, text
    handed = got["STATE"]["backends"]["vhost_user"][guest.fs_id]
    assert sorted(handed["rings"]) == ["0", "1"]          # hiprio and one request queue
    assert got["virtiofsd"] is None                       # it never noticed
    # the tap's queue fd, and the share's socket, 2 kick and 1-2 call eventfds
    assert got["STATE fds"] >= 1 + 1 + 2 + 1, got
    status, vm = info(source.api_path)
    assert status == 200 and vm["state"] == "Running" and vm["devices_failed"] == [], vm
    rc, out = source.run("echo from-the-source > /mnt/fs/from-source.txt && "
                         "cat /mnt/fs/host.txt", timeout=GUEST_WAIT)
    assert (rc, out) == (0, "from the host"), f"{out}\nvirtiofsd: {share.log_text()}"
    assert (share.source / "from-source.txt").read_text() == "from-the-source\n"
    assert share.proc.poll() is None and share.proc.pid == share.pid


def test_local_migration_passes_memory_by_fd(guest, tmp_path):
    source = guest.dst2
    before, _ = counter(source)
    receiver = Receiver(tmp_path, "dst3")
    guest.receivers.append(receiver)
    url = f"unix:{tmp_path}/dst3.mig"
    rest = hop(source.api_path, source.proc, receiver, url, guest.serial_path, before,
               {"local": True})
    assert rest[4] == guest.disk_md5
    check_moved(guest, receiver, rest)
    assert "0 MiB of RAM sent (local: memory passed by fd)" in source.log()
    # and the destination keeps serving the API: a vCPU removed
    assert api(receiver.api_path, "vm.resize", {"desired_vcpus": 1})[0] == 204
    with ApiClient(receiver.api_path) as client:
        wait_for_vcpus(client, 1, GUEST_WAIT)
    # virtio-mem carries on on the destination: grown by 64 MiB, then shrunk below what
    # was migrated (the guest offlines movable blocks, the marker's pages move elsewhere)
    for extra in (192, 64):
        assert api(receiver.api_path, "vm.resize", {"desired_ram": BOOT + extra * MiB})[0] == 204
        want = guest.base_kib + extra * 1024
        assert wait_for(lambda: mem_total_kib(receiver), want) == want
        assert wait_for(lambda: virtio_mem(receiver.api_path)["plugged_size"],
                        extra * MiB) == extra * MiB
    rc, md5 = receiver.run(MARKER_MD5, timeout=GUEST_WAIT)
    assert (rc, md5) == (0, guest.marker_md5)
    guest.dst3 = receiver


def test_the_virtio_fs_share_moved_with_the_local_migration(guest, share):
    """The local hop handed the share's connection over: the same virtiofsd process (it
    never saw its front end change) serves the destination, whose guest reads on through
    the file it held open (deleted on the host: only the FUSE session reaches it) and
    writes files the host sees. Removing the share there hangs up: virtiofsd exits."""
    receiver = guest.dst3
    assert share.proc.poll() is None and share.proc.pid == share.pid, share.log_text()
    assert guest.dst2.proc.poll() == 0                     # the source pych has exited
    status, vm = info(receiver.api_path)
    assert status == 200 and vm["devices_failed"] == [], vm
    assert [f["id"] for f in vm["config"]["fs"]] == [guest.fs_id]
    guest.held.write("two\n")                             # through the host's open file
    guest.held.flush()
    (share.source / "host2.txt").write_text("written after the hop\n")
    rc, out = receiver.run("read -r b <&3 && echo \"$b\" && cat /mnt/fs/host2.txt "
                           "/mnt/fs/from-source.txt && echo from-the-destination > "
                           "/mnt/fs/from-destination.txt && sync", timeout=GUEST_WAIT)
    assert rc == 0 and out.splitlines() == ["two", "written after the hop", "from-the-source"], \
        f"{out}\nvirtiofsd: {share.log_text()}\npych: {receiver.log()}"
    assert (share.source / "from-destination.txt").read_text() == "from-the-destination\n"
    assert "took over the vhost-user backend" in receiver.log_path.read_text()

    # the destination owns the connection: the share's removal hangs up on virtiofsd
    rc, out = receiver.run("exec 3<&- && umount /mnt/fs", timeout=GUEST_WAIT)
    assert rc == 0, out
    guest.held.close()
    assert api(receiver.api_path, "vm.remove-device", {"id": guest.fs_id})[0] == 204
    assert wait_for(lambda: guest.fs_id in info(receiver.api_path)[1]["device_tree"], False) \
        is False, receiver.log()
    share.proc.wait(60)


class Restored(PychGuest):
    """A pych in the module's namespace started with ``--restore``: the guest's serial
    socket is the snapshot's configuration's."""

    def __init__(self, workdir: Path, snapshot: Path, serial_path: str):
        super().__init__(workdir)
        self.serial_path = serial_path
        self.args = ["ip", "netns", "exec", NETNS, str(REPO / ".venv" / "bin" / "pych"),
                     "--api-socket", self.api_path, "-v",
                     "--restore", f"source_url=file://{snapshot}"]


def wait_for_vm(path: str, timeout: float = 300) -> dict:
    deadline = time.monotonic() + timeout
    while True:
        try:
            status, vm = info(path)
            if status == 200:
                return vm
        except OSError:
            pass                                    # the socket is not there yet
        assert time.monotonic() < deadline, f"no VM after {timeout} s"
        time.sleep(0.5)


def test_snapshot_and_restore_of_the_migrated_guest(guest, tmp_path):
    """virtio-mem and the NIC in a snapshot: the last destination is paused and snapshotted
    (of the virtio-mem region only its 64 MiB of plugged blocks, at most, are saved), it
    ends (its tap goes with it), and a new pych restores the guest: the tap is created again
    by name, the guest counts on, MemTotal, the marker and the plugged size are as they
    were, it pings the host end, and virtio-mem grows again."""
    source = guest.dst3
    before, _ = counter(source)
    assert api(source.api_path, "vm.pause")[0] == 204
    snap = tmp_path / "snap"
    status, text = api(source.api_path, "vm.snapshot", {"destination_url": f"file://{snap}"})
    assert status == 204, text
    manifest = json.loads((snap / "manifest.json").read_text())
    assert manifest["version"] == 2
    (region,) = [m for m in manifest["memory"] if m["name"] == "virtio-mem-mem0"]
    assert region["size"] == VMEM_REGION
    assert sum(n for _, n in region["extents"]) <= 64 * MiB      # plugged blocks only
    saved = manifest["state"]["devices"]["devices"]["mem0"]["device"]
    assert (saved["plugged_blocks"], saved["requested"]) == (32, 64 * MiB), saved
    source.stop()
    restored = Restored(tmp_path / "restored", snap, guest.serial_path)
    guest.restored = restored
    restored.start()
    vm = wait_for_vm(restored.api_path)
    assert vm["state"] == "Paused", vm
    assert vm["memory_actual_size"] == BOOT + 64 * MiB, vm
    assert api(restored.api_path, "vm.resume")[0] == 204
    restored.shell.prepare()
    after, rest = counter(restored)
    assert before <= after, (before, after)
    assert rest[2].split()[1] == str(guest.base_kib + 64 * 1024), rest
    assert rest[3] == guest.marker_md5, rest
    rc, out = restored.run(PING, timeout=GUEST_WAIT)
    assert (rc, out) == (0, "2"), out
    assert api(restored.api_path, "vm.resize", {"desired_ram": BOOT + 128 * MiB})[0] == 204
    want = guest.base_kib + 128 * 1024
    assert wait_for(lambda: mem_total_kib(restored), want) == want
