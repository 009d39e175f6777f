"""The guest-side fuzzer, short: the fuzz guest (tests/fuzzguest, a freestanding PVH kernel
built here with gcc) boots under pych with every device model attached and attacks each of
them once with a fixed seed; pych is checked after every scenario (tests/support/
guest_fuzz.py: alive, API answering, VM running, threads/fds/anonymous memory within bounds,
no traceback, read-only files unchanged, nothing written outside what the guest may write).
``make fuzz-guest`` runs the long variant over several seeds.
"""

from __future__ import annotations

import pytest

from tests.support.guest_fuzz import FuzzGuest, build_guest, scenario_count

NETNS = "pychfuzzg"
SEED = 20261206


def test_the_fuzz_guest_builds_from_source(tmp_path):
    kernel = build_guest(tmp_path)
    data = kernel.read_bytes()
    assert data[:4] == b"\x7fELF" and b"Xen\0" in data
    assert b"FUZZ-SCENARIO" in data


@pytest.fixture(scope="module")
def fuzzed(netns, tmp_path_factory):
    g = FuzzGuest(tmp_path_factory.mktemp("fuzz-guest"), SEED, scenario_count(1, net=True),
                  rounds=30, netns=netns)
    with g:
        results = g.run(scenario_timeout=300)
    return g, results


def test_every_device_model_is_attacked_and_pych_stays_within_bounds(fuzzed):
    g, results = fuzzed
    kinds = [r.kind for r in results]
    assert len(results) == g.scenarios
    for kind in ("block", "net", "rng", "console", "pmem", "vsock", "balloon", "mem",
                 "ports", "mmio", "hotplug"):
        assert kind in kinds, (kind, kinds)
    assert kinds.count("block") == 2            # the read-only disk and the read-write one


def test_the_guest_printed_its_seed_and_found_every_device(fuzzed):
    g, _ = fuzzed
    out = bytes(g.console.buf)
    assert f"FUZZ-GUEST seed={SEED} ".encode() in out
    assert out.count(b"FUZZ-PCI dev=") >= 10    # host bridge + every device
