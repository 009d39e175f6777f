"""The reference's own hot plug flows on its default device layout, in one real guest.

The guest boots as Cloud Hypervisor's integration tests boot theirs: a virtio console, two
disks, a NIC and the rng (../shared/notes/ch-hotplug-reference.md §5.3: slots 1-5), so the
first hot-added device answers ``0000:00:06.0``. pych runs in a network namespace the module
creates and deletes (the NICs' taps stay in it). The tests run in order on the one guest:

1. a disk, a NIC, a pmem and a vsock are each added (200 ``{"id", "bdf": "0000:00:06.0"}``),
   seen by the guest at 00:06.0 with its driver bound, and removed (the guest lets go and
   pych reports ``device-removed``), so each finds slot 6 free again;
2. a NIC, a pmem and a vsock are hot added and kept, the boot NIC removed, the RAM grown by
   128 MiB; ``vm.reboot``; the guest's lspci and ``vm.info`` agree with the configuration
   (the kept devices are boot devices now, the removed ones are gone everywhere) and the
   guest keeps the grown RAM;
3. hot plug on a paused VM, the reference's way: the request acts at once (200 and the BDF;
   the device is in the configuration and ``vm.info``) and the guest sees the device when
   the VM resumes;
4. with the VM paused (so the guest cannot eject: the test holds it), remove-device is 204
   and asking again is 204 (the reference re-signals the guest), re-adding the id whose eject
   is pending is refused with 409 as any id in use (the reference answers 500; the id is still in the
   device tree); once
   resumed the guest ejects it, one ``device-removed``, and the id and slot are free again.

The guest's acpiphp takes tens of seconds here to probe or release a device, so every wait
polls with a wide limit and nothing is timed.
"""

from __future__ import annotations

import json
import os
import re

import pytest

from pych.api.client import ApiClient

from tests.support.guest import PychGuest, mem_total_kib, vm_info
from tests.support.hotplug import events, wait_for_events, wait_in_guest

NETNS = f"pych-flows-{os.getpid()}"
MiB = 1 << 20
KIB_PER_MIB = 1024
# 128 MiB of boot RAM costs the guest 2 MiB of page structs, reserved before MemTotal is
# counted; allowed twice that.
MEMMAP_KIB_PER_128M = 4 * KIB_PER_MIB
# virtio-pci vendor:device of each kind, and the guest driver bound to its virtio device
PCI_IDS = {"console": "1af4:1043", "disk": "1af4:1042", "net": "1af4:1041", "rng": "1af4:1044",
           "pmem": "1af4:105b", "vsock": "1af4:1053"}
DRIVERS = {"disk": "virtio_blk", "net": "virtio_net", "pmem": "virtio_pmem",
           "vsock": "vmw_vsock_virtio_transport"}
FIRST_HOTPLUG_BDF = "0000:00:06.0"


# --- helpers ------------------------------------------------------------------------------------
def put(guest, endpoint: str, body: dict | None = None) -> tuple[int, str]:
    with ApiClient(guest.api_path) as client:
        status, data = client.put(endpoint, body)
    return status, data.decode()


def lspci(guest) -> dict[str, str]:
    """The guest's ``lspci -n``: {"00:06.0": "1af4:1042", ...}."""
    rc, out = guest.run("lspci -n")
    assert rc == 0, out
    return dict(re.findall(r"^([0-9a-f]{2}:[0-9a-f]{2}\.\d) \w+: ([0-9a-f]{4}:[0-9a-f]{4})",
                           out, re.M))


def tree_bdfs(info: dict) -> dict[str, str]:
    """{device id: its PCI BDF} from vm.info's device tree (virtio devices' PCI nodes)."""
    return {node_id.removeprefix("_virtio-pci-"): node["pci_bdf"]
            for node_id, node in info["device_tree"].items()
            if node_id.startswith("_virtio-pci-") and node.get("pci_bdf")}


def kind_of(dev_id: str) -> str:
    return {"__console": "console", "__rng": "rng"}.get(dev_id) or \
        re.match(r"_?([a-z]+)", dev_id).group(1)


def bound(bdf: str) -> str:
    """Guest shell test: the virtio device at ``bdf`` has its driver bound."""
    return f"[ -e /sys/bus/pci/devices/{bdf}/virtio*/driver ]"


def gone(bdf: str) -> str:
    return f"[ ! -e /sys/bus/pci/devices/{bdf} ]"


def driver_at(guest, bdf: str) -> str:
    rc, out = guest.run(f"basename $(readlink /sys/bus/pci/devices/{bdf}/virtio*/driver)")
    assert rc == 0, out
    return out


def guest_agrees_with_vm_info(guest) -> dict[str, str]:
    """The guest's lspci shows exactly the host bridge and the virtio devices of vm.info's
    device tree, each at its BDF with its kind's vendor:device; returns {id: bdf}."""
    bdfs = tree_bdfs(vm_info(guest))
    expected = {"00:00.0": "8086:0d57"} | {
        bdf.removeprefix("0000:"): PCI_IDS[kind_of(dev_id)] for dev_id, bdf in bdfs.items()}
    assert lspci(guest) == expected, bdfs
    return bdfs


