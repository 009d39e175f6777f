"""pych.config.kinds: the device-kind registry against VmConfig."""

from __future__ import annotations

import typing
from typing import Any

import pytest

from pych.config import PciDeviceConfig, VmConfig, kinds

from .helpers import vm

# A minimal valid device of every kind (JSON shaped).
SAMPLES: dict[str, dict[str, Any]] = {
    "console": {"mode": "Off"},
    "disk": {"path": "/a"},
    "net": {},
    "rng": {"src": "/dev/urandom"},
    "fs": {"tag": "t", "socket": "/s"},
    "pmem": {"file": "/p"},
    "vsock": {"cid": 3, "socket": "/v"},
    "balloon": {"size": 0},
    "vfio": {"path": "/sys/bus/pci/devices/0000:01:00.0"},
    "vfio-user": {"socket": "/u"},
    "vdpa": {"path": "/dev/vhost-vdpa-0"},
    "generic-vhost-user": {"socket": "/g", "queue_sizes": [256], "device_type": 26},
}


def test_every_kind_has_a_sample() -> None:
    assert set(SAMPLES) == set(kinds.BY_NAME)


@pytest.mark.parametrize("kind", kinds.DEVICE_KINDS, ids=lambda kind: kind.name)
def test_kind_model_and_field_exist_on_vm_config(kind: kinds.DeviceKind) -> None:
    assert issubclass(kind.model, PciDeviceConfig)
    assert kinds.kind_of(kind.model) is kind
    field = VmConfig.model_fields[kind.field]
    args = set(typing.get_args(field.annotation)) or {field.annotation}
    if kind.many:
        assert list[kind.model] in args and type(None) in args
    else:
        assert kind.model in args
    if kind.fixed_id is not None:
        assert not kind.id_prefix and kind.fixed_id.startswith("__")
    else:
        assert kind.id_prefix.startswith("_") and not kind.id_prefix.startswith("__")
    if kind.removable:
        assert type(None) in args  # removing the last one leaves the field unset
    if kind.add_endpoint is not None:
        assert kind.hotpluggable and kind.add_endpoint.startswith("vm.add-")


def test_id_prefixes_and_endpoints_are_unique() -> None:
    prefixes = [kind.id_prefix for kind in kinds.DEVICE_KINDS if kind.id_prefix]
    endpoints = [kind.add_endpoint for kind in kinds.DEVICE_KINDS if kind.add_endpoint]
    assert len(set(prefixes)) == len(prefixes)
    assert len(set(endpoints)) == len(endpoints)


@pytest.mark.parametrize(
    "kind", [kind for kind in kinds.DEVICE_KINDS if kind.removable], ids=lambda kind: kind.name
)
def test_append_remove_round_trip(kind: kinds.DeviceKind) -> None:
    config = vm()
    before = config.model_dump()
    first = kind.model.model_validate({**SAMPLES[kind.name], "id": "first"})
    second = kind.model.model_validate({**SAMPLES[kind.name], "id": "second"})
    kind.append(config, first)
    assert kind.configs(config) == [first]
    kind.append(config, second)
    assert kind.configs(config) == ([first, second] if kind.many else [second])
    assert kind.remove(config, "nothing") is None
    assert kind.remove(config, "second") is second
    if kind.many:
        assert kind.configs(config) == [first]
        assert kinds.remove_device(config, "first") == (kind, first)
    assert kind.configs(config) == []
    assert config.model_dump() == before


@pytest.mark.parametrize(
    "kind", [kind for kind in kinds.DEVICE_KINDS if not kind.many], ids=lambda kind: kind.name
)
def test_append_replaces_a_single_device(kind: kinds.DeviceKind) -> None:
    config = vm()
    device = kind.model.model_validate({**SAMPLES[kind.name], "id": "only"})
    kind.append(config, device)
    assert getattr(config, kind.field) is device
    assert kind.configs(config) == [device]


def test_devices_in_boot_order() -> None:
    config = vm(
        **{
            kind.field: [SAMPLES[kind.name]] if kind.many else SAMPLES[kind.name]
            for kind in kinds.DEVICE_KINDS
        }
    )
    assert [kind for kind, _ in kinds.devices(config)] == list(kinds.DEVICE_KINDS)


def test_remove_device() -> None:
    config = vm(
        disks=[{"path": "a", "id": "d0"}, {"path": "b", "id": "d1"}],
        vsock={"cid": 3, "socket": "/v", "id": "v0"},
    )
    assert kinds.remove_device(config, "d0")
    assert [disk.id for disk in config.disks or ()] == ["d1"]
    assert kinds.remove_device(config, "v0")
    assert config.vsock is None
    assert not kinds.remove_device(config, "nothing")


def test_fixed_devices_are_not_removable() -> None:
    config = vm(rng={"src": "/dev/urandom", "id": "r"}, console={"mode": "Off", "id": "c"})
    assert kinds.remove_device(config, "r") is None
    assert kinds.remove_device(config, "c") is None
    assert config.rng.id == "r" and config.console.id == "c"
