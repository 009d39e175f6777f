"""ACPI memory hot plug in a real guest: the user's "Memory Hot Plug" flow (../shared/spec/
hotplug.md), scaled to this host (256 MiB boot RAM, a 1 GiB window, 128-256 MiB steps).

One guest (boot=1,max=2 vCPUs) is shared by the module; the tests run in order and each
starts from the RAM the previous one left: 256 -> 512 -> 768 MiB, errors, CPU and memory in
one request (-> 896 MiB), a reduction to 384 MiB, and a reboot that boots with 384 MiB.
"""

import json
import re
import subprocess
import time

import pytest

from pych.api.client import ApiClient

from tests.support.guest import REPO

MiB = 1 << 20
KIB_PER_MIB = 1024


@pytest.fixture(scope="module")
def guest(guest_factory):
    g = guest_factory(cpus="boot=1,max=2", memory="size=256M,hotplug_size=1G")
    rc, out = g.run("echo online | tee /sys/devices/system/memory/auto_online_blocks")
    assert (rc, out) == (0, "online")
    g.mem_total_kib = mem_total_kib(g)
    return g


def mem_total_kib(guest) -> int:
    rc, out = guest.run("grep MemTotal /proc/meminfo")
    assert rc == 0, out
    return int(re.search(r"MemTotal:\s+(\d+) kB", out).group(1))


def wait_mem_total(guest, expected_kib: int, timeout: float = 240) -> int:
    """Poll the guest until MemTotal reaches ``expected_kib`` (never fails on speed alone)."""
    deadline = time.monotonic() + timeout
    while (total := mem_total_kib(guest)) < expected_kib and time.monotonic() < deadline:
        time.sleep(2)
    return total


def curl_resize(guest, body: dict) -> tuple[int, str]:
    """``PUT vm.resize`` with curl, as the user's document does; (status, body)."""
    r = subprocess.run(
        ["curl", "-s", "-o", "/dev/stdout", "-w", "\n%{http_code}", "--unix-socket",
         guest.api_path, "-X", "PUT", "-H", "Content-Type: application/json",
         "-d", json.dumps(body), "http://localhost/api/v1/vm.resize"],
        capture_output=True, text=True, timeout=120, check=True)
    text, _, status = r.stdout.rpartition("\n")
    return int(status), text


def vm_info(guest) -> dict:
    status, body = ApiClient(guest.api_path).get("vm.info")
    assert status == 200, body
    return json.loads(body)


def test_resize_up_shows_in_free(guest):
    assert curl_resize(guest, {"desired_ram": 512 * MiB}) == (204, "")
    before = guest.mem_total_kib
    assert wait_mem_total(guest, before + 256 * KIB_PER_MIB) == before + 256 * KIB_PER_MIB
    rc, out = guest.run("free -m; cat /sys/devices/system/memory/memory32/state /sys/devices/system/memory/memory33/state")
    assert rc == 0, out
    assert out.split()[-2:] == ["online", "online"], out     # the DIMM's two 128 MiB blocks
    info = vm_info(guest)
    assert info["memory_actual_size"] == 512 * MiB
    assert info["config"]["memory"]["size"] == 512 * MiB
    (dimm,) = info["memory_hotplug"]["dimms"]
    assert {key: dimm[key] for key in ("id", "slot", "address", "size", "state")} == {
        "id": "dimm0", "slot": 0, "address": 4 << 30, "size": 256 * MiB,
        "state": "acknowledged"}
    # the guest reports through _OST that it added the DIMM: event 1 (insertion), status 0
    deadline = time.monotonic() + 120
    while "ost_event" not in dimm and time.monotonic() < deadline:
        time.sleep(2)
        (dimm,) = vm_info(guest)["memory_hotplug"]["dimms"]
    assert (dimm.get("ost_event"), dimm.get("ost_status")) == (1, 0), dimm
    guest.mem_total_kib += 256 * KIB_PER_MIB


def test_second_increase_with_pych_remote(guest):
    r = subprocess.run([str(REPO / ".venv" / "bin" / "pych-remote"), "--api-socket",
                        guest.api_path, "resize", "--memory", "768M"],
                       capture_output=True, text=True, timeout=120)
    assert r.returncode == 0, r.stderr
    expected = guest.mem_total_kib + 256 * KIB_PER_MIB
    assert wait_mem_total(guest, expected) == expected
    guest.mem_total_kib = expected
    assert [d["address"] for d in vm_info(guest)["memory_hotplug"]["dimms"]] == [
        4 << 30, (4 << 30) + 256 * MiB]


def test_bad_increases_are_refused_and_change_nothing(guest):
    status, body = curl_resize(guest, {"desired_ram": 832 * MiB})       # +64 MiB
    assert status == 400 and "multiple of 128 MiB" in body, body
    status, body = curl_resize(guest, {"desired_ram": 768 * MiB + (1 << 30)})
    assert status == 400 and "not enough hot plug space" in body, body
    assert vm_info(guest)["config"]["memory"]["size"] == 768 * MiB
    assert mem_total_kib(guest) == guest.mem_total_kib


def test_cpu_and_memory_in_one_request(guest):
    assert curl_resize(guest, {"desired_vcpus": 2, "desired_ram": 896 * MiB}) == (204, "")
    expected = guest.mem_total_kib + 128 * KIB_PER_MIB
    assert wait_mem_total(guest, expected) == expected
    guest.mem_total_kib = expected
    rc, out = guest.run("cat /sys/devices/system/cpu/present")
    assert (rc, out) == (0, "0-1")
    config = vm_info(guest)["config"]
    assert (config["cpus"]["boot_vcpus"], config["memory"]["size"]) == (2, 896 * MiB)


def test_reduction_waits_for_the_next_boot(guest):
    # The configuration changes at once; the guest keeps its memory until the next boot,
    # except DIMMs it can offline and hand back live (tests/guest/test_memory_dimm_removal.py
    # covers that path): this guest onlined them into the kernel zone, so it may or may not.
    assert curl_resize(guest, {"desired_ram": 384 * MiB}) == (204, "")
    info = vm_info(guest)
    assert info["config"]["memory"]["size"] == 384 * MiB
    assert 384 * MiB <= info["memory_actual_size"] <= 896 * MiB
    assert mem_total_kib(guest) <= guest.mem_total_kib


def test_reboot_boots_with_the_reduced_size(guest):
    start = len(guest.console.buf)
    guest.console.send("reboot -f\n")
    guest.wait_ready(start=start)
    total = mem_total_kib(guest)
    # the kernel keeps its image and reserved pages: between 70 % and 100 % of 384 MiB
    assert 0.7 * 384 * KIB_PER_MIB < total <= 384 * KIB_PER_MIB
    info = vm_info(guest)
    assert info["memory_actual_size"] == 384 * MiB
    assert info["memory_hotplug"]["dimms"] == []
