"""What the managers' errors mean to the caller of a request: one table, one context manager.

The CPU, memory and device managers raise their own exceptions (``VcpuRemovalPending``,
``InvalidMemoryResize``, ``DeviceBackendError``, ...); a request turns them into the domain
errors of :mod:`pych.errors` with :func:`domain_errors`, the request's own words outermost:
``InvalidRequest("Error resizing VM memory", "<the manager's message>")``.
"""

from __future__ import annotations

import logging
from collections.abc import Iterator
from contextlib import contextmanager

from pych.cpu.manager import VcpuRemovalPending
from pych.device_manager.manager import (DeviceBackendError, DeviceManagerError,
                                         InvalidDiskResize, UnknownDeviceId)
from pych.errors import (BackendError, InternalError, InvalidRequest, NotFound, RetryLater,
                         VmmError)
from pych.memory.resize import InvalidMemoryResize, MemoryResizeError, UnknownMemoryZone

log = logging.getLogger(__name__)

# Each manager error and the domain error it becomes, subclasses before their bases.
_TRANSLATIONS: tuple[tuple[type[Exception], type[VmmError]], ...] = (
    (VcpuRemovalPending, RetryLater),       # the guest has not ejected the last vCPUs yet
    (UnknownDeviceId, NotFound),
    (InvalidDiskResize, InvalidRequest),    # shrinking, not whole sectors, not pych's
    (DeviceBackendError, BackendError),     # a file, socket or tap the device needs
    (DeviceManagerError, InternalError),    # incl. a device that cannot be removed (rng, ...)
    (UnknownMemoryZone, NotFound),
    (InvalidMemoryResize, InvalidRequest),
    (MemoryResizeError, InternalError),     # e.g. no hot plug slot left
)


@contextmanager
def domain_errors(context: str, *, otherwise: type[VmmError] | None = None) -> Iterator[None]:
    """Run the block; a manager error leaving it becomes its domain error, ``context`` first.

    Domain errors pass through unchanged. ``otherwise``: any other exception becomes this
    domain error too (``vm.boot``: every boot failure is one clear error for the caller);
    without it, other exceptions pass through unchanged.
    """
    try:
        yield
    except VmmError:
        raise
    except Exception as error:
        for source, target in _TRANSLATIONS:
            if isinstance(error, source):
                raise target(context, str(error)) from None
        if otherwise is None:
            raise
        log.debug("%s", context, exc_info=True)
        raise otherwise(context, str(error)) from None
