"""Huge pages (``hugepages=on``, ``hugepage_size``) and KSM (``mergeable=on``) for guest RAM,
without KVM: the host's pools (a fake sysfs), the refusals naming the option, the backing of
boot RAM, zones and DIMMs.  The host's real pool is not changed here (the guest test
tests/guest/test_memory_backing_landlock.py reserves pages and boots on them)."""

from __future__ import annotations

import os
import re
from pathlib import Path

import pytest

from pych.config import ConfigError, VmConfig
from pych.devices.bus import Bus
from pych.memory import hugepages
from pych.memory.manager import MemoryManager
from pych.memory.resize import MemoryResizeError

from .test_manager import FakeKvmVm

MiB, GiB = 1 << 20, 1 << 30


def fake_sysfs(tmp_path: Path, pools: dict[int, tuple[int, int, int]]) -> Path:
    for size, (total, free, reserved) in pools.items():
        d = tmp_path / f"hugepages-{size // 1024}kB"
        d.mkdir()
        for name, value in (("nr_hugepages", total), ("free_hugepages", free),
                            ("resv_hugepages", reserved)):
            (d / name).write_text(f"{value}\n")
    return tmp_path


@pytest.fixture
def pools(tmp_path, monkeypatch):
    """Set the host's pools: ``{size: (total, free, reserved)}``."""
    def set_pools(given):
        d = tmp_path / f"sysfs{len(list(tmp_path.iterdir()))}"
        d.mkdir()
        monkeypatch.setattr(hugepages, "SYSFS", fake_sysfs(d, given))
    return set_pools


def config(memory: dict) -> VmConfig:
    cfg = VmConfig.model_validate({"payload": {"kernel": __file__}, "memory": memory})
    cfg.validate()
    return cfg


# --- the host's pools -------------------------------------------------------------------------
def test_sizes_and_pools_are_read_from_sysfs(pools):
    pools({2 * MiB: (100, 80, 30), GiB: (0, 0, 0)})
    assert hugepages.host_sizes() == [2 * MiB, GiB]
    assert hugepages.pool(2 * MiB) == (100, 80, 30)
    assert hugepages.pool(16 * GiB) == (0, 0, 0)           # a size the host lacks


def test_free_unreserved_pages_must_cover_the_ram(pools):
    pools({2 * MiB: (100, 80, 30), GiB: (0, 0, 0)})
    hugepages.check_available([("--memory", 2 * MiB, 100 * MiB)])      # 50 of 50
    with pytest.raises(hugepages.HugePageError) as err:
        hugepages.check_available([("--memory-zone a", 2 * MiB, 60 * MiB),
                                   ("--memory-zone b", 2 * MiB, 42 * MiB)])
    assert str(err.value).startswith(
        "--memory-zone a, --memory-zone b hugepages=on: the guest RAM needs 51 huge pages of "
        "2 MiB, the host has 50 free (of 100; HugePages_Free less HugePages_Rsvd)")
    with pytest.raises(ConfigError, match="needs 1 huge pages of 1 GiB, the host has 0 free"):
        hugepages.check_available([("--memory", GiB, GiB)])


def test_a_size_the_host_does_not_offer_is_refused_by_name(pools, tmp_path, monkeypatch):
    pools({2 * MiB: (0, 0, 0)})
    with pytest.raises(hugepages.HugePageError,
                       match=r"^--memory hugepage_size=1073741824: the host offers huge pages "
                             r"of 2 MiB only$"):
        hugepages.page_size(GiB, "--memory")
    meminfo = tmp_path / "meminfo"
    monkeypatch.setattr(hugepages, "MEMINFO", meminfo)
    meminfo.write_text("MemTotal: 100 kB\nHugepagesize:       2048 kB\n")
    assert hugepages.page_size(None, "--memory") == 2 * MiB      # the host's default size
    meminfo.write_text("Hugepagesize:    1048576 kB\n")
    with pytest.raises(hugepages.HugePageError, match="hugepage_size=1073741824"):
        hugepages.page_size(None, "--memory-zone z")


def test_vm_create_checks_the_pool_and_builds_nothing(pools, monkeypatch):
    from tests.unit.vmm.fakes import fake_vmm

    pools({2 * MiB: (64, 64, 0)})
    vmm = fake_vmm(monkeypatch)
    try:
        refused = config({"size": 0, "zones": [
            {"id": "a", "size": 64 * MiB, "hugepages": True, "hugepage_size": 2 * MiB},
            {"id": "b", "size": 96 * MiB, "hugepages": True, "hugepage_size": 2 * MiB}]})
        with pytest.raises(ConfigError, match="^--memory-zone a, --memory-zone b hugepages=on: "
                                              "the guest RAM needs 80 huge pages"):
            vmm.vm_create(refused)
        assert vmm.config is None
        vmm.vm_create(config({"size": 128 * MiB, "hugepages": True,
                              "hugepage_size": 2 * MiB}))     # 64 of 64
        assert vmm.config is not None
    finally:
        vmm.close()


