"""The ``key=value,...`` grammar of pych.config.grammar."""

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from pych.config.grammar import (
    OptionParser,
    OptionParserError,
    dequote,
    parse_byte_size,
    parse_integer,
    parse_integer_list,
    parse_string_list,
    parse_toggle,
    parse_tuple_list,
    split_commas,
)

DISK = OptionParser("--disk", ("path", "readonly", "num_queues", "topology", "cmdline", "extra"))


# --------------------------------------------------------------------------
# Splitting and quotes


@pytest.mark.parametrize(
    ("text", "pieces"),
    [
        ("a=1,b=2", ["a=1", "b=2"]),
        ("a=[1,2],b=3", ["a=[1,2]", "b=3"]),
        ("a=[[1,2],[3,4]],b", ["a=[[1,2],[3,4]]", "b"]),
        ('cmdline="console=ttyS0,9600n8",b=1', ['cmdline="console=ttyS0,9600n8"', "b=1"]),
        ('a="[",b=2', ['a="["', "b=2"]),
        ('""', ['""']),
        ("  a=1  ", ["a=1"]),
        ("a=1,,b=2", ["a=1", "", "b=2"]),
    ],
)
def test_split_commas(text: str, pieces: list[str]) -> None:
    assert split_commas(text) == pieces


@pytest.mark.parametrize("text", ["[a,b", "a]", "[a]]", "[[[a]]", '"abc', 'a="b,c'])
def test_split_commas_rejects_unbalanced(text: str) -> None:
    with pytest.raises(OptionParserError):
        split_commas(text)


@pytest.mark.parametrize(
    ("text", "plain"),
    [
        ('"a,b"', "a,b"),
        ('a"b"c', "abc"),
        ('"say ""hi"""', 'say "hi"'),
        ('a=\\"b\\"', "a=\\b\\"),
        ("aβ", "aβ"),
        ('aβ"a"""', 'aβa"'),
    ],
)
def test_dequote(text: str, plain: str) -> None:
    assert dequote(text) == plain


# --------------------------------------------------------------------------
# Keys


def test_parse_gets_values() -> None:
    opts = DISK.parse("path=/img/a.raw,readonly=on,topology=[[1,2],[3,4]]")
    assert opts.get("path") == "/img/a.raw"
    assert opts.get("readonly") == "on"
    assert opts.get("topology") == "[[1,2],[3,4]]"
    assert not opts.is_set("num_queues")
    assert opts.get("num_queues") is None


def test_quoted_value_keeps_commas_and_loses_quotes() -> None:
    opts = DISK.parse('cmdline="console=ttyS0,9600n8",path=x')
    assert opts.get("cmdline") == "console=ttyS0,9600n8"
    assert opts.raw("cmdline") == '"console=ttyS0,9600n8"'


def test_equals_signs_in_a_value_belong_to_it() -> None:
    assert DISK.parse("extra=foo=bar").get("extra") == "foo=bar"


def test_empty_value_means_unset() -> None:
    opts = DISK.parse("path=,readonly=")
    assert opts.is_set("path")
    assert opts.get("path") is None
    assert opts.toggle("readonly") is None


def test_last_occurrence_wins() -> None:
    assert DISK.parse("path=a,path=b").get("path") == "b"


def test_values_are_trimmed() -> None:
    assert DISK.parse("path= /a ").get("path") == "/a"


@pytest.mark.parametrize("text", ["", "   "])
def test_empty_input_sets_nothing(text: str) -> None:
    assert not DISK.parse(text).is_set("path")


def test_unknown_key_names_the_key_and_the_option() -> None:
    with pytest.raises(OptionParserError) as err:
        DISK.parse("path=a,raedonly=on")
    message = str(err.value)
    assert message.startswith("--disk: unknown key 'raedonly'")
    assert "readonly" in message  # the valid keys are listed


def test_empty_option_is_reported() -> None:
    with pytest.raises(OptionParserError, match="empty option"):
        DISK.parse("path=a,,readonly=on")


def test_key_without_value_is_an_error() -> None:
    with pytest.raises(OptionParserError, match=r"--disk: 'path' needs a value"):
        DISK.parse("path")


def test_unbalanced_input_is_reported_with_the_option() -> None:
    with pytest.raises(OptionParserError, match=r"^--disk: unbalanced"):
        DISK.parse("topology=[")
    with pytest.raises(OptionParserError):
        DISK.parse("topology=[[[]]]]")
    with pytest.raises(OptionParserError):
        DISK.parse('cmdline="""')


