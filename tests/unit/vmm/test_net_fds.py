"""Tap fds handed to pych: ``--net fd=[N]`` and ``vm.add-net`` with the fd passed by
SCM_RIGHTS (``pych-remote add-net fd=[N]``, Kata Containers' Cloud Hypervisor driver).

Facts from the reference this follows: the fds received with ``vm.add-net`` replace the
``fds`` of the NetConfig (numbers in the JSON mean nothing); one fd per queue pair; the fd
must be a tap (``TUNGETIFF``); such a tap is not created or configured (no ip/mask), the
MAC still applies; the device works on a duplicate, so a reboot re-creates it from the
fd the configuration keeps; ``remove-device`` and ``vm.delete`` close that fd.

Real taps are made in a private network namespace (a thread that unshared it, as in
test_tap.py); the VM is a DeviceManager on fake KVM objects (tests.support.machines),
so no KVM is needed. Needs root and /dev/net/tun, as pych itself does for taps.
"""

from __future__ import annotations

import fcntl
import gc
import json
import os
import time
import re
import shutil
import struct
import tempfile
from pathlib import Path

import pytest
from pyroute2 import IPRoute

from pych.api import ApiServer
from pych.api.client import ApiClient
from pych.api.errors import status_of
from pych.cli.remote import main as remote_main
from pych.config import ConfigError, NetConfig, VmConfig
from pych.devices.net.tap import (IFF_NO_PI, IFF_TAP, IFF_TUN, IFF_VNET_HDR, TUNSETIFF, Tap,
                                  TapError, tap_fd_name)
from pych.devices.virtio.net import VirtioNet
from pych.errors import VmmError
from pych.vmm import Vmm

from tests.support.fakes import RecordingEvents
from tests.support.host import fd_is_open
from tests.support.machines import BootedVm, DeviceManagerMachine, run_as_booted, vm_config
from tests.unit.devices.net.test_tap import in_new_netns, links

pytestmark = pytest.mark.skipif(
    os.geteuid() != 0 or not os.path.exists("/dev/net/tun"),
    reason="TAP FD TESTS NOT RUN: they need root and /dev/net/tun")

VIRTIO_NET = IFF_TAP | IFF_NO_PI | IFF_VNET_HDR
MAC = "52:54:00:12:34:56"


def open_queue(name: str, flags: int = VIRTIO_NET) -> int:
    """What a manager such as Kata does: open /dev/net/tun and attach it to (creating)
    interface ``name`` with TUNSETIFF; returns the fd."""
    fd = os.open("/dev/net/tun", os.O_RDWR | os.O_CLOEXEC)
    try:
        fcntl.ioctl(fd, TUNSETIFF, struct.pack("16sH22x", name.encode(), flags))
    except BaseException:
        os.close(fd)
        raise
    return fd


def open_files() -> list[tuple[str, str]]:
    """This process's descriptors and what they point to, sockets left out (API
    connections close on the server's own threads), once the garbage is collected: an
    earlier test's objects that nobody closed (a VM and its RAM's memfds) would otherwise
    let go of their fds whenever the collector happens to run, in the middle of a
    comparison (seen under xdist: four ``memfd:pych-ram0`` fds "lost")."""
    gc.collect()
    found = []
    for fd in os.listdir("/proc/self/fd"):
        try:
            target = os.readlink(f"/proc/self/fd/{fd}")
        except OSError:
            continue
        if not target.startswith("socket:"):
            found.append((fd, target))
    return sorted(found)


def files_back_to(baseline: list[tuple[str, str]], within: float = 5.0) -> list:
    """What differs between this process's descriptors and ``baseline`` once they settle:
    ``[]`` if they are ``baseline`` again within ``within`` s (what pych closes on its own
    threads, an API connection's or a device worker's, may close a moment after the answer,
    and the worker's other threads may hold a file briefly), else the fds gained (+) and
    lost (-)."""
    deadline = time.monotonic() + within
    while (now := open_files()) != baseline:
        if time.monotonic() >= deadline:
            return sorted([("+", *f) for f in set(now) - set(baseline)]
                          + [("-", *f) for f in set(baseline) - set(now)])
        time.sleep(0.02)
    return []


