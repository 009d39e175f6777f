"""Helpers of the config tests: a bootable VmConfig, the JSON a model writes, sizes."""

from __future__ import annotations

from typing import Any

from pych.config import VmConfig

GIB = 1 << 30
MIB = 1 << 20


def vm(**fields: Any) -> VmConfig:
    """A bootable VmConfig with ``fields`` (JSON shaped)."""
    return VmConfig.model_validate({"payload": {"kernel": "/k"}, **fields})


def dump(model: Any) -> Any:
    return model.model_dump(mode="json", exclude_none=True)
