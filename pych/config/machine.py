"""The machine around the devices: vCPUs (``--cpus``), what to boot (payload), the platform
(PCI segments, IOMMU, SMBIOS), guest NUMA nodes and the Landlock sandbox rules."""

from __future__ import annotations

import logging
import os
import uuid
from typing import TYPE_CHECKING, Annotated, Any, ClassVar, Literal

from pydantic import AliasChoices, Field, field_validator

from pych.config.base import (
    I32,
    INTEGER,
    INTEGER_LIST,
    STRING_LIST,
    TEXT,
    TOGGLE,
    U8,
    U16,
    U32,
    ApiModel,
    Bool,
    Cli,
    CliModel,
    ConfigError,
    PositiveU32,
    Rejected,
    Str,
    Usize,
    json_fds,
    one_of,
    pairs,
)
from pych.config.grammar import dequote, parse_integer, parse_integer_list, parse_string_list
from pych.arch.x86_64.layout import (MAX_PCI_SEGMENTS, MEM_32BIT_DEVICES_SIZE,
                                     PCI_SEGMENT_MMIO32_ALIGNMENT)

if TYPE_CHECKING:
    from pych.config.vm import VmConfig

__all__ = [
    "CpuAffinity",
    "CpuFeatures",
    "CpuTopology",
    "CpusConfig",
    "LandlockConfig",
    "NumaConfig",
    "NumaDistance",
    "PayloadConfig",
    "PciSegmentConfig",
    "PlatformConfig",
]

log = logging.getLogger(__name__)

CoreSchedulingMode = Literal["Vm", "Vcpu", "Off"]
CpuProfile = Literal["Host"]

DEFAULT_MAX_PHYS_BITS = 46
MAX_SUPPORTED_CPUS = 8192  # KVM on x86_64
MAX_NUM_PCI_SEGMENTS = 96
MAX_IOMMU_ADDRESS_WIDTH_BITS = 64

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


def _topology(raw: str) -> dict[str, int]:
    parts = dequote(raw).split(":")
    if len(parts) != 4 or not all(part.isdecimal() for part in parts):
        raise ValueError(
            "expected <threads_per_core>:<cores_per_die>:<dies_per_package>:<packages>"
        )
    return dict(zip(CpuTopology.model_fields, map(int, parts), strict=True))


def _cpu_features(raw: str) -> dict[str, bool]:
    features = {}
    for feature in parse_string_list(raw):
        if feature != "amx":
            raise Rejected(f"invalid feature {feature!r} (supported: amx)")
        features["amx"] = True
    return features


class CpusConfig(CliModel):
    """``--cpus``: boot and hot-pluggable vCPUs and how they look to the guest."""

    CLI_OPTION: ClassVar[str] = "--cpus"
    CLI_DEFAULT: ClassVar[str] = f"boot=1,max_phys_bits={DEFAULT_MAX_PHYS_BITS}"

    boot_vcpus: Annotated[PositiveU32, Cli(parse_integer, key="boot", default=1)]
    # The CLI's default is boot_vcpus (see _complete_cli).
    max_vcpus: Annotated[PositiveU32, Cli(parse_integer, key="max")]
    topology: Annotated[CpuTopology | None, Cli(_topology)] = None
    kvm_hyperv: Annotated[Bool, TOGGLE] = False
    max_phys_bits: Annotated[U8, INTEGER] = DEFAULT_MAX_PHYS_BITS
    affinity: Annotated[
        list[CpuAffinity] | None,
        Cli(pairs(parse_integer, parse_integer_list, ("vcpu", "host_cpus"))),
    ] = None
    features: Annotated[CpuFeatures, Cli(_cpu_features)] = Field(default_factory=CpuFeatures)
    nested: Annotated[Bool, TOGGLE] = True
    core_scheduling: Annotated[
        CoreSchedulingMode, Cli(one_of({"vm": "Vm", "vcpu": "Vcpu", "off": "Off"}))
    ] = "Vm"
    profile: Annotated[CpuProfile, Cli(one_of({"Host": "Host"}, ignore_case=False))] = "Host"

    @classmethod
    def _complete_cli(cls, fields: dict[str, Any], **context: Any) -> None:
        fields.setdefault("max_vcpus", fields["boot_vcpus"])

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
        self._validate_affinity()

    def _validate_affinity(self) -> None:
        """Each pinned vCPU exists (below ``max_vcpus``, hot-pluggable ones included) and is
        pinned once, to host CPUs this process may run on (checked now, so a vCPU thread
        never fails to pin itself at boot or hot plug)."""
        allowed = os.sched_getaffinity(0)
        seen: set[int] = set()
        for entry in self.affinity or ():
            if entry.vcpu >= self.max_vcpus:
                raise ConfigError(
                    f"cpus.affinity: vCPU {entry.vcpu} does not exist (max_vcpus is "
                    f"{self.max_vcpus})")
            if entry.vcpu in seen:
                raise ConfigError(f"cpus.affinity: vCPU {entry.vcpu} is given twice")
            seen.add(entry.vcpu)
            if not entry.host_cpus:
                raise ConfigError(f"cpus.affinity: vCPU {entry.vcpu} has no host CPUs")
            outside = sorted(set(entry.host_cpus) - allowed)
            if outside:
                raise ConfigError(
                    f"cpus.affinity: vCPU {entry.vcpu}: host CPU(s) {outside} are not "
                    f"available to pych (it may run on {sorted(allowed)})")

    def affinity_map(self) -> dict[int, frozenset[int]]:
        """``affinity`` as vCPU id -> its host CPUs."""
        return {entry.vcpu: frozenset(entry.host_cpus) for entry in self.affinity or ()}


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
# Platform, PCI segments, NUMA


