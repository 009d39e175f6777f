"""CPU hot plug without KVM: CpuManager.resize over fake vCPUs, the VMM's vm.resize/vm.info
for vCPUs, and ``pych-remote resize --wait`` (the register block: test_hotplug.py)."""

from __future__ import annotations

import os
import shutil
import tempfile
from pathlib import Path

import pytest

from pych.api import ApiServer, RequestHandler
from pych.api.errors import status_of
from pych.errors import VmmError
from pych.cli.remote import main as remote_main
from pych.config import VmConfig, VmResize
from pych.cpu import manager as cpu_manager
from pych.cpu.hotplug import CpuHotplugController
from pych.cpu.manager import CpuManager, VcpuRemovalPending
from pych.devices.acpi import AcpiNotification
from pych.devices.bus import Bus
from pych.hypervisor.kvm import bindings as kb
from pych.vmm import Vmm



from tests.support.machines import BootedVm, run_as_booted

C = CpuHotplugController


# --- CpuManager.resize over fake vCPUs --------------------------------------------------------
class FakeVcpu:
    def __init__(self, index: int):
        self.index = index
        self.closed = False

    def set_cpuid_packed(self, count, entries): pass
    def set_msrs(self, msrs): return msrs.count
    def set_fpu(self, fpu): pass
    def get_lapic(self): return kb.kvm_lapic_state()
    def set_lapic(self, state): pass
    def close(self): self.closed = True


class FakeVm:
    def __init__(self):
        self.created: list[int] = []

    def create_vcpu(self, index: int) -> FakeVcpu:
        if index in self.created:
            raise OSError(17, "EEXIST: KVM vCPU fds are never destroyed")
        self.created.append(index)
        return FakeVcpu(index)


class FakeKvm:
    max_vcpus = 64

    def supported_cpuid(self):
        return []


class FakeThread:
    """Stands in for VcpuThread: records start/stop/pause."""

    def __init__(self, vcpu, pio, mmio, on_exit, *, host_cpus=None):
        self.vcpu, self.index = vcpu, vcpu.index
        self.host_cpus = host_cpus
        self.thread = None
        self.paused = self.stopped = self.started = False

    def start(self, *, paused=False, starter=None):
        self.paused = paused
        self.starter = starter
        self.started = True

    def pause(self):
        self.paused = True

    def resume(self):
        self.paused = False

    def stop(self):
        self.stopped = True
        return True


@pytest.fixture
def manager(monkeypatch):
    monkeypatch.setattr(cpu_manager, "VcpuThread", FakeThread)
    notified: list[int] = []
    mmio = Bus("mmio")
    m = CpuManager(FakeKvm(), FakeVm(), Bus("pio"), mmio, boot_vcpus=2, max_vcpus=4,
                   topology=None, on_exit=lambda kind, detail: None, notify=notified.append)
    for cpu in range(2):
        m._create_vcpu(cpu)
    m.start()
    return m, mmio, notified


def guest_ejects(mmio: Bus, cpu: int) -> None:
    """The guest's CEJ0 through the MMIO bus (PRES is on it at its layout address)."""
    base = cpu_manager.layout.ACPI_CPU_HOTPLUG_ADDR
    mmio.write(base + C.CSEL, 4, cpu)
    mmio.write(base + C.STATUS, 1, C.CEJ0)


def test_resize_up_creates_and_starts_vcpus_marks_them_inserting_and_notifies(manager):
    m, _, notified = manager
    assert m.resize(4) is True
    assert m.kvm_vm.created == [0, 1, 2, 3]
    assert sorted(m.threads) == [0, 1, 2, 3]
    assert [s.value for s in m.states()] == ["present", "present", "inserting", "inserting"]
    assert notified == [AcpiNotification.CPU]
    assert m.requested_vcpus == 4


def test_affinity_goes_to_boot_and_hot_added_vcpu_threads_only_for_pinned_vcpus(monkeypatch):
    monkeypatch.setattr(cpu_manager, "VcpuThread", FakeThread)
    m = CpuManager(FakeKvm(), FakeVm(), Bus("pio"), Bus("mmio"), boot_vcpus=1, max_vcpus=3,
                   topology=None, on_exit=lambda kind, detail: None, notify=lambda n: None,
                   affinity={0: frozenset({0, 1}), 2: frozenset({1})})
    m._create_vcpu(0)
    m.start()
    m.resize(3)
    assert {cpu: t.host_cpus for cpu, t in m.threads.items()} == {
        0: frozenset({0, 1}), 1: None, 2: frozenset({1})}


