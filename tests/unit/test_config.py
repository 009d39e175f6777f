"""pych.config: the API schemas, their CLI parsers and VmConfig validation."""

from __future__ import annotations

import json
from typing import Any

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from pydantic import ValidationError

from pych.config import (
    ApiSocket,
    BalloonConfig,
    ConfigConflict,
    ConfigError,
    ConsoleConfig,
    CpusConfig,
    DebugConsoleConfig,
    DeviceConfig,
    DiskConfig,
    DuplicateDevicePath,
    EventMonitor,
    FsConfig,
    GenericVhostUserConfig,
    IdentifierNotUnique,
    LandlockConfig,
    MemoryConfig,
    MemoryZoneConfig,
    NetConfig,
    NumaConfig,
    OptionError,
    PayloadConfig,
    PciDeviceInfo,
    PciSegmentConfig,
    PlatformConfig,
    PmemConfig,
    RateLimiterConfig,
    RateLimitGroupConfig,
    ReceiveMigrationData,
    RestoreConfig,
    RngConfig,
    RtcConfig,
    SendMigrationData,
    SerialConfig,
    TpmConfig,
    UserDeviceConfig,
    VdpaConfig,
    VmConfig,
    VmInfo,
    VmRemoveDevice,
    VmResize,
    VmResizeZone,
    VsockConfig,
)
from pych.option_parser import OptionParserError

GIB = 1 << 30
MIB = 1 << 20


def vm(**fields: Any) -> VmConfig:
    """A bootable VmConfig with ``fields`` (JSON shaped)."""
    return VmConfig.model_validate({"payload": {"kernel": "/k"}, **fields})


def dump(model: Any) -> Any:
    return model.model_dump(mode="json", exclude_none=True)


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


# --------------------------------------------------------------------------
# --memory, --memory-zone


def test_memory_defaults() -> None:
    memory = MemoryConfig.parse(MemoryConfig.CLI_DEFAULT)
    assert dump(memory) == {
        "size": 512 * MIB,
        "mergeable": False,
        "hotplug_method": "Acpi",
        "shared": False,
        "hugepages": False,
        "prefault": False,
        "reserve": False,
        "thp": True,
    }
    assert memory == VmConfig().memory


def test_memory_size_suffixes() -> None:
    assert MemoryConfig.parse("size=1G").size == 1073741824
    assert MemoryConfig.parse("size=1024").size == 1024


def test_memory_hotplug_keys() -> None:
    memory = MemoryConfig.parse(
        "size=1G,hotplug_method=virtio-mem,hotplug_size=2G,hotplugged_size=512M,"
        "shared=on,hugepages=on,hugepage_size=2M,prefault=on,reserve=on,thp=off,mergeable=off"
    )
    assert memory == MemoryConfig.model_validate(
        {
            "size": GIB,
            "hotplug_method": "VirtioMem",
            "hotplug_size": 2 * GIB,
            "hotplugged_size": 512 * MIB,
            "shared": True,
            "hugepages": True,
            "hugepage_size": 2 * MIB,
            "prefault": True,
            "reserve": True,
            "thp": False,
        }
    )
    assert MemoryConfig.parse("hotplug_method=ACPI").hotplug_method == "Acpi"


def test_memory_file_key_is_accepted_and_ignored() -> None:
    assert MemoryConfig.parse("size=1G,file=/dev/shm/x") == MemoryConfig.parse("size=1G")


def test_memory_zones_inherit_mergeable() -> None:
    memory = MemoryConfig.parse(
        "size=0,mergeable=on,hotplug_method=virtio-mem",
        ["id=mem0,size=1G", "id=mem1,size=0,mergeable=off,hotplug_size=1G,host_numa_node=0"],
    )
    assert memory.zones == [
        MemoryZoneConfig(id="mem0", size=GIB, mergeable=True),
        MemoryZoneConfig(id="mem1", size=0, mergeable=False, hotplug_size=GIB, host_numa_node=0),
    ]
    assert MemoryZoneConfig.parse("id=z").size == 512 * MIB


def test_memory_zone_needs_an_id() -> None:
    with pytest.raises(OptionError, match=r"^--memory-zone: id missing$"):
        MemoryConfig.parse("size=0", ["size=1G"])


@pytest.mark.parametrize("text", ["size=1x", "size=", "size=-1G"])
def test_bad_memory_size(text: str) -> None:
    if text == "size=":  # key= means "use the default"
        assert MemoryConfig.parse(text).size == 512 * MIB
        return
    with pytest.raises(OptionError, match=r"^--memory: invalid value .* for 'size'"):
        MemoryConfig.parse(text)


