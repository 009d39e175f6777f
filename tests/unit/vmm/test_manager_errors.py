"""The managers' errors become domain errors in one place (pych.vmm.manager_errors)."""

from __future__ import annotations

import pytest

from pych.api.errors import status_of
from pych.cpu.manager import VcpuRemovalPending
from pych.device_manager.manager import (DeviceBackendError, DeviceIdInUse, DeviceManagerError,
                                         RemovalNotAllowed, UnknownDeviceId)
from pych.errors import (BackendError, Conflict, InternalError, InvalidRequest, InvalidState, NotFound,
                         RetryLater)
from pych.memory.resize import InvalidMemoryResize, MemoryResizeError, UnknownMemoryZone
from pych.vmm.manager_errors import domain_errors



@pytest.mark.parametrize(("raised", "expected", "status"), [
    (VcpuRemovalPending("pending"), RetryLater, 429),
    (UnknownDeviceId("d0"), NotFound, 404),
    (DeviceBackendError("no such file"), BackendError, 400),
    (DeviceIdInUse("Identifier d0 is not unique (its removal is pending)"), Conflict, 409),
    (RemovalNotAllowed("__rng", "rng"), InternalError, 500),
    (DeviceManagerError("no slot"), InternalError, 500),
    (UnknownMemoryZone("no zone z"), NotFound, 404),
    (InvalidMemoryResize("too big"), InvalidRequest, 400),
    (MemoryResizeError("no slot left"), InternalError, 500),
])
def test_each_manager_error_and_its_domain_error(raised, expected, status):
    with pytest.raises(expected) as e:
        with domain_errors("Error doing it"):
            raise raised
    assert type(e.value) is expected and status_of(e.value) == status
    assert e.value.messages == ["Error doing it", str(raised)]
    assert e.value.__cause__ is None                  # the API adds no chain of its own


def test_domain_errors_pass_and_others_only_with_otherwise():
    with pytest.raises(InvalidState) as e:
        with domain_errors("Error doing it"):
            raise InvalidState("not now")
    assert e.value.messages == ["not now"]
    with pytest.raises(KeyError):
        with domain_errors("Error doing it"):
            raise KeyError("k")
    with pytest.raises(InternalError) as e:
        with domain_errors("Error booting VM", otherwise=InternalError):
            raise OSError("Cannot allocate memory")
    assert e.value.messages == ["Error booting VM", "Cannot allocate memory"]
