"""A stand-in for pych.vm.Vm as the VMM uses it (no KVM), recording what it is asked."""

from __future__ import annotations

from types import SimpleNamespace

from pych.config import VmConfig

MiB = 1 << 20


class RecordingEvents:
    def __init__(self):
        self.events = []

    def emit(self, source, event, properties=None):
        self.events.append((source, event, properties))

    def close(self):
        pass


class FakeDevices:
    """The device manager's hot plug surface: ``hotplug`` gives ids ``_<kind>N``."""

    def __init__(self):
        self.calls = []
        self.balloon = None
        self.pending = []
        self._added = 0

    def hotplug(self, kind, device):
        self.calls.append(("hotplug", kind.name, device.id))
        built = device.model_copy(update={"id": device.id or f"_{kind.name}{self._added}"})
        self._added += 1
        return SimpleNamespace(config=built, id=built.id, bdf="0000:00:05.0")

    def remove_device(self, dev_id, on_ejected=None):
        self.calls.append(("remove_device", dev_id))
        self.pending.append(dev_id)
        return dev_id

    def device_tree(self):
        return {"fake": {"id": "fake"}}

    def pending_removal(self):
        return list(self.pending)

    def failed_devices(self):
        return []


class FakeMemory:
    """The memory manager's resize surface: ``calls`` records ``("ram", desired)`` for an ACPI
    resize and ``("virtio-mem", zone)`` for a virtio-mem one."""

    def __init__(self):
        self.calls = []

    def check_resize(self, desired):
        pass

    def check_resize_virtio_mem(self, zone_id):
        pass

    def resize(self, desired):
        self.calls.append(("ram", desired))
        return True

    def resize_zone(self, zone_id, desired):
        self.calls.append(("virtio-mem", zone_id))
        return True

    def resize_virtio_mem(self, zone_id, requested):
        self.calls.append(("virtio-mem", zone_id))
        return True

    def hotplug_info(self):
        return None


class FakeVm:
    """pych.vm.Vm's interface as the VMM uses it; every instance is kept in ``made``."""

    made: list[FakeVm] = []

    def __init__(self, config, kvm, *, on_exit, serial_port=None, vhost_user=None,
                 on_guest_event=None,
                 on_device_failed=None, after_answer=None):
        self.config, self.on_exit = config, on_exit
        self.on_guest_event = on_guest_event
        self.calls = []
        self.cpus = SimpleNamespace(states=lambda: [], check_resize=lambda desired: True)
        self.memory = FakeMemory()
        self.devices = FakeDevices()
        self.memory_actual_size = 256 * MiB
        self.memslots_in_use = 3
        FakeVm.made.append(self)

    def boot(self):
        self.calls.append("boot")

    def close(self, *, keep_connections=False):
        self.calls.append(("close", keep_connections))

    def pause(self):
        self.calls.append("pause")

    def resume(self):
        self.calls.append("resume")

    def nmi(self):
        self.calls.append("nmi")

    def power_button(self):
        self.calls.append("power_button")

    def resize_vcpus(self, desired):
        self.calls.append(("resize_vcpus", desired))
        return True


def vm_config(**fields) -> VmConfig:
    """A VM with 2 of 4 vCPUs, 256 MiB of RAM and no serial port."""
    return VmConfig.model_validate({"payload": {"kernel": __file__}, "serial": {"mode": "Off"},
                                    "cpus": {"boot_vcpus": 2, "max_vcpus": 4},
                                    "memory": {"size": 256 * MiB}, **fields})


def fake_vmm(monkeypatch):
    """A Vmm whose VMs are FakeVm (and no /dev/kvm)."""
    from pych.vmm import Vmm

    monkeypatch.setattr("pych.vmm.vmm.Vm", FakeVm)
    vmm = Vmm(event_monitor=RecordingEvents())
    vmm._kvm = SimpleNamespace(close=lambda: None)
    return vmm