@pytest.mark.parametrize(
    ("memory", "zones", "message"),
    [
        ("size=1000", [], "not a multiple of"),
        ("size=1G,hotplug_size=0", [], "hotplug_size"),
        ("size=1G,hotplug_size=1G,hotplugged_size=512M", [], "virtio-mem"),
        ("size=1G,hotplug_method=virtio-mem,hotplugged_size=512M", [], "needs a 'hotplug_size'"),
        (
            "size=1G,hotplug_method=virtio-mem,hotplug_size=1G,hotplugged_size=2G",
            [],
            "can't be bigger",
        ),
        ("size=0", [], "No memory zones found"),
        ("size=1G", ["id=z,size=1G"], "memory size of 0"),
        ("size=0", ["id=z,size=1G,hotplug_size=1G"], "hotplug_method=virtio-mem"),
        ("size=1G,hugepage_size=2M", [], "huge pages not enabled"),
        ("size=1G,hugepages=on,hugepage_size=3M", [], "not power of 2"),
        ("size=1G,shared=on,mergeable=on", [], "both 'mergeable' and 'shared'"),
    ],
)
def test_memory_validation(memory: str, zones: list[str], message: str) -> None:
    config = vm(memory=dump(MemoryConfig.parse(memory, zones)))
    with pytest.raises(ConfigError, match=message):
        config.validate()


def test_valid_memory_configurations() -> None:
    vm(memory=dump(MemoryConfig.parse("size=1G,hotplug_size=8G"))).validate()
    vm(
        memory=dump(
            MemoryConfig.parse(
                "size=1G,hotplug_method=virtio-mem,hotplug_size=8G,hotplugged_size=1G"
            )
        )
    ).validate()
    vm(
        memory=dump(
            MemoryConfig.parse(
                "size=0,hotplug_method=virtio-mem",
                ["id=mem0,size=1G,hotplug_size=1G", "id=mem1,size=512M"],
            )
        )
    ).validate()


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


def test_rate_limiter_needs_size_and_refill_time() -> None:
    assert DiskConfig.parse("path=a,bw_size=1000").rate_limiter_config is None
    limiter = DiskConfig.parse("path=a,bw_size=1000,bw_refill_time=10").rate_limiter_config
    assert dump(limiter) == {
        "bandwidth": {"size": 1000, "one_time_burst": 0, "refill_time": 10},
        "ops": None,  # serde writes the unset bucket as null
    }


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
        ("vhost_user=on,socket=/s", "shared memory"),
        ("path=a,rate_limit_group=g", "Invalid rate-limiter group"),
        ("path=a,serial=123456789012345678901", "serial length"),
    ],
)
def test_disk_validation(disk: str, message: str) -> None:
    config = vm(disks=[dump(DiskConfig.parse(disk))])
    with pytest.raises(ConfigError, match=message):
        config.validate()


def test_disk_on_second_segment_with_platform() -> None:
    config = vm(
        disks=[dump(DiskConfig.parse("path=a,pci_segment=1,pci_device_id=0"))],
        platform=dump(PlatformConfig.parse("num_pci_segments=2")),
    )
    config.validate()  # device id 0 is reserved on segment 0 only


def test_duplicate_disk_paths_are_not_a_config_error() -> None:
    # The reference's validate() only rejects duplicated VFIO paths; two disks
    # on one image are stopped later by the image lock.
    vm(disks=[{"path": "/a"}, {"path": "/a"}]).validate()


# --------------------------------------------------------------------------
# --net


def test_net_defaults() -> None:
    assert dump(NetConfig.parse("tap=")) == {
        "pci_segment": 0,
        "num_queues": 2,
        "queue_size": 256,
        "vhost_user": False,
        "vhost_mode": "Client",
        "offload_tso": True,
        "offload_ufo": True,
        "offload_csum": True,
    }


def test_net_all_keys() -> None:
    net = NetConfig.parse(
        "tap=tap0,ip=192.168.1.1,mask=255.255.255.0,mac=12:34:56:78:9A:BC,"
        "host_mac=02:00:00:00:00:01,mtu=1500,num_queues=4,queue_size=512,fd=[3,4],"
        "vhost_mode=server,offload_tso=off,offload_ufo=off,offload_csum=off,id=net0,iommu=on"
    )
    assert net == NetConfig.model_validate(
        {
            "id": "net0",
            "iommu": True,
            "tap": "tap0",
            "ip": "192.168.1.1",
            "mask": "255.255.255.0",
            "mac": "12:34:56:78:9a:bc",
            "host_mac": "02:00:00:00:00:01",
            "mtu": 1500,
            "num_queues": 4,
            "queue_size": 512,
            "fds": [3, 4],
            "vhost_mode": "Server",
            "offload_tso": False,
            "offload_ufo": False,
            "offload_csum": False,
        }
    )


