"""`make fuzz`: fuzz pych's API against a booted test guest and print what happened.

Boots the test guest under pych with an API socket, then (tests/support/fuzz.py has the
details): deliberate lifecycle requests, schemathesis/hypothesis-generated requests for every
operation of Cloud Hypervisor's API spec (``../shared/spec/cloud-hypervisor.yaml``, beside the
repository) that pych implements, raw HTTP abuse of the socket, the survival checks (pych
alive, vmm.ping, a shell command in the guest) and a deliberate teardown. Prints a table of
requests per operation, status codes, raw scenarios and failures; exits 1 if anything failed.

    .venv/bin/python scripts/fuzz.py                      # 10,000 requests or 20 minutes
    .venv/bin/python scripts/fuzz.py --requests 500 --minutes 2 --quick
    .venv/bin/python scripts/fuzz.py --microguest         # no Linux guest: fuzz pych alone

--minutes bounds the generated-request phases; booting (up to a minute under nested KVM), the
lifecycle, the abuse and the teardown add a few minutes (more with the reboots of the full run).
--quick skips the three extra guest boots (vm.reboot, recreate + vm.boot, power button) and
ends with vmm.shutdown instead; tests/guest/test_fuzz.py runs that with a small bound in CI.
"""

from __future__ import annotations

import argparse
import random
import shutil
import sys
import tempfile
import time
from pathlib import Path

# Run as `python scripts/<name>.py`: the repository root goes on sys.path for the test
# harness (tests.support), which is not part of the installed pych package.
REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

from tests.support import fuzz  # noqa: E402


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--requests", type=int, default=10_000,
                   help="generated requests against the running VM (default 10000)")
    p.add_argument("--minutes", type=float, default=20.0,
                   help="time bound of the generated-request phases (default 20)")
    p.add_argument("--side-requests", type=int, default=300,
                   help="generated requests against the shut-down and the deleted VM, each")
    p.add_argument("--seed", type=int, default=None, help="random seed (printed; default: new)")
    p.add_argument("--quick", action="store_true",
                   help="no reboots: skip vm.reboot, recreate+boot and the power button")
    p.add_argument("--abuse-scale", type=float, default=1.0,
                   help="multiplies the connections of most raw abuse scenarios")
    p.add_argument("--microguest", action="store_true",
                   help="a halting few-instruction guest instead of Linux (no shell checks)")
    p.add_argument("--workdir", type=Path, default=None, help="keep files here (default: temp)")
    args = p.parse_args()

    seed = args.seed if args.seed is not None else random.SystemRandom().randrange(1 << 32)
    plan = fuzz.Plan(requests=args.requests, minutes=args.minutes,
                     side_requests=args.side_requests, full=not args.quick,
                     abuse_scale=args.abuse_scale, seed=seed)
    workdir = args.workdir or Path(tempfile.mkdtemp(prefix="pych-fuzz-"))
    workdir.mkdir(parents=True, exist_ok=True)
    t0 = time.monotonic()

    def log(msg: str) -> None:
        print(f"[{time.monotonic() - t0:6.0f} s] {msg}", flush=True)

    log(f"seed {seed}; workdir {workdir}")
    log("booting the microguest" if args.microguest else "booting the test guest under pych")
    target = fuzz.boot_microguest(workdir) if args.microguest else fuzz.boot_guest(workdir)
    log("booted")
    try:
        report = fuzz.run(target, plan, workdir, log=log)
    finally:
        target.stop()
    print()
    print(report.table())
    print(f"\ntotal {time.monotonic() - t0:.0f} s; pych log: {target.log_path}")
    ok = report.failure_count == 0
    print("PASS" if ok else f"FAIL: {report.failure_count} failures (reproduce: --seed {seed})")
    if ok and args.workdir is None:
        shutil.rmtree(workdir, ignore_errors=True)
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())
