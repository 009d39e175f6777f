"""Boot time and footprint: pych vs QEMU on the same guest, same kernel, initramfs and cmdline.

Boots the test guest under pych, under ``qemu-system-x86_64 -M microvm`` (Debian's QEMU, the
peer on this host), under the same QEMU microvm with a PCIe host bridge and a
virtio-rng-pci (the bus and device pych's default VM has; QEMU microvm has no PCI hot plug),
and under QEMU ``-M pc`` with a virtio-rng-pci twice: with ACPI PCI hot plug on bus 0 (the
capability pych's default VM offers, as the reference does: a hot plug slot object for each
of the bus's 32 slots) and without it (``PIIX4_PM.acpi-root-pci-hotplug=off``), so that
what that capability costs a QEMU guest is measured beside what it costs pych's. Who goes
first rotates run by run. It measures:

* wall time from process start to the guest's ``GUEST-READY`` line;
* the VMM's memory beyond guest RAM once the guest is up (and, for pych, again after one
  ``vm.reboot``, to show nothing of the first boot is kept): the resident pages of every
  mapping of the VMM process (``/proc/PID/smaps``) except guest RAM (pych's memfd
  mappings; QEMU's anonymous RAM block, the one mapping at least as large as the guest's
  RAM), split into anonymous and file-backed pages as ``RssAnon`` and ``RssFile`` are;
* where the boot's time goes, from the guest's own clock: once the guest is up (after the
  footprint is read), the timestamps of a few kernel messages in its ring buffer (``dmesg``:
  the console is ``quiet``, the ring buffer is not) and of a line the guest writes to
  ``/dev/kmsg`` right then, which places the kernel's clock on the host's; so the wall time
  splits into the time before the kernel's clock starts (the VMM building the VM and loading
  the kernel, and the kernel's earliest setup) and the kernel's phases up to GUEST-READY.

Writes its table to docs/benchmarks.md (``<!-- bench:boot -->``) and a plot to docs/.

    .venv/bin/python bench/boot.py [--runs 3] [--memory 256M] [--cpus 1]
"""

from __future__ import annotations

import argparse
import re
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
    READY, REPO, Console, PychGuest, Shell, guest_artifacts, qemu_command)

MiB = 1 << 20

# Kernel messages that mark the boot's phases, in boot order: (label, regex). Both VMMs boot
# the same kernel, so the same messages appear, except the PCI host bridge where there is no
# PCI bus (QEMU microvm).
MILESTONES = (
    ("ACPI interpreter enabled", r"ACPI: Interpreter enabled"),
    ("PCI host bridge found (ACPI namespace scanned up to it)", r"PCI host bridge to bus"),
    ("clocksource switched (fs initcalls)", r"clocksource: Switched to clocksource"),
    ("kernel init done, initramfs unpacked", r"Freeing unused kernel image"),
)
MARK = "pych-bench-boot-phases"
PCI_PEER = "QEMU microvm + PCIe, virtio-rng-pci"
HOTPLUG_PEER = "QEMU pc, virtio-rng-pci, ACPI hot plug on bus 0"
NO_HOTPLUG_PEER = "QEMU pc, virtio-rng-pci, no hot plug on bus 0"
PHASES_COMMAND = (f"echo {MARK} > /dev/kmsg; dmesg | grep -E '"
                  + "|".join([rx for _, rx in MILESTONES] + [MARK]) + "'")


def guest_phases(shell: Shell, started: float) -> dict[str, float]:
    """Seconds since the VMM process started at which each milestone happened: the stamps of
    the kernel's messages (its printk clock) placed on the host's clock by a message the
    guest writes to /dev/kmsg now, when the host's time is known. Also ``kernel clock
    start``: where the printk clock's zero falls."""
    rc, out = shell.run(PHASES_COMMAND, timeout=300)
    now = time.monotonic() - started
    if rc != 0:
        raise RuntimeError(f"guest phases: {out}")
    stamps: list[tuple[float, str]] = []
    for line in out.splitlines():
        m = re.match(r"\[\s*(\d+\.\d+)\]", line)
        if m:
            stamps.append((float(m.group(1)), line))
    marks = [t for t, line in stamps if MARK in line]
    if not marks:
        raise RuntimeError(f"guest phases: no {MARK} line in {out!r}")
    clock_start = now - marks[-1]
    found = {"kernel clock start": clock_start}
    for label, rx in MILESTONES:
        for t, line in stamps:
            if re.search(rx, line):
                found[label] = clock_start + t
                break
    return found


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


def boot_pych(memory: int, cpus: int) -> tuple[float, tuple[float, float], tuple[float, float],
                                              dict[str, float]]:
    """Boot time, the footprint once the guest is up, again after one ``vm.reboot``, and the
    boot's phases."""
    with tempfile.TemporaryDirectory() as d:
        g = PychGuest(Path(d), cpus=f"boot={cpus}", memory=f"size={memory}M")
        try:
            g.start()
            g.console.expect(READY, 600)
            took = time.monotonic() - g.boot_started
            time.sleep(1)                       # let the guest's last writes settle
            booted = footprint(g.proc.pid, memory * MiB)
            g.shell.prepare()
            phases = guest_phases(g.shell, g.boot_started)
            mark = len(g.console.buf)
            status, body = ApiClient(g.api_path).put("vm.reboot")
            if status != 204:
                raise RuntimeError(f"vm.reboot: {status} {body!r}")
            g.console.expect(READY, 600, mark)
            time.sleep(1)
            return took, booted, footprint(g.proc.pid, memory * MiB), phases
        finally:
            g.stop()