# --- the guest ----------------------------------------------------------------------------------
@pytest.fixture(scope="module")
def files(tmp_path_factory) -> dict:
    d = tmp_path_factory.mktemp("reference-flows")
    paths = {name: d / f"{name}.raw" for name in ("boot0", "boot1", "hot", "paused")}
    for i, path in enumerate(paths.values()):
        path.write_bytes(bytes([i + 1]) * MiB)
    paths["pmem"] = d / "pmem.img"
    paths["pmem"].write_bytes(bytes(2 * MiB))
    paths["kept-pmem"] = d / "kept-pmem.img"
    paths["kept-pmem"].write_bytes(bytes(2 * MiB))
    return {"dir": d, **paths}


@pytest.fixture(scope="module")
def guest(netns, files):
    d = files["dir"]
    g = PychGuest(d / "vm", memory="size=256M,hotplug_size=256M", extra_args=[
        "--disk", f"path={files['boot0']}", f"path={files['boot1']}",
        "--net", "tap=flowtap0",
        "--event-monitor", f"path={d / 'events'}"])
    console = g.args.index("--console")
    g.args[console + 1] = f"file={d / 'hvc0.out'}"        # the reference's virtio console
    g.args = ["ip", "netns", "exec", netns, *g.args]        # exec()s pych: same pid
    g.events_path = d / "events"
    try:
        g.start()
        g.wait_ready()
        rc, out = g.run("echo online > /sys/devices/system/memory/auto_online_blocks")
        assert rc == 0, out
        g.boot_kib = mem_total_kib(g)
        yield g
    finally:
        g.stop()


def hot_plug_requests(files, tag: str) -> dict[str, tuple[str, dict]]:
    return {"disk": ("vm.add-disk", {"path": str(files["hot"])}),
            "net": ("vm.add-net", {"tap": f"flowtap{tag}"}),
            "pmem": ("vm.add-pmem", {"file": str(files["pmem" if tag == "1" else "kept-pmem"])}),
            "vsock": ("vm.add-vsock", {"cid": 3, "socket": str(files["dir"] / f"vsock{tag}")})}


# --- the tests ----------------------------------------------------------------------------------
def test_the_boot_layout_is_the_references(guest):
    assert guest_agrees_with_vm_info(guest) == {
        "__console": "0000:00:01.0", "_disk0": "0000:00:02.0", "_disk1": "0000:00:03.0",
        "_net2": "0000:00:04.0", "__rng": "0000:00:05.0"}
    assert driver_at(guest, "0000:00:01.0") == "virtio_console"


def test_the_first_hot_added_disk_net_pmem_and_vsock_each_answer_06_0(guest, files):
    seen = []
    for removed, (kind, (endpoint, body)) in enumerate(hot_plug_requests(files, "1").items()):
        status, text = put(guest, endpoint, body)
        assert status == 200, f"{endpoint}: {text}"
        added = json.loads(text)
        # the reference's one id counter for every prefix: after _disk0, _disk1 and _net2
        assert added == {"id": f"_{kind}{3 + removed}", "bdf": FIRST_HOTPLUG_BDF}, endpoint
        rc, _ = wait_in_guest(guest, bound(FIRST_HOTPLUG_BDF), interval=0.5)
        assert rc == 0, f"the guest never bound the {kind}: {guest.run('lspci -n; dmesg | tail')}"
        seen.append((kind, lspci(guest).get("00:06.0"), driver_at(guest, FIRST_HOTPLUG_BDF)))

        assert put(guest, "vm.remove-device", {"id": added["id"]}) == (204, "")
        rc, _ = wait_in_guest(guest, gone(FIRST_HOTPLUG_BDF), interval=0.5)
        assert rc == 0, f"the guest kept the removed {kind}"
        ejected = wait_for_events(guest, "device-removed", removed + 1)
        assert ejected[-1]["properties"] == added, ejected
        info = vm_info(guest)
        assert info["devices_pending_removal"] == [] and added["id"] not in info["device_tree"]
    assert seen == [(kind, PCI_IDS[kind], DRIVERS[kind]) for kind in DRIVERS]
    assert guest_agrees_with_vm_info(guest) == {
        "__console": "0000:00:01.0", "_disk0": "0000:00:02.0", "_disk1": "0000:00:03.0",
        "_net2": "0000:00:04.0", "__rng": "0000:00:05.0"}


