"""The ``pych`` and ``pych-remote`` commands."""

from __future__ import annotations

import os
import sys
import types

_PLUGIN_LOADER = "pydantic.plugin._loader"


def without_pydantic_plugins() -> None:
    """pydantic scans every installed package's entry points for plugins of its own when
    the first model is built (tens of ms at a VM's creation); pych uses none, so its
    commands turn them off with pydantic's documented ``PYDANTIC_DISABLE_PLUGINS``
    (docs.pydantic.dev, "Plugins", "Disabling Plugins") unless the environment already says
    something (set it to ``""`` to let pydantic load every plugin).

    With every plugin off, the loader's answer is known (none), yet importing it imports
    ``importlib.metadata`` and with it the ``email`` package: 10-30 ms of a VM's start
    here (100 ms on a loaded host), for nothing. So pych puts a loader that answers "no
    plugins" in its place, unless pydantic has loaded its own already.
    """
    os.environ.setdefault("PYDANTIC_DISABLE_PLUGINS", "__all__")
    if os.environ["PYDANTIC_DISABLE_PLUGINS"] == "__all__" and _PLUGIN_LOADER not in sys.modules:
        loader = types.ModuleType(_PLUGIN_LOADER, "pych: pydantic plugins are disabled")
        loader.get_plugins = lambda: ()
        sys.modules[_PLUGIN_LOADER] = loader
