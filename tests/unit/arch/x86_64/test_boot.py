import ctypes
import struct

import pytest

from pych.arch.x86_64 import boot, layout, loader
from pych.memory.guest_memory import GuestMemory


def test_pvh_structure_layouts():
    assert ctypes.sizeof(boot.hvm_start_info) == 56
    assert ctypes.sizeof(boot.hvm_modlist_entry) == 32
    assert ctypes.sizeof(boot.hvm_memmap_table_entry) == 24


def test_ram_split_around_the_32bit_hole():
    assert layout.ram_regions(512 << 20) == [(0, 512 << 20)]
    assert layout.ram_regions(4 << 30) == [(0, 3 << 30), (4 << 30, 1 << 30)]


def _fake_elf(paddr=0x1000000, entry=0x1000123):
    payload = b"\x90" * 64
    note_name = b"Xen\0"
    note = struct.pack("<III", 4, 8, loader.XEN_ELFNOTE_PHYS32_ENTRY) + note_name + struct.pack("<Q", entry)
    phoff, phnum = 64, 2
    data_off = phoff + 56 * phnum
    note_off = data_off + len(payload)
    hdr = b"\x7fELF" + bytes([2, 1, 1]) + bytes(9)
    hdr += struct.pack("<HHIQQQIHHHHHH", 2, 62, 1, 0xFFFFFFFF81000000, phoff, 0, 0, 64, 56, phnum, 0, 0, 0)
    ph = struct.pack("<IIQQQQQQ", loader.PT_LOAD, 5, data_off, 0xFFFFFFFF81000000, paddr,
                     len(payload), len(payload) + 32, 0x1000)
    ph += struct.pack("<IIQQQQQQ", loader.PT_NOTE, 4, note_off, 0, 0, len(note), len(note), 4)
    return hdr + ph + payload + note


def test_elf_pvh_load_and_start_info(tmp_path):
    mem = GuestMemory.from_ranges(layout.ram_regions(64 << 20))
    try:
        img = _fake_elf()
        k = loader.load_elf(mem, img)
        assert k.protocol == "pvh" and k.entry == 0x1000123
        assert mem.read(0x1000000, 4) == b"\x90" * 4
        assert mem.read(0x1000000 + 64, 32) == bytes(32)     # bss zeroed
        initrd = tmp_path / "initrd"
        initrd.write_bytes(b"CPIO" * 100)
        addr, size = loader.load_initramfs(mem, str(initrd), k)
        assert addr % 4096 == 0 and addr + size <= 64 << 20 and mem.read(addr, 4) == b"CPIO"
        boot.write_boot_info(mem, k, "console=ttyS0", (addr, size), 0xA0000)
        info = mem.read_obj(layout.PVH_INFO_START, boot.hvm_start_info)
        assert info.magic == boot.HVM_START_MAGIC and info.version == 1
        assert info.rsdp_paddr == 0xA0000 and info.nr_modules == 1
        assert mem.read(info.cmdline_paddr, 14) == b"console=ttyS0\0"
        mod = mem.read_obj(info.modlist_paddr, boot.hvm_modlist_entry)
        assert (mod.paddr, mod.size) == (addr, size)
        e820 = [mem.read_obj(info.memmap_paddr + i * 24, boot.hvm_memmap_table_entry)
                for i in range(info.memmap_entries)]
        assert (e820[0].addr, e820[0].size, e820[0].type) == (0, 0xA0000, 1)
        assert (e820[1].addr, e820[1].addr + e820[1].size) == (0x100000, 64 << 20)
        assert e820[-1].type == boot.E820_RESERVED and e820[-1].addr == layout.PCI_MMCONFIG_START
    finally:
        mem.close()


def test_elf_without_pvh_note_is_refused():
    mem = GuestMemory.from_ranges([(0, 32 << 20)])
    try:
        img = bytearray(_fake_elf())
        img[-20:] = bytes(20)   # wipe the note
        with pytest.raises(loader.KernelLoadError, match="PVH"):
            loader.load_elf(mem, bytes(img))
    finally:
        mem.close()


def _fake_bzimage():
    img = bytearray(5 * 512 + 4096)
    img[0x1F1] = 4
    struct.pack_into("<I", img, 0x202, loader.BZIMAGE_HDR_MAGIC)
    img[0x201] = 0x6A           # header ends at 0x26C
    struct.pack_into("<H", img, 0x206, 0x020F)
    struct.pack_into("<I", img, 0x22C, 0x7FFFFFFF)
    struct.pack_into("<H", img, 0x236, loader.XLF_KERNEL_64)
    img[5 * 512:5 * 512 + 4] = b"KERN"
    return bytes(img)


def test_bzimage_load_and_zero_page():
    mem = GuestMemory.from_ranges(layout.ram_regions(64 << 20))
    try:
        k = loader.load_bzimage(mem, _fake_bzimage())
        assert k.protocol == "linux64" and k.entry == 0x100200
        assert mem.read(0x100000, 4) == b"KERN"
        boot.write_boot_info(mem, k, "quiet", (0x2000000, 0x1000), 0xA0000)
        zp = mem.read(layout.ZERO_PAGE_START, 4096)
        assert zp[boot.HDR_TYPE_OF_LOADER] == 0xFF
        assert struct.unpack_from("<I", zp, 0x202)[0] == loader.BZIMAGE_HDR_MAGIC
        assert struct.unpack_from("<I", zp, boot.HDR_CMD_LINE_PTR)[0] == layout.CMDLINE_START
        assert struct.unpack_from("<II", zp, boot.HDR_RAMDISK_IMAGE) == (0x2000000, 0x1000)
        assert struct.unpack_from("<Q", zp, boot.BP_ACPI_RSDP_ADDR)[0] == 0xA0000
        n = zp[boot.BP_E820_ENTRIES]
        entries = [struct.unpack_from("<QQI", zp, boot.BP_E820_TABLE + 20 * i) for i in range(n)]
        assert entries[0] == (0, 0xA0000, 1) and entries[1] == (0x100000, (64 << 20) - 0x100000, 1)
    finally:
        mem.close()


