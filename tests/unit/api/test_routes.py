"""The route table (pych.api.routes): models named, imported when first needed."""

from __future__ import annotations

import pytest

import pych.config
from pych.api import routes
from pych.api.routes import ROUTES, ModelName, models


def test_every_named_model_is_the_class_pych_config_exports_under_that_name() -> None:
    for route in ROUTES:
        for ref, model in ((route.body_model, route.body), (route.response_model, route.response)):
            if ref is None:
                assert model is None
            else:
                assert model is getattr(pych.config, ref.name)
                assert model.__name__ == ref.name
        assert route.takes_body == (route.body is not None)


def test_a_model_name_pych_config_lacks_fails_when_the_table_is_built() -> None:
    with pytest.raises(AttributeError, match="DiskConfg"):
        models.DiskConfg
    with pytest.raises(AttributeError):
        ModelName("os")


def test_the_table_takes_model_names_not_classes() -> None:
    """A class in the table would import pydantic with the table (and the server)."""
    with pytest.raises(TypeError, match="models.DiskConfig"):
        routes._put("vm.add-disk", pych.config.DiskConfig, lambda h, disk: h.vm_add_disk(disk),
                    routes.RemoteCommand("add-disk", "Add block device"))
