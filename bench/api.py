"""Control-API latency: pych ``vmm.ping`` / ``vm.info`` on the API socket vs QEMU QMP
``query-status``, p50/p99 over N requests, with the guest idle and with the guest running a
CPU-bound loop. The guests are few-instruction PVH guests (``tests.support.microguest``; the
same ELF under QEMU ``-M microvm``), so the numbers are the VMMs' own. Each run starts each
VMM afresh, who goes first rotating.

Writes its table to docs/benchmarks.md (``<!-- bench:api -->``). Start-up figures are
bench/startup.py's.

    .venv/bin/python bench/api.py [--runs 3] [--requests 2000]
"""

from __future__ import annotations

import argparse
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from pych.api.client import ApiClient

# Run as `python bench/<name>.py`: the repository root goes on sys.path for the test
# harness (tests.support), which is not part of the installed pych package.
sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from bench.qmp import Qmp  # noqa: E402
from bench.report import Run, add_runs_argument, markdown_table, ratio, rotated, stat  # noqa: E402
from tests.support.guest import REPO  # noqa: E402
from tests.support.microguest import build_elf  # noqa: E402

HALT_LOOP = b"\xfa\xf4\xeb\xfd"          # cli; hlt; jmp hlt   (an idle vCPU)
BUSY_LOOP = b"\xeb\xfe"                  # jmp $               (a CPU-bound vCPU)
GUESTS = {"idle guest": HALT_LOOP, "CPU-bound guest": BUSY_LOOP}


def start_pych(sock: str) -> subprocess.Popen:
    t0 = time.monotonic()
    p = subprocess.Popen([str(REPO / ".venv/bin/pych"), "--api-socket", sock],
                         stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    while True:
        try:
            if ApiClient(sock).get("vmm.ping")[0] == 200:
                return p
        except OSError:
            pass
        if time.monotonic() - t0 > 30:
            p.kill()
            raise RuntimeError("pych never answered vmm.ping")
        time.sleep(0.001)


def timed(n: int, request) -> list[float]:
    out = []
    for _ in range(n):
        t = time.perf_counter()
        request()
        out.append(time.perf_counter() - t)
    return out


def pct(xs: list[float], q: int) -> float:
    return statistics.quantiles(xs, n=100)[q - 1] * 1000


def bench_pych(work: Path, kernel: Path, n: int) -> dict[str, list[float]]:
    sock = str(work / "pych.sock")
    p = start_pych(sock)
    try:
        c = ApiClient(sock)
        st, body = c.put("vm.create", {"payload": {"kernel": str(kernel)},
                                       "memory": {"size": 64 << 20},
                                       "serial": {"mode": "Null"}, "console": {"mode": "Off"}})
        assert st == 204, body
        assert c.put("vm.boot")[0] == 204

        def get(path):
            status, _ = c.get(path)
            assert status == 200, (path, status)
        return {path: timed(n, lambda: get(path)) for path in ("vmm.ping", "vm.info")}
    finally:
        p.terminate()
        p.wait()


def bench_qemu(work: Path, kernel: Path, n: int) -> dict[str, list[float]]:
    sock = str(work / "qmp.sock")
    p = subprocess.Popen(["qemu-system-x86_64", "-M", "microvm", "-enable-kvm", "-cpu",
                          "host,-arch-capabilities,-cx16", "-m", "64M", "-smp", "1",
                          "-nodefaults", "-no-user-config", "-display", "none",
                          "-serial", "null", "-kernel", str(kernel),
                          "-qmp", f"unix:{sock},server=on,wait=off"],
                         stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    try:
        qmp = Qmp(sock, 30)
        try:
            return {"query-status": timed(n, lambda: qmp.execute("query-status"))}
        finally:
            qmp.close()
    finally:
        p.kill()
        p.wait()


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    add_runs_argument(ap)
    ap.add_argument("--requests", type=int, default=2000)
    args = ap.parse_args()
    run = Run("api", f"bench/api.py --runs {args.runs} --requests {args.requests}", args.runs)
    work = Path(tempfile.mkdtemp(prefix="pych-bench-api-"))
    vmms = {"pych": bench_pych, "QEMU": bench_qemu}
    # (guest, VMM, request) -> per run (p50, p99) in ms
    results: dict[tuple[str, str, str], list[tuple[float, float]]] = {}
    for label, code in GUESTS.items():
        kernel = work / f"{label.split()[0]}.elf"
        kernel.write_bytes(build_elf(code))
        for i in run.runs_range():
            for vmm in rotated(list(vmms), i):
                for request, xs in vmms[vmm](work, kernel, args.requests).items():
                    results.setdefault((label, vmm, request), []).append((pct(xs, 50), pct(xs, 99)))
                    print(f"run {i + 1}: {label}, {vmm} {request}: p50 {pct(xs, 50):.3f} ms, "
                          f"p99 {pct(xs, 99):.3f} ms", flush=True)
    rows = []
    for (label, vmm, request), per_run in results.items():
        p50 = [a for a, _ in per_run]
        p99 = [b for _, b in per_run]
        peer = [a for a, _ in results[(label, "QEMU", "query-status")]]
        rows.append([label, vmm, request, stat(p50, ".3f"), stat(p99, ".3f"),
                     ratio(p50, peer) if vmm == "pych" else "—"])
    body = markdown_table(["guest", "VMM", "request", "p50 (ms)", "p99 (ms)",
                           "p50 / QEMU's query-status p50"], rows)
    body += (f"\n\n{args.requests} requests per VMM, guest and run, one at a time on one "
             "connection; medians over the runs of each run's p50 and p99 (min–max). "
             "Goal: p50 < 1 ms, p99 < 5 ms.")
    run.write(body, no_write=args.no_write)
    return 0


if __name__ == "__main__":
    sys.exit(main())
