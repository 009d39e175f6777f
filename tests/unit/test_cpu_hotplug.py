"""CPU hot plug without KVM: the PRES register block, CpuManager.resize over fake vCPUs, the
VMM's vm.resize/vm.info for vCPUs, and ``pych-remote resize --wait``."""

from __future__ import annotations

import os
import shutil
import tempfile
from pathlib import Path

import pytest

from pych import cpu as cpu_module
from pych.api import ApiError, ApiServer, RequestHandler
from pych.cli.remote import main as remote_main
from pych.config import VmConfig, VmResize
from pych.cpu import CpuHotplugController, CpuManager, VcpuRemovalPending, VcpuState
from pych.devices.acpi import AcpiNotification
from pych.devices.bus import Bus
from pych.hypervisor.kvm import bindings as kb
from pych.vmm import Vmm

from tests.support.machines import BootedVm, run_as_booted

C = CpuHotplugController


# --- the register block ----------------------------------------------------------------------
class Block:
    """A controller over 4 CPUs whose threads are ``self.active``; eject stops them."""

    def __init__(self, boot_vcpus: int = 2, *, eject_succeeds: bool = True):
        self.active = set(range(boot_vcpus))
        self.ejected: list[int] = []
        self.eject_succeeds = eject_succeeds
        self.c = C(0x1000, 4, boot_vcpus, is_active=lambda cpu: cpu in self.active,
                   eject=self._eject)

    def _eject(self, cpu: int) -> bool:
        self.ejected.append(cpu)
        if self.eject_succeeds:
            self.active.discard(cpu)
        return self.eject_succeeds

    def select(self, cpu: int) -> None:
        self.c.write(C.CSEL, 4, cpu)

    def status(self, cpu: int) -> int:
        self.select(cpu)
        return self.c.read(C.STATUS, 1)

    def command(self, cpu: int, bits: int) -> None:
        self.select(cpu)
        self.c.write(C.STATUS, 1, bits)

    def scan(self) -> list[tuple[int, int]]:
        """What CSCN does: select each CPU, notify and ack CINS, then CRMV."""
        notifies = []
        for cpu in range(4):
            self.select(cpu)
            if self.c.read(C.STATUS, 1) & C.CINS:
                notifies.append((cpu, 1))
                self.c.write(C.STATUS, 1, C.CINS)
            if self.c.read(C.STATUS, 1) & C.CRMV:
                notifies.append((cpu, 3))
                self.c.write(C.STATUS, 1, C.CRMV)
        return notifies

    def sta(self, cpu: int) -> int:
        """What CSTA does: select, read CPEN."""
        return 0x0F if self.status(cpu) & C.CPEN else 0

    def states(self) -> list[str]:
        return [self.c.state(cpu).value for cpu in range(4)]


def test_selector_is_a_4_byte_register_and_other_widths_are_ignored():
    b = Block()
    b.select(3)
    assert b.c.read(C.CSEL, 4) == 3
    b.c.write(C.CSEL, 1, 1)
    assert b.c.read(C.CSEL, 4) == 3
    assert b.c.read(C.CSEL, 2) == 0
    assert b.c.read(C.STATUS, 4) == 0
    assert b.c.read(0x05, 1) == 0 and b.c.read(0x08, 4) == 0     # CCMD, CDAT: unused


def test_status_shows_boot_cpus_enabled_and_out_of_range_cpus_as_zero():
    b = Block()
    assert [b.status(cpu) for cpu in range(4)] == [C.CPEN, C.CPEN, 0, 0]
    assert b.status(4) == 0 and b.status(0xFFFF_FFFF) == 0
    assert b.states() == ["present", "present", "absent", "absent"]


def test_insertion_is_seen_by_the_scan_acked_and_present_only_after_sta():
    b = Block()
    b.active |= {2, 3}
    b.c.insert([2, 3])
    assert b.status(2) == C.CPEN | C.CINS
    assert b.states() == ["present", "present", "inserting", "inserting"]
    assert b.scan() == [(2, 1), (3, 1)]
    assert b.status(2) == C.CPEN            # acked: CINS reads 0 now
    assert b.scan() == []
    # The scan's own reads (under the selection made before the ack) do not count as _STA;
    # the status read above for CPU 2 did (a fresh selection after the ack).
    assert b.states() == ["present", "present", "present", "present"]


def test_scan_alone_does_not_report_the_cpu_present():
    b = Block()
    b.active.add(2)
    b.c.insert([2])
    assert b.scan() == [(2, 1)]
    assert b.c.state(2) is VcpuState.INSERTING
    assert b.sta(2) == 0x0F
    assert b.c.state(2) is VcpuState.PRESENT


