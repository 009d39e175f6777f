"""Cloud Hypervisor's ``key=value,...`` option grammar.

Every structured command line option of Cloud Hypervisor (``--disk``,
``--cpus``, ``--net``, ...) and every device argument of ``ch-remote`` is a
comma separated list of ``key=value`` pairs::

    path=/img/a.raw,readonly=on,queue_affinity=[0@[0,2],1@[1,3]]

The rules, as implemented by the reference's ``option_parser`` crate:

* Commas split options, except inside ``[...]`` (nesting tracked) or inside
  double quotes.  Unbalanced brackets or quotes are a syntax error.
* A value's surrounding double quotes are removed (``""`` inside quotes is a
  literal quote): ``cmdline="console=ttyS0,9600n8"``.
* Keys must be known to the option; an unknown key is an error naming it.
* ``key=`` (empty value) means "unset": the option's default applies.
* A key given twice: the last one wins.

Typed values:

* toggles: ``on|off|true|false`` (case-insensitive);
* byte sizes: an integer with an optional ``K``, ``M`` or ``G`` suffix
  (binary multiples), e.g. ``512M``;
* integer lists: ``[0,2-4,6]`` with inclusive ranges;
* string lists: ``[a,b,c]``;
* tuple lists: ``[key@value,...]``, where the value may itself be a list,
  e.g. ``[0@[0,2],1@[1,3]]``.

:class:`OptionParser` knows the keys of one option and turns a string into
:class:`ParsedOptions`, whose typed getters report bad values with a message
that names the option, the key and the offending text.
"""

from __future__ import annotations

import re
from collections.abc import Callable, Iterable
from typing import TypeVar

__all__ = [
    "OptionParser",
    "OptionParserError",
    "ParsedOptions",
    "dequote",
    "parse_byte_size",
    "parse_integer",
    "parse_integer_list",
    "parse_string_list",
    "parse_toggle",
    "parse_tuple_list",
    "split_commas",
]

K = TypeVar("K")
V = TypeVar("V")
T = TypeVar("T")


class OptionParserError(ValueError):
    """An option string does not follow the grammar or holds a bad value.

    The message is meant for the user as is, e.g.
    ``--disk: unknown key 'raedonly' (valid keys: direct, id, path, ...)``.
    """


# --------------------------------------------------------------------------
# Lexical layer


def split_commas(text: str) -> list[str]:
    """Split ``text`` at commas outside brackets and double quotes.

    Brackets and quotes are kept in the pieces; surrounding whitespace of the
    whole string is ignored.  Raises :class:`OptionParserError` on unbalanced
    brackets or quotes.
    """
    pieces: list[str] = []
    current: list[str] = []
    depth = 0
    in_quotes = False
    for char in text.strip():
        if char == '"':
            in_quotes = not in_quotes
        elif in_quotes:
            pass
        elif char == "[":
            depth += 1
        elif char == "]":
            if depth == 0:
                raise OptionParserError(f"unbalanced ']' in {text!r}")
            depth -= 1
        elif char == "," and depth == 0:
            pieces.append("".join(current))
            current = []
            continue
        current.append(char)
    pieces.append("".join(current))
    if in_quotes:
        raise OptionParserError(f"unterminated double quote in {text!r}")
    if depth:
        raise OptionParserError(f"unbalanced '[' in {text!r}")
    return pieces


def dequote(text: str) -> str:
    r"""Remove the double quotes of ``text``; two quotes inside quotes are one.

    ``"a,b"`` -> ``a,b``; ``a"b"c`` -> ``abc``; ``"say ""hi"" "`` -> ``say "hi" ``.
    Raises :class:`OptionParserError` if a quote is left open.
    """
    out: list[str] = []
    in_quotes = False
    previous = ""
    for char in text:
        if char == '"':
            if previous == '"' and not in_quotes:
                out.append('"')
            in_quotes = not in_quotes
        else:
            out.append(char)
        previous = char
    if in_quotes:
        raise OptionParserError(f"unterminated double quote in {text!r}")
    return "".join(out)


# --------------------------------------------------------------------------
# Value converters.  Each takes the raw value text (quotes still in place)
# and raises ValueError with a short description of what was expected.

