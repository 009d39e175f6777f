"""pych.config.api: the other request bodies and the responses."""

from __future__ import annotations

import json

import pytest
from pydantic import ValidationError

from pych.config import (
    OptionError,
    PciDeviceInfo,
    ReceiveMigrationData,
    RestoreConfig,
    SendMigrationData,
    VmInfo,
    VmResize,
)

from .helpers import GIB, MIB, dump, vm


def test_restore_and_migration_options() -> None:
    restore = RestoreConfig.parse(
        "source_url=file:///snap,prefault=on,memory_restore_mode=ondemand,"
        "net_fds=[net0@[3,4]],vfio_fds=[gpu@5],resume=on,zone_updates=[mem0@1]"
    )
    assert dump(restore) == {
        "source_url": "file:///snap",
        "prefault": True,
        "memory_restore_mode": "OnDemand",
        "net_fds": [{"id": "net0", "num_fds": 2, "fds": [3, 4]}],
        "vfio_fds": [{"id": "gpu", "fd": 5}],
        "resume": True,
        "zone_updates": [{"id": "mem0", "host_numa_node": 1}],
    }
    # Over JSON the numbers mean nothing: the descriptors come with SCM_RIGHTS.
    assert RestoreConfig.model_validate_json(restore.model_dump_json()).net_fds[0].fds == [-1, -1]
    with pytest.raises(OptionError, match="source_url missing"):
        RestoreConfig.parse("resume=on")
    send = SendMigrationData.parse("destination_url=unix:/m,local=on,timeout_strategy=ignore")
    assert (send.local, send.timeout_strategy, send.downtime_ms) == (True, "Ignore", 300)
    with pytest.raises(OptionError, match="connections: Input should be less than or equal"):
        SendMigrationData.parse("destination_url=unix:/m,connections=129")
    receive = ReceiveMigrationData.parse("receiver_url=tcp:0.0.0.0:6000,memory_mode=postcopy")
    assert receive.memory_mode == "Postcopy"


def test_resize_ranges() -> None:
    with pytest.raises(ValidationError):
        VmResize.model_validate({"desired_vcpus": 0})
    with pytest.raises(ValidationError):
        VmResize.model_validate({"desired_ram": -1})
    with pytest.raises(ValidationError):
        SendMigrationData.model_validate({"destination_url": "unix:/s", "connections": 129})


def test_ch_remote_resize() -> None:
    resize = VmResize.from_remote_args(memory="3G")
    assert resize.desired_ram == 3221225472
    # ch-remote writes the unset fields as null
    assert dump(resize) == {
        "desired_vcpus": None,
        "desired_ram": 3221225472,
        "desired_balloon": None,
    }
    assert VmResize.from_remote_args(cpus="4", balloon="1G") == VmResize(
        desired_vcpus=4, desired_balloon=GIB
    )
    with pytest.raises(OptionError, match="K, M or G"):
        VmResize.from_remote_args(memory="3GB")
    with pytest.raises(OptionError, match="desired_vcpus"):
        VmResize.from_remote_args(cpus="0")


def test_vm_info_and_pci_device_info() -> None:
    info = VmInfo(config=vm(), state="Running", memory_actual_size=512 * MIB)
    body = json.loads(info.model_dump_json(exclude_none=True))
    assert list(body) == ["config", "state", "memory_actual_size"]
    assert PciDeviceInfo(id="_disk2", bdf="0000:00:06.0").model_dump_json() == (
        '{"id":"_disk2","bdf":"0000:00:06.0"}'
    )
