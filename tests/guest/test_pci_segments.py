"""PCI segments in a real guest: ``--platform num_pci_segments=16``, a boot disk on segment 1,
and a NIC and a disk hot added on segment 15 and removed again, as the reference's
multi-segment hot plug tests do (``add-net ...,pci_segment=15`` answers
``"bdf":"000f:00:00.0"``: segments other than 0 have no host bridge device, so their first
device takes slot 0).

One guest is shared by the module; pych runs in a network namespace the module creates and
deletes, so the tap stays in it. The guest sees every segment as its own PCI domain
(``lspci -D``), reached through its ECAM window (the MCFG entry) only; the hot plug goes
through the one ``\\_SB_.PHPR`` block, its PSEG register selecting segment 15. The guest's
acpiphp takes tens of seconds here to probe a device: every wait polls with a wide limit and
nothing is timed. The tests run in order.
"""

from __future__ import annotations

import hashlib
import json
import os
import re
from pathlib import Path

import pytest

from tests.support.guest import PychGuest, vm_info
from tests.support.hotplug import curl, wait_for_events, wait_in_guest
from tests.support.host import lock_is_free

NETNS = f"pych-segments-{os.getpid()}"
SEGMENTS = 16
TAP, MAC = "chtap15", "52:54:00:0f:00:01"
HOST_IP, GUEST_IP = "192.168.249.1", "192.168.249.2"
DISK_SIZE = 4 << 20
BLOCK = 4096
COPY_TO_BLOCK = 1000               # the guest copies block 0 of the hot-added disk here
VIRTIO_NET, VIRTIO_BLK = "1af4:1041", "1af4:1042"