def test_added_and_removed_devices_and_grown_ram_persist_over_vm_reboot(guest, files):
    kept = {}
    for kind in ("net", "pmem", "vsock"):
        endpoint, body = hot_plug_requests(files, "2")[kind]
        status, text = put(guest, endpoint, body)
        assert status == 200, f"{endpoint}: {text}"
        kept[kind] = json.loads(text)
    assert put(guest, "vm.remove-device", {"id": "_net2"}) == (204, "")      # the boot NIC
    assert put(guest, "vm.resize", {"desired_ram": 384 * MiB}) == (204, "")
    grown = guest.boot_kib + 128 * KIB_PER_MIB
    rc, out = wait_in_guest(guest, " && ".join([gone("0000:00:04.0")] + [
        bound(a["bdf"]) for a in kept.values()]) + f" && grep -q '^MemTotal: *{grown} kB' /proc/meminfo",
        interval=0.5)
    assert rc == 0, f"the guest never settled: {guest.run('lspci -n; grep MemTotal /proc/meminfo')}"
    # the removed boot NIC's eject, then the reboot
    assert [e["properties"]["id"] for e in wait_for_events(guest, "device-removed", 5)][-1] == \
        "_net2"
    start = len(guest.console.buf)
    assert put(guest, "vm.reboot") == (204, "")
    guest.wait_ready(start=start)

    info = vm_info(guest)
    config = info["config"]
    assert [n["id"] for n in config["net"]] == [kept["net"]["id"]]
    assert [p["id"] for p in config["pmem"]] == [kept["pmem"]["id"]]
    assert config["vsock"]["id"] == kept["vsock"]["id"]
    assert [d["id"] for d in config["disks"]] == ["_disk0", "_disk1"]
    assert config["memory"]["size"] == 384 * MiB and info["memory_actual_size"] == 384 * MiB
    # the kept devices are boot devices now, in the reference's boot order; the removed
    # ones (the boot NIC, every device of the previous test) are nowhere
    assert guest_agrees_with_vm_info(guest) == {
        "__console": "0000:00:01.0", "_disk0": "0000:00:02.0", "_disk1": "0000:00:03.0",
        kept["net"]["id"]: "0000:00:04.0", "__rng": "0000:00:05.0",
        kept["pmem"]["id"]: "0000:00:06.0", kept["vsock"]["id"]: "0000:00:07.0"}
    rc, out = guest.run("ls /sys/class/net | grep -c eth; ls /dev | grep -c pmem; "
                        "basename $(readlink /sys/bus/pci/devices/0000:00:07.0/virtio*/driver)")
    assert (rc, out.split()) == (0, ["1", "1", DRIVERS["vsock"]]), out
    # the grown RAM is boot RAM now: 128 MiB more than the first boot, less its page structs
    total = mem_total_kib(guest)
    assert grown - MEMMAP_KIB_PER_128M <= total <= grown, (total, grown)


def test_hot_plug_on_a_paused_vm_acts_at_once_and_the_guest_sees_it_on_resume(guest, files):
    free_slot = min(set(range(1, 32)) - {int(b[8:10], 16) for b in tree_bdfs(vm_info(guest))
                                         .values()})
    bdf = f"0000:00:{free_slot:02x}.0"
    assert put(guest, "vm.pause") == (204, "")
    try:
        status, text = put(guest, "vm.add-disk", {"path": str(files["paused"]), "id": "paused"})
        info = vm_info(guest)
    finally:
        assert put(guest, "vm.resume") == (204, "")
    assert (status, json.loads(text)) == (200, {"id": "paused", "bdf": bdf})
    assert info["state"] == "Paused"
    assert [d["id"] for d in info["config"]["disks"]] == ["_disk0", "_disk1", "paused"]
    assert tree_bdfs(info)["paused"] == bdf
    rc, _ = wait_in_guest(guest, bound(bdf), interval=0.5)
    assert rc == 0, f"the guest never bound the disk added while paused: {guest.run('lspci -n')}"
    assert driver_at(guest, bdf) == DRIVERS["disk"]
    guest.paused_bdf = bdf


def test_remove_twice_and_re_add_while_the_eject_is_pending(guest, files):
    bdf, removed_before = guest.paused_bdf, len(events(guest, "device-removed"))
    assert put(guest, "vm.pause") == (204, "")      # the guest cannot eject until resumed
    try:
        first = put(guest, "vm.remove-device", {"id": "paused"})
        again = put(guest, "vm.remove-device", {"id": "paused"})
        re_add = put(guest, "vm.add-disk", {"path": str(files["paused"]), "id": "paused"})
        info = vm_info(guest)
    finally:
        assert put(guest, "vm.resume") == (204, "")
    assert (first, again) == ((204, ""), (204, ""))
    assert re_add[0] == 409, re_add
    assert any("paused" in m and "not unique" in m for m in json.loads(re_add[1])), re_add
    assert info["devices_pending_removal"] == ["paused"]
    assert "paused" in info["device_tree"]                 # until the guest ejects it
    assert [d["id"] for d in info["config"]["disks"]] == ["_disk0", "_disk1"]

    rc, _ = wait_in_guest(guest, gone(bdf), interval=0.5)
    assert rc == 0, "the guest never ejected the disk"
    ejected = wait_for_events(guest, "device-removed", removed_before + 1)
    # one eject, one event, however often the removal was asked for
    assert [e["properties"] for e in ejected[removed_before:]] == [{"id": "paused", "bdf": bdf}]
    assert vm_info(guest)["devices_pending_removal"] == []
    status, text = put(guest, "vm.add-disk", {"path": str(files["paused"]), "id": "paused"})
    assert (status, json.loads(text)) == (200, {"id": "paused", "bdf": bdf})