@pytest.mark.parametrize(
    ("text", "message"),
    [
        ("ip=300.1.1.1", "not an IPv4 or IPv6 address"),
        ("mac=12:34:56", "not a MAC address"),
        ("fd=[a]", r"invalid value '\[a\]' for 'fd'"),
        ("vhost_mode=both", "expected one of: client, server"),
    ],
)
def test_net_errors(text: str, message: str) -> None:
    with pytest.raises(OptionError, match=message):
        NetConfig.parse(text)


def test_net_ipv6_is_normalized() -> None:
    assert NetConfig.parse("ip=fd00:0::1,mask=ffff:ffff::").ip == "fd00::1"


@pytest.mark.parametrize(
    ("net", "message"),
    [
        ("num_queues=1", "should be higher than 2"),
        ("num_queues=4", r"Queue count \(4\) must not exceed boot vCPUs \(1\)"),
        ("fd=[3,4]", r"does not match the number of FDs \(4\)"),
        ("fd=[2]", r"Reserved fd number \(<= 2\): 2"),
        ("mtu=1000", "lower than 1280"),
        ("offload_csum=off", "depend on"),
        ("ip=10.0.0.1", "IP provided without a mask"),
        ("mask=255.0.0.0", "Mask provided without an IP"),
        ("queue_size=3", "power of 2"),
    ],
)
def test_net_validation(net: str, message: str) -> None:
    config = vm(net=[NetConfig.parse(net).model_dump()])
    with pytest.raises(ConfigError, match=message):
        config.validate()


def test_fds_never_come_from_json() -> None:
    body = '{"tap": "t", "fds": [7, 8], "num_queues": 4}'
    assert NetConfig.model_validate_json(body).fds == [-1, -1]
    assert NetConfig.model_validate(json.loads(body)).fds == [7, 8]
    assert DeviceConfig.model_validate_json('{"fd": 9}').fd == -1
    assert PlatformConfig.model_validate_json('{"iommufd_fd": 9}').iommufd_fd == -1


# --------------------------------------------------------------------------
# The other device options


def test_rng() -> None:
    assert RngConfig.parse("") == RngConfig.parse(RngConfig.CLI_DEFAULT) == VmConfig().rng
    assert RngConfig.parse("src=/dev/random,iommu=on") == RngConfig(src="/dev/random", iommu=True)


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
    with pytest.raises(ConfigError, match="shared memory"):       # a private file mapping
        config.validate()
    vm(fs=[{"tag": "t", "socket": "/s"}],
       memory={"size": 0, "zones": [{**zone, "shared": True}]}).validate()


def test_pmem() -> None:
    assert PmemConfig.parse("file=/p,size=2M,discard_writes=on") == PmemConfig(
        file="/p", size=2 * MIB, discard_writes=True
    )
    with pytest.raises(OptionError, match=r"^--pmem: file missing$"):
        PmemConfig.parse("size=2M")


def test_vsock() -> None:
    assert VsockConfig.parse("cid=3,socket=/v.sock") == VsockConfig(cid=3, socket="/v.sock")
    with pytest.raises(OptionError, match="cid missing"):
        VsockConfig.parse("socket=/v.sock")
    with pytest.raises(OptionError, match="cid: Input should be greater than or equal to 3"):
        VsockConfig.parse("cid=2,socket=/v")
    with pytest.raises(ConfigError, match="4294967295 is a special VSOCK CID"):
        vm(vsock={"cid": 2**32 - 1, "socket": "/v"}).validate()


def test_balloon() -> None:
    balloon = BalloonConfig.parse("size=128M,deflate_on_oom=on,free_page_reporting=on")
    assert balloon == BalloonConfig(size=128 * MIB, deflate_on_oom=True, free_page_reporting=True)
    assert BalloonConfig.parse("").size == 0
    with pytest.raises(ConfigError, match=r"Balloon size \(536870912\) greater than RAM"):
        vm(balloon={"size": 512 * MIB}).validate()


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
        vm(devices=[DeviceConfig.parse("fd=5").model_dump()]).validate()
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