_UNSIGNED = re.compile(r"\+?[0-9]+")
_SIGNED = re.compile(r"[+-]?[0-9]+")
_BYTE_SIZE = re.compile(r"(\+?[0-9]+)([KMG]?)")
_BYTE_SHIFTS = {"": 0, "K": 10, "M": 20, "G": 30}
_TOGGLES = {"": False, "on": True, "true": True, "off": False, "false": False}
U64_MAX = 2**64 - 1


def parse_toggle(text: str) -> bool:
    """``on``/``true`` -> True, ``off``/``false``/empty -> False (any case)."""
    try:
        return _TOGGLES[dequote(text).strip().lower()]
    except KeyError:
        raise ValueError("expected on, off, true or false") from None


def parse_integer(text: str) -> int:
    """A decimal integer, optionally signed (ranges are checked by the caller)."""
    text = dequote(text)
    if not _SIGNED.fullmatch(text):
        raise ValueError("expected a decimal integer")
    return int(text)


def _parse_unsigned(text: str) -> int:
    if not _UNSIGNED.fullmatch(text):
        raise ValueError(f"{text!r} is not a non-negative decimal integer")
    return int(text)


def parse_byte_size(text: str) -> int:
    """Bytes from an integer with an optional binary ``K``/``M``/``G`` suffix.

    ``4096`` -> 4096, ``1K`` -> 1024, ``512M`` -> 536870912, ``1G`` -> 2**30.
    This is also how ``ch-remote resize --memory 3G`` reads its sizes.
    """
    match = _BYTE_SIZE.fullmatch(dequote(text).strip())
    if not match:
        raise ValueError("expected a size in bytes with an optional K, M or G suffix (e.g. 512M)")
    size = int(match[1]) << _BYTE_SHIFTS[match[2]]
    if size > U64_MAX:
        raise ValueError("size does not fit in 64 bits")
    return size


def _strip_brackets(text: str) -> str:
    """Remove *all* leading ``[`` and trailing ``]`` (the reference's trim_matches)."""
    return text.strip().lstrip("[").rstrip("]")


def parse_integer_list(text: str) -> list[int]:
    """``[0,2-4,6]`` -> ``[0, 2, 3, 4, 6]``; the brackets are optional.

    A range ``a-b`` needs ``a < b``.  An empty list is an error, as in the
    reference.
    """
    values: list[int] = []
    for item in _strip_brackets(text).split(","):
        bounds = item.split("-")
        if len(bounds) > 2:
            raise ValueError(f"{item!r} is not an integer or a range a-b")
        start = _parse_unsigned(bounds[0])
        end = _parse_unsigned(bounds[1]) if len(bounds) == 2 else start
        if len(bounds) == 2 and start >= end:
            raise ValueError(f"range {item!r} must go upwards")
        values.extend(range(start, end + 1))
    return values


def parse_string_list(text: str) -> list[str]:
    """``[a,b,"c,d"]`` -> ``['a', 'b', 'c,d']``; the brackets are optional.

    (The reference keeps the quotes of quoted items; they are grammar, not
    data, so they are removed here.)
    """
    return [dequote(item) for item in split_commas(_strip_brackets(text))]


def parse_tuple_list(
    text: str,
    key: Callable[[str], K],
    value: Callable[[str], V],
) -> list[tuple[K, V]]:
    """``[k1@v1,k2@v2]`` -> ``[(key(k1), value(v1)), ...]``.

    Exactly one pair of enclosing brackets is required; a value may contain
    brackets and commas (``[0@[0,2],1@[1,3]]``).  ``@`` inside double quotes
    belongs to the key.
    """
    stripped = text.strip()
    if not (stripped.startswith("[") and stripped.endswith("]")):
        raise ValueError("expected a list of key@value pairs in brackets, e.g. [0@[0,1],1@[2,3]]")
    pairs: list[tuple[K, V]] = []
    for item in split_commas(stripped[1:-1]):
        item = item.strip()
        separator = _unquoted_at(item)
        raw_key, raw_value = item[:separator], item[separator + 1 :]
        if not raw_key.strip():
            raise ValueError(f"empty key in {item!r}")
        try:
            pairs.append((key(raw_key), value(raw_value)))
        except ValueError as err:
            raise ValueError(f"in {item!r}: {err}") from None
    return pairs


