"""An AML (ACPI Machine Language) encoder: one small class per construct, composed as trees.

Every construct implements the :class:`Aml` protocol, ``to_aml() -> bytes``, and a DSDT body is
the concatenation of the encodings of its top-level objects. Grammar references are to the
ACPI specification 6.5, chapter 20 ("ACPI Machine Language Specification") and §6.4
(resource descriptors).

Operands follow ASL order, which is also the order of the encoded bytes:
``Store(source, target)``, ``And(a, b, target)``, ``CreateDWordField(buffer, index, name)``.
Optional ``target`` operands default to the NullName (the result is not stored).

Values and names are never guessed from a Python ``str``:

* where the grammar allows only a name (the object being declared, a method being called, a
  mutex, a Store/Notify/Increment target ...), a ``str`` is accepted and parsed as a
  NameString (``"\\_SB_.PCI0"``, ``"^PRES"``, ``"GDAT"``);
* where the grammar takes a value (TermArg / DataObject: Name values, operands, method
  arguments, Package elements, Return), pass an ``int`` (encoded as the smallest integer
  constant), or an :class:`Aml` object such as :class:`Path` (a reference to a named object)
  or :class:`String` (a string literal). A ``str`` there raises ``TypeError``.

Integers are 64-bit (the tables we emit have revision >= 2), so ``2**64 - 1`` encodes as Ones.
"""

from __future__ import annotations

import enum
import re
import struct
import uuid
from collections.abc import Iterable
from typing import Protocol


class Aml(Protocol):
    """Anything that encodes itself as AML bytes."""

    def to_aml(self) -> bytes: ...


Term = Aml | int
"""A TermArg/DataObject: an :class:`Aml` object, or an int encoded as an integer constant."""

Target = Aml | str
"""A SuperName/Target: an :class:`Aml` object (Local, Arg, Path, Index ...) or a name string."""

# --- opcodes (ACPI 6.5 §20.3) -------------------------------------------------------------
_ZERO_OP = 0x00
_ONE_OP = 0x01
_NAME_OP = 0x08
_BYTE_PREFIX = 0x0A
_WORD_PREFIX = 0x0B
_DWORD_PREFIX = 0x0C
_STRING_PREFIX = 0x0D
_QWORD_PREFIX = 0x0E
_SCOPE_OP = 0x10
_BUFFER_OP = 0x11
_PACKAGE_OP = 0x12
_METHOD_OP = 0x14
_DUAL_NAME_PREFIX = 0x2E
_MULTI_NAME_PREFIX = 0x2F
_EXT_OP_PREFIX = 0x5B
_LOCAL0_OP = 0x60
_ARG0_OP = 0x68
_STORE_OP = 0x70
_INCREMENT_OP = 0x75
_DECREMENT_OP = 0x76
_NOTIFY_OP = 0x86
_LAND_OP = 0x90
_LOR_OP = 0x91
_LNOT_OP = 0x92
_LEQUAL_OP = 0x93
_LGREATER_OP = 0x94
_LLESS_OP = 0x95
_IF_OP = 0xA0
_ELSE_OP = 0xA1
_WHILE_OP = 0xA2
_RETURN_OP = 0xA4
_ONES_OP = 0xFF
_NULL_NAME = b"\x00"

# ExtOpPrefix second bytes
_MUTEX_OP = 0x01
_CREATE_FIELD_OP = 0x13
_SLEEP_OP = 0x22
_ACQUIRE_OP = 0x23
_RELEASE_OP = 0x27
_OP_REGION_OP = 0x80
_FIELD_OP = 0x81
_DEVICE_OP = 0x82

_MAX_PKG_LENGTH = (1 << 28) - 1
_U64_MAX = (1 << 64) - 1


# --- primitive encodings ------------------------------------------------------------------
def pkg_length(value: int) -> bytes:
    """Encode ``value`` as a PkgLength (§20.2.4) in the fewest bytes (1 to 4).

    One byte holds 0..63; otherwise the lead byte holds the low 4 bits and the count of
    following bytes in bits 6-7, and each following byte holds the next 8 bits.
    The value is encoded as given: see :func:`with_pkg_length` for the self-inclusive form
    used by package-like objects. (Field entries use this form directly: bit counts.)
    """
    if not 0 <= value <= _MAX_PKG_LENGTH:
        raise ValueError(f"PkgLength {value} out of range 0..{_MAX_PKG_LENGTH}")
    if value < 1 << 6:
        return bytes((value,))
    follow = 1 if value < 1 << 12 else 2 if value < 1 << 20 else 3
    rest = value >> 4
    return bytes((follow << 6 | value & 0x0F,)) + rest.to_bytes(follow, "little")


