"""What pych does with every configuration field: works, or refused at once with the reason.

pych accepts Cloud Hypervisor's whole configuration schema (the models of this package), but
implements only part of it.  This module is the one table saying, for every field of every
model reachable from :class:`~pych.config.VmConfig` (the body of ``vm.create``; the
``vm.add-*`` bodies are its device models), whether pych honours it (:class:`Works`) or not
(:class:`Refused`, with a one-line reason).  :func:`check` walks a configuration against the
table and raises :class:`UnsupportedField` (a :class:`~pych.config.ConfigError`: HTTP 400,
one CLI line) for the first refused field that holds anything but its default::

    cpus.kvm_hyperv=true is not supported by pych: pych offers the guest no Hyper-V enlightenments

:meth:`VmConfig.validate <pych.config.VmConfig.validate>` runs it first, so ``vm.create``,
every ``vm.add-*`` (which validates the configuration with the device added) and the command
line refuse such a configuration before anything is built; nothing fails later at boot for a
field pych does not implement.  The command line words the same refusal in its own terms
(:meth:`UnsupportedField.cli_message`): ``--cpus kvm_hyperv=on is not supported by pych: ...``.

Defaults are never refused: clients (Kata Containers, ch-remote, ``vm.info``'s own output sent
back) write many fields at their default values (``false``, ``0``, ``null``, ``"Off"``).  A
refused field accepts its default, ``null``, an empty list, and what its entry's ``accepts``
adds (``image_type`` ``Raw``, a rate limiter that limits nothing).  Where a default itself has
no effect in pych (``thp`` on, ``core_scheduling`` Vm) the entry's note says so.

A model reached only through refused fields (``vdpa``'s ``VdpaConfig``, the rate limiter's
``TokenBucket``) needs no entries: any instance of it is refused with its field.

``python -m pych.config.options_page`` prints docs/options.md, the table as a page (a unit test
checks the committed page is current); tests/unit/config/test_support.py sets every field and
every CLI key to a non-default value and checks each is accepted or refused, so a field added
to a model without an entry here fails the tests rather than being silently ignored; and
tests/unit/config/effects.py holds, for every field and key marked :class:`Works`, a probe of
its effect (a field marked works without one fails test_effects.py).

The entries (:class:`Works`, :class:`Refused`) and the tables of the command line's options
(:data:`CLI_OPTIONS`, :data:`PROCESS_OPTIONS`) are defined in :mod:`pych.config.rules`, which
needs no model, and are part of this module's names: the command line reads them before any
model is imported.
"""

from __future__ import annotations

import json
import typing
from collections.abc import Callable, Iterator, Mapping
from typing import Any

from pydantic import BaseModel

from pych.arch.x86_64.layout import MAX_PCI_SEGMENTS
from pych.config.backends import DeviceConfig
from pych.config.base import ApiModel, CliModel, ConfigError, OptionError, _grammar, cli_errors
from pych.config.devices import (
    RATE_LIMITER_KEYS,
    BalloonConfig,
    ConsoleConfig,
    DebugConsoleConfig,
    RateLimiterConfig,
    RateLimitGroupConfig,
    RngConfig,
    TokenBucket,
    SerialConfig,
)
from pych.config.machine import (
    CpuAffinity,
    LandlockConfig,
    CpuFeatures,
    CpusConfig,
    CpuTopology,
    PayloadConfig,
    PciSegmentConfig,
    PlatformConfig,
)
from pych.config.memory import MemoryConfig, MemoryZoneConfig
from pych.config.net import NetConfig, VsockConfig
from pych.config.storage import DiskConfig, FsConfig, PmemConfig
from pych.config.rules import (  # noqa: F401 - part of the table's names
    CLI_OPTIONS,
    PROCESS_OPTIONS,
    WORKS,
    Entry,
    Refused,
    Works,
    _dump,
)
from pych.config.vm import VmConfig

__all__ = [
    "CLI_KEYS",
    "CLI_OPTIONS",
    "PROCESS_OPTIONS",
    "SUPPORT",
    "Refused",
    "UnsupportedField",
    "Works",
    "check",
    "check_cli_keys",
    "option_refusal",
]


