"""Guest I/O through each data plane, and the VMM's own CPU time per guest request: pych vs
QEMU, on the same guest, the same images and the same back-end, in the same run.

Each run boots the test guest once under pych and once under QEMU (``-M
microvm,acpi=on,pcie=on``, RAM a shared memfd so a vhost-user back-end can map it; the guest
kernel has no virtio-mmio), who goes first rotating, each with the same three data planes:

* **virtio-blk, raw file**: pych's own in-process data plane (``--disk path=``) vs QEMU's
  ``virtio-blk-pci`` (``cache=writeback``: both do buffered host I/O on the image);
* **vhost-user-blk**: a ``qemu-storage-daemon`` (Debian's, started afresh for each VMM with
  the same arguments on the same raw image) exporting ``type=vhost-user-blk``, attached by
  pych (``--disk vhost_user=on,socket=``) and by QEMU (``vhost-user-blk-pci``): the data
  path does not pass through the VMM;
* **virtio-net on a tap**: pych's in-process virtio-net (``--net tap=``) vs QEMU's
  ``virtio-net-pci`` on a tap with ``vhost=off`` (QEMU's own user-space data plane, the
  peer of pych's; with ``vhost=on`` the kernel's vhost-net would carry the frames), both in a
  network namespace of this script's.

In the guest, ``blkbench`` (bench/blkbench.c, handed over on a small read-only disk) times
O_DIRECT requests: sequential read and write of 1 MiB requests (the write ends with a flush)
and random 4 KiB reads; the network moves a TCP stream each way between the guest and a
host socket in the namespace (``nc``; the guest sends zeros: generating random data in the
emulated guest kernel would take longer than the transfer).

Per test it reports the guest-visible throughput (MB/s: blkbench's clock in the guest for
the disks, the host socket's for the streams) and the **VMM's own CPU per request**: the
utime + stime the VMM process accumulated during the test (``/proc/<pid>/stat``, which
includes threads that ended) less its vCPU threads' (``/proc/<pid>/task/*/stat``: pych's
``vcpu<N>``, QEMU's ``CPU <N>/KVM``; on this host a vCPU thread's time is mostly the
emulated guest kernel), divided by the requests the guest issued: its block device's
completed reads, writes and flushes (``/sys/block/vdX/stat``), or its NIC's frames both
ways (``/sys/class/net/eth0/statistics``, ACKs included). For vhost-user-blk the
back-end's (qemu-storage-daemon's) CPU per request is shown beside it. CPU times come in
clock ticks (10 ms), so a test must run for seconds for its figure to mean anything.

**Sizes are scaled to this host**: its KVM emulates guest kernel code (../shared/notes/
pvm-host.md where present: ~0.5 µs per instruction), so the guest moves ~1–2 MB/s and a
4 KiB read costs ~10 ms in the guest; each transfer is a few MiB (default 4 MiB sequential,
256 random reads, 4 MiB each way on the network), not the hundreds of MiB an ordinary host
would use. Compare ratios, not absolute figures; on an ordinary host the VMM's CPU per
request is what separates VMMs, and here it is visible but small next to the guest's.

Writes its table to docs/benchmarks.md (``<!-- bench:io -->``).

    .venv/bin/python bench/io.py [--runs 3] [--seq-mib 4] [--rand-ops 256] [--net-mib 4]
"""

from __future__ import annotations

import argparse
import os
import re
import socket
import statistics
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable
from pathlib import Path

# Run as `python bench/<name>.py`: the repository root goes on sys.path for the test
# harness (tests.support), which is not part of the installed pych package.
sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from bench.block import build_tool  # noqa: E402
from bench.report import Run, add_runs_argument, markdown_table, rotated, stat  # noqa: E402
from tests.support.guest import (  # noqa: E402
    READY, Console, PychGuest, Shell, guest_artifacts, qemu_command)
from tests.support.netns import in_netns, network_namespace  # noqa: E402

MiB = 1 << 20
RAW_MIB, VHOST_MIB = 16, 24            # the two data disks, told apart in the guest by size
QSD = "/usr/bin/qemu-storage-daemon"
NETNS = f"pych-bench-io-{os.getpid()}"
QEMU_TAP = "iobench0"
HOST_IP, GUEST_IP = "192.168.247.1", "192.168.247.2"
BOOT_TIMEOUT = 900
CLK_TCK = os.sysconf("SC_CLK_TCK")
VCPU_THREAD = re.compile(r"vcpu\d+|CPU \d+/KVM")

