"""The VMM: the control loop that owns the VM, its lifecycle and one method per API endpoint.

``Vmm`` is the :class:`~pych.api.handler.RequestHandler`: the HTTP API is a thin route table
over its endpoint methods, and tests drive them directly. Every method runs on the control
loop (:class:`~pych.vmm.loop.ControlLoop`). Failures are the domain errors of
:mod:`pych.errors`; the API gives them their HTTP statuses.

The lifecycle (create, boot, pause, resume, reboot, shutdown, delete) moves :attr:`Vmm.state`
along :class:`~pych.vmm.state.VmState`. Requests that change the VM (resize, add and remove
devices) and ``vm.info`` go to the controller of the VM's phase (:meth:`Vmm._controller`):
pre-boot they edit the configuration, at runtime they act on the VM and then record it.
"""

from __future__ import annotations

import logging
import os
import sys
import time

from typing import TYPE_CHECKING

import pych
from pych.api.handler import RequestHandler
from pych.config.errors import ConfigError
from pych.devices.legacy.serial_backend import open_serial_backend
from pych.errors import (BackendError, InternalError, InvalidRequest, InvalidState,
                         VmAlreadyCreated, VmNotCreated)
from pych.event_monitor import EventMonitor, NullEventMonitor
from pych.fds import close_fds
from pych.vmm.loop import ControlLoop
from pych.vmm.manager_errors import domain_errors
from pych.vmm.serial_port import SerialPort
from pych.vmm.state import VmState

# What a VM needs is imported with the VM: the configuration's models (pydantic), the
# controllers, the device back-ends, KVM and the managers come with the first vm.create (or
# a command line that configures a VM), so a VMM that only answers its API — vmm.ping on a
# fresh pych — imports none of them (tests/unit/cli/test_process.py). The methods that need
# them import them where they are used.
if TYPE_CHECKING:
    from pych.config import PciDeviceInfo, VmConfig
    from pych.devices.vhost_user import VhostUserConnections
    from pych.hypervisor.kvm import Kvm
    from pych.vm import Vm
    from pych.vmm.controllers import VmController

log = logging.getLogger(__name__)

RUNTIME_REQUEST_MODELS = ("VmResize", "VmResizeZone", "VmResizeDisk", "VmRemoveDevice",
                          "DiskConfig", "NetConfig", "FsConfig", "PmemConfig", "VsockConfig",
                          "DeviceConfig", "PciDeviceInfo")
"""The models of the requests sent to a running VM (resize, hot plug, removal) and of
their answers. pydantic builds a model's validator when it is first used (``defer_build``,
for pych's start-up); :func:`_prepare_runtime_requests` builds these, and imports the
controllers, once a VM runs and the control loop is quiet, so that the first hot plug
request does not pay for them (measured: the first ``vm.resize`` spent ~2 ms building
VmResize's validator, a first ``vm.add-disk`` ~10 ms on DiskConfig's)."""


def _prepare_runtime_requests(_vmm: "Vmm") -> None:
    import pych.config
    import pych.vmm.controllers  # noqa: F401 - each request on a created VM uses it
    for name in RUNTIME_REQUEST_MODELS:
        getattr(pych.config, name).model_rebuild()


def __getattr__(name: str):
    """``Vm`` (pych.vm, and under it KVM, the managers and the devices) is imported when the
    first VM is built, not with the VMM: a VMM waiting for ``vm.create`` answers its API
    without them. Tests may still replace ``pych.vmm.vmm.Vm``."""
    if name == "Vm":
        from pych.vm import Vm
        globals()["Vm"] = Vm
        return Vm
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")


