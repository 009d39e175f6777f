"""KvmMsiVector against a recording VM: the route and irqfd it programs, and a vector taking
another eventfd as its irqfd (a vhost-user back-end's call eventfd handed over by a local
migration) before and after the guest programmed it."""

from __future__ import annotations

import os

import pytest

from pych.hypervisor.kvm.interrupts import KvmMsiVector


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


def _closed(fd: int) -> bool:
    try:
        os.fstat(fd)
    except OSError:
        return True
    return False


@pytest.mark.parametrize("programmed", [False, True])
def test_a_vector_takes_another_eventfd_as_its_irqfd(programmed):
    vm = RecordingVm()
    vector = KvmMsiVector(vm, 24)
    own = vector.fd
    if programmed:
        vector.update(0xFEE00000, 0x41, masked=False)
    passed = os.eventfd(0, os.EFD_CLOEXEC | os.EFD_NONBLOCK)
    vector.adopt_fd(passed)
    assert vector.fd == passed and _closed(own)
    if not programmed:                              # registered when the guest programs it
        assert vm.irqfds == {}
        vector.update(0xFEE00000, 0x41, masked=False)
    assert vm.irqfds == {24: passed}
    vector.trigger()
    assert os.eventfd_read(passed) == 1             # a trigger writes the adopted eventfd
    vector.release()
    assert vm.irqfds == {} and _closed(passed)