def with_pkg_length(payload: bytes) -> bytes:
    """``payload`` prefixed by the shortest PkgLength that counts itself plus the payload."""
    for size in range(1, 5):
        total = len(payload) + size
        if total <= _MAX_PKG_LENGTH and len(pkg_length(total)) == size:
            return pkg_length(total) + payload
    raise ValueError(f"AML package of {len(payload)} bytes is too large")


def _encode_term(value: Term) -> bytes:
    if isinstance(value, str):
        raise TypeError(
            f"ambiguous str {value!r} in a value position: use Path({value!r}) to reference "
            f"a named object or String({value!r}) for a string literal")
    if isinstance(value, int):
        return Integer(value).to_aml()
    return value.to_aml()


def _encode_target(target: Target | None) -> bytes:
    if target is None:
        return _NULL_NAME
    if isinstance(target, str):
        return Path(target).to_aml()
    return target.to_aml()


def _encode_all(children: Iterable[Aml]) -> bytes:
    return b"".join(child.to_aml() for child in children)


_NAME_SEG_RE = re.compile(r"[A-Z_][A-Z0-9_]{0,3}")


def name_seg(segment: str) -> bytes:
    """A NameSeg: 1-4 characters ``[A-Z_][A-Z0-9_]*``, padded with ``_`` to 4 bytes."""
    if not _NAME_SEG_RE.fullmatch(segment):
        raise ValueError(f"invalid ACPI name segment {segment!r}")
    return segment.ljust(4, "_").encode("ascii")


# --- data objects -------------------------------------------------------------------------
class Sequence:
    """Several top-level objects emitted one after another (a manager's DSDT contribution)."""

    def __init__(self, *items: Aml) -> None:
        self.items = items

    def to_aml(self) -> bytes:
        return b"".join(item.to_aml() for item in self.items)


class Integer:
    """An integer constant in its smallest encoding: Zero/One/Ones or Byte/Word/DWord/QWord."""

    __slots__ = ("value",)

    def __init__(self, value: int):
        if not 0 <= value <= _U64_MAX:
            raise ValueError(f"AML integer {value} out of range 0..2**64-1")
        self.value = value

    def to_aml(self) -> bytes:
        v = self.value
        if v == 0:
            return bytes((_ZERO_OP,))
        if v == 1:
            return bytes((_ONE_OP,))
        if v == _U64_MAX:
            return bytes((_ONES_OP,))
        if v <= 0xFF:
            return bytes((_BYTE_PREFIX, v))
        if v <= 0xFFFF:
            return struct.pack("<BH", _WORD_PREFIX, v)
        if v <= 0xFFFF_FFFF:
            return struct.pack("<BI", _DWORD_PREFIX, v)
        return struct.pack("<BQ", _QWORD_PREFIX, v)


ZERO = Integer(0)
ONE = Integer(1)
ONES = Integer(_U64_MAX)


class String:
    """A string literal: StringPrefix, ASCII characters 0x01-0x7F, NUL."""

    __slots__ = ("value",)

    def __init__(self, value: str):
        if not all(0x01 <= ord(c) <= 0x7F for c in value):
            raise ValueError(f"AML strings are 7-bit ASCII without NUL: {value!r}")
        self.value = value

    def to_aml(self) -> bytes:
        return bytes((_STRING_PREFIX,)) + self.value.encode("ascii") + b"\x00"


