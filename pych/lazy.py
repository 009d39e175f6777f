"""Package attributes imported from their modules when first used (PEP 562).

A package that re-exports its modules' public names without importing them all at once (so
that, say, ``pych --api-socket`` never imports pydantic) declares which module defines each
name and takes its ``__getattr__`` and ``__dir__`` from :func:`exports`::

    _MODULE_OF = {"ApiClient": "client", ...}
    __all__ = sorted(_MODULE_OF)
    __getattr__, __dir__ = lazy.exports(__name__, _MODULE_OF)
"""

from __future__ import annotations

import importlib
import sys
from typing import Any, Callable, Mapping


def exports(package: str, module_of: Mapping[str, str]
            ) -> tuple[Callable[[str], Any], Callable[[], list[str]]]:
    """The module-level ``__getattr__`` and ``__dir__`` of ``package``: ``package.Name``
    imports ``package.<module_of[Name]>`` the first time it is asked for and keeps the value
    in the package's namespace (later lookups do not come back here)."""
    def __getattr__(name: str) -> Any:
        module = module_of.get(name)
        if module is None:
            raise AttributeError(f"module {package!r} has no attribute {name!r}")
        value = getattr(importlib.import_module(f"{package}.{module}"), name)
        setattr(sys.modules[package], name, value)
        return value

    def __dir__() -> list[str]:
        return sorted(set(vars(sys.modules[package])) | set(module_of))

    return __getattr__, __dir__
