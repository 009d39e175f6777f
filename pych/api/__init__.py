"""Cloud Hypervisor-compatible REST API: the route table, the server, the client and the
VMM-facing :class:`RequestHandler` protocol.

The names below are imported from their modules when first used (PEP 562), so that the
server (:mod:`pych.api.http`) comes without the client's ``http.client``, and neither
imports pydantic before a request needs a model.
"""

from __future__ import annotations

import importlib
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from pych.api.client import ApiClient
    from pych.api.handler import RequestHandler
    from pych.api.http import ApiServer, ApiSocketError

_MODULE_OF = {
    "ApiClient": "client",
    "ApiServer": "http",
    "ApiSocketError": "http",
    "RequestHandler": "handler",
}

__all__ = sorted(_MODULE_OF)


def __getattr__(name: str) -> Any:
    module = _MODULE_OF.get(name)
    if module is None:
        raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
    value = getattr(importlib.import_module(f"{__name__}.{module}"), name)
    globals()[name] = value
    return value
