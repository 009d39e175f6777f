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
    url = VmSnapshotConfig(destination_url=f"file://{tmp_path / 's'}")
    assert error_of(lambda: vmm.vm_snapshot(url))[0] == 404          # no VM
    vmm.vm_create(vm_config())
    assert error_of(lambda: vmm.vm_snapshot(url))[0] == 405          # created, not booted
    boot_fake(vmm)
    status, messages = error_of(lambda: vmm.vm_snapshot(url))
    assert (status, messages) == (405, ["Error creating VM snapshot",
                                        "Trying to snapshot while VM is running"])
    assert not (tmp_path / "s").exists()


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


def test_net_devices_given_fds_need_new_ones(tmp_path):
    config = vm_config(net=[{"id": "net0", "fds": [7]}]).model_dump(mode="json")
    manifest = {"format": fmt.FORMAT, "version": fmt.VERSION, "pych_version": "x",
                "config": config, "state": {}, "memory": []}
    manifest["sha256"] = fmt._checksum(manifest)
    (tmp_path / "manifest.json").write_text(json.dumps(manifest))
    vmm = Vmm()
    status, messages = error_of(lambda: vmm.vm_restore(
        RestoreConfig(source_url=f"file://{tmp_path}"), []))
    assert status == 400 and "net0 was given tap fds" in messages[-1], messages
    assert vmm.vm is None


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
