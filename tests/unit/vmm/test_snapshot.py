"""``vm.snapshot`` and ``vm.restore`` at the VMM: which states and bodies are refused, and
that a refused or failed restore leaves no VM (the restore itself: tests/guest/test_snapshot.py;
the format: tests/unit/snapshot/test_format.py)."""

from __future__ import annotations

import json
import os

import pytest

from pych.api.errors import status_of
from pych.config import RestoreConfig, VmSnapshotConfig
from pych.errors import VmmError
from pych.snapshot import format as fmt
from pych.vmm import Vmm
from pych.vmm.state import VmState
from tests.support.machines import boot_fake, vm_config


def error_of(call) -> tuple[int, list[str]]:
    with pytest.raises(VmmError) as e:
        call()
    return int(status_of(e.value)), e.value.messages


def test_a_snapshot_needs_a_paused_vm(tmp_path):
    vmm = Vmm()
    try:
        url = VmSnapshotConfig(destination_url=f"file://{tmp_path / 's'}")
        assert error_of(lambda: vmm.vm_snapshot(url))[0] == 404          # no VM
        vmm.vm_create(vm_config())
        assert error_of(lambda: vmm.vm_snapshot(url))[0] == 405          # created, not booted
        boot_fake(vmm)
        status, messages = error_of(lambda: vmm.vm_snapshot(url))
        assert (status, messages) == (405, ["Error creating VM snapshot",
                                            "Trying to snapshot while VM is running"])
        assert not (tmp_path / "s").exists()
    finally:
        vmm.close()     # its booted machine's RAM (left to the garbage collector, its memfds
                        # closed in the middle of a later test's fd-table comparison)


@pytest.mark.parametrize(("body", "words"), [
    ({"memory_restore_mode": "OnDemand"}, "memory_restore_mode is not supported by pych"),
    ({"zone_updates": [{"id": "z", "host_numa_node": 0}]}, "zone_updates is not supported"),
    ({"iommufd_fd": 3}, "iommufd_fd is not supported"),
])
def test_restore_fields_pych_does_not_do_are_refused_by_name(tmp_path, body, words):
    vmm = Vmm()
    status, messages = error_of(lambda: vmm.vm_restore(
        RestoreConfig.model_validate({"source_url": f"file://{tmp_path}", **body}), []))
    assert status == 400 and words in messages[-1], messages
    assert vmm.state is VmState.NotCreated and vmm.config is None


def test_a_restore_needs_a_pych_without_a_vm_and_closes_the_fds_it_was_given(tmp_path):
    vmm = Vmm()
    vmm.vm_create(vm_config())
    r, w = os.pipe()
    os.close(r)
    status, messages = error_of(lambda: vmm.vm_restore(
        RestoreConfig(source_url=f"file://{tmp_path}"), [w]))
    assert (status, messages) == (409, ["VM is already created"])
    with pytest.raises(OSError):
        os.fstat(w)


def test_a_bad_snapshot_leaves_no_vm(tmp_path):
    vmm = Vmm()
    status, messages = error_of(lambda: vmm.vm_restore(
        RestoreConfig(source_url=f"file://{tmp_path}"), []))
    assert status == 400 and messages[0] == "Error restoring VM", messages
    assert "holds no snapshot" in messages[-1]
    (tmp_path / "manifest.json").write_text(json.dumps(
        {"format": fmt.FORMAT, "version": 0, "pych_version": "0.0"}))
    status, messages = error_of(lambda: vmm.vm_restore(
        RestoreConfig(source_url=f"file://{tmp_path}"), []))
    assert status == 400 and "format version 0" in messages[-1], messages
    assert vmm.state is VmState.NotCreated and vmm.config is None and vmm.vm is None


def write_manifest(directory, config) -> None:
    manifest = {"format": fmt.FORMAT, "version": fmt.VERSION, "pych_version": "x",
                "config": config.model_dump(mode="json"), "state": {}, "memory": []}
    manifest["sha256"] = fmt._checksum(manifest)
    (directory / "manifest.json").write_text(json.dumps(manifest))


def test_net_devices_given_fds_need_new_ones(tmp_path):
    write_manifest(tmp_path, vm_config(net=[{"id": "net0", "fds": [7]}]))
    vmm = Vmm()
    status, messages = error_of(lambda: vmm.vm_restore(
        RestoreConfig(source_url=f"file://{tmp_path}"), []))
    assert status == 400 and "net0 was given tap fds" in messages[-1], messages
    assert vmm.vm is None


# A snapshot with a net given one tap fd (one queue pair), one given two (two pairs) and one
# on a tap by name: what a restore's net_fds may say about them.
NETS = [{"id": "net0", "fds": [7]}, {"id": "net1", "fds": [8, 9], "num_queues": 4},
        {"id": "named", "tap": "tap9"}]