def test_gdt_segments():
    cs = boot.segment_from_gdt(boot.GDT_64[1], 1)
    assert (cs.selector, cs.type, cs.l, cs.db, cs.present, cs.g, cs.limit) == (8, 0xB, 1, 0, 1, 1, 0xFFFFFFFF)
    cs32 = boot.segment_from_gdt(boot.GDT_PVH[1], 1)
    assert (cs32.l, cs32.db, cs32.s) == (0, 1, 1)
    tr = boot.segment_from_gdt(boot.GDT_PVH[3], 3)
    assert (tr.selector, tr.type, tr.s) == (0x18, 0xB, 0)
    assert boot.GDT_64[1] == 0x00AF9B000000FFFF
    assert boot.GDT_PVH[2] == 0x00CF93000000FFFF


def test_lapic_lints():
    from pych.hypervisor.kvm.bindings import kvm_lapic_state
    s = boot.lapic_with_lints(kvm_lapic_state())
    raw = bytes(s.regs)
    assert (struct.unpack_from("<I", raw, 0x350)[0] >> 8) & 7 == 7
    assert (struct.unpack_from("<I", raw, 0x360)[0] >> 8) & 7 == 4


def test_kernel_files_are_read_into_guest_memory(tmp_path):
    """``load_kernel`` reads the ELF's segments and the bzImage's kernel from the file into
    guest memory; what the file loader writes equals what the bytes loader writes, and a
    segment's .bss is zeroed over memory a previous boot left dirty."""
    elf, bz = tmp_path / "vmlinux", tmp_path / "bzImage"
    elf.write_bytes(_fake_elf())
    bz.write_bytes(_fake_bzimage())
    for path, loaded_at, length in ((elf, 0x1000000, 64 + 32), (bz, 0x100000, 4096)):
        from_file = GuestMemory.from_ranges(layout.ram_regions(64 << 20))
        from_bytes = GuestMemory.from_ranges(layout.ram_regions(64 << 20))
        try:
            from_file.write(loaded_at, b"\xee" * 8192)            # a previous boot's bytes
            kernel = loader.load_kernel(from_file, str(path))
            image = path.read_bytes()
            expected = (loader.load_elf(from_bytes, image) if path is elf
                        else loader.load_bzimage(from_bytes, image))
            assert kernel == expected
            assert from_file.read(loaded_at, length) == from_bytes.read(loaded_at, length)
        finally:
            from_file.close()
            from_bytes.close()
    mem = GuestMemory.from_ranges(layout.ram_regions(64 << 20))
    try:
        mem.write(0x1000000 + 64, b"\xee" * 32)
        loader.load_kernel(mem, str(elf))
        assert mem.read(0x1000000 + 64, 32) == bytes(32)          # bss zeroed again
    finally:
        mem.close()


def test_truncated_kernel_file_is_refused(tmp_path):
    elf = tmp_path / "vmlinux"
    elf.write_bytes(_fake_elf()[:64 + 2 * 56 + 10])                # headers, part of a segment
    mem = GuestMemory.from_ranges(layout.ram_regions(64 << 20))
    try:
        with pytest.raises(loader.KernelLoadError, match="shorter than its headers"):
            loader.load_kernel(mem, str(elf))
        with pytest.raises(loader.KernelLoadError, match="cannot read kernel"):
            loader.load_kernel(mem, str(tmp_path / "missing"))
    finally:
        mem.close()


def test_loading_keeps_no_copy_of_the_files(tmp_path):
    """The VMM's heap never holds the kernel or the initramfs: a 16 MiB segment and a 16 MiB
    initramfs load with less than 1 MiB allocated by Python at any moment."""
    import tracemalloc
    big = 16 << 20
    payload_off = 0x1000
    note = (struct.pack("<III", 4, 8, loader.XEN_ELFNOTE_PHYS32_ENTRY) + b"Xen\0"
            + struct.pack("<Q", 0x1000000))
    hdr = b"\x7fELF" + bytes([2, 1, 1]) + bytes(9)
    hdr += struct.pack("<HHIQQQIHHHHHH", 2, 62, 1, 0x1000000, 64, 0, 0, 64, 56, 2, 0, 0, 0)
    ph = struct.pack("<IIQQQQQQ", loader.PT_LOAD, 5, payload_off, 0, 0x1000000, big, big, 0x1000)
    ph += struct.pack("<IIQQQQQQ", loader.PT_NOTE, 4, payload_off + big, 0, 0, len(note),
                      len(note), 4)
    elf = tmp_path / "vmlinux"
    with open(elf, "wb") as f:
        f.write(hdr + ph + bytes(payload_off - len(hdr) - len(ph)))
        f.write(b"\x90" * big)
        f.write(note)
    initrd = tmp_path / "initrd"
    initrd.write_bytes(b"\x07" * big)
    mem = GuestMemory.from_ranges(layout.ram_regions(128 << 20))
    tracemalloc.start()
    try:
        kernel = loader.load_kernel(mem, str(elf))
        addr, size = loader.load_initramfs(mem, str(initrd), kernel)
        peak = tracemalloc.get_traced_memory()[1]
    finally:
        tracemalloc.stop()
    try:
        assert peak < 1 << 20, peak
        assert mem.read(0x1000000 + big - 4, 4) == b"\x90" * 4
        assert size == big and mem.read(addr + big - 4, 4) == b"\x07" * 4
    finally:
        mem.close()
