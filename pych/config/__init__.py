"""VM configuration: the API's JSON schemas as pydantic models, and the CLI.

One model per schema of Cloud Hypervisor's OpenAPI contract
(``shared/spec/cloud-hypervisor.yaml``), with the schema's names and JSON
field names.  Where the contract and the reference implementation disagree,
the models follow what the reference *does* (its serde definitions in
``vmm/src/vm_config.rs``), because that is what clients observe:

* Defaults are serde's.  E.g. ``FsConfig.num_queues``/``queue_size`` are
  "required" in the spec but default to 1/1024; ``NetConfig.ip``/``mask``
  have spec defaults but serde leaves them unset; a ``VmConfig`` without
  ``cpus``/``memory``/``rng``/``serial``/``console`` gets the CLI defaults.
* Integers carry the reference's Rust widths (``u8``, ``u16``, ``u32``,
  ``u64``) and the spec's minimums; they are strict like serde_json: ``"2"``,
  ``2.0`` or ``true`` is not an integer, ``1`` is not a boolean.
* Fields serde has but the spec lacks are kept when clients can see them in
  ``vm.info`` (``DiskConfig.disable_io_uring``, ``CpusConfig.profile``,
  ``PlatformConfig.iommufd_fd``, ``ImageType`` ``FlatVmdk``, ...).
* ``payload.igvm``/``host_data`` and ``platform.tdx``/``sev_snp`` exist only
  in non-default builds of the reference; they are modelled (they are in the
  spec) but unset by default and rejected by :meth:`VmConfig.validate`.

**Unknown JSON fields are ignored**: none of the reference's config structs
uses ``deny_unknown_fields`` (so serde skips unknown keys), except
``RateLimiterConfig``, which does; it rejects them here too.  Ignoring keeps
clients written for newer Cloud Hypervisor versions working.

**File descriptors never come from JSON.**  ``NetConfig.fds``,
``DeviceConfig.fd`` and ``PlatformConfig.iommufd_fd`` keep their values when
built from Python (the CLI's ``fd=[3,4]``), but parsing JSON
(``model_validate_json``) turns every number into ``-1``, as the reference
does: real descriptors arrive with SCM_RIGHTS and are attached afterwards.

**Serialization**: ``model_dump(mode="json", exclude_none=True)`` yields what
the reference writes in ``vm.info``'s ``config``: absent optionals are
omitted, ``iommu: false`` of PCI devices is omitted, and the few serde
structs without ``skip_serializing_none`` (rate limiter token buckets,
``VmResize``) still write ``null``.

Every CLI option has a ``parse(text)`` classmethod built on
:mod:`pych.option_parser` that maps CLI keys to JSON fields and goes through
``model_validate``, so ``DiskConfig.parse("path=x,readonly=on")`` equals
``DiskConfig.model_validate({"path": "x", "readonly": True})``.

:meth:`VmConfig.validate` performs the reference's ``VmConfig::validate()``
plus the memory checks its memory manager makes from the config alone, and
raises :class:`ConfigError` (HTTP 400) or :class:`ConfigConflict` (HTTP 409).
Default device ids are *not* assigned here; the device manager does that.
"""

from __future__ import annotations

import functools
import ipaddress
import logging
import os
import re
from collections.abc import Callable, Iterable, Mapping, Sequence
from dataclasses import dataclass
from typing import Annotated, Any, ClassVar, Literal, Self

from pydantic import (
    AliasChoices,
    BaseModel,
    ConfigDict,
    Field,
    RootModel,
    SerializerFunctionWrapHandler,
    Strict,
    ValidationError,
    ValidationInfo,
    field_validator,
    model_serializer,
)

from pych.option_parser import (
    OptionParser,
    OptionParserError,
    ParsedOptions,
    dequote,
    parse_byte_size,
    parse_integer,
    parse_integer_list,
)

__all__ = [
    "ApiSocket",
    "BalloonConfig",
    "ConfigConflict",
    "ConfigError",
    "ConsoleConfig",
    "CpuAffinity",
    "CpuFeatures",
    "CpuTopology",
    "CpusConfig",
    "DebugConsoleConfig",
    "DeviceConfig",
    "DeviceNode",
    "DiskConfig",
    "DuplicateDevicePath",
    "EventMonitor",
    "FsConfig",
    "GenericVhostUserConfig",
    "IdentifierNotUnique",
    "LandlockConfig",
    "MemoryConfig",
    "MemoryZoneConfig",
    "NetConfig",
    "NumaConfig",
    "NumaDistance",
    "OptionError",
    "PayloadConfig",
    "PciDeviceConfig",
    "PciDeviceInfo",
    "PciSegmentConfig",
    "PlatformConfig",
    "PmemConfig",
    "RateLimitGroupConfig",
    "RateLimiterConfig",
    "ReceiveMigrationData",
    "RestoreConfig",
    "RestoredNetConfig",
    "RestoredVfioConfig",
    "RngConfig",
    "RtcConfig",
    "SendMigrationData",
    "SerialConfig",
    "TokenBucket",
    "TpmConfig",
    "UserDeviceConfig",
    "VdpaConfig",
    "VirtQueueAffinity",
    "VmAddUserDevice",
    "VmConfig",
    "VmCoredumpData",
    "VmCounters",
    "VmInfo",
    "VmMemoryZoneUpdateData",
    "VmRemoveDevice",
    "VmResize",
    "VmResizeDisk",
    "VmResizeZone",
    "VmSnapshotConfig",
    "VmmPingResponse",
    "VsockConfig",
    "describe_validation_error",
]

log = logging.getLogger(__name__)

# --------------------------------------------------------------------------
# Errors


class ConfigError(ValueError):
    """The configuration is invalid.  The API answers 400 Bad Request."""


class OptionError(ConfigError, OptionParserError):
    """A CLI option string could not be turned into a configuration."""


class ConfigConflict(ConfigError):
    """The configuration reuses something that must be unique (HTTP 409)."""


class IdentifierNotUnique(ConfigConflict):
    def __init__(self, identifier: str) -> None:
        super().__init__(f"Identifier {identifier} is not unique")
        self.identifier = identifier


class DuplicateDevicePath(ConfigConflict):
    def __init__(self, path: str) -> None:
        super().__init__(f"Duplicated device path: {path}")
        self.path = path


def describe_validation_error(err: ValidationError) -> str:
    """One line for a pydantic error: ``disks.0.num_queues: Input should be ...``."""
    parts = []
    for detail in err.errors(include_url=False):
        location = ".".join(str(item) for item in detail["loc"])
        parts.append(f"{location}: {detail['msg']}" if location else detail["msg"])
    return "; ".join(parts)


# --------------------------------------------------------------------------
# Scalar types, with the reference's Rust widths


def _unsigned(bits: int, minimum: int = 0) -> Any:
    return Annotated[int, Strict(), Field(ge=minimum, le=2**bits - 1)]


U8 = _unsigned(8)
U16 = _unsigned(16)
U32 = _unsigned(32)
U64 = _unsigned(64)
Usize = U64
PositiveU32 = _unsigned(32, minimum=1)
PositiveU64 = _unsigned(64, minimum=1)
VsockCid = _unsigned(32, minimum=3)
I32 = Annotated[int, Strict(), Field(ge=-(2**31), le=2**31 - 1)]
I64 = Annotated[int, Strict(), Field(ge=-(2**63), le=2**63 - 1)]
Bool = Annotated[bool, Strict()]
Str = Annotated[str, Strict()]

HotplugMethod = Literal["Acpi", "VirtioMem"]
CoreSchedulingMode = Literal["Vm", "Vcpu", "Off"]
CpuProfile = Literal["Host"]
ConsoleMode = Literal["Off", "Pty", "Tty", "File", "Socket", "Null"]
ImageType = Literal["FlatVmdk", "FixedVhd", "Qcow2", "Raw", "Vhdx", "Unknown"]
LockGranularity = Literal["ByteRange", "Full"]
VhostMode = Literal["Client", "Server"]
VmState = Literal["Created", "Running", "Shutdown", "Paused", "BreakPoint"]
MemoryRestoreMode = Literal["Copy", "OnDemand"]
MigrationMode = Literal["Precopy", "Postcopy"]
TimeoutStrategy = Literal["Cancel", "Ignore"]

MIB = 1 << 20
DEFAULT_MEMORY_SIZE = 512 * MIB
DEFAULT_MAX_PHYS_BITS = 46
DEFAULT_RNG_SOURCE = "/dev/urandom"
DEFAULT_DEBUG_CONSOLE_PORT = 0xE9
MAX_SUPPORTED_CPUS = 8192  # KVM on x86_64
MAX_NUM_PCI_SEGMENTS = 96
MAX_IOMMU_ADDRESS_WIDTH_BITS = 64
NUM_PCI_DEVICE_IDS = 32
VIRTIO_MAX_QUEUE_SIZE = 32768
MINIMUM_BLOCK_QUEUE_SIZE = 2
VIRTIO_BLK_ID_BYTES = 20
VIRTIO_FS_TAG_LEN = 36
VIRTIO_NET_MIN_MTU = 1280
MAX_MIGRATION_CONNECTIONS = 128

_MAC_ADDRESS = re.compile(r"[0-9A-Fa-f]{2}(?::[0-9A-Fa-f]{2}){5}")


# --------------------------------------------------------------------------
# Model base


class ApiModel(BaseModel):
    """Base of every schema: serde's input rules and output shape."""

    # Unknown JSON fields are ignored, as serde does without deny_unknown_fields
    # (the reference's choice for every config struct but RateLimiterConfig).
    # defer_build: validators are built on first use, which keeps `pych` start-up fast.
    model_config = ConfigDict(extra="ignore", validate_assignment=True, defer_build=True)

    # Optional fields that serde writes as ``null`` instead of omitting them
    # (structs without ``skip_serializing_none``).
    _serde_nullable: ClassVar[frozenset[str]] = frozenset()
    # Boolean fields that serde omits when false.
    _serde_omit_false: ClassVar[frozenset[str]] = frozenset()

    @model_serializer(mode="wrap")
    def _serde_shape(self, handler: SerializerFunctionWrapHandler) -> Any:
        data = handler(self)
        if not isinstance(data, dict) or not (self._serde_nullable or self._serde_omit_false):
            return data
        shaped = {}
        for name in type(self).model_fields:
            if name in data:
                if not (name in self._serde_omit_false and data[name] is False):
                    shaped[name] = data[name]
            elif name in self._serde_nullable and getattr(self, name) is None:
                shaped[name] = None
        return shaped


