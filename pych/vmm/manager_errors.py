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

from functools import cache

from pych.errors import (BackendError, Conflict, InternalError, InvalidRequest, NotFound, RetryLater,
                         VmmError)

log = logging.getLogger(__name__)


@cache
def translations() -> tuple[tuple[type[Exception], type[VmmError]], ...]:
    """Each manager error and the domain error it becomes, subclasses before their bases.

    Imported when first needed: the managers (and the devices under them) are not loaded
    until a VM is created, so a VMM waiting for ``vm.create`` starts without them."""
    from pych.cpu.manager import VcpuRemovalPending
    from pych.device_manager.manager import (DeviceBackendError, DeviceIdInUse,
                                             DeviceManagerError, InvalidDiskResize,
                                             UnknownDeviceId)
    from pych.memory.resize import InvalidMemoryResize, MemoryResizeError, UnknownMemoryZone
    from pych.snapshot.format import SnapshotError
    from pych.snapshot.state import NotSnapshottable, StateError
    return (
        (VcpuRemovalPending, RetryLater),       # the guest has not ejected the last vCPUs yet
        (UnknownDeviceId, NotFound),
        (DeviceIdInUse, Conflict),              # its removal is pending: still in the tree
        (InvalidDiskResize, InvalidRequest),    # shrinking, not whole sectors, not pych's
        (DeviceBackendError, BackendError),     # a file, socket or tap the device needs
        (DeviceManagerError, InternalError),    # incl. a device that cannot be removed (rng, ...)
        (UnknownMemoryZone, NotFound),
        (InvalidMemoryResize, InvalidRequest),
        (MemoryResizeError, InternalError),     # e.g. no hot plug slot left
        (SnapshotError, InvalidRequest),        # a snapshot URL, directory or file the client gave
        (NotSnapshottable, InvalidRequest),     # a device pych cannot save, a removal pending
        (StateError, InvalidRequest),           # saved state that does not fit this pych's VM
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
        for source, target in translations():
            if isinstance(error, source):
                raise target(context, str(error)) from None
        if otherwise is None:
            raise
        log.debug("%s", context, exc_info=True)
        raise otherwise(context, str(error)) from None
