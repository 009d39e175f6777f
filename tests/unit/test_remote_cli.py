"""pych-remote against an in-process ApiServer: requests built, output, exit codes."""

from __future__ import annotations

import io
import json
import os
import shutil
import sys
import tempfile
from pathlib import Path

import pytest

from pych.api import ApiError, ApiServer, RequestHandler
from pych.cli.remote import main
from pych.config import ConfigConflict, PciDeviceInfo


class Handler(RequestHandler):
    """Records (endpoint, arguments) and answers like a running VM."""

    def __init__(self) -> None:
        self.calls: list[tuple[str, tuple]] = []

    def vmm_ping(self):
        return {"build_version": "v0", "version": "0.1.0", "pid": 42, "features": []}

    def vm_boot(self):
        self.calls.append(("vm_boot", ()))

    def vm_pause(self):
        raise ApiError(404, ["VM is not created"])

    def vm_resize(self, resize):
        self.calls.append(("vm_resize", (resize,)))

    def vm_resize_zone(self, resize):
        self.calls.append(("vm_resize_zone", (resize,)))

    def vm_resize_disk(self, resize):
        self.calls.append(("vm_resize_disk", (resize,)))

    def vm_create(self, config):
        self.calls.append(("vm_create", (config,)))

    def vm_add_disk(self, config):
        if config.id == "taken":
            raise ConfigConflict("Identifier taken is not unique")
        self.calls.append(("vm_add_disk", (config,)))
        return PciDeviceInfo(id=config.id or "_disk0", bdf="0000:00:06.0")

    def vm_add_net(self, config, fds):
        self.calls.append(("vm_add_net", (config, fds)))

    def vm_remove_device(self, request):
        self.calls.append(("vm_remove_device", (request,)))

    def vm_snapshot(self, config):
        self.calls.append(("vm_snapshot", (config,)))


@pytest.fixture
def vmm():
    directory = Path(tempfile.mkdtemp(prefix="pych-remote-", dir="/tmp"))
    handler = Handler()
    with ApiServer(lambda fn: fn(handler), path=directory / "api.sock"):
        yield handler, os.fspath(directory / "api.sock")
    shutil.rmtree(directory, ignore_errors=True)


def remote(socket_path: str, *args: str) -> int:
    return main(["--api-socket", socket_path, *args])


def test_ping_prints_the_body(vmm, capsys):
    _, path = vmm
    assert remote(path, "ping") == 0
    out, err = capsys.readouterr()
    assert json.loads(out) == {"build_version": "v0", "version": "0.1.0", "pid": 42, "features": []}
    assert out.endswith("}\n") and err == ""


def test_a_204_prints_nothing(vmm, capsys):
    handler, path = vmm
    assert remote(path, "boot") == 0
    assert capsys.readouterr() == ("", "")
    assert handler.calls == [("vm_boot", ())]


def test_a_server_error_prints_the_chain_and_exits_1(vmm, capsys):
    _, path = vmm
    assert remote(path, "pause") == 1
    out, err = capsys.readouterr()
    assert out == ""
    assert err.splitlines() == [
        "Error: pych-remote exited with the following chain of errors:",
        "  0: http client error",
        "  1: Server responded with 404 Not Found",
        "  2: Error from API",
        "  3: VM is not created",
    ]


def test_an_unimplemented_endpoint_exits_1(vmm, capsys):
    _, path = vmm
    assert remote(path, "nmi") == 1
    err = capsys.readouterr().err
    assert "Server responded with 500 Internal Server Error" in err
    assert "vm.nmi is not supported by pych yet" in err


def test_add_disk_sends_the_parsed_config_and_prints_the_pci_info(vmm, capsys):
    handler, path = vmm
    assert remote(path, "add-disk", "path=/img/data.raw,readonly=on,id=data") == 0
    assert json.loads(capsys.readouterr().out) == {"id": "data", "bdf": "0000:00:06.0"}
    ((_, (config,)),) = handler.calls
    assert (config.path, config.readonly, config.id) == ("/img/data.raw", True, "data")


