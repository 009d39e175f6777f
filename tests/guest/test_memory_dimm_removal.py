"""Live ACPI DIMM removal in a real guest (beyond the reference): a reduction ejects the newest
DIMMs when the guest can offline them, and keeps them, reported in vm.info, when it cannot.

One guest (256 MiB boot RAM, a 1 GiB window, hot plugged memory onlined movable) is shared
by the module; the tests run in order: two 128 MiB DIMMs plugged; a reduction the guest
refuses (ACPI memory eject switched off in its sysfs: _OST reports "not supported"); the
same reduction accepted (dimm1 ejected, its memslot and memfd gone).
"""

import os
import time

import pytest

from pych.api.client import ApiClient

from tests.support.guest import mem_total_kib, vm_info

MiB = 1 << 20
KIB_PER_MIB = 1024
EJECT_SWITCH = "/sys/firmware/acpi/hotplug/memory/enabled"


@pytest.fixture(scope="module")
def guest(guest_factory):
    g = guest_factory(memory="size=256M,hotplug_size=1G",
                      cmdline_extra="memhp_default_state=online_movable")
    g.base_kib = mem_total_kib(g)
    return g


def resize(guest, desired: int) -> None:
    status, body = ApiClient(guest.api_path).put("vm.resize", {"desired_ram": desired})
    assert status == 204, body


def dimm_states(guest) -> list[tuple[str, str]]:
    return [(d["id"], d["state"]) for d in vm_info(guest)["memory_hotplug"]["dimms"]]


def memfd_refs(guest, name: str) -> int:
    """How often pych holds the memfd of RAM region ``name``: as an open fd and as a mapping."""
    pid, tag = guest.proc.pid, f"/memfd:pych-{name} "       # "/memfd:pych-dimm1 (deleted)"
    links = []
    for fd in os.listdir(f"/proc/{pid}/fd"):
        try:
            links.append(os.readlink(f"/proc/{pid}/fd/{fd}"))
        except FileNotFoundError:
            pass                                 # closed while we looked
    with open(f"/proc/{pid}/maps") as maps:
        mapped = maps.read()
    return sum(tag in link for link in links) + mapped.count(tag)


def wait_for(probe, expected, timeout: float = 300, interval: float = 2):
    """Poll ``probe()`` until it returns ``expected`` (never fails on speed alone); returns
    its last value."""
    deadline = time.monotonic() + timeout
    while (value := probe()) != expected and time.monotonic() < deadline:
        time.sleep(interval)
    return value


def test_two_dimms_are_plugged_movable(guest):
    for desired, added in ((384 * MiB, 128), (512 * MiB, 256)):
        resize(guest, desired)
        expected = guest.base_kib + added * KIB_PER_MIB
        assert wait_for(lambda: mem_total_kib(guest), expected) == expected
    rc, out = guest.run("cat /sys/devices/system/memory/memory33/valid_zones")
    assert (rc, out) == (0, "Movable"), out
    assert wait_for(lambda: dimm_states(guest), [("dimm0", "acknowledged"),
                                                 ("dimm1", "acknowledged")]) == [
        ("dimm0", "acknowledged"), ("dimm1", "acknowledged")]


def test_a_reduction_the_guest_refuses_is_kept_for_the_next_boot(guest):
    rc, out = guest.run(f"echo 0 > {EJECT_SWITCH}")
    assert rc == 0, out
    resize(guest, 384 * MiB)
    kept = wait_for(lambda: dimm_states(guest)[-1], ("dimm1", "kept"))
    assert kept == ("dimm1", "kept")
    info = vm_info(guest)
    assert info["memory_hotplug"]["dimms"][-1]["ost_status"] == 0x80    # eject not supported
    assert info["memory_actual_size"] == 512 * MiB
    assert info["config"]["memory"]["size"] == 384 * MiB
    assert mem_total_kib(guest) == guest.base_kib + 256 * KIB_PER_MIB


def test_a_reduction_the_guest_accepts_ejects_the_newest_dimm(guest):
    rc, out = guest.run(f"echo 1 > {EJECT_SWITCH}")
    assert rc == 0, out
    memslots = vm_info(guest)["memslots"]
    assert memfd_refs(guest, "dimm1") > 0
    resize(guest, 384 * MiB)                     # asks again for dimm1
    expected = guest.base_kib + 128 * KIB_PER_MIB
    assert wait_for(lambda: mem_total_kib(guest), expected) == expected
    assert wait_for(lambda: dimm_states(guest), [("dimm0", "acknowledged")]) == [
        ("dimm0", "acknowledged")]
    assert vm_info(guest)["memory_actual_size"] == 384 * MiB
    # the DIMM's memslot is unregistered and its memfd closed and unmapped
    assert vm_info(guest)["memslots"] == memslots - 1
    assert memfd_refs(guest, "dimm1") == 0
    rc, out = guest.run("ls /sys/devices/system/memory/ | grep -c memory33")
    assert out == "0", out                       # the block is gone from the guest
    resize(guest, 512 * MiB)                     # and the space can be plugged again
    expected = guest.base_kib + 256 * KIB_PER_MIB
    assert wait_for(lambda: mem_total_kib(guest), expected) == expected
