"""pych.config.machine: --cpus, --platform, --numa, --pci-segment, --landlock-rules and
the payload."""

from __future__ import annotations

import pytest
from hypothesis import given

from pych.config import (
    ConfigError,
    CpusConfig,
    LandlockConfig,
    NumaConfig,
    OptionError,
    PayloadConfig,
    PciSegmentConfig,
    PlatformConfig,
    VmConfig,
)

from .helpers import dump, vm
from .roundtrip import EXAMPLES, cpus_cli, cpus_configs

# --------------------------------------------------------------------------
# --cpus


def test_cpus_defaults() -> None:
    cpus = CpusConfig.parse(CpusConfig.CLI_DEFAULT)
    assert dump(cpus) == {
        "boot_vcpus": 1,
        "max_vcpus": 1,
        "kvm_hyperv": False,
        "max_phys_bits": 46,
        "features": {"amx": False},
        "nested": True,
        "core_scheduling": "Vm",
        "profile": "Host",
    }
    assert CpusConfig.parse("") == cpus


def test_cpus_max_defaults_to_boot() -> None:
    cpus = CpusConfig.parse("boot=2")
    assert (cpus.boot_vcpus, cpus.max_vcpus) == (2, 2)


def test_cpus_all_keys() -> None:
    cpus = CpusConfig.parse(
        "boot=2,max=8,topology=2:2:1:2,kvm_hyperv=on,max_phys_bits=40,"
        "affinity=[0@[0,2],1@[1-3]],features=[amx],nested=off,core_scheduling=VCPU,profile=Host"
    )
    assert cpus == CpusConfig.model_validate(
        {
            "boot_vcpus": 2,
            "max_vcpus": 8,
            "topology": {
                "threads_per_core": 2,
                "cores_per_die": 2,
                "dies_per_package": 1,
                "packages": 2,
            },
            "kvm_hyperv": True,
            "max_phys_bits": 40,
            "affinity": [{"vcpu": 0, "host_cpus": [0, 2]}, {"vcpu": 1, "host_cpus": [1, 2, 3]}],
            "features": {"amx": True},
            "nested": False,
            "core_scheduling": "Vcpu",
        }
    )


@pytest.mark.parametrize(
    ("text", "message"),
    [
        ("boot=0", "boot_vcpus: Input should be greater than or equal to 1"),
        ("boot=two", "invalid value 'two' for 'boot'"),
        ("topology=1:2:3", "invalid value '1:2:3' for 'topology'"),
        ("features=[avx]", "invalid feature 'avx'"),
        ("core_scheduling=some", "expected one of: vm, vcpu, off"),
        ("max_phys_bits=300", "max_phys_bits: Input should be less than or equal to 255"),
        ("bogus=1", "unknown key 'bogus'"),
    ],
)
def test_cpus_errors(text: str, message: str) -> None:
    with pytest.raises(OptionError, match=r"^--cpus: ") as err:
        CpusConfig.parse(text)
    assert message in str(err.value)


def test_boot_above_max_is_a_clear_error() -> None:
    config = vm(cpus=dump(CpusConfig.parse("boot=4,max=2")))
    with pytest.raises(ConfigError, match=r"^Max CPUs \(2\) lower than boot CPUs \(4\)$"):
        config.validate()


def test_too_many_cpus() -> None:
    with pytest.raises(ConfigError, match="8192 is the limit"):
        vm(cpus={"boot_vcpus": 1, "max_vcpus": 8193}).validate()


@pytest.mark.parametrize(
    ("topology", "message"),
    [
        ("1:2:1:1", "does not match maximum vCPU"),
        ("0:2:1:2", "can be zero"),
        ("4:1:1:1", "at most 2 threads per core"),
    ],
)
def test_topology_checks(topology: str, message: str) -> None:
    config = vm(cpus=dump(CpusConfig.parse(f"boot=4,topology={topology}")))
    with pytest.raises(ConfigError, match=message):
        config.validate()


@EXAMPLES
@given(cpus_configs)
def test_cpus_cli_round_trip(cpus: CpusConfig) -> None:
    assert CpusConfig.parse(cpus_cli(cpus)) == cpus


# --------------------------------------------------------------------------
# Payload


