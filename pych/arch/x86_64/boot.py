"""Boot information and initial vCPU state for the PVH and 64-bit Linux boot protocols.

``write_boot_info`` writes what the kernel reads (PVH ``hvm_start_info`` or the bzImage
``boot_params`` zero page); ``setup_boot_vcpu`` / ``setup_vcpu`` set registers, segments,
page tables, FPU, MSRs and the LAPIC. The structures are ctypes so their layouts are
unit tested.
"""

from __future__ import annotations

import ctypes
import struct
from ctypes import c_uint32, c_uint64
from dataclasses import dataclass

from pych.hypervisor.kvm import bindings as kb
from pych.memory.guest_memory import GuestMemory

from . import layout
from .loader import LoadedKernel

E820_RAM = 1
E820_RESERVED = 2

# --- PVH (xen/include/public/arch-x86/hvm/start_info.h) --------------------------------------
HVM_START_MAGIC = 0x336EC578


class hvm_start_info(ctypes.LittleEndianStructure):
    _fields_ = [("magic", c_uint32), ("version", c_uint32), ("flags", c_uint32),
                ("nr_modules", c_uint32), ("modlist_paddr", c_uint64), ("cmdline_paddr", c_uint64),
                ("rsdp_paddr", c_uint64), ("memmap_paddr", c_uint64), ("memmap_entries", c_uint32),
                ("reserved", c_uint32)]


class hvm_modlist_entry(ctypes.LittleEndianStructure):
    _fields_ = [("paddr", c_uint64), ("size", c_uint64), ("cmdline_paddr", c_uint64),
                ("reserved", c_uint64)]


class hvm_memmap_table_entry(ctypes.LittleEndianStructure):
    _fields_ = [("addr", c_uint64), ("size", c_uint64), ("type", c_uint32), ("reserved", c_uint32)]


# --- Linux zero page (arch/x86/include/uapi/asm/bootparam.h) -----------------------------------
BOOT_PARAMS_SIZE = 4096
BP_ACPI_RSDP_ADDR = 0x070
BP_E820_ENTRIES = 0x1E8
BP_SETUP_HEADER = 0x1F1
BP_E820_TABLE = 0x2D0
E820_MAX_ENTRIES_ZEROPAGE = 128
# offsets inside the zero page of setup-header fields pych fills in
HDR_TYPE_OF_LOADER = 0x210
HDR_LOADFLAGS = 0x211
HDR_RAMDISK_IMAGE = 0x218
HDR_RAMDISK_SIZE = 0x21C
HDR_HEAP_END_PTR = 0x224
HDR_CMD_LINE_PTR = 0x228
HDR_CMDLINE_SIZE = 0x238
LOADFLAG_CAN_USE_HEAP = 0x80
LOADFLAG_KEEP_SEGMENTS = 0x40


@dataclass(frozen=True)
class E820Entry:
    addr: int
    size: int
    type: int


def e820_map(mem: GuestMemory) -> list[E820Entry]:
    """The guest's memory map: RAM as backed by ``mem`` minus the legacy hole, plus the
    ECAM window as reserved (Linux checks MCFG against it)."""
    entries = [E820Entry(0, layout.EBDA_START, E820_RAM)]
    for r in sorted(mem.regions, key=lambda r: r.gpa):
        start = max(r.gpa, layout.HIGH_RAM_START)
        if r.end > start and r.name.startswith("ram"):
            entries.append(E820Entry(start, r.end - start, E820_RAM))
    entries.append(E820Entry(layout.PCI_MMCONFIG_START, layout.PCI_MMCONFIG_SIZE, E820_RESERVED))
    return entries


def write_cmdline(mem: GuestMemory, cmdline: str) -> int:
    data = cmdline.encode() + b"\0"
    if len(data) > layout.CMDLINE_MAX_SIZE:
        raise ValueError(f"kernel command line longer than {layout.CMDLINE_MAX_SIZE - 1} bytes")
    mem.write(layout.CMDLINE_START, data)
    return layout.CMDLINE_START


def write_boot_info(mem: GuestMemory, kernel: LoadedKernel, cmdline: str,
                    initramfs: tuple[int, int] | None, rsdp: int) -> None:
    cmdline_addr = write_cmdline(mem, cmdline)
    memmap = e820_map(mem)
    if kernel.protocol == "pvh":
        _write_pvh(mem, cmdline_addr, initramfs, rsdp, memmap)
    else:
        _write_zero_page(mem, kernel, cmdline_addr, len(cmdline), initramfs, rsdp, memmap)