def _given(fields: Mapping[str, Any]) -> dict[str, Any]:
    """The CLI-derived fields that were given: None means "use the default"."""
    return {name: value for name, value in fields.items() if value is not None}


def _cli_parser(option: str) -> Callable[[Callable[..., Any]], Any]:
    """Make ``parse`` a classmethod whose errors are :class:`OptionError`\\s.

    Grammar errors already name the option; schema errors (out of range,
    wrong type) get it prefixed: ``--cpus: boot_vcpus: Input should be ...``.
    """

    def decorate(parse: Callable[..., Any]) -> Any:
        @functools.wraps(parse)
        def wrapper(cls: type, text: str, *args: Any, **kwargs: Any) -> Any:
            try:
                return parse(cls, text, *args, **kwargs)
            except OptionError:
                raise
            except OptionParserError as err:
                raise OptionError(str(err)) from None
            except ValidationError as err:
                raise OptionError(f"{option}: {describe_validation_error(err)}") from None

        return classmethod(wrapper)

    return decorate


def _options(
    option: str, text: str, keys: Iterable[str], flags: Iterable[str] = ()
) -> ParsedOptions:
    return OptionParser(option, keys, flags).parse(text)


def _one_of(choices: Mapping[str, str], *, ignore_case: bool = True) -> Callable[[str], str]:
    """A converter from CLI spellings (``virtio-mem``) to JSON values (``VirtioMem``)."""

    def convert(raw: str) -> str:
        text = dequote(raw)
        try:
            return choices[text.lower() if ignore_case else text]
        except KeyError:
            raise ValueError(f"expected one of: {', '.join(choices)}") from None

    return convert


def _json_fds(value: Any, info: ValidationInfo) -> Any:
    """A field validator: descriptors in JSON are meaningless here, make them -1.

    Python input (the CLI) keeps its values; JSON input (the API) cannot
    carry live descriptors, they come with SCM_RIGHTS, as in the reference.
    """
    if info.mode == "json" and value is not None:
        if isinstance(value, list):
            return [-1] * len(value)
        return -1
    return value


# --------------------------------------------------------------------------
# PCI devices


_PCI_KEYS = ("id", "pci_segment", "pci_device_id")
_PCI_IOMMU_KEYS = (*_PCI_KEYS, "iommu")


class PciDeviceConfig(ApiModel):
    """The fields every PCI device config has (the reference's flattened
    ``PciDeviceCommonConfig``)."""

    _serde_omit_false: ClassVar[frozenset[str]] = frozenset({"iommu"})

    id: Str | None = None
    iommu: Bool = False
    pci_segment: U16 = 0
    pci_device_id: U8 | None = None

    @staticmethod
    def _pci_fields(opts: ParsedOptions) -> dict[str, Any]:
        return {
            "id": opts.get("id"),
            "iommu": opts.toggle("iommu"),
            "pci_segment": opts.integer("pci_segment"),
            "pci_device_id": opts.integer("pci_device_id"),
        }

    def _validate_pci(self, config: VmConfig) -> None:
        platform = config.platform
        num_segments = platform.num_pci_segments if platform else 1
        if self.pci_segment >= num_segments:
            raise ConfigError(f"Invalid PCI segment id: {self.pci_segment}")
        if (
            platform
            and platform.iommu_segments
            and self.pci_segment in platform.iommu_segments
            and not self.iommu
        ):
            raise ConfigError(
                f"Device is on an IOMMU PCI segment ({self.pci_segment}) "
                "but not placed behind IOMMU"
            )
        if self.pci_device_id is not None:
            if self.pci_device_id >= NUM_PCI_DEVICE_IDS:
                raise ConfigError(
                    f"Given PCI device ID ({self.pci_device_id}) is out of the "
                    f"supported range of 0..{NUM_PCI_DEVICE_IDS}"
                )
            if self.pci_device_id == 0 and self.pci_segment == 0:
                raise ConfigError(f"Given PCI device ID ({self.pci_device_id}) is reserved")


def _check_queue_size(queue_size: int) -> None:
    if queue_size == 0 or queue_size & (queue_size - 1):
        raise ConfigError(
            f"Queue size must be a power of 2 no greater than {VIRTIO_MAX_QUEUE_SIZE}: {queue_size}"
        )


def _check_queue_count(queues: int, config: VmConfig) -> None:
    if queues > config.cpus.boot_vcpus:
        raise ConfigError(
            f"Queue count ({queues}) must not exceed boot vCPUs ({config.cpus.boot_vcpus})"
        )


# --------------------------------------------------------------------------
# Rate limiting


class TokenBucket(ApiModel):
    """A token bucket: ``size`` tokens, refilled every ``refill_time`` ms."""

    _serde_nullable: ClassVar[frozenset[str]] = frozenset({"one_time_burst"})

    size: U64
    one_time_burst: U64 | None = None
    refill_time: U64


class RateLimiterConfig(ApiModel):
    """Independent bytes/s (``bandwidth``) and ops/s (``ops``) limits."""

    # The reference declares this struct with deny_unknown_fields.
    model_config = ConfigDict(extra="forbid", defer_build=True)
    _serde_nullable: ClassVar[frozenset[str]] = frozenset({"bandwidth", "ops"})

    bandwidth: TokenBucket | None = None
    ops: TokenBucket | None = None


_RATE_LIMIT_KEYS = (
    "bw_size",
    "bw_one_time_burst",
    "bw_refill_time",
    "ops_size",
    "ops_one_time_burst",
    "ops_refill_time",
)


def _rate_limiter_fields(opts: ParsedOptions) -> dict[str, Any] | None:
    """The ``bw_*``/``ops_*`` keys as a RateLimiterConfig, None if they set no limit.

    As in the reference, a bucket needs both a size and a refill time;
    otherwise it is silently left out.
    """

    def bucket(prefix: str) -> dict[str, int] | None:
        size = opts.integer(f"{prefix}_size") or 0
        refill_time = opts.integer(f"{prefix}_refill_time") or 0
        if not (size and refill_time):
            return None
        burst = opts.integer(f"{prefix}_one_time_burst") or 0
        return {"size": size, "one_time_burst": burst, "refill_time": refill_time}

    bandwidth, ops = bucket("bw"), bucket("ops")
    if bandwidth is None and ops is None:
        return None
    return {"bandwidth": bandwidth, "ops": ops}


class RateLimitGroupConfig(ApiModel):
    """``--rate-limit-group``: a rate limiter shared by several disks."""

    id: Str = ""
    rate_limiter_config: RateLimiterConfig = Field(default_factory=RateLimiterConfig)

    @_cli_parser("--rate-limit-group")
    def parse(cls, text: str) -> Self:
        opts = _options("--rate-limit-group", text, (*_RATE_LIMIT_KEYS, "id"))
        limiter = _rate_limiter_fields(opts) or {}
        return cls.model_validate(_given({"id": opts.get("id"), "rate_limiter_config": limiter}))

    def _validate(self) -> None:
        limiter = self.rate_limiter_config
        if (limiter.bandwidth is None and limiter.ops is None) or not self.id:
            raise ConfigError("Invalid rate-limiter group")


# --------------------------------------------------------------------------
# CPUs


class CpuTopology(ApiModel):
    threads_per_core: U16
    cores_per_die: U16
    dies_per_package: U16
    packages: U16


class CpuAffinity(ApiModel):
    vcpu: U32
    host_cpus: list[Usize]


class CpuFeatures(ApiModel):
    amx: Bool = False


def _parse_topology(raw: str) -> dict[str, int]:
    parts = dequote(raw).split(":")
    if len(parts) != 4 or not all(part.isdecimal() for part in parts):
        raise ValueError(
            "expected <threads_per_core>:<cores_per_die>:<dies_per_package>:<packages>"
        )
    names = ("threads_per_core", "cores_per_die", "dies_per_package", "packages")
    return dict(zip(names, map(int, parts), strict=True))


class CpusConfig(ApiModel):
    """``--cpus``: boot and hot-pluggable vCPUs and how they look to the guest."""

    boot_vcpus: PositiveU32
    max_vcpus: PositiveU32
    topology: CpuTopology | None = None
    kvm_hyperv: Bool = False
    max_phys_bits: U8 = DEFAULT_MAX_PHYS_BITS
    affinity: list[CpuAffinity] | None = None
    features: CpuFeatures = Field(default_factory=CpuFeatures)
    nested: Bool = True
    core_scheduling: CoreSchedulingMode = "Vm"
    profile: CpuProfile = "Host"

    CLI_DEFAULT: ClassVar[str] = f"boot=1,max_phys_bits={DEFAULT_MAX_PHYS_BITS}"

    @_cli_parser("--cpus")
    def parse(cls, text: str) -> Self:
        opts = _options(
            "--cpus",
            text,
            (
                "boot",
                "max",
                "topology",
                "kvm_hyperv",
                "max_phys_bits",
                "affinity",
                "features",
                "nested",
                "core_scheduling",
                "profile",
            ),
        )
        boot = opts.integer("boot")
        boot = 1 if boot is None else boot
        max_vcpus = opts.integer("max")
        affinity = opts.tuple_list("affinity", parse_integer, parse_integer_list)
        features = {}
        for feature in opts.string_list("features") or ():
            if feature != "amx":
                raise OptionError(f"--cpus: invalid feature {feature!r} (supported: amx)")
            features["amx"] = True
        return cls.model_validate(
            _given(
                {
                    "boot_vcpus": boot,
                    "max_vcpus": boot if max_vcpus is None else max_vcpus,
                    "topology": opts.convert("topology", _parse_topology),
                    "kvm_hyperv": opts.toggle("kvm_hyperv"),
                    "max_phys_bits": opts.integer("max_phys_bits"),
                    "affinity": None
                    if affinity is None
                    else [{"vcpu": vcpu, "host_cpus": cpus} for vcpu, cpus in affinity],
                    "features": features,
                    "nested": opts.toggle("nested"),
                    "core_scheduling": opts.convert(
                        "core_scheduling", _one_of({"vm": "Vm", "vcpu": "Vcpu", "off": "Off"})
                    ),
                    "profile": opts.convert(
                        "profile", _one_of({"Host": "Host"}, ignore_case=False)
                    ),
                }
            )
        )

    def _validate(self) -> None:
        if self.max_vcpus < self.boot_vcpus:
            raise ConfigError(
                f"Max CPUs ({self.max_vcpus}) lower than boot CPUs ({self.boot_vcpus})"
            )
        if self.max_vcpus > MAX_SUPPORTED_CPUS:
            raise ConfigError(
                f"Too many CPUs: specified {self.max_vcpus} but {MAX_SUPPORTED_CPUS} is the limit"
            )
        if topology := self.topology:
            parts = (
                topology.threads_per_core,
                topology.cores_per_die,
                topology.dies_per_package,
                topology.packages,
            )
            if 0 in parts:
                raise ConfigError("No part of the CPU topology can be zero")
            if topology.threads_per_core > 2:
                raise ConfigError("CPU topology supports at most 2 threads per core")
            if parts[0] * parts[1] * parts[2] * parts[3] != self.max_vcpus:
                raise ConfigError("Product of CPU topology parts does not match maximum vCPU")


