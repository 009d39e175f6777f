"""KvmMsiVector against a recording VM: the route and irqfd it programs, and a vector taking
another eventfd as its irqfd (a vhost-user back-end's call eventfd handed over by a local
migration) before and after the guest programmed it."""

from __future__ import annotations

import os

import pytest

from pych.hypervisor.kvm.interrupts import KvmMsiVector
from tests.support.host import fd_is_open


class RecordingVm:
    def __init__(self):
        self.log: list[tuple] = []
        self.irqfds: dict[int, int] = {}          # gsi -> fd

    def set_msi_route(self, gsi, address, data):
        self.log.append(("route", gsi, address, data))

    def register_irqfd(self, fd, gsi):
        assert gsi not in self.irqfds
        self.irqfds[gsi] = fd
        self.log.append(("irqfd", fd, gsi))

    def unregister_irqfd(self, fd, gsi):
        assert self.irqfds.pop(gsi) == fd
        self.log.append(("no irqfd", fd, gsi))

    def remove_route(self, gsi):
        self.log.append(("no route", gsi))



@pytest.mark.parametrize("programmed", [False, True])
def test_a_vector_takes_another_eventfd_as_its_irqfd(programmed):
    vm = RecordingVm()
    vector = KvmMsiVector(vm, 24)
    own = vector.fd
    if programmed:
        vector.update(0xFEE00000, 0x41, masked=False)
    passed = os.eventfd(0, os.EFD_CLOEXEC | os.EFD_NONBLOCK)
    vector.adopt_fd(passed)
    assert vector.fd == passed and not fd_is_open(own)
    if not programmed:                              # registered when the guest programs it
        assert vm.irqfds == {}
        vector.update(0xFEE00000, 0x41, masked=False)
    assert vm.irqfds == {24: passed}
    vector.trigger()
    assert os.eventfd_read(passed) == 1             # a trigger writes the adopted eventfd
    vector.release()
    assert vm.irqfds == {} and not fd_is_open(passed)


class BusyOnceVm(RecordingVm):
    """A kernel where another VM still holds the eventfd as its irqfd for a while."""

    def __init__(self, busy: int):
        super().__init__()
        self.busy = busy

    def register_irqfd(self, fd, gsi):
        if self.busy:
            self.busy -= 1
            from pych.hypervisor.kvm.kvm import KvmError
            try:
                raise OSError(16, "Device or resource busy")
            except OSError as e:
                raise KvmError("ioctl 0x4020ae76 failed: Device or resource busy") from e
        super().register_irqfd(fd, gsi)


def test_a_vector_lets_its_irqfd_go_for_a_migration_and_takes_it_back():
    vm = BusyOnceVm(busy=0)
    vector = KvmMsiVector(vm, 25)
    vector.update(0xFEE00000, 0x42, masked=False)
    assert vm.irqfds == {25: vector.fd}
    vector.detach_irqfd()                       # the receiver registers the eventfd now
    assert vm.irqfds == {}
    vector.update(0xFEE00000, 0x43, masked=False)   # routes still follow the guest
    assert vm.irqfds == {} and vm.log[-1] == ("route", 25, 0xFEE00000, 0x43)
    vm.busy = 3                                 # the receiver is still letting go
    vector.attach_irqfd()
    assert vm.irqfds == {25: vector.fd} and vm.busy == 0
    vector.release()
    assert vm.irqfds == {}


def test_a_vector_gives_up_when_the_eventfd_stays_busy():
    from pych.hypervisor.kvm.kvm import KvmError
    vm = BusyOnceVm(busy=0)
    vector = KvmMsiVector(vm, 26)
    vector.update(0xFEE00000, 0x42, masked=False)
    vector.detach_irqfd()
    vm.busy = 10 ** 6
    with pytest.raises(KvmError, match="busy"):
        vector.attach_irqfd(wait=0.1)
    vector.release()
