"""What a failed request answers: the one table from error class to HTTP status.

The VMM raises the domain errors of :mod:`pych.errors` (it knows nothing of HTTP); request
bodies fail with :class:`~pych.config.ConfigError`, :class:`~pych.config.ConfigConflict` or
``pydantic.ValidationError``.  :data:`STATUS` gives each of these classes its status, as
Cloud Hypervisor's ``http_endpoint.rs`` maps its ``ApiError`` variants; an error is looked up
by its nearest listed class, so ``ConfigConflict`` (a ``ConfigError``) gets 409.  Any other
exception is a bug in pych and answers 500.

The body of every error response is the error chain as a JSON array of strings, outermost
first: a context line (``Error from API``, or ``Failed to deserialize JSON`` for a body that
does not validate), the error's own messages (:attr:`pych.errors.VmmError.messages`, one line
per pydantic error, or ``str(error)``), then ``str()`` of each ``__cause__`` below it
(``raise ... from cause``).
"""

from __future__ import annotations

import sys
from collections.abc import Mapping
from http import HTTPStatus

from pych import errors
from pych.config.errors import ConfigConflict, ConfigError

STATUS: Mapping[type[Exception] | str, HTTPStatus] = {
    errors.VmNotCreated: HTTPStatus.NOT_FOUND,
    errors.VmAlreadyCreated: HTTPStatus.CONFLICT,
    errors.InvalidState: HTTPStatus.METHOD_NOT_ALLOWED,
    errors.InvalidRequest: HTTPStatus.BAD_REQUEST,
    errors.NotFound: HTTPStatus.NOT_FOUND,
    errors.Conflict: HTTPStatus.CONFLICT,
    errors.RetryLater: HTTPStatus.TOO_MANY_REQUESTS,
    errors.BackendError: HTTPStatus.BAD_REQUEST,
    errors.Unsupported: HTTPStatus.INTERNAL_SERVER_ERROR,
    errors.InternalError: HTTPStatus.INTERNAL_SERVER_ERROR,
    ConfigConflict: HTTPStatus.CONFLICT,
    ConfigError: HTTPStatus.BAD_REQUEST,
    "pydantic.ValidationError": HTTPStatus.BAD_REQUEST,
}
"""A class of a module pych imports only when needed is named, not imported (pydantic comes
with the first request body): until its module is imported, nothing can raise it."""


def _listed_class(key: type[Exception] | str) -> type[Exception] | None:
    """A key of :data:`STATUS` as its class; None for a named class not imported yet."""
    if not isinstance(key, str):
        return key
    module, _, name = key.rpartition(".")
    loaded = sys.modules.get(module)
    return None if loaded is None else getattr(loaded, name, None)   # None: still importing


def _validation_error() -> type[Exception] | None:
    """pydantic's ``ValidationError`` if pydantic is imported (else nothing raises it)."""
    return _listed_class("pydantic.ValidationError")


def body_errors() -> tuple[type[Exception], ...]:
    """What validating a request body may raise (anything else there is a bug); called once
    the body's model, and so pydantic, is imported."""
    return tuple(cls for cls in (_validation_error(), ConfigError) if cls is not None)


def status_of(error: BaseException) -> HTTPStatus | None:
    """The status :data:`STATUS` gives ``error``'s nearest listed class; None if unlisted."""
    statuses = {cls: status for key, status in STATUS.items()
                if (cls := _listed_class(key)) is not None}
    for cls in type(error).__mro__:
        status = statuses.get(cls)
        if status is not None:
            return status
    return None


def not_supported(endpoint: str) -> errors.Unsupported:
    """The error of an endpoint pych does not implement: ``vm.snapshot is not supported by
    pych yet`` (500, as Cloud Hypervisor answers an action it cannot perform)."""
    return errors.Unsupported(f"{endpoint} is not supported by pych yet")


def error_chain(error: BaseException) -> list[str]:
    """``error``'s messages followed by its ``__cause__`` chain, outermost first."""
    if isinstance(error, errors.VmmError):
        own = list(error.messages)
    elif (validation_error := _validation_error()) and isinstance(error, validation_error):
        from pych.config import validation_messages
        own = validation_messages(error)
    elif status_of(error) is not None:
        own = [str(error)]
    else:  # a bug: name the exception, its message alone may say nothing
        own = [f"{type(error).__name__}: {error}" if str(error) else type(error).__name__]
    return own + _causes(error)


def _causes(error: BaseException) -> list[str]:
    chain, seen = [], {id(error)}
    cause = error.__cause__
    while cause is not None and id(cause) not in seen:
        seen.add(id(cause))
        chain.append(str(cause) or type(cause).__name__)
        cause = cause.__cause__
    return chain