def _unquoted_at(item: str) -> int:
    """Index of the single ``@`` outside double quotes in ``item``."""
    in_quotes = False
    found = -1
    for index, char in enumerate(item):
        if char == '"':
            in_quotes = not in_quotes
        elif char == "@" and not in_quotes:
            if found >= 0:
                raise ValueError(f"more than one '@' in {item!r}")
            found = index
    if found < 0:
        raise ValueError(f"{item!r} is not a key@value pair")
    return found


# --------------------------------------------------------------------------
# Options


class ParsedOptions:
    """The ``key=value`` pairs of one option string, with typed getters.

    Every getter returns ``None`` when the key is absent or given empty
    (``key=``), so ``opts.toggle("readonly") or False`` reads naturally;
    a value that does not convert raises :class:`OptionParserError`.
    """

    def __init__(self, option: str, values: dict[str, str]) -> None:
        self.option = option
        self._values = values

    def __repr__(self) -> str:
        return f"ParsedOptions({self.option!r}, {self._values!r})"

    def __contains__(self, key: str) -> bool:
        return key in self._values

    def is_set(self, key: str) -> bool:
        """Whether ``key`` was given at all (``key=`` and bare flags count)."""
        return key in self._values

    def raw(self, key: str) -> str | None:
        """The value text as written (quotes kept), None if absent."""
        return self._values.get(key)

    def get(self, key: str) -> str | None:
        """The value with its quotes removed; None if absent or empty."""
        raw = self._values.get(key)
        return dequote(raw) if raw else None

    def convert(self, key: str, converter: Callable[[str], T]) -> T | None:
        """``converter(value)``, or None if absent or empty.

        ``ValueError`` from the converter becomes an :class:`OptionParserError`
        naming the option, the key and the value.
        """
        raw = self._values.get(key)
        if not raw:
            return None
        try:
            return converter(raw)
        except ValueError as err:
            detail = f": {err}" if str(err) else ""
            raise OptionParserError(
                f"{self.option}: invalid value {raw!r} for {key!r}{detail}"
            ) from None

    def toggle(self, key: str) -> bool | None:
        return self.convert(key, parse_toggle)

    def integer(self, key: str) -> int | None:
        return self.convert(key, parse_integer)

    def byte_size(self, key: str) -> int | None:
        return self.convert(key, parse_byte_size)

    def integer_list(self, key: str) -> list[int] | None:
        return self.convert(key, parse_integer_list)

    def string_list(self, key: str) -> list[str] | None:
        return self.convert(key, parse_string_list)

    def tuple_list(
        self, key: str, key_type: Callable[[str], K], value_type: Callable[[str], V]
    ) -> list[tuple[K, V]] | None:
        return self.convert(key, lambda raw: parse_tuple_list(raw, key_type, value_type))


class OptionParser:
    """The grammar of one option: which keys take a value, which are bare flags.

    ``option`` is the name shown in messages (``"--disk"``).  ``flags`` are
    valueless keys such as ``--console``'s ``off``/``tty``; a flag given as
    ``tty=x`` is accepted and its value ignored, as in the reference.
    """

    def __init__(self, option: str, keys: Iterable[str] = (), flags: Iterable[str] = ()) -> None:
        self.option = option
        self.keys = frozenset(keys)
        self.flags = frozenset(flags)
        for name in self.keys | self.flags:
            if not name or any(char in name for char in '"[]=,'):
                raise ValueError(f"invalid key name {name!r}")

    def parse(self, text: str, *, ignore_unknown: bool = False) -> ParsedOptions:
        """Parse ``text``; with ``ignore_unknown`` unknown keys are skipped."""
        values: dict[str, str] = {}
        if not text.strip():
            return ParsedOptions(self.option, values)
        try:
            pieces = split_commas(text)
        except OptionParserError as err:
            raise OptionParserError(f"{self.option}: {err}") from None
        for piece in pieces:
            key, has_value, value = piece.partition("=")
            if key in self.flags:
                values[key] = ""
            elif key in self.keys:
                if not has_value:
                    raise OptionParserError(f"{self.option}: {key!r} needs a value ({key}=...)")
                values[key] = value.strip()
            elif not ignore_unknown:
                raise OptionParserError(self._unknown(key, text))
        return ParsedOptions(self.option, values)

    def _unknown(self, key: str, text: str) -> str:
        valid = ", ".join(sorted(self.keys | self.flags))
        if not key:
            return f"{self.option}: empty option in {text!r} (valid keys: {valid})"
        return f"{self.option}: unknown key {key!r} (valid keys: {valid})"
