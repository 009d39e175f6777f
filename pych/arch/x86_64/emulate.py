"""Instructions a nested KVM (as on PVM hosts) leaves to userspace, emulated in the VMM.

On ``KVM_EXIT_INTERNAL_ERROR`` with suberror 1 the exit carries the instruction bytes
(../shared/notes/pvm-host.md). :func:`emulate` decodes the few instructions a Linux guest
is known to hit, updates the registers and tells the vCPU loop whether to resume.
Pure function over (bytes, regs) so it is unit tested without KVM.
"""

from __future__ import annotations

from dataclasses import dataclass

from pych.hypervisor.kvm.bindings import kvm_regs

# ModRM register number -> kvm_regs field
GPR_NAMES = ("rax", "rcx", "rdx", "rbx", "rsp", "rbp", "rsi", "rdi",
             "r8", "r9", "r10", "r11", "r12", "r13", "r14", "r15")

RFLAGS_CF = 1 << 0
RFLAGS_PF = 1 << 2
RFLAGS_AF = 1 << 4
RFLAGS_ZF = 1 << 6
RFLAGS_SF = 1 << 7
RFLAGS_OF = 1 << 11
RFLAGS_AC = 1 << 18

BP_VECTOR = 3


@dataclass
class Emulated:
    """What the VMM did: the new registers and an exception to inject, if any."""
    name: str
    regs: kvm_regs
    inject_exception: int | None = None


class CannotEmulate(Exception):
    pass


def emulate(insn: bytes, regs: kvm_regs) -> Emulated:
    """Emulate the instruction at ``regs.rip`` whose bytes are ``insn``."""
    if not insn:
        raise CannotEmulate("no instruction bytes")
    if insn[0] == 0x9B:                       # fwait: no x87 exception can be pending
        regs.rip += 1
        return Emulated("fwait", regs)
    if insn[0] == 0xCC:                       # int3: a trap, so #BP with RIP after it
        regs.rip += 1
        return Emulated("int3", regs, inject_exception=BP_VECTOR)
    if insn[:3] in (b"\x0f\x01\xca", b"\x0f\x01\xcb"):   # clac / stac
        if insn[2] == 0xCA:
            regs.rflags &= ~RFLAGS_AC
        else:
            regs.rflags |= RFLAGS_AC
        regs.rip += 3
        return Emulated("clac" if insn[2] == 0xCA else "stac", regs)
    return _emulate_prefixed(insn, regs)


def _emulate_prefixed(insn: bytes, regs: kvm_regs) -> Emulated:
    i = 0
    rep = opsize16 = False
    while i < len(insn) and insn[i] in (0xF3, 0x66, 0xF2):
        rep |= insn[i] == 0xF3
        opsize16 |= insn[i] == 0x66
        i += 1
    rex = 0
    if i < len(insn) and 0x40 <= insn[i] <= 0x4F:
        rex = insn[i]
        i += 1
    if rep and insn[i:i + 2] == b"\x0f\xb8" and i + 2 < len(insn):
        return _popcnt(insn, i + 2, rex, opsize16, regs)
    raise CannotEmulate(f"unsupported instruction {insn.hex(' ')}")


def _popcnt(insn: bytes, modrm_at: int, rex: int, opsize16: bool, regs: kvm_regs) -> Emulated:
    modrm = insn[modrm_at]
    mod, reg, rm = modrm >> 6, (modrm >> 3) & 7, modrm & 7
    if mod != 3:
        raise CannotEmulate(f"popcnt with a memory operand ({insn.hex(' ')})")
    reg |= (rex & 0x4) << 1           # REX.R
    rm |= (rex & 0x1) << 3            # REX.B
    width = 64 if rex & 0x8 else 16 if opsize16 else 32
    mask = (1 << width) - 1
    src = getattr(regs, GPR_NAMES[rm]) & mask
    count = bin(src).count("1")
    old = getattr(regs, GPR_NAMES[reg])
    if width == 16:
        new = (old & ~0xFFFF) | count
    else:
        new = count                    # 32-bit writes zero-extend, 64-bit replace
    setattr(regs, GPR_NAMES[reg], new)
    flags = regs.rflags & ~(RFLAGS_CF | RFLAGS_PF | RFLAGS_AF | RFLAGS_ZF | RFLAGS_SF | RFLAGS_OF)
    if src == 0:
        flags |= RFLAGS_ZF
    regs.rflags = flags
    regs.rip += modrm_at + 1
    return Emulated("popcnt", regs)
