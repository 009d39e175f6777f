"""Cloud Hypervisor-compatible REST API: server, client and the VMM-facing interface."""

from pych.api.client import ApiClient
from pych.api.handler import ApiError, NotImplementedApiError, RequestHandler
from pych.api.http import ApiServer, ApiSocketError

__all__ = [
    "ApiClient",
    "ApiError",
    "ApiServer",
    "ApiSocketError",
    "NotImplementedApiError",
    "RequestHandler",
]