@pytest.mark.parametrize(("net_fds", "sent", "words"), [
    ([{"id": "net9", "num_fds": 1}, {"id": "net0", "num_fds": 1},
      {"id": "net1", "num_fds": 2}], 4, "the snapshot has no net device net9"),
    ([{"id": "net0", "num_fds": 2}, {"id": "net1", "num_fds": 2}], 4,
     "Number of Net FDs passed for 'net0' during Restore: 2. Expected: 1"),
    ([{"id": "net0", "num_fds": 1}, {"id": "net1", "num_fds": 1}], 2,
     "Number of Net FDs passed for 'net1' during Restore: 1. Expected: 2"),
    ([{"id": "net0", "num_fds": 1}, {"id": "net0", "num_fds": 1}], 2, "net0 is named twice"),
    ([{"id": "named", "num_fds": 1}, {"id": "net0", "num_fds": 1},
      {"id": "net1", "num_fds": 2}], 4, "net device named was not given tap fds"),
    ([{"id": "net0", "num_fds": 1}, {"id": "net1", "num_fds": 2}], 2,
     "2 fds came with the request, its net_fds count 3 (net0: 1, net1: 2)"),
    ([{"id": "net0", "num_fds": 1}, {"id": "net1", "num_fds": 2}], 4,
     "4 fds came with the request, its net_fds count 3 (net0: 1, net1: 2)"),
    ([{"id": "net0", "num_fds": 1}], 1, "net device net1 was given tap fds; give its new ones"),
])
def test_net_fds_that_do_not_fit_the_snapshot_are_refused_naming_the_device_and_closed(
        tmp_path, net_fds, sent, words):
    """Every entry names a device of the snapshot that was given tap fds, once, with as
    many fds as it had, and the request carries exactly the fds the entries count: else a
    400 naming it, no VM, and every fd the request brought is closed (none kept, none
    left to a device)."""
    write_manifest(tmp_path, vm_config(cpus={"boot_vcpus": 2, "max_vcpus": 2}, net=NETS))
    pipes = [os.pipe() for _ in range(sent)]
    fds = [w for _, w in pipes]
    vmm = Vmm()
    try:
        status, messages = error_of(lambda: vmm.vm_restore(RestoreConfig.model_validate(
            {"source_url": f"file://{tmp_path}", "net_fds": net_fds}), list(fds)))
        assert status == 400 and words in messages[-1], messages
        assert vmm.vm is None and vmm.config is None and vmm.state is VmState.NotCreated
        for fd in fds:
            with pytest.raises(OSError):
                os.fstat(fd)
    finally:
        for r, w in pipes:
            os.close(r)
            try:
                os.close(w)
            except OSError:
                pass


def test_net_fds_are_given_in_order_to_the_devices_they_name():
    from pych.config import VmConfig
    from pych.vmm.vmm import _take_net_fds
    config = VmConfig.model_validate(vm_config(cpus={"boot_vcpus": 2, "max_vcpus": 2}, net=NETS).model_dump())
    restore = RestoreConfig.model_validate({"source_url": "file:///s", "net_fds": [
        {"id": "net1", "num_fds": 2}, {"id": "net0", "num_fds": 1}]})
    _take_net_fds(config, restore.net_fds, [20, 21, 22])
    assert [(n.id, n.fds) for n in config.net] == [("net0", [22]), ("net1", [20, 21]),
                                                    ("named", None)]
    config.validate()


def test_a_restore_builds_its_vm_the_way_a_boot_does(tmp_path, monkeypatch):
    """The restored VM is made by the same (lazily imported) class as a booted one, wired to
    the VMM's guest events and device failures; it comes up paused. (A restore once reached
    for a ``Vm`` name the lazy import had not bound yet.)"""
    import pych.vm
    import pych.vmm.vmm as vmm_module
    from tests.unit.vmm.fakes import FakeVm, RecordingEvents

    class RestorableVm(FakeVm):
        def restore(self, state, load_memory):
            self.calls.append(("restore", state))

    monkeypatch.delitem(vmm_module.__dict__, "Vm", raising=False)   # as on a fresh start
    monkeypatch.setattr(pych.vm, "Vm", RestorableVm)
    config = vm_config().model_dump(mode="json")
    manifest = {"format": fmt.FORMAT, "version": fmt.VERSION, "pych_version": "x",
                "config": config, "state": {"marker": 1}, "memory": []}
    manifest["sha256"] = fmt._checksum(manifest)
    (tmp_path / "manifest.json").write_text(json.dumps(manifest))
    vmm = Vmm(event_monitor=RecordingEvents())
    monkeypatch.setattr(vmm, "_kvm", object(), raising=False)
    vmm.vm_restore(RestoreConfig(source_url=f"file://{tmp_path}"), [])
    assert isinstance(vmm.vm, RestorableVm) and vmm.vm.calls == [("restore", {"marker": 1})]
    assert vmm.vm.on_guest_event is not None and vmm.state is VmState.Paused
