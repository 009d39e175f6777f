"""The network data plane, checked from inside a real guest (issue 14, items 3 and 4):
multi-queue virtio-net with mergeable receive buffers, and vhost-user-net.

One guest with 2 vCPUs boots with ``--net ...,num_queues=4`` (two queue pairs on an
``IFF_MULTI_QUEUE`` tap pych creates) and a vhost-user-net NIC served by DPDK's
``dpdk-testpmd`` (Debian's ``dpdk-dev``; its vhost PMD, no huge pages), which forwards
between that NIC and a host tap it creates; a second vhost-user NIC is hot-plugged with
``vhost_mode=server`` (pych listens, testpmd's second vhost port connects as a client) and
forwarded to a second host tap. pych and testpmd run in a network namespace the module
creates (and deletes), so every packet stays in it; host-side sockets are opened by
threads that join that namespace.

Both pairs are shown to carry traffic: the guest sends one TCP stream from each vCPU
(``taskset``); Linux's virtio-net maps each vCPU to its own transmit queue (XPS), and the
tap steers a flow's return frames to the queue it last saw the flow on, so each pair's
receive and transmit interrupts (``/proc/interrupts``: ``virtioN-input.K`` /
``output.K``) must rise. The guest's busybox has no ``ethtool``; its queue count is read
from ``/sys/class/net/eth0/queues``.
"""

import hashlib
import json
import os
import re
import shutil
import signal
import socket
import subprocess
import time

import pytest

from pych.api.client import ApiClient

from tests.support.guest import PychGuest
from tests.support.netns import in_netns, tcp_receive_md5

NETNS = f"pych-netdp-{os.getpid()}"
HOST_IP, GUEST_IP = "192.168.250.1", "192.168.250.2"
MiB = 1 << 20
PAYLOAD = 512 * 1024      # several 64 KiB TSO frames; the emulated guest makes each MiB slow
# vhost-user NICs: (MAC, host tap testpmd creates, host address, guest address)
VHOST_BOOT = ("52:54:00:d0:00:01", "dpdktap0", "192.168.251.1", "192.168.251.2")
VHOST_HOTPLUG = ("52:54:00:d0:00:02", "dpdktap1", "192.168.252.1", "192.168.252.2")
TESTPMD = shutil.which("dpdk-testpmd")



def _listen(port: int) -> socket.socket:
    s = socket.socket()
    s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    s.bind((HOST_IP, port))
    s.listen(1)
    s.settimeout(300)
    return s


def _send(data: bytes, port: int, deadline: float) -> float:
    while True:
        try:
            s = socket.create_connection((GUEST_IP, port), timeout=5)
            break
        except OSError:
            assert time.monotonic() < deadline, "the guest never listened"
            time.sleep(1)
    with s:
        s.settimeout(180)
        start = time.monotonic()
        s.sendall(data)
        s.shutdown(socket.SHUT_WR)
        s.recv(1)                              # the guest closes once it has everything
        return time.monotonic() - start


def queue_interrupts(text: str) -> dict[str, int]:
    """``input.0``/``output.1``/... → interrupt count summed over CPUs, from
    /proc/interrupts, for the multi-queue NIC (the virtio device with an ``input.1``; the
    vhost-user NIC has queue names of its own)."""
    counts: dict[str, dict[str, int]] = {}
    for line in text.splitlines():
        m = re.search(r"(virtio\d+)-((?:input|output)\.\d+)\s*$", line)
        if m:
            fields = line.split(":", 1)[1].split()
            counts.setdefault(m.group(1), {})[m.group(2)] = sum(
                int(f) for f in fields if f.isdigit())
    (multi_queue,) = [queues for queues in counts.values() if "input.1" in queues]
    return multi_queue


