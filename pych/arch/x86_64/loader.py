"""Kernel loaders: an uncompressed ELF ``vmlinux`` with a PVH entry note, or a ``bzImage``.

Both write the kernel into guest memory and return a :class:`LoadedKernel` saying which
entry protocol to use; ``pych.arch.x86_64.boot`` then writes the boot information.

The files are read straight into guest memory (``preadv`` into a view of it): only their
headers pass through the VMM's heap, so loading a 20 MB vmlinux or a large initramfs
leaves nothing behind in the VMM's own memory.
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


class _Image:
    """A kernel file read piece by piece: ``image[a:b]`` reads those bytes (headers, notes),
    ``copy_to`` reads a range straight into guest memory."""

    def __init__(self, fd: int):
        self.fd = fd
        self.size = os.fstat(fd).st_size

    def __len__(self) -> int:
        return self.size

    def __getitem__(self, key: slice | int):
        if isinstance(key, int):
            return self[key:key + 1][0]
        start, stop, _ = key.indices(self.size)
        return os.pread(self.fd, max(stop - start, 0), start)

    def copy_to(self, mem: GuestMemory, gpa: int, offset: int, length: int) -> None:
        if offset + length > self.size:
            raise KernelLoadError("kernel file is shorter than its headers say")
        view = mem.view(gpa, length)
        done = 0
        while done < length:
            n = os.preadv(self.fd, [view[done:]], offset + done)
            if n <= 0:
                raise KernelLoadError("kernel file is shorter than its headers say")
            done += n


def _read_into(mem: GuestMemory, image: bytes | _Image, gpa: int, offset: int,
               length: int) -> None:
    if isinstance(image, _Image):
        image.copy_to(mem, gpa, offset, length)
    else:
        mem.write(gpa, image[offset:offset + length])


def load_kernel(mem: GuestMemory, path: str) -> LoadedKernel:
    try:
        fd = os.open(path, os.O_RDONLY | os.O_CLOEXEC)
    except OSError as e:
        raise KernelLoadError(f"cannot read kernel {path}: {os.strerror(e.errno)}") from e
    try:
        image = _Image(fd)
        if image[:4] == ELF_MAGIC:
            return load_elf(mem, image)
        if len(image) > 0x210 and struct.unpack("<I", image[0x202:0x206])[0] == BZIMAGE_HDR_MAGIC:
            return load_bzimage(mem, image)
        raise KernelLoadError(f"{path}: neither an ELF vmlinux nor a bzImage")
    except OSError as e:
        raise KernelLoadError(f"cannot read kernel {path}: {os.strerror(e.errno)}") from e
    finally:
        os.close(fd)


def load_elf(mem: GuestMemory, image: bytes | _Image) -> LoadedKernel:
    """``image``: the file's bytes, or the file read piece by piece (:func:`load_kernel`)."""
    if image[4] != 2 or image[5] != 1:
        raise KernelLoadError("kernel ELF is not 64-bit little-endian")
    (e_type, e_machine, _v, e_entry, e_phoff, _shoff, _flags, _ehsize, e_phentsize,
     e_phnum) = struct.unpack("<HHIQQQIHHH", image[16:16 + 42])
    if e_machine != 62:
        raise KernelLoadError("kernel ELF is not x86_64")
    pvh_entry = None
    kernel_end = 0
    for i in range(e_phnum):
        at = e_phoff + i * e_phentsize
        p_type, _pf, p_offset, _vaddr, p_paddr, p_filesz, p_memsz, _align = struct.unpack(
            "<IIQQQQQQ", image[at:at + 56])
        if p_type == PT_LOAD:
            if p_paddr < layout.HIGH_RAM_START:
                raise KernelLoadError(f"kernel segment at {p_paddr:#x} is below 1 MiB")
            if not mem.is_valid(p_paddr, max(p_memsz, 1)):
                raise KernelLoadError(
                    f"kernel segment {p_paddr:#x}+{p_memsz:#x} does not fit in guest RAM")
            _read_into(mem, image, p_paddr, p_offset, p_filesz)
            if p_memsz > p_filesz:                  # .bss: guest RAM is zero until written,
                _zero(mem, p_paddr + p_filesz, p_memsz - p_filesz)   # but not after a reboot
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


def _zero(mem: GuestMemory, gpa: int, length: int) -> None:
    """Zero guest memory a MiB at a time (no ``length``-sized buffer in the heap)."""
    chunk = bytes(min(length, 1 << 20))
    view = mem.view(gpa, length)
    for off in range(0, length, len(chunk)):
        n = min(len(chunk), length - off)
        view[off:off + n] = chunk[:n]


def load_bzimage(mem: GuestMemory, image: bytes | _Image) -> LoadedKernel:
    """``image``: the file's bytes, or the file read piece by piece (:func:`load_kernel`)."""
    header = image[:0x400]       # the setup header (its end: 0x202 + the byte at 0x201)
    version = struct.unpack_from("<H", header, 0x206)[0]
    if version < BOOT_PROTOCOL_MIN:
        raise KernelLoadError(f"bzImage boot protocol {version >> 8}.{version & 0xFF} is too old (need 2.12)")
    xloadflags = struct.unpack_from("<H", header, 0x236)[0]
    if not xloadflags & XLF_KERNEL_64:
        raise KernelLoadError("bzImage has no 64-bit entry point")
    setup_sects = header[0x1F1] or 4
    setup_size = (setup_sects + 1) * 512
    kernel_size = max(len(image) - setup_size, 0)
    load_addr = layout.HIGH_RAM_START
    if not mem.is_valid(load_addr, kernel_size):
        raise KernelLoadError("bzImage does not fit in guest RAM")
    _read_into(mem, image, load_addr, setup_size, kernel_size)
    header_end = 0x202 + header[0x201]
    initrd_addr_max = struct.unpack_from("<I", header, 0x22C)[0] if version >= 0x0203 else 0x37FF_FFFF
    return LoadedKernel("linux64", load_addr + 0x200, load_addr + kernel_size,
                        header[BZIMAGE_SETUP_HEADER_OFFSET:header_end], initrd_addr_max)


def load_initramfs(mem: GuestMemory, path: str, kernel: LoadedKernel) -> tuple[int, int]:
    """Place the initramfs at the top of low RAM (below 3 GiB and initrd_addr_max)."""
    try:
        fd = os.open(path, os.O_RDONLY | os.O_CLOEXEC)
    except OSError as e:
        raise KernelLoadError(f"cannot read initramfs {path}: {os.strerror(e.errno)}") from e
    try:
        image = _Image(fd)
        size = len(image)
        low = mem.region_for(0)
        top = min(low.end, kernel.initrd_addr_max + 1, layout.MEM_32BIT_RESERVED_START)
        addr = (top - size) & ~0xFFF
        if addr < kernel.kernel_end:
            raise KernelLoadError(
                f"initramfs ({size} bytes) does not fit in guest RAM above the kernel")
        image.copy_to(mem, addr, 0, size)
    except OSError as e:
        raise KernelLoadError(f"cannot read initramfs {path}: {os.strerror(e.errno)}") from e
    finally:
        os.close(fd)
    return addr, size
