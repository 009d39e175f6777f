"""Options that used to be refused, honoured, on one booted guest (issue 13, item 1).

One pych runs the test guest with: vCPU affinity (``--cpus affinity=``), a disk limited to
1 MiB/s, two disks sharing a 1 MiB/s rate limit group, a disk opened with O_DIRECT, a NIC
limited to 256 KiB/s on a tap (in a network namespace), SMBIOS strings (``--platform``) and
transparent huge pages on guest RAM (``thp=on``, the default).  Each test reads the effect
where it shows: the guest's ``dd`` time and ``/sys/class/dmi``, the host's
``/proc/<pid>/task/*/status``, ``smaps`` and ``fdinfo``.
"""

from __future__ import annotations

import json
import os
import re
import socket
import time
from pathlib import Path

import pytest

from pych.api.client import ApiClient

from tests.support.guest import PychGuest
from tests.support.netns import in_netns

NETNS = f"pych-honour-{os.getpid()}"
HOST_IP, GUEST_IP = "192.168.248.1", "192.168.248.2"
MiB = 1 << 20
LIMIT = 1 * MiB                          # bytes per second, refilled every 1000 ms
BUCKET = f"bw_size={LIMIT},bw_refill_time=1000"
# The NIC's limit is a quarter of that: the guest's network stack is slow here (emulated), so
# 1 MiB through 256 KiB/s shows the limit for a quarter of 4 MiB's guest work.
NET_LIMIT = LIMIT // 4
NET_BUCKET = f"bw_size={NET_LIMIT},bw_refill_time=1000"
SERIAL = "PYCH-SERIAL-0042"
UUID = "4a3f8d6e-94d1-4c6b-8d2e-6f1f2a0b9c11"
OEM = ["pych-oem-one", "key=value"]
O_DIRECT_OCTAL = 0o40000


@pytest.fixture(scope="module")
def guest(netns, tmp_path_factory):
    d = tmp_path_factory.mktemp("honour")       # on this host's ext4: O_DIRECT works
    images = {}
    for name in ("limited", "group-a", "group-b", "direct"):
        images[name] = d / f"{name}.img"
        with open(images[name], "wb") as f:
            f.write(os.urandom(8 * MiB))
    g = PychGuest(d / "vm", cpus="boot=2,max=3,affinity=[0@[1],2@[0]]", memory="size=256M",
                  extra_args=[
                      "--rate-limit-group", f"id=group0,{BUCKET}",
                      "--disk", f"path={images['limited']},{BUCKET}",
                      f"path={images['group-a']},rate_limit_group=group0",
                      f"path={images['group-b']},rate_limit_group=group0",
                      f"path={images['direct']},direct=on",
                      "--net", f"tap=,ip={HOST_IP},mask=255.255.255.0,{NET_BUCKET}",
                      "--platform", f"serial_number={SERIAL},uuid={UUID},"
                                    f"oem_strings=[{','.join(OEM)}]",
                      "--pvpanic", "--event-monitor", f"path={d / 'events.jsonl'}"])
    g.args = ["ip", "netns", "exec", netns, *g.args]      # `ip netns exec` execs pych
    g.images = images
    g.events = d / "events.jsonl"
    try:
        g.start()
        g.wait_ready()
        yield g
    finally:
        g.stop()


def api(guest, method, path, body=None):
    client = ApiClient(guest.api_path)
    status, answer = client.put(path, body) if method == "PUT" else client.get(path)
    assert status in (200, 204), answer
    return json.loads(answer) if answer else None


def vcpu_threads(pid: int) -> dict[str, str]:
    """vCPU thread name -> its Cpus_allowed_list, as Kata would find them."""
    found = {}
    for task in Path(f"/proc/{pid}/task").iterdir():
        try:
            name = (task / "comm").read_text().strip()
            status = (task / "status").read_text()
        except OSError:
            continue
        if re.fullmatch(r"vcpu\d+", name):
            found[name] = re.search(r"^Cpus_allowed_list:\s*(\S+)", status, re.M)[1]
    return found


def timed_in_guest(guest, command: str, timeout: float = 120) -> float:
    """Seconds ``command`` took in the guest (its /proc/uptime before and after)."""
    rc, out = guest.run(f"cat /proc/uptime; {command} && echo command-ok; cat /proc/uptime",
                        timeout=timeout)
    assert rc == 0 and "command-ok" in out, out
    times = [float(line.split()[0]) for line in out.splitlines()
             if re.fullmatch(r"\d+\.\d+ \d+\.\d+", line.strip())]
    return times[-1] - times[0]


# --- vCPU affinity --------------------------------------------------------------------------
def test_vcpu_threads_are_pinned_at_boot_and_at_hot_plug(guest):
    pid = guest.proc.pid
    allowed = ",".join(map(str, sorted(os.sched_getaffinity(0))))
    everything = "0-1" if allowed == "0,1" else allowed
    assert vcpu_threads(pid) == {"vcpu0": "1", "vcpu1": everything}
    api(guest, "PUT", "vm.resize", {"desired_vcpus": 3})
    expected = {"vcpu0": "1", "vcpu1": everything, "vcpu2": "0"}
    deadline = time.monotonic() + 120          # the thread pins itself as it starts
    while (threads := vcpu_threads(pid)) != expected and time.monotonic() < deadline:
        time.sleep(1)
    assert threads == expected


