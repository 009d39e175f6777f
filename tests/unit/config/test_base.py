"""pych.config.base: the JSON rules, the errors and the CLI declarations."""

from __future__ import annotations

import json
from typing import Annotated, Any, ClassVar

import pytest
from pydantic import ValidationError

from pych.config import (
    ConfigError,
    ConsoleConfig,
    CpusConfig,
    DeviceConfig,
    DiskConfig,
    FsConfig,
    MemoryConfig,
    NetConfig,
    OptionError,
    PlatformConfig,
    RngConfig,
    VmConfig,
    VmRemoveDevice,
    VmResize,
    VmResizeZone,
    describe_validation_error,
    validation_messages,
)
from pych.config.base import TEXT, Cli, CliModel, Rejected, Str
from pych.config.grammar import OptionParserError

from .helpers import dump, vm

# --------------------------------------------------------------------------
# JSON input rules


def test_unknown_json_fields_are_ignored() -> None:
    config = VmConfig.model_validate_json(
        '{"payload": {"kernel": "/k", "future": 1}, "cpus": {"boot_vcpus": 1, "max_vcpus": 2,'
        ' "new_knob": true}, "something_new": {}}'
    )
    assert config.cpus.max_vcpus == 2
    assert "something_new" not in dump(config)


@pytest.mark.parametrize(
    "body",
    [
        {"path": "a", "num_queues": "2"},
        {"path": "a", "num_queues": 2.0},
        {"path": "a", "num_queues": True},
        {"path": "a", "readonly": 1},
        {"path": "a", "readonly": "on"},
        {"path": "a", "readonly": None},
        {"path": 5},
        {"path": "a", "image_type": "raw"},
    ],
)
def test_json_types_are_strict(body: dict[str, Any]) -> None:
    with pytest.raises(ValidationError):
        DiskConfig.model_validate(body)


def test_required_json_fields() -> None:
    for cls, body in [
        (CpusConfig, {"boot_vcpus": 1}),
        (MemoryConfig, {}),
        (RngConfig, {}),
        (ConsoleConfig, {}),
        (FsConfig, {"tag": "t"}),
        (VmResizeZone, {"id": "z"}),
        (VmRemoveDevice, {}),
    ]:
        with pytest.raises(ValidationError):
            cls.model_validate(body)
    # Required in the spec, defaulted by serde:
    assert FsConfig.model_validate({"tag": "t", "socket": "/s"}).queue_size == 1024
    assert NetConfig.model_validate({}).ip is None


def test_fds_never_come_from_json() -> None:
    body = '{"tap": "t", "fds": [7, 8], "num_queues": 4}'
    assert NetConfig.model_validate_json(body).fds == [-1, -1]
    assert NetConfig.model_validate(json.loads(body)).fds == [7, 8]
    assert DeviceConfig.model_validate_json('{"fd": 9}').fd == -1
    assert PlatformConfig.model_validate_json('{"iommufd_fd": 9}').iommufd_fd == -1


def test_iommu_false_is_omitted_for_devices_only() -> None:
    assert "iommu" not in dump(DiskConfig(path="a"))
    assert dump(DiskConfig(path="a", iommu=True))["iommu"] is True
    assert dump(vm())["iommu"] is False


# --------------------------------------------------------------------------
# Errors


def test_option_errors_are_config_and_parser_errors() -> None:
    with pytest.raises(OptionError) as err:
        DiskConfig.parse("bogus=1")
    assert isinstance(err.value, ConfigError)
    assert isinstance(err.value, OptionParserError)


def test_validation_messages() -> None:
    with pytest.raises(ValidationError) as err:
        VmConfig.model_validate({"disks": [{"num_queues": "2"}], "cpus": {"boot_vcpus": 0}})
    lines = validation_messages(err.value)
    assert lines == [
        "cpus.boot_vcpus: Input should be greater than or equal to 1",
        "cpus.max_vcpus: Field required",
        "disks.0.num_queues: Input should be a valid integer",
    ]
    assert describe_validation_error(err.value) == "; ".join(lines)


def test_validation_message_without_location() -> None:
    with pytest.raises(ValidationError) as err:
        VmResize.model_validate([1])
    assert validation_messages(err.value) == [
        "Input should be a valid dictionary or instance of VmResize"
    ]


# --------------------------------------------------------------------------
# CLI declarations


def _cli_models(cls: type = CliModel) -> list[type[CliModel]]:
    found = []
    for sub in cls.__subclasses__():
        if "CLI_OPTION" in vars(sub):
            found.append(sub)
        found += _cli_models(sub)
    return found


@pytest.mark.parametrize("model", _cli_models(), ids=lambda model: model.__name__)
def test_every_cli_model_declares_its_keys_once(model: type[CliModel]) -> None:
    # Building the grammar fails on a key declared twice; an unknown key names them all.
    with pytest.raises(OptionError, match=rf"^{model.CLI_OPTION}: unknown key 'bogus'"):
        model.parse("bogus=1")


def test_a_key_declared_twice_is_refused() -> None:
    class Twice(CliModel):
        CLI_OPTION: ClassVar[str] = "--twice"

        socket: Annotated[Str | None, TEXT] = None
        vhost_socket: Annotated[Str | None, Cli(key="socket")] = None

    with pytest.raises(TypeError, match="declared twice"):
        Twice.parse("")


def test_cli_keys_and_rejections() -> None:
    def even(raw: str) -> int:
        if int(raw) % 2:
            raise Rejected(f"{raw} is odd")
        return int(raw)

    class Option(CliModel):
        CLI_OPTION: ClassVar[str] = "--option"

        name: Annotated[Str, Cli(required=True)]
        count: Annotated[int, Cli(even, key="n", default=2)]
        label: Annotated[Str | None, Cli(deprecated="old_label")] = None

    assert Option.parse("name=a") == Option(name="a", count=2)
    assert Option.parse("name=a,n=4,old_label=x") == Option(name="a", count=4, label="x")
    assert Option.parse("name=a,label=y,old_label=x").label == "y"
    with pytest.raises(OptionError, match=r"^--option: name missing$"):
        Option.parse("n=4")
    with pytest.raises(OptionError, match=r"^--option: 3 is odd$"):
        Option.parse("name=a,n=3")
    with pytest.raises(OptionError, match=r"^--option: invalid value 'x' for 'n'"):
        Option.parse("name=a,n=x")
    with pytest.raises(OptionError, match="unknown key 'count'"):
        Option.parse("name=a,count=4")