class Vmm(ControlLoop, RequestHandler):
    """The VMM of one VM. ``event_monitor`` receives the lifecycle events;
    ``exit_on_guest_poweroff``: the control loop ends (exit code 0) when the guest powers off.
    """

    def __init__(self, *, event_monitor: EventMonitor | NullEventMonitor | None = None,
                 exit_on_guest_poweroff: bool = True):
        super().__init__()
        self.events = event_monitor or NullEventMonitor()
        self.exit_on_guest_poweroff = exit_on_guest_poweroff
        self.config: VmConfig | None = None
        self.vm: Vm | None = None
        self.state = VmState.NotCreated
        self._kvm: Kvm | None = None
        self._serial: SerialPort | None = None
        self._serial_spec: tuple | None = None
        # vhost-user back-end connections (virtio-fs) handed from one boot to the next; made
        # with the first VM (see vhost_user_connections)
        self._vhost_user: VhostUserConnections | None = None
        self._runtime_requests_prepared = False

    @property
    def vhost_user_connections(self) -> VhostUserConnections:
        if self._vhost_user is None:
            from pych.devices.vhost_user import VhostUserConnections
            self._vhost_user = VhostUserConnections()
        return self._vhost_user

    @property
    def kvm(self) -> Kvm:
        if self._kvm is None:
            from pych.hypervisor.kvm import Kvm   # KVM and the VM's machinery load with the
            self._kvm = Kvm()                      # first VM: not needed to answer the API
        return self._kvm

    def exit(self, code: int) -> None:
        """Stop the VM, if any, and end the control loop with ``code`` (``vmm.shutdown``, a
        signal, a seccomp violation)."""
        self._stop_vm()
        self.request_exit(code)

    # --- guest-initiated events (posted from vCPU threads) ------------------------------------
    def _on_guest_exit(self, vm: Vm, kind: str, detail: str) -> None:
        self.post(lambda vmm: vmm._guest_exit(vm, kind, detail))

    def _guest_exit(self, vm: Vm, kind: str, detail: str) -> None:
        if vm is not self.vm:
            return                         # a stale event from a VM already replaced
        if kind == "reset":
            log.info("guest reset: rebooting")
            self._reboot()
        elif kind == "poweroff":
            log.info("guest powered off")
            self._stop_vm()
            self.events.emit("vm", "shutdown")
            if self.exit_on_guest_poweroff:
                self.request_exit(0)
        else:
            print(f"pych: error: {detail or kind}", file=sys.stderr, flush=True)
            self.exit(1)

    # --- VM lifecycle -------------------------------------------------------------------------
    def _become(self, state: VmState) -> None:
        self.state = self.state.become(state)

    def _serial_port(self, config: VmConfig) -> SerialPort | None:
        mode = config.serial.mode.lower()
        spec = (mode, config.serial.file or config.serial.socket)
        if spec != self._serial_spec and self._serial is not None:
            self._serial.close()
            self._serial = None
        self._serial_spec = spec
        if mode == "off":
            return None
        if self._serial is None:
            path = config.serial.file if mode == "file" else config.serial.socket
            self._serial = SerialPort(open_serial_backend(mode, path))
        return self._serial

    def _new_vm(self, config: VmConfig, serial_port, vhost_user) -> Vm:
        """A VM of ``config`` wired to this VMM: its exits and guest events come here, and
        what its requests set going runs once they are answered."""
        vm_class = globals().get("Vm") or __getattr__("Vm")
        vm_box: list[Vm] = []
        vm = vm_class(config, self.kvm, serial_port=serial_port, vhost_user=vhost_user,
                      on_exit=lambda kind, detail: self._on_guest_exit(vm_box[0], kind, detail),
                      on_guest_event=self._on_guest_event, on_device_failed=self._device_failed,
                      after_answer=lambda fn: self.after_answer(lambda _vmm: fn()))
        vm_box.append(vm)
        return vm

    def _start_vm(self) -> None:
        assert self.config is not None
        vm = self._new_vm(self.config, self._serial_port(self.config),
                          self.vhost_user_connections)
        self.events.emit("vm", "booting")
        vm.boot()
        self.vm = vm
        self._become(VmState.Running)
        self.events.emit("vm", "booted")
        self._prepare_runtime_requests_when_idle()

    def _prepare_runtime_requests_when_idle(self) -> None:
        """A VM runs: once per pych, build what its requests need when the loop is quiet."""
        if not self._runtime_requests_prepared:
            self._runtime_requests_prepared = True
            self.when_idle(_prepare_runtime_requests)

    def _on_guest_event(self, event: str) -> None:
        """pvpanic (a vCPU thread): the guest reported ``event`` ("panic", "crash-loaded");
        a log line and ``{"source": "guest", "event": ...}`` on the event monitor, as the
        reference emits them."""
        log.error("the guest reported a %s through pvpanic", event)
        self.events.emit("guest", event)

    def _stop_vm(self, *, keep_connections: bool = False) -> None:
        """Tear the VM down; ``keep_connections`` (a reboot): vhost-user devices park their
        back-end connections for the next boot (see pych/devices/virtio/fs.py, "Reboot")."""
        if self.vm is not None:
            if keep_connections:
                self.vm.close(keep_connections=True)
            else:
                self.vm.close()
            self.vm = None
        if self.config is not None:
            self._become(VmState.Shutdown)

    def _reboot(self) -> None:
        self.events.emit("vm", "rebooting")
        self._stop_vm(keep_connections=True)
        try:
            self._start_vm()
        except Exception as e:
            print(f"pych: error: reboot failed: {e}", file=sys.stderr, flush=True)
            self.request_exit(1)
            raise
        finally:
            self.vhost_user_connections.close()   # those the new VM did not take back
        self.events.emit("vm", "rebooted")

    def _created_config(self) -> VmConfig:
        """The configuration of the created VM (VmNotCreated without one)."""
        if self.config is None:
            raise VmNotCreated("VM is not created")
        return self.config

    def _running_vm(self, *states: VmState) -> Vm:
        """The running VM, if the VM is in one of ``states`` (default: Running)."""
        self._created_config()
        if self.vm is None or self.state not in (states or (VmState.Running,)):
            # The spec's 405 ("not booted" / wrong state); the reference answers 500, but a
            # request that does not fit the VM's state is the client's error, not ours.
            raise InvalidState(
                f"VM is not in a state for this request (state: {self.state.value})")
        return self.vm

    def _controller(self) -> VmController:
        """The one place a request on a created VM is routed: no running VM, its configuration
        is all there is (pre-boot); a running or paused VM is acted on (runtime).
        VmNotCreated without a VM."""
        from pych.vmm.controllers import PrebootController, RuntimeController
        config = self._created_config()
        if self.vm is None:
            return PrebootController(config)
        return RuntimeController(config, self.vm, on_ejected=self._device_ejected)

    def _device_ejected(self, dev_id: str, address: str) -> None:
        """Called on the vCPU thread that ejected the device (the monitor is thread-safe)."""
        self.events.emit("vm", "device-removed", {"id": dev_id, "bdf": address})

    # --- RequestHandler: the VMM and the VM's lifecycle ---------------------------------------
    def vmm_ping(self) -> dict:
        return {"build_version": pych.__version__, "version": pych.__version__, "pid": os.getpid(),
                "features": ["kvm"]}

    def vmm_shutdown(self) -> None:
        self.exit(0)

    def vm_create(self, config: VmConfig) -> None:
        if self.config is not None:
            raise VmAlreadyCreated("VM is already created")
        for net in config.net or ():
            if net.fds and all(fd == -1 for fd in net.fds):
                # Numbers from JSON (made -1 when parsed): vm.create takes no fds, and the
                # reference drops them, so the net gets a tap of its own.
                net.fds = None
        config.validate()
        _check_payload_files(config)
        _check_host(config)
        self.config = config
        self._become(VmState.Created)

    def vm_boot(self) -> None:
        self._created_config()
        if self.vm is not None:
            raise VmAlreadyCreated("VM is already booted")
        # A device the configuration names that cannot be used is BackendError; any other
        # boot failure is the caller's one clear InternalError.
        with domain_errors("Error booting VM", otherwise=InternalError):
            self._start_vm()

    def vm_shutdown(self) -> None:
        self._running_vm(VmState.Running, VmState.Paused)
        self._stop_vm()
        self.events.emit("vm", "shutdown")

    def vm_delete(self) -> None:
        if self.config is None:
            return None
        from pych.vmm.controllers import close_net_fds
        self._stop_vm()
        close_net_fds(self.config.net)
        self.config = None
        self._become(VmState.NotCreated)
        self.events.emit("vm", "deleted")

    def vm_reboot(self) -> None:
        self._running_vm(VmState.Running, VmState.Paused)
        self._reboot()

    def vm_pause(self) -> None:
        vm = self._running_vm(VmState.Running)
        vm.pause()
        self._become(VmState.Paused)
        self.events.emit("vm", "paused")

    def vm_resume(self) -> None:
        vm = self._running_vm(VmState.Paused)
        vm.resume()
        self._become(VmState.Running)
        self.events.emit("vm", "resumed")

    # --- snapshot and restore (docs/snapshot.md) ------------------------------------------------
    def vm_snapshot(self, config) -> None:
        """Save the paused VM (configuration, vCPU, irqchip, PIT, clock and device state, and
        guest RAM) to the ``file://`` directory ``destination_url``; the VM stays paused."""
        self._created_config()
        if self.vm is None or self.state is not VmState.Paused:
            # The reference's words (its vm.rs); it answers 500, pych the spec's 405.
            raise InvalidState("Error creating VM snapshot",
                               "Trying to snapshot while VM is running"
                               if self.state is VmState.Running else
                               f"VM is not in a state for this request (state: "
                               f"{self.state.value})")
        from pych.snapshot import format as snapshot_format
        with domain_errors("Error creating VM snapshot"):
            destination = snapshot_format.directory_of(config.destination_url)
            state = self.vm.save_state()
            snapshot_format.write(destination, self.config.model_dump(mode="json"), state,
                                  self.vm.memory.saved_regions())
        log.info("VM snapshotted to %s", destination)
        self.events.emit("vm", "snapshotted")

    def vm_restore(self, restore, fds: list[int]) -> None:
        """A VM from the snapshot at ``source_url``, on a pych with no VM: built from the
        snapshot's configuration (every hot plug applied) and state, and left paused
        (``resume: true``: running). ``net_fds`` give net devices that were given tap fds
        their new ones, in order. A refused or failed restore leaves no VM."""
        from pych.config import VmConfig
        from pych.snapshot import format as snapshot_format
        try:
            if self.config is not None:
                raise VmAlreadyCreated("VM is already created")
            _refuse_restore_fields(restore)
            with domain_errors("Error restoring VM", otherwise=InternalError):
                source = snapshot_format.directory_of(restore.source_url)
                manifest = snapshot_format.read_manifest(source)
                snapshot_format.check_files(source, manifest)
                try:
                    config = VmConfig.model_validate(manifest["config"])
                except ValueError as e:
                    raise InvalidRequest("Error restoring VM",
                                         f"the snapshot's configuration is not valid: {e}") from None
                _take_net_fds(config, restore.net_fds, fds)
                config.validate()
                _check_payload_files(config)
                _check_host(config)
                self._restore_vm(config, manifest, source, restore.prefault)
        except BaseException:
            close_fds(fds)
            if self.vm is None and self._serial is not None:
                self._serial.close()            # the failed restore's serial back-end
                self._serial = self._serial_spec = None
            raise
        self.config = config
        self._become(VmState.Paused)
        self.events.emit("vm", "restored")
        if restore.resume:
            self.vm_resume()

    def _restore_vm(self, config: VmConfig, manifest: dict, source, prefault: bool) -> None:
        vm = self._new_vm(config, self._serial_port(config), self.vhost_user_connections)

        def load_memory(guest_memory) -> None:
            from pych.memory.zones import prefault as prefault_region
            from pych.snapshot import format as snapshot_format
            snapshot_format.load_memory(source, manifest, guest_memory)
            if prefault:
                for region in guest_memory.regions:
                    prefault_region(region, "--restore prefault=on")

        vm.restore(manifest["state"], load_memory)
        self.vm = vm
        self._prepare_runtime_requests_when_idle()

    # --- live migration (docs/snapshot.md, "Live migration") ----------------------------------
    def vm_send_migration(self, request) -> None:
        """Migrate the running VM to the pych listening at ``destination_url`` (pre-copy with
        dirty logging; ``local``: guest RAM's memfds passed, not copied). On success the
        VM here ends and pych exits, as the reference's does; on failure the VM runs on,
        unchanged."""
        vm = self._running_vm(VmState.Running)
        config = self._created_config()
        with domain_errors("Error sending migration"):
            endpoint = _check_send_migration(request, config, vm)
        from pych.migration import protocol, sender
        from pych.migration.vm_side import VmSource
        try:
            sock = protocol.connect(endpoint, timeout=CONNECT_TIMEOUT)
        except protocol.MigrationError as e:
            # nobody listens there: the caller's to fix (the reference answers 500)
            raise BackendError("Error sending migration", str(e)) from None
        channel = protocol.Channel(sock, timeout=min(request.timeout_s, 600))
        serial = self._serial
        spec = self._serial_spec
        try:
            source = VmSource(vm, config, serial,
                              (lambda: open_serial_backend(spec[0], spec[1])) if serial else None,
                              local=request.local)
            stats = sender.send(channel, source, local=request.local,
                                downtime_ms=request.downtime_ms, timeout_s=request.timeout_s,
                                verify=os.environ.get(VERIFY_ENV) == "1")
        except sender.OutcomeUnknown as e:
            self._become(VmState.Paused)
            raise InternalError("Error sending migration", str(e)) from None
        except Exception as e:  # noqa: BLE001 - the protocol's, or the VM's (KVM, a device)
            if not isinstance(e, protocol.MigrationError):
                log.exception("migration to %s failed", endpoint)
            log.error("migration to %s failed, the VM runs on here: %s", endpoint, e)
            raise InternalError("Error sending migration", str(e) or type(e).__name__) from None
        finally:
            channel.close()
        figures = stats.as_dict()
        log.info("VM migrated to %s: downtime %.1f ms, total %.1f ms, %d rounds, %d MiB of "
                 "RAM sent%s", endpoint, stats.downtime_ms, stats.total_ms, stats.rounds,
                 stats.memory_bytes >> 20, " (local: memory passed by fd)" if request.local else
                 f" ({stats.unlogged_bytes >> 10} KiB of it found by VERIFY, not by the dirty log)"
                 if stats.verified else "")
        self.events.emit("vm", "migrated", figures)
        self._stop_vm()
        if self._serial is not None:
            self._serial.close()
            self._serial = self._serial_spec = None
        self.request_exit(0)

    def vm_receive_migration(self, request, fds: list[int]) -> None:
        """On a pych without a VM: listen at ``receiver_url``, receive the VM a
        ``vm.send-migration`` sends, and run it. A refused, broken or abandoned migration
        leaves no VM."""
        close_fds(fds)
        if self.config is not None:
            raise VmAlreadyCreated("VM is already created")
        from pych.migration import protocol, receiver
        with domain_errors("Error receiving migration"):
            endpoint = _check_receive_migration(request, fds)
        try:
            listener = protocol.listen(endpoint)
        except protocol.MigrationError as e:
            raise BackendError("Error receiving migration", str(e)) from None
        try:
            listener.settimeout(RECEIVE_ACCEPT_TIMEOUT)
            try:
                conn, _ = listener.accept()
            except OSError as e:
                raise InternalError("Error receiving migration",
                                    f"no sender connected to {endpoint}: {e}") from None
        finally:
            listener.close()
            if endpoint.kind == "unix":
                try:
                    os.unlink(endpoint.path)
                except OSError:
                    pass
        channel = protocol.Channel(conn, timeout=RECEIVE_ACCEPT_TIMEOUT)
        built: dict = {}
        started = time.monotonic()
        try:
            target, stats = receiver.receive(
                channel, lambda body, fds: self._incoming_vm(body, fds, built))
        except Exception as e:  # noqa: BLE001 - the protocol's, or the VM's (KVM, a device)
            if not isinstance(e, protocol.MigrationError):
                log.exception("migration from %s failed", endpoint)
            log.error("migration from %s failed, no VM was kept: %s", endpoint, e)
            port = built.get("console")
            if port is not None:
                port.close()
            raise InternalError("Error receiving migration", str(e) or type(e).__name__) from None
        finally:
            channel.close()
        self.config, self.vm = built["config"], target.vm
        if built.get("console") is not None:
            self._serial, self._serial_spec = built["console"], built["spec"]
        self._become(VmState.Created)
        self._become(VmState.Running)
        self._prepare_runtime_requests_when_idle()
        stats["total_ms"] = round((time.monotonic() - started) * 1000, 1)
        log.info("VM received by migration from %s in %.1f ms (%d MiB of RAM%s)", endpoint,
                 stats["total_ms"], stats["memory_bytes"] >> 20,
                 ", local: memory passed by fd" if stats["local"] else "")
        self.events.emit("vm", "migration-received", stats)

    def _incoming_vm(self, body: dict, fds: list[int], built: dict):
        """The receiver's VM, its RAM mapped (from the sender's memfds with ``fds``)."""
        from pych.config import VmConfig
        from pych.devices.legacy.serial_backend import NullBackend
        from pych.migration.vm_side import VmTarget
        try:
            config = VmConfig.model_validate(body["config"])
            config.validate()
            names = (body.get("shared") or {}).get("fds") or {}
            if sorted(names.values()) != list(range(len(fds))):
                raise ValueError("the memory fds named are not the ones passed")
            mapping = {name: fds[index] for name, index in names.items()}
        except BaseException:
            close_fds(fds)
            raise
        mode = config.serial.mode.lower()
        port = None
        if mode != "off":
            spec = (mode, config.serial.file or config.serial.socket)
            port = SerialPort(NullBackend())
            built.update(console=port, spec=spec)
        if any(n.ip or n.mask or n.host_mac or n.mtu for n in config.net or ()):
            import pyroute2  # noqa: F401 - now, not while the guest is paused (STATE)
        vm = self._new_vm(config, port, self._vhost_user)
        vm.prepare_incoming(body["layout"], mapping)
        built["config"] = config
        return VmTarget(vm, port, (lambda: open_serial_backend(*built["spec"])) if port else None)

    def vm_nmi(self) -> None:
        self._running_vm(VmState.Running).nmi()

    def vm_power_button(self) -> None:
        self._running_vm(VmState.Running).power_button()

    def vm_counters(self) -> dict:
        """Per device, what it counted (virtio-blk: bytes, requests and latencies read and
        written; virtio-net: bytes and frames each way), the reference's keys."""
        vm = self._running_vm(VmState.Running, VmState.Paused)
        return vm.devices.counters() if vm.devices is not None else {}

    def vm_info(self) -> dict:
        """The configuration, the state and what the controller of the VM's phase adds
        (``memory_actual_size``, ``device_tree``; at runtime pych's ``memory_hotplug``,
        ``cpus``, ``devices_pending_removal`` and ``memslots``)."""
        controller = self._controller()
        return {
            "config": controller.config.model_dump(mode="json", exclude_none=True),
            "state": self.state.reported,
            **controller.info(),
        }

    # --- RequestHandler: resizing -------------------------------------------------------------
    def vm_resize(self, resize) -> None:
        """CPU first, then memory, then balloon, as the reference, as one transaction (see
        VmController.resize); the configuration records the result, so a reboot comes back
        with the last requested shape."""
        self._controller().resize(resize)
        self.events.emit("vm", "resized")

    def vm_resize_zone(self, request) -> None:
        """``vm.resize-zone {id, desired_ram}`` (see pych.memory.resize.resize_zone)."""
        self._controller().resize_zone(request.id, request.desired_ram)

    def vm_resize_disk(self, request) -> None:
        """``vm.resize-disk {id, desired_size}``: a disk of the running VM grows (its image
        file, or through the qemu-storage-daemon pych owns for it) and the guest is told
        with a configuration change interrupt (DeviceManager.resize_disk)."""
        vm = self._running_vm(VmState.Running, VmState.Paused)
        with domain_errors("The disk could not be resized"):
            vm.devices.resize_disk(request.id, request.desired_size)

    def _device_failed(self, dev_id: str, why: str) -> None:
        """A device's back-end went away (called on the device's thread, which may not wait
        for anything: the report is made on the control loop)."""
        vm = self.vm
        self.post(lambda vmm: vmm._report_device_failure(vm, dev_id, why))

    def _report_device_failure(self, vm: Vm | None, dev_id: str, why: str) -> None:
        if vm is not None and vm is self.vm and vm.devices is not None:
            why = vm.devices.describe_failure(dev_id) or why
        log.error("%s: %s", dev_id, why)
        self.events.emit("vm", "device-failed", {"id": dev_id, "error": why})

    # --- RequestHandler: PCI device hot plug --------------------------------------------------
    def vm_add_disk(self, config) -> PciDeviceInfo | None:
        return self._add_device(config)

    def vm_add_net(self, config, fds: list[int]) -> PciDeviceInfo | None:
        """``vm.add-net``; tap fds come with the request by SCM_RIGHTS (``pych-remote
        add-net fd=[N]``, Kata Containers) and, as in the reference, replace whatever fd
        numbers the JSON held (none of which mean anything here): one fd per queue pair
        (``num_queues`` / 2; several are queues of one IFF_MULTI_QUEUE tap). Each must be a tap queue opened with ``IFF_TAP | IFF_NO_PI |
        IFF_VNET_HDR`` (checked now, also for a VM not booted: BackendError otherwise).

        The configuration keeps the received fds (``vm.info`` shows their numbers in this
        process, as the reference's does); the device works on a duplicate, so a reboot
        re-creates it on a fresh one. They are closed when the device is removed or the
        VM deleted, and at once if the add fails."""
        from pych.devices.net.tap import TapError, tap_fd_name
        from pych.vmm.controllers import ADD_DEVICE
        config.fds = list(fds) or None
        try:
            self._created_config()
            for fd in fds:
                try:
                    tap_fd_name(fd)
                except TapError as e:
                    raise BackendError(ADD_DEVICE, str(e)) from None
            return self._add_device(config)
        except BaseException:
            config.fds = None
            close_fds(fds)
            raise

    def vm_add_fs(self, config) -> PciDeviceInfo | None:
        return self._add_device(config)

    def vm_add_pmem(self, config) -> PciDeviceInfo | None:
        return self._add_device(config)

    def vm_add_vsock(self, config) -> PciDeviceInfo | None:
        from pych.vmm.controllers import ADD_DEVICE
        if self._created_config().vsock is not None:
            # the reference's 500: a second vsock is not a request it can serve
            raise InternalError(ADD_DEVICE, "Too many vsock devices: a VM has at most one")
        return self._add_device(config)

    def vm_add_device(self, config, fds: list[int]) -> PciDeviceInfo | None:
        """VFIO passthrough of the host PCI device ``config.path`` (docs/vfio.md). A path
        that is not a vfio-pci bound device, or a host without VFIO, is a BackendError with
        one line saying what to fix. A VFIO cdev passed with SCM_RIGHTS (iommufd) is refused."""
        from pych.vmm.controllers import ADD_DEVICE
        if fds:
            close_fds(fds)
            raise InvalidRequest(ADD_DEVICE, "VFIO cdev fds passed with SCM_RIGHTS (iommufd) "
                                             "are not supported by pych; give path=")
        return self._add_device(config)

    def _add_device(self, device) -> PciDeviceInfo | None:
        """Every ``vm.add-*``: the device's kind (the registry entry of its configuration
        model) and the controller of the VM's phase (see VmController.add_device)."""
        from pych.config.kinds import kind_of
        return self._controller().add_device(kind_of(type(device)), device)

    def vm_remove_device(self, request) -> None:
        """Drop the device from the configuration; at runtime also ask the guest to eject it
        (see RuntimeController.remove_device)."""
        self._controller().remove_device(request.id)

    # --- teardown -----------------------------------------------------------------------------
    def close(self) -> None:
        """Tear everything down once no request is being served; requests still arriving
        are refused from here on."""
        self.close_loop()
        self._stop_vm()
        if self.config is not None:
            from pych.vmm.controllers import close_net_fds
            close_net_fds(self.config.net)
        if self._vhost_user is not None:
            self._vhost_user.close()
        if self._serial is not None:
            self._serial.close()
            self._serial = None
        self.events.close()
        if self._kvm is not None:
            self._kvm.close()
            self._kvm = None