# --------------------------------------------------------------------------
# Entries (Works, Refused) are pych.config.rules's, with the command line's option tables


def _one_of(*values: Any) -> Callable[[Any], bool]:
    return lambda value: value in values


def _option(text: str) -> Callable[[Any], str]:
    """A refusal spelled as a whole option (``--vdpa``), whatever the value."""
    return lambda value: text


# Reasons shared by several entries.
NO_IOMMU = "pych has no virtual IOMMU"
_SMBIOS_NOTE = ("SMBIOS 3.0 tables at 0xf0000 as the reference's "
                "(pych/arch/x86_64/smbios.py): type 1, the guest's /sys/class/dmi/id.")
_LIMITER_NOTE = (
    "Token buckets as Firecracker's and the reference's (pych/devices/rate_limiter.py): "
    "bytes (`bandwidth`) and requests (`ops`), each `size` tokens refilled every "
    "`refill_time` ms, starting full, plus a `one_time_burst`; a held request is retried "
    "from the device's worker when the tokens are there. A bucket of size 0 or "
    "refill_time 0 limits nothing.")
_GROUP_NOTE = ("One limiter per group, shared by every disk naming it (boot and hot-added) "
               "for the boot.")
_HUGEPAGES_NOTE = (
    "The RAM is a hugetlbfs memfd (MFD_HUGETLB) in pages of `hugepage_size` (default: the "
    "host's `Hugepagesize`; a size the host does not offer is refused), mapped shared, so "
    "its pages are reserved from the host's pool when mapped. `vm.create` (and the command "
    "line) is refused, naming the option, when the pool has fewer free pages "
    "(HugePages_Free less HugePages_Rsvd) than the RAM needs. Not with virtio-mem hot plug, "
    "a `file`, or `mergeable=on` (each refused by name). ")
_MERGEABLE_NOTE = (
    "madvise(MADV_MERGEABLE) on the RAM (`mg` in /proc/<pid>/smaps), which is then private "
    "anonymous memory (KSM merges no other kind), so no vhost-user back-end can map it: "
    "vhost-user devices and virtio-fs are refused with it (as the reference refuses "
    "`mergeable` with `shared`), and so is virtio-mem hot plug. KSM runs when the host's "
    "/sys/kernel/mm/ksm/run is 1. ")


_FILE_NOTE = "Used in mode `File` only, as in the reference."
_SOCKET_NOTE = "Used in mode `Socket` only, as in the reference."


def _pci(**overrides: Entry) -> dict[str, Entry]:
    """The fields every PCI device has (``PciDeviceConfig``), then the model's own."""
    return {
        "id": WORKS,
        "iommu": Refused(NO_IOMMU),
        "pci_segment": Works(
            "The segment must exist (platform num_pci_segments); the device gets the lowest "
            "free slot of that segment's bus, slot 0 included on segments other than 0 "
            "(only segment 0 has a host bridge device), e.g. `000f:00:00.0`."),
        "pci_device_id": WORKS,
        **overrides,
    }