@pytest.mark.parametrize(
    ("cls", "text", "expected"),
    [
        (SerialConfig, "off", {"mode": "Off"}),
        (SerialConfig, "null", {"mode": "Null"}),
        (SerialConfig, "pty", {"mode": "Pty"}),
        (SerialConfig, "tty", {"mode": "Tty"}),
        (SerialConfig, "file=/tmp/serial.log", {"mode": "File", "file": "/tmp/serial.log"}),
        (SerialConfig, "socket=/tmp/s.sock", {"mode": "Socket", "socket": "/tmp/s.sock"}),
        (ConsoleConfig, "off", {"pci_segment": 0, "mode": "Off"}),
        (ConsoleConfig, "tty,iommu=on", {"iommu": True, "pci_segment": 0, "mode": "Tty"}),
        (ConsoleConfig, "file=/c", {"pci_segment": 0, "mode": "File", "file": "/c"}),
        (DebugConsoleConfig, "off,iobase=0xe9", {"mode": "Off", "iobase": 0xE9}),
        (DebugConsoleConfig, "file=/d", {"mode": "File", "file": "/d"}),
    ],
)
def test_console_modes(cls: type, text: str, expected: dict[str, Any]) -> None:
    assert dump(cls.parse(text)) == expected


@pytest.mark.parametrize(
    ("cls", "text", "message"),
    [
        (SerialConfig, "", "invalid console mode given"),
        (SerialConfig, "file=", "Path missing when using file console mode"),
        (SerialConfig, "socket=", "Path missing when using socket console mode"),
        (SerialConfig, "mode=tty", "unknown key 'mode'"),
        (SerialConfig, "off,iommu=on", "unknown key 'iommu'"),
        (DebugConsoleConfig, "off,iobase=e9", "`0x` prefix"),
        (DebugConsoleConfig, "socket=/s", "unknown key 'socket'"),
    ],
)
def test_console_errors(cls: type, text: str, message: str) -> None:
    with pytest.raises(OptionError, match=message):
        cls.parse(text)


def test_json_console_in_file_mode_needs_a_file() -> None:
    with pytest.raises(ConfigError, match="Path missing when using file console mode"):
        vm(serial={"mode": "File"}).validate()


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
        vm(numa=[{"guest_numa_id": 0}]).validate()


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
        vm(platform={"num_pci_segments": 97}).validate()
    with pytest.raises(ConfigError, match="TDX is not supported"):
        vm(platform={"tdx": True}).validate()


def test_iommu_segments_put_the_vm_behind_an_iommu() -> None:
    config = vm(platform={"num_pci_segments": 2, "iommu_segments": [1]})
    config.validate()
    assert config.iommu


def test_small_options() -> None:
    assert PciSegmentConfig.parse("pci_segment=1,mmio32_aperture_weight=2") == PciSegmentConfig(
        pci_segment=1, mmio32_aperture_weight=2
    )
    assert RtcConfig.parse("") == RtcConfig()
    assert TpmConfig.parse("socket=/tpm") == TpmConfig(socket="/tpm")
    assert LandlockConfig.parse("path=/tmp,access=rw") == LandlockConfig(path="/tmp", access="rw")
    group = RateLimitGroupConfig.parse("id=g0,bw_size=100,bw_refill_time=10")
    assert group.rate_limiter_config.bandwidth is not None
    assert group.rate_limiter_config.ops is None


def test_rate_limit_groups_are_referenced_by_disks() -> None:
    config = vm(
        rate_limit_groups=[dump(RateLimitGroupConfig.parse("id=g0,ops_size=10,ops_refill_time=5"))],
        disks=[dump(DiskConfig.parse("path=a,rate_limit_group=g0"))],
    )
    assert config.validate() == {"g0"}


# --------------------------------------------------------------------------
# VMM options


@pytest.mark.parametrize(
    ("text", "expected"),
    [
        ("/tmp/api.sock", ApiSocket(path="/tmp/api.sock")),
        ("path=/tmp/api.sock", ApiSocket(path="/tmp/api.sock")),
        ("fd=3", ApiSocket(fd=3)),
    ],
)
def test_api_socket(text: str, expected: ApiSocket) -> None:
    assert ApiSocket.parse(text) == expected


def test_event_monitor() -> None:
    assert EventMonitor.parse("path=/tmp/ev.json") == EventMonitor(path="/tmp/ev.json")
    assert EventMonitor.parse("fd=4") == EventMonitor(fd=4)
    with pytest.raises(OptionError, match="path or fd required"):
        EventMonitor.parse("")
    with pytest.raises(OptionError, match="unknown key"):
        EventMonitor.parse("/tmp/ev.json")


