"""Multi-queue virtio-net with mergeable receive buffers, checked from inside a real guest
(issue 14, item 4).

One guest with 2 vCPUs boots with ``--net ...,num_queues=4`` (two queue pairs on an
``IFF_MULTI_QUEUE`` tap pych creates). pych runs in a network namespace the module creates
(and deletes), so every packet stays in it; host-side sockets are opened by threads that
join that namespace.

Both pairs are shown to carry traffic: the guest sends one TCP stream from each vCPU
(``taskset``); Linux's virtio-net maps each vCPU to its own transmit queue (XPS), and the
tap steers a flow's return frames to the queue it last saw the flow on, so each pair's
receive and transmit interrupts (``/proc/interrupts``: ``virtioN-input.K`` /
``output.K``) must rise. The guest's busybox has no ``ethtool``; its queue count is read
from ``/sys/class/net/eth0/queues``.
"""

import hashlib
import os
import re
import socket
import time

import pytest

from pych.api.client import ApiClient

from tests.support.guest import PychGuest
from tests.support.netns import in_netns

NETNS = f"pych-netmq-{os.getpid()}"
HOST_IP, GUEST_IP = "192.168.250.1", "192.168.250.2"
MiB = 1 << 20
PAYLOAD = 2 * MiB


def _receive_md5(listener: socket.socket) -> tuple[int, str]:
    with listener:
        conn, _ = listener.accept()
    with conn:
        conn.settimeout(180)
        digest, size = hashlib.md5(), 0
        while chunk := conn.recv(1 << 16):
            digest.update(chunk)
            size += len(chunk)
    return size, digest.hexdigest()


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
    /proc/interrupts."""
    counts = {}
    for line in text.splitlines():
        m = re.search(r"virtio\d+-((?:input|output)\.\d+)\s*$", line)
        if m:
            fields = line.split(":", 1)[1].split()
            counts[m.group(1)] = sum(int(f) for f in fields if f.isdigit())
    return counts


@pytest.fixture(scope="module")
def guest(netns, tmp_path_factory):
    d = tmp_path_factory.mktemp("netmq")
    g = PychGuest(d / "vm", cpus="boot=2", extra_args=[
        "--net", f"tap=,ip={HOST_IP},mask=255.255.255.0,num_queues=4"])
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

    # one TCP stream from each vCPU: tx-0 from CPU 0, tx-1 from CPU 1
    listeners = [in_netns(NETNS, lambda p=p: _listen(p))() for p in (5100, 5101)]
    waits = [in_netns(NETNS, lambda s=s: _receive_md5(s)) for s in listeners]
    rc, out = guest.run(
        f"head -c {PAYLOAD} /dev/urandom > /tmp/out.bin && md5sum /tmp/out.bin && "
        f"taskset -c 0 nc {HOST_IP} 5100 < /tmp/out.bin & "
        f"taskset -c 1 nc {HOST_IP} 5101 < /tmp/out.bin & wait; echo sent", timeout=400)
    assert rc == 0 and "sent" in out, out
    md5 = re.search(r"([0-9a-f]{32})\s+/tmp/out.bin", out).group(1)
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
    rc, out = guest.run("wait; md5sum /tmp/in.bin; dmesg | grep -ci 'buffers out of\\|bad rx' "
                        "|| true", timeout=300)
    lines = out.split()
    assert rc == 0 and lines[0] == hashlib.md5(payload).hexdigest(), out
    assert lines[-1] == "0", out                       # no frame lost between buffers
    print(f"host -> guest TCP through 2 queue pairs: {PAYLOAD / took / 1e6:.2f} MB/s")