_MODELS: dict[type[ApiModel], dict[str, Entry]] = {
    CpusConfig: {
        "boot_vcpus": WORKS,
        "max_vcpus": WORKS,
        "topology": WORKS,
        "kvm_hyperv": Refused("pych offers the guest no Hyper-V enlightenments"),
        "max_phys_bits": Refused(
            "pych shows the guest the host's physical address width (CPUID 0x80000008 as "
            "KVM reports it) and cannot narrow it",
            note="The default, 46, is accepted and not applied either: the guest sees the "
            "host's width."),
        "affinity": Works(
            "Each listed vCPU's thread (vcpu<N>) is pinned with sched_setaffinity when it "
            "starts, at boot and at hot plug; host CPUs pych may not run on are refused at "
            "the request."),
        "features": WORKS,
        "nested": Refused(
            "pych cannot hide virtualization extensions: the guest sees VMX/SVM whenever "
            "the host's KVM allows nesting (nested=off is not applied)"),
        "core_scheduling": Refused(
            "pych sets up no core scheduling (PR_SCHED_CORE) for its vCPU threads",
            accepts=_one_of("Off"),
            accepted="`Vm` (the default), `Off`",
            note="`Off` is what pych does; `Vm`, the default, is accepted but not applied: "
            "no vCPU thread gets a core scheduling cookie."),
        "profile": WORKS,
    },
    CpuAffinity: {"vcpu": WORKS, "host_cpus": WORKS},
    CpuTopology: dict.fromkeys(
        ("threads_per_core", "cores_per_die", "dies_per_package", "packages"), WORKS),
    CpuFeatures: {
        "amx": Refused(
            "pych does not ask for AMX state permission (ARCH_REQ_XCOMP_GUEST_PERM), so "
            "KVM offers the guest no AMX",
            cli=_option("--cpus features=[amx]")),
    },
    MemoryConfig: {
        "size": WORKS,
        "mergeable": Works(_MERGEABLE_NOTE + "Applies to the RAM of `--memory` and its ACPI "
                           "DIMMs; on the command line, zones inherit it."),
        "hotplug_method": WORKS,
        "hotplug_size": WORKS,
        "hotplugged_size": WORKS,
        "shared": Works(
            "pych's RAM is always a memfd mapped shared (so vhost-user back ends can map it "
            "without shared=on); shared=off is accepted and changes nothing."),
        "hugepages": Works(_HUGEPAGES_NOTE + "Applies to the RAM of `--memory` and to its "
                           "ACPI DIMMs: a DIMM the pool cannot give is refused at vm.resize; "
                           "snapshots and restores keep the backing."),
        "hugepage_size": Works("2M or 1G (what the host offers in "
                               "/sys/kernel/mm/hugepages); needs hugepages=on."),
        "prefault": Works("Every page is faulted in at boot (MADV_POPULATE_WRITE)."),
        "reserve": Refused(
            "pych maps guest RAM from a memfd without reserving swap space for it up front"),
        "zones": WORKS,
        "thp": Works(
            "`on` (the default) advises transparent huge pages (MADV_HUGEPAGE) on guest RAM: "
            "boot RAM, DIMMs and virtio-mem regions, not zones backed by a `file`. pych's RAM "
            "is a memfd (shmem), so the host's "
            "/sys/kernel/mm/transparent_hugepage/shmem_enabled decides whether the advice "
            "gets huge pages (`advise`, `within_size`: yes; `never`: no)."),
    },
    MemoryZoneConfig: {
        "id": WORKS,
        "size": WORKS,
        "file": WORKS,
        "shared": Works("Without `file` the zone's memfd is mapped shared either way."),
        "hugepages": Works(_HUGEPAGES_NOTE),
        "hugepage_size": Works("2M or 1G (what the host offers in "
                               "/sys/kernel/mm/hugepages); needs hugepages=on."),
        "host_numa_node": Refused("pych does not bind guest RAM to host NUMA nodes (mbind)"),
        "hotplug_size": WORKS,
        "hotplugged_size": WORKS,
        "prefault": Works("Every page is faulted in at boot (MADV_POPULATE_WRITE)."),
        "reserve": Refused(
            "pych maps guest RAM from a memfd without reserving swap space for it up front"),
        "mergeable": Works(_MERGEABLE_NOTE + "A zone backed by a `file` (mapped private "
                           "without shared=on) gets the advice on its mapping."),
    },
    PayloadConfig: {
        "firmware": Refused(
            "pych boots a kernel (payload.kernel, --kernel: vmlinux, bzImage or a PVH ELF); "
            "it loads no firmware",
            cli=lambda value: f"--firmware {value}"),
        "kernel": WORKS,
        "cmdline": WORKS,
        "initramfs": WORKS,
        "igvm": Refused("pych boots no IGVM payloads (confidential guests)"),
        "host_data": Refused("pych boots no IGVM payloads (confidential guests)"),
    },
    PlatformConfig: {
        "num_pci_segments": Refused(
            f"pych has at most {MAX_PCI_SEGMENTS} PCI segments: its 64-bit PCI window is "
            "64 GiB and each segment gets a 4 GiB-aligned share of it, as the reference "
            "carves it",
            accepts=lambda value: 1 <= value <= MAX_PCI_SEGMENTS,
            accepted=f"1 (the default) to {MAX_PCI_SEGMENTS}, which work: each segment its "
            "own host bridge `\\_SB_.PCxx` (`_SEG`), ECAM window (MCFG entry) and share of "
            "the 32- and 64-bit MMIO windows, with hot plug and removal on every segment"),
        "iommu_segments": Refused(NO_IOMMU),
        "iommu_address_width_bits": Refused(NO_IOMMU),
        "system_serial_number": Works(_SMBIOS_NOTE),
        "system_uuid": Works(_SMBIOS_NOTE + " Stored as SMBIOS 2.6+ says (first three fields "
                             "little-endian): the guest reads the string given."),
        "oem_strings": Works("SMBIOS type 11 (the guest's /sys/firmware/dmi/entries/11-0)."),
        "system_manufacturer": Works(_SMBIOS_NOTE + " Default: `Cloud Hypervisor`, as the "
                                     "reference."),
        "system_product_name": Works(_SMBIOS_NOTE + " Default: `cloud-hypervisor`, as the "
                                     "reference."),
        "system_version": Works(_SMBIOS_NOTE),
        "system_family": Works(_SMBIOS_NOTE),
        "system_sku_number": Works(_SMBIOS_NOTE),
        "chassis_asset_tag": Works("SMBIOS type 3 (chassis), written only when given."),
        "tdx": Refused("pych runs no confidential (TDX) guests", accepts=_one_of(False),
                       accepted="`false`, `null`"),
        "sev_snp": Refused("pych runs no confidential (SEV-SNP) guests",
                           accepts=_one_of(False), accepted="`false`, `null`"),
        "iommufd": Refused(
            "pych uses VFIO's type1 container (/dev/vfio/vfio), not iommufd"),
        "iommufd_fd": Refused(
            "pych uses VFIO's type1 container (/dev/vfio/vfio), not iommufd"),
        "vfio_p2p_dma": Works(
            "`off` is what pych does; `on`, the default, is accepted but not applied: pych "
            "maps only guest RAM for device DMA, no device BARs for peer-to-peer DMA."),
    },
    PciSegmentConfig: {
        "pci_segment": WORKS,
        "mmio32_aperture_weight": Works(
            "The segment's share of the 32-bit device hole (640 MiB), in units of the hole "
            "over the sum of the weights, 4 KiB aligned, as the reference carves it."),
        "mmio64_aperture_weight": Works(
            f"The segment's share of the 64 GiB PCI window, in 4 GiB-aligned units: the "
            f"segments' weights may add up to {MAX_PCI_SEGMENTS} at most (more is refused)."),
    },
    DiskConfig: _pci(
        path=WORKS,
        readonly=WORKS,
        direct=Works(
            "The image is opened with O_DIRECT; a filesystem that refuses it (tmpfs before "
            "Linux 6.6) or "
            "needs direct I/O units above 512 bytes is refused when the disk is opened "
            "(boot, vm.add-disk), naming it. Guest buffers that are not 512-byte aligned go "
            "through a bounce buffer."),
        num_queues=WORKS,
        queue_size=WORKS,
        vhost_user=Works(
            "vhost-user-blk: the back-end at `socket` serves the queues straight in guest "
            "memory; configuration space read from it (GET_CONFIG); no `shared=on` needed "
            "(pych's RAM is always shareable)"),
        vhost_socket=WORKS,
        rate_limit_group=Works(_GROUP_NOTE),
        rate_limiter_config=Works(_LIMITER_NOTE),
        disable_io_uring=Works(
            "A test knob of the reference that picks its I/O engine; pych has one "
            "(preadv/pwritev on the disk's worker thread), so there is nothing to select."),
        disable_aio=Works(
            "A test knob of the reference that picks its I/O engine; pych has one "
            "(preadv/pwritev on the disk's worker thread), so there is nothing to select."),
        serial=WORKS,
        queue_affinity=Refused("pych does not pin a disk's queues to host CPUs"),
        backing_files=Works(
            "Images in formats other than raw are served by a qemu-storage-daemon pych "
            "starts for the disk, which always follows their backing files; the default "
            "`off` is accepted too (the reference refuses a backing file then)."),
        sparse=Refused(
            "pych does not preallocate disk images",
            note="`on`, the default, is accepted: pych leaves the image's holes alone; it "
            "offers the guest no discard or write-zeroes requests."),
        image_type=Works(
            "Raw images are served in-process; qcow2, VHDX, VMDK, VDI and VHD images by a "
            "qemu-storage-daemon pych starts and owns for the disk (vhost-user-blk). The "
            "header is read (`Unknown`, the default) and an `image_type` that disagrees "
            "with it is refused; `Raw` is taken at its word."),
        lock_granularity=Works(
            "pych always locks the whole image (`full`); `byte-range`, the default, gets "
            "the whole-file lock too, which conflicts with everything the byte-range lock "
            "would."),
    ),
    NetConfig: _pci(
        tap=WORKS,
        ip=WORKS,
        mask=WORKS,
        mac=WORKS,
        host_mac=WORKS,
        mtu=WORKS,
        num_queues=Works(
            "2 × queue pairs, as in the reference: each pair has its own tap queue "
            "(`IFF_MULTI_QUEUE`, or one `fd` each) and worker thread (`<id>_qp<N>`); "
            "VIRTIO_NET_F_MQ with the control queue (`<id>_ctrl`)."),
        queue_size=WORKS,
        vhost_user=Works(
            "vhost-user-net: the back-end at `socket` (DPDK's vhost PMD, OVS-DPDK, ...) serves "
            "the queues straight in guest memory; `num_queues` = 2 × queue pairs (even), "
            "one vring pair each, several needing the back-end's multiqueue "
            "(VHOST_USER_PROTOCOL_F_MQ, GET_QUEUE_NUM); the control queue is pych's; "
            "the offloads it offers, masked by `offload_*`; "
            "no `shared=on` needed (pych's RAM is always shareable)"),
        vhost_socket=WORKS,
        vhost_mode=Works(
            "`client` connects to the back-end's socket; `server` listens at `socket` and "
            "waits up to 30 s for the back-end to connect (the boot or vm.add-net fails "
            "with a message after that)"),
        fds=Works("`ip`, `mask` and `host_mac` are not applied to a tap given as an fd "
                  "(as in the reference): a warning is logged."),
        rate_limiter_config=Works(
            _LIMITER_NOTE + " Receive and transmit each get a limiter of this configuration "
            "(as in the reference); a received frame is charged once read."),
        offload_tso=WORKS,
        offload_ufo=WORKS,
        offload_csum=WORKS,
    ),
    LandlockConfig: {"path": WORKS, "access": WORKS},
    RateLimitGroupConfig: {"id": WORKS, "rate_limiter_config": Works(_LIMITER_NOTE)},
    RateLimiterConfig: {"bandwidth": WORKS, "ops": WORKS},
    TokenBucket: {"size": WORKS, "one_time_burst": WORKS, "refill_time": WORKS},
    RngConfig: _pci(src=WORKS),
    BalloonConfig: _pci(size=WORKS, deflate_on_oom=WORKS, free_page_reporting=WORKS),
    ConsoleConfig: _pci(file=Works(_FILE_NOTE), mode=WORKS, socket=Works(_SOCKET_NOTE)),
    SerialConfig: {"file": Works(_FILE_NOTE), "mode": WORKS, "socket": Works(_SOCKET_NOTE)},
    DebugConsoleConfig: {
        "file": Refused("pych has no debug console (port 0xe9)"),
        "mode": Refused("pych has no debug console (port 0xe9)", accepts=_one_of("Off"),
                        accepted="`Off` (the default)",
                        cli=lambda value: f"--debug-console {str(value).lower()}"),
        "iobase": Refused("pych has no debug console (port 0xe9)", accepts=_one_of(0xE9),
                          accepted="`0xe9` (233), `null`"),
    },
    FsConfig: _pci(tag=WORKS, socket=WORKS, num_queues=WORKS, queue_size=WORKS),
    PmemConfig: _pci(file=WORKS, size=WORKS, discard_writes=WORKS),
    VsockConfig: _pci(cid=WORKS, socket=WORKS),
    DeviceConfig: _pci(
        path=WORKS,
        fd=Refused("pych opens VFIO devices by path (a VFIO cdev needs iommufd); give path="),
        x_nv_gpudirect_clique=Refused("pych sets up no GPUDirect peer-to-peer cliques"),
        x_exclude_mmap_bars=WORKS,
    ),
}


