"""What every configuration model shares: the JSON rules, the scalar types, the errors
(defined in :mod:`pych.config.errors`, which needs no pydantic), and the way a model declares
its command line form.

**JSON.**  One model per schema of Cloud Hypervisor's OpenAPI contract, with the schema's
names and JSON field names.  Where the contract and the reference implementation
disagree, the models follow what the reference *does* (its serde definitions in
``vmm/src/vm_config.rs``), because that is what clients observe:

* Defaults are serde's.  E.g. ``FsConfig.num_queues``/``queue_size`` are "required" in
  the spec but default to 1/1024; ``NetConfig.ip``/``mask`` have spec defaults but serde
  leaves them unset; a ``VmConfig`` without ``cpus``/``memory``/``rng``/``serial``/
  ``console`` gets the CLI defaults.
* Integers carry the reference's Rust widths (:data:`U8`, :data:`U16`, :data:`U32`,
  :data:`U64`) and the spec's minimums; they are strict like serde_json: ``"2"``, ``2.0``
  or ``true`` is not an integer, ``1`` is not a boolean.
* Fields serde has but the spec lacks are kept when clients can see them in ``vm.info``
  (``DiskConfig.disable_io_uring``, ``CpusConfig.profile``, ``PlatformConfig.iommufd_fd``,
  ``ImageType`` ``FlatVmdk``, ...).
* ``payload.igvm``/``host_data`` and ``platform.tdx``/``sev_snp`` exist only in
  non-default builds of the reference; they are modelled (they are in the spec) but unset
  by default and rejected by ``VmConfig.validate``.

*Unknown JSON fields are ignored*: none of the reference's config structs uses
``deny_unknown_fields`` (so serde skips unknown keys), except ``RateLimiterConfig``, which
does; it rejects them here too.  Ignoring keeps clients written for newer Cloud Hypervisor
versions working.

*File descriptors never come from JSON.*  ``NetConfig.fds``, ``DeviceConfig.fd`` and
``PlatformConfig.iommufd_fd`` keep their values when built from Python (the CLI's
``fd=[3,4]``), but parsing JSON (``model_validate_json``) turns every number into ``-1``
(:func:`json_fds`), as the reference does: real descriptors arrive with SCM_RIGHTS and are
attached afterwards.

*Serialization*: ``model_dump(mode="json", exclude_none=True)`` yields what the reference
writes in ``vm.info``'s ``config``: absent optionals are omitted, ``iommu: false`` of PCI
devices is omitted, and the few serde structs without ``skip_serializing_none`` (rate
limiter token buckets, ``VmResize``) still write ``null``.

**Command line.**  A model with a CLI option (``--disk``, ``--cpus``, ...) derives from
:class:`CliModel` and declares each key once, on the field it fills::

    vhost_socket: Annotated[Str | None, Cli(key="socket")] = None
    readonly: Annotated[Bool, TOGGLE] = False

:meth:`CliModel.parse` reads the ``key=value,...`` text with :mod:`pych.config.grammar`,
turns the keys into JSON-shaped fields and goes through ``model_validate``, so
``DiskConfig.parse("path=x,readonly=on")`` equals
``DiskConfig.model_validate({"path": "x", "readonly": True})``.  Keys that make several
fields together (the rate limiter's ``bw_*``/``ops_*``, the console modes) are a
:class:`CliGroup`; rules between keys live in the model's :meth:`CliModel._complete_cli`.
"""

from __future__ import annotations

import contextlib
import functools
import logging
from collections.abc import Callable, Iterator, Mapping
from dataclasses import dataclass
from typing import Annotated, Any, ClassVar, Self

from pydantic import (
    BaseModel,
    ConfigDict,
    Field,
    SerializerFunctionWrapHandler,
    Strict,
    ValidationError,
    ValidationInfo,
    model_serializer,
)

from pych.config.grammar import (
    OptionParser,
    OptionParserError,
    ParsedOptions,
    dequote,
    parse_byte_size,
    parse_integer,
    parse_integer_list,
    parse_string_list,
    parse_toggle,
    parse_tuple_list,
)
from pych.config.errors import (  # noqa: F401 - the errors are part of this module's names
    ConfigConflict,
    ConfigError,
    DuplicateDevicePath,
    IdentifierNotUnique,
    OptionError,
)

__all__ = [
    "ApiModel",
    "Cli",
    "CliGroup",
    "CliModel",
    "ConfigConflict",
    "ConfigError",
    "DuplicateDevicePath",
    "IdentifierNotUnique",
    "OptionError",
    "Rejected",
    "describe_validation_error",
    "validation_messages",
]

log = logging.getLogger(__name__)

# --------------------------------------------------------------------------
# Errors


def validation_messages(err: ValidationError) -> list[str]:
    """One ``loc: msg`` line per pydantic error: ``disks.0.num_queues: Input should be ...``."""
    lines = []
    for detail in err.errors(include_url=False):
        location = ".".join(str(item) for item in detail["loc"])
        lines.append(f"{location}: {detail['msg']}" if location else detail["msg"])
    return lines


