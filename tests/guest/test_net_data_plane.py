"""The network data plane, checked from inside a real guest (issue 14, items 3 and 4):
multi-queue virtio-net with mergeable receive buffers, and vhost-user-net.

One guest with 2 vCPUs boots with ``--net ...,num_queues=4`` (two queue pairs on an
``IFF_MULTI_QUEUE`` tap pych creates) and a vhost-user-net NIC served by DPDK's
``dpdk-testpmd`` (Debian's ``dpdk-dev``; its vhost PMD, no huge pages), which forwards
between that NIC and a host tap it creates; a second vhost-user NIC is hot-plugged with
``vhost_mode=server`` (pych listens, testpmd's second vhost port connects as a client) and
forwarded to a second host tap. Last, a vhost-user NIC with two queue pairs
(``num_queues=4``) is hot-plugged against a second testpmd run with ``--rxq=2 --txq=2``
(its vhost port and tap each with two queues): the guest's virtio-net sees two pairs, sends
a stream from each vCPU, and testpmd's per-queue forwarding statistics show frames on both
queues each way. pych and testpmd run in a network namespace the module creates (and
deletes), so every packet stays in it; host-side sockets are opened by threads that join
that namespace.

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
VHOST_MQ = ("52:54:00:d0:00:03", "dpdktapmq", "192.168.253.1", "192.168.253.2")
MQ_PAYLOAD = 256 * 1024
TESTPMD = shutil.which("dpdk-testpmd")



def _listen(port: int) -> socket.socket:
    return _listen_on(HOST_IP, port)


def _listen_on(address: str, port: int) -> socket.socket:
    s = socket.socket()
    s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    s.bind((address, port))
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


class DpdkTestpmd:
    """dpdk-testpmd in the namespace, without huge pages (``--no-huge``), io forwarding on
    one forwarding lcore, niced (it busy-polls): ``vdevs`` its ports, ``extra`` more
    testpmd options. Started once ``wait_for`` exists; ``taps`` (name, host address) are
    brought up. :meth:`stop` ends it (a newline on stdin: testpmd stops forwarding and
    prints its statistics, then exits) and returns its output."""

    def __init__(self, netns: str, d, prefix: str, vdevs: list[str], wait_for: str,
                 taps: list[tuple[str, str]], extra: tuple[str, ...] = ()):
        assert TESTPMD, "dpdk-testpmd is missing: scripts/install-deps.sh installs dpdk-dev"
        self.prefix, self.log_path = prefix, d / f"{prefix}.log"
        self._log = open(self.log_path, "wb")
        vdev_args = [a for v in vdevs for a in ("--vdev", v)]
        self.proc = subprocess.Popen(
            ["ip", "netns", "exec", netns, "nice", "-n", "19", TESTPMD, "-l", "0,1",
             "--no-huge", "-m", "256", "--no-pci", "--file-prefix", prefix, *vdev_args,
             "--", "--forward-mode=io", "--auto-start", "--stats-period", "0",
             "--total-num-mbufs=16384", "--nb-cores=1", *extra],
            stdin=subprocess.PIPE, stdout=self._log, stderr=subprocess.STDOUT)
        try:
            deadline = time.monotonic() + 60
            while not os.path.exists(wait_for):
                assert self.proc.poll() is None, self.output()
                assert time.monotonic() < deadline, "testpmd never listened"
                time.sleep(0.2)
            for tap, host_ip in taps:
                subprocess.run(["ip", "netns", "exec", netns, "sh", "-c",
                                f"ip addr add {host_ip}/24 dev {tap} && ip link set {tap} up"],
                               check=True)
        except BaseException:
            self.stop()
            raise

    def output(self) -> str:
        self._log.flush()
        return self.log_path.read_text(errors="replace")

    def stop(self) -> str:
        if self.proc.poll() is None:
            try:
                self.proc.stdin.write(b"\n")
                self.proc.stdin.flush()
                self.proc.wait(30)
            except (OSError, subprocess.TimeoutExpired):
                self.proc.send_signal(signal.SIGINT)
                try:
                    self.proc.wait(30)
                except subprocess.TimeoutExpired:
                    self.proc.kill()
                    self.proc.wait()
        self._log.close()
        shutil.rmtree(f"/var/run/dpdk/{self.prefix}", ignore_errors=True)
        return self.log_path.read_text(errors="replace")


def forward_stats(output: str) -> dict[tuple[int, int, int, int], int]:
    """testpmd's per-stream statistics at exit: (rx port, rx queue, tx port, tx queue) →
    frames sent on. testpmd prints them when it forwards more streams than ports."""
    stats = {}
    for m in re.finditer(r"Forward Stats for RX Port=\s*(\d+)/Queue=\s*(\d+) -> TX Port=\s*"
                         r"(\d+)/Queue=\s*(\d+).*?\n.*?TX-packets:\s*(\d+)", output):
        stats[tuple(int(g) for g in m.groups()[:4])] = int(m.group(5))
    return stats


@pytest.fixture(scope="module")
def testpmd(netns, tmp_path_factory):
    """dpdk-testpmd: port 0 a vhost-user server at ``boot.sock`` (pych connects at boot),
    port 1 tap ``dpdktap0``; port 2 a vhost-user client of ``hot.sock`` (pych listens there
    once the NIC is hot-plugged), port 3 tap ``dpdktap1``; io forwarding 0<->1 and 2<->3."""
    d = tmp_path_factory.mktemp("testpmd")
    boot_sock, hot_sock = str(d / "boot.sock"), str(d / "hot.sock")
    pmd = DpdkTestpmd(netns, d, f"pych-{os.getpid()}",
                  [f"net_vhost0,iface={boot_sock},client=0", f"net_tap0,iface={VHOST_BOOT[1]}",
                   f"net_vhost1,iface={hot_sock},client=1",
                   f"net_tap1,iface={VHOST_HOTPLUG[1]}"],
                  boot_sock, [(VHOST_BOOT[1], VHOST_BOOT[2]),
                              (VHOST_HOTPLUG[1], VHOST_HOTPLUG[2])])
    try:
        yield {"boot": boot_sock, "hot": hot_sock, "log": pmd.log_path, "proc": pmd.proc,
               "dir": d}
    finally:
        pmd.stop()


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


def test_vhost_user_net_with_two_queue_pairs_carries_traffic_on_both(guest, netns, testpmd):
    """``num_queues=4`` against a testpmd with two queues per port: pych negotiates
    multiqueue with the back-end (four rings, the control queue its own), the guest's
    virtio-net uses both pairs, and a stream from each vCPU goes out on its own pair; the
    tap steers each flow's return frames to the queue it came from, so testpmd forwards
    frames on both queues each way."""
    d = testpmd["dir"]
    sock = str(d / "mq.sock")
    pmd = DpdkTestpmd(netns, d, f"pych-mq-{os.getpid()}",
                  [f"net_vhost2,iface={sock},client=0,queues=2", f"net_tap2,iface={VHOST_MQ[1]}"],
                  sock, [(VHOST_MQ[1], VHOST_MQ[2])], extra=("--rxq=2", "--txq=2"))
    try:
        client = ApiClient(guest.api_path)
        status, body = client.put("vm.add-net", {"vhost_user": True, "vhost_socket": sock,
                                                 "num_queues": 4, "mac": VHOST_MQ[0]})
        assert status == 200, body
        dev_id = json.loads(body)["id"]
        mac, _, host_ip, guest_ip = VHOST_MQ
        iface = _iface_with_mac(guest, mac)
        rc, out = guest.run(
            f"ls /sys/class/net/{iface}/queues; d=$(readlink /sys/class/net/{iface}/device); "
            f"echo dev=${{d##*/}}; head -c {MQ_PAYLOAD} /bin/busybox > /tmp/mq.bin; "
            f"md5sum /tmp/mq.bin; ip addr add {guest_ip}/24 dev {iface} && "
            f"ip link set {iface} up && ping -c 2 -W 10 {host_ip} >/dev/null && echo ping-ok",
            timeout=300)
        assert rc == 0 and "ping-ok" in out, out
        # the driver read max_virtqueue_pairs = 2 and, with 2 vCPUs, uses both pairs
        assert re.findall(r"[rt]x-\d+", out) == ["rx-0", "rx-1", "tx-0", "tx-1"], out
        virtio = re.search(r"dev=(virtio\d+)", out).group(1)
        md5 = re.search(r"([0-9a-f]{32})\s+/tmp/mq.bin", out).group(1)

        def irqs() -> dict[str, int]:
            rc, text = guest.run("cat /proc/interrupts")
            counts = {}
            for line in text.splitlines():
                m = re.search(rf"{virtio}-((?:input|output)\.\d+)\s*$", line)
                if m:
                    counts[m.group(1)] = sum(int(f) for f in line.split(":", 1)[1].split()
                                             if f.isdigit())
            return counts
        before = irqs()
        assert set(before) == {"input.0", "input.1", "output.0", "output.1"}, before

        # one TCP stream from each vCPU: XPS puts CPU 0's on tx-0, CPU 1's on tx-1
        ports = (5200, 5201)
        listeners = [in_netns(NETNS, lambda p=p: _listen_on(host_ip, p))() for p in ports]
        waits = [in_netns(NETNS, lambda s=s: tcp_receive_md5(s)) for s in listeners]
        rc, out = guest.run(
            f"taskset -c 0 nc {host_ip} {ports[0]} < /tmp/mq.bin & "
            f"taskset -c 1 nc {host_ip} {ports[1]} < /tmp/mq.bin & wait; echo sent",
            timeout=400)
        assert rc == 0 and "sent" in out, out
        assert [w() for w in waits] == [(MQ_PAYLOAD, md5)] * 2
        after = irqs()
        # the back-end interrupts the guest on both receive queues (its MSI-X irqfds)
        for queue in ("input.0", "input.1"):
            assert after[queue] > before[queue], (queue, before, after)

        status, body = client.put("vm.remove-device", {"id": dev_id})
        assert status == 204, body
        deadline = time.monotonic() + 120
        while mac in guest.run("cat /sys/class/net/*/address")[1]:
            assert time.monotonic() < deadline, "the NIC never left the guest"
            time.sleep(2)
    finally:
        output = pmd.stop()
    stats = forward_stats(output)
    # port 0 is the vhost-user port (the guest), port 1 the tap: both queues each way
    for rx_port, tx_port in ((0, 1), (1, 0)):
        for queue in (0, 1):
            assert stats.get((rx_port, queue, tx_port, queue), 0) > 0, (
                (rx_port, queue), stats, output[-3000:])
    print("testpmd per-queue forwarding (rx port/queue -> tx port/queue: frames):",
          {f"{a}/{b}->{c}/{d}": n for (a, b, c, d), n in sorted(stats.items())})