def test_flags_take_no_value() -> None:
    console = OptionParser("--console", ("file",), ("off", "tty"))
    opts = console.parse("tty")
    assert opts.is_set("tty")
    assert not opts.is_set("off")
    assert console.parse("off=whatever").is_set("off")


def test_ignore_unknown_skips_other_keys() -> None:
    opts = DISK.parse("path=a,unknown=b", ignore_unknown=True)
    assert opts.get("path") == "a"
    assert not opts.is_set("unknown")


@pytest.mark.parametrize("name", ["bad=name", "bad,name", "bad[name", ""])
def test_key_names_cannot_hold_grammar_characters(name: str) -> None:
    with pytest.raises(ValueError):
        OptionParser("--x", (name,))


# --------------------------------------------------------------------------
# Typed values


@pytest.mark.parametrize(
    ("text", "value"),
    [
        ("on", True),
        ("off", False),
        ("true", True),
        ("false", False),
        ("ON", True),
        ("Off", False),
        ("True", True),
        ("FALSE", False),
        ("", False),
    ],
)
def test_toggle(text: str, value: bool) -> None:
    assert parse_toggle(text) is value


def test_bad_toggle_names_option_key_and_value() -> None:
    opts = DISK.parse("readonly=maybe")
    with pytest.raises(OptionParserError) as err:
        opts.toggle("readonly")
    assert str(err.value) == (
        "--disk: invalid value 'maybe' for 'readonly': expected on, off, true or false"
    )


@pytest.mark.parametrize(
    ("text", "size"),
    [
        ("1024", 1024),
        ("0", 0),
        ("0K", 0),
        ("1K", 1 << 10),
        ("2M", 2 << 20),
        ("4G", 4 << 30),
        ("512M", 536870912),
        ("3G", 3221225472),
        ("+5", 5),
    ],
)
def test_byte_size(text: str, size: int) -> None:
    assert parse_byte_size(text) == size


@pytest.mark.parametrize("text", ["", "K", "xyzK", "1x", "1k", "1KK", "-1", "1.5G", "1 G", "1T"])
def test_bad_byte_size(text: str) -> None:
    with pytest.raises(ValueError, match="K, M or G"):
        parse_byte_size(text)


def test_byte_size_must_fit_in_64_bits() -> None:
    assert parse_byte_size(f"{(1 << 34) - 1}G") == ((1 << 34) - 1) << 30
    with pytest.raises(ValueError, match="64 bits"):
        parse_byte_size(f"{1 << 34}G")


@pytest.mark.parametrize(("text", "value"), [("42", 42), ("-3", -3), ('"7"', 7), ("+1", 1)])
def test_integer(text: str, value: int) -> None:
    assert parse_integer(text) == value


@pytest.mark.parametrize("text", ["", "0x10", "1e3", "1_000", " 1", "one"])
def test_bad_integer(text: str) -> None:
    with pytest.raises(ValueError):
        parse_integer(text)


@pytest.mark.parametrize(
    ("text", "values"),
    [
        ("[1,3,5]", [1, 3, 5]),
        ("[0,2-4,6]", [0, 2, 3, 4, 6]),
        ("[0-3]", [0, 1, 2, 3]),
        ("7", [7]),
        ("1,2", [1, 2]),
    ],
)
def test_integer_list(text: str, values: list[int]) -> None:
    assert parse_integer_list(text) == values


@pytest.mark.parametrize("text", ["[5-3]", "[5-5]", "[1-2-3]", "[]", "[a]", "[1,,2]", "[-1]"])
def test_bad_integer_list(text: str) -> None:
    with pytest.raises(ValueError):
        parse_integer_list(text)


@pytest.mark.parametrize(
    ("text", "values"),
    [
        ("[foo,bar,baz]", ["foo", "bar", "baz"]),
        ("foo,bar", ["foo", "bar"]),
        ('[a,"b,c"]', ["a", "b,c"]),
        ("[amx]", ["amx"]),
    ],
)
def test_string_list(text: str, values: list[str]) -> None:
    assert parse_string_list(text) == values


def test_tuple_list_with_list_values() -> None:
    assert parse_tuple_list("[0@[0,2],1@[1,3]]", parse_integer, parse_integer_list) == [
        (0, [0, 2]),
        (1, [1, 3]),
    ]