# --------------------------------------------------------------------------
# Memory


class MemoryZoneConfig(ApiModel):
    """``--memory-zone``: a user-defined guest RAM region (needs ``--memory size=0``)."""

    id: Str
    size: U64
    file: Str | None = None
    shared: Bool = False
    hugepages: Bool = False
    hugepage_size: U64 | None = None
    host_numa_node: U32 | None = None
    hotplug_size: U64 | None = None
    hotplugged_size: U64 | None = None
    prefault: Bool = False
    reserve: Bool = False
    mergeable: Bool = False

    @_cli_parser("--memory-zone")
    def parse(cls, text: str, *, default_mergeable: bool = False) -> Self:
        """``default_mergeable`` is ``--memory``'s ``mergeable``, which zones inherit."""
        opts = _options(
            "--memory-zone",
            text,
            (
                "id",
                "size",
                "file",
                "shared",
                "hugepages",
                "hugepage_size",
                "host_numa_node",
                "hotplug_size",
                "hotplugged_size",
                "prefault",
                "reserve",
                "mergeable",
            ),
        )
        zone_id = opts.get("id")
        if zone_id is None:
            raise OptionError("--memory-zone: id missing")
        size = opts.byte_size("size")
        mergeable = opts.toggle("mergeable")
        return cls.model_validate(
            _given(
                {
                    "id": zone_id,
                    "size": DEFAULT_MEMORY_SIZE if size is None else size,
                    "file": opts.get("file"),
                    "shared": opts.toggle("shared"),
                    "hugepages": opts.toggle("hugepages"),
                    "hugepage_size": opts.byte_size("hugepage_size"),
                    "host_numa_node": opts.integer("host_numa_node"),
                    "hotplug_size": opts.byte_size("hotplug_size"),
                    "hotplugged_size": opts.byte_size("hotplugged_size"),
                    "prefault": opts.toggle("prefault"),
                    "reserve": opts.toggle("reserve"),
                    "mergeable": default_mergeable if mergeable is None else mergeable,
                }
            )
        )


class MemoryConfig(ApiModel):
    """``--memory``: guest RAM and its hot-plug window."""

    size: U64
    mergeable: Bool = False
    hotplug_method: HotplugMethod = "Acpi"
    hotplug_size: U64 | None = None
    hotplugged_size: U64 | None = None
    shared: Bool = False
    hugepages: Bool = False
    hugepage_size: U64 | None = None
    prefault: Bool = False
    reserve: Bool = False
    zones: list[MemoryZoneConfig] | None = None
    thp: Bool = True

    CLI_DEFAULT: ClassVar[str] = f"size={DEFAULT_MEMORY_SIZE // MIB}M"

    @_cli_parser("--memory")
    def parse(cls, text: str, zones: Sequence[str] = ()) -> Self:
        """``zones`` are the ``--memory-zone`` values, if any."""
        opts = _options(
            "--memory",
            text,
            (
                "size",
                # Accepted and ignored by the reference, so accepted here too.
                "file",
                "mergeable",
                "hotplug_method",
                "hotplug_size",
                "hotplugged_size",
                "shared",
                "hugepages",
                "hugepage_size",
                "prefault",
                "reserve",
                "thp",
            ),
        )
        size = opts.byte_size("size")
        mergeable = bool(opts.toggle("mergeable"))
        return cls.model_validate(
            _given(
                {
                    "size": DEFAULT_MEMORY_SIZE if size is None else size,
                    "mergeable": mergeable,
                    "hotplug_method": opts.convert(
                        "hotplug_method", _one_of({"acpi": "Acpi", "virtio-mem": "VirtioMem"})
                    ),
                    "hotplug_size": opts.byte_size("hotplug_size"),
                    "hotplugged_size": opts.byte_size("hotplugged_size"),
                    "shared": opts.toggle("shared"),
                    "hugepages": opts.toggle("hugepages"),
                    "hugepage_size": opts.byte_size("hugepage_size"),
                    "prefault": opts.toggle("prefault"),
                    "reserve": opts.toggle("reserve"),
                    "thp": opts.toggle("thp"),
                    "zones": [
                        MemoryZoneConfig.parse(zone, default_mergeable=mergeable) for zone in zones
                    ]
                    or None,
                }
            )
        )

    def total_size(self) -> int:
        """Boot RAM plus RAM plugged at boot, over all zones (bytes)."""
        zones = self.zones or ()
        return self.size + sum(zone.size for zone in zones) + self.total_hotplugged_size()

    def total_hotplugged_size(self) -> int:
        zones = self.zones or ()
        return (self.hotplugged_size or 0) + sum(zone.hotplugged_size or 0 for zone in zones)

    def _validate(self) -> None:
        """The reference's config checks plus its memory manager's static ones."""
        regions: list[tuple[str, int, bool, int | None]] = []
        if self.hugepage_size is not None:
            _check_hugepage_size(self.hugepages, self.hugepage_size)
        if self.shared and self.mergeable:
            raise ConfigError("Invalid to set both 'mergeable' and 'shared' for memory")
        for zone in self.zones or ():
            if zone.shared and zone.mergeable:
                raise ConfigError("Invalid to set both 'mergeable' and 'shared' for memory")
            if zone.hugepage_size is not None:
                _check_hugepage_size(zone.hugepages, zone.hugepage_size)

        if self.size == 0:
            if not self.zones:
                raise ConfigError(
                    "No memory zones found: memory zones (--memory-zone) are required "
                    "when the memory size is 0"
                )
            for zone in self.zones:
                if zone.size == 0 and zone.hotplug_size is None:
                    raise ConfigError(
                        f"Memory configuration is not valid: memory zone {zone.id!r} has "
                        "neither a size nor a hotplug_size"
                    )
            if not any(zone.size for zone in self.zones):
                raise ConfigError(
                    "Memory configuration is not valid: the memory zones give the guest no "
                    "boot RAM (every zone has size 0)"
                )
            for zone in self.zones:
                if zone.shared and zone.file is not None and zone.host_numa_node is not None:
                    raise ConfigError(
                        "Memory configuration is not valid: host NUMA policy cannot be set for "
                        f"memory zone {zone.id!r}, which is backed by a regular file and shared"
                    )
                if zone.hotplug_size is not None and self.hotplug_method == "Acpi":
                    raise ConfigError(
                        "Invalid hotplug method associated with memory zones resizing "
                        "capability: memory zones need hotplug_method=virtio-mem"
                    )
                _check_hotplug_sizes(
                    zone.hotplug_size,
                    zone.hotplugged_size,
                    self.hotplug_method,
                    f"zone {zone.id!r}",
                )
                regions.append(
                    (f"memory zone {zone.id!r}", zone.size, zone.hugepages, zone.hugepage_size)
                )
        else:
            if self.zones is not None:
                raise ConfigError(
                    "Memory configuration is not valid: memory zones can only be used "
                    "with a memory size of 0"
                )
            _check_hotplug_sizes(
                self.hotplug_size, self.hotplugged_size, self.hotplug_method, "memory"
            )
            regions.append(("memory", self.size, self.hugepages, self.hugepage_size))

        page_size = os.sysconf("SC_PAGE_SIZE")
        for what, size, hugepages, hugepage_size in regions:
            alignment = hugepage_size if hugepages and hugepage_size else page_size
            if size % alignment:
                raise ConfigError(
                    f"Memory size is misaligned with default page size or its hugepage size: "
                    f"{what} size {size} is not a multiple of {alignment}"
                )


def _check_hugepage_size(hugepages: bool, hugepage_size: int) -> None:
    if not hugepages:
        raise ConfigError("Huge page size specified but huge pages not enabled")
    if hugepage_size == 0 or hugepage_size & (hugepage_size - 1):
        raise ConfigError(f"Huge page size is not power of 2: {hugepage_size}")


def _check_hotplug_sizes(
    hotplug_size: int | None, hotplugged_size: int | None, method: str, what: str
) -> None:
    if hotplug_size == 0:
        raise ConfigError(f"Invalid hotplug_size for {what}: it can be anything except 0")
    if hotplugged_size is None:
        return
    if hotplug_size is None:
        raise ConfigError(
            f"Memory configuration is not valid: 'hotplugged_size' needs a 'hotplug_size' ({what})"
        )
    if hotplugged_size > hotplug_size:
        raise ConfigError(
            f"Memory configuration is not valid: 'hotplugged_size' {hotplugged_size} can't be "
            f"bigger than 'hotplug_size' {hotplug_size} ({what})"
        )
    if method == "Acpi":
        raise ConfigError(
            "Memory configuration is not valid: 'hotplugged_size' needs "
            f"hotplug_method=virtio-mem ({what})"
        )


# --------------------------------------------------------------------------
# Payload


class PayloadConfig(ApiModel):
    """What to boot: a kernel (with initramfs and command line) or a firmware."""

    firmware: Str | None = None
    kernel: Str | None = None
    cmdline: Str | None = None
    initramfs: Str | None = None
    # Only in reference builds with the igvm / sev_snp features; rejected.
    igvm: Str | None = None
    host_data: Str | None = None

    def _validate(self) -> None:
        if self.igvm is not None or self.host_data is not None:
            raise ConfigError(
                "Payload configuration is not bootable: IGVM payloads are not supported"
            )
        if self.firmware is not None and self.kernel is not None:
            raise ConfigError(
                "Payload configuration is not bootable: Specifying a kernel is not "
                "supported when a firmware is provided"
            )
        if self.firmware is None and self.kernel is None:
            raise ConfigError(
                "Payload configuration is not bootable: No bootitem provided: "
                "neither firmware nor kernel"
            )

    def _normalize(self) -> None:
        """Drop what a firmware payload ignores, as the reference does."""
        if self.firmware is None:
            return
        if self.cmdline is not None:
            log.warning("Ignoring cmdline parameter as firmware is provided as the payload")
            self.cmdline = None
        if self.initramfs is not None:
            log.warning("Ignoring initramfs parameter as firmware is provided as the payload")
            self.initramfs = None