def _write_pvh(mem, cmdline_addr, initramfs, rsdp, memmap) -> None:
    info = hvm_start_info(magic=HVM_START_MAGIC, version=1, cmdline_paddr=cmdline_addr,
                          rsdp_paddr=rsdp, memmap_paddr=layout.MEMMAP_START,
                          memmap_entries=len(memmap))
    if initramfs is not None:
        info.nr_modules = 1
        info.modlist_paddr = layout.MODLIST_START
        mem.write_obj(layout.MODLIST_START, hvm_modlist_entry(paddr=initramfs[0], size=initramfs[1]))
    for i, e in enumerate(memmap):
        mem.write_obj(layout.MEMMAP_START + i * ctypes.sizeof(hvm_memmap_table_entry),
                      hvm_memmap_table_entry(addr=e.addr, size=e.size, type=e.type))
    mem.write_obj(layout.PVH_INFO_START, info)


def _write_zero_page(mem, kernel: LoadedKernel, cmdline_addr, cmdline_len, initramfs, rsdp, memmap) -> None:
    if len(memmap) > E820_MAX_ENTRIES_ZEROPAGE:
        raise ValueError("too many e820 entries for the zero page")
    zp = bytearray(BOOT_PARAMS_SIZE)
    zp[BP_SETUP_HEADER:BP_SETUP_HEADER + len(kernel.setup_header)] = kernel.setup_header
    zp[HDR_TYPE_OF_LOADER] = 0xFF
    zp[HDR_LOADFLAGS] |= LOADFLAG_CAN_USE_HEAP
    struct.pack_into("<H", zp, HDR_HEAP_END_PTR, 0xFE00)
    struct.pack_into("<I", zp, HDR_CMD_LINE_PTR, cmdline_addr)
    if initramfs is not None:
        struct.pack_into("<II", zp, HDR_RAMDISK_IMAGE, initramfs[0], initramfs[1])
    struct.pack_into("<Q", zp, BP_ACPI_RSDP_ADDR, rsdp)
    zp[BP_E820_ENTRIES] = len(memmap)
    for i, e in enumerate(memmap):
        struct.pack_into("<QQI", zp, BP_E820_TABLE + 20 * i, e.addr, e.size, e.type)
    mem.write(layout.ZERO_PAGE_START, bytes(zp))


# --- segments, page tables, registers ----------------------------------------------------------
def gdt_entry(flags: int, base: int, limit: int) -> int:
    return (((base & 0xFF00_0000) << 32) | ((flags & 0xF0FF) << 40) | ((limit & 0xF_0000) << 32)
            | ((base & 0x00FF_FFFF) << 16) | (limit & 0xFFFF))


def segment_from_gdt(entry: int, index: int) -> kb.kvm_segment:
    base = ((entry >> 16) & 0xFF_FFFF) | (((entry >> 56) & 0xFF) << 24)
    limit = (entry & 0xFFFF) | (((entry >> 48) & 0xF) << 16)
    g = (entry >> 55) & 1
    return kb.kvm_segment(
        base=base, limit=(limit << 12) | 0xFFF if g else limit, selector=index * 8,
        type=(entry >> 40) & 0xF, present=(entry >> 47) & 1, dpl=(entry >> 45) & 3,
        db=(entry >> 54) & 1, s=(entry >> 44) & 1, l=(entry >> 53) & 1, g=g,
        avl=(entry >> 52) & 1, unusable=0 if (entry >> 47) & 1 else 1)


GDT_PVH = (0, gdt_entry(0xC09B, 0, 0xFFFFF), gdt_entry(0xC093, 0, 0xFFFFF), gdt_entry(0x008B, 0, 0xFFFFF))
GDT_64 = (0, gdt_entry(0xA09B, 0, 0xFFFFF), gdt_entry(0xC093, 0, 0xFFFFF), gdt_entry(0x008B, 0, 0xFFFFF))

X86_CR0_PE = 1 << 0
X86_CR0_ET = 1 << 4
X86_CR0_PG = 1 << 31
X86_CR4_PAE = 1 << 5
EFER_LME = 1 << 8
EFER_LMA = 1 << 10


def write_gdt(mem: GuestMemory, gdt: tuple[int, ...]) -> None:
    mem.write(layout.BOOT_GDT_START, b"".join(struct.pack("<Q", e) for e in gdt))
    mem.write_u64(layout.BOOT_IDT_START, 0)


