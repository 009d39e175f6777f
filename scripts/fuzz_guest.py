#!/usr/bin/env python3
"""make fuzz-guest: boot the fuzz guest (tests/fuzzguest, built with gcc) under pych once per
seed, every device model attached, and check pych after each scenario the guest runs
(tests/support/guest_fuzz.py says what is checked and the bounds). Prints one line per
scenario and a summary; exits 1 at the first failure, naming the seed and the scenario.

    scripts/fuzz_guest.py --seeds 1 2 3 4 5 --passes 3 --rounds 60
"""

from __future__ import annotations

import argparse
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from tests.support.guest_fuzz import (BOUNDS, FuzzFailure, FuzzGuest,  # noqa: E402
                                      scenario_count)
from tests.support.netns import network_namespace  # noqa: E402


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--seeds", type=int, nargs="+", default=[1, 2, 3, 4, 5])
    ap.add_argument("--passes", type=int, default=3, help="passes over every device per seed")
    ap.add_argument("--rounds", type=int, default=60, help="hostile operations per scenario")
    ap.add_argument("--no-net", action="store_true", help="no NIC (no network namespace)")
    args = ap.parse_args()
    print(f"bounds after the first scenario: {BOUNDS}")
    failures = 0
    for seed in args.seeds:
        with tempfile.TemporaryDirectory(prefix=f"pych-fuzz-guest-{seed}-") as d:
            started = time.monotonic()
            try:
                if args.no_net:
                    n = run(Path(d), seed, args, None)
                else:
                    with network_namespace(f"pychfz{seed}") as ns:
                        n = run(Path(d), seed, args, ns)
            except FuzzFailure as e:
                failures += 1
                print(f"seed {seed}: FAILED\n{e}", flush=True)
                continue
            print(f"seed {seed}: {n} scenarios, pych alive and within bounds after each, "
                  f"{time.monotonic() - started:.0f} s", flush=True)
    print(f"{len(args.seeds) - failures} of {len(args.seeds)} seeds passed")
    return 1 if failures else 0


def run(workdir: Path, seed: int, args, netns: str | None) -> int:
    count = scenario_count(args.passes, net=netns is not None)

    def show(r):
        print(f"  seed {seed} scenario {r.index:3d} {r.kind:8s} {r.seconds:6.1f} s  "
              f"threads {r.stats['threads']} fds {r.stats['fds']} "
              f"RssAnon {r.stats['rss_anon_kib'] >> 10} MiB", flush=True)

    with FuzzGuest(workdir, seed, count, args.rounds, netns=netns) as g:
        g.run(on_scenario=show)
    lines = (workdir / "pych.log").read_text(errors="replace").splitlines()
    print(f"  seed {seed}: pych logged {len(lines)} lines; distinct warnings:")
    seen = set()
    for line in lines:
        key = line.split(": ", 2)[-1][:60]
        if "WARNING" in line and key not in seen:
            seen.add(key)
            print(f"    {line[:160]}")
    return count


if __name__ == "__main__":
    sys.exit(main())