def _refuse_restore_fields(restore) -> None:
    """What of ``vm.restore``'s body pych does not do, refused by name (400)."""
    refused = {
        "memory_restore_mode": (restore.memory_restore_mode != "Copy",
                                "pych copies guest memory in (OnDemand, userfaultfd, is not "
                                "implemented)"),
        "vfio_fds": (bool(restore.vfio_fds), "pych cannot snapshot VFIO devices"),
        "iommufd_fd": (restore.iommufd_fd is not None, "pych does not use iommufd"),
        "zone_updates": (bool(restore.zone_updates), "pych does not bind memory zones to host "
                         "NUMA nodes"),
    }
    for name, (given, why) in refused.items():
        if given:
            raise InvalidRequest(f"vm.restore {name} is not supported by pych: {why}")


CONNECT_TIMEOUT = 10.0
# "1": a live migration checks, once the source is paused, that the receiver's RAM is the
# source's block by block (VERIFY, docs/snapshot.md) -- a check of the dirty log, at the
# price of a scan of guest RAM on both sides inside the downtime
VERIFY_ENV = "PYCH_MIGRATION_VERIFY"
"""How long ``vm.send-migration`` tries to reach the receiver."""
RECEIVE_ACCEPT_TIMEOUT = 600.0
"""How long ``vm.receive-migration`` waits for the sender (and then for each message)."""


