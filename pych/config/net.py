"""Network devices: virtio-net on a tap or a vhost-user backend (``--net``) and virtio-vsock
proxied to a UNIX socket (``--vsock``)."""

from __future__ import annotations

import ipaddress
import re
from typing import TYPE_CHECKING, Annotated, ClassVar, Literal

from pydantic import field_validator

from pych.config.base import (
    I32,
    INTEGER,
    TEXT,
    TOGGLE,
    U16,
    Bool,
    Cli,
    CliGroup,
    ConfigError,
    Str,
    Usize,
    VsockCid,
    json_fds,
    one_of,
)
from pych.config.devices import (
    RATE_LIMITER_KEYS,
    PciDeviceConfig,
    RateLimiterConfig,
    check_no_iommu,
    check_queue_size,
)
from pych.config.grammar import parse_integer, parse_integer_list

if TYPE_CHECKING:
    from pych.config.vm import VmConfig

__all__ = ["NetConfig", "VsockConfig"]

VhostMode = Literal["Client", "Server"]

VIRTIO_NET_MIN_MTU = 1280

_MAC_ADDRESS = re.compile(r"[0-9A-Fa-f]{2}(?::[0-9A-Fa-f]{2}){5}")


class NetConfig(PciDeviceConfig):
    """``--net`` / ``vm.add-net``: a virtio-net device on a tap (or vhost-user)."""

    CLI_OPTION: ClassVar[str] = "--net"
    CLI_GROUPS: ClassVar[tuple[CliGroup, ...]] = (RATE_LIMITER_KEYS,)

    tap: Annotated[Str | None, TEXT] = None
    ip: Annotated[Str | None, TEXT] = None
    mask: Annotated[Str | None, TEXT] = None
    mac: Annotated[Str | None, TEXT] = None
    host_mac: Annotated[Str | None, TEXT] = None
    mtu: Annotated[U16 | None, INTEGER] = None
    num_queues: Annotated[Usize, INTEGER] = 2
    queue_size: Annotated[U16, INTEGER] = 256
    vhost_user: Annotated[Bool, TOGGLE] = False
    vhost_socket: Annotated[Str | None, Cli(key="socket")] = None
    vhost_mode: Annotated[VhostMode, Cli(one_of({"client": "Client", "server": "Server"}))] = (
        "Client"
    )
    # Tap file descriptors: from the CLI's fd=[...] or SCM_RIGHTS, never JSON.
    fds: Annotated[list[I32] | None, Cli(parse_integer_list, key="fd")] = None
    # From the bw_*/ops_* keys (RATE_LIMITER_KEYS).
    rate_limiter_config: RateLimiterConfig | None = None
    offload_tso: Annotated[Bool, TOGGLE] = True
    offload_ufo: Annotated[Bool, TOGGLE] = True
    offload_csum: Annotated[Bool, TOGGLE] = True

    _fds_from_json = field_validator("fds")(json_fds)

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

    def _validate(self, config: VmConfig) -> None:
        if self.vhost_user and not config.ram_shareable():
            # pych's RAM is always a memfd mapped shared, so unlike the reference no
            # shared=on is needed; only a zone on a file mapped private cannot be shared.
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
        check_queue_size(self.queue_size)
        if self.vhost_user:
            check_no_iommu(self)
            if self.num_queues % 2:
                # 2 × queue pairs; the reference would hand the back-end an odd ring count.
                raise ConfigError(f"num_queues={self.num_queues} with vhost_user: a "
                                  "vhost-user net has 2 queues per queue pair (an even "
                                  "num_queues)")
            if self.fds is not None or self.tap is not None:
                raise ConfigError("A vhost-user net has no tap: give socket=, not tap= or fd=")
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


class VsockConfig(PciDeviceConfig):
    """``--vsock`` / ``vm.add-vsock``: a virtio-vsock device proxied to a UNIX socket."""

    CLI_OPTION: ClassVar[str] = "--vsock"

    cid: Annotated[VsockCid, Cli(parse_integer, required=True)]
    socket: Annotated[Str, Cli(required=True)]
