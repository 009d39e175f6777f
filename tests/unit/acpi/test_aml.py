"""AML encoder: every construct against encodings worked out by hand from ACPI 6.5 ch. 20."""

from __future__ import annotations

import pytest
from hypothesis import given, strategies as st

from pych.acpi.aml import (
    Acquire, Add, AddressSpace, And, Arg, Buffer, Cacheability, Concat, CreateDWordField,
    CreateField, CreateQWordField, Decrement, DeRefOf, Device, EISAName, Else, Equal,
    ExtendedInterrupt, Field, FieldAccess, FieldUpdate, GreaterEqual, GreaterThan, If,
    Increment, Index, Integer, IO, LAnd, LessEqual, LessThan, Local, LNot, LOr, Memory32Fixed,
    Method, MethodCall, Mod, Multiply, Mutex, Name, Named, Nand, Nor, Notify, NotEqual,
    ObjectType, Offset, ONE, ONES, OpRegion, Or, Package, Path, RegionSpace, Release, Reserved,
    ResourceTemplate, Return, Scope, ShiftLeft, ShiftRight, SizeOf, Sleep, Store, String,
    Subtract, ToBuffer, ToInteger, Uuid, While, Xor, ZERO, pkg_length, with_pkg_length,
)


def h(text: str) -> bytes:
    """Hex with optional spaces and 'quoted' ASCII runs: h("08 '_UID' 00")."""
    out = bytearray()
    for i, chunk in enumerate(text.split("'")):
        out += chunk.encode("ascii") if i % 2 else bytes.fromhex(chunk)
    return bytes(out)


# --- PkgLength ----------------------------------------------------------------------------
@pytest.mark.parametrize("value, encoded", [
    (0, "00"),
    (63, "3f"),                 # largest one-byte value
    (64, "40 04"),              # smallest two-byte value: low nibble 0, next byte 0x04
    (4095, "4f ff"),            # largest two-byte value
    (4096, "80 00 01"),
    (1048575, "8f ff ff"),      # largest three-byte value
    (1048576, "c0 00 00 01"),
    ((1 << 28) - 1, "cf ff ff ff"),
])
def test_pkg_length_boundaries(value, encoded):
    assert pkg_length(value) == h(encoded)


@pytest.mark.parametrize("value", [-1, 1 << 28])
def test_pkg_length_rejects_out_of_range(value):
    with pytest.raises(ValueError):
        pkg_length(value)


@pytest.mark.parametrize("payload_size, prefix", [
    (0, "01"),
    (62, "3f"),                 # 62 + 1 = 63 still fits one byte
    (63, "41 04"),              # 63 + 1 = 64 does not: two bytes, total 65
    (4093, "4f ff"),            # 4093 + 2 = 4095
    (4094, "81 00 01"),         # 4094 + 2 = 4096 needs three bytes: total 4097
    (1048572, "8f ff ff"),      # 1048572 + 3 = 1048575
    (1048573, "c1 00 00 01"),   # four bytes: total 1048577
])
def test_self_inclusive_pkg_length_boundaries(payload_size, prefix):
    encoded = with_pkg_length(bytes(payload_size))
    assert encoded[:len(h(prefix))] == h(prefix)
    assert len(encoded) == len(h(prefix)) + payload_size


def decode_pkg_length(data: bytes) -> tuple[int, int]:
    """(value, encoded size), straight from the grammar in §20.2.4."""
    follow = data[0] >> 6
    if follow == 0:
        return data[0] & 0x3F, 1
    assert data[0] & 0x30 == 0, "bits 4-5 of a multi-byte lead byte must be zero"
    value = data[0] & 0x0F
    for i in range(follow):
        value |= data[1 + i] << (4 + 8 * i)
    return value, 1 + follow


def minimal_pkg_length_size(value: int) -> int:
    return 1 if value < 1 << 6 else 2 if value < 1 << 12 else 3 if value < 1 << 20 else 4


@given(st.integers(0, (1 << 28) - 1))
def test_pkg_length_roundtrip_and_minimal(value):
    encoded = pkg_length(value)
    assert decode_pkg_length(encoded) == (value, len(encoded))
    assert len(encoded) == minimal_pkg_length_size(value)


@given(st.integers(0, (1 << 21)))
def test_self_inclusive_pkg_length_counts_itself(payload_size):
    encoded = with_pkg_length(bytes(payload_size))
    value, size = decode_pkg_length(encoded)
    assert value == len(encoded) == size + payload_size
    # no shorter encoding could have counted itself
    assert size == 1 or minimal_pkg_length_size(payload_size + size - 1) == size


