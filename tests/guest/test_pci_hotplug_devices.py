"""PCI hot plug of two nets, a pmem and a vsock device in a real guest, with the user
document's curl lines (../shared/spec/hotplug.md, "PCI Device Hot Plug"), paths adapted.

One guest boots with only a read-only disk carrying ``vsockcat`` (the guest end of the
vsock checks, built from tests/guest/data/vsockcat.c) and no net, pmem or vsock. pych
runs in a network namespace the module creates and deletes, so the taps and every packet
stay in it.

The devices are added back to back and the guest is waited for once (its acpiphp takes
tens of seconds here to probe a new device): a net on a tap pych creates (``tap=``), a
pmem, a vsock, and a net on a tap the test sets up itself and hands over as an open fd
with SCM_RIGHTS (``pych-remote add-net fd=[N]``, as ch-remote and Kata Containers do).
Each then works in the guest: both nets ping the host end of their taps, the guest's
writes to /dev/pmemN reach the host file, and vsock streams run both ways. An fd that is
not a tap is refused with a clear 400 and not kept. Then all four are removed back to back
and waited for once: they leave lspci, pych reports each ``device-removed``, both taps are
gone (the handed-over one because pych closed its copies and the test had closed its own),
and pych's open fds and threads are back to what they were before the adds (polled until
they settle, for up to 60 s). The tests run
in order and share the guest; nothing is timed.
"""

from __future__ import annotations

import hashlib
import json
import os
import re
import subprocess
import time
from pathlib import Path

import pytest

from tests.support.guest import REPO, PychGuest, vm_info
from tests.support.host import settled_resources
from tests.support.hotplug import curl, wait_for_events, wait_in_guest
from tests.support.netns import in_netns, open_tap_queue
from tests.support.vsock import build_vsockcat_disk, vsock_from_guest, vsock_to_guest

NETNS = f"pych-hotplug-{os.getpid()}"
HOST_IP, GUEST_IP = "192.168.249.1", "192.168.249.2"
TAP = "chtap0"                         # the document's tap name; pych creates it
FD_TAP, FD_MAC = "chtap1", "52:54:00:fd:00:01"   # set up here, handed to pych as an fd
FD_HOST_IP, FD_GUEST_IP = "192.168.250.1", "192.168.250.2"
CID = 3
MiB = 1 << 20
PMEM_MARKER = "pmem-hot-added-and-written-by-the-guest"
# virtio-pci vendor:device of each hot-added device
PCI_IDS = {"net": "1af4:1041", "pmem": "1af4:105b", "vsock": "1af4:1053", "fdnet": "1af4:1041"}
# What the guest shows once each device's driver is bound (shell tests, builtins only).
READY_IN_GUEST = ("[ -e /sys/class/net/eth0 ] && [ -e /sys/class/net/eth1 ] && "
                  "[ -e /dev/pmem0 ] && "
                  "[ -e /sys/bus/virtio/drivers/vmw_vsock_virtio_transport/virtio* ]")
# A guest shell function: give the interface with MAC $1 the address $2/24 and bring it up.
IF_UP = ('up() { for d in /sys/class/net/eth*; do read a < $d/address; '
         '[ "$a" = "$1" ] && n=${d##*/}; done; ip addr add $2/24 dev $n && ip link set $n up; }')


# --- host side ----------------------------------------------------------------------------------

def pych_remote(guest, *args: str, pass_fds: tuple[int, ...] = ()) -> subprocess.CompletedProcess:
    return subprocess.run([str(REPO / ".venv" / "bin" / "pych-remote"), "--api-socket",
                           guest.api_path, *args],
                          capture_output=True, text=True, timeout=120, pass_fds=pass_fds)


def links() -> set[str]:
    out = subprocess.run(["ip", "-n", NETNS, "-o", "link"], capture_output=True, text=True,
                         check=True).stdout
    return {line.split(":")[1].strip().split("@")[0] for line in out.splitlines()}



def holds(pid: int, path: Path) -> bool:
    """Whether process ``pid`` has ``path`` open or mapped."""
    fd_dir = f"/proc/{pid}/fd"
    fds = set()
    for fd in os.listdir(fd_dir):
        try:
            fds.add(os.readlink(os.path.join(fd_dir, fd)))
        except FileNotFoundError:
            pass
    return str(path) in fds or str(path) in Path(f"/proc/{pid}/maps").read_text()


