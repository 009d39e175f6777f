"""CPU hot plug at the user documentation's own scale (../shared/spec/hotplug.md, "CPU Hot Plug"),
verbatim: a guest started with ``--cpus boot=4,max=8 --api-socket``, the documented curl
request to 8 vCPUs, ``lscpu`` showing CPUs 4-7 offline, ``echo 1 | tee
/sys/devices/system/cpu/cpu[4,5,6,7]/online``, the request down to 2 (the guest offlines six
CPUs by itself, and the eight stay possible).

tests/guest/test_cpu_hotplug.py covers the rest (429 while a removal is pending, removal
under CPU-bound load, re-adding ejected ids, bad counts) and the documentation's "after a
reboot" for both directions (a guest reboot after an addition, ``vm.reboot`` after a
removal) on a cheaper boot=1,max=2 guest: this guest of four to eight vCPUs is the suite's
dearest boot here, so it boots once. The tests run in order on it.
"""

from __future__ import annotations

import re

import pytest

from tests.guest.test_cpu_hotplug import (curl_resize, in_sysfs, vcpu_states, vm_info,
                                         wait_vcpus)

# Up to eight vCPUs share this host's two cores, and guest kernel code is emulated: onlining
# or offlining four CPUs takes tens of seconds idle and minutes when the host is loaded.
HOTPLUG_WAIT = 900


@pytest.fixture(scope="module")
def guest(guest_factory):
    return guest_factory(cpus="boot=4,max=8", memory="size=256M")


def lscpu_lists(text: str) -> dict[str, str]:
    """``lscpu | grep list:`` lines as {"On-line": "0-3", "Off-line": "4-7"}."""
    return dict(re.findall(r"^(On-line|Off-line) CPU\(s\) list:\s+(\S+)$", text, re.M))


def test_resize_to_8_then_the_user_onlines_cpus_4_to_7(guest):
    assert curl_resize(guest, 8) == (204, "")
    assert vm_info(guest)["config"]["cpus"]["boot_vcpus"] == 8
    wait_vcpus(guest, 8, HOTPLUG_WAIT)       # every new vCPU runs and the guest has seen it
    rc, out = guest.run(f"{in_sysfs(4, 5, 6, 7)}lscpu | grep list:; echo 1 | tee "
                        "/sys/devices/system/cpu/cpu[4,5,6,7]/online; lscpu | grep list:",
                        timeout=HOTPLUG_WAIT)
    assert rc == 0, out
    before, after = out.split("\n1\n")      # tee echoes the "1" it wrote
    assert lscpu_lists(before) == {"On-line": "0-3", "Off-line": "4-7"}, out
    assert lscpu_lists(after) == {"On-line": "0-7"}, out
    assert vcpu_states(guest) == ["present"] * 8


def test_resize_to_2_the_guest_offlines_them_by_itself(guest):
    assert curl_resize(guest, 2) == (204, "")
    assert vm_info(guest)["config"]["cpus"]["boot_vcpus"] == 2
    wait_vcpus(guest, 2, HOTPLUG_WAIT)       # the guest ejected vCPUs 2-7
    assert vcpu_states(guest) == ["present"] * 2 + ["ejected"] * 6
    rc, out = guest.run("cat /sys/devices/system/cpu/online /sys/devices/system/cpu/present "
                        "/sys/devices/system/cpu/possible; lscpu | grep list:; nproc")
    assert rc == 0, out
    online, present, possible, *lists, nproc = out.splitlines()
    assert (online, present, possible, nproc) == ("0-1", "0-1", "0-7", "2"), out
    assert lscpu_lists("\n".join(lists))["On-line"] in ("0,1", "0-1"), out
