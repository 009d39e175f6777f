"""From a parsed HTTP request to its response, with no socket in sight.

:class:`Dispatcher` finds the request's route (:data:`pych.api.routes.BY_PATH`), validates
the body into the route's model, runs the route's handler through the injected
``handler_call`` and turns the outcome into a :class:`Response`: ``200`` with the returned
model or ``dict`` as compact JSON, the route's empty status for ``None``, and for a raised
error the status :mod:`pych.api.errors` gives it with the error chain as a JSON array of
strings.

Before any handler runs: an unknown path is 404, a wrong method 405 with an ``Allow``
header (the reference says 400), a body sent to an endpoint that takes none or none sent
to one that needs it 400, a body that does not validate 400 (409 for ``ConfigConflict``)
with ``Failed to deserialize JSON`` first in the chain.
"""

from __future__ import annotations

import json
import logging
from collections.abc import Callable, Iterable
from http import HTTPStatus
from typing import TYPE_CHECKING, Any, NamedTuple, TypeVar
from urllib.parse import urlsplit

from pych.api.errors import body_errors, error_chain, not_supported, status_of
from pych.api.handler import RequestHandler
from pych.fds import close_fds
from pych.api.routes import BY_PATH, Route

if TYPE_CHECKING:
    from pydantic import BaseModel

logger = logging.getLogger(__name__)

T = TypeVar("T")
HandlerCall = Callable[[Callable[[RequestHandler], T]], T]
"""Runs ``fn(request_handler)`` and returns its result or raises its exception (the VMM
queues ``fn`` onto its control loop); must not return before ``fn`` has either run or been
definitely dropped."""


class Response(NamedTuple):
    status: int
    body: bytes = b""
    headers: tuple[tuple[str, str], ...] = ()


def _compact_json(value: Any) -> bytes:
    return json.dumps(value, separators=(",", ":")).encode()  # as serde_json writes it


def error_response(
    status: int, messages: Iterable[str], headers: tuple[tuple[str, str], ...] = ()
) -> Response:
    """A response whose body is the error chain as a JSON array of strings."""
    return Response(status, _compact_json(list(messages)), headers)


class Rejection(Exception):
    """A request refused before any handler runs; carries the error response."""

    def __init__(
        self, status: int, messages: Iterable[str], headers: tuple[tuple[str, str], ...] = ()
    ) -> None:
        self.response = error_response(status, messages, headers)
        super().__init__(self.response.status)


class Dispatcher:
    """Turns (method, target, body, fds) into a :class:`Response` (see the module docstring)."""

    def __init__(self, handler_call: HandlerCall) -> None:
        self._handler_call = handler_call

    def respond(self, method: str, target: str, body: bytes | None, fds: list[int]) -> Response:
        """Serve one request.  Always answers, and always disposes of ``fds``:
        they go to the handler method if it takes them, or are closed."""
        try:
            route, model = self._prepare(method, target, body)
        except Rejection as rejection:
            close_fds(fds)
            return rejection.response
        if route.handler is None:
            close_fds(fds)
            return self._failure(route, not_supported(route.endpoint))
        if route.fds:
            return self._invoke(route, model, fds)
        if fds:
            logger.debug("closing %d fds sent to %s, which takes none", len(fds), route.endpoint)
            close_fds(fds)
        return self._invoke(route, model, [])

    def _prepare(
        self, method: str, target: str, body: bytes | None
    ) -> tuple[Route, BaseModel | None]:
        """The route and the body validated into its model (imported by the first request
        that needs it: pydantic is not imported before a request has a body)."""
        path = urlsplit(target).path
        route = BY_PATH.get(path)
        if route is None:
            raise Rejection(HTTPStatus.NOT_FOUND, ["Not Found", f"No endpoint {path}"])
        if method != route.method:
            raise Rejection(
                HTTPStatus.METHOD_NOT_ALLOWED,
                ["Method Not Allowed", f"{path} only accepts {route.method}"],
                headers=(("Allow", route.method),),
            )
        if not route.takes_body:
            if body is not None:
                raise Rejection(HTTPStatus.BAD_REQUEST, ["Bad Request", f"{path} takes no body"])
            return route, None
        if body is None:
            raise Rejection(
                HTTPStatus.BAD_REQUEST,
                ["Bad Request", f"{path} requires a JSON body ({route.body_model.name})"],
            )
        model = route.body
        try:
            return route, model.model_validate_json(body)
        except body_errors() as error:
            status = status_of(error) or HTTPStatus.BAD_REQUEST
            raise Rejection(status, ["Failed to deserialize JSON", *error_chain(error)]) from None

    def _invoke(self, route: Route, model: BaseModel | None, fds: list[int]) -> Response:
        entered = False

        def call(handler: RequestHandler) -> Any:
            nonlocal entered
            entered = True  # from here on the handler method owns the fds
            return route.call(handler, model, fds)

        try:
            result = self._handler_call(call)
        except Exception as error:  # every failure becomes a response
            return self._failure(route, error)
        finally:
            if not entered:
                close_fds(fds)

        if result is None:
            return Response(route.empty_status)
        try:
            if hasattr(type(result), "model_dump_json"):    # a pydantic model
                payload = result.model_dump_json(exclude_none=True).encode()
            else:
                payload = _compact_json(result)
        except (TypeError, ValueError) as error:  # pydantic's serialization error is a ValueError
            logger.exception("%s returned a value that is not JSON-serialisable", route.endpoint)
            return error_response(
                HTTPStatus.INTERNAL_SERVER_ERROR,
                ["Error from API", f"{route.endpoint} returned an unserialisable result: {error}"],
            )
        return Response(HTTPStatus.OK, payload)

    @staticmethod
    def _failure(route: Route, error: Exception) -> Response:
        status = status_of(error)
        if status is None:
            logger.exception("unexpected error in %s", route.endpoint)
            status = HTTPStatus.INTERNAL_SERVER_ERROR
        return error_response(status, ["Error from API", *error_chain(error)])