# --- the guest --------------------------------------------------------------------------------
@pytest.fixture(scope="module")
def files(tmp_path_factory):
    d = tmp_path_factory.mktemp("hotplug-devices")
    tool_disk, tool_size = build_vsockcat_disk(d)
    (d / "pmem.img").write_bytes(bytes(2 * MiB))
    return {"dir": d, "tool_disk": tool_disk, "tool_size": tool_size,
            "pmem": d / "pmem.img", "vsock": str(d / "vsock.sock")}


@pytest.fixture(scope="module")
def guest(netns, files):
    events_path = files["dir"] / "events"
    g = PychGuest(files["dir"] / "vm", memory="size=256M", extra_args=[
        "--disk", f"path={files['tool_disk']},readonly=on",
        "--event-monitor", f"path={events_path}"])
    g.args = ["ip", "netns", "exec", netns, *g.args]       # exec()s pych: same pid
    g.files, g.events_path, g.added = files, events_path, {}
    try:
        g.start()
        g.wait_ready()
        g.run(f"head -c {files['tool_size']} /dev/vda > /tmp/vsockcat && chmod +x /tmp/vsockcat",
              check=True)
        g.before = settled_resources(g.proc.pid)
        yield g
    finally:
        g.stop()


# --- tests ------------------------------------------------------------------------------------
def test_nets_pmem_and_vsock_added_back_to_back_show_in_lspci(guest, files):
    requests = {"net": ("vm.add-net", {"tap": TAP}),
                "pmem": ("vm.add-pmem", {"file": str(files["pmem"])}),
                "vsock": ("vm.add-vsock", {"cid": CID, "socket": files["vsock"]})}
    for kind, (endpoint, body) in requests.items():
        status, text = curl(guest, endpoint, body)
        assert status == 200, f"{endpoint}: {status} {text}"
        guest.added[kind] = json.loads(text)
    # The fourth: a tap set up here, its fd sent with SCM_RIGHTS (not in the JSON).
    fd = in_netns(NETNS, lambda: open_tap_queue(FD_TAP))(60)
    try:
        remote = pych_remote(guest, "add-net", f"fd=[{fd}],mac={FD_MAC}", pass_fds=(fd,))
    finally:
        os.close(fd)                        # from here on only pych holds the tap open
    assert remote.returncode == 0 and remote.stderr == "", remote.stderr
    guest.added["fdnet"] = json.loads(remote.stdout)
    added = guest.added
    # one counter for every prefix, after the boot disk's _disk0; the lowest free slots
    assert [a["id"] for a in added.values()] == ["_net1", "_pmem2", "_vsock3", "_net4"], added
    assert len({a["bdf"] for a in added.values()}) == 4
    config = vm_info(guest)["config"]
    assert [n["id"] for n in config["net"]] == ["_net1", "_net4"]
    assert config["net"][0]["tap"] == TAP
    fd_net = config["net"][1]
    assert fd_net["mac"] == FD_MAC and "tap" not in fd_net and len(fd_net["fds"]) == 1
    # vm.info shows pych's own number for the fd it received, as the reference does
    assert os.readlink(f"/proc/{guest.proc.pid}/fd/{fd_net['fds'][0]}") == "/dev/net/tun"
    assert [p["id"] for p in config["pmem"]] == ["_pmem2"]
    assert config["vsock"]["id"] == "_vsock3"
    assert {TAP, FD_TAP} <= links()

    rc, out = wait_in_guest(guest, READY_IN_GUEST, interval=0.5)
    assert rc == 0, f"the guest never bound all four: {guest.run('lspci -n; dmesg | tail -20')}"
    rc, out = guest.run("lspci -n")
    assert rc == 0, out
    seen = dict(re.findall(r"^([0-9a-f:.]+) \w+: ([0-9a-f]{4}:[0-9a-f]{4})", out, re.M))
    for kind, info in added.items():
        assert seen.get(info["bdf"].removeprefix("0000:")) == PCI_IDS[kind], (kind, out)


def test_both_hot_added_nets_ping_the_host_ends_of_their_taps(guest):
    """pych brought up the tap it created; the handed-over tap is set up by its owner (the
    test, here), and pych leaves it as it is."""
    ip = ["ip", "-n", NETNS]
    subprocess.run([*ip, "addr", "add", f"{HOST_IP}/24", "dev", TAP], check=True)
    subprocess.run([*ip, "addr", "add", f"{FD_HOST_IP}/24", "dev", FD_TAP], check=True)
    subprocess.run([*ip, "link", "set", FD_TAP, "up"], check=True)
    tap_mac = vm_info(guest)["config"]["net"][0]["mac"]
    rc, out = guest.run(f"{IF_UP}; up {tap_mac} {GUEST_IP} && up {FD_MAC} {FD_GUEST_IP} && "
                        f"ping -c 2 -W 10 {HOST_IP} | grep -c 'bytes from' && "
                        f"ping -c 2 -W 10 {FD_HOST_IP} | grep -c 'bytes from'")
    assert (rc, out.split()) == (0, ["2", "2"]), out


