"""The VMM's internal API: one method per HTTP endpoint.

:class:`RequestHandler` is the single seam between every front end (the HTTP
server in :mod:`pych.api.http`, tests, and later perhaps a CLI or D-Bus) and the
VMM.  Front ends parse and validate requests into the config models of
:mod:`pych.config`, then call exactly one method here; the VMM subclasses
:class:`RequestHandler` and overrides the endpoints it supports.

Return values follow Cloud Hypervisor's HTTP semantics: a method that returns
a JSON-serialisable value (a ``dict`` or a pydantic model) answers ``200 OK``
with that body; a method that returns ``None`` answers ``204 No Content``.

Failures are reported by raising:

* :class:`ApiError` with an explicit HTTP status and error chain
  (e.g. ``ApiError(404, ["VM is not created"])``, or 429 while a vCPU removal
  is still pending);
* ``pych.config.ConfigError`` (400) or ``pych.config.ConfigConflict`` (409) for
  configuration validation failures;
* anything else becomes ``500 Internal Server Error``.

In every case the HTTP body is a JSON array of strings, the error chain
outermost first; ``raise ... from cause`` appends ``str(cause)`` (and its own
causes) to the chain.
"""

from __future__ import annotations

import os
from collections.abc import Iterable, Sequence
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from pych.config import (
        DeviceConfig,
        DiskConfig,
        FsConfig,
        GenericVhostUserConfig,
        NetConfig,
        PmemConfig,
        ReceiveMigrationData,
        RestoreConfig,
        SendMigrationData,
        UserDeviceConfig,
        VdpaConfig,
        VmConfig,
        VmCoredumpData,
        VmRemoveDevice,
        VmResize,
        VmResizeDisk,
        VmResizeZone,
        VmSnapshotConfig,
        VsockConfig,
    )

# What an endpoint may return: a pydantic model or a JSON-serialisable dict
# (200 OK with that body), or None (204 No Content).
Body = Any


class ApiError(Exception):
    """An API failure with the HTTP status to report and its error chain.

    ``messages`` is the chain outermost first, exactly as it appears in the
    JSON array of the response body (Cloud Hypervisor's error format).
    """

    def __init__(self, status: int, messages: str | Sequence[str]) -> None:
        if not 400 <= status <= 599:
            raise ValueError(f"ApiError status must be a 4xx or 5xx code, not {status}")
        if isinstance(messages, str):
            messages = [messages]
        self.status = status
        self.messages: list[str] = list(messages)
        super().__init__("; ".join(self.messages))


class NotImplementedApiError(ApiError):
    """The endpoint exists in the API but pych does not implement it (yet).

    Reported as ``500 Internal Server Error``: Cloud Hypervisor answers every
    action it cannot perform with 500 (its only other "missing feature"
    behaviour, a compiled-out route answering 404, would be indistinguishable
    from its 404 for "VM not created").  The error chain names the endpoint, and
    this subclass lets callers tell "unsupported" from "failed".
    """

    def __init__(self, endpoint: str) -> None:
        self.endpoint = endpoint
        super().__init__(500, [f"{endpoint} is not supported by pych yet"])


def _unsupported(endpoint: str, fds: Iterable[int] = ()) -> NotImplementedApiError:
    # An endpoint that receives file descriptors owns them, even when refusing.
    for fd in fds:
        os.close(fd)
    return NotImplementedApiError(endpoint)


class RequestHandler:
    """The VMM's API surface, one method per endpoint of ``/api/v1``.

    Every method defaults to raising :class:`NotImplementedApiError`; the VMM
    overrides what it supports.  Methods run on the VMM's control thread (the
    HTTP server hands them over through its ``handler_call``), so they may
    touch VMM state without locking.

    File descriptors (``fds``) arrive over the API socket with SCM_RIGHTS.  The
    method called owns them from the moment it is entered: it must keep them
    or close them, on success and on failure alike.
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
        """``PUT /vm.resize-disk``."""
        raise _unsupported("vm.resize-disk")

    # -- Device hot plug ------------------------------------------------------
    # On a running VM these return PciDeviceInfo {id, bdf} (200); on a VM that is
    # created but not booted they only edit the config and return None (204).

    def vm_add_disk(self, config: DiskConfig) -> Body:
        """``PUT /vm.add-disk``."""
        raise _unsupported("vm.add-disk")

    def vm_add_net(self, config: NetConfig, fds: list[int]) -> Body:
        """``PUT /vm.add-net``; ``fds`` are tap queue fds (any ``fds`` in the JSON are ignored)."""
        raise _unsupported("vm.add-net", fds)

    def vm_add_fs(self, config: FsConfig) -> Body:
        """``PUT /vm.add-fs``."""
        raise _unsupported("vm.add-fs")

    def vm_add_pmem(self, config: PmemConfig) -> Body:
        """``PUT /vm.add-pmem``."""
        raise _unsupported("vm.add-pmem")

    def vm_add_vsock(self, config: VsockConfig) -> Body:
        """``PUT /vm.add-vsock``."""
        raise _unsupported("vm.add-vsock")

    def vm_add_device(self, config: DeviceConfig, fds: list[int]) -> Body:
        """``PUT /vm.add-device`` (VFIO); ``fds`` holds at most one VFIO cdev fd."""
        raise _unsupported("vm.add-device", fds)

    def vm_add_vdpa(self, config: VdpaConfig) -> Body:
        """``PUT /vm.add-vdpa``."""
        raise _unsupported("vm.add-vdpa")

    def vm_add_user_device(self, config: UserDeviceConfig) -> Body:
        """``PUT /vm.add-user-device`` (vfio-user)."""
        raise _unsupported("vm.add-user-device")

    def vm_add_generic_vhost_user(self, config: GenericVhostUserConfig) -> Body:
        """``PUT /vm.add-generic-vhost-user``."""
        raise _unsupported("vm.add-generic-vhost-user")

    def vm_remove_device(self, request: VmRemoveDevice) -> None:
        """``PUT /vm.remove-device``: ask the guest to eject; 204 once requested."""
        raise _unsupported("vm.remove-device")

    # -- Snapshot, dump, migration -------------------------------------------

    def vm_snapshot(self, config: VmSnapshotConfig) -> None:
        """``PUT /vm.snapshot``."""
        raise _unsupported("vm.snapshot")

    def vm_restore(self, config: RestoreConfig, fds: list[int]) -> None:
        """``PUT /vm.restore``; ``fds``: memory fds, then net fds, in config order."""
        raise _unsupported("vm.restore", fds)

    def vm_coredump(self, data: VmCoredumpData) -> None:
        """``PUT /vm.coredump``."""
        raise _unsupported("vm.coredump")

    def vm_send_migration(self, data: SendMigrationData) -> None:
        """``PUT /vm.send-migration``."""
        raise _unsupported("vm.send-migration")

    def vm_receive_migration(self, data: ReceiveMigrationData, fds: list[int]) -> None:
        """``PUT /vm.receive-migration``; ``fds``: VFIO fds, then the iommufd fd."""
        raise _unsupported("vm.receive-migration", fds)