_VM: dict[str, Entry] = {
    "cpus": WORKS,
    "memory": WORKS,
    "payload": WORKS,
    "rate_limit_groups": Works(_GROUP_NOTE),
    "disks": WORKS,
    "net": WORKS,
    "rng": WORKS,
    "balloon": WORKS,
    "generic_vhost_user": Refused("pych has no generic vhost-user front end",
                                  cli=_option("--generic-vhost-user")),
    "fs": WORKS,
    "pmem": WORKS,
    "serial": WORKS,
    "console": WORKS,
    "debug_console": WORKS,
    "devices": WORKS,
    "user_devices": Refused("pych has no vfio-user client", cli=_option("--user-device")),
    "vdpa": Refused("pych has no vDPA devices", cli=_option("--vdpa")),
    "vsock": WORKS,
    "pvpanic": Works(
        "The PCI pvpanic device (1b36:0011, id `__pvpanic`, after the other devices); a guest "
        "panic becomes a log line and `{\"source\":\"guest\",\"event\":\"panic\"}` on "
        "the event monitor."),
    "iommu": Refused(NO_IOMMU, cli=_option("iommu=on (of a device)")),
    "numa": Refused("pych describes no guest NUMA topology (no SRAT/SLIT)",
                    cli=_option("--numa")),
    "watchdog": Refused("pych has no virtio-watchdog device", cli=_option("--watchdog")),
    "rtc": Refused("pych has no virtio RTC device", cli=_option("--rtc")),
    "pci_segments": Works(
        "Each entry's fields: see PciSegmentConfig."),
    "platform": WORKS,
    "tpm": Refused("pych has no TPM device", cli=_option("--tpm")),
    "landlock_enable": Works(
        "`--landlock`: before it starts any thread, pych restricts the whole process with "
        "Landlock (ABI 3 file system rights, pych/landlock.py) to the paths the configuration "
        "names, as the reference's rules (payload read-only; disks, zone and pmem files, "
        "sockets, console/serial files read-write; a socket or file still to be created: its "
        "directory), plus what pych itself needs (its Python code read-only, /dev/kvm, "
        "/dev/net/tun, /dev/null, /proc/self, the API socket's directory). A `vm.add-*` of a "
        "path outside is refused, naming it. In `vm.create`/`vm.restore` bodies it is refused "
        "unless pych was started with --landlock: threads already running (the API server's) "
        "cannot be sandboxed. `--restore` of a snapshot taken under --landlock is sandboxed "
        "again before its threads start (its configuration's paths, the snapshot read-only)."),
    "landlock_rules": Works(
        "Each rule (`path=`, `access=r|w|rw`) is added to the --landlock ruleset: `r` reads "
        "and executes, `w` writes, creates, removes and truncates beneath `path`. The path "
        "must exist."),
}


