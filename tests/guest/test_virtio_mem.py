"""virtio-mem in a real guest: memory plugged at boot, grown and shrunk live with vm.resize,
host memory given back on shrink, and the plugged amount kept across a reboot.

One guest (256 MiB boot RAM, a 512 MiB virtio-mem region, 128 MiB plugged at boot, hot
plugged memory onlined movable so the guest can always unplug it) is shared by the module;
the tests run in order: 128 -> 384 MiB plugged, -> 0 (host RSS drops), -> 256 MiB, reboot.
"""

import re
import time

import pytest

from pych.api.client import ApiClient

from tests.support.guest import mem_total_kib, vm_info

MiB = 1 << 20
KIB_PER_MIB = 1024
BOOT = 256 * MiB
REGION = 4 << 30                     # boot RAM ends below 3 GiB: the region starts at 4 GiB


@pytest.fixture(scope="module")
def guest(guest_factory):
    return guest_factory(memory="size=256M,hotplug_method=virtio-mem,hotplug_size=512M,"
                                "hotplugged_size=128M",
                         cmdline_extra="memhp_default_state=online_movable")


def resize(guest, desired: int) -> None:
    status, body = ApiClient(guest.api_path).put("vm.resize", {"desired_ram": desired})
    assert status == 204, body


def plugged(guest) -> int:
    (device,) = vm_info(guest)["memory_hotplug"]["virtio_mem"]
    return device["plugged_size"]


def wait_for(probe, expected, timeout: float = 300, interval: float = 2):
    """Poll ``probe()`` until it returns ``expected`` (never fails on speed alone); returns
    its last value."""
    deadline = time.monotonic() + timeout
    while (value := probe()) != expected and time.monotonic() < deadline:
        time.sleep(interval)
    return value


def vm_rss_kib(pid: int) -> int:
    with open(f"/proc/{pid}/status") as f:
        return int(re.search(r"VmRSS:\s+(\d+) kB", f.read()).group(1))


def test_memory_requested_at_boot_is_plugged(guest):
    assert wait_for(lambda: plugged(guest), 128 * MiB) == 128 * MiB
    info = vm_info(guest)
    assert info["memory_actual_size"] == BOOT + 128 * MiB
    assert info["device_tree"]["mem0"]["parent"] == "_virtio-pci-mem0"
    total = mem_total_kib(guest)
    assert total > BOOT // 1024                  # more than boot RAM alone can give
    rc, out = guest.run(f"cat /sys/devices/system/memory/memory{REGION // (128 * MiB)}/state "
                        f"/sys/devices/system/memory/memory{REGION // (128 * MiB)}/valid_zones")
    assert (rc, out.split()) == (0, ["online", "Movable"]), out
    guest.base_kib = total - 128 * KIB_PER_MIB   # MemTotal with nothing plugged


def test_grow_live(guest):
    resize(guest, BOOT + 384 * MiB)
    expected = guest.base_kib + 384 * KIB_PER_MIB
    assert wait_for(lambda: mem_total_kib(guest), expected) == expected
    info = vm_info(guest)
    assert info["memory_actual_size"] == BOOT + 384 * MiB
    assert (info["config"]["memory"]["size"], info["config"]["memory"]["hotplugged_size"]) == (
        BOOT, 384 * MiB)
    (device,) = info["memory_hotplug"]["virtio_mem"]
    assert (device["address"], device["requested_size"], device["plugged_size"]) == (
        REGION, 384 * MiB, 384 * MiB)


def test_shrink_live_gives_the_memory_back_to_the_host(guest):
    # the guest fills 32 MiB of (movable, so hot plugged) memory and frees it again
    rc, out = guest.run("dd if=/dev/zero of=/dev/null bs=32M count=1", timeout=300)
    assert rc == 0, out
    before = vm_rss_kib(guest.proc.pid)
    resize(guest, BOOT)
    assert wait_for(lambda: mem_total_kib(guest), guest.base_kib) == guest.base_kib
    assert wait_for(lambda: plugged(guest), 0) == 0
    after = vm_rss_kib(guest.proc.pid)
    assert before - after >= 16 * KIB_PER_MIB, (before, after)
    info = vm_info(guest)
    assert info["memory_actual_size"] == BOOT
    assert "hotplugged_size" not in info["config"]["memory"]


def test_the_device_cannot_be_removed(guest):
    status, body = ApiClient(guest.api_path).put("vm.remove-device", {"id": "mem0"})
    assert status == 500 and b"not allowed" in body, body


def test_reboot_keeps_the_plugged_amount(guest):
    resize(guest, BOOT + 256 * MiB)
    expected = guest.base_kib + 256 * KIB_PER_MIB
    assert wait_for(lambda: mem_total_kib(guest), expected) == expected
    start = len(guest.console.buf)
    guest.console.send("reboot -f\n")
    guest.wait_ready(start=start)
    assert wait_for(lambda: mem_total_kib(guest), expected) == expected
    info = vm_info(guest)
    assert info["memory_actual_size"] == BOOT + 256 * MiB
    assert info["config"]["memory"]["hotplugged_size"] == 256 * MiB
