"""What PCI devices share (their common fields and placement checks, queue checks, rate
limiting) and the small devices: rng, rtc, balloon, the virtio console, the serial port and
the debug console.  Disks, pmem and fs are in :mod:`pych.config.storage`, net and vsock in
:mod:`pych.config.net`, devices served outside pych in :mod:`pych.config.backends`."""

from __future__ import annotations

import re
from typing import TYPE_CHECKING, Annotated, Any, ClassVar, Literal

from pydantic import ConfigDict, Field

from pych.config.base import (
    INTEGER,
    TEXT,
    TOGGLE,
    U8,
    U16,
    U64,
    ApiModel,
    Bool,
    Cli,
    CliGroup,
    CliModel,
    ConfigError,
    Rejected,
    Str,
)
from pych.config.grammar import ParsedOptions, dequote, parse_byte_size

if TYPE_CHECKING:
    from pych.config.vm import VmConfig

__all__ = [
    "BalloonConfig",
    "ConsoleConfig",
    "DebugConsoleConfig",
    "PciDeviceConfig",
    "RateLimitGroupConfig",
    "RateLimiterConfig",
    "RngConfig",
    "RtcConfig",
    "SerialConfig",
    "TokenBucket",
]

ConsoleMode = Literal["Off", "Pty", "Tty", "File", "Socket", "Null"]

DEFAULT_RNG_SOURCE = "/dev/urandom"
DEFAULT_DEBUG_CONSOLE_PORT = 0xE9
NUM_PCI_DEVICE_IDS = 32
VIRTIO_MAX_QUEUE_SIZE = 32768

# --------------------------------------------------------------------------
# PCI devices


class PciDeviceConfig(CliModel):
    """The fields every PCI device config has (the reference's flattened
    ``PciDeviceCommonConfig``), and the checks of where it is placed."""

    _serde_omit_false: ClassVar[frozenset[str]] = frozenset({"iommu"})

    id: Annotated[Str | None, TEXT] = None
    # A device that cannot sit behind the IOMMU redeclares this field without the CLI key.
    iommu: Annotated[Bool, TOGGLE] = False
    pci_segment: Annotated[U16, INTEGER] = 0
    pci_device_id: Annotated[U8 | None, INTEGER] = None

    def _validate(self, config: VmConfig) -> None:
        """The checks ``config.validate()`` makes of this device; a kind with more to check
        overrides this and calls :meth:`_validate_pci` itself."""
        self._validate_pci(config)

    def _validate_pci(self, config: VmConfig) -> None:
        platform = config.platform
        num_segments = platform.num_pci_segments if platform else 1
        if self.pci_segment >= num_segments:
            raise ConfigError(f"Invalid PCI segment id: {self.pci_segment} (the VM has "
                              f"{num_segments} PCI segment{'s' if num_segments > 1 else ''}, "
                              f"0..{num_segments - 1}: platform num_pci_segments)")
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


def check_queue_size(queue_size: int) -> None:
    if queue_size == 0 or queue_size & (queue_size - 1):
        raise ConfigError(
            f"Queue size must be a power of 2 no greater than {VIRTIO_MAX_QUEUE_SIZE}: {queue_size}"
        )


def check_queue_count(queues: int, config: VmConfig) -> None:
    if queues > config.cpus.boot_vcpus:
        raise ConfigError(
            f"Queue count ({queues}) must not exceed boot vCPUs ({config.cpus.boot_vcpus})"
        )


def check_no_iommu(device: PciDeviceConfig) -> None:
    if device.iommu:
        raise ConfigError("Device does not support being placed behind IOMMU")


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


_BUCKETS = {"bw": "bandwidth", "ops": "ops"}


def _rate_limiter(opts: ParsedOptions) -> dict[str, Any]:
    """The ``bw_*``/``ops_*`` keys as ``rate_limiter_config``, nothing if they set no limit.

    As in the reference, a bucket needs both a size and a refill time; otherwise it is
    silently left out (and its ``one_time_burst`` is not even read).
    """

    def bucket(prefix: str) -> dict[str, int] | None:
        size = opts.integer(f"{prefix}_size") or 0
        refill_time = opts.integer(f"{prefix}_refill_time") or 0
        if not (size and refill_time):
            return None
        burst = opts.integer(f"{prefix}_one_time_burst") or 0
        return {"size": size, "one_time_burst": burst, "refill_time": refill_time}

    buckets = {name: bucket(prefix) for prefix, name in _BUCKETS.items()}
    if not any(buckets.values()):
        return {}
    return {"rate_limiter_config": buckets}