def describe_validation_error(err: ValidationError) -> str:
    """The :func:`validation_messages` of ``err`` on one line, joined by ``; ``."""
    return "; ".join(validation_messages(err))


# --------------------------------------------------------------------------
# Scalar types, with the reference's Rust widths


def _unsigned(bits: int, minimum: int = 0) -> Any:
    return Annotated[int, Strict(), Field(ge=minimum, le=2**bits - 1)]


U8 = _unsigned(8)
U16 = _unsigned(16)
U32 = _unsigned(32)
U64 = _unsigned(64)
Usize = U64
PositiveU32 = _unsigned(32, minimum=1)
PositiveU64 = _unsigned(64, minimum=1)
VsockCid = _unsigned(32, minimum=3)
I32 = Annotated[int, Strict(), Field(ge=-(2**31), le=2**31 - 1)]
I64 = Annotated[int, Strict(), Field(ge=-(2**63), le=2**63 - 1)]
Bool = Annotated[bool, Strict()]
Str = Annotated[str, Strict()]


# --------------------------------------------------------------------------
# Model base


class ApiModel(BaseModel):
    """Base of every schema: serde's input rules and output shape."""

    # Unknown JSON fields are ignored, as serde does without deny_unknown_fields
    # (the reference's choice for every config struct but RateLimiterConfig).
    # defer_build: validators are built on first use, which keeps `pych` start-up fast.
    model_config = ConfigDict(extra="ignore", validate_assignment=True, defer_build=True)

    # Optional fields that serde writes as ``null`` instead of omitting them
    # (structs without ``skip_serializing_none``).
    _serde_nullable: ClassVar[frozenset[str]] = frozenset()
    # Boolean fields that serde omits when false.
    _serde_omit_false: ClassVar[frozenset[str]] = frozenset()

    @model_serializer(mode="wrap")
    def _serde_shape(self, handler: SerializerFunctionWrapHandler) -> Any:
        data = handler(self)
        if not isinstance(data, dict) or not (self._serde_nullable or self._serde_omit_false):
            return data
        shaped = {}
        for name in type(self).model_fields:
            if name in data:
                if not (name in self._serde_omit_false and data[name] is False):
                    shaped[name] = data[name]
            elif name in self._serde_nullable and getattr(self, name) is None:
                shaped[name] = None
        return shaped


def json_fds(value: Any, info: ValidationInfo) -> Any:
    """A field validator: descriptors in JSON are meaningless here, make them -1.

    Python input (the CLI) keeps its values; JSON input (the API) cannot carry live
    descriptors, they come with SCM_RIGHTS, as in the reference.  Use it as
    ``_fds_from_json = field_validator("fds")(json_fds)``.
    """
    if info.mode == "json" and value is not None:
        if isinstance(value, list):
            return [-1] * len(value)
        return -1
    return value


# --------------------------------------------------------------------------
# The command line form of a model


class Rejected(Exception):
    """A CLI value that is well formed but not acceptable: reported as ``<option>: <message>``.

    Raised by a :class:`Cli` reader (a ``ValueError`` from a reader is reported as
    ``invalid value '<text>' for '<key>'`` instead), or by :meth:`CliModel._complete_cli`.
    It is deliberately not a ``ValueError``, so the grammar does not rewrap it.
    """


Reader = Callable[[str], Any]


@dataclass(frozen=True)
class Cli:
    """The CLI key of the field it annotates: ``Annotated[U16, Cli(parse_integer)]``.

    ``read`` turns the value text into the field's JSON value (its ``ValueError`` means
    "invalid value"); an absent or empty key leaves the field to ``default`` or, if that is
    None, to the model's default.
    """

    read: Reader = dequote
    key: str | None = None
    """The key, when it is not the field's name (``socket`` for ``vhost_socket``)."""
    default: Any = None
    """The CLI's default where it differs from the JSON one (``--memory size`` is 512M)."""
    required: bool | str = False
    """An absent key is an error: ``<key> missing``, or this message."""
    deprecated: str | None = None
    """An older spelling of the key, still read (with a warning) when the key is absent."""


TEXT = Cli()
TOGGLE = Cli(parse_toggle)
INTEGER = Cli(parse_integer)
BYTE_SIZE = Cli(parse_byte_size)
INTEGER_LIST = Cli(parse_integer_list)
STRING_LIST = Cli(parse_string_list)


@dataclass(frozen=True)
class CliGroup:
    """Keys (and valueless flags) that make some fields together, e.g. ``bw_size`` and
    ``bw_refill_time`` one token bucket.  ``read`` returns those fields; None values are
    left out."""

    keys: tuple[str, ...]
    read: Callable[[ParsedOptions], Mapping[str, Any]]
    flags: tuple[str, ...] = ()


def one_of(choices: Mapping[str, str], *, ignore_case: bool = True) -> Reader:
    """A reader from CLI spellings (``virtio-mem``) to JSON values (``VirtioMem``)."""

    def read(raw: str) -> str:
        text = dequote(raw)
        try:
            return choices[text.lower() if ignore_case else text]
        except KeyError:
            raise ValueError(f"expected one of: {', '.join(choices)}") from None

    return read


