"""CPU hot plug in a real guest: the user's acceptance flow (../shared/spec/hotplug.md, "CPU Hot
Plug") with curl against the API socket on a cheap boot=1,max=2 guest (the documentation's own
boot=4,max=8 flow is tests/guest/test_cpu_hotplug_seed.py); then down, up again on the same
ids, removal under CPU-bound load, refused requests, and the last requested count surviving
a guest reboot (an addition) and ``vm.reboot`` (a removal).

One guest is shared by the module and the tests run in order; the reboots come last, so the
module boots three times.
"""

from __future__ import annotations

import json
import re
import subprocess
import sys

import pytest

from pych.api.client import ApiClient
from pych.cli.remote import wait_for_vcpus

GUEST_WAIT = 180          # seconds for the guest to see or eject vCPUs (slow host, shared cores)
ONLINE_WAIT = 600         # onlining a CPU takes seconds idle, minutes when the host is loaded
# nproc counts the shell's affinity, which the guest widens asynchronously after an online.
NPROC_2 = "for i in $(seq 120); do [ $(nproc) = 2 ] && break; sleep 1; done; nproc"


@pytest.fixture(scope="module")
def guest(guest_factory):
    return guest_factory(cpus="boot=1,max=2", memory="size=256M")


def curl_resize(guest, desired: int) -> tuple[int, str]:
    """The seed's request, verbatim but for the socket path: ``(HTTP status, body)``."""
    out = subprocess.run(
        ["curl", "-H", "Accept: application/json", "-H", "Content-Type: application/json", "-i",
         "-XPUT", "--unix-socket", guest.api_path, "-d", f'{{ "desired_vcpus":{desired}}}',
         "http://localhost/api/v1/vm.resize"],
        capture_output=True, text=True, timeout=60, check=True).stdout
    status = int(re.match(r"HTTP/1\.[01] (\d+)", out).group(1))
    return status, out.split("\n\n", 1)[1]      # text mode: CRLFs read as LFs


def remote(guest, *args: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "pych.cli.remote", "--api-socket", guest.api_path,
                           *args], capture_output=True, text=True, timeout=GUEST_WAIT + 60)


def vm_info(guest) -> dict:
    with ApiClient(guest.api_path) as client:
        status, body = client.get("vm.info")
    assert status == 200, body
    return json.loads(body)


def vcpu_states(guest) -> list[str]:
    return [cpu["state"] for cpu in vm_info(guest)["cpus"]]


def wait_vcpus(guest, desired: int, timeout: float = GUEST_WAIT) -> None:
    with ApiClient(guest.api_path) as client:
        wait_for_vcpus(client, desired, timeout)


def in_sysfs(*cpus: int) -> str:
    """Guest shell loops until each CPU's ``online`` file exists: the guest evaluates a new
    CPU's _STA (``present`` in vm.info) a moment before it registers the CPU in sysfs."""
    return "".join(f"until [ -e /sys/devices/system/cpu/cpu{cpu}/online ]; do sleep 0.2; done; "
                   for cpu in cpus)


def online_after_removal(guest, expected: str) -> str:
    """The guest offlines removed CPUs by itself: poll its online mask (one shell loop)."""
    rc, out = guest.run(f"for i in $(seq 120); do o=$(cat /sys/devices/system/cpu/online); "
                        f"[ \"$o\" = {expected} ] && break; sleep 1; done; echo $o",
                        timeout=GUEST_WAIT)
    assert rc == 0, out
    return out.splitlines()[-1]


def test_seed_flow_add_cpus_then_online_them(guest):
    assert curl_resize(guest, 2) == (204, "")
    assert vm_info(guest)["config"]["cpus"]["boot_vcpus"] == 2
    wait_vcpus(guest, 2)          # vCPU 1 runs and the guest has evaluated its _STA
    rc, out = guest.run(f"{in_sysfs(1)}lscpu | grep list:; echo 1 | tee "
                        f"/sys/devices/system/cpu/cpu[1]/online; lscpu | grep list:; {NPROC_2}",
                        timeout=ONLINE_WAIT)
    assert rc == 0, out
    before, after = out.split("\n1\n")        # tee echoes the "1" it wrote
    assert re.fullmatch(r"On-line CPU\(s\) list:\s+0\nOff-line CPU\(s\) list:\s+1", before), out
    assert re.fullmatch(r"On-line CPU\(s\) list:\s+0[,-]1\n2", after), out
    assert vcpu_states(guest) == ["present"] * 2


