"""The VMM: one control loop that owns the VM and serialises every request onto it.

Requests arrive from the HTTP server thread (or from Python callers) as callables run
on the control loop through :meth:`Vmm.call`; guest-initiated events (poweroff, reset,
fatal errors) arrive from vCPU threads through :meth:`Vmm.post`. Both wake the loop
with an eventfd, so nothing ever races the VM's own state.

``Vmm`` is the :class:`~pych.api.handler.RequestHandler`: a method per endpoint. The
HTTP API is a thin route table over it, and tests drive it directly.
"""

from __future__ import annotations

import logging
import os
import queue
import select
import signal
import sys
import threading
from concurrent.futures import Future
from typing import Any, Callable, TypeVar

import pych
from pych import seccomp
from pych.api.handler import ApiError, RequestHandler
from pych.config import (ApiSocket, ConfigError, EventMonitor as EventMonitorOption,
                          NetConfig, PciDeviceInfo, VmConfig)
from pych.device_manager import (DeviceBackendError, DeviceManager, DeviceManagerError,
                                 HotPlugged, UnknownDeviceId)
from pych.cpu import VcpuRemovalPending
from pych.devices.legacy.serial_backend import SerialBackend, open_serial_backend
from pych.devices.net.tap import TapError, tap_fd_name
from pych.devices.vhost_user import VhostUserConnections
from pych.event_monitor import EventMonitor, NullEventMonitor
from pych.hypervisor.kvm import Kvm
from pych.memory_manager import (RESIZE_WITH_ZONES, InvalidMemoryResize, MemoryResizeError,
                                 UnknownMemoryZone, find_zone, virtio_mem_request)
from pych.vcpu import install_kick_handler
from pych.vm import Vm

log = logging.getLogger(__name__)
T = TypeVar("T")


class SerialPort:
    """The host end of ``--serial``, kept across reboots; each boot's UART attaches to it."""

    def __init__(self, backend: SerialBackend):
        self.backend = backend
        self._uart = None
        backend.start(self)

    def enqueue_input(self, data: bytes) -> None:
        uart = self._uart
        if uart is not None:
            uart.enqueue_input(data)

    def write(self, data: bytes) -> None:
        self.backend.write(data)

    def attach(self, uart) -> None:
        self._uart = uart

    def detach(self) -> None:
        self._uart = None

    def close(self) -> None:
        self._uart = None
        self.backend.close()


