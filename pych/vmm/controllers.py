"""What a request does to a created VM, in one of two phases (Firecracker's preboot and
runtime API controllers).

The VMM decides once per request which phase the VM is in (:meth:`pych.vmm.Vmm._controller`)
and hands the request to that phase's controller:

* :class:`PrebootController`: no running VM (created and never booted, or shut down). A
  request only edits the configuration, which the next boot builds from.
* :class:`RuntimeController`: a running (or paused) VM. A request acts on the VM through its
  managers, then records the result in the configuration, so a reboot (which rebuilds the VM
  from its configuration) comes back with what was asked for.

Both check a request against the configuration the same way (:class:`VmController`); they
differ only in whether there is a VM to act on.
"""

from __future__ import annotations

import logging
from abc import ABC, abstractmethod
from collections.abc import Callable, Iterable
from typing import TYPE_CHECKING, Any

from pych.config import ConfigError, NetConfig, PciDeviceInfo, VmConfig, VmResize, kinds
from pych.config.kinds import DeviceKind
from pych.errors import InvalidRequest, NotFound
from pych.fds import close_fds
from pych.vmm.manager_errors import domain_errors

if TYPE_CHECKING:
    from pych.device_manager.manager import HotPlugged
    from pych.memory.manager import MemoryManager
    from pych.vm import Vm

log = logging.getLogger(__name__)

ADD_DEVICE = "Error adding device to the VM"


class VmController(ABC):
    """A request on the created VM whose configuration is ``config``: check it against the
    configuration, act on the running VM if there is one (the ``_act``/``_plug`` hooks), then
    record it in the configuration."""

    def __init__(self, config: VmConfig):
        self.config = config

    # --- vm.resize ----------------------------------------------------------------------------
    def resize(self, request: VmResize) -> None:
        """``vm.resize`` as one transaction: vCPUs, then RAM, then balloon (the reference's
        order), every part checked before any of them changes anything; should a later part
        still fail, the parts already done are undone (the configuration as before, and the
        VM asked to go back), so a refused request leaves the VM as it was. The reference
        applies the parts one by one and keeps the earlier ones when a later one fails."""
        self._check_resize(request)
        undo: list[Callable[[], None]] = []
        try:
            if request.desired_vcpus is not None:
                undo.append(self._undo_vcpus())
                self.resize_vcpus(request.desired_vcpus)
            if request.desired_ram is not None:
                undo.append(self._undo_memory())
                self.resize_memory(request.desired_ram)
            if request.desired_balloon is not None:
                self.resize_balloon(request.desired_balloon)
        except BaseException:
            for step in reversed(undo):
                try:
                    step()
                except Exception:  # noqa: BLE001 - undo what can be undone, report the cause
                    log.exception("vm.resize: undoing a part that was already done failed")
            raise

    def _check_resize(self, request: VmResize) -> None:
        """Everything :meth:`resize` would refuse, raised as it would, changing nothing."""
        if request.desired_vcpus is not None:
            self._check_vcpus(request.desired_vcpus)
        if request.desired_ram is not None:
            from pych.memory.resize import check_ram    # loaded with the first VM's managers
            with domain_errors("Error resizing VM memory"):
                check_ram(self.config.memory, request.desired_ram, self._memory_manager())
        if request.desired_balloon is not None:
            ram = self.memory_actual_size()
            acpi = self.config.memory.hotplug_method != "VirtioMem"
            if request.desired_ram is not None and acpi:
                ram = max(ram, request.desired_ram)      # an ACPI increase is there at once
            self._check_balloon(request.desired_balloon, ram)

    def _undo_vcpus(self) -> Callable[[], None]:
        before = self.config.cpus.boot_vcpus

        def undo() -> None:
            self.config.cpus.boot_vcpus = before
            with domain_errors("Error resizing VM vCPUs"):
                self._act_resize_vcpus(before)
        return undo

    def _undo_memory(self) -> Callable[[], None]:
        memory = self.config.memory
        size, hotplugged = memory.size, memory.hotplugged_size

        def undo() -> None:
            from pych.memory.resize import resize_ram
            resize_ram(memory, size + (hotplugged or 0) if memory.hotplug_method == "VirtioMem"
                       else size, self._memory_manager())
            memory.size, memory.hotplugged_size = size, hotplugged
        return undo

    def _check_vcpus(self, desired: int) -> None:
        cpus = self.config.cpus
        if not 1 <= desired <= cpus.max_vcpus:
            raise InvalidRequest("Error resizing VM vCPUs",
                                 f"desired_vcpus {desired} is not between 1 and max_vcpus "
                                 f"({cpus.max_vcpus})")
        with domain_errors("Error resizing VM vCPUs"):
            self._act_check_vcpus(desired)

    def _check_balloon(self, desired: int, ram: int) -> None:
        if self.config.balloon is None:
            raise InvalidRequest("Error resizing VM balloon", "No balloon device configured")
        if not 0 <= desired <= ram:
            raise InvalidRequest("Error resizing VM balloon",
                                 f"desired_balloon {desired} is larger than the guest RAM ({ram})")

    def resize_vcpus(self, desired: int) -> None:
        """``desired_vcpus``: on a running VM, hot plug vCPUs or ask the guest to eject the
        highest ones (CpuManager.resize); either way ``cpus.boot_vcpus`` becomes ``desired``,
        so a reboot boots with that many. The same count is a no-op.

        Errors: outside 1..max_vcpus: InvalidRequest; a removal the guest has not completed
        yet: RetryLater.
        """
        self._check_vcpus(desired)
        with domain_errors("Error resizing VM vCPUs"):
            self._act_resize_vcpus(desired)
        self.config.cpus.boot_vcpus = desired

    def resize_memory(self, desired: int) -> None:
        """``desired_ram`` (see :func:`pych.memory.resize.resize_ram`)."""
        from pych.memory.resize import resize_ram
        with domain_errors("Error resizing VM memory"):
            resize_ram(self.config.memory, desired, self._memory_manager())

    def resize_zone(self, zone_id: str, desired: int) -> None:
        """``vm.resize-zone`` (see :func:`pych.memory.resize.resize_zone`)."""
        from pych.memory.resize import resize_zone
        with domain_errors("The memory zone could not be resized"):
            resize_zone(self.config.memory, zone_id, desired, self._memory_manager())

    def resize_balloon(self, desired: int) -> None:
        """``desired_balloon``: on a running VM the balloon is asked to become ``desired``
        bytes (the guest inflates or deflates it in its own time; see VirtioBalloon); either
        way ``balloon.size`` becomes ``desired``, so a reboot starts with that target.

        Errors: no ``--balloon`` configured, or more than the guest's RAM: InvalidRequest.
        """
        self._check_balloon(desired, self.memory_actual_size())
        self._act_resize_balloon(desired)
        self.config.balloon.size = desired

    # --- vm.add-* -----------------------------------------------------------------------------
    def add_device(self, kind: DeviceKind, device: Any) -> PciDeviceInfo | None:
        """The add-* flow: validate the configuration with ``device`` added (ConfigConflict
        for a duplicate id or path, ConfigError otherwise), then hot plug it on a running VM
        and record the configuration it was built from (with its id, so a reboot re-creates
        it): ``{"id", "bdf"}``; before boot only record it: None."""
        candidate = self.config.model_copy(deep=True)
        kind.append(candidate, device.model_copy())
        candidate.validate()
        _check_landlock(kind, device)
        added = self._plug(kind, device)
        if added is None:
            kind.append(self.config, device)
            return None
        kind.append(self.config, added.config)
        return PciDeviceInfo(id=added.id, bdf=added.bdf)

    # --- the phase-specific parts -------------------------------------------------------------
    @abstractmethod
    def memory_actual_size(self) -> int:
        """The guest's RAM now: what it boots with, or what the running VM has."""

    @abstractmethod
    def remove_device(self, dev_id: str) -> None:
        """``vm.remove-device``."""

    @abstractmethod
    def info(self) -> dict:
        """``vm.info``'s fields beyond ``config`` and ``state``."""

    @abstractmethod
    def _act_check_vcpus(self, desired: int) -> None: ...

    @abstractmethod
    def _act_resize_vcpus(self, desired: int) -> None: ...

    @abstractmethod
    def _act_resize_balloon(self, desired: int) -> None: ...

    @abstractmethod
    def _memory_manager(self) -> MemoryManager | None: ...

    @abstractmethod
    def _plug(self, kind: DeviceKind, device: Any) -> HotPlugged | None: ...