@pytest.fixture(scope="module")
def testpmd(netns, tmp_path_factory):
    """dpdk-testpmd in the namespace: port 0 a vhost-user server at ``boot.sock`` (pych
    connects at boot), port 1 tap ``dpdktap0``; port 2 a vhost-user client of ``hot.sock``
    (pych listens there once the NIC is hot-plugged), port 3 tap ``dpdktap1``; io
    forwarding 0<->1 and 2<->3. Without huge pages (``--no-huge``), on one forwarding
    lcore, niced: it busy-polls."""
    assert TESTPMD, "dpdk-testpmd is missing: scripts/install-deps.sh installs dpdk-dev"
    d = tmp_path_factory.mktemp("testpmd")
    prefix = f"pych-{os.getpid()}"
    boot_sock, hot_sock = str(d / "boot.sock"), str(d / "hot.sock")
    log = open(d / "testpmd.log", "wb")
    proc = subprocess.Popen(
        ["ip", "netns", "exec", netns, "nice", "-n", "19", TESTPMD, "-l", "0,1", "--no-huge",
         "-m", "256", "--no-pci", "--file-prefix", prefix,
         "--vdev", f"net_vhost0,iface={boot_sock},client=0",
         "--vdev", f"net_tap0,iface={VHOST_BOOT[1]}",
         "--vdev", f"net_vhost1,iface={hot_sock},client=1",
         "--vdev", f"net_tap1,iface={VHOST_HOTPLUG[1]}",
         "--", "--forward-mode=io", "--auto-start", "--stats-period", "0",
         "--total-num-mbufs=16384", "--nb-cores=1"],
        stdin=subprocess.PIPE, stdout=log, stderr=subprocess.STDOUT)
    try:
        deadline = time.monotonic() + 60
        while not os.path.exists(boot_sock):
            assert proc.poll() is None, (d / "testpmd.log").read_text(errors="replace")
            assert time.monotonic() < deadline, "testpmd never listened"
            time.sleep(0.2)
        for _, tap, host_ip, _ in (VHOST_BOOT, VHOST_HOTPLUG):
            subprocess.run(["ip", "netns", "exec", netns, "sh", "-c",
                            f"ip addr add {host_ip}/24 dev {tap} && ip link set {tap} up"],
                           check=True)
        yield {"boot": boot_sock, "hot": hot_sock, "log": d / "testpmd.log", "proc": proc}
    finally:
        proc.send_signal(signal.SIGINT)
        try:
            proc.wait(30)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()
        log.close()
        shutil.rmtree(f"/var/run/dpdk/{prefix}", ignore_errors=True)


@pytest.fixture(scope="module")
def guest(netns, testpmd, tmp_path_factory):
    d = tmp_path_factory.mktemp("netdp")
    g = PychGuest(d / "vm", cpus="boot=2", extra_args=[
        "--net", f"tap=,ip={HOST_IP},mask=255.255.255.0,num_queues=4",
        f"vhost_user=on,socket={testpmd['boot']},mac={VHOST_BOOT[0]}"])
    g.args = ["ip", "netns", "exec", netns, *g.args]
    try:
        g.start()
        g.wait_ready()
        rc, out = g.run(f"ip addr add {GUEST_IP}/24 dev eth0 && ip link set eth0 up && "
                        f"ping -c 2 -W 10 {HOST_IP} >/dev/null && echo ping-ok")
        assert rc == 0 and "ping-ok" in out, out
        yield g
    finally:
        g.stop()


def test_two_queue_pairs_each_carry_traffic(guest):
    rc, out = guest.run("ls /sys/class/net/eth0/queues; cat /proc/interrupts")
    assert rc == 0, out
    assert re.findall(r"[rt]x-\d+", out) == ["rx-0", "rx-1", "tx-0", "tx-1"], out
    before = queue_interrupts(out)
    assert set(before) == {"input.0", "input.1", "output.0", "output.1"}, out

    # the payload first: on a slow (emulated) guest kernel this alone can take minutes
    rc, out = guest.run(f"head -c {PAYLOAD} /dev/urandom > /tmp/out.bin; md5sum /tmp/out.bin",
                        timeout=600)
    md5 = re.search(r"([0-9a-f]{32})\s+/tmp/out.bin", out).group(1)
    # one TCP stream from each vCPU: tx-0 from CPU 0, tx-1 from CPU 1
    listeners = [in_netns(NETNS, lambda p=p: _listen(p))() for p in (5100, 5101)]
    waits = [in_netns(NETNS, lambda s=s: tcp_receive_md5(s)) for s in listeners]
    rc, out = guest.run(
        f"taskset -c 0 nc {HOST_IP} 5100 < /tmp/out.bin & "
        f"taskset -c 1 nc {HOST_IP} 5101 < /tmp/out.bin & wait; echo sent", timeout=400)
    assert rc == 0 and "sent" in out, out
    assert [w() for w in waits] == [(PAYLOAD, md5)] * 2

    rc, out = guest.run("cat /proc/interrupts")
    after = queue_interrupts(out)
    for queue in ("input.0", "input.1", "output.0", "output.1"):
        assert after[queue] > before[queue], (queue, before, after)

    # pych: a worker per pair and one for the control queue, named as the reference's
    pid = guest.proc.pid
    names = set()
    for tid in os.listdir(f"/proc/{pid}/task"):
        with open(f"/proc/{pid}/task/{tid}/comm") as f:
            names.add(f.read().strip())
    net_id = next(n[:-4] for n in names if n.endswith("_qp0"))
    assert {f"{net_id}_qp0", f"{net_id}_qp1", f"{net_id}_ctrl"} <= names, names
    status, body = ApiClient(guest.api_path).get("vm.counters")
    import json
    counters = json.loads(body)[net_id]
    assert counters["tx_bytes"] >= 2 * PAYLOAD and counters["rx_frames"] > 0, counters