def test_same_count_is_a_no_op_and_counts_outside_1_to_max_are_refused(manager):
    m, _, notified = manager
    assert m.resize(2) is False and notified == []
    for bad in (0, 5):
        with pytest.raises(ValueError, match="between 1 and max"):
            m.resize(bad)


def test_resize_down_waits_for_the_guest_then_up_again_reuses_the_vcpus(manager):
    m, mmio, notified = manager
    m.resize(4)
    assert m.resize(2) is True
    assert notified == [AcpiNotification.CPU] * 2
    assert [s.value for s in m.states()] == ["present", "present", "removing", "removing"]
    assert m.requested_vcpus == 2 and sorted(m.threads) == [0, 1, 2, 3]
    assert m.resize(2) is False                 # what was asked: nothing to do
    with pytest.raises(VcpuRemovalPending, match="retry later"):
        m.resize(3)
    stopping = m.threads[3]
    guest_ejects(mmio, 3)
    assert stopping.stopped and sorted(m.threads) == [0, 1, 2]
    with pytest.raises(VcpuRemovalPending):
        m.resize(1)
    guest_ejects(mmio, 2)
    assert [s.value for s in m.states()] == ["present", "present", "ejected", "ejected"]
    assert m.resize(3) is True
    assert m.kvm_vm.created == [0, 1, 2, 3]         # vCPU 2 reused, not created again
    assert sorted(m.threads) == [0, 1, 2]
    assert [s.value for s in m.states()] == ["present", "present", "inserting", "ejected"]


def test_vcpus_hot_plugged_while_paused_start_paused(manager):
    m, _, _ = manager
    m.pause()
    m.resize(3)
    assert m.threads[2].paused
    m.resume()
    assert not any(t.paused for t in m.threads.values())


def test_hot_added_vcpu_threads_start_when_start_later_runs_them_as_the_vm_is_then(
        monkeypatch):
    """``start_later`` (the VMM's: once the request is answered) gets the start of the new
    vCPUs' threads: registered at once (the guest's _STA sees them present), started when
    it runs, paused if the VM was paused meanwhile."""
    monkeypatch.setattr(cpu_manager, "VcpuThread", FakeThread)
    later: list = []
    m = CpuManager(FakeKvm(), FakeVm(), Bus("pio"), Bus("mmio"), boot_vcpus=1, max_vcpus=3,
                   topology=None, on_exit=lambda kind, detail: None, notify=lambda n: None,
                   start_later=later.append)
    m._create_vcpu(0)
    m.start()
    assert m.resize(3) is True
    assert len(later) == 1 and sorted(m.threads) == [0, 1, 2]
    assert [s.value for s in m.states()] == ["present", "inserting", "inserting"]
    assert not m.threads[1].started and not m.threads[2].started
    m.pause()
    later.pop()()
    assert m.threads[1].started and m.threads[1].paused and m.threads[2].paused


# --- the VMM: vm.resize and vm.info -----------------------------------------------------------
def created_vmm(boot: int = 2, max_vcpus: int = 4) -> Vmm:
    vmm = Vmm()
    vmm.vm_create(VmConfig.model_validate({
        "payload": {"kernel": __file__}, "cpus": {"boot_vcpus": boot, "max_vcpus": max_vcpus}}))
    return vmm


def test_resize_before_boot_only_edits_the_configuration():
    vmm = created_vmm()
    vmm.vm_resize(VmResize(desired_vcpus=3))
    info = vmm.vm_info()
    assert info["config"]["cpus"]["boot_vcpus"] == 3
    assert "cpus" not in info                     # no live vCPUs before boot


def test_resize_beyond_max_is_400_with_a_message():
    vmm = created_vmm()
    with pytest.raises(VmmError) as e:
        vmm.vm_resize(VmResize(desired_vcpus=5))
    assert status_of(e.value) == 400
    assert e.value.messages == ["Error resizing VM vCPUs",
                                "desired_vcpus 5 is not between 1 and max_vcpus (4)"]
    assert vmm.config.cpus.boot_vcpus == 2


