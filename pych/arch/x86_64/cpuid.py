"""CPUID shaping: KVM's supported CPUID, made per-vCPU, with the few features hidden that
break guests on some hosts (each constant below says which and why).

Pure functions over lists of ``kvm_cpuid_entry2`` so they are unit tested without KVM.
"""

from __future__ import annotations

import ctypes
import struct
from dataclasses import dataclass

from pych.hypervisor.kvm.bindings import kvm_cpuid_entry2

# leaf 1
ECX_CX16 = 1 << 13          # hidden: a nested KVM (kvm_pvm) cannot emulate cmpxchg16b (pvm-host.md)
ECX_X2APIC = 1 << 21
ECX_TSC_DEADLINE = 1 << 24
ECX_HYPERVISOR = 1 << 31
EDX_HTT = 1 << 28
# leaf 7 subleaf 0
EDX7_ARCH_CAPABILITIES = 1 << 29   # hidden: its MSR 0x10a is not usable under kvm_pvm
                                   # (QEMU needs -arch-capabilities there)

KVM_CPUID_FLAG_SIGNIFICANT_INDEX = 1
# leaf 0x80000007
EDX_INVARIANT_TSC = 1 << 8   # hidden: kvm_pvm ignores guest TSC writes, so only kvmclock
                             # (KVM_SET_CLOCK) can be frozen across a pause

# leaf 0x40000001: KVM paravirtual features (EAX)
LEAF_KVM_FEATURES = 0x4000_0001
KVM_FEATURE_PV_SEND_IPI = 1 << 11   # hidden: under kvm_pvm a KVM_HC_SEND_IPI hypercall can spin
                                    # in the host forever (measured: the sender stuck on its vmcall,
                                    # RIP unchanged for minutes, its host thread at 100 %, while
                                    # IPI-ing hot-added vCPUs); without it the guest writes the
                                    # x2APIC ICR, which KVM handles in-kernel as well

LEAF_TOPOLOGY = 0x0B
LEAF_EXT_TOPOLOGY = 0x1F
LEVEL_TYPE_SMT = 1
LEVEL_TYPE_CORE = 2


