"""Kernel loaders: an uncompressed ELF ``vmlinux`` with a PVH entry note, or a ``bzImage``.

Both write the kernel into guest memory and return a :class:`LoadedKernel` saying which
entry protocol to use; ``pych.arch.x86_64.boot`` then writes the boot information.
"""

from __future__ import annotations

import os
import struct
from dataclasses import dataclass, field

from pych.memory.guest_memory import GuestMemory

from . import layout

ELF_MAGIC = b"\x7fELF"
PT_LOAD = 1
PT_NOTE = 4
XEN_ELFNOTE_PHYS32_ENTRY = 18

BZIMAGE_HDR_MAGIC = 0x53726448        # "HdrS"
BZIMAGE_SETUP_HEADER_OFFSET = 0x1F1
BOOT_PROTOCOL_MIN = 0x020C            # 2.12: 64-bit entry and xloadflags
XLF_KERNEL_64 = 1 << 0


class KernelLoadError(Exception):
    pass


@dataclass
class LoadedKernel:
    protocol: str                   # "pvh" or "linux64"
    entry: int                      # guest physical entry point
    kernel_end: int                 # first byte after the loaded image
    setup_header: bytes = field(default=b"", repr=False)   # bzImage only
    initrd_addr_max: int = 0x7FFF_FFFF


def load_kernel(mem: GuestMemory, path: str) -> LoadedKernel:
    try:
        with open(path, "rb") as f:
            image = f.read()
    except OSError as e:
        raise KernelLoadError(f"cannot read kernel {path}: {os.strerror(e.errno)}") from e
    if image[:4] == ELF_MAGIC:
        return load_elf(mem, image)
    if len(image) > 0x210 and struct.unpack_from("<I", image, 0x202)[0] == BZIMAGE_HDR_MAGIC:
        return load_bzimage(mem, image)
    raise KernelLoadError(f"{path}: neither an ELF vmlinux nor a bzImage")


def load_elf(mem: GuestMemory, image: bytes) -> LoadedKernel:
    if image[4] != 2 or image[5] != 1:
        raise KernelLoadError("kernel ELF is not 64-bit little-endian")
    (e_type, e_machine, _v, e_entry, e_phoff, _shoff, _flags, _ehsize, e_phentsize,
     e_phnum) = struct.unpack_from("<HHIQQQIHHH", image, 16)
    if e_machine != 62:
        raise KernelLoadError("kernel ELF is not x86_64")
    pvh_entry = None
    kernel_end = 0
    for i in range(e_phnum):
        p_type, _pf, p_offset, _vaddr, p_paddr, p_filesz, p_memsz, _align = struct.unpack_from(
            "<IIQQQQQQ", image, e_phoff + i * e_phentsize)
        if p_type == PT_LOAD:
            if p_paddr < layout.HIGH_RAM_START:
                raise KernelLoadError(f"kernel segment at {p_paddr:#x} is below 1 MiB")
            if not mem.is_valid(p_paddr, max(p_memsz, 1)):
                raise KernelLoadError(
                    f"kernel segment {p_paddr:#x}+{p_memsz:#x} does not fit in guest RAM")
            mem.write(p_paddr, image[p_offset:p_offset + p_filesz])
            if p_memsz > p_filesz:
                mem.view(p_paddr + p_filesz, p_memsz - p_filesz)[:] = bytes(p_memsz - p_filesz)
            kernel_end = max(kernel_end, p_paddr + p_memsz)
        elif p_type == PT_NOTE:
            pvh_entry = pvh_entry or _find_pvh_note(image[p_offset:p_offset + p_filesz])
    if pvh_entry is None:
        raise KernelLoadError("kernel ELF has no PVH entry note (build it with CONFIG_PVH=y)")
    return LoadedKernel("pvh", pvh_entry, kernel_end)


def _find_pvh_note(notes: bytes) -> int | None:
    off = 0
    while off + 12 <= len(notes):
        namesz, descsz, ntype = struct.unpack_from("<III", notes, off)
        name_off = off + 12
        desc_off = name_off + ((namesz + 3) & ~3)
        if ntype == XEN_ELFNOTE_PHYS32_ENTRY and notes[name_off:name_off + namesz].rstrip(b"\0") == b"Xen":
            fmt = "<Q" if descsz >= 8 else "<I"
            return struct.unpack_from(fmt, notes, desc_off)[0]
        off = desc_off + ((descsz + 3) & ~3)
    return None


def load_bzimage(mem: GuestMemory, image: bytes) -> LoadedKernel:
    version = struct.unpack_from("<H", image, 0x206)[0]
    if version < BOOT_PROTOCOL_MIN:
        raise KernelLoadError(f"bzImage boot protocol {version >> 8}.{version & 0xFF} is too old (need 2.12)")
    xloadflags = struct.unpack_from("<H", image, 0x236)[0]
    if not xloadflags & XLF_KERNEL_64:
        raise KernelLoadError("bzImage has no 64-bit entry point")
    setup_sects = image[0x1F1] or 4
    setup_size = (setup_sects + 1) * 512
    kernel = image[setup_size:]
    load_addr = layout.HIGH_RAM_START
    if not mem.is_valid(load_addr, len(kernel)):
        raise KernelLoadError("bzImage does not fit in guest RAM")
    mem.write(load_addr, kernel)
    header_end = 0x202 + image[0x201]
    initrd_addr_max = struct.unpack_from("<I", image, 0x22C)[0] if version >= 0x0203 else 0x37FF_FFFF
    return LoadedKernel("linux64", load_addr + 0x200, load_addr + len(kernel),
                        image[BZIMAGE_SETUP_HEADER_OFFSET:header_end], initrd_addr_max)


def load_initramfs(mem: GuestMemory, path: str, kernel: LoadedKernel) -> tuple[int, int]:
    """Place the initramfs at the top of low RAM (below 3 GiB and initrd_addr_max)."""
    try:
        with open(path, "rb") as f:
            data = f.read()
    except OSError as e:
        raise KernelLoadError(f"cannot read initramfs {path}: {os.strerror(e.errno)}") from e
    low = mem.region_for(0)
    top = min(low.end, kernel.initrd_addr_max + 1, layout.MEM_32BIT_RESERVED_START)
    addr = (top - len(data)) & ~0xFFF
    if addr < kernel.kernel_end:
        raise KernelLoadError(
            f"initramfs ({len(data)} bytes) does not fit in guest RAM above the kernel")
    mem.write(addr, data)
    return addr, len(data)