PLANES = ("virtio-blk", "vhost-user-blk", "virtio-net")
PLANE_LABELS = {"virtio-blk": "virtio-blk, raw file (pych in-process; QEMU virtio-blk-pci)",
                "vhost-user-blk": "vhost-user-blk (qemu-storage-daemon)",
                "virtio-net": "virtio-net on a tap (pych in-process; QEMU user space, "
                              "vhost=off)"}
BLOCK_TESTS = ("seqread", "seqwrite", "randread")
NET_TESTS = ("tx", "rx")
LABELS = {"seqread": "sequential read, 1 MiB", "seqwrite": "sequential write, 1 MiB",
          "randread": "random read, 4 KiB", "tx": "TCP guest → host", "rx": "TCP host → guest"}


# --- host-side CPU accounting ---------------------------------------------------------------
def _ticks(stat_path: str) -> int:
    """utime + stime of one /proc stat file (after the command name, which may hold
    spaces)."""
    with open(stat_path) as f:
        fields = f.read().rsplit(")", 1)[1].split()
    return int(fields[11]) + int(fields[12])


def vcpu_ticks(pid: int) -> int:
    """The ticks of the process's vCPU threads."""
    vcpus = 0
    for tid in os.listdir(f"/proc/{pid}/task"):
        try:
            with open(f"/proc/{pid}/task/{tid}/comm") as f:
                if not VCPU_THREAD.fullmatch(f.read().strip()):
                    continue
            vcpus += _ticks(f"/proc/{pid}/task/{tid}/stat")
        except FileNotFoundError:          # a thread that just ended
            continue
    return vcpus


class CpuMeter:
    """The VMM's CPU less its vCPU threads, and a back-end's whole CPU, over one test."""

    def __init__(self, vmm_pid: int, backend_pid: int | None = None):
        self.vmm_pid, self.backend_pid = vmm_pid, backend_pid

    # The process's ticks and its vCPU threads' are read one after the other: at the start
    # the process's first, at the end its vCPU threads' first, so that the vCPU threads'
    # interval lies within the process's. The kernel still scales a process's utime/stime and
    # each thread's separately, so a figure can be off by one tick either way.
    def __enter__(self) -> "CpuMeter":
        self._vmm = (_ticks(f"/proc/{self.vmm_pid}/stat"), vcpu_ticks(self.vmm_pid))
        self._backend = _ticks(f"/proc/{self.backend_pid}/stat") if self.backend_pid else 0
        return self

    def __exit__(self, *exc) -> None:
        vcpus = vcpu_ticks(self.vmm_pid)
        total = _ticks(f"/proc/{self.vmm_pid}/stat")
        self.vmm_s = ((total - self._vmm[0]) - (vcpus - self._vmm[1])) / CLK_TCK
        self.backend_s = ((_ticks(f"/proc/{self.backend_pid}/stat") - self._backend) / CLK_TCK
                          if self.backend_pid else 0.0)


# --- the back-end -----------------------------------------------------------------------------
class StorageDaemon:
    """qemu-storage-daemon exporting the raw ``image`` as vhost-user-blk at ``socket``."""

    def __init__(self, image: Path, sock: Path, log: Path):
        sock.unlink(missing_ok=True)
        self.socket = str(sock)
        self._log = open(log, "ab")
        self.proc = subprocess.Popen(
            [QSD, "--blockdev", f"driver=file,node-name=f,filename={image},cache.direct=off",
             "--export", f"type=vhost-user-blk,id=e,node-name=f,addr.type=unix,"
                         f"addr.path={sock},writable=on,num-queues=1"],
            stdin=subprocess.DEVNULL, stdout=self._log, stderr=subprocess.STDOUT)
        deadline = time.monotonic() + 30
        while not sock.exists():
            if self.proc.poll() is not None or time.monotonic() > deadline:
                self.stop()
                raise RuntimeError(f"qemu-storage-daemon did not start: {log.read_text()}")
            time.sleep(0.05)

    def stop(self) -> None:
        if self.proc.poll() is None:
            self.proc.terminate()
            try:
                self.proc.wait(30)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()
        self._log.close()


# --- in the guest -----------------------------------------------------------------------------
def _block_requests(shell: Shell, dev: str) -> int:
    """Completed reads + writes + flushes of /dev/``dev`` so far."""
    rc, out = shell.run(f"cat /sys/block/{dev}/stat")
    f = [int(x) for x in out.split()]
    if rc or len(f) < 17:
        raise RuntimeError(f"guest /sys/block/{dev}/stat: {out}")
    return f[0] + f[4] + f[15]