def copies(target: str) -> int:
    """How many of this process's fds point to ``target`` (a readlink of /proc/self/fd)."""
    return sum(t == target for _, t in open_files())


def tun_fds() -> int:
    """How many of this process's fds are /dev/net/tun queues."""
    return copies("/dev/net/tun")


def link(name: str) -> dict:
    """(mtu, up) of interface ``name``, from netlink in the caller's namespace."""
    with IPRoute() as ipr:
        msg = ipr.get_links(ifname=name)[0]
    return {"mtu": msg.get_attr("IFLA_MTU"), "up": bool(msg["flags"] & 1)}


# --- the tap ------------------------------------------------------------------------------------
def test_a_tap_from_an_fd_works_on_its_own_duplicate():
    def scenario():
        fd = open_queue("pychfd0")
        tap = Tap.from_fd(fd)
        seen = {"name": tap.name, "dup": tap.fd != fd,
                "same_file": os.fstat(tap.fd).st_ino == os.fstat(fd).st_ino,
                "nonblocking": bool(fcntl.fcntl(fd, fcntl.F_GETFL) & os.O_NONBLOCK),
                "cloexec": not os.get_inheritable(tap.fd)}
        tap.close()
        seen["after_close"] = (fd_is_open(fd), links())
        os.close(fd)
        seen["after_last_fd"] = links()
        return seen

    seen = in_new_netns(scenario)
    assert seen["name"] == "pychfd0" and seen["dup"] and seen["same_file"]
    assert seen["nonblocking"] and seen["cloexec"]
    assert seen["after_close"] == (True, ["lo", "pychfd0"])       # the caller's fd stays
    assert seen["after_last_fd"] == ["lo"]                          # a non-persistent tap


@pytest.mark.parametrize(("kind", "message"), [
    ("pipe", r"fd \d+ is not a tap \(TUNGETIFF: Inappropriate ioctl for device\)"),
    ("closed", r"fd \d+ is not an open file descriptor"),
    ("unattached", r"fd \d+ is a /dev/net/tun fd not attached to any interface"),
    ("tun", r"fd \d+ is a queue of pychfd1, which is a tun \(IFF_TUN\), not a tap"),
    ("no-vnet-hdr", r"fd \d+: tap pychfd1 was opened without IFF_VNET_HDR \(virtio-net needs"),
])
def test_an_fd_that_cannot_back_virtio_net_is_refused_with_the_reason(kind, message):
    def scenario():
        if kind == "pipe":
            fd, other = os.pipe()
        elif kind == "closed":
            fd, other = os.pipe()
            os.close(fd)
        elif kind == "unattached":
            fd, other = os.open("/dev/net/tun", os.O_RDWR | os.O_CLOEXEC), None
        else:
            flags = {"tun": IFF_TUN | IFF_NO_PI | IFF_VNET_HDR,
                     "no-vnet-hdr": IFF_TAP | IFF_NO_PI}[kind]
            fd, other = open_queue("pychfd1", flags), None
        # What a refusal could leak is a duplicate of fd: count the descriptors on fd's
        # file (for the closed fd, on its pipe's other end), not the whole process's table,
        # which the worker's other threads may change meanwhile.
        target = os.readlink(f"/proc/self/fd/{fd if kind != 'closed' else other}")
        before = copies(target)
        try:
            with pytest.raises(TapError) as e:
                Tap.from_fd(fd)
            leaked = copies(target) != before or (kind == "closed" and fd_is_open(fd))
            return str(e.value), not leaked
        finally:
            for f in (fd, other):
                if f is not None and fd_is_open(f):
                    os.close(f)

    text, nothing_leaked = in_new_netns(scenario)
    assert re.fullmatch(message + ".*", text), text
    assert nothing_leaked