# --------------------------------------------------------------------------
# Devices


class VirtQueueAffinity(ApiModel):
    queue_index: U16
    host_cpus: list[Usize]


_IMAGE_TYPES = {
    "raw": "Raw",
    "qcow2": "Qcow2",
    "vhd": "FixedVhd",
    "vhdx": "Vhdx",
    "vmdk": "FlatVmdk",
}
_LOCK_GRANULARITIES = {"byte-range": "ByteRange", "full": "Full"}


class DiskConfig(PciDeviceConfig):
    """``--disk`` / ``vm.add-disk``: a virtio-blk device."""

    path: Str | None = None
    readonly: Bool = False
    direct: Bool = False
    num_queues: Usize = 1
    queue_size: U16 = 128
    vhost_user: Bool = False
    vhost_socket: Str | None = None
    rate_limit_group: Str | None = None
    rate_limiter_config: RateLimiterConfig | None = None
    # Test knobs of the reference (CLI keys _disable_io_uring, _disable_aio);
    # not in the spec but serialized by the reference.
    disable_io_uring: Bool = False
    disable_aio: Bool = False
    serial: Str | None = None
    queue_affinity: list[VirtQueueAffinity] | None = None
    backing_files: Bool = False
    sparse: Bool = True
    image_type: ImageType = "Unknown"
    lock_granularity: LockGranularity = "ByteRange"

    @_cli_parser("--disk")
    def parse(cls, text: str) -> Self:
        opts = _options(
            "--disk",
            text,
            (
                "path",
                "readonly",
                "direct",
                "queue_size",
                "num_queues",
                "vhost_user",
                "socket",
                *_RATE_LIMIT_KEYS,
                "_disable_io_uring",
                "_disable_aio",
                "serial",
                "rate_limit_group",
                "queue_affinity",
                "backing_files",
                "sparse",
                "image_type",
                "lock_granularity",
                *_PCI_IOMMU_KEYS,
            ),
        )
        socket = opts.get("socket")
        image_type = opts.convert("image_type", _one_of(_IMAGE_TYPES))
        affinity = opts.tuple_list("queue_affinity", parse_integer, parse_integer_list)
        return cls.model_validate(
            _given(
                {
                    **cls._pci_fields(opts),
                    "path": opts.get("path"),
                    "readonly": opts.toggle("readonly"),
                    "direct": opts.toggle("direct"),
                    "num_queues": opts.integer("num_queues"),
                    "queue_size": opts.integer("queue_size"),
                    "vhost_user": opts.toggle("vhost_user"),
                    "vhost_socket": socket,
                    "rate_limit_group": opts.get("rate_limit_group"),
                    "rate_limiter_config": _rate_limiter_fields(opts),
                    "disable_io_uring": opts.toggle("_disable_io_uring"),
                    "disable_aio": opts.toggle("_disable_aio"),
                    "serial": opts.get("serial"),
                    "queue_affinity": None
                    if affinity is None
                    else [{"queue_index": queue, "host_cpus": cpus} for queue, cpus in affinity],
                    "backing_files": opts.toggle("backing_files"),
                    "sparse": opts.toggle("sparse"),
                    # The image type of a vhost-user disk is the backend's business.
                    "image_type": None if socket is not None else image_type,
                    "lock_granularity": opts.convert(
                        "lock_granularity", _one_of(_LOCK_GRANULARITIES, ignore_case=False)
                    ),
                }
            )
        )

    def _validate(self, config: VmConfig) -> None:
        if self.vhost_socket is not None and self.path is not None:
            raise ConfigError("Disk path and vhost socket both provided")
        if self.vhost_user and not config.backed_by_shared_memory():
            raise ConfigError("Using vhost-user requires using shared memory or huge pages")
        if self.vhost_user and self.vhost_socket is None:
            raise ConfigError("No socket provided when using vhost-user")
        if self.vhost_user and (self.rate_limiter_config or self.rate_limit_group):
            raise ConfigError("Rate limiting is not supported with vhost-user")
        if self.rate_limit_group is not None and not any(
            group.id == self.rate_limit_group for group in config.rate_limit_groups or ()
        ):
            raise ConfigError("Invalid rate-limiter group")
        self._validate_pci(config)
        _check_queue_count(self.num_queues, config)
        _check_queue_size(self.queue_size)
        if self.queue_size <= MINIMUM_BLOCK_QUEUE_SIZE:
            raise ConfigError(
                f"Block queue size must be greater than {MINIMUM_BLOCK_QUEUE_SIZE}: "
                f"{self.queue_size}"
            )
        if self.vhost_user and self.iommu:
            raise ConfigError("Device does not support being placed behind IOMMU")
        if self.rate_limiter_config is not None and self.rate_limit_group is not None:
            raise ConfigError("Invalid rate-limiter group")
        if self.serial is not None and len(self.serial.encode()) > VIRTIO_BLK_ID_BYTES:
            raise ConfigError(
                f"Block device serial length ({len(self.serial.encode())}) exceeds maximum "
                f"allowed length ({VIRTIO_BLK_ID_BYTES})"
            )


class NetConfig(PciDeviceConfig):
    """``--net`` / ``vm.add-net``: a virtio-net device on a tap (or vhost-user)."""

    tap: Str | None = None
    ip: Str | None = None
    mask: Str | None = None
    mac: Str | None = None
    host_mac: Str | None = None
    mtu: U16 | None = None
    num_queues: Usize = 2
    queue_size: U16 = 256
    vhost_user: Bool = False
    vhost_socket: Str | None = None
    vhost_mode: VhostMode = "Client"
    # Tap file descriptors: from the CLI's fd=[...] or SCM_RIGHTS, never JSON.
    fds: list[I32] | None = None
    rate_limiter_config: RateLimiterConfig | None = None
    offload_tso: Bool = True
    offload_ufo: Bool = True
    offload_csum: Bool = True

    _fds_from_json = field_validator("fds")(_json_fds)

    @field_validator("ip", "mask")
    @classmethod
    def _ip_address(cls, value: str | None) -> str | None:
        if value is None:
            return None
        try:
            return str(ipaddress.ip_address(value))
        except ValueError:
            raise ValueError(f"{value!r} is not an IPv4 or IPv6 address") from None

    @field_validator("mac", "host_mac")
    @classmethod
    def _mac_address(cls, value: str | None) -> str | None:
        if value is None:
            return None
        if not _MAC_ADDRESS.fullmatch(value):
            raise ValueError(f"{value!r} is not a MAC address (expected xx:xx:xx:xx:xx:xx)")
        return value.lower()

    @_cli_parser("--net")
    def parse(cls, text: str) -> Self:
        opts = _options(
            "--net",
            text,
            (
                "tap",
                "ip",
                "mask",
                "mac",
                "host_mac",
                "offload_tso",
                "offload_ufo",
                "offload_csum",
                "mtu",
                "queue_size",
                "num_queues",
                "vhost_user",
                "socket",
                "vhost_mode",
                "fd",
                *_RATE_LIMIT_KEYS,
                *_PCI_IOMMU_KEYS,
            ),
        )
        return cls.model_validate(
            _given(
                {
                    **cls._pci_fields(opts),
                    "tap": opts.get("tap"),
                    "ip": opts.get("ip"),
                    "mask": opts.get("mask"),
                    "mac": opts.get("mac"),
                    "host_mac": opts.get("host_mac"),
                    "mtu": opts.integer("mtu"),
                    "num_queues": opts.integer("num_queues"),
                    "queue_size": opts.integer("queue_size"),
                    "vhost_user": opts.toggle("vhost_user"),
                    "vhost_socket": opts.get("socket"),
                    "vhost_mode": opts.convert(
                        "vhost_mode", _one_of({"client": "Client", "server": "Server"})
                    ),
                    "fds": opts.integer_list("fd"),
                    "rate_limiter_config": _rate_limiter_fields(opts),
                    "offload_tso": opts.toggle("offload_tso"),
                    "offload_ufo": opts.toggle("offload_ufo"),
                    "offload_csum": opts.toggle("offload_csum"),
                }
            )
        )

    def _validate(self, config: VmConfig) -> None:
        if self.vhost_user and not config.backed_by_shared_memory():
            raise ConfigError("Using vhost-user requires using shared memory or huge pages")
        if self.vhost_user and self.vhost_socket is None:
            raise ConfigError("No socket provided when using vhost-user")
        if self.vhost_user and self.rate_limiter_config is not None:
            raise ConfigError("Rate limiting is not supported with vhost-user")
        self._validate_pci(config)
        if self.num_queues < 2:
            raise ConfigError(
                f"Number of queues ({self.num_queues}) to virtio_net should be higher than 2"
            )
        if self.fds is not None:
            if self.tap is not None:
                # The reference would open the tap by name and leave the fds unused.
                raise ConfigError(
                    "A net is either a tap by name or tap fds: give tap= or fd=, not both"
                )
            if len(self.fds) * 2 != self.num_queues:
                raise ConfigError(
                    f"Number of queues ({self.num_queues}) to virtio_net does not match the "
                    f"number of FDs ({len(self.fds) * 2})"
                )
            for fd in self.fds:
                if fd <= 2:
                    raise ConfigError(f"Reserved fd number (<= 2): {fd}")
        if self.num_queues // 2 > config.cpus.boot_vcpus:
            raise ConfigError(
                f"Queue count ({self.num_queues}) must not exceed boot vCPUs "
                f"({config.cpus.boot_vcpus})"
            )
        _check_queue_size(self.queue_size)
        if self.vhost_user and self.iommu:
            raise ConfigError("Device does not support being placed behind IOMMU")
        if self.mtu is not None and self.mtu < VIRTIO_NET_MIN_MTU:
            raise ConfigError(
                f"Provided MTU {self.mtu} is lower than {VIRTIO_NET_MIN_MTU} "
                "(expected by VIRTIO specification)"
            )
        if not self.offload_csum and (self.offload_tso or self.offload_ufo):
            raise ConfigError('"offload_tso" and "offload_ufo" depend on "offload_csum"')
        if self.mask is not None and self.ip is None:
            raise ConfigError("Mask provided without an IP")
        if self.ip is not None and self.mask is None:
            raise ConfigError("IP provided without a mask")