def _check_send_migration(request, config: VmConfig, vm):
    """What ``vm.send-migration`` refuses at once (InvalidRequest, the VM untouched): the
    fields pych does not do, a bad URL, ``local`` over TCP or without shared memory, and
    every device the snapshot refuses; the parsed destination otherwise."""
    from pych.migration import protocol
    _refuse_fields("vm.send-migration", {
        "tls_dir": request.tls_dir is not None,
        "memory_mode": request.memory_mode != "Precopy",
        "connections": request.connections != 1,
        "preserve_source": request.preserve_source,
        "timeout_strategy": request.timeout_strategy != "Cancel",
    })
    try:
        endpoint = protocol.parse_url(request.destination_url)
    except protocol.MigrationError as e:
        raise InvalidRequest(str(e)) from None
    if request.local:
        if endpoint.kind != "unix":
            raise InvalidRequest(f"local migration needs a unix: URL, not {endpoint}: guest "
                                 "RAM's file descriptors are passed over a Unix socket "
                                 "(SCM_RIGHTS)")
        zones = config.memory.zones or ()
        shared = all(z.shared for z in zones) if zones else config.memory.shared
        if not shared:
            raise InvalidRequest("local migration needs guest RAM shared with the receiver: "
                                 "start the VM with --memory shared=on (as the reference)")
        if any(z.file for z in zones):
            raise InvalidRequest("local migration of memory zones backed by a file= is not "
                                 "supported by pych: give the zones no file")
    for net in config.net or ():
        if net.fds and not request.local:
            raise InvalidRequest(f"device {net.id}: its tap came as fds (fd=), which only a "
                                 "local migration can pass on (local: true); the receiver "
                                 "cannot open it by name for its owner")
    vm.memory.check_saveable()
    # vhost-user devices: a local migration hands virtio-fs connections over; the rest,
    # and any of them to another host, are refused by name and why
    vm.devices.check_saveable(local_migration=request.local)
    return endpoint