class PciSegmentConfig(CliModel):
    """``--pci-segment``: how a PCI segment shares the MMIO apertures."""

    CLI_OPTION: ClassVar[str] = "--pci-segment"

    pci_segment: Annotated[U16, INTEGER] = 0
    mmio32_aperture_weight: Annotated[U32, INTEGER] = 1
    mmio64_aperture_weight: Annotated[U32, INTEGER] = 1

    def _validate(self, config: VmConfig) -> None:
        num_segments = config.platform.num_pci_segments if config.platform else 1
        if self.pci_segment >= num_segments:
            raise ConfigError(f"Invalid PCI segment id: {self.pci_segment}")
        for weight in (self.mmio32_aperture_weight, self.mmio64_aperture_weight):
            if weight == 0:
                raise ConfigError(f"Invalid PCI segment aperture weight: {weight}")
        mmio32, mmio64 = aperture_weights(config)
        for field, weights, limit, window in (
                ("mmio32_aperture_weight", mmio32, MAX_MMIO32_SHARES, "32-bit device hole "
                 "(640 MiB) has 163840 shares of 4 KiB"),
                ("mmio64_aperture_weight", mmio64, MAX_PCI_SEGMENTS, "64 GiB PCI window has "
                 f"{MAX_PCI_SEGMENTS} shares of 4 GiB")):
            if sum(weights) > limit:
                raise ConfigError(
                    f"pci_segments: {field} of segment {self.pci_segment} is not supported by "
                    f"pych: the weights of the {len(weights)} segments add up to "
                    f"{sum(weights)}, and pych's {window}")


MAX_MMIO32_SHARES = MEM_32BIT_DEVICES_SIZE // PCI_SEGMENT_MMIO32_ALIGNMENT     # 163840


def aperture_weights(config: VmConfig) -> tuple[list[int], list[int]]:
    """Each PCI segment's weights for the 32-bit and 64-bit MMIO windows: 1, or what its
    ``pci_segments`` entry says (the last entry for a segment wins, as in the reference)."""
    num_segments = config.platform.num_pci_segments if config.platform else 1
    mmio32, mmio64 = [1] * num_segments, [1] * num_segments
    for segment in config.pci_segments or ():
        if segment.pci_segment < num_segments:
            mmio32[segment.pci_segment] = segment.mmio32_aperture_weight
            mmio64[segment.pci_segment] = segment.mmio64_aperture_weight
    return mmio32, mmio64