# --- what the configuration refuses by name -----------------------------------------------------
@pytest.mark.parametrize("memory, message", [
    ({"size": 128 * MiB, "hugepages": True, "mergeable": True},
     "memory: mergeable=on with hugepages=on is not supported by pych: KSM merges only"),
    ({"size": 128 * MiB, "hugepages": True, "hotplug_method": "VirtioMem",
      "hotplug_size": 256 * MiB},
     "memory: hugepages=on with virtio-mem hot plug (hotplug_size) is not supported by pych"),
    ({"size": 128 * MiB, "mergeable": True, "hotplug_method": "VirtioMem",
      "hotplug_size": 256 * MiB},
     "memory: mergeable=on with virtio-mem hot plug (hotplug_size) is not supported by pych"),
    ({"size": 0, "hotplug_method": "VirtioMem", "zones": [
        {"id": "z", "size": 128 * MiB, "hugepages": True, "hotplug_size": 256 * MiB}]},
     "memory zone 'z': hugepages=on with virtio-mem hot plug"),
    ({"size": 0, "zones": [{"id": "z", "size": 128 * MiB, "hugepages": True,
                            "file": __file__}]},
     "memory zone 'z': hugepages=on with a file is not supported by pych"),
    ({"size": 128 * MiB, "hugepage_size": 2 * MiB},
     "Huge page size specified but huge pages not enabled"),
    ({"size": 129 * MiB, "hugepages": True, "hugepage_size": 2 * MiB},
     "memory size 135266304 is not a multiple of 2097152"),
])
def test_backings_pych_cannot_combine_are_refused_by_name(memory, message):
    with pytest.raises(ConfigError) as err:
        config(memory)
    assert message in str(err.value), err.value


def test_mergeable_ram_cannot_be_shared_with_a_vhost_user_back_end():
    body = {"payload": {"kernel": __file__}, "fs": [{"tag": "t", "socket": "/s"}]}
    for memory in ({"size": 128 * MiB, "mergeable": True},
                   {"size": 0, "zones": [{"id": "z", "size": 128 * MiB, "mergeable": True}]}):
        cfg = VmConfig.model_validate({**body, "memory": memory})
        with pytest.raises(ConfigError, match="vhost-user requires using shared memory"):
            cfg.validate()
    VmConfig.model_validate({**body, "memory": {"size": 128 * MiB}}).validate()


# --- the backing --------------------------------------------------------------------------------
def test_a_hugetlbfs_memfd_has_the_page_size_it_asks_for():
    """The real kernel: creating and sizing a hugetlbfs memfd takes no page from the pool;
    its block size is the huge page size."""
    for size in hugepages.host_sizes():
        fd = hugepages.memfd("pych-test", size, size)
        try:
            st = os.fstat(fd)
            assert (st.st_blksize, st.st_size) == (size, size)
        finally:
            os.close(fd)
    assert hugepages.host_sizes(), "this host's kernel offers no huge pages"


def record_hugepage_memfds(monkeypatch) -> list[tuple]:
    """hugepages.memfd recorded, and backed by an ordinary memfd (the host's pool is not
    touched): ``(name, size, hugepage_size)`` per call."""
    calls = []

    def memfd(name, size, hugepage_size):
        calls.append((name, size, hugepage_size))
        fd = os.memfd_create(name, os.MFD_CLOEXEC)
        os.ftruncate(fd, size)
        return fd

    monkeypatch.setattr(hugepages, "memfd", memfd)
    return calls


@pytest.fixture
def recorded_memfds(monkeypatch):
    return record_hugepage_memfds(monkeypatch)


def test_zones_and_dimms_are_backed_by_huge_pages_of_their_size(pools, recorded_memfds):
    pools({2 * MiB: (512, 512, 0), GiB: (0, 0, 0)})
    cfg = config({"size": 256 * MiB, "hugepages": True, "hugepage_size": 2 * MiB,
                  "hotplug_size": 512 * MiB})
    mm = MemoryManager(cfg.memory, FakeKvmVm(), Bus("mmio"), notify=lambda event: None)
    try:
        mm.create_boot_memory()
        assert recorded_memfds == [("pych-mem0", 256 * MiB, 2 * MiB)]
        assert mm.resize(384 * MiB)
        assert recorded_memfds[1] == ("pych-dimm0", 128 * MiB, 2 * MiB)
        # no THP advice on hugetlbfs RAM (it is huge already)
        smaps = Path("/proc/self/smaps").read_text()
        assert not re.search(r"pych-(mem0|dimm0).*?VmFlags:[^\n]* hg", smaps, re.S)
    finally:
        mm.close()