# --- integers -----------------------------------------------------------------------------
@pytest.mark.parametrize("value, encoded", [
    (0, "00"), (1, "01"), (2, "0a 02"), (0xFF, "0a ff"),
    (0x100, "0b 00 01"), (0xFFFF, "0b ff ff"),
    (0x10000, "0c 00 00 01 00"), (0xFFFF_FFFF, "0c ff ff ff ff"),
    (1 << 32, "0e 00 00 00 00 01 00 00 00"),
    ((1 << 64) - 2, "0e fe ff ff ff ff ff ff ff"),
    ((1 << 64) - 1, "ff"),
])
def test_integer_smallest_encoding(value, encoded):
    assert Integer(value).to_aml() == h(encoded)


def test_integer_constants():
    assert (ZERO.to_aml(), ONE.to_aml(), ONES.to_aml()) == (b"\x00", b"\x01", b"\xff")


@pytest.mark.parametrize("value", [-1, 1 << 64])
def test_integer_out_of_range(value):
    with pytest.raises(ValueError):
        Integer(value)


def decode_integer(data: bytes) -> tuple[int, int]:
    op = data[0]
    if op in (0x00, 0x01):
        return op, 1
    if op == 0xFF:
        return (1 << 64) - 1, 1
    size = {0x0A: 1, 0x0B: 2, 0x0C: 4, 0x0E: 8}[op]
    return int.from_bytes(data[1:1 + size], "little"), 1 + size


@given(st.integers(0, (1 << 64) - 1))
def test_integer_roundtrip_and_minimal(value):
    encoded = Integer(value).to_aml()
    assert decode_integer(encoded) == (value, len(encoded))
    if value in (0, 1, (1 << 64) - 1):
        expected_size = 1
    else:
        expected_size = 1 + next(n for n in (1, 2, 4, 8) if value < 1 << (8 * n))
    assert len(encoded) == expected_size


# --- names, strings, data -----------------------------------------------------------------
@pytest.mark.parametrize("name, encoded", [
    ("GDAT", "'GDAT'"),
    ("_SB", "'_SB_'"),                                   # padded with '_'
    ("\\_SB_.GED_", "5c 2e '_SB_GED_'"),                 # root + DualNamePrefix
    ("\\_SB_.PCI0.S08", "5c 2f 03 '_SB_PCI0S08_'"),      # MultiNamePrefix, count 3
    ("_SB.PC00.S000.FOO", "2f 04 '_SB_PC00S000FOO_'"),
    ("^PRES", "5e 'PRES'"),
    ("^^CPUS.CSCN", "5e 5e 2e 'CPUSCSCN'"),
    ("\\", "5c 00"),                                     # the root itself: NullName
])
def test_name_strings(name, encoded):
    assert Path(name).to_aml() == h(encoded)


@pytest.mark.parametrize("name", ["", "^", "gdat", "ABCDE", "1ABC", "A-B", "\\_SB_..FOO",
                                  "\\^FOO"])
def test_invalid_names(name):
    with pytest.raises(ValueError):
        Path(name)


@given(st.lists(st.from_regex(r"[A-Z_][A-Z0-9_]{0,3}", fullmatch=True), min_size=1,
                max_size=6),
       st.sampled_from(["", "\\", "^", "^^"]))
def test_name_string_structure(segments, prefix):
    encoded = Path(prefix + ".".join(segments)).to_aml()
    assert encoded.startswith(prefix.encode())
    rest = encoded[len(prefix):]
    if len(segments) == 2:
        assert rest[0] == 0x2E
        rest = rest[1:]
    elif len(segments) > 2:
        assert rest[:2] == bytes((0x2F, len(segments)))
        rest = rest[2:]
    assert rest == b"".join(s.ljust(4, "_").encode() for s in segments)


def test_string():
    assert String("ab").to_aml() == h("0d 'ab' 00")
    with pytest.raises(ValueError):
        String("caf\u00e9")


@pytest.mark.parametrize("eisa_id, encoded", [
    ("PNP0A03", "0c 41 d0 0a 03"),
    ("PNP0A08", "0c 41 d0 0a 08"),
    ("PNP0C0C", "0c 41 d0 0c 0c"),
    ("PNP0501", "0c 41 d0 05 01"),
])
def test_eisa_name(eisa_id, encoded):
    assert EISAName(eisa_id).to_aml() == h(encoded)