class Vmm(RequestHandler):
    def __init__(self, *, event_monitor: EventMonitor | NullEventMonitor | None = None,
                 exit_on_guest_poweroff: bool = True):
        self.events = event_monitor or NullEventMonitor()
        self.exit_on_guest_poweroff = exit_on_guest_poweroff
        self.config: VmConfig | None = None
        self.vm: Vm | None = None
        self.state = "NotCreated"
        self.exit_code: int | None = None
        self._kvm: Kvm | None = None
        self._serial: SerialPort | None = None
        self._serial_spec: tuple | None = None
        # vhost-user back-end connections (virtio-fs) handed from one boot to the next
        self._vhost_user = VhostUserConnections()
        self._tasks: queue.SimpleQueue = queue.SimpleQueue()
        self._wake = os.eventfd(0, os.EFD_CLOEXEC | os.EFD_NONBLOCK)
        self._loop_thread: threading.Thread | None = None

    # --- plumbing ----------------------------------------------------------------------------
    @property
    def kvm(self) -> Kvm:
        if self._kvm is None:
            self._kvm = Kvm()
        return self._kvm

    def _in_loop(self) -> bool:
        return self._loop_thread is None or threading.current_thread() is self._loop_thread

    def call(self, fn: Callable[["Vmm"], T]) -> T:
        """Run ``fn(self)`` on the control loop and return its result (or raise its error)."""
        if self._in_loop():
            return fn(self)
        fut: Future = Future()
        self._tasks.put((fn, fut))
        os.eventfd_write(self._wake, 1)
        return fut.result()

    def post(self, fn: Callable[["Vmm"], Any]) -> None:
        """Queue ``fn(self)`` on the control loop without waiting (from any thread)."""
        self._tasks.put((fn, None))
        try:
            os.eventfd_write(self._wake, 1)
        except OSError:
            pass

    def run_loop(self) -> int:
        """Serve requests and guest events until the VMM is asked to exit."""
        self._loop_thread = threading.current_thread()
        poller = select.poll()
        poller.register(self._wake, select.POLLIN)
        while self.exit_code is None:
            try:
                poller.poll(1000)
            except InterruptedError:
                pass
            try:
                os.eventfd_read(self._wake)
            except BlockingIOError:
                pass
            self._drain()
        self._drain()
        return self.exit_code

    def _drain(self) -> None:
        while True:
            try:
                fn, fut = self._tasks.get_nowait()
            except queue.Empty:
                return
            if fut is None:
                try:
                    fn(self)
                except Exception:  # noqa: BLE001
                    log.exception("VMM task failed")
                continue
            if not fut.set_running_or_notify_cancel():
                continue
            try:
                fut.set_result(fn(self))
            except BaseException as e:  # noqa: BLE001 - handed to the caller
                fut.set_exception(e)

    def request_exit(self, code: int) -> None:
        if self.exit_code is None:
            self.exit_code = code
        try:
            os.eventfd_write(self._wake, 1)
        except OSError:
            pass

    # --- guest-initiated events (posted from vCPU threads) ----------------------------------
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
            self._stop_vm()
            self.request_exit(1)

    # --- VM lifecycle --------------------------------------------------------------------------
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

    def _start_vm(self) -> None:
        assert self.config is not None
        vm_box: list[Vm] = []
        vm = Vm(self.config, self.kvm, serial_port=self._serial_port(self.config),
                vhost_user=self._vhost_user,
                on_exit=lambda kind, detail: self._on_guest_exit(vm_box[0], kind, detail))
        vm_box.append(vm)
        self.events.emit("vm", "booting")
        vm.boot()
        self.vm = vm
        self.state = "Running"
        self.events.emit("vm", "booted")

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
            self.state = "Shutdown"

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
            self._vhost_user.close()        # the connections the new VM did not take back
        self.events.emit("vm", "rebooted")

    def _require_vm(self) -> VmConfig:
        if self.config is None:
            raise ApiError(404, ["VM is not created"])
        return self.config

    def _require_running(self, *states: str) -> Vm:
        self._require_vm()
        if self.vm is None or self.state not in (states or ("Running",)):
            # The spec's 405 ("not booted" / wrong state); the reference answers 500, but a
            # request that does not fit the VM's state is the client's error, not ours.
            raise ApiError(405, [f"VM is not in a state for this request (state: {self.state})"])
        return self.vm

    # --- RequestHandler -----------------------------------------------------------------------
    def vmm_ping(self) -> dict:
        return {"build_version": pych.__version__, "version": pych.__version__, "pid": os.getpid(),
                "features": ["kvm"]}

    def vmm_shutdown(self) -> None:
        self._stop_vm()
        self.request_exit(0)

    def vm_create(self, config: VmConfig) -> None:
        if self.config is not None:
            raise ApiError(409, ["VM is already created"])
        for net in config.net or ():
            if net.fds and all(fd == -1 for fd in net.fds):
                # Numbers from JSON (made -1 when parsed): vm.create takes no fds, and the
                # reference drops them, so the net gets a tap of its own.
                net.fds = None
        config.validate()
        _check_payload_files(config)
        self.config = config
        self.state = "Created"

    def vm_boot(self) -> None:
        self._require_vm()
        if self.vm is not None:
            raise ApiError(409, ["VM is already booted"])
        try:
            self._start_vm()
        except DeviceBackendError as e:     # a device the configuration names cannot be used
            raise ApiError(400, ["Error booting VM", str(e)]) from None
        except Exception as e:  # noqa: BLE001 - any boot failure is the caller's one clear error
            log.debug("boot failed", exc_info=True)
            raise ApiError(500, ["Error booting VM", str(e)]) from None

    def vm_shutdown(self) -> None:
        self._require_running("Running", "Paused")
        self._stop_vm()
        self.events.emit("vm", "shutdown")

    def vm_delete(self) -> None:
        if self.config is None:
            return None
        self._stop_vm()
        _close_net_fds(self.config.net)
        self.config = None
        self.state = "NotCreated"
        self.events.emit("vm", "deleted")

    def vm_reboot(self) -> None:
        self._require_running("Running", "Paused")
        self._reboot()

    def vm_pause(self) -> None:
        vm = self._require_running("Running")
        vm.pause()
        self.state = "Paused"
        self.events.emit("vm", "paused")

    def vm_resume(self) -> None:
        vm = self._require_running("Paused")
        vm.resume()
        self.state = "Running"
        self.events.emit("vm", "resumed")

    def vm_nmi(self) -> None:
        self._require_running("Running").nmi()

    def vm_power_button(self) -> None:
        self._require_running("Running").power_button()

    def vm_info(self) -> dict:
        config = self._require_vm()
        return {
            "config": config.model_dump(mode="json", exclude_none=True),
            "state": self.state if self.state != "NotCreated" else "Created",
            "memory_actual_size": (self.vm.memory_actual_size if self.vm
                                   else _boot_ram_size(config.memory)),
            "device_tree": self.vm.devices.device_tree() if self.vm and self.vm.devices else {},
            **self._memory_hotplug_info(),
            **self._vcpu_hotplug_info(),
            **self._pci_hotplug_info(),
            **self._memslot_info(),
        }

    def _vcpu_hotplug_info(self) -> dict:
        """Beyond the reference: ``cpus``, the live state of each possible vCPU of the running
        VM (``[{"id": 0, "state": "present"}, ...]``, states as pych.cpu.VcpuState)."""
        if self.vm is None or self.vm.cpus is None:
            return {}
        return {"cpus": [{"id": cpu, "state": state.value}
                         for cpu, state in enumerate(self.vm.cpus.states())]}

    def _memory_hotplug_info(self) -> dict:
        """Beyond the reference: ``memory_hotplug``, the hot plug window and each plugged DIMM
        or virtio-mem device of the running VM (see MemoryManager.hotplug_info); absent
        without memory hot plug."""
        info = self.vm.memory.hotplug_info() if self.vm and self.vm.memory else None
        return {"memory_hotplug": info} if info is not None else {}

    def vm_resize(self, resize) -> None:
        """CPU first, then memory, then balloon, as the reference; each part updates the
        configuration, so a reboot comes back with the last requested shape."""
        self._require_vm()
        if resize.desired_vcpus is not None:
            self._resize_vcpus(resize.desired_vcpus)
        if resize.desired_ram is not None:
            self._resize_memory(resize.desired_ram)
        if resize.desired_balloon is not None:
            self._resize_balloon(resize.desired_balloon)
        self.events.emit("vm", "resized")

    def _resize_vcpus(self, desired: int) -> None:
        """``desired_vcpus``: on a running VM, hot plug vCPUs or ask the guest to eject the
        highest ones (CpuManager.resize); either way ``cpus.boot_vcpus`` becomes ``desired``,
        so a reboot boots with that many. The same count is a no-op.

        Errors: outside 1..max_vcpus -> 400; a removal the guest has not completed yet
        -> 429 (retry later).
        """
        cpus = self.config.cpus
        if not 1 <= desired <= cpus.max_vcpus:
            raise ApiError(400, ["Error resizing VM vCPUs",
                                 f"desired_vcpus {desired} is not between 1 and max_vcpus "
                                 f"({cpus.max_vcpus})"])
        if self.vm is not None and self.vm.cpus is not None:
            try:
                self.vm.resize_vcpus(desired)
            except VcpuRemovalPending as e:
                raise ApiError(429, ["Error resizing VM vCPUs", str(e)]) from None
        cpus.boot_vcpus = desired

    def _resize_memory(self, desired: int) -> None:
        """``desired_ram``: on a running VM an increase is hot plugged now as one ACPI DIMM
        (MemoryManager.resize); a reduction, as in the reference, is for the next boot, and
        beyond it the guest is asked to eject the newest DIMMs that fit live (vm.info's
        ``memory_hotplug`` shows which went and which the guest kept). Either way
        ``memory.size`` becomes ``desired``, so a reboot boots with that much RAM.

        With virtio-mem the device is asked for ``desired`` minus boot RAM, growing or
        shrinking live, and ``memory.hotplugged_size`` becomes that amount (None for 0), so a
        reboot plugs as much again; ``memory.size`` stays the boot RAM.

        Errors: a size that cannot be boot RAM, an increase that is not a multiple of
        128 MiB or does not fit the hot plug window, with virtio-mem a size below boot RAM
        or not a multiple of 2 MiB above it, user-defined memory zones (use vm.resize-zone;
        the reference answers 500, and before boot it writes ``memory.size``, which the
        zones forbid: pych refuses in both cases) -> 400; no hot plug slot left -> 500.
        """
        memory = self.config.memory
        _check_ram_size(desired, "Error resizing VM memory")
        if memory.zones:
            raise ApiError(400, ["Error resizing VM memory", RESIZE_WITH_ZONES])
        if memory.hotplug_method == "VirtioMem":
            try:
                requested = virtio_mem_request(memory, desired)
            except InvalidMemoryResize as e:
                raise ApiError(400, ["Error resizing VM memory", str(e)]) from None
        if self.vm is not None and self.vm.memory is not None:
            try:
                self.vm.resize_memory(desired)
            except InvalidMemoryResize as e:
                raise ApiError(400, ["Error resizing VM memory", str(e)]) from None
            except MemoryResizeError as e:
                raise ApiError(500, ["Error resizing VM memory", str(e)]) from None
        if memory.hotplug_method == "VirtioMem":
            memory.hotplugged_size = requested or None
        else:
            memory.size = desired

    def vm_resize_zone(self, request) -> None:
        """``vm.resize-zone {id, desired_ram}``: make the user-defined memory zone ``id``
        ``desired_ram`` bytes, the reference's rules: only with user-defined zones
        (``--memory size=0`` and ``--memory-zone``), only a zone with a virtio-mem region
        (``hotplug_size``, so ``hotplug_method=virtio-mem``), from the zone's ``size`` (its
        boot RAM, which stays) up to ``size + hotplug_size``, in 2 MiB steps. On a running
        VM the zone's virtio-mem device is asked for ``desired_ram - size`` and the guest
        plugs or unplugs blocks in its own time; either way the zone's ``hotplugged_size``
        becomes that amount (None for 0), so a reboot plugs as much again.

        Before boot the configuration is edited as a live resize would leave it. Only a
        zone without a ``hotplug_size`` gets the reference's cold resize: its ``size``
        becomes ``desired_ram``.

        Errors: VM not created, or no zone with that id -> 404; no user-defined zones, a
        zone without a virtio-mem region, or a size out of range or not a multiple of
        2 MiB -> 400 (the reference answers 500 for all of these; pych's status says
        whose mistake it is, and its messages keep the reference's words); the device
        failing -> 500. Asking for the size already requested is a no-op (the reference
        fails it).
        """
        memory = self._require_vm().memory
        what = "The memory zone could not be resized"
        try:
            zone = find_zone(memory, request.id)
            if self.vm is None and zone.hotplug_size is None:
                _check_ram_size(request.desired_ram, what)
                zone.size = request.desired_ram
                return None
            requested = virtio_mem_request(zone, request.desired_ram)
            if self.vm is not None and self.vm.memory is not None:
                self.vm.resize_memory_zone(zone.id, request.desired_ram)
        except UnknownMemoryZone as e:
            raise ApiError(404, [what, str(e)]) from None
        except InvalidMemoryResize as e:
            raise ApiError(400, [what, str(e)]) from None
        except MemoryResizeError as e:
            raise ApiError(500, [what, str(e)]) from None
        zone.hotplugged_size = requested or None
        return None

    def _resize_balloon(self, desired: int) -> None:
        """``desired_balloon``: on a running VM the balloon is asked to become ``desired``
        bytes (the guest inflates or deflates it in its own time; see VirtioBalloon); either
        way ``balloon.size`` becomes ``desired``, so a reboot starts with that target.

        Errors: no ``--balloon`` configured, or more than the guest's RAM -> 500.
        """
        balloon = self.config.balloon
        if balloon is None:
            raise ApiError(400, ["Error resizing VM balloon", "No balloon device configured"])
        ram = (self.vm.memory_actual_size if self.vm is not None
               else _boot_ram_size(self.config.memory))
        if not 0 <= desired <= ram:
            raise ApiError(400, ["Error resizing VM balloon",
                                 f"desired_balloon {desired} is larger than the guest RAM ({ram})"])
        device = self.vm.devices.balloon if self.vm is not None and self.vm.devices else None
        if device is not None:
            device.resize(desired)
        balloon.size = desired

    def vm_counters(self) -> dict:
        self._require_running("Running", "Paused")
        return {}

    # --- PCI device hot plug ----------------------------------------------------------------------
    def vm_add_disk(self, config) -> PciDeviceInfo | None:
        return self._add_pci_device(config, "disks", DeviceManager.add_disk)

    def vm_add_net(self, config, fds: list[int]) -> PciDeviceInfo | None:
        """``vm.add-net``; tap fds come with the request by SCM_RIGHTS (``pych-remote
        add-net fd=[N]``, Kata Containers) and, as in the reference, replace whatever fd
        numbers the JSON held (none of which mean anything here): one fd per queue pair,
        so one. Each must be a tap queue opened with ``IFF_TAP | IFF_NO_PI |
        IFF_VNET_HDR`` (checked now, also for a VM not booted: 400 otherwise).

        The configuration keeps the received fds (``vm.info`` shows their numbers in this
        process, as the reference's does); the device works on a duplicate, so a reboot
        re-creates it on a fresh one. They are closed when the device is removed or the
        VM deleted, and at once if the add fails."""
        config.fds = list(fds) or None
        try:
            self._require_vm()
            for fd in fds:
                try:
                    tap_fd_name(fd)
                except TapError as e:
                    raise ApiError(400, ["Error adding device to the VM", str(e)]) from None
            return self._add_pci_device(config, "net", DeviceManager.add_net)
        except BaseException:
            config.fds = None
            _close_fds(fds)
            raise

    def vm_add_fs(self, config) -> PciDeviceInfo | None:
        return self._add_pci_device(config, "fs", DeviceManager.add_fs)

    def vm_add_pmem(self, config) -> PciDeviceInfo | None:
        return self._add_pci_device(config, "pmem", DeviceManager.add_pmem)

    def vm_add_vsock(self, config) -> PciDeviceInfo | None:
        if self._require_vm().vsock is not None:
            raise ApiError(500, ["Error adding device to the VM",
                                 "Too many vsock devices: a VM has at most one"])
        return self._add_pci_device(config, "vsock", DeviceManager.add_vsock)

    def vm_add_device(self, config, fds: list[int]) -> PciDeviceInfo | None:
        """VFIO passthrough of the host PCI device ``config.path`` (docs/vfio.md). A path
        that is not a vfio-pci bound device, or a host without VFIO, answers 400 with one
        line saying what to fix. A VFIO cdev passed with SCM_RIGHTS (iommufd) is refused."""
        if fds:
            for fd in fds:
                os.close(fd)
            raise ApiError(400, ["Error adding device to the VM", "VFIO cdev fds passed with "
                                 "SCM_RIGHTS (iommufd) are not supported by pych; give path="])
        return self._add_pci_device(config, "devices", DeviceManager.add_vfio)

    def _add_pci_device(self, device, field: str,
                        hotplug: Callable[..., HotPlugged]) -> PciDeviceInfo | None:
        """The add-* flow: validate the configuration with ``device`` added to ``field``
        (409 duplicate id or path, 400 otherwise), then either only record it (VM created but
        not running: 204) or hot plug it with ``hotplug(device_manager, device)`` and record
        the configuration it was built from (with its id), so a reboot re-creates it
        (200 ``{"id", "bdf"}``)."""
        config = self._require_vm()
        candidate = config.model_copy(deep=True)
        _append_device(candidate, field, device.model_copy())
        candidate.validate()
        if self.vm is None:
            _append_device(config, field, device)
            return None
        try:
            added = hotplug(self.vm.devices, device)
        except DeviceBackendError as e:
            raise ApiError(400, ["Error adding device to the VM", str(e)]) from None
        except DeviceManagerError as e:
            raise ApiError(500, ["Error adding device to the VM", str(e)]) from None
        _append_device(config, field, added.config)
        return PciDeviceInfo(id=added.id, bdf=added.bdf)

    def vm_remove_device(self, request) -> None:
        """Drop the device from the configuration now and ask the guest to eject it; the
        ``device-removed`` event follows when the guest has ejected it (see
        DeviceManager.remove_device). 404 for an unknown id, 500 for a device that cannot be
        removed (rng, console, balloon, virtio-mem)."""
        config = self._require_vm()
        if self.vm is None:
            removed = _remove_device_config(config, request.id)
            if removed is None:
                raise ApiError(404, [f"No device with id {request.id} to remove"])
            _close_net_fds([removed])
            return None
        try:
            dev_id = self.vm.devices.remove_device(request.id, on_ejected=self._device_ejected)
        except UnknownDeviceId as e:
            raise ApiError(404, ["Error removing device from the VM", str(e)]) from None
        except DeviceManagerError as e:
            raise ApiError(500, ["Error removing device from the VM", str(e)]) from None
        # A net's tap fds go now, as in the reference: the device keeps working on its own
        # duplicate until the guest ejects it. Asking again finds no configuration: no
        # fd is closed twice.
        _close_net_fds([_remove_device_config(config, dev_id)])
        return None

    def _device_ejected(self, dev_id: str, address: str) -> None:
        """Called on the vCPU thread that ejected the device (the monitor is thread-safe)."""
        self.events.emit("vm", "device-removed", {"id": dev_id, "bdf": address})

    def _memslot_info(self) -> dict:
        """Beyond the reference: ``memslots``, how many KVM memory slots the running VM has
        registered (boot RAM, DIMMs, virtio-mem, pmem and VFIO BARs), as pych counts its
        KVM_SET_USER_MEMORY_REGION additions and removals; ``scripts/soak.py`` checks it
        does not grow."""
        kvm_vm = getattr(self.vm, "vm", None)
        return {"memslots": kvm_vm.memslots_in_use} if kvm_vm is not None else {}

    def _pci_hotplug_info(self) -> dict:
        """Beyond the reference: ``devices_pending_removal``, the ids the guest was asked to
        eject and has not ejected yet (they stay in ``device_tree`` until then)."""
        if self.vm is None or self.vm.devices is None:
            return {}
        return {"devices_pending_removal": self.vm.devices.pending_removal()}

    # --- teardown ---------------------------------------------------------------------------------
    def close(self) -> None:
        self._stop_vm()
        if self.config is not None:
            _close_net_fds(self.config.net)
        self._vhost_user.close()
        if self._serial is not None:
            self._serial.close()
            self._serial = None
        self.events.close()
        if self._kvm is not None:
            self._kvm.close()
            self._kvm = None