@dataclass(frozen=True)
class Topology:
    threads_per_core: int = 1
    cores_per_die: int = 1
    dies_per_package: int = 1
    packages: int = 1

    @classmethod
    def flat(cls, max_vcpus: int) -> "Topology":
        """The reference's default: one package holding every possible vCPU as a core."""
        return cls(1, max_vcpus, 1, 1)

    @property
    def thread_bits(self) -> int:
        return (self.threads_per_core - 1).bit_length()

    @property
    def core_bits(self) -> int:
        return (self.cores_per_die - 1).bit_length()

    @property
    def die_bits(self) -> int:
        return (self.dies_per_package - 1).bit_length()

    def apic_id(self, cpu_id: int) -> int:
        """x2APIC id of ``cpu_id`` with thread/core/die/package fields packed by width."""
        t = cpu_id % self.threads_per_core
        c = (cpu_id // self.threads_per_core) % self.cores_per_die
        d = (cpu_id // (self.threads_per_core * self.cores_per_die)) % self.dies_per_package
        p = cpu_id // (self.threads_per_core * self.cores_per_die * self.dies_per_package)
        return (((p << self.die_bits | d) << self.core_bits | c) << self.thread_bits) | t


def _copy(e: kvm_cpuid_entry2) -> kvm_cpuid_entry2:
    return kvm_cpuid_entry2.from_buffer_copy(bytes(e))


def shape_cpuid(supported: list[kvm_cpuid_entry2], cpu_id: int, topology: Topology) -> list[kvm_cpuid_entry2]:
    """The CPUID table for one vCPU."""
    apic_id = topology.apic_id(cpu_id)
    threads_per_package = topology.threads_per_core * topology.cores_per_die * topology.dies_per_package
    out: list[kvm_cpuid_entry2] = []
    for src in supported:
        if src.function in (LEAF_TOPOLOGY, LEAF_EXT_TOPOLOGY):
            if src.index == 0:    # KVM reports subleaf 0 only: pych writes the whole leaf
                out += [_topology_leaf(_copy(src), i, apic_id, topology) for i in range(3)]
            continue
        e = _copy(src)
        if e.function == 1:
            e.ecx &= ~ECX_CX16
            e.ecx |= ECX_HYPERVISOR
            e.ebx = (e.ebx & 0x0000_FFFF) | (apic_id << 24) | (min(threads_per_package, 255) << 16)
            e.edx |= EDX_HTT
        elif e.function == 4:
            # EAX[31:26]: addressable core ids per package - 1
            cores = topology.cores_per_die * topology.dies_per_package
            e.eax = (e.eax & 0x03FF_FFFF) | ((min(cores, 64) - 1) << 26)
        elif e.function == 7 and e.index == 0:
            e.edx &= ~EDX7_ARCH_CAPABILITIES
        elif e.function == 0x8000_0007:
            e.edx &= ~EDX_INVARIANT_TSC
        elif e.function == LEAF_KVM_FEATURES:
            e.eax &= ~KVM_FEATURE_PV_SEND_IPI
        out.append(e)
    return out


class CpuidTable:
    """The packed CPUID entries of every vCPU of one VM, shaped once.

    vCPUs' tables differ only in the APIC id (leaf 1 EBX[31:24], leaves 0xB/0x1F EDX), so
    :meth:`packed` copies one template and sets those fields: microseconds, where shaping
    the table again costs ~0.2 ms here, on the path of a vCPU hot add's answer.
    """

    def __init__(self, supported: list[kvm_cpuid_entry2], topology: Topology):
        self.topology = topology
        entries = shape_cpuid(supported, 0, topology)
        self.count = len(entries)
        self._template = bytes((kvm_cpuid_entry2 * self.count)(*entries))
        size = ctypes.sizeof(kvm_cpuid_entry2)
        self._leaf1_ebx = [i * size + kvm_cpuid_entry2.ebx.offset
                           for i, e in enumerate(entries) if e.function == 1]
        self._topology_edx = [i * size + kvm_cpuid_entry2.edx.offset
                              for i, e in enumerate(entries)
                              if e.function in (LEAF_TOPOLOGY, LEAF_EXT_TOPOLOGY)]

    def packed(self, cpu_id: int) -> bytearray:
        """vCPU ``cpu_id``'s entries, packed as KVM_SET_CPUID2 takes them: the same bytes
        as ``shape_cpuid(supported, cpu_id, topology)``."""
        apic_id = self.topology.apic_id(cpu_id)
        buf = bytearray(self._template)
        for off in self._leaf1_ebx:
            ebx = _U32.unpack_from(buf, off)[0]
            _U32.pack_into(buf, off, (ebx & 0x00FF_FFFF) | ((apic_id << 24) & 0xFFFF_FFFF))
        for off in self._topology_edx:
            _U32.pack_into(buf, off, apic_id & 0xFFFF_FFFF)
        return buf


_U32 = struct.Struct("<I")


def _topology_leaf(e: kvm_cpuid_entry2, index: int, apic_id: int, topo: Topology) -> kvm_cpuid_entry2:
    """Subleaf ``index`` of leaf 0xB/0x1F: SMT level, core level, then the terminator."""
    e.index = index
    e.flags |= KVM_CPUID_FLAG_SIGNIFICANT_INDEX
    e.edx = apic_id
    if e.index == 0:
        e.eax, e.ebx, e.ecx = topo.thread_bits, topo.threads_per_core, (LEVEL_TYPE_SMT << 8)
    elif e.index == 1:
        shift = topo.thread_bits + topo.core_bits + (topo.die_bits if e.function == LEAF_TOPOLOGY else 0)
        count = topo.threads_per_core * topo.cores_per_die
        if e.function == LEAF_TOPOLOGY:
            count *= topo.dies_per_package
        e.eax, e.ebx, e.ecx = shift, count, (LEVEL_TYPE_CORE << 8) | 1
    else:
        e.eax, e.ebx, e.ecx = 0, 0, e.index
    return e


def find(entries: list[kvm_cpuid_entry2], function: int, index: int = 0) -> kvm_cpuid_entry2 | None:
    for e in entries:
        if e.function == function and e.index == index:
            return e
    return None


def entry(function: int, index: int = 0, eax: int = 0, ebx: int = 0, ecx: int = 0, edx: int = 0,
          flags: int = 0) -> kvm_cpuid_entry2:
    return kvm_cpuid_entry2(function=function, index=index, flags=flags, eax=eax, ebx=ebx, ecx=ecx, edx=edx)


assert ctypes.sizeof(kvm_cpuid_entry2) == 40
