#!/usr/bin/env python3
"""``make soak``: pych through many hot plug cycles on a real guest, watching it for leaks.

Boots the test guest under pych (in a network namespace this script creates and deletes)
and runs N cycles, each one of: disk add + use + remove, NIC add + remove, CPU up + down,
128 MiB of memory plugged + unplugged (virtio-mem or an ACPI DIMM), with a reboot every R
cycles (``reboot -f`` in the guest, ``vm.reboot``, or a re-creation through the API that
switches the memory hot plug method). After every cycle it samples pych's open fds,
threads, RSS and KVM memory slots and checks what the guest sees (CPUs, PCI functions,
MemTotal) against ``vm.info``; see ``tests/support/soak.py`` for the details.

Pass: after a warm-up of K cycles, fds, threads and memslots equal their baseline exactly
at every checkpoint (the baseline of the same VM shape), and pych's heap (``RssAnon``)
grows by less than the bound. Prints the table, saves a plot (``--plot``, needs
matplotlib: ``pip install -e '.[bench]'``; without it only the table) and exits 0 on pass.

A cycle takes 20-60 s on this project's machines (a hot-added disk appears ~30 s after the
request), so ``make soak`` (200 cycles) runs for hours and ``make soak-long`` (500) most of
a day; CI runs a few cycles in ``tests/guest/test_soak.py``.

    python scripts/soak.py --cycles 200 [--warmup 8] [--reboot-every 16] [--seccomp true]
"""

from __future__ import annotations

import argparse
import datetime
import os
import sys
import tempfile
import time
from pathlib import Path

# Run as `python scripts/<name>.py`: the repository root goes on sys.path for the test
# harness (tests.support), which is not part of the installed pych package.
REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

from bench.report import commit, loadavg  # noqa: E402
from tests.support.soak import Soak, save_plot  # noqa: E402


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--cycles", type=int, default=200)
    p.add_argument("--warmup", type=int, default=8, help="cycles before the checks (default 8)")
    p.add_argument("--reboot-every", type=int, default=16,
                   help="a reboot every R cycles (1-32; default 16: 12 reboots in 200 cycles, "
                        "each kind 4 times)")
    p.add_argument("--rss-bound-mib", type=float, default=16,
                   help="allowed growth of pych's heap (RssAnon) after the warm-up (default 16)")
    p.add_argument("--seccomp", choices=("true", "false", "log"),
                   help="pych's --seccomp (default: pych's default)")
    p.add_argument("--plot", type=Path, default=REPO / "docs" / "soak.png")
    p.add_argument("--workdir", type=Path, help="where the disk image and logs go")
    p.add_argument("--record", type=Path, default=REPO / "docs" / "soak.md",
                   help="the page the result is written to (default docs/soak.md); "
                        "--no-record leaves it alone")
    p.add_argument("--no-record", dest="record", action="store_const", const=None)
    args = p.parse_args()
    workdir = args.workdir or Path(tempfile.mkdtemp(prefix="pych-soak-"))
    print(f"soak: {args.cycles} cycles, warm-up {args.warmup}, a reboot every "
          f"{args.reboot_every}; logs in {workdir}", flush=True)
    started = time.monotonic()
    load_before = loadavg()
    soak: Soak | None = None

    def progress(line: str) -> None:
        print(line, flush=True)
        # the page follows the run (every 10 cycles), so a run cut short still leaves its
        # record, marked as unfinished
        done = len(soak.result.samples) if soak is not None else 0
        if args.record and done and done % 10 == 0 and done < args.cycles:
            record(args, soak.result, (time.monotonic() - started) / 60, load_before, False,
                   finished=False)

    with Soak(workdir, cycles=args.cycles, warmup=args.warmup, reboot_every=args.reboot_every,
              rss_bound_mib=args.rss_bound_mib, seccomp=args.seccomp,
              progress=progress) as soak:
        print(f"booted in {soak.result.boot_seconds:.0f} s", flush=True)
        result = soak.run()
    print()
    print(result.table())
    print(result.summary())
    minutes = (time.monotonic() - started) / 60
    print(f"took {minutes:.1f} min")
    plotted = save_plot(result, args.plot)
    if plotted:
        print(f"plot: {args.plot}")
    else:
        print("matplotlib is not installed: no plot (pip install -e '.[bench]')")
    if args.record:
        record(args, result, minutes, load_before, plotted)
        print(f"recorded in {args.record}")
    return 0 if result.passed else 1


def record(args, result, minutes: float, load_before: str, plotted: bool, *,
           finished: bool = True) -> None:
    """Write the run to its page in docs/: what ran, on which commit, how busy the host was,
    the verdict and the whole table (nothing on the page is edited by hand). An unfinished
    run (``finished=False``, written as it goes) says how far it got."""
    now = datetime.datetime.now(datetime.timezone.utc).strftime("%Y-%m-%d %H:%M UTC")
    state = (f"— finished {now}" if finished else
             f"— **unfinished: {len(result.samples)} of {args.cycles} cycles so far**, {now}")
    seccomp = f" --seccomp {args.seccomp}" if args.seccomp else ""
    lines = [
        "# The soak — `make soak`",
        "",
        "Written by `scripts/soak.py` every 10 cycles and at the end of a run; see its",
        "docstring and `tests/support/soak.py` for what a cycle does and what is checked.",
        "",
        f"`scripts/soak.py --cycles {args.cycles} --warmup {args.warmup} "
        f"--reboot-every {args.reboot_every} --rss-bound-mib {args.rss_bound_mib:g}{seccomp}` "
        f"{state}, commit {commit()}, {minutes:.0f} min (boot "
        f"{result.boot_seconds:.0f} s). Host load average (1/5/15 min) before {load_before}, "
        f"after {loadavg()} on {os.cpu_count()} CPUs.",
        "",
        "```",
        result.summary(),
        "```",
        "",
    ]
    if plotted:
        rel = os.path.relpath(args.plot.resolve(), args.record.resolve().parent)
        lines += [f"![pych's footprint over the cycles]({rel})", ""]
    lines += ["```", result.table(), "```", ""]
    args.record.write_text("\n".join(lines))


if __name__ == "__main__":
    sys.exit(main())