def test_a_conflict_is_reported_as_409(vmm, capsys):
    _, path = vmm
    assert remote(path, "add-disk", "path=/img/x.raw,id=taken") == 1
    err = capsys.readouterr().err
    assert "Server responded with 409 Conflict" in err
    assert "Identifier taken is not unique" in err


def test_add_net_passes_its_fds_with_scm_rights(vmm, capsys):
    handler, path = vmm
    read_end, write_end = os.pipe()
    spare_read, spare_write = os.pipe()
    try:
        assert remote(path, "add-net", f"fd=[{write_end},{spare_write}],num_queues=4") == 0
        ((_, (config, fds)),) = handler.calls
        assert config.fds is None and len(fds) == 2  # the numbers never travel in the JSON
        os.write(fds[0], b"!")
        assert os.read(read_end, 1) == b"!"
        for fd in fds:
            os.close(fd)
    finally:
        for fd in (read_end, write_end, spare_read, spare_write):
            os.close(fd)


def test_resize_bodies(vmm):
    handler, path = vmm
    assert remote(path, "resize", "--cpus", "4", "--memory", "3G") == 0
    assert remote(path, "resize-zone", "--id", "mem1", "--size", "512M") == 0
    assert remote(path, "resize-disk", "--disk", "_disk0", "--size", "2G") == 0
    (resize, zone, disk) = [args[0] for _, args in handler.calls]
    assert (resize.desired_vcpus, resize.desired_ram, resize.desired_balloon) == (4, 3 << 30, None)
    assert (zone.id, zone.desired_ram) == ("mem1", 512 << 20)
    assert (disk.id, disk.desired_size) == ("_disk0", 2 << 30)


def test_remove_device_and_snapshot_bodies(vmm):
    handler, path = vmm
    assert remote(path, "remove-device", "_net2") == 0
    assert remote(path, "snapshot", "file:///var/snap") == 0
    (remove, snapshot) = [args[0] for _, args in handler.calls]
    assert remove.id == "_net2" and snapshot.destination_url == "file:///var/snap"


def test_create_from_a_file_and_from_stdin(vmm, tmp_path, monkeypatch):
    handler, path = vmm
    config = {"payload": {"kernel": "/boot/vmlinux"}, "cpus": {"boot_vcpus": 2, "max_vcpus": 4}}
    (tmp_path / "vm.json").write_text(json.dumps(config))
    assert remote(path, "create", os.fspath(tmp_path / "vm.json")) == 0
    monkeypatch.setattr(sys, "stdin", io.TextIOWrapper(io.BytesIO(json.dumps(config).encode())))
    assert remote(path, "create") == 0
    assert [args[0].cpus.max_vcpus for _, args in handler.calls] == [4, 4]


@pytest.mark.parametrize(
    ("args", "heading"),
    [
        (["add-disk", "path=/x,bogus=1"], "Error parsing disk syntax"),
        (["resize", "--cpus", "many"], "Error parsing resize arguments"),
        (["resize", "--memory", "3T"], "Error parsing resize arguments"),
        (["resize-zone", "--id", "z", "--size", "big"], "Error parsing memory size"),
    ],
)
def test_bad_arguments_exit_1_before_any_request(vmm, capsys, args, heading):
    handler, path = vmm
    assert remote(path, *args) == 1
    err = capsys.readouterr().err
    assert err.startswith("Error: pych-remote exited with the following chain of errors:\n")
    assert f"  0: {heading}\n" in err
    assert handler.calls == []


def test_a_missing_socket_is_one_clear_line(tmp_path, capsys):
    assert remote(os.fspath(tmp_path / "absent.sock"), "ping") == 1
    out, err = capsys.readouterr()
    assert out == ""
    assert err.count("\n") == 1 and "absent.sock" in err and "No such file" in err


def test_usage_errors(capsys):
    assert main(["ping"]) == 1  # no --api-socket
    assert "--api-socket" in capsys.readouterr().err
    assert main(["--api-socket", "/x"]) == 2  # no subcommand
    assert main(["--api-socket", "/x", "frobnicate"]) == 2
