"""The CPU hot plug register block ``\\_SB_.PRES`` without KVM: selection, status, the
guest's scan, acks and ejects (../shared/notes/ch-hotplug-reference.md §3)."""

from __future__ import annotations

from pych.cpu.hotplug import CpuHotplugController, VcpuState

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


# --- the AML's size ----------------------------------------------------------------------------
def test_the_aml_describes_exactly_the_possible_cpus():
    """One processor object (``_HID`` ACPI0007) per possible vCPU (max_vcpus), none beyond: a
    guest parses no CPU it could never get, and every CPU it could get is there to hot plug."""
    for max_vcpus in (1, 4, 17):
        aml = C(0x1000, max_vcpus, 1, is_active=lambda cpu: True, eject=lambda cpu: True).to_aml()
        assert aml.count(b"ACPI0007") == max_vcpus
        assert all(f"C{cpu:03X}".encode() in aml for cpu in range(max_vcpus))
        assert f"C{max_vcpus:03X}".encode() not in aml