class PrebootController(VmController):
    """A created VM that is not running: requests edit its configuration."""

    def memory_actual_size(self) -> int:
        return boot_ram_size(self.config.memory)

    def remove_device(self, dev_id: str) -> None:
        """Drop the device from the configuration (NotFound if no removable device has that
        id); a net's tap fds are closed now."""
        removed = kinds.remove_device(self.config, dev_id)
        if removed is None:
            raise NotFound(f"No device with id {dev_id} to remove")
        close_net_fds([removed[1]])

    def info(self) -> dict:
        return {"memory_actual_size": self.memory_actual_size(), "device_tree": {}}

    def _act_check_vcpus(self, desired: int) -> None:
        pass

    def _act_resize_vcpus(self, desired: int) -> None:
        pass

    def _act_resize_balloon(self, desired: int) -> None:
        pass

    def _memory_manager(self) -> None:
        return None

    def _plug(self, kind: DeviceKind, device: Any) -> None:
        return None


class RuntimeController(VmController):
    """A running (or paused) VM ``vm``: requests act on it, then edit its configuration.
    ``on_ejected(dev_id, bdf)`` is called (on a vCPU thread) when the guest has ejected a
    device that ``vm.remove-device`` asked it to."""

    def __init__(self, config: VmConfig, vm: Vm, on_ejected: Callable[[str, str], None]):
        super().__init__(config)
        self.vm = vm
        self.on_ejected = on_ejected

    def memory_actual_size(self) -> int:
        return self.vm.memory_actual_size

    def remove_device(self, dev_id: str) -> None:
        """Drop the device from the configuration now and ask the guest to eject it; the
        ``device-removed`` event follows when the guest has ejected it (see
        DeviceManager.remove_device). NotFound for an unknown id, InternalError for a device
        that cannot be removed (rng, console, balloon, virtio-mem)."""
        with domain_errors("Error removing device from the VM"):
            dev_id = self.vm.devices.remove_device(dev_id, on_ejected=self.on_ejected)
        # A net's tap fds go now, as in the reference: the device keeps working on its own
        # duplicate until the guest ejects it. Asking again finds no configuration: no fd is
        # closed twice.
        removed = kinds.remove_device(self.config, dev_id)
        if removed is not None:
            close_net_fds([removed[1]])

    def info(self) -> dict:
        vm = self.vm
        return {
            "memory_actual_size": vm.memory_actual_size,
            "device_tree": vm.devices.device_tree() if vm.devices else {},
            **self._memory_hotplug_info(),
            **self._vcpu_hotplug_info(),
            **self._pci_hotplug_info(),
            **self._memslot_info(),
        }

    def _act_check_vcpus(self, desired: int) -> None:
        if self.vm.cpus is not None:
            self.vm.cpus.check_resize(desired)

    def _act_resize_vcpus(self, desired: int) -> None:
        if self.vm.cpus is not None:
            self.vm.resize_vcpus(desired)

    def _act_resize_balloon(self, desired: int) -> None:
        device = self.vm.devices.balloon if self.vm.devices else None
        if device is not None:
            device.resize(desired)

    def _memory_manager(self) -> MemoryManager | None:
        return self.vm.memory

    def _plug(self, kind: DeviceKind, device: Any) -> HotPlugged:
        with domain_errors(ADD_DEVICE):
            return self.vm.devices.hotplug(kind, device)

    # --- vm.info beyond the reference ---------------------------------------------------------
    def _vcpu_hotplug_info(self) -> dict:
        """``cpus``: the live state of each possible vCPU (``[{"id": 0, "state": "present"},
        ...]``, states as pych.cpu.hotplug.VcpuState)."""
        if self.vm.cpus is None:
            return {}
        return {"cpus": [{"id": cpu, "state": state.value}
                         for cpu, state in enumerate(self.vm.cpus.states())]}

    def _memory_hotplug_info(self) -> dict:
        """``memory_hotplug``: the hot plug window and each plugged DIMM or virtio-mem device
        (see MemoryManager.hotplug_info); absent without memory hot plug."""
        info = self.vm.memory.hotplug_info() if self.vm.memory else None
        return {"memory_hotplug": info} if info is not None else {}

    def _pci_hotplug_info(self) -> dict:
        """``devices_pending_removal``: the ids the guest was asked to eject and has not
        ejected yet (they stay in ``device_tree`` until then); ``devices_failed``: the
        devices whose back-end went away, with why (``[{"id", "error"}]``)."""
        if self.vm.devices is None:
            return {}
        return {"devices_pending_removal": self.vm.devices.pending_removal(),
                "devices_failed": self.vm.devices.failed_devices()}

    def _memslot_info(self) -> dict:
        """``memslots``: how many KVM memory slots the VM has registered (boot RAM, DIMMs,
        virtio-mem, pmem and VFIO BARs), as pych counts its KVM_SET_USER_MEMORY_REGION
        additions and removals; ``scripts/soak.py`` checks it does not grow."""
        memslots = self.vm.memslots_in_use
        return {"memslots": memslots} if memslots is not None else {}


