"""Kata Containers' call sequence against pych, with the request bodies its Cloud Hypervisor
driver builds (kata-containers ``src/runtime/virtcontainers/clh.go``: ``CreateVM``,
``bootVM``, ``vmAddNetPutRequest``, ``ResizeVCPUs``, ``hotplugAddBlockDevice``,
``clhPciInfoToPath``, ``HotplugRemoveDevice``, ``GetThreadIDs``, ``StopVM``), the way
Kubernetes runs VMs on this VMM:

1. ``pych --api-socket PATH`` (Kata's launch: no payload on the command line);
2. ``vm.create`` with the body of ``CreateVM``: the generated client's defaults spelled out,
   two PCI segments, ACPI memory hot plug, a topology of one die of max-vCPU cores, rng,
   vsock, console off, a read-only disk with one queue per vCPU and 1024 entries (the initdata
   disk), virtio-fs on PCI segment 1 against Debian's virtiofsd; ``vm.info`` says Created;
3. the tap's fd passed with ``vm.add-net`` before boot, as ``vmAddNetPutRequest`` does it:
   one ``sendmsg`` carrying the whole HTTP request and the fd (SCM_RIGHTS);
4. ``vm.boot``, then ``vm.info`` says Running; the guest mounts the share (``kataShared``)
   from ``0001:00:00.0``;
5. ``vm.resize`` of the vCPUs retried on 429 (``Too Many Requests``) as ``ResizeVCPUs`` does;
6. ``vm.add-disk`` with ``hotplugAddBlockDevice``'s body, the answer's bdf parsed with
   ``clhPciInfoToPath``'s rule; the disk works in the guest; ``vm.remove-device``;
7. the vCPU threads found with ``GetThreadIDs``' rule (``/proc/<pid>/task/*/comm`` matching
   ``^vcpu\\d+$``);
8. VM templating, as a runtime restores a VM whose NIC it handed over as tap fds (Cloud
   Hypervisor's ``vm.restore`` ``net_fds``): the share is unmounted and the virtio-fs and
   vsock devices removed (Kata's templating refuses ``shared_fs = virtio-fs``; pych cannot
   snapshot either yet and says so by name), the guest pings the host end of its tap and
   sets a shell variable, the VM is paused and snapshotted;
9. ``vmm.shutdown``: the process is gone within 3 s, and with it the last queue of the tap
   (its carrier drops);
10. a fresh ``pych --api-socket`` (the clone) refuses restores whose ``net_fds`` do not fit
    the snapshot (a device it does not have, the wrong number of fds) with a 400 naming it,
    keeping no VM and none of the fds it was sent; then ``vm.restore`` with the tap opened
    again by name (``TUNSETIFF``) answers 204, ``vm.info`` shows the VM paused with the NIC's
    configuration and the clone's own fd number, ``vm.resume``, and the guest's shell has its
    variable and pings the host end of the tap again.

The tap is persistent, as Kata makes it (``netlink.LinkAdd`` of a ``Tuntap`` sets
``TUNSETPERSIST``): it outlives the template's pych with its address, and the clone gets a
new queue of the same device, which is what a runtime that keeps the sandbox's network
namespace hands a restored VMM (a new tap would lose the host side's configuration: its
address here, Kata's tc redirect to the veth there).

Kata boots with its serial off (console ``Off`` too) unless debugging; the test needs a
shell, so the serial is a socket here: the one difference from Kata's body. One guest, the
tests in order; waits poll with wide limits and nothing is timed but the shutdown's 3 s,
which is Kata's own bound (``clhStopSandboxTimeout``).
"""

from __future__ import annotations

import hashlib
import json
import os
import re
import socket
import fcntl
import struct
import subprocess
import time
from pathlib import Path

import pytest

from tests.support.guest import ApiOnlyPych, guest_artifacts, guest_cmdline
from tests.support.hotplug import wait_in_guest
from pych.devices.net.tap import TUNSETPERSIST
from tests.support.netns import in_netns, open_tap_queue
from tests.support.virtiofsd import VIRTIOFSD, Virtiofsd