# --- the device manager: boot, reboot, configuration --------------------------------------------
def test_a_boot_net_on_an_fd_takes_the_mac_and_mtu_not_the_host_side_and_survives_reboots():
    """``--net fd=[N],mac=...,mtu=...,ip=...``: the tap is used as it is (ip ignored, link
    state untouched) but for the MTU, as the reference's from_tap_fds; each boot (a reboot
    rebuilds the devices from the configuration) works on a fresh duplicate of N, which
    stays open until its owner closes it."""
    def scenario():
        fd = open_queue("pychfd2")
        net = NetConfig.parse(f"fd=[{fd}],mac={MAC},mtu=1400,ip=10.1.1.1,mask=255.255.255.0")
        config = vm_config(net=[net.model_dump()])
        boots = []
        for _ in range(2):                                  # boot, then a reboot
            m = DeviceManagerMachine(config)
            device = m.dm.devices["_net0"].device
            boots.append((type(device), device.tap.name, device.tap.fd != fd, device.mac.hex(),
                          link("pychfd2")))
            m.close()
            boots.append((fd_is_open(fd), links()))
        with IPRoute() as ipr:
            addresses = ipr.get_addr(index=ipr.link_lookup(ifname="pychfd2")[0])
        os.close(fd)
        return config.net[0], boots, len(addresses), links()

    net, boots, addresses, after = in_new_netns(scenario)
    assert net.id == "_net0" and net.mac == MAC
    made = (VirtioNet, "pychfd2", True, MAC.replace(":", ""), {"mtu": 1400, "up": False})
    assert boots == [made, (True, ["lo", "pychfd2"])] * 2
    assert addresses == 0                                   # ip= is not applied to an fd tap
    assert after == ["lo"]


def test_tap_and_fd_together_are_refused_and_so_are_fd_counts_not_matching_queue_pairs():
    with pytest.raises(ConfigError, match="give tap= or fd=, not both"):
        vm_config(net=[{"tap": "t0", "fds": [5]}]).validate()
    with pytest.raises(ConfigError, match=r"does not match the number of FDs \(4\)"):
        vm_config(net=[{"fds": [5, 6]}]).validate()


# --- the VMM over the real HTTP server ----------------------------------------------------------
class Served:
    """A Vmm with a created VM (optionally 'booted' on fake KVM objects) behind the real
    API server, all on the caller's thread (so in its network namespace)."""

    def __init__(self, booted: bool, **config) -> None:
        self.dir = Path(tempfile.mkdtemp(prefix="pych-netfd-", dir="/tmp"))
        self.socket = str(self.dir / "api.sock")
        self.vmm = Vmm(event_monitor=RecordingEvents())
        self.vmm.vm_create(vm_config(**config))
        self.machine = None
        if booted:
            self.machine = DeviceManagerMachine(self.vmm.config)
            run_as_booted(self.vmm, BootedVm(machine=self.machine, memory_actual_size=256 << 20))
        self.server = ApiServer(lambda fn: fn(self.vmm), path=self.socket)
        self.server.start()

    def put(self, endpoint: str, body, fds=()) -> tuple[int, object]:
        with ApiClient(self.socket, timeout=10) as client:
            status, text = client.put(endpoint, body, fds=fds)
        return status, json.loads(text) if text else None

    def info(self) -> dict:
        with ApiClient(self.socket, timeout=10) as client:
            status, text = client.request("GET", "vm.info")
        assert status == 200
        return json.loads(text)

    def close(self) -> None:
        self.server.close()
        self.vmm.close()
        shutil.rmtree(self.dir, ignore_errors=True)


