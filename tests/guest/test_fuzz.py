"""The short CI variant of `make fuzz` (issue: reliability): the same code as scripts/fuzz.py
(tests/support/fuzz.py) against one booted test guest, with a small bound: ~1,000 generated
requests or one minute, every raw HTTP abuse scenario at half its connections (100
concurrent and 100 idle connections still in full), and the quick teardown (vm.shutdown,
vm.delete, vmm.shutdown: no extra boots). About 2-3 minutes with the boot.

The seed is fixed so that a failure reproduces (`scripts/fuzz.py --seed N --quick`);
PYCH_FUZZ_SEED picks another.
"""

import os

import pytest

from tests.support import fuzz

SEED = int(os.environ.get("PYCH_FUZZ_SEED", "20261126"))
PLAN = fuzz.Plan(requests=1000, minutes=1.0, side_requests=100, full=False, abuse_scale=0.5,
                 seed=SEED)

ABUSE_SCENARIOS = {
    "truncated request", "Content-Length: negative", "Content-Length: huge",
    "Content-Length: longer than the body", "Content-Length: shorter than the body",
    "body > 4 MiB, announced only", "body > 4 MiB, sent", "body > 4 MiB, Expect: 100-continue",
    "binary garbage", "slow client", "slow client, gives up half way",
    "client that never reads its answers", "100 concurrent keep-alive clients",
    "100 idle connections, then a ping",
}


@pytest.fixture(scope="module")
def report(tmp_path_factory):
    workdir = tmp_path_factory.mktemp("fuzz")
    target = fuzz.boot_guest(workdir)
    try:
        result = fuzz.run(target, PLAN, workdir)
    finally:
        target.stop()
    print(result.table())
    return result


def test_every_implemented_operation_got_generated_requests(report):
    gen_paths = fuzz.implemented_paths() - fuzz.ENDS_THE_VM - fuzz.HOST_SIDE_EFFECTS
    sent = {op.split(" ", 1)[1] for (phase, op, _), n in report.requests.items()
            if phase == "running" and n}
    assert gen_paths <= sent, f"never generated: {sorted(gen_paths - sent)}"
    assert report.generated >= 300, report.table()


def test_every_abuse_scenario_ran(report):
    ran = {scenario for scenario, _ in report.raw}
    assert ABUSE_SCENARIOS <= ran, f"missing: {sorted(ABUSE_SCENARIOS - ran)}"


def test_pych_and_the_guest_survived(report):
    for check in ("pych is alive", "vmm.ping answers", "the VM is Running",
                  "the guest runs a shell command", "pych logged no traceback",
                  "pych is back to its threads and fds after the abuse",
                  "pych exits 0 after vmm.shutdown"):
        assert check in report.checks, report.table()


def test_no_failures(report):
    assert report.failure_count == 0, report.table()
