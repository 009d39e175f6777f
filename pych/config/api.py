"""The API's other bodies: requests that are not a device or VM configuration (resize,
remove-device, snapshot, restore, migration) and the responses (``vmm.ping``, ``vm.info``,
``vm.counters``, the answer to a hot plug)."""

from __future__ import annotations

from typing import Annotated, Any, ClassVar, Literal, Self

from pydantic import ConfigDict, Field, RootModel, Strict, ValidationError, field_validator

from pych.config.base import (
    I32,
    I64,
    INTEGER,
    TEXT,
    TOGGLE,
    U32,
    U64,
    ApiModel,
    Bool,
    Cli,
    CliModel,
    OptionError,
    PositiveU32,
    PositiveU64,
    Str,
    Usize,
    describe_validation_error,
    json_fds,
    one_of,
    pairs,
)
from pych.config.grammar import (
    dequote,
    parse_byte_size,
    parse_integer,
    parse_integer_list,
    parse_tuple_list,
)
from pych.config.vm import VmConfig

__all__ = [
    "DeviceNode",
    "PciDeviceInfo",
    "ReceiveMigrationData",
    "RestoreConfig",
    "RestoredNetConfig",
    "RestoredVfioConfig",
    "SendMigrationData",
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
]

VmState = Literal["Created", "Running", "Shutdown", "Paused", "BreakPoint"]
MemoryRestoreMode = Literal["Copy", "OnDemand"]
MigrationMode = Literal["Precopy", "Postcopy"]
TimeoutStrategy = Literal["Cancel", "Ignore"]

MAX_MIGRATION_CONNECTIONS = 128

# --------------------------------------------------------------------------
# Requests


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

    _fds_from_json = field_validator("fds")(json_fds)


class RestoredVfioConfig(ApiModel):
    """A new cdev descriptor for a restored VFIO device (it comes with SCM_RIGHTS)."""

    id: Str
    fd: I32 | None = None

    _fd_from_json = field_validator("fd")(json_fds)


def _restored_net_fds(raw: str) -> list[dict[str, Any]]:
    """``[net0@[3,4],...]``: each net device's new tap descriptors."""
    return [
        {"id": net, "num_fds": len(fds), "fds": fds}
        for net, fds in parse_tuple_list(raw, dequote, parse_integer_list)
    ]


_VFIO_FDS = Cli(pairs(dequote, parse_integer, ("id", "fd")))
_ZONE_UPDATES = Cli(pairs(dequote, parse_integer, ("id", "host_numa_node")))
_MIGRATION_MODES = one_of({"precopy": "Precopy", "postcopy": "Postcopy"})


class RestoreConfig(CliModel):
    """``vm.restore`` / ``--restore``: restore a VM from a snapshot."""

    CLI_OPTION: ClassVar[str] = "--restore"

    source_url: Annotated[Str, Cli(required=True)]
    prefault: Annotated[Bool, TOGGLE] = False
    memory_restore_mode: Annotated[
        MemoryRestoreMode, Cli(one_of({"copy": "Copy", "ondemand": "OnDemand"}))
    ] = "Copy"
    net_fds: Annotated[list[RestoredNetConfig] | None, Cli(_restored_net_fds)] = None
    vfio_fds: Annotated[list[RestoredVfioConfig] | None, _VFIO_FDS] = None
    iommufd_fd: Annotated[I32 | None, INTEGER] = None
    resume: Annotated[Bool, TOGGLE] = False
    zone_updates: Annotated[list[VmMemoryZoneUpdateData], _ZONE_UPDATES] = Field(
        default_factory=list
    )

    _iommufd_fd_from_json = field_validator("iommufd_fd")(json_fds)


class ReceiveMigrationData(CliModel):
    """``vm.receive-migration``."""

    CLI_OPTION: ClassVar[str] = "receive-migration"

    receiver_url: Annotated[Str, Cli(required=True)]
    tls_dir: Annotated[Str | None, TEXT] = None
    memory_mode: Annotated[MigrationMode, Cli(_MIGRATION_MODES)] = "Precopy"
    vfio_fds: Annotated[list[RestoredVfioConfig] | None, _VFIO_FDS] = None
    iommufd_fd: Annotated[I32 | None, INTEGER] = None
    zone_updates: Annotated[list[VmMemoryZoneUpdateData], _ZONE_UPDATES] = Field(
        default_factory=list
    )

    _iommufd_fd_from_json = field_validator("iommufd_fd")(json_fds)


class SendMigrationData(CliModel):
    """``vm.send-migration``."""

    CLI_OPTION: ClassVar[str] = "send-migration"

    destination_url: Annotated[Str, Cli(required=True)]
    local: Annotated[Bool, TOGGLE] = False
    preserve_source: Annotated[Bool, TOGGLE] = False
    downtime_ms: Annotated[PositiveU64, INTEGER] = 300
    timeout_s: Annotated[PositiveU64, INTEGER] = 3600
    timeout_strategy: Annotated[
        TimeoutStrategy, Cli(one_of({"cancel": "Cancel", "ignore": "Ignore"}))
    ] = "Cancel"
    connections: Annotated[int, Strict(), Field(ge=1, le=MAX_MIGRATION_CONNECTIONS), INTEGER] = 1
    tls_dir: Annotated[Str | None, TEXT] = None
    memory_mode: Annotated[MigrationMode, Cli(_MIGRATION_MODES)] = "Precopy"


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


class VmCounters(RootModel):
    """Per-device counters: ``{"_disk0": {"read_bytes": 0, ...}, ...}``."""

    # not RootModel[...]: a parametrized generic is built at import; this one at first use
    model_config = ConfigDict(defer_build=True)
    root: dict[str, dict[str, int]]
