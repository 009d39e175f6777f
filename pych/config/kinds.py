"""The device-kind registry: every kind of device pych creates from a VM configuration.

A :class:`DeviceKind` says, for one kind, which configuration model describes it, which
:class:`~pych.config.VmConfig` field holds it, how its default ids are spelled, whether the
guest may be asked to eject it, and which ``vm.add-*`` endpoint hot plugs it.  Boot order,
id generation (with :meth:`~pych.config.VmConfig.identifiers`), hot plug, removal and
``pych-remote`` read this table.  A new kind is its model (with its CLI keys), its
``VmConfig`` field and its checks in ``VmConfig.validate`` (which keeps the reference's
order of checks), an entry here, and the device with its factory in the device manager.

The virtio RTC (``VmConfig.rtc``) is configuration only: pych creates no such device, so it
is not a kind.

The order of :data:`DEVICE_KINDS` is the order in which the reference creates boot
devices (console, disks, nets, rng, fs, pmem, vsock, balloon, VFIO ...), which fixes PCI
slots and default ids.
"""

from __future__ import annotations

from collections.abc import Iterator
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

from pych.config.backends import (
    DeviceConfig,
    GenericVhostUserConfig,
    UserDeviceConfig,
    VdpaConfig,
)
from pych.config.devices import BalloonConfig, ConsoleConfig, PciDeviceConfig, RngConfig
from pych.config.net import NetConfig, VsockConfig
from pych.config.storage import DiskConfig, FsConfig, PmemConfig

if TYPE_CHECKING:
    from pych.config.vm import VmConfig


@dataclass(frozen=True, eq=False)
class DeviceKind:
    """One kind of device (see the module docstring)."""

    name: str
    """Short name, as in messages: ``disk``."""
    model: type[PciDeviceConfig]
    field: str
    """The :class:`VmConfig` field: ``disks``."""
    id_prefix: str
    """Default ids are ``<prefix><N>`` (one counter shared by all kinds, the reference's
    rule); a kind with a single fixed id (``__rng``) has ``fixed_id`` instead."""
    many: bool = True
    """The field is a list (``disks``) rather than a single device (``vsock``)."""
    fixed_id: str | None = None
    add_endpoint: str | None = None
    """The ``vm.add-*`` endpoint that hot plugs this kind, if any."""
    removable: bool = False
    """``vm.remove-device`` may ask the guest to eject it."""

    @property
    def hotpluggable(self) -> bool:
        return self.add_endpoint is not None

    # --- the VmConfig field ------------------------------------------------------------------
    def configs(self, config: VmConfig) -> list[Any]:
        """The devices of this kind in ``config``, in order."""
        value = getattr(config, self.field)
        if self.many:
            return list(value or ())
        return [] if value is None else [value]

    def append(self, config: VmConfig, device: Any) -> None:
        """Add ``device`` to ``config`` (replacing the single device of a single kind)."""
        if self.many:
            setattr(config, self.field, [*(getattr(config, self.field) or ()), device])
        else:
            setattr(config, self.field, device)

    def remove(self, config: VmConfig, dev_id: str) -> Any | None:
        """Take the device ``dev_id`` out of ``config``; returns it, or None."""
        found = next((d for d in self.configs(config) if d.id == dev_id), None)
        if found is not None:
            if self.many:
                kept = [d for d in self.configs(config) if d is not found]
                setattr(config, self.field, kept or None)
            else:
                setattr(config, self.field, None)
        return found


DEVICE_KINDS: tuple[DeviceKind, ...] = (
    DeviceKind("console", ConsoleConfig, "console", "", many=False, fixed_id="__console"),
    DeviceKind("disk", DiskConfig, "disks", "_disk", add_endpoint="vm.add-disk",
               removable=True),
    DeviceKind("net", NetConfig, "net", "_net", add_endpoint="vm.add-net", removable=True),
    DeviceKind("rng", RngConfig, "rng", "", many=False, fixed_id="__rng"),
    DeviceKind("fs", FsConfig, "fs", "_fs", add_endpoint="vm.add-fs", removable=True),
    DeviceKind("pmem", PmemConfig, "pmem", "_pmem", add_endpoint="vm.add-pmem",
               removable=True),
    DeviceKind("vsock", VsockConfig, "vsock", "_vsock", many=False,
               add_endpoint="vm.add-vsock", removable=True),
    DeviceKind("balloon", BalloonConfig, "balloon", "", many=False, fixed_id="__balloon"),
    DeviceKind("vfio", DeviceConfig, "devices", "_vfio", add_endpoint="vm.add-device",
               removable=True),
    DeviceKind("vfio-user", UserDeviceConfig, "user_devices", "_user_device",
               add_endpoint="vm.add-user-device", removable=True),
    DeviceKind("vdpa", VdpaConfig, "vdpa", "_vdpa", add_endpoint="vm.add-vdpa",
               removable=True),
    DeviceKind("generic-vhost-user", GenericVhostUserConfig, "generic_vhost_user",
               "_generic_vhost_user", add_endpoint="vm.add-generic-vhost-user",
               removable=True),
)  # fmt: skip
BY_NAME: dict[str, DeviceKind] = {kind.name: kind for kind in DEVICE_KINDS}


def kind_of(model: type) -> DeviceKind:
    """The kind whose configuration model is ``model``."""
    for kind in DEVICE_KINDS:
        if kind.model is model:
            return kind
    raise KeyError(model.__name__)


def devices(config: VmConfig) -> Iterator[tuple[DeviceKind, Any]]:
    """Every device of ``config`` with its kind, in boot order."""
    for kind in DEVICE_KINDS:
        for device in kind.configs(config):
            yield kind, device


def remove_device(config: VmConfig, dev_id: str) -> tuple[DeviceKind, Any] | None:
    """Take the removable device ``dev_id`` out of ``config``: its kind and configuration,
    or None if no removable device has that id."""
    for kind in DEVICE_KINDS:
        if kind.removable:
            found = kind.remove(config, dev_id)
            if found is not None:
                return kind, found
    return None
