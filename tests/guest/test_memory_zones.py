"""User-defined memory zones in a real guest: boot RAM made of a zone, a second zone that is
only a virtio-mem region, grown and shrunk live with vm.resize-zone, and the zone's plugged
amount kept across a reboot (../shared/notes/ch-hotplug-reference.md §4.2).

One guest is shared by the module (``--memory size=0,hotplug_method=virtio-mem``, zone
``mem0`` 256 MiB of boot RAM, zone ``mem1`` size 0 with a 512 MiB virtio-mem region, hot
plugged memory onlined movable so the guest can always unplug it); the tests run in order:
mem1 0 -> 256 MiB (pych-remote), -> 128 MiB (curl), the errors, reboot with 128 MiB.
"""

import json
import subprocess
import time

import pytest

from tests.support.guest import REPO, mem_total_kib, vm_info

MiB = 1 << 20
KIB_PER_MIB = 1024
REGION = 4 << 30                     # boot RAM ends below 3 GiB: mem1's region is at 4 GiB


@pytest.fixture(scope="module")
def guest(guest_factory):
    g = guest_factory(memory="size=0,hotplug_method=virtio-mem",
                      extra_args=["--memory-zone", "id=mem0,size=256M",
                                  "--memory-zone", "id=mem1,size=0,hotplug_size=512M"],
                      cmdline_extra="memhp_default_state=online_movable")
    g.base_kib = mem_total_kib(g)
    return g


def curl_resize_zone(guest, body: dict) -> tuple[int, str]:
    """``PUT vm.resize-zone`` with curl; (status, body)."""
    r = subprocess.run(
        ["curl", "-s", "-o", "/dev/stdout", "-w", "\n%{http_code}", "--unix-socket",
         guest.api_path, "-X", "PUT", "-H", "Content-Type: application/json",
         "-d", json.dumps(body), "http://localhost/api/v1/vm.resize-zone"],
        capture_output=True, text=True, timeout=120, check=True)
    text, _, status = r.stdout.rpartition("\n")
    return int(status), text


def mem1(guest) -> dict:
    (device,) = vm_info(guest)["memory_hotplug"]["virtio_mem"]
    assert device["id"] == "mem1"
    return device


def wait_for(probe, expected, timeout: float = 300, interval: float = 2):
    """Poll ``probe()`` until it returns ``expected`` (never fails on speed alone); returns
    its last value."""
    deadline = time.monotonic() + timeout
    while (value := probe()) != expected and time.monotonic() < deadline:
        time.sleep(interval)
    return value


def test_boot_ram_is_the_zones_and_mem1_is_a_virtio_mem_device(guest):
    info = vm_info(guest)
    assert [(z["id"], z["size"]) for z in info["config"]["memory"]["zones"]] == [
        ("mem0", 256 * MiB), ("mem1", 0)]
    assert info["memory_actual_size"] == 256 * MiB
    assert info["device_tree"]["mem1"]["parent"] == "_virtio-pci-mem1"
    assert wait_for(lambda: mem1(guest)["driver_active"], True) is True
    device = mem1(guest)
    assert (device["address"], device["size"], device["requested_size"],
            device["plugged_size"]) == (REGION, 512 * MiB, 0, 0)
    assert 0.7 * 256 * KIB_PER_MIB < guest.base_kib <= 256 * KIB_PER_MIB


def test_grow_a_zone_with_pych_remote(guest):
    r = subprocess.run([str(REPO / ".venv" / "bin" / "pych-remote"), "--api-socket",
                        guest.api_path, "resize-zone", "--id", "mem1", "--size", "256M"],
                       capture_output=True, text=True, timeout=120)
    assert (r.returncode, r.stdout, r.stderr) == (0, "", "")
    expected = guest.base_kib + 256 * KIB_PER_MIB
    assert wait_for(lambda: mem_total_kib(guest), expected) == expected
    info = vm_info(guest)
    assert info["memory_actual_size"] == 512 * MiB
    assert info["config"]["memory"]["zones"][1]["hotplugged_size"] == 256 * MiB
    device = info["memory_hotplug"]["virtio_mem"][0]
    assert (device["requested_size"], device["plugged_size"]) == (256 * MiB, 256 * MiB)
    rc, out = guest.run(f"cat /sys/devices/system/memory/memory{REGION // (128 * MiB)}/state")
    assert (rc, out) == (0, "online"), out


def test_shrink_a_zone_with_curl(guest):
    assert curl_resize_zone(guest, {"id": "mem1", "desired_ram": 128 * MiB}) == (204, "")
    expected = guest.base_kib + 128 * KIB_PER_MIB
    assert wait_for(lambda: mem_total_kib(guest), expected) == expected
    assert wait_for(lambda: mem1(guest)["plugged_size"], 128 * MiB) == 128 * MiB
    info = vm_info(guest)
    assert info["memory_actual_size"] == 384 * MiB
    assert info["config"]["memory"]["zones"][1]["hotplugged_size"] == 128 * MiB


@pytest.mark.parametrize("body, status, message", [
    ({"id": "mem0", "desired_ram": 512 * MiB}, 400, "mem0 has no virtio-mem region"),
    ({"id": "mem1", "desired_ram": 1 << 30}, 400, "not enough hot plug space"),
    ({"id": "mem1", "desired_ram": 3 * MiB}, 400, "multiple of the virtio-mem block size"),
    ({"id": "nope", "desired_ram": 512 * MiB}, 404, "Could not find the memory zone nope"),
])
def test_bad_zone_resizes_are_refused_and_change_nothing(guest, body, status, message):
    got, text = curl_resize_zone(guest, body)
    assert got == status and message in text, text
    assert mem1(guest)["requested_size"] == 128 * MiB


def test_vm_resize_of_memory_made_of_zones_is_refused(guest):
    r = subprocess.run(
        ["curl", "-s", "-w", "\n%{http_code}", "--unix-socket", guest.api_path, "-X", "PUT",
         "-d", json.dumps({"desired_ram": 1 << 30}), "http://localhost/api/v1/vm.resize"],
        capture_output=True, text=True, timeout=120, check=True)
    text, _, status = r.stdout.rpartition("\n")
    assert status == "400" and "vm.resize-zone" in text, text


def test_reboot_keeps_the_zones_plugged_amount(guest):
    start = len(guest.console.buf)
    guest.console.send("reboot -f\n")
    guest.wait_ready(start=start)
    expected = guest.base_kib + 128 * KIB_PER_MIB
    assert wait_for(lambda: mem_total_kib(guest), expected) == expected
    info = vm_info(guest)
    assert info["memory_actual_size"] == 384 * MiB
    assert info["config"]["memory"]["zones"][1]["hotplugged_size"] == 128 * MiB
    assert mem1(guest)["plugged_size"] == 128 * MiB