# The VmConfig fields holding hot-pluggable PCI devices (lists, except the single vsock).
_PCI_DEVICE_FIELDS = ("disks", "net", "fs", "pmem", "devices", "user_devices", "vdpa",
                      "generic_vhost_user", "vsock")


def _append_device(config: VmConfig, field: str, device) -> None:
    if field == "vsock":
        config.vsock = device
    else:
        setattr(config, field, [*(getattr(config, field) or []), device])


def _remove_device_config(config: VmConfig, dev_id: str):
    """Remove the device ``dev_id`` from the configuration; returns its configuration, or
    None if it was not there."""
    for field in _PCI_DEVICE_FIELDS:
        value = getattr(config, field)
        if field == "vsock":
            if value is not None and value.id == dev_id:
                config.vsock = None
                return value
        else:
            removed = next((device for device in value or () if device.id == dev_id), None)
            if removed is not None:
                setattr(config, field, [device for device in value if device is not removed]
                        or None)
                return removed
    return None


def _close_fds(fds) -> None:
    for fd in fds:
        try:
            os.close(fd)
        except OSError:
            pass


def _close_net_fds(devices) -> None:
    """Close the tap fds of the net configurations among ``devices`` (received with
    ``vm.add-net`` or inherited for ``--net fd=``): the VMM owns them from the moment it
    took them until the device leaves the configuration."""
    for device in devices or ():
        if isinstance(device, NetConfig) and device.fds:
            fds, device.fds = device.fds, None
            _close_fds(fd for fd in fds if fd >= 0)


