"""Every endpoint of ``/api/v1``, in one table: :data:`ROUTES`.

A :class:`Route` says how an endpoint is called (method, body model, whether it takes
SCM_RIGHTS fds), which :class:`~pych.api.handler.RequestHandler` method serves it, what it
answers, and which ``pych-remote`` subcommand drives it.  Everything that lists endpoints
reads this table: the HTTP server (:mod:`pych.api.dispatch`), ``pych-remote``
(:mod:`pych.cli.remote`), the OpenAPI document (:mod:`pych.api.openapi`,
``docs/openapi.json``) and the contract test.

To follow a request: find its endpoint below; ``handler`` names the ``RequestHandler``
method it calls (the VMM's method of the same name does the work) and ``body`` the
:mod:`pych.config` model its JSON body is validated into first.  Models are named
(``models.DiskConfig``) and imported when a request first needs one, so a ``pych`` that has
only answered ``vmm.ping`` has not imported pydantic.  An endpoint pych does not
implement has ``handler=None`` and answers 500 "<endpoint> is not supported by pych yet".
"""

from __future__ import annotations

from collections.abc import Callable, Mapping
from http import HTTPStatus
from typing import TYPE_CHECKING, Any, Literal, NamedTuple, TypeVar

import pych.config

if TYPE_CHECKING:
    from pydantic import BaseModel

    from pych.api.handler import Body, RequestHandler

API_ROOT = "/api/v1"

M = TypeVar("M", bound="BaseModel")


class ModelName:
    """A :mod:`pych.config` model the table names, imported the first time it is used: a
    ``pych`` serving ``vmm.ping`` has imported no model, nor pydantic."""

    __slots__ = ("name",)

    def __init__(self, name: str) -> None:
        if name not in pych.config.__all__:
            raise AttributeError(f"pych.config has no model {name!r}")
        self.name = name

    def resolve(self) -> type[BaseModel]:
        return getattr(pych.config, self.name)

    def __repr__(self) -> str:
        return f"models.{self.name}"


class _Models:
    def __getattr__(self, name: str) -> ModelName:
        return ModelName(name)


if TYPE_CHECKING:
    import pych.config as models
else:
    models = _Models()
    """``models.DiskConfig`` in the table: to a reader and a type checker, the model
    :mod:`pych.config` exports under that name (so the handler lambdas are typed with it); at
    run time, its :class:`ModelName`, resolved by :attr:`Route.body` / :attr:`Route.response`
    when a request first needs it."""


class RemoteCommand(NamedTuple):
    """The ``pych-remote`` subcommand of an endpoint (ch-remote's name for it)."""

    name: str
    help: str
    """One line saying what the endpoint does: the subcommand's help, the OpenAPI summary."""
    syntax: str | None = None
    """A config command (``add-disk path=...``): its one argument is parsed with the body
    model's ``parse``, and this is what ch-remote's "Error parsing <syntax> syntax" calls it."""
    url: bool = False
    """A URL command (``snapshot <destination_url>``): the body is ``{destination_url}``."""


class Route(NamedTuple):
    """One endpoint (see the module docstring); build it with the typed helpers below.

    (A NamedTuple, as :class:`RemoteCommand` and the server's other records: ``dataclasses``
    imports ``inspect``, ~10 ms of pych's start-up.)"""

    method: Literal["GET", "PUT"]
    endpoint: str
    """``vm.add-disk``; the path is ``/api/v1/vm.add-disk``."""
    body_model: ModelName | None
    """The model the (required) JSON body must validate as (:attr:`body`); None: the endpoint
    takes none."""
    handler: Callable[..., Any] | None
    """Calls the :class:`RequestHandler` method: ``(handler)``, ``(handler, body)`` or
    ``(handler, body, fds)``; None: pych does not implement the endpoint."""
    remote: RemoteCommand
    fds: bool = False
    """The handler also receives the request's SCM_RIGHTS fds (else they are closed)."""
    response_model: ModelName | None = None
    """The model of a ``200`` body (:attr:`response`)."""
    empty_status: HTTPStatus = HTTPStatus.NO_CONTENT
    """The status when the handler returns None."""
    always_body: bool = False
    """The endpoint always answers with ``response`` (the OpenAPI document lists no empty
    answer for it)."""

    @property
    def path(self) -> str:
        return f"{API_ROOT}/{self.endpoint}"

    @property
    def implemented(self) -> bool:
        return self.handler is not None

    @property
    def takes_body(self) -> bool:
        return self.body_model is not None

    @property
    def body(self) -> type[BaseModel] | None:
        """The body's model class (imported now if it was not yet); None: no body."""
        return None if self.body_model is None else self.body_model.resolve()

    @property
    def response(self) -> type[BaseModel] | None:
        """The ``200`` body's model class (imported now if it was not yet), or None."""
        return None if self.response_model is None else self.response_model.resolve()

    def call(self, handler: RequestHandler, body: BaseModel | None, fds: list[int]) -> Body:
        """Run the endpoint's handler method with the validated body (and fds, if taken)."""
        if self.handler is None:
            raise TypeError(f"{self.endpoint} has no handler")
        if self.body_model is None:
            return self.handler(handler)
        if self.fds:
            return self.handler(handler, body, fds)
        return self.handler(handler, body)


