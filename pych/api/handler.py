"""The VMM's side of the API: :class:`RequestHandler`, one method per endpoint pych serves.

This is the one seam between the front ends (the HTTP server, ``pych-remote`` through it,
tests) and the VMM.  The route table (:mod:`pych.api.routes`) validates each request body
into its :mod:`pych.config` model and calls exactly one method here; the VMM implements
them.  Endpoints pych does not implement (snapshot, restore, migration, ...) have no method:
their routes answer ``Unsupported`` without reaching the VMM.

Return values follow Cloud Hypervisor's HTTP semantics: a pydantic model or a
JSON-serialisable ``dict`` answers ``200 OK`` with that body; ``None`` answers the route's
empty status (``204 No Content``, or ``200`` for ``vmm.shutdown``).

Failures are raised: the domain errors of :mod:`pych.errors`, ``ConfigError`` /
``ConfigConflict`` from configuration validation; :mod:`pych.api.errors` maps them to
statuses.  Anything else is a bug and answers ``500``.
"""

from __future__ import annotations

from collections.abc import Iterable
from typing import TYPE_CHECKING, Any, Protocol

from pych.api.errors import not_supported
from pych.errors import Unsupported
from pych.fds import close_fds

if TYPE_CHECKING:
    from pych.config import (
        DeviceConfig,
        DiskConfig,
        FsConfig,
        NetConfig,
        PciDeviceInfo,
        PmemConfig,
        ReceiveMigrationData,
        RestoreConfig,
        SendMigrationData,
        VmConfig,
        VmRemoveDevice,
        VmResize,
        VmResizeDisk,
        VmResizeZone,
        VmSnapshotConfig,
        VsockConfig,
    )

Body = Any
"""What an endpoint that answers with a body returns: a pydantic model or a
JSON-serialisable ``dict``."""


def _unsupported(endpoint: str, fds: Iterable[int] = ()) -> Unsupported:
    close_fds(fds)  # a method that receives fds owns them, even when refusing
    return not_supported(endpoint)