NETNS = f"pych-kata-{os.getpid()}"
MiB = 1 << 20
BOOT_VCPUS, MAX_VCPUS = 2, 3
MAC, TAP = "52:54:00:ca:7a:01", "tap0_kata"
DISK_SIZE = 2 * MiB
SHARED_FILE = "from-the-host.txt"
HOST_IP, GUEST_IP = "192.168.249.1", "192.168.249.2"     # the tap's host end, the guest's NIC
GUEST_NIC = f"n=$(grep -l {MAC} /sys/class/net/*/address); n=${{n%/address}}; n=${{n##*/}}"


def pattern(size: int) -> bytes:
    return b"".join(hashlib.sha256(b"kata" + i.to_bytes(4, "little")).digest()
                    for i in range(size // 32))


# --- Kata's request bodies ----------------------------------------------------------------------
def create_body(files: dict, share: Virtiofsd) -> dict:
    """``CreateVM``'s VmConfig as the generated Go client marshals it (its constructors'
    defaults are written out)."""
    art = guest_artifacts()
    return {
        "payload": {"kernel": str(art["vmlinux"]), "initramfs": str(art["initramfs.cpio"]),
                    "cmdline": guest_cmdline()},
        "platform": {"num_pci_segments": 2},
        "memory": {"size": 256 * MiB, "mergeable": False, "hotplug_method": "Acpi",
                   "shared": True, "hugepages": False, "prefault": False, "thp": True,
                   "hotplug_size": 512 * MiB},
        "cpus": {"boot_vcpus": BOOT_VCPUS, "max_vcpus": MAX_VCPUS, "kvm_hyperv": False,
                 "nested": True,
                 "topology": {"threads_per_core": 1, "cores_per_die": MAX_VCPUS,
                              "dies_per_package": 1, "packages": 1}},
        "rng": {"src": "/dev/urandom", "iommu": False},
        "disks": [{"path": str(files["initdata"]), "readonly": True, "direct": False,
                   "iommu": False, "num_queues": BOOT_VCPUS, "queue_size": 1024,
                   "vhost_user": False, "backing_files": False, "sparse": True,
                   "image_type": "Raw"}],
        "serial": {"mode": "Socket", "socket": files["serial"], "iommu": False},
        "console": {"mode": "Off", "iommu": False},
        "vsock": {"cid": 3, "socket": files["vsock"], "iommu": False},
        "fs": [{"tag": "kataShared", "socket": share.socket, "num_queues": 1,
                "queue_size": 1024, "pci_segment": 1}],
        "iommu": False, "watchdog": False, "pvpanic": False, "landlock_enable": False,
    }


NET_BODY = {"mac": MAC, "ip": HOST_IP, "mask": "255.255.255.0", "iommu": False,
            "num_queues": 2, "queue_size": 256, "vhost_user": False, "vhost_mode": "Client",
            "offload_tso": True, "offload_ufo": True, "offload_csum": True}


def disk_body(path: Path) -> dict:
    """``hotplugAddBlockDevice``'s DiskConfig: one queue per vCPU, 1024 entries."""
    return {"path": str(path), "readonly": False, "direct": False, "iommu": False,
            "num_queues": BOOT_VCPUS, "queue_size": 1024, "vhost_user": False,
            "backing_files": False, "sparse": True, "image_type": "Raw"}


def clh_pci_info_to_path(bdf: str) -> str:
    """``clhPciInfoToPath``: the slot of a ``0000:00:SS.0`` bdf; anything else is an error."""
    tokens = bdf.split(":")
    if len(tokens) != 3 or tokens[0] != "0000" or tokens[1] != "00":
        raise ValueError(f"Unexpected PCI address {bdf!r} from clh hotplug")
    tokens = tokens[2].split(".")
    if len(tokens) != 2 or tokens[1] != "0" or len(tokens[0]) != 2:
        raise ValueError(f"Unexpected PCI address {bdf!r} from clh hotplug")
    return tokens[0]


# --- Kata's HTTP: a request on a fresh connection, optionally with fds in the same sendmsg ----
def http(api: str, method: str, endpoint: str, body: dict | None = None,
         fds: tuple[int, ...] = ()) -> tuple[int, str]:
    data = b"" if body is None else json.dumps(body).encode()
    request = (f"{method} /api/v1/{endpoint} HTTP/1.1\r\nHost: localhost\r\n"
               "Accept: application/json\r\nContent-Type: application/json\r\n"
               f"Content-Length: {len(data)}\r\n\r\n").encode() + data
    with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as s:
        s.settimeout(120)
        s.connect(api)
        ancillary = [(socket.SOL_SOCKET, socket.SCM_RIGHTS, struct.pack(f"{len(fds)}i", *fds))]
        sent = s.sendmsg([request], ancillary if fds else [])
        assert sent == len(request)
        response = b""
        while b"\r\n\r\n" not in response:
            chunk = s.recv(65536)
            assert chunk, f"connection closed before an answer: {response!r}"
            response += chunk
        head, _, rest = response.partition(b"\r\n\r\n")
        match = re.search(rb"(?i)\r\ncontent-length: *(\d+)", head)
        while match and len(rest) < int(match[1]):
            chunk = s.recv(65536)
            assert chunk, f"connection closed in the body: {response!r}"
            rest += chunk
    return int(head.split()[1]), rest.decode()



# --- the sandbox ----------------------------------------------------------------------------------
@pytest.fixture(scope="module")
def files(tmp_path_factory) -> dict:
    if not os.path.exists(VIRTIOFSD):
        pytest.fail(f"{VIRTIOFSD} is missing: scripts/install-deps.sh installs it "
                    "(qemu-system-common)")
    d = tmp_path_factory.mktemp("kata")
    (d / "initdata.img").write_bytes(bytes(DISK_SIZE))
    (d / "block.img").write_bytes(pattern(DISK_SIZE))
    return {"dir": d, "initdata": d / "initdata.img", "block": d / "block.img",
            "api": str(d / "clh.sock"), "serial": str(d / "serial.sock"),
            "vsock": str(d / "kata.hvsock")}


@pytest.fixture(scope="module")
def share(files):
    d = Virtiofsd(files["dir"], "shared")
    (d.source / SHARED_FILE).write_text("kata shared fs on segment 1\n")
    yield d
    d.stop()


@pytest.fixture(scope="module")
def sandbox(files, share, netns):
    """pych as Kata launches it (only ``--api-socket``), in the module's network namespace."""
    box = ApiOnlyPych(files["dir"], netns=netns, api_path=files["api"])
    box.api = box.api_path
    try:
        yield box
    finally:
        box.stop(timeout=0)             # Kata's own end is the vmm.shutdown test


# --- the sequence ---------------------------------------------------------------------------------
def test_create_and_add_net_before_boot(sandbox, files, share):
    status, body = http(sandbox.api, "PUT", "vm.create", create_body(files, share))
    assert status == 204, body
    status, body = http(sandbox.api, "GET", "vm.info")
    assert status == 200 and json.loads(body)["state"] == "Created", body
    fd = in_netns(NETNS, lambda: open_tap_queue(TAP))(60)
    try:
        fcntl.ioctl(fd, TUNSETPERSIST, 1)          # as netlink.LinkAdd makes Kata's taps
        status, body = http(sandbox.api, "PUT", "vm.add-net", NET_BODY, fds=(fd,))
    finally:
        os.close(fd)                     # as Kata, which keeps its own copy elsewhere
    assert (status, body) == (204, ""), body        # cold add: no PCI info yet
    config = json.loads(http(sandbox.api, "GET", "vm.info")[1])["config"]
    assert [n["mac"] for n in config["net"]] == [MAC]
    assert [(f["tag"], f["pci_segment"]) for f in config["fs"]] == [("kataShared", 1)]


def test_boot_and_the_share_on_segment_1(sandbox, files):
    status, body = http(sandbox.api, "PUT", "vm.boot")
    assert status == 204, body
    info = json.loads(http(sandbox.api, "GET", "vm.info")[1])
    assert info["state"] == "Running"
    fs_id = info["config"]["fs"][0]["id"]
    assert info["device_tree"][f"_virtio-pci-{fs_id}"]["pci_bdf"] == "0001:00:00.0", info
    sandbox.attach_console(files["serial"], wait_ready=True, timeout=600)
    rc, out = sandbox.run(
        "lspci -D -n; mkdir -p /mnt/shared && mount -t virtiofs kataShared /mnt/shared && "
        f"cat /mnt/shared/{SHARED_FILE}; ip -o link", timeout=300)
    assert rc == 0, out
    assert re.search(r"^0001:00:00\.0 \w+: 1af4:105a", out, re.M), out     # virtio-fs
    assert "kata shared fs on segment 1" in out
    assert MAC in out                                                       # the tap's NIC


def test_resize_vcpus_retried_on_429(sandbox):
    """``ResizeVCPUs``: 20 attempts 20 ms apart while the answer is 429."""
    for _ in range(20):
        status, body = http(sandbox.api, "PUT", "vm.resize", {"desired_vcpus": MAX_VCPUS})
        if status != 429:
            break
        time.sleep(0.02)
    assert status == 204, body
    info = json.loads(http(sandbox.api, "GET", "vm.info")[1])
    assert info["config"]["cpus"]["boot_vcpus"] == MAX_VCPUS
    rc, out = wait_in_guest(sandbox, f"[ -e /sys/devices/system/cpu/cpu{MAX_VCPUS - 1} ]")
    assert rc == 0, out


def test_hotplug_block_device_and_remove_it(sandbox, files):
    status, body = http(sandbox.api, "PUT", "vm.add-disk", disk_body(files["block"]))
    assert status == 200, body
    answer = json.loads(body)
    slot = clh_pci_info_to_path(answer["bdf"])
    rc, out = wait_in_guest(sandbox, f"ls /sys/bus/pci/devices/0000:00:{slot}.0/virtio*/block "
                                     ">/dev/null 2>&1")
    assert rc == 0, out
    rc, out = sandbox.run(f"d=$(ls /sys/bus/pci/devices/0000:00:{slot}.0/virtio*/block); "
                          "dd if=/dev/$d bs=64k 2>/dev/null | md5sum")
    assert rc == 0 and hashlib.md5(pattern(DISK_SIZE)).hexdigest() in out, out
    status, body = http(sandbox.api, "PUT", "vm.remove-device", {"id": answer["id"]})
    assert (status, body) == (204, "")
    rc, out = wait_in_guest(sandbox, f"[ ! -e /sys/bus/pci/devices/0000:00:{slot}.0 ]")
    assert rc == 0, out
    assert answer["id"] not in json.loads(http(sandbox.api, "GET", "vm.info")[1])["device_tree"]


def test_vcpu_threads_found_by_katas_rule(sandbox):
    """``GetThreadIDs``: every task whose comm matches ``^vcpu\\d+$``, keyed by the number."""
    vcpus = {}
    for tid in os.listdir(f"/proc/{sandbox.proc.pid}/task"):
        try:
            comm = Path(f"/proc/{sandbox.proc.pid}/task/{tid}/comm").read_text().strip()
        except FileNotFoundError:
            continue        # a thread that ended since the listing (an API connection's)
        if re.fullmatch(r"vcpu\d+", comm):
            vcpus[int(comm.removeprefix("vcpu"))] = int(tid)
    assert sorted(vcpus) == list(range(MAX_VCPUS))


def test_template_is_paused_and_snapshotted_with_its_tap_nic(sandbox, files):
    """VM templating's first half on the booted sandbox: what pych cannot snapshot is
    refused by name, then removed (the share unmounted first); the NIC works; the VM is
    paused and snapshotted."""
    info = json.loads(http(sandbox.api, "GET", "vm.info")[1])
    fs_id, vsock_id = info["config"]["fs"][0]["id"], info["config"]["vsock"]["id"]
    snapshot = files["dir"] / "template"
    url = f"file://{snapshot}"
    assert http(sandbox.api, "PUT", "vm.pause") == (204, "")
    status, body = http(sandbox.api, "PUT", "vm.snapshot", {"destination_url": url})
    assert status == 400 and f"device {fs_id}" in body, body
    assert not snapshot.exists()
    assert http(sandbox.api, "PUT", "vm.resume") == (204, "")
    rc, out = sandbox.run("umount /mnt/shared && echo unmounted")
    assert (rc, out) == (0, "unmounted"), out
    for dev_id in (fs_id, vsock_id):
        assert http(sandbox.api, "PUT", "vm.remove-device", {"id": dev_id}) == (204, "")
    deadline = time.monotonic() + 300                        # until the guest ejected both
    while {fs_id, vsock_id} & set(info["device_tree"]) and time.monotonic() < deadline:
        time.sleep(0.5)
        info = json.loads(http(sandbox.api, "GET", "vm.info")[1])
    assert not {fs_id, vsock_id} & set(info["device_tree"]), sorted(info["device_tree"])
    # The tap's host end (Kata leaves addressing to the guest's agent; the test needs a peer).
    for cmd in (["addr", "add", f"{HOST_IP}/24", "dev", TAP], ["link", "set", TAP, "up"]):
        subprocess.run(["ip", "-n", NETNS, *cmd], check=True)
    rc, out = sandbox.run(
        f"{GUEST_NIC}; ip addr add {GUEST_IP}/24 dev $n && ip link set $n up && "
        f"ping -c 1 -W 30 {HOST_IP} >/dev/null && echo ping-ok; "
        "export TEMPLATE_VAR=template-$$; echo $TEMPLATE_VAR", timeout=120)
    lines = out.splitlines()
    assert rc == 0 and lines[0] == "ping-ok" and lines[1].startswith("template-"), out
    assert http(sandbox.api, "PUT", "vm.pause") == (204, "")
    status, body = http(sandbox.api, "PUT", "vm.snapshot", {"destination_url": url})
    assert (status, body) == (204, ""), body
    nets = json.loads((snapshot / "manifest.json").read_text())["config"]["net"]
    assert [(n["id"], n["mac"], len(n["fds"])) for n in nets] == [(nets[0]["id"], MAC, 1)]
    info = json.loads(http(sandbox.api, "GET", "vm.info")[1])
    assert info["state"] == "Paused"
    files["template"] = {"url": url, "var": lines[1], "net": info["config"]["net"][0],
                         "devices": sorted(info["device_tree"])}


def test_vmm_shutdown_ends_the_process_within_3_s(sandbox):
    status, body = http(sandbox.api, "PUT", "vmm.shutdown")
    assert status in (200, 204), body
    sandbox.proc.wait(3)                 # raises TimeoutExpired after Kata's bound
    # Its queue of the tap went with it: the persistent tap stays, without a carrier.
    assert tap_state() == ("0", f"{HOST_IP}/24")


# --- the clone: a fresh pych restores the template with a new tap fd -------------------------------
def tap_state() -> tuple[str, str]:
    """The tap's carrier (1 while some process holds a queue of it) and its address."""
    carrier = subprocess.run(["ip", "netns", "exec", NETNS, "cat", f"/sys/class/net/{TAP}/carrier"],
                             capture_output=True, text=True, check=True).stdout.strip()
    addr = subprocess.run(["ip", "-n", NETNS, "-o", "-4", "addr", "show", "dev", TAP],
                          capture_output=True, text=True, check=True).stdout.split()
    return carrier, addr[addr.index("inet") + 1]


def open_files(pid: int) -> dict[str, str]:
    """The process's descriptors and what each points to."""
    found = {}
    for fd in os.listdir(f"/proc/{pid}/fd"):
        try:
            found[fd] = os.readlink(f"/proc/{pid}/fd/{fd}")
        except OSError:
            pass                        # closed since the listing
    return found


def gained_files(pid: int, baseline: dict[str, str], within: float = 10.0) -> dict:
    """The descriptors the process has that ``baseline`` has not (a new number, or a number
    now pointing elsewhere), once that is nothing (what a refused request brought is closed
    on the API server's thread a moment after the answer), or after ``within`` s. Lost ones
    are not counted: an earlier connection's socket may close meanwhile."""
    deadline = time.monotonic() + within
    while (gained := {fd: target for fd, target in open_files(pid).items()
                      if baseline.get(fd) != target}) and time.monotonic() < deadline:
        time.sleep(0.05)
    return gained


@pytest.fixture(scope="module")
def clone(files, netns):
    """A second pych as Kata launches one (only ``--api-socket``, in the sandbox's netns)."""
    box = ApiOnlyPych(files["dir"] / "clone", "clone", netns=netns)
    try:
        yield box
    finally:
        box.stop()


@pytest.mark.parametrize("bad", ["unknown device", "two fds for one", "an fd too many"])
def test_restore_with_net_fds_not_fitting_the_snapshot_is_refused_and_keeps_nothing(
        clone, files, bad):
    template = files["template"]
    net_id = template["net"]["id"]
    net_fds, count, words = {
        "unknown device": ([{"id": "_net99", "num_fds": 1}], 1,
                           "the snapshot has no net device _net99"),
        "two fds for one": ([{"id": net_id, "num_fds": 2}], 2,
                            f"Number of Net FDs passed for '{net_id}' during Restore: 2. "
                            "Expected: 1"),
        "an fd too many": ([{"id": net_id, "num_fds": 1}], 2,
                           "2 fds came with the request, its net_fds count 1"),
    }[bad]
    baseline = open_files(clone.proc.pid)
    fd = in_netns(NETNS, lambda: open_tap_queue(TAP))(60)     # the tap, opened again
    fds = (fd, *(os.dup(fd) for _ in range(count - 1)))       # one queue: a tap of 1 pair
    try:
        status, body = http(clone.api_path, "PUT", "vm.restore",
                            {"source_url": template["url"], "net_fds": net_fds}, fds=fds)
    finally:
        for f in fds:
            os.close(f)
    assert status == 400 and words in body, body
    assert http(clone.api_path, "GET", "vm.info")[0] == 404           # no VM
    assert gained_files(clone.proc.pid, baseline) == {}               # every fd closed
    assert tap_state()[0] == "0"                                      # no queue held


def test_restore_with_a_new_tap_fd_resumes_the_guest_on_its_nic(clone, files):
    template = files["template"]
    net_id = template["net"]["id"]
    fd = in_netns(NETNS, lambda: open_tap_queue(TAP))(60)
    try:
        status, body = http(clone.api_path, "PUT", "vm.restore",
                            {"source_url": template["url"],
                             "net_fds": [{"id": net_id, "num_fds": 1}]}, fds=(fd,))
    finally:
        os.close(fd)                     # the clone has its own copy now
    assert (status, body) == (204, ""), body
    assert tap_state() == ("1", f"{HOST_IP}/24")          # the clone holds a queue of it
    info = json.loads(http(clone.api_path, "GET", "vm.info")[1])
    assert info["state"] == "Paused"
    assert sorted(info["device_tree"]) == template["devices"]
    net = info["config"]["net"][0]
    # The NIC's configuration as the template had it; fds shows the clone's own number (as
    # the reference's vm.info shows the VMM's), a queue of /dev/net/tun in the clone.
    assert {**net, "fds": None} == {**template["net"], "fds": None}
    assert len(net["fds"]) == 1
    assert os.readlink(f"/proc/{clone.proc.pid}/fd/{net['fds'][0]}") == "/dev/net/tun"
    assert http(clone.api_path, "PUT", "vm.resume") == (204, "")
    clone.attach_console(files["serial"])
    rc, out = clone.run(f"echo $TEMPLATE_VAR; ping -c 1 -W 30 {HOST_IP} >/dev/null && "
                        "echo ping-ok", timeout=120)
    assert rc == 0 and out.splitlines() == [template["var"], "ping-ok"], out
    status, body = http(clone.api_path, "PUT", "vmm.shutdown")
    assert status in (200, 204), body
    clone.proc.wait(3)