# Typed constructors: the checker sees each handler lambda with its argument types, so a
# lambda calling a method the RequestHandler protocol lacks, or passing the wrong model, is
# a type error.  Models are given as ``models.Name`` (see ``models`` above).


def _name(model: Any) -> ModelName | None:
    """What the helpers are given for a model: its :class:`ModelName` (None stays None)."""
    if model is None or isinstance(model, ModelName):
        return model
    raise TypeError(f"name the model as models.{getattr(model, '__name__', model)}, "
                    "so that it is imported only when a request needs it")


def _get(endpoint: str, handler: Callable[[RequestHandler], Body], response: type[BaseModel],
         remote: RemoteCommand) -> Route:
    return Route("GET", endpoint, None, handler, remote, response_model=_name(response),
                 always_body=True)


def _action(endpoint: str, handler: Callable[[RequestHandler], None], remote: RemoteCommand,
            empty_status: HTTPStatus = HTTPStatus.NO_CONTENT) -> Route:
    return Route("PUT", endpoint, None, handler, remote, empty_status=empty_status)


def _put(endpoint: str, body: type[M], handler: Callable[[RequestHandler, M], Body] | None,
         remote: RemoteCommand, response: type[BaseModel] | None = None) -> Route:
    return Route("PUT", endpoint, _name(body), handler, remote, response_model=_name(response))


def _put_fds(endpoint: str, body: type[M],
             handler: Callable[[RequestHandler, M, list[int]], Body] | None,
             remote: RemoteCommand, response: type[BaseModel] | None = None) -> Route:
    return Route("PUT", endpoint, _name(body), handler, remote, fds=True,
                 response_model=_name(response))


