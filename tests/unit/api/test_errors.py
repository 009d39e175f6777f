"""The one error → status table (pych.api.errors)."""

from __future__ import annotations

from http import HTTPStatus

import pydantic

from pych import errors
from pych.api.errors import STATUS, body_errors, error_chain, status_of
from pych.config import ConfigConflict, ConfigError, VmResize


def _validation_error() -> pydantic.ValidationError:
    try:
        VmResize.model_validate({"desired_vcpus": "two"})
    except pydantic.ValidationError as error:
        return error
    raise AssertionError("validated")


def test_a_named_class_gets_its_status_once_its_module_is_imported() -> None:
    """pydantic.ValidationError is named in the table (pydantic is imported with the first
    model); raised, it is a client's mistake like any body that does not validate."""
    assert "pydantic.ValidationError" in STATUS
    error = _validation_error()
    assert status_of(error) == HTTPStatus.BAD_REQUEST
    assert pydantic.ValidationError in body_errors() and ConfigError in body_errors()
    assert error_chain(error) == ["desired_vcpus: Input should be a valid integer"]


def test_the_nearest_listed_class_decides() -> None:
    assert status_of(ConfigConflict("x")) == HTTPStatus.CONFLICT
    assert status_of(errors.VmNotCreated("VM is not created")) == HTTPStatus.NOT_FOUND
    assert status_of(ValueError("a bug")) is None