def pairs(key: Reader, value: Reader, names: tuple[str, str]) -> Reader:
    """A reader of ``[k@v,...]`` into ``[{names[0]: k, names[1]: v}, ...]``."""

    def read(raw: str) -> list[dict[str, Any]]:
        return [dict(zip(names, pair, strict=True)) for pair in parse_tuple_list(raw, key, value)]

    return read


@dataclass(frozen=True)
class _Grammar:
    parser: OptionParser
    keys: tuple[tuple[str, Cli], ...]
    """(field name, key) pairs, in field order."""
    groups: tuple[CliGroup, ...]


class CliModel(ApiModel):
    """A model with a command line option: ``CLI_OPTION`` and :class:`Cli`-annotated fields."""

    CLI_OPTION: ClassVar[str]
    """The option as messages name it: ``--disk``."""
    CLI_GROUPS: ClassVar[tuple[CliGroup, ...]] = ()
    CLI_IGNORED_KEYS: ClassVar[tuple[str, ...]] = ()
    """Keys the reference accepts and ignores (``pych`` and ``pych-remote`` refuse them:
    :func:`pych.config.support.check_cli_keys`)."""

    @classmethod
    def parse(cls, text: str, **context: Any) -> Self:
        """The model described by ``text`` (``path=/img,readonly=on``).

        Raises :class:`OptionError`; grammar errors already name the option, schema errors
        (out of range, wrong type) get it prefixed: ``--cpus: boot_vcpus: Input should be ...``.
        ``context`` goes to :meth:`_complete_cli`.
        """
        with cli_errors(cls.CLI_OPTION):
            fields = cls.cli_fields(text)
            cls._complete_cli(fields, **context)
            return cls.model_validate(fields)

    @classmethod
    def cli_fields(cls, text: str) -> dict[str, Any]:
        """The JSON-shaped fields ``text`` gives; keys not given are left out.

        Deprecated spellings are warned about first.  Then the required keys are read, then
        the groups, then the other keys, each in field order: with several bad keys, the
        first bad one in that order is reported.
        """
        grammar = _grammar(cls)
        opts = grammar.parser.parse(text)
        fields: dict[str, Any] = {}
        for name, cli in grammar.keys:
            if cli.deprecated is not None and cli.deprecated in opts:
                log.warning(
                    "%r in %s is deprecated; use %r.",
                    cli.deprecated,
                    cls.CLI_OPTION,
                    cli.key or name,
                )
        required = [(name, cli) for name, cli in grammar.keys if cli.required]
        for name, cli in required:
            _put(fields, name, _read_key(opts, name, cli))
        for group in grammar.groups:
            for name, value in group.read(opts).items():
                _put(fields, name, value)
        for name, cli in grammar.keys:
            if not cli.required:
                _put(fields, name, _read_key(opts, name, cli))
        return fields

    @classmethod
    def _complete_cli(cls, fields: dict[str, Any], **context: Any) -> None:
        """Rules between keys (a default taken from another key, keys that exclude each
        other); edits ``fields`` in place.  Raise :class:`Rejected` for a bad combination."""


def _put(fields: dict[str, Any], name: str, value: Any) -> None:
    if value is not None:
        fields[name] = value


def _read_key(opts: ParsedOptions, name: str, cli: Cli) -> Any:
    key = cli.key or name
    value = opts.convert(key, cli.read)
    if value is None and cli.deprecated is not None:
        value = opts.convert(cli.deprecated, cli.read)
    if value is None and cli.required:
        raise Rejected(cli.required if isinstance(cli.required, str) else f"{key} missing")
    return cli.default if value is None else value


@functools.cache
def _grammar(cls: type[CliModel]) -> _Grammar:
    keys: list[tuple[str, Cli]] = []
    for name, field in cls.model_fields.items():
        keys.extend((name, meta) for meta in field.metadata if isinstance(meta, Cli))
    names = [cli.key or name for name, cli in keys]
    names += [cli.deprecated for _, cli in keys if cli.deprecated is not None]
    flags: list[str] = []
    for group in cls.CLI_GROUPS:
        names += group.keys
        flags += group.flags
    names += cls.CLI_IGNORED_KEYS
    if len(set(names) | set(flags)) != len(names) + len(flags):
        raise TypeError(f"{cls.__name__}: a CLI key is declared twice")
    parser = OptionParser(cls.CLI_OPTION, names, flags)
    return _Grammar(parser, tuple(keys), cls.CLI_GROUPS)


@contextlib.contextmanager
def cli_errors(option: str) -> Iterator[None]:
    """Report every failure of reading ``option`` as an :class:`OptionError`."""
    try:
        yield
    except OptionError:
        raise
    except OptionParserError as err:
        raise OptionError(str(err)) from None
    except Rejected as err:
        raise OptionError(f"{option}: {err}") from None
    except ValidationError as err:
        raise OptionError(f"{option}: {describe_validation_error(err)}") from None
