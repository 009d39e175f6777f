from pych.arch.x86_64 import cpuid
from pych.arch.x86_64.cpuid import Topology, entry, find, shape_cpuid


def _supported():
    return [
        entry(0, eax=0x1F),
        entry(1, eax=0x806F8, ebx=0x0000_0800, ecx=cpuid.ECX_CX16 | cpuid.ECX_X2APIC, edx=0),
        entry(4, 0, eax=0x1C00_4121),
        entry(7, 0, edx=cpuid.EDX7_ARCH_CAPABILITIES | 1),
        entry(0xB, 0, edx=1, flags=1),            # KVM gives subleaf 0 only
        entry(0x1F, 0, edx=1, flags=1),
        entry(0x4000_0000, eax=0x4000_0001, ebx=0x4B4D564B),
        entry(0x4000_0001, eax=0x0100_7EFB),      # the PV features this host's KVM offers
        entry(0x8000_0007, edx=cpuid.EDX_INVARIANT_TSC),
    ]


def test_cx16_hidden_hypervisor_bit_set_and_apic_id_per_vcpu():
    topo = Topology.flat(8)
    for cpu in (0, 3, 7):
        table = shape_cpuid(_supported(), cpu, topo)
        leaf1 = find(table, 1)
        assert not leaf1.ecx & cpuid.ECX_CX16
        assert leaf1.ecx & cpuid.ECX_HYPERVISOR
        assert leaf1.ecx & cpuid.ECX_X2APIC
        assert leaf1.ebx >> 24 == cpu
        assert (leaf1.ebx >> 16) & 0xFF == 8
        assert find(table, 0xB, 0).edx == cpu
        assert find(table, 0xB, 1).ebx == 8
        assert find(table, 0xB, 2).ecx == 2 and find(table, 0xB, 2).ebx == 0   # terminator
        assert find(table, 0x1F, 1).ebx == 8 and find(table, 0x1F, 1).edx == cpu
        assert len([e for e in table if e.function == 0xB]) == 3
        assert not find(table, 7).edx & cpuid.EDX7_ARCH_CAPABILITIES
        assert find(table, 7).edx & 1
        assert find(table, 4).eax >> 26 == 7
        assert not find(table, 0x8000_0007).edx & cpuid.EDX_INVARIANT_TSC
        # PV IPIs hidden (a hanging hypercall on this host); the other PV features pass
        assert find(table, 0x4000_0001).eax == 0x0100_7EFB & ~cpuid.KVM_FEATURE_PV_SEND_IPI


def test_supported_table_is_not_modified():
    sup = _supported()
    shape_cpuid(sup, 5, Topology.flat(8))
    assert find(sup, 1).ecx & cpuid.ECX_CX16
    assert find(sup, 1).ebx == 0x800


def test_topology_apic_ids():
    topo = Topology(threads_per_core=2, cores_per_die=3, dies_per_package=1, packages=2)
    ids = [topo.apic_id(i) for i in range(12)]
    # thread bit 0, core bits 1-2, package bit 3
    assert ids == [0, 1, 2, 3, 4, 5, 8, 9, 10, 11, 12, 13]
    table = shape_cpuid(_supported(), 7, topo)
    assert find(table, 0xB, 0).eax == 1 and find(table, 0xB, 0).ebx == 2
    assert find(table, 0xB, 1).eax == 3 and find(table, 0xB, 1).ebx == 6
    assert Topology.flat(1).apic_id(0) == 0


def test_cpuid_table_packs_each_vcpus_shaped_table():
    """CpuidTable.packed(cpu) is shape_cpuid's table for that vCPU, packed: the template
    patching covers every field that differs between vCPUs (APIC ids past 255 included)."""
    import ctypes

    from pych.arch.x86_64.cpuid import CpuidTable
    from pych.hypervisor.kvm.bindings import kvm_cpuid_entry2

    for topo in (Topology.flat(8), Topology(2, 3, 2, 2), Topology.flat(300)):
        table = CpuidTable(_supported(), topo)
        for cpu in (0, 1, 5, 7, 299):
            shaped = shape_cpuid(_supported(), cpu, topo)
            assert table.count == len(shaped)
            assert bytes(table.packed(cpu)) == bytes((kvm_cpuid_entry2 * len(shaped))(*shaped))
    assert ctypes.sizeof(kvm_cpuid_entry2) * table.count == len(table.packed(0))