def test_restore_and_migration_options() -> None:
    restore = RestoreConfig.parse(
        "source_url=file:///snap,prefault=on,memory_restore_mode=ondemand,"
        "net_fds=[net0@[3,4]],vfio_fds=[gpu@5],resume=on,zone_updates=[mem0@1]"
    )
    assert dump(restore) == {
        "source_url": "file:///snap",
        "prefault": True,
        "memory_restore_mode": "OnDemand",
        "net_fds": [{"id": "net0", "num_fds": 2, "fds": [3, 4]}],
        "vfio_fds": [{"id": "gpu", "fd": 5}],
        "resume": True,
        "zone_updates": [{"id": "mem0", "host_numa_node": 1}],
    }
    # Over JSON the numbers mean nothing: the descriptors come with SCM_RIGHTS.
    assert RestoreConfig.model_validate_json(restore.model_dump_json()).net_fds[0].fds == [-1, -1]
    with pytest.raises(OptionError, match="source_url missing"):
        RestoreConfig.parse("resume=on")
    send = SendMigrationData.parse("destination_url=unix:/m,local=on,timeout_strategy=ignore")
    assert (send.local, send.timeout_strategy, send.downtime_ms) == (True, "Ignore", 300)
    with pytest.raises(OptionError, match="connections: Input should be less than or equal"):
        SendMigrationData.parse("destination_url=unix:/m,connections=129")
    receive = ReceiveMigrationData.parse("receiver_url=tcp:0.0.0.0:6000,memory_mode=postcopy")
    assert receive.memory_mode == "Postcopy"


# --------------------------------------------------------------------------
# JSON input rules


def test_unknown_json_fields_are_ignored() -> None:
    config = VmConfig.model_validate_json(
        '{"payload": {"kernel": "/k", "future": 1}, "cpus": {"boot_vcpus": 1, "max_vcpus": 2,'
        ' "new_knob": true}, "something_new": {}}'
    )
    assert config.cpus.max_vcpus == 2
    assert "something_new" not in dump(config)


def test_rate_limiter_rejects_unknown_fields_like_the_reference() -> None:
    with pytest.raises(ValidationError):
        RateLimiterConfig.model_validate({"bandwidth": None, "bogus": 1})


@pytest.mark.parametrize(
    "body",
    [
        {"path": "a", "num_queues": "2"},
        {"path": "a", "num_queues": 2.0},
        {"path": "a", "num_queues": True},
        {"path": "a", "readonly": 1},
        {"path": "a", "readonly": "on"},
        {"path": "a", "readonly": None},
        {"path": 5},
        {"path": "a", "image_type": "raw"},
    ],
)
def test_json_types_are_strict(body: dict[str, Any]) -> None:
    with pytest.raises(ValidationError):
        DiskConfig.model_validate(body)


def test_required_json_fields() -> None:
    for cls, body in [
        (CpusConfig, {"boot_vcpus": 1}),
        (MemoryConfig, {}),
        (RngConfig, {}),
        (ConsoleConfig, {}),
        (FsConfig, {"tag": "t"}),
        (VmResizeZone, {"id": "z"}),
        (VmRemoveDevice, {}),
    ]:
        with pytest.raises(ValidationError):
            cls.model_validate(body)
    # Required in the spec, defaulted by serde:
    assert FsConfig.model_validate({"tag": "t", "socket": "/s"}).queue_size == 1024
    assert NetConfig.model_validate({}).ip is None


def test_resize_ranges() -> None:
    with pytest.raises(ValidationError):
        VmResize.model_validate({"desired_vcpus": 0})
    with pytest.raises(ValidationError):
        VmResize.model_validate({"desired_ram": -1})
    with pytest.raises(ValidationError):
        SendMigrationData.model_validate({"destination_url": "unix:/s", "connections": 129})


def test_ch_remote_resize() -> None:
    resize = VmResize.from_remote_args(memory="3G")
    assert resize.desired_ram == 3221225472
    # ch-remote writes the unset fields as null
    assert dump(resize) == {
        "desired_vcpus": None,
        "desired_ram": 3221225472,
        "desired_balloon": None,
    }
    assert VmResize.from_remote_args(cpus="4", balloon="1G") == VmResize(
        desired_vcpus=4, desired_balloon=GIB
    )
    with pytest.raises(OptionError, match="K, M or G"):
        VmResize.from_remote_args(memory="3GB")
    with pytest.raises(OptionError, match="desired_vcpus"):
        VmResize.from_remote_args(cpus="0")


def test_option_errors_are_config_and_parser_errors() -> None:
    with pytest.raises(OptionError) as err:
        DiskConfig.parse("bogus=1")
    assert isinstance(err.value, ConfigError)
    assert isinstance(err.value, OptionParserError)


# --------------------------------------------------------------------------
# Output shape


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


