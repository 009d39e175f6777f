"""Guest RAM: ``--memory`` and its ``--memory-zone``\\ s, with the checks the reference's
memory manager makes from the configuration alone (alignment, hot-plug sizes vs the
hot-plug method, zones vs ``size=0``)."""

from __future__ import annotations

import os
from collections.abc import Sequence
from typing import Annotated, Any, ClassVar, Literal, Self

from pych.config.base import (
    BYTE_SIZE,
    INTEGER,
    TEXT,
    TOGGLE,
    U32,
    U64,
    Bool,
    Cli,
    CliModel,
    ConfigError,
    Str,
    one_of,
)
from pych.config.grammar import parse_byte_size

__all__ = ["DEFAULT_MEMORY_SIZE", "MIB", "HotplugMethod", "MemoryConfig", "MemoryZoneConfig"]

HotplugMethod = Literal["Acpi", "VirtioMem"]

MIB = 1 << 20
DEFAULT_MEMORY_SIZE = 512 * MIB


class MemoryZoneConfig(CliModel):
    """``--memory-zone``: a user-defined guest RAM region (needs ``--memory size=0``)."""

    CLI_OPTION: ClassVar[str] = "--memory-zone"

    id: Annotated[Str, Cli(required=True)]
    size: Annotated[U64, Cli(parse_byte_size, default=DEFAULT_MEMORY_SIZE)]
    file: Annotated[Str | None, TEXT] = None
    shared: Annotated[Bool, TOGGLE] = False
    hugepages: Annotated[Bool, TOGGLE] = False
    hugepage_size: Annotated[U64 | None, BYTE_SIZE] = None
    host_numa_node: Annotated[U32 | None, INTEGER] = None
    hotplug_size: Annotated[U64 | None, BYTE_SIZE] = None
    hotplugged_size: Annotated[U64 | None, BYTE_SIZE] = None
    prefault: Annotated[Bool, TOGGLE] = False
    reserve: Annotated[Bool, TOGGLE] = False
    mergeable: Annotated[Bool, TOGGLE] = False

    @classmethod
    def parse(cls, text: str, *, default_mergeable: bool = False) -> Self:
        """``default_mergeable`` is ``--memory``'s ``mergeable``, which zones inherit."""
        return super().parse(text, default_mergeable=default_mergeable)

    @classmethod
    def _complete_cli(cls, fields: dict[str, Any], *, default_mergeable: bool = False) -> None:
        fields.setdefault("mergeable", default_mergeable)


class MemoryConfig(CliModel):
    """``--memory``: guest RAM and its hot-plug window."""

    CLI_OPTION: ClassVar[str] = "--memory"
    CLI_DEFAULT: ClassVar[str] = f"size={DEFAULT_MEMORY_SIZE // MIB}M"
    CLI_IGNORED_KEYS: ClassVar[tuple[str, ...]] = ("file",)

    size: Annotated[U64, Cli(parse_byte_size, default=DEFAULT_MEMORY_SIZE)]
    mergeable: Annotated[Bool, TOGGLE] = False
    hotplug_method: Annotated[
        HotplugMethod, Cli(one_of({"acpi": "Acpi", "virtio-mem": "VirtioMem"}))
    ] = "Acpi"
    hotplug_size: Annotated[U64 | None, BYTE_SIZE] = None
    hotplugged_size: Annotated[U64 | None, BYTE_SIZE] = None
    shared: Annotated[Bool, TOGGLE] = False
    hugepages: Annotated[Bool, TOGGLE] = False
    hugepage_size: Annotated[U64 | None, BYTE_SIZE] = None
    prefault: Annotated[Bool, TOGGLE] = False
    reserve: Annotated[Bool, TOGGLE] = False
    # From the --memory-zone options (the ``zones`` argument of parse).
    zones: list[MemoryZoneConfig] | None = None
    thp: Annotated[Bool, TOGGLE] = True

    @classmethod
    def parse(cls, text: str, zones: Sequence[str] = ()) -> Self:
        """``zones`` are the ``--memory-zone`` values, if any."""
        return super().parse(text, zones=zones)

    @classmethod
    def _complete_cli(cls, fields: dict[str, Any], *, zones: Sequence[str] = ()) -> None:
        mergeable = fields.get("mergeable", False)
        if zones:
            fields["zones"] = [
                MemoryZoneConfig.parse(zone, default_mergeable=mergeable) for zone in zones
            ]

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
        virtio_mem = self.hotplug_method == "VirtioMem"
        _check_backing("memory", self.hugepages, self.mergeable, None,
                       bool(self.hotplug_size) and virtio_mem and not self.zones)
        for zone in self.zones or ():
            if zone.shared and zone.mergeable:
                raise ConfigError("Invalid to set both 'mergeable' and 'shared' for memory")
            if zone.hugepage_size is not None:
                _check_hugepage_size(zone.hugepages, zone.hugepage_size)
            _check_backing(f"memory zone {zone.id!r}", zone.hugepages, zone.mergeable,
                           zone.file, bool(zone.hotplug_size))

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
            if hugepages and hugepage_size is None:
                from pych.memory.hugepages import default_size

                hugepage_size = default_size()
            alignment = hugepage_size if hugepages and hugepage_size else page_size
            if size % alignment:
                raise ConfigError(
                    f"Memory size is misaligned with default page size or its hugepage size: "
                    f"{what} size {size} is not a multiple of {alignment}"
                )


def _check_backing(what: str, hugepages: bool, mergeable: bool, file: str | None,
                   virtio_mem: bool) -> None:
    """The backings pych refuses together, naming them: huge pages or KSM with a virtio-mem
    region (pych discards unplugged blocks of a shared memfd), huge pages with a ``file``
    (a file on a hugetlbfs mount is mapped as it is: give it without hugepages=on), KSM
    with huge pages (KSM does not merge them)."""
    def refuse(subject: str, reason: str) -> None:
        raise ConfigError(f"{what}: {subject} is not supported by pych: {reason}")

    if hugepages and mergeable:
        refuse("mergeable=on with hugepages=on",
               "KSM merges only ordinary anonymous pages, never huge pages")
    if hugepages and file is not None:
        refuse("hugepages=on with a file",
               "pych backs hugepages=on with a hugetlbfs memfd of its own; a file on a "
               "hugetlbfs mount is used as it is without hugepages=on")
    if virtio_mem and hugepages:
        refuse("hugepages=on with virtio-mem hot plug (hotplug_size)",
               "pych's virtio-mem regions are ordinary memfds; use hotplug_method=acpi "
               "(DIMMs of huge pages) or no hugepages")
    if virtio_mem and mergeable:
        refuse("mergeable=on with virtio-mem hot plug (hotplug_size)",
               "pych's virtio-mem regions are shared memfds, which KSM does not merge; use "
               "hotplug_method=acpi (mergeable DIMMs)")


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
