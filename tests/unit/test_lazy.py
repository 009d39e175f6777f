"""pych.lazy: a package's names imported from their modules on first use."""

from __future__ import annotations

import sys
import textwrap

import pytest


@pytest.fixture
def package(tmp_path, monkeypatch):
    pkg = tmp_path / "lazypkg"
    pkg.mkdir()
    (pkg / "__init__.py").write_text(textwrap.dedent("""
        from pych import lazy
        _MODULE_OF = {"Thing": "things"}
        __all__ = sorted(_MODULE_OF)
        __getattr__, __dir__ = lazy.exports(__name__, _MODULE_OF)
    """))
    (pkg / "things.py").write_text("class Thing:\n    pass\n")
    monkeypatch.syspath_prepend(str(tmp_path))
    yield "lazypkg"
    for name in ("lazypkg", "lazypkg.things"):
        sys.modules.pop(name, None)


def test_a_name_imports_its_module_only_when_first_used(package):
    import lazypkg
    assert "lazypkg.things" not in sys.modules
    assert "Thing" in dir(lazypkg)
    thing = lazypkg.Thing
    assert "lazypkg.things" in sys.modules and thing is sys.modules["lazypkg.things"].Thing
    assert vars(lazypkg)["Thing"] is thing            # kept: later lookups are plain


def test_an_unknown_name_is_an_attribute_error_naming_it(package):
    import lazypkg
    with pytest.raises(AttributeError, match="'lazypkg' has no attribute 'Other'"):
        lazypkg.Other
    from lazypkg import Thing                           # from-imports go through it too
    assert Thing.__name__ == "Thing"
