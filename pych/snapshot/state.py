"""Small helpers for the ``state()`` / ``restore(state)`` pairs devices and managers keep
next to their code: plain JSON-able dicts of named attributes.

``save(obj, names)`` reads the attributes, ``load(obj, names, state)`` writes them back, each
value converted by the type it has now: ``bytes``/``bytearray`` as hex, ``deque`` as a list,
enums as their int, dataclasses (and lists of them) as dicts. A missing name in ``state`` is a
:class:`StateError` (a snapshot from another layout), never a silent default.
"""

from __future__ import annotations

import dataclasses
import enum
from collections import deque
from typing import Any


class StateError(Exception):
    """Saved state that does not fit the object it is restored into."""


class NotSnapshottable(Exception):
    """The VM holds something pych cannot save (yet), or is in the middle of a change."""


def encode(value: Any) -> Any:
    if isinstance(value, (bytes, bytearray)):
        return value.hex()
    if isinstance(value, deque):
        return list(value)
    if isinstance(value, enum.Enum):
        return value.value if not isinstance(value, enum.IntFlag) else int(value)
    if dataclasses.is_dataclass(value):
        return dataclasses.asdict(value)
    if isinstance(value, list):
        return [encode(v) for v in value]
    return value


def decode(current: Any, saved: Any) -> Any:
    """``saved`` as the type of ``current`` (the attribute's value before restoring)."""
    if isinstance(current, bytearray):
        data = bytearray.fromhex(saved)
        if len(data) != len(current):
            raise StateError(f"{len(data)} bytes saved where {len(current)} are expected")
        return data
    if isinstance(current, bytes):
        return bytes.fromhex(saved)
    if isinstance(current, deque):
        return deque(saved)
    if isinstance(current, enum.Enum):
        return type(current)(saved)
    if dataclasses.is_dataclass(current):
        return type(current)(**saved)
    if isinstance(current, list):
        if len(saved) != len(current):
            raise StateError(f"{len(saved)} entries saved where {len(current)} are expected")
        return [decode(c, s) for c, s in zip(current, saved)]
    return saved


def save(obj: Any, names: tuple[str, ...]) -> dict[str, Any]:
    return {name.lstrip("_"): encode(getattr(obj, name)) for name in names}


def load(obj: Any, names: tuple[str, ...], state: dict[str, Any]) -> None:
    for name in names:
        key = name.lstrip("_")
        if key not in state:
            raise StateError(f"{type(obj).__name__}: no saved {key}")
        setattr(obj, name, decode(getattr(obj, name), state[key]))
