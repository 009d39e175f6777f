"""Live migration: downtime and total time, pych vs QEMU (q35) on the same guest, same kernel,
initramfs and cmdline, same memory size, in the same run.

Per run, who goes first rotating:

* pych, 256 MiB (``--memory size=256M,shared=on``): the guest boots, a shell loop in it keeps
  writing memory (a counter in a tmpfs file, 10 times a second), then it migrates to a new
  pych over a Unix socket (pre-copy), on to another over TCP on 127.0.0.1, and on to another
  with ``local`` (guest RAM's memfds passed, nothing copied). Figures: the source's
  ``VM migrated ...: downtime X ms, total Y ms`` log line (downtime: from pausing the vCPUs on
  the source to the destination letting its vCPUs run, both on this host's monotonic clock).
* pych, 1 GiB: the same guest with 1 GiB, migrated over a Unix socket, then with ``local``:
  the copy grows with what the guest touched, ``local`` does not.
* QEMU q35, 256 MiB: the same guest and loop, ``migrate`` (QMP) to a QEMU started with
  ``-incoming unix:...``, then from that one on to another with ``-incoming tcp:127.0.0.1:P``;
  figures from ``query-migrate`` (``downtime``, ``total-time``), QEMU's defaults otherwise
  (300 ms downtime limit, as pych's ``downtime_ms``).

Writes its table to docs/benchmarks.md (``<!-- bench:migration -->``).

    .venv/bin/python bench/migration.py [--runs 3]
"""

from __future__ import annotations

import argparse
import json
import re
import socket
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

from pych.api.client import ApiClient

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from bench.qmp import Qmp  # noqa: E402
from bench.report import Run, add_runs_argument, markdown_table, ratio, rotated, stat  # noqa: E402
from tests.support.guest import (  # noqa: E402
    READY, REPO, Console, PychGuest, Shell, guest_artifacts, qemu_command)

TIMEOUT = 900
LOOP = ("mkdir -p /mnt/m && mount -t tmpfs tmpfs /mnt/m; "
        "(i=0; while :; do i=$((i+1)); echo $i > /mnt/m/counter; sleep 0.1; done) & sleep 1")
FIGURES = re.compile(r"VM migrated to \S+: downtime ([\d.]+) ms, total ([\d.]+) ms")


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


# --- pych -----------------------------------------------------------------------------------
class Destination:
    """A pych started with only ``--api-socket`` (``-v``: its log has the figures once it is
    the source of the next hop)."""

    def __init__(self, workdir: Path, name: str):
        self.api_path = str(workdir / f"{name}.api")
        self.log_path = workdir / f"{name}.log"
        self._log = open(self.log_path, "ab")
        self.proc = subprocess.Popen([str(REPO / ".venv" / "bin" / "pych"), "--api-socket",
                                      self.api_path, "-v"], stdout=self._log, stderr=self._log)
        deadline = time.monotonic() + 30
        while not Path(self.api_path).exists():
            if self.proc.poll() is not None or time.monotonic() > deadline:
                raise RuntimeError(f"pych did not start: {self.log_path.read_text()}")
            time.sleep(0.05)

    def log(self) -> str:
        return self.log_path.read_text(errors="replace")

    def stop(self) -> None:
        if self.proc.poll() is None:
            self.proc.terminate()
            try:
                self.proc.wait(15)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()
        self._log.close()


def put(path: str, endpoint: str, body: dict) -> None:
    with ApiClient(path) as client:
        status, text = client.put(endpoint, body)
    if status != 204:
        raise RuntimeError(f"{endpoint}: {status} {text!r}")