CLI_KEYS: Mapping[tuple[type[CliModel], str], Refused] = {
    (MemoryConfig, "file"): Refused(
        "it has no effect (Cloud Hypervisor ignores it too); back guest RAM with a file with "
        "--memory size=0 --memory-zone id=<id>,size=<size>,file=<path>"),
}
"""CLI keys refused as soon as they are given, whatever their value
(:func:`check_cli_keys`): keys that fill no field (the reference reads ``--memory file=`` and
ignores it), and the rate limiter's ``bw_*``/``ops_*`` keys, which the grammar drops without
a word when a bucket lacks its size or refill time (as the reference does)."""


ENDPOINT_REFUSALS: Mapping[str, Mapping[str, str]] = {
    "vm.send-migration": {
        "tls_dir": "pych migrates without TLS",
        "memory_mode": "pych migrates by pre-copy only (memory_mode=Postcopy is refused)",
        "connections": "pych sends over one connection (connections > 1 is refused)",
        "preserve_source": "the source VM ends once the destination runs it",
        "timeout_strategy": "a migration that does not converge within timeout_s is "
                            "cancelled (Ignore is refused)",
    },
    "vm.receive-migration": {
        "tls_dir": "pych migrates without TLS",
        "memory_mode": "pych migrates by pre-copy only (memory_mode=Postcopy is refused)",
        "vfio_fds": "pych cannot migrate VFIO devices",
        "iommufd_fd": "pych does not use iommufd",
        "zone_updates": "pych does not bind memory zones to host NUMA nodes",
    },
}
"""Fields of endpoint bodies (not configurations) that pych refuses by name when given a value
other than the default: the endpoint, the field, why. docs/options.md lists them."""


