"""Boot time: pych vs QEMU on the same guest, same kernel, initramfs and cmdline.

Boots the test guest alternately under pych and under ``qemu-system-x86_64 -M microvm``
(Debian's QEMU, the peer on this host) and measures wall time from process start to the
guest's ``GUEST-READY`` line. Prints a table with the ratio and saves a plot to docs/.

    .venv/bin/python bench/boot.py [--runs 3] [--memory 256M] [--cpus 1]
"""

from __future__ import annotations

import argparse
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

# Run as `python bench/<name>.py`: the repository root goes on sys.path for the test
# harness (tests.support), which is not part of the installed pych package.
sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from tests.support.guest import (  # noqa: E402
    READY, REPO, Console, PychGuest, guest_artifacts, qemu_command)


def boot_pych(memory: str, cpus: int) -> float:
    with tempfile.TemporaryDirectory() as d:
        g = PychGuest(Path(d), cpus=f"boot={cpus}", memory=f"size={memory}", api=False)
        try:
            g.start()
            g.console.expect(READY, 600)
            return time.monotonic() - g.boot_started
        finally:
            g.stop()


def boot_qemu(memory: str, cpus: int) -> float:
    cmd = qemu_command(guest_artifacts(), memory=memory, smp=str(cpus))
    t0 = time.monotonic()
    p = subprocess.Popen(cmd, stdin=subprocess.PIPE, stdout=subprocess.PIPE, stderr=subprocess.DEVNULL)
    try:
        Console(p.stdout.fileno(), p.stdin.fileno()).expect(READY, 600)
        return time.monotonic() - t0
    finally:
        p.kill()
        p.wait()


def plot(results: dict[str, list[float]], path: Path) -> None:
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    fig, ax = plt.subplots(figsize=(6, 4))
    names = list(results)
    ax.boxplot([results[n] for n in names], tick_labels=names)
    ax.set_ylabel("seconds to GUEST-READY")
    ax.set_title("Boot time, same guest (this host's nested KVM)")
    fig.tight_layout()
    fig.savefig(path)


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--runs", type=int, default=3)
    ap.add_argument("--memory", default="256M")
    ap.add_argument("--cpus", type=int, default=1)
    args = ap.parse_args()
    results: dict[str, list[float]] = {"pych": [], "qemu microvm": []}
    for i in range(args.runs):
        for name, fn in (("pych", boot_pych), ("qemu microvm", boot_qemu)):
            t = fn(args.memory, args.cpus)
            results[name].append(t)
            print(f"run {i + 1}: {name:13s} {t:6.1f} s", flush=True)
    print("\n| VMM | runs | median (s) | min (s) | max (s) |\n|---|---|---|---|---|")
    for name, ts in results.items():
        print(f"| {name} | {len(ts)} | {statistics.median(ts):.1f} | {min(ts):.1f} | {max(ts):.1f} |")
    ratio = statistics.median(results["pych"]) / statistics.median(results["qemu microvm"])
    print(f"\npych / QEMU (median): {ratio:.2f}x  (goal <= 0.9x)")
    out = REPO / "docs" / "bench-boot.png"
    try:
        plot(results, out)
        print(f"plot: {out}")
    except ImportError:
        print("matplotlib missing: no plot (make bench installs it)", file=sys.stderr)
    return 0


if __name__ == "__main__":
    sys.exit(main())
