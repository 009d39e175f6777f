"""pych.config.memory: --memory, --memory-zone and the memory checks."""

from __future__ import annotations

import pytest
from hypothesis import given

from pych.config import ConfigError, MemoryConfig, MemoryZoneConfig, OptionError, VmConfig

from .helpers import GIB, MIB, dump, vm
from .roundtrip import EXAMPLES, memories, memory_cli


def test_memory_defaults() -> None:
    memory = MemoryConfig.parse(MemoryConfig.CLI_DEFAULT)
    assert dump(memory) == {
        "size": 512 * MIB,
        "mergeable": False,
        "hotplug_method": "Acpi",
        "shared": False,
        "hugepages": False,
        "prefault": False,
        "reserve": False,
        "thp": True,
    }
    assert memory == VmConfig().memory


def test_memory_size_suffixes() -> None:
    assert MemoryConfig.parse("size=1G").size == 1073741824
    assert MemoryConfig.parse("size=1024").size == 1024


def test_memory_hotplug_keys() -> None:
    memory = MemoryConfig.parse(
        "size=1G,hotplug_method=virtio-mem,hotplug_size=2G,hotplugged_size=512M,"
        "shared=on,hugepages=on,hugepage_size=2M,prefault=on,reserve=on,thp=off,mergeable=off"
    )
    assert memory == MemoryConfig.model_validate(
        {
            "size": GIB,
            "hotplug_method": "VirtioMem",
            "hotplug_size": 2 * GIB,
            "hotplugged_size": 512 * MIB,
            "shared": True,
            "hugepages": True,
            "hugepage_size": 2 * MIB,
            "prefault": True,
            "reserve": True,
            "thp": False,
        }
    )
    assert MemoryConfig.parse("hotplug_method=ACPI").hotplug_method == "Acpi"


def test_memory_file_key_is_accepted_and_ignored() -> None:
    """As the reference parses it; ``pych`` refuses the key (pych.config.support)."""
    assert MemoryConfig.parse("size=1G,file=/dev/shm/x") == MemoryConfig.parse("size=1G")


def test_memory_zones_inherit_mergeable() -> None:
    memory = MemoryConfig.parse(
        "size=0,mergeable=on,hotplug_method=virtio-mem",
        ["id=mem0,size=1G", "id=mem1,size=0,mergeable=off,hotplug_size=1G,host_numa_node=0"],
    )
    assert memory.zones == [
        MemoryZoneConfig(id="mem0", size=GIB, mergeable=True),
        MemoryZoneConfig(id="mem1", size=0, mergeable=False, hotplug_size=GIB, host_numa_node=0),
    ]
    assert MemoryZoneConfig.parse("id=z").size == 512 * MIB


def test_memory_zone_needs_an_id() -> None:
    with pytest.raises(OptionError, match=r"^--memory-zone: id missing$"):
        MemoryConfig.parse("size=0", ["size=1G"])


@pytest.mark.parametrize("text", ["size=1x", "size=", "size=-1G"])
def test_bad_memory_size(text: str) -> None:
    if text == "size=":  # key= means "use the default"
        assert MemoryConfig.parse(text).size == 512 * MIB
        return
    with pytest.raises(OptionError, match=r"^--memory: invalid value .* for 'size'"):
        MemoryConfig.parse(text)


@pytest.mark.parametrize(
    ("memory", "zones", "message"),
    [
        ("size=1000", [], "not a multiple of"),
        ("size=1G,hotplug_size=0", [], "hotplug_size"),
        ("size=1G,hotplug_size=1G,hotplugged_size=512M", [], "virtio-mem"),
        ("size=1G,hotplug_method=virtio-mem,hotplugged_size=512M", [], "needs a 'hotplug_size'"),
        (
            "size=1G,hotplug_method=virtio-mem,hotplug_size=1G,hotplugged_size=2G",
            [],
            "can't be bigger",
        ),
        ("size=0", [], "No memory zones found"),
        ("size=1G", ["id=z,size=1G"], "memory size of 0"),
        ("size=0", ["id=z,size=1G,hotplug_size=1G"], "hotplug_method=virtio-mem"),
        ("size=1G,hugepage_size=2M", [], "huge pages not enabled"),
        ("size=1G,hugepages=on,hugepage_size=3M", [], "not power of 2"),
        ("size=1G,shared=on,mergeable=on", [], "both 'mergeable' and 'shared'"),
    ],
)
def test_memory_validation(memory: str, zones: list[str], message: str) -> None:
    config = vm(memory=dump(MemoryConfig.parse(memory, zones)))
    with pytest.raises(ConfigError, match=message):
        config.validate(check_support=False)  # the reference's rules, huge pages included


def test_valid_memory_configurations() -> None:
    vm(memory=dump(MemoryConfig.parse("size=1G,hotplug_size=8G"))).validate()
    vm(
        memory=dump(
            MemoryConfig.parse(
                "size=1G,hotplug_method=virtio-mem,hotplug_size=8G,hotplugged_size=1G"
            )
        )
    ).validate()
    vm(
        memory=dump(
            MemoryConfig.parse(
                "size=0,hotplug_method=virtio-mem",
                ["id=mem0,size=1G,hotplug_size=1G", "id=mem1,size=512M"],
            )
        )
    ).validate()


@EXAMPLES
@given(memories)
def test_memory_cli_round_trip(memory: MemoryConfig) -> None:
    text, zone_texts = memory_cli(memory)
    assert MemoryConfig.parse(text, zone_texts) == memory