class Path:
    """A NameString: optional root ``\\`` or parent ``^`` prefixes, then dot-separated segments.

    ``Path("\\_SB_.PCI0")``, ``Path("^^PRES")``, ``Path("GDAT")``, ``Path("\\")``. Segments
    shorter than four characters are padded with ``_``. Used as a value it is a reference to
    the named object (e.g. ``Store(Path("GDAT"), Local(0))``).
    """

    __slots__ = ("prefix", "segments")

    def __init__(self, name: str):
        if name.startswith("\\"):
            self.prefix, rest = "\\", name[1:]
        else:
            rest = name.lstrip("^")
            self.prefix = name[:len(name) - len(rest)]
        self.segments = tuple(name_seg(s) for s in rest.split(".")) if rest else ()
        if not self.segments and self.prefix != "\\":
            raise ValueError(f"invalid ACPI name {name!r}")
        if len(self.segments) > 255:
            raise ValueError(f"ACPI name {name!r} has more than 255 segments")

    def to_aml(self) -> bytes:
        n = len(self.segments)
        if n == 0:
            count = _NULL_NAME
        elif n == 1:
            count = b""
        elif n == 2:
            count = bytes((_DUAL_NAME_PREFIX,))
        else:
            count = bytes((_MULTI_NAME_PREFIX, n))
        return self.prefix.encode("ascii") + count + b"".join(self.segments)


def _path(name: str | Path) -> Path:
    return name if isinstance(name, Path) else Path(name)


class EISAName:
    """A compressed EISA ID (``EisaId("PNP0A08")``): 3 letters and 4 hex digits in a DWord.

    Always encoded with DWordPrefix, like iasl does, so the value is recognisable as an id.
    """

    __slots__ = ("value",)

    def __init__(self, eisa_id: str):
        if not re.fullmatch(r"[A-Z]{3}[0-9A-F]{4}", eisa_id):
            raise ValueError(f"invalid EISA id {eisa_id!r} (expected e.g. 'PNP0A03')")
        letters = [ord(c) - 0x40 for c in eisa_id[:3]]
        compressed = letters[0] << 26 | letters[1] << 21 | letters[2] << 16 | int(eisa_id[3:], 16)
        self.value = int.from_bytes(compressed.to_bytes(4, "big"), "little")

    def to_aml(self) -> bytes:
        return struct.pack("<BI", _DWORD_PREFIX, self.value)


class Buffer:
    """A buffer initialised from raw bytes: BufferOp PkgLength BufferSize ByteList."""

    __slots__ = ("data",)

    def __init__(self, data: bytes):
        self.data = bytes(data)

    def to_aml(self) -> bytes:
        body = Integer(len(self.data)).to_aml() + self.data
        return bytes((_BUFFER_OP,)) + with_pkg_length(body)


class Uuid(Buffer):
    """ASL ``ToUUID("E5C937D0-3553-4D7A-9117-EA4D19C3434D")``: a 16-byte buffer holding the
    UUID in ACPI's mixed-endian layout (first three fields little-endian, the rest as written),
    e.g. for comparing ``_DSM``'s Arg0."""

    __slots__ = ()

    def __init__(self, text: str):
        super().__init__(uuid.UUID(text).bytes_le)


class Package:
    """A fixed-size package (at most 255 elements): PackageOp PkgLength NumElements list."""

    __slots__ = ("elements",)

    def __init__(self, *elements: Term):
        if len(elements) > 255:
            raise ValueError(f"a Package holds at most 255 elements, got {len(elements)}")
        self.elements = elements

    def to_aml(self) -> bytes:
        body = bytes((len(self.elements),)) + b"".join(_encode_term(e) for e in self.elements)
        return bytes((_PACKAGE_OP,)) + with_pkg_length(body)


# --- resource descriptors (§6.4); only valid inside a ResourceTemplate ---------------------
_END_TAG = 0x79


class ResourceTemplate:
    """A buffer of resource descriptors closed by an End Tag.

    The End Tag's checksum byte is 0, which §6.4.2.9 defines as "checksum not computed,
    treat as valid" (this is also what iasl emits).
    """

    __slots__ = ("descriptors",)

    def __init__(self, *descriptors: Aml):
        self.descriptors = descriptors

    def to_aml(self) -> bytes:
        data = _encode_all(self.descriptors) + bytes((_END_TAG, 0))
        return Buffer(data).to_aml()


class Memory32Fixed:
    """32-bit fixed memory range descriptor (large item 0x86)."""

    __slots__ = ("base", "length", "read_write")

    def __init__(self, base: int, length: int, *, read_write: bool = True):
        self.base, self.length, self.read_write = base, length, read_write

    def to_aml(self) -> bytes:
        return struct.pack("<BHBII", 0x86, 9, int(self.read_write), self.base, self.length)


