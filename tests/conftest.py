import os
import sys

import pytest
from hypothesis import settings

HAVE_KVM = os.access("/dev/kvm", os.R_OK | os.W_OK)

# Property tests check results, never timings (performance is measured in bench/): no per-example
# deadline, which a unit test running beside two guests on 2 cores can miss for no fault of its
# own (hypothesis' default 200 ms failed test_aml under load).
settings.register_profile("pych", deadline=None)
settings.load_profile("pych")


def pytest_collection_modifyitems(config, items):
    _longest_modules_first(items)
    if HAVE_KVM:
        return
    skip = pytest.mark.skip(reason="/dev/kvm is absent: guest tests cannot run on this machine")
    guest_items = [i for i in items if "guest" in i.keywords]
    for item in guest_items:
        item.add_marker(skip)
    if guest_items:
        print(f"\n*** WARNING: /dev/kvm is absent: skipping {len(guest_items)} guest tests ***\n",
              file=sys.stderr)


# --- running the suite on 2 workers ------------------------------------------------------------
# `make test` runs `pytest -n 2 --dist loadfile --no-loadscope-reorder`: each module runs whole on
# one worker (guest modules share booted guests per module), and modules are handed out in
# collection order. The guest modules come first, longest first, so that the two workers end
# together on the short unit-test modules instead of one waiting for a long guest module started
# late. MODULE_MINUTES are a module's minutes in the last full run on 2 cores with both workers
# busy (each run prints the current figures at its end: "minutes per module"); a module not
# listed counts as GUEST_DEFAULT_MINUTES if it boots guests and as 0 otherwise.
MODULE_MINUTES = {     # the CI run of stop 24 (2026-12-07, 2 workers, nothing else on the host)
    "tests/guest/test_durability.py": 15.1, "tests/guest/test_cpu_hotplug_seed.py": 7.1,
    "tests/guest/test_migration.py": 7.0, "tests/guest/test_devices.py": 7.0,
    "tests/guest/test_pci_segments.py": 5.4, "tests/guest/test_reference_flows.py": 4.9,
    "tests/guest/test_net_data_plane.py": 4.7, "tests/guest/test_virtio_mem.py": 4.5,
    "tests/guest/test_cpu_hotplug.py": 4.4, "tests/guest/test_boot.py": 4.2,
    "tests/guest/test_memory_hotplug.py": 4.2, "tests/guest/test_pci_hotplug.py": 3.4,
    "tests/guest/test_memory_backing_landlock.py": 3.3,
    "tests/guest/test_honoured_options.py": 3.0, "tests/guest/test_backend_faults.py": 2.8,
    "tests/guest/test_soak.py": 2.6, "tests/guest/test_pci_hotplug_devices.py": 2.6,
    "tests/guest/test_memory_zones.py": 2.5, "tests/guest/test_kata_sequence.py": 2.4,
    "tests/guest/test_pci_hotplug_stress.py": 2.4, "tests/guest/test_api.py": 2.4,
    "tests/guest/test_snapshot.py": 2.4, "tests/guest/test_vhost_user_blk.py": 2.4,
    "tests/guest/test_virtio_fs.py": 2.3, "tests/guest/test_memory_dimm_removal.py": 1.8,
    "tests/guest/test_fuzz.py": 1.7,
}
GUEST_DEFAULT_MINUTES = 2


def _module_of(nodeid: str) -> str:
    return nodeid.split("::", 1)[0]


def _expected_minutes(module: str) -> float:
    if module in MODULE_MINUTES:
        return MODULE_MINUTES[module]
    return GUEST_DEFAULT_MINUTES if module.startswith("tests/guest/") else 0


def _longest_modules_first(items) -> None:
    """A stable sort: tests keep their order inside a module."""
    items.sort(key=lambda item: -_expected_minutes(_module_of(item.nodeid)))


_module_seconds: dict[str, float] = {}


def pytest_runtest_logreport(report):
    module = _module_of(report.nodeid)
    _module_seconds[module] = _module_seconds.get(module, 0.0) + report.duration


def pytest_terminal_summary(terminalreporter):
    """Minutes per module (setup + call + teardown of its tests), the slowest first: the
    figures MODULE_MINUTES orders the next run by."""
    if not _module_seconds:
        return
    slowest = sorted(_module_seconds.items(), key=lambda kv: -kv[1])
    terminalreporter.write_sep("=", "minutes per module (slowest 25)")
    for module, seconds in slowest[:25]:
        terminalreporter.write_line(f"{seconds / 60:6.1f}  {module}")
    terminalreporter.write_line(f"{sum(_module_seconds.values()) / 60:6.1f}  all modules, summed")
