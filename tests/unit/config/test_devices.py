"""pych.config.devices: rate limiting, --rng, --rtc, --balloon and the consoles."""

from __future__ import annotations

from typing import Any

import pytest
from pydantic import ValidationError

from pych.config import (
    BalloonConfig,
    ConfigError,
    ConsoleConfig,
    DebugConsoleConfig,
    DiskConfig,
    OptionError,
    RateLimiterConfig,
    RateLimitGroupConfig,
    RngConfig,
    RtcConfig,
    SerialConfig,
    VmConfig,
)

from .helpers import MIB, dump, vm

# --------------------------------------------------------------------------
# Rate limiting


def test_rate_limiter_needs_size_and_refill_time() -> None:
    assert DiskConfig.parse("path=a,bw_size=1000").rate_limiter_config is None
    limiter = DiskConfig.parse("path=a,bw_size=1000,bw_refill_time=10").rate_limiter_config
    assert dump(limiter) == {
        "bandwidth": {"size": 1000, "one_time_burst": 0, "refill_time": 10},
        "ops": None,  # serde writes the unset bucket as null
    }


def test_rate_limiter_rejects_unknown_fields_like_the_reference() -> None:
    with pytest.raises(ValidationError):
        RateLimiterConfig.model_validate({"bandwidth": None, "bogus": 1})


def test_rate_limit_group_option() -> None:
    group = RateLimitGroupConfig.parse("id=g0,bw_size=100,bw_refill_time=10")
    assert group.rate_limiter_config.bandwidth is not None
    assert group.rate_limiter_config.ops is None


# --------------------------------------------------------------------------
# Small devices


def test_rng() -> None:
    assert RngConfig.parse("") == RngConfig.parse(RngConfig.CLI_DEFAULT) == VmConfig().rng
    assert RngConfig.parse("src=/dev/random,iommu=on") == RngConfig(src="/dev/random", iommu=True)


def test_rtc_option() -> None:
    assert RtcConfig.parse("") == RtcConfig()


def test_balloon() -> None:
    balloon = BalloonConfig.parse("size=128M,deflate_on_oom=on,free_page_reporting=on")
    assert balloon == BalloonConfig(size=128 * MIB, deflate_on_oom=True, free_page_reporting=True)
    assert BalloonConfig.parse("").size == 0
    with pytest.raises(ConfigError, match=r"Balloon size \(536870912\) greater than RAM"):
        vm(balloon={"size": 512 * MIB}).validate()


# --------------------------------------------------------------------------
# Consoles


@pytest.mark.parametrize(
    ("cls", "text", "expected"),
    [
        (SerialConfig, "off", {"mode": "Off"}),
        (SerialConfig, "null", {"mode": "Null"}),
        (SerialConfig, "pty", {"mode": "Pty"}),
        (SerialConfig, "tty", {"mode": "Tty"}),
        (SerialConfig, "file=/tmp/serial.log", {"mode": "File", "file": "/tmp/serial.log"}),
        (SerialConfig, "socket=/tmp/s.sock", {"mode": "Socket", "socket": "/tmp/s.sock"}),
        (ConsoleConfig, "off", {"pci_segment": 0, "mode": "Off"}),
        (ConsoleConfig, "tty,iommu=on", {"iommu": True, "pci_segment": 0, "mode": "Tty"}),
        (ConsoleConfig, "file=/c", {"pci_segment": 0, "mode": "File", "file": "/c"}),
        (DebugConsoleConfig, "off,iobase=0xe9", {"mode": "Off", "iobase": 0xE9}),
        (DebugConsoleConfig, "file=/d", {"mode": "File", "file": "/d"}),
    ],
)
def test_console_modes(cls: type, text: str, expected: dict[str, Any]) -> None:
    assert dump(cls.parse(text)) == expected


@pytest.mark.parametrize(
    ("cls", "text", "message"),
    [
        (SerialConfig, "", "invalid console mode given"),
        (SerialConfig, "file=", "Path missing when using file console mode"),
        (SerialConfig, "socket=", "Path missing when using socket console mode"),
        (SerialConfig, "mode=tty", "unknown key 'mode'"),
        (SerialConfig, "off,iommu=on", "unknown key 'iommu'"),
        (DebugConsoleConfig, "off,iobase=e9", "`0x` prefix"),
        (DebugConsoleConfig, "socket=/s", "unknown key 'socket'"),
    ],
)
def test_console_errors(cls: type, text: str, message: str) -> None:
    with pytest.raises(OptionError, match=message):
        cls.parse(text)


def test_json_console_in_file_mode_needs_a_file() -> None:
    with pytest.raises(ConfigError, match="Path missing when using file console mode"):
        vm(serial={"mode": "File"}).validate()


def test_an_incomplete_bucket_is_ignored_without_reading_its_burst() -> None:
    # As in the reference: without both size and refill time the bucket is left out, and
    # its one_time_burst is never converted.
    assert DiskConfig.parse("path=a,bw_one_time_burst=x").rate_limiter_config is None
    with pytest.raises(OptionError, match="invalid value 'x' for 'bw_one_time_burst'"):
        DiskConfig.parse("path=a,bw_size=1,bw_refill_time=1,bw_one_time_burst=x")