class AddressSpaceType(enum.IntEnum):
    MEMORY = 0
    IO = 1
    BUS_NUMBER = 2


class Cacheability(enum.IntEnum):
    """Memory attribute (_MEM) of a memory address space descriptor."""

    NON_CACHEABLE = 0
    CACHEABLE = 1
    WRITE_COMBINING = 2
    PREFETCHABLE = 3


_ADDRESS_SPACE_FORMATS = {16: (0x88, "H"), 32: (0x87, "I"), 64: (0x8A, "Q")}
_MIN_FIXED, _MAX_FIXED = 1 << 2, 1 << 3
_IO_ENTIRE_RANGE = 3


class AddressSpace:
    """Word/DWord/QWord address space descriptor (large items 0x88/0x87/0x8A).

    Min and max are always fixed and length = max - min + 1, granularity and translation
    are 0, and the resource is produced (a bridge window), as the reference's descriptors are. Build them
    with :meth:`memory`, :meth:`io` or :meth:`bus_number`.
    """

    __slots__ = ("kind", "width", "minimum", "maximum", "type_flags")

    def __init__(self, kind: AddressSpaceType, width: int, minimum: int, maximum: int, *,
                 type_flags: int = 0):
        if width not in _ADDRESS_SPACE_FORMATS:
            raise ValueError(f"address space width must be 16, 32 or 64, not {width}")
        if not 0 <= minimum <= maximum < 1 << width:
            raise ValueError(f"bad {width}-bit range {minimum:#x}..{maximum:#x}")
        self.kind, self.width = kind, width
        self.minimum, self.maximum = minimum, maximum
        self.type_flags = type_flags

    @classmethod
    def memory(cls, minimum: int, maximum: int, *, width: int = 64,
               cacheability: Cacheability = Cacheability.NON_CACHEABLE,
               read_write: bool = True) -> AddressSpace:
        """``QWordMemory``/``DWordMemory``/``WordMemory`` over [minimum, maximum]."""
        flags = cacheability << 1 | int(read_write)
        return cls(AddressSpaceType.MEMORY, width, minimum, maximum, type_flags=flags)

    @classmethod
    def io(cls, minimum: int, maximum: int, *, width: int = 16) -> AddressSpace:
        """``WordIO`` (or wider) over [minimum, maximum], decoding the entire range."""
        return cls(AddressSpaceType.IO, width, minimum, maximum, type_flags=_IO_ENTIRE_RANGE)

    @classmethod
    def bus_number(cls, minimum: int, maximum: int, *, width: int = 16) -> AddressSpace:
        """``WordBusNumber`` (or wider) over [minimum, maximum]."""
        return cls(AddressSpaceType.BUS_NUMBER, width, minimum, maximum)

    def to_aml(self) -> bytes:
        tag, field = _ADDRESS_SPACE_FORMATS[self.width]
        fields = struct.pack(f"<5{field}", 0, self.minimum, self.maximum, 0,
                             self.maximum - self.minimum + 1)
        header = struct.pack("<BHBBB", tag, 3 + len(fields), self.kind,
                             _MIN_FIXED | _MAX_FIXED, self.type_flags)
        return header + fields


class IO:
    """I/O port descriptor (small item 0x47) with 16-bit decode."""

    __slots__ = ("minimum", "maximum", "alignment", "length")

    def __init__(self, minimum: int, maximum: int, alignment: int, length: int):
        self.minimum, self.maximum = minimum, maximum
        self.alignment, self.length = alignment, length

    def to_aml(self) -> bytes:
        return struct.pack("<BBHHBB", 0x47, 1, self.minimum, self.maximum,
                           self.alignment, self.length)


class ExtendedInterrupt:
    """Extended interrupt descriptor (large item 0x89) for one GSI.

    ASL ``Interrupt(ResourceConsumer, Edge, ActiveHigh, Exclusive) {gsi}`` is the default.
    """

    __slots__ = ("gsi", "consumer", "edge", "active_low", "shared")

    def __init__(self, gsi: int, *, consumer: bool = True, edge: bool = True,
                 active_low: bool = False, shared: bool = False):
        self.gsi, self.consumer, self.edge = gsi, consumer, edge
        self.active_low, self.shared = active_low, shared

    def to_aml(self) -> bytes:
        flags = (int(self.shared) << 3 | int(self.active_low) << 2 | int(self.edge) << 1
                 | int(self.consumer))
        return struct.pack("<BHBBI", 0x89, 6, flags, 1, self.gsi)


