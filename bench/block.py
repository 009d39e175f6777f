"""Block I/O: pych vs QEMU, virtio-blk on PCI, on the same guest and the same raw image.

Each run boots the test guest under pych and under QEMU (``-M microvm,acpi=on,pcie=on``
with ``virtio-blk-pci``: the guest kernel has no virtio-mmio) with two disks: the data disk
(one raw image, the same file for both VMMs, written in full beforehand so every read finds
it in the host's page cache) and a small read-only disk carrying ``blkbench`` (bench/
blkbench.c, built here with ``gcc -static``). In the guest, blkbench times every request
with O_DIRECT, so each one goes to the device:

* sequential read and sequential write, 1 MiB requests (the write ends with a flush);
* random 4 KiB reads at block-aligned offsets across the disk (the same offsets for both).

Both VMMs do buffered host I/O on the image (QEMU's default ``cache=writeback``; pych
``preadv``/``pwritev``) and turn a guest flush into an fsync. Reports MB/s and per-request
latency (mean, p50, p99) measured by the guest's clock, and the host's wall time of each
blkbench command as a cross-check. Guest kernel code is emulated on this host (see
../shared/notes/pvm-host.md), so absolute numbers are small; compare the ratio.
Writes its table to docs/benchmarks.md (``<!-- bench:block -->``) and saves
docs/bench-block.png (when matplotlib is installed).

    .venv/bin/python bench/block.py [--runs 3] [--seq-mib 16] [--rand-ops 1000]
"""

from __future__ import annotations

import argparse
import os
import re
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

# Run as `python bench/<name>.py`: the repository root goes on sys.path for the test
# harness (tests.support), which is not part of the installed pych package.
sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from bench.report import Run, add_runs_argument, rotated, stat  # noqa: E402
from tests.support.guest import (  # noqa: E402
    READY, REPO, Console, PychGuest, Shell, guest_artifacts, qemu_command)

MiB = 1 << 20
DISK_MIB = 64
TESTS = ("seqread", "seqwrite", "randread")
LABELS = {"seqread": "sequential read, 1 MiB", "seqwrite": "sequential write, 1 MiB",
          "randread": "random read, 4 KiB"}
BOOT_TIMEOUT = 900


def build_tool(workdir: Path) -> tuple[Path, int]:
    """blkbench, static, padded to whole sectors as a raw disk image; returns (image, size)."""
    binary = workdir / "blkbench"
    subprocess.run(["gcc", "-static", "-O2", "-s", "-o", str(binary),
                    str(REPO / "bench" / "blkbench.c")], check=True)
    data = binary.read_bytes()
    image = workdir / "tool.img"
    image.write_bytes(data + bytes(-len(data) % 512))
    return image, len(data)


def make_data_disk(path: Path) -> None:
    with open(path, "wb") as f:
        for _ in range(DISK_MIB):
            f.write(os.urandom(MiB))