class RngConfig(PciDeviceConfig):
    """``--rng``: the virtio entropy device (always present)."""

    src: Str

    CLI_DEFAULT: ClassVar[str] = f"src={DEFAULT_RNG_SOURCE}"

    @_cli_parser("--rng")
    def parse(cls, text: str) -> Self:
        opts = _options("--rng", text, ("src", *_PCI_IOMMU_KEYS))
        return cls.model_validate(
            _given({**cls._pci_fields(opts), "src": opts.get("src") or DEFAULT_RNG_SOURCE})
        )


class RtcConfig(PciDeviceConfig):
    """``--rtc``: the virtio RTC device."""

    @_cli_parser("--rtc")
    def parse(cls, text: str) -> Self:
        opts = _options("--rtc", text, _PCI_IOMMU_KEYS)
        return cls.model_validate(_given(cls._pci_fields(opts)))


class BalloonConfig(PciDeviceConfig):
    """``--balloon``: the virtio balloon."""

    size: U64
    deflate_on_oom: Bool = False
    free_page_reporting: Bool = False

    @_cli_parser("--balloon")
    def parse(cls, text: str) -> Self:
        opts = _options(
            "--balloon", text, ("size", "deflate_on_oom", "free_page_reporting", *_PCI_IOMMU_KEYS)
        )
        return cls.model_validate(
            _given(
                {
                    **cls._pci_fields(opts),
                    "size": opts.byte_size("size") or 0,
                    "deflate_on_oom": opts.toggle("deflate_on_oom"),
                    "free_page_reporting": opts.toggle("free_page_reporting"),
                }
            )
        )


class FsConfig(PciDeviceConfig):
    """``--fs`` / ``vm.add-fs``: a virtio-fs device served by virtiofsd."""

    tag: Str
    socket: Str
    num_queues: Usize = 1
    queue_size: U16 = 1024

    @_cli_parser("--fs")
    def parse(cls, text: str) -> Self:
        opts = _options("--fs", text, ("tag", "queue_size", "num_queues", "socket", *_PCI_KEYS))
        tag = opts.get("tag")
        if tag is None:
            raise OptionError("--fs: tag missing")
        if len(tag.encode()) > VIRTIO_FS_TAG_LEN:
            raise OptionError(f"--fs: max tag length is {VIRTIO_FS_TAG_LEN}")
        socket = opts.get("socket")
        if socket is None:
            raise OptionError("--fs: socket missing")
        return cls.model_validate(
            _given(
                {
                    **cls._pci_fields(opts),
                    "tag": tag,
                    "socket": socket,
                    "num_queues": opts.integer("num_queues"),
                    "queue_size": opts.integer("queue_size"),
                }
            )
        )

    def _validate(self, config: VmConfig) -> None:
        _check_queue_count(self.num_queues, config)
        _check_queue_size(self.queue_size)
        if self.iommu:
            raise ConfigError("Device does not support being placed behind IOMMU")
        self._validate_pci(config)


# Names ``--generic-vhost-user device_type=`` accepts (linux virtio_ids.h).
_VIRTIO_DEVICE_TYPES = {
    "net": 1, "block": 2, "console": 3, "rng": 4, "balloon": 5, "iomem": 6, "rpmsg": 7,
    "scsi": 8, "9p": 9, "mac80211_wlan": 10, "rproc_serial": 11, "caif": 12,
    "memory_balloon": 13, "gpu": 16, "clock": 17, "input": 18, "vsock": 19, "crypto": 20,
    "signal_dist": 21, "pstore": 22, "iommu": 23, "mem": 24, "sound": 25, "fs": 26,
    "pmem": 27, "rpmb": 28, "mac80211_hwsim": 29, "video_encoder": 30, "video_decoder": 31,
    "scmi": 32, "nitro_sec_mod": 33, "i2c": 34, "watchdog": 35, "can": 36, "dmabuf": 37,
    "param_serv": 38, "audio_policy": 39, "bt": 40, "gpio": 41, "rdma": 42, "camera": 43,
    "ism": 44, "spi": 45, "tee": 46, "cpu_balloon": 47, "media": 48, "usb": 49,
}  # fmt: skip
# vhost-user cannot implement these: the VMM must see IOMMU and reset traffic.
_NO_VHOST_USER_DEVICE_TYPES = {_VIRTIO_DEVICE_TYPES["iommu"], _VIRTIO_DEVICE_TYPES["watchdog"]}


class GenericVhostUserConfig(PciDeviceConfig):
    """``--generic-vhost-user``: any virtio device implemented by a vhost-user backend."""

    socket: Str
    queue_sizes: list[U16]
    device_type: U32

    @_cli_parser("--generic-vhost-user")
    def parse(cls, text: str) -> Self:
        option = "--generic-vhost-user"
        opts = _options(
            option, text, ("device_type", "virtio_id", "queue_sizes", "socket", *_PCI_KEYS)
        )
        socket = opts.get("socket")
        if socket is None:
            raise OptionError(f"{option}: socket missing")
        queue_sizes = opts.integer_list("queue_sizes")
        if queue_sizes is None:
            raise OptionError(f"{option}: queue size missing")
        if opts.get("virtio_id") is not None:
            log.warning("'virtio_id' in --generic-vhost-user is deprecated; use 'device_type'.")
        name = opts.get("device_type") or opts.get("virtio_id")
        if name is None:
            raise OptionError(f"{option}: device_type missing")
        if name in _VIRTIO_DEVICE_TYPES:
            device_type = _VIRTIO_DEVICE_TYPES[name]
        elif name.isdecimal() and not name.startswith("0"):
            device_type = int(name)
        else:
            raise OptionError(
                f"{option}: device_type {name!r} invalid (leading zeros or unknown string)"
            )
        if device_type in _NO_VHOST_USER_DEVICE_TYPES:
            raise OptionError(
                f"{option}: device with device_type {name!r} cannot be implemented via vhost-user"
            )
        return cls.model_validate(
            _given(
                {
                    **cls._pci_fields(opts),
                    "socket": socket,
                    "queue_sizes": queue_sizes,
                    "device_type": device_type,
                }
            )
        )

    def _validate(self, config: VmConfig) -> None:
        if self.iommu:
            raise ConfigError("Device does not support being placed behind IOMMU")
        for queue_size in self.queue_sizes:
            _check_queue_size(queue_size)
        self._validate_pci(config)


class PmemConfig(PciDeviceConfig):
    """``--pmem`` / ``vm.add-pmem``: a virtio-pmem device backed by a file."""

    file: Str
    size: U64 | None = None
    discard_writes: Bool = False

    @_cli_parser("--pmem")
    def parse(cls, text: str) -> Self:
        opts = _options("--pmem", text, ("size", "file", "discard_writes", *_PCI_IOMMU_KEYS))
        file = opts.get("file")
        if file is None:
            raise OptionError("--pmem: file missing")
        return cls.model_validate(
            _given(
                {
                    **cls._pci_fields(opts),
                    "file": file,
                    "size": opts.byte_size("size"),
                    "discard_writes": opts.toggle("discard_writes"),
                }
            )
        )


_CONSOLE_FLAGS = {"off": "Off", "pty": "Pty", "tty": "Tty", "null": "Null"}


def _console_output(option: str, opts: ParsedOptions, *, socket: bool = True) -> dict[str, Any]:
    """``off|pty|tty|null|file=PATH|socket=PATH`` as ``{mode, file, socket}``.

    The first mode in that order wins, as in the reference.
    """
    for flag, mode in _CONSOLE_FLAGS.items():
        if flag in opts:
            return {"mode": mode}
    if "file" in opts:
        if (file := opts.get("file")) is None:
            raise OptionError(f"{option}: Path missing when using file console mode")
        return {"mode": "File", "file": file}
    if socket and "socket" in opts:
        if (path := opts.get("socket")) is None:
            raise OptionError(f"{option}: Path missing when using socket console mode")
        return {"mode": "Socket", "socket": path}
    modes = "off, null, pty, tty, file=<path>" + (", socket=<path>" if socket else "")
    raise OptionError(f"{option}: invalid console mode given (expected one of {modes})")


class ConsoleConfig(PciDeviceConfig):
    """``--console``: the virtio-console device (``off`` for none)."""

    file: Str | None = None
    mode: ConsoleMode
    socket: Str | None = None

    CLI_DEFAULT: ClassVar[str] = "tty"

    @_cli_parser("--console")
    def parse(cls, text: str) -> Self:
        opts = _options("--console", text, ("file", "socket", *_PCI_IOMMU_KEYS), _CONSOLE_FLAGS)
        return cls.model_validate(
            _given({**_console_output("--console", opts), **cls._pci_fields(opts)})
        )


class SerialConfig(ApiModel):
    """``--serial``: the legacy 16550 UART on COM1."""

    file: Str | None = None
    mode: ConsoleMode
    socket: Str | None = None

    CLI_DEFAULT: ClassVar[str] = "null"

    @_cli_parser("--serial")
    def parse(cls, text: str) -> Self:
        opts = _options("--serial", text, ("file", "socket"), _CONSOLE_FLAGS)
        return cls.model_validate(_console_output("--serial", opts))


class DebugConsoleConfig(ApiModel):
    """``--debug-console``: the 0xe9 debug port."""

    file: Str | None = None
    mode: ConsoleMode
    iobase: U16 | None = None

    CLI_DEFAULT: ClassVar[str] = f"off,iobase={DEFAULT_DEBUG_CONSOLE_PORT:#x}"

    @_cli_parser("--debug-console")
    def parse(cls, text: str) -> Self:
        option = "--debug-console"
        opts = _options(option, text, ("file", "iobase"), _CONSOLE_FLAGS)
        fields = _console_output(option, opts, socket=False)
        if (iobase := opts.get("iobase")) is not None:
            if not iobase.startswith("0x") or not re.fullmatch(r"[0-9A-Fa-f]+", iobase[2:]):
                raise OptionError(
                    f"{option}: The IO port was not properly provided in hex or a `0x` prefix "
                    f"is missing: {iobase}"
                )
            fields["iobase"] = int(iobase[2:], 16)
        return cls.model_validate(fields)