def test_hot_add_with_a_tap_fd_then_remove_keeps_nothing(capsys):
    """``pych-remote add-net fd=[N],mac=...``: 200 with the id and BDF; the configuration
    keeps pych's copy of the fd (vm.info shows its number, as the reference's); the device
    runs on a duplicate. remove-device closes the received fd at once, the guest's eject
    the duplicate: the tap then goes with the sender's own fd, and pych's fds are back to
    where they were."""
    def scenario():
        served = Served(booted=True)
        try:
            baseline = open_files()
            fd = open_queue("pychfd3")
            code = remote_main(["--api-socket", served.socket, "add-net",
                                f"fd=[{fd}],mac={MAC}"])
            out = capsys.readouterr()
            net = served.info()["config"]["net"][0]
            kept = net["fds"][0]
            device = served.machine.dm.devices["_net0"].device
            added = {"code": code, "out": out.out, "net": net, "kept_is_tap": tap_fd_name(kept),
                     "device": (device.tap.name, device.tap.fd not in (fd, kept))}
            os.close(fd)                                   # the sender is done with it
            added["links"] = links()

            status, body = served.put("vm.remove-device", {"id": "_net0"})
            removed = {"status": status, "kept_open": fd_is_open(kept), "links": links(),
                       "config": served.vmm.config.net}
            served.machine.eject(2)                        # the guest's _EJ0
            # the device's worker lets go of its fds as it ends, on its own thread: wait
            # (bounded) for that rather than race it
            deadline = time.monotonic() + 10
            while links() != ["lo"] and time.monotonic() < deadline:
                time.sleep(0.02)
            removed["after_eject"] = (links(), files_back_to(baseline, within=10))
            return added, removed
        finally:
            served.close()

    added, removed = in_new_netns(scenario)
    assert added["code"] == 0, added
    assert json.loads(added["out"]) == {"id": "_net0", "bdf": "0000:00:02.0"}
    assert added["net"]["mac"] == MAC and added["net"]["id"] == "_net0"
    assert "tap" not in added["net"] and "ip" not in added["net"]
    assert added["kept_is_tap"] == "pychfd3" and added["device"] == ("pychfd3", True)
    assert added["links"] == ["lo", "pychfd3"]             # pych holds it now
    assert removed["status"] == 204 and removed["config"] is None
    assert not removed["kept_open"]                         # closed at remove-device time
    assert removed["links"] == ["lo", "pychfd3"]            # the device's copy until eject
    assert removed["after_eject"] == (["lo"], [])


def test_a_failed_add_closes_the_received_fds_at_once():
    """Each refusal is a clear 4xx/5xx, the configuration is unchanged and pych keeps no
    copy of any fd it was sent (the tap goes as soon as the sender closes its own)."""
    def tap_fds(count: int) -> list[int]:
        first = open_queue("pychfd4")
        return [first, *(os.dup(first) for _ in range(count - 1))]

    def scenario():
        served = Served(booted=True)
        r, w = os.pipe()
        outcomes = []
        try:
            baseline = open_files()
            attempts = [({}, lambda: [r]),                           # not a tap
                        ({"tap": "other"}, lambda: tap_fds(1)),      # a name and an fd
                        ({}, lambda: tap_fds(2)),                    # 2 fds, 1 queue pair
                        ({"num_queues": 4}, lambda: tap_fds(2)),     # 2 pairs, 1 vCPU
                        ({"pci_device_id": 1}, lambda: tap_fds(1))]  # the rng's slot
            for body, make in attempts:
                fds = make()
                status, answer = served.put("vm.add-net", body, fds=fds)
                for fd in fds:
                    if fd != r:
                        os.close(fd)                                 # the sender is done
                outcomes.append((status, answer[-1], links(), files_back_to(baseline)))
            return outcomes, served.vmm.config.net, served.machine.scan()
        finally:
            os.close(r)
            os.close(w)
            served.close()

    outcomes, nets, scan = in_new_netns(scenario)
    assert nets is None and scan == (0, 0)                 # nothing recorded or announced
    expected = [(400, r"fd \d+ is not a tap"), (400, "give tap= or fd=, not both"),
                (400, r"does not match the number of FDs \(4\)"),
                (400, r"Queue count \(4\) must not exceed boot vCPUs \(1\)"),
                (500, "already used: 1")]
    assert len(outcomes) == len(expected)
    for (status, message, after, nothing_kept), (want, pattern) in zip(outcomes, expected):
        assert status == want and re.search(pattern, message), (status, message)
        assert after == ["lo"] and nothing_kept == [], (message, after, nothing_kept)


