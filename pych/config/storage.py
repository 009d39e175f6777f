"""Storage devices: virtio-blk disks (``--disk``), virtio-pmem (``--pmem``) and virtio-fs
shares served by virtiofsd (``--fs``)."""

from __future__ import annotations

from typing import TYPE_CHECKING, Annotated, Any, ClassVar, Literal

from pych.config.base import (
    BYTE_SIZE,
    INTEGER,
    TEXT,
    TOGGLE,
    U16,
    U64,
    ApiModel,
    Bool,
    Cli,
    CliGroup,
    ConfigError,
    Rejected,
    Str,
    Usize,
    one_of,
    pairs,
)
from pych.config.devices import (
    RATE_LIMITER_KEYS,
    PciDeviceConfig,
    RateLimiterConfig,
    check_no_iommu,
    check_queue_count,
    check_queue_size,
)
from pych.config.grammar import dequote, parse_integer, parse_integer_list, parse_toggle

if TYPE_CHECKING:
    from pych.config.vm import VmConfig

__all__ = ["DiskConfig", "FsConfig", "PmemConfig", "VirtQueueAffinity"]

ImageType = Literal["FlatVmdk", "FixedVhd", "Qcow2", "Raw", "Vhdx", "Unknown"]
LockGranularity = Literal["ByteRange", "Full"]

MINIMUM_BLOCK_QUEUE_SIZE = 2
VIRTIO_BLK_ID_BYTES = 20
VIRTIO_FS_TAG_LEN = 36

_IMAGE_TYPES = {
    "raw": "Raw",
    "qcow2": "Qcow2",
    "vhd": "FixedVhd",
    "vhdx": "Vhdx",
    "vmdk": "FlatVmdk",
}
_LOCK_GRANULARITIES = {"byte-range": "ByteRange", "full": "Full"}


class VirtQueueAffinity(ApiModel):
    queue_index: U16
    host_cpus: list[Usize]


class DiskConfig(PciDeviceConfig):
    """``--disk`` / ``vm.add-disk``: a virtio-blk device."""

    CLI_OPTION: ClassVar[str] = "--disk"
    CLI_GROUPS: ClassVar[tuple[CliGroup, ...]] = (RATE_LIMITER_KEYS,)

    path: Annotated[Str | None, TEXT] = None
    readonly: Annotated[Bool, TOGGLE] = False
    direct: Annotated[Bool, TOGGLE] = False
    num_queues: Annotated[Usize, INTEGER] = 1
    queue_size: Annotated[U16, INTEGER] = 128
    vhost_user: Annotated[Bool, TOGGLE] = False
    vhost_socket: Annotated[Str | None, Cli(key="socket")] = None
    rate_limit_group: Annotated[Str | None, TEXT] = None
    # From the bw_*/ops_* keys (RATE_LIMITER_KEYS).
    rate_limiter_config: RateLimiterConfig | None = None
    # Test knobs of the reference (their CLI keys start with "_"); not in the spec but
    # serialized by the reference.
    disable_io_uring: Annotated[Bool, Cli(parse_toggle, key="_disable_io_uring")] = False
    disable_aio: Annotated[Bool, Cli(parse_toggle, key="_disable_aio")] = False
    serial: Annotated[Str | None, TEXT] = None
    queue_affinity: Annotated[
        list[VirtQueueAffinity] | None,
        Cli(pairs(parse_integer, parse_integer_list, ("queue_index", "host_cpus"))),
    ] = None
    backing_files: Annotated[Bool, TOGGLE] = False
    sparse: Annotated[Bool, TOGGLE] = True
    # The CLI ignores it for a vhost-user disk (see _complete_cli).
    image_type: Annotated[ImageType, Cli(one_of(_IMAGE_TYPES))] = "Unknown"
    lock_granularity: Annotated[
        LockGranularity, Cli(one_of(_LOCK_GRANULARITIES, ignore_case=False))
    ] = "ByteRange"

    @classmethod
    def _complete_cli(cls, fields: dict[str, Any], **context: Any) -> None:
        # The image type of a vhost-user disk is the backend's business.
        if "vhost_socket" in fields:
            fields.pop("image_type", None)

    def _validate(self, config: VmConfig) -> None:
        if self.vhost_socket is not None and self.path is not None:
            raise ConfigError("Disk path and vhost socket both provided")
        if self.vhost_user and not config.ram_shareable():
            # pych's RAM is always a memfd mapped shared, so unlike the reference no
            # shared=on is needed; only a zone on a file mapped private cannot be shared.
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
        check_queue_count(self.num_queues, config)
        check_queue_size(self.queue_size)
        if self.queue_size <= MINIMUM_BLOCK_QUEUE_SIZE:
            raise ConfigError(
                f"Block queue size must be greater than {MINIMUM_BLOCK_QUEUE_SIZE}: "
                f"{self.queue_size}"
            )
        if self.vhost_user:
            check_no_iommu(self)
        if self.rate_limiter_config is not None and self.rate_limit_group is not None:
            raise ConfigError("Invalid rate-limiter group")
        if self.serial is not None and len(self.serial.encode()) > VIRTIO_BLK_ID_BYTES:
            raise ConfigError(
                f"Block device serial length ({len(self.serial.encode())}) exceeds maximum "
                f"allowed length ({VIRTIO_BLK_ID_BYTES})"
            )
        if self.path is None and not self.vhost_user:
            # The reference finds out when it builds the device (NoDiskPath); the request
            # can be refused now.
            raise ConfigError("No disk path was specified when one was expected: give path=")


class PmemConfig(PciDeviceConfig):
    """``--pmem`` / ``vm.add-pmem``: a virtio-pmem device backed by a file."""

    CLI_OPTION: ClassVar[str] = "--pmem"

    file: Annotated[Str, Cli(required=True)]
    size: Annotated[U64 | None, BYTE_SIZE] = None
    discard_writes: Annotated[Bool, TOGGLE] = False


def _fs_tag(raw: str) -> str:
    tag = dequote(raw)
    if len(tag.encode()) > VIRTIO_FS_TAG_LEN:
        raise Rejected(f"max tag length is {VIRTIO_FS_TAG_LEN}")
    return tag


class FsConfig(PciDeviceConfig):
    """``--fs`` / ``vm.add-fs``: a virtio-fs device served by virtiofsd."""

    CLI_OPTION: ClassVar[str] = "--fs"

    # No CLI key: a vhost-user device cannot sit behind the IOMMU.
    iommu: Bool = False
    tag: Annotated[Str, Cli(_fs_tag, required=True)]
    socket: Annotated[Str, Cli(required=True)]
    num_queues: Annotated[Usize, INTEGER] = 1
    queue_size: Annotated[U16, INTEGER] = 1024

    def _validate(self, config: VmConfig) -> None:
        check_queue_count(self.num_queues, config)
        check_queue_size(self.queue_size)
        check_no_iommu(self)
        self._validate_pci(config)
