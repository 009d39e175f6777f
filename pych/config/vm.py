"""The whole VM: :class:`VmConfig`, the body of ``vm.create`` and ``vm.info``'s ``config``,
with the checks that span its parts and the identifiers its devices use.

:meth:`VmConfig.validate` performs the reference's ``VmConfig::validate()`` plus the memory
checks its memory manager makes from the config alone, and raises
:class:`~pych.config.base.ConfigError` (HTTP 400) or
:class:`~pych.config.base.ConfigConflict` (HTTP 409).  Default device ids are *not*
assigned here; the device manager does that (with :meth:`VmConfig.identifiers` as the ids
already taken).
"""

from __future__ import annotations

from typing import TYPE_CHECKING

from pydantic import Field

from pych.config import kinds
from pych.config.backends import (
    DeviceConfig,
    GenericVhostUserConfig,
    TpmConfig,
    UserDeviceConfig,
    VdpaConfig,
)
from pych.config.base import (
    ApiModel,
    Bool,
    ConfigError,
    DuplicateDevicePath,
    IdentifierNotUnique,
)
from pych.config.devices import (
    DEFAULT_DEBUG_CONSOLE_PORT,
    DEFAULT_RNG_SOURCE,
    BalloonConfig,
    ConsoleConfig,
    DebugConsoleConfig,
    RateLimitGroupConfig,
    RngConfig,
    RtcConfig,
    SerialConfig,
)
from pych.config.machine import (
    CpusConfig,
    LandlockConfig,
    NumaConfig,
    PayloadConfig,
    PciSegmentConfig,
    PlatformConfig,
)
from pych.config.memory import DEFAULT_MEMORY_SIZE, MemoryConfig
from pych.config.net import NetConfig, VsockConfig
from pych.config.storage import DiskConfig, FsConfig, PmemConfig

if TYPE_CHECKING:
    from pych.config.devices import PciDeviceConfig

__all__ = ["VmConfig"]


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
        """Whether all guest RAM is shared or huge pages, as the reference requires of
        vhost-user devices (disks, nets, generic vhost-user) and vfio-user devices."""
        if self.memory.shared or self.memory.hugepages:
            return True
        if self.memory.size == 0 and self.memory.zones:
            return all(zone.shared or zone.hugepages for zone in self.memory.zones)
        return False

    def ram_shareable(self) -> bool:
        """Whether a vhost-user back-end (virtiofsd) can map all of pych's guest RAM. pych
        backs RAM with memfds mapped shared, which always are, so unlike the reference
        (whose default RAM is private) ``--fs`` needs no ``shared=on``; only a memory zone
        backed by a ``file`` without ``shared=on`` is mapped private, and RAM with
        ``mergeable=on`` (zones without a ``file``, ``--memory``'s own RAM and DIMMs) is
        private anonymous memory, the only kind KSM merges."""
        if self.memory.mergeable and not self.memory.hugepages:
            return False
        return all((zone.shared or zone.file is None)
                   and not (zone.mergeable and zone.file is None and not zone.hugepages)
                   for zone in self.memory.zones or ())

    def identifiers(self) -> frozenset[str]:
        """Every id the configuration uses: its devices', rate-limit groups' and memory
        zones'.  Nothing is checked or changed; on a valid configuration this is what
        :meth:`validate` returns."""
        ids = [device.id for _, device in kinds.devices(self)]
        if self.rtc is not None:
            ids.append(self.rtc.id)
        ids += (group.id for group in self.rate_limit_groups or ())
        ids += (zone.id for zone in self.memory.zones or ())
        return frozenset(identifier for identifier in ids if identifier is not None)

    def validate(self, *, check_support: bool = True) -> frozenset[str]:
        """Check the configuration as the reference's ``VmConfig::validate``, after checking
        that pych implements every field it uses.

        First, every field must either work in pych or hold an accepted (default) value:
        :func:`pych.config.support.check` raises
        :class:`~pych.config.support.UnsupportedField` (a :class:`ConfigError`) naming the
        first that does not.  ``check_support=False`` leaves that out and checks only the
        reference's rules (for tests of those rules on features pych lacks).

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
        if check_support:
            from pych.config import support

            support.check(self)
        ids: set[str] = set()
        iommu = self.iommu

        def claim(identifier: str | None) -> None:
            if identifier is None:
                return
            if identifier.startswith("__"):
                raise ConfigError(f"Identifier {identifier} is not valid")
            if identifier in ids:
                raise IdentifierNotUnique(identifier)
            ids.add(identifier)

        def check(device: PciDeviceConfig) -> None:
            nonlocal iommu
            device._validate(self)
            iommu |= device.iommu
            claim(device.id)

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

        for group in self.rate_limit_groups or ():
            group._validate()
            claim(group.id)
        for device in (*(self.disks or ()), *(self.net or ())):
            check(device)
        if self.fs and not self.ram_shareable():
            raise ConfigError("Using vhost-user requires using shared memory or huge pages")
        for device in self.fs or ():
            check(device)
        if self.generic_vhost_user and not self.backed_by_shared_memory():
            raise ConfigError("Using vhost-user requires using shared memory or huge pages")
        for device in (*(self.generic_vhost_user or ()), *(self.pmem or ())):
            check(device)
        check(self.rng)
        if self.rtc is not None:
            check(self.rtc)
        check(self.console)

        self.memory._validate()

        if self.user_devices and not self.backed_by_shared_memory():
            raise ConfigError("Using user devices requires using shared memory or huge pages")
        for device in (*(self.user_devices or ()), *(self.vdpa or ())):
            check(device)
        if self.vsock is not None and self.vsock.cid in (0, 1, 2, 2**32 - 1):
            raise ConfigError(f"{self.vsock.cid} is a special VSOCK CID")
        if self.balloon is not None:
            check(self.balloon)
            ram = self.memory.total_size()
            if self.balloon.size >= ram:
                raise ConfigError(f"Balloon size ({self.balloon.size}) greater than RAM ({ram})")
        device_paths: set[str] = set()
        for vfio in self.devices or ():
            if vfio.path is not None:
                if vfio.path in device_paths:
                    raise DuplicateDevicePath(vfio.path)
                device_paths.add(vfio.path)
            check(vfio)
        if self.vsock is not None:
            check(self.vsock)

        self._validate_numa()
        for zone in self.memory.zones or ():
            claim(zone.id)
        for segment in self.pci_segments or ():
            segment._validate(self)
        if self.platform is not None:
            self.platform._validate()
            iommu |= self.platform.iommu_segments is not None
        if self.landlock_rules and not self.landlock_enable:
            raise ConfigError(
                "landlock_rules (--landlock-rules) need landlock_enable (--landlock): "
                "without it they sandbox nothing")
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