def test_iommu_false_is_omitted_for_devices_only() -> None:
    assert "iommu" not in dump(DiskConfig(path="a"))
    assert dump(DiskConfig(path="a", iommu=True))["iommu"] is True
    assert dump(vm())["iommu"] is False


def test_validate_sets_vm_iommu_from_devices() -> None:
    config = vm(disks=[{"path": "a", "iommu": True}])
    config.validate()
    assert config.iommu


def test_firmware_payload_drops_kernel_options() -> None:
    config = VmConfig(payload=PayloadConfig(firmware="/fw", cmdline="x", initramfs="/i"))
    config.validate()
    assert dump(config.payload) == {"firmware": "/fw"}
    with pytest.raises(ConfigError, match="kernel is not supported when a firmware"):
        VmConfig(payload=PayloadConfig(firmware="/fw", kernel="/k")).validate()


def test_missing_payload() -> None:
    with pytest.raises(ConfigError, match="neither firmware nor kernel"):
        VmConfig().validate()
    with pytest.raises(ConfigError, match="neither firmware nor kernel"):
        VmConfig(payload=PayloadConfig(cmdline="x")).validate()


def test_vm_info_and_pci_device_info() -> None:
    info = VmInfo(config=vm(), state="Running", memory_actual_size=512 * MIB)
    body = json.loads(info.model_dump_json(exclude_none=True))
    assert list(body) == ["config", "state", "memory_actual_size"]
    assert PciDeviceInfo(id="_disk2", bdf="0000:00:06.0").model_dump_json() == (
        '{"id":"_disk2","bdf":"0000:00:06.0"}'
    )


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


def test_remove_device() -> None:
    config = vm(
        disks=[{"path": "a", "id": "d0"}, {"path": "b", "id": "d1"}],
        vsock={"cid": 3, "socket": "/v", "id": "v0"},
    )
    assert config.remove_device("d0")
    assert [disk.id for disk in config.disks or ()] == ["d1"]
    assert config.remove_device("v0")
    assert config.vsock is None
    assert not config.remove_device("nothing")


# --------------------------------------------------------------------------
# Round trips: model -> CLI string -> parse, and model -> JSON -> model


def _quote(value: str) -> str:
    return '"' + value.replace('"', '""') + '"'


def _on(value: bool) -> str:
    return "on" if value else "off"


def _ints(values: list[int]) -> str:
    return "[" + ",".join(map(str, values)) + "]"


def _pci_cli(config: Any) -> list[str]:
    parts = [f"pci_segment={config.pci_segment}", f"iommu={_on(config.iommu)}"]
    if config.id is not None:
        parts.append(f"id={_quote(config.id)}")
    if config.pci_device_id is not None:
        parts.append(f"pci_device_id={config.pci_device_id}")
    return parts


_IMAGE_SPELLINGS = {
    "Raw": "raw",
    "Qcow2": "qcow2",
    "FixedVhd": "vhd",
    "Vhdx": "vhdx",
    "FlatVmdk": "vmdk",
}


def disk_cli(disk: DiskConfig) -> str:
    parts = [
        *_pci_cli(disk),
        f"readonly={_on(disk.readonly)}",
        f"direct={_on(disk.direct)}",
        f"num_queues={disk.num_queues}",
        f"queue_size={disk.queue_size}",
        f"backing_files={_on(disk.backing_files)}",
        f"sparse={_on(disk.sparse)}",
        f"lock_granularity={'byte-range' if disk.lock_granularity == 'ByteRange' else 'full'}",
    ]
    if disk.path is not None:
        parts.append(f"path={_quote(disk.path)}")
    if disk.serial is not None:
        parts.append(f"serial={_quote(disk.serial)}")
    if disk.image_type != "Unknown":
        parts.append(f"image_type={_IMAGE_SPELLINGS[disk.image_type]}")
    if disk.queue_affinity is not None:
        pairs = ",".join(f"{a.queue_index}@{_ints(a.host_cpus)}" for a in disk.queue_affinity)
        parts.append(f"queue_affinity=[{pairs}]")
    if (limiter := disk.rate_limiter_config) is not None:
        for prefix, bucket in (("bw", limiter.bandwidth), ("ops", limiter.ops)):
            if bucket is not None:
                parts += [
                    f"{prefix}_size={bucket.size}",
                    f"{prefix}_one_time_burst={bucket.one_time_burst}",
                    f"{prefix}_refill_time={bucket.refill_time}",
                ]
    return ",".join(parts)