def pych_hop(source_api: str, source_log, destination: Destination, url: str,
             local: bool = False) -> tuple[float, float]:
    """Migrate from ``source_api`` to ``destination``; (downtime, total) in ms."""
    errors: list[Exception] = []

    def receive():
        try:
            put(destination.api_path, "vm.receive-migration", {"receiver_url": url})
        except Exception as e:  # noqa: BLE001
            errors.append(e)
    thread = threading.Thread(target=receive, daemon=True)
    thread.start()
    endpoint = url.split(":", 1)[1]
    deadline = time.monotonic() + 30
    while url.startswith("unix:") and not Path(endpoint).exists() or \
            url.startswith("tcp:") and not _accepts(url):
        if time.monotonic() > deadline:
            raise RuntimeError(f"nobody listens on {url}")
        time.sleep(0.02)
    put(source_api, "vm.send-migration", {"destination_url": url, "local": local})
    thread.join(TIMEOUT)
    if errors:
        raise errors[0]
    m = FIGURES.findall(source_log())
    if not m:
        raise RuntimeError("no figures in the source's log")
    return float(m[-1][0]), float(m[-1][1])


def _accepts(url: str) -> bool:
    """The port of ``url`` is in LISTEN (/proc/net/tcp; a connection to find out would be
    taken for the migration)."""
    port = int(url.rsplit(":", 1)[1])
    with open("/proc/net/tcp") as f:
        return any(fields[1].endswith(f":{port:04X}") and fields[3] == "0A"
                   for fields in (line.split() for line in list(f)[1:]))


def bench_pych(memory_mib: int, hops: list[str]) -> dict[str, tuple[float, float]]:
    """Boot under pych with ``memory_mib``, start the loop, migrate along ``hops`` ("unix",
    "tcp", "local"); each hop's (downtime, total)."""
    results: dict[str, tuple[float, float]] = {}
    with tempfile.TemporaryDirectory() as d:
        work = Path(d)
        g = PychGuest(work / "src", memory=f"size={memory_mib}M,shared=on", extra_args=["-v"])
        destinations: list[Destination] = []
        try:
            g.start()
            g.wait_ready(TIMEOUT)
            rc, out = g.run(LOOP, timeout=TIMEOUT)
            if rc != 0:
                raise RuntimeError(out)
            source_api, source_log = g.api_path, lambda: g.log_path.read_text(errors="replace")
            for n, hop in enumerate(hops):
                dst = Destination(work, f"dst{n}")
                destinations.append(dst)
                url = f"tcp:127.0.0.1:{free_port()}" if hop == "tcp" else f"unix:{work}/m{n}.sock"
                results[hop] = pych_hop(source_api, source_log, dst, url, local=hop == "local")
                source_api, source_log = dst.api_path, dst.log
            # the guest still counts on the last destination
            console = Console.connect_unix(g.serial_path, 30)
            try:
                shell = Shell(console)
                shell.prepare()
                rc, first = shell.run("cat /mnt/m/counter")
                time.sleep(1)
                rc, second = shell.run("cat /mnt/m/counter")
                if not int(second) > int(first):
                    raise RuntimeError(f"the guest's loop stopped: {first} then {second}")
            finally:
                console.close()
        finally:
            g.stop()
            for dst in destinations:
                dst.stop()
    return results


# --- QEMU -----------------------------------------------------------------------------------
def qemu_args(memory_mib: int, qmp: str) -> list[str]:
    cmd = qemu_command(guest_artifacts(), machine="q35", memory=f"{memory_mib}M")
    return cmd + ["-qmp", f"unix:{qmp},server=on,wait=off"]


def qemu_migrate(source: Qmp, uri: str) -> tuple[float, float]:
    source.execute("migrate", uri=uri)
    deadline = time.monotonic() + TIMEOUT
    while True:
        info = source.execute("query-migrate")
        status = info.get("status")
        if status == "completed":
            return float(info["downtime"]), float(info["total-time"])
        if status in ("failed", "cancelled") or time.monotonic() > deadline:
            raise RuntimeError(f"QEMU migration {status}: {json.dumps(info)}")
        time.sleep(0.05)


