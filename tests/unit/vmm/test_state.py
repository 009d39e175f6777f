"""The VM's lifecycle: VmState's transitions, and the VMM moving along them."""

from __future__ import annotations

import pytest

from pych.api.errors import status_of
from pych.errors import InternalError, InvalidState, VmAlreadyCreated, VmNotCreated
from pych.vmm import VmState

from tests.unit.vmm.fakes import FakeVm, fake_vmm, vm_config

S = VmState
ALLOWED = {
    (S.NotCreated, S.Created), (S.NotCreated, S.Paused),
    (S.Created, S.Running), (S.Created, S.Shutdown),
    (S.Running, S.Paused), (S.Running, S.Shutdown),
    (S.Paused, S.Running), (S.Paused, S.Shutdown),
    (S.Shutdown, S.Running), (S.Shutdown, S.Shutdown), (S.Shutdown, S.NotCreated),
}


@pytest.mark.parametrize("old", list(VmState))
@pytest.mark.parametrize("new", list(VmState))
def test_the_transition_table(old, new):
    assert old.can_become(new) == ((old, new) in ALLOWED)
    if (old, new) in ALLOWED:
        assert old.become(new) is new
    else:
        with pytest.raises(InternalError) as e:
            old.become(new)
        assert e.value.messages == ["Invalid VM state transition", f"{old.value} -> {new.value}"]


def test_json_names_and_what_vm_info_shows():
    assert [s.value for s in VmState] == ["NotCreated", "Created", "Running", "Paused",
                                          "Shutdown"]
    assert VmState.NotCreated.reported == "Created"
    assert [s.reported for s in VmState][1:] == ["Created", "Running", "Paused", "Shutdown"]


@pytest.fixture
def vmm(monkeypatch):
    vmm = fake_vmm(monkeypatch)
    yield vmm
    vmm.close()


def test_the_vmm_walks_the_lifecycle(vmm):
    def state():
        return vmm.vm_info()["state"]

    assert vmm.state is VmState.NotCreated
    vmm.vm_create(vm_config())
    assert state() == "Created" and vmm.vm is None
    vmm.vm_boot()
    first = vmm.vm
    assert state() == "Running" and first.calls == ["boot"]
    vmm.vm_pause()
    assert state() == "Paused"
    vmm.vm_resume()
    assert state() == "Running"
    vmm.vm_reboot()
    assert state() == "Running" and vmm.vm is not first
    assert first.calls[-1] == ("close", True)                 # a reboot keeps connections
    vmm.vm_shutdown()
    assert state() == "Shutdown" and vmm.vm is None
    vmm.vm_boot()                                             # boots again from the config
    assert state() == "Running"
    vmm.vm_delete()
    assert vmm.state is VmState.NotCreated and vmm.config is None
    assert [event for _, event, _ in vmm.events.events] == [
        "booting", "booted", "paused", "resumed", "rebooting", "booting", "booted", "rebooted",
        "shutdown", "booting", "booted", "deleted"]


@pytest.mark.parametrize(("request_", "state", "error", "status"), [
    ("vm_boot", None, VmNotCreated, 404),
    ("vm_info", None, VmNotCreated, 404),
    ("vm_pause", None, VmNotCreated, 404),
    ("vm_pause", VmState.Created, InvalidState, 405),
    ("vm_resume", VmState.Running, InvalidState, 405),
    ("vm_pause", VmState.Paused, InvalidState, 405),
    ("vm_nmi", VmState.Paused, InvalidState, 405),
    ("vm_shutdown", VmState.Shutdown, InvalidState, 405),
    ("vm_reboot", VmState.Created, InvalidState, 405),
    ("vm_counters", VmState.Created, InvalidState, 405),
    ("vm_boot", VmState.Running, VmAlreadyCreated, 409),
    ("vm_boot", VmState.Paused, VmAlreadyCreated, 409),
])
def test_requests_that_do_not_fit_the_state(vmm, request_, state, error, status):
    if state is not None:
        vmm.vm_create(vm_config())
    if state in (VmState.Running, VmState.Paused, VmState.Shutdown):
        vmm.vm_boot()
    if state is VmState.Paused:
        vmm.vm_pause()
    if state is VmState.Shutdown:
        vmm.vm_shutdown()
    assert vmm.state is (state or VmState.NotCreated)
    with pytest.raises(error) as e:
        getattr(vmm, request_)()
    assert status_of(e.value) == status
    assert vmm.state is (state or VmState.NotCreated)          # nothing moved


def test_create_twice_is_409(vmm):
    vmm.vm_create(vm_config())
    with pytest.raises(VmAlreadyCreated) as e:
        vmm.vm_create(vm_config())
    assert e.value.messages == ["VM is already created"] and status_of(e.value) == 409


def test_a_failed_boot_stays_where_it_was(vmm, monkeypatch):
    vmm.vm_create(vm_config())

    def boom(self):
        raise RuntimeError("no luck")

    monkeypatch.setattr(FakeVm, "boot", boom)
    with pytest.raises(InternalError) as e:
        vmm.vm_boot()
    assert e.value.messages == ["Error booting VM", "no luck"] and status_of(e.value) == 500
    assert vmm.state is VmState.Created and vmm.vm is None


def test_guest_poweroff_and_reset(vmm):
    vmm.vm_create(vm_config())
    vmm.vm_boot()
    first = vmm.vm
    vmm._guest_exit(first, "reset", "")
    assert vmm.state is VmState.Running and vmm.vm is not first
    vmm._guest_exit(first, "poweroff", "")                    # stale: from the replaced VM
    assert vmm.state is VmState.Running
    vmm._guest_exit(vmm.vm, "poweroff", "")
    assert vmm.state is VmState.Shutdown and vmm.vm is None and vmm.exit_code == 0


def test_vmm_shutdown_of_a_vm_never_booted(vmm):
    vmm.vm_create(vm_config())
    vmm.vmm_shutdown()
    assert vmm.state is VmState.Shutdown and vmm.exit_code == 0
