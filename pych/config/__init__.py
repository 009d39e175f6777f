"""VM configuration: the API's JSON schemas as pydantic models, and their command line form.

Split by resource, as Cloud Hypervisor's ``vm_config.rs`` and Firecracker's ``vmm_config/``:

========================  ===============================================================
:mod:`~.errors`           the configuration errors (no pydantic)
:mod:`~.base`             the JSON (serde) rules, scalar types, validation-error
                          formatting, and how a model declares its CLI keys
:mod:`~.grammar`          the ``key=value,...`` option grammar and its typed values
:mod:`~.machine`          vCPUs, payload, platform, PCI segments, NUMA, Landlock
:mod:`~.memory`           guest RAM and memory zones
:mod:`~.devices`          what PCI devices share, rate limiting, rng/rtc/balloon, consoles
:mod:`~.storage`          disks, pmem, virtio-fs
:mod:`~.net`              virtio-net, vsock
:mod:`~.backends`         VFIO, vfio-user, vDPA, generic vhost-user, TPM
:mod:`~.vm`               :class:`VmConfig`: the whole VM, its validation and identifiers
:mod:`~.api`              the other request bodies and the responses
:mod:`~.kinds`            the device-kind registry
========================  ===============================================================

Every public model, error and helper is importable from here: ``from pych.config import
DiskConfig``.  The names are resolved when first used (PEP 562), each importing only its own
module: the errors (:mod:`~.errors`) and the command line's tables (:mod:`~.rules`) come
without pydantic, so a ``pych`` that only serves its API never imports it; the first model
used imports pydantic and its module's models.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

from pych import lazy

if TYPE_CHECKING:
    from pych.config.api import (
        DeviceNode,
        PciDeviceInfo,
        ReceiveMigrationData,
        RestoreConfig,
        RestoredNetConfig,
        RestoredVfioConfig,
        SendMigrationData,
        VmCoredumpData,
        VmCounters,
        VmInfo,
        VmMemoryZoneUpdateData,
        VmmPingResponse,
        VmRemoveDevice,
        VmResize,
        VmResizeDisk,
        VmResizeZone,
        VmSnapshotConfig,
    )
    from pych.config.backends import (
        DeviceConfig,
        GenericVhostUserConfig,
        TpmConfig,
        UserDeviceConfig,
        VdpaConfig,
    )
    from pych.config.base import (
        describe_validation_error,
        validation_messages,
    )
    from pych.config.devices import (
        BalloonConfig,
        ConsoleConfig,
        DebugConsoleConfig,
        PciDeviceConfig,
        RateLimiterConfig,
        RateLimitGroupConfig,
        RngConfig,
        RtcConfig,
        SerialConfig,
        TokenBucket,
    )
    from pych.config.errors import (
        ConfigConflict,
        ConfigError,
        DuplicateDevicePath,
        IdentifierNotUnique,
        OptionError,
    )
    from pych.config.machine import (
        CpuAffinity,
        CpuFeatures,
        CpusConfig,
        CpuTopology,
        LandlockConfig,
        NumaConfig,
        NumaDistance,
        PayloadConfig,
        PciSegmentConfig,
        PlatformConfig,
    )
    from pych.config.memory import MemoryConfig, MemoryZoneConfig
    from pych.config.net import NetConfig, VsockConfig
    from pych.config.storage import DiskConfig, FsConfig, PmemConfig, VirtQueueAffinity
    from pych.config.vm import VmConfig

_EXPORTS: dict[str, tuple[str, ...]] = {
    "api": ("DeviceNode", "PciDeviceInfo", "ReceiveMigrationData", "RestoreConfig",
            "RestoredNetConfig", "RestoredVfioConfig", "SendMigrationData", "VmCoredumpData",
            "VmCounters", "VmInfo", "VmMemoryZoneUpdateData", "VmmPingResponse",
            "VmRemoveDevice", "VmResize", "VmResizeDisk", "VmResizeZone", "VmSnapshotConfig"),
    "backends": ("DeviceConfig", "GenericVhostUserConfig", "TpmConfig", "UserDeviceConfig",
                 "VdpaConfig"),
    "base": ("describe_validation_error", "validation_messages"),
    "devices": ("BalloonConfig", "ConsoleConfig", "DebugConsoleConfig", "PciDeviceConfig",
                "RateLimiterConfig", "RateLimitGroupConfig", "RngConfig", "RtcConfig",
                "SerialConfig", "TokenBucket"),
    "errors": ("ConfigConflict", "ConfigError", "DuplicateDevicePath", "IdentifierNotUnique",
               "OptionError"),
    "machine": ("CpuAffinity", "CpuFeatures", "CpusConfig", "CpuTopology", "LandlockConfig",
                "NumaConfig", "NumaDistance", "PayloadConfig", "PciSegmentConfig",
                "PlatformConfig"),
    "memory": ("MemoryConfig", "MemoryZoneConfig"),
    "net": ("NetConfig", "VsockConfig"),
    "storage": ("DiskConfig", "FsConfig", "PmemConfig", "VirtQueueAffinity"),
    "vm": ("VmConfig",),
}
"""Each public name, by the module of this package that defines it."""

_MODULE_OF: dict[str, str] = {name: module for module, names in _EXPORTS.items()
                              for name in names}

__all__ = sorted(_MODULE_OF)


__getattr__, __dir__ = lazy.exports(__name__, _MODULE_OF)
