"""Cloud Hypervisor-compatible REST API: the route table, the server, the client and the
VMM-facing :class:`RequestHandler` protocol."""

from pych.api.client import ApiClient
from pych.api.handler import RequestHandler
from pych.api.http import ApiServer, ApiSocketError

__all__ = [
    "ApiClient",
    "ApiServer",
    "ApiSocketError",
    "RequestHandler",
]