ROUTES: tuple[Route, ...] = (
    # -- the VMM
    _get("vmm.ping", lambda h: h.vmm_ping(), models.VmmPingResponse,
         RemoteCommand("ping", "Ping the VMM to check for API server availability")),
    _action("vmm.shutdown", lambda h: h.vmm_shutdown(),
            RemoteCommand("shutdown-vmm", "Shutdown the VMM"),
            empty_status=HTTPStatus.OK),  # the reference's 200 with an empty body
    # -- VM life cycle
    _put("vm.create", models.VmConfig, lambda h, config: h.vm_create(config),
         RemoteCommand("create", "Create VM from a JSON configuration")),
    _action("vm.boot", lambda h: h.vm_boot(),
            RemoteCommand("boot", "Boot a created VM")),
    _action("vm.delete", lambda h: h.vm_delete(),
            RemoteCommand("delete", "Delete a VM")),
    _action("vm.shutdown", lambda h: h.vm_shutdown(),
            RemoteCommand("shutdown", "Shutdown the VM")),
    _action("vm.reboot", lambda h: h.vm_reboot(),
            RemoteCommand("reboot", "Reboot the VM")),
    _action("vm.pause", lambda h: h.vm_pause(),
            RemoteCommand("pause", "Pause the VM")),
    _action("vm.resume", lambda h: h.vm_resume(),
            RemoteCommand("resume", "Resume the VM")),
    _action("vm.power-button", lambda h: h.vm_power_button(),
            RemoteCommand("power-button", "Trigger a power button in the VM")),
    _action("vm.nmi", lambda h: h.vm_nmi(),
            RemoteCommand("nmi", "Trigger NMI")),
    # -- inspection
    _get("vm.info", lambda h: h.vm_info(), models.VmInfo,
         RemoteCommand("info", "Info on the VM")),
    _get("vm.counters", lambda h: h.vm_counters(), models.VmCounters,
         RemoteCommand("counters", "Counters from the VM")),
    # -- resizing
    _put("vm.resize", models.VmResize, lambda h, resize: h.vm_resize(resize),
         RemoteCommand("resize", "Resize the VM")),
    _put("vm.resize-zone", models.VmResizeZone, lambda h, resize: h.vm_resize_zone(resize),
         RemoteCommand("resize-zone", "Resize a memory zone")),
    _put("vm.resize-disk", models.VmResizeDisk, lambda h, resize: h.vm_resize_disk(resize),
         RemoteCommand("resize-disk", "Resize an attached disk")),
    # -- devices: 200 PciDeviceInfo when hot plugged, 204 when only added to the configuration
    _put("vm.add-disk", models.DiskConfig, lambda h, disk: h.vm_add_disk(disk),
         RemoteCommand("add-disk", "Add block device", syntax="disk"),
         response=models.PciDeviceInfo),
    _put_fds("vm.add-net", models.NetConfig, lambda h, net, fds: h.vm_add_net(net, fds),
             RemoteCommand("add-net", "Add network device", syntax="network"),
             response=models.PciDeviceInfo),
    _put("vm.add-fs", models.FsConfig, lambda h, fs: h.vm_add_fs(fs),
         RemoteCommand("add-fs", "Add virtio-fs backed fs device", syntax="filesystem"),
         response=models.PciDeviceInfo),
    _put("vm.add-pmem", models.PmemConfig, lambda h, pmem: h.vm_add_pmem(pmem),
         RemoteCommand("add-pmem", "Add persistent memory device", syntax="persistent memory"),
         response=models.PciDeviceInfo),
    _put("vm.add-vsock", models.VsockConfig, lambda h, vsock: h.vm_add_vsock(vsock),
         RemoteCommand("add-vsock", "Add vsock device", syntax="vsock"),
         response=models.PciDeviceInfo),
    _put_fds("vm.add-device", models.DeviceConfig,
             lambda h, device, fds: h.vm_add_device(device, fds),
             RemoteCommand("add-device", "Add VFIO device", syntax="device"),
             response=models.PciDeviceInfo),
    _put("vm.add-vdpa", models.VdpaConfig, None,
         RemoteCommand("add-vdpa", "Add vDPA device", syntax="vDPA device"),
         response=models.PciDeviceInfo),
    _put("vm.add-user-device", models.UserDeviceConfig, None,
         RemoteCommand("add-user-device", "Add userspace device", syntax="user device"),
         response=models.PciDeviceInfo),
    _put("vm.add-generic-vhost-user", models.GenericVhostUserConfig, None,
         RemoteCommand("add-generic-vhost-user", "Add generic vhost-user device",
                       syntax="generic vhost-user"),
         response=models.PciDeviceInfo),
    _put("vm.remove-device", models.VmRemoveDevice,
         lambda h, request: h.vm_remove_device(request),
         RemoteCommand("remove-device", "Remove VFIO and PCI device")),
    # -- snapshot, dump, migration
    _put("vm.snapshot", models.VmSnapshotConfig, lambda h, config: h.vm_snapshot(config),
         RemoteCommand("snapshot", "Create a snapshot from VM", url=True)),
    _put_fds("vm.restore", models.RestoreConfig,
             lambda h, config, fds: h.vm_restore(config, fds),
             # fds: net devices' new tap fds
             RemoteCommand("restore", "Restore VM from a snapshot", syntax="restore")),
    _put("vm.coredump", models.VmCoredumpData, None,
         RemoteCommand("coredump", "Create a coredump from VM", url=True)),
    _put("vm.send-migration", models.SendMigrationData,
         lambda h, config: h.vm_send_migration(config),
         RemoteCommand("send-migration", "Initiate a VM migration", syntax="send migration")),
    # fds: VFIO, then iommufd (refused)
    _put_fds("vm.receive-migration", models.ReceiveMigrationData,
             lambda h, config, fds: h.vm_receive_migration(config, fds),
             RemoteCommand("receive-migration", "Receive a VM migration",
                           syntax="receive migration")),
)

BY_PATH: Mapping[str, Route] = {route.path: route for route in ROUTES}