class PlatformConfig(CliModel):
    """``--platform``: PCI segments, IOMMU placement and SMBIOS strings."""

    CLI_OPTION: ClassVar[str] = "--platform"

    num_pci_segments: Annotated[U16, INTEGER] = 1
    iommu_segments: Annotated[list[U16] | None, INTEGER_LIST] = None
    iommu_address_width_bits: Annotated[U8, Cli(parse_integer, key="iommu_address_width")] = (
        MAX_IOMMU_ADDRESS_WIDTH_BITS
    )
    system_serial_number: Annotated[Str | None, Cli(deprecated="serial_number")] = Field(
        default=None, validation_alias=AliasChoices("system_serial_number", "serial_number")
    )
    system_uuid: Annotated[Str | None, Cli(deprecated="uuid")] = Field(
        default=None, validation_alias=AliasChoices("system_uuid", "uuid")
    )
    oem_strings: Annotated[list[Str] | None, STRING_LIST] = None
    system_manufacturer: Annotated[Str | None, TEXT] = None
    system_product_name: Annotated[Str | None, TEXT] = None
    system_version: Annotated[Str | None, TEXT] = None
    system_family: Annotated[Str | None, TEXT] = None
    system_sku_number: Annotated[Str | None, TEXT] = None
    chassis_asset_tag: Annotated[Str | None, TEXT] = None
    # Only in reference builds with the tdx / sev_snp features; rejected.
    tdx: Bool | None = None
    sev_snp: Bool | None = None
    # The CLI's default is whether iommufd_fd is given (see _complete_cli).
    iommufd: Annotated[Bool, TOGGLE] = False
    # An iommufd descriptor: from the CLI's iommufd_fd=N, never JSON.
    iommufd_fd: Annotated[I32 | None, INTEGER] = None
    vfio_p2p_dma: Annotated[Bool, TOGGLE] = True

    _iommufd_fd_from_json = field_validator("iommufd_fd")(json_fds)

    @classmethod
    def _complete_cli(cls, fields: dict[str, Any], **context: Any) -> None:
        fields.setdefault("iommufd", "iommufd_fd" in fields)

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
        self._validate_smbios()

    def _validate_smbios(self) -> None:
        """The SMBIOS strings can be written: a UUID pych can parse, strings without NUL
        (SMBIOS ends a string there) and OEM strings that are not empty (an empty one would
        end the structure's string set)."""
        if self.system_uuid is not None:
            try:
                uuid.UUID(self.system_uuid)
            except ValueError:
                raise ConfigError(
                    f"platform.system_uuid={self.system_uuid!r} is not a UUID") from None
        texts = {name: getattr(self, name) for name in (
            "system_serial_number", "system_manufacturer", "system_product_name",
            "system_version", "system_family", "system_sku_number", "chassis_asset_tag")}
        for i, text in enumerate(self.oem_strings or ()):
            if not text:
                raise ConfigError(f"platform.oem_strings[{i}] is empty (SMBIOS cannot hold "
                                  "an empty OEM string)")
            texts[f"oem_strings[{i}]"] = text
        for name, text in texts.items():
            if text is not None and "\0" in text:
                raise ConfigError(f"platform.{name} holds a NUL character")
        if len(self.oem_strings or ()) > 255:
            raise ConfigError("platform.oem_strings: SMBIOS holds at most 255 OEM strings")


class NumaDistance(ApiModel):
    destination: U32 = 0
    distance: U8 = 0


class NumaConfig(CliModel):
    """``--numa``: one guest NUMA node."""

    CLI_OPTION: ClassVar[str] = "--numa"

    guest_numa_id: Annotated[
        U32, Cli(parse_integer, required="guest_numa_id is required for all NUMA nodes")
    ]
    cpus: Annotated[list[U32] | None, INTEGER_LIST] = None
    distances: Annotated[
        list[NumaDistance] | None,
        Cli(pairs(parse_integer, parse_integer, ("destination", "distance"))),
    ] = None
    memory_zones: Annotated[list[Str] | None, STRING_LIST] = None
    pci_segments: Annotated[list[U16] | None, INTEGER_LIST] = None
    device_id: Annotated[Str | None, TEXT] = None

    @classmethod
    def _complete_cli(cls, fields: dict[str, Any], **context: Any) -> None:
        if "device_id" in fields and ("cpus" in fields or "memory_zones" in fields):
            raise Rejected("device_id cannot be used with cpus or memory zones")

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
# Sandbox


def _landlock_access(raw: str) -> str:
    access = dequote(raw)
    if len(access) > 2:
        raise Rejected(f"invalid access {access!r}")
    return access


class LandlockConfig(CliModel):
    """``--landlock-rules``: an extra path the VMM may access under Landlock."""

    CLI_OPTION: ClassVar[str] = "--landlock-rules"

    path: Annotated[Str, Cli(required="path/access field missing")]
    access: Annotated[Str, Cli(_landlock_access, required="path/access field missing")]

    def _validate(self) -> None:
        if not os.path.exists(self.path):
            raise ConfigError(f"Path {self.path!r} provided in landlock-rules does not exist")
        if not self.access:
            raise ConfigError("Invalid landlock access: Access cannot be empty")
        for char in self.access:
            if char not in "rw":
                raise ConfigError(f"Invalid landlock access: Invalid access: {char}")
