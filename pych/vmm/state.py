"""The VM's life as the VMM sees it: a state and the transitions between states."""

from __future__ import annotations

import enum

from pych.errors import InternalError


class VmState(enum.Enum):
    """Where the VM is in its life; the values are Cloud Hypervisor's names.

    ``Running`` and ``Paused`` are exactly the states with a running :class:`~pych.vm.Vm`
    (KVM VM, vCPU threads, devices); in the others the VMM holds at most a configuration.
    """

    NotCreated = "NotCreated"
    """No configuration: only ``vm.create`` (or the command line's VM) leaves this state."""
    Created = "Created"
    """A configuration, never booted."""
    Running = "Running"
    Paused = "Paused"
    """Every vCPU parked and guest time frozen (``vm.pause``)."""
    Shutdown = "Shutdown"
    """Stopped (``vm.shutdown``, the guest powering off, a failed reboot; or torn down before
    it ever ran); ``vm.boot`` starts it again from its configuration."""

    @property
    def reported(self) -> str:
        """The name ``vm.info`` shows: the value, except that ``NotCreated`` reads ``Created``
        (``vm.info`` answers only for a created VM, so that spelling is a safety net)."""
        return VmState.Created.value if self is VmState.NotCreated else self.value

    def can_become(self, new: VmState) -> bool:
        return new in _NEXT[self]

    def become(self, new: VmState) -> VmState:
        """``new``, if this state may turn into it; a transition the table does not allow is a
        VMM bug (requests are checked against the state before they act)."""
        if not self.can_become(new):
            raise InternalError("Invalid VM state transition", f"{self.value} -> {new.value}")
        return new


# Every transition the VMM makes, and what makes it.
_NEXT: dict[VmState, frozenset[VmState]] = {
    VmState.NotCreated: frozenset({
        VmState.Created,                    # vm.create
        VmState.Paused,                     # vm.restore: a restored VM comes up paused
    }),
    VmState.Created: frozenset({
        VmState.Running,                    # vm.boot
        VmState.Shutdown,                   # stopped before it ever ran (vm.delete, vmm.shutdown)
    }),
    VmState.Running: frozenset({
        VmState.Paused,                     # vm.pause
        VmState.Shutdown,                   # vm.shutdown, guest poweroff, first half of a reboot
    }),
    VmState.Paused: frozenset({
        VmState.Running,                    # vm.resume
        VmState.Shutdown,                   # vm.shutdown, the first half of vm.reboot
    }),
    VmState.Shutdown: frozenset({
        VmState.Running,                    # vm.boot, the second half of a reboot
        VmState.Shutdown,                   # stopping what is already stopped (vm.delete, exit)
        VmState.NotCreated,                 # vm.delete
    }),
}
