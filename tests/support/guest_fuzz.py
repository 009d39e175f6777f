"""The guest-side fuzzer's host half: build the fuzz guest, boot it under pych with every
device model attached, and check pych after each scenario the guest reports.

The guest (``tests/fuzzguest/``: C and a few lines of assembly, built here with Debian's gcc
into ``build/fuzzguest/``) is a freestanding 32-bit PVH kernel that enumerates PCI through
ECAM, moves the BARs into the 32-bit window, and then, scenario by scenario, drives each
virtio device with hostile queues (avail.idx jumps, descriptor loops, addresses outside RAM,
huge lengths, indirect tables, resets with requests in flight, random config and MSI-X
writes of every width), pokes ports (serial, i8042, CMOS, the ACPI sleep/PM timer block,
0xCF8/0xCFC) and MMIO (ECAM, every BAR window, GED and the three hot plug register blocks)
with random values of every width. After each scenario it prints
``FUZZ-SCENARIO <n> <kind> seed=<seed> done`` and waits for one byte on its serial port;
:class:`FuzzGuest` checks pych in the meantime (:meth:`FuzzGuest.check`) and sends the byte.

Bounds checked after every scenario (:data:`BOUNDS`): pych alive; ``vmm.ping`` and
``vm.info`` answer, the VM is ``Running``; threads and fds at most a few more than after the
first scenario; anonymous memory (RssAnon: pych's own heap, not the guest RAM it maps) at
most 64 MiB above it; pych's log without a traceback, without a device exception the bus
contained ("failed in") and under 1 MiB; the read-only disk
image and the kernel unchanged (SHA-256); no file appeared or changed size in the work
directory except those the guest may write (the read-write disk's contents, the pmem file's
contents, the console file, the logs).

The guest never writes the ACPI sleep/reset register, 0xCF9 or the i8042 reset command
(0xFE to port 0x64) during the fuzzing: each ends the VM on purpose, a deliberate one-line
stop rather than a finding. It powers off through the sleep register when it is done.
"""

from __future__ import annotations

import hashlib
import json
import os
import re
import shutil
import subprocess
import time
from dataclasses import dataclass, field
from pathlib import Path

from pych.api.client import ApiClient
from pych.arch.x86_64 import layout

from tests.support.guest import REPO, Console
from tests.support.host import unix_socket_listening
from tests.support.microguest import build_elf

SOURCE = REPO / "tests" / "fuzzguest"
BUILD = REPO / "build" / "fuzzguest"
VIRTIOFSD = "/usr/lib/qemu/virtiofsd"
CFLAGS = ["-m32", "-march=i686", "-O2", "-ffreestanding", "-fno-pic", "-no-pie",
          "-fno-stack-protector", "-fno-builtin", "-nostdlib", "-static", "-mgeneral-regs-only",
          "-Wall", "-Wextra", "-Werror"]
SCENARIO = re.compile(rb"FUZZ-SCENARIO (\d+) (\w+) seed=(\d+) done\n")
RAM = 256 << 20
DEVICE_FAILED = re.compile(rb"[^\n]*-byte (?:read|write) at 0x[0-9a-f]+ failed in [^\n]*")

# What pych may grow by, measured from the first scenario's end (stated bounds).
BOUNDS = {"threads": 4, "fds": 16, "rss_anon_kib": 64 << 10, "log_bytes": 1 << 20}


class FuzzFailure(AssertionError):
    pass


def build_guest(out: Path = BUILD) -> Path:
    """Compile ``tests/fuzzguest`` with gcc and wrap the flat image in a PVH ELF; returns
    the kernel's path (rebuilt every time: it takes under a second)."""
    out.mkdir(parents=True, exist_ok=True)
    elf32, flat, kernel = out / "fuzz32.elf", out / "fuzz.bin", out / "fuzz-guest.elf"
    subprocess.run(["gcc", *CFLAGS, "-Wl,-T," + str(SOURCE / "link.ld"),
                    "-Wl,--build-id=none", "-Wl,--no-warn-rwx-segments", "-o", str(elf32),
                    str(SOURCE / "entry.S"), str(SOURCE / "fuzz.c")],
                   check=True, capture_output=True, timeout=120)
    subprocess.run(["objcopy", "-O", "binary", str(elf32), str(flat)], check=True, timeout=60)
    kernel.write_bytes(build_elf(flat.read_bytes()))       # entry: the image's first byte
    return kernel


