"""pych.config.storage: --disk, --pmem, --fs."""

from __future__ import annotations

import pytest
from hypothesis import given

from pych.config import ConfigError, DiskConfig, FsConfig, OptionError, PlatformConfig, PmemConfig

from .helpers import GIB, MIB, dump, vm
from .roundtrip import EXAMPLES, disk_cli, disks

# --------------------------------------------------------------------------
# --disk


def test_disk_parse_equals_json() -> None:
    assert DiskConfig.parse("path=x,readonly=on") == DiskConfig.model_validate(
        {"path": "x", "readonly": True}
    )
    assert DiskConfig.parse("path=x,readonly=on") == DiskConfig.model_validate_json(
        '{"path": "x", "readonly": true}'
    )


def test_disk_defaults() -> None:
    disk = DiskConfig.parse("path=/img/a.raw")
    assert dump(disk) == {
        "pci_segment": 0,
        "path": "/img/a.raw",
        "readonly": False,
        "direct": False,
        "num_queues": 1,
        "queue_size": 128,
        "vhost_user": False,
        "disable_io_uring": False,
        "disable_aio": False,
        "backing_files": False,
        "sparse": True,
        "image_type": "Unknown",
        "lock_granularity": "ByteRange",
    }


def test_disk_all_keys() -> None:
    disk = DiskConfig.parse(
        "path=/a,readonly=on,direct=on,iommu=on,num_queues=2,queue_size=256,"
        "bw_size=1000,bw_one_time_burst=10,bw_refill_time=100,ops_size=5,ops_refill_time=50,"
        "id=data,pci_segment=1,pci_device_id=7,serial=SN1,queue_affinity=[0@[1],1@[2-3]],"
        "backing_files=on,sparse=off,image_type=qcow2,lock_granularity=full,_disable_aio=on"
    )
    assert dump(disk) == {
        "id": "data",
        "iommu": True,
        "pci_segment": 1,
        "pci_device_id": 7,
        "path": "/a",
        "readonly": True,
        "direct": True,
        "num_queues": 2,
        "queue_size": 256,
        "vhost_user": False,
        "rate_limiter_config": {
            "bandwidth": {"size": 1000, "one_time_burst": 10, "refill_time": 100},
            "ops": {"size": 5, "one_time_burst": 0, "refill_time": 50},
        },
        "disable_io_uring": False,
        "disable_aio": True,
        "serial": "SN1",
        "queue_affinity": [
            {"queue_index": 0, "host_cpus": [1]},
            {"queue_index": 1, "host_cpus": [2, 3]},
        ],
        "backing_files": True,
        "sparse": False,
        "image_type": "Qcow2",
        "lock_granularity": "Full",
    }


@pytest.mark.parametrize(
    ("spelling", "image_type"),
    [
        ("raw", "Raw"),
        ("QCOW2", "Qcow2"),
        ("vhd", "FixedVhd"),
        ("vhdx", "Vhdx"),
        ("vmdk", "FlatVmdk"),
    ],
)
def test_disk_image_types(spelling: str, image_type: str) -> None:
    assert DiskConfig.parse(f"path=a,image_type={spelling}").image_type == image_type


def test_disk_vhost_user_socket() -> None:
    disk = DiskConfig.parse("vhost_user=on,socket=/tmp/vu.sock,image_type=raw")
    assert disk.vhost_socket == "/tmp/vu.sock"
    assert disk.image_type == "Unknown"  # the backend's business


@pytest.mark.parametrize(
    ("text", "message"),
    [
        ("path=a,readonly=maybe", "invalid value 'maybe' for 'readonly'"),
        ("path=a,num_queues=-1", "num_queues: Input should be greater than or equal to 0"),
        ("path=a,queue_size=70000", "queue_size: Input should be less than or equal to 65535"),
        ("path=a,image_type=iso", "expected one of: raw, qcow2, vhd, vhdx, vmdk"),
        ("path=a,lock_granularity=Full", "expected one of: byte-range, full"),
        ("path=a,raedonly=on", "unknown key 'raedonly'"),
    ],
)
def test_disk_errors(text: str, message: str) -> None:
    with pytest.raises(OptionError, match=r"^--disk: ") as err:
        DiskConfig.parse(text)
    assert message in str(err.value)