def net_cli(net: NetConfig) -> str:
    parts = [
        *_pci_cli(net),
        f"num_queues={net.num_queues}",
        f"queue_size={net.queue_size}",
        f"vhost_mode={net.vhost_mode.lower()}",
        f"offload_tso={_on(net.offload_tso)}",
        f"offload_ufo={_on(net.offload_ufo)}",
        f"offload_csum={_on(net.offload_csum)}",
    ]
    for key in ("tap", "ip", "mask", "mac", "host_mac"):
        if (value := getattr(net, key)) is not None:
            parts.append(f"{key}={_quote(value)}")
    if net.mtu is not None:
        parts.append(f"mtu={net.mtu}")
    if net.fds is not None:
        parts.append(f"fd={_ints(net.fds)}")
    return ",".join(parts)


def cpus_cli(cpus: CpusConfig) -> str:
    parts = [
        f"boot={cpus.boot_vcpus}",
        f"max={cpus.max_vcpus}",
        f"kvm_hyperv={_on(cpus.kvm_hyperv)}",
        f"max_phys_bits={cpus.max_phys_bits}",
        f"nested={_on(cpus.nested)}",
        f"core_scheduling={cpus.core_scheduling.lower()}",
    ]
    if (t := cpus.topology) is not None:
        parts.append(
            f"topology={t.threads_per_core}:{t.cores_per_die}:{t.dies_per_package}:{t.packages}"
        )
    if cpus.affinity is not None:
        parts.append(
            "affinity=[" + ",".join(f"{a.vcpu}@{_ints(a.host_cpus)}" for a in cpus.affinity) + "]"
        )
    if cpus.features.amx:
        parts.append("features=[amx]")
    return ",".join(parts)


def _size(value: int) -> str:
    for suffix, shift in (("G", 30), ("M", 20), ("K", 10)):
        if value and value % (1 << shift) == 0:
            return f"{value >> shift}{suffix}"
    return str(value)


def memory_cli(memory: MemoryConfig) -> tuple[str, list[str]]:
    parts = [
        f"size={_size(memory.size)}",
        f"mergeable={_on(memory.mergeable)}",
        f"hotplug_method={'acpi' if memory.hotplug_method == 'Acpi' else 'virtio-mem'}",
        f"shared={_on(memory.shared)}",
        f"hugepages={_on(memory.hugepages)}",
        f"prefault={_on(memory.prefault)}",
        f"reserve={_on(memory.reserve)}",
        f"thp={_on(memory.thp)}",
    ]
    for key in ("hotplug_size", "hotplugged_size", "hugepage_size"):
        if (value := getattr(memory, key)) is not None:
            parts.append(f"{key}={_size(value)}")
    zones = []
    for zone in memory.zones or ():
        zone_parts = [
            f"id={_quote(zone.id)}",
            f"size={_size(zone.size)}",
            f"shared={_on(zone.shared)}",
            f"hugepages={_on(zone.hugepages)}",
            f"mergeable={_on(zone.mergeable)}",
            f"prefault={_on(zone.prefault)}",
            f"reserve={_on(zone.reserve)}",
        ]
        if zone.file is not None:
            zone_parts.append(f"file={_quote(zone.file)}")
        for key in ("hugepage_size", "hotplug_size", "hotplugged_size"):
            if (value := getattr(zone, key)) is not None:
                zone_parts.append(f"{key}={_size(value)}")
        if zone.host_numa_node is not None:
            zone_parts.append(f"host_numa_node={zone.host_numa_node}")
        zones.append(",".join(zone_parts))
    return ",".join(parts), zones


_text = st.text(st.characters(exclude_categories=("Cs",)), max_size=10)
_u8 = st.integers(0, 255)
_u16 = st.integers(0, 2**16 - 1)
_u32 = st.integers(0, 2**32 - 1)
_u64 = st.integers(0, 2**64 - 1)
_cpu_list = st.lists(st.integers(0, 512), min_size=1, max_size=4)


def _optional(strategy: st.SearchStrategy[Any]) -> st.SearchStrategy[Any]:
    return st.none() | strategy


_pci = {
    "id": _optional(_text),
    "iommu": st.booleans(),
    "pci_segment": _u16,
    "pci_device_id": _optional(_u8),
}
_bucket = st.builds(
    dict, size=st.integers(1, 2**64 - 1), one_time_burst=_u64, refill_time=st.integers(1, 2**64 - 1)
)

disks = st.builds(
    DiskConfig,
    **_pci,
    path=_optional(_text),
    readonly=st.booleans(),
    direct=st.booleans(),
    num_queues=_u64,
    queue_size=_u16,
    serial=_optional(_text),
    queue_affinity=_optional(
        st.lists(st.builds(dict, queue_index=_u16, host_cpus=_cpu_list), min_size=1, max_size=3)
    ),
    rate_limiter_config=_optional(
        st.builds(dict, bandwidth=_optional(_bucket), ops=_bucket)
        | st.builds(dict, bandwidth=_bucket, ops=_optional(_bucket))
    ),
    backing_files=st.booleans(),
    sparse=st.booleans(),
    image_type=st.sampled_from(["Unknown", *_IMAGE_SPELLINGS]),
    lock_granularity=st.sampled_from(["ByteRange", "Full"]),
)