def _check_ram_size(desired: int, what: str) -> None:
    """A RAM size must be a positive multiple of the page size (400 otherwise)."""
    if desired <= 0 or desired % os.sysconf("SC_PAGE_SIZE"):
        raise ApiError(400, [what, f"desired_ram {desired} is not a positive multiple of the "
                                   f"page size"])


def _boot_ram_size(memory) -> int:
    """The RAM a VM boots with before anything is plugged: ``size``, or its zones' sizes
    (the reference's memory_actual_size of a VM not booted)."""
    return memory.size + sum(zone.size for zone in memory.zones or ())


def _check_payload_files(config: VmConfig) -> None:
    """A kernel, firmware or initramfs that cannot be read is the caller's error (400),
    reported when the VM is created rather than as a failed boot."""
    payload = config.payload
    for what in ("kernel", "firmware", "initramfs"):
        path = getattr(payload, what, None) if payload is not None else None
        if path and not os.access(path, os.R_OK):
            raise ConfigError(f"cannot read the {what} {path}: "
                              f"{'no such file' if not os.path.exists(path) else 'permission denied'}")


def _setup_logging(args) -> None:
    level = {0: logging.WARNING, 1: logging.INFO, 2: logging.DEBUG}.get(min(args.v or 0, 2))
    handler: logging.Handler
    if getattr(args, "log_file", None):
        handler = logging.FileHandler(args.log_file)
    else:
        handler = logging.StreamHandler(sys.stderr)
    handler.setFormatter(logging.Formatter("pych: %(asctime)s %(levelname)s %(name)s: %(message)s"))
    logging.basicConfig(level=level, handlers=[handler], force=True)