class DeviceConfig(PciDeviceConfig):
    """``--device`` / ``vm.add-device``: a VFIO passthrough device."""

    path: Str | None = None
    # A VFIO cdev descriptor: from the CLI's fd=N or SCM_RIGHTS, never JSON.
    fd: I32 | None = None
    x_nv_gpudirect_clique: U8 | None = None
    x_exclude_mmap_bars: list[U64] = Field(default_factory=list)

    _fd_from_json = field_validator("fd")(_json_fds)

    @_cli_parser("--device")
    def parse(cls, text: str) -> Self:
        opts = _options(
            "--device",
            text,
            ("path", "fd", "x_nv_gpudirect_clique", "x_exclude_mmap_bars", *_PCI_IOMMU_KEYS),
        )
        return cls.model_validate(
            _given(
                {
                    **cls._pci_fields(opts),
                    "path": opts.get("path"),
                    "fd": opts.integer("fd"),
                    "x_nv_gpudirect_clique": opts.integer("x_nv_gpudirect_clique"),
                    "x_exclude_mmap_bars": opts.integer_list("x_exclude_mmap_bars"),
                }
            )
        )

    def _validate(self, config: VmConfig) -> None:
        self._validate_pci(config)
        if self.path is None and self.fd is None:
            raise ConfigError("VFIO device config must specify `path=` or `fd=`")
        if self.path is not None and self.fd is not None:
            raise ConfigError("VFIO device config must specify at most one of `path=` or `fd=`")
        if self.path is None and (config.platform is None or config.platform.iommufd_fd is None):
            raise ConfigError("VFIO device `fd=` requires platform `iommufd_fd=<fd>`")
        if self.x_nv_gpudirect_clique is not None and not (
            config.platform is None or config.platform.vfio_p2p_dma
        ):
            raise ConfigError("Device with x_nv_gpudirect_clique requires vfio_p2p_dma=on")
        for bar in self.x_exclude_mmap_bars:
            if bar > 5:
                raise ConfigError(f"Invalid VFIO excluded-mmap BAR index: {bar}")


class UserDeviceConfig(PciDeviceConfig):
    """``--user-device`` / ``vm.add-user-device``: a vfio-user device."""

    socket: Str

    @_cli_parser("--user-device")
    def parse(cls, text: str) -> Self:
        opts = _options("--user-device", text, ("socket", *_PCI_KEYS))
        socket = opts.get("socket")
        if socket is None:
            raise OptionError("--user-device: socket missing")
        return cls.model_validate(_given({**cls._pci_fields(opts), "socket": socket}))

    def _validate(self, config: VmConfig) -> None:
        if self.iommu:
            raise ConfigError("Device does not support being placed behind IOMMU")
        self._validate_pci(config)


# The spec's body for vm.add-user-device; the reference accepts UserDeviceConfig.
VmAddUserDevice = UserDeviceConfig


class VdpaConfig(PciDeviceConfig):
    """``--vdpa`` / ``vm.add-vdpa``: a vDPA device."""

    path: Str
    num_queues: Usize = 1

    @_cli_parser("--vdpa")
    def parse(cls, text: str) -> Self:
        opts = _options("--vdpa", text, ("path", "num_queues", *_PCI_IOMMU_KEYS))
        path = opts.get("path")
        if path is None:
            raise OptionError("--vdpa: path missing")
        return cls.model_validate(
            _given(
                {**cls._pci_fields(opts), "path": path, "num_queues": opts.integer("num_queues")}
            )
        )


class VsockConfig(PciDeviceConfig):
    """``--vsock`` / ``vm.add-vsock``: a virtio-vsock device proxied to a UNIX socket."""

    cid: VsockCid
    socket: Str

    @_cli_parser("--vsock")
    def parse(cls, text: str) -> Self:
        opts = _options("--vsock", text, ("socket", "cid", *_PCI_IOMMU_KEYS))
        socket = opts.get("socket")
        if socket is None:
            raise OptionError("--vsock: socket missing")
        cid = opts.integer("cid")
        if cid is None:
            raise OptionError("--vsock: cid missing")
        return cls.model_validate(_given({**cls._pci_fields(opts), "cid": cid, "socket": socket}))


class TpmConfig(ApiModel):
    """``--tpm``: a TPM 2.0 emulated by swtpm."""

    socket: Str

    @_cli_parser("--tpm")
    def parse(cls, text: str) -> Self:
        socket = _options("--tpm", text, ("socket",)).get("socket")
        if socket is None:
            raise OptionError("--tpm: socket missing")
        return cls.model_validate({"socket": socket})


class LandlockConfig(ApiModel):
    """``--landlock-rules``: an extra path the VMM may access under Landlock."""

    path: Str
    access: Str

    @_cli_parser("--landlock-rules")
    def parse(cls, text: str) -> Self:
        opts = _options("--landlock-rules", text, ("path", "access"))
        path, access = opts.get("path"), opts.get("access")
        if path is None or access is None:
            raise OptionError("--landlock-rules: path/access field missing")
        if len(access) > 2:
            raise OptionError(f"--landlock-rules: invalid access {access!r}")
        return cls.model_validate({"path": path, "access": access})

    def _validate(self) -> None:
        if not os.path.exists(self.path):
            raise ConfigError(f"Path {self.path!r} provided in landlock-rules does not exist")
        if not self.access:
            raise ConfigError("Invalid landlock access: Access cannot be empty")
        for char in self.access:
            if char not in "rw":
                raise ConfigError(f"Invalid landlock access: Invalid access: {char}")


# --------------------------------------------------------------------------
# Platform, PCI segments, NUMA


class PciSegmentConfig(ApiModel):
    """``--pci-segment``: how a PCI segment shares the MMIO apertures."""

    pci_segment: U16 = 0
    mmio32_aperture_weight: U32 = 1
    mmio64_aperture_weight: U32 = 1

    @_cli_parser("--pci-segment")
    def parse(cls, text: str) -> Self:
        opts = _options(
            "--pci-segment",
            text,
            ("pci_segment", "mmio32_aperture_weight", "mmio64_aperture_weight"),
        )
        return cls.model_validate(_given({name: opts.integer(name) for name in cls.model_fields}))

    def _validate(self, config: VmConfig) -> None:
        num_segments = config.platform.num_pci_segments if config.platform else 1
        if self.pci_segment >= num_segments:
            raise ConfigError(f"Invalid PCI segment id: {self.pci_segment}")
        for weight in (self.mmio32_aperture_weight, self.mmio64_aperture_weight):
            if weight == 0:
                raise ConfigError(f"Invalid PCI segment aperture weight: {weight}")


_SMBIOS_STRINGS = (
    "system_manufacturer",
    "system_product_name",
    "system_version",
    "system_serial_number",
    "system_uuid",
    "system_sku_number",
    "system_family",
    "chassis_asset_tag",
)


class PlatformConfig(ApiModel):
    """``--platform``: PCI segments, IOMMU placement and SMBIOS strings."""

    num_pci_segments: U16 = 1
    iommu_segments: list[U16] | None = None
    iommu_address_width_bits: U8 = MAX_IOMMU_ADDRESS_WIDTH_BITS
    system_serial_number: Str | None = Field(
        default=None, validation_alias=AliasChoices("system_serial_number", "serial_number")
    )
    system_uuid: Str | None = Field(
        default=None, validation_alias=AliasChoices("system_uuid", "uuid")
    )
    oem_strings: list[Str] | None = None
    system_manufacturer: Str | None = None
    system_product_name: Str | None = None
    system_version: Str | None = None
    system_family: Str | None = None
    system_sku_number: Str | None = None
    chassis_asset_tag: Str | None = None
    # Only in reference builds with the tdx / sev_snp features; rejected.
    tdx: Bool | None = None
    sev_snp: Bool | None = None
    iommufd: Bool = False
    # An iommufd descriptor: from the CLI's iommufd_fd=N, never JSON.
    iommufd_fd: I32 | None = None
    vfio_p2p_dma: Bool = True

    _iommufd_fd_from_json = field_validator("iommufd_fd")(_json_fds)

    @_cli_parser("--platform")
    def parse(cls, text: str) -> Self:
        opts = _options(
            "--platform",
            text,
            (
                "num_pci_segments",
                "iommu_segments",
                "iommu_address_width",
                "serial_number",
                "uuid",
                "oem_strings",
                "iommufd",
                "iommufd_fd",
                "vfio_p2p_dma",
                *_SMBIOS_STRINGS,
            ),
        )
        for legacy, current in (("serial_number", "system_serial_number"), ("uuid", "system_uuid")):
            if legacy in opts:
                log.warning("%r in --platform is deprecated; use %r.", legacy, current)
        iommufd_fd = opts.integer("iommufd_fd")
        iommufd = opts.toggle("iommufd")
        return cls.model_validate(
            _given(
                {
                    "num_pci_segments": opts.integer("num_pci_segments"),
                    "iommu_segments": opts.integer_list("iommu_segments"),
                    "iommu_address_width_bits": opts.integer("iommu_address_width"),
                    "oem_strings": opts.string_list("oem_strings"),
                    # iommufd_fd=<n> implies iommufd=on unless iommufd is given.
                    "iommufd": iommufd_fd is not None if iommufd is None else iommufd,
                    "iommufd_fd": iommufd_fd,
                    "vfio_p2p_dma": opts.toggle("vfio_p2p_dma"),
                    **{name: opts.get(name) for name in _SMBIOS_STRINGS},
                    "system_serial_number": opts.get("system_serial_number")
                    or opts.get("serial_number"),
                    "system_uuid": opts.get("system_uuid") or opts.get("uuid"),
                }
            )
        )

    def _validate(self) -> None:
        if not 1 <= self.num_pci_segments <= MAX_NUM_PCI_SEGMENTS:
            raise ConfigError(
                f"Number of PCI segments ({self.num_pci_segments}) not in range of 1 to "
                f"{MAX_NUM_PCI_SEGMENTS}"
            )
        for segment in self.iommu_segments or ():
            if segment >= self.num_pci_segments:
                raise ConfigError(f"Invalid PCI segment id: {segment}")
        if self.iommu_address_width_bits > MAX_IOMMU_ADDRESS_WIDTH_BITS:
            raise ConfigError(
                f"IOMMU address width in bits ({self.iommu_address_width_bits}) should be less "
                f"than or equal to {MAX_IOMMU_ADDRESS_WIDTH_BITS}"
            )
        if self.iommufd_fd is not None and not self.iommufd:
            raise ConfigError("Platform `iommufd_fd=<fd>` requires `iommufd=on`")
        if self.tdx:
            raise ConfigError("TDX is not supported")
        if self.sev_snp:
            raise ConfigError("SEV-SNP is not supported")


class NumaDistance(ApiModel):
    destination: U32 = 0
    distance: U8 = 0


