"""Sample where a guest kernel spends its time: pause the vCPUs periodically, read RIP,
and symbolize against the kernel's symbol table (``nm``). A developer's tool for finding
slow boot phases on hosts where guest kernel code is emulated.

    .venv/bin/python bench/guest_profile.py --seconds 90 --interval 0.2 [pych options...]
"""

from __future__ import annotations

import argparse
import bisect
import collections
import subprocess
import sys
import threading
import time

from pych.cli.main import build_parser, config_from_args
from pych.cpu.vcpu import install_kick_handler
from pych.vmm import Vmm


def symbols(kernel: str):
    out = subprocess.run(["nm", "-n", kernel], capture_output=True, text=True).stdout
    addrs, names = [], []
    for line in out.splitlines():
        parts = line.split()
        if len(parts) == 3 and parts[1] in "tTwW":
            addrs.append(int(parts[0], 16))
            names.append(parts[2])
    return addrs, names


def main() -> int:
    ap = argparse.ArgumentParser()
    ap.add_argument("--seconds", type=float, default=60)
    ap.add_argument("--interval", type=float, default=0.25)
    ns, rest = ap.parse_known_args()
    args = build_parser().parse_args(rest)
    config = config_from_args(args)
    addrs, names = symbols(config.payload.kernel)
    install_kick_handler()
    vmm = Vmm()
    vmm.vm_create(config)
    vmm.vm_boot()
    samples: list[tuple[float, str]] = []
    t0 = time.monotonic()

    def sampler():
        while time.monotonic() - t0 < ns.seconds and vmm.vm is not None:
            time.sleep(ns.interval)
            vm = vmm.vm
            if vm is None:
                break
            vm.cpus.pause()
            try:
                rip = vm.cpus.vcpus[0].get_regs().rip
            finally:
                vm.cpus.resume()
            i = bisect.bisect_right(addrs, rip) - 1
            samples.append((time.monotonic() - t0, names[i] if i >= 0 else hex(rip)))
        vmm.post(lambda v: v.request_exit(0))

    threading.Thread(target=sampler, daemon=True).start()
    vmm.run_loop()
    vmm.close()
    by_second = collections.defaultdict(collections.Counter)
    for t, name in samples:
        by_second[int(t // 5) * 5][name] += 1
    for start in sorted(by_second):
        top = ", ".join(f"{n}×{c}" for n, c in by_second[start].most_common(4))
        print(f"{start:4d}-{start + 5:<4d}s {top}", file=sys.stderr)
    # the whole run: the busiest functions, and the share of each subsystem (name prefix)
    total = collections.Counter(name for _, name in samples)
    prefixes = collections.Counter(name.split("_")[0] if "_" in name else name
                                   for _, name in samples)
    n = max(len(samples), 1)
    print(f"\n{len(samples)} samples; busiest functions:", file=sys.stderr)
    for name, count in total.most_common(20):
        print(f"  {count * 100 / n:5.1f}%  {name}", file=sys.stderr)
    print("by prefix (acpi_, pci_, ...):", file=sys.stderr)
    for name, count in prefixes.most_common(15):
        print(f"  {count * 100 / n:5.1f}%  {name}_*", file=sys.stderr)
    return 0


if __name__ == "__main__":
    sys.exit(main())