def _option(value, parser):
    if value is None or not isinstance(value, str):
        return value
    return parser.parse(value)


def run(config: VmConfig | None, args) -> int:
    """``pych``'s main: boot ``config`` (if given), serve the API, return the exit code."""
    _setup_logging(args)
    install_kick_handler()
    monitor_opt = _option(getattr(args, "event_monitor", None), EventMonitorOption)
    api_opt = _option(getattr(args, "api_socket", None), ApiSocket)
    try:
        monitor = EventMonitor(monitor_opt.path, monitor_opt.fd) if monitor_opt else None
    except OSError as e:
        print(f"pych: error: --event-monitor: {e.strerror}: {monitor_opt.path}", file=sys.stderr)
        return 1
    vmm = Vmm(event_monitor=monitor)
    server = None

    def on_signal(signum, _frame):
        log.warning("received signal %d: shutting down", signum)
        vmm.post(lambda v: (v._stop_vm(), v.request_exit(0)))

    signal.signal(signal.SIGTERM, on_signal)
    signal.signal(signal.SIGINT, on_signal)

    def on_seccomp_violation(_message):
        # already reported on stderr, one line naming the call (pych.seccomp)
        vmm.post(lambda v: (v._stop_vm(), v.request_exit(1)))

    seccomp.configure(getattr(args, "seccomp", None) or seccomp.DEFAULT_MODE,
                      on_violation=on_seccomp_violation)        # vCPU threads install it
    try:
        vmm.events.emit("vmm", "starting")
        if api_opt is not None:
            from pych.api.http import ApiServer
            try:
                server = ApiServer(vmm.call, path=api_opt.path, fd=api_opt.fd)
                server.start()
            except (OSError, ValueError, RuntimeError) as e:
                print(f"pych: error: --api-socket: {e}", file=sys.stderr)
                return 1
        if config is not None:
            try:
                vmm.vm_create(config)
                vmm.vm_boot()
            except ConfigError as e:
                print(f"pych: error: {e}", file=sys.stderr)
                return 2
            except ApiError as e:
                print(f"pych: error: {': '.join(e.messages[1:] or e.messages)}", file=sys.stderr)
                return 1
        elif server is None:
            print("pych: error: nothing to do: give --kernel or --api-socket", file=sys.stderr)
            return 2
        return vmm.run_loop()
    finally:
        if server is not None:
            server.close()
        vmm.close()
