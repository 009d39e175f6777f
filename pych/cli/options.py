"""Options of the ``pych`` process itself, outside the VM configuration: where the API
listens (``--api-socket``) and where events go (``--event-monitor``).

They are read on every start, so they are NamedTuples, not dataclasses (``dataclasses``
imports ``inspect``: ~10 ms of start-up, docs/benchmarks.md)."""

from __future__ import annotations

from typing import NamedTuple, Self

from pych.config import OptionError
from pych.config.grammar import OptionParser, OptionParserError, parse_integer

__all__ = ["ApiSocketOption", "EventMonitorOption"]


class ApiSocketOption(NamedTuple):
    """``--api-socket path=P``, ``fd=N`` or a bare path ``P``."""

    path: str | None = None
    fd: int | None = None

    @classmethod
    def parse(cls, text: str) -> Self:
        try:
            opts = OptionParser("--api-socket", ("path", "fd")).parse(text)
        except OptionParserError:
            # Not key=value: the whole text is a path (the reference does the same).
            return cls(path=text)
        if (fd := opts.get("fd")) is not None:
            try:
                return cls(fd=parse_integer(fd))
            except ValueError:
                raise OptionError(f"--api-socket: invalid fd {fd!r}") from None
        return cls(path=opts.get("path") or text)


class EventMonitorOption(NamedTuple):
    """``--event-monitor path=P`` or ``fd=N``."""

    path: str | None = None
    fd: int | None = None

    @classmethod
    def parse(cls, text: str) -> Self:
        try:
            opts = OptionParser("--event-monitor", ("path", "fd")).parse(text)
            fd = opts.integer("fd")
        except OptionParserError as err:
            raise OptionError(str(err)) from None
        if "fd" in opts:
            if fd is None:
                raise OptionError("--event-monitor: fd needs a value")
            return cls(fd=fd)
        if "path" in opts:
            path = opts.get("path")
            if path is None:
                raise OptionError("--event-monitor: path needs a value")
            return cls(path=path)
        raise OptionError("--event-monitor: path or fd required")