def test_firmware_payload_drops_kernel_options() -> None:
    config = VmConfig(payload=PayloadConfig(firmware="/fw", cmdline="x", initramfs="/i"))
    config.validate(check_support=False)  # the reference's rule; pych boots no firmware
    assert dump(config.payload) == {"firmware": "/fw"}
    with pytest.raises(ConfigError, match="kernel is not supported when a firmware"):
        VmConfig(payload=PayloadConfig(firmware="/fw", kernel="/k")).validate(check_support=False)


def test_missing_payload() -> None:
    with pytest.raises(ConfigError, match="neither firmware nor kernel"):
        VmConfig().validate()
    with pytest.raises(ConfigError, match="neither firmware nor kernel"):
        VmConfig(payload=PayloadConfig(cmdline="x")).validate()


# --------------------------------------------------------------------------
# Platform, NUMA, PCI segments, Landlock


def test_numa() -> None:
    numa = NumaConfig.parse(
        "guest_numa_id=1,cpus=[0-1],distances=[0@20,1@10],memory_zones=[mem1],pci_segments=[1]"
    )
    assert dump(numa) == {
        "guest_numa_id": 1,
        "cpus": [0, 1],
        "distances": [{"destination": 0, "distance": 20}, {"destination": 1, "distance": 10}],
        "memory_zones": ["mem1"],
        "pci_segments": [1],
    }
    with pytest.raises(OptionError, match="guest_numa_id is required"):
        NumaConfig.parse("cpus=[0]")
    with pytest.raises(OptionError, match="device_id cannot be used"):
        NumaConfig.parse("guest_numa_id=0,device_id=d,cpus=[0]")
    with pytest.raises(ConfigError, match="must specify either device_id or cpus"):
        vm(numa=[{"guest_numa_id": 0}]).validate(check_support=False)


def test_platform() -> None:
    platform = PlatformConfig.parse(
        "num_pci_segments=2,iommu_segments=[1],iommu_address_width=48,serial_number=S,"
        "system_uuid=U,oem_strings=[a,b],vfio_p2p_dma=off,iommufd_fd=5"
    )
    assert platform == PlatformConfig.model_validate(
        {
            "num_pci_segments": 2,
            "iommu_segments": [1],
            "iommu_address_width_bits": 48,
            "serial_number": "S",  # the deprecated alias
            "system_uuid": "U",
            "oem_strings": ["a", "b"],
            "vfio_p2p_dma": False,
            "iommufd": True,  # implied by iommufd_fd
            "iommufd_fd": 5,
        }
    )
    assert platform.system_serial_number == "S"
    with pytest.raises(ConfigError, match=r"Number of PCI segments \(97\) not in range"):
        vm(platform={"num_pci_segments": 97}).validate(check_support=False)
    with pytest.raises(ConfigError, match="TDX is not supported"):
        vm(platform={"tdx": True}).validate(check_support=False)


def test_iommu_segments_put_the_vm_behind_an_iommu() -> None:
    config = vm(platform={"num_pci_segments": 2, "iommu_segments": [1]})
    config.validate(check_support=False)  # the reference's rule; pych has no IOMMU
    assert config.iommu


def test_pci_segment_option() -> None:
    assert PciSegmentConfig.parse("pci_segment=1,mmio32_aperture_weight=2") == PciSegmentConfig(
        pci_segment=1, mmio32_aperture_weight=2
    )


def test_landlock_option() -> None:
    assert LandlockConfig.parse("path=/tmp,access=rw") == LandlockConfig(path="/tmp", access="rw")


def test_deprecated_platform_keys_warn(caplog: pytest.LogCaptureFixture) -> None:
    with caplog.at_level("WARNING"):
        platform = PlatformConfig.parse("serial_number=S,uuid=U")
    assert (platform.system_serial_number, platform.system_uuid) == ("S", "U")
    assert [record.getMessage() for record in caplog.records] == [
        "'serial_number' in --platform is deprecated; use 'system_serial_number'.",
        "'uuid' in --platform is deprecated; use 'system_uuid'.",
    ]
    assert (
        PlatformConfig.parse("serial_number=S,system_serial_number=T").system_serial_number == "T"
    )
