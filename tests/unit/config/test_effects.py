"""Every field and CLI key the support table says works has a probe of its effect
(tests/unit/config/effects.py), and each probe passes."""

from __future__ import annotations

import pytest

from pych.config.support import SUPPORT, Works

from tests.unit.config.effects import PROBES, ShownBy


def works_fields() -> list[str]:
    return sorted(f"{model.__name__}.{field}" for model, table in SUPPORT.items()
                  for field, rule in table.items() if isinstance(rule, Works))


FIELD_PROBES = sorted(key for key in PROBES if not key.startswith("--"))


def test_every_field_that_works_has_a_probe():
    assert sorted(set(works_fields()) - set(FIELD_PROBES)) == []
    assert sorted(set(FIELD_PROBES) - set(works_fields())) == []


@pytest.mark.parametrize("key", [k for k in FIELD_PROBES if not isinstance(PROBES[k], ShownBy)])
def test_probe(key, tmp_path, monkeypatch):
    PROBES[key](tmp_path, monkeypatch)


@pytest.mark.parametrize("key", [k for k in FIELD_PROBES if isinstance(PROBES[k], ShownBy)])
def test_a_field_shown_in_a_guest_names_a_test_that_exists(key):
    assert PROBES[key].exists(), PROBES[key].test
