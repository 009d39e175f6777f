"""Devices whose work is done outside pych: VFIO host devices (``--device``), vfio-user
servers (``--user-device``), vDPA devices (``--vdpa``), generic vhost-user back ends
(``--generic-vhost-user``) and the swtpm TPM (``--tpm``)."""

from __future__ import annotations

from typing import TYPE_CHECKING, Annotated, ClassVar

from pydantic import Field, field_validator

from pych.config.base import (
    I32,
    INTEGER,
    INTEGER_LIST,
    TEXT,
    U8,
    U16,
    U32,
    U64,
    Bool,
    Cli,
    CliModel,
    ConfigError,
    Rejected,
    Str,
    Usize,
    json_fds,
)
from pych.config.devices import PciDeviceConfig, check_no_iommu, check_queue_size
from pych.config.grammar import dequote, parse_integer_list

if TYPE_CHECKING:
    from pych.config.vm import VmConfig

__all__ = [
    "DeviceConfig",
    "GenericVhostUserConfig",
    "TpmConfig",
    "UserDeviceConfig",
    "VdpaConfig",
]


class DeviceConfig(PciDeviceConfig):
    """``--device`` / ``vm.add-device``: a VFIO passthrough device."""

    CLI_OPTION: ClassVar[str] = "--device"

    path: Annotated[Str | None, TEXT] = None
    # A VFIO cdev descriptor: from the CLI's fd=N or SCM_RIGHTS, never JSON.
    fd: Annotated[I32 | None, INTEGER] = None
    x_nv_gpudirect_clique: Annotated[U8 | None, INTEGER] = None
    x_exclude_mmap_bars: Annotated[list[U64], INTEGER_LIST] = Field(default_factory=list)

    _fd_from_json = field_validator("fd")(json_fds)

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
    """``--user-device`` / ``vm.add-user-device``: a vfio-user device (also the body the
    spec calls ``VmAddUserDevice``)."""

    CLI_OPTION: ClassVar[str] = "--user-device"

    # No CLI key: a vfio-user device cannot sit behind the IOMMU.
    iommu: Bool = False
    socket: Annotated[Str, Cli(required=True)]

    def _validate(self, config: VmConfig) -> None:
        check_no_iommu(self)
        self._validate_pci(config)


class VdpaConfig(PciDeviceConfig):
    """``--vdpa`` / ``vm.add-vdpa``: a vDPA device."""

    CLI_OPTION: ClassVar[str] = "--vdpa"

    path: Annotated[Str, Cli(required=True)]
    num_queues: Annotated[Usize, INTEGER] = 1


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


def _virtio_device_type(raw: str) -> int:
    """A virtio device type by name (``fs``) or number (``26``)."""
    name = dequote(raw)
    if name in _VIRTIO_DEVICE_TYPES:
        device_type = _VIRTIO_DEVICE_TYPES[name]
    elif name.isdecimal() and not name.startswith("0"):
        device_type = int(name)
    else:
        raise Rejected(f"device_type {name!r} invalid (leading zeros or unknown string)")
    if device_type in _NO_VHOST_USER_DEVICE_TYPES:
        raise Rejected(f"device with device_type {name!r} cannot be implemented via vhost-user")
    return device_type


class GenericVhostUserConfig(PciDeviceConfig):
    """``--generic-vhost-user``: any virtio device implemented by a vhost-user backend."""

    CLI_OPTION: ClassVar[str] = "--generic-vhost-user"

    # No CLI key: a vhost-user device cannot sit behind the IOMMU.
    iommu: Bool = False
    socket: Annotated[Str, Cli(required=True)]
    queue_sizes: Annotated[list[U16], Cli(parse_integer_list, required="queue size missing")]
    device_type: Annotated[U32, Cli(_virtio_device_type, required=True, deprecated="virtio_id")]

    def _validate(self, config: VmConfig) -> None:
        check_no_iommu(self)
        for queue_size in self.queue_sizes:
            check_queue_size(queue_size)
        self._validate_pci(config)


class TpmConfig(CliModel):
    """``--tpm``: a TPM 2.0 emulated by swtpm."""

    CLI_OPTION: ClassVar[str] = "--tpm"

    socket: Annotated[Str, Cli(required=True)]