def boot_ram_size(memory) -> int:
    """The RAM a VM boots with before anything is plugged: ``size``, or its zones' sizes
    (the reference's memory_actual_size of a VM not booted)."""
    return memory.size + sum(zone.size for zone in memory.zones or ())


def close_net_fds(devices: Iterable[Any] | None) -> None:
    """Close the tap fds of the net configurations among ``devices`` (received with
    ``vm.add-net`` or inherited for ``--net fd=``): the VMM owns them from the moment it took
    them until the device leaves the configuration."""
    for device in devices or ():
        if isinstance(device, NetConfig) and device.fds:
            fds, device.fds = device.fds, None
            close_fds(fd for fd in fds if fd >= 0)


def _check_landlock(kind: DeviceKind, device: Any) -> None:
    """Under ``--landlock``, a device whose files lie outside the sandbox is refused by
    name (the kernel would deny pych opening them: EACCES from deep in the device's
    set-up), as the ``landlock_rules`` of the command line decide."""
    from pych import landlock

    if not landlock.active():
        return
    def probe(*devices: Any) -> VmConfig:
        config = VmConfig.model_construct(**{
            name: field.get_default(call_default_factory=True)
            for name, field in VmConfig.model_fields.items()})
        for added in devices:
            kind.append(config, added)
        return config

    base = set(landlock.rules_for(probe()))
    wanted = [rule for rule in landlock.rules_for(probe(device)) if rule not in base]
    try:
        landlock.check_allowed((f"vm.add-{kind.name}: {rule.why}", rule.path, rule.access)
                               for rule in wanted)
    except landlock.LandlockError as e:
        raise ConfigError(str(e)) from None