def test_a_dimm_the_pool_cannot_give_is_refused_and_leaves_nothing(pools, recorded_memfds):
    pools({2 * MiB: (128, 128, 0)})
    cfg = config({"size": 256 * MiB, "hugepages": True, "hugepage_size": 2 * MiB,
                  "hotplug_size": 1 * GiB})
    mm = MemoryManager(cfg.memory, FakeKvmVm(), Bus("mmio"), notify=lambda event: None)
    try:
        mm.create_boot_memory()
        pools({2 * MiB: (128, 0, 0)})                       # the boot RAM took them all
        regions, slots = list(mm.guest_memory.regions), dict(mm.kvm_vm.memslots)
        with pytest.raises(MemoryResizeError,
                           match=r"cannot plug a DIMM of 128 MiB: --memory hugepages=on: the "
                                 r"guest RAM needs 64 huge pages of 2 MiB, the host has 0 free"):
            mm.check_resize(384 * MiB)
        with pytest.raises(MemoryResizeError):
            mm.resize(384 * MiB)
        assert list(mm.guest_memory.regions) == regions and mm.kvm_vm.memslots == slots
        assert len(recorded_memfds) == 1
    finally:
        mm.close()


def test_a_pool_that_runs_short_at_boot_fails_the_mapping_naming_the_option(monkeypatch):
    """The real kernel: mapping a hugetlbfs memfd reserves its pages, so a pool without
    them fails at once (ENOMEM), not at the guest's first touch.  The size picked is one
    whose pool has no free page (1 GiB here: nothing reserves them)."""
    empty = [size for size in hugepages.host_sizes()
             if hugepages.pool(size)[1] - hugepages.pool(size)[2] == 0]
    assert empty, "every huge page size of this host has free pages"
    size = empty[-1]
    monkeypatch.setattr(hugepages, "check_available", lambda needs: None)
    cfg = config({"size": 0, "zones": [{"id": "z", "size": size, "hugepages": True,
                                        "hugepage_size": size}]})
    mm = MemoryManager(cfg.memory, FakeKvmVm(), Bus("mmio"), notify=lambda event: None)
    try:
        with pytest.raises(ValueError, match=r"^--memory-zone z hugepages=on: the host has too "
                                             r"few free huge pages"):
            mm.create_boot_memory()
        assert not mm.guest_memory.regions and not mm.kvm_vm.memslots
    finally:
        mm.close()


# --- KSM --------------------------------------------------------------------------------------
def _flags_of(region) -> list[str]:
    """The VmFlags of the mapping holding ``region`` (adjacent anonymous mappings with the
    same flags are one mapping)."""
    for block in re.split(r"\n(?=[0-9a-f]+-[0-9a-f]+ )", Path("/proc/self/smaps").read_text()):
        start, end = (int(x, 16) for x in block.split(" ", 1)[0].split("-"))
        if start <= region.host_addr and region.host_addr + region.size <= end:
            return re.search(r"^VmFlags:(.*)$", block, re.M)[1].split()
    raise AssertionError(f"no mapping holds {region.host_addr:#x}+{region.size:#x}")


def test_mergeable_ram_and_dimms_are_private_anonymous_and_advised():
    cfg = config({"size": 128 * MiB, "mergeable": True, "hotplug_size": 512 * MiB})
    mm = MemoryManager(cfg.memory, FakeKvmVm(), Bus("mmio"), notify=lambda event: None)
    try:
        mm.create_boot_memory()
        assert mm.resize(256 * MiB)
        boot, dimm = mm.guest_memory.regions
        for region in (boot, dimm):
            assert region.fd == -1                  # no memfd: KSM merges anonymous pages
            flags = _flags_of(region)
            assert "mg" in flags and "sh" not in flags, flags
        mm.guest_memory.write(dimm.gpa + 4096, b"still guest RAM")
        assert mm.guest_memory.read(dimm.gpa + 4096, 15) == b"still guest RAM"
    finally:
        mm.close()


def test_only_the_mergeable_zone_is_advised():
    cfg = config({"size": 0, "zones": [{"id": "a", "size": 64 * MiB},
                                       {"id": "b", "size": 64 * MiB, "mergeable": True}]})
    mm = MemoryManager(cfg.memory, FakeKvmVm(), Bus("mmio"), notify=lambda event: None)
    try:
        mm.create_boot_memory()
        a, b = mm.guest_memory.regions
        assert "mg" not in _flags_of(a) and a.fd >= 0
        assert "mg" in _flags_of(b) and b.fd == -1
    finally:
        mm.close()