def test_removal_is_notified_acked_and_ejected_on_the_private_flag():
    b = Block(boot_vcpus=4)
    b.c.remove([2, 3])
    assert b.c.removal_pending()
    assert b.status(3) == C.CPEN | C.CRMV
    assert b.scan() == [(2, 3), (3, 3)]
    assert b.status(3) == C.CPEN            # CRMV acked by the scan ...
    assert b.states()[2:] == ["removing", "removing"]
    b.command(3, C.CEJ0)                    # ... yet the eject is honoured (reference §3.4)
    assert b.ejected == [3] and b.status(3) == 0
    assert b.states() == ["present", "present", "removing", "ejected"]
    assert b.c.removal_pending()
    b.command(2, C.CEJ0)
    assert not b.c.removal_pending()
    assert b.states() == ["present", "present", "ejected", "ejected"]


def test_eject_is_refused_for_cpu_0_and_cpus_not_being_removed():
    b = Block(boot_vcpus=4)
    b.command(1, C.CEJ0)
    b.command(0, C.CEJ0)
    b.c.remove([0])                          # even if the VMM asked (it never does)
    b.command(0, C.CEJ0)
    b.command(7, C.CEJ0)                     # out of range
    assert b.ejected == []
    assert b.c.read(C.STATUS, 1) == 0 and b.status(1) == C.CPEN


def test_a_cpu_that_cannot_be_stopped_stays_pending_removal():
    b = Block(boot_vcpus=3, eject_succeeds=False)
    b.c.remove([2])
    b.command(2, C.CEJ0)
    assert b.ejected == [2]
    assert b.c.removal_pending() and b.c.state(2) is VcpuState.REMOVING


def test_reinserting_an_ejected_cpu_starts_afresh():
    b = Block(boot_vcpus=3)
    b.c.remove([2])
    b.command(2, C.CEJ0)
    b.active.add(2)
    b.c.insert([2])
    assert b.c.state(2) is VcpuState.INSERTING and not b.c.removal_pending()
    assert b.status(2) == C.CPEN | C.CINS


# --- CpuManager.resize over fake vCPUs --------------------------------------------------------
class FakeVcpu:
    def __init__(self, index: int):
        self.index = index
        self.closed = False

    def set_cpuid(self, entries): pass
    def set_msrs(self, msrs): return len(msrs)
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

    def __init__(self, vcpu, pio, mmio, on_exit):
        self.vcpu, self.index = vcpu, vcpu.index
        self.thread = None
        self.paused = self.stopped = False
        self.exits = 0

    def start(self, *, paused=False):
        self.paused = paused

    def pause(self):
        self.paused = True

    def resume(self):
        self.paused = False

    def stop(self):
        self.stopped = True
        return True


@pytest.fixture
def manager(monkeypatch):
    monkeypatch.setattr(cpu_module, "VcpuThread", FakeThread)
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
    base = cpu_module.layout.ACPI_CPU_HOTPLUG_ADDR
    mmio.write(base + C.CSEL, 4, cpu)
    mmio.write(base + C.STATUS, 1, C.CEJ0)


def test_resize_up_creates_and_starts_vcpus_marks_them_inserting_and_notifies(manager):
    m, _, notified = manager
    assert m.resize(4) is True
    assert m.vm.created == [0, 1, 2, 3]
    assert sorted(m.threads) == [0, 1, 2, 3]
    assert [s.value for s in m.states()] == ["present", "present", "inserting", "inserting"]
    assert notified == [AcpiNotification.CPU]
    assert m.requested_vcpus == 4


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
    assert m.vm.created == [0, 1, 2, 3]         # vCPU 2 reused, not created again
    assert sorted(m.threads) == [0, 1, 2]
    assert [s.value for s in m.states()] == ["present", "present", "inserting", "ejected"]


def test_vcpus_hot_plugged_while_paused_start_paused(manager):
    m, _, _ = manager
    m.pause()
    m.resize(3)
    assert m.threads[2].paused
    m.resume()
    assert not any(t.paused for t in m.threads.values())


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
    with pytest.raises(ApiError) as e:
        vmm.vm_resize(VmResize(desired_vcpus=5))
    assert e.value.status == 400
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
    with pytest.raises(ApiError) as e:
        vmm.vm_resize(VmResize(desired_vcpus=2))
    assert e.value.status == 429 and "pending" in e.value.messages[1]
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