def _net_frames(shell: Shell) -> int:
    rc, out = shell.run("cat /sys/class/net/eth0/statistics/rx_packets "
                        "/sys/class/net/eth0/statistics/tx_packets")
    if rc:
        raise RuntimeError(f"guest NIC statistics: {out}")
    return sum(int(x) for x in out.split())


def run_block_tests(shell: Shell, dev: str, meter: Callable[[], CpuMeter], seq_mib: int,
                    rand_ops: int) -> dict:
    args = {"seqread": (MiB, seq_mib), "seqwrite": (MiB, seq_mib), "randread": (4096, rand_ops)}
    result = {}
    for test in BLOCK_TESTS:
        bs, count = args[test]
        before = _block_requests(shell, dev)
        with meter() as cpu:
            rc, out = shell.run(f"/tmp/blkbench {test} /dev/{dev} {bs} {count}", timeout=1800)
        m = re.search(r"bytes=(\d+) seconds=([\d.]+)", out)
        if rc or not m:
            raise RuntimeError(f"guest blkbench {test}: {out}")
        requests = _block_requests(shell, dev) - before
        result[test] = measured(int(m.group(1)) / float(m.group(2)) / 1e6, requests, cpu)
    return result


def _listen(port: int) -> socket.socket:
    s = socket.socket()
    s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    s.bind((HOST_IP, port))
    s.listen(1)
    s.settimeout(300)
    return s


def _receive(listener: socket.socket) -> tuple[int, float]:
    """Accept one stream and read it to its end: (bytes, seconds from accept to EOF)."""
    with listener:
        conn, _ = listener.accept()
    start = time.monotonic()
    size = 0
    with conn:
        conn.settimeout(300)
        while chunk := conn.recv(1 << 16):
            size += len(chunk)
    return size, time.monotonic() - start


def _send(nbytes: int, port: int) -> float:
    """Connect to the guest's listener, send ``nbytes`` of zeros, wait for its close:
    seconds from connect to close."""
    deadline = time.monotonic() + 120
    while True:
        try:
            s = socket.create_connection((GUEST_IP, port), timeout=5)
            break
        except OSError:
            if time.monotonic() > deadline:
                raise RuntimeError("the guest never listened") from None
            time.sleep(0.5)
    chunk = bytes(1 << 16)
    with s:
        s.settimeout(300)
        start = time.monotonic()
        left = nbytes
        while left:
            left -= s.send(chunk[:min(left, len(chunk))])
        s.shutdown(socket.SHUT_WR)
        s.recv(1)                                  # the guest closes once it has everything
        return time.monotonic() - start


def run_net_tests(shell: Shell, meter: Callable[[], CpuMeter], net_mib: int) -> dict:
    nbytes = net_mib * MiB
    rc, out = shell.run(f"ip addr add {GUEST_IP}/24 dev eth0 && ip link set eth0 up && "
                        f"ping -c 2 -W 10 {HOST_IP} >/dev/null && echo ping-ok", timeout=120)
    if rc or "ping-ok" not in out:
        raise RuntimeError(f"guest network: {out}")
    result = {}
    # guest → host
    before = _net_frames(shell)
    listener = in_netns(NETNS, lambda: _listen(5301))()
    with meter() as cpu:
        wait = in_netns(NETNS, lambda: _receive(listener))
        rc, out = shell.run(f"head -c {nbytes} /dev/zero | nc {HOST_IP} 5301; echo sent",
                            timeout=900)
        size, seconds = wait(timeout=900)
    if rc or size != nbytes:
        raise RuntimeError(f"guest → host stream: {size} of {nbytes} bytes; {out}")
    result["tx"] = measured(nbytes / seconds / 1e6, _net_frames(shell) - before, cpu)
    # host → guest
    rc, out = shell.run("nc -l -p 5302 < /dev/null > /dev/null &")
    before = _net_frames(shell)
    with meter() as cpu:
        seconds = in_netns(NETNS, lambda: _send(nbytes, 5302))(timeout=900)
        rc, out = shell.run("wait", timeout=300)
    result["rx"] = measured(nbytes / seconds / 1e6, _net_frames(shell) - before, cpu)
    return result