SUPPORT: Mapping[type[ApiModel], Mapping[str, Entry]] = {VmConfig: _VM, **_MODELS}
"""Per model, every field: :class:`Works` or :class:`Refused`."""


def option_refusal(option: str) -> Refused | None:
    """The entry refusing the whole ``pych`` option ``option`` (``--tpm``: the field it fills
    is refused), or None if the option works (its keys may still be refused one by one)."""
    path = CLI_OPTIONS.get(option)
    if path is None:
        rule = PROCESS_OPTIONS.get(option)
        return rule if isinstance(rule, Refused) else None
    model, field = _field_path(path)
    rule = SUPPORT[model][field]
    return rule if isinstance(rule, Refused) else None


# --------------------------------------------------------------------------
# The refusal


def _json(value: Any) -> str:
    return json.dumps(_dump(value), separators=(",", ":"))


def _cli_value(value: Any) -> str | None:
    """``value`` as a CLI value; None for a structure (``affinity``'s list of pairs)."""
    if isinstance(value, BaseModel):
        return None
    if isinstance(value, bool):
        return "on" if value else "off"
    if isinstance(value, str):
        return value
    if isinstance(value, list) and all(isinstance(item, int | str) for item in value):
        return "[" + ",".join(str(item) for item in value) + "]"
    return str(value)


