"""The ``pych`` and ``pych-remote`` commands."""

from __future__ import annotations

import os


def without_pydantic_plugins() -> None:
    """pydantic scans every installed package's entry points for plugins of its own when
    the first model is built (tens of ms at a VM's creation); pych uses none, so its
    commands turn them off with pydantic's documented ``PYDANTIC_DISABLE_PLUGINS``
    (docs.pydantic.dev, "Plugins", "Disabling Plugins") unless the environment already says
    something (set it to ``""`` to let pydantic load every plugin)."""
    os.environ.setdefault("PYDANTIC_DISABLE_PLUGINS", "__all__")