# --- named objects and namespace modifiers -------------------------------------------------
class Name:
    """``Name(path, value)``: NameOp NameString DataRefObject."""

    __slots__ = ("path", "value")

    def __init__(self, path: str | Path, value: Term):
        self.path, self.value = _path(path), value

    def to_aml(self) -> bytes:
        return bytes((_NAME_OP,)) + self.path.to_aml() + _encode_term(self.value)


class Scope:
    """``Scope(path) { children }``."""

    __slots__ = ("path", "children")

    def __init__(self, path: str | Path, *children: Aml):
        self.path, self.children = _path(path), children

    def to_aml(self) -> bytes:
        body = self.path.to_aml() + _encode_all(self.children)
        return bytes((_SCOPE_OP,)) + with_pkg_length(body)


class Device:
    """``Device(path) { children }``."""

    __slots__ = ("path", "children")

    def __init__(self, path: str | Path, *children: Aml):
        self.path, self.children = _path(path), children

    def to_aml(self) -> bytes:
        body = self.path.to_aml() + _encode_all(self.children)
        return bytes((_EXT_OP_PREFIX, _DEVICE_OP)) + with_pkg_length(body)


class Method:
    """``Method(path, args, Serialized|NotSerialized) { body }`` (0-7 arguments)."""

    __slots__ = ("path", "args", "body", "serialized")

    def __init__(self, path: str | Path, args: int, *body: Aml, serialized: bool = False):
        if not 0 <= args <= 7:
            raise ValueError(f"a method takes 0..7 arguments, not {args}")
        self.path, self.args, self.body, self.serialized = _path(path), args, body, serialized

    def to_aml(self) -> bytes:
        flags = self.args | int(self.serialized) << 3
        body = self.path.to_aml() + bytes((flags,)) + _encode_all(self.body)
        return bytes((_METHOD_OP,)) + with_pkg_length(body)


class Mutex:
    """``Mutex(path, sync_level)``."""

    __slots__ = ("path", "sync_level")

    def __init__(self, path: str | Path, sync_level: int = 0):
        if not 0 <= sync_level <= 15:
            raise ValueError(f"mutex sync level must be 0..15, not {sync_level}")
        self.path, self.sync_level = _path(path), sync_level

    def to_aml(self) -> bytes:
        return bytes((_EXT_OP_PREFIX, _MUTEX_OP)) + self.path.to_aml() + bytes((self.sync_level,))


class RegionSpace(enum.IntEnum):
    SYSTEM_MEMORY = 0
    SYSTEM_IO = 1
    PCI_CONFIG = 2


class OpRegion:
    """``OperationRegion(path, space, offset, length)``."""

    __slots__ = ("path", "space", "offset", "length")

    def __init__(self, path: str | Path, space: RegionSpace, offset: Term, length: Term):
        self.path, self.space, self.offset, self.length = _path(path), space, offset, length

    def to_aml(self) -> bytes:
        return (bytes((_EXT_OP_PREFIX, _OP_REGION_OP)) + self.path.to_aml()
                + bytes((self.space,)) + _encode_term(self.offset) + _encode_term(self.length))


class FieldAccess(enum.IntEnum):
    ANY = 0
    BYTE = 1
    WORD = 2
    DWORD = 3
    QWORD = 4
    BUFFER = 5


class FieldUpdate(enum.IntEnum):
    PRESERVE = 0
    WRITE_AS_ONES = 1
    WRITE_AS_ZEROS = 2


class FieldEntry(Protocol):
    def encode(self, bit_position: int) -> tuple[bytes, int]:
        """The entry's bytes at ``bit_position``, and the bit position after it."""
        ...


class Named:
    """A named field unit of ``bits`` bits: NameSeg PkgLength."""

    __slots__ = ("name", "bits")

    def __init__(self, name: str, bits: int):
        self.name, self.bits = name_seg(name), bits

    def encode(self, bit_position: int) -> tuple[bytes, int]:
        return self.name + pkg_length(self.bits), bit_position + self.bits


