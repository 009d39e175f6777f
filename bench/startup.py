"""Start-up: how soon the VMM answers its API, and how soon it runs a guest's first
instructions — pych vs QEMU, who goes first rotating run by run.

* process start → the control API answers: pych ``pych --api-socket S`` until ``GET
  vmm.ping`` is answered 200 (no VM); QEMU ``-M none -qmp unix:S`` until ``query-status``
  is answered (the QMP greeting and ``qmp_capabilities`` first, as any QMP client must).
* where pych's start-up goes, in the same runs: exec → exit of its interpreter running
  ``-c pass`` (the interpreter and its site-packages), and the import of the modules of the
  no-VM start path (``pych.cli.main``, ``pych.cli.process``, ``pych.api.http``) timed inside
  a fresh interpreter; the rest of the ping figure is building the argument parser, the VMM,
  the server thread and its socket, and the first request.
* exec → the guest's first I/O exit: a few-instruction PVH guest (``tests.support.
  microguest``: ``mov dx, 0x3f8; mov al, 'X'; out dx, al``, the same ELF for both) with
  256 MiB, until its ``X`` arrives on the VMM's serial output (pych ``--serial tty``, QEMU
  ``-M microvm -serial stdio``). That is the VMM's own boot cost: parsing its arguments,
  creating the VM and its memory, loading the ELF, the vCPU's first ``KVM_RUN``. QEMU
  microvm runs its qboot firmware before the ELF's entry point (it cannot be left out), so
  its figure includes that firmware's few instructions.

Writes its table to docs/benchmarks.md (``<!-- bench:startup -->``).

    .venv/bin/python bench/startup.py [--runs 3]
"""

from __future__ import annotations

import argparse
import importlib.util
import os
import select
import socket
import subprocess
import sys
import tempfile
import time
from pathlib import Path

# Run as `python bench/<name>.py`: the repository root goes on sys.path for the test
# harness (tests.support), which is not part of the installed pych package.
sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from bench.qmp import Qmp  # noqa: E402
from bench.report import Run, add_runs_argument, markdown_table, ratio, rotated, stat  # noqa: E402
from tests.support.guest import REPO  # noqa: E402
from tests.support.microguest import build_elf, serial_then_poweroff  # noqa: E402

PYCH = str(REPO / ".venv" / "bin" / "pych")
PYTHON = str(REPO / ".venv" / "bin" / "python")     # pych's interpreter (its script's #!)
START_PATH = "import pych.cli.main, pych.cli.process, pych.api.http"
QEMU = "qemu-system-x86_64"
TIMEOUT = 30


def _wait(p: subprocess.Popen, t0: float, what: str) -> None:
    if p.poll() is not None:
        raise RuntimeError(f"{what} exited {p.returncode} before answering")
    if time.monotonic() - t0 > TIMEOUT:
        raise RuntimeError(f"{what} did not answer in {TIMEOUT} s")
    time.sleep(0.0005)


def product_env() -> dict[str, str]:
    """The environment a user's pych runs in: its modules' bytecode compiled (pip compiles
    it at install; a checkout compiles it on first run), which this environment may forbid
    (PYTHONDONTWRITEBYTECODE): compile it here, and let the child read it."""
    spec = importlib.util.find_spec("pych")
    subprocess.run([sys.executable, "-m", "compileall", "-q", str(Path(spec.origin).parent)],
                   check=True, env={k: v for k, v in os.environ.items()
                                    if k != "PYTHONDONTWRITEBYTECODE"})
    return {k: v for k, v in os.environ.items() if k != "PYTHONDONTWRITEBYTECODE"}


ENV: dict[str, str] = {}


def ping_pych(workdir: Path) -> float:
    sock = str(workdir / "pych.sock")
    t0 = time.monotonic()
    p = subprocess.Popen([PYCH, "--api-socket", sock], stdout=subprocess.DEVNULL,
                         stderr=subprocess.DEVNULL, env=ENV)
    try:
        while True:
            s = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
            try:
                s.connect(sock)
                s.sendall(b"GET /api/v1/vmm.ping HTTP/1.1\r\nHost: localhost\r\n\r\n")
                if s.recv(64).startswith(b"HTTP/1.1 200"):
                    return time.monotonic() - t0
            except OSError:
                pass
            finally:
                s.close()
            _wait(p, t0, "pych")
    finally:
        p.terminate()
        p.wait()
        if os.path.exists(sock):
            os.unlink(sock)


