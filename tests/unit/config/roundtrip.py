"""Round trips of the config tests: models written back as CLI strings, and hypothesis
strategies that build models (model -> CLI string -> parse, model -> JSON -> model)."""

from __future__ import annotations

from typing import Any

from hypothesis import settings
from hypothesis import strategies as st

from pych.config import CpusConfig, DiskConfig, MemoryConfig, MemoryZoneConfig, NetConfig


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


texts = st.text(st.characters(exclude_categories=("Cs",)), max_size=10)
_u8 = st.integers(0, 255)
_u16 = st.integers(0, 2**16 - 1)
_u32 = st.integers(0, 2**32 - 1)
_u64 = st.integers(0, 2**64 - 1)
_cpu_list = st.lists(st.integers(0, 512), min_size=1, max_size=4)


def optional(strategy: st.SearchStrategy[Any]) -> st.SearchStrategy[Any]:
    return st.none() | strategy


_pci = {
    "id": optional(texts),
    "iommu": st.booleans(),
    "pci_segment": _u16,
    "pci_device_id": optional(_u8),
}


_bucket = st.builds(
    dict, size=st.integers(1, 2**64 - 1), one_time_burst=_u64, refill_time=st.integers(1, 2**64 - 1)
)


disks = st.builds(
    DiskConfig,
    **_pci,
    path=optional(texts),
    readonly=st.booleans(),
    direct=st.booleans(),
    num_queues=_u64,
    queue_size=_u16,
    serial=optional(texts),
    queue_affinity=optional(
        st.lists(st.builds(dict, queue_index=_u16, host_cpus=_cpu_list), min_size=1, max_size=3)
    ),
    rate_limiter_config=optional(
        st.builds(dict, bandwidth=optional(_bucket), ops=_bucket)
        | st.builds(dict, bandwidth=_bucket, ops=optional(_bucket))
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
    tap=optional(texts),
    ip=optional(_ipv4),
    mask=optional(_ipv4),
    mac=optional(_mac),
    host_mac=optional(_mac),
    mtu=optional(_u16),
    num_queues=_u64,
    queue_size=_u16,
    vhost_mode=st.sampled_from(["Client", "Server"]),
    fds=optional(st.lists(st.integers(0, 2**31 - 1), min_size=1, max_size=4)),
    offload_tso=st.booleans(),
    offload_ufo=st.booleans(),
    offload_csum=st.booleans(),
)


cpus_configs = st.builds(
    CpusConfig,
    boot_vcpus=st.integers(1, 2**32 - 1),
    max_vcpus=st.integers(1, 2**32 - 1),
    topology=optional(
        st.builds(
            dict, threads_per_core=_u16, cores_per_die=_u16, dies_per_package=_u16, packages=_u16
        )
    ),
    kvm_hyperv=st.booleans(),
    max_phys_bits=_u8,
    affinity=optional(
        st.lists(st.builds(dict, vcpu=_u32, host_cpus=_cpu_list), min_size=1, max_size=3)
    ),
    features=st.builds(dict, amx=st.booleans()),
    nested=st.booleans(),
    core_scheduling=st.sampled_from(["Vm", "Vcpu", "Off"]),
)


_sizes = st.integers(0, 2**40) | st.integers(0, 2**14).map(lambda n: n << 20)


zones = st.builds(
    MemoryZoneConfig,
    id=texts,
    size=_sizes,
    file=optional(texts),
    shared=st.booleans(),
    hugepages=st.booleans(),
    hugepage_size=optional(_sizes),
    host_numa_node=optional(_u32),
    hotplug_size=optional(_sizes),
    hotplugged_size=optional(_sizes),
    prefault=st.booleans(),
    reserve=st.booleans(),
    mergeable=st.booleans(),
)


memories = st.builds(
    MemoryConfig,
    size=_sizes,
    mergeable=st.booleans(),
    hotplug_method=st.sampled_from(["Acpi", "VirtioMem"]),
    hotplug_size=optional(_sizes),
    hotplugged_size=optional(_sizes),
    shared=st.booleans(),
    hugepages=st.booleans(),
    hugepage_size=optional(_sizes),
    prefault=st.booleans(),
    reserve=st.booleans(),
    zones=optional(st.lists(zones, min_size=1, max_size=3)),
    thp=st.booleans(),
)


EXAMPLES = settings(max_examples=30, deadline=None)