class RequestHandler(Protocol):
    """The VMM's API surface: one method per endpoint of ``/api/v1`` that pych serves.

    Methods run on the VMM's control thread (the HTTP server hands them over through its
    ``handler_call``), so they may touch VMM state without locking.

    File descriptors (``fds``) arrive over the API socket with SCM_RIGHTS.  The method
    called owns them from the moment it is entered: it must keep them or close them, on
    success and on failure alike.

    Any object with these methods is a handler.  A class that subclasses this protocol
    explicitly inherits, for each method it does not define, a default that answers
    ``Unsupported`` (500 "<endpoint> is not supported by pych yet"), closing any fds.
    """

    # -- VMM ------------------------------------------------------------------

    def vmm_ping(self) -> Body:
        """``GET /vmm.ping``: ``VmmPingResponse`` ``{version, build_version, pid, features}``."""
        raise _unsupported("vmm.ping")

    def vmm_shutdown(self) -> None:
        """``PUT /vmm.shutdown``: stop the VM if any, then exit the VMM."""
        raise _unsupported("vmm.shutdown")

    # -- VM lifecycle ---------------------------------------------------------

    def vm_create(self, config: VmConfig) -> None:
        """``PUT /vm.create``: create (but do not boot) the VM."""
        raise _unsupported("vm.create")

    def vm_boot(self) -> None:
        """``PUT /vm.boot``."""
        raise _unsupported("vm.boot")

    def vm_delete(self) -> None:
        """``PUT /vm.delete``: shut the VM down if needed and forget its config."""
        raise _unsupported("vm.delete")

    def vm_shutdown(self) -> None:
        """``PUT /vm.shutdown``."""
        raise _unsupported("vm.shutdown")

    def vm_reboot(self) -> None:
        """``PUT /vm.reboot``: rebuild the VM from its current (persisted) config."""
        raise _unsupported("vm.reboot")

    def vm_pause(self) -> None:
        """``PUT /vm.pause``."""
        raise _unsupported("vm.pause")

    def vm_resume(self) -> None:
        """``PUT /vm.resume``."""
        raise _unsupported("vm.resume")

    def vm_power_button(self) -> None:
        """``PUT /vm.power-button``: raise the ACPI power-button event."""
        raise _unsupported("vm.power-button")

    def vm_nmi(self) -> None:
        """``PUT /vm.nmi``: inject an NMI into every vCPU."""
        raise _unsupported("vm.nmi")

    # -- Inspection -----------------------------------------------------------

    def vm_info(self) -> Body:
        """``GET /vm.info``: ``VmInfo`` ``{config, state, memory_actual_size, device_tree}``."""
        raise _unsupported("vm.info")

    def vm_counters(self) -> Body:
        """``GET /vm.counters``: ``{device_id: {counter: int}}``."""
        raise _unsupported("vm.counters")

    # -- Resizing -------------------------------------------------------------

    def vm_resize(self, resize: VmResize) -> None:
        """``PUT /vm.resize``: vCPUs, then RAM, then balloon."""
        raise _unsupported("vm.resize")

    def vm_resize_zone(self, resize: VmResizeZone) -> None:
        """``PUT /vm.resize-zone``."""
        raise _unsupported("vm.resize-zone")

    def vm_resize_disk(self, resize: VmResizeDisk) -> None:
        """``PUT /vm.resize-disk``: grow a disk of the running VM."""
        raise _unsupported("vm.resize-disk")

    # -- Device hot plug ------------------------------------------------------
    # On a running VM these return PciDeviceInfo {id, bdf} (200); on a VM that is
    # created but not booted they only edit the config and return None (204).

    def vm_add_disk(self, config: DiskConfig) -> PciDeviceInfo | None:
        """``PUT /vm.add-disk``."""
        raise _unsupported("vm.add-disk")

    def vm_add_net(self, config: NetConfig, fds: list[int]) -> PciDeviceInfo | None:
        """``PUT /vm.add-net``; ``fds`` are tap queue fds (any ``fds`` in the JSON are ignored)."""
        raise _unsupported("vm.add-net", fds)

    def vm_add_fs(self, config: FsConfig) -> PciDeviceInfo | None:
        """``PUT /vm.add-fs``."""
        raise _unsupported("vm.add-fs")

    def vm_add_pmem(self, config: PmemConfig) -> PciDeviceInfo | None:
        """``PUT /vm.add-pmem``."""
        raise _unsupported("vm.add-pmem")

    def vm_add_vsock(self, config: VsockConfig) -> PciDeviceInfo | None:
        """``PUT /vm.add-vsock``."""
        raise _unsupported("vm.add-vsock")

    def vm_add_device(self, config: DeviceConfig, fds: list[int]) -> PciDeviceInfo | None:
        """``PUT /vm.add-device`` (VFIO); ``fds`` holds at most one VFIO cdev fd."""
        raise _unsupported("vm.add-device", fds)

    def vm_remove_device(self, request: VmRemoveDevice) -> None:
        """``PUT /vm.remove-device``: ask the guest to eject; 204 once requested."""
        raise _unsupported("vm.remove-device")

    # -- snapshot -------------------------------------------------------------

    def vm_snapshot(self, config: VmSnapshotConfig) -> None:
        """``PUT /vm.snapshot``: save the paused VM to ``destination_url``."""
        raise _unsupported("vm.snapshot")

    def vm_restore(self, config: RestoreConfig, fds: list[int]) -> None:
        """``PUT /vm.restore``: a paused VM from the snapshot at ``source_url``; ``fds``
        are net devices' new tap fds (``net_fds``)."""
        raise _unsupported("vm.restore", fds)

    # -- live migration -------------------------------------------------------

    def vm_send_migration(self, config: SendMigrationData) -> None:
        """``PUT /vm.send-migration``: migrate the running VM to ``destination_url``; 204
        once the destination runs it (this VMM then exits)."""
        raise _unsupported("vm.send-migration")

    def vm_receive_migration(self, config: ReceiveMigrationData, fds: list[int]) -> None:
        """``PUT /vm.receive-migration``: listen at ``receiver_url`` and run the VM a sender
        migrates here; 204 once it runs. ``fds`` (VFIO's) are refused."""
        raise _unsupported("vm.receive-migration", fds)