def measured(mbps: float, requests: int, cpu: CpuMeter) -> dict:
    r = {"mbps": mbps, "requests": requests,
         "vmm_us": cpu.vmm_s / max(requests, 1) * 1e6,
         "backend_us": cpu.backend_s / max(requests, 1) * 1e6}
    print(f"    {mbps:6.2f} MB/s, {requests} requests, VMM {cpu.vmm_s:.2f} s CPU "
          f"({r['vmm_us']:.0f} µs/request), back-end {cpu.backend_s:.2f} s", flush=True)
    return r


def run_in_guest(shell: Shell, vmm_pid: int, qsd: StorageDaemon, tool_size: int, args) -> dict:
    rc, out = shell.run("for d in /sys/block/vd*; do read s < $d/size; echo ${d##*/} $s; done")
    sizes = {name: int(s) for name, s in (line.split() for line in out.splitlines())}
    by_size = {s: name for name, s in sizes.items()}
    raw, vhost = by_size[RAW_MIB * MiB // 512], by_size[VHOST_MIB * MiB // 512]
    tool = next(d for d in sizes if d not in (raw, vhost))
    rc, out = shell.run(f"head -c {tool_size} /dev/{tool} > /tmp/blkbench && "
                        "chmod +x /tmp/blkbench && echo ok")
    if rc or "ok" not in out:
        raise RuntimeError(f"guest: {out}")
    result = {}
    print("  virtio-blk (raw file)", flush=True)
    result["virtio-blk"] = run_block_tests(shell, raw, lambda: CpuMeter(vmm_pid), args.seq_mib,
                                           args.rand_ops)
    print("  vhost-user-blk", flush=True)
    result["vhost-user-blk"] = run_block_tests(shell, vhost, lambda: CpuMeter(vmm_pid,
                                                                              qsd.proc.pid),
                                               args.seq_mib, args.rand_ops)
    print("  virtio-net", flush=True)
    result["virtio-net"] = run_net_tests(shell, lambda: CpuMeter(vmm_pid), args.net_mib)
    return result


# --- the VMMs ---------------------------------------------------------------------------------
def bench_pych(workdir: Path, images: dict[str, Path], tool_size: int, args) -> dict:
    qsd = StorageDaemon(images["vhost"], workdir / "qsd.sock", workdir / "qsd.log")
    g = PychGuest(workdir / "pych", api=False, extra_args=[
        "--disk", f"path={images['raw']}", f"vhost_user=on,socket={qsd.socket}",
        f"path={images['tool']},readonly=on",
        "--net", f"tap=,ip={HOST_IP},mask=255.255.255.0"])
    g.args = ["ip", "netns", "exec", NETNS, *g.args]     # exec: the same process
    try:
        g.start()
        g.wait_ready(BOOT_TIMEOUT)
        return run_in_guest(g.shell, g.proc.pid, qsd, tool_size, args)
    finally:
        g.stop()
        qsd.stop()


def bench_qemu(workdir: Path, images: dict[str, Path], tool_size: int, args) -> dict:
    qsd = StorageDaemon(images["vhost"], workdir / "qsd.sock", workdir / "qsd.log")
    ns = ["ip", "-n", NETNS]
    subprocess.run([*ns, "tuntap", "add", "dev", QEMU_TAP, "mode", "tap", "vnet_hdr"],
                   check=True)
    subprocess.run([*ns, "addr", "add", f"{HOST_IP}/24", "dev", QEMU_TAP], check=True)
    subprocess.run([*ns, "link", "set", QEMU_TAP, "up"], check=True)
    cmd = qemu_command(guest_artifacts(), machine="microvm,acpi=on,pcie=on,memory-backend=mem")
    # debug-threads: QEMU names its vCPU threads ("CPU 0/KVM") only when asked
    cmd += ["-name", "io-bench,debug-threads=on",
            "-object", "memory-backend-memfd,id=mem,size=256M,share=on",
            "-drive", f"file={images['raw']},format=raw,if=none,id=raw,cache=writeback",
            "-device", "virtio-blk-pci,drive=raw",
            "-chardev", f"socket,id=vu,path={qsd.socket}",
            "-device", "vhost-user-blk-pci,chardev=vu,num-queues=1",
            "-drive", f"file={images['tool']},format=raw,if=none,id=tool,readonly=on",
            "-device", "virtio-blk-pci,drive=tool",
            "-netdev", f"tap,id=n0,ifname={QEMU_TAP},script=no,downscript=no,vhost=off",
            "-device", "virtio-net-pci,netdev=n0"]
    p = subprocess.Popen(["ip", "netns", "exec", NETNS, *cmd], stdin=subprocess.PIPE,
                         stdout=subprocess.PIPE, stderr=open(workdir / "qemu.log", "ab"))
    try:
        console = Console(p.stdout.fileno(), p.stdin.fileno(), workdir / "qemu-console.log")
        console.expect(READY, BOOT_TIMEOUT)
        shell = Shell(console)
        shell.prepare()
        return run_in_guest(shell, p.pid, qsd, tool_size, args)
    finally:
        p.kill()
        p.wait()
        qsd.stop()
        subprocess.run([*ns, "link", "del", QEMU_TAP], check=False)


# --- report -----------------------------------------------------------------------------------
def table(results: dict[str, list[dict]]) -> str:
    pych, qemu = results["pych"], results["qemu"]
    rows = []
    for plane in PLANES:
        for n, test in enumerate(NET_TESTS if plane == "virtio-net" else BLOCK_TESTS):
            def col(runs, key, fmt):
                return stat([r[plane][test][key] for r in runs], fmt)

            def ratios(key):
                return [a[plane][test][key] / b[plane][test][key]
                        for a, b in zip(pych, qemu) if b[plane][test][key]]

            def ratio_text(key):
                xs = ratios(key)
                return f"**{statistics.median(xs):.2f}×**" if xs else "—"
            backend = plane == "vhost-user-blk"
            for vmm, runs in (("pych", pych), ("QEMU", qemu)):
                rows.append([PLANE_LABELS[plane] if vmm == "pych" and n == 0 else "",
                             LABELS[test] if vmm == "pych" else "", vmm,
                             col(runs, "mbps", ".2f"),
                             ratio_text("mbps") if vmm == "pych" else "",
                             col(runs, "requests", ".0f"),
                             col(runs, "vmm_us", ".0f"),
                             ratio_text("vmm_us") if vmm == "pych" else "",
                             col(runs, "backend_us", ".0f") if backend else "—"])
    header = ["data plane", "test", "VMM", "MB/s (guest)", "pych / QEMU", "guest requests",
              "VMM CPU per request (µs, vCPU threads excluded)", "pych / QEMU",
              "back-end CPU per request (µs)"]
    return ("Medians of the runs (min–max); the ratios are medians of the run-by-run ratios "
            "(pych and QEMU back to back).\n\n" + markdown_table(header, rows))


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    add_runs_argument(ap)
    ap.add_argument("--seq-mib", type=int, default=4, help="MiB per sequential test")
    ap.add_argument("--rand-ops", type=int, default=256, help="random 4 KiB reads")
    ap.add_argument("--net-mib", type=int, default=4, help="MiB per TCP stream")
    args = ap.parse_args()
    if args.seq_mib > RAW_MIB:
        ap.error(f"--seq-mib is at most the disks' {RAW_MIB}")
    run = Run("io", f"bench/io.py --runs {args.runs} --seq-mib {args.seq_mib} "
                    f"--rand-ops {args.rand_ops} --net-mib {args.net_mib}", args.runs)
    results: dict[str, list[dict]] = {"pych": [], "qemu": []}
    with tempfile.TemporaryDirectory(prefix="pych-bench-io-") as d, network_namespace(NETNS):
        workdir = Path(d)
        tool, tool_size = build_tool(workdir)
        images = {"raw": workdir / "raw.img", "vhost": workdir / "vhost.img", "tool": tool}
        for key, mib in (("raw", RAW_MIB), ("vhost", VHOST_MIB)):
            with open(images[key], "wb") as f:
                for _ in range(mib):
                    f.write(os.urandom(MiB))
        for i in run.runs_range():
            for name, fn in rotated([("pych", bench_pych), ("qemu", bench_qemu)], i):
                print(f"run {i + 1}: {name}", flush=True)
                rundir = workdir / f"{name}{i}"
                rundir.mkdir()
                results[name].append(fn(rundir, images, tool_size, args))
    run.write(table(results) + "\n\nSizes are scaled to this host's emulated guest kernel "
              f"(~1–2 MB/s): {args.seq_mib} MiB per sequential test, {args.rand_ops} random "
              f"reads, {args.net_mib} MiB per stream; CPU times are counted in "
              f"{1000 // CLK_TCK} ms ticks.", no_write=args.no_write)
    return 0


if __name__ == "__main__":
    sys.exit(main())
