"""Pre-boot vs runtime: the VMM routes each request once, to the controller of the VM's phase.
Pre-boot a request only edits the configuration; at runtime it acts on the VM, then records
the result in the configuration."""

from __future__ import annotations

import os

import pytest

from pych.api.errors import status_of
from pych.config import (DiskConfig, NetConfig, VmRemoveDevice, VmResize, VmResizeZone,
                         VsockConfig)
from pych.cpu.manager import VcpuRemovalPending
from pych.errors import InvalidRequest, NotFound, RetryLater, VmNotCreated
from pych.vmm.controllers import PrebootController, RuntimeController

from tests.unit.vmm.fakes import MiB, fake_vmm, vm_config


@pytest.fixture
def vmm(monkeypatch):
    vmm = fake_vmm(monkeypatch)
    yield vmm
    vmm.close()


@pytest.fixture
def running(vmm):
    vmm.vm_create(vm_config(balloon={"size": 0}))
    vmm.vm_boot()
    return vmm


def test_the_phase_decides_the_controller(vmm):
    with pytest.raises(VmNotCreated):
        vmm._controller()
    vmm.vm_create(vm_config())
    assert type(vmm._controller()) is PrebootController
    vmm.vm_boot()
    assert type(vmm._controller()) is RuntimeController
    assert vmm._controller().vm is vmm.vm
    vmm.vm_pause()
    assert type(vmm._controller()) is RuntimeController
    vmm.vm_shutdown()
    assert type(vmm._controller()) is PrebootController


def test_preboot_resize_edits_only_the_configuration(vmm):
    vmm.vm_create(vm_config(balloon={"size": 0}))
    vmm.vm_resize(VmResize(desired_vcpus=3, desired_ram=512 * MiB, desired_balloon=64 * MiB))
    assert vmm.config.cpus.boot_vcpus == 3
    assert vmm.config.memory.size == 512 * MiB
    assert vmm.config.balloon.size == 64 * MiB
    assert vmm.events.events[-1] == ("vm", "resized", None)


def test_runtime_resize_acts_on_the_vm_then_records(running):
    vm = running.vm
    running.vm_resize(VmResize(desired_vcpus=3, desired_ram=384 * MiB))
    assert vm.calls[-1] == ("resize_vcpus", 3) and vm.memory.calls == [("ram", 384 * MiB)]
    assert running.config.cpus.boot_vcpus == 3 and running.config.memory.size == 384 * MiB


def test_runtime_balloon_is_asked_and_bounded_by_the_running_ram(running):
    asked = []
    running.vm.devices.balloon = type("Balloon", (), {"resize": lambda self, n: asked.append(n)})()
    running.vm_resize(VmResize(desired_balloon=128 * MiB))
    assert asked == [128 * MiB] and running.config.balloon.size == 128 * MiB
    running.vm.memory_actual_size = 64 * MiB
    with pytest.raises(InvalidRequest) as e:
        running.vm_resize(VmResize(desired_balloon=128 * MiB))
    assert e.value.messages == ["Error resizing VM balloon",
                                f"desired_balloon {128 * MiB} is larger than the guest RAM "
                                f"({64 * MiB})"]
    assert status_of(e.value) == 400 and running.config.balloon.size == 128 * MiB


def test_a_manager_error_becomes_a_domain_error_and_changes_nothing(running, monkeypatch):
    def pending(desired):
        raise VcpuRemovalPending("vCPU 3 removal still pending")

    monkeypatch.setattr(running.vm, "resize_vcpus", pending)
    with pytest.raises(RetryLater) as e:
        running.vm_resize(VmResize(desired_vcpus=3))
    assert e.value.messages == ["Error resizing VM vCPUs", "vCPU 3 removal still pending"]
    assert status_of(e.value) == 429 and running.config.cpus.boot_vcpus == 2


def test_resize_zone_goes_to_the_phase_too(vmm):
    vmm.vm_create(vm_config(memory={"size": 0, "hotplug_method": "VirtioMem", "zones": [
        {"id": "z0", "size": 256 * MiB, "hotplug_size": 256 * MiB}]}))
    vmm.vm_resize_zone(VmResizeZone(id="z0", desired_ram=320 * MiB))
    assert vmm.config.memory.zones[0].hotplugged_size == 64 * MiB
    vmm.vm_boot()
    vmm.vm_resize_zone(VmResizeZone(id="z0", desired_ram=384 * MiB))
    assert vmm.vm.memory.calls == [("virtio-mem", "z0")]
    assert vmm.config.memory.zones[0].hotplugged_size == 128 * MiB


def test_preboot_add_and_remove_edit_the_configuration(vmm):
    vmm.vm_create(vm_config())
    assert vmm.vm_add_disk(DiskConfig(path="/a", id="d")) is None
    assert vmm.config.disks == [DiskConfig(path="/a", id="d")]
    vmm.vm_remove_device(VmRemoveDevice(id="d"))
    assert vmm.config.disks is None
    with pytest.raises(NotFound) as e:
        vmm.vm_remove_device(VmRemoveDevice(id="d"))
    assert e.value.messages == ["No device with id d to remove"] and status_of(e.value) == 404


def test_runtime_add_hot_plugs_and_records_what_was_built(running):
    info = running.vm_add_disk(DiskConfig(path="/a"))
    assert (info.id, info.bdf) == ("_disk0", "0000:00:05.0")
    assert running.vm.devices.calls == [("hotplug", "disk", None)]
    assert running.config.disks == [DiskConfig(path="/a", id="_disk0")]   # with its id
    running.vm_remove_device(VmRemoveDevice(id="_disk0"))
    assert running.vm.devices.calls[-1] == ("remove_device", "_disk0")
    assert running.config.disks is None
    assert running.vm_info()["devices_pending_removal"] == ["_disk0"]


def test_a_removed_net_closes_its_tap_fds_in_either_phase(vmm):
    vmm.vm_create(vm_config())
    for phase in ("preboot", "runtime"):
        r, w = os.pipe()
        vmm.config.net = [NetConfig(id="n", fds=[r])]
        vmm.vm_remove_device(VmRemoveDevice(id="n"))
        with pytest.raises(OSError):
            os.fstat(r)
        os.close(w)
        if phase == "preboot":
            vmm.vm_boot()


def test_the_add_flow_hot_plugs_the_kind_of_the_configuration_model(running):
    running.vm_add_vsock(VsockConfig(cid=3, socket="/tmp/v.sock"))
    assert running.vm.devices.calls == [("hotplug", "vsock", None)]
    assert running.config.vsock.id == "_vsock0"


def test_vm_info_per_phase(vmm):
    vmm.vm_create(vm_config())
    info = vmm.vm_info()
    assert info["memory_actual_size"] == 256 * MiB and info["device_tree"] == {}
    assert {"cpus", "memslots", "devices_pending_removal", "devices_failed"}.isdisjoint(info)
    vmm.vm_boot()
    vmm.vm.memory_actual_size = 300 * MiB
    info = vmm.vm_info()
    assert list(info) == ["config", "state", "memory_actual_size", "device_tree", "cpus",
                          "devices_pending_removal", "devices_failed", "memslots"]
    assert info["memory_actual_size"] == 300 * MiB and info["memslots"] == 3
    assert info["device_tree"] == {"fake": {"id": "fake"}}