@pytest.mark.parametrize("eisa_id", ["PNP0A0", "pnp0a03", "PNP0A0G", "1NP0A03"])
def test_invalid_eisa_name(eisa_id):
    with pytest.raises(ValueError):
        EISAName(eisa_id)


def test_buffer():
    # BufferOp PkgLength(5) BufferSize(ByteConst 2) data
    assert Buffer(b"\x01\x02").to_aml() == h("11 05 0a 02 01 02")


def test_uuid_is_mixed_endian():
    assert Uuid("E5C937D0-3553-4D7A-9117-EA4D19C3434D").to_aml() == h(
        "11 13 0a 10 d0 37 c9 e5 53 35 7a 4d 91 17 ea 4d 19 c3 43 4d")


def test_package():
    assert Package(5, 5, 0, 0).to_aml() == h("12 08 04 0a 05 0a 05 00 00")
    assert Package(Package(1)).to_aml() == h("12 06 01 12 03 01 01")
    with pytest.raises(ValueError):
        Package(*range(256))


def test_name():
    assert Name("_UID", 0).to_aml() == h("08 '_UID' 00")
    assert Name("_HID", String("ACPI0013")).to_aml() == h("08 '_HID' 0d 'ACPI0013' 00")


def test_a_str_in_a_value_position_is_rejected():
    with pytest.raises(TypeError, match="Path|String"):
        Name("_HID", "ACPI0013").to_aml()
    with pytest.raises(TypeError):
        Store("GDAT", Local(0)).to_aml()


# --- resource descriptors -----------------------------------------------------------------
def test_resource_template_wraps_descriptors_and_end_tag():
    template = ResourceTemplate(Memory32Fixed(0xE800_0000, 0x10_0000))
    # Buffer(PkgLength 0x11, size 0x0E) { 12-byte descriptor, EndTag 0x79 with checksum 0 }
    assert template.to_aml() == h("11 11 0a 0e 86 09 00 01 00 00 00 e8 00 00 10 00 79 00")


def test_memory32_fixed_read_only():
    assert Memory32Fixed(0x1000, 0x10, read_write=False).to_aml() == h(
        "86 09 00 00 00 10 00 00 10 00 00 00")


def test_io_descriptor():
    assert IO(0x3F8, 0x3F8, 0, 8).to_aml() == h("47 01 f8 03 f8 03 00 08")


@pytest.mark.parametrize("kwargs, flags", [
    ({}, "03"),                                          # consumer, edge, active high, exclusive
    ({"edge": False}, "01"),
    ({"active_low": True, "shared": True}, "0f"),
    ({"consumer": False}, "02"),
])
def test_extended_interrupt(kwargs, flags):
    assert ExtendedInterrupt(13, **kwargs).to_aml() == h(f"89 06 00 {flags} 01 0d 00 00 00")


def test_word_bus_number():
    # len 13, type 2 (bus), general flags MinFixed|MaxFixed, then granularity/min/max/tra/len
    assert AddressSpace.bus_number(0, 0).to_aml() == h(
        "88 0d 00 02 0c 00  0000 0000 0000 0000 0100")


def test_word_io():
    assert AddressSpace.io(0, 0xCF7).to_aml() == h(
        "88 0d 00 01 0c 03  0000 0000 f70c 0000 f80c")


def test_dword_memory():
    assert AddressSpace.memory(0xC000_0000, 0xE7FF_FFFF, width=32).to_aml() == h(
        "87 17 00 00 0c 01  00000000 000000c0 ffffffe7 00000000 00000028")


def test_qword_memory_cacheable():
    encoded = AddressSpace.memory(1 << 32, (1 << 33) - 1,
                                  cacheability=Cacheability.CACHEABLE).to_aml()
    assert encoded == h("8a 2b 00 00 0c 03"
                        " 0000000000000000 0000000001000000 ffffffff01000000"
                        " 0000000000000000 0000000001000000")


@pytest.mark.parametrize("minimum, maximum, width", [(2, 1, 16), (0, 1 << 16, 16), (0, 1, 8)])
def test_address_space_rejects_bad_ranges(minimum, maximum, width):
    with pytest.raises(ValueError):
        AddressSpace.io(minimum, maximum, width=width)


# --- namespace objects --------------------------------------------------------------------
def test_device():
    device = Device("\\_SB_.PWRB", Name("_UID", 0))
    assert device.to_aml() == h("5b 82 11 5c 2e '_SB_PWRB' 08 '_UID' 00")


