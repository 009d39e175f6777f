"""A few-instruction PVH guest for exercising the KVM core without Linux.

``build_elf(code)`` wraps 32-bit protected-mode machine code in an ELF with a PVH entry
note; ``serial_then_poweroff(text)`` is code that prints ``text`` on COM1 and powers off
through the ACPI sleep register. It boots in milliseconds, so the KVM layer, the bus
dispatch and the poweroff path are tested without waiting for a kernel.
"""

from __future__ import annotations

import struct

LOAD_ADDR = 0x100000
XEN_ELFNOTE_PHYS32_ENTRY = 18


def serial_then_poweroff(text: bytes, port: int = 0x3F8, sleep_port: int = 0x600) -> bytes:
    code = bytearray(b"\x66\xba" + struct.pack("<H", port))        # mov dx, port
    for ch in text:
        code += bytes((0xB0, ch, 0xEE))                              # mov al, ch; out dx, al
    code += b"\x66\xba" + struct.pack("<H", sleep_port)              # mov dx, 0x600
    code += b"\xb0\x34\xee"                                          # mov al, 0x34; out dx, al
    code += b"\xf4\xeb\xfd"                                          # hlt; jmp hlt
    return bytes(code)


def reset_via_port(port: int = 0x600) -> bytes:
    return b"\x66\xba" + struct.pack("<H", port) + b"\xb0\x01\xee\xf4\xeb\xfd"


def with_instruction(prefix: bytes, then: bytes) -> bytes:
    """``prefix`` (e.g. an instruction the host cannot emulate) followed by ``then``."""
    return prefix + then


def build_elf(code: bytes, entry_offset: int = 0) -> bytes:
    note = struct.pack("<III", 4, 4, XEN_ELFNOTE_PHYS32_ENTRY) + b"Xen\0" + \
        struct.pack("<I", LOAD_ADDR + entry_offset)
    phoff, phnum = 64, 2
    code_off = 0x1000
    note_off = code_off + len(code)
    hdr = b"\x7fELF" + bytes([2, 1, 1]) + bytes(9)
    hdr += struct.pack("<HHIQQQIHHHHHH", 2, 62, 1, LOAD_ADDR, phoff, 0, 0, 64, 56, phnum, 0, 0, 0)
    ph = struct.pack("<IIQQQQQQ", 1, 5, code_off, LOAD_ADDR, LOAD_ADDR, len(code), len(code), 0x1000)
    ph += struct.pack("<IIQQQQQQ", 4, 4, note_off, 0, 0, len(note), len(note), 4)
    image = bytearray(hdr + ph)
    image += bytes(code_off - len(image))
    return bytes(image + code + note)