def _refuse_fields(endpoint: str, given: dict[str, bool]) -> None:
    """InvalidRequest naming the first field of ``given`` that was given and that
    ``ENDPOINT_REFUSALS`` (pych/config/support.py) refuses for ``endpoint``."""
    from pych.config.support import ENDPOINT_REFUSALS
    reasons = ENDPOINT_REFUSALS[endpoint]
    assert set(given) == set(reasons), endpoint
    for name, is_given in given.items():
        if is_given:
            raise InvalidRequest(f"{endpoint} {name} is not supported by pych: {reasons[name]}")


def _check_receive_migration(request, fds: list[int]):
    from pych.migration import protocol
    _refuse_fields("vm.receive-migration", {
        "tls_dir": request.tls_dir is not None,
        "memory_mode": request.memory_mode != "Precopy",
        "vfio_fds": bool(request.vfio_fds) or bool(fds),
        "iommufd_fd": request.iommufd_fd is not None,
        "zone_updates": bool(request.zone_updates),
    })
    try:
        return protocol.parse_url(request.receiver_url)
    except protocol.MigrationError as e:
        raise InvalidRequest(str(e)) from None


def _take_net_fds(config: VmConfig, net_fds, fds: list[int]) -> None:
    """Give each net device of ``net_fds`` its new tap fds, taken in order from ``fds``
    (SCM_RIGHTS, or ``--restore net_fds=``'s numbers). A net device that was given fds in the
    snapshot needs new ones: the numbers it recorded belong to the process that took the
    snapshot. Every entry must name such a device once, with as many fds as it had, and the
    request must carry exactly the fds its entries count; anything else is refused
    (InvalidRequest naming the device) and the caller closes ``fds``. The reference ignores
    an entry naming no device with fds (a warning) and answers a bare 400 to a wrong total."""
    nets = {net.id: net for net in config.net or ()}
    counts: dict[str, int] = {}
    for restored in net_fds or ():
        net = nets.get(restored.id)
        if restored.id in counts:
            raise InvalidRequest(f"vm.restore net_fds: {restored.id} is named twice")
        if net is None:
            raise InvalidRequest(f"vm.restore net_fds: the snapshot has no net device "
                                 f"{restored.id}")
        if not net.fds:
            raise InvalidRequest(f"vm.restore net_fds: net device {restored.id} was not given "
                                 "tap fds (it opens its "
                                 + ("vhost-user socket" if net.vhost_user else "tap by name")
                                 + "): it takes none")
        count = restored.num_fds or len(restored.fds or ())
        if count != len(net.fds):
            # the reference's words (its RestoreNetFdCountMismatch)
            raise InvalidRequest(f"vm.restore net_fds: Number of Net FDs passed for "
                                 f"'{restored.id}' during Restore: {count}. Expected: "
                                 f"{len(net.fds)}")
        counts[restored.id] = count
    if sum(counts.values()) != len(fds):
        raise InvalidRequest(f"vm.restore net_fds: {len(fds)} fds came with the request, its "
                             f"net_fds count {sum(counts.values())} ("
                             + (", ".join(f"{i}: {n}" for i, n in counts.items()) or "none")
                             + ")")
    for net in nets.values():
        if net.fds and net.id not in counts:
            raise InvalidRequest(f"vm.restore: net device {net.id} was given tap fds; give "
                                 "its new ones with net_fds")
    rest = list(fds)
    for net_id, count in counts.items():
        nets[net_id].fds, rest = rest[:count], rest[count:]