@pytest.mark.parametrize(
    ("disk", "message"),
    [
        ("path=a,num_queues=2", r"Queue count \(2\) must not exceed boot vCPUs \(1\)"),
        ("path=a,queue_size=100", "power of 2"),
        ("path=a,queue_size=2", "greater than 2"),
        ("path=a,pci_device_id=32", r"Given PCI device ID \(32\) is out of the supported range"),
        ("path=a,pci_device_id=0", r"Given PCI device ID \(0\) is reserved"),
        ("path=a,pci_segment=1", "Invalid PCI segment id: 1"),
        ("path=a,socket=/s", "Disk path and vhost socket both provided"),
        ("path=a,rate_limit_group=g", "Invalid rate-limiter group"),
        ("path=a,serial=123456789012345678901", "serial length"),
    ],
)
def test_disk_validation(disk: str, message: str) -> None:
    config = vm(disks=[dump(DiskConfig.parse(disk))])
    with pytest.raises(ConfigError, match=message):
        config.validate(check_support=False)  # the reference's rules, vhost-user included


def test_disk_on_second_segment_with_platform() -> None:
    config = vm(
        disks=[dump(DiskConfig.parse("path=a,pci_segment=1,pci_device_id=0"))],
        platform=dump(PlatformConfig.parse("num_pci_segments=2")),
    )
    config.validate(check_support=False)  # device id 0 is reserved on segment 0 only


def test_duplicate_disk_paths_are_not_a_config_error() -> None:
    # The reference's validate() only rejects duplicated VFIO paths; two disks
    # on one image are stopped later by the image lock.
    vm(disks=[{"path": "/a"}, {"path": "/a"}]).validate()


@EXAMPLES
@given(disks)
def test_disk_cli_round_trip(disk: DiskConfig) -> None:
    assert DiskConfig.parse(disk_cli(disk)) == disk


# --------------------------------------------------------------------------
# --pmem, --fs


def test_pmem() -> None:
    assert PmemConfig.parse("file=/p,size=2M,discard_writes=on") == PmemConfig(
        file="/p", size=2 * MIB, discard_writes=True
    )
    with pytest.raises(OptionError, match=r"^--pmem: file missing$"):
        PmemConfig.parse("size=2M")


def test_fs() -> None:
    fs = FsConfig.parse("tag=myfs,socket=/tmp/fs.sock")
    assert (fs.num_queues, fs.queue_size) == (1, 1024)
    assert fs == FsConfig.model_validate({"tag": "myfs", "socket": "/tmp/fs.sock"})
    with pytest.raises(OptionError, match=r"^--fs: tag missing$"):
        FsConfig.parse("socket=/s")
    with pytest.raises(OptionError, match=r"^--fs: socket missing$"):
        FsConfig.parse("tag=t")
    with pytest.raises(OptionError, match="max tag length is 36"):
        FsConfig.parse(f"tag={'x' * 37},socket=/s")
    with pytest.raises(OptionError, match="unknown key 'iommu'"):
        FsConfig.parse("tag=t,socket=/s,iommu=on")


def test_fs_needs_shareable_memory() -> None:
    # pych's RAM is memfd-backed and mapped shared: unlike the reference, no shared=on needed
    vm(fs=[{"tag": "t", "socket": "/s"}]).validate()
    vm(fs=[{"tag": "t", "socket": "/s"}], memory={"size": GIB, "shared": True}).validate()
    zone = {"id": "z", "size": GIB, "file": "/ram"}
    config = vm(fs=[{"tag": "t", "socket": "/s"}], memory={"size": 0, "zones": [zone]})
    with pytest.raises(ConfigError, match="shared memory"):  # a private file mapping
        config.validate()
    vm(
        fs=[{"tag": "t", "socket": "/s"}], memory={"size": 0, "zones": [{**zone, "shared": True}]}
    ).validate()


def test_vhost_user_disk_needs_shareable_memory_only() -> None:
    # As --fs: pych's RAM is always shareable, so no shared=on; a private file zone is not.
    disk = {"vhost_user": True, "vhost_socket": "/s"}
    vm(disks=[disk]).validate()
    zone = {"id": "z", "size": GIB, "file": "/ram"}
    with pytest.raises(ConfigError, match="shared memory"):
        vm(disks=[disk], memory={"size": 0, "zones": [zone]}).validate()
    with pytest.raises(ConfigError, match="No socket provided when using vhost-user"):
        vm(disks=[{"vhost_user": True}]).validate()
