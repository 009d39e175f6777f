"""VM configuration: the API's JSON schemas as pydantic models, and their command line form.

Split by resource, as Cloud Hypervisor's ``vm_config.rs`` and Firecracker's ``vmm_config/``:

========================  ===============================================================
:mod:`~.base`             the JSON (serde) rules, scalar types, errors, validation-error
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
DiskConfig``.
"""

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
    ConfigConflict,
    ConfigError,
    DuplicateDevicePath,
    IdentifierNotUnique,
    OptionError,
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

__all__ = [
    "BalloonConfig",
    "ConfigConflict",
    "ConfigError",
    "ConsoleConfig",
    "CpuAffinity",
    "CpuFeatures",
    "CpuTopology",
    "CpusConfig",
    "DebugConsoleConfig",
    "DeviceConfig",
    "DeviceNode",
    "DiskConfig",
    "DuplicateDevicePath",
    "FsConfig",
    "GenericVhostUserConfig",
    "IdentifierNotUnique",
    "LandlockConfig",
    "MemoryConfig",
    "MemoryZoneConfig",
    "NetConfig",
    "NumaConfig",
    "NumaDistance",
    "OptionError",
    "PayloadConfig",
    "PciDeviceConfig",
    "PciDeviceInfo",
    "PciSegmentConfig",
    "PlatformConfig",
    "PmemConfig",
    "RateLimitGroupConfig",
    "RateLimiterConfig",
    "ReceiveMigrationData",
    "RestoreConfig",
    "RestoredNetConfig",
    "RestoredVfioConfig",
    "RngConfig",
    "RtcConfig",
    "SendMigrationData",
    "SerialConfig",
    "TokenBucket",
    "TpmConfig",
    "UserDeviceConfig",
    "VdpaConfig",
    "VirtQueueAffinity",
    "VmConfig",
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
    "VsockConfig",
    "describe_validation_error",
    "validation_messages",
]
