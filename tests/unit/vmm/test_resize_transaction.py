"""``vm.resize`` is one transaction: every part (vCPUs, RAM, balloon) is checked before any
changes, and a part that still fails undoes the parts done before it. Each pairing, before
boot and on a running VM."""

from __future__ import annotations

import pytest

from pych.api.errors import status_of
from pych.config import VmResize
from pych.errors import InternalError, VmmError
from pych.memory.resize import InvalidMemoryResize, MemoryResizeError

from tests.unit.vmm.fakes import MiB, fake_vmm, vm_config


@pytest.fixture(params=["preboot", "running"])
def vmm(request, monkeypatch):
    vmm = fake_vmm(monkeypatch)
    vmm.vm_create(vm_config(memory={"size": 256 * MiB, "hotplug_size": 1024 * MiB},
                            balloon={"size": 0}))
    if request.param == "running":
        vmm.vm_boot()
    yield vmm
    vmm.close()


def shape(vmm):
    """What a resize may change: the configuration, and what the running VM was asked."""
    config = (vmm.config.cpus.boot_vcpus, vmm.config.memory.size, vmm.config.balloon.size)
    asked = ([c for c in vmm.vm.calls if c[0] == "resize_vcpus"], list(vmm.vm.memory.calls)) \
        if vmm.vm is not None else None
    return config, asked


# (request, the part that is wrong: the first message of the error)
REFUSED = [
    (dict(desired_vcpus=3, desired_ram=300 * MiB), "Error resizing VM memory"),
    (dict(desired_vcpus=3, desired_balloon=512 * MiB), "Error resizing VM balloon"),
    (dict(desired_ram=512 * MiB, desired_balloon=2048 * MiB), "Error resizing VM balloon"),
    (dict(desired_vcpus=9, desired_ram=512 * MiB), "Error resizing VM vCPUs"),
    (dict(desired_vcpus=9, desired_ram=512 * MiB, desired_balloon=64 * MiB),
     "Error resizing VM vCPUs"),
    (dict(desired_vcpus=3, desired_ram=512 * MiB, desired_balloon=2048 * MiB),
     "Error resizing VM balloon"),
]


@pytest.mark.parametrize("fields, context", REFUSED,
                         ids=lambda v: "+".join(v) if isinstance(v, dict) else None)
def test_a_refused_part_leaves_every_part_unchanged(vmm, monkeypatch, fields, context):
    if context == "Error resizing VM memory":
        if vmm.vm is None:          # before boot any page-size multiple is a valid boot size
            fields = dict(fields, desired_ram=300 * MiB + 1)
        else:                       # the running VM's memory manager refuses 300 MiB
            def refuse(desired):
                raise InvalidMemoryResize("the memory increase must be a multiple of 128 MiB")
            monkeypatch.setattr(vmm.vm.memory, "check_resize", refuse)
    before = shape(vmm)
    with pytest.raises(VmmError) as e:
        vmm.vm_resize(VmResize(**fields))
    assert e.value.messages[0] == context and status_of(e.value) == 400
    assert shape(vmm) == before


@pytest.fixture
def running(monkeypatch):
    vmm = fake_vmm(monkeypatch)
    vmm.vm_create(vm_config(memory={"size": 256 * MiB, "hotplug_size": 1024 * MiB},
                            balloon={"size": 0}))
    vmm.vm_boot()
    yield vmm
    vmm.close()


def test_a_later_part_failing_undoes_the_earlier_ones(running, monkeypatch):
    """On a running VM the checks pass, then the memory manager fails (a slot vanished):
    the vCPU part is undone, in the configuration and on the VM."""
    vmm = running

    def fail(desired):
        if desired != 256 * MiB:                  # the undo (back to 256 MiB) works
            raise MemoryResizeError("no memory hot plug slot left")
        return True
    monkeypatch.setattr(vmm.vm.memory, "resize", fail)
    with pytest.raises(InternalError) as e:
        vmm.vm_resize(VmResize(desired_vcpus=3, desired_ram=512 * MiB))
    assert e.value.messages == ["Error resizing VM memory", "no memory hot plug slot left"]
    assert vmm.config.cpus.boot_vcpus == 2 and vmm.config.memory.size == 256 * MiB
    assert [c for c in vmm.vm.calls if c[0] == "resize_vcpus"] == [("resize_vcpus", 3),
                                                                   ("resize_vcpus", 2)]


def test_the_balloon_failing_undoes_vcpus_and_memory(running):
    vmm = running

    class Broken:
        def resize(self, size):
            raise InternalError("Error resizing VM balloon", "the balloon device is gone")
    vmm.vm.devices.balloon = Broken()
    with pytest.raises(InternalError):
        vmm.vm_resize(VmResize(desired_vcpus=3, desired_ram=512 * MiB, desired_balloon=64 * MiB))
    assert (vmm.config.cpus.boot_vcpus, vmm.config.memory.size, vmm.config.balloon.size) == \
        (2, 256 * MiB, 0)
    assert vmm.vm.memory.calls == [("ram", 512 * MiB), ("ram", 256 * MiB)]


def test_a_whole_valid_request_still_applies_every_part(vmm):
    vmm.vm_resize(VmResize(desired_vcpus=3, desired_ram=512 * MiB, desired_balloon=64 * MiB))
    assert (vmm.config.cpus.boot_vcpus, vmm.config.memory.size, vmm.config.balloon.size) == \
        (3, 512 * MiB, 64 * MiB)