class UnsupportedField(ConfigError):
    """A configuration field holds a value pych does not implement (HTTP 400)."""

    def __init__(self, path: str, value: Any, model: type[ApiModel], field: str,
                 refused: Refused) -> None:
        self.path = path
        self.value = value
        self.model = model
        self.field = field
        self.refused = refused
        super().__init__(f"{path}={_json(value)} is not supported by pych: {refused.reason}")

    def cli_message(self) -> str:
        """The refusal in the command line's terms: ``--cpus kvm_hyperv=on is not supported by
        pych: ...``."""
        if self.refused.cli is not None:
            subject = self.refused.cli(self.value)
        else:
            option = getattr(self.model, "CLI_OPTION", self.model.__name__)
            subject = f"{option} {_cli_key(self.model, self.field)}"
            if (text := _cli_value(self.value)) is not None:
                subject += f"={text}"
        return f"{subject} is not supported by pych: {self.refused.reason}"


def _cli_key(model: type[ApiModel], field: str) -> str:
    """The CLI key of ``model.field``, or the keys of the group that fills it."""
    if issubclass(model, CliModel):
        for name, cli in _grammar(model).keys:
            if name == field:
                return cli.key or name
        if field == "rate_limiter_config":
            return "bw_*/ops_*"
    return field


def check(config: VmConfig) -> None:
    """Raise :class:`UnsupportedField` for the first field of ``config`` (in field order,
    depth first) that the table refuses and that holds more than its default."""
    _check(config, "")