def test_scope():
    assert Scope("\\_SB_", Name("FOO_", 1)).to_aml() == h("10 0c 5c '_SB_' 08 'FOO_' 01")


def test_method_flags():
    assert Method("ESCN", 0, serialized=True).to_aml() == h("14 06 'ESCN' 08")
    assert Method("_EJ0", 1).to_aml() == h("14 06 '_EJ0' 01")
    assert Method("_DSM", 7, serialized=True).to_aml() == h("14 06 '_DSM' 0f")
    with pytest.raises(ValueError):
        Method("BAD_", 8)


def test_method_body():
    method = Method("_EVT", 1, MethodCall("\\_SB_.GEC_.ESCN"), serialized=True)
    assert method.to_aml() == h("14 15 '_EVT' 09 5c 2f 03 '_SB_GEC_ESCN'")


def test_mutex_acquire_release():
    assert Mutex("BLCK").to_aml() == h("5b 01 'BLCK' 00")
    assert Mutex("MLCK", 15).to_aml() == h("5b 01 'MLCK' 0f")
    assert Acquire("BLCK", 0xFFFF).to_aml() == h("5b 23 'BLCK' ff ff")
    assert Acquire("\\_SB_.PHPR.BLCK", 0).to_aml() == h("5b 23 5c 2f 03 '_SB_PHPRBLCK' 00 00")
    assert Release("BLCK").to_aml() == h("5b 27 'BLCK'")
    with pytest.raises(ValueError):
        Mutex("BAD_", 16)


@pytest.mark.parametrize("space, byte", [
    (RegionSpace.SYSTEM_MEMORY, "00"), (RegionSpace.SYSTEM_IO, "01"),
    (RegionSpace.PCI_CONFIG, "02")])
def test_op_region(space, byte):
    assert OpRegion("GDST", space, 0xFEB0_0000, 1).to_aml() == h(
        f"5b 80 'GDST' {byte} 0c 00 00 b0 fe 01")


def test_field_named_entries_and_flags():
    field = Field("GDST", Named("GDAT", 8), access=FieldAccess.BYTE,
                  update=FieldUpdate.WRITE_AS_ZEROS)
    # flags = ByteAcc(1) | NoLock | WriteAsZeros(2 << 5) = 0x41
    assert field.to_aml() == h("5b 81 0b 'GDST' 41 'GDAT' 08")


def test_field_offsets_and_reserved_runs():
    # the reference's PRES status byte: Offset(4), CPEN..CEJ0 1 bit each, 4 reserved, CCMD 8
    field = Field("PRST", Offset(4), Named("CPEN", 1), Named("CINS", 1), Named("CRMV", 1),
                  Named("CEJ0", 1), Reserved(4), Named("CCMD", 8),
                  access=FieldAccess.BYTE, update=FieldUpdate.WRITE_AS_ZEROS)
    assert field.to_aml() == h("5b 81 23 'PRST' 41 00 20 'CPEN' 01 'CINS' 01 'CRMV' 01"
                               " 'CEJ0' 01 00 04 'CCMD' 08")


def test_field_lock_update_rules_and_long_entries():
    field = Field("MHPR", Named("MHBL", 64), Offset(16), Named("MHPX", 32),
                  access=FieldAccess.DWORD, lock=True, update=FieldUpdate.WRITE_AS_ONES)
    # flags = DWordAcc(3) | Lock(1 << 4) | WriteAsOnes(1 << 5) = 0x33; 64 bits = PkgLength 40 04
    assert field.to_aml() == h("5b 81 14 'MHPR' 33 'MHBL' 40 04 00 40 04 'MHPX' 20")


def test_field_offset_at_current_position_emits_nothing():
    assert Field("R___", Named("A___", 8), Offset(1), Named("B___", 8)).to_aml() == h(
        "5b 81 10 'R___' 00 'A___' 08 'B___' 08")


def test_field_offset_backwards_is_an_error():
    with pytest.raises(ValueError):
        Field("R___", Named("A___", 16), Offset(1)).to_aml()


# --- control flow and expressions -----------------------------------------------------------
def test_if_else():
    assert If(Equal(Local(1), 1), MethodCall("\\_SB_.CPUS.CSCN")).to_aml() == h(
        "a0 13 93 61 01 5c 2f 03 '_SB_CPUSCSCN'")
    assert Else(Return(0)).to_aml() == h("a1 03 a4 00")


def test_while():
    assert While(LessThan(Local(0), 8), Increment(Local(0))).to_aml() == h(
        "a2 07 95 60 0a 08 75 60")