RATE_LIMITER_KEYS = CliGroup(
    tuple(
        f"{prefix}_{part}"
        for prefix in _BUCKETS
        for part in ("size", "one_time_burst", "refill_time")
    ),
    _rate_limiter,
)
"""``bw_size``, ``bw_one_time_burst``, ``bw_refill_time`` and the same for ``ops_``: a
model's ``rate_limiter_config``."""


class RateLimitGroupConfig(CliModel):
    """``--rate-limit-group``: a rate limiter shared by several disks."""

    CLI_OPTION: ClassVar[str] = "--rate-limit-group"
    CLI_GROUPS: ClassVar[tuple[CliGroup, ...]] = (RATE_LIMITER_KEYS,)

    id: Annotated[Str, TEXT] = ""
    rate_limiter_config: RateLimiterConfig = Field(default_factory=RateLimiterConfig)

    def _validate(self) -> None:
        limiter = self.rate_limiter_config
        if (limiter.bandwidth is None and limiter.ops is None) or not self.id:
            raise ConfigError("Invalid rate-limiter group")


# --------------------------------------------------------------------------
# Small devices


class RngConfig(PciDeviceConfig):
    """``--rng``: the virtio entropy device (always present)."""

    CLI_OPTION: ClassVar[str] = "--rng"
    CLI_DEFAULT: ClassVar[str] = f"src={DEFAULT_RNG_SOURCE}"

    src: Annotated[Str, Cli(default=DEFAULT_RNG_SOURCE)]


class RtcConfig(PciDeviceConfig):
    """``--rtc``: the virtio RTC device."""

    CLI_OPTION: ClassVar[str] = "--rtc"


class BalloonConfig(PciDeviceConfig):
    """``--balloon``: the virtio balloon."""

    CLI_OPTION: ClassVar[str] = "--balloon"

    size: Annotated[U64, Cli(parse_byte_size, default=0)]
    deflate_on_oom: Annotated[Bool, TOGGLE] = False
    free_page_reporting: Annotated[Bool, TOGGLE] = False


# --------------------------------------------------------------------------
# Consoles

_CONSOLE_FLAGS = {"off": "Off", "pty": "Pty", "tty": "Tty", "null": "Null"}


def console_modes(*, socket: bool = True) -> CliGroup:
    """``off|pty|tty|null|file=PATH|socket=PATH`` as ``{mode, file, socket}``.

    The first mode in that order wins, as in the reference.
    """

    def read(opts: ParsedOptions) -> dict[str, Any]:
        for flag, mode in _CONSOLE_FLAGS.items():
            if flag in opts:
                return {"mode": mode}
        if "file" in opts:
            if (file := opts.get("file")) is None:
                raise Rejected("Path missing when using file console mode")
            return {"mode": "File", "file": file}
        if socket and "socket" in opts:
            if (path := opts.get("socket")) is None:
                raise Rejected("Path missing when using socket console mode")
            return {"mode": "Socket", "socket": path}
        modes = "off, null, pty, tty, file=<path>" + (", socket=<path>" if socket else "")
        raise Rejected(f"invalid console mode given (expected one of {modes})")

    return CliGroup(("file", "socket") if socket else ("file",), read, tuple(_CONSOLE_FLAGS))


class ConsoleConfig(PciDeviceConfig):
    """``--console``: the virtio-console device (``off`` for none)."""

    CLI_OPTION: ClassVar[str] = "--console"
    CLI_DEFAULT: ClassVar[str] = "tty"
    CLI_GROUPS: ClassVar[tuple[CliGroup, ...]] = (console_modes(),)

    file: Str | None = None
    mode: ConsoleMode
    socket: Str | None = None


class SerialConfig(CliModel):
    """``--serial``: the legacy 16550 UART on COM1."""

    CLI_OPTION: ClassVar[str] = "--serial"
    CLI_DEFAULT: ClassVar[str] = "null"
    CLI_GROUPS: ClassVar[tuple[CliGroup, ...]] = (console_modes(),)

    file: Str | None = None
    mode: ConsoleMode
    socket: Str | None = None


def _io_port(raw: str) -> int:
    text = dequote(raw)
    if not text.startswith("0x") or not re.fullmatch(r"[0-9A-Fa-f]+", text[2:]):
        raise Rejected(
            f"The IO port was not properly provided in hex or a `0x` prefix is missing: {text}"
        )
    return int(text[2:], 16)


class DebugConsoleConfig(CliModel):
    """``--debug-console``: the 0xe9 debug port."""

    CLI_OPTION: ClassVar[str] = "--debug-console"
    CLI_DEFAULT: ClassVar[str] = f"off,iobase={DEFAULT_DEBUG_CONSOLE_PORT:#x}"
    CLI_GROUPS: ClassVar[tuple[CliGroup, ...]] = (console_modes(socket=False),)

    file: Str | None = None
    mode: ConsoleMode
    iobase: Annotated[U16 | None, Cli(_io_port)] = None
