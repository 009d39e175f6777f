"""Cloud Hypervisor-compatible REST API: the route table, the server, the client and the
VMM-facing :class:`RequestHandler` protocol.

The names below are imported from their modules when first used (PEP 562), so that the
server (:mod:`pych.api.http`) comes without the client's ``http.client``, and neither
imports pydantic before a request needs a model.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

from pych import lazy

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


__getattr__, __dir__ = lazy.exports(__name__, _MODULE_OF)