def test_cold_add_keeps_the_fd_until_removed_and_vm_delete_closes_the_rest():
    """Before boot, vm.add-net with an fd only records it (204, checked to be a tap now);
    vm.info shows it. remove-device closes it; vm.delete closes those still configured.
    Fd numbers in JSON without SCM_RIGHTS are dropped, in vm.add-net as in vm.create (the
    net then gets a tap of its own at boot)."""
    def scenario():
        served = Served(booted=False)
        try:
            baseline = open_files()
            first, second = open_queue("pychfd5"), open_queue("pychfd6")
            seen = {"adds": [served.put("vm.add-net", {"id": f"n{i}", "fds": [99]}, fds=[fd])
                             for i, fd in enumerate((first, second))]}
            os.close(first)
            os.close(second)
            nets = served.info()["config"]["net"]
            seen["nets"] = [(n["id"], len(n["fds"])) for n in nets]
            kept = [n["fds"][0] for n in nets]
            seen["remove"] = served.put("vm.remove-device", {"id": "n0"})
            seen["after_remove"] = (fd_is_open(kept[0]), fd_is_open(kept[1]), links())
            seen["json_only"] = served.put("vm.add-net", {"id": "n2", "fds": [7]})
            seen["json_only_fds"] = served.vmm.config.net[-1].fds
            seen["delete"] = served.put("vm.delete", None)
            seen["after_delete"] = (fd_is_open(kept[1]), links(), files_back_to(baseline))
            return seen
        finally:
            served.close()

    seen = in_new_netns(scenario)
    assert seen["adds"] == [(204, None), (204, None)]
    assert seen["nets"] == [("n0", 1), ("n1", 1)]
    assert seen["remove"] == (204, None)
    assert seen["after_remove"] == (False, True, ["lo", "pychfd6"])
    assert seen["json_only"] == (204, None) and seen["json_only_fds"] is None
    assert seen["delete"] == (204, None)
    assert seen["after_delete"] == (False, ["lo"], [])


def test_shutdown_keeps_the_fd_for_the_next_boot_and_delete_closes_it():
    """vm.shutdown keeps the configuration, so the fd stays for a later vm.boot (which
    duplicates it again); only the device's duplicate goes. vm.delete closes it."""
    def scenario():
        served = Served(booted=True)
        try:
            fd = open_queue("pychfd7")
            seen = {"add": served.put("vm.add-net", {}, fds=[fd])}
            os.close(fd)
            kept = served.vmm.config.net[0].fds[0]
            seen["shutdown"] = served.put("vm.shutdown", None)
            seen["after_shutdown"] = (fd_is_open(kept), tap_fd_name(kept), links(), tun_fds())
            seen["delete"] = served.put("vm.delete", None)
            seen["after_delete"] = (fd_is_open(kept), links(), tun_fds())
            return seen
        finally:
            served.close()

    seen = in_new_netns(scenario)
    assert seen["add"] == (200, {"id": "_net0", "bdf": "0000:00:02.0"})
    assert seen["shutdown"] == (204, None)
    assert seen["after_shutdown"] == (True, "pychfd7", ["lo", "pychfd7"], 1)   # not the dup
    assert seen["delete"] == (204, None)
    assert seen["after_delete"] == (False, ["lo"], 0)


def test_vm_create_drops_fd_numbers_that_came_in_json():
    vmm = Vmm(event_monitor=RecordingEvents())
    config = VmConfig.model_validate_json(json.dumps(
        {"payload": {"kernel": __file__}, "net": [{"fds": [3], "mac": MAC}]}))
    assert config.net[0].fds == [-1]
    vmm.vm_create(config)
    assert vmm.config.net[0].fds is None


def test_no_vm_is_404_and_vmm_teardown_closes_configured_fds():
    def scenario():
        vmm = Vmm(event_monitor=RecordingEvents())
        fd = open_queue("pychfd8")
        with pytest.raises(VmmError) as e:
            vmm.vm_add_net(NetConfig(), [os.dup(fd)])
        seen = {"no_vm": status_of(e.value), "tun_fds": tun_fds()}
        vmm.vm_create(vm_config())
        vmm.vm_add_net(NetConfig(), [os.dup(fd)])          # cold: recorded
        os.close(fd)
        seen["recorded"] = (tun_fds(), links())
        vmm.close()                                         # vmm.shutdown, process exit
        seen["closed"] = (tun_fds(), links())
        return seen

    seen = in_new_netns(scenario)
    assert seen == {"no_vm": 404, "tun_fds": 1, "recorded": (1, ["lo", "pychfd8"]),
                    "closed": (0, ["lo"])}
