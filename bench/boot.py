"""Boot time and footprint: pych vs QEMU on the same guest, same kernel, initramfs and cmdline.

Boots the test guest under pych and under ``qemu-system-x86_64 -M microvm`` (Debian's QEMU,
the peer on this host), who goes first rotating run by run, and measures:

* wall time from process start to the guest's ``GUEST-READY`` line;
* the VMM's memory beyond guest RAM once the guest is up (and, for pych, again after one
  ``vm.reboot``, to show nothing of the first boot is kept): the resident pages of every
  mapping of the VMM process (``/proc/PID/smaps``) except guest RAM (pych's memfd
  mappings; QEMU's anonymous RAM block, the one mapping at least as large as the guest's
  RAM), split into anonymous and file-backed pages as ``RssAnon`` and ``RssFile`` are.

Writes its table to docs/benchmarks.md (``<!-- bench:boot -->``) and a plot to docs/.

    .venv/bin/python bench/boot.py [--runs 3] [--memory 256M] [--cpus 1]
"""

from __future__ import annotations

import argparse
import subprocess
import sys
import tempfile
import time
from pathlib import Path

# Run as `python bench/<name>.py`: the repository root goes on sys.path for the test
# harness (tests.support), which is not part of the installed pych package.
sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from pych.api.client import ApiClient  # noqa: E402
from bench.report import Run, add_runs_argument, markdown_table, ratio, rotated, stat  # noqa: E402
from tests.support.guest import (  # noqa: E402
    READY, REPO, Console, PychGuest, guest_artifacts, qemu_command)

MiB = 1 << 20


def parse_mib(text: str) -> int:
    return int(text.rstrip("M"))


def footprint(pid: int, guest_ram: int) -> tuple[float, float]:
    """(anonymous MiB, file-backed MiB) resident in ``pid`` outside guest RAM."""
    anon = file = 0
    mapping_size, name, rss, anon_here = 0, "", 0, 0
    guest = False

    def close_mapping():
        nonlocal anon, file
        if not name and mapping_size == 0:
            return
        if guest:
            return
        # anonymous pages (including private copies of file pages) count as RssAnon; the
        # rest of a file mapping's resident pages as RssFile; shared memory as neither
        anon += anon_here
        if name.startswith("/") and not name.startswith(("/memfd:", "/dev/", "/SYSV")):
            file += rss - anon_here

    with open(f"/proc/{pid}/smaps") as f:
        for line in f:
            fields = line.split()
            if "-" in fields[0] and len(fields) >= 5 and ":" not in fields[0]:
                close_mapping()
                lo, hi = (int(x, 16) for x in fields[0].split("-"))
                mapping_size = hi - lo
                name = fields[5] if len(fields) > 5 else ""
                rss = anon_here = 0
                guest = name.startswith("/memfd:") or (not name and mapping_size >= guest_ram)
            elif fields[0] == "Rss:":
                rss = int(fields[1]) * 1024
            elif fields[0] == "Anonymous:":
                anon_here = int(fields[1]) * 1024
    close_mapping()
    return anon / MiB, file / MiB


def boot_pych(memory: int, cpus: int) -> tuple[float, tuple[float, float], tuple[float, float]]:
    """Boot time, the footprint once the guest is up, and again after one ``vm.reboot``."""
    with tempfile.TemporaryDirectory() as d:
        g = PychGuest(Path(d), cpus=f"boot={cpus}", memory=f"size={memory}M")
        try:
            g.start()
            g.console.expect(READY, 600)
            took = time.monotonic() - g.boot_started
            time.sleep(1)                       # let the guest's last writes settle
            booted = footprint(g.proc.pid, memory * MiB)
            mark = len(g.console.buf)
            status, body = ApiClient(g.api_path).put("vm.reboot")
            if status != 204:
                raise RuntimeError(f"vm.reboot: {status} {body!r}")
            g.console.expect(READY, 600, mark)
            time.sleep(1)
            return took, booted, footprint(g.proc.pid, memory * MiB)
        finally:
            g.stop()


def boot_qemu(memory: int, cpus: int) -> tuple[float, tuple[float, float], None]:
    cmd = qemu_command(guest_artifacts(), memory=f"{memory}M", smp=str(cpus))
    t0 = time.monotonic()
    p = subprocess.Popen(cmd, stdin=subprocess.PIPE, stdout=subprocess.PIPE, stderr=subprocess.DEVNULL)
    try:
        Console(p.stdout.fileno(), p.stdin.fileno()).expect(READY, 600)
        took = time.monotonic() - t0
        time.sleep(1)
        return took, footprint(p.pid, memory * MiB), None
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
    add_runs_argument(ap)
    ap.add_argument("--memory", type=parse_mib, default=256, help="guest RAM in MiB")
    ap.add_argument("--cpus", type=int, default=1)
    args = ap.parse_args()
    run = Run("boot", f"bench/boot.py --runs {args.runs}", args.runs)
    vmms = {"pych": boot_pych, "QEMU microvm": boot_qemu}
    times: dict[str, list[float]] = {name: [] for name in vmms}
    memory: dict[str, list[tuple[float, float]]] = {name: [] for name in vmms}
    rebooted: dict[str, list[tuple[float, float]]] = {name: [] for name in vmms}
    for i in run.runs_range():
        for name in rotated(list(vmms), i):
            t, mem, again = vmms[name](args.memory, args.cpus)
            times[name].append(t)
            memory[name].append(mem)
            if again is not None:
                rebooted[name].append(again)
            print(f"run {i + 1}: {name:13s} {t:6.1f} s; beyond guest RAM {mem[0]:.1f} MiB anon "
                  f"+ {mem[1]:.1f} MiB file"
                  + (f"; after vm.reboot {again[0]:.1f} + {again[1]:.1f}" if again else ""),
                  flush=True)
    total = {name: [a + f for a, f in ms] for name, ms in memory.items()}
    rows = [[name, stat(times[name]), stat([a for a, _ in memory[name]]),
             stat([f for _, f in memory[name]]), stat(total[name]),
             stat([a + f for a, f in rebooted[name]]) if rebooted[name] else "—"]
            for name in vmms]
    body = markdown_table(["VMM", "boot to GUEST-READY (s)", "anon MiB", "file MiB",
                           "beyond guest RAM (MiB)", "the same after one `vm.reboot` (MiB)"],
                          rows)
    body += (f"\n\nSame vmlinux, initramfs and cmdline, {args.cpus} vCPU, {args.memory} MiB. "
             f"pych / QEMU: boot {ratio(times['pych'], times['QEMU microvm'])} "
             f"(goal ≤ 0.9×); memory beyond guest RAM "
             f"{ratio(total['pych'], total['QEMU microvm'])} (goal ≤ 40 MiB and ≤ QEMU's).")
    run.write(body, no_write=args.no_write)
    out = REPO / "docs" / "bench-boot.png"
    try:
        plot(times, out)
        print(f"plot: {out}")
    except ImportError:
        print("matplotlib missing: no plot (make bench installs it)", file=sys.stderr)
    return 0


if __name__ == "__main__":
    sys.exit(main())