class Reserved:
    """``, bits`` in ASL: skip ``bits`` bits (ReservedField: 0x00 PkgLength)."""

    __slots__ = ("bits",)

    def __init__(self, bits: int):
        self.bits = bits

    def encode(self, bit_position: int) -> tuple[bytes, int]:
        return b"\x00" + pkg_length(self.bits), bit_position + self.bits


class Offset:
    """ASL ``Offset(byte_offset)``: skip forward to a byte offset (encoded as a reserved run)."""

    __slots__ = ("byte_offset",)

    def __init__(self, byte_offset: int):
        self.byte_offset = byte_offset

    def encode(self, bit_position: int) -> tuple[bytes, int]:
        skip = self.byte_offset * 8 - bit_position
        if skip < 0:
            raise ValueError(f"Offset({self.byte_offset:#x}) is behind bit {bit_position}")
        return Reserved(skip).encode(bit_position) if skip else (b"", bit_position)


class Field:
    """``Field(region, access, lock, update) { entries }`` over an OperationRegion."""

    __slots__ = ("region", "entries", "access", "lock", "update")

    def __init__(self, region: str | Path, *entries: FieldEntry,
                 access: FieldAccess = FieldAccess.ANY, lock: bool = False,
                 update: FieldUpdate = FieldUpdate.PRESERVE):
        self.region, self.entries = _path(region), entries
        self.access, self.lock, self.update = access, lock, update

    def to_aml(self) -> bytes:
        flags = self.access | int(self.lock) << 4 | self.update << 5
        out, position = [self.region.to_aml(), bytes((flags,))], 0
        for entry in self.entries:
            encoded, position = entry.encode(position)
            out.append(encoded)
        return bytes((_EXT_OP_PREFIX, _FIELD_OP)) + with_pkg_length(b"".join(out))


# --- control flow ---------------------------------------------------------------------------
class If:
    """``If (predicate) { body }``; put an :class:`Else` right after it for the other branch."""

    __slots__ = ("predicate", "body")

    def __init__(self, predicate: Term, *body: Aml):
        self.predicate, self.body = predicate, body

    def to_aml(self) -> bytes:
        return bytes((_IF_OP,)) + with_pkg_length(_encode_term(self.predicate)
                                                  + _encode_all(self.body))


class Else:
    """``Else { body }``; valid only immediately after an :class:`If`."""

    __slots__ = ("body",)

    def __init__(self, *body: Aml):
        self.body = body

    def to_aml(self) -> bytes:
        return bytes((_ELSE_OP,)) + with_pkg_length(_encode_all(self.body))


class While:
    """``While (predicate) { body }``."""

    __slots__ = ("predicate", "body")

    def __init__(self, predicate: Term, *body: Aml):
        self.predicate, self.body = predicate, body

    def to_aml(self) -> bytes:
        return bytes((_WHILE_OP,)) + with_pkg_length(_encode_term(self.predicate)
                                                     + _encode_all(self.body))


class Return:
    """``Return(value)``."""

    __slots__ = ("value",)

    def __init__(self, value: Term):
        self.value = value

    def to_aml(self) -> bytes:
        return bytes((_RETURN_OP,)) + _encode_term(self.value)


class Sleep:
    """``Sleep(milliseconds)``."""

    __slots__ = ("milliseconds",)

    def __init__(self, milliseconds: Term):
        self.milliseconds = milliseconds

    def to_aml(self) -> bytes:
        return bytes((_EXT_OP_PREFIX, _SLEEP_OP)) + _encode_term(self.milliseconds)


class MethodCall:
    """A method invocation: the method's NameString followed by its argument TermArgs."""

    __slots__ = ("path", "args")

    def __init__(self, path: str | Path, *args: Term):
        if len(args) > 7:
            raise ValueError("a method takes at most 7 arguments")
        self.path, self.args = _path(path), args

    def to_aml(self) -> bytes:
        return self.path.to_aml() + b"".join(_encode_term(a) for a in self.args)


# --- arguments, locals and references -------------------------------------------------------
class Arg:
    """``Arg0`` .. ``Arg6``."""

    __slots__ = ("index",)

    def __init__(self, index: int):
        if not 0 <= index <= 6:
            raise ValueError(f"Arg{index} does not exist (Arg0..Arg6)")
        self.index = index

    def to_aml(self) -> bytes:
        return bytes((_ARG0_OP + self.index,))


