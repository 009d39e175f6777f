"""pych.cli.options: the options of the pych process itself."""

from __future__ import annotations

import pytest

from pych.cli.options import ApiSocketOption, EventMonitorOption
from pych.config import OptionError


@pytest.mark.parametrize(
    ("text", "expected"),
    [
        ("/tmp/api.sock", ApiSocketOption(path="/tmp/api.sock")),
        ("path=/tmp/api.sock", ApiSocketOption(path="/tmp/api.sock")),
        ("fd=3", ApiSocketOption(fd=3)),
    ],
)
def test_api_socket(text: str, expected: ApiSocketOption) -> None:
    assert ApiSocketOption.parse(text) == expected


def test_event_monitor() -> None:
    assert EventMonitorOption.parse("path=/tmp/ev.json") == EventMonitorOption(path="/tmp/ev.json")
    assert EventMonitorOption.parse("fd=4") == EventMonitorOption(fd=4)
    with pytest.raises(OptionError, match="path or fd required"):
        EventMonitorOption.parse("")
    with pytest.raises(OptionError, match="unknown key"):
        EventMonitorOption.parse("/tmp/ev.json")
