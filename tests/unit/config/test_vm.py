"""pych.config.vm: VmConfig, its validation and its identifiers."""

from __future__ import annotations

import json
from typing import Any

import pytest
from hypothesis import given
from hypothesis import strategies as st

from pych.config import (
    ConfigConflict,
    ConfigError,
    DiskConfig,
    DuplicateDevicePath,
    IdentifierNotUnique,
    PayloadConfig,
    RateLimitGroupConfig,
    VmConfig,
)

from .helpers import GIB, dump, vm
from .roundtrip import EXAMPLES, cpus_configs, disks, memories, nets, optional, texts


def test_default_vm_config_json_matches_the_reference() -> None:
    assert dump(vm()) == {
        "cpus": {
            "boot_vcpus": 1,
            "max_vcpus": 1,
            "kvm_hyperv": False,
            "max_phys_bits": 46,
            "features": {"amx": False},
            "nested": True,
            "core_scheduling": "Vm",
            "profile": "Host",
        },
        "memory": {
            "size": 536870912,
            "mergeable": False,
            "hotplug_method": "Acpi",
            "shared": False,
            "hugepages": False,
            "prefault": False,
            "reserve": False,
            "thp": True,
        },
        "payload": {"kernel": "/k"},
        "rng": {"pci_segment": 0, "src": "/dev/urandom"},
        "serial": {"mode": "Null"},
        "console": {"pci_segment": 0, "mode": "Tty"},
        "debug_console": {"mode": "Off", "iobase": 233},
        "pvpanic": False,
        "iommu": False,
        "watchdog": False,
        "landlock_enable": False,
    }


def test_validate_sets_vm_iommu_from_devices() -> None:
    config = vm(disks=[{"path": "a", "iommu": True}])
    config.validate(check_support=False)  # the reference's rule; pych has no IOMMU
    assert config.iommu


def test_rate_limit_groups_are_referenced_by_disks() -> None:
    config = vm(
        rate_limit_groups=[dump(RateLimitGroupConfig.parse("id=g0,ops_size=10,ops_refill_time=5"))],
        disks=[dump(DiskConfig.parse("path=a,rate_limit_group=g0"))],
    )
    assert config.validate(check_support=False) == {"g0"}  # pych has no rate limiter


@EXAMPLES
@given(
    st.builds(
        VmConfig,
        cpus=cpus_configs,
        memory=memories,
        payload=st.builds(PayloadConfig, kernel=texts, cmdline=optional(texts)),
        disks=optional(st.lists(disks, max_size=2)),
        net=optional(st.lists(nets.map(lambda n: n.model_copy(update={"fds": None})), max_size=2)),
    )
)
def test_json_round_trip(config: VmConfig) -> None:
    text = json.dumps(dump(config))
    assert VmConfig.model_validate_json(text) == config
    assert VmConfig.model_validate(json.loads(text)) == config


# --------------------------------------------------------------------------
# Identifiers


@pytest.mark.parametrize(
    "fields",
    [
        {"disks": [{"path": "a", "id": "x"}, {"path": "b", "id": "x"}]},
        {"disks": [{"path": "a", "id": "x"}], "net": [{"id": "x"}]},
        {
            "disks": [{"path": "a", "id": "mem0"}],
            "memory": {"size": 0, "zones": [{"id": "mem0", "size": GIB}]},
        },
        {"rng": {"src": "/dev/urandom", "id": "r"}, "console": {"mode": "Off", "id": "r"}},
    ],
)
def test_duplicate_identifiers_conflict(fields: dict[str, Any]) -> None:
    with pytest.raises(IdentifierNotUnique, match=r"^Identifier \S+ is not unique$") as err:
        vm(**fields).validate()
    assert isinstance(err.value, ConfigConflict)


def test_reserved_identifiers() -> None:
    with pytest.raises(ConfigError, match="Identifier __disk is not valid") as err:
        vm(disks=[{"path": "a", "id": "__disk"}]).validate()
    assert not isinstance(err.value, ConfigConflict)


def test_duplicate_vfio_paths_conflict() -> None:
    with pytest.raises(DuplicateDevicePath, match="Duplicated device path: /sys/d") as err:
        vm(devices=[{"path": "/sys/d"}, {"path": "/sys/d"}]).validate()
    assert isinstance(err.value, ConfigConflict)


def test_validate_returns_the_identifiers() -> None:
    config = vm(disks=[{"path": "a", "id": "d0"}, {"path": "b"}], net=[{"id": "n0"}])
    assert config.validate() == {"d0", "n0"}


def test_identifiers_are_what_validate_returns() -> None:
    config = vm(
        rate_limit_groups=[dump(RateLimitGroupConfig.parse("id=g0,ops_size=1,ops_refill_time=1"))],
        disks=[{"path": "a", "id": "d0", "rate_limit_group": "g0"}, {"path": "b"}],
        net=[{"id": "n0"}],
        fs=[{"tag": "t", "socket": "/s", "id": "f0"}],
        pmem=[{"file": "/p", "id": "p0"}],
        rng={"src": "/dev/urandom", "id": "r0"},
        rtc={"id": "t0"},
        console={"mode": "Off", "id": "c0"},
        vsock={"cid": 3, "socket": "/v", "id": "v0"},
        balloon={"size": 0, "id": "b0"},
        devices=[{"path": "/sys/d", "id": "x0"}],
        vdpa=[{"path": "/dev/vhost-vdpa-0", "id": "a0"}],
        memory={"size": 0, "zones": [{"id": "z0", "size": GIB}]},
    )
    expected = {"g0", "d0", "n0", "f0", "p0", "r0", "t0", "c0", "v0", "b0", "x0", "a0", "z0"}
    assert config.identifiers() == expected
    assert config.validate(check_support=False) == expected  # rtc, vdpa: refused by pych
    assert vm().identifiers() == frozenset()


def test_identifiers_neither_validate_nor_normalise() -> None:
    config = VmConfig.model_validate(
        {
            "payload": {"firmware": "/fw", "cmdline": "x"},
            "disks": [{"path": "a", "id": "x", "iommu": True}, {"path": "b", "id": "x"}],
            "net": [{"id": "__reserved"}],
        }
    )
    before = config.model_dump()
    assert config.identifiers() == {"x", "__reserved"}
    assert config.model_dump() == before  # iommu still false, cmdline kept
    assert VmConfig().identifiers() == frozenset()  # no payload: validate() would raise