def test_running_vm_resize_updates_config_reports_states_and_429s_while_removing(manager):
    m, mmio, _ = manager
    vmm = created_vmm()
    run_as_booted(vmm, BootedVm(cpus=m))
    vmm.vm_resize(VmResize(desired_vcpus=4))
    vmm.vm_resize(VmResize(desired_vcpus=3))
    info = vmm.vm_info()
    assert info["config"]["cpus"]["boot_vcpus"] == 3
    assert info["cpus"] == [{"id": 0, "state": "present"}, {"id": 1, "state": "present"},
                            {"id": 2, "state": "inserting"}, {"id": 3, "state": "removing"}]
    with pytest.raises(VmmError) as e:
        vmm.vm_resize(VmResize(desired_vcpus=2))
    assert status_of(e.value) == 429 and "pending" in e.value.messages[1]
    assert vmm.config.cpus.boot_vcpus == 3
    guest_ejects(mmio, 3)
    vmm.vm_resize(VmResize(desired_vcpus=2))
    assert vmm.config.cpus.boot_vcpus == 2


# --- pych-remote resize --wait ---------------------------------------------------------------
class WaitHandler(RequestHandler):
    """vm.resize records the request; vm.info walks through ``self.timeline`` of vCPU states."""

    def __init__(self, timeline: list[list[str]], state: str = "Running"):
        self.timeline = timeline
        self.state = state
        self.resizes: list[VmResize] = []

    def vm_resize(self, resize):
        self.resizes.append(resize)

    def vm_info(self):
        states = self.timeline.pop(0) if len(self.timeline) > 1 else self.timeline[0]
        return {"config": {}, "state": self.state,
                "cpus": [{"id": i, "state": s} for i, s in enumerate(states)]}


@pytest.fixture
def serve():
    directory = Path(tempfile.mkdtemp(prefix="pych-cpuwait-", dir="/tmp"))
    servers = []

    def start(handler: RequestHandler) -> str:
        server = ApiServer(lambda fn: fn(handler), path=directory / "api.sock")
        server.start()
        servers.append(server)
        return os.fspath(directory / "api.sock")

    yield start
    for server in servers:
        server.close()
    shutil.rmtree(directory, ignore_errors=True)


def test_wait_returns_once_added_cpus_are_present(serve, capsys):
    handler = WaitHandler([["present", "present", "inserting", "absent"],
                           ["present", "present", "present", "absent"]])
    path = serve(handler)
    assert remote_main(["--api-socket", path, "resize", "--cpus", "3", "--wait=10"]) == 0
    assert handler.resizes[0].desired_vcpus == 3
    assert handler.timeline == [["present", "present", "present", "absent"]]


def test_wait_returns_once_removed_cpus_are_ejected(serve):
    handler = WaitHandler([["present", "removing", "removing"],
                           ["present", "removing", "ejected"],
                           ["present", "ejected", "ejected"]])
    path = serve(handler)
    assert remote_main(["--api-socket", path, "resize", "--cpus", "1", "--wait"]) == 0
    assert len(handler.timeline) == 1


def test_wait_times_out_with_a_clear_error(serve, capsys):
    path = serve(WaitHandler([["present", "present", "removing"]]))
    assert remote_main(["--api-socket", path, "resize", "--cpus", "2", "--wait=0.5"]) == 1
    err = capsys.readouterr().err
    assert "timed out after 0.5 s waiting for the guest to reach 2 vCPUs" in err
    assert "vCPU 2 is removing" in err


def test_wait_needs_cpus(serve, capsys):
    handler = WaitHandler([["present"]])
    path = serve(handler)
    assert remote_main(["--api-socket", path, "resize", "--memory", "1G", "--wait"]) == 1
    assert "--wait needs --cpus" in capsys.readouterr().err
    assert handler.resizes == []


def test_wait_on_a_vm_not_running_returns_at_once(serve):
    handler = WaitHandler([["absent"]], state="Created")
    path = serve(handler)
    assert remote_main(["--api-socket", path, "resize", "--cpus", "1", "--wait=5"]) == 0