def pattern(size: int, seed: int) -> bytes:
    """A known, non-repeating pattern (SHA-256 counter stream)."""
    return b"".join(hashlib.sha256(seed.to_bytes(4, "little") + i.to_bytes(4, "little")).digest()
                    for i in range(size // 32))



def lspci(guest) -> dict[str, str]:
    """The guest's ``lspci -D -n``: full address (with the domain) -> vendor:device."""
    rc, out = guest.run("lspci -D -n")
    assert rc == 0, out
    return dict(re.findall(r"^([0-9a-f]{4}:[0-9a-f]{2}:[0-9a-f]{2}\.\d) \w+: "
                           r"([0-9a-f]{4}:[0-9a-f]{4})", out, re.M))


def bdfs(info: dict) -> dict[str, str]:
    """vm.info's device tree: node id -> pci_bdf, for the nodes that have one."""
    return {node: value["pci_bdf"] for node, value in info["device_tree"].items()
            if value.get("pci_bdf")}


@pytest.fixture(scope="module")
def files(tmp_path_factory) -> dict[str, Path]:
    d = tmp_path_factory.mktemp("pci-segments")
    (d / "boot.raw").write_bytes(pattern(DISK_SIZE, 1))
    (d / "hot.raw").write_bytes(pattern(DISK_SIZE, 2))
    return {"dir": d, "boot": d / "boot.raw", "hot": d / "hot.raw"}


@pytest.fixture(scope="module")
def guest(netns, files):
    g = PychGuest(files["dir"] / "vm", memory="size=256M", extra_args=[
        "--platform", f"num_pci_segments={SEGMENTS}",
        "--disk", f"path={files['boot']},readonly=on,pci_segment=1",
        "--event-monitor", f"path={files['dir'] / 'events'}"])
    g.args = ["ip", "netns", "exec", netns, *g.args]       # exec()s pych: same pid
    g.events_path = files["dir"] / "events"
    try:
        g.start()
        g.wait_ready()
        yield g
    finally:
        g.stop()


def test_boot_disk_on_segment_1_is_in_domain_0001_and_reads(guest):
    """The boot disk is the first device of segment 1: 0001:00:00.0, in vm.info and in the
    guest; every segment is a PCI domain the guest found (its host bridge \\_SB_.PCxx)."""
    assert bdfs(vm_info(guest))["_virtio-pci-_disk0"] == "0001:00:00.0"
    seen = lspci(guest)
    assert seen.get("0001:00:00.0") == VIRTIO_BLK, seen
    assert seen.get("0000:00:00.0") == "8086:0d57", seen          # segment 0's host bridge
    rc, out = guest.run("ls /sys/devices | grep -c '^pci'; "
                        "readlink -f /sys/block/vda; dd if=/dev/vda bs=64k 2>/dev/null | md5sum")
    assert rc == 0, out
    roots, path, md5 = out.splitlines()[:3]
    assert int(roots) == SEGMENTS, out                           # pci0000:00 .. pci000f:00
    assert "/pci0001:00/0001:00:00.0/" in path, path
    assert md5.split()[0] == hashlib.md5(pattern(DISK_SIZE, 1)).hexdigest()


def test_a_segment_that_does_not_exist_is_refused(guest, files):
    status, body = curl(guest, "vm.add-disk", {"path": str(files["hot"]), "pci_segment": 16})
    assert status == 400, body
    assert "Invalid PCI segment id: 16" in body and "16 PCI segments" in body, body
    assert lock_is_free(files["hot"])
    assert [d["id"] for d in vm_info(guest)["config"]["disks"]] == ["_disk0"]


def test_nic_and_disk_hot_added_on_segment_15_work_in_the_guest(guest, files):
    status, body = curl(guest, "vm.add-net", {"tap": TAP, "mac": MAC, "ip": HOST_IP,
                                              "mask": "255.255.255.0", "pci_segment": 15})
    assert status == 200, body
    assert json.loads(body) == {"id": "_net1", "bdf": "000f:00:00.0"}
    status, body = curl(guest, "vm.add-disk", {"path": str(files["hot"]), "pci_segment": 15})
    assert status == 200, body
    assert json.loads(body) == {"id": "_disk2", "bdf": "000f:00:01.0"}
    info = vm_info(guest)
    assert bdfs(info) == {
        "_virtio-pci-__rng": "0000:00:01.0", "_virtio-pci-_disk0": "0001:00:00.0",
        "_virtio-pci-_net1": "000f:00:00.0",
        "_virtio-pci-_disk2": "000f:00:01.0"}
    assert [(d["id"], d["pci_segment"]) for d in info["config"]["disks"]] == [
        ("_disk0", 1), ("_disk2", 15)]
    assert [(n["id"], n["pci_segment"]) for n in info["config"]["net"]] == [("_net1", 15)]

    rc, out = wait_in_guest(guest, "[ -e /sys/block/vdb ] && [ -e /sys/class/net/eth0 ]")
    assert rc == 0, f"the guest never bound both: {guest.run('lspci -D -n; dmesg | tail -20')}"
    seen = lspci(guest)
    assert (seen.get("000f:00:00.0"), seen.get("000f:00:01.0")) == (VIRTIO_NET, VIRTIO_BLK), seen
    rc, out = guest.run(
        "readlink -f /sys/block/vdb; readlink -f /sys/class/net/eth0/device; "
        f"ip link show eth0; ip addr add {GUEST_IP}/24 dev eth0 && ip link set eth0 up && "
        f"ping -c 1 -W 10 {HOST_IP} >/dev/null && echo PING-OK; "
        "dd if=/dev/vdb bs=64k 2>/dev/null | md5sum; "
        f"dd if=/dev/vdb of=/dev/vdb bs={BLOCK} count=1 seek={COPY_TO_BLOCK} "
        "conv=notrunc,fsync 2>/dev/null; sync", timeout=300)
    assert rc == 0, out
    assert "/pci000f:00/000f:00:01.0/" in out and "/pci000f:00/000f:00:00.0/" in out, out
    assert f"link/ether {MAC}" in out, out
    assert "PING-OK" in out, out
    assert hashlib.md5(pattern(DISK_SIZE, 2)).hexdigest() in out, out
    data = files["hot"].read_bytes()
    assert data[COPY_TO_BLOCK * BLOCK:(COPY_TO_BLOCK + 1) * BLOCK] == data[:BLOCK]


def test_both_removed_from_segment_15_leave_the_guest_and_vm_info(guest, files):
    for dev_id in ("_net1", "_disk2"):
        status, body = curl(guest, "vm.remove-device", {"id": dev_id})
        assert (status, body) == (204, ""), dev_id
    rc, _ = wait_in_guest(guest, "[ ! -e /sys/block/vdb ] && [ ! -e /sys/class/net/eth0 ]")
    assert rc == 0, f"the guest kept them: {guest.run('lspci -D -n; dmesg | tail -20')}"
    removed = wait_for_events(guest, "device-removed", 2)
    assert sorted((e["properties"]["id"], e["properties"]["bdf"]) for e in removed) == [
        ("_disk2", "000f:00:01.0"), ("_net1", "000f:00:00.0")]
    seen = lspci(guest)
    assert not [a for a in seen if a.startswith("000f:")], seen
    assert seen.get("0001:00:00.0") == VIRTIO_BLK                 # the boot disk stays
    info = vm_info(guest)
    assert set(bdfs(info)) == {"_virtio-pci-__rng", "_virtio-pci-_disk0"}
    assert [d["id"] for d in info["config"]["disks"]] == ["_disk0"]
    assert "net" not in info["config"] and info["devices_pending_removal"] == []
    assert lock_is_free(files["hot"])