def _check(model: ApiModel, path: str) -> None:
    table = SUPPORT[type(model)]
    for name, field in type(model).model_fields.items():
        value = getattr(model, name)
        where = f"{path}.{name}" if path else name
        rule = table[name]
        if isinstance(rule, Refused):
            default = field.get_default(call_default_factory=True)
            if not rule.allows(value, default):
                if isinstance(value, list) and value and isinstance(value[0], BaseModel):
                    raise UnsupportedField(f"{where}[0]", value[0], type(model), name, rule)
                raise UnsupportedField(where, value, type(model), name, rule)
            continue
        for sub_path, sub in _models_in(value, where):
            _check(sub, sub_path)


def _models_in(value: Any, path: str) -> Iterator[tuple[str, ApiModel]]:
    if isinstance(value, ApiModel):
        yield path, value
    elif isinstance(value, list):
        for i, item in enumerate(value):
            if isinstance(item, ApiModel):
                yield f"{path}[{i}]", item


def check_cli_keys(model: type[CliModel], text: str) -> None:
    """Refuse the option text ``text`` of ``model`` if it gives a key of :data:`CLI_KEYS`:
    raises :class:`~pych.config.OptionError` ``--disk bw_size=100 is not supported by pych:
    ...``.  ``pych`` and ``pych-remote`` call it on each option before parsing it (the
    models themselves parse as the reference does, dropping those keys)."""
    limited = RATE_LIMITER_KEYS in _grammar(model).groups
    if not limited and not any(owner is model for owner, _ in CLI_KEYS):
        return
    with cli_errors(model.CLI_OPTION):
        opts = _grammar(model).parser.parse(text)
    if limited:
        _check_buckets(model, opts)
    for (owner, key), refused in CLI_KEYS.items():
        if owner is model and key in opts:
            value = opts.get(key)
            given = key if value is None else f"{key}={value}"
            raise OptionError(f"{model.CLI_OPTION} {given} is not supported by pych: "
                              f"{refused.reason}")


def _check_buckets(model: type[CliModel], opts: Any) -> None:
    """A rate limiter bucket given on the command line needs its size and its refill time:
    the reference drops a bucket lacking either without a word; pych refuses it."""
    for prefix in ("bw", "ops"):
        given = [key for key in RATE_LIMITER_KEYS.keys
                 if key.startswith(prefix + "_") and key in opts]
        if not given:
            continue
        size, refill = opts.integer(f"{prefix}_size"), opts.integer(f"{prefix}_refill_time")
        if not (size and refill):
            key = given[0]
            value = opts.get(key)
            subject = key if value is None else f"{key}={value}"
            raise OptionError(
                f"{model.CLI_OPTION} {subject} is not supported by pych: a rate limiter "
                f"bucket needs both {prefix}_size and {prefix}_refill_time above 0 (Cloud "
                "Hypervisor drops such a bucket without a word)")


def _field_path(path: str) -> tuple[type[ApiModel], str]:
    """The model and field a ``VmConfig`` path (``payload.kernel``) ends in."""
    model: type[ApiModel] = VmConfig
    *parents, last = path.split(".")
    for name in parents:
        model = _model_of(model, name)
    return model, last


def _model_of(model: type[ApiModel], field: str) -> type[ApiModel]:
    """The model a field of ``model`` holds (alone, in a list, or optional)."""
    found = _models_of_annotation(model.model_fields[field].annotation)
    if len(found) != 1:
        raise TypeError(f"{model.__name__}.{field} does not hold one model")
    return found[0]


def _models_of_annotation(annotation: Any) -> list[type[ApiModel]]:
    if isinstance(annotation, type) and issubclass(annotation, ApiModel):
        return [annotation]
    found: list[type[ApiModel]] = []
    for arg in typing.get_args(annotation):
        for model in _models_of_annotation(arg):
            if model not in found:
                found.append(model)
    return found