def boot_qemu(memory: int, cpus: int, *, machine: str = "microvm,acpi=on",
              devices: tuple[str, ...] = (), extra: tuple[str, ...] = ()
              ) -> tuple[float, tuple[float, float], None, dict[str, float]]:
    cmd = qemu_command(guest_artifacts(), machine=machine, memory=f"{memory}M", smp=str(cpus))
    for device in devices:
        cmd += ["-device", device]
    cmd += extra
    t0 = time.monotonic()
    p = subprocess.Popen(cmd, stdin=subprocess.PIPE, stdout=subprocess.PIPE,
                         stderr=subprocess.DEVNULL)
    try:
        console = Console(p.stdout.fileno(), p.stdin.fileno())
        console.expect(READY, 600)
        took = time.monotonic() - t0
        time.sleep(1)
        booted = footprint(p.pid, memory * MiB)
        shell = Shell(console)
        shell.prepare()
        return took, booted, None, guest_phases(shell, t0)
    finally:
        p.kill()
        p.wait()


def difference(a: list[float], b: list[float]) -> str:
    """The median and range of ``a - b`` run by run (each pair ran in the same run)."""
    return stat([x - y for x, y in zip(a, b)])


def phase_table(phases: dict[str, list[dict[str, float]]]) -> str:
    """Where each VMM's boot went: the median duration of each phase (from the previous
    milestone to this one; the first from the VMM's exec), min–max over the runs."""
    labels = ["kernel clock start", *(label for label, _ in MILESTONES), "GUEST-READY"]
    names = list(phases)
    rows = []
    for i, label in enumerate(labels):
        cells = []
        for name in names:
            spans = []
            for marks in phases[name]:
                if label not in marks:
                    continue
                before = [marks[x] for x in labels[:i] if x in marks]
                spans.append(marks[label] - (before[-1] if before else 0.0))
            cells.append(stat(spans) if spans else "—")
        first = "exec → the kernel's clock starts (VMM set-up, loading, earliest kernel setup)"
        rows.append([first if i == 0 else f"… → {label}", *cells])
    return ("Where the boot goes (s, medians with min–max; each phase runs from the milestone "
            "before it, read from the guest's clock as described above):\n\n"
            + markdown_table(["phase", *names], rows))


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
    # the peer as the issue names it (no PCI bus: virtio-mmio, here no device at all), and
    # the same QEMU microvm with a PCIe host bridge and the one device pych's default VM has
    # on its bus (virtio-rng): what a PCI bus costs QEMU's guest, so that pych's remaining
    # difference is its 32 ACPI hot plug slots (QEMU microvm cannot hot plug PCI devices);
    # and QEMU pc with and without ACPI hot plug on its bus 0: what the same capability
    # costs QEMU's guest (pc's boot also runs SeaBIOS and its legacy devices: compare the
    # two pc columns with each other)
    vmms = {"pych": boot_pych, "QEMU microvm": boot_qemu,
            PCI_PEER: lambda memory, cpus: boot_qemu(memory, cpus,
                                                     machine="microvm,acpi=on,pcie=on",
                                                     devices=("virtio-rng-pci",)),
            HOTPLUG_PEER: lambda memory, cpus: boot_qemu(memory, cpus, machine="pc",
                                                         devices=("virtio-rng-pci",)),
            NO_HOTPLUG_PEER: lambda memory, cpus: boot_qemu(
                memory, cpus, machine="pc", devices=("virtio-rng-pci",),
                extra=("-global", "PIIX4_PM.acpi-root-pci-hotplug=off"))}
    times: dict[str, list[float]] = {name: [] for name in vmms}
    memory: dict[str, list[tuple[float, float]]] = {name: [] for name in vmms}
    rebooted: dict[str, list[tuple[float, float]]] = {name: [] for name in vmms}
    phases: dict[str, list[dict[str, float]]] = {name: [] for name in vmms}
    for i in run.runs_range():
        for name in rotated(list(vmms), i):
            t, mem, again, marks = vmms[name](args.memory, args.cpus)
            marks["GUEST-READY"] = t
            phases[name].append(marks)
            times[name].append(t)
            memory[name].append(mem)
            if again is not None:
                rebooted[name].append(again)
            print(f"run {i + 1}: {name:36s} {t:6.1f} s; beyond guest RAM {mem[0]:.1f} MiB anon "
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
             f"{ratio(total['pych'], total['QEMU microvm'])} (goal ≤ 40 MiB and ≤ QEMU's). "
             f"pych / {PCI_PEER}: boot {ratio(times['pych'], times[PCI_PEER])}. "
             f"pych / {HOTPLUG_PEER}: boot {ratio(times['pych'], times[HOTPLUG_PEER])}. "
             f"What ACPI PCI hot plug on bus 0 adds to the boot: QEMU pc "
             f"{difference(times[HOTPLUG_PEER], times[NO_HOTPLUG_PEER])} s (with − without, "
             f"same run); pych over {PCI_PEER} "
             f"{difference(times['pych'], times[PCI_PEER])} s.")
    body += "\n\n" + phase_table(phases)
    run.write(body, no_write=args.no_write)
    out = REPO / "docs" / "bench-boot.png"
    if args.no_write:
        return 0
    try:
        plot(times, out)
        print(f"plot: {out}")
    except ImportError:
        print("matplotlib missing: no plot (make bench installs it)", file=sys.stderr)
    return 0


if __name__ == "__main__":
    sys.exit(main())