def sha256(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


def proc_stats(pid: int) -> dict[str, int]:
    status = Path(f"/proc/{pid}/status").read_text()
    rss_anon = int(re.search(r"RssAnon:\s+(\d+) kB", status).group(1))
    return {"threads": len(os.listdir(f"/proc/{pid}/task")),
            "fds": len(os.listdir(f"/proc/{pid}/fd")), "rss_anon_kib": rss_anon}


@dataclass
class ScenarioResult:
    index: int
    kind: str
    seconds: float
    stats: dict[str, int]


@dataclass
class FuzzGuest:
    """One pych process running the fuzz guest with ``seed``; ``netns`` (a namespace name)
    gives it a NIC on a tap inside that namespace."""

    workdir: Path
    seed: int
    scenarios: int
    rounds: int
    netns: str | None = None
    results: list[ScenarioResult] = field(default_factory=list)

    def __post_init__(self) -> None:
        self.workdir = Path(self.workdir)
        self.workdir.mkdir(parents=True, exist_ok=True)
        self.proc: subprocess.Popen | None = None
        self.virtiofsd: subprocess.Popen | None = None
        self.console: Console | None = None
        self.baseline: dict[str, int] | None = None

    # --- set up ------------------------------------------------------------------------
    def _files(self) -> None:
        w = self.workdir
        self.kernel = build_guest(w / "build")
        self.ro = w / "ro.raw"
        self.ro.write_bytes(os.urandom(1 << 20))
        self.rw = w / "rw.raw"
        self.rw.write_bytes(bytes(1 << 20))
        self.pmem = w / "pmem.raw"
        self.pmem.write_bytes(bytes(2 << 20))
        self.share = w / "share"
        self.share.mkdir(exist_ok=True)
        (self.share / "file").write_text("fuzz guest share\n")
        # the share is the guest's to write (virtiofsd serves it), so it is not checked
        self.hashes = {self.ro: sha256(self.ro), self.kernel: sha256(self.kernel)}
        self.sizes = {p: p.stat().st_size for p in (self.rw, self.pmem)}

    def cmdline(self) -> str:
        return (f"seed={self.seed} scenarios={self.scenarios} rounds={self.rounds} ram={RAM} "
                f"ecam={layout.PCI_MMCONFIG_START:#x} hp={layout.PLATFORM_DEVICE_AREA_START:#x}")

    def args(self) -> list[str]:
        w = self.workdir
        args = [str(REPO / ".venv" / "bin" / "pych"), "--kernel", str(self.kernel),
                "--cmdline", self.cmdline(),
                "--cpus", "boot=1,max=2",
                "--memory", f"size={RAM >> 20}M,hotplug_method=virtio-mem,hotplug_size=128M",
                "--serial", f"socket={w / 'serial.sock'}",
                "--console", f"file={w / 'console.out'}",
                "--api-socket", str(w / "api.sock"),
                "--disk", f"path={self.ro},readonly=on", f"path={self.rw}",
                "--rng", "src=/dev/urandom",
                "--pmem", f"file={self.pmem}",
                "--vsock", f"cid=3,socket={w / 'vsock.sock'}",
                "--balloon", "size=0"]
        if self.netns:
            args += ["--net", "tap=,ip=192.168.250.1,mask=255.255.255.0"]
        if os.path.exists(VIRTIOFSD):
            args += ["--fs", f"tag=fuzz,socket={w / 'fs.sock'}"]
        if self.netns:
            args = ["ip", "netns", "exec", self.netns, *args]
        return args

    def start(self) -> "FuzzGuest":
        self._files()
        w = self.workdir
        if os.path.exists(VIRTIOFSD):
            self.virtiofsd = subprocess.Popen(
                [VIRTIOFSD, f"--socket-path={w / 'fs.sock'}", "-o", f"source={self.share}",
                 "-o", "cache=none"], stdin=subprocess.DEVNULL,
                stdout=subprocess.DEVNULL, stderr=open(w / "virtiofsd.log", "wb"))
            deadline = time.monotonic() + 30
            while not unix_socket_listening(str(w / "fs.sock")):
                if time.monotonic() > deadline or self.virtiofsd.poll() is not None:
                    raise FuzzFailure(f"virtiofsd did not start: {self._tail('virtiofsd.log')}")
                time.sleep(0.05)
        self.log = open(w / "pych.log", "wb")
        self.proc = subprocess.Popen(self.args(), stdin=subprocess.DEVNULL, stdout=self.log,
                                     stderr=self.log)
        self.console = Console.connect_unix(str(w / "serial.sock"), 60, w / "serial.log",
                                            alive=lambda: self.proc.poll() is None)
        self.allowed = {p.name for p in w.iterdir()} | {"console.out", "fs.sock", "vsock.sock"}
        return self

    def _tail(self, name: str, n: int = 3000) -> str:
        try:
            return (self.workdir / name).read_text(errors="replace")[-n:]
        except OSError:
            return ""

    # --- run ---------------------------------------------------------------------------
    def fail(self, why: str) -> FuzzFailure:
        return FuzzFailure(f"seed {self.seed}: {why}\n--- pych log:\n{self._tail('pych.log')}"
                           f"\n--- serial:\n{self.console.tail(1500) if self.console else ''}")

    def run(self, scenario_timeout: float = 600, on_scenario=None) -> list[ScenarioResult]:
        """Run every scenario, checking pych after each; returns what each measured."""
        try:
            m = self.console.expect(re.compile(rb"FUZZ-GUEST seed=(\d+) "), 120)
        except Exception as e:
            raise self.fail(f"the guest never started: {e}") from None
        if int(m.group(1)) != self.seed:
            raise self.fail(f"the guest printed seed {m.group(1)!r}")
        pos = m.end()
        started = time.monotonic()
        for n in range(self.scenarios):
            try:
                m = self.console.expect(SCENARIO, scenario_timeout, pos)
            except Exception as e:
                raise self.fail(f"scenario {n} never finished (a hang or a dead VM): {e}") \
                    from None
            pos = m.end()
            kind = m.group(2).decode()
            stats = self.check(f"scenario {n} ({kind})")
            result = ScenarioResult(int(m.group(1)), kind, time.monotonic() - started, stats)
            self.results.append(result)
            if on_scenario:
                on_scenario(result)
            started = time.monotonic()
            self.console.send("c")
        try:
            self.console.expect(b"FUZZ-GUEST-DONE", scenario_timeout, pos)
            rc = self.proc.wait(120)
        except Exception as e:
            raise self.fail(f"the guest did not finish: {e}") from None
        if rc != 0:
            raise self.fail(f"pych exited {rc} after the guest powered off")
        self.check_files()
        return self.results

    def check(self, where: str) -> dict[str, int]:
        if self.proc.poll() is not None:
            raise self.fail(f"{where}: pych exited ({self.proc.returncode})")
        api = ApiClient(str(self.workdir / "api.sock"), timeout=30)
        try:
            ping, _ = api.get("vmm.ping")
            status, body = api.get("vm.info")
        except Exception as e:
            raise self.fail(f"{where}: the API did not answer: {e}") from None
        if ping != 200 or status != 200:
            raise self.fail(f"{where}: vmm.ping {ping}, vm.info {status} {body!r}")
        state = json.loads(body)["state"]
        if state != "Running":
            raise self.fail(f"{where}: the VM is {state}")
        log = (self.workdir / "pych.log").read_bytes()
        at = log.find(b"Traceback")
        if at >= 0:
            raise self.fail(f"{where}: a traceback in pych's log:\n"
                            f"{log[max(0, at - 300):at + 1500].decode(errors='replace')}")
        failed = DEVICE_FAILED.search(log)
        if failed:                             # the bus contained a device's exception
            raise self.fail(f"{where}: a device failed on a guest access: "
                            f"{failed.group(0).decode(errors='replace')}")
        if len(log) > BOUNDS["log_bytes"]:
            raise self.fail(f"{where}: pych's log grew to {len(log)} bytes")
        stats = proc_stats(self.proc.pid)
        if self.baseline is None:
            self.baseline = stats
        for key, value in stats.items():
            if value > self.baseline[key] + BOUNDS[key]:
                raise self.fail(f"{where}: {key} {value}, more than {self.baseline[key]} + "
                                f"{BOUNDS[key]}")
        self.check_files(where)
        return stats

    def check_files(self, where: str = "at the end") -> None:
        for path, digest in self.hashes.items():
            if sha256(path) != digest:
                raise self.fail(f"{where}: {path.name} changed (the guest may not write it)")
        for path, size in self.sizes.items():
            if path.stat().st_size != size:
                raise self.fail(f"{where}: {path.name} is {path.stat().st_size} bytes, "
                                f"not {size}")
        extra = {p.name for p in self.workdir.iterdir()} - self.allowed
        if extra:
            raise self.fail(f"{where}: files appeared: {sorted(extra)}")

    def stop(self) -> None:
        for proc in (self.proc, self.virtiofsd):
            if proc and proc.poll() is None:
                proc.terminate()
                try:
                    proc.wait(15)
                except subprocess.TimeoutExpired:
                    proc.kill()
                    proc.wait()
        if self.console:
            self.console.close()
        if getattr(self, "log", None):
            self.log.close()

    def __enter__(self) -> "FuzzGuest":
        return self.start()

    def __exit__(self, *exc) -> None:
        self.stop()


def scenario_count(passes: int, net: bool) -> int:
    """Scenarios for ``passes`` passes over the devices :class:`FuzzGuest` attaches: every
    virtio device (2 disks, rng, console, pmem, vsock, balloon, virtio-mem, and net and fs
    where present) once, then ports, MMIO and the hot plug blocks (the guest's own order)."""
    virtio = 8 + int(net) + int(os.path.exists(VIRTIOFSD))
    return passes * (virtio + 3)


def cleanup(workdir: Path) -> None:
    shutil.rmtree(workdir, ignore_errors=True)