# --- rate limiters ----------------------------------------------------------------------------
def test_a_1_mib_per_s_disk_makes_a_4_mib_direct_read_take_3_s(guest):
    limited = timed_in_guest(guest, "dd if=/dev/vda of=/dev/null bs=1M count=4 iflag=direct")
    control = timed_in_guest(guest, "dd if=/dev/vdd of=/dev/null bs=1M count=4 iflag=direct")
    print(f"4 MiB read: limited {limited:.2f} s, unlimited (O_DIRECT disk) {control:.2f} s")
    # a full bucket (1 MiB) passes at once; the other 3 MiB arrive at 1 MiB/s
    assert limited >= 3.0, limited
    assert control < limited, (control, limited)
    counters = api(guest, "GET", "vm.counters")
    assert counters["_disk0"]["read_bytes"] >= 4 * MiB, counters


def test_a_rate_limit_group_is_shared_by_its_disks(guest):
    both = timed_in_guest(
        guest, "dd if=/dev/vdb of=/dev/null bs=1M count=2 iflag=direct 2>/dev/null & "
               "dd if=/dev/vdc of=/dev/null bs=1M count=2 iflag=direct 2>/dev/null; wait")
    print(f"2 x 2 MiB read through one 1 MiB/s group: {both:.2f} s")
    assert both >= 3.0, both                # 4 MiB through one bucket, whatever the split


def test_a_256_kib_per_s_nic_makes_a_1_mib_transfer_take_3_s(guest):
    def listen():
        s = socket.socket()
        s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        s.bind((HOST_IP, 5001))
        s.listen(1)
        s.settimeout(180)
        return s

    def receive(listener):
        with listener:
            conn, _ = listener.accept()
        size, first, last = 0, None, None
        with conn:
            conn.settimeout(120)
            while chunk := conn.recv(1 << 16):
                now = time.monotonic()
                first = first or now
                last = now
                size += len(chunk)
        return size, last - first

    listener = in_netns(NETNS, listen)()
    wait = in_netns(NETNS, lambda: receive(listener))
    rc, out = guest.run(f"ip addr add {GUEST_IP}/24 dev eth0 && ip link set eth0 up && "
                        f"ping -c 1 -W 10 {HOST_IP} >/dev/null && echo ping-ok && "
                        f"dd if=/dev/zero bs=64k count=16 2>/dev/null | nc {HOST_IP} 5001 && "
                        "echo sent", timeout=300)
    assert rc == 0 and "sent" in out, out
    size, took = wait()
    print(guest.run("cat /proc/net/dev")[1])
    print(f"1 MiB guest -> host through a 256 KiB/s NIC: {took:.2f} s")
    assert size == 1 * MiB
    # a full bucket (256 KiB) passes at once; the other 768 KiB arrive at 256 KiB/s
    assert took >= 2.5, took


# --- O_DIRECT ---------------------------------------------------------------------------------
def test_the_direct_disk_is_open_with_o_direct_and_the_others_are_not(guest):
    pid = guest.proc.pid
    flags = {}
    for fd in os.listdir(f"/proc/{pid}/fd"):
        try:
            target = os.readlink(f"/proc/{pid}/fd/{fd}")
            info = Path(f"/proc/{pid}/fdinfo/{fd}").read_text()
        except OSError:
            continue
        if target in {str(p) for p in guest.images.values()}:
            flags[Path(target).stem] = int(re.search(r"^flags:\s*(\d+)", info, re.M)[1], 8)
    assert set(flags) == set(guest.images), flags
    assert flags["direct"] & O_DIRECT_OCTAL
    assert not any(flags[name] & O_DIRECT_OCTAL for name in flags if name != "direct"), flags
    rc, out = guest.run("dd if=/dev/urandom of=/tmp/w bs=4k count=16 2>/dev/null && "
                        "dd if=/tmp/w of=/dev/vdd bs=4k seek=3 conv=fsync 2>/dev/null && "
                        "md5sum /tmp/w")
    assert rc == 0, out
    written = guest.images["direct"].read_bytes()[3 * 4096:19 * 4096]
    import hashlib
    assert hashlib.md5(written).hexdigest() == out.split()[0]


# --- SMBIOS -----------------------------------------------------------------------------------
def test_smbios_strings_reach_the_guest(guest):
    rc, out = guest.run("cd /sys/class/dmi/id && cat product_serial product_uuid sys_vendor "
                        "product_name bios_vendor; "
                        "tail -c +6 /sys/firmware/dmi/entries/11-0/raw | tr '\\0' '\\n'")
    assert rc == 0, out
    lines = [line for line in out.splitlines() if line]
    assert lines[:5] == [SERIAL, UUID, "Cloud Hypervisor", "cloud-hypervisor",
                         "cloud-hypervisor"], out
    assert lines[5:] == OEM, out


# --- transparent huge pages -------------------------------------------------------------------
def test_guest_ram_carries_the_huge_page_advice(guest):
    smaps = Path(f"/proc/{guest.proc.pid}/smaps").read_text()
    ram = re.findall(r"^\S+ \S+ \S+ \S+ \S+ +/memfd:pych-mem0.*?^VmFlags:(.*?)$", smaps,
                     re.M | re.S)
    assert ram, "no mapping of the guest's RAM memfd"
    assert all("hg" in flags.split() for flags in ram), ram


# --- pvpanic (last: the guest panics, and reboots at once with panic=-1) ----------------------
def test_a_guest_panic_becomes_an_event_and_a_log_line(guest):
    rc, out = guest.run("lspci -n | grep -c '1b36:0011'")
    assert rc == 0 and out.strip() == "1", out
    guest.console.send("echo c > /proc/sysrq-trigger\n")
    deadline = time.monotonic() + 120
    while True:
        events = [json.loads(line) for line in guest.events.read_text().splitlines()]
        if any(e["source"] == "guest" and e["event"] == "panic" for e in events):
            break
        assert time.monotonic() < deadline, events
        time.sleep(1)
    assert "the guest reported a panic through pvpanic" in guest.pych_log()
