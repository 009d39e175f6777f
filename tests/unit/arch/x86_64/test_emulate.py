import pytest
from hypothesis import given, strategies as st

from pych.arch.x86_64 import emulate as emu
from pych.hypervisor.kvm.bindings import kvm_regs


def regs(**kw):
    r = kvm_regs(rip=0x1000, rflags=0x2)
    for k, v in kw.items():
        setattr(r, k, v)
    return r


def test_fwait_is_skipped():
    done = emu.emulate(b"\x9b\x90", regs())
    assert done.regs.rip == 0x1001 and done.inject_exception is None


def test_int3_injects_breakpoint_after_the_instruction():
    done = emu.emulate(b"\xcc", regs())
    assert done.regs.rip == 0x1001 and done.inject_exception == emu.BP_VECTOR


def test_clac_stac():
    assert not emu.emulate(b"\x0f\x01\xca", regs(rflags=0x2 | emu.RFLAGS_AC)).regs.rflags & emu.RFLAGS_AC
    done = emu.emulate(b"\x0f\x01\xcb", regs())
    assert done.regs.rflags & emu.RFLAGS_AC and done.regs.rip == 0x1003


@given(st.integers(min_value=0, max_value=2**64 - 1))
def test_popcnt_rax_rdi_64(value):
    # popcnt rax, rdi: f3 48 0f b8 c7
    done = emu.emulate(bytes.fromhex("f3480fb8c7"), regs(rdi=value, rax=0xFFFF, rflags=0x2 | 0x8D5))
    assert done.regs.rax == bin(value).count("1")
    assert done.regs.rip == 0x1005
    assert bool(done.regs.rflags & emu.RFLAGS_ZF) == (value == 0)
    assert not done.regs.rflags & (emu.RFLAGS_CF | emu.RFLAGS_SF | emu.RFLAGS_OF | emu.RFLAGS_PF)


def test_popcnt_32bit_zero_extends_and_rex_registers():
    # popcnt r9d, r10d: f3 45 0f b8 ca
    done = emu.emulate(bytes.fromhex("f3450fb8ca"), regs(r10=0xFFFF_FFFF_0000_00FF, r9=2**63))
    assert done.regs.r9 == 8
    # popcnt ax, cx (16-bit): 66 f3 0f b8 c1
    done = emu.emulate(bytes.fromhex("66f30fb8c1"), regs(rcx=0xF0F, rax=0x1234_0000))
    assert done.regs.rax == 0x1234_0008


def test_unknown_instruction_and_memory_operand_refused():
    with pytest.raises(emu.CannotEmulate):
        emu.emulate(bytes.fromhex("f0480fc70e"), regs())   # lock cmpxchg16b
    with pytest.raises(emu.CannotEmulate):
        emu.emulate(bytes.fromhex("f3480fb807"), regs())   # popcnt rax, [rdi]
    with pytest.raises(emu.CannotEmulate):
        emu.emulate(b"", regs())