class Local:
    """``Local0`` .. ``Local7``."""

    __slots__ = ("index",)

    def __init__(self, index: int):
        if not 0 <= index <= 7:
            raise ValueError(f"Local{index} does not exist (Local0..Local7)")
        self.index = index

    def to_aml(self) -> bytes:
        return bytes((_LOCAL0_OP + self.index,))


# --- synchronisation and notification ------------------------------------------------------
class Acquire:
    """``Acquire(mutex, timeout_ms)``; 0xFFFF waits forever."""

    __slots__ = ("mutex", "timeout")

    def __init__(self, mutex: Target, timeout: int = 0xFFFF):
        self.mutex, self.timeout = mutex, timeout

    def to_aml(self) -> bytes:
        return (bytes((_EXT_OP_PREFIX, _ACQUIRE_OP)) + _encode_target(self.mutex)
                + struct.pack("<H", self.timeout))


class Release:
    """``Release(mutex)``."""

    __slots__ = ("mutex",)

    def __init__(self, mutex: Target):
        self.mutex = mutex

    def to_aml(self) -> bytes:
        return bytes((_EXT_OP_PREFIX, _RELEASE_OP)) + _encode_target(self.mutex)


class Notify:
    """``Notify(object, value)``: e.g. 1 = device check, 3 = eject request, 0x80 = status."""

    __slots__ = ("obj", "value")

    def __init__(self, obj: Target, value: Term):
        self.obj, self.value = obj, value

    def to_aml(self) -> bytes:
        return bytes((_NOTIFY_OP,)) + _encode_target(self.obj) + _encode_term(self.value)


# --- expressions ----------------------------------------------------------------------------
class Store:
    """``Store(source, target)``, i.e. ``target = source``."""

    __slots__ = ("source", "target")

    def __init__(self, source: Term, target: Target):
        self.source, self.target = source, target

    def to_aml(self) -> bytes:
        return bytes((_STORE_OP,)) + _encode_term(self.source) + _encode_target(self.target)


class _UnaryTarget:
    """Opcode followed by one SuperName (Increment, Decrement, SizeOf, ObjectType, DeRefOf)."""

    OPCODE: int
    __slots__ = ("target",)

    def __init__(self, target: Target):
        self.target = target

    def to_aml(self) -> bytes:
        return bytes((self.OPCODE,)) + _encode_target(self.target)


class Increment(_UnaryTarget):
    __slots__ = ()
    OPCODE = _INCREMENT_OP


class Decrement(_UnaryTarget):
    __slots__ = ()
    OPCODE = _DECREMENT_OP


class SizeOf(_UnaryTarget):
    __slots__ = ()
    OPCODE = 0x87


class ObjectType(_UnaryTarget):
    __slots__ = ()
    OPCODE = 0x8E


class DeRefOf(_UnaryTarget):
    """``DeRefOf(reference)``, typically of an :class:`Index`."""

    __slots__ = ()
    OPCODE = 0x83


class _BinaryOp:
    """Opcode, two TermArg operands and an optional target: ``Op(a, b, target)``."""

    OPCODE: int
    __slots__ = ("a", "b", "target")

    def __init__(self, a: Term, b: Term, target: Target | None = None):
        self.a, self.b, self.target = a, b, target

    def to_aml(self) -> bytes:
        return (bytes((self.OPCODE,)) + _encode_term(self.a) + _encode_term(self.b)
                + _encode_target(self.target))


class Add(_BinaryOp):
    __slots__ = ()
    OPCODE = 0x72


class Concat(_BinaryOp):
    __slots__ = ()
    OPCODE = 0x73


class Subtract(_BinaryOp):
    __slots__ = ()
    OPCODE = 0x74


class Multiply(_BinaryOp):
    __slots__ = ()
    OPCODE = 0x77


class ShiftLeft(_BinaryOp):
    __slots__ = ()
    OPCODE = 0x79


class ShiftRight(_BinaryOp):
    __slots__ = ()
    OPCODE = 0x7A


class And(_BinaryOp):
    __slots__ = ()
    OPCODE = 0x7B


class Nand(_BinaryOp):
    __slots__ = ()
    OPCODE = 0x7C


class Or(_BinaryOp):
    __slots__ = ()
    OPCODE = 0x7D


