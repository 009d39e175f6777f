"""The KVM hypervisor layer: ioctls, ctypes structures, Kvm/Vm/Vcpu objects."""

from .kvm import EmulationFailure, IoExit, Kvm, KvmError, MmioExit, SystemEvent, Vcpu, Vm

__all__ = ["EmulationFailure", "IoExit", "Kvm", "KvmError", "MmioExit", "SystemEvent", "Vcpu", "Vm"]