# --- in the guest -----------------------------------------------------------------------------
def run_in_guest(shell: Shell, tool_size: int, seq_mib: int, rand_ops: int) -> dict:
    """Find the disks by size, fetch blkbench, run each test; returns
    {"clocksource": str, test: {"mbps", "mean_us", "p50_us", "p99_us", "wall_s"}}."""
    rc, out = shell.run("for d in /sys/block/vd*; do read s < $d/size; echo ${d##*/} $s; done")
    sizes = dict(line.split() for line in out.splitlines())
    data = next(d for d, s in sizes.items() if int(s) == DISK_MIB * MiB // 512)
    tool = next(d for d, s in sizes.items() if d != data)
    rc, out = shell.run(f"head -c {tool_size} /dev/{tool} > /tmp/blkbench && chmod +x /tmp/blkbench"
                        " && read c < /sys/devices/system/clocksource/clocksource0/"
                        "current_clocksource && echo $c")
    if rc:
        raise RuntimeError(f"guest: {out}")
    result: dict = {"clocksource": out.strip()}
    args = {"seqread": (MiB, seq_mib), "seqwrite": (MiB, seq_mib), "randread": (4096, rand_ops)}
    for test in TESTS:
        bs, count = args[test]
        t0 = time.monotonic()
        rc, out = shell.run(f"/tmp/blkbench {test} /dev/{data} {bs} {count}", timeout=1800)
        wall = time.monotonic() - t0
        m = re.search(r"bytes=(\d+) seconds=([\d.]+) mean_us=([\d.]+) p50_us=([\d.]+) "
                      r"p99_us=([\d.]+)", out)
        if rc or not m:
            raise RuntimeError(f"guest blkbench {test}: {out}")
        nbytes, seconds = int(m.group(1)), float(m.group(2))
        result[test] = {"mbps": nbytes / seconds / 1e6, "mean_us": float(m.group(3)),
                        "p50_us": float(m.group(4)), "p99_us": float(m.group(5)),
                        "wall_s": wall}
        r = result[test]
        print(f"    {test:9s} {r['mbps']:6.2f} MB/s  latency mean {r['mean_us']:7.0f} p50 "
              f"{r['p50_us']:7.0f} p99 {r['p99_us']:7.0f} us  (host wall {wall:.1f} s)", flush=True)
    return result


# --- the VMMs ---------------------------------------------------------------------------------
def bench_pych(workdir: Path, data: Path, tool: Path, tool_size: int, seq_mib: int,
               rand_ops: int) -> dict:
    g = PychGuest(workdir / "pych", api=False, extra_args=[
        "--disk", f"path={data}", f"path={tool},readonly=on"])
    try:
        g.start()
        g.wait_ready(BOOT_TIMEOUT)
        return run_in_guest(g.shell, tool_size, seq_mib, rand_ops)
    finally:
        g.stop()


def bench_qemu(workdir: Path, data: Path, tool: Path, tool_size: int, seq_mib: int,
               rand_ops: int) -> dict:
    cmd = qemu_command(guest_artifacts(), machine="microvm,acpi=on,pcie=on") + [
        "-drive", f"file={data},format=raw,if=none,id=data,cache=writeback",
        "-device", "virtio-blk-pci,drive=data",
        "-drive", f"file={tool},format=raw,if=none,id=tool,readonly=on",
        "-device", "virtio-blk-pci,drive=tool"]
    log = workdir / "qemu-console.log"
    p = subprocess.Popen(cmd, stdin=subprocess.PIPE, stdout=subprocess.PIPE, stderr=subprocess.DEVNULL)
    try:
        console = Console(p.stdout.fileno(), p.stdin.fileno(), log)
        console.expect(READY, BOOT_TIMEOUT)
        shell = Shell(console)
        shell.prepare()
        return run_in_guest(shell, tool_size, seq_mib, rand_ops)
    finally:
        p.kill()
        p.wait()


# --- report -----------------------------------------------------------------------------------
def median_of(runs: list[dict], test: str, key: str) -> float:
    return statistics.median(r[test][key] for r in runs)


def table(results: dict[str, list[dict]]) -> str:
    rows = ["Medians of the runs (min–max).", "",
            "| test | VMM | runs | MB/s | mean latency (µs) | p50 (µs) | p99 (µs) | host wall (s) |",
            "|---|---|---|---|---|---|---|---|"]
    for test in TESTS:
        for vmm, runs in results.items():
            mbps, mean, p50, p99, wall = (
                stat([r[test][key] for r in runs], fmt) for key, fmt in
                (("mbps", ".2f"), ("mean_us", ".0f"), ("p50_us", ".0f"), ("p99_us", ".0f"),
                 ("wall_s", ".1f")))
            rows.append(f"| {LABELS[test]} | {vmm} | {len(runs)} | {mbps} | {mean} | "
                        f"{p50} | {p99} | {wall} |")
    # Run i of pych and run i of QEMU ran back to back, so their ratio is the figure least
    # moved by the load of a shared host (it changes over minutes).
    pych, qemu = results["pych"], results["qemu"]
    runs = range(len(pych))
    rows += ["", "pych / QEMU throughput, run by run (pych and QEMU back to back, who goes "
             "first rotating):", "",
             "| test | " + " | ".join(f"run {i + 1}" for i in runs) + " | median |",
             "|---|" + "---|" * (len(pych) + 1)]
    for test in TESTS:
        ratios = [pych[i][test]["mbps"] / qemu[i][test]["mbps"] for i in runs]
        rows.append(f"| {LABELS[test]} | " + " | ".join(f"{r:.2f}×" for r in ratios)
                    + f" | **{statistics.median(ratios):.2f}×** |")
    return "\n".join(rows)


def plot(results: dict[str, list[dict]], path: Path) -> None:
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    fig, (left, right) = plt.subplots(1, 2, figsize=(10, 4))
    width = 0.38
    for i, vmm in enumerate(results):
        xs = [t + (i - 0.5) * width for t in range(len(TESTS))]
        bars = left.bar(xs, [median_of(results[vmm], t, "mbps") for t in TESTS], width, label=vmm)
        left.bar_label(bars, fmt="%.2f", fontsize=7)
        bars = right.bar(xs, [median_of(results[vmm], t, "mean_us") / 1000 for t in TESTS], width,
                         label=vmm)
        right.bar_label(bars, fmt="%.0f", fontsize=7)
    for ax, ylabel in ((left, "MB/s (median)"), (right, "mean latency per request (ms)")):
        ax.set_xticks(range(len(TESTS)), [LABELS[t] for t in TESTS], fontsize=8)
        ax.set_ylabel(ylabel)
        ax.legend()
    fig.suptitle("virtio-blk from inside the same guest, O_DIRECT (this host's nested KVM)")
    fig.tight_layout()
    fig.savefig(path)


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    add_runs_argument(ap)
    ap.add_argument("--seq-mib", type=int, default=16, help="MiB per sequential test")
    ap.add_argument("--rand-ops", type=int, default=1000, help="random 4 KiB reads")
    args = ap.parse_args()
    if args.seq_mib > DISK_MIB:
        ap.error(f"--seq-mib is at most the disk's {DISK_MIB}")
    run = Run("block", f"bench/block.py --runs {args.runs} --seq-mib {args.seq_mib} "
                       f"--rand-ops {args.rand_ops}", args.runs)
    results: dict[str, list[dict]] = {"pych": [], "qemu": []}
    clocksources: dict[str, set[str]] = {"pych": set(), "qemu": set()}
    with tempfile.TemporaryDirectory(prefix="pych-bench-block-") as d:
        workdir = Path(d)
        tool, tool_size = build_tool(workdir)
        data = workdir / "data.img"
        make_data_disk(data)
        for i in run.runs_range():
            for name, fn in rotated([("pych", bench_pych), ("qemu", bench_qemu)], i):
                print(f"run {i + 1}: {name}", flush=True)
                r = fn(workdir, data, tool, tool_size, args.seq_mib, args.rand_ops)
                clocksources[name].add(r.pop("clocksource"))
                results[name].append(r)
    run.write(table(results) + f"\n\nGuest clock source: pych "
              f"{', '.join(sorted(clocksources['pych']))}; QEMU "
              f"{', '.join(sorted(clocksources['qemu']))}.", no_write=args.no_write)
    out = REPO / "docs" / "bench-block.png"
    if args.no_write:                    # --no-write leaves docs/ alone, plots too
        return 0
    try:
        plot(results, out)
        print(f"\nplot: {out}")
    except ImportError:
        print("\nmatplotlib missing: no plot (make bench installs it)", file=sys.stderr)
    return 0


if __name__ == "__main__":
    sys.exit(main())
