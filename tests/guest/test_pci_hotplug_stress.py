"""PCI hot plug under repetition, in one real guest started the way a ch-remote user would:
pych with only --api-socket, the VM created over the API, a disk cold-added before boot
(204), then booted.

Then 20 add/remove cycles of a second disk: each waits (one guest command polling in a
shell loop) until the guest sees /sys/block/vdb, removes it, and waits for the
``device-removed`` event and for the guest to lose it. pych's open fds (/proc/PID/fd) and
threads (/proc/PID/task) are sampled after every cycle, once settled (polled for up to 60 s,
``tests.support.host.settled_resources``): from the first cycle on both must stay exactly
constant (bound: 0 growth over 19 cycles). Last, the refusals: a duplicate id (409),
removing ``__rng`` (500, not removable) and a second vsock (500, at most one).
"""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from tests.support.guest import ApiOnlyPych, guest_artifacts, guest_cmdline
from tests.support.host import settled_resources
from tests.support.hotplug import wait_for_events, wait_in_guest

CYCLES = 20
DISK_SIZE = 1 << 20


@pytest.fixture(scope="module")
def workdir(tmp_path_factory) -> Path:
    return tmp_path_factory.mktemp("pci-hotplug-stress")


@pytest.fixture(scope="module")
def disks(workdir) -> tuple[Path, Path]:
    paths = workdir / "cold.raw", workdir / "cycled.raw"
    for i, path in enumerate(paths):
        path.write_bytes(bytes([i + 1]) * DISK_SIZE)
    return paths


@pytest.fixture(scope="module")
def guest(workdir, disks):
    g = ApiOnlyPych(workdir, extra_args=["--event-monitor", f"path={workdir / 'events.json'}"])
    g.events_path = workdir / "events.json"
    g.serial_path = str(workdir / "serial.sock")
    try:
        art = guest_artifacts()
        status, body = g.put("vm.create", {
            "cpus": {"boot_vcpus": 1, "max_vcpus": 1},
            "memory": {"size": 256 << 20},
            "payload": {"kernel": str(art["vmlinux"]), "initramfs": str(art["initramfs.cpio"]),
                        "cmdline": guest_cmdline()},
            "serial": {"mode": "Socket", "socket": g.serial_path},
            "console": {"mode": "Off"},
        })
        assert status == 204, body
        g.cold_add = g.put("vm.add-disk", {"path": str(disks[0]), "id": "cold"})
        status, body = g.put("vm.boot")
        assert status == 204, body
        g.attach_console(g.serial_path, wait_ready=True)
        yield g
    finally:
        g.stop()


def test_a_disk_cold_added_before_boot_is_there_after_boot(guest, disks):
    assert guest.cold_add == (204, "")
    info = guest.info()
    assert [d["id"] for d in info["config"]["disks"]] == ["cold"]
    assert info["device_tree"]["_virtio-pci-cold"]["pci_bdf"] == "0000:00:01.0"
    rc, out = guest.run("dd if=/dev/vda bs=4k count=1 2>/dev/null | od -An -tx1 | head -1")
    assert rc == 0 and out.split()[:4] == ["01"] * 4, out


def test_twenty_add_remove_cycles_keep_fds_and_threads_constant(guest, disks):
    samples = []
    for cycle in range(CYCLES):
        status, body = guest.put("vm.add-disk", {"path": str(disks[1])})
        assert status == 200, f"cycle {cycle}: {body}"
        dev_id = json.loads(body)["id"]
        rc, _ = wait_in_guest(guest, "[ -e /sys/block/vdb ]", interval=0.5)
        assert rc == 0, f"cycle {cycle}: the guest never saw the added disk"
        status, body = guest.put("vm.remove-device", {"id": dev_id})
        assert (status, body) == (204, ""), f"cycle {cycle}"
        removed = wait_for_events(guest, "device-removed", cycle + 1, limit=300)
        assert len(removed) == cycle + 1, f"cycle {cycle}: no device-removed for {dev_id}"
        assert removed[-1]["properties"]["id"] == dev_id
        rc, _ = wait_in_guest(guest, "[ ! -e /sys/block/vdb ]", interval=0.5)
        assert rc == 0, f"cycle {cycle}: the guest kept the removed disk"
        # the first cycle's settled figures are the bound every later cycle is held to
        samples.append(settled_resources(guest.proc.pid, samples[0] if samples else None))
    assert samples[1:] == samples[:1] * (CYCLES - 1), \
        f"fds/threads per cycle (fds, threads): {samples}"
    info = guest.info()
    assert [d["id"] for d in info["config"]["disks"]] == ["cold"]
    assert info["devices_pending_removal"] == []


def test_refusals_duplicate_id_rng_removal_second_vsock(guest, disks, workdir):
    status, body = guest.put("vm.add-disk", {"path": str(disks[1]), "id": "cold"})
    assert status == 409, body
    status, body = guest.put("vm.remove-device", {"id": "__rng"})
    assert status == 500 and "not allowed" in body, body
    status, body = guest.put("vm.add-vsock", {"cid": 3, "socket": str(workdir / "vsock1")})
    assert status == 200, body
    status, body = guest.put("vm.add-vsock", {"cid": 4, "socket": str(workdir / "vsock2")})
    assert status == 500 and "vsock" in body, body
    assert set(guest.info()["device_tree"]) >= {"cold", "__rng"}