def _check_host(config: VmConfig) -> None:
    """What the configuration asks of the host, checked when the VM is created (a
    ConfigError naming the option, rather than a failed boot): enough free huge pages for
    the RAM with ``hugepages=on``; and ``landlock_enable`` only in a process ``--landlock``
    sandboxed before it started its threads (pych cannot sandbox threads already running,
    such as the API server's)."""
    from pych import landlock
    from pych.memory import hugepages
    from pych.memory.zones import dimm_hugepage_size, hugepage_needs

    hugepages.check_available(hugepage_needs(config.memory))
    dimm_hugepage_size(config.memory)
    if config.landlock_enable and not landlock.active():
        raise ConfigError(
            "landlock_enable=true is not supported by pych: in a vm.create or vm.restore "
            "body it would sandbox only the threads started afterwards (not the API "
            "server's); start pych with --landlock (and --landlock-rules) and the VM's "
            "options on its command line, which sandboxes the whole process")


def _check_payload_files(config: VmConfig) -> None:
    """A kernel, firmware or initramfs that cannot be read is the caller's error (a
    ConfigError), reported when the VM is created rather than as a failed boot."""
    payload = config.payload
    for what in ("kernel", "firmware", "initramfs"):
        path = getattr(payload, what, None) if payload is not None else None
        if path and not os.access(path, os.R_OK):
            raise ConfigError(f"cannot read the {what} {path}: "
                              f"{'no such file' if not os.path.exists(path) else 'permission denied'}")