def test_hot_added_pmem_writes_reach_the_host_file(guest, files):
    rc, out = guest.run(f"printf {PMEM_MARKER} | dd of=/dev/pmem0 bs=512 seek=1 conv=fsync "
                        "2>/dev/null && sync && echo pmem-ok")
    assert (rc, out) == (0, "pmem-ok"), out
    data = files["pmem"].read_bytes()
    assert data[512:512 + len(PMEM_MARKER)] == PMEM_MARKER.encode()


def test_hot_added_vsock_streams_both_ways(guest, files):
    payload = os.urandom(64 * 1024)
    rc, out = guest.run("/tmp/vsockcat l 1234 pong > /tmp/vsock.bin &")
    assert rc == 0, out
    assert vsock_to_guest(files["vsock"], 1234, payload, time.monotonic() + 120) == b"pong"
    rc, out = guest.run("wait; wc -c < /tmp/vsock.bin; md5sum < /tmp/vsock.bin")
    assert rc == 0 and out.split()[:2] == [str(len(payload)), hashlib.md5(payload).hexdigest()], out

    result, received = vsock_from_guest(
        files["vsock"], 5678, lambda: guest.run("echo hello-host | /tmp/vsockcat c 2 5678"),
        b"ack-from-host")
    assert result == (0, "ack-from-host")
    assert received == b"hello-host\n"


def test_an_fd_that_is_not_a_tap_is_refused_clearly_and_not_kept(guest):
    """``pych-remote add-net fd=[N]`` with N a pipe: 400 naming the fd, and pych keeps no
    copy of it (no guest time: refused before anything is built)."""
    r, w = os.pipe()
    try:
        before = settled_resources(guest.proc.pid)
        remote = pych_remote(guest, "add-net", f"fd=[{r}]", pass_fds=(r,))
        assert remote.returncode == 1 and remote.stdout == ""
        assert "Server responded with BadRequest" in remote.stderr, remote.stderr
        assert "is not a tap" in remote.stderr, remote.stderr
        assert settled_resources(guest.proc.pid, before) == before
        assert [n["id"] for n in vm_info(guest)["config"]["net"]] == ["_net1", "_net4"]
    finally:
        os.close(r)
        os.close(w)


def test_removing_all_four_leaves_nothing_behind(guest, files):
    added = guest.added
    for info in added.values():
        status, text = curl(guest, "vm.remove-device", {"id": info["id"]})
        assert (status, text) == (204, ""), info
    gone = " && ".join(f"[ ! -e /sys/bus/pci/devices/{info['bdf']} ]" for info in added.values())
    rc, _ = wait_in_guest(guest, f"{gone} && [ ! -e /sys/class/net/eth0 ] && "
                                 "[ ! -e /sys/class/net/eth1 ] && [ ! -e /dev/pmem0 ]",
                          interval=0.5)
    assert rc == 0, f"the guest kept a removed device: {guest.run('lspci -n')}"
    removed = wait_for_events(guest, "device-removed", 4)
    assert sorted((e["properties"]["id"], e["properties"]["bdf"]) for e in removed) == \
        sorted((info["id"], info["bdf"]) for info in added.values())
    rc, out = guest.run("lspci -n")
    assert rc == 0 and not any(info["bdf"].removeprefix("0000:") in out
                               for info in added.values()), out

    info = vm_info(guest)
    assert info["devices_pending_removal"] == []
    assert not {"net", "pmem", "vsock"} & set(info["config"]), info["config"]
    assert not any(a["id"] in info["device_tree"] for a in added.values())
    assert TAP not in links()                                 # the tap pych created is gone
    assert FD_TAP not in links()                              # pych closed both its copies
    assert not holds(guest.proc.pid, files["pmem"])           # neither open nor mapped
    assert not os.path.exists(files["vsock"])                 # the vsock listener is gone
    assert settled_resources(guest.proc.pid, guest.before) == guest.before   # (fds, threads)