def ping_qemu(workdir: Path) -> float:
    sock = str(workdir / "qmp.sock")
    t0 = time.monotonic()
    p = subprocess.Popen([QEMU, "-M", "none", "-nodefaults", "-no-user-config", "-display",
                          "none", "-qmp", f"unix:{sock},server=on,wait=off"],
                         stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    try:
        while not os.path.exists(sock):
            _wait(p, t0, "QEMU")
        qmp = Qmp(sock, TIMEOUT)
        try:
            qmp.execute("query-status")
            return time.monotonic() - t0
        finally:
            qmp.close()
    finally:
        p.kill()
        p.wait()


def first_output(cmd: list[str]) -> float:
    """exec of ``cmd`` → the first byte on its standard output."""
    t0 = time.monotonic()
    p = subprocess.Popen(cmd, stdin=subprocess.DEVNULL, stdout=subprocess.PIPE,
                         stderr=subprocess.DEVNULL, env=ENV)
    try:
        ready, _, _ = select.select([p.stdout], [], [], TIMEOUT)
        t = time.monotonic() - t0
        if not ready or os.read(p.stdout.fileno(), 1) != b"X":
            raise RuntimeError(f"{cmd[0]}: no guest output in {TIMEOUT} s")
        return t
    finally:
        p.kill()
        p.wait()


def interpreter() -> float:
    """exec → exit of pych's interpreter doing nothing (``-c pass``): its own start, with
    site-packages, and its exit."""
    t0 = time.monotonic()
    subprocess.run([PYTHON, "-c", "pass"], stdin=subprocess.DEVNULL, env=ENV, check=True,
                   timeout=TIMEOUT)
    return time.monotonic() - t0


def imports() -> float:
    """The import of the no-VM start path's modules, timed inside a fresh interpreter."""
    code = ("import time; t = time.perf_counter(); " + START_PATH
            + "; print(time.perf_counter() - t)")
    out = subprocess.run([PYTHON, "-c", code], stdin=subprocess.DEVNULL, env=ENV, check=True,
                         timeout=TIMEOUT, capture_output=True, text=True).stdout
    return float(out)


PARTS = {"interpreter": interpreter, "imports": imports}


def guest_pych(elf: Path) -> float:
    return first_output([PYCH, "--kernel", str(elf), "--memory", "size=256M", "--cpus", "boot=1",
                         "--serial", "tty", "--console", "off"])


def guest_qemu(elf: Path) -> float:
    return first_output([QEMU, "-M", "microvm", "-enable-kvm", "-cpu",
                         "host,-arch-capabilities,-cx16", "-m", "256M", "-smp", "1",
                         "-nodefaults", "-no-user-config", "-display", "none",
                         "-serial", "stdio", "-kernel", str(elf)])


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    add_runs_argument(ap)
    args = ap.parse_args()
    run = Run("startup", f"bench/startup.py --runs {args.runs}", args.runs)
    ENV.update(product_env())
    work = Path(tempfile.mkdtemp(prefix="pych-bench-startup-"))
    elf = work / "guest.elf"
    elf.write_bytes(build_elf(serial_then_poweroff(b"X")))
    rows = {"ping": (ping_pych, ping_qemu), "guest": (guest_pych, guest_qemu)}
    results: dict[str, dict[str, list[float]]] = {row: {"pych": [], "QEMU": []} for row in rows}
    parts: dict[str, list[float]] = {part: [] for part in PARTS}
    for measure in PARTS.values():             # warm-up
        measure()
    for row, (pych, qemu) in rows.items():
        arg = work if row == "ping" else elf
        for what in ("pych", "QEMU"):          # a warm-up of each: page cache, not counted
            (pych if what == "pych" else qemu)(arg)
        for i in run.runs_range():
            for who in rotated(["pych", "QEMU"], i):
                t = (pych if who == "pych" else qemu)(arg)
                results[row][who].append(t * 1000)
                print(f"run {i + 1}: {row} {who}: {t * 1000:.0f} ms", flush=True)
            if row == "ping":                  # pych's parts, in the same runs
                for part, measure in PARTS.items():
                    parts[part].append(measure() * 1000)
                print(f"run {i + 1}: pych's interpreter {parts['interpreter'][-1]:.0f} ms, "
                      f"the start path's imports {parts['imports'][-1]:.0f} ms", flush=True)
    table = markdown_table(
        ["figure", "pych (ms)", "QEMU (ms)", "pych / QEMU", "goal"],
        [["process start → control API answers (no VM): pych `vmm.ping`, QEMU `-M none` "
          "QMP `query-status`", stat(results["ping"]["pych"], ".0f"),
          stat(results["ping"]["QEMU"], ".0f"),
          ratio(results["ping"]["pych"], results["ping"]["QEMU"]), "pych ≤ 150 ms"],
         ["… of which pych's interpreter alone: `python -c pass`, exec → exit",
          stat(parts["interpreter"], ".0f"), "—", "—", "—"],
         ["… of which importing the no-VM start path (`pych.cli.main`, `pych.cli.process`, "
          "`pych.api.http`; timed in the process)", stat(parts["imports"], ".0f"), "—", "—",
          "—"],

         ["exec → the guest's first I/O exit (few-instruction PVH ELF, 256 MiB; QEMU "
          "`-M microvm`)", stat(results["guest"]["pych"], ".0f"),
          stat(results["guest"]["QEMU"], ".0f"),
          ratio(results["guest"]["pych"], results["guest"]["QEMU"]), "—"]])
    run.write(table, no_write=args.no_write)
    return 0


if __name__ == "__main__":
    sys.exit(main())
