"""The VMM's domain errors: what a request can fail with, in the VMM's own words.

The core (``pych.vmm`` and below) raises these; it knows nothing of HTTP. The API maps each
class to a status code in one table (``pych.api.errors``), as Cloud Hypervisor's
``http_endpoint.rs`` maps its ``ApiError`` variants.

``messages`` is the error chain, outermost first, exactly as the API's JSON array of
strings shows it: ``InvalidRequest("Error resizing VM vCPUs", "desired_vcpus 9 is not
between 1 and max_vcpus (8)")``.
"""

from __future__ import annotations


class VmmError(Exception):
    """Base of the domain errors; never raised itself."""

    def __init__(self, *messages: str) -> None:
        if not messages:
            raise ValueError(f"{type(self).__name__} needs at least one message")
        self.messages: list[str] = list(messages)
        super().__init__("; ".join(self.messages))

    def within(self, context: str) -> VmmError:
        """The same error with ``context`` as the outermost message."""
        return type(self)(context, *self.messages)


class VmNotCreated(VmmError):
    """The request needs a VM and none has been created."""


class VmAlreadyCreated(VmmError):
    """``vm.create`` while a VM exists, ``vm.boot`` while it is booted."""


class InvalidState(VmmError):
    """The VM exists but is not in a state for this request (pause a paused VM, ...)."""


class InvalidRequest(VmmError):
    """The request itself is wrong: a size out of range, a field the VM cannot take."""


class NotFound(VmmError):
    """The request names something the VM does not have (a device id, a memory zone)."""


class Conflict(VmmError):
    """The request clashes with what the VM already has (an id or a path in use)."""


class RetryLater(VmmError):
    """The guest has not finished acting on an earlier request (a vCPU removal)."""


class BackendError(VmmError):
    """A host resource the request names cannot be used (a missing file, a tap that is not
    a tap, a vhost-user socket nobody listens on): the caller's to fix."""


class Unsupported(VmmError):
    """The request is valid for the reference but pych does not implement it."""


class InternalError(VmmError):
    """The VMM failed to carry out a valid request."""
