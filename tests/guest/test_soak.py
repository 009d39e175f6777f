"""The soak's short variant (``make soak`` runs 200 cycles), with ``--seccomp true``.

One guest (boot=1,max=2 vCPUs, virtio-mem) goes through 6 cycles: CPU up and down (the
warm-up: it leaves vCPU 1's KVM fd parked for reuse), 128 MiB of virtio-mem plugged and
unplugged, a disk added, read and removed, a NIC added and removed, CPU and memory again.
After each cycle the guest's view (CPUs, PCI functions, MemTotal) must match ``vm.info``;
after the warm-up, pych's fds, threads and KVM memslots must be back exactly where they were
after the memory cycle, and its heap may not grow by more than 16 MiB (see
``tests/support/soak.py``). Reboots are left to ``make soak`` and to the hot plug modules, to
keep this module near 4 minutes.

pych runs with ``--seccomp true``: a system call a vCPU thread (or a device worker it
started) may not make would stop the VM, so every operation above passing is the check that
the vCPU filter allows what CPU, memory and PCI hot plug need.
"""

from __future__ import annotations

import re
from pathlib import Path

import pytest

from tests.support.soak import Soak

CYCLES, WARMUP = 6, 1


@pytest.fixture(scope="module")
def soak(tmp_path_factory):
    with Soak(tmp_path_factory.mktemp("soak"), cycles=CYCLES, warmup=WARMUP, reboot_every=32,
              seccomp="true", progress=lambda line: None) as s:
        yield s


def seccomp_status(pid: int) -> dict[int, tuple[int, int]]:
    """Each thread's (Seccomp mode, number of filters) from /proc."""
    found = {}
    for tid in Path(f"/proc/{pid}/task").iterdir():
        try:
            text = (tid / "status").read_text()
        except OSError:                   # the thread ended meanwhile
            continue
        mode = int(re.search(r"^Seccomp:\s+(\d+)", text, re.M).group(1))
        filters = int(re.search(r"^Seccomp_filters:\s+(\d+)", text, re.M).group(1))
        found[int(tid.name)] = (mode, filters)
    return found


def test_vcpu_threads_run_filtered_and_the_vmm_threads_do_not(soak):
    pid = soak.guest.proc.pid
    status = seccomp_status(pid)
    assert status[pid] == (0, 0), status                  # the VMM (main) thread
    filtered = [tid for tid, (mode, filters) in status.items() if (mode, filters) == (2, 1)]
    # vCPU 0, and the workers of the devices its guest activated (at least the rng)
    assert len(filtered) >= 2, status
    assert all(mode in (0, 2) for mode, _ in status.values()), status


def test_cycles_leave_no_fd_thread_memslot_or_heap_behind(soak):
    result = soak.run()
    print()
    print(result.table())
    print(result.summary())
    assert len(result.samples) == CYCLES, result.summary()
    assert result.passed, result.summary()
    compared = [s for s in result.samples if s.verdict.startswith("ok")]
    assert len(compared) == CYCLES - WARMUP
    assert soak.guest.proc.poll() is None, soak.guest.pych_log()
    assert "seccomp" not in soak.guest.pych_log()