_ipv4 = st.ip_addresses(v=4).map(str)
_mac = st.binary(min_size=6, max_size=6).map(lambda b: ":".join(f"{x:02x}" for x in b))

nets = st.builds(
    NetConfig,
    **_pci,
    tap=_optional(_text),
    ip=_optional(_ipv4),
    mask=_optional(_ipv4),
    mac=_optional(_mac),
    host_mac=_optional(_mac),
    mtu=_optional(_u16),
    num_queues=_u64,
    queue_size=_u16,
    vhost_mode=st.sampled_from(["Client", "Server"]),
    fds=_optional(st.lists(st.integers(0, 2**31 - 1), min_size=1, max_size=4)),
    offload_tso=st.booleans(),
    offload_ufo=st.booleans(),
    offload_csum=st.booleans(),
)

cpus_configs = st.builds(
    CpusConfig,
    boot_vcpus=st.integers(1, 2**32 - 1),
    max_vcpus=st.integers(1, 2**32 - 1),
    topology=_optional(
        st.builds(
            dict, threads_per_core=_u16, cores_per_die=_u16, dies_per_package=_u16, packages=_u16
        )
    ),
    kvm_hyperv=st.booleans(),
    max_phys_bits=_u8,
    affinity=_optional(
        st.lists(st.builds(dict, vcpu=_u32, host_cpus=_cpu_list), min_size=1, max_size=3)
    ),
    features=st.builds(dict, amx=st.booleans()),
    nested=st.booleans(),
    core_scheduling=st.sampled_from(["Vm", "Vcpu", "Off"]),
)

_sizes = st.integers(0, 2**40) | st.integers(0, 2**14).map(lambda n: n << 20)
zones = st.builds(
    MemoryZoneConfig,
    id=_text,
    size=_sizes,
    file=_optional(_text),
    shared=st.booleans(),
    hugepages=st.booleans(),
    hugepage_size=_optional(_sizes),
    host_numa_node=_optional(_u32),
    hotplug_size=_optional(_sizes),
    hotplugged_size=_optional(_sizes),
    prefault=st.booleans(),
    reserve=st.booleans(),
    mergeable=st.booleans(),
)
memories = st.builds(
    MemoryConfig,
    size=_sizes,
    mergeable=st.booleans(),
    hotplug_method=st.sampled_from(["Acpi", "VirtioMem"]),
    hotplug_size=_optional(_sizes),
    hotplugged_size=_optional(_sizes),
    shared=st.booleans(),
    hugepages=st.booleans(),
    hugepage_size=_optional(_sizes),
    prefault=st.booleans(),
    reserve=st.booleans(),
    zones=_optional(st.lists(zones, min_size=1, max_size=3)),
    thp=st.booleans(),
)

_EXAMPLES = settings(max_examples=30, deadline=None)


@_EXAMPLES
@given(disks)
def test_disk_cli_round_trip(disk: DiskConfig) -> None:
    assert DiskConfig.parse(disk_cli(disk)) == disk


@_EXAMPLES
@given(nets)
def test_net_cli_round_trip(net: NetConfig) -> None:
    assert NetConfig.parse(net_cli(net)) == net


@_EXAMPLES
@given(cpus_configs)
def test_cpus_cli_round_trip(cpus: CpusConfig) -> None:
    assert CpusConfig.parse(cpus_cli(cpus)) == cpus


@_EXAMPLES
@given(memories)
def test_memory_cli_round_trip(memory: MemoryConfig) -> None:
    text, zone_texts = memory_cli(memory)
    assert MemoryConfig.parse(text, zone_texts) == memory


@_EXAMPLES
@given(
    st.builds(
        VmConfig,
        cpus=cpus_configs,
        memory=memories,
        payload=st.builds(PayloadConfig, kernel=_text, cmdline=_optional(_text)),
        disks=_optional(st.lists(disks, max_size=2)),
        net=_optional(st.lists(nets.map(lambda n: n.model_copy(update={"fds": None})), max_size=2)),
    )
)
def test_json_round_trip(config: VmConfig) -> None:
    text = json.dumps(dump(config))
    assert VmConfig.model_validate_json(text) == config
    assert VmConfig.model_validate(json.loads(text)) == config