def test_tcp_into_the_guest_through_mergeable_buffers(guest):
    """A host → guest stream: the tap hands over TSO frames of up to 64 KiB, each spread
    over several of the guest's small mergeable buffers; the guest reassembles them."""
    payload = os.urandom(PAYLOAD)
    rc, out = guest.run("nc -l -p 5000 < /dev/null > /tmp/in.bin &")
    assert rc == 0, out
    took = in_netns(NETNS, lambda: _send(payload, 5000, time.monotonic() + 120))(timeout=400)
    rc, out = guest.run("wait", timeout=300)
    assert rc == 0, out
    rc, out = guest.run("md5sum /tmp/in.bin; dmesg | grep -ci 'buffers out of\\|bad rx' "
                        "|| true", timeout=300)
    got = re.search(r"([0-9a-f]{32})\s+/tmp/in.bin", out)
    assert rc == 0 and got and got.group(1) == hashlib.md5(payload).hexdigest(), out
    counts = [line.strip() for line in out.splitlines() if line.strip().isdigit()]
    assert counts[-1:] == ["0"], out                   # no frame lost between buffers
    print(f"host -> guest TCP through 2 queue pairs: {PAYLOAD / took / 1e6:.2f} MB/s")


def _iface_with_mac(guest, mac: str, timeout: float = 120) -> str:
    deadline = time.monotonic() + timeout
    while True:
        rc, out = guest.run("for i in /sys/class/net/*; do echo ${i##*/} $(cat $i/address); done")
        for line in out.splitlines():
            name, _, address = line.partition(" ")
            if address.strip() == mac:
                return name
        assert time.monotonic() < deadline, f"no interface with MAC {mac}: {out}"
        time.sleep(2)


def _ping_through(guest, nic) -> None:
    mac, _, host_ip, guest_ip = nic
    iface = _iface_with_mac(guest, mac)
    rc, out = guest.run(f"ip addr add {guest_ip}/24 dev {iface} && ip link set {iface} up && "
                        f"ping -c 3 -W 10 {host_ip} && echo ping-ok", timeout=120)
    assert rc == 0 and "ping-ok" in out, out


def test_vhost_user_net_at_boot_pings_the_host_through_dpdk(guest, testpmd):
    _ping_through(guest, VHOST_BOOT)
    info = json.loads(ApiClient(guest.api_path).get("vm.info")[1])
    nets = [n for n in info["config"]["net"] if n.get("vhost_user")]
    assert [(n["vhost_socket"], n["vhost_mode"], n["mac"]) for n in nets] == [
        (testpmd["boot"], "Client", VHOST_BOOT[0])]


def test_vhost_user_net_hot_plugged_in_server_mode_pings_the_host(guest, testpmd):
    client = ApiClient(guest.api_path)
    status, body = client.put("vm.add-net", {"vhost_user": True, "vhost_socket": testpmd["hot"],
                                             "vhost_mode": "Server", "mac": VHOST_HOTPLUG[0]})
    assert status == 200, body
    dev_id = json.loads(body)["id"]
    _ping_through(guest, VHOST_HOTPLUG)
    status, body = client.put("vm.remove-device", {"id": dev_id})
    assert status == 204, body
    deadline = time.monotonic() + 120
    while True:
        rc, out = guest.run("cat /sys/class/net/*/address")
        if VHOST_HOTPLUG[0] not in out:
            break
        assert time.monotonic() < deadline, out
        time.sleep(2)
    assert testpmd["proc"].poll() is None            # the back-end outlives the NIC