def write_identity_page_tables(mem: GuestMemory) -> None:
    """Identity-map the first 1 GiB with 2 MiB pages (what the 64-bit boot protocol needs)."""
    mem.write_u64(layout.PML4_START, layout.PDPTE_START | 0x3)
    mem.write_u64(layout.PDPTE_START, layout.PDE_START | 0x3)
    mem.write(layout.PDE_START, b"".join(struct.pack("<Q", (i << 21) | 0x83) for i in range(512)))


def boot_sregs(sregs: kb.kvm_sregs, protocol: str) -> kb.kvm_sregs:
    gdt = GDT_PVH if protocol == "pvh" else GDT_64
    code, data, tss = (segment_from_gdt(gdt[i], i) for i in (1, 2, 3))
    sregs.cs = code
    sregs.ds = sregs.es = sregs.fs = sregs.gs = sregs.ss = data
    sregs.tr = tss
    sregs.gdt.base, sregs.gdt.limit = layout.BOOT_GDT_START, len(gdt) * 8 - 1
    sregs.idt.base, sregs.idt.limit = layout.BOOT_IDT_START, 7
    if protocol == "pvh":
        sregs.cr0 = X86_CR0_PE | X86_CR0_ET
        sregs.cr4 = 0
        sregs.efer = 0
    else:
        sregs.cr3 = layout.PML4_START
        sregs.cr4 = X86_CR4_PAE
        sregs.cr0 = X86_CR0_PE | X86_CR0_ET | X86_CR0_PG
        sregs.efer = EFER_LME | EFER_LMA
    return sregs


def boot_regs(kernel: LoadedKernel) -> kb.kvm_regs:
    regs = kb.kvm_regs(rflags=0x2, rip=kernel.entry)
    if kernel.protocol == "pvh":
        regs.rbx = layout.PVH_INFO_START
    else:
        regs.rsp = regs.rbp = layout.BOOT_STACK_POINTER
        regs.rsi = layout.ZERO_PAGE_START
    return regs


MSR_IA32_TSC = 0x10
MSR_IA32_SYSENTER_CS = 0x174
MSR_IA32_SYSENTER_ESP = 0x175
MSR_IA32_SYSENTER_EIP = 0x176
MSR_IA32_MISC_ENABLE = 0x1A0
MSR_MTRR_DEF_TYPE = 0x2FF
MSR_STAR = 0xC000_0081
MSR_LSTAR = 0xC000_0082
MSR_CSTAR = 0xC000_0083
MSR_SYSCALL_MASK = 0xC000_0084
MSR_KERNEL_GS_BASE = 0xC000_0102

BOOT_MSRS = {
    MSR_IA32_SYSENTER_CS: 0, MSR_IA32_SYSENTER_ESP: 0, MSR_IA32_SYSENTER_EIP: 0,
    MSR_STAR: 0, MSR_CSTAR: 0, MSR_KERNEL_GS_BASE: 0, MSR_SYSCALL_MASK: 0, MSR_LSTAR: 0,
    MSR_IA32_TSC: 0,
    MSR_IA32_MISC_ENABLE: 1,                     # fast strings
    MSR_MTRR_DEF_TYPE: (1 << 11) | 6,            # MTRRs enabled, default write-back
}

APIC_LVT0 = 0x350
APIC_LVT1 = 0x360
APIC_MODE_NMI = 0x4
APIC_MODE_EXTINT = 0x7


def _set_delivery_mode(reg: int, mode: int) -> int:
    return (reg & ~0x700) | (mode << 8)


def lapic_with_lints(state: kb.kvm_lapic_state) -> kb.kvm_lapic_state:
    """LINT0 as ExtINT (the PIC) and LINT1 as NMI, as firmware would leave them."""
    raw = bytearray(state.regs)
    lvt0, = struct.unpack_from("<I", raw, APIC_LVT0)
    lvt1, = struct.unpack_from("<I", raw, APIC_LVT1)
    struct.pack_into("<I", raw, APIC_LVT0, _set_delivery_mode(lvt0, APIC_MODE_EXTINT))
    struct.pack_into("<I", raw, APIC_LVT1, _set_delivery_mode(lvt1, APIC_MODE_NMI))
    ctypes.memmove(state.regs, bytes(raw), len(raw))
    return state


def initial_fpu() -> kb.kvm_fpu:
    return kb.kvm_fpu(fcw=0x37F, mxcsr=0x1F80)