def test_tuple_list_with_ranges_and_scalar_values() -> None:
    assert parse_tuple_list("[0@[0-2],1@5]", parse_integer, parse_integer_list) == [
        (0, [0, 1, 2]),
        (1, [5]),
    ]
    assert parse_tuple_list("[1@15,2@20]", parse_integer, parse_integer) == [(1, 15), (2, 20)]


def test_tuple_list_trims_items() -> None:
    assert parse_tuple_list("[a@[1,2], b@[3,4] ,\tc@[5]]", dequote, parse_integer_list) == [
        ("a", [1, 2]),
        ("b", [3, 4]),
        ("c", [5]),
    ]


def test_tuple_list_quoted_at_belongs_to_the_key() -> None:
    assert parse_tuple_list('["foo@"@42]', dequote, parse_integer) == [("foo@", 42)]
    assert parse_tuple_list('["@""b"@[1,2]]', dequote, parse_integer_list) == [('@"b', [1, 2])]


@pytest.mark.parametrize(
    ("text", "message"),
    [
        ("foo@42", "in brackets"),
        ("[@42]", "empty key"),
        ("[ @42]", "empty key"),
        ("[foo42]", "key@value"),
        ("[a@b@c]", "more than one"),
        ("[a@[1,2]],b@[3,4]]", "in brackets|unbalanced"),
        ("[a@]", "decimal integer"),
    ],
)
def test_bad_tuple_list(text: str, message: str) -> None:
    with pytest.raises(ValueError, match=message):
        parse_tuple_list(text, dequote, parse_integer)


def test_converter_errors_name_option_and_key() -> None:
    opts = DISK.parse("topology=[0@x]")
    with pytest.raises(OptionParserError, match=r"^--disk: invalid value '\[0@x\]' for 'topology'"):
        opts.tuple_list("topology", parse_integer, parse_integer_list)


# --------------------------------------------------------------------------
# Properties

_KEYS = st.sampled_from(["path", "readonly", "num_queues", "topology", "cmdline", "extra"])
_TEXT = st.text(st.characters(exclude_categories=("Cs",)), max_size=12)


def _quote(value: str) -> str:
    return '"' + value.replace('"', '""') + '"'


@settings(max_examples=60, deadline=None)
@given(st.dictionaries(_KEYS, _TEXT, max_size=6))
def test_quoted_values_round_trip(values: dict[str, str]) -> None:
    text = ",".join(f"{key}={_quote(value)}" for key, value in values.items())
    opts = DISK.parse(text)
    for key, value in values.items():
        assert opts.get(key) == value


@settings(max_examples=60, deadline=None)
@given(
    st.dictionaries(
        _KEYS,
        st.recursive(
            st.text("abz09/._:-", min_size=1, max_size=8),
            lambda inner: st.lists(inner, max_size=3).map(lambda xs: "[" + ",".join(xs) + "]"),
            max_leaves=6,
        ),
        max_size=6,
    )
)
def test_bracketed_values_round_trip(values: dict[str, str]) -> None:
    opts = DISK.parse(",".join(f"{key}={value}" for key, value in values.items()))
    for key, value in values.items():
        assert opts.get(key) == value


@settings(max_examples=60, deadline=None)
@given(st.text(max_size=30))
def test_split_commas_is_total_and_lossless(text: str) -> None:
    try:
        pieces = split_commas(text)
    except OptionParserError:
        return
    assert ",".join(pieces) == text.strip()


@settings(max_examples=60, deadline=None)
@given(st.lists(st.integers(0, 2**32), min_size=1, max_size=8))
def test_integer_list_round_trip(values: list[int]) -> None:
    assert parse_integer_list("[" + ",".join(map(str, values)) + "]") == values


@settings(max_examples=60, deadline=None)
@given(st.integers(0, 2**20), st.sampled_from(["", "K", "M", "G"]))
def test_byte_size_round_trip(number: int, suffix: str) -> None:
    shift = {"": 0, "K": 10, "M": 20, "G": 30}[suffix]
    assert parse_byte_size(f"{number}{suffix}") == number << shift


@settings(max_examples=60, deadline=None)
@given(
    st.lists(
        st.tuples(st.integers(0, 1000), st.lists(st.integers(0, 255), min_size=1, max_size=4)),
        min_size=1,
        max_size=5,
    )
)
def test_tuple_list_round_trip(pairs: list[tuple[int, list[int]]]) -> None:
    text = "[" + ",".join(f"{k}@[{','.join(map(str, v))}]" for k, v in pairs) + "]"
    assert parse_tuple_list(text, parse_integer, parse_integer_list) == pairs