class Nor(_BinaryOp):
    __slots__ = ()
    OPCODE = 0x7E


class Xor(_BinaryOp):
    __slots__ = ()
    OPCODE = 0x7F


class Mod(_BinaryOp):
    __slots__ = ()
    OPCODE = 0x85


class Index(_BinaryOp):
    """``Index(source, index, target)``: a reference to an element of a package/buffer/string."""

    __slots__ = ()
    OPCODE = 0x88


class _ConvertOp:
    """Opcode, one TermArg operand and an optional target (ToBuffer, ToInteger)."""

    OPCODE: int
    __slots__ = ("operand", "target")

    def __init__(self, operand: Term, target: Target | None = None):
        self.operand, self.target = operand, target

    def to_aml(self) -> bytes:
        return bytes((self.OPCODE,)) + _encode_term(self.operand) + _encode_target(self.target)


class ToBuffer(_ConvertOp):
    __slots__ = ()
    OPCODE = 0x96


class ToInteger(_ConvertOp):
    __slots__ = ()
    OPCODE = 0x99


class _LogicalOp:
    """A logical operator on two TermArgs, optionally negated with LNot (ASL's LNotEqual...)."""

    OPCODE: int
    NEGATED = False
    __slots__ = ("a", "b")

    def __init__(self, a: Term, b: Term):
        self.a, self.b = a, b

    def to_aml(self) -> bytes:
        prefix = bytes((_LNOT_OP,)) if self.NEGATED else b""
        return prefix + bytes((self.OPCODE,)) + _encode_term(self.a) + _encode_term(self.b)


class LAnd(_LogicalOp):
    __slots__ = ()
    OPCODE = _LAND_OP


class LOr(_LogicalOp):
    __slots__ = ()
    OPCODE = _LOR_OP


class Equal(_LogicalOp):
    """``LEqual(a, b)`` / ``a == b``."""

    __slots__ = ()
    OPCODE = _LEQUAL_OP


class NotEqual(_LogicalOp):
    __slots__ = ()
    OPCODE = _LEQUAL_OP
    NEGATED = True


class LessThan(_LogicalOp):
    __slots__ = ()
    OPCODE = _LLESS_OP


class GreaterEqual(_LogicalOp):
    __slots__ = ()
    OPCODE = _LLESS_OP
    NEGATED = True


class GreaterThan(_LogicalOp):
    __slots__ = ()
    OPCODE = _LGREATER_OP


class LessEqual(_LogicalOp):
    __slots__ = ()
    OPCODE = _LGREATER_OP
    NEGATED = True


class LNot:
    """``LNot(operand)``."""

    __slots__ = ("operand",)

    def __init__(self, operand: Term):
        self.operand = operand

    def to_aml(self) -> bytes:
        return bytes((_LNOT_OP,)) + _encode_term(self.operand)


# --- buffer fields --------------------------------------------------------------------------
class _CreateSizedField:
    """``CreateXField(buffer, byte_index, name)``: a named field of fixed size in a buffer."""

    OPCODE: int
    __slots__ = ("buffer", "byte_index", "name")

    def __init__(self, buffer: Term, byte_index: Term, name: str | Path):
        self.buffer, self.byte_index, self.name = buffer, byte_index, _path(name)

    def to_aml(self) -> bytes:
        return (bytes((self.OPCODE,)) + _encode_term(self.buffer) + _encode_term(self.byte_index)
                + self.name.to_aml())


class CreateDWordField(_CreateSizedField):
    __slots__ = ()
    OPCODE = 0x8A


class CreateQWordField(_CreateSizedField):
    __slots__ = ()
    OPCODE = 0x8F


class CreateField:
    """``CreateField(buffer, bit_index, num_bits, name)``."""

    __slots__ = ("buffer", "bit_index", "num_bits", "name")

    def __init__(self, buffer: Term, bit_index: Term, num_bits: Term, name: str | Path):
        self.buffer, self.bit_index, self.num_bits = buffer, bit_index, num_bits
        self.name = _path(name)

    def to_aml(self) -> bytes:
        return (bytes((_EXT_OP_PREFIX, _CREATE_FIELD_OP)) + _encode_term(self.buffer)
                + _encode_term(self.bit_index) + _encode_term(self.num_bits) + self.name.to_aml())