def test_args_and_locals():
    assert [Arg(i).to_aml() for i in range(7)] == [bytes((0x68 + i,)) for i in range(7)]
    assert [Local(i).to_aml() for i in range(8)] == [bytes((0x60 + i,)) for i in range(8)]
    with pytest.raises(ValueError):
        Arg(7)
    with pytest.raises(ValueError):
        Local(8)


def test_store_operand_order_is_asl_order():
    assert Store(Path("GDAT"), Local(0)).to_aml() == h("70 'GDAT' 60")
    assert Store(Arg(0), "CSEL").to_aml() == h("70 68 'CSEL'")
    assert Store(1, "\\_SB_.PRES.CINS").to_aml() == h("70 01 5c 2f 03 '_SB_PRESCINS'")


@pytest.mark.parametrize("op, opcode", [
    (Add, "72"), (Concat, "73"), (Subtract, "74"), (Multiply, "77"), (ShiftLeft, "79"),
    (ShiftRight, "7a"), (And, "7b"), (Nand, "7c"), (Or, "7d"), (Nor, "7e"), (Xor, "7f"),
    (Mod, "85"), (Index, "88"),
])
def test_binary_operators(op, opcode):
    assert op(Local(0), 2, Local(1)).to_aml() == h(f"{opcode} 60 0a 02 61")
    assert op(Local(0), 2).to_aml() == h(f"{opcode} 60 0a 02 00")    # NullName target


def test_shift_left_into_a_field():
    # the reference's PCEJ: B0EJ = 1 << Arg0
    assert ShiftLeft(1, Arg(0), "B0EJ").to_aml() == h("79 01 68 'B0EJ'")


@pytest.mark.parametrize("op, opcodes", [
    (LAnd, "90"), (LOr, "91"), (Equal, "93"), (GreaterThan, "94"), (LessThan, "95"),
    (NotEqual, "92 93"), (LessEqual, "92 94"), (GreaterEqual, "92 95"),
])
def test_logical_operators(op, opcodes):
    assert op(Arg(0), 3).to_aml() == h(f"{opcodes} 68 0a 03")


def test_lnot():
    assert LNot(Arg(0)).to_aml() == h("92 68")


@pytest.mark.parametrize("op, opcode", [
    (Increment, "75"), (Decrement, "76"), (DeRefOf, "83"), (SizeOf, "87"), (ObjectType, "8e"),
])
def test_unary_operators(op, opcode):
    assert op(Local(0)).to_aml() == h(f"{opcode} 60")
    assert op("PKG0").to_aml() == h(f"{opcode} 'PKG0'")


def test_deref_of_index():
    assert DeRefOf(Index(Arg(0), 2)).to_aml() == h("83 88 68 0a 02 00")


@pytest.mark.parametrize("op, opcode", [(ToBuffer, "96"), (ToInteger, "99")])
def test_conversions(op, opcode):
    assert op(Arg(0), Local(0)).to_aml() == h(f"{opcode} 68 60")
    assert op(Arg(0)).to_aml() == h(f"{opcode} 68 00")


def test_notify():
    assert Notify("\\_SB_.PWRB", 0x80).to_aml() == h("86 5c 2e '_SB_PWRB' 0a 80")
    assert Notify(Path("S000"), Arg(1)).to_aml() == h("86 'S000' 69")


def test_return():
    assert Return(0xF).to_aml() == h("a4 0a 0f")
    assert Return(Path("MR64")).to_aml() == h("a4 'MR64'")


def test_method_call():
    assert MethodCall("CSTA", 3).to_aml() == h("'CSTA' 0a 03")
    assert MethodCall("\\_SB_.PHPR.PCEJ", Path("_SUN"), Path("_SEG")).to_aml() == h(
        "5c 2f 03 '_SB_PHPRPCEJ' '_SUN' '_SEG'")
    with pytest.raises(ValueError):
        MethodCall("M___", *range(8))


def test_create_buffer_fields():
    assert CreateDWordField(Path("MR64"), 18, "MINH").to_aml() == h("8a 'MR64' 0a 12 'MINH'")
    assert CreateQWordField(Path("MR64"), 14, "MINL").to_aml() == h("8f 'MR64' 0a 0e 'MINL'")
    assert CreateField(Path("BUFF"), 0, 8, "FLD0").to_aml() == h("5b 13 'BUFF' 00 0a 08 'FLD0'")


def test_sleep():
    assert Sleep(10).to_aml() == h("5b 22 0a 0a")