def test_seed_flow_remove_cpus_the_guest_offlines_them_and_429_meanwhile(guest):
    # The guest's eject is held by pausing the VM: the removal is asked for while no vCPU
    # runs, so the next resize finds it pending whatever the host's speed.
    with ApiClient(guest.api_path) as client:
        assert client.put("vm.pause") == (204, b"")
        try:
            assert curl_resize(guest, 1) == (204, "")
            status, body = curl_resize(guest, 2)
            assert vcpu_states(guest) == ["present", "removing"]
        finally:
            assert client.put("vm.resume") == (204, b"")
    assert status == 429, body
    messages = json.loads(body)
    assert isinstance(messages, list) and any("pending" in m for m in messages), messages
    assert online_after_removal(guest, "0") == "0"
    wait_vcpus(guest, 1)
    assert vcpu_states(guest) == ["present", "ejected"]
    rc, out = guest.run("nproc")
    assert (rc, out) == (0, "1")


def test_add_again_reuses_the_ids_and_remove_under_cpu_bound_load(guest):
    r = remote(guest, "resize", "--cpus", "2", f"--wait={GUEST_WAIT}")
    assert r.returncode == 0, r.stderr
    assert vcpu_states(guest) == ["present"] * 2
    rc, out = guest.run(f"{in_sysfs(1)}echo 1 | tee /sys/devices/system/cpu/cpu[1]/online "
                        f">/dev/null; for i in 1 2; do (while :; do :; done) & done; {NPROC_2}",
                        timeout=ONLINE_WAIT)
    assert (rc, out.splitlines()[-1]) == (0, "2"), out
    r = remote(guest, "resize", "--cpus", "1", f"--wait={GUEST_WAIT}")
    assert r.returncode == 0, r.stderr
    assert vcpu_states(guest) == ["present", "ejected"]
    rc, out = guest.run("cat /sys/devices/system/cpu/online; kill $(jobs -p); wait; nproc",
                        timeout=GUEST_WAIT)
    lines = [ln for ln in out.splitlines() if not ln.startswith("[")]   # not the jobs' notices
    assert rc == 0 and lines[0] == "0" and lines[-1] == "1", out


def test_invalid_counts_are_400_with_a_message(guest):
    before = vm_info(guest)["config"]["cpus"]["boot_vcpus"]
    for bad in (0, 3):
        status, body = curl_resize(guest, bad)
        assert status == 400, body
        messages = json.loads(body)
        assert isinstance(messages, list) and all(isinstance(m, str) for m in messages)
        assert "desired_vcpus" in " ".join(messages), messages
    assert vm_info(guest)["config"]["cpus"]["boot_vcpus"] == before


def test_last_requested_count_survives_a_guest_reboot(guest):
    r = remote(guest, "resize", "--cpus", "2", f"--wait={GUEST_WAIT}")
    assert r.returncode == 0, r.stderr
    start = len(guest.console.buf)
    guest.console.send("reboot -f\n")
    guest.wait_ready(start=start)
    rc, out = guest.run("nproc; cat /sys/devices/system/cpu/present")
    assert (rc, out) == (0, "2\n0-1")
    info = vm_info(guest)
    assert info["config"]["cpus"]["boot_vcpus"] == 2
    assert [cpu["state"] for cpu in info["cpus"]] == ["present", "present"]


def test_last_requested_count_survives_vm_reboot(guest):
    r = remote(guest, "resize", "--cpus", "1", f"--wait={GUEST_WAIT}")
    assert r.returncode == 0, r.stderr
    start = len(guest.console.buf)
    with ApiClient(guest.api_path) as client:
        status, body = client.put("vm.reboot")
    assert status == 204, body
    guest.wait_ready(start=start)
    rc, out = guest.run("nproc; cat /sys/devices/system/cpu/present")
    assert (rc, out) == (0, "1\n0")
    info = vm_info(guest)
    assert info["config"]["cpus"]["boot_vcpus"] == 1
    assert [cpu["state"] for cpu in info["cpus"]] == ["present", "absent"]
