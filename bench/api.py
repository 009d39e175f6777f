"""API latency: process start to the first ``vmm.ping`` answer, and ``vmm.ping`` /
``vm.info`` latency (p50/p99 over N requests) with the guest idle and with the guest
running a CPU-bound loop. The guests are few-instruction PVH guests
(``tests.support.microguest``), so the numbers are the VMM's own.

    .venv/bin/python bench/api.py [--requests 2000]
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

from tests.support.guest import REPO  # noqa: E402
from tests.support.microguest import build_elf  # noqa: E402

HALT_LOOP = b"\xfa\xf4\xeb\xfd"          # cli; hlt; jmp hlt   (an idle vCPU)
BUSY_LOOP = b"\xeb\xfe"                  # jmp $               (a CPU-bound vCPU)


def start_vmm(sock: str) -> tuple[subprocess.Popen, float]:
    t0 = time.monotonic()
    p = subprocess.Popen([str(REPO / ".venv/bin/pych"), "--api-socket", sock],
                         stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    while True:
        try:
            c = ApiClient(sock)
            if c.get("vmm.ping")[0] == 200:
                return p, time.monotonic() - t0
        except OSError:
            pass
        if time.monotonic() - t0 > 30:
            p.kill()
            raise RuntimeError("pych never answered vmm.ping")
        time.sleep(0.001)


def latencies(client: ApiClient, path: str, n: int) -> list[float]:
    out = []
    for _ in range(n):
        t = time.perf_counter()
        status, _ = client.get(path)
        out.append(time.perf_counter() - t)
        assert status == 200, (path, status)
    return out


def pct(xs: list[float], q: float) -> float:
    return statistics.quantiles(xs, n=100)[int(q) - 1] * 1000


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--requests", type=int, default=2000)
    args = ap.parse_args()
    work = Path(tempfile.mkdtemp(prefix="pych-bench-api-"))
    starts = []
    for i in range(5):
        p, t = start_vmm(str(work / f"s{i}.sock"))
        starts.append(t)
        p.terminate()
        p.wait()
    print(f"process start -> first vmm.ping: median {statistics.median(starts) * 1000:.0f} ms "
          f"(min {min(starts) * 1000:.0f}, 5 runs; goal <= 150 ms)")
    rows = []
    for label, code in (("idle guest", HALT_LOOP), ("CPU-bound guest", BUSY_LOOP)):
        kernel = work / f"{label.split()[0]}.elf"
        kernel.write_bytes(build_elf(code))
        sock = str(work / f"{label.split()[0]}.sock")
        p, _ = start_vmm(sock)
        try:
            c = ApiClient(sock)
            st, body = c.put("vm.create", {"payload": {"kernel": str(kernel)}, "memory": {"size": 64 << 20},
                                           "serial": {"mode": "Null"}, "console": {"mode": "Off"}})
            assert st == 204, body
            assert c.put("vm.boot")[0] == 204
            for path in ("vmm.ping", "vm.info"):
                xs = latencies(c, path, args.requests)
                rows.append((label, path, pct(xs, 50), pct(xs, 99)))
        finally:
            p.terminate()
            p.wait()
    print("\n| guest | request | p50 (ms) | p99 (ms) |\n|---|---|---|---|")
    for label, path, p50, p99 in rows:
        print(f"| {label} | {path} | {p50:.2f} | {p99:.2f} |")
    print("\ngoal: p50 < 1 ms, p99 < 5 ms")
    return 0


if __name__ == "__main__":
    sys.exit(main())
