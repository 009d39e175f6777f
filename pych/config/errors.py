"""The configuration's errors, apart from the models so that code that only reports them (the
command line, the API's status table) needs no pydantic."""

from __future__ import annotations

from pych.config.grammar import OptionParserError

__all__ = [
    "ConfigConflict",
    "ConfigError",
    "DuplicateDevicePath",
    "IdentifierNotUnique",
    "OptionError",
]


class ConfigError(ValueError):
    """The configuration is invalid.  The API answers 400 Bad Request."""


class OptionError(ConfigError, OptionParserError):
    """A CLI option string could not be turned into a configuration."""


class ConfigConflict(ConfigError):
    """The configuration reuses something that must be unique (HTTP 409)."""


class IdentifierNotUnique(ConfigConflict):
    def __init__(self, identifier: str) -> None:
        super().__init__(f"Identifier {identifier} is not unique")
        self.identifier = identifier


class DuplicateDevicePath(ConfigConflict):
    def __init__(self, path: str) -> None:
        super().__init__(f"Duplicated device path: {path}")
        self.path = path