class NumaConfig(ApiModel):
    """``--numa``: one guest NUMA node."""

    guest_numa_id: U32
    cpus: list[U32] | None = None
    distances: list[NumaDistance] | None = None
    memory_zones: list[Str] | None = None
    pci_segments: list[U16] | None = None
    device_id: Str | None = None

    @_cli_parser("--numa")
    def parse(cls, text: str) -> Self:
        opts = _options(
            "--numa",
            text,
            ("guest_numa_id", "cpus", "distances", "device_id", "memory_zones", "pci_segments"),
        )
        guest_numa_id = opts.integer("guest_numa_id")
        if guest_numa_id is None:
            raise OptionError("--numa: guest_numa_id is required for all NUMA nodes")
        cpus = opts.integer_list("cpus")
        memory_zones = opts.string_list("memory_zones")
        device_id = opts.get("device_id")
        if device_id is not None and (cpus is not None or memory_zones is not None):
            raise OptionError("--numa: device_id cannot be used with cpus or memory zones")
        distances = opts.tuple_list("distances", parse_integer, parse_integer)
        return cls.model_validate(
            _given(
                {
                    "guest_numa_id": guest_numa_id,
                    "cpus": cpus,
                    "distances": None
                    if distances is None
                    else [{"destination": node, "distance": d} for node, d in distances],
                    "memory_zones": memory_zones,
                    "pci_segments": opts.integer_list("pci_segments"),
                    "device_id": device_id,
                }
            )
        )

    def _validate(self) -> None:
        def invalid(reason: str) -> ConfigError:
            return ConfigError(f"Invalid NUMA configuration: {reason}")

        if self.device_id is not None:
            if self.cpus is not None or self.memory_zones is not None:
                raise invalid(
                    "device_id in numa config is mutually exclusive with cpus and memory_zones"
                )
            if not self.device_id:
                raise invalid("device_id in numa config cannot be empty")
        elif self.cpus is not None:
            if not self.cpus:
                raise invalid("cpus list in numa config cannot be empty")
        elif self.memory_zones is not None:
            if not self.memory_zones:
                raise invalid("memory_zones in numa config cannot be empty")
        else:
            raise invalid("numa config must specify either device_id or cpus/memory_zones")


# --------------------------------------------------------------------------
# The VM


class VmConfig(ApiModel):
    """The whole VM: the body of ``vm.create`` and ``vm.info``'s ``config``."""

    cpus: CpusConfig = Field(default_factory=lambda: CpusConfig(boot_vcpus=1, max_vcpus=1))
    memory: MemoryConfig = Field(default_factory=lambda: MemoryConfig(size=DEFAULT_MEMORY_SIZE))
    # Required by the spec; missing is reported by validate(), like the reference.
    payload: PayloadConfig | None = None
    rate_limit_groups: list[RateLimitGroupConfig] | None = None
    disks: list[DiskConfig] | None = None
    net: list[NetConfig] | None = None
    rng: RngConfig = Field(default_factory=lambda: RngConfig(src=DEFAULT_RNG_SOURCE))
    balloon: BalloonConfig | None = None
    generic_vhost_user: list[GenericVhostUserConfig] | None = None
    fs: list[FsConfig] | None = None
    pmem: list[PmemConfig] | None = None
    serial: SerialConfig = Field(default_factory=lambda: SerialConfig(mode="Null"))
    console: ConsoleConfig = Field(default_factory=lambda: ConsoleConfig(mode="Tty"))
    debug_console: DebugConsoleConfig = Field(
        default_factory=lambda: DebugConsoleConfig(mode="Off", iobase=DEFAULT_DEBUG_CONSOLE_PORT)
    )
    devices: list[DeviceConfig] | None = None
    user_devices: list[UserDeviceConfig] | None = None
    vdpa: list[VdpaConfig] | None = None
    vsock: VsockConfig | None = None
    pvpanic: Bool = False
    # Set by validate() when any device sits behind the virtual IOMMU.
    iommu: Bool = False
    numa: list[NumaConfig] | None = None
    watchdog: Bool = False
    rtc: RtcConfig | None = None
    pci_segments: list[PciSegmentConfig] | None = None
    platform: PlatformConfig | None = None
    tpm: TpmConfig | None = None
    landlock_enable: Bool = False
    landlock_rules: list[LandlockConfig] | None = None

    def backed_by_shared_memory(self) -> bool:
        """Whether all guest RAM is shareable with vhost-user backends."""
        if self.memory.shared or self.memory.hugepages:
            return True
        if self.memory.size == 0 and self.memory.zones:
            return all(zone.shared or zone.hugepages for zone in self.memory.zones)
        return False

    def ram_shareable(self) -> bool:
        """Whether a vhost-user back-end (virtiofsd) can map all of pych's guest RAM. pych
        backs RAM with memfds mapped shared, which always are, so unlike the reference
        (whose default RAM is private) ``--fs`` needs no ``shared=on``; only a memory zone
        backed by a ``file`` without ``shared=on`` is mapped private."""
        return all(zone.shared or zone.file is None for zone in self.memory.zones or ())

    def validate(self) -> frozenset[str]:
        """Check the configuration as the reference's ``VmConfig::validate``.

        Returns the identifiers the configuration uses.  Raises
        :class:`ConfigConflict` for a duplicated identifier or VFIO device
        path (HTTP 409) and :class:`ConfigError` for anything else (HTTP 400);
        the configuration is then left untouched.

        On success, like the reference, it normalizes the configuration:
        ``iommu`` becomes true when a device is placed behind the IOMMU, and
        a firmware payload drops its ``cmdline`` and ``initramfs``.

        Memory checks the reference makes in its memory manager at boot
        (sizes aligned to the page size, hot-plug sizes consistent with the
        hot-plug method, zones vs size 0) are made here too.
        """
        ids: set[str] = set()

        def claim(identifier: str | None) -> None:
            if identifier is None:
                return
            if identifier.startswith("__"):
                raise ConfigError(f"Identifier {identifier} is not valid")
            if identifier in ids:
                raise IdentifierNotUnique(identifier)
            ids.add(identifier)

        if self.payload is None:
            raise ConfigError(
                "Payload configuration is not bootable: No bootitem provided: "
                "neither firmware nor kernel"
            )
        self.payload._validate()

        for name, output in (("console", self.console), ("serial", self.serial)):
            if output.mode == "File" and output.file is None:
                raise ConfigError(f"Path missing when using file console mode ({name})")
            if output.mode == "Socket" and output.socket is None:
                raise ConfigError(f"Path missing when using socket console mode ({name})")
        if self.debug_console.mode == "File" and self.debug_console.file is None:
            raise ConfigError("Path missing when using file mode for debug console")

        self.cpus._validate()

        iommu = self.iommu
        for group in self.rate_limit_groups or ():
            group._validate()
            claim(group.id)
        for disk in self.disks or ():
            disk._validate(self)
            iommu |= disk.iommu
            claim(disk.id)
        for net in self.net or ():
            net._validate(self)
            iommu |= net.iommu
            claim(net.id)
        if self.fs and not self.ram_shareable():
            raise ConfigError("Using vhost-user requires using shared memory or huge pages")
        for fs in self.fs or ():
            fs._validate(self)
            claim(fs.id)
        if self.generic_vhost_user and not self.backed_by_shared_memory():
            raise ConfigError("Using vhost-user requires using shared memory or huge pages")
        for device in self.generic_vhost_user or ():
            device._validate(self)
            claim(device.id)
        for pmem in self.pmem or ():
            pmem._validate_pci(self)
            iommu |= pmem.iommu
            claim(pmem.id)
        self.rng._validate_pci(self)
        claim(self.rng.id)
        iommu |= self.rng.iommu
        if self.rtc is not None:
            self.rtc._validate_pci(self)
            claim(self.rtc.id)
            iommu |= self.rtc.iommu
        self.console._validate_pci(self)
        claim(self.console.id)
        iommu |= self.console.iommu

        self.memory._validate()

        if self.user_devices and not self.backed_by_shared_memory():
            raise ConfigError("Using user devices requires using shared memory or huge pages")
        for user_device in self.user_devices or ():
            user_device._validate(self)
            claim(user_device.id)
        for vdpa in self.vdpa or ():
            vdpa._validate_pci(self)
            iommu |= vdpa.iommu
            claim(vdpa.id)
        if self.vsock is not None and self.vsock.cid in (0, 1, 2, 2**32 - 1):
            raise ConfigError(f"{self.vsock.cid} is a special VSOCK CID")
        if self.balloon is not None:
            self.balloon._validate_pci(self)
            claim(self.balloon.id)
            iommu |= self.balloon.iommu
            ram = self.memory.total_size()
            if self.balloon.size >= ram:
                raise ConfigError(f"Balloon size ({self.balloon.size}) greater than RAM ({ram})")
        device_paths: set[str] = set()
        for device in self.devices or ():
            if device.path is not None:
                if device.path in device_paths:
                    raise DuplicateDevicePath(device.path)
                device_paths.add(device.path)
            device._validate(self)
            iommu |= device.iommu
            claim(device.id)
        if self.vsock is not None:
            self.vsock._validate_pci(self)
            iommu |= self.vsock.iommu
            claim(self.vsock.id)

        self._validate_numa()
        for zone in self.memory.zones or ():
            claim(zone.id)
        for segment in self.pci_segments or ():
            segment._validate(self)
        if self.platform is not None:
            self.platform._validate()
            iommu |= self.platform.iommu_segments is not None
        for rule in self.landlock_rules or ():
            rule._validate()

        self.payload._normalize()
        if iommu != self.iommu:
            self.iommu = iommu
        return frozenset(ids)

    def _validate_numa(self) -> None:
        num_segments = self.platform.num_pci_segments if self.platform else 1
        zone_nodes: dict[str, int] = {}
        segment_nodes: dict[int, int] = {}
        for node in self.numa or ():
            node._validate()
            for zone in node.memory_zones or ():
                if zone in zone_nodes:
                    raise ConfigError(
                        f"Memory zone: {zone} belongs to multiple NUMA nodes: "
                        f"{zone_nodes[zone]} and {node.guest_numa_id}"
                    )
                zone_nodes[zone] = node.guest_numa_id
            for segment in node.pci_segments or ():
                if segment >= num_segments:
                    raise ConfigError(f"Invalid PCI segment id: {segment}")
                if segment == 0 and node.guest_numa_id != 0:
                    raise ConfigError(
                        f"Default PCI segment assigned to non-zero NUMA node {node.guest_numa_id}"
                    )
                if segment in segment_nodes:
                    raise ConfigError(
                        f"PCI segment: {segment} belongs to multiple NUMA nodes "
                        f"{segment_nodes[segment]} and {node.guest_numa_id}"
                    )
                segment_nodes[segment] = node.guest_numa_id

    def remove_device(self, identifier: str) -> bool:
        """Drop the hot-removable device ``identifier`` from the config.

        Covers VFIO and vfio-user devices, disks, fs, generic vhost-user,
        net, pmem, vDPA and vsock, like the reference.  Returns whether
        anything was removed.
        """
        removed = False
        for name in (
            "devices",
            "user_devices",
            "disks",
            "fs",
            "generic_vhost_user",
            "net",
            "pmem",
            "vdpa",
        ):
            configs = getattr(self, name)
            if configs:
                kept = [config for config in configs if config.id != identifier]
                if len(kept) != len(configs):
                    configs[:] = kept
                    removed = True
        if self.vsock is not None and self.vsock.id == identifier:
            self.vsock = None
            removed = True
        return removed