def bench_qemu(memory_mib: int) -> dict[str, tuple[float, float]]:
    """Boot q35 with ``memory_mib``, start the loop, migrate over unix: then tcp:."""
    results: dict[str, tuple[float, float]] = {}
    procs: list[subprocess.Popen] = []
    with tempfile.TemporaryDirectory() as d:
        work = Path(d)
        try:
            src = subprocess.Popen(qemu_args(memory_mib, f"{work}/q0.qmp"), stdin=subprocess.PIPE,
                                   stdout=subprocess.PIPE, stderr=subprocess.DEVNULL)
            procs.append(src)
            console = Console(src.stdout.fileno(), src.stdin.fileno())
            console.expect(READY, TIMEOUT)
            shell = Shell(console)
            shell.prepare()
            rc, out = shell.run(LOOP, timeout=TIMEOUT)
            if rc != 0:
                raise RuntimeError(out)
            qmp = Qmp(f"{work}/q0.qmp")
            for n, hop in enumerate(("unix", "tcp"), start=1):
                uri = (f"unix:{work}/qm{n}.sock" if hop == "unix"
                       else f"tcp:127.0.0.1:{free_port()}")
                args = qemu_args(memory_mib, f"{work}/q{n}.qmp")
                args[args.index("-serial") + 1] = "null"
                dst = subprocess.Popen(args + ["-incoming", uri], stdin=subprocess.DEVNULL,
                                       stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
                procs.append(dst)
                dst_qmp = Qmp(f"{work}/q{n}.qmp")
                results[hop] = qemu_migrate(qmp, uri)
                qmp.close()
                qmp = dst_qmp
            qmp.close()
        finally:
            for p in procs:
                p.kill()
                p.wait()
    return results


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    add_runs_argument(ap)
    args = ap.parse_args()
    run = Run("migration", f"bench/migration.py --runs {args.runs}", args.runs)
    contenders = {
        "pych 256 MiB": lambda: bench_pych(256, ["unix", "tcp", "local"]),
        "pych 1 GiB": lambda: bench_pych(1024, ["unix", "local"]),
        "QEMU q35 256 MiB": lambda: bench_qemu(256),
    }
    results: dict[str, list[dict[str, tuple[float, float]]]] = {name: [] for name in contenders}
    for i in run.runs_range():
        for name in rotated(list(contenders), i):
            print(f"run {i + 1}: {name}", flush=True)
            results[name].append(contenders[name]())

    def series(name: str, hop: str, which: int) -> list[float]:
        return [r[hop][which] for r in results[name] if hop in r]

    rows = []
    for label, name, hop, peer in [
        ("Unix socket, pre-copy, 256 MiB", "pych 256 MiB", "unix", "unix"),
        ("TCP 127.0.0.1, pre-copy, 256 MiB", "pych 256 MiB", "tcp", "tcp"),
        ("`local` (memory by fd), 256 MiB", "pych 256 MiB", "local", None),
        ("Unix socket, pre-copy, 1 GiB", "pych 1 GiB", "unix", None),
        ("`local` (memory by fd), 1 GiB", "pych 1 GiB", "local", None),
    ]:
        qemu = "QEMU q35 256 MiB"
        row = [label, stat(series(name, hop, 0)), stat(series(name, hop, 1))]
        if peer:
            row += [stat(series(qemu, peer, 0)), stat(series(qemu, peer, 1)),
                    ratio(series(name, hop, 0), series(qemu, peer, 0))]
        else:
            row += ["—", "—", "—"]
        rows.append(row)
    body = markdown_table(["migration", "pych downtime (ms)", "pych total (ms)",
                           "QEMU downtime (ms)", "QEMU total (ms)", "downtime pych / QEMU"],
                          rows)
    body += ("\n\nThe guest writes memory throughout (a counter in tmpfs, 10×/s). pych's "
             "downtime: from pausing the source's vCPUs to the destination letting its vCPUs "
             "run; QEMU's: `query-migrate`'s `downtime`. Goal: downtime ≤ QEMU's; "
             "`local` independent of guest RAM size.")
    run.write(body, no_write=args.no_write)
    return 0


if __name__ == "__main__":
    sys.exit(main())
