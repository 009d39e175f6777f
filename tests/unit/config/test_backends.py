"""pych.config.backends: --device, --user-device, --vdpa, --generic-vhost-user, --tpm."""

from __future__ import annotations

import pytest

from pych.config import (
    ConfigError,
    DeviceConfig,
    GenericVhostUserConfig,
    OptionError,
    TpmConfig,
    UserDeviceConfig,
    VdpaConfig,
)

from .helpers import dump, vm


def test_device() -> None:
    device = DeviceConfig.parse("path=/sys/bus/pci/devices/0000:01:00.0,x_exclude_mmap_bars=[0,2]")
    assert dump(device) == {
        "pci_segment": 0,
        "path": "/sys/bus/pci/devices/0000:01:00.0",
        "x_exclude_mmap_bars": [0, 2],
    }
    with pytest.raises(ConfigError, match="must specify `path=` or `fd=`"):
        vm(devices=[{}]).validate()
    with pytest.raises(ConfigError, match="requires platform `iommufd_fd=<fd>`"):
        vm(devices=[DeviceConfig.parse("fd=5").model_dump()]).validate(check_support=False)
    with pytest.raises(ConfigError, match="BAR index: 6"):
        vm(devices=[{"path": "/d", "x_exclude_mmap_bars": [6]}]).validate()


def test_user_device_and_vdpa() -> None:
    assert UserDeviceConfig.parse("socket=/u,id=u0") == UserDeviceConfig(socket="/u", id="u0")
    assert VdpaConfig.parse("path=/dev/vhost-vdpa-0,num_queues=2") == VdpaConfig(
        path="/dev/vhost-vdpa-0", num_queues=2
    )
    with pytest.raises(OptionError, match="path missing"):
        VdpaConfig.parse("num_queues=2")


def test_generic_vhost_user() -> None:
    config = GenericVhostUserConfig.parse("socket=/g,queue_sizes=[256,256],device_type=fs")
    assert (config.device_type, config.queue_sizes) == (26, [256, 256])
    assert (
        GenericVhostUserConfig.parse("socket=/g,queue_sizes=[1],device_type=42").device_type == 42
    )
    for bad in ("007", "nonsense"):
        with pytest.raises(OptionError, match="invalid"):
            GenericVhostUserConfig.parse(f"socket=/g,queue_sizes=[1],device_type={bad}")
    with pytest.raises(OptionError, match="cannot be implemented via vhost-user"):
        GenericVhostUserConfig.parse("socket=/g,queue_sizes=[1],device_type=iommu")


def test_tpm_option() -> None:
    assert TpmConfig.parse("socket=/tpm") == TpmConfig(socket="/tpm")