# --------------------------------------------------------------------------
# Request bodies


class VmResize(ApiModel):
    """``vm.resize``: any of vCPU count, RAM bytes, balloon bytes."""

    # The reference (and ch-remote) write unset fields as null.
    _serde_nullable: ClassVar[frozenset[str]] = frozenset(
        {"desired_vcpus", "desired_ram", "desired_balloon"}
    )

    desired_vcpus: PositiveU32 | None = None
    desired_ram: U64 | None = None
    desired_balloon: U64 | None = None

    @classmethod
    def from_remote_args(
        cls, cpus: str | None = None, memory: str | None = None, balloon: str | None = None
    ) -> Self:
        """The body ``ch-remote resize --cpus N --memory 3G --balloon 1G`` sends."""
        try:
            return cls.model_validate(
                {
                    "desired_vcpus": None if cpus is None else parse_integer(cpus),
                    "desired_ram": None if memory is None else parse_byte_size(memory),
                    "desired_balloon": None if balloon is None else parse_byte_size(balloon),
                }
            )
        except ValidationError as err:
            raise OptionError(f"resize: {describe_validation_error(err)}") from None
        except ValueError as err:
            raise OptionError(f"resize: {err}") from None


class VmResizeZone(ApiModel):
    id: Str
    desired_ram: U64


class VmResizeDisk(ApiModel):
    id: Str
    desired_size: U64


class VmRemoveDevice(ApiModel):
    id: Str


class VmSnapshotConfig(ApiModel):
    destination_url: Str


class VmCoredumpData(ApiModel):
    destination_url: Str


class VmMemoryZoneUpdateData(ApiModel):
    id: Annotated[str, Strict(), Field(min_length=1)]
    host_numa_node: U32


class RestoredNetConfig(ApiModel):
    """New tap descriptors for a restored net device (they come with SCM_RIGHTS)."""

    id: Str
    num_fds: Usize = 0
    fds: list[I32] | None = None

    _fds_from_json = field_validator("fds")(_json_fds)


class RestoredVfioConfig(ApiModel):
    """A new cdev descriptor for a restored VFIO device (it comes with SCM_RIGHTS)."""

    id: Str
    fd: I32 | None = None

    _fd_from_json = field_validator("fd")(_json_fds)


def _zone_updates(opts: ParsedOptions) -> list[dict[str, Any]] | None:
    updates = opts.tuple_list("zone_updates", dequote, parse_integer)
    if updates is None:
        return None
    return [{"id": zone, "host_numa_node": node} for zone, node in updates]


def _vfio_fds(opts: ParsedOptions) -> list[dict[str, Any]] | None:
    pairs = opts.tuple_list("vfio_fds", dequote, parse_integer)
    return None if pairs is None else [{"id": device, "fd": fd} for device, fd in pairs]


class RestoreConfig(ApiModel):
    """``vm.restore`` / ``--restore``: restore a VM from a snapshot."""

    source_url: Str
    prefault: Bool = False
    memory_restore_mode: MemoryRestoreMode = "Copy"
    net_fds: list[RestoredNetConfig] | None = None
    vfio_fds: list[RestoredVfioConfig] | None = None
    iommufd_fd: I32 | None = None
    resume: Bool = False
    zone_updates: list[VmMemoryZoneUpdateData] = Field(default_factory=list)

    _iommufd_fd_from_json = field_validator("iommufd_fd")(_json_fds)

    @_cli_parser("--restore")
    def parse(cls, text: str) -> Self:
        opts = _options(
            "--restore",
            text,
            (
                "source_url",
                "prefault",
                "memory_restore_mode",
                "net_fds",
                "vfio_fds",
                "iommufd_fd",
                "resume",
                "zone_updates",
            ),
        )
        source_url = opts.get("source_url")
        if source_url is None:
            raise OptionError("--restore: source_url missing")
        net_fds = opts.tuple_list("net_fds", dequote, parse_integer_list)
        return cls.model_validate(
            _given(
                {
                    "source_url": source_url,
                    "prefault": opts.toggle("prefault"),
                    "memory_restore_mode": opts.convert(
                        "memory_restore_mode", _one_of({"copy": "Copy", "ondemand": "OnDemand"})
                    ),
                    "net_fds": None
                    if net_fds is None
                    else [{"id": net, "num_fds": len(fds), "fds": fds} for net, fds in net_fds],
                    "vfio_fds": _vfio_fds(opts),
                    "iommufd_fd": opts.integer("iommufd_fd"),
                    "resume": opts.toggle("resume"),
                    "zone_updates": _zone_updates(opts),
                }
            )
        )


_MIGRATION_MODES = {"precopy": "Precopy", "postcopy": "Postcopy"}


class ReceiveMigrationData(ApiModel):
    """``vm.receive-migration``."""

    receiver_url: Str
    tls_dir: Str | None = None
    memory_mode: MigrationMode = "Precopy"
    vfio_fds: list[RestoredVfioConfig] | None = None
    iommufd_fd: I32 | None = None
    zone_updates: list[VmMemoryZoneUpdateData] = Field(default_factory=list)

    _iommufd_fd_from_json = field_validator("iommufd_fd")(_json_fds)

    @_cli_parser("receive-migration")
    def parse(cls, text: str) -> Self:
        opts = _options(
            "receive-migration",
            text,
            ("receiver_url", "tls_dir", "memory_mode", "vfio_fds", "iommufd_fd", "zone_updates"),
        )
        receiver_url = opts.get("receiver_url")
        if receiver_url is None:
            raise OptionError("receive-migration: receiver_url missing")
        return cls.model_validate(
            _given(
                {
                    "receiver_url": receiver_url,
                    "tls_dir": opts.get("tls_dir"),
                    "memory_mode": opts.convert("memory_mode", _one_of(_MIGRATION_MODES)),
                    "vfio_fds": _vfio_fds(opts),
                    "iommufd_fd": opts.integer("iommufd_fd"),
                    "zone_updates": _zone_updates(opts),
                }
            )
        )


class SendMigrationData(ApiModel):
    """``vm.send-migration``."""

    destination_url: Str
    local: Bool = False
    preserve_source: Bool = False
    downtime_ms: PositiveU64 = 300
    timeout_s: PositiveU64 = 3600
    timeout_strategy: TimeoutStrategy = "Cancel"
    connections: Annotated[int, Strict(), Field(ge=1, le=MAX_MIGRATION_CONNECTIONS)] = 1
    tls_dir: Str | None = None
    memory_mode: MigrationMode = "Precopy"

    @_cli_parser("send-migration")
    def parse(cls, text: str) -> Self:
        opts = _options("send-migration", text, cls.model_fields)
        destination_url = opts.get("destination_url")
        if destination_url is None:
            raise OptionError("send-migration: destination_url missing")
        return cls.model_validate(
            _given(
                {
                    "destination_url": destination_url,
                    "local": opts.toggle("local"),
                    "preserve_source": opts.toggle("preserve_source"),
                    "downtime_ms": opts.integer("downtime_ms"),
                    "timeout_s": opts.integer("timeout_s"),
                    "timeout_strategy": opts.convert(
                        "timeout_strategy", _one_of({"cancel": "Cancel", "ignore": "Ignore"})
                    ),
                    "connections": opts.integer("connections"),
                    "tls_dir": opts.get("tls_dir"),
                    "memory_mode": opts.convert("memory_mode", _one_of(_MIGRATION_MODES)),
                }
            )
        )


# --------------------------------------------------------------------------
# Responses


class VmmPingResponse(ApiModel):
    build_version: Str
    version: Str
    pid: I64
    features: list[Str] = Field(default_factory=list)


class PciDeviceInfo(ApiModel):
    """The answer to a hot plug: ``{"id": "_disk2", "bdf": "0000:00:06.0"}``."""

    id: Str
    bdf: Str


class DeviceNode(ApiModel):
    id: Str
    # Rust enums with data (I/O ports, MMIO ranges, IRQs...), kept as JSON.
    resources: list[dict[str, Any]] = Field(default_factory=list)
    parent: Str | None = None
    children: list[Str] = Field(default_factory=list)
    pci_bdf: Str | None = None


class VmInfo(ApiModel):
    config: VmConfig
    state: VmState
    memory_actual_size: U64
    device_tree: dict[str, DeviceNode] | None = None


class VmCounters(RootModel[dict[str, dict[str, int]]]):
    """Per-device counters: ``{"_disk0": {"read_bytes": 0, ...}, ...}``."""


# --------------------------------------------------------------------------
# VMM options (not part of VmConfig)


@dataclass(frozen=True)
class ApiSocket:
    """``--api-socket path=P``, ``fd=N`` or a bare path ``P``."""

    path: str | None = None
    fd: int | None = None

    @classmethod
    def parse(cls, text: str) -> Self:
        try:
            opts = OptionParser("--api-socket", ("path", "fd")).parse(text)
        except OptionParserError:
            # Not key=value: the whole text is a path (the reference does the same).
            return cls(path=text)
        if (fd := opts.get("fd")) is not None:
            try:
                return cls(fd=parse_integer(fd))
            except ValueError:
                raise OptionError(f"--api-socket: invalid fd {fd!r}") from None
        return cls(path=opts.get("path") or text)


@dataclass(frozen=True)
class EventMonitor:
    """``--event-monitor path=P`` or ``fd=N``."""

    path: str | None = None
    fd: int | None = None

    @_cli_parser("--event-monitor")
    def parse(cls, text: str) -> Self:
        opts = _options("--event-monitor", text, ("path", "fd"))
        if "fd" in opts:
            fd = opts.integer("fd")
            if fd is None:
                raise OptionError("--event-monitor: fd needs a value")
            return cls(fd=fd)
        if "path" in opts:
            path = opts.get("path")
            if path is None:
                raise OptionError("--event-monitor: path needs a value")
            return cls(path=path)
        raise OptionError("--event-monitor: path or fd required")
